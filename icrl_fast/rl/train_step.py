"""One optimizer step of the trainer, with static shapes and no host sync: what ``icrl_fast.train`` runs each step.

``train_step`` = ``forward_backward`` over the step's micro-batches (the weighted objectives, backward; DDP averages
gradients on the last one) -> gradient-norm clip -> AdamW -> the learning-rate schedule -> the Polyak update of the
target network -> the NaN/inf watch. Its batches are already tensors on the device, carrying what a step would
otherwise compute from device values on the host (the source's padded transitions and same-state memory features,
``icrl_fast.rl.sources``): so nothing in it reads a device value (``tests/rl/test_train_step_sync.py`` runs it under
``icrl_fast.sync_guard.no_host_sync``, and compiles ``forward_backward``'s loss with ``fullgraph=True``). It returns
the loss and the stats as detached device tensors; the trainer reads them, and the watch, once per logged step.

Exceptions the guard knows of, outside the default step: ``icrl_kernels.q_td_loss`` checks action and sequence ids
by reading them on CPU tensors (its ``ICRL_KERNELS_DEBUG`` default; off on CUDA), and the ``imitation`` and
``observation`` objectives select their positions by boolean indexing and ``nonzero``.
"""

from __future__ import annotations

import contextlib

import torch


def make_optimizer(params, lr: float, weight_decay: float, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over ``params``: fused (one kernel per dtype, the step count read on the device) when ``fused``, by
    default where the parameters are on CUDA; else foreach, which on the CPU gives the weights the per-tensor AdamW
    gave, bit for bit (tested; the CPU's fused kernel differs in the last bits). The foreach step reads each step
    count with ``.item()`` from a CPU tensor: no device sync, but ``no_host_sync`` refuses it, so the guard test
    runs the fused one, the GPU trainer's."""
    params = list(params)
    if fused is None:
        fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None, foreach=not fused or None)


class FiniteWatch:
    """The NaN/inf guard, kept on the device: ``observe(loss)`` each step (no sync) records the first step whose loss
    was not finite and that loss; the trainer reads ``values()`` with its logged step's one read (and before every
    checkpoint), so a divergence stops the run up to ``log_every`` steps after it happened, before anything after it
    is saved. ``step``: the optimizer steps done before the first ``observe`` (a resumed run's)."""

    def __init__(self, step: int, device):
        self.step = torch.tensor(step, dtype=torch.int64, device=device)  # one host-to-device copy, at setup
        self.bad_step = torch.zeros((), dtype=torch.int64, device=device)  # 0: every loss so far was finite
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)

    def observe(self, loss: torch.Tensor) -> None:
        """Count a step (1-based) and keep it, with ``loss``, if it is the first whose loss is not finite."""
        self.step += 1
        new = (self.bad_step == 0) & ~torch.isfinite(loss)
        self.bad_step = torch.where(new, self.step, self.bad_step)
        self.bad_loss = torch.where(new, loss.detach().float(), self.bad_loss)

    def values(self) -> list[torch.Tensor]:
        """``[bad_step, bad_loss]`` as 0-d float64 tensors (``bad_step`` 0: none), to be read with other values."""
        return [self.bad_step.double(), self.bad_loss.double()]


def forward_backward(objective, batches: list[dict[str, torch.Tensor]], *, ddp: bool = False, autocast=None):
    """The objective's loss on each micro-batch of ``batches``, backward with ``1 / len(batches)`` of it (gradients
    accumulate; under ``ddp`` they are averaged over the processes on the last micro-batch only). Returns the last
    micro-batch's ``(loss, stats)``, detached."""
    for micro, batch in enumerate(batches):
        last = micro == len(batches) - 1
        with objective.no_sync() if ddp and not last else contextlib.nullcontext():
            with autocast or contextlib.nullcontext():
                loss, stats = objective(batch)
            (loss / len(batches)).backward()
    return loss.detach(), {k: v.detach() for k, v in stats.items()}


def train_step(objective, optimizer: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]], *, params,
               clip: float = 0.0, scheduler=None, qnet=None, tau: float = 1.0, ddp: bool = False, autocast=None,
               watch: FiniteWatch | None = None):
    """One optimizer step on ``batches`` (the step's micro-batches, tensors on the device): zero the gradients,
    ``forward_backward``, clip the gradient norm of ``params`` to ``clip`` (0: off; the norm is not read),
    ``optimizer.step()``, ``scheduler.step()``, ``qnet.polyak_update(tau)`` and ``watch.observe(loss)``.

    Returns ``(loss, stats)`` of the last micro-batch as detached device tensors. Nothing here reads a device
    value on the host, so a diverged loss is found by the ``watch``, later: the step itself goes on with it."""
    optimizer.zero_grad(set_to_none=True)
    loss, stats = forward_backward(objective, batches, ddp=ddp, autocast=autocast)
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if qnet is not None:
        qnet.polyak_update(tau)
    if watch is not None:
        watch.observe(loss)
    return loss, stats
