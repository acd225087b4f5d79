"""The protocol context source: contexts are the protocol's episodes, labelled by the teacher, test maps excluded."""

import dataclasses

import numpy as np
import pytest

from icrl_fast.data.formats import ACTION_WORDS, compact_format, decode, make_format, paper_format, token_contract
from icrl_fast.data.step_format import StepFormat
from icrl_fast.envs.learners import play_protocol, teacher_labels
from icrl_fast.envs.maps import generate_maps
from icrl_fast.rl.sources import (
    ProtocolConfig,
    ProtocolSource,
    append_contexts,
    contexts_log,
    exclude_maps,
    outcome_mask,
)


def source(fmt=None, **kw):
    test = generate_maps(5, seed=0)
    cfg = ProtocolConfig(pool_maps=200, episodes=kw.pop("episodes", 6), contexts=3, bucket=2, **kw)
    return ProtocolSource(cfg, fmt or compact_format(), test, seed=3), test


@pytest.mark.parametrize("fmt", [compact_format(), paper_format(), StepFormat()],
                         ids=["compact", "paper", "step"])
def test_protocol_batches_are_whole_labelled_contexts_of_one_map_each(fmt):
    src, _ = source(fmt)
    batch = src.batch(step=1, micro=0)
    ids, mask, label, length = batch["input_ids"], batch["decision_mask"], batch["label"], batch["length"]
    assert ids.shape[0] == 3 and ids.shape[1] == length.max()
    for r in range(3):
        episodes = decode(fmt, ids[r, : length[r]])
        assert len(episodes) == 6  # one map, the protocol's episodes, nothing cut
        steps = sum(len(e["actions"]) for e in episodes)
        assert mask[r].sum() == steps and (label[r][mask[r]] > 0).all() and (label[r][~mask[r]] == 0).all()
        # the labels are the teacher's, read from the decoded context alone
        log = contexts_log(fmt, [ids[r, : length[r]]])
        assert log.num_episodes == 6 and log.obs.size == steps
        np.testing.assert_array_equal(label[r][mask[r]], teacher_labels(log))
        ep = batch["episode_id"][r]
        assert (ep[: length[r]] >= 0).all() and (ep[length[r]:] == -1).all()
        ret = batch["episode_return"][r][mask[r]]
        assert set(np.unique(ret)) <= {0.0, 1.0}
    again = source(fmt)[0].batch(step=1, micro=0)  # a pure function of (seed, step, micro): resumes draw the same
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    other = src.batch(step=1, micro=1)
    assert not np.array_equal(batch["input_ids"][:, :20], other["input_ids"][:, :20])


def test_outcome_mask_covers_what_the_environment_answered():
    fmt = compact_format()
    ids = np.array([[0, 7, 3, 8, 5, 9, 1, 0, 7, 4]])  # EPISODE s0 left s1 right s2 REWARD | EPISODE s0 down
    mask, _ = token_contract(fmt, ids)
    out = outcome_mask(fmt, ids, mask, np.array([10]))
    # after each action up to the next decision: the actions at 2 and 4, the goal observation at 5 (-> REWARD), the
    # reward at 6 (-> EPISODE), the episode start at 7 (-> start observation); the last action (9) has no next token
    assert np.flatnonzero(out[0]).tolist() == [2, 4, 5, 6, 7]
    paper = paper_format()
    voc = paper.vocab
    text = ["<|begin_of_text|>", "<|start_header_id|>", "observation", "<|end_header_id|>", "0", "<|eot_id|>",
            "<|start_header_id|>", "action", "<|end_header_id|>", ACTION_WORDS[2], "<|eot_id|>",
            "<|start_header_id|>", "observation", "<|end_header_id|>", "1", "<|eot_id|>", "<|start_header_id|>",
            "action", "<|end_header_id|>"]
    ids = np.array([[voc.encode(t)[0] if not t.startswith("<|") else voc.special_id(t) for t in text]])
    mask, _ = token_contract(paper, ids)
    out = outcome_mask(paper, ids, mask, np.array([len(text)]))
    assert np.flatnonzero(out[0]).tolist() == list(range(9, 18))  # from the action to the next decision


