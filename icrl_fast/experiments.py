"""The paper's experiments beyond plain in-context evaluation (arXiv 2501.14176, DESIGN.md §1), each returning the
``eval.json`` contract of ``icrl_fast.evaluate`` plus its own section.

* ``non_stationary``: 30 episodes on map A, then 30 on map B in the same context, the exploration ramp restarted,
  nothing in the context marking the switch; 50 trials (maps). Adds ``recovery``: the pre-switch level (success
  in episodes 20-29) and how many episodes after the switch the model needs to get back to 90 % of it, and the
  same for the ceiling: the exact best success of a player that knows map B from the switch on, forced through
  the restarted ramp (``learners.ramp_ceiling``). On 2,000 random maps the ramp's random moves alone hold that
  player to 0.68 / 0.68 / 0.76 in episodes 10-12 after the switch: it is back at 90 % of a 0.78 pre-switch level at
  the 10th episode and of 0.9 only at the 14th, so above ~0.78 no learner meets "within 10 episodes" under the
  restarted ramp, and one that must first find the new goal needs more. Also the same for the forgetting context
  teacher (``learners.play_protocol`` with ``forget`` and the least-tried rule, the default's: a player that knows
  only its context) on the same maps under the same ramp, 20 plays per map: what imitating it can reach (on 2,000
  maps: back at 90 % after 9 episodes acting by itself, 18 under the restarted ramp).
* ``stitching``: the fixed 4 x 6 map ``HHFF FFFF SFFH HFFF HFFF HFGF`` (S = tile 8, G = tile 22). The context
  starts with two hand-written episodes that cross at tile 10: a successful detour over the top row
  (8 -> 4 -> 5 -> 6 -> 10 -> 14 -> 18 -> 22) and a short start into a hole (8 -> 9 -> 10 -> 11). Stitching = taking
  the second's start and the first's end: 8 -> 9 -> 10 -> 14 -> 18 -> 22. Then 5 greedy trials, each seeing the
  earlier ones. Adds ``stitching``: the success count, each trial's path and whether it was the stitched one.
* ``imitation`` (a probe of ours, not one of the paper's experiments): does the model read its context at all?
  Each context opens with ``shown`` successful episodes of a converged tabular Q-learner on that map (the kind of
  episodes the offline data is full of), then the model acts greedily; the control plays the same maps greedily
  from an empty context. A model that uses its context copies the demonstrations (up to the optimum); one that
  ignores it stays at the control. It separates "cannot use the context" from "the ramp's context held no
  success to use". Adds ``imitation``: the control's success per episode and how many demonstrations each map had.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from icrl_fast.data.formats import encode_episodes
from icrl_fast.data.step_format import grid_numbered, observation_names
from icrl_fast.envs.learners import QLearningConfig, play_protocol, q_learning, ramp_ceiling
from icrl_fast.envs.maps import MAPS, MapBatch
from icrl_fast.protocol import EvalConfig, baselines, eval_result, make_ramp, wilson
from icrl_fast.rl.rollout import RolloutEngine

LEFT, DOWN, RIGHT, UP = range(4)
STITCH_EPISODES = (  # (observations, actions, rewards) of the two hand-written context episodes
    ([8, 4, 5, 6, 10, 14, 18, 22], [UP, RIGHT, RIGHT, DOWN, DOWN, DOWN, DOWN], [0, 0, 0, 0, 0, 0, 1.0]),
    ([8, 9, 10, 11], [RIGHT, RIGHT, RIGHT], [0, 0, 0]),
)
STITCHED_PATH = [8, 9, 10, 14, 18, 22]
TEACHER_PLAYS = 20  # plays per map of the context teacher beside the non-stationary experiment


def non_stationary(qnet, fmt, maps_a: MapBatch, maps_b: MapBatch, cfg: EvalConfig, device: str = "cpu",
                   max_positions: int | None = None, extra_config: dict | None = None, progress: bool = False,
                   engine_options: dict | None = None) -> dict:
    """``cfg.episodes`` episodes on each map of ``maps_a`` then as many on ``maps_b`` (see the module docstring).
    ``engine_options``: more ``RolloutEngine`` arguments (graph, compile), as in ``evaluate``."""
    half = cfg.episodes
    ramp = np.concatenate([make_ramp(cfg.ramp, half)] * 2)
    engine = RolloutEngine(qnet, fmt, window=cfg.window, device=device, max_positions=max_positions,
                           **(engine_options or {}))
    out = engine.run(maps_a, 2 * half, ramp, cfg.seed, switch_to=maps_b, switch_after=half, progress=progress)
    a, b = baselines(maps_a, half, cfg.seed), baselines(maps_b, half, cfg.seed + 1)
    base = {k: a[k] + b[k] for k in a}  # the baselines restart from scratch on the new map, as the ramp does
    result = eval_result(cfg, vars(out), ramp, base, extra_config)
    result["config"]["switch_after"] = half
    result["recovery"] = recovery(result["success_rate"], half)
    # The ceiling under the restarted ramp: the best a player that knows map B from the switch on can expect, forced
    # through the same ramp (exact). The ramp's random moves alone hold it near 0.7 ten episodes after the switch.
    # Without forced random moves (--ramp greedy) that player is back at once: no ceiling to report.
    if (ramp[half:] < 1).any():
        best = ramp_ceiling(maps_b, ramp[half:]).mean(0)
        result["recovery"]["ceiling"] = {
            "success_rate": best.tolist(),
            "episodes_to_recover": recovery([*result["success_rate"][:half], *best], half)["episodes_to_recover"]}
    # A player that knows only its context: the forgetting context teacher (--protocol.forget, least-tried: the
    # default's rules) on the same maps under the same ramp, 20 plays per map: what imitating it can reach.
    reps = np.tile(np.arange(len(maps_a)), TEACHER_PLAYS)
    log, _ = play_protocol(maps_a[reps], ramp, seed=cfg.seed, least_tried=True, forget=True, switch_to=maps_b[reps],
                           switch_after=half)
    played = log.success.reshape(len(reps), 2 * half).mean(0).tolist()
    back = recovery(played, half)
    result["recovery"]["teacher"] = {"success_rate": played, "plays_per_map": TEACHER_PLAYS,
                                     **{k: back[k] for k in ("pre_switch", "episodes_to_recover")}}
    result["_paths"] = [p[:half] for p in out.paths]  # drawn on map A: its episodes only
    return result


def recovery(success_rate: list[float], switch: int, level: float = 0.9, window: int = 3) -> dict:
    """Pre-switch level (mean success over the 10 episodes before the switch) and the first episode after the
    switch from which the mean over ``window`` episodes reaches ``level`` x that (None: never)."""
    s = np.asarray(success_rate)
    pre = float(s[max(0, switch - 10): switch].mean())
    after = [k for k in range(switch, len(s) - window + 1) if s[k: k + window].mean() >= level * pre]
    return {"pre_switch": pre, "post_switch_last10": float(s[-10:].mean()), "level": level,
            "episodes_to_recover": (after[0] - switch) if after else None}


def stitch_prefix(engine: RolloutEngine, maps: MapBatch) -> list[int]:
    """The tokens of the two hand-written episodes on the stitching map ``maps[0]``, its observations named as the
    engine's format shows them (``observation_names``: a grid format renames them)."""
    names = observation_names(engine.fmt, maps)
    return [t for obs, actions, rewards in STITCH_EPISODES
            for t in engine.streams.episode([o if names is None else int(names[0, o]) for o in obs], actions, rewards)]


