"""``python -m icrl_fast.report RUN_DIR...``: every evaluation of one or several runs in one Markdown table, a figure,
and the failure analysis of the paper's §4.6 (how failed episodes failed).

Reads each run's ``eval.json`` and ``eval-*/eval.json`` (written by ``python -m icrl_fast.train`` and
``python -m icrl_fast.evaluate``), and writes ``report.md`` and ``report.png`` into ``--out`` (default: the first
run directory). Runs that also hold ``config.json`` and ``metrics.jsonl`` get a training table (recipe, steps,
tokens, training minutes, the curve) and ``compute.png``: success in episodes 20-29 against training minutes, one
line per recipe (a recipe: the runs whose configs differ only in steps and seed; at most six, ``--compute-recipes``
or the newest ones with several runs), each run a point. ``--readme FILE`` also replaces the blocks between
``<!-- report:start -->`` and ``<!-- report:end -->`` (evaluations) and ``<!-- training:start -->`` /
``<!-- training:end -->`` (training runs) in that file, which is how docs/results.md is generated.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

#: What the paper reports for each experiment (arXiv 2501.14176; DESIGN.md §1).
PAPER = {
    "in-distribution": "~10 % in the early (random) episodes -> ~90 %+ by the end",
    "ood": "improves in context, less than in distribution",
    "non-stationary": "recovers to almost the pre-switch level",
    "stitching": "5/5 trials reach the goal",
    "imitation": "(our probe; not in the paper)",
}
START, END = "<!-- report:start -->", "<!-- report:end -->"
TRAIN_START, TRAIN_END = "<!-- training:start -->", "<!-- training:end -->"


def find_evals(run: Path) -> list[tuple[str, dict]]:
    """``(label, eval.json contents)`` of every evaluation in a run directory."""
    files = ([run / "eval.json"] if (run / "eval.json").is_file() else []) + sorted(run.glob("eval-*/eval.json"))
    return [(f"{run.name}/{f.parent.name}" if f.parent != run else run.name, json.loads(f.read_text()))
            for f in files]


def _mean(xs, lo: int, hi: int) -> float:
    return float(np.mean(xs[lo:hi])) if len(xs) >= hi > lo else float("nan")


def failures(ev: dict) -> dict:
    """Of the failed episodes: fell in a hole, looped until the time limit, and failed without the goal ever
    having been reached earlier in that context (never saw it; the stitching context shows it from the start)."""
    pm = ev.get("per_map")
    if not pm:
        return {}
    success, hole, trunc = (np.asarray(pm[k], dtype=bool) for k in ("success", "hole", "truncated"))
    failed = ~success
    seen_before = np.cumsum(success, axis=1) - success > 0  # a success in an earlier episode of the context
    if "stitching" in ev or "imitation" in ev:  # the context opens with episodes that reach the goal
        seen_before[:] = True
    n = int(failed.sum())
    return {"failed": n, "hole": int((failed & hole).sum()), "loop": int((failed & trunc).sum()),
            "never_saw_goal": int((failed & ~seen_before).sum())}


def _after(episodes: int | None) -> str:
    return "never" if episodes is None else f"after {episodes} episodes"


def row(label: str, ev: dict) -> str:
    s, base = ev["success_rate"], ev["baselines"]
    exp, ramp = ev["experiment"], ev["config"].get("eval", {}).get("ramp", "paper")
    meta = ev.get("meta", {})
    if "stitching" in ev:
        st = ev["stitching"]
        ours = f"{st['successes']}/{st['trials']} reach the goal ({sum(st['stitched'])} by the stitched path)"
    elif "imitation" in ev:
        im = ev["imitation"]
        ours = (f"greedy after {im['shown']} successful episodes in context **{float(np.mean(s)):.2f}**, from an "
                f"empty context {float(np.mean(im['control'])):.2f} (optimal {float(np.mean(base['optimal'])):.2f})")
    elif "recovery" in ev:
        r = ev["recovery"]
        k = r["episodes_to_recover"]
        ours = (f"pre-switch {r['pre_switch']:.2f}, last 10 after the switch {r['post_switch_last10']:.2f}, "
                f"back to 90 % {_after(k)}")
        if "ceiling" in r:
            ours += (f" (the ceiling under the restarted ramp, a player that knows the new map: "
                     f"{_after(r['ceiling']['episodes_to_recover'])})")
        if "teacher" in r:
            ours += f"; the forgetting context teacher: {_after(r['teacher']['episodes_to_recover'])}"
    else:
        ours = (f"episodes 0-1 **{_mean(s, 0, 2):.2f}**, 10-19 {_mean(s, 10, 20):.2f}, 20-29 **{_mean(s, 20, 30):.2f}**"
                f" (tabular Q {_mean(base['tabular_q'], 20, 30):.2f}, random {_mean(base['random'], 20, 30):.2f})")
    f = failures(ev)
    fail = f"{f['hole']} hole / {f['loop']} loop / {f['never_saw_goal']} never saw G (of {f['failed']})" if f else ""
    where = f"{meta.get('device', '?')}, {meta.get('date', '?')[:10]}"
    size = ev["config"].get("ood_size", "6-7x6-7")
    shown = f"{exp} {size}" if exp == "ood" and size != "6-7x6-7" else exp
    return f"| {label} | {shown} ({ramp}) | {ev['num_maps']} | {ours} | {PAPER.get(exp, '')} | {fail} | {where} |"


def table(evals: list[tuple[str, dict]]) -> list[str]:
    return [("| run | experiment (exploration) | maps | ours | paper reports | failed episodes: hole / loop / never "
             "saw the goal | device, date |"), "| --- | --- | --- | --- | --- | --- | --- |",
            *(row(label, ev) for label, ev in evals)]


def figure(evals: list[tuple[str, dict]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({ev["experiment"] for _, ev in evals})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        shown = [(label, ev) for label, ev in evals if ev["experiment"] == kind]
        for i, (label, ev) in enumerate(shown):
            k = np.arange(ev["episodes"])
            ax.plot(k, ev["success_rate"], "o-", ms=3, color=f"C{i}", label=label)
        ev = shown[0][1]
        k = np.arange(ev["episodes"])
        for name, style in (("random", "k--"), ("tabular_q", "k-."), ("optimal", "k:")):
            ax.plot(k, ev["baselines"][name], style, lw=1, label=name.replace("_", " "))
        ax.set(title=kind, xlabel="episode in context", ylabel="success rate", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training(run: Path) -> dict | None:
    """What a run trained on and what it reached: recipe, optimizer steps, tokens, training minutes (from the
    logged tokens/s, so evaluation and rollouts are not counted), its in-distribution curve and the baselines."""
    cfg_file, metrics, ev_file = run / "config.json", run / "metrics.jsonl", run / "eval.json"
    if not (cfg_file.is_file() and metrics.is_file() and ev_file.is_file()):
        return None
    cfg, ev = json.loads(cfg_file.read_text()), json.loads(ev_file.read_text())
    recs = [r for r in map(json.loads, metrics.read_text().splitlines()) if "perf/tokens_per_s" in r]
    seconds, last_tokens = 0.0, 0
    for r in recs:
        tokens = r.get("perf/tokens")
        if tokens is None:  # runs from before perf/tokens logged no token count: no training time to report
            continue
        seconds += (tokens - last_tokens) / max(r["perf/tokens_per_s"], 1e-9)
        last_tokens = tokens
    obj, model, optim = cfg.get("objective", {"td": 1.0}), cfg["model"], cfg["optim"]
    parts = [f"{k} {obj[k]:g}" for k in ("td", "imitation", "observation") if obj.get(k)]
    tau = cfg.get("dqn", {}).get("tau", 0.1)
    if obj.get("td") and tau != 0.1:  # the paper's Polyak factor is the default; say when a run changed it
        parts[0] += f" (tau {tau:g})"
    if obj.get("td") and cfg.get("dqn", {}).get("gamma_episode"):  # the target bootstraps across episode ends
        parts[0] += f" (across episodes {cfg['dqn']['gamma_episode']:g})"
    if cfg.get("dqn", {}).get("cql"):
        parts.append(f"cql {cfg['dqn']['cql']:g}")
    s, base = ev["success_rate"], ev["baselines"]
    protocol = cfg.get("protocol", {}) if cfg["mode"] == "protocol" else {}
    noise, switch, shift = protocol.get("noise", 0.0), protocol.get("switch", 0.0), protocol.get("shift", 0.0)
    fmt = run_format_name(run, cfg)  # step: one token per env step (compact ~2): tokens count differently
    point = run / "train_point.json"  # a run sized to a wall-clock budget on a lent GPU (benchmarks/gpu/train_point.py)
    device = json.loads(point.read_text())["device"] if point.is_file() else "CPU"
    return {"run": run.name, "mode": cfg["mode"] + (f", noise {noise:g}" if noise else "")
            + (f", {switch:.0%} of contexts switch maps" if switch else "")
            + (f", {shift:.0%} of maps shifted on the grid" if shift else "")
            + _teacher_note(protocol),
            "objectives": " + ".join(parts),
            "model": f"{model['layers']}x{model['hidden_size']}" + FORMAT_NOTE.get(fmt, "")
            + ("" if model.get("factored_embedding", True) or not FORMAT_NOTE.get(fmt)
               else ", one embedding per token")
            + ((", same-state memory" + (" (forgetting)" if model.get("memory_forget") else ""))
               if model.get("memory") else ""),
            "lr": f"{optim['lr']:g} {optim.get('schedule', 'constant')}",
            "steps": recs[-1]["step"] if recs else 0, "tokens": last_tokens, "minutes": seconds / 60,
            "tok_s": last_tokens / seconds if seconds else float("nan"), "early": _mean(s, 0, 2),
            "mid": _mean(s, 10, 20), "late": _mean(s, 20, 30), "tabular_q": _mean(base["tabular_q"], 20, 30),
            "random": _mean(base["random"], 20, 30), "ramp": ev["config"].get("eval", {}).get("ramp", "paper"),
            "device": device, "recipe": recipe_key(cfg), "seed": cfg.get("seed", 0),
            "date": ev.get("meta", {}).get("date", "")}


#: Config fields that do not make a recipe: bookkeeping, the evaluation, and the two a compute curve varies.
NOT_RECIPE = ("seed", "optim.steps", "preset", "data_path", "log_every", "ckpt_every", "deterministic", "threads",
              "device", "parallel", "eval.")


def recipe_key(cfg: dict) -> str:
    """What a run trained with, apart from its steps, seed and bookkeeping: runs with equal keys are one recipe."""
    flat, todo = {}, [("", cfg)]
    while todo:
        prefix, d = todo.pop()
        for k, v in d.items():
            if isinstance(v, dict):
                todo.append((f"{prefix}{k}.", v))
            elif not f"{prefix}{k}".startswith(NOT_RECIPE):
                flat[f"{prefix}{k}"] = v
    return json.dumps(flat, sort_keys=True)


def _teacher_note(protocol: dict) -> str:
    """What the training table says of a protocol run's teacher (the default rule, "any", says nothing)."""
    words = [w for w, on in (("least-tried", protocol.get("teacher", "any") == "least-tried"),
                             ("forgetting", protocol.get("forget", False))) if on]
    note = f", {' '.join(words)} teacher" if words else ""
    behaviour = protocol.get("behaviour", "teacher")
    return note + ("" if behaviour == "teacher" else f", played by {BEHAVIOUR_NOTE.get(behaviour, behaviour)}")


