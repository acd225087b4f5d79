"""The Q-network: attention dispatch and the pretrained path with IA3 online/target adapters."""

import pytest
import torch

from icrl_fast.model.attention import attn_implementation
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
