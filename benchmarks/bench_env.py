"""Frozen Lake env-steps/s: icrl_fast vs gymnasium's SyncVectorEnv of FrozenLake-v1, same maps, same run.

Every round steps the batch a fixed number of times with pre-drawn random actions (non-slippery unless named,
SAME_STEP autoreset included). Groups pair ours with the reference; the session summary prints the ratio.
Targets (issue #2, 2-core CPU): >= 1,000x gymnasium at 1,024 envs; >= 100 M env-steps/s at 65,536 envs.
Issue #19 (a simulator that never collapses): the group "1024 x 4x4, one core busy" repeats the gymnasium-surface
comparison while another process spins on one core (started and killed by the benchmark itself), and the
"threads at N envs" groups time the step in 1 vs 2 threads (the ratio is 2 threads' speed-up), the measurement
behind ``PARALLEL_MIN_ENVS``.
"""

import gc
import os
import subprocess
import sys

import gymnasium as gym
import numba
import numpy as np
import pytest

from icrl_fast.envs.frozen_lake import PARALLEL_MIN_ENVS, FrozenLakeBatch
from icrl_fast.envs.maps import MAPS, MapBatch, generate_maps
from icrl_fast.envs.vector import FrozenLakeVectorEnv

SUITE = "env"


def _actions(steps, n, seed=0):
    return np.random.default_rng(seed).integers(0, 4, size=(steps, n), dtype=np.int64)


def _bench_steps(benchmark, step, actions, rounds):
    def run():
        for a in actions:
            step(a)

    run()  # warm-up: kernel compiled or loaded from the cache outside the timing
    # Earlier rows leave thousands of live gymnasium objects; without freezing them, the full GC passes that the
    # per-step result tuples trigger traverse them all inside our timing (measured: up to 2x slower rows).
    gc.collect()
    gc.freeze()
    try:
        benchmark.pedantic(run, rounds=rounds, iterations=1)
    finally:
        gc.unfreeze()


def _gym_sync(maps: MapBatch):
    mixed = len(set(maps.num_cells.tolist())) > 1
    env = gym.vector.SyncVectorEnv(
        [lambda d=maps.to_desc(b): gym.make("FrozenLake-v1", desc=d, is_slippery=False) for b in range(len(maps))],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, observation_mode="different" if mixed else "same")
    env.reset(seed=0)
    return env


FOUR = MapBatch.repeat(MAPS["4x4"], 1024)
PAPER_1024 = generate_maps(1024, seed=0)
BUSY = "1024 x 4x4, one core busy"
BUSY_MAX_S = 300  # the load stops by itself after this, even if the benchmark dies without its finally block
_SPIN = """import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[2])})
end = time.monotonic() + float(sys.argv[1])
print(flush=True)
while time.monotonic() < end:
    pass
"""
two_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs NUMBA_NUM_THREADS >= 2")


@pytest.fixture
def busy_core():
    """Another process keeping one core busy (a tight Python loop pinned to the last core this process may use, as
    a training run pinned to a core does) for the length of one test: spinning when the test starts, killed when it
    ends."""
    core = max(os.sched_getaffinity(0))
    proc = subprocess.Popen([sys.executable, "-c", _SPIN, str(BUSY_MAX_S), str(core)], stdout=subprocess.PIPE)
    try:
        proc.stdout.readline()  # printed just before the loop starts
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("group, maps", [("1024 x 4x4", FOUR), ("1024 paper maps", PAPER_1024)])
def test_gymnasium_sync_vector_env(benchmark, record, group, maps):
    env, acts = _gym_sync(maps), _actions(10, len(maps))
    _bench_steps(benchmark, env.step, acts, rounds=5)
    env.close()
    record(SUITE, "gymnasium SyncVectorEnv", 10 * len(maps), "env-steps/s", group, "reference")


@pytest.mark.parametrize("group, maps", [("1024 x 4x4", FOUR), ("1024 paper maps", PAPER_1024)])
def test_ours_frozen_lake_batch(benchmark, record, group, maps):
    env, acts = FrozenLakeBatch(maps, is_slippery=False, seed=0), _actions(1000, len(maps))
    env.reset()
    _bench_steps(benchmark, env.step, acts, rounds=20)
    record(SUITE, "FrozenLakeBatch.step", 1000 * len(maps), "env-steps/s", group, "ours")


