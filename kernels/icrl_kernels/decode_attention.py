"""Ragged decode attention over a static KV cache: each row reads its own slots only, flash-decoding style.

Layers: ``@triton.jit _ragged_decode_attention_fwd_kernel`` -> launcher ``ragged_decode_attention_forward`` ->
functional :func:`ragged_decode_attention` (inference only: no autograd), with the dense masked torch reference
:func:`ragged_decode_attention_reference` as the CPU fallback and the test oracle.

Contract (B rows, Q query tokens per row, H query heads, KVH key/value heads, L cache slots, D head size):

* ``q [B, Q, H, D]`` fp32/bf16/fp16: this step's queries (after RoPE); ``qpos [B, Q]`` int32/int64: each query's
  absolute position, i.e. its own key slot;
* ``k``, ``v``: the cache (keys after RoPE), one float dtype (fp32/bf16/fp16, may differ from ``q``'s), laid out
  ``[B, L, KVH, D]`` (``kv_layout="bshd"``, the default) or ``[B, KVH, L, D]`` (``"bhsd"``, e.g. a slice
  ``cache[:, :, :view]``); any strides with the last one 1;
* ``lengths [B]`` int32/int64: row ``b``'s valid slots are ``0 .. lengths[b] - 1``, this step's keys included;
* query ``(b, i)`` attends slot ``j`` iff ``j <= qpos[b, i]`` and ``j < lengths[b]``; head ``h`` reads kv head
  ``h // (H // KVH)``; softmax of ``scale * <q, k>`` (``scale`` default ``1 / sqrt(D)``);
* returns ``[B, Q, H, D]`` in ``q``'s dtype. A query that sees no slot (``lengths[b] <= 0`` or ``qpos < 0``) gets
  zeros, never NaN; a left-padding query with ``qpos = lengths - 1`` just attends the whole row (harmless).
  Lengths above ``L`` count as ``L``. Slots ``>= lengths[b]`` are never read, so they may hold anything (NaN).

Fused path: one program per (row, kv head) holds the ``Q * H/KVH`` queries that share the kv head as one
``[16, D]`` tile (more than 16: one program per 16 of them) and streams ``[BLOCK_L, D]`` key/value tiles up to
``min(lengths[b], max qpos + 1)`` -- the cost is O(that row's length), not O(L) -- with an online softmax (exp2,
scale folded into the queries) and fp32 accumulation, one final cast. Cache tiles are upcast to fp32 before ``tl.dot`` (IEEE fp32 products): exact for a
bf16 cache, the queries are not rounded, and the Triton interpreter computes bf16 ``tl.dot`` wrongly (garbage of
order 1e10 in Triton 3.9), so the interpreter checks the very code the GPU runs. At decode the products are cheap
beside the cache reads. Tolerances: fp32 within 1e-5 (relative, max-norm) of float64; a bf16 cache with fp32
queries within 1e-5 of float64 attention over the bf16-rounded cache (the kernel adds no rounding of its own).
"""

from __future__ import annotations

import math

import torch

from .dispatch import FLOAT_DTYPES, HAS_TRITON, interpreting, select_backend