#: who played a protocol run's contexts beside the ramp's random actions, when not the teacher
BEHAVIOUR_NOTE = {"q-learning": "a tabular Q-learner", "self": "the model"}


#: what the training table says of a run's context format (the compact format, the default of the logged runs
#: before e19, says nothing)
FORMAT_NOTE = {"step": ", step format", "step-noend": ", step format without where episodes ended",
               "step-grid": ", step format, cells numbered on one 8-column grid"}


def run_format_name(run: Path, cfg: dict) -> str | None:
    """The context format a run trained in (``checkpoint.run_format``'s rule): a protocol run's own
    ``--data.format``; an offline or online run's dataset's (its manifest), when that can be read."""
    if cfg["mode"] == "protocol":
        return cfg.get("data", {}).get("format")
    manifest = Path(cfg["data_path"]) if cfg.get("data_path") else run / "dataset"
    try:
        return json.loads((manifest / "manifest.json").read_text())["format"]["name"]
    except (OSError, KeyError, ValueError):
        return cfg.get("data", {}).get("format")


def training_table(rows: list[dict]) -> list[str]:
    out = [("| run | source | objectives | model | lr | steps | tokens | train min | tok/s | episodes 0-1 | 10-19 | "
            "**20-29** | tabular Q 20-29 | device |"), "|" + " --- |" * 14]
    for r in rows:
        out.append(f"| {r['run']} | {r['mode']} | {r['objectives']} | {r['model']} | {r['lr']} | {r['steps']:,} | "
                   f"{r['tokens'] / 1e6:.1f} M | {r['minutes']:.1f} | {r['tok_s']:,.0f} | {r['early']:.2f} | "
                   f"{r['mid']:.2f} | **{r['late']:.2f}** | {r['tabular_q']:.2f} | {r['device']} |")
    return out


