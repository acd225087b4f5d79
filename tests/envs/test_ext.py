"""The C++ Frozen Lake (csrc/), built here from source: identical to the Numba simulator (and so to gymnasium) step
for step, random streams included; token emission equal to the rollout engine's; clear input errors; fake
implementations for tracing; the CUDA source compiles with nvcc."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from icrl_fast.data.formats import compact_format, paper_format
from icrl_fast.envs import ext
from icrl_fast.envs.frozen_lake import FrozenLakeBatch
from icrl_fast.envs.maps import MapBatch, generate_maps
from icrl_fast.rl.rollout import ContextStreams


@pytest.fixture(scope="module", autouse=True)
def built():
    assert ext.load(build=True), ext.EXT_REASON  # this machine has a C++ compiler: the build must work
    return True


def random_maps(n, seed):
    return generate_maps(n, seed=seed, height=(2, 7), width=(2, 7), min_hops=1, p_start=0.3)


@pytest.mark.parametrize("slippery", [False, True], ids=["deterministic", "slippery"])
@pytest.mark.parametrize("mode", ["SameStep", "NextStep", "Disabled"])
def test_identical_to_the_numba_simulator_step_for_step(slippery, mode):
    maps = random_maps(300, seed=1)
    assert maps.n_starts.max() > 1  # several S tiles: the start draws are compared too
    kw = dict(is_slippery=slippery, success_rate=0.6, reward_schedule=(2.0, -1.0, 0.1), max_episode_steps=9,
              autoreset_mode=mode, seed=7)
    ref, ours = FrozenLakeBatch(maps, **kw), ext.TorchFrozenLakeBatch(maps, **kw)
    np.testing.assert_array_equal(ours.reset().numpy(), ref.reset())
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(120):
        a = rng.integers(0, 4, len(maps))
        if mode == "Disabled":  # without autoreset, reset finished envs by mask, as a user would
            done = ref.terminated | ref.truncated
            ref.reset(mask=done)
            ours.reset(mask=torch.from_numpy(done))
        r_out = ref.step(a)
        o_out = ours.step(torch.from_numpy(a))
        for x, y in zip(o_out, r_out):
            np.testing.assert_array_equal(x.numpy(), y)
        np.testing.assert_array_equal(ours.final_obs.numpy(), ref.final_obs)
        np.testing.assert_array_equal(ours._pos.numpy(), ref._pos)
        ended += int(ref.terminated.sum() + ref.truncated.sum())
    assert ended > 1000


def test_matches_gymnasium_on_deterministic_maps():
    import gymnasium as gym

    maps = MapBatch.from_descs([["SFFH", "FHFF", "FFFG"], ["SFF", "FHF", "FFG"], ["SF", "HG"]])
    env = ext.TorchFrozenLakeBatch(maps, is_slippery=False, autoreset_mode="Disabled", seed=0)
    env.reset()
    rng = np.random.default_rng(1)
    for b in range(len(maps)):
        g = gym.make("FrozenLake-v1", desc=maps.to_desc(b), is_slippery=False)
        g.reset(seed=0)
        mask = torch.zeros(len(maps), dtype=torch.bool)
        mask[b] = True
        env.reset(mask=mask)
        for _ in range(40):
            a = int(rng.integers(0, 4))
            obs, reward, term, trunc, _ = g.step(a)
            actions = torch.zeros(len(maps), dtype=torch.int64)
            actions[b] = a
            env.step(actions)
            assert (int(env.obs[b]), float(env.rewards[b]), bool(env.terminated[b])) == (obs, reward, term)
            if term:
                g.reset(seed=0)
                env.reset(mask=mask)


@pytest.mark.parametrize("fmt", [compact_format(), paper_format()], ids=["compact", "paper"])
def test_emitted_tokens_equal_the_rollout_engines(fmt):
    maps = random_maps(64, seed=3)
    env = ext.TorchFrozenLakeBatch(maps, is_slippery=True, max_episode_steps=6, seed=2)
    tables, streams = ext.FormatTables(fmt), ContextStreams(fmt)
    width = streams.max_block()
    out = torch.zeros((len(maps), width), dtype=torch.int64)
    counts = torch.zeros(len(maps), dtype=torch.int64)
    obs = env.reset()
    env.emit_tokens(tables, torch.zeros(len(maps), dtype=torch.int64), torch.ones(len(maps), dtype=torch.bool),
                    out, counts)
    for b in range(len(maps)):
        assert out[b, width - counts[b]:].tolist() == streams.first_block(int(obs[b]))
    rng = np.random.default_rng(4)
    seen_cut = seen_reward = 0
    for _ in range(40):
        a = torch.from_numpy(rng.integers(0, 4, len(maps)))
        obs, rew, term, trunc = env.step(a)
        env.emit_tokens(tables, a, torch.zeros(len(maps), dtype=torch.bool), out, counts)
        for b in range(len(maps)):
            ended, cut = bool(term[b] or trunc[b]), bool(trunc[b] and not term[b])
            tail, head = streams.after_action(int(a[b]), float(rew[b]), ended, cut, int(obs[b]))
            assert out[b, width - counts[b]:].tolist() == tail + head
            assert (out[b, : width - counts[b]] == tables.pad).all()
            seen_cut += cut
            seen_reward += float(rew[b]) != 0
    assert seen_cut and seen_reward
    narrow = torch.zeros((len(maps), 1), dtype=torch.int64)
    env.emit_tokens(tables, a, torch.zeros(len(maps), dtype=torch.bool), narrow, counts)
    assert (counts == -1).all()


def test_input_errors_are_clear():
    maps = random_maps(4, seed=5)
    env = ext.TorchFrozenLakeBatch(maps, seed=0)
    env.reset()
    with pytest.raises(RuntimeError, match="icrl: actions must be Long"):
        env.step(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="icrl: actions must have 4 rows"):
        env.step(torch.zeros(5, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"icrl: actions must be in 0\.\.3.*env 2 got 7"):
        env.step(torch.tensor([0, 1, 7, 2]))
    with pytest.raises(RuntimeError, match="icrl: actions must be contiguous"):
        env.step(torch.zeros(8, dtype=torch.int64)[::2])
    with pytest.raises(ValueError, match="reward_schedule"):
        ext.TorchFrozenLakeBatch(maps, reward_schedule=(1, 0))


def test_ops_have_fake_implementations_and_valid_schemas():
    """``opcheck``: schema and mutation annotations, fake-tensor propagation, AOT dispatch -- what torch.compile and
    CUDA-graph capture of a rollout step rely on."""
    maps = random_maps(8, seed=6)
    env = ext.TorchFrozenLakeBatch(maps, seed=0)
    env.reset()
    actions = torch.randint(0, 4, (8,))
    args = (actions, *env._map, env._pos, env._rng, True, 0.5, [1.0, 0.0, 0.0], 100, 1, *env._outputs())
    torch.library.opcheck(torch.ops.icrl.step.default, args)
    tables = ext.FormatTables(compact_format())
    out, counts = torch.zeros((8, 16), dtype=torch.int64), torch.zeros(8, dtype=torch.int64)
    torch.library.opcheck(torch.ops.icrl.emit.default, (actions, env.obs, env.rewards, env.terminated, env.truncated,
                                                        torch.zeros(8, dtype=torch.bool), tables.runs, tables.run_off,
                                                        tables.obs_table, tables.obs_len, tables.action_ids,
                                                        tables.pad, out, counts))


def test_backend_choice_and_reason():
    assert ext.HAS_EXT and "csrc" in ext.EXT_REASON or "built" in ext.EXT_REASON
    assert ext.backend("cpu") == "numba"  # the CPU keeps the Numba simulator (its OpenMP loop is faster)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build that a machine without CUDA makes")
def test_a_cpu_only_build_is_never_picked_for_a_cuda_device(monkeypatch):
    """The build here has CPU kernels only: on a CUDA device its first op would raise NotImplementedError on the CUDA
    dispatch key, so neither ``backend`` nor the rollout engine may pick it there; with a CUDA kernel registered
    (simulated: the dispatcher reports one) ``auto`` picks it."""
    from icrl_fast.model.qnet import ModelConfig, QNetwork
    from icrl_fast.rl.rollout import RolloutEngine

    assert ext.kernel_keys() == ["CPU"] and "CPU ops" in ext.EXT_REASON
    assert not ext.has_kernel("cuda") and ext.has_kernel("cpu")
    assert ext.backend("cuda") == "numba" and ext.backend("cuda:0") == "numba"
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("icrl::step", "CUDA")  # the dispatcher's own answer
    fmt = compact_format()
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), fmt.vocab_size,
                 fmt.action_ids, seed=0)
    with pytest.raises(ValueError, match="no kernels for that device"):
        RolloutEngine(q, fmt, device="cuda", env_backend="ext")
    real = torch._C._dispatch_has_kernel_for_dispatch_key
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key",
                        lambda op, key: key == "CUDA" or real(op, key))
    assert ext.kernel_keys() == ["CPU", "CUDA"] and ext.backend("cuda") == "ext"
    assert RolloutEngine(q, fmt, device="cuda").env_backend == "ext"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    done = subprocess.run(["nvcc", "-std=c++17", "-c", str(ext.CSRC / "frozen_lake_cuda.cu"), "-o",
                           str(tmp_path / "k.o")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "k.o").stat().st_size > 10_000
    # and the CUDA half of the torch binding (ICRL_WITH_CUDA) type-checks against torch's headers; this CPU wheel
    # lacks one generated CUDA header, which a one-line shim stands in for
    from torch.utils.cpp_extension import CUDA_HOME, include_paths

    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cuda_include = Path(CUDA_HOME or "/usr/local/cuda") / "include"
    flags = [f"-I{p}" for p in [tmp_path / "shim", *include_paths(), cuda_include]]
    done = subprocess.run(["c++", "-std=c++20", "-fsyntax-only", "-DICRL_WITH_CUDA", *flags,
                           str(ext.CSRC / "frozen_lake_ops.cpp")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_cuda_launch_is_checked():
    """Each kernel launch is followed by ``cudaGetLastError()`` in its launcher, and the binding turns the returned
    error into a torch error (``C10_CUDA_CHECK``): a failed launch raises at the op, not at some later sync."""
    import re

    cu = (ext.CSRC / "frozen_lake_cuda.cu").read_text()
    launches = re.findall(r"<<<[^>]*>>>\([^;]*\);\n\s*return cudaGetLastError\(\);", cu)
    assert cu.count("<<<") == len(launches) == 4
    cpp = (ext.CSRC / "frozen_lake_ops.cpp").read_text()
    calls = re.findall(r"(\w+)\(\s*icrl::launch_\w+\(", cpp)
    assert calls == ["C10_CUDA_CHECK"] * 4


def _message_args(call: str) -> list[str]:
    """The top-level comma-separated arguments of one ``TORCH_CHECK(...)`` call after its condition."""
    args, depth, cur, quote = [], 0, "", False
    for ch in call:
        if ch == '"' and not cur.endswith("\\"):
            quote = not quote
        if not quote and ch in "([{":
            depth += 1
        if not quote and ch in ")]}":
            depth -= 1
        if not quote and ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return args[1:] + [cur.strip()]


def test_every_check_message_streams_strings_only():
    """Numbers, shapes, devices and dtypes reach a TORCH_CHECK message through the string helpers of
    frozen_lake_ops.cpp. On the lent H200 the build's newer g++ and Python's older libstdc++ disagreed, and an
    integer streamed into a message segfaulted instead of raising (benchmarks/results/gpu-check-NVIDIA-H200.md)."""
    import re

    cpp = (ext.CSRC / "frozen_lake_ops.cpp").read_text()
    calls = re.findall(r"TORCH_CHECK\((.*?)\);\n", cpp, re.S)
    assert len(calls) >= 15
    safe = re.compile(r'^(?:"(?:[^"\\]|\\.)*"\s*)+$|^name$|^(?:num|shape|dev|type)\(.*\)$', re.S)
    unsafe = [(c.split(",")[0], a) for c in calls for a in _message_args(c) if not safe.match(a)]
    assert not unsafe, f"message arguments that are streamed as non-strings: {unsafe}"
    assert safe.match("num(a[i])") and not safe.match("a[i]") and not safe.match("t.sizes()")  # the check can fail


def test_make_batch_picks_numba_on_the_cpu():
    from icrl_fast.envs import make_batch

    env = make_batch(random_maps(3, seed=8), device="cpu", seed=0)
    assert isinstance(env, FrozenLakeBatch)
    assert "Numba on the CPU" in ext.describe()


def test_the_rollout_engine_plays_identically_on_the_extension():
    """The engine on the extension's env (what it picks on CUDA) plays exactly the Numba rollout: same streams."""
    from icrl_fast.model.qnet import ModelConfig, QNetwork
    from icrl_fast.rl.rollout import RolloutEngine

    fmt = compact_format()
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), fmt.vocab_size,
                 fmt.action_ids, seed=0).eval()
    maps = random_maps(6, seed=9)
    assert RolloutEngine(q, fmt).env_backend == "numba"  # on the CPU, auto picks Numba
    runs = [RolloutEngine(q, fmt, env_backend=b).run(maps, 4, 0.5, seed=3, is_slippery=True, switch_to=maps[::-1],
                                                     switch_after=2) for b in ("numba", "ext")]
    assert all((x == y).all() for x, y in zip(runs[0].tokens, runs[1].tokens))
    assert runs[0].paths == runs[1].paths and (runs[0].success == runs[1].success).all()


