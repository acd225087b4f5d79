"""The online replay: slices of played contexts in the learner's token contract, FIFO, checkpointable."""

import numpy as np
import pytest
import torch

from icrl_fast.data.formats import compact_format, paper_format, token_contract
from icrl_fast.data.step_format import StepFormat
from icrl_fast.envs.maps import generate_maps
from icrl_fast.model.qnet import ModelConfig, QNetwork
from icrl_fast.rl.dqn import transitions
from icrl_fast.rl.replay import ContextReplay
from icrl_fast.rl.rollout import RolloutEngine


def played(fmt, n=4, episodes=5, seed=0):
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), fmt.vocab_size,
                 fmt.action_ids, seed=0).eval()
    return RolloutEngine(q, fmt).run(generate_maps(n, seed=seed), episodes, 0.3, seed=seed)


@pytest.mark.parametrize("fmt", [compact_format(), paper_format(), StepFormat()],
                         ids=["compact", "paper", "step"])
def test_whole_context_slices_give_one_transition_per_action_with_episode_returns(fmt):
    out = played(fmt)
    replay = ContextReplay(fmt, capacity=10, slice_len=100_000)  # longer than any context: whole, right-padded
    replay.add(out)
    batch = replay.sample(16, np.random.default_rng(0))
    tr = transitions(*(torch.from_numpy(batch[k]) for k in ("decision_mask", "action", "episode_id",
                                                               "episode_return")))
    for row in range(16):
        ids = batch["input_ids"][row]
        b = next(i for i, t in enumerate(out.tokens) if len(t) <= len(ids) and (ids[: len(t)] == t).all())
        n = len(out.tokens[b])
        assert (ids[n:] == replay.pad).all() and not batch["decision_mask"][row, n:].any()
        sel = tr["row"] == row
        assert int(sel.sum()) == out.length[b].sum() - 1  # every action but the last has a target
        # an episode's last action is done and carries that episode's return; the others carry 0
        done_rewards = tr["reward"][sel][tr["done"][sel]].numpy()
        np.testing.assert_array_equal(done_rewards, out.episode_return[b][:-1])
        assert (tr["reward"][sel][~tr["done"][sel]] == 0).all()
        ends = batch["terminated"][row, :n] | batch["truncated"][row, :n]
        assert ends.any() and (batch["episode_return"][row, :n] == out.episode_return[b][out.token_episode[b]]).all()


def test_windows_are_slices_of_one_context_with_the_contract_recomputed():
    fmt = compact_format()
    out = played(fmt, episodes=8)
    replay = ContextReplay(fmt, capacity=10, slice_len=24)
    replay.add(out)
    batch = replay.sample(32, np.random.default_rng(1))
    assert batch["input_ids"].shape == (32, 24)
    for row in range(32):
        ids = batch["input_ids"][row]
        hits = [(b, s) for b, t in enumerate(out.tokens) for s in range(len(t) - 23) if (t[s: s + 24] == ids).all()]
        assert hits
        mask, action = token_contract(fmt, ids)
        np.testing.assert_array_equal(batch["decision_mask"][row], mask)
        np.testing.assert_array_equal(batch["action"][row], action)


def test_fifo_capacity_and_state_round_trip():
    fmt = compact_format()
    replay = ContextReplay(fmt, capacity=6, slice_len=64)
    first, second = played(fmt, seed=0), played(fmt, seed=1)
    replay.add(first)
    replay.add(second)
    assert len(replay) == 6 and replay.added == 8
    assert (replay.contexts[-1]["tokens"] == second.tokens[-1]).all()
    assert (replay.contexts[0]["tokens"] == first.tokens[2]).all()  # the two oldest left
    clone = ContextReplay(fmt, capacity=6, slice_len=64)
    clone.load_state_dict(replay.state_dict())
    a, b = (r.sample(8, np.random.default_rng(3)) for r in (replay, clone))
    assert all((a[k] == b[k]).all() for k in a) and clone.added == 8
    prefixed = RolloutEngine(QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32),
                                      fmt.vocab_size, fmt.action_ids, seed=0).eval(), fmt).run(
        generate_maps(1, seed=0), 1, 0.0, seed=0, prefix=[[0]])
    with pytest.raises(ValueError, match="prefix"):
        replay.add(prefixed)
    with pytest.raises(ValueError, match="empty"):
        ContextReplay(fmt, 2, 8).sample(1, np.random.default_rng(0))