def test_test_maps_are_excluded_by_content():
    test = generate_maps(4, seed=0)
    pool = generate_maps(30, seed=1)
    both = type(pool)(np.concatenate([pool.tiles, test.tiles[:2]]), np.concatenate([pool.nrow, test.nrow[:2]]),
                      np.concatenate([pool.ncol, test.ncol[:2]]))
    kept = exclude_maps(both, test)
    assert len(kept) == 30
    assert {m for b in range(len(kept)) for m in ["".join(kept.to_desc(b))]}.isdisjoint(
        {"".join(test.to_desc(b)) for b in range(len(test))})
    with pytest.raises(ValueError, match="ramp"):
        ProtocolConfig(ramp="x").validate()


def test_dagger_chunks_are_the_models_own_protocol_contexts_labelled_by_the_teacher():
    import torch

    from icrl_fast.model.qnet import ModelConfig, QNetwork
    from icrl_fast.protocol import paper_ramp
    from icrl_fast.rl.rollout import RolloutEngine

    fmt = compact_format()
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32, max_positions=4096),
                 fmt.vocab_size, fmt.action_ids, seed=0)
    engine = RolloutEngine(q, fmt)
    cfg = ProtocolConfig(pool_maps=100, episodes=4, contexts=2, bucket=2, dagger=0.5, max_len=4096)
    src = ProtocolSource(cfg, fmt, generate_maps(3, seed=0), seed=4, engine=engine)
    assert [src.is_dagger(c) for c in range(4)] == [False, True, False, True]
    model_batch = src.batch(step=2)  # chunk 1: the model plays
    assert len(src.dagger_success) == 1 and q.training  # the network is put back in training mode
    # the same maps and seed through the engine give the same contexts (grouped by length in the batch)
    rng = np.random.default_rng([4, 6, 1])
    maps = src.pool[rng.choice(len(src.pool), size=4, replace=False)]
    seed = int(np.random.SeedSequence([4, 7, 1]).generate_state(1)[0])
    with torch.no_grad():
        played = engine.run(maps, 4, paper_ramp(4), seed)
    rows = {tuple(model_batch["input_ids"][r, : model_batch["length"][r]]) for r in range(2)}
    assert rows <= {tuple(t.tolist()) for t in played.tokens}
    for r in range(2):
        ids = model_batch["input_ids"][r, : model_batch["length"][r]]
        mask = model_batch["decision_mask"][r]
        np.testing.assert_array_equal(model_batch["label"][r][mask], teacher_labels(contexts_log(fmt, [ids])))
    with pytest.raises(ValueError, match="engine"):
        ProtocolSource(cfg, fmt, generate_maps(3, seed=0), seed=4).batch(step=2)


def test_with_forget_switch_contexts_are_labelled_by_the_forgetting_teacher_from_the_whole_context():
    """--protocol.forget: the teacher is not told of the switch; it reads the joined context and starts over at
    the first surprise. The first half, and contexts that do not switch, keep the labels they were played with."""
    fmt = StepFormat()
    src, _ = source(fmt, switch=0.5, forget=True, teacher="least-tried")
    plain, _ = source(fmt, switch=0.5, teacher="least-tried")
    switched = 0
    for micro in range(2):
        batch, other = src.batch(step=0, micro=micro), plain.batch(step=0, micro=micro)
        np.testing.assert_array_equal(batch["input_ids"], other["input_ids"])  # the same play
        ids, mask, length = batch["input_ids"], batch["decision_mask"], batch["length"]
        for r in range(ids.shape[0]):
            log = contexts_log(fmt, [ids[r, : length[r]]])
            labels = batch["label"][r][mask[r]]
            np.testing.assert_array_equal(labels, teacher_labels(log, least_tried=True, forget=True))
            if log.num_episodes == 12:
                switched += 1
                first = log.start[6]
                np.testing.assert_array_equal(labels[:first], other["label"][r][mask[r]][:first])
            else:
                np.testing.assert_array_equal(labels, other["label"][r][mask[r]])
    assert switched > 0


