"""icrl_kernels.q_td_loss.vocab_argmax: the Triton GEMM-with-argmax-epilogue path and the chunked cuBLAS (torch.mm)
path against a float64 argmax, the packed 64-bit key the Triton epilogue merges with, and the per-shape path choice.

Off a GPU the Triton path runs in the CPU interpreter in fp32 (tests/conftest.py sets TRITON_INTERPRET there; the
interpreter computes bf16 ``tl.dot`` wrongly) and the cuBLAS path is torch.mm on the CPU, in fp32 and bf16; the
Triton path's bf16 and the timed choice run on a GPU only (``gpu`` marker).
"""

import importlib

import pytest
import torch

va = importlib.import_module("icrl_kernels.q_td_loss")  # the module (the package's `q_td_loss` is the function)
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def logits64(h, w):
    return h.double() @ w.double().T


def product_scale(h, w):
    """The largest sum of |products| of a row's dot products: what a dot product's rounding error scales with."""
    return float((h.double().abs() @ w.double().abs().T).max())


def assert_argmax(got, h, w, tol):
    """``got`` is an argmax of the float64 logits up to ``tol`` (absolute), and exactly the float64 argmax wherever
    the top two are further apart than twice that; returns how many rows were decided exactly."""
    ref = logits64(h, w)
    n, v = ref.shape
    assert got.dtype == torch.int64 and got.shape == (n,) and bool(((got >= 0) & (got < v)).all())
    top = ref.max(dim=1).values
    assert bool((ref.gather(1, got[:, None]).squeeze(1) >= top - tol).all())
    clear = (ref.topk(2, dim=1).values.diff(dim=1).abs().squeeze(1) > 2 * tol) if v > 1 else torch.ones(n, dtype=bool)
    assert torch.equal(got[clear], ref.argmax(dim=1)[clear])
    return int(clear.sum())


def ternary(*shape, generator, dtype=torch.float32):
    """Entries in {-1, 0, 1}: every dot product (d <= 256) is an exact integer in fp32 and bf16, whatever the
    summation order, so ties are exact and common."""
    return torch.randint(-1, 2, shape, generator=generator).to(DEV, dtype)


# --- the packed key -----------------------------------------------------------------------------------------------

def test_argmax_key_orders_by_value_then_lowest_index():
    """Negative, -0.0, +0.0, positive, equal values and the index extremes: the key's signed order is the value's
    order, equal values (-0.0 == +0.0 included) order the lower index higher, and unpacking gives both back."""
    vals = torch.tensor([float("-inf"), -3.5, -1e-38, -1e-45, -0.0, 0.0, 1e-45, 2.0, 2.0, 3e38, float("inf"), -3.5])
    idx = torch.tensor([7, 0, 3, 9, 4, 2, 5, 11, 6, 2 ** 31 - 1, 1, 8])
    key = va.argmax_key(vals, idx)
    assert key.dtype == torch.int64 and bool((key > va.KEY_INIT).all())
    back, back_idx = va.argmax_from_key(key)
    assert torch.equal(back_idx, idx) and torch.equal(back, vals + 0.0)  # -0.0 comes back as +0.0
    assert not back.signbit()[4]
    for i in range(len(vals)):
        for j in range(len(vals)):
            want = (vals[i] > vals[j]) or (vals[i] == vals[j] and idx[i] < idx[j])
            assert bool(key[i] > key[j]) == bool(want), (vals[i], idx[i], vals[j], idx[j])
    assert int(va.argmax_key(torch.tensor([-0.0]), torch.tensor([0]))) == int(va.argmax_key(torch.tensor([0.0]),
                                                                                           torch.tensor([0])))


def test_argmax_key_max_is_the_lowest_index_argmax_on_random_rows():
    g = torch.Generator().manual_seed(0)
    vals = torch.randint(-4, 5, (300, 50), generator=g).float() * torch.rand(1, 50, generator=g).round()  # ties, +-0
    vals[vals == 0] = torch.where(torch.rand((vals == 0).sum(), generator=g) < 0.5, -0.0, 0.0)
    key = va.argmax_key(vals, torch.arange(50).expand(300, 50))
    got_val, got_idx = va.argmax_from_key(key.max(dim=1).values)
    assert torch.equal(got_idx, vals.argmax(dim=1)) and torch.equal(got_val, vals.max(dim=1).values + 0.0)


