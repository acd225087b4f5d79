"""``python -m icrl_fast.evaluate``: the paper's in-context evaluation protocol, batched over maps.

Every test map gets one growing context of ``episodes`` (30) episodes. In episode ``k`` the agent takes the
model's greedy action (argmax of the Q-values of the 4 action tokens) with probability ``ramp[k]`` and a uniform
random action otherwise: 0.0, 0.0, 0.1, 0.1, ..., 0.9, 0.9, then 1.0 for 10 episodes (arXiv 2501.14176). All
maps act in lockstep through the rollout engine (``icrl_fast.rl.rollout``), one model call per step that feeds only
the tokens each context gained since the last call and reads Q at each context's new decision point. The metric is
the success rate per episode index, with 95 % Wilson intervals, beside three baselines on the same maps and episodes: a uniform random policy, tabular Q-learning from scratch
(its exploration follows the same ramp: epsilon 1.0 -> 0.0 over 20 episodes), and the shortest-path optimum.

Writes ``eval.json`` (a stable contract: experiment, num_maps, episodes, success_rate, ci95, baselines, config),
``eval.png`` (success by episode, like the paper's Fig. 3) and ``trajectories.png`` (early / mid / late
episodes on one map, like Fig. 1).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from icrl_fast import threads
from icrl_fast.checkpoint import load_run_for_eval
from icrl_fast.config import COUNT, NON_NEGATIVE, ArgumentParser, check_args
from icrl_fast.data.formats import ContextFormat
from icrl_fast.envs.maps import MAPS, MapBatch
from icrl_fast.experiments import imitation, non_stationary, stitching
from icrl_fast.protocol import (EXPERIMENTS, OUTCOMES, EvalConfig, baselines, eval_result, make_ramp,  # noqa: F401
                                paper_ramp, summary_rows, wilson)
from icrl_fast.rl.rollout import RolloutEngine


def evaluate(qnet, fmt: ContextFormat, maps: MapBatch, cfg: EvalConfig, device: str = "cpu",
             max_positions: int | None = None, extra_config: dict | None = None, progress: bool = False,
             engine_options: dict | None = None) -> dict:
    """Run the protocol on ``maps`` and return the ``eval.json`` contract (plus per-map outcomes).
    ``engine_options``: more ``RolloutEngine`` arguments (``RolloutConfig.engine_options``: graph, compile)."""
    cfg.validate()
    if len(maps) == 0:
        raise ValueError("there are no maps to evaluate")
    ramp = make_ramp(cfg.ramp, cfg.episodes)
    engine = RolloutEngine(qnet, fmt, window=cfg.window, device=device, max_positions=max_positions,
                           **(engine_options or {}))
    parts = []
    for start in range(0, len(maps), cfg.batch_maps):
        sub = maps[np.arange(start, min(start + cfg.batch_maps, len(maps)))]
        parts.append(engine.run(sub, cfg.episodes, ramp, cfg.seed + start, progress=progress))
    outcomes = {k: np.concatenate([getattr(p, k) for p in parts]) for k in OUTCOMES}
    result = eval_result(cfg, outcomes, ramp, baselines(maps, cfg.episodes, cfg.seed), extra_config)
    result["_paths"] = [p for part in parts for p in part.paths]
    return result


def write_outputs(result: dict, out_dir: Path, maps: MapBatch) -> list[Path]:
    """``eval.json``, ``eval.png`` and ``trajectories.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = result.pop("_paths", None)
    result.setdefault("meta", {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "device": _device_name()})
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    k = np.arange(result["episodes"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ci = np.array(result["ci95"])
    ax.fill_between(k, ci[:, 0], ci[:, 1], alpha=0.25, color="C0")
    ax.plot(k, result["success_rate"], "o-", color="C0", label="model (in context)")
    for name, style in (("random", "C3--"), ("tabular_q", "C2-."), ("optimal", "k:")):
        ax.plot(k, result["baselines"][name], style, label=name.replace("_", " "))
    ax.plot(k, result["config"]["ramp"], color="0.6", lw=1, label="P(model action)")
    ax.set(xlabel="episode in context", ylabel="success rate", ylim=(-0.02, 1.02),
           title=f"{result['experiment']}: {result['num_maps']} unseen maps")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "eval.png", dpi=120)
    plt.close(fig)
    written = [out_dir / "eval.json", out_dir / "eval.png"]
    if paths:
        written.append(draw_trajectories(paths[0], maps.to_desc(0), out_dir / "trajectories.png", plt))
    return written


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def draw_trajectories(episode_paths, desc, path: Path, plt) -> Path:
    """Early, middle and late episodes of one map's context drawn on the grid (like the paper's Fig. 1)."""
    picks = sorted({0, len(episode_paths) // 2, len(episode_paths) - 1})
    fig, axes = plt.subplots(1, len(picks), figsize=(3 * len(picks), 3))
    colours = {"F": "#dbeefb", "S": "#fff2a8", "H": "#274060", "G": "#7bd389"}
    nrow, ncol = len(desc), len(desc[0])
    for ax, e in zip(np.atleast_1d(axes), picks):
        for r in range(nrow):
            for c in range(ncol):
                ax.add_patch(plt.Rectangle((c, nrow - 1 - r), 1, 1, color=colours[desc[r][c]], ec="white"))
                ax.text(c + 0.5, nrow - 0.5 - r, desc[r][c], ha="center", va="center", fontsize=8, color="0.3")
        obs = episode_paths[e]
        xs = [o % ncol + 0.5 for o in obs]
        ys = [nrow - 1 - o // ncol + 0.5 for o in obs]
        ax.plot(xs, ys, "-o", color="C1", ms=3)
        ax.set(xlim=(0, ncol), ylim=(0, nrow), aspect="equal", xticks=[], yticks=[],
               title=f"episode {e} ({len(obs) - 1} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


OOD_SIZE = "6-7x6-7"  # --ood-size's default: checkpoint.OOD_SIZE, the ood experiment's maps


def parse_size(text: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """``"6-7x3-5"`` -> ``((6, 7), (3, 5))`` (a single number stands for both ends); ``ValueError`` otherwise."""
    try:
        ranges = [tuple(int(v) for v in side.split("-")) for side in text.lower().split("x")]
    except ValueError:
        ranges = []
    if len(ranges) != 2 or any(len(r) not in (1, 2) for r in ranges):
        raise ValueError(f"--ood-size must look like 6-7x3-5 (rows x cols ranges), got {text!r}")
    (r0, r1), (c0, c1) = ((r[0], r[-1]) for r in ranges)
    if not 2 <= r0 <= r1 or not 2 <= c0 <= c1:
        raise ValueError(f"--ood-size ranges must be ascending and at least 2, got {text!r}")
    return (r0, r1), (c0, c1)


#: The allowed values of the numeric options (tests/test_config_validation.py requires one for each).
ARG_RANGES = {"maps": COUNT, "episodes": COUNT, "window": COUNT, "seed": NON_NEGATIVE, "threads": NON_NEGATIVE}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m icrl_fast.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory written by python -m icrl_fast.train")
    p.add_argument("--maps", type=int, default=50, help="maps to evaluate on (>= 1; default 50)")
    p.add_argument("--episodes", type=int, default=None, help="episodes per context (>= 1; default 30; stitching: 5)")
    p.add_argument("--experiment", choices=EXPERIMENTS, default="in-distribution",
                   help="in-distribution (unseen 3-5 maps), ood (6-7 maps), non-stationary (a new map after "
                        "EPISODES episodes, EPISODES more), stitching (the 4x6 map after two hand-written episodes; "
                        "EPISODES greedy trials, default 5), imitation (a probe: 5 successful episodes of a "
                        "tabular learner in context, then greedy; control: an empty context)")
    p.add_argument("--ood-size", default=OOD_SIZE, metavar="ROWSxCOLS",
                   help="ood only: the maps' height x width ranges, e.g. 6-7x3-5 (taller maps, training widths) or "
                        "3-5x6-7 (training heights, wider maps); default 6-7x6-7")
    p.add_argument("--ramp", choices=("paper", "greedy"), default="paper",
                   help="paper: P(model) 0.0 -> 1.0 over episodes 0-19; greedy: the model acts from episode 0")
    p.add_argument("--window", type=int, default=None, help="attend to the last WINDOW (>= 1) tokens (ring-buffer KV "
                                                                    "cache)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the exploration draws and env streams (>= 0)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads: 0 (default) = the cores other processes "
                                                          "leave free, re-read as it runs (icrl_fast.threads); N = N")
    p.add_argument("--graph", action="store_true", help="on CUDA, replay the step-format player's step from a CUDA "
                                                        "graph (--rollout.graph of the trainer)")
    p.add_argument("--compile", action="store_true", help="torch.compile the player's step (--rollout.compile)")
    p.add_argument("--out", default=None, help="output folder (default: the run directory for the paper protocol, "
                                               "else RUN/eval-EXPERIMENT[-greedy])")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, each checked (``ARG_RANGES``, ``--ood-size``): a bad one exits with status 2 and one line on
    stderr (``error: --maps must be >= 1 (got 0)``)."""
    p = build_parser()
    args = p.parse_args(argv)
    try:
        check_args(args, ARG_RANGES)
        args.ood_range = parse_size(args.ood_size)
        if args.experiment != "ood" and args.ood_size != OOD_SIZE:
            raise ValueError("--ood-size applies to --experiment ood only")
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help (0), or a refused option (2; its one-line error is already on stderr)
        return e.code if isinstance(e.code, int) else 0
    episodes = args.episodes if args.episodes is not None else (5 if args.experiment == "stitching" else 30)
    ecfg = EvalConfig(maps=args.maps, episodes=episodes, experiment=args.experiment, seed=args.seed,
                      ramp=args.ramp, window=args.window)
    threads.configure(args.threads)  # beside a training run: a core each instead of both spinning on two
    try:
        ecfg.validate()
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu")
        qnet, fmt, maps, cfg = load_run_for_eval(Path(args.run), args.experiment, args.maps, device=device,
                                                 ood_size=args.ood_range)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ecfg.maps = len(maps)
    options = {"engine_options": {"graph": args.graph, "compile": args.compile}}
    extra = {"run": str(args.run), **({"ood_size": args.ood_size} if args.experiment == "ood" else {})}
    if args.experiment == "non-stationary":
        switched = maps[np.roll(np.arange(len(maps)), 1)]  # each context moves on to another unseen map
        result = non_stationary(qnet, fmt, maps, switched, ecfg, device=device,
                                max_positions=cfg.model.max_positions, extra_config=extra, progress=True, **options)
    elif args.experiment == "stitching":
        maps = MapBatch.from_descs([MAPS["stitching"]])
        result = stitching(qnet, fmt, ecfg, device=device, extra_config=extra, **options)
    elif args.experiment == "imitation":
        result = imitation(qnet, fmt, maps, ecfg, device=device, max_positions=cfg.model.max_positions,
                           extra_config=extra, progress=True, **options)
    else:
        result = evaluate(qnet, fmt, maps, ecfg, device=device, max_positions=cfg.model.max_positions,
                          extra_config=extra, progress=True, **options)
    print("\n".join(summary_rows(result)))
    size = f"-{args.ood_size}" if args.ood_size != OOD_SIZE else ""
    default = Path(args.run) if (args.experiment, args.ramp) == ("in-distribution", "paper") else \
        Path(args.run) / f"eval-{args.experiment}{size}{'-greedy' if args.ramp == 'greedy' else ''}"
    for path in write_outputs(result, Path(args.out) if args.out else default, maps):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
