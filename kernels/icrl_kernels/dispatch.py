"""The one dispatch point: Triton (CUDA tensors, or any tensors under ``TRITON_INTERPRET=1``) or the reference.

``HAS_TRITON`` is cheap feature detection at import. ``use_backend("reference" | "triton" | "auto")`` is the
explicit override (a context manager, also usable by tests); ``backend=`` on each call overrides both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ("auto", "triton", "reference")
_override = "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend inside a ``with`` block (``auto`` restores the automatic choice)."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    old, _override = _override, name
    try:
        yield
    finally:
        _override = old


#: The float dtypes every op of the package accepts (float64 always takes the torch reference).
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def debug_checks(*tensors: torch.Tensor) -> bool:
    """Whether to run the input checks that read tensor values (action ranges, ``seq_ids >= 0``): each is a
    device-to-host sync on CUDA, so there they are off unless ``ICRL_KERNELS_DEBUG=1``; on CPU tensors they cost
    nothing and are on unless ``ICRL_KERNELS_DEBUG=0``. Inside ``torch.compile`` they are off (a graph cannot
    read values: they would break it); the same call run eagerly checks."""
    if torch.compiler.is_compiling():
        return False
    flag = os.environ.get("ICRL_KERNELS_DEBUG", "")
    if flag:
        return flag != "0"
    return not any(t.is_cuda for t in tensors)


def select_backend(*tensors: torch.Tensor, backend: str | None = None) -> str:
    """``triton`` or ``reference`` for these tensors. ``auto`` picks Triton when it is installed and the tensors
    are on CUDA, or when ``TRITON_INTERPRET=1`` (the CPU interpreter); plain CPU tensors get the reference."""
    choice = backend or _override
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "reference":
        return "reference"
    on_cuda = all(t.is_cuda for t in tensors)
    runnable = HAS_TRITON and (on_cuda or interpreting())
    if choice == "triton":
        if not runnable:
            raise ValueError("backend='triton' needs triton and CUDA tensors (or TRITON_INTERPRET=1 set before "
                             "triton is imported); use backend='auto' to fall back to the reference")
        return "triton"
    return "triton" if runnable else "reference"
