"""The ``step`` context format: one token per environment step, for from-scratch models (issue 17's model option).

A token says where the agent is and how it got there. One episode is::

    START(o0)  LAND(a0, kind, o1)  LAND(a1, kind, o2) ...

``START(o)``: an episode begins at observation ``o``. ``LAND(a, kind, o)``: action ``a`` landed on ``o``; ``kind``
is ``move`` (the episode goes on: the next decision is made here), ``goal`` (reward 1.0, terminated), ``hole``
(reward 0, terminated) or ``cut`` (the time limit ended a running episode). The **decision position** of a step is
the ``START`` or ``move`` token it is taken from; its action is read from the next token. So an episode of ``n``
steps is ``n + 1`` tokens (the compact format: ``2n + 2``-ish), and, unlike the compact format, the context shows
where every episode ended (which hole).

The Q-values are the LM-head logits of four readout tokens ``ACT0..ACT3`` that never stand in a context. The
embedding is factored (``token_factors``: token type, action, observation; a token's embedding is the sum of its
three factors' embeddings), so what the model learns about an observation carries across the actions that reach it.
The environment's answer to action ``a`` is one of the ``4 * max_obs`` ``LAND(a, ., .)`` tokens, a contiguous
block of ids (``landing_block``): the observation loss is a cross-entropy over that block only.
Rewards: 0 and 1.0 (the paper's), as in the other formats.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from icrl_fast.envs.learners import EpisodeLog, rename_observations
from icrl_fast.envs.maps import MapBatch

KINDS = ("move", "goal", "hole", "cut")
#: token types of ``token_factors[:, 0]``
TYPE_ACT, TYPE_PAD, TYPE_START, TYPE_LAND0 = 0, 1, 2, 3
ACT0, PAD, START0 = 0, 4, 5


class StepFormat:
    """Token ids of the step format over observations ``0 .. max_obs - 1`` (see the module docstring).

    ``show_end=False`` (format ``step-noend``, an ablation): the goal, hole and cut tokens say how an episode ended
    but not where (their observation is always 0), as little as the compact format shows.

    ``grid`` (format ``step-grid``): the tokens number the cell at row ``r``, column ``c`` ``r * grid + c`` on every
    map, instead of gymnasium's ``r * ncol + c``: one row stride for all widths, so "a row down" is the same step in
    the numbers on a map of any width (``observation_names``; whoever turns observations into tokens renames them:
    the rollout engine, the protocol source, the dataset builder, the experiments' hand-written contexts)."""

    def __init__(self, max_obs: int = 64, show_end: bool = True, grid: int | None = None):
        if max_obs < 1:
            raise ValueError(f"max_obs must be >= 1, got {max_obs}")
        if grid is not None and not 1 <= grid <= max_obs:
            raise ValueError(f"a step format's grid must be 1..max_obs ({max_obs}) columns, got {grid}")
        self.max_obs, self.show_end, self.grid = int(max_obs), bool(show_end), grid
        self.name = "step-grid" if grid is not None else "step" if show_end else "step-noend"
        self.land0 = START0 + self.max_obs
        self.vocab_size = self.land0 + 4 * len(KINDS) * self.max_obs
        self.action_ids = np.arange(ACT0, ACT0 + 4, dtype=np.int32)
        self.pad_id = PAD
        ids = np.arange(self.vocab_size)
        land = np.maximum(ids - self.land0, 0)
        is_land, is_start = ids >= self.land0, (ids >= START0) & (ids < self.land0)
        # per id: type, action + 1 (0: none), observation + 1 (0: none)
        kind = np.where(is_land, land // self.max_obs % len(KINDS), 0)
        self.token_factors = np.stack([
            np.select([ids < 4, ids == PAD, is_start, is_land], [TYPE_ACT, TYPE_PAD, TYPE_START, TYPE_LAND0 + kind]),
            np.where(is_land, land // (len(KINDS) * self.max_obs) + 1, 0),
            np.select([is_start, is_land], [ids - START0 + 1, land % self.max_obs + 1], 0)], axis=1).astype(np.int64)
        # contract lookups: a decision token (START or LAND move), and the action a token reveals (-1: none)
        self.is_decision = (self.token_factors[:, 0] == TYPE_START) | (self.token_factors[:, 0] == TYPE_LAND0)
        self.action_of = np.where(is_land, self.token_factors[:, 1] - 1, -1).astype(np.int8)

    def _obs(self, obs) -> int:
        obs = int(obs)
        if not 0 <= obs < self.max_obs:  # else it would silently be another token
            raise ValueError(f"observation {obs} is outside this step format's 0..{self.max_obs - 1} (max_obs="
                             f"{self.max_obs}; a model trained on smaller maps cannot read larger ones)")
        return obs

    def start(self, obs: int) -> int:
        return START0 + self._obs(obs)

    def land(self, action: int, kind: str, obs: int) -> int:
        if not 0 <= int(action) < 4 or kind not in KINDS:
            raise ValueError(f"a landing needs an action in 0..3 and a kind in {KINDS}, got {action!r}, {kind!r}")
        if kind != "move" and not self.show_end:
            obs = 0
        return self.land0 + (int(action) * len(KINDS) + KINDS.index(kind)) * self.max_obs + self._obs(obs)

    def landing_block(self, action) -> tuple:
        """First id and size of the block of ``LAND(action, ., .)`` ids (``action`` may be an array)."""
        size = len(KINDS) * self.max_obs
        return self.land0 + np.asarray(action) * size, size

    def describe(self) -> dict:
        return {"name": self.name, "vocab": "step", "vocab_size": self.vocab_size, "max_obs": self.max_obs,
                "action_ids": self.action_ids.tolist(), **({} if self.grid is None else {"grid": self.grid})}


def observation_names(fmt, maps: MapBatch) -> np.ndarray | None:
    """int64 ``[B, cells]``: the number format ``fmt`` shows for observation ``o`` (gymnasium's ``r * ncol + c``) of
    map ``b``, ``r * grid + c`` (a ``grid`` step format); ``None`` where the format shows observations as they are.
    A map wider than the grid, or too tall for ``max_obs``, is a ``ValueError``."""
    grid = getattr(fmt, "grid", None)
    if grid is None:
        return None
    ncol, nrow = maps.ncol.astype(np.int64), maps.nrow.astype(np.int64)
    if len(maps) and (ncol.max() > grid or (nrow.max() - 1) * grid + ncol.max() > fmt.max_obs):
        raise ValueError(f"format {fmt.name} numbers cells on a {grid}-column grid of {fmt.max_obs} cells: maps up to "
                         f"{int(nrow.max())}x{int(ncol.max())} do not fit")
    return names_on_grid(maps, grid)


def names_on_grid(maps: MapBatch, stride) -> np.ndarray:
    """int64 ``[B, cells]``: ``r * stride + c`` for map ``b``'s cell ``r * ncol + c``, as if the map sat in the corner
    of a grid ``stride`` columns wide (``stride``: one int for every map, or one per map; ``ncol`` names the cells as
    they are)."""
    ncol = maps.ncol.astype(np.int64)[:, None]
    cell = np.arange(int(maps.num_cells.max()) if len(maps) else 0, dtype=np.int64)
    return cell // ncol * np.asarray(stride, dtype=np.int64).reshape(-1, 1) + cell % ncol


def grid_numbered(fmt, log: EpisodeLog, maps: MapBatch) -> EpisodeLog:
    """``log`` (of ``maps``: map ``b`` = ``map_id``) with its observations numbered as format ``fmt`` shows them
    (``observation_names``); unchanged for a format without a grid."""
    names = observation_names(fmt, maps)
    return log if names is None else rename_observations(log, names)


@njit(cache=True)
def _encode(order, ep_start, ep_len, obs, actions, rewards, trunc_only, final_obs, offsets, start0, land0, max_obs,
            show_end, out_ids, out_episode):
    for k in range(order.shape[0]):
        e = order[k]
        p = offsets[k]
        out_ids[p] = start0 + obs[ep_start[e]]
        out_episode[p] = k
        last = ep_start[e] + ep_len[e] - 1
        for t in range(ep_start[e], last + 1):
            if t < last:
                kind, landed = 0, obs[t + 1]
            else:
                kind = 1 if rewards[t] != 0 else (3 if trunc_only[e] else 2)
                landed = final_obs[e] if show_end else 0
            p += 1
            out_ids[p] = land0 + (actions[t] * 4 + kind) * max_obs + landed
            out_episode[p] = k


def encode_step(fmt: StepFormat, log, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``encode_episodes`` for the step format (same contract); needs ``log.final_obs`` (where episodes ended)."""
    order = np.ascontiguousarray(order, dtype=np.int64)
    ends = log.final_obs[order]
    if fmt.show_end and ends.size and (ends.min() < 0 or ends.max() >= fmt.max_obs):
        raise ValueError("the step format shows where each episode ended: the log's final_obs must be filled in "
                         f"(0..{fmt.max_obs - 1}), got {ends.min()}..{ends.max()} (-1: not known, e.g. a log decoded "
                         f"from compact-format tokens)")
    trunc_only = log.truncated & ~log.terminated
    lengths = log.length[order].astype(np.int64) + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out_ids = np.empty(int(offsets[-1]), dtype=np.int32)
    out_episode = np.empty(int(offsets[-1]), dtype=np.int32)
    _encode(order, log.start, log.length, log.obs.astype(np.int64), log.actions.astype(np.int64), log.rewards,
            trunc_only, log.final_obs.astype(np.int64), offsets, START0, fmt.land0, fmt.max_obs,
            fmt.show_end, out_ids, out_episode)
    return out_ids, out_episode


def step_contract(fmt: StepFormat, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``token_contract`` for the step format: ``p`` is a decision iff it holds a START or move token and ``p + 1``
    in the same row holds a LAND token, whose action is the decision's."""
    ids = np.asarray(input_ids)
    if ids.size and (ids.min() < 0 or ids.max() >= fmt.vocab_size):
        raise ValueError(f"token ids must be in 0..{fmt.vocab_size - 1} for the step format")
    nxt = np.full(ids.shape, -1, dtype=np.int8)
    nxt[..., :-1] = fmt.action_of[ids[..., 1:]]
    mask = fmt.is_decision[ids] & (nxt >= 0)
    return mask, np.where(mask, nxt, np.int8(-1)).astype(np.int8)


def decode_step(fmt: StepFormat, input_ids) -> list[dict]:
    """``decode`` for the step format; each episode also gives ``final_obs`` (where it ended)."""
    episodes, ep = [], None
    for p, i in enumerate(int(x) for x in np.asarray(input_ids).ravel()):
        typ, a, o = (int(v) for v in fmt.token_factors[i]) if 0 <= i < fmt.vocab_size else (-1, 0, 0)
        if typ == TYPE_START and ep is None:
            ep = {"obs": [o - 1], "actions": [], "rewards": [], "terminated": True, "truncated": False}
            continue
        if typ < TYPE_LAND0 or ep is None:
            raise ValueError(f"token {p}: expected {'a LAND token' if ep else 'START'}, got id {i}")
        kind = KINDS[typ - TYPE_LAND0]
        ep["actions"].append(a - 1)
        ep["rewards"].append(1.0 if kind == "goal" else 0.0)
        if kind == "move":
            ep["obs"].append(o - 1)
            continue
        ep["terminated"], ep["truncated"], ep["final_obs"] = kind != "cut", kind == "cut", o - 1
        episodes.append(ep)
        ep = None
    if ep is not None:
        raise ValueError("the tokens end inside an episode (no goal, hole or cut token closes it)")
    return episodes


class StepStreams:
    """The rollout engine's token streams (``rollout.ContextStreams``' contract) in the step format."""

    def __init__(self, fmt: StepFormat):
        self.fmt = fmt

    def first_block(self, obs: int) -> list[int]:
        return [self.fmt.start(obs)]

    def first_width(self) -> int:
        return 1

    def after_action(self, action: int, reward: float, ended: bool, cut: bool, next_obs: int | None,
                     landed: int | None = None) -> tuple[list[int], list[int]]:
        if not ended:
            return [self.fmt.land(action, "move", next_obs)], []
        if landed is None:
            raise ValueError("the step format shows where an episode ended: after_action needs landed")
        kind = "goal" if reward != 0 else ("cut" if cut else "hole")
        return [self.fmt.land(action, kind, landed)], ([] if next_obs is None else self.first_block(next_obs))

    def episode(self, obs: list[int], actions: list[int], rewards: list[float], cut: bool = False) -> list[int]:
        if len(obs) != len(actions) + 1 or len(rewards) != len(actions) or not actions:
            raise ValueError("an episode needs n >= 1 actions, n rewards and n + 1 observations")
        out = self.first_block(obs[0])
        for k, (a, r) in enumerate(zip(actions, rewards)):
            last = k == len(actions) - 1
            tail, _ = self.after_action(a, r, last, cut and last, None if last else obs[k + 1], landed=obs[k + 1])
            out += tail
        return out

    def max_block(self) -> int:
        return 2
