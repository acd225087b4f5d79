"""Test-session setup. Environment variables must be set before triton or pygame is first imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in the interpreter on CPU (ENV-FACTS.md)
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame renders off-screen (FrozenLake rgb_array)
