"""The device-resident context player (``icrl_fast.rl.player``) equals today's engine: with per-map draws
``RolloutEngine.collect`` at every width, with lockstep draws ``RolloutEngine.run`` (map switches and slippery maps
included) -- contexts, decisions, outcomes and paths bit-equal, Q within 1e-5 -- and its step reads nothing back to
the host (``no_host_sync``) and compiles as one graph (``fullgraph=True``)."""

import numpy as np
import pytest
import torch
from test_collect import assert_same_episodes  # tests/rl is on sys.path (pytest's rootdir mode)
from test_rollout import assert_engine_equals_full_forward, tiny

from icrl_fast.data.formats import compact_format
from icrl_fast.data.step_format import StepFormat
from icrl_fast.envs.maps import generate_maps
from icrl_fast.evaluate import paper_ramp
from icrl_fast.rl.player import ContextPlayer
from icrl_fast.rl.rollout import RolloutEngine
from icrl_fast.sync_guard import HostSyncError, no_host_sync

GRID = StepFormat(grid=8)
MAPS = generate_maps(9, seed=0, height=(2, 7), width=(2, 7), min_hops=1)  # mixed sizes: ragged contexts
MAPS_B = generate_maps(9, seed=5, height=(2, 7), width=(2, 7), min_hops=1)


def model(fmt=GRID, memory=True, forget=True, kv_heads=None):
    q = tiny(fmt, memory=memory, heads=4, kv_heads=kv_heads)
    if memory:
        q.memory.forget = forget
    return q


@pytest.mark.parametrize("memory", [False, True], ids=["plain", "memory+forget"])
@pytest.mark.parametrize("width", [1, 4, 9])
@pytest.mark.parametrize("slippery", [False, True], ids=["still", "slippery"])
def test_player_equals_collect_at_every_width(memory, width, slippery):
    q = model(memory=memory)
    ref = RolloutEngine(q, GRID).collect(MAPS, 6, paper_ramp(6), seed=2, width=width, is_slippery=slippery)
    out = ContextPlayer(q, GRID, initial_capacity=8).play(MAPS, 6, paper_ramp(6), seed=2, width=width,
                                                         is_slippery=slippery)
    assert_same_episodes(ref, out)
    assert out.length.sum() > 60


@pytest.mark.parametrize("slippery", [False, True], ids=["still", "slippery"])
@pytest.mark.parametrize("switch", [False, True], ids=["one-map", "switch"])
def test_player_lockstep_equals_run(slippery, switch):
    q = model(kv_heads=2)  # grouped-query attention too
    kwargs = {"switch_to": MAPS_B, "switch_after": 4} if switch else {}
    ref = RolloutEngine(q, GRID).run(MAPS, 8, paper_ramp(8), seed=3, is_slippery=slippery, **kwargs)
    out = ContextPlayer(q, GRID, sync_every=5).play(MAPS, 8, paper_ramp(8), seed=3, draws="lockstep",
                                                   is_slippery=slippery, **kwargs)
    assert_same_episodes(ref, out)


def test_player_q_equals_a_full_forward_and_results_do_not_depend_on_the_width():
    q = model(fmt=StepFormat())
    outs = [ContextPlayer(q, StepFormat()).play(MAPS, 5, paper_ramp(5), seed=7, width=w) for w in (2, 5, 9)]
    assert_engine_equals_full_forward(q, StepFormat(), outs[0], None)
    for other in outs[1:]:
        assert_same_episodes(outs[0], other)


def test_player_outcomes_without_the_tapes_are_the_same():
    q = model()
    full = ContextPlayer(q, GRID).play(MAPS, 4, 0.5, seed=1, width=3)
    lean = ContextPlayer(q, GRID).play(MAPS, 4, 0.5, seed=1, width=3, record=False)
    for name in ("success", "hole", "truncated", "length", "episode_return"):
        np.testing.assert_array_equal(getattr(full, name), getattr(lean, name))
    assert lean.tokens == [] and lean.q == []


def test_player_refuses_what_it_cannot_play():
    with pytest.raises(ValueError, match="step formats"):
        ContextPlayer(tiny(compact_format()), compact_format())
    player = ContextPlayer(model(), GRID)
    with pytest.raises(ValueError, match="width must be >= maps"):
        player.play(MAPS, 3, 1.0, seed=0, width=4, draws="lockstep")
    with pytest.raises(ValueError, match="lockstep"):
        player.play(MAPS, 3, 1.0, seed=0, width=4, switch_to=MAPS_B, switch_after=1)
    with pytest.raises(ValueError, match="draws"):
        player.play(MAPS, 3, 1.0, seed=0, draws="shared")
    with pytest.raises(ValueError, match="positions"):
        ContextPlayer(model(), GRID, max_positions=10, sync_every=4).play(MAPS, 6, 0.0, seed=0)


def _started(draws="per-map", width=4, **kwargs):
    player = ContextPlayer(model(), GRID)
    s = player.start(MAPS, 6, paper_ramp(6), seed=0, width=width if draws == "per-map" else None, draws=draws,
                     **kwargs)
    if draws == "lockstep":
        player.upload_draws(s, np.random.default_rng(0))
    return player, s


