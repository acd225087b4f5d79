"""Objectives on the one Q head: td equals the paper's loss, imitation and observation are what they say."""

import numpy as np
import pytest
import torch

from icrl_fast.data.formats import compact_format
from icrl_fast.envs.maps import generate_maps
from icrl_fast.model.qnet import ModelConfig, QNetwork
from icrl_fast.rl.dqn import DQNConfig, dqn_loss
from icrl_fast.rl.objectives import ObjectiveConfig, Objectives, choice_probs, imitation_loss
from icrl_fast.rl.sources import ProtocolConfig, ProtocolSource


def setup(seed=0):
    fmt = compact_format()
    src = ProtocolSource(ProtocolConfig(pool_maps=100, episodes=5, contexts=4, bucket=1), fmt,
                         generate_maps(3, seed=0), seed=2)
    batch = {k: torch.from_numpy(v) for k, v in src.batch(0).items() if k != "length"}
    q = QNetwork(ModelConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64, max_positions=4096),
                 fmt.vocab_size, fmt.action_ids, seed=seed)
    return q, batch


def test_choice_probs_and_the_imitation_loss():
    probs = choice_probs(torch.tensor([1, 6, 15], dtype=torch.uint8))
    torch.testing.assert_close(probs, torch.tensor([[1, 0, 0, 0], [0, .5, .5, 0], [.25] * 4]))
    q = torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 3.0]])
    loss, agree = imitation_loss(q, torch.tensor([1, 6], dtype=torch.uint8))
    logp = torch.log_softmax(q, -1)
    torch.testing.assert_close(loss, -(logp[0, 0] + 0.5 * (logp[1, 1] + logp[1, 2])) / 2)
    assert agree.item() == 0.5  # row 1's argmax (up) is not a teacher choice


def test_the_td_part_is_the_papers_loss_exactly():
    q, batch = setup()
    obj = Objectives(q, ObjectiveConfig(td=1.0), DQNConfig(cql=0.5))
    loss, stats = obj(batch)
    ref, _ = dqn_loss(q, batch, DQNConfig(cql=0.5))
    assert torch.equal(loss, ref) and "losses/td" in stats and "losses/imitation" not in stats


def test_every_part_is_weighted_logged_and_trains():
    q, batch = setup()
    cfg = ObjectiveConfig(td=0.3, imitation=1.0, observation=0.5)
    obj = Objectives(q, cfg, DQNConfig())
    loss, stats = obj(batch)
    expected = 0.3 * stats["losses/td"] + stats["losses/imitation"] + 0.5 * stats["losses/observation"]
    torch.testing.assert_close(loss.detach(), expected)
    only_im = Objectives(q, ObjectiveConfig(td=0.0, imitation=1.0), DQNConfig())
    opt = torch.optim.Adam(q.trainable_parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss, stats = only_im(batch)
        loss.backward()
        opt.step()
        first = first if first is not None else stats["losses/imitation"].item()
    assert stats["losses/imitation"].item() < 0.6 * first and stats["charts/agreement"] > 0.6
    with pytest.raises(ValueError, match="needs 'label'"):
        only_im({k: v for k, v in batch.items() if k != "label"})
    with pytest.raises(ValueError, match="weights"):
        ObjectiveConfig(td=0.0).validate()
    assert np.isfinite(loss.item())
