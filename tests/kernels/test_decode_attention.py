"""icrl_kernels.ragged_decode_attention: the Triton path against the float64 torch reference -- in the CPU
interpreter where there is no GPU, compiled on CUDA tensors where there is one (tests/conftest.py sets
TRITON_INTERPRET only without a GPU).

Shapes: odd B and L, lengths 0 (zeros), 1 and L in every case, grouped heads H/KVH = 4, 2, 1, D = 32 and 48 (a
masked head tile) and the Llama-8B decode shape, one and two query tokens per row (column 0 left padding in some
rows), both cache layouts, and more than 16 queries per kv head (split over programs). Tolerances: fp32 within 1e-5
(max-norm relative) of float64; a bf16 cache with fp32 queries within 1e-5 of float64 over the bf16-rounded cache
(the kernel upcasts tiles, adding no rounding of its own); bf16 queries within 2x the error of the float64 result
rounded to bf16 (the output's own rounding).
"""

import pytest
import torch
from icrl_kernels import ragged_decode_attention, ragged_decode_attention_reference, select_backend
from icrl_kernels.dispatch import interpreting

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make(b, t, h, kvh, d, slots, *, layout="bshd", dtype=torch.float32, cache_dtype=None, index=torch.int64,
         seed=0):
    """Random inputs; ``lengths`` holds 1, ``slots`` and 0 (when ``b`` allows) and random values in between. The
    last query of a row sits at ``lengths - 1``; query 0 is the previous token, or left padding (at
    ``lengths - 1`` too, as the player writes it) in every other row. Slots >= lengths hold random values."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=g, dtype=torch.float64)
    shape = (b, slots, kvh, d) if layout == "bshd" else (b, kvh, slots, d)
    k = torch.randn(shape, generator=g, dtype=torch.float64)
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, slots + 1, (b,), generator=g)
    lengths[: min(b, 3)] = torch.tensor([1, slots, 0])[: min(b, 3)]
    last = (lengths - 1).clamp(min=0)
    qpos = last[:, None].repeat(1, t)
    if t > 1:
        padded = torch.arange(b) % 2 == 1
        qpos[:, 0] = torch.where(padded, last, (last - 1).clamp(min=0))
    cache_dtype = cache_dtype or dtype
    return (q.to(DEV, dtype), k.to(DEV, cache_dtype), v.to(DEV, cache_dtype), lengths.to(DEV, index),
            qpos.to(DEV, index))


def rel_err(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def reference64(q, k, v, lengths, qpos, **kw):
    """The float64 oracle over the inputs as stored (a bf16 cache: its rounded values)."""
    return ragged_decode_attention_reference(q.double(), k.double(), v.double(), lengths, qpos, **kw)


CASES = [  # B, Q, H, KVH, D, L, kv layout, index dtype
    (3, 2, 4, 1, 32, 37, "bshd", torch.int64),
    (5, 2, 4, 2, 48, 300, "bshd", torch.int32),
    (5, 1, 4, 4, 32, 300, "bhsd", torch.int64),
    (3, 1, 4, 2, 48, 37, "bhsd", torch.int32),
    (4, 2, 4, 4, 32, 64, "bhsd", torch.int64),  # powers of two: the default model's heads, one block per row
    (3, 2, 32, 8, 128, 150, "bshd", torch.int64),  # Llama-8B's decode shape (grouped 4:1, D 128)
    (3, 2, 12, 1, 32, 37, "bshd", torch.int64),  # 24 queries per kv head: two programs, the second half full
]


def case_id(case):
    b, t, h, kvh, d, slots, layout, index = case
    return f"B{b}-Q{t}-H{h}-KVH{kvh}-D{d}-L{slots}-{layout}-{str(index).split('.')[-1]}"


@pytest.mark.parametrize("b, t, h, kvh, d, slots, layout, index", CASES, ids=map(case_id, CASES))
def test_fp32_matches_float64_reference(b, t, h, kvh, d, slots, layout, index):
    x = make(b, t, h, kvh, d, slots, layout=layout, index=index)
    out = ragged_decode_attention(*x, backend="triton", kv_layout=layout)
    want = reference64(*x, kv_layout=layout)
    assert out.shape == (b, t, h, d) and out.dtype == torch.float32
    assert rel_err(out, want) < 1e-5
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # the row of length 0: zeros, not NaN


@pytest.mark.parametrize("b, t, h, kvh, d, slots, layout, index", [CASES[1], CASES[2], CASES[5]],
                         ids=map(case_id, [CASES[1], CASES[2], CASES[5]]))
def test_bf16_cache_fp32_queries(b, t, h, kvh, d, slots, layout, index):
    x = make(b, t, h, kvh, d, slots, layout=layout, cache_dtype=torch.bfloat16, index=index, seed=1)
    out = ragged_decode_attention(*x, backend="triton", kv_layout=layout)
    assert out.dtype == torch.float32
    assert rel_err(out, reference64(*x, kv_layout=layout)) < 1e-5  # tiles upcast: fp32 error only


def test_bf16_queries_and_cache():
    x = make(5, 2, 4, 2, 48, 300, dtype=torch.bfloat16, seed=2)
    out = ragged_decode_attention(*x, backend="triton")
    want = reference64(*x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, want) <= 2 * rel_err(want.to(torch.bfloat16), want) + 1e-6


def test_scale_argument():
    x = make(3, 2, 4, 2, 32, 37, seed=3)
    out = ragged_decode_attention(*x, 0.37, backend="triton")
    assert rel_err(out, reference64(*x, scale=0.37)) < 1e-5


def test_reads_only_up_to_each_rows_length():
    """Slots >= lengths[b] full of NaN / inf change nothing: the kernel never loads them (bit-equal output), and
    the reference masks them too."""
    q, k, v, lengths, qpos = make(5, 2, 4, 2, 48, 300, seed=4)
    clean = ragged_decode_attention(q, k, v, lengths, qpos, backend="triton")
    beyond = torch.arange(300, device=DEV)[None, :] >= lengths[:, None]  # [B, L]
    k_bad = k.masked_fill(beyond[:, :, None, None], float("nan"))
    v_bad = v.masked_fill(beyond[:, :, None, None], float("inf"))
    dirty = ragged_decode_attention(q, k_bad, v_bad, lengths, qpos, backend="triton")
    assert torch.isfinite(dirty).all()
    assert torch.equal(dirty, clean)
    ref = ragged_decode_attention_reference(q, k_bad, v_bad, lengths, qpos)
    assert torch.isfinite(ref).all() and rel_err(ref, clean) < 1e-5


def test_padded_query_and_lengths_beyond_the_cache():
    """A padding query at ``lengths - 1`` attends the whole row like the real one; lengths above L count as L; a
    query at a negative position sees nothing (zeros)."""
    q, k, v, lengths, qpos = make(3, 2, 4, 2, 32, 37, seed=5)
    q[:, 0] = q[:, 1]
    qpos[:, 0] = qpos[:, 1]
    out = ragged_decode_attention(q, k, v, lengths, qpos, backend="triton")
    assert torch.equal(out[:, 0], out[:, 1])
    over = ragged_decode_attention(q, k, v, torch.full_like(lengths, 1000), torch.full_like(qpos, 999),
                                   backend="triton")
    full = ragged_decode_attention(q, k, v, torch.full_like(lengths, 37), torch.full_like(qpos, 36), backend="triton")
    assert rel_err(over, full) < 1e-6
    qpos[:, 0] = -1  # beside a real query in the same tile: that row sees no slot in any block
    neg = ragged_decode_attention(q, k, v, lengths, qpos, backend="triton")
    assert torch.equal(neg[:, 0], torch.zeros_like(neg[:, 0]))
    assert torch.equal(neg[:, 1], out[:, 1])


def test_strided_inputs():
    """Views as callers pass them: q a slice of a wider projection, the cache a slice of a longer one, lengths and
    qpos columns of larger tensors (only the head dimension must be contiguous)."""
    q, k, v, lengths, qpos = make(5, 2, 4, 2, 48, 300, seed=9)
    want = ragged_decode_attention(q, k, v, lengths, qpos, backend="triton")
    wide = torch.cat((q, torch.randn_like(q)), dim=-1)[..., :48]
    long_k, long_v = (torch.cat((x, torch.full_like(x, float("nan"))), dim=1)[:, :300] for x in (k, v))
    lengths2 = torch.stack((lengths, lengths * 0), dim=1)[:, 0]
    qpos2 = qpos.t().contiguous().t()
    assert not (wide.is_contiguous() or long_k.is_contiguous() or lengths2.is_contiguous() or qpos2.is_contiguous())
    got = ragged_decode_attention(wide, long_k, long_v, lengths2, qpos2, backend="triton")
    assert torch.equal(got, want)


def test_matches_the_players_oracle():
    """On the player's StaticKVCache layout ([B, KVH, capacity + 1, D], read through a slice ``[:, :, :view]``) the
    kernel equals ``icrl_fast.model.decode_step.reference_decode_attention`` (the player's oracle)."""
    decode_step = pytest.importorskip("icrl_fast.model.decode_step")
    q, k, v, lengths, qpos = make(5, 2, 4, 4, 32, 129, layout="bhsd", seed=6)
    view = 100
    lengths = lengths.clamp(max=view)
    qpos = qpos.clamp(max=view - 1)
    ks, vs = k[:, :, :view], v[:, :, :view]
    out = ragged_decode_attention(q, ks, vs, lengths, qpos, 0.2, backend="triton", kv_layout="bhsd")
    want = decode_step.reference_decode_attention(q, ks, vs, lengths, qpos, 0.2)
    assert rel_err(out, want) < 1e-5


def test_dispatch():
    x = make(3, 2, 4, 2, 32, 37, seed=7)
    assert select_backend(*x) == ("triton" if torch.cuda.is_available() or interpreting() else "reference")
    ref = ragged_decode_attention(*x, backend="reference")
    assert rel_err(ref, reference64(*x)) < 1e-5
    x64 = make(3, 2, 4, 2, 32, 37, dtype=torch.float64, seed=7)
    assert ragged_decode_attention(*x64, backend="triton").dtype == torch.float64  # fp64: the reference always
    wide = make(2, 1, 2, 1, 272, 20, seed=8)
    with pytest.raises(ValueError, match="head sizes up to 256"):
        ragged_decode_attention(*wide, backend="triton")
    assert ragged_decode_attention(*wide, backend="reference").shape == (2, 1, 2, 272)


def _bad_inputs():
    q, k, v, lengths, qpos = make(3, 2, 4, 2, 32, 37)
    yield "3-D q", (q[0], k, v, lengths, qpos), {}
    yield "integer q", (q.long(), k, v, lengths, qpos), {}
    yield "k and v dtypes", (q, k, v.to(torch.bfloat16), lengths, qpos), {}
    yield "float lengths", (q, k, v, lengths.float(), qpos), {}
    yield "H not a multiple of KVH", (q[:, :, :3], k, v, lengths, qpos), {}
    yield "D mismatch", (q, k[..., :16], v[..., :16], lengths, qpos), {}
    yield "B mismatch", (q, k[:2], v[:2], lengths, qpos), {}
    yield "k/v shapes", (q, k, v[:, :20], lengths, qpos), {}
    yield "qpos shape", (q, k, v, lengths, qpos[:, :1]), {}
    yield "lengths shape", (q, k, v, lengths[:2], qpos), {}
    yield "strided head dim", (q, k.repeat_interleave(2, -1)[..., ::2], v, lengths, qpos), {}
    yield "wrong layout", (q, k, v, lengths, qpos), {"kv_layout": "bhsd"}
    yield "unknown layout", (q, k, v, lengths, qpos), {"kv_layout": "nhd"}
    yield "empty batch", (q[:0], k[:0], v[:0], lengths[:0], qpos[:0]), {}


@pytest.mark.parametrize("case", list(_bad_inputs()), ids=lambda c: c[0])
def test_bad_inputs_raise_value_error(case):
    _, args, kw = case
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError):
            ragged_decode_attention(*args, backend=backend, **kw)
