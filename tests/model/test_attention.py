"""The attention dispatch point: flash-attn only for half-precision models and only when it really imports; the
Liger kernels scoped to the model they are applied to."""

import sys

import pytest
import torch
import triton
import triton.language as tl

from icrl_fast.model import attention
from icrl_fast.model.attention import attn_implementation


def test_flash_only_for_half_precision_models(monkeypatch):
    """Rollouts run outside autocast, so an fp32 model on flash-attn would hand it fp32 tensors (which it rejects):
    ``auto`` keeps fp32 models on SDPA even where flash-attn is usable."""
    monkeypatch.setattr(attention, "HAS_FLASH", True)
    assert attn_implementation("cuda", "auto", torch.bfloat16) == "flash_attention_2"
    assert attn_implementation("cuda:1", "auto", torch.float16) == "flash_attention_2"
    assert attn_implementation("cuda", "auto", torch.float32) == "sdpa"
    assert attn_implementation("cpu", "auto", torch.bfloat16) == "sdpa"
    assert attn_implementation("cuda") == "sdpa"  # the default dtype is fp32
    with pytest.raises(ValueError, match="float16/bfloat16 model"):
        attn_implementation("cuda", "flash_attention_2", torch.float32)
    monkeypatch.setattr(attention, "HAS_FLASH", False)
    assert attn_implementation("cuda", "auto", torch.bfloat16) == "sdpa"
    with pytest.raises(ValueError, match="needs flash-attn"):
        attn_implementation("cuda", "flash_attention_2", torch.bfloat16)


def test_a_flash_attn_that_does_not_import_means_sdpa(tmp_path, monkeypatch):
    """A flash-attn wheel built for another torch is found by ``find_spec`` but fails at import (an undefined
    symbol): detection imports it, so it counts as absent and a model can still be built."""
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda')")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    ok, reason = attention._probe_flash()
    assert not ok and "does not import" in reason and "undefined symbol" in reason
    (pkg / "__init__.py").write_text("def flash_attn_func(): pass\ndef flash_attn_with_kvcache(): pass\n")
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    assert attention._probe_flash() == (True, "flash-attn imports")


def _interpreter_shim(monkeypatch):
    """Liger's kernels under the CPU interpreter (ENV-FACTS.md): the interpreter passes Python floats to a kernel
    unconverted (compiled Triton makes them fp32 scalars), and libdevice's ``rsqrt`` is None there."""
    import numpy as np
    from liger_kernel.ops import rms_norm
    from triton.runtime import interpreter

    cvt = interpreter._implicit_cvt

    def implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return cvt(arg)

    monkeypatch.setattr(interpreter, "_implicit_cvt", implicit_cvt)
    monkeypatch.setattr(rms_norm, "rsqrt", _rsqrt)


@triton.jit
def _rsqrt(x):
    return 1.0 / tl.sqrt(x)


@pytest.mark.skipif(not attention.HAS_LIGER, reason="liger-kernel is not installed")
def test_liger_is_scoped_to_the_model_it_patches(monkeypatch):
    """Liger on model A changes A's modules only: a model built before and one built after keep transformers' own
    RMSNorm/MLP/RoPE (and compute exactly what they did), transformers' module is untouched, and A computes the same
    function through Liger's kernels (fp32: within 1e-5)."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        if not attention_interpreting():
            pytest.skip("Liger's Triton kernels need CUDA or TRITON_INTERPRET=1 (tests/conftest.py)")
        _interpreter_shim(monkeypatch)
    originals = (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP, modeling_llama.apply_rotary_pos_emb,
                 modeling_llama.LlamaAttention.forward)
    conf = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    a = LlamaForCausalLM(conf).to(dev).eval()
    before = LlamaForCausalLM(conf).to(dev).eval()
    before.load_state_dict(a.state_dict())
    ids = torch.randint(0, 32, (2, 9), device=dev)
    with torch.no_grad():
        want = before.model(ids).last_hidden_state
    attention.liger_patch_model(a)
    after = LlamaForCausalLM(conf).to(dev).eval()
    after.load_state_dict(a.state_dict())
    assert (modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP, modeling_llama.apply_rotary_pos_emb,
            modeling_llama.LlamaAttention.forward) == originals
    assert a.model.norm.forward.__func__ is LigerRMSNorm.forward
    for layer in a.model.layers:
        assert layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward
        assert layer.input_layernorm.forward.__func__ is LigerRMSNorm.forward
        assert layer.self_attn.forward.__func__.__globals__["apply_rotary_pos_emb"] is liger_rotary_pos_emb
    for other in (before, after):
        assert type(other.model.norm) is modeling_llama.LlamaRMSNorm and "forward" not in vars(other.model.norm)
        for layer in other.model.layers:
            assert not {"forward"} & (vars(layer.mlp).keys() | vars(layer.self_attn).keys()
                                      | vars(layer.post_attention_layernorm).keys())
    with torch.no_grad():
        assert torch.equal(before.model(ids).last_hidden_state, want)
        assert torch.equal(after.model(ids).last_hidden_state, want)
        got = a.model(ids).last_hidden_state
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


def attention_interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def test_liger_is_refused_on_the_cpu():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attention.apply_liger(True, "cpu", [])
    assert attention.apply_liger(False, "cpu", []) is False