@pytest.mark.parametrize("copy", [True, False])
def test_ours_gymnasium_vector_surface(benchmark, record, copy):
    """The gymnasium VectorEnv surface: copy=True is gymnasium's semantics (fresh arrays every step)."""
    env, acts = FrozenLakeVectorEnv(maps=FOUR, is_slippery=False, copy=copy), _actions(1000, len(FOUR))
    env.reset(seed=0)
    _bench_steps(benchmark, env.step, acts, rounds=20)
    record(SUITE, f"FrozenLakeVectorEnv.step (copy={copy})", 1000 * len(FOUR), "env-steps/s", "1024 x 4x4", "ours")


def test_gymnasium_sync_vector_env_one_core_busy(benchmark, record, busy_core):
    env, acts = _gym_sync(FOUR), _actions(10, len(FOUR))
    _bench_steps(benchmark, env.step, acts, rounds=5)
    env.close()
    record(SUITE, "gymnasium SyncVectorEnv", 10 * len(FOUR), "env-steps/s", BUSY, "reference")


@pytest.mark.parametrize("threads", [None, pytest.param(2, marks=two_threads)])
def test_ours_gymnasium_vector_surface_one_core_busy(benchmark, record, busy_core, threads):
    """copy=True at 1,024 envs beside a busy core: the automatic thread count (chosen by the step times,
    ``thread_choice.ThreadChooser``), and two threads forced, as every step ran before issue #19 (fewer steps: each
    can take milliseconds)."""
    steps, rounds = (1000, 20) if threads is None else (100, 5)
    env, acts = FrozenLakeVectorEnv(maps=FOUR, is_slippery=False, num_threads=threads), _actions(steps, len(FOUR))
    env.reset(seed=0)
    _bench_steps(benchmark, env.step, acts, rounds=rounds)
    name = "FrozenLakeVectorEnv.step (copy=True" + (")" if threads is None else f", {threads} threads forced)")
    record(SUITE, name, steps * len(FOUR), "env-steps/s", BUSY, "ours")


@pytest.mark.parametrize("n", [1024, 2048, PARALLEL_MIN_ENVS, 16384])
@pytest.mark.parametrize("threads", [1, pytest.param(2, marks=two_threads)])
def test_step_threads(benchmark, record, n, threads):
    """FrozenLakeBatch.step of n paper maps in 1 or 2 threads; 1 thread is the group's reference, so the printed
    ratio is the speed-up of 2 threads. Run it on a quiet machine to re-measure PARALLEL_MIN_ENVS."""
    env = FrozenLakeBatch(generate_maps(n, seed=1), is_slippery=False, seed=0, num_threads=threads)
    acts = _actions(200, n)
    env.reset()
    _bench_steps(benchmark, env.step, acts, rounds=15)
    record(SUITE, f"FrozenLakeBatch.step ({threads} thread{'s' if threads > 1 else ''})", 200 * n, "env-steps/s",
           f"threads at {n:,} envs", "reference" if threads == 1 else "ours")


@pytest.mark.parametrize("slippery", [False, True])
def test_ours_65536_paper_maps(benchmark, record, slippery):
    n = 65536
    env, acts = FrozenLakeBatch(generate_maps(n, seed=1), is_slippery=slippery, seed=0), _actions(50, n)
    env.reset()
    _bench_steps(benchmark, env.step, acts, rounds=10)
    name = "FrozenLakeBatch.step" + (" (slippery)" if slippery else "")
    record(SUITE, name, 50 * n, "env-steps/s", "65536 paper maps", "ours")


@pytest.mark.parametrize("n", [250, 100_000])
def test_generate_paper_maps(benchmark, record, n):
    generate_maps(10, seed=0)
    benchmark.pedantic(lambda: generate_maps(n, seed=2), rounds=5 if n > 1000 else 20, iterations=1)
    record(SUITE, f"generate_maps({n:,})", n, "maps/s", f"map generation {n:,}", "ours")
