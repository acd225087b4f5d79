"""The offline Double-DQN learner: transitions across episode and slice boundaries, and the loss it feeds."""

import pytest
import torch

from icrl_fast.model.qnet import ModelConfig, QNetwork
from icrl_fast.rl.dqn import DQNConfig, dqn_loss, transitions


def test_transitions_pair_consecutive_decisions_within_a_slice():
    # Row 0: decisions at 1, 3 (episode 0), 6 (episode 1), 8 (episode 1). Row 1: one decision only.
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, [1, 3, 6, 8]] = True
    mask[1, 4] = True
    action = torch.full((2, 10), -1)
    action[0, [1, 3, 6, 8]] = torch.tensor([2, 1, 0, 3])
    action[1, 4] = 1
    episode = torch.tensor([[0] * 5 + [1] * 5, [2] * 10])
    ret = torch.tensor([[1.0] * 5 + [0.0] * 5, [1.0] * 10])
    tr = transitions(mask, action, episode, ret)
    assert tr["pos"].tolist() == [1, 3, 6] and tr["next_pos"].tolist() == [3, 6, 8]  # last of each slice dropped
    assert tr["done"].tolist() == [False, True, False]
    assert tr["reward"].tolist() == [0.0, 1.0, 0.0]  # the episode's return on its last action
    assert tr["action"].tolist() == [2, 1, 0] and tr["seq_id"].tolist() == [0, 0, 0]
    assert tr["success"].tolist() == [True, True, False]  # the decision's own episode reached the goal


def model_and_batch(seed: int, rows: int, length: int, episode_len: int, action=None):
    """A small Q-network (vocabulary 20, actions 3-6) and a batch with a decision every 3rd token; ``action``: one
    action the data always took (else random ones, written into the tokens after each decision)."""
    torch.manual_seed(seed)
    q = QNetwork(ModelConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64), 20, [3, 4, 5, 6])
    ids = torch.randint(7, 20, (rows, length))
    mask = torch.zeros(rows, length, dtype=torch.bool)
    mask[:, ::3] = True
    taken = torch.randint(0, 4, (rows, length)) if action is None else torch.full((rows, length), action)
    act = torch.where(mask, taken, -1)
    if action is None:
        ids[:, 1::3] = 3 + act[:, ::3].clamp_min(0)
    return q, {"input_ids": ids, "decision_mask": mask, "action": act,
               "episode_id": torch.arange(length).repeat(rows, 1) // episode_len,
               "episode_return": torch.ones(rows, length)}


def test_dqn_loss_uses_the_lm_head_of_the_action_tokens_and_trains():
    q, batch = model_and_batch(0, 3, 24, 9)
    ids = batch["input_ids"]
    h = q.hidden(ids)
    logits = q.model(input_ids=ids).logits
    assert torch.allclose(q.q_values(h), logits[..., [3, 4, 5, 6]], atol=1e-5)
    opt = torch.optim.Adam(q.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(60):  # fixed targets (gamma 0): plain regression of Q onto the rewards
        loss, stats = dqn_loss(q, batch, DQNConfig(loss="mse", gamma=0.0, reward_scale=1.0), backend="reference")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]


def test_polyak_update_is_exact():
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), 10, [0, 1, 2, 3])
    online = [p.detach().clone() for p in q.model.parameters()]
    with torch.no_grad():
        for p in q.target.parameters():
            p.fill_(1.0)
    q.polyak_update(0.1)
    for o, t in zip(online, q.target.parameters()):
        assert torch.allclose(t, 0.1 * o + 0.9, atol=1e-7)


