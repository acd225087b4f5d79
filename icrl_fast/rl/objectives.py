"""Training objectives on the one Q head (the LM-head logits of the action tokens), weighted and logged apart.

* ``td`` -- the paper's Double DQN (``icrl_fast.rl.dqn.dqn_loss``, through ``icrl_kernels``);
* ``imitation`` -- cross-entropy of the action logits at every decision to the context teacher's choice (soft over
  its ties), also where a random action was executed (DAgger-style relabelling); needs the batch's ``label``;
* ``observation`` -- next-token cross-entropy over the vocabulary on what the environment answered (the tokens after
  each action up to the next decision: ``outcome_mask``): an in-context world model, which builds the circuits that
  look up earlier occurrences of the same state.

One forward of the online network serves every objective; the target network runs only when ``td`` is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from icrl_fast.rl.dqn import DQNConfig, dqn_loss

OBJECTIVES = ("td", "imitation", "observation")


@dataclass
class ObjectiveConfig:
    """Weights of the objectives (0 turns one off)."""

    td: float = field(default=1.0, metadata={"help": "weight of the Double-DQN TD loss (the paper's objective)"})
    imitation: float = field(default=0.0, metadata={"help": "weight of the cross-entropy to the teacher's choice "
                                                            "(needs a source with labels: --mode protocol)"})
    observation: float = field(default=0.0, metadata={"help": "weight of the next-token loss on the environment's "
                                                              "answers (needs --mode protocol)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the imitation target"})

    def validate(self) -> None:
        weights = [self.td, self.imitation, self.observation]
        if min(weights) < 0 or max(weights) <= 0:
            raise ValueError(f"objective weights must be >= 0 with one > 0, got td={self.td}, imitation="
                             f"{self.imitation}, observation={self.observation}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def choice_probs(label: torch.Tensor) -> torch.Tensor:
    """``[T, 4]`` float32: uniform over the set bits of each uint8 choice mask ``label [T]``."""
    bits = ((label.long()[:, None] >> torch.arange(4, device=label.device)) & 1).float()
    return bits / bits.sum(-1, keepdim=True).clamp(min=1.0)


def imitation_loss(q: torch.Tensor, label: torch.Tensor, smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft cross-entropy of action logits ``q [T, 4]`` to choice masks ``label [T]``; returns ``(loss, agreement)``
    where agreement is the fraction of decisions whose argmax is one of the teacher's choices."""
    target = choice_probs(label)
    if smoothing:
        target = target * (1.0 - smoothing) + smoothing / 4.0
    loss = -(target * F.log_softmax(q.float(), -1)).sum(-1).mean()
    with torch.no_grad():
        agree = target.gather(1, q.argmax(-1, keepdim=True)).squeeze(1) > smoothing / 4.0
    return loss, agree.float().mean()


def observation_loss(qnet, hidden: torch.Tensor, input_ids: torch.Tensor, outcome_mask: torch.Tensor,
                     blocks: tuple | None = None, action: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy (the online LM head) at ``outcome_mask`` positions ``[B, L]``: over the full
    vocabulary, or, with ``blocks = (first [4], size)`` (the step format's landing blocks), over the ``size`` ids from
    ``first[a]`` where ``a = action[position]``: the environment's answer to the action taken, given that action.

    With blocks only those logits are computed: positions are grouped by action and each group meets its own
    ``size`` rows of the head (a quarter of the step format's vocabulary per position instead of all of it)."""
    rows, pos = outcome_mask.nonzero(as_tuple=True)
    if rows.numel() == 0:  # nothing to predict: zero, still part of the graph
        return hidden.sum() * 0.0
    h = hidden[rows, pos].float()
    target = input_ids[rows, pos + 1].long()
    weight = qnet.head_weight()
    if blocks is None:
        return F.cross_entropy(h @ weight.float().T, target)
    first, size = blocks
    taken = action[rows, pos].long()
    total = h.new_zeros(())
    for a in range(len(first)):
        group = (taken == a).nonzero(as_tuple=True)[0]
        if len(group):
            start = int(first[a])
            logits = h[group] @ weight[start: start + size].float().T
            total = total + F.cross_entropy(logits, target[group] - start, reduction="sum")
    return total / len(taken)


class Objectives(torch.nn.Module):
    """The weighted sum of the objectives over one batch; a module over the Q-network so DDP can wrap it.

    ``forward(batch)`` returns ``(loss, stats)``: stats hold each part as ``losses/<name>`` (unweighted), the TD
    statistics (``q``, ``target``, ``cql``) and ``charts/agreement`` with the teacher, as detached 0-d tensors.
    On a source's batch (padded transitions, memory features) the ``td`` part reads nothing back from the device;
    ``imitation`` (boolean indexing) and ``observation`` (``nonzero``) still do."""

    def __init__(self, qnet, cfg: ObjectiveConfig, dqn: DQNConfig, td_fn=None, landing_block=None):
        """``landing_block``: the step format's (``StepFormat.landing_block``): the observation loss then predicts
        the answer among the action's landing tokens."""
        super().__init__()
        cfg.validate()
        self.qnet, self.cfg, self.dqn = qnet, cfg, dqn
        self.td_fn = td_fn or dqn_loss
        self.blocks = None
        if landing_block is not None:
            first, size = landing_block(np.arange(4))
            self.blocks = (tuple(int(f) for f in first), int(size))  # host ints: the head is sliced by Python ints

    def forward(self, batch: dict[str, torch.Tensor]):
        cfg, ids = self.cfg, batch["input_ids"]
        need = [name for name in ("imitation", "observation") if getattr(cfg, name) > 0]
        for name, key in (("imitation", "label"), ("observation", "outcome_mask")):
            if name in need and key not in batch:
                raise ValueError(f"the {name} objective needs '{key}' in the batch: train on a source that provides "
                                 f"it (--mode protocol)")
        hidden = self.qnet.hidden(ids, memory=batch.get("memory"))  # the source's memory features, if any
        total = hidden.new_zeros((), dtype=torch.float32)
        stats: dict[str, torch.Tensor] = {}
        if cfg.td > 0:
            td, td_stats = self.td_fn(self.qnet, batch, self.dqn, hidden=hidden)
            total = total + cfg.td * td
            stats |= {"losses/td": td.detach(), **{k: v for k, v in td_stats.items()}}
        if cfg.imitation > 0:
            mask = batch["decision_mask"]
            q = self.qnet.q_values(hidden[mask])
            im, agree = imitation_loss(q, batch["label"][mask], cfg.label_smoothing)
            total = total + cfg.imitation * im
            stats |= {"losses/imitation": im.detach(), "charts/agreement": agree}
        if cfg.observation > 0:
            ob = observation_loss(self.qnet, hidden, ids, batch["outcome_mask"], self.blocks, batch.get("action"))
            total = total + cfg.observation * ob
            stats["losses/observation"] = ob.detach()
        return total, stats
