"""The same-state memory: its features against a brute-force reading of the context, and a model that uses them."""

import numpy as np
import pytest
import torch

from icrl_fast.data.step_format import KINDS, TYPE_LAND0, TYPE_START, StepFormat
from icrl_fast.envs.maps import generate_maps
from icrl_fast.evaluate import paper_ramp
from icrl_fast.model.qnet import ModelConfig, QNetwork
from icrl_fast.model.same_state_memory import GOAL, HOLE, MEMORY_DIM, MOVED, STAYED, SameStateMemory
from icrl_fast.rl.rollout import RolloutEngine

FMT = StepFormat(grid=8)


def reference(fmt: StepFormat, ids, forget: bool = False) -> np.ndarray:
    """The module docstring read literally: at each decision, look back at every earlier decision on the same cell
    and the token after it (O(L^2)); with ``forget``, only at those after the latest surprise."""
    typ, act, obs = (fmt.token_factors[:, i] for i in range(3))
    move = TYPE_LAND0 + KINDS.index("move")
    decision = [typ[i] in (TYPE_START, move) for i in ids]
    events = []  # (cell, action, outcome) of every answered decision, in order; a surprise restarts the list
    seen = {}
    for j in range(len(ids) - 1):
        if decision[j] and typ[ids[j + 1]] >= TYPE_LAND0:
            nxt = ids[j + 1]
            kind = KINDS[typ[nxt] - TYPE_LAND0]
            cell, a = obs[ids[j]], act[nxt] - 1
            c = {"goal": GOAL, "hole": HOLE}.get(kind, STAYED if obs[nxt] == cell else MOVED)
            surprise = forget and kind != "cut" and seen.get((cell, a), c) != c
            events.append((j + 1, cell, a, c, surprise))
            seen = {} if surprise else seen
            if kind != "cut":  # a cut's outcome is not what a surprise is checked against (the teacher's rule)
                seen[(cell, a)] = c
    out = np.zeros((len(ids), MEMORY_DIM), dtype=np.float32)
    for p, i in enumerate(ids):
        if not decision[p]:
            continue
        known = [e for e in events if e[0] <= p]  # a landing at or before p is in the context at p
        restart = max([k for k, e in enumerate(known) if e[4]], default=0)
        count, latest = np.zeros((4, 4)), {}
        for _, cell, a, c, _ in known[restart:]:
            if cell == obs[i]:
                count[a, c] += 1
                latest[a] = c
        out[p, :16] = np.log1p(count).ravel()
        for a, c in latest.items():
            out[p, 16 + 4 * a + c] = 1.0
    return out


def test_a_hand_written_context():
    f = FMT
    ids = [f.start(0), f.land(1, "move", 8), f.land(3, "move", 8), f.land(0, "hole", 16),
           f.start(0), f.land(1, "move", 8), f.land(2, "goal", 9), f.start(0)]
    got = SameStateMemory(f.token_factors).features(np.array(ids))
    want = np.zeros_like(got)
    want[2, 4 * 3 + STAYED], want[2, 16 + 4 * 3 + STAYED] = np.log1p(1), 1  # on 8: right bumped into a wall
    want[4, 4 * 1 + MOVED], want[4, 16 + 4 * 1 + MOVED] = np.log1p(1), 1  # on 0 again: down moved
    want[5, [4 * 3 + STAYED, 4 * 0 + HOLE]] = np.log1p(1)  # on 8 again: right stayed, left fell in a hole
    want[5, [16 + 4 * 3 + STAYED, 16 + 4 * 0 + HOLE]] = 1
    want[7, 4 * 1 + MOVED], want[7, 16 + 4 * 1 + MOVED] = np.log1p(2), 1  # down moved twice from 0
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got, reference(f, ids), rtol=1e-6)


@pytest.mark.parametrize("fmt", [StepFormat(), FMT, StepFormat(max_obs=49, show_end=False)],
                         ids=["step", "step-grid", "step-noend-49"])
