"""icrl_kernels: standalone fused Triton kernels for in-context RL (Q-head + TD loss), torch + triton only.

This package never imports ``icrl_fast`` (a test enforces it), so other projects can depend on it alone.
Each op will ship as ``reference.py`` (pure torch: the CPU fallback and the test oracle) plus ``<op>.py``
(Triton kernels, launchers, autograd Function, functional API, nn.Module) behind one dispatch point; see
README.md in this folder for what is here and what is planned.
"""

__version__ = "0.1.0"
