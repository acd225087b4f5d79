"""The rollout engine: Q read through the reused KV cache equals Q of one full forward over the finished context."""

import copy

import numpy as np
import pytest
import torch

from icrl_fast.data.formats import compact_format, decode, paper_format, token_contract
from icrl_fast.data.step_format import StepFormat, observation_names
from icrl_fast.envs.maps import generate_maps
from icrl_fast.evaluate import paper_ramp
from icrl_fast.model.attention import KVCACHE, kvcache_attention, register_kvcache_attention
from icrl_fast.model.kv_cache import RolloutCache, sliding_window_mask
from icrl_fast.model.qnet import ModelConfig, QNetwork
from icrl_fast.rl.rollout import RolloutEngine

FORMATS = [compact_format(), paper_format(), StepFormat(), StepFormat(grid=8)]
FORMAT_IDS = ["compact", "paper", "step", "step-grid"]


def tiny(fmt, max_positions=8192, heads=2, kv_heads=None, memory=False):
    return QNetwork(ModelConfig(hidden_size=32, layers=2, heads=heads, kv_heads=kv_heads, intermediate_size=64,
                                max_positions=max_positions, memory=memory), fmt.vocab_size, fmt.action_ids, seed=1,
                    token_factors=getattr(fmt, "token_factors", None)).eval()


def recording(engine: RolloutEngine) -> list[RolloutCache]:
    """The caches ``engine`` builds from now on (to inspect their buffers after a run)."""
    caches, new = [], engine.new_cache
    engine.new_cache = lambda *a: caches.append(new(*a)) or caches[-1]
    return caches


def full_forward_q(q, ids: np.ndarray, decisions: np.ndarray, window: int | None) -> np.ndarray:
    t = torch.from_numpy(ids)[None]
    with torch.no_grad():
        h = q.hidden(t, attention_mask=sliding_window_mask(len(ids), window))[0]
        return q.q_values(h[torch.from_numpy(decisions)]).numpy()