def test_noise_caps_the_teachers_share_in_every_episode():
    cfg = ProtocolConfig(episodes=30, noise=0.1)
    p = cfg.p_teacher()
    assert p[0] == 0.0 and p[19] == 0.9 and (p[20:] == 0.9).all()
    assert (ProtocolConfig(episodes=30).p_teacher()[20:] == 1.0).all()
    with pytest.raises(ValueError, match="noise"):
        ProtocolConfig(noise=1.0).validate()


@pytest.mark.parametrize("fmt", [compact_format(), StepFormat()], ids=["compact", "step"])
def test_switch_contexts_go_on_on_a_fresh_map_that_the_teacher_learns_from_scratch(fmt):
    """--protocol.switch: some contexts hold 2 x episodes, the second half on another map (the ramp restarted,
    nothing marking the switch); its labels are the teacher's given the context since the switch only."""
    src, _ = source(fmt, switch=0.5)
    seen, remembered_differs = {6: 0, 12: 0}, False
    for micro in range(2):
        batch = src.batch(step=0, micro=micro)
        ids, mask, label, length = batch["input_ids"], batch["decision_mask"], batch["label"], batch["length"]
        for r in range(ids.shape[0]):
            log = contexts_log(fmt, [ids[r, : length[r]]])
            seen[log.num_episodes] += 1
            labels = label[r][mask[r]]
            first = log.start[6] if log.num_episodes == 12 else log.obs.size
            np.testing.assert_array_equal(labels[:first], teacher_labels(log)[:first])
            if log.num_episodes == 12:  # the second half labelled as a context of its own
                halves = dataclasses.replace(log, map_id=(np.arange(12) >= 6).astype(np.int32))
                np.testing.assert_array_equal(labels[first:], teacher_labels(halves)[first:])
                remembered_differs |= bool((labels[first:] != teacher_labels(log)[first:]).any())
            ret = batch["episode_return"][r][mask[r]]
            assert set(np.unique(ret)) <= {0.0, 1.0}
    assert seen[6] > 0 and seen[12] > 0  # both kinds, from the chunk's own draw
    assert remembered_differs  # a teacher that remembered the first map would have said otherwise somewhere
    again = source(fmt, switch=0.5)[0].batch(step=0, micro=1)
    assert all(np.array_equal(batch[k], again[k]) for k in batch)  # still a pure function of (seed, step, micro)
    with pytest.raises(ValueError, match="switch"):
        ProtocolConfig(switch=1.5).validate()


def test_append_contexts_joins_two_logs_context_by_context():
    maps = generate_maps(3, seed=2)
    a, la = play_protocol(maps, np.ones(2), seed=0)
    b, lb = play_protocol(maps[[2, 0]], np.ones(3), seed=1)
    log, take = append_contexts(a, b, np.array([1, -1, 0]))
    assert log.num_episodes == 2 + 3 + 2 + 2 + 3 and log.map_id.tolist() == [0] * 5 + [1] * 2 + [2] * 5
    for e_new, (src, e) in enumerate([(a, 0), (a, 1), (b, 3), (b, 4), (b, 5), (a, 2), (a, 3), (a, 4), (a, 5),
                                      (b, 0), (b, 1), (b, 2)]):
        for got, want in zip(log.episode(e_new), src.episode(e)):
            np.testing.assert_array_equal(got, want)
        assert log.final_obs[e_new] == src.final_obs[e] and log.returns[e_new] == src.returns[e]
    np.testing.assert_array_equal(np.concatenate([la, lb])[take][: a.length[:2].sum()], la[: a.length[:2].sum()])
    assert take.size == log.obs.size == a.obs.size + b.obs.size