def test_features_equal_the_brute_force_reading_of_played_contexts(fmt):
    """Contexts played on slippery maps (slips give STAYED and MOVED for one action), with cuts, goals and holes."""
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), fmt.vocab_size,
                 fmt.action_ids, seed=0, token_factors=fmt.token_factors).eval()
    maps = generate_maps(6, seed=3, height=(3, 6), width=(3, 7))
    out = RolloutEngine(q, fmt).run(maps, 12, 0.0, seed=2, is_slippery=True)
    memory = SameStateMemory(fmt.token_factors)
    width = max(map(len, out.tokens))
    padded = np.full((len(out.tokens), width), fmt.pad_id)
    for b, t in enumerate(out.tokens):
        padded[b, : len(t)] = t
    batch = memory.features(padded)  # right-padded rows, as a training batch
    kinds = set()
    for b, t in enumerate(out.tokens):
        want = reference(fmt, t.tolist())
        np.testing.assert_allclose(batch[b, : len(t)], want, rtol=1e-6)
        assert not batch[b, len(t):].any()
        stream, fed = memory.stream(2), 0  # the engine's incremental reader, fed in uneven blocks
        for n in (1, 3, 1, 7, 2, len(t)):
            n = min(n, len(t) - fed)
            if n:
                got = stream.tails([1], [(t[: fed + n].tolist(), n)], n + 2)[0]  # left-padded by two
                np.testing.assert_allclose(got[2:], want[fed: fed + n], rtol=1e-6)
                assert not got[:2].any()
                fed += n
        kinds |= set(np.flatnonzero(want[:, 16:].reshape(-1, 4, 4).any((0, 1))))
    assert kinds == {MOVED, STAYED, HOLE, GOAL} or (not fmt.show_end and kinds >= {MOVED, STAYED, HOLE})


def test_a_forgetting_memory_reads_a_switched_context_from_its_first_surprise_and_equals_the_other_without_one():
    fmt = FMT
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32, memory=True), fmt.vocab_size,
                 fmt.action_ids, seed=0, token_factors=fmt.token_factors).eval()
    maps = generate_maps(8, seed=5)
    engine = RolloutEngine(q, fmt)
    plain = engine.run(maps, 6, 0.0, seed=1)  # random actions on maps that do not change: no surprise
    switched = engine.run(maps, 12, 0.0, seed=1, switch_to=maps[np.roll(np.arange(8), 1)], switch_after=6)
    keep, forget = SameStateMemory(fmt.token_factors), SameStateMemory(fmt.token_factors, forget=True)
    for t in plain.tokens:
        np.testing.assert_array_equal(forget.features(t), keep.features(t))
    differ = 0
    for t in switched.tokens:
        want = reference(fmt, t.tolist(), forget=True)
        np.testing.assert_allclose(forget.features(t), want, rtol=1e-6)
        stream, fed = forget.stream(1), 0
        for n in (2, 5, 1, len(t)):
            n = min(n, len(t) - fed)
            if n:
                got = stream.tails([0], [(t[: fed + n].tolist(), n)], n)[0]
                np.testing.assert_allclose(got, want[fed: fed + n], rtol=1e-6)
                fed += n
        differ += not np.array_equal(want, reference(fmt, t.tolist()))
    assert differ >= 4  # most switched contexts hit a surprise


def test_a_surprise_empties_the_counts():
    f = FMT
    ids = [f.start(0), f.land(2, "move", 1), f.land(2, "goal", 2),  # right, right reaches the goal
           f.start(0), f.land(2, "move", 1), f.land(2, "hole", 2),  # the same moves: now a hole (the map changed)
           f.start(0)]
    keep = SameStateMemory(f.token_factors).features(np.array(ids))
    forget = SameStateMemory(f.token_factors, forget=True).features(np.array(ids))
    np.testing.assert_array_equal(forget[:5], keep[:5])
    assert keep[6, 4 * 2 + MOVED] == np.float32(np.log1p(2))  # from 0, right moved twice
    assert not forget[6].any()  # the hole at 1 wiped it all; nothing was learned about 0 since
    np.testing.assert_allclose(forget, reference(f, ids, forget=True), rtol=1e-6)


def test_a_cut_landing_is_neither_a_surprise_nor_what_one_is_checked_against():
    """The teacher's rule: the context shows no outcome for a cut (step-noend not even its cell), so a map that
    changed under a cut is noticed at the next landing that is not one."""
    f = FMT
    ids = [f.start(0), f.land(2, "move", 1), f.land(2, "goal", 2),  # right, right reaches the goal
           f.start(0), f.land(2, "move", 1), f.land(2, "cut", 2),   # the same, cut by the time limit on 2
           f.start(0), f.land(2, "move", 1), f.land(2, "move", 2),  # right from 1 moved: not the goal it was
           f.land(1, "hole", 10), f.start(0)]
    forget = SameStateMemory(f.token_factors, forget=True).features(np.array(ids))
    assert forget[7, 16 + 4 * 2 + MOVED] == 1 and forget[7, 4 * 2 + GOAL] > 0  # on 1: latest right a (cut) move
    assert not forget[-1].any()  # the surprise at 1 emptied everything; nothing known of 0 since
    np.testing.assert_allclose(forget, reference(f, ids, forget=True), rtol=1e-6)
    noend = StepFormat(grid=8, show_end=False)  # its cut token shows cell 0, as if the bump into a wall had moved
    ids = [noend.start(9), noend.land(3, "cut", 0), noend.start(9), noend.land(3, "move", 9), noend.start(9)]
    keep = SameStateMemory(noend.token_factors).features(np.array(ids))
    np.testing.assert_array_equal(SameStateMemory(noend.token_factors, forget=True).features(np.array(ids)), keep)


