"""The batched step against a plain-Python model of its contract, env by env, in every autoreset mode.

The kernel moves every env in a first pass and resets in a second (issue #19's speed-up); the order of the random
draws is part of the contract (env ``i`` draws its slip, then, if it resets in that step, its start, from stream
``(seed, i)``), so a reference that draws from the same streams must give the same bits. The reference below is
written from the documented rules (gymnasium's dynamics, SAME_STEP / NEXT_STEP / DISABLED), not from the kernel.
"""

import numba
import numpy as np
import pytest

from icrl_fast.envs.frozen_lake import FrozenLakeBatch, slip_branch, start_slot
from icrl_fast.envs.maps import GOAL, HOLE, generate_maps
from icrl_fast.envs.rng import next_uniform, stream_state

MOVES = [(0, -1), (1, 0), (0, 1), (-1, 0)]  # left, down, right, up


class ReferenceEnv:
    """One env of a ``FrozenLakeBatch``, stepped in Python."""

    def __init__(self, maps, b, seed, slippery, max_steps, mode):
        self.tiles, self.nrow, self.ncol = maps.tiles[b], int(maps.nrow[b]), int(maps.ncol[b])
        self.starts = maps.starts[b, : maps.n_starts[b]]
        self.rng = np.uint64(stream_state(np.uint64(seed), np.uint64(b)))
        self.slippery, self.max_steps, self.mode = slippery, max_steps, mode
        self.pending = False

    def draw(self) -> float:
        state, u = next_uniform(self.rng)
        self.rng = np.uint64(state)  # (Numba hands a uint64 back as a Python int)
        return u

    def reset(self) -> int:
        s = int(self.starts[start_slot(self.draw(), len(self.starts))])
        self.r, self.c, self.elapsed, self.pending = s // self.ncol, s % self.ncol, 0, False
        return s

    def step(self, a):
        """``(obs, reward, terminated, truncated, final_obs)``."""
        if self.pending:  # NEXT_STEP: the step after an ending resets and returns the start
            return self.reset(), 0.0, False, False, -1
        # a slippery step draws even from a goal or hole, as gymnasium's categorical_sample over one outcome does
        branch = slip_branch(self.draw(), True, 1.0 / 3.0) if self.slippery else 1
        if self.tiles[self.r, self.c] in (GOAL, HOLE):  # only reachable under DISABLED: stay, reward 0, terminated
            self.elapsed += 1
            return self.r * self.ncol + self.c, 0.0, True, self._cut(), -1
        dr, dc = MOVES[(a + branch - 1) % 4]
        self.r = min(max(self.r + dr, 0), self.nrow - 1)
        self.c = min(max(self.c + dc, 0), self.ncol - 1)
        self.elapsed += 1
        tile = self.tiles[self.r, self.c]
        s, done, cut = self.r * self.ncol + self.c, tile in (GOAL, HOLE), self._cut()
        reward = 1.0 if tile == GOAL else 0.0
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
    midway; every output of every step, ``ended`` included."""
    n, seed = 97, 5
    maps = generate_maps(n, seed=3, height=(2, 6), width=(2, 6), p_start=0.2, p_goal=0.1, min_hops=1)
    env = FrozenLakeBatch(maps, is_slippery=slippery, max_episode_steps=9, autoreset_mode=mode, seed=seed,
                          num_threads=min(threads, numba.config.NUMBA_NUM_THREADS))
    refs = [ReferenceEnv(maps, b, seed, slippery, 9, mode) for b in range(n)]
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