@pytest.mark.parametrize("fmt", [compact_format(), StepFormat()], ids=["compact", "step"])
def test_relabel_renames_each_contexts_observations_by_one_permutation(fmt):
    """--protocol.relabel: the same contexts (actions, rewards, ends, labels) under other observation names, one
    bijection per context: renaming draws from its own stream and changes no other draw."""
    plain = source(fmt)[0].batch(step=2, micro=1)
    renamed = source(fmt, relabel=1.0)[0].batch(step=2, micro=1)
    for k in ("decision_mask", "action", "label", "length", "episode_return", "terminated", "truncated"):
        np.testing.assert_array_equal(plain[k], renamed[k])
    names_used, moved = set(), 0
    for r in range(plain["input_ids"].shape[0]):
        n = plain["length"][r]
        a, b = decode(fmt, plain["input_ids"][r, :n]), decode(fmt, renamed["input_ids"][r, :n])
        assert [e["actions"] for e in a] == [e["actions"] for e in b]
        pairs = {(o, p) for ea, eb in zip(a, b) for o, p in zip(ea["obs"], eb["obs"])}
        if fmt.name == "step":
            pairs |= {(ea["final_obs"], eb["final_obs"]) for ea, eb in zip(a, b)}
        forward, backward = dict(pairs), {p: o for o, p in pairs}
        assert len(forward) == len(backward) == len(pairs)  # a bijection on this context's observations
        moved += sum(o != p for o, p in pairs)
        names_used |= set(backward)
        # the teacher is blind to names: its labels from the renamed context are the batch's labels
        np.testing.assert_array_equal(renamed["label"][r][renamed["decision_mask"][r]],
                                      teacher_labels(contexts_log(fmt, [renamed["input_ids"][r, :n]])))
    assert moved > 0 and max(names_used) >= 25  # names beyond the 3-5 maps' 25 cells get trained
    with pytest.raises(ValueError, match="relabel"):
        ProtocolConfig(relabel=-0.1).validate()


def test_widen_numbers_each_map_as_if_it_sat_in_a_wider_grid():
    """--protocol.widen: same contexts (actions, labels, ends), observation r * ncol + c numbered r * w + c for a w
    between ncol + 1 and widen_to, one w per map; a move down then adds w."""
    fmt = StepFormat()
    plain = source(fmt)[0].batch(step=1, micro=0)
    wide = source(fmt, widen=1.0, widen_to=7)[0].batch(step=1, micro=0)
    for k in ("decision_mask", "action", "label", "length", "episode_return", "terminated", "truncated"):
        np.testing.assert_array_equal(plain[k], wide[k])
    strides = set()
    for r in range(plain["input_ids"].shape[0]):
        n = plain["length"][r]
        a, b = decode(fmt, plain["input_ids"][r, :n]), decode(fmt, wide["input_ids"][r, :n])
        pairs = {(o, p) for ea, eb in zip(a, b)
                 for o, p in zip(ea["obs"] + [ea["final_obs"]], eb["obs"] + [eb["final_obs"]])}
        for ea, eb in zip(a, b):  # a down move (action 1) that moved: the new number is the old + the grid's width
            for o0, o1, p0, p1, act in zip(ea["obs"], ea["obs"][1:], eb["obs"], eb["obs"][1:], ea["actions"]):
                if act == 1 and o1 != o0:
                    strides.add(p1 - p0)
                    assert p1 - p0 > o1 - o0  # wider than the map's own stride
        assert len(dict(pairs)) == len(pairs) and all(p >= o for o, p in pairs)  # a renumbering, never smaller
    assert strides and max(strides) <= 7
    with pytest.raises(ValueError, match="widen"):
        ProtocolConfig(widen=1.5).validate()


