"""The one attention dispatch point: flash-attn when importable on CUDA, PyTorch SDPA otherwise (or ``eager``).

Also the explicit, opt-in Liger patch (RMSNorm, RoPE, SwiGLU) for Llama on CUDA. Nothing is patched on import.
"""

from __future__ import annotations

import importlib.util

HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")


def attn_implementation(device: str, requested: str = "auto") -> str:
    """The transformers ``attn_implementation`` for ``device``: ``auto`` -> flash-attn 2 on CUDA when it is
    installed, else SDPA. An explicit ``flash_attention_2`` without flash-attn or CUDA is a ``ValueError``."""
    if requested not in CHOICES:
        raise ValueError(f"attention must be one of {CHOICES}, got {requested!r}")
    cuda = str(device).startswith("cuda")
    if requested == "auto":
        return "flash_attention_2" if (HAS_FLASH and cuda) else "sdpa"
    if requested == "flash_attention_2" and not (HAS_FLASH and cuda):
        raise ValueError("attention='flash_attention_2' needs the flash-attn package and a CUDA device; "
                         "use 'auto' to fall back to PyTorch SDPA")
    return requested


def apply_liger(enabled: bool, device: str) -> bool:
    """Patch transformers' Llama with Liger's RMSNorm, RoPE and SwiGLU kernels when asked; returns whether it did.

    Only on CUDA (Liger's Triton kernels do not run on the CPU); asking for it elsewhere is a ``ValueError``.
    """
    if not enabled:
        return False
    if not str(device).startswith("cuda") or not HAS_LIGER:
        raise ValueError("liger=True needs a CUDA device and the liger-kernel package; leave it off on the CPU")
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False)
    return True
