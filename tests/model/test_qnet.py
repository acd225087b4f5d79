"""The Q-network: attention dispatch and the pretrained path with IA3 online/target adapters."""

import pytest
import torch

from icrl_fast.model.attention import attn_implementation, flash_attn_with_kvcache_reference
from icrl_fast.model.qnet import ModelConfig, QNetwork


def test_attention_dispatch_falls_back_to_sdpa_on_cpu():
    assert attn_implementation("cpu") == "sdpa"
    assert attn_implementation("cpu", "eager") == "eager"
    with pytest.raises(ValueError, match="flash-attn"):
        attn_implementation("cpu", "flash_attention_2")
    with pytest.raises(ValueError, match="attention must be"):
        attn_implementation("cpu", "fast")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from icrl_fast.testing import save_tiny_llama

    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


def test_pretrained_model_gets_ia3_online_and_fp32_target_adapters(tiny_checkpoint):
    q = QNetwork(ModelConfig(path=tiny_checkpoint, dtype="float32"), 40, [1, 2, 3, 4])
    names = [n for n, p in q.model.named_parameters() if p.requires_grad]
    assert names and all(".ia3_l.default" in n for n in names)
    assert {n.split(".")[-3] for n in names} == {"k_proj", "v_proj", "down_proj"}
    trainable = q.trainable_parameters()
    assert len(trainable) == len(names) == 2 * 3
    for _, target in q._ia3_pairs:
        assert target.dtype == torch.float32 and not target.requires_grad
    ids = torch.randint(5, 40, (2, 12))
    assert torch.allclose(q.hidden(ids), q.hidden(ids, target=True))  # target starts as a copy
    with torch.no_grad():
        for p in trainable:
            p.mul_(1.5)
    online, target = q.hidden(ids), q.hidden(ids, target=True)
    assert not torch.allclose(online, target)
    q.polyak_update(1.0)
    assert torch.allclose(q.hidden(ids), q.hidden(ids, target=True), atol=1e-6)
    assert all(p.requires_grad for p in trainable)  # switching adapters for the target pass keeps training state
    loss = q.q_values(q.hidden(ids)).sum()
    loss.backward()
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for n, p in q.model.named_parameters() if ".ia3_l." not in n)


def test_bad_model_paths_and_dtypes_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot load a model"):
        QNetwork(ModelConfig(path=str(tmp_path / "missing")), 40, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="dtype"):
        QNetwork(ModelConfig(dtype="float8"), 40, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="kv_heads must divide heads"):
        QNetwork(ModelConfig(heads=4, kv_heads=3), 40, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="brings its own"):  # a pretrained model's GQA is its own config's
        QNetwork(ModelConfig(path=str(tmp_path), kv_heads=2), 40, [0, 1, 2, 3])


def test_kv_heads_sets_the_llama_key_value_heads():
    """Grouped-query attention, as Llama-3.1-8B has it (8 KV heads for 32 query heads); unset = one per head."""
    q = QNetwork(ModelConfig(hidden_size=64, layers=1, heads=8, kv_heads=2, intermediate_size=64), 40, [0, 1, 2, 3])
    assert q.model.config.num_key_value_heads == 2 and q.model.config.num_attention_heads == 8
    assert q.model.model.layers[0].self_attn.k_proj.out_features == 2 * 64 // 8
    assert QNetwork(ModelConfig(heads=4), 40, [0, 1, 2, 3]).model.config.num_key_value_heads == 4


def kvcache_loop(q, k, v, seqlens, scale, causal):
    b, sq, h, d = q.shape
    group = h // k.shape[2]
    want = torch.zeros(b, sq, h, d, dtype=torch.float64)
    for bi in range(b):
        for i in range(sq):
            last = int(seqlens[bi]) - sq + i if causal else int(seqlens[bi]) - 1  # the last key query i sees
            for hi in range(h):
                if last >= 0:
                    kk, vv = k[bi, : last + 1, hi // group].double(), v[bi, : last + 1, hi // group].double()
                    want[bi, i, hi] = torch.softmax(kk @ q[bi, i, hi].double() * scale, dim=0) @ vv
    return want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_the_kvcache_reference_follows_flash_attn_contract(dtype, causal):
    """flash_attn_with_kvcache semantics, checked against a float64 loop: per-context lengths, bottom-right causal
    alignment of a multi-token query block, grouped-query heads, a query that sees no key (zeros)."""
    g = torch.Generator().manual_seed(0)
    b, sq, h, hk, d, sk = 3, 5, 6, 2, 8, 13
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d)))
    k[1, 7:], v[1, 7:] = 1e4, 1e4  # beyond context 1's length: must never be read
    seqlens = torch.tensor([13, 7, 3], dtype=torch.int32)
    out = flash_attn_with_kvcache_reference(q, k, v, cache_seqlens=seqlens, softmax_scale=0.3, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), kvcache_loop(q, k, v, seqlens, 0.3, causal), rtol=tol, atol=tol)
    if causal:
        assert (out[2, :2] == 0).all()  # context 2 has 3 keys: queries 0 and 1 of the 5-token block see none
