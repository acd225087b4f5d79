"""The simulator's timing-driven thread choice, fed made-up step times (it is a pure function of them)."""

import numpy as np
import pytest

from icrl_fast.envs.frozen_lake import ADAPTIVE_MIN_ENVS, FrozenLakeBatch, usable_threads
from icrl_fast.envs.maps import generate_maps
from icrl_fast.envs.thread_choice import FIRST_PROBE, MAX_INTERVAL, PROBE_STEPS, ThreadChooser


def drive(chooser, cost, steps):
    """Run ``steps`` steps whose time is ``cost(threads)``; return the thread count of every step."""
    used = []
    for _ in range(steps):
        k = chooser.pick()
        used.append(k)
        chooser.record(k, cost(k))
    return used


def test_quiet_machine_moves_to_the_faster_parallel_step():
    c = ThreadChooser(1, 2)
    used = drive(c, lambda k: 20e-6 / k, 200)  # two threads 2x faster
    assert used.index(2) == FIRST_PROBE + 1  # the first step (kernel load or compilation) is not timed
    assert c.current == 2 and used[-50:].count(2) >= 49  # after the switch, one-thread probes are rare


def test_busy_core_keeps_one_thread_and_probes_almost_never():
    c = ThreadChooser(1, 2)
    used = drive(c, lambda k: 20e-6 if k == 1 else 10e-3, 100_000)  # a parallel step collapses to 10 ms
    assert c.current == 1 and used.count(2) <= 2 * PROBE_STEPS  # the first probe collapses: the next is
    assert c.interval == MAX_INTERVAL  # MAX_INTERVAL steps away


def test_a_load_that_starts_mid_run_is_left_within_a_few_steps():
    c = ThreadChooser(2, 1)
    drive(c, lambda k: 10e-6 if k == 2 else 20e-6, 500)
    assert c.current == 2
    used = drive(c, lambda k: 20e-6 if k == 1 else 10e-3, 3 + 2 * PROBE_STEPS)  # the other core gets busy
    assert c.current == 1 and used.count(2) == 2  # two collapsed parallel steps, then one thread
    assert drive(c, lambda k: 20e-6 if k == 1 else 10e-3, 1000).count(2) <= PROBE_STEPS  # one probe, collapsed


def test_one_slow_parallel_step_is_a_hiccup_not_a_collapse():
    c = ThreadChooser(2, 1)
    drive(c, lambda k: 10e-6 if k == 2 else 20e-6, 500)
    costs = iter([10e-3] + [10e-6] * 10)
    used = drive(c, lambda k: next(costs) if k == 2 else 20e-6, 10)
    assert c.current == 2 and c.switches == 0 and 1 not in used[:2]


def test_a_probe_that_is_not_clearly_faster_does_not_switch_and_backs_off():
    c = ThreadChooser(1, 2)
    used = drive(c, lambda k: 20e-6 if k == 1 else 19e-6, 2000)  # 5 % faster: within noise
    assert c.current == 1 and c.switches == 0
    probes = [i for i, k in enumerate(used) if k == 2 and used[i - 1] == 1]  # where each probe starts
    gaps = np.diff(probes)
    assert len(probes) >= 4 and all(b == 2 * a - PROBE_STEPS for a, b in zip(gaps[:-1], gaps[1:]))  # doubling
    with pytest.raises(ValueError, match="different"):
        ThreadChooser(2, 2)


def test_the_batch_uses_it_only_when_the_thread_count_is_automatic():
    assert FrozenLakeBatch(generate_maps(ADAPTIVE_MIN_ENVS - 1, seed=0))._chooser is None
    assert FrozenLakeBatch(generate_maps(ADAPTIVE_MIN_ENVS, seed=0), num_threads=1)._chooser is None
    env = FrozenLakeBatch(generate_maps(ADAPTIVE_MIN_ENVS, seed=0), seed=0)
    if usable_threads() < 2:
        assert env._chooser is None
        pytest.skip("one usable core: nothing to choose between")
    env.reset()
    for t in range(3 * FIRST_PROBE):  # past the first probe
        env.step(np.full(ADAPTIVE_MIN_ENVS, t % 4))
    assert env._chooser.interval != FIRST_PROBE or env._chooser.switches > 0  # a probe ran and was judged
    assert env.num_threads == env._chooser.current
