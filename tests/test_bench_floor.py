"""benchmarks/bench_rollout.py's floor of a cached step: KV and weight bytes over the copy bandwidth, FLOPs over the
matmul rate, the larger of the two; checked on a hand-computed example with grouped-query attention (kv_heads !=
heads), so that mixing up the two head counts, the causal keys of the new tokens or the K-and-V factor shows."""

from types import SimpleNamespace

import pytest
from bench_modules import load_suite


@pytest.fixture(scope="module")
def bench():
    return load_suite("bench_rollout.py")


def test_attention_shape_reads_grouped_query_heads(bench):
    gqa = SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, hidden_size=4096, head_dim=128)
    assert bench.attention_shape(gqa) == (32, 8, 128)
    plain = SimpleNamespace(num_attention_heads=4, hidden_size=128)  # no kv heads, no head_dim: MHA, d / heads
    assert bench.attention_shape(plain) == (4, 4, 32)


def test_floor_of_a_hand_computed_step(bench):
    # 2 layers, 4 query heads sharing 2 KV heads of 4 channels, bf16 (2 bytes); two contexts holding 10 and 20 tokens
    # get 1 and 3 new tokens; 100 weights in the decoder's Linears, 1,000 bytes of weights read whole.
    lengths, counts = [10, 20], [1, 3]
    keys = bench.keys_attended(lengths, counts)
    assert keys == 11 + (21 + 22 + 23)  # each new token attends to the cache and the new tokens up to itself
    kv = bench.kv_bytes_read(layers=2, tokens=(10 + 1) + (20 + 3), kv_heads=2, head_dim=4, dtype_bytes=2)
    assert kv == 2 * 34 * 2 * 2 * 4 * 2 == 2176  # layers x tokens x (K, V) x kv_heads x head_dim x bytes
    flops = bench.step_flops(matmul_params=100, new_tokens=4, keys=keys, layers=2, heads=4, head_dim=4)
    assert flops == 2 * 100 * 4 + 4 * 77 * 4 * 4 * 2 == 800 + 9856

    mem_bound = bench.floor_seconds(kv + 1000, 1000.0, flops, 1e4)  # 3.176 s of bytes vs 1.0656 s of FLOPs
    assert mem_bound["memory_s"] == pytest.approx(3.176)
    assert mem_bound["compute_s"] == pytest.approx(1.0656)
    assert mem_bound["floor_s"] == pytest.approx(3.176)
    compute_bound = bench.floor_seconds(kv + 1000, 1e4, flops, 1000.0)  # 0.3176 s vs 10.656 s
    assert compute_bound["floor_s"] == pytest.approx(10.656)
    with pytest.raises(ValueError, match="positive"):
        bench.floor_seconds(1.0, 0.0, 1.0, 1.0)


def test_cached_step_floor_counts_the_timed_calls(bench):
    """The floor of the benchmark's step from the model's config: 4 calls of which the last 2 are timed."""
    import torch

    from icrl_fast.model.qnet import ModelConfig, QNetwork

    d, inter, layers, heads = 16, 32, 2, 2
    q = QNetwork(ModelConfig(hidden_size=d, layers=layers, heads=heads, intermediate_size=inter), 50, [1, 2, 3, 4])
    s = bench.step_shape(q)
    linears = layers * (4 * d * d + 3 * d * inter)  # q, k, v, o and gate, up, down
    assert s["matmul_params"] == linears
    assert s["weight_bytes"] == 4 * (linears + (2 * layers + 1) * d)  # fp32, + the RMSNorm weights
    drawn = [torch.tensor([2, 2]), torch.tensor([1, 3]), torch.tensor([4, 1]), torch.tensor([2, 2])]
    f = bench.cached_step_floor(q, {"bandwidth": 1e9, "flop_rate": 1e9}, 8, drawn, rounds=2)
    # calls 3 and 4 start from lengths [8+2+1, 8+2+3] = [11, 13], then [15, 14]
    kv3 = layers * ((11 + 4) + (13 + 1)) * 2 * heads * 8 * 4
    kv4 = layers * ((15 + 2) + (14 + 2)) * 2 * heads * 8 * 4
    assert f["kv_bytes"] == pytest.approx((kv3 + kv4) / 2)
    fl3 = 2 * linears * 5 + 4 * ((4 * 11 + 10) + (13 + 1)) * heads * 8 * layers
    fl4 = 2 * linears * 4 + 4 * ((2 * 15 + 3) + (2 * 14 + 3)) * heads * 8 * layers
    assert f["flops"] == pytest.approx((fl3 + fl4) / 2)
    assert f["floor_s"] == pytest.approx(max(f["kv_bytes"] + s["weight_bytes"], f["flops"]) / 1e9)


def test_measured_rates_are_plausible(bench):
    bw = bench.copy_bandwidth("cpu", nbytes=4 * 2 ** 20, repeats=2)
    rate = bench.matmul_rate("cpu", 64, 32, 48, repeats=2, inner=2)
    assert 1e7 < bw < 1e13 and 1e6 < rate < 1e13  # bytes/s and FLOP/s within any CPU's range