def stitching(qnet, fmt, cfg: EvalConfig, device: str = "cpu", extra_config: dict | None = None,
              engine_options: dict | None = None) -> dict:
    """The behaviour-stitching test: ``cfg.episodes`` greedy trials after the two hand-written episodes."""
    cfg = replace(cfg, ramp="greedy")  # every trial acts greedily
    maps = MapBatch.from_descs([MAPS["stitching"]])
    engine = RolloutEngine(qnet, fmt, window=cfg.window, device=device, **(engine_options or {}))
    prefix = stitch_prefix(engine, maps)
    out = engine.run(maps, cfg.episodes, 1.0, cfg.seed, prefix=[prefix])
    paths = out.paths[0]
    result = eval_result(cfg, vars(out), np.ones(cfg.episodes), baselines(maps, cfg.episodes, cfg.seed), extra_config)
    result["stitching"] = {"successes": int(out.success.sum()), "trials": cfg.episodes, "paths": paths,
                           "stitched": [p == STITCHED_PATH for p in paths], "stitched_path": STITCHED_PATH,
                           "context_paths": [list(e[0]) for e in STITCH_EPISODES]}
    result["_paths"] = [paths]
    return result


def demonstrations(fmt, maps: MapBatch, shown: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Per map, the tokens of the last ``shown`` successful episodes of a tabular Q-learner trained on it (the
    default ``QLearningConfig``: converged on >= 95 % of 3-5 maps), encoded as the offline data is, and how many
    there were."""
    log, _ = q_learning(maps, QLearningConfig(), seed=seed)
    log = grid_numbered(fmt, log, maps)
    prefix, counts = [], []
    for b in range(len(maps)):
        demos = np.flatnonzero((log.map_id == b) & log.success)[-shown:]
        prefix.append(encode_episodes(fmt, log, demos)[0].tolist())
        counts.append(len(demos))
    return prefix, counts


def imitation(qnet, fmt, maps: MapBatch, cfg: EvalConfig, device: str = "cpu", max_positions: int | None = None,
              extra_config: dict | None = None, progress: bool = False, shown: int = 5,
              engine_options: dict | None = None) -> dict:
    """The context-use probe (see the module docstring): ``shown`` demonstrations, then ``cfg.episodes`` greedy
    episodes; the control without them."""
    cfg = replace(cfg, ramp="greedy")
    engine = RolloutEngine(qnet, fmt, window=cfg.window, device=device, max_positions=max_positions,
                           **(engine_options or {}))
    prefix, counts = demonstrations(fmt, maps, shown, cfg.seed)
    out = engine.run(maps, cfg.episodes, 1.0, cfg.seed, prefix=prefix, progress=progress)
    control = engine.run(maps, cfg.episodes, 1.0, cfg.seed, progress=progress)
    result = eval_result(cfg, vars(out), np.ones(cfg.episodes), baselines(maps, cfg.episodes, cfg.seed), extra_config)
    result["imitation"] = {"shown": shown, "demonstrations": counts,
                           "control": control.success.mean(0).tolist(),
                           "control_ci95": wilson(control.success.sum(0), len(maps))}
    result["_paths"] = out.paths
    return result