def assert_engine_equals_full_forward(q, fmt, out, window):
    for b in range(len(out.tokens)):
        mask, _ = token_contract(fmt, out.tokens[b])
        decisions = np.flatnonzero(mask)
        # Q was read exactly at the decisions (every decision got its action; nothing else was read)
        np.testing.assert_array_equal(out.decision_pos[b], decisions)
        assert len(decisions) == out.length[b].sum()
        full = full_forward_q(q, out.tokens[b], decisions, window)
        np.testing.assert_allclose(out.q[b], full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_engine_q_equals_a_full_forward_over_each_finished_context(fmt):
    q = tiny(fmt)
    maps = generate_maps(7, seed=0, height=(2, 7), width=(2, 7), min_hops=1)  # mixed sizes: ragged blocks
    out = RolloutEngine(q, fmt).run(maps, 6, paper_ramp(6), seed=0)
    assert out.length.sum() > 60 and len({len(t) for t in out.tokens}) > 1
    assert out.length.sum(1).min() < out.length.sum(1).max()  # some contexts finished early (zero-token steps)
    assert_engine_equals_full_forward(q, fmt, out, None)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("window", [23, 64])
def test_ring_buffer_equals_a_sliding_window_full_forward(fmt, window):
    """Contexts many times the window: the ring wraps repeatedly and keeps absolute RoPE positions."""
    q = tiny(fmt)
    maps = generate_maps(5, seed=1, height=(3, 6), width=(3, 6))
    episodes = 70 if isinstance(fmt, StepFormat) else 30  # one token per step: more episodes to wrap as often
    out = RolloutEngine(q, fmt, window=window).run(maps, episodes, 0.0, seed=3)
    assert min(len(t) for t in out.tokens) > 2 * window
    assert_engine_equals_full_forward(q, fmt, out, window)
    # and the window matters: the unwindowed engine reads different Q-values late in the context
    unbounded = RolloutEngine(q, fmt).run(maps, episodes, 0.0, seed=3)
    assert not np.allclose(unbounded.q[0][-1], out.q[0][-1], rtol=1e-3)


@pytest.mark.parametrize("window", [None, 23])
def test_a_model_with_the_same_state_memory_reads_through_the_cache_what_a_full_forward_reads(window):
    """The engine feeds the memory features of only the new tokens, computed from each whole context; lockstep, the
    ring buffer and continuous batching (reused rows) all equal a full forward over the finished context."""
    fmt = FORMATS[3]
    q = tiny(fmt, memory=True)
    maps = generate_maps(7, seed=0, height=(2, 7), width=(2, 7), min_hops=1)
    episodes = 30 if window else 6
    out = RolloutEngine(q, fmt, window=window).run(maps, episodes, paper_ramp(episodes), seed=0)
    assert_engine_equals_full_forward(q, fmt, out, window)
    out = RolloutEngine(q, fmt, window=window).collect(maps, episodes, paper_ramp(episodes), seed=0, width=3)
    assert_engine_equals_full_forward(q, fmt, out, window)
    if window:
        assert min(len(t) for t in out.tokens) > 2 * window


def test_a_window_lets_contexts_outgrow_the_model_positions():
    fmt = compact_format()
    q = tiny(fmt, max_positions=64)
    maps = generate_maps(3, seed=4)
    with pytest.raises(ValueError, match="max_positions"):
        RolloutEngine(q, fmt, max_positions=64).run(maps, 8, 0.0, seed=0)
    out = RolloutEngine(q, fmt, window=48, max_positions=64).run(maps, 8, 0.0, seed=0)
    assert max(len(t) for t in out.tokens) > 64


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_rollout_records_episodes_as_the_training_format_does(fmt):
    maps = generate_maps(4, seed=5, height=(3, 5), width=(3, 5))
    out = RolloutEngine(tiny(fmt), fmt).run(maps, 5, 0.5, seed=2)
    names = observation_names(fmt, maps)  # step-grid: the tokens show r * 8 + c, the paths gymnasium's numbers
    for b in range(4):
        episodes = decode(fmt, out.tokens[b])
        assert len(episodes) == 5
        for e, ep in enumerate(episodes):
            idx = np.flatnonzero(out.token_episode[b] == e)
            assert idx.size and (np.diff(idx) == 1).all()  # each episode is one contiguous run of tokens
            assert decode(fmt, out.tokens[b][idx])[0] == ep  # which decodes to exactly that episode
            assert float(out.episode_return[b, e]) == sum(ep["rewards"])
            assert len(ep["actions"]) == out.length[b, e]
            path = out.paths[b][e] if names is None else names[b, out.paths[b][e]].tolist()
            assert ep["obs"] == path[:-1]
            assert ep.get("final_obs", path[-1]) == path[-1]  # the step format shows it


def test_rollouts_are_seeded():
    fmt = compact_format()
    q, maps = tiny(fmt), generate_maps(4, seed=6)
    a, b = (RolloutEngine(q, fmt).run(maps, 4, 0.5, seed=9) for _ in range(2))
    c = RolloutEngine(q, fmt).run(maps, 4, 0.5, seed=10)
    assert all((x == y).all() for x, y in zip(a.tokens, b.tokens))
    assert any(len(x) != len(y) or (x != y).any() for x, y in zip(a.tokens, c.tokens))


def test_cache_grows_keeps_its_contents_and_drops_finished_contexts():
    """A tiny initial capacity forces a doubling; the plan's mask and positions stay exact; ``keep`` drops rows."""
    cache = RolloutCache(1, 3, initial_capacity=4)
    k = torch.randn(3, 1, 3, 2)
    pos, mask = cache.plan(torch.tensor([3, 1, 2]), 3)
    cache.layers[0].update(k, k)
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0], [1, 0, 1]]  # padding repeats the newest position
    cache.keep([0, 1])  # context 2 finished
    pos, mask = cache.plan(torch.tensor([2, 3]), 3)
    keys, _ = cache.layers[0].update(torch.randn(2, 1, 3, 2), torch.randn(2, 1, 3, 2))
    assert cache.capacity >= 5 and pos.tolist() == [[4, 3, 4], [1, 2, 3]]
    assert keys.shape[2] == mask.shape[-1] == 1 + 5  # attention reads the used prefix only (+ the padding slot)
    torch.testing.assert_close(keys[0, :, 1:4], k[0])  # what was written before the growth is still there
    torch.testing.assert_close(keys[1, :, 1:2], k[1, :, 2:])
    allowed = (mask[1, 0] == 0).int().tolist()  # context 1 (4 tokens) attends causally to its 4 slots only
    assert [row[1:5] for row in allowed] == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]] and sum(map(sum, allowed)) == 9
    with pytest.raises(ValueError, match="window"):
        RolloutCache(1, 1, window=0)