@pytest.mark.parametrize("draws", ["per-map", "lockstep"])
def test_player_step_no_sync(draws):
    """Steps with refills (per-map: 9 maps through 4 rows) or a switch (lockstep) run under the host-sync guard."""
    kwargs = {"switch_to": MAPS_B, "switch_after": 1} if draws == "lockstep" else {}
    player, s = _started(draws, **kwargs)
    with torch.no_grad(), no_host_sync():
        for _ in range(30):
            player._step(s)
    assert int(s.n_tok.sum()) > 30  # the steps played
    with pytest.raises(HostSyncError), torch.no_grad(), no_host_sync():  # the guard is live: a read is caught
        player._step(s)
        bool(s.busy.any())


def test_player_step_fullgraph():
    """One graph (no break) for the whole step: env, tokens, memory, exploration, refill and the model."""
    player, s = _started()
    ref_player, ref = _started()
    step = torch.compile(player._step, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.no_grad():
        for _ in range(12):
            step(s)
            ref_player._step(ref)
    for name in ("ids", "valid", "busy", "map_id", "episode", "n_tok"):
        torch.testing.assert_close(getattr(s, name), getattr(ref, name), rtol=0, atol=0)
    torch.testing.assert_close(s.q_tape, ref.q_tape, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_player_step_fullgraph_inductor():
    """The same with inductor (C++ codegen on the CPU): what a GPU would run, as one compiled step."""
    player = ContextPlayer(model(), GRID, compile=True)
    out = player.play(MAPS, 4, paper_ramp(4), seed=0, width=4)
    ref = ContextPlayer(model(), GRID).play(MAPS, 4, paper_ramp(4), seed=0, width=4)
    assert_same_episodes(ref, out)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_player_sdpa_attention_equals_the_dense_reference(kv_heads):
    """The CPU's fused-SDPA decode attention equals the dense masked reference on ragged lengths and positions."""
    from icrl_fast.model.decode_step import reference_decode_attention, sdpa_decode_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 2, 4, 16, generator=g)
    k, v = (torch.randn(5, kv_heads, 37, 16, generator=g) for _ in range(2))
    lengths = torch.tensor([1, 37, 5, 20, 2])
    qpos = torch.stack((lengths - 2, lengths - 1), 1).clamp(min=0)
    want = reference_decode_attention(q.double(), k.double(), v.double(), lengths, qpos, 0.25).float()
    torch.testing.assert_close(sdpa_decode_attention(q, k, v, lengths, qpos, 0.25), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference_decode_attention(q, k, v, lengths, qpos, 0.25), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory", [False, True], ids=["plain", "memory+forget"])
def test_player_with_a_prefix_equals_run(memory):
    """Hand-written episodes before each context (the stitching and imitation probes' prefix; ragged, one empty):
    read in one prefill call, then played as ``run`` plays them."""
    q = model(memory=memory)
    host = RolloutEngine(q, GRID, player=False)
    episodes = [host.streams.episode([0, 1, 9], [2, 1], [0.0, 0.0]), host.streams.episode([0, 8], [1], [0.0])]
    prefix = [episodes[b % 2] * (b % 3) for b in range(len(MAPS))]  # 0, 1 or 2 copies: ragged, some empty
    ref = host.run(MAPS, 5, paper_ramp(5), seed=4, prefix=prefix)
    out = RolloutEngine(q, GRID).run(MAPS, 5, paper_ramp(5), seed=4, prefix=prefix)
    assert_same_episodes(ref, out)
    assert (out.token_episode[2][: len(prefix[2])] == -1).all() and len(prefix[2]) > 0


def test_player_graph_falls_back_to_eager_off_cuda():
    """``graph=True`` needs a CUDA device; elsewhere the step runs eagerly, with a warning, and plays the same."""
    q = model()
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        player = ContextPlayer(q, GRID, graph=True)
    assert not player.graph
    assert_same_episodes(ContextPlayer(q, GRID).play(MAPS, 3, 0.5, seed=0, width=4),
                         player.play(MAPS, 3, 0.5, seed=0, width=4), q_exact=True)


def test_player_on_the_triton_ragged_kernel_equals_the_cpu_attention():
    """The GPU's attention (``icrl_kernels.ragged_decode_attention`` on the player's ``[B, KVH, S, D]`` cache, run by
    Triton's interpreter here) plays what SDPA plays: a whole rollout, refills included."""
    from functools import partial

    from icrl_fast.model.decode_step import triton_decode_attention

    q = model(kv_heads=2)
    maps = MAPS[np.arange(4)]
    ref = ContextPlayer(q, GRID, initial_capacity=16).play(maps, 2, paper_ramp(2), seed=1, width=3)
    out = ContextPlayer(q, GRID, initial_capacity=16, attention=partial(triton_decode_attention, backend="triton")
                        ).play(maps, 2, paper_ramp(2), seed=1, width=3)
    assert_same_episodes(ref, out)


def test_rollout_options_reach_the_player():
    """``--rollout.graph`` / ``--rollout.compile`` (``RolloutConfig``) go through ``RolloutEngine`` to its player: off
    CUDA the graph falls back to eager with a warning; a compiled player plays what the eager one plays."""
    from icrl_fast.presets import RolloutConfig

    q = model()
    assert RolloutConfig().engine_options() == {"graph": False, "compile": False}
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        assert not RolloutEngine(q, GRID, graph=True).player().graph
    compiled = RolloutEngine(q, GRID, compile="aot_eager")
    assert compiled.player().compiled
    assert_same_episodes(RolloutEngine(q, GRID).run(MAPS, 3, paper_ramp(3), seed=0),
                         compiled.run(MAPS, 3, paper_ramp(3), seed=0))