def test_a_grid_format_numbers_every_map_with_one_row_stride():
    """step-grid: the same contexts as step (actions, labels, ends) with observation r * ncol + c shown as r * 8 + c:
    a move down that moved adds 8 on every map, a move right 1; widen on top of it is refused."""
    plain = source(StepFormat())[0].batch(step=1, micro=0)
    grid = source(make_format("step-grid"))[0].batch(step=1, micro=0)
    for k in ("decision_mask", "action", "label", "length", "episode_return", "terminated", "truncated"):
        np.testing.assert_array_equal(plain[k], grid[k])
    fmt, steps = StepFormat(grid=8), {1: set(), 2: set()}
    for r in range(grid["input_ids"].shape[0]):
        n = grid["length"][r]
        a, b = decode(fmt, plain["input_ids"][r, :n]), decode(fmt, grid["input_ids"][r, :n])
        for ea, eb in zip(a, b):
            for o0, o1, p0, p1, act in zip(ea["obs"], ea["obs"][1:], eb["obs"], eb["obs"][1:], ea["actions"]):
                if act in steps and o1 != o0:
                    steps[act].add(p1 - p0)
    assert steps == {1: {8}, 2: {1}}
    with pytest.raises(ValueError, match="one grid already"):
        source(make_format("step-grid"), widen=0.5)


def test_shift_places_maps_at_random_offsets_on_the_grid_with_the_same_stride():
    """--protocol.shift (step-grid): same contexts, cells named (r + dr) * 8 + c + dc: a move down still adds 8, a
    move right 1, and names beyond the 5 x 5 corner get trained; without a grid format it is refused."""
    fmt = make_format("step-grid")
    plain = source(fmt)[0].batch(step=1, micro=0)
    shifted = source(fmt, shift=1.0)[0].batch(step=1, micro=0)
    for k in ("decision_mask", "action", "label", "length", "episode_return", "terminated", "truncated"):
        np.testing.assert_array_equal(plain[k], shifted[k])
    steps, offsets, names = {1: set(), 2: set()}, set(), set()
    for r in range(shifted["input_ids"].shape[0]):
        n = shifted["length"][r]
        a, b = decode(fmt, plain["input_ids"][r, :n]), decode(fmt, shifted["input_ids"][r, :n])
        for ea, eb in zip(a, b):
            offsets |= {p - o for o, p in zip(ea["obs"], eb["obs"])}
            names |= set(eb["obs"])
            for o0, o1, p0, p1, act in zip(ea["obs"], ea["obs"][1:], eb["obs"], eb["obs"][1:], ea["actions"]):
                if act in steps and o1 != o0:
                    steps[act].add(p1 - p0)
        assert len({p - o for ea, eb in zip(a, b) for o, p in zip(ea["obs"], eb["obs"])}) == 1  # one offset a map
    assert steps == {1: {8}, 2: {1}} and len(offsets) > 1 and max(names) >= 40 and any(x % 8 >= 5 for x in names)
    with pytest.raises(ValueError, match="shift"):
        source(StepFormat(), shift=0.5)
    with pytest.raises(ValueError, match="shift"):
        ProtocolConfig(shift=2.0).validate()


def _no_teacher(monkeypatch):
    """Make every entry point of the context teacher fail, wherever the source module reaches it."""
    from icrl_fast.envs import learners
    from icrl_fast.rl import sources

    def refuse(*a, **k):
        raise AssertionError("the context teacher was used")

    for mod in (learners, sources):
        for name in ("play_protocol", "teacher_labels", "teacher_choices", "teacher_observe"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, refuse)


