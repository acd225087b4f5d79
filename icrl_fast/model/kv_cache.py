"""The rollout KV cache: B contexts that each advance by a ragged block of tokens per model call.

Every call appends ``n_b`` new tokens to context ``b`` (``n_b`` differs per context and may be 0). The block is
left-padded to a common width so every context's newest token sits in the last column, where Q is read. Each layer
keeps a key and a value buffer ``[B, kv_heads, 1 + C, head_dim]``; the new keys and values of context ``b`` are
scattered to the slots ``1 + position % C`` of *that* context (padding goes to the spare slot 0, never attended), so:

* the cost of a call is O(new tokens) for the projections and MLPs and O(context) for attention (it reads the
  cached keys and values once), never a re-encode;
* ``window=None``: ``C`` doubles when a context outgrows it (amortised O(1) appends; ``slot == 1 + position``) and
  attention sees only the used prefix of the buffer (up to the longest context);
* ``window=W``: ``C = W + max_block - 1`` is fixed and the buffer is a ring. Keys are cached *after* RoPE at their
  absolute positions, so a wrapped context keeps exact positions: the result equals a full forward with the
  sliding-window mask "query p sees keys p - W < q <= p" (tested).

The cache hands transformers a ready 4D additive mask (``plan``) built from the absolute position held in every
slot, which is how ragged lengths, the window and padding are all expressed through the model's own (SDPA or
eager) attention. ``seqlens=True`` (flash-attn models, no window) builds no mask: the per-context lengths go to
flash-attn's ``flash_attn_with_kvcache`` as ``cache_seqlens`` (``attention_kwargs``; see
``icrl_fast.model.attention.kvcache_attention``), which reads the contiguous slots ``1 .. length`` directly.
transformers' ``DynamicCache`` instead grows with ``torch.cat`` (a copy of the whole cache per call: quadratic
over a growing context) and has one length for the whole batch.

The buffers hold ``kv_heads`` heads (grouped-query attention: the model's ``num_key_value_heads``, so GQA shrinks
the cache by ``kv_heads/heads``) in ``cache_dtype`` (default: the dtype of the keys the model computes). A narrower
``cache_dtype`` (bf16 under an fp32 model) halves the bytes; the new keys and values are rounded into it and the
layer's reads are cast back to the compute dtype (an O(context) copy, the size of what attention reads anyway), so
the model attends to the rounded keys and values, its own fresh ones included.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, DynamicLayer


def _cache_arg() -> str:
    """The keyword under which transformers' Llama ``forward`` (and ``generate``) takes the cache: ``cache`` from
    about 5.2x on (where ``past_key_values`` is deprecated, and removed in 5.40), ``past_key_values`` before (5.17,
    the GPU machine's version, has no ``cache``). Read from the installed ``LlamaModel.forward`` itself: passing the
    wrong name would not fail, it would land in ``**kwargs`` and the model would silently run without the cache."""
    from transformers import LlamaModel

    params = inspect.signature(LlamaModel.forward).parameters  # follows the deprecation wrapper to the real function
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ImportError(f"transformers' LlamaModel.forward takes neither `cache` nor `past_key_values` (it takes "
                      f"{list(params)}): this transformers is not supported; see pyproject.toml")


CACHE_ARG = _cache_arg()


class SlotLayer(DynamicLayer):
    """One layer's keys and values, written to the slots its ``RolloutCache`` chose for this call."""

    def __init__(self, owner: RolloutCache):
        super().__init__()
        self.owner = owner

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write this call's ``key_states``/``value_states [B, kv_heads, width, head_dim]`` (after RoPE, compute
        dtype) to the planned slots; return the buffers' first ``view`` slots ``[B, kv_heads, view, head_dim]`` in
        the compute dtype (the stored ``cache_dtype`` values, cast when the two differ)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        o = self.owner
        cap = o.capacity + 1
        if self.keys is None or self.keys.numel() == 0 or self.keys.shape[-2] != cap:
            shape = (key_states.shape[0], key_states.shape[1], cap, key_states.shape[-1])
            dtype = o.cache_dtype or key_states.dtype
            k, v = key_states.new_zeros(shape, dtype=dtype), value_states.new_zeros(shape, dtype=dtype)
            if self.keys is not None and self.keys.numel():  # grown (window=None): slots keep their index
                old = self.keys.shape[-2]
                k[..., :old, :], v[..., :old, :] = self.keys, self.values
            self.keys, self.values = k, v
        self.keys[o.rows, :, o.slots] = key_states.transpose(1, 2).to(self.keys.dtype)
        self.values[o.rows, :, o.slots] = value_states.transpose(1, 2).to(self.values.dtype)
        return self.keys[:, :, : o.view].to(key_states.dtype), self.values[:, :, : o.view].to(value_states.dtype)

    def keep(self, rows: torch.Tensor) -> None:
        if self.keys is not None and self.keys.numel():
            self.keys, self.values = self.keys[rows], self.values[rows]

    def get_seq_length(self) -> int:
        return int(self.owner.lengths.max()) if self.owner.lengths.numel() else 0


