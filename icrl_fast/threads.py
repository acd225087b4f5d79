"""How many threads this process computes with: the cores that other processes leave free, re-read while it runs.

Why: torch's CPU ops (OpenMP) and the Numba simulator spin-wait at their barriers. Two processes at two threads each
on two cores made every parallel region wait for a descheduled thread of its own: a default training run fell from
~23k to ~870 tokens/s beside one evaluation (ENV-FACTS.md, 2026-12-05) and recovered the moment it stopped. So a
process asks for no more threads than the cores nobody else is using, and gives them back when the other process
ends: two runs side by side settle at one thread each, a run alone keeps every core.

``ThreadBudget.poll()`` is called once per training step and once per rollout step; it costs a clock read, and once
per ``interval_s`` it reads ``/proc/stat`` (the whole machine's busy time) and this process's own CPU time
(``os.times``): the difference is the other processes' load, in cores. The budget drops to ``cores - others``
(rounded, at least 1) at once and rises again only after two readings in a row agree, so a short burst elsewhere does
not make it oscillate. It sets torch's and Numba's thread counts (see ``apply``: they share one OpenMP runtime). The
simulator's own kernels choose their threads per step (one below ``PARALLEL_MIN_ENVS`` envs, as in training and
evaluation; see ``icrl_fast.envs.frozen_lake``) and restore this count afterwards.

A fixed count (``--threads N``, or ``configure(N)``) turns the adaptation off: results are then bit-identical run to
run, as torch's reductions may split work differently at another thread count. Where ``/proc/stat`` does not exist
(macOS, Windows) the budget stays at the affinity's cores.
"""

from __future__ import annotations

import os
import time

_STAT = "/proc/stat"


def affinity_cores() -> int:
    """The cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where there is no such call)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def _machine_busy_s() -> float | None:
    """Seconds of CPU time every process on the machine has spent busy (all cores), or None without /proc/stat."""
    try:
        with open(_STAT) as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class ThreadBudget:
    """The thread count of this process: fixed, or adapted to the cores the other processes leave free.

    ``threads``: a fixed count (>= 1), or 0 for automatic. ``interval_s``: how often (seconds of wall time) the
    automatic budget re-reads the load. ``current`` is the count in force; ``poll()`` returns it."""

    def __init__(self, threads: int = 0, interval_s: float = 1.0):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads must be 0 (automatic) or a count >= 1, got {threads!r}")
        self.cores = affinity_cores()
        self.fixed = threads > 0
        self.interval_s = interval_s
        self.current = min(threads, self.cores) if self.fixed else self.cores
        self._want_up = 0
        self._last = None  # (wall, machine busy s, own cpu s) at the last reading
        self._next = 0.0
        self.changes = 0  # how many times the automatic budget moved (logged as perf/threads changes)

    def others(self) -> float | None:
        """The other processes' load since the last reading, in cores (None at the first reading or without
        /proc/stat). Starts a new reading."""
        busy = _machine_busy_s()
        if busy is None:
            return None
        now = (time.monotonic(), busy, _own_cpu_s())
        last, self._last = self._last, now
        if last is None or now[0] - last[0] < 0.05:
            return None
        wall = now[0] - last[0]
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / wall)

    def poll(self) -> int:
        """The thread count to use now (re-reading the load at most once per ``interval_s``); applies a change."""
        if self.fixed:
            return self.current
        now = time.monotonic()
        if now < self._next:
            return self.current
        self._next = now + self.interval_s
        others = self.others()
        if others is None:
            return self.current
        free = max(1, min(self.cores, int(self.cores - others + 0.5)))
        if free < self.current:
            self._want_up = 0
            self._set(free)
        elif free > self.current:
            self._want_up += 1
            if self._want_up >= 2:  # two readings in a row: the other process really stopped
                self._want_up = 0
                self._set(free)
        else:
            self._want_up = 0
        return self.current

    def start(self) -> int:
        """Take a first reading over ``0.2`` s, so a process that starts beside a busy one starts with the right
        count instead of one interval later; applies it. Returns the count."""
        if not self.fixed:
            self.others()
            time.sleep(0.2)
            self._next = 0.0
            self.poll()
            self._want_up = 0
        self.apply()
        return self.current

    def _set(self, n: int) -> None:
        self.current = n
        self.changes += 1
        self.apply()

    def apply(self) -> None:
        """Set the count in torch and in Numba. Both must hear it: Numba's ``omp`` threading layer shares torch's
        libgomp, and every parallel Numba kernel restores the caller's Numba thread count on return, which sets
        OpenMP's count for torch too (measured: ``torch.set_num_threads(1)`` was back at 2 after one simulator step)."""
        import numba
        import torch

        numba.set_num_threads(max(1, min(self.current, numba.config.NUMBA_NUM_THREADS)))
        torch.set_num_threads(self.current)


#: The process's budget: ``configure`` replaces it; the trainer and the rollout engine poll it.
BUDGET = ThreadBudget(0)


def configure(threads: int = 0, interval_s: float = 1.0) -> ThreadBudget:
    """Set this process's thread policy (0: automatic, N: fixed), take a first reading and apply it."""
    global BUDGET
    BUDGET = ThreadBudget(threads, interval_s)
    BUDGET.start()
    return BUDGET


def poll() -> int:
    """The current budget's ``poll()``: the thread count in force, adapted to the load."""
    return BUDGET.poll()