@pytest.mark.parametrize("switch", [0.0, 0.5], ids=["no-switch", "switch"])
def test_q_learning_behaviour_uses_nothing_of_the_teacher(monkeypatch, switch):
    """--protocol.behaviour q-learning: contexts are a tabular Q-learner's protocol histories (the ramp's random
    actions beside it), their labels are all zero, and no teacher code runs (forget is the teacher's rule: off)."""
    from icrl_fast.envs.learners import q_learning_protocol
    from icrl_fast.protocol import paper_ramp

    fmt = StepFormat()
    src, _ = source(fmt, episodes=12, behaviour="q-learning", switch=switch, forget=True)
    _no_teacher(monkeypatch)
    assert not src.forget
    batch = src.batch(step=0, micro=0)
    assert batch["label"].max() == 0 and batch["decision_mask"].any()
    counts = [len(decode(fmt, batch["input_ids"][r, : n])) for r, n in enumerate(batch["length"])]
    counts += [len(decode(fmt, b["input_ids"][r, : n])) for b in [src.batch(step=0, micro=1)]
               for r, n in enumerate(b["length"])]
    # 24: switched to a second map, played by a fresh Q-learner
    assert set(counts) == {12} if switch == 0 else set(counts) == {12, 24}
    # the behaviour is the Q-learner: on the same maps and seed it plays the same actions
    maps = generate_maps(40, seed=2)
    a = q_learning_protocol(maps, paper_ramp(30), seed=5)
    b = q_learning_protocol(maps, paper_ramp(30), seed=5)
    np.testing.assert_array_equal(a.actions, b.actions)
    late = a.success.reshape(40, 30)[:, 20:].mean()
    early = a.success.reshape(40, 30)[:, :2].mean()
    assert late > early  # it learns within each context from zero: its late episodes beat the random first two


def test_a_behaviour_other_than_the_teacher_refuses_teacher_labels():
    with pytest.raises(ValueError, match="behaviour"):
        ProtocolConfig(behaviour="oracle").validate()
    with pytest.raises(ValueError, match="dagger"):
        ProtocolConfig(behaviour="q-learning", dagger=0.5).validate()
    from icrl_fast.presets import preset
    from icrl_fast.train import check_config

    cfg = preset("default")
    cfg.protocol.behaviour = "q-learning"
    cfg.objective.imitation = 1.0
    with pytest.raises(ValueError, match="imitation"):
        check_config(cfg)


def test_self_behaviour_contexts_are_the_models_own_with_no_labels(monkeypatch):
    from icrl_fast.model.qnet import ModelConfig, QNetwork
    from icrl_fast.rl.rollout import RolloutEngine

    fmt = compact_format()
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32, max_positions=4096),
                 fmt.vocab_size, fmt.action_ids, seed=0)
    cfg = ProtocolConfig(pool_maps=100, episodes=4, contexts=2, bucket=2, behaviour="self", max_len=4096)
    src = ProtocolSource(cfg, fmt, generate_maps(3, seed=0), seed=4, engine=RolloutEngine(q, fmt))
    _no_teacher(monkeypatch)
    batch = src.batch(step=0)
    assert batch["label"].max() == 0 and batch["decision_mask"].any() and len(src.dagger_success) == 1


def test_a_length_bucket_pads_batches_to_few_static_shapes_and_changes_no_loss():
    """``--protocol.length_bucket``: every batch's length is a multiple of the bucket; the padding is masked out of
    the transitions, so the TD loss (and its gradient) equals the unpadded batch's."""
    import torch

    from icrl_fast.model.qnet import ModelConfig, QNetwork
    from icrl_fast.rl.dqn import DQNConfig, dqn_loss

    fmt = StepFormat(grid=8)
    plain, _ = source(fmt)
    padded, _ = source(fmt, length_bucket=64)
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), fmt.vocab_size,
                 fmt.action_ids, seed=0, token_factors=fmt.token_factors)
    for step in range(3):
        a, b = plain.batch(step), padded.batch(step)
        width = a["input_ids"].shape[1]
        assert b["input_ids"].shape[1] == -(-width // 64) * 64 and b["input_ids"].shape[1] % 64 == 0
        np.testing.assert_array_equal(b["input_ids"][:, :width], a["input_ids"])
        assert (b["input_ids"][:, width:] == padded.pad).all()
        assert b["tr_valid"].sum() == a["tr_valid"].sum() > 0
        cfg = DQNConfig(gamma_episode=0.9)
        losses = []
        for batch in (a, b):
            q.zero_grad()
            loss, _ = dqn_loss(q, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()
                                   if k != "length"}, cfg)
            loss.backward()
            losses.append((loss.detach(), q.head_weight().grad.clone()))
        torch.testing.assert_close(losses[1][0], losses[0][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(losses[1][1], losses[0][1], rtol=1e-5, atol=1e-7)
