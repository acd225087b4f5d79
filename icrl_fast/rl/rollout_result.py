"""What a rollout played: the result type shared by the host loop (``icrl_fast.rl.rollout``) and the device-resident
loop (``icrl_fast.rl.device_loop``), so neither imports the other's module for it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Rollout:
    """What ``RolloutEngine.run`` played. ``[M, E]`` arrays are per map and episode index."""

    success: np.ndarray
    hole: np.ndarray
    truncated: np.ndarray  # the time limit cut the episode (not on the goal or in a hole)
    length: np.ndarray  # actions taken
    episode_return: np.ndarray  # float32
    tokens: list[np.ndarray]  # per map: the whole context (int64)
    token_episode: list[np.ndarray]  # per map: the episode index of every token
    decision_pos: list[np.ndarray]  # per map: the positions where Q was read
    q: list[np.ndarray]  # per map: [decisions, 4] Q-values read there (fp32)
    paths: list[list[list[int]]]  # per map, per episode: the tiles visited
