"""Pure-torch reference of every icrl_kernels op: the CPU fallback and the test oracle (run it in float64).

``q_td_loss_reference`` computes exactly what the fused kernels compute, the plain way: it materialises the
``[N, V]`` next-state logits for a full-vocabulary argmax and lets autograd produce the gradients. Nothing here
reads a tensor's value on the host (no ``.item()``, ``int(t)``, ``torch.unique``): on CUDA a loss call queues its
work and returns without waiting for the GPU (tests/kernels/test_q_td_loss.py counts that).
"""

from __future__ import annotations

import torch

LOSSES = ("paper", "mse", "huber")
ARGMAX = ("actions", "vocab")
REDUCTIONS = ("mean", "sum", "none")


def sequence_index(seq_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense sequence indices ``int64 [N]`` (``0 .. S-1`` in increasing ``seq_ids`` order) and the number of
    sequences ``S`` as a 0-d int64 tensor -- without a device-to-host sync (a sort and a cumsum instead of
    ``seq_ids.max()`` or ``torch.unique``, whose output sizes the host would have to read)."""
    n = seq_ids.numel()
    ids = seq_ids.reshape(-1).to(torch.int64)
    order = torch.argsort(ids, stable=True)
    ordered = ids[order]
    first = torch.ones(n, dtype=torch.int64, device=ids.device)
    first[1:] = (ordered[1:] != ordered[:-1]).to(torch.int64)
    dense = torch.empty_like(ids)
    dense[order] = torch.cumsum(first, 0) - 1
    return dense, first.sum()


def sequence_mean(values: torch.Tensor, seq_ids: torch.Tensor, index=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean of ``values [N]`` broadcast back to ``[N]``, and the count of each row's sequence
    (``values``' dtype). No device-to-host sync: sequences are summed in an ``[N]`` buffer by dense index
    (``index``: ``sequence_index(seq_ids)`` when the caller already has it)."""
    dense, _ = sequence_index(seq_ids) if index is None else index
    n = values.shape[0]
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, dense, values)
    counts = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, dense, torch.ones_like(values))
    return (sums / counts.clamp_min(1))[dense], counts[dense]


def safe_denominator(mean_y: torch.Tensor, eps: float) -> torch.Tensor:
    """``mean(y)`` of a sequence with its magnitude kept >= ``eps`` (sign kept; 0 counts as positive)."""
    sign = torch.where(mean_y < 0, -1.0, 1.0).to(mean_y.dtype)
    return sign * mean_y.abs().clamp_min(eps)


def elementwise_loss(diff: torch.Tensor, denom: torch.Tensor | None, loss: str, huber_delta: float) -> torch.Tensor:
    """Per-transition loss of ``diff = q - y``."""
    if loss == "paper":
        return (diff / denom) ** 2
    if loss == "mse":
        return diff ** 2
    a = diff.abs()
    return torch.where(a <= huber_delta, 0.5 * diff ** 2, huber_delta * (a - 0.5 * huber_delta))


def reduce_loss(per_row: torch.Tensor, seq_ids: torch.Tensor, loss: str, reduction: str, index=None) -> torch.Tensor:
    """``none``: ``[N]``; ``sum``: the sum; ``mean``: mean over rows, or for the paper's loss the mean over
    sequences of each sequence's mean (arXiv 2501.14176: a loss per sequence, averaged over the batch)."""
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if loss != "paper":
        return per_row.mean()
    index = sequence_index(seq_ids) if index is None else index
    _, counts = sequence_mean(per_row.detach(), seq_ids, index)
    return (per_row / counts).sum() / index[1].to(per_row.dtype)  # S is a tensor: dividing by it needs no sync


def q_td_loss_reference(hidden, weight, next_hidden, next_target_hidden, actions, rewards, dones, seq_ids, *,
                        action_ids=None, target_weight=None, gamma: float = 0.9, reward_scale: float = 30.0,
                        argmax: str = "actions", loss: str = "paper", huber_delta: float = 1.0,
                        reduction: str = "mean", norm_eps: float = 1e-6, return_parts: bool = False,
                        discounts=None):
    """Double-DQN TD loss from hidden states (see ``icrl_kernels.q_td_loss`` for the contract). ``discounts``
    (float ``[N]``): each transition's discount of the next Q, in place of ``gamma * (1 - done)``.

    With ``return_parts=True`` also returns ``{"q", "y", "next_action"}`` (next_action: vocabulary index in
    ``vocab`` mode, action index in ``actions`` mode).
    """
    target_weight = weight if target_weight is None else target_weight
    rows = weight if action_ids is None else weight[action_ids]  # [A, d]: the action rows of the head
    q = (hidden * rows[actions]).sum(-1)
    with torch.no_grad():
        if argmax == "vocab":
            next_action = (next_hidden @ weight.T).argmax(-1)  # [N, V] logits: what the fused kernel avoids
            tgt_rows = target_weight[next_action]
        else:
            next_action = (next_hidden @ rows.T).argmax(-1)
            tgt_rows = (target_weight if action_ids is None else target_weight[action_ids])[next_action]
        q_next = (next_target_hidden * tgt_rows).sum(-1)
        discount = gamma * (1.0 - dones.to(q_next.dtype)) if discounts is None else discounts.to(q_next.dtype)
        y = rewards * reward_scale + discount * q_next
        denom = safe_denominator(sequence_mean(y, seq_ids)[0], norm_eps) if loss == "paper" else None
    out = reduce_loss(elementwise_loss(q - y, denom, loss, huber_delta), seq_ids, loss, reduction)
    if return_parts:
        return out, {"q": q.detach(), "y": y, "next_action": next_action}
    return out
