"""The paper's in-context evaluation protocol, as data: its configuration, the exploration ramp, the baselines on the
same maps, and the ``eval.json`` contract (arXiv 2501.14176; DESIGN.md §1).

Every test map gets one growing context of ``episodes`` (30) episodes. In episode ``k`` the agent takes the model's
greedy action with probability ``ramp[k]`` and a uniform random action otherwise: 0.0, 0.0, 0.1, 0.1, ..., 0.9, 0.9,
then 1.0 for 10 episodes. The metric is the success rate per episode index, with 95 % Wilson intervals, beside a
uniform random policy, tabular Q-learning from scratch (epsilon 1.0 -> 0.0 over 20 episodes) and the optimum.

Running it belongs to ``icrl_fast.evaluate`` (the model) and ``icrl_fast.experiments``; training sources read the
ramp from here too, so none of them imports another's entry point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from icrl_fast.envs.learners import QLearningConfig, q_learning, random_policy
from icrl_fast.envs.maps import MapBatch

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


def _after(episodes: int | None) -> str:
    return "never" if episodes is None else f"after {episodes} episodes"


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
                    f"level {_after(k)}")
        if "ceiling" in rec:
            c = rec["ceiling"]
            after, n = c["success_rate"], min(10, len(c["success_rate"]))
            rows.append(f"  the ceiling (the best a player that knows the new map can expect under the same restarted "
                        f"ramp): {_after(c['episodes_to_recover'])}; episodes 0-{n - 1} after the switch: model "
                        f"{np.mean(s[-len(after):][:n]):.2f}, ceiling {np.mean(after[:n]):.2f}")
        if "teacher" in rec:
            t = rec["teacher"]
            rows.append(f"  the forgetting context teacher (a player that knows only its context, "
                        f"{t['plays_per_map']} plays per map): back to {rec['level']:.0%} of its pre-switch "
                        f"{t['pre_switch']:.2f} {_after(t['episodes_to_recover'])}")
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