def test_triton_epilogue_packs_the_same_key():
    """The kernel's per-row keys (tile max + atomic max over tiles) equal ``argmax_key`` of the float64 max and
    argmax: exact, on ternary data with ties across tiles."""
    g = torch.Generator().manual_seed(1)
    h, w = ternary(37, 48, generator=g), ternary(300, 48, generator=g)
    ref = logits64(h, w)
    want = va.argmax_key(ref.max(dim=1).values.float(), ref.argmax(dim=1))
    assert torch.equal(va._triton_keys(h, w), want)


# --- both paths against float64 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["triton", "cublas"])
@pytest.mark.parametrize("d", [48, 64])
@pytest.mark.parametrize("v", [5, 1000, 1031])
@pytest.mark.parametrize("n", [1, 7, 204])
def test_paths_match_float64_argmax_fp32(path, n, v, d):
    """N 1 / 7 / 204 (one partial row tile, several), V 5 (less than a tile) / 1000 / 1031 (prime: ragged last tile
    and chunk), d 48 (a masked last d tile) / 64; fp32 within 1e-5 of the summed |products|."""
    g = torch.Generator().manual_seed(n * 7919 + v * 31 + d)
    h = torch.randn(n, d, generator=g).to(DEV)
    w = torch.randn(v, d, generator=g).to(DEV)
    clear = assert_argmax(va.vocab_argmax(h, w, path=path), h, w, tol=1e-5 * product_scale(h, w))
    assert clear >= 0.9 * n


@pytest.mark.parametrize("path, dtype", [("triton", torch.float32), ("cublas", torch.float32),
                                         ("cublas", torch.bfloat16)])
def test_exact_ties_keep_the_lowest_index(path, dtype):
    """Ternary data: a dense pattern row copied to vocabulary rows 130, 260 and V - 1 (other tiles and chunks of
    128) and planted as hidden row 0 -- its argmax is 130 -- and ties everywhere else; every row must be the
    float64 argmax's first maximal index."""
    if path == "triton" and dtype != torch.float32 and not CUDA:
        pytest.skip("bf16 tl.dot is computed wrongly by the interpreter")
    g = torch.Generator().manual_seed(2)
    n, v, d = 204, 1031, 48
    h, w = ternary(n, d, generator=g, dtype=dtype), ternary(v, d, generator=g, dtype=dtype)
    pattern = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0).to(DEV, dtype)
    w[[130, 260, v - 1]] = pattern
    h[0] = pattern
    got = va.vocab_argmax(h, w, path=path)
    want = logits64(h, w).argmax(dim=1)
    assert got[0] == 130 and torch.equal(got, want)
    assert (logits64(h, w) == logits64(h, w).max(dim=1, keepdim=True).values).sum(1).gt(1).sum() > n // 4  # ties


def test_cublas_path_holds_one_chunk_buffer_of_at_most_a_tenth_of_the_logits(monkeypatch):
    """Every ``torch.mm`` writes into one reused buffer of at most 10 % of the ``[N, V]`` logits; the chunk rule."""
    assert va.cublas_chunk(128256) == 12800 and va.cublas_chunk(128256) <= 128256 / 10
    assert [va.cublas_chunk(v) for v in (1, 5, 1000, 1031, 1280, 2560)] == [1, 5, 128, 128, 128, 256]
    seen, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, out: seen.append(out.untyped_storage()) or mm(a, b, out=out))
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(3, 8, generator=g), torch.randn(12800, 8, generator=g)
    assert torch.equal(va.vocab_argmax(h, w, path="cublas"), logits64(h, w).argmax(1))
    assert len(seen) == 10 and len({s.data_ptr() for s in seen}) == 1
    assert seen[0].nbytes() <= 0.1 * h.shape[0] * w.shape[0] * h.element_size()


# --- path choice and input errors ---------------------------------------------------------------------------------

def test_auto_path_rule_off_the_gpu(monkeypatch):
    """Off CUDA the choice is a fixed rule: the interpreter takes the Triton kernel (it is there to test it), plain
    CPU tensors and fp64 the torch.mm chunks; the q_td_loss forward goes through the same choice."""
    if CUDA:
        pytest.skip("on a GPU the choice is timed (test_auto_path_is_timed_once_per_shape_bucket_on_gpu)")
    h, w = torch.randn(5, 16), torch.randn(40, 16)
    assert va.argmax_path(h, w) == "triton"  # this session interprets (conftest)
    assert va.argmax_path(h.double(), w.double()) == "cublas"
    assert torch.equal(va.vocab_argmax(h.double(), w.double()), logits64(h, w).argmax(1))
    monkeypatch.setattr(va, "interpreting", lambda: False)
    assert va.argmax_path(h, w) == "cublas"
    assert torch.equal(va.vocab_argmax(h, w), logits64(h, w).argmax(1))
    with pytest.raises(ValueError, match="path='triton' needs"):
        va.vocab_argmax(h, w, path="triton")
    assert va.PATH_CHOICE == {}  # nothing timed, nothing cached off CUDA


