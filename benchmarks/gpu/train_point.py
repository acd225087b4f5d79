"""One point of the compute curve on a lent GPU: train a recipe for a fixed wall-clock budget, then evaluate it.

    python benchmarks/gpu/train_point.py --seconds 180 --out DIR [--preset gpu] [--SECTION.FIELD VALUE ...]

A lent GPU comes with minutes, and nobody knows its step time before it runs, so the run is sized in two parts:
a short calibration (``--calibrate`` steps, no evaluation) measures tokens/s after its first logged window (that window
holds the CUDA and Triton start-up), and the run itself then gets ``steps = seconds x tokens/s / tokens per step``
with the preset's schedule (warm-up capped at a tenth of the steps). Same process, so the second run finds the
kernels compiled. The run directory is the usual one (config.json, metrics.jsonl, eval.json; checkpoints are left
out of what the device check brings back), plus ``train_point.json``: the device, the budget, the calibration, the
steps, tokens, training seconds and the success curve's 0-1 / 10-19 / 20-29. Afterwards ``--experiments`` runs
``python -m icrl_fast.evaluate`` on the run (greedy ramp, OOD, ...) while the GPU is still there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from icrl_fast import train

EXPERIMENTS = {"greedy": ["--ramp", "greedy"], "ood": ["--experiment", "ood"],
               "stitching": ["--experiment", "stitching"], "non-stationary": ["--experiment", "non-stationary"]}


def calibrate(cfg, run_dir: Path, steps: int) -> dict:
    """Train ``steps`` steps of ``cfg`` without evaluation; tokens/s over the logged windows after the first."""
    cal = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, steps=steps),
                              eval=dataclasses.replace(cfg.eval, maps=0), log_every=max(1, steps // 4),
                              ckpt_every=10 ** 9)
    train.run(cal, run_dir, progress=False)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "perf/tokens_per_s" in r]
    if len(recs) < 2:
        raise SystemExit(f"calibration logged {len(recs)} windows; use --calibrate >= 8")
    return {"steps": steps, "tokens_per_s": float(np.mean([r["perf/tokens_per_s"] for r in recs[1:]])),
            "tokens_per_step": recs[-1]["perf/tokens"] / recs[-1]["step"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, required=True, help="training wall-clock budget of the run itself")
    p.add_argument("--out", required=True, help="run directory (must not exist)")
    p.add_argument("--calibrate", type=int, default=40, help="calibration steps")
    p.add_argument("--experiments", default="greedy", help="comma-separated, of: " + ", ".join(EXPERIMENTS))
    args, rest = p.parse_known_args(argv)
    unknown = [e for e in args.experiments.split(",") if e and e not in EXPERIMENTS]
    if unknown:
        p.error(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
    out = Path(args.out)
    if out.exists():
        p.error(f"{out} exists; choose a fresh --out")
    cfg, _, _ = train.parse_args(rest + ["--out", str(out)])
    device = train.resolve_device(cfg.device)
    t0 = time.perf_counter()
    cal_dir = out.with_name(out.name + "-calibration")
    cal = calibrate(cfg, cal_dir, args.calibrate)
    if cfg.data_path is None:  # the same dataset (its test maps are the evaluation's), built once
        cfg = dataclasses.replace(cfg, data_path=str(cal_dir / "dataset"))
    steps = max(10, int(args.seconds * cal["tokens_per_s"] / cal["tokens_per_step"]))
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(
        cfg.optim, steps=steps, warmup_steps=min(cfg.optim.warmup_steps, max(1, steps // 10))),
        ckpt_every=max(cfg.ckpt_every, steps))
    print(f"calibration: {cal['tokens_per_s']:,.0f} tokens/s, {cal['tokens_per_step']:,.0f} tokens/step "
          f"({time.perf_counter() - t0:.0f} s); the run: {steps} steps for {args.seconds:.0f} s", flush=True)
    t1 = time.perf_counter()
    result = train.run(cfg, out, progress=False)
    t_run = time.perf_counter() - t1
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = sum(r["perf/tokens"] for r in metrics[-1:]) / max(1e-9, np.mean(
        [r["perf/tokens_per_s"] for r in metrics if "perf/tokens_per_s" in r]))
    curve = json.loads((out / "eval.json").read_text())["success_rate"] if (out / "eval.json").is_file() else []
    point = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
             "torch": torch.__version__, "preset": cfg.preset, "argv": rest, "budget_s": args.seconds,
             "calibration": cal, "steps": result["step"], "tokens": result["tokens"],
             "train_seconds_estimate": train_s, "run_seconds_with_eval": t_run,
             "success": {k: float(np.mean(curve[a:b])) for k, (a, b) in
                         {"0-1": (0, 2), "10-19": (10, 20), "20-29": (20, 30)}.items()} if len(curve) >= 30 else None}
    (out / "train_point.json").write_text(json.dumps(point, indent=1) + "\n")
    print(json.dumps(point), flush=True)
    for name in filter(None, args.experiments.split(",")):
        cmd = [sys.executable, "-m", "icrl_fast.evaluate", str(out), *EXPERIMENTS[name], "--device", device,
               "--out", str(out / f"eval-{name}")]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=False, stderr=subprocess.DEVNULL)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the weights stay out of what comes back
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
