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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from icrl_fast.data.formats import ContextFormat
from icrl_fast.envs.learners import QLearningConfig, q_learning, random_policy
from icrl_fast.envs.maps import MapBatch
from icrl_fast.rl.rollout import RolloutEngine

EXPERIMENTS = ("in-distribution", "ood", "non-stationary", "stitching", "imitation")
OUTCOMES = ("success", "hole", "truncated", "length")  # per map and episode, in eval.json's per_map


@dataclass
class EvalConfig:
    """The evaluation protocol."""

    maps: int = field(default=50, metadata={"help": "unseen maps (the dataset's test split, or fresh OOD maps)"})
    episodes: int = field(default=30, metadata={"help": "episodes per map in one context"})
    experiment: str = field(default="in-distribution", metadata={"help": " | ".join(EXPERIMENTS)})
    seed: int = field(default=1234, metadata={"help": "seed of the exploration draws and env streams"})
    batch_maps: int = field(default=50, metadata={"help": "maps per model call"})
    ramp: str = field(default="paper", metadata={"help": "paper (P(model) 0.0 -> 1.0 over 20 episodes) or greedy "
                                                         "(the model acts from episode 0, no forced exploration)"})
    window: int | None = field(default=None, metadata={"help": "attend to the last WINDOW tokens only (ring-buffer "
                                                                "KV cache); default: the whole context"})

    def validate(self) -> None:
        """``ValueError`` naming the bad field (``maps`` may be 0: the trainer then skips its evaluation)."""
        if self.maps < 0 or self.episodes < 1 or self.batch_maps < 1:
            raise ValueError(f"eval needs maps >= 0, episodes >= 1 and batch_maps >= 1, got maps={self.maps}, "
                             f"episodes={self.episodes}, batch_maps={self.batch_maps}")
        if self.experiment not in EXPERIMENTS or self.ramp not in ("paper", "greedy"):
            raise ValueError(f"eval experiment must be one of {EXPERIMENTS} and ramp paper or greedy, got "
                             f"{self.experiment!r} and {self.ramp!r}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"eval window must be >= 1 tokens (or unset), got {self.window}")


def paper_ramp(episodes: int) -> np.ndarray:
    """P(model action) per episode: 0.0, 0.0, 0.1, 0.1, ..., 0.9, 0.9, then 1.0 (the paper's schedule)."""
    return np.array([min(k // 2, 10) / 10 if k < 20 else 1.0 for k in range(episodes)])


def make_ramp(name: str, episodes: int) -> np.ndarray:
    """``paper`` (see ``paper_ramp``) or ``greedy`` (1.0 from episode 0)."""
    if name == "paper":
        return paper_ramp(episodes)
    if name == "greedy":
        return np.ones(episodes)
    raise ValueError(f"ramp must be paper or greedy, got {name!r}")


def wilson(successes: np.ndarray, n: int, z: float = 1.96) -> list[list[float]]:
    """95 % Wilson score intervals of success counts out of ``n``."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [[float(max(0.0, c - h)), float(min(1.0, c + h))] for c, h in zip(centre, half)]


def baselines(maps: MapBatch, episodes: int, seed: int) -> dict[str, list[float]]:
    """Success per episode index of a random policy, tabular Q-learning from scratch, and the optimum."""
    rand = random_policy(maps, episodes, seed=seed).success.reshape(len(maps), episodes)
    tab_cfg = QLearningConfig(episodes=episodes, epsilon_start=1.0, epsilon_end=0.0,
                              epsilon_decay_episodes=min(20, episodes))
    tab = q_learning(maps, tab_cfg, seed=seed)[0].success.reshape(len(maps), episodes)
    dist = maps.goal_distances()
    solvable = np.array([(dist[b, maps.starts[b, : maps.n_starts[b]]] >= 0).all() and
                         dist[b, maps.starts[b, : maps.n_starts[b]]].max() <= 100 for b in range(len(maps))])
    return {"random": rand.mean(0).tolist(), "tabular_q": tab.mean(0).tolist(),
            "optimal": [float(solvable.mean())] * episodes}


def evaluate(qnet, fmt: ContextFormat, maps: MapBatch, cfg: EvalConfig, device: str = "cpu",
             max_positions: int | None = None, extra_config: dict | None = None, progress: bool = False) -> dict:
    """Run the protocol on ``maps`` and return the ``eval.json`` contract (plus per-map outcomes)."""
    cfg.validate()
    if len(maps) == 0:
        raise ValueError("there are no maps to evaluate")
    ramp = make_ramp(cfg.ramp, cfg.episodes)
    engine = RolloutEngine(qnet, fmt, window=cfg.window, device=device, max_positions=max_positions)
    parts = []
    for start in range(0, len(maps), cfg.batch_maps):
        sub = maps[np.arange(start, min(start + cfg.batch_maps, len(maps)))]
        parts.append(engine.run(sub, cfg.episodes, ramp, cfg.seed + start, progress=progress))
    outcomes = {k: np.concatenate([getattr(p, k) for p in parts]) for k in OUTCOMES}
    result = eval_result(cfg, outcomes, ramp, baselines(maps, cfg.episodes, cfg.seed), extra_config)
    result["_paths"] = [p for part in parts for p in part.paths]
    return result


def eval_result(cfg: EvalConfig, outcomes: dict, ramp, base: dict, extra_config: dict | None = None) -> dict:
    """The ``eval.json`` contract from per-map outcomes: ``outcomes`` maps each of ``OUTCOMES`` to ``[M, E]``
    arrays (``vars(rollout)`` will do)."""
    success = outcomes["success"]
    n, episodes = success.shape
    succ = success.sum(0)
    return {"experiment": cfg.experiment, "num_maps": n, "episodes": episodes, "success_rate": (succ / n).tolist(),
            "ci95": wilson(succ, n), "baselines": base,
            "config": {"eval": asdict(cfg), "ramp": [float(x) for x in ramp], **(extra_config or {})},
            "per_map": {k: np.asarray(outcomes[k]).astype(int).tolist() for k in OUTCOMES}}


def summary_rows(result: dict) -> list[str]:
    """A text table: success by episode index vs the baselines."""
    s, b = result["success_rate"], result["baselines"]
    ramp = result["config"]["ramp"]
    rows = ["episode  P(model)  model [95% CI]        random  tabular_q  optimal"]
    for k in range(result["episodes"]):
        lo, hi = result["ci95"][k]
        rows.append(f"{k:>7}  {ramp[k]:>8.1f}  {s[k]:.2f} [{lo:.2f}, {hi:.2f}]   {b['random'][k]:>6.2f}  "
                    f"{b['tabular_q'][k]:>9.2f}  {b['optimal'][k]:>7.2f}")
    if "recovery" in result:
        rec = result["recovery"]
        k = rec["episodes_to_recover"]
        rows.append(f"non-stationary: pre-switch level {rec['pre_switch']:.2f} (the 10 episodes before the switch), "
                    f"last 10 after it {rec['post_switch_last10']:.2f}; back to {rec['level']:.0%} of the pre-switch "
                    f"level {'after ' + str(k) + ' episodes' if k is not None else 'never'}")
    elif "stitching" in result:
        st = result["stitching"]
        rows.append(f"stitching: {st['successes']}/{st['trials']} trials reached the goal, {sum(st['stitched'])} by "
                    f"the stitched path {st['stitched_path']}; paths: {st['paths']}")
    elif result["episodes"] > 20:
        late = slice(20, result["episodes"])
        rows.append(f"episodes 20-{result['episodes'] - 1} (P(model)=1): model {np.mean(s[late]):.2f}, tabular_q "
                    f"{np.mean(b['tabular_q'][late]):.2f}, random {np.mean(b['random'][late]):.2f}; episodes 0-1: "
                    f"model {np.mean(s[:2]):.2f}, random {np.mean(b['random'][:2]):.2f}")
    return rows


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


def main(argv: list[str] | None = None) -> int:
    from icrl_fast.train import load_run_for_eval

    p = argparse.ArgumentParser(prog="python -m icrl_fast.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a run directory written by python -m icrl_fast.train")
    p.add_argument("--maps", type=int, default=50)
    p.add_argument("--episodes", type=int, default=None, help="episodes per context (default 30; stitching: 5)")
    p.add_argument("--experiment", choices=EXPERIMENTS, default="in-distribution",
                   help="in-distribution (unseen 3-5 maps), ood (6-7 maps), non-stationary (a new map after "
                        "EPISODES episodes, EPISODES more), stitching (the 4x6 map after two hand-written episodes; "
                        "EPISODES greedy trials, default 5), imitation (a probe: 5 successful episodes of a "
                        "tabular learner in context, then greedy; control: an empty context)")
    p.add_argument("--ramp", choices=("paper", "greedy"), default="paper",
                   help="paper: P(model) 0.0 -> 1.0 over episodes 0-19; greedy: the model acts from episode 0")
    p.add_argument("--window", type=int, default=None, help="attend to the last WINDOW tokens (ring-buffer KV cache)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=None, help="output folder (default: the run directory for the paper protocol, "
                                               "else RUN/eval-EXPERIMENT[-greedy])")
    args = p.parse_args(argv)
    episodes = args.episodes if args.episodes is not None else (5 if args.experiment == "stitching" else 30)
    ecfg = EvalConfig(maps=args.maps, episodes=episodes, experiment=args.experiment, seed=args.seed,
                      ramp=args.ramp, window=args.window)
    try:
        ecfg.validate()
        if args.maps < 1:
            raise ValueError(f"--maps must be >= 1, got {args.maps}")
        qnet, fmt, maps, cfg = load_run_for_eval(Path(args.run), args.experiment, args.maps)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ecfg.maps = len(maps)
    extra = {"run": str(args.run)}
    if args.experiment == "non-stationary":
        from icrl_fast.experiments import non_stationary

        switched = maps[np.roll(np.arange(len(maps)), 1)]  # each context moves on to another unseen map
        result = non_stationary(qnet, fmt, maps, switched, ecfg, max_positions=cfg.model.max_positions,
                                extra_config=extra, progress=True)
    elif args.experiment == "stitching":
        from icrl_fast.envs.maps import MAPS
        from icrl_fast.experiments import stitching

        maps = MapBatch.from_descs([MAPS["stitching"]])
        result = stitching(qnet, fmt, ecfg, extra_config=extra)
    elif args.experiment == "imitation":
        from icrl_fast.experiments import imitation

        result = imitation(qnet, fmt, maps, ecfg, max_positions=cfg.model.max_positions, extra_config=extra,
                           progress=True)
    else:
        result = evaluate(qnet, fmt, maps, ecfg, max_positions=cfg.model.max_positions, extra_config=extra,
                          progress=True)
    print("\n".join(summary_rows(result)))
    default = Path(args.run) if (args.experiment, args.ramp) == ("in-distribution", "paper") else \
        Path(args.run) / f"eval-{args.experiment}{'-greedy' if args.ramp == 'greedy' else ''}"
    for path in write_outputs(result, Path(args.out) if args.out else default, maps):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