KV_LAYOUTS = ("bshd", "bhsd")
INT_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256  # one [BLOCK_M, BLOCK_D] query tile and [BLOCK_L, BLOCK_D] cache tiles per program

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _ragged_decode_attention_fwd_kernel(
        q_ptr, k_ptr, v_ptr, len_ptr, qpos_ptr, o_ptr,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_ob, stride_ot, stride_oh, stride_pb, stride_pt,
        L, D, qk_scale,
        T: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Row ``program_id(0)``, kv head ``program_id(1)``, rows ``program_id(2) * BLOCK_M + 0 .. BLOCK_M - 1`` of
        the ``T * GROUP`` queries of that kv head: row ``r`` is query ``r // GROUP`` of head ``kvh * GROUP +
        r % GROUP``. Online softmax in base 2 (``qk_scale = scale * log2(e)``)."""
        b = tl.program_id(0).to(tl.int64)  # B * L * KVH * D can pass 2**31
        kvh = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T * GROUP
        t = rows // GROUP
        head = kvh * GROUP + rows % GROUP
        dd = tl.arange(0, BLOCK_D)
        d_ok = dd < D
        mq = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh + dd[None, :],
                    mask=mq, other=0.0).to(tl.float32) * qk_scale
        pos = tl.load(qpos_ptr + b * stride_pb + t * stride_pt, mask=row_ok, other=-1).to(tl.int64)
        n = tl.minimum(tl.minimum(tl.load(len_ptr + b).to(tl.int64), L), tl.max(pos) + 1)  # slots this row reads
        k_row = k_ptr + b * stride_kb + kvh * stride_kh
        v_row = v_ptr + b * stride_vb + kvh * stride_vh
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start in range(0, n, BLOCK_L):
            j = start + tl.arange(0, BLOCK_L)
            j_ok = j < n
            mk = j_ok[:, None] & d_ok[None, :]
            k = tl.load(k_row + j[:, None] * stride_ks + dd[None, :], mask=mk, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, BLOCK_L], already scaled
            s = tl.where(j_ok[None, :] & (j[None, :] <= pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet: exp2(-inf) = 0
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_row + j[:, None] * stride_vs + dd[None, :], mask=mk, other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # l_i = 0: no slot seen, acc = 0: zeros
        tl.store(o_ptr + b * stride_ob + t[:, None] * stride_ot + head[:, None] * stride_oh + dd[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=mq)


BLOCK_M = 16  # query rows per program: tl.dot's minimum; Q * H/KVH is 8 at Q = 2 for most GQA models (4:1)
# (BLOCK_L, num_warps, num_stages) by (cache element bytes, BLOCK_D), for the fp32 FMA dots (IEEE: no tensor
# cores) of a [16, BLOCK_D] query tile. ptxas allocates registers for these dots erratically (at D 128, 32 keys
# x 4 warps x 3 stages take 80 registers in fp32 and 1 stage 214; a bf16 cache spills at 64 keys x 4 warps x 2-3
# stages, 6.3-7 KB), so each entry is one that compiles for sm_90 at L 4,096 without spills, with the registers per
# thread in the comments (tests/kernels/test_sm90_decode_attention.py, ptxas -v, Triton 3.9). Preferred among
# those: the fewest registers with 2-3 stages, else 1 stage. Not yet timed on a GPU.
TILE_CONFIGS = {
    (4, 16): (64, 4, 3), (4, 32): (64, 4, 3), (4, 64): (32, 4, 3),  # fp32: 80, 96, 80 registers
    (4, 128): (32, 4, 3), (4, 256): (32, 8, 2),  # 80, 99
    (2, 16): (32, 8, 3), (2, 32): (32, 8, 3), (2, 64): (32, 8, 1),  # bf16/fp16: 92, 124, 64
    (2, 128): (32, 8, 1), (2, 256): (32, 8, 1),  # 74, 102
}
INTERPRETER_CONFIG = (64, 4, 1)  # the interpreter pays per program and per loop step, not per register


def block_d(head_dim: int) -> int:
    """The head tile: ``D`` rounded up to a power of two (masked beyond ``D``), at least 16 (``tl.dot``)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def launch_config(cache_dtype: torch.dtype, bd: int) -> tuple[int, int, int]:
    """``(BLOCK_L, num_warps, num_stages)`` for a cache of ``cache_dtype`` and head tile ``bd`` (``TILE_CONFIGS``)."""
    if interpreting():
        return INTERPRETER_CONFIG
    return TILE_CONFIGS[(min(cache_dtype.itemsize, 4), bd)]


def _kv_strides(t: torch.Tensor, kv_layout: str) -> tuple[int, int, int]:
    """(batch, slot, head) strides of a cache tensor in ``kv_layout``."""
    return (t.stride(0), t.stride(1), t.stride(2)) if kv_layout == "bshd" else (t.stride(0), t.stride(2),
                                                                                  t.stride(1))


def ragged_decode_attention_forward(q, k, v, lengths, qpos, scale: float, kv_layout: str) -> torch.Tensor:
    """Launch the kernel on checked inputs (see the module contract); returns ``[B, Q, H, D]`` in ``q.dtype``."""
    b, t, h, d = q.shape
    kvh = k.shape[2] if kv_layout == "bshd" else k.shape[1]
    slots = k.shape[1] if kv_layout == "bshd" else k.shape[2]
    group = h // kvh
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    bd = block_d(d)
    block_l, warps, stages = launch_config(k.dtype, bd)
    extra = {} if interpreting() else {"num_warps": warps, "num_stages": stages}
    _ragged_decode_attention_fwd_kernel[(b, kvh, triton.cdiv(t * group, BLOCK_M))](
        q, k, v, lengths.contiguous(), qpos, out, q.stride(0), q.stride(1), q.stride(2), *_kv_strides(k, kv_layout),
        *_kv_strides(v, kv_layout), out.stride(0), out.stride(1), out.stride(2), qpos.stride(0), qpos.stride(1),
        slots, d, float(scale) * math.log2(math.e), T=t, GROUP=group, BLOCK_M=BLOCK_M, BLOCK_L=block_l, BLOCK_D=bd,
        **extra)
    return out


def ragged_decode_attention_reference(q, k, v, lengths, qpos, scale: float | None = None,
                                      kv_layout: str = "bshd") -> torch.Tensor:
    """Dense masked softmax over all ``L`` slots (the module contract), in torch: the CPU fallback and the oracle.

    Computes in the widest of ``q``, ``k``, ``v``'s dtypes and fp32 (float64 inputs: float64 throughout) and
    returns ``q``'s dtype. Masked slots are zeroed, so garbage (NaN) beyond a row's length does not leak.
    """
    _check(q, k, v, lengths, qpos, kv_layout)
    ct = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
    if kv_layout == "bshd":
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, KVH, L, D]
    b, t, h, d = q.shape
    kvh, slots = k.shape[1], k.shape[2]
    g = h // kvh
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.to(ct).reshape(b, t, kvh, g, d).permute(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    j = torch.arange(slots, device=q.device)
    slot_ok = j[None, :] < lengths[:, None]  # [B, L]
    ok = slot_ok[:, None, :] & (j[None, None, :] <= qpos[:, :, None])  # [B, Q, L]
    ok = ok[:, None, None].expand(b, 1, g, t, slots).reshape(b, 1, g * t, slots)
    scores = (qg @ k.to(ct).transpose(-1, -2)) * scale  # [B, KVH, G*Q, L]; garbage slots are masked next
    probs = torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1).masked_fill(~ok, 0.0)  # no slot: 0
    out = probs @ v.to(ct).masked_fill(~slot_ok[:, None, :, None], 0.0)  # [B, KVH, G*Q, D]
    return out.reshape(b, kvh, g, t, d).permute(0, 3, 1, 2, 4).reshape(b, t, h, d).to(q.dtype)


