"""Issue 31's prepared device check: the GPU rollout player and training step, measured in one short run.

    python benchmarks/gpu/throughput.py --out DIR            # on a lent GPU (<= 8 minutes)
    python benchmarks/gpu/throughput.py --dry-run --out DIR  # anywhere: every phase at toy sizes on the CPU

Phases, in order of value, each under its own time limit (``--budget`` seconds in all) and each writing
``DIR/<phase>.json`` (its status, seconds and figures) as soon as it ends, so a run cut short keeps what it did:

1. ``floor``: copy bandwidth (GB/s), bf16 GEMM rate (TFLOP/s) and the cost of one tiny kernel replayed from a
   CUDA graph: the inputs of every floor below;
2. ``correctness``: the player's step under the host-sync guard (and CUDA's sync debug mode "error"), the compiled
   step and (CUDA) the CUDA-graph-replayed step equal to the eager one, and the player's rollout equal to the CPU
   reference committed in
   ``benchmarks/gpu/player-reference.npz`` (outcomes exactly, Q within 1e-4);
3. ``rollout``: env-steps/s of the player, 2 x 128 and 6 x 256 step-grid + memory models, at 1,024 / 4,096 /
   16,384 maps (30 episodes, random actions: every map plays its 30 episodes), eager, compiled and CUDA-graph
   replayed; today's host
   loop (``RolloutEngine(player=False)``) on the same card at 1,024 maps;
4. ``train``: training tokens/s and MFU (6 x parameters x tokens/s over the GEMM rate the floor phase measured)
   of the default recipe's step (2 x 128) and the gpu preset (6 x 256), the latter also with its protocol chunks
   made ahead by a worker process (``--protocol.prefetch 2``; wall seconds beside tokens/s);
5. ``profile``: the top ops of 20 player steps (``torch.profiler``).

``DIR/summary.json`` gathers them with the device, versions, commit, date and command. ``--regen-reference``
rewrites the CPU reference (run on the CPU, commit the file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
REFERENCE = Path(__file__).with_name("player-reference.npz")
PHASES = ("floor", "correctness", "rollout", "train", "profile")
LIMITS = {"floor": 40, "correctness": 90, "rollout": 240, "train": 120, "profile": 40}
MODELS = {"2x128": {"layers": 2, "hidden_size": 128, "heads": 4, "intermediate_size": 384},
          "6x256": {"layers": 6, "hidden_size": 256, "heads": 8, "intermediate_size": 768}}


class PhaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise PhaseTimeout()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model(name: str, fmt, device, seed: int = 1):
    from icrl_fast.model.qnet import ModelConfig, QNetwork

    cfg = ModelConfig(memory=True, memory_forget=True, **MODELS[name])
    return QNetwork(cfg, fmt.vocab_size, fmt.action_ids, seed=seed, token_factors=fmt.token_factors).to(device).eval()


def grid_format():
    from icrl_fast.data.step_format import StepFormat

    return StepFormat(grid=8)


def test_maps(n: int, seed: int = 0):
    from icrl_fast.envs.maps import generate_maps

    return generate_maps(n, seed=seed, height=(3, 8), width=(3, 8))


# -- phases ---------------------------------------------------------------------------------------------------------
def phase_floor(device, dry: bool) -> dict:
    n = (1 << 20) if dry else (1 << 28)
    x = torch.empty(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync(device)
    t = time.perf_counter()
    reps = 3 if dry else 20
    for _ in range(reps):
        y.copy_(x)
    sync(device)
    copy_gbs = 2 * x.nbytes * reps / (time.perf_counter() - t) / 1e9
    size = 256 if dry else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    a @ a
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    sync(device)
    tflops = 2 * size ** 3 * reps / (time.perf_counter() - t) / 1e12
    out = {"copy_GBps": round(copy_gbs, 1), "gemm_TFLOPs": round(tflops, 2), "gemm_dtype": str(dtype)}
    if device.type == "cuda":
        z = torch.zeros(1, device=device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(100):
                z.add_(1)
        graph.replay()
        sync(device)
        t = time.perf_counter()
        for _ in range(20):
            graph.replay()
        sync(device)
        out["graph_kernel_us"] = round((time.perf_counter() - t) / 2000 * 1e6, 3)
    return out


def _player_rollout(device, compile: bool = False, maps: int = 12, episodes: int = 6, graph: bool = False):
    from icrl_fast.evaluate import paper_ramp
    from icrl_fast.rl.player import ContextPlayer

    fmt = grid_format()
    q = model("2x128", fmt, device)
    player = ContextPlayer(q, fmt, device=device, compile=compile, graph=graph)
    return player.play(test_maps(maps), episodes, paper_ramp(episodes), seed=0, width=5)


def compile_mode(device) -> bool | str:
    """inductor on a GPU; on the CPU (the dry run) aot_eager: the same one graph, without minutes of C++ builds."""
    return True if device.type == "cuda" else "aot_eager"


def reference_arrays(out) -> dict:
    return {"success": out.success, "hole": out.hole, "length": out.length,
            "tokens": np.concatenate(out.tokens), "q": np.concatenate(out.q)}


def phase_correctness(device, dry: bool) -> dict:
    from icrl_fast.evaluate import paper_ramp
    from icrl_fast.rl.player import ContextPlayer
    from icrl_fast.sync_guard import no_host_sync

    fmt = grid_format()
    player = ContextPlayer(model("2x128", fmt, device), fmt, device=device)
    s = player.start(test_maps(12), 6, paper_ramp(6), seed=0, width=5)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad(), no_host_sync():
            for _ in range(40):
                player._step(s)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    eager = _player_rollout(device)
    compiled = _player_rollout(device, compile=compile_mode(device))
    ref = dict(np.load(REFERENCE))
    got = reference_arrays(eager)
    same = {k: bool(np.array_equal(got[k], ref[k])) for k in ("success", "hole", "length", "tokens")}
    q_err = float(np.abs(got["q"] - ref["q"]).max()) if got["q"].shape == ref["q"].shape else float("inf")
    graph_same = all(np.array_equal(a, b) for a, b in zip(eager.tokens, compiled.tokens))
    q_graph = max(float(np.abs(a - b).max()) for a, b in zip(eager.q, compiled.q))
    ok = all(same.values()) and q_err <= 1e-4 and graph_same and q_graph <= 1e-4
    out = {"ok": ok, "syncs_in_40_steps": 0, "equal_to_cpu_reference": same, "q_max_err_vs_cpu": q_err,
           "compiled_equals_eager": graph_same, "q_max_err_compiled": q_graph}
    if device.type == "cuda":  # the CUDA graph of the eager step, replayed
        captured = _player_rollout(device, graph=True)
        out["cuda_graph_equals_eager"] = all(np.array_equal(a, b) for a, b in zip(eager.tokens, captured.tokens))
        out["q_max_err_cuda_graph"] = max(float(np.abs(a - b).max()) for a, b in zip(eager.q, captured.q))
        out["ok"] = ok and out["cuda_graph_equals_eager"] and out["q_max_err_cuda_graph"] <= 1e-4
    return out


def _time_rollout(player, maps, episodes: int, width: int) -> dict:
    sync(player.device)
    t = time.perf_counter()
    out = player.play(maps, episodes, 0.0, seed=0, width=width, record=False)
    sync(player.device)
    secs = time.perf_counter() - t
    steps = int(out.length.sum())
    return {"seconds": round(secs, 3), "env_steps": steps, "env_steps_per_s": round(steps / secs),
            "player_steps": player.steps}


def phase_rollout(device, dry: bool) -> dict:
    from icrl_fast.rl.player import ContextPlayer
    from icrl_fast.rl.rollout import RolloutEngine

    fmt = grid_format()
    sizes = (8,) if dry else (1024, 4096, 16384)
    episodes = 2 if dry else 30
    rows = []
    for name in MODELS:
        q = model(name, fmt, device)
        variants = [(False, False), (compile_mode(device), False)] + ([(False, True)] if device.type == "cuda" else [])
        for compile, graph in variants:
            player = ContextPlayer(q, fmt, device=device, compile=compile, graph=graph)
            for n in sizes:
                maps = test_maps(n)
                _time_rollout(player, maps[: min(n, 64)], 2, min(n, 64))  # warm-up (and compile)
                rows.append({"model": name, "compile": str(compile), "cuda_graph": graph, "maps": n,
                             **_time_rollout(player, maps, episodes, n)})
                print(json.dumps(rows[-1]), flush=True)
    q = model("2x128", fmt, device)
    engine = RolloutEngine(q, fmt, device=str(device), player=False)
    maps = test_maps(sizes[0])
    sync(device)
    t = time.perf_counter()
    out = engine.run(maps, episodes, 0.0, seed=0)
    sync(device)
    secs = time.perf_counter() - t
    rows.append({"model": "2x128", "engine": "host loop (today's)", "maps": sizes[0], "seconds": round(secs, 3),
                 "env_steps": int(out.length.sum()), "env_steps_per_s": round(int(out.length.sum()) / secs)})
    return {"rows": rows, "bars": {"1024 maps": 1e6, "16384 maps": 5e6}}


def phase_train(device, dry: bool) -> dict:
    from icrl_fast import train
    from icrl_fast.presets import preset

    floor = Path(ARGS.out) / "floor.json"
    peak = json.loads(floor.read_text()).get("gemm_TFLOPs") if floor.is_file() else None  # this run's GEMM rate
    rows = []
    for name, steps, prefetch in (("default", 3 if dry else 40, 0), ("gpu", 3 if dry else 40, 0),
                                  ("gpu", 3 if dry else 40, 2)):
        cfg = preset(name)
        import dataclasses

        cfg = dataclasses.replace(cfg, device=device.type, eval=dataclasses.replace(cfg.eval, maps=0),
                                  protocol=dataclasses.replace(cfg.protocol, prefetch=prefetch),
                                  optim=dataclasses.replace(cfg.optim, steps=steps), log_every=max(1, steps // 4),
                                  ckpt_every=10 ** 9, threads=0)
        if dry:
            cfg = dataclasses.replace(cfg, protocol=dataclasses.replace(cfg.protocol, contexts=2, pool_maps=16),
                                      model=dataclasses.replace(cfg.model, hidden_size=32, layers=1, heads=2,
                                                                intermediate_size=64))
        run_dir = Path(ARGS.out) / f"train-{name}-prefetch{prefetch}"
        t = time.perf_counter()
        train.run(cfg, run_dir, progress=False)
        secs = time.perf_counter() - t
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rates = [m["perf/tokens_per_s"] for m in metrics[1:] if "perf/tokens_per_s" in m] or \
                [m["perf/tokens_per_s"] for m in metrics if "perf/tokens_per_s" in m]
        tps = float(np.median(rates)) if rates else None
        params = _parameters(cfg)
        rows.append({"preset": name, "prefetch": prefetch, "steps": steps, "seconds": round(secs, 1),
                     "parameters": params,
                     "tokens_per_s": round(tps) if tps else None,
                     "mfu": round(6 * params * tps / (peak * 1e12), 5) if tps and peak else None})
    return {"rows": rows, "mfu_peak_TFLOPs": peak, "bars": {"2x128 tokens/s": 4e6, "6x256 tokens/s": 1.5e6}}


def _parameters(cfg) -> int:
    """Trainable parameters of ``cfg``'s online network (MFU counts 6 per parameter per token: attention's own
    FLOPs, small at these lengths and widths, are left out)."""
    from icrl_fast.data.formats import make_format
    from icrl_fast.model.qnet import QNetwork

    fmt = make_format(cfg.data.format, max_obs=cfg.data.max_obs)
    q = QNetwork(cfg.model, fmt.vocab_size, fmt.action_ids, token_factors=getattr(fmt, "token_factors", None))
    return sum(p.numel() for p in q.trainable_parameters())


def phase_profile(device, dry: bool) -> dict:
    from icrl_fast.rl.player import ContextPlayer

    fmt = grid_format()
    player = ContextPlayer(model("2x128", fmt, device), fmt, device=device)
    n = 16 if dry else 1024
    s = player.start(test_maps(n), 30, 0.0, seed=0, width=n, record=False)
    with torch.no_grad():
        for _ in range(5):
            player._step(s)
        sync(device)
        with torch.profiler.profile() as prof:
            for _ in range(20):
                player._step(s)
            sync(device)
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                                      row_limit=25)
    (Path(ARGS.out) / "profile.txt").write_text(table)
    return {"ops_per_step": round(sum(e.count for e in prof.key_averages()) / 20), "table": "profile.txt"}


# -- the run --------------------------------------------------------------------------------------------------------
def environment(device) -> dict:
    import importlib.metadata as md

    def version(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                                  check=False).stdout.strip()
        except OSError:
            return None

    return {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "python": platform.python_version(), "torch": torch.__version__,
            "versions": {p: version(p) for p in ("triton", "transformers", "numba", "numpy")},
            "commit": git("rev-parse", "--short", "HEAD"), "dirty": bool(git("status", "--porcelain")),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def main(argv=None) -> int:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu-throughput", help="folder for the JSON files")
    p.add_argument("--dry-run", action="store_true", help="every phase at toy sizes on the CPU")
    p.add_argument("--budget", type=int, default=480, help="seconds for all phases")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--regen-reference", action="store_true", help="rewrite the CPU reference .npz and exit")
    ARGS = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if ARGS.regen_reference:
        np.savez_compressed(REFERENCE, **reference_arrays(_player_rollout(torch.device("cpu"))))
        print(f"wrote {REFERENCE}")
        return 0
    phases = [x for x in ARGS.phases.split(",") if x]
    bad = [x for x in phases if x not in PHASES]
    if bad:
        print(f"error: unknown phase(s) {bad}; choose from {PHASES}", file=sys.stderr)
        return 2
    device = torch.device("cpu" if ARGS.dry_run or not torch.cuda.is_available() else "cuda")
    out = Path(ARGS.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {**environment(device), "dry_run": ARGS.dry_run, "phases": {}}
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    failed = False
    for name in phases:
        left = ARGS.budget - (time.perf_counter() - start)
        limit = int(min(LIMITS[name] * (3 if ARGS.dry_run else 1), left))
        if limit < 5:
            result = {"status": "skip", "why": f"{left:.0f} s left of the {ARGS.budget} s budget"}
        else:
            t = time.perf_counter()
            signal.alarm(limit)
            try:
                result = {"status": "ok", **globals()[f"phase_{name}"](device, ARGS.dry_run)}
                if result.get("ok") is False:
                    result["status"] = "fail"
            except PhaseTimeout:
                result = {"status": "timeout", "limit_s": limit}
            except Exception as e:  # noqa: BLE001 (a phase's failure is recorded; the next phases still run)
                result = {"status": "error", "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            finally:
                signal.alarm(0)
            result["seconds"] = round(time.perf_counter() - t, 1)
        failed |= result["status"] in ("fail", "error", "timeout")
        (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        summary["phases"][name] = {k: result[k] for k in ("status", "seconds") if k in result}
        print(f"{name}: {result['status']} ({result.get('seconds', 0)} s)", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if failed else 0


ARGS = None

if __name__ == "__main__":
    raise SystemExit(main())