def test_tau_one_reuses_the_online_forward_as_the_target_with_the_same_loss_and_gradients():
    """tau 1 makes the target a copy of the online network after every update: the loss skips the target's forward
    and must give what the explicit target forward gives after ``polyak_update(1.0)``."""
    q, batch = model_and_batch(1, 3, 24, 9)
    opt = torch.optim.Adam(q.trainable_parameters(), lr=1e-2)
    loss, _ = dqn_loss(q, batch, DQNConfig(), backend="reference")  # a step, so the online net moves off the target
    loss.backward()
    opt.step()
    q.polyak_update(1.0)
    results = []
    for tau in (1.0, 0.5):  # 0.5 takes the explicit path; the networks are equal, so the loss must be too
        q.model.zero_grad()
        calls = []
        real = q.hidden
        q.hidden = lambda *a, **k: (calls.append(k.get("target", False)), real(*a, **k))[1]
        loss, stats = dqn_loss(q, batch, DQNConfig(tau=tau), backend="reference")
        del q.hidden
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in q.trainable_parameters()], calls, stats["target"]))
    (l1, g1, c1, t1), (l2, g2, c2, t2) = results
    assert c1 == [False] and c2 == [False, True]  # one forward with tau 1, the target's too otherwise
    assert torch.allclose(l1, l2, rtol=1e-6) and torch.allclose(t1, t2, rtol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
    with torch.no_grad():  # and a stale target (tau < 1 after a step) does change the loss: the check can fail
        for p in q.target.parameters():
            p.mul_(0.5)
    assert not torch.allclose(dqn_loss(q, batch, DQNConfig(tau=0.5), backend="reference")[0], l1, rtol=1e-3)


def test_the_conservative_term_adds_logsumexp_minus_the_taken_q_and_demotes_untaken_actions():
    q, batch = model_and_batch(1, 2, 30, 10, action=2)  # the data always took action 2
    ids, mask, action = batch["input_ids"], batch["decision_mask"], batch["action"]
    plain, _ = dqn_loss(q, batch, DQNConfig(), backend="reference")
    both, stats = dqn_loss(q, batch, DQNConfig(cql=0.5), backend="reference")
    tr = transitions(mask, action, batch["episode_id"], batch["episode_return"])
    with torch.no_grad():
        qa = q.q_values(q.hidden(ids)[tr["row"], tr["pos"]])
        gap = (torch.logsumexp(qa, -1) - qa[:, 2]).mean()
    torch.testing.assert_close(stats["cql"], gap)
    torch.testing.assert_close(both.detach(), plain.detach() + 0.5 * gap)
    opt = torch.optim.Adam(q.trainable_parameters(), lr=3e-3)
    for _ in range(30):  # with the term, the action the data took becomes the argmax everywhere
        loss, _ = dqn_loss(q, batch, DQNConfig(cql=1.0), backend="reference")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        assert (q.q_values(q.hidden(ids)[mask]).argmax(-1) == 2).all()
    try:
        DQNConfig(cql=-1.0).validate()
    except ValueError as e:
        assert "cql" in str(e)
    else:
        raise AssertionError("a negative cql weight must be refused")


def test_the_success_only_conservative_term_covers_only_decisions_of_successful_episodes():
    q, batch = model_and_batch(2, 2, 30, 10)
    batch["episode_return"] = (batch["episode_id"] % 2 == 0).float()  # episodes 0 and 2 succeed, 1 fails
    tr = transitions(batch["decision_mask"], batch["action"], batch["episode_id"], batch["episode_return"])
    ok = tr["success"]
    assert 0 < ok.sum() < len(ok)
    plain, _ = dqn_loss(q, batch, DQNConfig(), backend="reference")
    both, stats = dqn_loss(q, batch, DQNConfig(cql=0.5, cql_on="success"), backend="reference")
    with torch.no_grad():
        qa = q.q_values(q.hidden(batch["input_ids"])[tr["row"], tr["pos"]])
        gaps = torch.logsumexp(qa, -1) - qa.gather(1, tr["action"][:, None]).squeeze(1)
    torch.testing.assert_close(stats["cql"], gaps[ok].mean())
    assert not torch.isclose(gaps[ok].mean(), gaps.mean())  # the failed episode's decisions are left out
    torch.testing.assert_close(both.detach(), plain.detach() + 0.5 * gaps[ok].mean())
    batch["episode_return"] = torch.zeros_like(batch["episode_return"])  # nothing succeeded: no term at all
    none, stats = dqn_loss(q, batch, DQNConfig(cql=0.5, cql_on="success"), backend="reference")
    plain, _ = dqn_loss(q, batch, DQNConfig(), backend="reference")
    assert stats["cql"] == 0 and torch.equal(none.detach(), plain.detach())
    try:
        DQNConfig(cql_on="winners").validate()
    except ValueError as e:
        assert "cql_on" in str(e)
    else:
        raise AssertionError("an unknown cql_on must be refused")


def test_gamma_episode_bootstraps_across_episode_ends_with_its_own_discount():
    """--dqn.gamma_episode g: at an episode end the target is R * scale + g * Q_target(next episode's first
    decision); inside an episode gamma as before; 0 leaves the paper's loss unchanged (no bootstrap at an end)."""
    from icrl_kernels import q_td_loss_reference

    q, batch = model_and_batch(1, 2, 30, 7)
    tr = transitions(batch["decision_mask"], batch["action"], batch["episode_id"], batch["episode_return"])
    assert tr["done"].any() and (~tr["done"]).any()
    base = DQNConfig(loss="mse", tau=0.5)
    with torch.no_grad():
        paper, _ = dqn_loss(q, batch, base, backend="reference")
        same, _ = dqn_loss(q, batch, DQNConfig(loss="mse", tau=0.5, gamma_episode=0.0), backend="reference")
        crossed, stats = dqn_loss(q, batch, DQNConfig(loss="mse", tau=0.5, gamma_episode=0.7), backend="reference")
        assert torch.equal(paper, same) and not torch.allclose(paper, crossed)
        h, ht = q.hidden(batch["input_ids"]), q.hidden(batch["input_ids"], target=True)
        r, p, pn = tr["row"], tr["pos"], tr["next_pos"]
        want = q_td_loss_reference(h[r, p], q.head_weight(), h[r, pn], ht[r, pn], tr["action"], tr["reward"],
                                   torch.zeros_like(tr["done"]), tr["seq_id"], action_ids=q.action_ids,
                                   target_weight=q.head_weight(target=True), loss="mse", gamma=1.0,
                                   discounts=torch.where(tr["done"], 0.7, 0.9))
    assert torch.allclose(crossed, want, rtol=1e-5)
    with pytest.raises(ValueError, match="gamma_episode"):
        DQNConfig(gamma_episode=1.5).validate()