class RolloutCache(Cache):
    """A transformers ``Cache`` for ``batch`` contexts with per-context lengths and an optional sliding window.

    Use: ``pos, mask = cache.plan(counts, width)`` before each call, then
    ``model(ids, attention_mask=mask, position_ids=pos, **{CACHE_ARG: cache}, use_cache=True)`` with ``ids``
    ``[B, width]`` left-padded (context ``b``'s ``counts[b]`` real tokens are its last columns; ``CACHE_ARG``: the
    installed transformers' name for the cache argument).

    ``dtype``: the model's compute dtype (that of the additive mask ``plan`` returns). ``cache_dtype``: the dtype the
    keys and values are stored in (a floating dtype; ``None``: the dtype of the keys the model computes).
    """

    def __init__(self, num_layers: int, batch: int, *, window: int | None = None, max_block: int = 64,
                 initial_capacity: int = 256, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seqlens: bool = False, cache_dtype: torch.dtype | None = None):
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 tokens, got {window}")
        if cache_dtype is not None and not (isinstance(cache_dtype, torch.dtype) and cache_dtype.is_floating_point):
            raise ValueError(f"cache_dtype must be a floating torch dtype (e.g. torch.bfloat16) or None, got "
                             f"{cache_dtype!r}")
        self.cache_dtype = cache_dtype
        if seqlens and window is not None:
            raise ValueError("seqlens mode (flash-attn's cache_seqlens) needs contiguous positions: no window")
        self.seqlens = seqlens
        self.window, self.max_block = window, max_block
        self.capacity = window + max_block - 1 if window is not None else initial_capacity
        self.device, self.mask_dtype = torch.device(device), dtype
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.slot_pos = torch.full((batch, self.capacity + 1), -1, dtype=torch.long, device=self.device)
        self.rows = torch.arange(batch, device=self.device)[:, None]
        self.slots = torch.zeros((batch, 0), dtype=torch.long, device=self.device)
        self.view = self.capacity + 1  # buffer slots attention reads this call
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    @property
    def batch(self) -> int:
        return int(self.lengths.shape[0])

    def keep(self, rows) -> None:
        """Keep only contexts ``rows`` (in that order), e.g. to drop finished ones so later calls are smaller."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.lengths, self.slot_pos = self.lengths[rows], self.slot_pos[rows]
        self.rows = torch.arange(len(rows), device=self.device)[:, None]
        for layer in self.layers:
            layer.keep(rows)

    def restart(self, rows) -> None:
        """Start contexts ``rows`` over (continuous batching: a finished context's row takes the next context): their
        length is 0, their positions start at 0 again, and every slot of theirs is emptied (position -1), so the old
        keys and values are never attended again -- neither through the mask nor through ``cache_seqlens`` (slots
        beyond the length are not read); they stay in the buffers until the new context overwrites them."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        self.lengths[rows] = 0
        self.slot_pos[rows] = -1

    def plan(self, counts: torch.Tensor, width: int, bound: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve slots for ``counts[b]`` new tokens per context in a block of ``width`` columns.

        Returns ``position_ids [B, width]`` (absolute positions; padding repeats a valid one) and the additive
        attention mask ``[B, 1, width, view]`` over the buffer slots attention reads (0 where a query may attend,
        the dtype's minimum elsewhere). ``bound``: an upper bound on the longest context after this call, known to
        the caller; given, the call never reads a device value back (no host sync: a GPU-resident rollout), and
        attention reads ``bound`` slots instead of exactly the longest context's (the extra ones are masked).
        In seqlens mode the mask is ``None`` (pass ``attention_kwargs()`` to the model instead).
        """
        counts = counts.to(self.device, torch.long)
        if width > self.max_block and self.window is not None:
            raise ValueError(f"a block of {width} tokens exceeds the ring's max_block={self.max_block}")
        col = torch.arange(width, device=self.device)
        first = width - counts  # first real column of each row
        real = col[None, :] >= first[:, None]
        pos = self.lengths[:, None] + col[None, :] - first[:, None]
        if self.window is None:  # the buffer grows and attention reads its used prefix (a ring's size is fixed)
            need = bound if bound is not None else int((self.lengths + counts).max())
            if need > self.capacity:
                self._grow(max(need, 2 * self.capacity))
        c = self.capacity
        self.slots = torch.where(real, 1 + pos % c, torch.zeros_like(pos))
        self.slot_pos.scatter_(1, self.slots, torch.where(real, pos, torch.full_like(pos, -1)))
        self.slot_pos[:, 0] = -1
        self.lengths = self.lengths + counts
        self.view = c + 1 if self.window is not None else 1 + need
        pos = torch.where(real, pos, (self.lengths - 1).clamp(min=0)[:, None].expand_as(pos))
        if self.seqlens:
            return pos, None
        keys = self.slot_pos[:, None, : self.view]  # [B, 1, view]
        ok = (keys >= 0) & (keys <= pos[:, :, None])
        if self.window is not None:
            ok &= keys > pos[:, :, None] - self.window
        mask = torch.zeros(ok.shape, dtype=self.mask_dtype, device=self.device)
        mask.masked_fill_(~ok, torch.finfo(self.mask_dtype).min)
        return pos, mask[:, None]

    def attention_kwargs(self) -> dict:
        """Extra model keyword arguments of this call: ``cache_seqlens`` (int32, the lengths after ``plan``) in
        seqlens mode, nothing otherwise (the mask carries everything)."""
        return {"cache_seqlens": self.lengths.to(torch.int32)} if self.seqlens else {}

    def _grow(self, capacity: int) -> None:
        grown = torch.full((self.slot_pos.shape[0], capacity + 1), -1, dtype=torch.long, device=self.device)
        grown[:, : self.capacity + 1] = self.slot_pos
        self.slot_pos, self.capacity = grown, capacity  # the layers re-allocate on their next update

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def nbytes(self) -> int:
        """Bytes held by the layers' key and value buffers (0 before the first model call)."""
        return sum(t.nbytes for layer in self.layers for t in (layer.keys, layer.values) if t is not None)


def sliding_window_mask(length: int, window: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The additive ``[1, 1, L, L]`` causal mask of a full forward, limited to ``window`` keys when given: the
    reference that a ring-buffered rollout must equal."""
    q = torch.arange(length)[:, None]
    k = torch.arange(length)[None, :]
    ok = k <= q
    if window is not None:
        ok &= k > q - window
    mask = torch.zeros((length, length), dtype=dtype)
    mask.masked_fill_(~ok, torch.finfo(dtype).min)
    return mask[None, None]
