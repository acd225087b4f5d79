"""The ``td`` objective: Double DQN over multi-episode contexts (arXiv 2501.14176, DESIGN.md §1), through
``icrl_kernels``, on a batch from any context source (offline slices, protocol contexts, the online replay).

Transitions pair consecutive decision points of one slice: ``done`` when the two belong to different episodes
(no bootstrap across an episode end; with ``gamma_episode`` > 0 the target bootstraps there too, from the next
episode's first decision, discounted by ``gamma_episode``), reward = the episode's return on an episode's last action (scaled by
``reward_scale`` inside the loss), and the last decision of a slice has no target and is dropped. The loss is
``icrl_kernels.q_td_loss`` on the final hidden states and the LM head, so no ``[N, V]`` logits are held.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from icrl_kernels import q_td_loss


@dataclass
class DQNConfig:
    """The TD objective."""

    gamma: float = field(default=0.9, metadata={"help": "discount (paper: 0.9)"})
    gamma_episode: float = field(default=0.0, metadata={"help": "discount of the next episode's first decision at an "
                                                                "episode end (a target that bootstraps across episodes "
                                                                "of one context, so what an episode learns is worth "
                                                                "something to the next); 0 = no bootstrap across "
                                                                "episode ends (the paper)"})
    reward_scale: float = field(default=30.0, metadata={"help": "reward multiplier (paper: 30)"})
    tau: float = field(default=0.1, metadata={"help": "Polyak factor of the target update (paper: 0.1); 1: no "
                                                      "target network (the online one, whose forward is then reused)"})
    argmax: str = field(default="actions", metadata={"help": "Double-DQN argmax over the 'actions' or the 'vocab' "
                                                             "(the paper's code)"})
    loss: str = field(default="paper", metadata={"help": "paper (per-sequence target-normalised), mse or huber"})
    huber_delta: float = field(default=1.0, metadata={"help": "Huber threshold"})
    cql: float = field(default=0.0, metadata={"help": "weight of a conservative term (CQL(H) over the action "
                                                      "tokens) that pushes down actions the data did not take; "
                                                      "0 = the paper's loss; logged as losses/cql, and "
                                                      "losses/td is then the sum"})
    cql_on: str = field(default="all", metadata={"help": "decisions the conservative term covers: 'all', or "
                                                         "'success' (only those of episodes that reached the goal: "
                                                         "the data's action is pushed up where it led to the goal)"})

    def validate(self) -> None:
        if not 0.0 <= self.gamma_episode <= 1.0:
            raise ValueError(f"--dqn.gamma_episode must be in [0, 1], got {self.gamma_episode}")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 < self.tau <= 1.0:
            raise ValueError(f"need 0 <= gamma <= 1 and 0 < tau <= 1, got gamma={self.gamma}, tau={self.tau}")
        if self.argmax not in ("actions", "vocab") or self.loss not in ("paper", "mse", "huber"):
            raise ValueError(f"argmax must be actions|vocab and loss paper|mse|huber, got {self.argmax}, {self.loss}")
        if not self.cql >= 0.0:
            raise ValueError(f"cql must be >= 0, got {self.cql}")
        if self.cql_on not in ("all", "success"):
            raise ValueError(f"cql_on must be all|success, got {self.cql_on!r}")


def transitions(decision_mask: torch.Tensor, action: torch.Tensor, episode_id: torch.Tensor,
                episode_return: torch.Tensor) -> dict[str, torch.Tensor]:
    """Transitions of a batch of slices ``[B, L]`` (the token contract of ``icrl_fast.data``).

    Returns flat tensors over the T transitions: ``row``, ``pos``, ``next_pos`` (int64), ``action`` (int64),
    ``reward`` (float32: the episode return on an episode's last action, else 0), ``done`` (bool),
    ``seq_id`` (= row, for the per-sequence normalisation) and ``success`` (bool: the decision's episode reached
    the goal).
    """
    rows, pos = decision_mask.nonzero(as_tuple=True)  # row-major: decisions of a row are consecutive and ordered
    same_row = rows[1:] == rows[:-1]  # pair decision k with k + 1 of the same slice; a row's last one has no target
    cur = torch.nonzero(same_row, as_tuple=True)[0]
    nxt = cur + 1
    r, p, pn = rows[cur], pos[cur], pos[nxt]
    done = episode_id[r, p] != episode_id[r, pn]
    reward = torch.where(done, episode_return[r, p].float(), torch.zeros((), dtype=torch.float32))
    return {"row": r, "pos": p, "next_pos": pn, "action": action[r, p].long(), "reward": reward, "done": done,
            "seq_id": r, "success": episode_return[r, p] > 0}


def dqn_loss(qnet, batch: dict[str, torch.Tensor], cfg: DQNConfig, backend: str | None = None,
             hidden: torch.Tensor | None = None):
    """TD loss of one batch of slices; returns ``(loss, stats)`` with stats as detached scalars. ``hidden``: the
    online network's final hidden states of ``batch["input_ids"]`` when the caller already has them (shared with
    other objectives)."""
    tr = transitions(batch["decision_mask"], batch["action"], batch["episode_id"], batch["episode_return"])
    if tr["row"].numel() == 0:
        raise ValueError("the batch has no transition (no two decisions in one slice): use longer slices")
    ids = batch["input_ids"]
    h_all = qnet.hidden(ids) if hidden is None else hidden
    # tau 1 copies the online network into the target after every update, so at this forward the two are equal: the
    # online forward, detached, is the target's (a quarter of a training step saved; same loss, tested).
    same = cfg.tau == 1.0
    with torch.no_grad():
        ht_all = h_all.detach() if same else qnet.hidden(ids, target=True)
    r, p, pn = tr["row"], tr["pos"], tr["next_pos"]
    hidden, next_hidden, next_target = h_all[r, p], h_all[r, pn].detach(), ht_all[r, pn].to(h_all.dtype)
    # across an episode end the target bootstraps with gamma_episode (0: not at all, the paper's rule)
    discounts = None if cfg.gamma_episode == 0 else torch.where(tr["done"], cfg.gamma_episode, cfg.gamma).float()
    weight = qnet.head_weight()
    target_weight = weight.detach() if same else qnet.head_weight(target=True).to(weight.dtype)
    loss = q_td_loss(hidden.contiguous(), weight, next_hidden.contiguous(), next_target.contiguous(), tr["action"],
                     tr["reward"], tr["done"], tr["seq_id"], action_ids=qnet.action_ids, target_weight=target_weight,
                     gamma=cfg.gamma, reward_scale=cfg.reward_scale, argmax=cfg.argmax, loss=cfg.loss,
                     huber_delta=cfg.huber_delta, backend=backend, discounts=discounts)
    stats = {}
    if cfg.cql > 0:
        q_all = qnet.q_values(hidden)  # [T, A] fp32: tiny, outside the fused kernel
        gaps = torch.logsumexp(q_all, -1) - q_all.gather(1, tr["action"][:, None]).squeeze(1)
        covered = tr["success"] if cfg.cql_on == "success" else torch.ones_like(tr["success"])
        gap = (gaps * covered).sum() / covered.sum().clamp(min=1)  # 0 when no covered decision is in the batch
        loss = loss + cfg.cql * gap
        stats["cql"] = gap.detach()
    with torch.no_grad():
        rows = weight[qnet.action_ids].float()
        q = (hidden.float() * rows[tr["action"]]).sum(-1)
        stats |= {"q": q.mean(), "transitions": torch.tensor(float(r.numel())), "done_frac": tr["done"].float().mean()}
        if cfg.argmax == "actions":  # the vocab-mode target would need the [N, V] logits the kernel avoids
            best = (next_hidden.float() @ rows.T).argmax(-1)
            q_next = (next_target.float() * target_weight[qnet.action_ids].float()[best]).sum(-1)
            discount = cfg.gamma * (~tr["done"]).float() if discounts is None else discounts
            stats["target"] = (tr["reward"] * cfg.reward_scale + discount * q_next).mean()
    return loss, stats


class DQNObjective(torch.nn.Module):
    """``dqn_loss`` as a module over the Q-network, so ``DistributedDataParallel`` can wrap it: every trainable
    parameter (the LM head included, which the fused loss reads directly) is used inside ``forward``."""

    def __init__(self, qnet, cfg: DQNConfig, loss_fn=None):
        super().__init__()
        self.qnet, self.cfg = qnet, cfg
        self.loss_fn = loss_fn or dqn_loss

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.loss_fn(self.qnet, batch, self.cfg)
