"""Continuous batching (``RolloutEngine.collect``): M maps through ``width`` cache rows, a finished context's row
restarted for the next map. Q through a reused row equals a full forward over its own context; the batch stays
``width`` wide while maps wait; a map's episodes depend on (seed, map index), not on the schedule."""

import numpy as np
import pytest
from test_rollout import assert_engine_equals_full_forward, tiny  # tests/rl is on sys.path (pytest's rootdir mode)

from icrl_fast.data.formats import compact_format, decode
from icrl_fast.envs.maps import generate_maps
from icrl_fast.evaluate import paper_ramp
from icrl_fast.model.attention import register_kvcache_attention
from icrl_fast.rl.rollout import ContextLog, RolloutEngine

FMT = compact_format()
MAPS = generate_maps(9, seed=0, height=(2, 7), width=(2, 7), min_hops=1)  # mixed sizes: ragged blocks and lengths


def assert_same_episodes(a, b, q_exact: bool = False):
    """Two rollouts played the same episodes (every field exactly; Q exactly or to fp32 rounding: batches of a
    different make-up)."""
    for name in ("success", "hole", "truncated", "length", "episode_return"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.paths == b.paths
    for x, y in ((a.tokens, b.tokens), (a.token_episode, b.token_episode), (a.decision_pos, b.decision_pos)):
        assert len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y))
    for u, v in zip(a.q, b.q):
        (np.testing.assert_array_equal if q_exact else np.testing.assert_allclose)(u, v, **(
            {} if q_exact else {"rtol": 1e-5, "atol": 1e-6}))


@pytest.mark.parametrize("window", [None, 23])
def test_q_through_a_reused_row_equals_a_full_forward_over_its_new_context(window):
    """9 maps through 3 rows: every row is restarted about twice, and Q at every decision of every map equals a
    (sliding-window) full forward over that map's context alone -- the old keys are never attended again."""
    q = tiny(FMT)
    engine = RolloutEngine(q, FMT, window=window)
    episodes = 6 if window is None else 12
    out = engine.collect(MAPS, episodes, paper_ramp(episodes) if window is None else 0.0, seed=0, width=3)
    assert len(out.tokens) == len(MAPS) and max(engine.batch_sizes) == 3
    assert sum(engine.batch_sizes) == out.length.sum()  # one Q read per action, nothing else
    assert len({len(t) for t in out.tokens}) > 1
    assert window is None or min(len(t) for t in out.tokens) > 2 * window  # the ring wrapped in reused rows
    assert_engine_equals_full_forward(q, FMT, out, window)


def test_reused_rows_on_the_kvcache_attention_equal_a_full_forward():
    """The seqlens path (flash-attn's ``cache_seqlens`` contract; its torch reference on the CPU) reads only slots
    ``1 .. length``: a restarted row's length 0 hides its old keys there too."""
    q = tiny(FMT)
    q.model.set_attn_implementation(register_kvcache_attention())
    try:
        out = RolloutEngine(q, FMT).collect(MAPS, 4, paper_ramp(4), seed=1, width=2)
    finally:
        q.model.set_attn_implementation("sdpa")  # the reference full forward
    assert_engine_equals_full_forward(q, FMT, out, None)


def test_with_every_map_in_the_batch_greedy_collection_equals_run():
    """width >= M: the same schedule as ``run``. With greedy actions (``p_model = 1``: no exploration draw decides
    anything) both play the same episodes and read the same Q; the env streams are the same ``(seed, b)``.
    With exploration they differ by design: ``run`` draws all contexts' exploration from one shared generator per
    lockstep step, ``collect`` from a stream per map (so that a map's episodes do not depend on the schedule)."""
    q = tiny(FMT)
    engine = RolloutEngine(q, FMT)
    ran = engine.run(MAPS, 4, 1.0, seed=3)
    for width in (len(MAPS), 64):
        assert_same_episodes(engine.collect(MAPS, 4, 1.0, seed=3, width=width), ran, q_exact=True)
    explored = engine.collect(MAPS, 4, 0.0, seed=3, width=len(MAPS))
    assert any(len(x) != len(y) or (x != y).any() for x, y in zip(explored.tokens, engine.run(MAPS, 4, 0.0, 3).tokens))