def test_n_bucket():
    assert [va.n_bucket(n) for n in (1, 2, 3, 204, 2048, 2049, 40960)] == [1, 2, 4, 256, 2048, 4096, 65536]


def test_bad_inputs_are_value_errors():
    h, w = torch.randn(4, 16, device=DEV), torch.randn(10, 16, device=DEV)
    with pytest.raises(ValueError, match="path must be one of"):
        va.vocab_argmax(h, w, path="cuda")
    with pytest.raises(ValueError, match=r"weight \[V >= 1, d\]"):
        va.vocab_argmax(h, w[:, :8])
    with pytest.raises(ValueError, match=r"weight \[V >= 1, d\]"):
        va.vocab_argmax(h, w[:0])
    with pytest.raises(ValueError, match="one float dtype"):
        va.vocab_argmax(h, w.double())
    with pytest.raises(ValueError, match="contiguous rows"):
        va.vocab_argmax(torch.randn(16, 4, device=DEV).T, w)
    assert va.vocab_argmax(h[:0], w).shape == (0,)


# --- GPU: bf16, the paper's vocabulary, the timed choice ------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("path", ["triton", "cublas"])
@pytest.mark.parametrize("n", [7, 204, 2048])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_paths_at_the_paper_vocabulary_on_gpu(path, n, dtype):
    """d 4,096, V 128,256 (Llama 3's head), logits of unit scale. Both paths accumulate the products of the
    (rounded) inputs in fp32 -- in another order than float64, on tensor cores: within 1e-4 of the summed |products|
    (a bound far below the logits' top-2 gaps) -- and the cuBLAS path then rounds the logits to the dtype, as eager
    does: within 2x that rounding too (2 * 2**-8 * |logit| in bf16, 2 * 2**-11 in fp16)."""
    g = torch.Generator(device=DEV).manual_seed(n)
    h = torch.randn(n, 4096, generator=g, device=DEV).to(dtype)
    w = (torch.randn(128256, 4096, generator=g, device=DEV) / 64).to(dtype)
    rounding = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 0.0}[dtype] if path == "cublas" else 0
    tol = 1e-4 * product_scale(h, w) + 2 * rounding * float(logits64(h, w).abs().max())
    assert_argmax(va.vocab_argmax(h, w, path=path), h, w, tol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="compiled Triton needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_ties_keep_the_lowest_index_half_on_gpu(dtype):
    g = torch.Generator().manual_seed(4)
    n, v, d = 300, 2000, 64
    h, w = ternary(n, d, generator=g, dtype=dtype), ternary(v, d, generator=g, dtype=dtype)
    w[[300, 700, v - 1]] = h[0]
    want = logits64(h, w).argmax(dim=1)
    for path in ("triton", "cublas"):
        assert torch.equal(va.vocab_argmax(h, w, path=path), want), path


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the timed choice needs a CUDA GPU")
def test_auto_path_is_timed_once_per_shape_bucket_on_gpu(monkeypatch):
    """The first call of a (N bucket, V, d, dtype, device) key times both paths and caches the faster; a call with
    another N of the same bucket reuses it without timing."""
    g = torch.Generator(device=DEV).manual_seed(5)
    h = torch.randn(300, 512, generator=g, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(5000, 512, generator=g, device=DEV, dtype=torch.bfloat16)
    key = (512, 5000, 512, torch.bfloat16, h.device)
    va.PATH_CHOICE.pop(key, None)
    got = va.vocab_argmax(h, w)
    assert va.PATH_CHOICE[key] in ("triton", "cublas")
    assert set(va.PATH_TIMES[key]) == {"triton", "cublas"} and all(0 < t < float("inf")
                                                                  for t in va.PATH_TIMES[key].values())
    assert_argmax(got, h, w, tol=1e-4 * product_scale(h, w) + 2 * 2 ** -8 * float(logits64(h, w).abs().max()))
    monkeypatch.setattr(va, "_fastest_path", lambda *a: pytest.fail("timed twice"))
    va.vocab_argmax(h[:257], w)  # N 257: the same bucket (512)