#: The most recipes one compute figure shows (more make it unreadable at README width).
MAX_RECIPES = 6


def default_recipe() -> str | None:
    """The recipe of today's ``--preset default`` (``None`` where the training code cannot be imported)."""
    try:
        import dataclasses

        from icrl_fast.presets import preset
    except ImportError:
        return None
    return recipe_key(json.loads(json.dumps(dataclasses.asdict(preset("default")))))


def choose_recipes(rows: list[dict], picks: list[str] | None = None) -> list[tuple[str, list[dict]]]:
    """``(label, rows)`` per recipe to draw, oldest recipe first.

    ``picks``: ``RUN`` or ``RUN=LABEL`` entries, each naming one run of a recipe (the label defaults to the recipe's
    oldest run's name; the default's recipe says so); ``ValueError`` for an unknown run, two picks of one recipe or
    more than ``MAX_RECIPES``. Without picks: the default's recipe, then the recipes evaluated last among those with
    two runs or more (seeds, lengths), then single runs, newest first, ``MAX_RECIPES`` in all."""
    groups: dict[str, list[dict]] = {}
    default = default_recipe() if rows else None
    for r in rows:
        groups.setdefault(r["recipe"], []).append(r)
    for g in groups.values():
        g.sort(key=lambda r: (r["date"], r["run"]))
    if picks:
        if len(picks) > MAX_RECIPES:
            raise ValueError(f"--compute-recipes takes at most {MAX_RECIPES} recipes (a figure with more is "
                             f"unreadable), got {len(picks)}: {', '.join(picks)}")
        by_run, chosen = {r["run"]: r for r in rows}, []
        for pick in picks:
            name, _, label = pick.partition("=")
            if name not in by_run:
                raise ValueError(f"--compute-recipes names run {name!r}, which is not among the runs with a training "
                                 f"record ({', '.join(sorted(by_run))})")
            key = by_run[name]["recipe"]
            if any(key == k for _, k in chosen):
                raise ValueError(f"--compute-recipes names the recipe of {name!r} twice (one run of a recipe is "
                                 f"enough: its other steps and seeds come with it)")
            chosen.append((label, key))
    else:
        newest = sorted(groups, key=lambda k: (k == default, len(groups[k]) > 1, groups[k][-1]["date"]), reverse=True)
        chosen = [("", k) for k in newest[:MAX_RECIPES]]
        chosen.sort(key=lambda c: groups[c[1]][0]["date"])
    out = []
    for label, key in chosen:
        g = groups[key]
        where = {r["device"] for r in g} - {"CPU"}
        out.append((label or g[0]["run"] + (f" ({len(g)} runs)" if len(g) > 1 else "")
                    + (f", {', '.join(sorted(where))}" if where else "") + (", the default" if key == default else ""),
                    g))
    return out


