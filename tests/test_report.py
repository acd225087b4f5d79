"""``icrl_fast.report``'s compute figure: recipes (at most six), minutes on the x axis. The evaluation table and the
training table are tested with the experiments (tests/test_experiments.py)."""

from __future__ import annotations

import json

import pytest

from icrl_fast import report


def _row(run: str, recipe: str, date: str, steps: int = 2400, minutes: float = 12.0, late: float = 0.9) -> dict:
    return {"run": run, "recipe": recipe, "date": date, "steps": steps, "minutes": minutes, "late": late,
            "tabular_q": 0.45, "device": "CPU"}


@pytest.fixture
def rows(monkeypatch):
    """Eight recipes: r0..r6 with two seeds each (r6 the newest), r7 a single run, evaluated last; r0 the default."""
    monkeypatch.setattr(report, "default_recipe", lambda: "r0")
    out = []
    for i in range(7):
        out += [_row(f"e{i}a", f"r{i}", f"2026-12-0{i + 1}T01"), _row(f"e{i}b", f"r{i}", f"2026-12-0{i + 1}T02")]
    return out + [_row("e7", "r7", "2026-12-09T00")]


def test_recipes_are_runs_that_differ_only_in_steps_seed_and_bookkeeping():
    cfg = {"seed": 0, "preset": "default", "data_path": "runs/a/dataset", "eval": {"maps": 50},
           "optim": {"steps": 2400, "lr": 2e-3}, "dqn": {"gamma_episode": 0.9}}
    same = {**cfg, "seed": 2, "preset": "x", "data_path": None, "eval": {"maps": 6}, "optim": {"steps": 3200,
                                                                                              "lr": 2e-3}}
    assert report.recipe_key(same) == report.recipe_key(cfg)
    assert report.recipe_key({**cfg, "dqn": {"gamma_episode": 0.0}}) != report.recipe_key(cfg)
    assert report.recipe_key({**cfg, "optim": {"steps": 2400, "lr": 1e-3}}) != report.recipe_key(cfg)


def test_the_automatic_choice_is_capped_and_keeps_the_default(rows):
    chosen = report.choose_recipes(rows)
    assert len(chosen) == report.MAX_RECIPES == 6
    # the default's recipe (the oldest), then the newest recipes with several runs; r7 (one run) and r1, r2 left out
    assert [label for label, _ in chosen] == ["e0a (2 runs), the default", *(f"e{i}a (2 runs)" for i in range(2, 7))]
    assert [g[0]["recipe"] for _, g in chosen] == ["r0", "r2", "r3", "r4", "r5", "r6"]
    assert all(len(g) == 2 for _, g in chosen)


def test_picked_recipes_are_named_by_a_run_and_more_than_six_are_refused(rows):
    chosen = report.choose_recipes(rows, ["e7=one run", "e3b"])
    assert [(label, [r["run"] for r in g]) for label, g in chosen] == [("one run", ["e7"]),
                                                                        ("e3a (2 runs)", ["e3a", "e3b"])]
    with pytest.raises(ValueError, match="at most 6"):
        report.choose_recipes(rows, [f"e{i}a" for i in range(7)])
    with pytest.raises(ValueError, match="not among the runs"):
        report.choose_recipes(rows, ["e99"])
    with pytest.raises(ValueError, match="twice"):
        report.choose_recipes(rows, ["e1a", "e1b"])


def test_the_compute_figure_puts_training_minutes_on_the_x_axis(rows, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    drawn = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), save(fig, *a, **k))[1])
    rows = rows + [_row("e0c", "r0", "2026-12-01T03", steps=3200, minutes=20.0, late=1.0)]  # a longer run of r0
    path = report.compute_figure(rows, tmp_path / "compute.png", ["e0a=the default", "e5a"])
    assert path.stat().st_size > 1000
    (ax,) = drawn[0].axes
    assert "minutes" in ax.get_xlabel() and "20-29" in ax.get_ylabel()
    assert drawn[0].get_size_inches()[0] * drawn[0].dpi <= 800  # README width
    labels = ax.get_legend_handles_labels()[1]
    assert labels[:2] == ["the default", "e5a (2 runs)"] and len(labels) == 4  # + tabular Q and the bar
    line = next(h for h, label in zip(*ax.get_legend_handles_labels()) if label == "the default")
    assert list(line.get_xdata()) == [12.0, 20.0] and list(line.get_ydata()) == pytest.approx([0.9, 1.0])


def test_a_bad_pick_stops_the_report_before_it_writes(tmp_path, capsys):
    import dataclasses

    from icrl_fast.presets import preset

    run = tmp_path / "e1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(preset("smoke"))))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 12, "perf/tokens": 6000, "perf/tokens_per_s": 100.0}))
    (run / "eval.json").write_text(json.dumps({
        "experiment": "in-distribution", "num_maps": 6, "episodes": 30, "success_rate": [0.5] * 30,
        "ci95": [[0, 1]] * 30, "baselines": {k: [0.4] * 30 for k in ("random", "tabular_q", "optimal")},
        "config": {"eval": {"ramp": "paper"}}, "meta": {"date": "2026-12-05T00:00"}}))
    assert report.main([str(run), "--out", str(tmp_path / "out"), "--compute-recipes", "nope"]) == 2
    assert "not among the runs" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert report.main([str(run), "--out", str(tmp_path / "out"), "--compute-recipes", "e1=smoke"]) == 0
    assert (tmp_path / "out" / "compute.png").stat().st_size > 1000
