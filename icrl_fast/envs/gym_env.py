"""``FrozenLakeEnv``: a single gymnasium env, a drop-in replacement for gymnasium's ``FrozenLake-v1``.

Same constructor arguments, spaces, observations, rewards (including their Python types), ``info["prob"]``,
and the same attributes on ``unwrapped`` (``s`` settable, ``desc``, ``nrow``, ``ncol``, ``P``,
``initial_state_distrib``, ``lastaction``). It consumes ``self.np_random`` exactly as gymnasium does (one
uniform per reset, one per step, slippery or not), so under one seed and one action sequence both envs produce
the same trajectory bit for bit. The dynamics are the shared Numba core of :mod:`icrl_fast.envs.frozen_lake`.
Rendering is delegated to gymnasium's own renderer.
"""

from __future__ import annotations

from functools import cached_property

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from icrl_fast.envs.frozen_lake import slip_branch, start_single, step_single, validate_dynamics
from icrl_fast.envs.maps import GOAL, HOLE, MapBatch, resolve_desc


def reward_index(tile: int) -> int:
    """Index into ``reward_schedule = (goal, hole, other)`` for a landing tile code."""
    return 0 if tile == GOAL else 1 if tile == HOLE else 2


def check_action(a) -> int:
    """Return ``a`` as an int in 0..3 or raise ``ValueError`` naming the bad action."""
    if isinstance(a, (bool, np.bool_)) or not isinstance(a, (int, np.integer)) or not 0 <= a <= 3:
        if isinstance(a, np.ndarray) and a.shape == () and a.dtype.kind in "iu" and 0 <= a <= 3:
            return int(a)
        raise ValueError(f"action must be an int in 0..3 (0 left, 1 down, 2 right, 3 up), got {a!r}")
    return int(a)


class FrozenLakeEnv(gym.Env):
    """gymnasium's ``FrozenLake-v1`` on the icrl_fast core (see the module docstring)."""

    metadata = {"render_modes": ["human", "ansi", "rgb_array"], "render_fps": 4}

    def __init__(self, render_mode: str | None = None, desc=None, map_name: str | None = "4x4",
                 is_slippery: bool = True, success_rate: float = 1.0 / 3.0, reward_schedule=(1, 0, 0)):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        rows = resolve_desc(desc, map_name)
        self._rows = rows
        self._maps = MapBatch.from_descs([rows])
        self.success_rate, _, _ = validate_dynamics(success_rate, reward_schedule, None)
        self.reward_schedule = tuple(reward_schedule)
        self.is_slippery = bool(is_slippery)
        self.desc = np.asarray(rows, dtype="c")
        self.nrow, self.ncol = nrow, ncol = self.desc.shape
        self.reward_range = (min(reward_schedule), max(reward_schedule))
        self.initial_state_distrib = np.array(self.desc == b"S").astype("float64").ravel()
        self.initial_state_distrib /= self.initial_state_distrib.sum()
        self.observation_space = spaces.Discrete(nrow * ncol)
        self.action_space = spaces.Discrete(4)
        self.render_mode = render_mode
        self.s = int(self._maps.starts[0, 0])
        self.lastaction = None
        self._renderer = None

    def _transition(self, s: int, a: int, branch: int) -> tuple[float, int, float, bool]:
        """``(prob, s', reward, terminated)`` of action ``a`` from ``s`` along slip ``branch`` (0, 1, 2)."""
        s2, tile, from_terminal = step_single(self._maps.tiles, self.nrow, self.ncol, s, a, branch)
        if from_terminal:
            return 1.0, int(s2), 0, True
        fail = (1.0 - self.success_rate) / 2.0
        prob = 1.0 if not self.is_slippery else self.success_rate if branch == 1 else fail
        return prob, int(s2), self.reward_schedule[reward_index(tile)], bool(tile == GOAL or tile == HOLE)

    @cached_property
    def P(self) -> dict[int, dict[int, list[tuple[float, int, float, bool]]]]:
        """gymnasium's transition table ``P[s][a] = [(prob, s', reward, terminated), ...]``, from the same core."""
        branches = (0, 1, 2) if self.is_slippery else (1,)
        table = {}
        for s in range(self.nrow * self.ncol):
            table[s] = {}
            for a in range(4):
                if self.desc.flat[s] in b"GH":
                    table[s][a] = [(1.0, s, 0, True)]
                else:
                    table[s][a] = [self._transition(s, a, b) for b in branches]
        return table

    def step(self, a):
        a = check_action(a)
        branch = slip_branch(self.np_random.random(), self.is_slippery, self.success_rate)  # gymnasium: 1 draw/step
        prob, s, r, terminated = self._transition(self.s, a, branch)
        self.s = s
        self.lastaction = a
        if self.render_mode == "human":
            self.render()
        return s, r, terminated, False, {"prob": prob}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.s = int(start_single(self._maps.starts, int(self._maps.n_starts[0]), self.np_random.random()))
        self.lastaction = None
        if self.render_mode == "human":
            self.render()
        return self.s, {"prob": 1}

    def render(self):
        if self.render_mode is None:
            gym.logger.warn("You are calling render method without specifying any render mode.")
            return None
        if self._renderer is None:
            from gymnasium.envs.toy_text.frozen_lake import FrozenLakeEnv as Reference

            self._renderer = Reference(render_mode=self.render_mode, desc=self._rows)
        self._renderer.s, self._renderer.lastaction = self.s, self.lastaction
        return self._renderer.render()

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
