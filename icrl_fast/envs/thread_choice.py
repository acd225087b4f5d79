"""``ThreadChooser``: the batched simulator's thread count, chosen by timing the steps themselves.

Why (measured on a 2-core VM, see ``frozen_lake.PARALLEL_MIN_ENVS``): with the machine to itself two threads step
~2x faster than one from 1,024 envs up, but while another process keeps a core busy a two-thread step waits for a
worker the scheduler has parked and takes 8-12 ms instead of ~20 us. No fixed threshold gets both; timings do.

How: steps run with the ``current`` count and feed a running typical time. Now and then the other count runs for
``PROBE_STEPS`` steps (a probe, judged by its last step). A probe faster than ``SWITCH_BELOW`` x the typical
time makes it the current count. A probe that loses pushes the next one twice as far out (up to ``MAX_INTERVAL``
steps); one that collapses (slower than ``COLLAPSE`` x typical) pushes it straight to ``MAX_INTERVAL``, so on a
loaded machine probes cost a fraction of a percent. Two multi-thread steps in a row that collapse start a one-thread
probe on the next step, so a load that starts mid-run is left within a few steps (one slow step, a hiccup, is not
enough). The first step is not timed: it also loads or compiles the kernel. The choice never changes results
(one random stream per env: the step is the same for any thread count); it is a pure function of the timings it
is fed, which is how it is tested.
"""

from __future__ import annotations

FIRST_PROBE = 64  # steps before the first probe (and after a switch)
MAX_INTERVAL = 1 << 16  # steps between probes at most
SWITCH_BELOW = 0.8  # a probe this much faster than typical switches
COLLAPSE = 4.0  # a step this much slower than typical has collapsed
SMOOTHING = 0.1  # weight of the newest step in the typical time
PROBE_STEPS = 2  # steps a probe runs, judged by the last (the first after a pause also wakes sleeping workers)


class ThreadChooser:
    """Pick between ``start`` and ``other`` threads per step (see the module docstring)."""

    def __init__(self, start: int, other: int):
        if start == other or min(start, other) < 1:
            raise ValueError(f"ThreadChooser needs two different thread counts >= 1, got {start} and {other}")
        self.current, self.other = int(start), int(other)
        self.typical: float | None = None
        self.interval = FIRST_PROBE
        self.countdown = FIRST_PROBE
        self.switches = 0
        self._probe: list[float] = []  # times of the probe in progress
        self._collapsed = 0  # collapsed parallel steps in a row
        self._warm = False

    def pick(self) -> int:
        """The thread count of the next step."""
        return self.other if self.countdown <= 0 else self.current

    def record(self, threads: int, seconds: float) -> None:
        """Feed the time a step took with ``threads`` threads (the count :meth:`pick` gave)."""
        if not self._warm:  # the very first step also loads (or compiles) the kernel: not a step time
            self._warm = True
            return
        typical = self.typical
        if threads == self.current:
            if typical is not None and self.current > 1 and seconds > COLLAPSE * typical:
                self._collapsed += 1
                if self._collapsed >= 2:  # two in a row (one may be a hiccup): probe one thread next, judged
                    self.typical, self.countdown, self._collapsed = seconds, 0, 0  # against the collapsed time
                return
            self._collapsed = 0
            self.typical = seconds if typical is None else (1 - SMOOTHING) * typical + SMOOTHING * seconds
            self.countdown -= 1
            return
        self._probe.append(seconds)
        if len(self._probe) < PROBE_STEPS:  # (the first parallel step after a pause also wakes the workers)
            return
        seconds, self._probe = self._probe[-1], []  # the last: a fastest-of-two would be biased low
        if typical is not None and seconds < SWITCH_BELOW * typical:
            self.current, self.other = self.other, self.current
            self.typical, self.interval = seconds, FIRST_PROBE
            self.switches += 1
        elif typical is not None and seconds > COLLAPSE * typical:
            self.interval = MAX_INTERVAL
        else:
            self.interval = min(2 * self.interval, MAX_INTERVAL)
        self.countdown = self.interval