def test_a_maps_episodes_do_not_depend_on_the_width():
    """Random actions (``p_model = 0``): every map plays exactly the same episodes whatever the width (its env and
    exploration streams are its own), and a seed fixes everything."""
    q = tiny(FMT)
    engine = RolloutEngine(q, FMT)
    wide = engine.collect(MAPS, 4, 0.0, seed=5, width=len(MAPS))
    for width in (1, 4):
        assert_same_episodes(engine.collect(MAPS, 4, 0.0, seed=5, width=width), wide)
    assert_same_episodes(engine.collect(MAPS, 4, 0.0, seed=5, width=4), engine.collect(MAPS, 4, 0.0, seed=5, width=4),
                         q_exact=True)
    other = engine.collect(MAPS, 4, 0.0, seed=6, width=4)
    assert any(len(x) != len(y) or (x != y).any() for x, y in zip(wide.tokens, other.tokens))


def test_the_batch_stays_width_wide_until_fewer_than_width_maps_remain(monkeypatch):
    """Every call carries ``width`` contexts up to the call that feeds the last map's first block; after it the
    batch only shrinks (finished rows are dropped). Lockstep ``run`` on chunks of ``width`` maps spends a smaller
    share of its calls at full width (its tail)."""
    q = tiny(FMT)
    engine = RolloutEngine(q, FMT)
    started = {}  # map -> the index of the call that first feeds it
    start = ContextLog.start
    monkeypatch.setattr(ContextLog, "start", lambda self, b, *a: (started.__setitem__(int(b), len(engine.batch_sizes)),
                                                                 start(self, b, *a))[1])
    maps = generate_maps(12, seed=2, height=(3, 6), width=(3, 6))
    width = 4
    out = engine.collect(maps, 3, 0.0, seed=0, width=width)
    sizes = np.asarray(engine.batch_sizes)
    assert sorted(started) == list(range(12)) and [started[b] for b in range(12)] == sorted(started.values())
    last = started[11]
    assert last > 0 and (sizes[: last + 1] == width).all()
    assert (np.diff(sizes[last:]) <= 0).all() and sizes[-1] >= 1
    assert sizes.sum() == out.length.sum()
    full = (sizes == width).mean()
    chunks = []
    for c in range(0, 12, width):
        engine.run(maps[c: c + width], 3, 0.0, seed=0)
        chunks += engine.batch_sizes
    assert (np.asarray(chunks) == width).mean() < full


def test_collected_contexts_are_the_training_format_with_a_prefix():
    maps = generate_maps(5, seed=5, height=(3, 5), width=(3, 5))
    prefix = [FMT.episode_start.tolist() * (b % 2) for b in range(5)]
    out = RolloutEngine(tiny(FMT), FMT).collect(maps, 3, 0.5, seed=2, width=2, prefix=prefix)
    for b in range(5):
        assert (out.token_episode[b][: len(prefix[b])] == -1).all()
        episodes = decode(FMT, out.tokens[b][len(prefix[b]):])
        assert len(episodes) == 3
        for e, ep in enumerate(episodes):
            assert float(out.episode_return[b, e]) == sum(ep["rewards"])
            assert len(ep["actions"]) == out.length[b, e] and ep["obs"] == out.paths[b][e][:-1]


def test_width_must_be_a_positive_int():
    engine = RolloutEngine(tiny(FMT), FMT)
    for width in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="width"):
            engine.collect(MAPS, 1, 0.0, seed=0, width=width)


def test_a_restarted_row_starts_at_position_0_with_every_old_slot_empty():
    """``RolloutCache.restart`` in isolation: row 0 restarts, row 1 goes on; the new block's positions start at 0
    and its mask admits only the slots just written (the old ones hold position -1), row 1 still sees its past."""
    import torch

    from icrl_fast.model.kv_cache import RolloutCache

    cache = RolloutCache(1, 2, initial_capacity=8)
    cache.plan(torch.tensor([5, 5]), 5)
    cache.layers[0].update(torch.randn(2, 1, 5, 2), torch.randn(2, 1, 5, 2))
    cache.restart(torch.tensor([0]))
    assert cache.lengths.tolist() == [0, 5] and (cache.slot_pos[0] == -1).all()
    pos, mask = cache.plan(torch.tensor([2, 1]), 2)
    assert pos.tolist() == [[0, 1], [5, 5]] and cache.lengths.tolist() == [2, 6]
    assert cache.slot_pos[0].tolist()[:7] == [-1, 0, 1, -1, -1, -1, -1]
    allowed = (mask[:, 0] == 0).int()
    assert allowed[0].tolist() == [[0, 1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0]]
    assert allowed[1, 1].tolist() == [0, 1, 1, 1, 1, 1, 1]