def compute_figure(rows: list[dict], path: Path, picks: list[str] | None = None) -> Path:
    """Success in episodes 20-29 against training minutes: per recipe (``choose_recipes``) every run a small point and
    a line through the mean of each step count, with tabular Q-learning and the 0.8 bar; ~800 px wide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = choose_recipes(rows, picks)
    with plt.rc_context({"font.size": 12}):
        fig, ax = plt.subplots(figsize=(8, 5.6))
        for i, (label, runs) in enumerate(recipes):
            color = f"C{i}"
            ax.plot([r["minutes"] for r in runs], [r["late"] for r in runs], "o", ms=5, color=color, alpha=0.45,
                    mec="none")
            steps = sorted({r["steps"] for r in runs})
            at = [[r for r in runs if r["steps"] == s] for s in steps]
            ax.plot([np.mean([r["minutes"] for r in g]) for g in at], [np.mean([r["late"] for r in g]) for g in at],
                    "D-", ms=8, lw=2, color=color, label=label)
        if rows:
            ax.axhline(rows[0]["tabular_q"], color="k", ls="-.", lw=1,
                       label=f"tabular Q from scratch ({rows[0]['tabular_q']:.2f})")
            ax.axhline(0.8, color="0.4", ls=":", lw=1.5, label="the bar (0.8)")
        low = min([0.8] + [r["late"] for _, runs in recipes for r in runs] + [r["tabular_q"] for r in rows[:1]])
        ax.set_xlim(left=0)  # the y axis starts a little below the lowest point or reference line, in tenths
        ax.set(xlabel="training minutes (from the logged tokens/s)", ylabel="success, episodes 20-29",
               ylim=(max(0.0, np.floor(low * 10 - 0.5) / 10), 1.02), title="in-context RL vs training time (unseen maps)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=10, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False,
                  title="diamonds: a recipe's mean per step count; dots: its runs (seeds)", title_fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return path


def replace_block(path: Path, start: str, end: str, lines: list[str]) -> bool:
    text = path.read_text()
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m icrl_fast.report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default=None, help="where report.md and report.png go (default: the first run)")
    p.add_argument("--readme", default=None, help="a Markdown file whose report block is replaced")
    p.add_argument("--compute-recipes", default=None, metavar="RUN[=LABEL],...",
                   help=f"the recipes compute.png draws (at most {MAX_RECIPES}), each named by one of its runs, "
                        f"optionally with a legend label (no commas); default: the newest recipes with several runs")
    args = p.parse_args(argv)
    picks = [x.strip() for x in args.compute_recipes.split(",") if x.strip()] if args.compute_recipes else None
    evals = [e for run in args.runs for e in find_evals(Path(run))]
    if not evals:
        print(f"error: no eval.json in {', '.join(args.runs)} (run python -m icrl_fast.train / evaluate first)",
              file=sys.stderr)
        return 2
    trained = [r for r in (training(Path(run)) for run in args.runs) if r is not None]
    try:
        choose_recipes(trained, picks)  # a bad --compute-recipes stops the report before it writes anything
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or args.runs[0])
    out.mkdir(parents=True, exist_ok=True)
    lines = table(evals)
    png = figure(evals, out / "report.png")
    train_lines, extra = training_table(trained), []
    if trained:
        curve = compute_figure(trained, out / "compute.png", picks)
        extra = ["", "## Training runs", "", *train_lines, "", f"![compute]({curve.name})"]
        print("\n".join(train_lines))
    (out / "report.md").write_text("\n".join(["# icrl_fast report", "", *lines, "", f"![success]({png.name})",
                                              *extra, ""]))
    print("\n".join(lines))
    print(f"wrote {out / 'report.md'}, {png}")
    if args.readme:
        readme = Path(args.readme)
        if not replace_block(readme, START, END, lines):
            print(f"error: {readme} has no {START} ... {END} block", file=sys.stderr)
            return 2
        if trained and not replace_block(readme, TRAIN_START, TRAIN_END, train_lines):
            print(f"error: {readme} has no {TRAIN_START} ... {TRAIN_END} block", file=sys.stderr)
            return 2
        print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
