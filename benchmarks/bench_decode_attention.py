"""ragged_decode_attention: the Triton kernel (reads each row up to its own length) vs the dense masked reference (all
L slots), side by side in one run.

One decode step of a batch of B = 64 rows, Q = 2 query tokens each, over a static KV cache of L = 1,024 and 4,096
slots with ragged lengths drawn uniformly from 1..L, at the default model's attention (H 4, KVH 4, D 32) and at
Llama-8B's (H 32, KVH 8, D 128); fp32 and bf16 caches (fp32 queries). Throughput: MB/s of the cache bytes the rows
actually own (keys and values up to each row's length), the same work for both, so the ratio is the time ratio.

On a CPU machine only the reference runs (the CPU fallback): the kernel's speed is a GPU matter (the Triton
interpreter is a correctness tool).

Run: ``python -m pytest benchmarks/bench_decode_attention.py`` (``--benchmark-disable``: each row runs untimed).
"""

import pytest
import torch
from icrl_kernels import ragged_decode_attention, ragged_decode_attention_reference

SUITE = "decode_attention"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
B, Q = 64, 2
LENGTHS = [1024, 4096]
HEADS = {"default (H=4, KVH=4, D=32)": (4, 4, 32), "llama8b (H=32, KVH=8, D=128)": (32, 8, 128)}
CACHE = {"fp32": torch.float32, "bf16": torch.bfloat16}

IMPLS = {
    "triton": lambda *x: ragged_decode_attention(*x, backend="triton"),
    "dense": lambda *x: ragged_decode_attention_reference(*x),
}


def make(slots: int, h: int, kvh: int, d: int, cache_dtype: torch.dtype):
    """Queries, a [B, L, KVH, D] cache, lengths uniform in 1..L, and the last two positions of each row."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(B, Q, h, d, generator=g, device=DEVICE)
    k = torch.randn(B, slots, kvh, d, generator=g, device=DEVICE).to(cache_dtype)
    v = torch.randn(B, slots, kvh, d, generator=g, device=DEVICE).to(cache_dtype)
    lengths = torch.randint(1, slots + 1, (B,), generator=g, device=DEVICE)
    qpos = torch.stack(((lengths - 2).clamp(min=0), lengths - 1), dim=1)
    return q, k, v, lengths, qpos


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("cache", list(CACHE))
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("slots", LENGTHS)
def test_decode_attention(benchmark, record, impl, cache, heads, slots):
    if impl == "triton" and not CUDA:
        pytest.skip("Triton speed is measured on a CUDA GPU (the CPU interpreter is for correctness only)")
    h, kvh, d = HEADS[heads]
    x = make(slots, h, kvh, d, CACHE[cache])
    fn = IMPLS[impl]

    def step():
        fn(*x)
        if CUDA:
            torch.cuda.synchronize()  # host-device sync so the round time covers the kernel

    step()  # compile / warm caches outside the timing
    benchmark.pedantic(step, rounds=20 if CUDA else 3, iterations=1)
    if benchmark.disabled:  # --benchmark-disable: one untimed call (a smoke run), no statistics to record
        return
    owned = int(x[3].sum()) * kvh * d * 2 * x[1].element_size()  # keys and values up to each row's length
    record(SUITE, f"{impl} ({cache} cache)", owned / 1e6, "MB/s", f"{heads} L={slots} {cache}",
           "ours" if impl == "triton" else "reference")
