"""The rollout KV cache: one preallocated buffer per layer that doubles when full (amortised O(1) appends).

transformers' ``DynamicCache`` grows with ``torch.cat`` on every call, copying the whole cache each step: over a
growing multi-episode context that is quadratic (measured: the default evaluation's 50 contexts spent most of
their time copying). ``growing_cache`` returns a ``transformers`` ``Cache`` whose layers write new keys and values
in place and hand attention a view of the used length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` backed by a buffer ``[B, heads, capacity, head_dim]`` that doubles when full."""

    def __init__(self, initial_capacity: int = 256):
        super().__init__()
        self.initial_capacity = initial_capacity
        self._k = self._v = None
        self._used = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        need = self._used + n
        if self._k is None or need > self._k.shape[-2]:
            cap = max(need, self.initial_capacity, 2 * (0 if self._k is None else self._k.shape[-2]))
            shape = (*key_states.shape[:-2], cap, key_states.shape[-1])
            k, v = key_states.new_empty(shape), value_states.new_empty(shape)
            if self._k is not None:
                k[..., : self._used, :] = self._k[..., : self._used, :]
                v[..., : self._used, :] = self._v[..., : self._used, :]
            self._k, self._v = k, v
        self._k[..., self._used: need, :] = key_states
        self._v[..., self._used: need, :] = value_states
        self._used = need
        self.keys, self.values = self._k[..., :need, :], self._v[..., :need, :]
        return self.keys, self.values


def growing_cache(num_layers: int, initial_capacity: int = 256) -> Cache:
    """A cache for a ``num_layers``-layer model whose appends cost O(new tokens)."""
    return Cache(layers=[GrowingLayer(initial_capacity) for _ in range(num_layers)])


class GrowingMask:
    """A ``[B, length]`` attention mask that grows by doubling (``torch.cat`` per step would be quadratic)."""

    def __init__(self, batch: int, initial_capacity: int = 256):
        self._buf = torch.zeros((batch, initial_capacity), dtype=torch.long)
        self._used = 0

    def append(self, block: torch.Tensor) -> torch.Tensor:
        need = self._used + block.shape[1]
        if need > self._buf.shape[1]:
            buf = torch.zeros((self._buf.shape[0], max(need, 2 * self._buf.shape[1])), dtype=torch.long)
            buf[:, : self._used] = self._buf[:, : self._used]
            self._buf = buf
        self._buf[:, self._used: need] = block
        self._used = need
        return self._buf[:, :need]
