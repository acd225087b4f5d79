"""The step format (one token per step): exact round trips, its token contract, where episodes end, the rollout
streams, factored embeddings and the observation loss over the action's landing block."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from icrl_fast.data.formats import compact_format, decode, encode_episodes, make_format, pad_token, token_contract
from icrl_fast.data.step_format import KINDS, StepFormat, StepStreams, observation_names
from icrl_fast.envs.learners import EpisodeLog, play_protocol
from icrl_fast.envs.maps import MapBatch, generate_maps
from icrl_fast.model.qnet import ModelConfig, QNetwork
from icrl_fast.protocol import paper_ramp
from icrl_fast.rl.objectives import observation_loss
from icrl_fast.rl.sources import contexts_log

FMT = StepFormat(max_obs=49)


def make_log(episodes) -> EpisodeLog:
    """episodes: (obs list, actions list, outcome in goal / hole / truncated, final obs)."""
    obs, acts, rews, start, length, term, trunc, final = [], [], [], [], [], [], [], []
    for o, a, outcome, end in episodes:
        start.append(len(obs))
        length.append(len(o))
        obs += o
        acts += a
        rews += [0.0] * (len(o) - 1) + [1.0 if outcome == "goal" else 0.0]
        term.append(outcome != "truncated")
        trunc.append(outcome == "truncated")
        final.append(end)
    n = len(episodes)
    return EpisodeLog(obs=np.array(obs, np.int16), actions=np.array(acts, np.int8), rewards=np.array(rews, np.float32),
                      map_id=np.zeros(n, np.int32), start=np.array(start, np.int64), length=np.array(length, np.int32),
                      returns=np.array([1.0 if e[2] == "goal" else 0.0 for e in episodes], np.float32),
                      terminated=np.array(term), truncated=np.array(trunc), final_obs=np.array(final, np.int16))


episode = st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 48), min_size=n, max_size=n), st.lists(st.integers(0, 3), min_size=n, max_size=n),
    st.sampled_from(["goal", "hole", "truncated"]), st.integers(0, 48)))


@settings(max_examples=80, deadline=None)
@given(st.lists(episode, min_size=1, max_size=8))
def test_round_trip_one_token_per_step_plus_one_per_episode(episodes):
    ids, idx = encode_episodes(FMT, make_log(episodes), np.arange(len(episodes)))
    assert len(ids) == sum(len(o) + 1 for o, _, _, _ in episodes)
    got = decode(FMT, ids)
    for g, (o, a, outcome, end) in zip(got, episodes, strict=True):
        assert g["obs"] == o and g["actions"] == a and g["final_obs"] == end
        assert g["rewards"] == [0.0] * (len(o) - 1) + [1.0 if outcome == "goal" else 0.0]
        assert (g["terminated"], g["truncated"]) == (outcome != "truncated", outcome == "truncated")
    mask, action = token_contract(FMT, ids)
    assert action[mask].tolist() == [x for _, a, _, _ in episodes for x in a]
    assert np.bincount(idx[mask], minlength=len(episodes)).tolist() == [len(o) for o, _, _, _ in episodes]


def test_tokens_say_where_the_agent_landed_and_how_the_episode_ended():
    log = make_log([([3, 4], [2, 1], "hole", 9), ([3], [0], "goal", 7), ([3, 2], [1, 1], "truncated", 5)])
    ids, _ = encode_episodes(FMT, log, np.arange(3))
    assert ids.tolist() == [FMT.start(3), FMT.land(2, "move", 4), FMT.land(1, "hole", 9),
                            FMT.start(3), FMT.land(0, "goal", 7),
                            FMT.start(3), FMT.land(1, "move", 2), FMT.land(1, "cut", 5)]
    mask, action = token_contract(FMT, ids)
    assert np.flatnonzero(mask).tolist() == [0, 1, 3, 5, 6]  # START and move tokens followed by a landing
    assert action[mask].tolist() == [2, 1, 0, 1, 1]
    # a decision whose landing is in the next row (slice) is not one of this row's
    assert not token_contract(FMT, ids[None, :2])[0][0, 1]
    assert pad_token(FMT) not in ids and pad_token(FMT) not in FMT.action_ids
    # every landing block holds the four kinds of one action, contiguous
    first, size = FMT.landing_block(2)
    assert size == len(KINDS) * 49 and first == FMT.land(2, "move", 0) and FMT.land(2, "cut", 48) == first + size - 1


def test_half_the_tokens_of_the_compact_format_on_protocol_contexts():
    maps = generate_maps(30, seed=3)
    log, _ = play_protocol(maps, paper_ramp(30), seed=5)
    fmt = make_format("step")
    step, _ = encode_episodes(fmt, log, np.arange(log.num_episodes))
    compact, _ = encode_episodes(compact_format(), log, np.arange(log.num_episodes))
    assert len(step) == log.obs.shape[0] + log.num_episodes and len(step) < 0.55 * len(compact)
    # and the model's own contexts (a decoded log keeps final_obs) re-encode to the same tokens (DAgger's path)
    again, _ = encode_episodes(fmt, contexts_log(fmt, [step]), np.arange(log.num_episodes))
    np.testing.assert_array_equal(again, step)


def test_bad_input_is_a_clear_error():
    log = make_log([([3], [0], "hole", 0)])
    log.final_obs[:] = -1  # e.g. a log decoded from compact tokens: where it ended is not known
    with pytest.raises(ValueError, match="final_obs"):
        encode_episodes(FMT, log, np.arange(1))
    with pytest.raises(ValueError, match="START"):
        decode(FMT, [FMT.land(0, "move", 1)])
    with pytest.raises(ValueError, match="end inside an episode"):
        decode(FMT, [FMT.start(1), FMT.land(0, "move", 2)])
    with pytest.raises(ValueError, match="outside this step format's 0..48"):  # not silently another token
        StepStreams(FMT).first_block(49)
    with pytest.raises(ValueError, match="outside"):
        StepStreams(FMT).after_action(1, 0.0, True, False, None, landed=60)
    with pytest.raises(ValueError, match="own vocabulary"):
        make_format("step", tokenizer_path="/somewhere")
    with pytest.raises(ValueError, match="own embeddings"):
        QNetwork(ModelConfig(path="/nowhere"), FMT.vocab_size, FMT.action_ids, token_factors=FMT.token_factors)


def test_streams_write_what_the_encoder_writes():
    log = make_log([([3, 4, 5], [2, 1, 0], "goal", 6), ([3], [3], "truncated", 3)])
    ids, _ = encode_episodes(FMT, log, np.arange(2))
    s = StepStreams(FMT)
    assert s.episode([3, 4, 5, 6], [2, 1, 0], [0.0, 0.0, 1.0]) + s.episode([3, 3], [3], [0.0], cut=True) == ids.tolist()


def test_factored_embedding_is_the_sum_of_type_action_and_observation_embeddings():
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), FMT.vocab_size, FMT.action_ids,
                 token_factors=FMT.token_factors)
    emb = q.model.model.embed_tokens
    ids = torch.tensor([FMT.start(5), FMT.land(1, "move", 5), FMT.land(3, "move", 5), FMT.land(1, "hole", 8)])
    type_, act, obs = (t.weight for t in emb.tables)
    with torch.no_grad():
        got = emb(ids)
        # a move to 5 by action 1 and one by action 3 differ by exactly the two action embeddings
        torch.testing.assert_close(got[1] - got[2], act[2] - act[4])
        torch.testing.assert_close(got[3], type_[5] + act[2] + obs[9])  # hole = type 3 + kind 2; action/obs + 1
    assert torch.equal(q.target.model.embed_tokens.tables[0].weight, type_)  # the target copies it
    assert emb.num_embeddings == FMT.vocab_size and 0.005 < float(obs.detach().std()) < 0.05


def test_observation_loss_is_the_cross_entropy_over_the_actions_landing_block():
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), FMT.vocab_size, FMT.action_ids)
    ids = torch.tensor([[FMT.start(2), FMT.land(3, "move", 4), FMT.land(0, "goal", 6), FMT.pad_id]])
    mask, action = (torch.from_numpy(x) for x in token_contract(FMT, ids.numpy()))
    h = torch.randn(1, 4, 16, requires_grad=True)
    first, size = FMT.landing_block(np.arange(4))
    got = observation_loss(q, h, ids, mask, (torch.as_tensor(first), size), action)
    w = q.head_weight()
    want = torch.stack([F.cross_entropy((h[0, p] @ w[first[a]: first[a] + size].T)[None],
                                        torch.tensor([int(ids[0, p + 1]) - first[a]])) for p, a in ((0, 3), (1, 0))])
    torch.testing.assert_close(got, want.mean())
    # the gradients too: only the two taken blocks of the head get any
    got_grads = torch.autograd.grad(got, [h, w])
    want_grads = torch.autograd.grad(want.mean(), [h, w])
    for g, r in zip(got_grads, want_grads):
        torch.testing.assert_close(g, r)
    touched = got_grads[1].abs().sum(1).nonzero().squeeze(1)
    assert set(touched.tolist()) <= set(range(first[3], first[3] + size)) | set(range(first[0], first[0] + size))


def test_observation_loss_by_blocks_equals_the_gathered_full_vocabulary_loss():
    # many positions and all four actions, against a gather from the full vocabulary's logits
    torch.manual_seed(0)
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), FMT.vocab_size, FMT.action_ids)
    first, size = FMT.landing_block(np.arange(4))
    rng = np.random.default_rng(3)
    ids = torch.tensor([[FMT.start(int(rng.integers(0, 20)))] +
                        [FMT.land(int(rng.integers(0, 4)), "move", int(rng.integers(0, 20))) for _ in range(37)]
                        for _ in range(2)])
    mask, action = (torch.from_numpy(x) for x in token_contract(FMT, ids.numpy()))
    h = torch.randn(2, ids.shape[1], 16, dtype=torch.float64).float()
    got = observation_loss(q, h, ids, mask, (first, size), action)
    rows, pos = mask.nonzero(as_tuple=True)
    logits = h[rows, pos] @ q.head_weight().T
    start = torch.as_tensor(first)[action[rows, pos].long()]
    want = F.cross_entropy(logits.gather(1, start[:, None] + torch.arange(size)), ids[rows, pos + 1] - start)
    assert len(set(action[rows, pos].tolist())) == 4 and len(rows) > 60
    torch.testing.assert_close(got, want)


def test_the_noend_ablation_hides_where_episodes_ended_and_nothing_else():
    fmt = make_format("step-noend", max_obs=49)
    log = make_log([([3, 4], [2, 1], "hole", 9), ([3], [0], "goal", 7), ([3, 2], [1, 1], "truncated", 5)])
    log.final_obs[0] = -1  # not needed: it is not shown
    ids, _ = encode_episodes(fmt, log, np.arange(3))
    assert ids.tolist() == [fmt.start(3), fmt.land(2, "move", 4), FMT.land(1, "hole", 0),
                            fmt.start(3), FMT.land(0, "goal", 0),
                            fmt.start(3), fmt.land(1, "move", 2), FMT.land(1, "cut", 0)]
    got = decode(fmt, ids)
    assert [g["actions"] for g in got] == [[2, 1], [0], [1, 1]] and [g["final_obs"] for g in got] == [0, 0, 0]
    assert [(g["terminated"], g["rewards"][-1]) for g in got] == [(True, 0.0), (True, 1.0), (False, 0.0)]
    ended = StepStreams(fmt).after_action(3, 0.0, True, False, 1, landed=40)
    assert ended == ([fmt.land(3, "hole", 0)], [fmt.start(1)])
    assert fmt.name == "step-noend" and fmt.describe()["name"] == "step-noend"


def test_factored_embeddings_can_be_switched_off_for_an_ablation():
    from icrl_fast.checkpoint import build_qnet
    from icrl_fast.model.factored_embedding import FactoredEmbedding
    from icrl_fast.presets import preset

    cfg = preset("default")
    assert isinstance(build_qnet(cfg, FMT, "cpu").model.model.embed_tokens, FactoredEmbedding)
    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, factored_embedding=False, memory=False))
    emb = build_qnet(plain, FMT, "cpu").model.model.embed_tokens
    assert type(emb) is torch.nn.Embedding and emb.num_embeddings == FMT.vocab_size


def test_observation_loss_of_a_batch_with_nothing_to_predict_is_zero_in_both_modes():
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), FMT.vocab_size, FMT.action_ids)
    ids = torch.tensor([[FMT.start(2), FMT.pad_id]])
    h = torch.randn(1, 2, 16, requires_grad=True)
    none = torch.zeros(1, 2, dtype=torch.bool)
    for blocks in (None, (FMT.landing_block(np.arange(4))[0], FMT.landing_block(0)[1])):
        loss = observation_loss(q, h, ids, none, blocks, torch.full((1, 2), -1))
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert h.grad is not None and not h.grad.any()


def test_a_grid_format_numbers_cells_on_one_stride_and_refuses_maps_that_do_not_fit():
    fmt = make_format("step-grid")
    assert (fmt.name, fmt.grid, fmt.max_obs) == ("step-grid", 8, 64) and fmt.describe()["grid"] == 8
    maps = MapBatch.from_descs([["SFF", "FHF", "FFG"], ["SFFFFFF", "FFFFFFG"]])
    names = observation_names(fmt, maps)
    assert names[0, :9].tolist() == [0, 1, 2, 8, 9, 10, 16, 17, 18]  # r * 3 + c -> r * 8 + c
    assert names[1, :14].tolist() == [*range(7), *range(8, 15)]
    assert observation_names(StepFormat(), maps) is None  # the plain step format shows gymnasium's numbers
    with pytest.raises(ValueError, match="do not fit"):
        observation_names(fmt, MapBatch.from_descs([["S" + "F" * 7 + "G"]]))  # 9 columns on an 8-column grid
    with pytest.raises(ValueError, match="grid"):
        StepFormat(16, grid=17)
