"""Frozen Lake and its random streams as fixed-shape tensor ops, on any device: the rollout player's env.

The dynamics and draws are ``FrozenLakeBatch``'s (``icrl_fast.envs.frozen_lake``: gymnasium's ``FrozenLake-v1``,
SAME_STEP autoreset, walls clamp, reward schedule ``(1, 0, 0)``, ``max_episode_steps``) and every random number comes
from the same SplitMix64 stream ``(seed, stream id)`` (``icrl_fast.envs.rng``): one uniform per reset (the S tile)
and one per slippery step (the slip branch). So a slot stepped here lands where the Numba env's env of that stream
lands, bit for bit (tested). Nothing reads a value back to the host: a step is a handful of ``where``/``gather`` ops
on ``[E]`` tensors, so it runs inside a captured (CUDA-graph) or compiled step.

SplitMix64 needs 64-bit unsigned arithmetic, which torch lacks (``uint64`` has no shifts): the state is an
``int64`` whose additions and multiplications wrap exactly as ``uint64``'s do (two's complement), and a logical
right shift is an arithmetic one with the sign bits masked off (``_shr``).
"""

from __future__ import annotations

import numpy as np
import torch

from icrl_fast.envs.maps import GOAL, HOLE, MapBatch


def _signed(x: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return x - (1 << 64) if x >= 1 << 63 else x


GOLDEN = _signed(0x9E3779B97F4A7C15)
M1, M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
INV_2_53 = 1.0 / 9007199254740992.0
_DR = (0, 1, 0, -1)  # row change of left, down, right, up (gymnasium's order)
_DC = (-1, 0, 1, 0)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (as uint64) by ``k`` bits (1 <= k <= 63)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (``rng.mix64``)."""
    z = (z ^ _shr(z, 30)) * M1
    z = (z ^ _shr(z, 27)) * M2
    return z ^ _shr(z, 31)


def stream_state(seed: int, stream_id: torch.Tensor) -> torch.Tensor:
    """Initial states of streams ``stream_id`` (int64 tensor, >= 0) under ``seed`` (``rng.stream_state``)."""
    return mix64(_signed(_mix64_host(int(seed) & ((1 << 64) - 1))) ^ (stream_id * GOLDEN + GOLDEN))


def _mix64_host(z: int) -> int:
    """``mix64`` of one Python int (uint64 arithmetic), for the seed, which is the same for every stream."""
    mask = (1 << 64) - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def next_u64(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new state, random 64 bits as int64)`` (``rng.next_u64``)."""
    state = state + GOLDEN
    return state, mix64(state)


def next_uniform(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(new state, float64 uniform on [0, 1))`` at 53-bit resolution (``rng.next_uniform``)."""
    state, z = next_u64(state)
    return state, _shr(z, 11).double() * INV_2_53


class MapTables:
    """A ``MapBatch`` as int64 device tensors: ``tiles [B, rows * maxcol]`` (cell ``(r, c)`` at ``r * maxcol + c``,
    ``maxcol`` the batch's widest map), ``nrow``, ``ncol``, ``starts [B, S]`` and ``n_starts``."""

    def __init__(self, maps: MapBatch, device):
        self.maxcol = int(maps.tiles.shape[2])
        self.tiles = torch.as_tensor(maps.tiles.reshape(len(maps), -1).astype(np.int64), device=device)
        self.nrow = torch.as_tensor(maps.nrow.astype(np.int64), device=device)
        self.ncol = torch.as_tensor(maps.ncol.astype(np.int64), device=device)
        self.starts = torch.as_tensor(maps.starts.astype(np.int64), device=device)
        self.n_starts = torch.as_tensor(maps.n_starts.astype(np.int64), device=device)


class TorchFrozenLake:
    """``E`` env slots stepped in lockstep; slot ``e`` plays map ``map_of[e]`` of ``tables`` (a slot may move to
    another map between episodes: ``start``), drawing from its stream.

    State (int64 ``[E]``): ``rng`` (stream state), ``row``, ``col``, ``elapsed`` and ``map_of``. ``step`` and
    ``start`` update it in place (``copy_`` of a ``where`` over a row mask): every shape is fixed and every address
    stays (a captured step).

    ``is_slippery``, ``success_rate``, ``max_episode_steps``: ``FrozenLakeBatch``'s (defaults: False here, 1/3,
    100); rewards are the default schedule (1 on the goal, 0 elsewhere)."""

    def __init__(self, tables: MapTables, slots: int, *, is_slippery: bool = False,
                 success_rate: float = 1.0 / 3.0, max_episode_steps: int = 100):
        self.tables, self.is_slippery, self.success_rate = tables, bool(is_slippery), float(success_rate)
        self.max_steps = int(max_episode_steps)
        dev = tables.tiles.device
        z = torch.zeros(slots, dtype=torch.long, device=dev)
        self.rng, self.row, self.col, self.elapsed, self.map_of = z.clone(), z.clone(), z.clone(), z.clone(), z.clone()
        self.dr = torch.tensor(_DR, dtype=torch.long, device=dev)
        self.dc = torch.tensor(_DC, dtype=torch.long, device=dev)

    def _draw(self, mask: torch.Tensor) -> torch.Tensor:
        """A uniform per slot from its stream; the streams of slots outside ``mask`` do not advance."""
        state, u = next_uniform(self.rng)
        self.rng.copy_(torch.where(mask, state, self.rng))
        return u

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only ``slots`` (in that order; between steps: fewer slots, new state tensors)."""
        self.rng, self.row, self.col, self.elapsed, self.map_of = (t[slots] for t in (
            self.rng, self.row, self.col, self.elapsed, self.map_of))

    def obs(self) -> torch.Tensor:
        """Each slot's observation ``row * ncol + col`` (the map's own numbering)."""
        return self.row * self.tables.ncol[self.map_of] + self.col

    def start(self, mask: torch.Tensor, maps: torch.Tensor | None = None, seed: int | None = None,
              stream: torch.Tensor | None = None) -> torch.Tensor:
        """Reset the slots in ``mask``: onto map ``maps`` when given, their streams reseeded to ``(seed, stream)``
        when ``seed`` is given (``FrozenLakeBatch.reset(seed=..., mask=...)``), then one draw picks the S tile.
        Returns every slot's observation."""
        t = self.tables
        if maps is not None:
            self.map_of.copy_(torch.where(mask, maps, self.map_of))
        if seed is not None:
            self.rng.copy_(torch.where(mask, stream_state(seed, stream), self.rng))
        u = self._draw(mask)
        n = t.n_starts[self.map_of]
        slot = torch.minimum((u * n.double()).long(), n - 1)
        s = t.starts[self.map_of, slot]
        w = t.ncol[self.map_of]
        self.row.copy_(torch.where(mask, s // w, self.row))
        self.col.copy_(torch.where(mask, s % w, self.col))
        self.elapsed.copy_(torch.where(mask, torch.zeros_like(self.elapsed), self.elapsed))
        return self.obs()

    def step(self, actions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Step every slot with ``actions`` (int64 ``[E]`` in 0..3; SAME_STEP autoreset). Returns ``(obs, reward,
        terminated, truncated, landed, tile)``: the observation after the step (the next episode's start where one
        ended), the reward (float32), the flags, where the step landed (``final_obs`` where it ended) and the tile
        code landed on."""
        t, m = self.tables, self.map_of
        a = actions
        if self.is_slippery:
            u = self._draw(torch.ones_like(a, dtype=torch.bool))
            fail = (1.0 - self.success_rate) / 2.0
            c1 = fail + self.success_rate
            branch = torch.where(fail > u, 0, torch.where(c1 > u, 1, torch.where(c1 + fail > u, 2, 0)))
            d = (a + branch + 3) & 3
        else:
            d = a
        nrow, ncol = t.nrow[m], t.ncol[m]
        r = torch.minimum(torch.clamp(self.row + self.dr[d], min=0), nrow - 1)
        c = torch.minimum(torch.clamp(self.col + self.dc[d], min=0), ncol - 1)
        tile = t.tiles[m, r * t.maxcol + c]
        elapsed = self.elapsed + 1
        terminated = (tile == GOAL) | (tile == HOLE)
        reward = (tile == GOAL).float()
        truncated = (elapsed >= self.max_steps) if self.max_steps > 0 else torch.zeros_like(terminated)
        landed = r * ncol + c
        self.row.copy_(r)
        self.col.copy_(c)
        self.elapsed.copy_(elapsed)
        ended = terminated | truncated
        obs = self.start(ended)
        return obs, reward, terminated, truncated, landed, tile
