"""The one attention dispatch point: flash-attn for fp16/bf16 models on CUDA when it imports, PyTorch SDPA otherwise
(or ``eager``).

Also the rollout's KV-cache attention (``KVCACHE``: flash-attn's ``flash_attn_with_kvcache`` with per-context
``cache_seqlens``, its pure-torch reference where flash-attn is absent) and the explicit, opt-in Liger kernels
(RMSNorm, RoPE, SwiGLU) for a Llama on CUDA, scoped to the model they are applied to. Nothing is patched on import.
"""

from __future__ import annotations

import importlib.util
import inspect
import types

import torch


def _probe_flash() -> tuple[bool, str]:
    """Whether flash-attn is usable, and why (not): a real import, since a flash-attn wheel built for another torch
    is found by ``find_spec`` but fails to load (an undefined symbol); that must mean SDPA, not a crash when a model
    is built. The import only happens when the package is installed."""
    if importlib.util.find_spec("flash_attn") is None:
        return False, "flash-attn is not installed"
    try:
        from flash_attn import flash_attn_func, flash_attn_with_kvcache  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, OSError (undefined symbol), RuntimeError: all mean "absent"
        return False, f"flash-attn is installed but does not import ({type(e).__name__}: {str(e)[:160]})"
    return True, "flash-attn imports"


HAS_FLASH, FLASH_REASON = _probe_flash()
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")
FLASH_DTYPES = (torch.float16, torch.bfloat16)  # flash-attn's kernels take these only (an fp32 input raises)
KVCACHE = "icrl_kvcache"  # the rollout's flash path as a transformers attention implementation (a name with
# "flash" in it would make transformers look for a flash-attn build of that name)


def attn_implementation(device: str, requested: str = "auto", dtype: torch.dtype = torch.float32) -> str:
    """The transformers ``attn_implementation`` for a model of ``dtype`` on ``device``: ``auto`` -> flash-attn 2
    for an fp16/bf16 model on CUDA when flash-attn imports, else SDPA (an fp32 model always gets SDPA: rollouts run
    outside autocast, so flash-attn would see fp32 tensors). An explicit ``flash_attention_2`` that cannot run
    (no flash-attn, no CUDA, or fp32) is a ``ValueError``."""
    if requested not in CHOICES:
        raise ValueError(f"attention must be one of {CHOICES}, got {requested!r}")
    usable = HAS_FLASH and str(device).startswith("cuda") and dtype in FLASH_DTYPES
    if requested == "auto":
        return "flash_attention_2" if usable else "sdpa"
    if requested == "flash_attention_2" and not usable:
        raise ValueError(f"attention='flash_attention_2' needs flash-attn ({FLASH_REASON}), a CUDA device (got "
                         f"{device}) and a float16/bfloat16 model (got {dtype}); use 'auto' to fall back to SDPA")
    return requested


def apply_liger(enabled: bool, device: str, models=()) -> bool:
    """Liger's RMSNorm, RoPE and SwiGLU kernels on ``models`` (transformers Llama models, or their ``LlamaModel``
    backbones) when asked; returns whether it did. Scoped: only these models' modules change
    (``liger_patch_model``); transformers' classes and any other model stay as they are.

    Only on CUDA (Liger's Triton kernels do not run on the CPU); asking for it elsewhere is a ``ValueError``.
    """
    if not enabled:
        return False
    if not str(device).startswith("cuda") or not HAS_LIGER:
        raise ValueError("liger=True needs a CUDA device and the liger-kernel package; leave it off on the CPU")
    for model in models:
        liger_patch_model(model)
    return True


def _with_global(fn, name: str, value):
    """A copy of the plain function under ``fn``'s decorators whose global ``name`` is ``value`` (the module's own
    globals are untouched)."""
    inner = inspect.unwrap(fn)
    if name not in inner.__code__.co_names:
        raise ValueError(f"{inner.__qualname__} does not use {name}: this transformers version needs another patch")
    scope = dict(inner.__globals__)
    scope[name] = value
    out = types.FunctionType(inner.__code__, scope, inner.__name__, inner.__defaults__, inner.__closure__)
    out.__kwdefaults__, out.__qualname__ = inner.__kwdefaults__, inner.__qualname__
    return out