def test_contexts_beyond_16k_tokens_evaluate_and_train():
    """A hole-free 7x7 map under a random policy: ~100-step episodes, ~2k tokens each in the paper format."""
    from icrl_fast.envs.maps import MapBatch
    from icrl_fast.rl.dqn import DQNConfig, dqn_loss
    from icrl_fast.rl.replay import ContextReplay

    fmt = paper_format()
    q = tiny(fmt, max_positions=32768)
    maps = MapBatch.from_descs([["SFFFFFF"] + ["FFFFFFF"] * 5 + ["FFFFFFG"]] * 2)
    out = RolloutEngine(q, fmt, max_positions=32768).run(maps, 20, 0.0, seed=0)
    assert min(len(t) for t in out.tokens) > 16_384
    ids = out.tokens[0]
    decisions = out.decision_pos[0]
    with torch.no_grad():  # the engine's last Q-values equal a full forward over the whole (16k+) context
        full = q.q_values(q.hidden(torch.from_numpy(ids)[None])[0, torch.from_numpy(decisions[-5:])]).numpy()
    np.testing.assert_allclose(out.q[0][-5:], full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    replay = ContextReplay(fmt, capacity=2, slice_len=17_000)  # and a 17k-token slice trains (SDPA: linear memory)
    replay.add(out)
    batch = {k: torch.from_numpy(v) for k, v in replay.sample(1, np.random.default_rng(0)).items()}
    loss, _ = dqn_loss(q, batch, DQNConfig())
    loss.backward()
    assert batch["input_ids"].shape[1] == 17_000 and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in q.trainable_parameters())


@pytest.mark.parametrize("window,expected", [(None, KVCACHE), (23, "sdpa")])
def test_a_flash_attention_model_rolls_out_on_the_kvcache_path_and_is_restored(monkeypatch, window, expected):
    """flash-attn takes no 4D mask: without a window the engine switches a flash model to the kv-cache attention
    (per-context cache_seqlens; flash-attn's kernel, its torch reference here), with a ring to SDPA, and back."""
    fmt = compact_format()
    q = tiny(fmt)
    seen = []
    monkeypatch.setattr(q.model.config, "_attn_implementation", "flash_attention_2")
    monkeypatch.setattr(q.model, "set_attn_implementation",
                        lambda impl: (seen.append(impl), q.model.config.__setattr__("_attn_implementation", impl)))
    maps = generate_maps(4, seed=0)
    out = RolloutEngine(q, fmt, window=window).run(maps, 4, paper_ramp(4), seed=0)
    assert seen == [expected, "flash_attention_2"] and out.length.sum() > 0
    assert q.model.config._attn_implementation == "flash_attention_2"
    monkeypatch.undo()  # back on SDPA: the reference full forward
    assert_engine_equals_full_forward(q, fmt, out, window)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