def _check(q, k, v, lengths, qpos, kv_layout: str) -> None:
    """API-boundary checks: a ValueError naming the offending shapes or dtypes, never a Triton crash. Reads no
    tensor values (no device-to-host sync)."""
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS} ([B, L, KVH, D] or [B, KVH, L, D]), got {kv_layout!r}")
    for name, x, nd in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("lengths", lengths, 1), ("qpos", qpos, 2)):
        if not isinstance(x, torch.Tensor) or x.ndim != nd:
            raise ValueError(f"{name} must be a {nd}-D tensor, got {getattr(x, 'shape', type(x).__name__)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be floating point (fp32, bf16, fp16, fp64), got {x.dtype}")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head) dimension, got strides {x.stride()}")
    if k.dtype != v.dtype:
        raise ValueError(f"k and v must share one dtype, got {k.dtype} and {v.dtype}")
    if lengths.dtype not in INT_DTYPES or qpos.dtype not in INT_DTYPES:
        raise ValueError(f"lengths and qpos must be int32 or int64, got {lengths.dtype} and {qpos.dtype}")
    b, t, h, d = q.shape
    kvh = k.shape[2] if kv_layout == "bshd" else k.shape[1]
    want = "[B, L, KVH, D]" if kv_layout == "bshd" else "[B, KVH, L, D]"
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be {want} with B = {b} and D = {d} "
                         f"of q {tuple(q.shape)} [B, Q, H, D]")
    if kvh < 1 or h % kvh:
        raise ValueError(f"the query heads H = {h} must be a multiple of the kv heads KVH = {kvh} (k {tuple(k.shape)} "
                         f"read as {want}; pass kv_layout= if the cache is laid out the other way)")
    if lengths.shape != (b,) or qpos.shape != (b, t):
        raise ValueError(f"lengths must be [B] = [{b}] and qpos [B, Q] = [{b}, {t}], got {tuple(lengths.shape)} and "
                         f"{tuple(qpos.shape)}")
    if len({x.device for x in (q, k, v, lengths, qpos)}) != 1:
        raise ValueError("q, k, v, lengths and qpos must be on one device")
    if b == 0 or t == 0:
        raise ValueError(f"need at least one row and one query token, got q {tuple(q.shape)}")


def ragged_decode_attention(q, k, v, lengths, qpos, scale: float | None = None, backend: str | None = None, *,
                            kv_layout: str = "bshd") -> torch.Tensor:
    """Attention of ``q [B, Q, H, D]`` at positions ``qpos [B, Q]`` over each row's first ``lengths[b]`` cache
    slots of ``k``, ``v`` (see the module docstring for the contract); returns ``[B, Q, H, D]`` in ``q.dtype``.

    ``backend``: ``None``/``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else the torch reference),
    ``"triton"`` or ``"reference"``; float64 inputs always take the reference. Inference only (no gradient).
    ``ValueError`` on bad shapes/dtypes, and for ``D > 256`` on the Triton path.
    """
    _check(q, k, v, lengths, qpos, kv_layout)
    d = q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    chosen = select_backend(q, k, v, lengths, qpos, backend=backend)
    if chosen == "reference" or torch.float64 in (q.dtype, k.dtype):  # fp64 is the oracle's dtype
        return ragged_decode_attention_reference(q, k, v, lengths, qpos, scale, kv_layout)
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernel takes head sizes up to {MAX_HEAD_DIM}, got D = {d}: use "
                         f"backend='reference'")
    return ragged_decode_attention_forward(q, k, v, lengths, qpos, scale, kv_layout)