@pytest.mark.parametrize("fmt", [compact_format(), paper_format()], ids=["compact", "paper"])
@pytest.mark.parametrize("window,sync_every,kvcache", [(None, 1, False), (None, 5, False), (29, 16, False),
                                                        (None, 5, True)])
def test_the_device_resident_loop_plays_exactly_the_host_loop(fmt, window, sync_every, kvcache):
    """On the extension's env the engine's loop stays on the device (emit writes the input buffer; the host reads
    back every ``sync_every`` steps): contexts, episode indices, decision points, Q, paths and outcomes equal the
    host loop on the Numba env for the same seed -- exploration, slippery moves, a prefix, early finishers and
    the ring buffer included."""
    from icrl_fast.evaluate import paper_ramp
    from icrl_fast.model.qnet import ModelConfig, QNetwork
    from icrl_fast.rl.rollout import RolloutEngine

    q = QNetwork(ModelConfig(hidden_size=16, layers=2, heads=2, intermediate_size=32), fmt.vocab_size,
                 fmt.action_ids, seed=0).eval()
    if kvcache:  # flash-attn's cache_seqlens path (its reference here): the device loop's length bound, no mask
        from icrl_fast.model.attention import register_kvcache_attention

        q.model.set_attn_implementation(register_kvcache_attention())
    maps = random_maps(7, seed=4)
    st = ContextStreams(fmt)
    prefix = [st.episode([0, 1], [2], [0.0]) if b % 2 else [] for b in range(len(maps))]
    runs = [RolloutEngine(q, fmt, window=window, env_backend=b, sync_every=sync_every).run(
        maps, 7, paper_ramp(7), seed=5, is_slippery=True, prefix=prefix) for b in ("numba", "ext")]
    host, dev = runs
    assert host.length.sum(1).min() < host.length.sum(1).max()  # contexts finish at different steps
    assert host.success.any() and host.hole.any()
    for name in ("success", "hole", "truncated", "length", "episode_return"):
        np.testing.assert_array_equal(getattr(dev, name), getattr(host, name), err_msg=name)
    assert dev.paths == host.paths
    for b in range(len(maps)):
        np.testing.assert_array_equal(dev.tokens[b], host.tokens[b])
        np.testing.assert_array_equal(dev.token_episode[b], host.token_episode[b])
        np.testing.assert_array_equal(dev.decision_pos[b], host.decision_pos[b])
        np.testing.assert_allclose(dev.q[b], host.q[b], rtol=1e-5, atol=1e-6)