def test_the_kvcache_attention_reads_q_equal_to_the_masked_cache_and_a_full_forward(fmt, monkeypatch):
    """The seqlens path (no mask; flash_attn_with_kvcache's contract, served by its reference on the CPU) reads the
    same Q as the masked SDPA path and as one full forward: ragged blocks, early finishers, mixed map sizes. (The host
    loop's cache paths: the step formats' own player, which needs neither, is switched off.)"""
    q = tiny(fmt)
    maps = generate_maps(7, seed=0, height=(2, 7), width=(2, 7), min_hops=1)
    masked = RolloutEngine(q, fmt, player=False).run(maps, 6, paper_ramp(6), seed=0)
    masks = []
    plan = RolloutCache.plan
    monkeypatch.setattr(RolloutCache, "plan", lambda self, *a, **k: masks.append(plan(self, *a, **k)) or masks[-1])
    q.model.set_attn_implementation(register_kvcache_attention())
    flash = RolloutEngine(q, fmt, player=False).run(maps, 6, paper_ramp(6), seed=0)
    assert masks and all(mask is None for _, mask in masks)  # no [B, S, C] mask was built
    assert masked.length.sum(1).min() < masked.length.sum(1).max()
    for b in range(len(maps)):
        np.testing.assert_array_equal(flash.tokens[b], masked.tokens[b])
        np.testing.assert_allclose(flash.q[b], masked.q[b], rtol=1e-5, atol=1e-6)
    q.model.set_attn_implementation("sdpa")  # the reference full forward
    assert_engine_equals_full_forward(q, fmt, flash, None)


def test_seqlens_mode_needs_contiguous_positions_and_the_kvcache_attention_its_lengths():
    with pytest.raises(ValueError, match="no window"):
        RolloutCache(2, 3, window=8, seqlens=True)
    x = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="cache_seqlens"):
        kvcache_attention(None, x, x, x)


@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("window", [None, 23])
def test_grouped_query_attention_rolls_out_exactly_on_a_smaller_cache(kv_heads, window):
    """4 query heads share 2 (or 1) key/value heads: the cache holds kv_heads heads, and Q through it equals a full
    (sliding-window) forward at fp32 tolerance, ring included -- the same check as the MHA tests above."""
    fmt = compact_format()
    q = tiny(fmt, heads=4, kv_heads=kv_heads)
    assert q.model.config.num_key_value_heads == kv_heads and q.model.config.num_attention_heads == 4
    maps = generate_maps(5, seed=1, height=(3, 6), width=(3, 6))
    engine = RolloutEngine(q, fmt, window=window)
    caches = recording(engine)
    out = engine.run(maps, 12 if window is None else 30, paper_ramp(12) if window is None else 0.0, seed=3)
    assert window is None or min(len(t) for t in out.tokens) > 2 * window  # the ring wrapped
    assert all(layer.keys.shape[1] == layer.values.shape[1] == kv_heads for layer in caches[0].layers)
    assert_engine_equals_full_forward(q, fmt, out, window)


def test_grouped_query_attention_shrinks_the_cache_by_kv_heads_over_heads():
    """Same context, same slots: the key/value buffers' bytes are kv_heads/heads of the MHA model's, and a bf16
    cache (under the same fp32 model) holds half of those."""
    fmt = compact_format()
    maps = generate_maps(3, seed=0)

    def cache_bytes(kv_heads, cache_dtype=None):
        engine = RolloutEngine(tiny(fmt, heads=4, kv_heads=kv_heads), fmt, cache_dtype=cache_dtype)
        caches = recording(engine)
        engine.run(maps, 3, 0.0, seed=0)  # p_model 0: random actions, the same contexts whatever the model
        keys = caches[0].layers[0].keys
        assert keys.dtype == (cache_dtype or torch.float32) and keys.shape[1] == (kv_heads or 4)
        return caches[0].nbytes()

    mha = cache_bytes(None)
    assert mha > 0
    assert cache_bytes(2) * 2 == mha and cache_bytes(1) * 4 == mha
    assert cache_bytes(2, torch.bfloat16) * 4 == mha


def test_kv_heads_must_divide_heads():
    fmt = compact_format()
    for kv_heads in (3, 0, 8):
        with pytest.raises(ValueError, match="kv_heads must divide heads"):
            tiny(fmt, heads=4, kv_heads=kv_heads)
    with pytest.raises(ValueError, match="cache_dtype"):
        RolloutCache(1, 1, cache_dtype=torch.int8)