def test_bad_inputs_are_clear_errors():
    memory = SameStateMemory(FMT.token_factors)
    with pytest.raises(ValueError, match="token factors"):
        SameStateMemory(np.zeros((5, 2), dtype=int))
    with pytest.raises(ValueError, match="token ids"):
        memory.features(np.array([FMT.vocab_size]))
    with pytest.raises(ValueError, match="a tail of 2 tokens"):
        memory.stream(1).tails([0], [([FMT.start(0)], 2)], 4)  # more new tokens than the context has
    stream = memory.stream(1)
    stream.tails([0], [([FMT.start(0)], 1)], 4)
    with pytest.raises(ValueError, match="exactly the unread ones"):
        stream.tails([0], [([FMT.start(0), FMT.land(1, "move", 8), FMT.start(8)], 1)], 4)  # a token skipped
    for rows, n in (([1, 1], 2), ([-1, 1], 2), ([2], 1), ([[0]], 1), ([0], 2)):  # a context twice (-1 is 1 of 2),
        with pytest.raises(ValueError, match="distinct rows"):  # out of range, not 1-D, a context without a row
            memory.stream(2).tails(rows, [([FMT.start(0)], 1)] * n, 4)
    with pytest.raises(ValueError, match="token ids"):
        memory.stream(2).tails([0, 1], [([FMT.start(0)], 1), ([FMT.vocab_size], 1)], 4)
    fresh = memory.stream(2)  # a refused call reads nothing
    with pytest.raises(ValueError, match="token ids"):
        fresh.tails([0, 1], [([FMT.start(0)], 1), ([-1], 1)], 4)
    assert fresh.read.tolist() == [0, 0] and not fresh.count.any()
    with pytest.raises(ValueError, match="step format"):
        QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, memory=True), 64, [0, 1, 2, 3])


def tiny(memory: bool) -> QNetwork:
    return QNetwork(ModelConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64, memory=memory),
                    FMT.vocab_size, FMT.action_ids, seed=1, token_factors=FMT.token_factors).eval()


def test_the_model_reads_the_features_and_a_cached_call_must_bring_them():
    q = tiny(True)
    maps = generate_maps(4, seed=0, height=(3, 5), width=(3, 5))
    out = RolloutEngine(q, FMT).run(maps, 8, paper_ramp(8), seed=0)
    ids = torch.from_numpy(out.tokens[0])[None]
    with torch.no_grad():
        h = q.hidden(ids)
        feats = torch.from_numpy(q.memory.features(ids.numpy()))
        np.testing.assert_allclose(q.hidden(ids, memory=feats), h)  # computed here == given
        assert not torch.allclose(q.hidden(ids, memory=torch.zeros_like(feats)), h, atol=1e-4)  # and they matter
        for target in (False, True):  # the target network has its own copy of the projection
            assert (q.hidden(ids, target=target) - q.hidden(ids, target=target, memory=feats)).abs().max() == 0
    from icrl_fast.model.kv_cache import CACHE_ARG
    with pytest.raises(ValueError, match="cached call"):
        q.hidden(ids, **{CACHE_ARG: object()})
    with pytest.raises(ValueError, match="without the same-state memory"):
        tiny(False).hidden(ids, memory=feats)


def test_the_projection_trains_and_follows_the_target_update():
    q = tiny(True).train()
    proj, target = q.model.model.embed_tokens.memory, q.target.model.embed_tokens.memory
    torch.testing.assert_close(proj.weight, target.weight)
    maps = generate_maps(2, seed=1, height=(3, 4), width=(3, 4))
    out = RolloutEngine(q, FMT).run(maps, 6, 0.0, seed=0)
    q.hidden(torch.from_numpy(out.tokens[0])[None]).square().sum().backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        proj.weight.add_(1.0)
    q.polyak_update(0.5)
    torch.testing.assert_close(target.weight, proj.weight - 0.5)
