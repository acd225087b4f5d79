"""icrl_kernels: fused Triton kernels for in-context RL, importable by any project (torch + triton only).

``q_td_loss`` / ``QTDLoss``: Q readout at decision points + Double-DQN TD loss from final hidden states, forward
and backward, without materialising ``[N, V]`` logits (see ``q_td_loss.py`` and README.md in this folder).
``q_td_loss_reference``: the pure-torch oracle and CPU fallback. ``use_backend`` / ``select_backend``: the one
dispatch point. ``ragged_decode_attention``: decode-step attention over a static KV cache that reads each row's slots
only up to its own length (see ``decode_attention.py``), with ``ragged_decode_attention_reference``. This package
never imports ``icrl_fast``.
"""

from .decode_attention import ragged_decode_attention, ragged_decode_attention_reference
from .dispatch import HAS_TRITON, select_backend, use_backend
from .q_td_loss import QTDLoss, q_td_loss
from .reference import q_td_loss_reference

__version__ = "0.1.0"
__all__ = ["HAS_TRITON", "QTDLoss", "q_td_loss", "q_td_loss_reference", "select_backend", "use_backend"]
__all__ += ["ragged_decode_attention", "ragged_decode_attention_reference"]
