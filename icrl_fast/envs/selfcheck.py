"""Simulator self-check: prove the Numba simulator against gymnasium on fresh maps and time it beside gymnasium.

Handy after any install: ``python -c "from icrl_fast.envs.selfcheck import main; main()"``. The careful
measurements are the pytest-benchmark suite ``benchmarks/bench_env.py``; this is a quick, honest summary (median of a few repeats).
"""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from icrl_fast.envs.frozen_lake import FrozenLakeBatch
from icrl_fast.envs.maps import MAPS, MapBatch, generate_maps


def exact_against_gymnasium(maps: MapBatch, steps: int, seed: int) -> int:
    """Step ``maps`` (non-slippery) in our batch and in one gymnasium ``FrozenLake-v1`` per map with the same
    random actions; gymnasium's agent is placed on our sampled start at every reset. Returns the transitions
    compared; raises ``AssertionError`` at the first difference."""
    n = len(maps)
    ours = FrozenLakeBatch(maps, is_slippery=False, seed=seed)
    refs = [gym.make("FrozenLake-v1", desc=maps.to_desc(b), is_slippery=False) for b in range(n)]
    obs = ours.reset().copy()
    for b, ref in enumerate(refs):
        ref.reset(seed=seed + b)
        ref.unwrapped.s = int(obs[b])
    actions = np.random.default_rng(seed).integers(0, 4, size=(steps, n))
    for t in range(steps):
        o, r, term, trunc = ours.step(actions[t])
        for b, ref in enumerate(refs):
            o2, r2, term2, trunc2, _ = ref.step(int(actions[t, b]))
            ended = term[b] or trunc[b]
            got = (int(ours.final_obs[b] if ended else o[b]), float(r[b]), bool(term[b]), bool(trunc[b]))
            if got != (o2, float(r2), term2, trunc2):
                raise AssertionError(f"map {b} step {t}: ours {got} != gymnasium {(o2, r2, term2, trunc2)}")
            if ended:
                ref.reset()
                ref.unwrapped.s = int(o[b])
    return steps * n


def _median_rate(fn, work: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return work / float(np.median(times))


def ours_steps_per_second(maps: MapBatch, steps: int, seed: int, repeats: int = 5) -> float:
    """Env-steps/s of :class:`FrozenLakeBatch` on ``maps`` (one env each), non-slippery, SAME_STEP autoreset."""
    num_envs = len(maps)
    env = FrozenLakeBatch(maps, is_slippery=False, seed=seed)
    env.reset()
    actions = np.random.default_rng(seed).integers(0, 4, size=(steps, num_envs), dtype=np.int64)
    env.step(actions[0])  # compile / load the cached kernel outside the timing

    def run():
        for t in range(steps):
            env.step(actions[t])

    return _median_rate(run, steps * num_envs, repeats)


def gymnasium_steps_per_second(maps: MapBatch, steps: int, seed: int, repeats: int = 3) -> float:
    """Env-steps/s of gymnasium's ``SyncVectorEnv`` of ``FrozenLake-v1`` on the same maps (SAME_STEP autoreset)."""
    mixed = len(set(maps.num_cells.tolist())) > 1  # gymnasium needs observation_mode="different" (slower) then
    env = gym.vector.SyncVectorEnv(
        [lambda d=maps.to_desc(b): gym.make("FrozenLake-v1", desc=d, is_slippery=False) for b in range(len(maps))],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP, observation_mode="different" if mixed else "same")
    env.reset(seed=seed)
    actions = np.random.default_rng(seed).integers(0, 4, size=(steps, len(maps)))

    def run():
        for t in range(steps):
            env.step(actions[t])

    return _median_rate(run, steps * len(maps), repeats)


def main(seed: int = 0) -> dict[str, float]:
    """Print and return the self-check summary."""
    results: dict[str, float] = {}
    with tqdm(total=5, desc="simulator self-check", unit="stage") as bar:
        t0 = time.perf_counter()
        generate_maps(10, seed=seed)  # compile or load the cached generator
        t0 = time.perf_counter()
        generate_maps(10_000, seed=seed)
        results["maps_per_s"] = 10_000 / (time.perf_counter() - t0)
        bar.update()
        test_maps = generate_maps(300, seed=seed + 1, height=(2, 7), width=(2, 7), p_start=0.2, p_goal=0.2,
                                  min_hops=1)
        results["exact_transitions"] = exact_against_gymnasium(test_maps, steps=120, seed=seed)
        bar.update()
        four = MapBatch.repeat(MAPS["4x4"], 1024)  # gymnasium's fastest configuration: one map, same spaces
        results["ours_1024"] = ours_steps_per_second(four, steps=500, seed=seed)
        bar.update()
        results["ours_65536"] = ours_steps_per_second(generate_maps(65536, seed=seed), steps=50, seed=seed)
        bar.update()
        results["gym_1024"] = gymnasium_steps_per_second(four, steps=10, seed=seed)
        bar.update()
    print()
    print(f"maps (3-5, paper generator):     {results['maps_per_s']:>14,.0f} valid maps/s")
    print(f"exact vs gymnasium FrozenLake-v1: {int(results['exact_transitions']):>13,d} transitions on 300 random "
          "maps (2-7, non-square, several S/G): identical")
    print(f"gymnasium SyncVectorEnv, 1,024 x 4x4:  {results['gym_1024']:>14,.0f} env-steps/s")
    print(f"icrl_fast FrozenLakeBatch, 1,024 x 4x4:{results['ours_1024']:>15,.0f} env-steps/s "
          f"({results['ours_1024'] / results['gym_1024']:,.0f}x gymnasium)")
    print(f"icrl_fast FrozenLakeBatch, 65,536 paper maps:{results['ours_65536']:>9,.0f} env-steps/s")
    print("(quick medians; the careful figures come from: pytest benchmarks/bench_env.py)")
    return results


if __name__ == "__main__":
    main()
