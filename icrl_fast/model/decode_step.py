"""One cached decode step of a from-scratch ``QNetwork`` over a static KV cache: fixed shapes, no host read.

The rollout player (``icrl_fast.rl.player``) feeds every context a block of ``T`` new tokens per step (``T = 2`` in
the step formats: the landing, and the next episode's ``START`` when an episode ended), some of them padding. This
module runs the Llama of ``qnet`` on that block with its own attention over a ``StaticKVCache`` instead of
transformers' forward: the same modules (embedding, RMSNorms, projections, MLPs, final norm, LM-head rows of the
action tokens) and the same RoPE, so Q equals the transformers forward over the whole context within fp32 rounding
(tested against ``RolloutEngine``), but

* every shape is fixed (``[B, T]`` in, ``[B, A]`` out, a cache of ``capacity`` slots), so the step compiles with
  ``fullgraph=True, dynamic=False`` and can be captured in a CUDA graph;
* nothing is read back to the host: the slots each token goes to come from the per-context ``lengths`` tensor (a
  padding token goes to the spare slot ``capacity``, never attended);
* attention is ragged: context ``b``'s queries see its slots ``0 .. lengths[b] - 1`` up to their own position; on
  CUDA the Triton kernel ``icrl_kernels.ragged_decode_attention`` reads only those slots
  (``triton_decode_attention``), on the CPU torch's fused SDPA masks the slots it reads (``sdpa_decode_attention``);
  the oracle is ``icrl_kernels``' dense masked reference (``reference_decode_attention``).
"""

from __future__ import annotations

import torch
from icrl_kernels import ragged_decode_attention, ragged_decode_attention_reference
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


class StaticKVCache:
    """Keys (after RoPE) and values of ``batch`` contexts: per layer ``[batch, kv_heads, capacity + 1, head_dim]``
    (slot ``capacity``: where padding tokens write), and the contexts' lengths (int64 ``[batch]``).

    ``grow(capacity)`` (host side, between steps) copies into larger buffers; ``restart(mask)`` empties contexts in
    place (their old slots are never read again: attention stops at the length). Every update of a step is in
    place, so the tensors a captured step reads keep their addresses."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, capacity: int, *, device,
                 dtype: torch.dtype):
        shape = (batch, kv_heads, capacity + 1, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.capacity = capacity

    def grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_zeros((old.shape[0], old.shape[1], capacity + 1, old.shape[3]))
                new[:, :, : self.capacity] = old[:, :, : self.capacity]
                buffers[i] = new
        self.capacity = capacity

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only contexts ``rows`` (in that order; between steps: a narrower batch, new buffers)."""
        self.keys, self.values = [k[rows] for k in self.keys], [v[rows] for v in self.values]
        self.lengths = self.lengths[rows]

    def restart(self, mask: torch.Tensor) -> None:
        self.lengths.copy_(torch.where(mask, torch.zeros_like(self.lengths), self.lengths))

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.keys, *self.values))


def reference_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                               qpos: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, T, H, D]`` attention of queries ``q [B, T, H, D]`` at positions ``qpos [B, T]`` over cache slots ``k, v
    [B, KVH, S, D]``: query ``(b, t)`` sees slots ``j <= qpos[b, t]`` with ``j < lengths[b]`` (grouped heads), the
    contract of ``icrl_kernels.ragged_decode_attention``; this is its dense masked torch reference on this cache's
    layout (``bhsd``)."""
    return ragged_decode_attention_reference(q, k, v, lengths, qpos, scale, kv_layout="bhsd")


def triton_decode_attention(q, k, v, lengths, qpos, scale: float, backend: str | None = None) -> torch.Tensor:
    """``icrl_kernels.ragged_decode_attention`` on this cache's layout (``bhsd``): the Triton kernel on CUDA (or
    under ``TRITON_INTERPRET=1``; ``backend`` as there)."""
    return ragged_decode_attention(q, k, v, lengths, qpos, scale, backend=backend, kv_layout="bhsd")


def sdpa_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                          qpos: torch.Tensor, scale: float) -> torch.Tensor:
    """``reference_decode_attention`` through torch's fused ``scaled_dot_product_attention`` (a boolean mask,
    grouped heads): the CPU's attention. Every query must see at least one slot (``lengths >= 1``: the player's rows always
    do), else its output is NaN."""
    j = torch.arange(k.shape[2], device=q.device)
    ok = (j[None, None, :] <= qpos[:, :, None]) & (j[None, None, :] < lengths[:, None, None])  # [B, T, S]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), attn_mask=ok[:, None], scale=scale,
        enable_gqa=k.shape[1] != q.shape[2])
    return out.transpose(1, 2)


def decode_step(qnet, cache: StaticKVCache, ids: torch.Tensor, valid: torch.Tensor,
                memory: torch.Tensor | None = None, attention=None, view: int | None = None) -> torch.Tensor:
    """Q ``[B, A]`` (fp32) at each context's last column after feeding ``ids [B, T]`` (``valid [B, T]``: which are
    real tokens; a context's real tokens are consecutive and end in the last column, which must be real) with the
    same-state memory features ``memory [B, T, 32]`` for a model with that head. Appends the real tokens' keys and
    values to ``cache`` and advances ``cache.lengths`` (in place). ``attention``: the attention function
    (``reference_decode_attention``'s signature); default: that one. ``view``: attention reads the first ``view``
    slots (default: all ``capacity``); the caller guarantees no context is longer after this call."""
    attention = attention or reference_decode_attention
    view = cache.capacity if view is None else view
    backbone = qnet.model.model
    count = valid.long().sum(1)
    offset = valid.long().cumsum(1) - 1  # index of each real token among its context's new ones
    new_len = cache.lengths + count
    pos = torch.where(valid, cache.lengths[:, None] + offset, (new_len - 1).clamp(min=0)[:, None])
    slot = torch.where(valid, pos, torch.full_like(pos, cache.capacity))
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    if memory is not None:
        x = backbone.embed_tokens(ids, memory=memory)
    else:
        x = backbone.embed_tokens(ids)
    cos, sin = backbone.rotary_emb(x, pos)  # the model's own RoPE: [B, T, head_dim]
    b, t = ids.shape
    for i, layer in enumerate(backbone.layers):
        attn = layer.self_attn
        hd = attn.head_dim
        y = layer.input_layernorm(x)
        q = attn.q_proj(y).view(b, t, -1, hd)
        k = attn.k_proj(y).view(b, t, -1, hd)
        v = attn.v_proj(y).view(b, t, -1, hd)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)  # heads are dim 2 here: [B, T, heads, hd]
        keys, values = cache.keys[i], cache.values[i]
        keys[rows, :, slot] = k.to(keys.dtype)  # [B, T, KVH, D] into slots (b, :, slot[b, t])
        values[rows, :, slot] = v.to(values.dtype)
        o = attention(q, keys[:, :, :view], values[:, :, :view], new_len, pos, attn.scaling)
        x = x + attn.o_proj(o.reshape(b, t, -1).to(x.dtype))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    cache.lengths.copy_(new_len)
    h = backbone.norm(x[:, -1])
    return qnet.q_values(h)
