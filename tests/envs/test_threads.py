"""Thread control of the batched simulator: one thread below ``PARALLEL_MIN_ENVS`` envs, at most the usable cores
above it, results bit-identical for any thread count, the caller's Numba thread count left as it was."""

import os

import numba
import numpy as np
import pytest

from icrl_fast.envs.frozen_lake import PARALLEL_MIN_ENVS, FrozenLakeBatch, _step_kernel, step_threads
from icrl_fast.envs.maps import generate_maps
from icrl_fast.envs.vector import FrozenLakeVectorEnv

two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                                 reason="needs NUMBA_NUM_THREADS >= 2 (e.g. run with NUMBA_NUM_THREADS=2)")


def test_automatic_thread_count_follows_batch_size_cores_and_numba_limit():
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert step_threads(1) == step_threads(PARALLEL_MIN_ENVS - 1) == 1
    assert step_threads(PARALLEL_MIN_ENVS) == step_threads(10**6) == min(cores, numba.config.NUMBA_NUM_THREADS)
    assert step_threads(10, num_threads=1) == 1
    for bad in (0, numba.config.NUMBA_NUM_THREADS + 1, True, 1.5):
        with pytest.raises(ValueError, match="num_threads"):
            step_threads(10, num_threads=bad)
    assert FrozenLakeBatch(generate_maps(3, seed=0)).num_threads == 1
    assert FrozenLakeVectorEnv(3, num_threads=1).sim.num_threads == 1


def _trajectory(n, num_threads, mode):
    env = FrozenLakeBatch(generate_maps(n, seed=4), is_slippery=True, max_episode_steps=20, autoreset_mode=mode,
                          seed=9, num_threads=num_threads)
    out = [env.reset().copy()]
    for t in range(60):  # 20-step truncation: every env resets at least twice
        obs, rew, term, trunc = env.step(np.random.default_rng(t).integers(0, 4, n))
        out += [x.copy() for x in (obs, rew, term, trunc, env.final_obs)]
    return out


@two_threads
@pytest.mark.parametrize("mode", ["SameStep", "NextStep"])
@pytest.mark.parametrize("n", [257, PARALLEL_MIN_ENVS + 3])
def test_one_and_two_threads_give_bit_identical_steps(n, mode):
    """Either side of the threshold, slippery (one random draw per step) with resets: obs, rewards, terminated,
    truncated and final_obs of every step are the same arrays (same dtype, same bits) for 1, 2 and auto threads."""
    one = _trajectory(n, 1, mode)
    for threads in (2, None):
        other = _trajectory(n, threads, mode)
        assert len(other) == len(one)
        for a, b in zip(one, other):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("caller", [1, pytest.param(2, marks=two_threads)])
def test_step_leaves_the_callers_numba_thread_count_alone(caller):
    env = FrozenLakeBatch(generate_maps(64, seed=0), num_threads=numba.config.NUMBA_NUM_THREADS)
    env.reset(seed=0)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(caller)
        env.step(np.zeros(64, dtype=np.int64))
        assert numba.get_num_threads() == caller
    finally:
        numba.set_num_threads(old)


def test_step_kernel_stays_cacheable():
    """The kernel sets its thread count through symbols, not ctypes pointers (which Numba cannot cache)."""
    env = FrozenLakeBatch(generate_maps(8, seed=0), seed=0)
    env.reset()
    env.step(np.zeros(8, dtype=np.int64))
    assert _step_kernel.overloads and not any(c.library.has_dynamic_globals for c in _step_kernel.overloads.values())