def test_the_device_loop_reads_back_only_at_sync_points(monkeypatch):
    """The cache's length is the one device value a step would need (to size the attention read); the loop tells
    every plan an upper bound instead and reads the exact length once per sync point."""
    from icrl_fast.model.kv_cache import RolloutCache
    from icrl_fast.model.qnet import ModelConfig, QNetwork
    from icrl_fast.rl.rollout import RolloutEngine

    fmt = compact_format()
    q = QNetwork(ModelConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32), fmt.vocab_size,
                 fmt.action_ids, seed=0).eval()
    plans, reads = [], []
    plan, length = RolloutCache.plan, RolloutCache.get_seq_length
    monkeypatch.setattr(RolloutCache, "plan", lambda self, c, w, bound=None: plans.append(bound) or plan(self, c, w,
                                                                                                           bound))
    monkeypatch.setattr(RolloutCache, "get_seq_length", lambda self, i=0: reads.append(1) or length(self, i))
    RolloutEngine(q, fmt, env_backend="ext", sync_every=8).run(random_maps(5, seed=2), 3, 0.5, seed=1)
    assert None not in plans  # every call told the cache its bound: no length read inside a step
    assert len(reads) == -(-len(plans) // 8)  # one exact length read per sync point


@pytest.mark.gpu
def test_on_cuda_the_env_equals_numba_and_the_rollout_stays_on_the_device():
    """On a GPU machine (the module's JIT build compiles the CUDA kernels when torch is a CUDA build and nvcc is
    found): the ops have CUDA kernels, the CUDA env equals the Numba simulator step for step, and the engine on CUDA
    picks it and plays exactly what its host loop plays."""
    from icrl_fast.evaluate import paper_ramp
    from icrl_fast.model.qnet import ModelConfig, QNetwork
    from icrl_fast.rl.rollout import RolloutEngine

    assert torch.cuda.is_available()
    assert ext.has_kernel("cuda"), f"no CUDA kernels in the extension: {ext.EXT_REASON}"
    maps = random_maps(1000, seed=1)
    kw = dict(is_slippery=True, success_rate=0.6, max_episode_steps=9, seed=7)
    ref, ours = FrozenLakeBatch(maps, **kw), ext.TorchFrozenLakeBatch(maps, device="cuda", **kw)
    np.testing.assert_array_equal(ours.reset().cpu().numpy(), ref.reset())
    rng = np.random.default_rng(0)
    for _ in range(60):
        a = rng.integers(0, 4, len(maps))
        for x, y in zip(ours.step(torch.from_numpy(a).cuda()), ref.step(a)):
            np.testing.assert_array_equal(x.cpu().numpy(), y)
    fmt = compact_format()
    q = QNetwork(ModelConfig(hidden_size=16, layers=2, heads=2, intermediate_size=32), fmt.vocab_size,
                 fmt.action_ids, device="cuda", seed=0).eval()
    assert RolloutEngine(q, fmt, device="cuda").env_backend == "ext"
    small = random_maps(16, seed=4)
    host, dev = (RolloutEngine(q, fmt, device="cuda", env_backend=b).run(small, 6, paper_ramp(6), seed=5)
                 for b in ("numba", "ext"))
    assert dev.paths == host.paths and (dev.success == host.success).all()
