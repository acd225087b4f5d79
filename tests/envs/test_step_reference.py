"""The batched step against a plain-Python model of its contract, env by env, in every autoreset mode.

The kernel moves every env in a first pass and resets in a second (issue #19's speed-up); the order of the random
draws is part of the contract (env ``i`` draws its slip, then, if it resets in that step, its start, from stream
``(seed, i)``), so a reference that draws from the same streams must give the same bits. The reference below is
written from the documented rules (gymnasium's dynamics, SAME_STEP / NEXT_STEP / DISABLED), not from the kernel: it
takes only the random streams from the package (``icrl_fast.envs.rng``, tested on its own).
"""

import numba
import numpy as np
import pytest

from icrl_fast.envs.frozen_lake import FrozenLakeBatch
from icrl_fast.envs.maps import GOAL, HOLE, START, generate_maps
from icrl_fast.envs.rng import next_uniform, stream_state

MOVES = [(0, -1), (1, 0), (0, 1), (-1, 0)]  # left, down, right, up


class ReferenceEnv:
    """One env of a ``FrozenLakeBatch``, stepped in Python."""

    def __init__(self, maps, b, seed, slippery, max_steps, mode, success_rate, rewards):
        self.tiles, self.nrow, self.ncol = maps.tiles[b], int(maps.nrow[b]), int(maps.ncol[b])
        self.starts = [s for s in range(self.nrow * self.ncol) if self.tiles[s // self.ncol, s % self.ncol] == START]
        self.rng = np.uint64(stream_state(np.uint64(seed), np.uint64(b)))
        self.slippery, self.max_steps, self.mode = slippery, max_steps, mode
        fail = (1.0 - success_rate) / 2.0
        self.cumulative = [fail, fail + success_rate, fail + success_rate + fail]  # over [a - 1, a, a + 1]
        self.rewards = rewards  # (goal, hole, other)
        self.pending = False

    def draw(self) -> float:
        state, u = next_uniform(self.rng)
        self.rng = np.uint64(state)  # (Numba hands a uint64 back as a Python int)
        return u

    def reset(self) -> int:
        s = self.starts[min(int(self.draw() * len(self.starts)), len(self.starts) - 1)]  # uniform over the S tiles
        self.r, self.c, self.elapsed, self.pending = s // self.ncol, s % self.ncol, 0, False
        return s

    def step(self, a):
        """``(obs, reward, terminated, truncated, final_obs)``."""
        if self.pending:  # NEXT_STEP: the step after an ending resets and returns the start
            return self.reset(), 0.0, False, False, -1
        # a slippery step draws even from a goal or hole, as gymnasium's categorical_sample over one outcome does
        branch = 1
        if self.slippery:  # gymnasium's categorical_sample: the first cumulative probability above u, else 0
            u = self.draw()
            branch = next((k for k, c in enumerate(self.cumulative) if c > u), 0)
        if self.tiles[self.r, self.c] in (GOAL, HOLE):  # only reachable under DISABLED: stay, reward 0, terminated
            self.elapsed += 1
            return self.r * self.ncol + self.c, 0.0, True, self._cut(), -1
        dr, dc = MOVES[(a + branch - 1) % 4]
        self.r = min(max(self.r + dr, 0), self.nrow - 1)
        self.c = min(max(self.c + dc, 0), self.ncol - 1)
        self.elapsed += 1
        tile = self.tiles[self.r, self.c]
        s, done, cut = self.r * self.ncol + self.c, tile in (GOAL, HOLE), self._cut()
        reward = self.rewards[0] if tile == GOAL else self.rewards[1] if tile == HOLE else self.rewards[2]
        if (done or cut) and self.mode == "SameStep":
            return self.reset(), reward, done, cut, s
        self.pending = (done or cut) and self.mode == "NextStep"
        return s, reward, done, cut, -1

    def _cut(self) -> bool:
        return self.max_steps is not None and self.elapsed >= self.max_steps


@pytest.mark.parametrize("mode", ["SameStep", "NextStep", "Disabled"])
@pytest.mark.parametrize("slippery", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_batched_step_equals_the_per_env_reference(mode, slippery, threads):
    """Multi-start mixed-size maps, a 9-step time limit (truncations, and goals on the last step), a masked reset
    midway, a success rate and rewards that tell every branch and tile apart; every output of every step, ``ended``
    included."""
    n, seed, success_rate, rewards = 97, 5, 0.6, (2.0, -1.0, 0.25)
    maps = generate_maps(n, seed=3, height=(2, 6), width=(2, 6), p_start=0.2, p_goal=0.1, min_hops=1)
    env = FrozenLakeBatch(maps, is_slippery=slippery, success_rate=success_rate, reward_schedule=rewards,
                          max_episode_steps=9, autoreset_mode=mode, seed=seed,
                          num_threads=min(threads, numba.config.NUMBA_NUM_THREADS))
    refs = [ReferenceEnv(maps, b, seed, slippery, 9, mode, success_rate, rewards) for b in range(n)]
    np.testing.assert_array_equal(env.reset(), [r.reset() for r in refs])
    rng = np.random.default_rng(0)
    kinds = set()
    for t in range(60):
        if t == 30:
            mask = rng.random(n) < 0.4
            env.reset(mask=mask)
            want = [r.reset() if m else None for r, m in zip(refs, mask)]
            np.testing.assert_array_equal(env.obs[mask], [w for w in want if w is not None])
        a = rng.integers(0, 4, n)
        obs, rew, term, trunc = env.step(a)
        want = [r.step(int(x)) for r, x in zip(refs, a)]
        for got, col in zip((obs, rew, term, trunc, env.final_obs), zip(*want)):
            np.testing.assert_array_equal(got, np.array(col, dtype=got.dtype))
        assert env.ended == int((term | trunc).sum())
        kinds |= {("term", bool(x)) for x in term} | {("trunc", bool(x)) for x in trunc}
    assert kinds == {("term", True), ("term", False), ("trunc", True), ("trunc", False)}
