"""The ``td`` objective: Double DQN over multi-episode contexts (arXiv 2501.14176, DESIGN.md §1), through
``icrl_kernels``, on a batch from any context source (offline slices, protocol contexts, the online replay).

Transitions pair consecutive decision points of one slice: ``done`` when the two belong to different episodes
(no bootstrap across an episode end; with ``gamma_episode`` > 0 the target bootstraps there too, from the next
episode's first decision, discounted by ``gamma_episode``), reward = the episode's return on an episode's last action (scaled by
``reward_scale`` inside the loss), and the last decision of a slice has no target and is dropped. The loss is
``icrl_kernels.q_td_loss`` on the final hidden states and the LM head, so no ``[N, V]`` logits are held.

Two ways to get the transitions, one loss: the sources (``icrl_fast.rl.sources``) compute them on the host with
:func:`padded_transitions` and put them in the batch (``tr_*``, padded to a capacity fixed by the batch's shape, with
a ``tr_valid`` mask): the step then has static shapes and reads nothing back from the device. A batch without them
(built by hand) gets them from :func:`transitions` on the device, whose ``nonzero`` is a host sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from icrl_kernels import q_td_loss

#: The batch keys of :func:`padded_transitions` (flat ``[capacity]`` arrays; ``tr_valid`` marks the real ones).
TRANSITION_KEYS = ("tr_row", "tr_pos", "tr_next_pos", "tr_action", "tr_reward", "tr_done", "tr_valid")


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
    """Transitions of a batch of slices ``[B, L]`` (the token contract of ``icrl_fast.data``), on the tensors' device.

    Returns flat tensors over the T transitions: ``row``, ``pos``, ``next_pos`` (int64), ``action`` (int64),
    ``reward`` (float32: the episode return on an episode's last action, else 0), ``done`` (bool),
    ``seq_id`` (= row, for the per-sequence normalisation) and ``success`` (bool: the decision's episode reached
    the goal). T depends on the data: its two ``nonzero`` calls are host syncs (:func:`padded_transitions` is the
    fixed-size twin the sources use).
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


def transition_capacity(rows: int, width: int, spacing: int = 1) -> int:
    """How many transitions a batch of ``rows`` slices of ``width`` tokens can hold when two decisions of a slice are
    at least ``spacing`` tokens apart: ``rows * max(1, (width - 2) // spacing)`` (a decision needs its action token
    after it in the slice, so decisions sit at positions ``0 .. width - 2``; a slice's last one has no target). A
    function of the batch's shape alone: every batch of one shape pads its transitions to the same size."""
    return rows * max(1, (width - 2) // max(1, spacing))


def padded_transitions(decision_mask: np.ndarray, action: np.ndarray, episode_id: np.ndarray,
                       episode_return: np.ndarray, capacity: int) -> dict[str, np.ndarray]:
    """:func:`transitions` on the host (numpy ``[B, L]`` contract arrays), padded to ``capacity`` (e.g.
    :func:`transition_capacity`): the batch keys ``TRANSITION_KEYS``, each a flat ``[capacity]`` array.

    ``tr_row``, ``tr_pos``, ``tr_next_pos``, ``tr_action`` int64, ``tr_reward`` float32, ``tr_done`` and ``tr_valid``
    bool. The first T entries are :func:`transitions`' in its order (row-major) with ``tr_valid`` True; the rest are
    padding: row 0, position 0, action 0, reward 0, not done, ``tr_valid`` False (``dqn_loss`` gives them no weight).
    ``ValueError`` if the batch holds more than ``capacity`` transitions."""
    rows, pos = np.nonzero(np.asarray(decision_mask))
    cur = np.flatnonzero(rows[1:] == rows[:-1])
    r, p, pn = rows[cur], pos[cur], pos[cur + 1]
    t = len(cur)
    if t > capacity:
        raise ValueError(f"the batch holds {t} transitions, more than its capacity {capacity}: decisions sit closer "
                         f"together than the spacing the capacity assumed")
    done = episode_id[r, p] != episode_id[r, pn]
    out = {"tr_row": np.zeros(capacity, np.int64), "tr_pos": np.zeros(capacity, np.int64),
           "tr_next_pos": np.zeros(capacity, np.int64), "tr_action": np.zeros(capacity, np.int64),
           "tr_reward": np.zeros(capacity, np.float32), "tr_done": np.zeros(capacity, bool),
           "tr_valid": np.zeros(capacity, bool)}
    out["tr_row"][:t], out["tr_pos"][:t], out["tr_next_pos"][:t] = r, p, pn
    out["tr_action"][:t] = action[r, p]
    out["tr_reward"][:t] = np.where(done, np.asarray(episode_return[r, p], dtype=np.float32), np.float32(0.0))
    out["tr_done"][:t] = done
    out["tr_valid"][:t] = True
    return out


def _batch_transitions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The batch's own padded transitions (``tr_*``) under :func:`transitions`' names, with ``valid``, ``seq_id``
    (the row; padding: a sequence of its own, ``B``) and ``success``; ``None`` when the batch has none."""
    if "tr_valid" not in batch:
        return None
    tr = {k[3:]: batch[k] for k in TRANSITION_KEYS}
    rows = batch["decision_mask"].shape[0]
    tr["seq_id"] = torch.where(tr["valid"], tr["row"], rows)
    tr["success"] = batch["episode_return"][tr["row"], tr["pos"]] > 0
    return tr


def masked_loss_mean(per_row: torch.Tensor, seq_id: torch.Tensor, valid: torch.Tensor, rows: int,
                     loss: str) -> torch.Tensor:
    """``icrl_kernels``' ``mean`` reduction of a per-transition loss ``[N]`` over the ``valid`` transitions only, with
    no host sync: for the paper's loss the mean over sequences (``seq_id`` in ``0 .. rows``; padding in ``rows``) of
    each sequence's mean, else the mean over transitions. Padding gets no weight and no gradient; no valid transition
    gives 0. On valid data it is ``reference.reduce_loss``'s sum in the same order, with zeros after it."""
    dtype = per_row.dtype
    if loss != "paper":
        n = valid.sum().clamp(min=1).to(dtype)
        return torch.where(valid, per_row, 0.0).sum() / n
    counts = torch.zeros(rows + 1, dtype=dtype, device=per_row.device).index_add_(0, seq_id, valid.to(dtype))
    sequences = (counts[:rows] > 0).sum().clamp(min=1).to(dtype)
    return torch.where(valid, per_row / counts[seq_id].clamp(min=1), 0.0).sum() / sequences


def dqn_loss(qnet, batch: dict[str, torch.Tensor], cfg: DQNConfig, backend: str | None = None,
             hidden: torch.Tensor | None = None):
    """TD loss of one batch of slices; returns ``(loss, stats)`` with stats as detached 0-d tensors (``q``,
    ``target``, ``transitions``, ``done_frac``, ``cql``: means over the valid transitions). ``hidden``: the online
    network's final hidden states of ``batch["input_ids"]`` when the caller already has them (shared with other
    objectives); ``batch["memory"]``: the same-state memory's features of a model that has the memory.

    With the source's padded transitions (``tr_*``) nothing here reads the device (the loss is
    :func:`masked_loss_mean` of the kernel's per-transition loss: today's on the valid ones); without them they
    come from :func:`transitions` (host syncs) and the kernel reduces the loss itself."""
    tr = _batch_transitions(batch)
    padded = tr is not None
    if not padded:
        tr = transitions(batch["decision_mask"], batch["action"], batch["episode_id"], batch["episode_return"])
        if tr["row"].numel() == 0:
            raise ValueError("the batch has no transition (no two decisions in one slice): use longer slices")
        tr["valid"] = torch.ones_like(tr["done"])
    ids, memory = batch["input_ids"], batch.get("memory")
    h_all = qnet.hidden(ids, memory=memory) if hidden is None else hidden
    # tau 1 copies the online network into the target after every update, so at this forward the two are equal: the
    # online forward, detached, is the target's (a quarter of a training step saved; same loss, tested).
    same = cfg.tau == 1.0
    with torch.no_grad():
        ht_all = h_all.detach() if same else qnet.hidden(ids, target=True, memory=memory)
    r, p, pn, valid = tr["row"], tr["pos"], tr["next_pos"], tr["valid"]
    hidden, next_hidden, next_target = h_all[r, p], h_all[r, pn].detach(), ht_all[r, pn].to(h_all.dtype)
    # across an episode end the target bootstraps with gamma_episode (0: not at all, the paper's rule)
    discounts = None if cfg.gamma_episode == 0 else torch.where(tr["done"], cfg.gamma_episode, cfg.gamma).float()
    weight = qnet.head_weight()
    target_weight = weight.detach() if same else qnet.head_weight(target=True).to(weight.dtype)
    loss = q_td_loss(hidden.contiguous(), weight, next_hidden.contiguous(), next_target.contiguous(), tr["action"],
                     tr["reward"], tr["done"], tr["seq_id"], action_ids=qnet.action_ids, target_weight=target_weight,
                     gamma=cfg.gamma, reward_scale=cfg.reward_scale, argmax=cfg.argmax, loss=cfg.loss,
                     huber_delta=cfg.huber_delta, backend=backend, discounts=discounts,
                     reduction="none" if padded else "mean")
    if padded:
        loss = masked_loss_mean(loss, tr["seq_id"], valid, ids.shape[0], cfg.loss)
    stats = {}
    count = valid.sum().clamp(min=1).float()
    if cfg.cql > 0:
        q_all = qnet.q_values(hidden)  # [T, A] fp32: tiny, outside the fused kernel
        gaps = torch.logsumexp(q_all, -1) - q_all.gather(1, tr["action"][:, None]).squeeze(1)
        covered = (tr["success"] if cfg.cql_on == "success" else torch.ones_like(tr["success"])) & valid
        gap = (gaps * covered).sum() / covered.sum().clamp(min=1)  # 0 when no covered decision is in the batch
        loss = loss + cfg.cql * gap
        stats["cql"] = gap.detach()
    with torch.no_grad():
        rows = weight[qnet.action_ids].float()
        q = (hidden.float() * rows[tr["action"]]).sum(-1)
        stats |= {"q": torch.where(valid, q, 0.0).sum() / count, "transitions": valid.sum().float(),
                  "done_frac": (tr["done"] & valid).float().sum() / count}
        if cfg.argmax == "actions":  # the vocab-mode target would need the [N, V] logits the kernel avoids
            best = (next_hidden.float() @ rows.T).argmax(-1)
            q_next = (next_target.float() * target_weight[qnet.action_ids].float()[best]).sum(-1)
            discount = cfg.gamma * (~tr["done"]).float() if discounts is None else discounts
            target = tr["reward"] * cfg.reward_scale + discount * q_next
            stats["target"] = torch.where(valid, target, 0.0).sum() / count
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
