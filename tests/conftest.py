"""Test-session setup. Environment variables must be set before triton or pygame is first imported."""

import os

import torch  # importing torch does not import triton (checked by tests/kernels/test_triton_env.py)


def triton_env(environ, cuda_available: bool) -> None:
    """Run Triton kernels in the CPU interpreter only where there is no GPU (ENV-FACTS.md): on a CUDA machine the
    kernels must be compiled, since the interpreter on CUDA tensors is slow and computes bf16 ``tl.dot`` wrongly.
    An explicit ``TRITON_INTERPRET`` in ``environ`` is kept either way."""
    if not cuda_available:
        environ.setdefault("TRITON_INTERPRET", "1")


triton_env(os.environ, torch.cuda.is_available())
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame renders off-screen (FrozenLake rgb_array)