def bf16_kv_sdpa(module, query, key, value, *args, **kwargs):
    """SDPA over keys and values rounded to bf16 (after RoPE, as the cache stores them), computed in the model's
    dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key.bfloat16().to(key.dtype), value.bfloat16().to(value.dtype),
                                  *args, **kwargs)


@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize("window", [None, 23])
def test_a_bf16_cache_under_an_fp32_model_equals_a_forward_over_bf16_keys_and_values(kv_heads, window):
    """The cache stores keys and values in bf16 and the fp32 model attends to them cast back, so Q through it equals
    a full forward whose attention rounds K and V to bf16 the same way -- at fp32 tolerance (1e-5): the rounding is
    the only difference from fp32 and it is reproduced exactly. Against the plain fp32 full forward, the error is
    within 2x what running the whole model in bf16 costs against fp32 (STYLE.md's low-precision rule); it is
    nonzero (the bf16 storage is really used) and far below |Q|."""
    from transformers import AttentionInterface

    fmt = compact_format()
    q = tiny(fmt, heads=4, kv_heads=kv_heads)
    maps = generate_maps(5, seed=1, height=(3, 6), width=(3, 6))
    engine = RolloutEngine(q, fmt, window=window, cache_dtype=torch.bfloat16)
    caches = recording(engine)
    episodes = 12 if window is None else 30
    out = engine.run(maps, episodes, 0.0, seed=3)
    assert all(layer.keys.dtype == layer.values.dtype == torch.bfloat16 for layer in caches[0].layers)
    assert next(q.parameters()).dtype == torch.float32
    fp32 = RolloutEngine(q, fmt, window=window).run(maps, episodes, 0.0, seed=3)  # same contexts (random actions)
    assert all((a == b).all() for a, b in zip(out.tokens, fp32.tokens))
    assert not all(np.array_equal(a, b) for a, b in zip(out.q, fp32.q))

    # The exact check runs on a float64 copy: in fp32 the cached path and the full forward compute K in matmuls of
    # different shapes, whose last-ulp differences can round a K near a bf16 tie differently (one bf16 ulp; seen on
    # two cores, not on one). In float64 no K lands that close to a tie, so the bf16 rounding is reproduced exactly.
    q64 = copy.deepcopy(q).double()
    out64 = RolloutEngine(q64, fmt, window=window, cache_dtype=torch.bfloat16).run(maps, episodes, 0.0, seed=3)
    assert all((a == b).all() for a, b in zip(out64.tokens, out.tokens))
    AttentionInterface.register("test_bf16_kv_sdpa", bf16_kv_sdpa)
    q64.model.set_attn_implementation("test_bf16_kv_sdpa")
    for b in range(len(out64.tokens)):
        ids, decisions = torch.from_numpy(out64.tokens[b])[None], out64.decision_pos[b]
        np.testing.assert_array_equal(decisions, np.flatnonzero(token_contract(fmt, out64.tokens[b])[0]))
        with torch.no_grad():
            h = q64.hidden(ids, attention_mask=sliding_window_mask(ids.shape[1], window, torch.float64))[0]
            full = q64.q_values(h[torch.from_numpy(decisions)]).numpy()
        np.testing.assert_allclose(out64.q[b], full, rtol=1e-5, atol=1e-5 * np.abs(full).max())

    whole_bf16 = copy.deepcopy(q).to(torch.bfloat16)
    for b in range(len(out.tokens)):
        decisions = torch.from_numpy(out.decision_pos[b])
        ids = torch.from_numpy(out.tokens[b])[None]
        full = full_forward_q(q, out.tokens[b], out.decision_pos[b], window)
        with torch.no_grad():
            h = whole_bf16.hidden(ids, attention_mask=sliding_window_mask(ids.shape[1], window, torch.bfloat16))[0]
            bf16_err = np.abs(whole_bf16.q_values(h[decisions]).numpy() - full).max()
        err = np.abs(out.q[b] - full).max()
        assert 0 < bf16_err and err <= 2 * bf16_err and err < 0.05 * np.abs(full).max()