def liger_patch_model(model) -> None:
    """Liger RMSNorm, RoPE and SwiGLU on this Llama's modules only (what ``apply_liger_kernel_to_llama(model=...)``
    does to an instance, without its module-wide replacements of ``LlamaRMSNorm``, ``LlamaMLP`` and
    ``apply_rotary_pos_emb``, which would reach every Llama built afterwards): each norm and MLP gets Liger's
    ``forward`` bound to it, and each attention layer a ``forward`` whose ``apply_rotary_pos_emb`` is Liger's."""
    from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module, _patch_swiglu_module
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    base = getattr(model, "model", model)  # LlamaForCausalLM -> LlamaModel
    if not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise ValueError(f"liger: expected a transformers Llama model or its LlamaModel, got {type(model).__name__}")
    _patch_rms_norm_module(base.norm)
    for layer in base.layers:
        _patch_swiglu_module(layer.mlp, LigerSwiGLUMLP)
        _patch_rms_norm_module(layer.input_layernorm)
        _patch_rms_norm_module(layer.post_attention_layernorm)
        attn = layer.self_attn
        attn.forward = types.MethodType(_with_global(type(attn).forward, "apply_rotary_pos_emb",
                                                     liger_rotary_pos_emb), attn)


def flash_attn_with_kvcache_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *,
                                      cache_seqlens: torch.Tensor, softmax_scale: float | None = None,
                                      causal: bool = True) -> torch.Tensor:
    """Pure-torch ``flash_attn.flash_attn_with_kvcache`` for the arguments the rollout uses (no new k/v, no rotary,
    no paging, no window): the CPU fallback and the oracle of the flash path.

    ``q [B, Sq, H, D]``; ``k_cache``, ``v_cache [B, Sk, Hk, D]`` (``H`` a multiple of ``Hk``: grouped-query
    attention); ``cache_seqlens int [B]``: context ``b`` uses keys ``0 .. cache_seqlens[b] - 1``. ``causal``
    aligns the mask to the bottom right, as flash-attn does: query ``i`` sees keys ``j <= cache_seqlens[b] - Sq + i``.
    A query that sees no key gets zeros. Returns ``[B, Sq, H, D]`` in ``q``'s dtype (computed in fp32).
    """
    b, sq, h, d = q.shape
    sk, hk = k_cache.shape[1], k_cache.shape[2]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    k = k_cache.float().repeat_interleave(h // hk, dim=2)
    v = v_cache.float().repeat_interleave(h // hk, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) * scale
    j = torch.arange(sk, device=q.device)
    seqlens = cache_seqlens.to(q.device, torch.long)
    ok = j[None, None, :] < seqlens[:, None, None]  # [B, 1, Sk]
    if causal:
        i = torch.arange(sq, device=q.device)
        ok = ok & (j[None, None, :] <= (seqlens[:, None] - sq + i[None, :])[:, :, None])  # [B, Sq, Sk]
    ok = ok.expand(b, sq, sk)[:, None]
    probs = torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v).to(q.dtype)


def _with_kvcache():
    if HAS_FLASH:
        from flash_attn import flash_attn_with_kvcache

        return flash_attn_with_kvcache
    return flash_attn_with_kvcache_reference


def kvcache_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask=None,
                      scaling: float | None = None, dropout: float = 0.0, cache_seqlens: torch.Tensor | None = None,
                      **kwargs):
    """The ``KVCACHE`` attention implementation (a transformers attention function) over a ``RolloutCache``.

    ``query [B, H, S, D]`` is a left-padded block whose real tokens were just written to the cache;
    ``key``/``value [B, Hk, 1 + C, D]`` are the cache's buffers as its layers return them: slot 0 is the padding
    slot, slot ``1 + p`` holds position ``p`` (``window=None``, so positions are contiguous). ``cache_seqlens
    int32 [B]`` are the lengths *after* this block. flash-attn's bottom-right causal alignment then gives query
    column ``S - n_b + i`` (new token ``i`` of context ``b``) exactly the keys ``0 .. len_b - n_b + i``; padding
    columns get earlier keys or none, and are never read. No mask is built: the cost is O(context) per query with
    no ``[B, S, C]`` mask. Returns ``[B, S, H, D]`` and no weights, like transformers' other implementations.
    """
    if cache_seqlens is None:
        raise ValueError(f"the {KVCACHE} attention needs cache_seqlens (a RolloutCache in seqlens mode)")
    out = _with_kvcache()(query.transpose(1, 2), key.transpose(1, 2)[:, 1:], value.transpose(1, 2)[:, 1:],
                          cache_seqlens=cache_seqlens, softmax_scale=scaling, causal=True)
    return out, None


def register_kvcache_attention() -> str:
    """Make ``KVCACHE`` a transformers attention implementation (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(KVCACHE, kvcache_attention)
    return KVCACHE


def rollout_attention(impl: str | None, window: int | None) -> str | None:
    """The attention implementation a rollout runs under, for a model on ``impl``: flash-attn 2 models use
    ``KVCACHE`` (per-context ``cache_seqlens``) without a window and SDPA with one (a ring buffer's positions are
    not contiguous, which flash-attn's kv-cache kernel needs); every other model keeps its own (None: no switch)."""
    if impl != "flash_attention_2":
        return None
    return register_kvcache_attention() if window is None else "sdpa"
