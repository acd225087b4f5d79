"""The paper's evaluation: the eval.json contract, plots, and contexts in the training format."""

import json

import numpy as np
import pytest

from icrl_fast.data.formats import compact_format, paper_format
from icrl_fast.data.step_format import StepFormat
from icrl_fast.envs.maps import generate_maps
from icrl_fast.evaluate import EvalConfig, evaluate, paper_ramp, wilson, write_outputs
from icrl_fast.model.qnet import ModelConfig, QNetwork
from icrl_fast.rl.rollout import RolloutEngine


def tiny(fmt):
    return QNetwork(ModelConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64), fmt.vocab_size,
                    fmt.action_ids, seed=1).eval()


def test_ramp_and_wilson_intervals():
    r = paper_ramp(30)
    assert r[:4].tolist() == [0.0, 0.0, 0.1, 0.1] and r[18:20].tolist() == [0.9, 0.9] and (r[20:] == 1.0).all()
    ci = wilson(np.array([0, 25, 50]), 50)
    assert ci[0][0] == 0.0 and ci[2][1] == 1.0 and ci[1][0] < 0.5 < ci[1][1]


def test_eval_json_contract_and_plots(tmp_path):
    fmt = compact_format()
    maps = generate_maps(4, seed=3)
    result = evaluate(tiny(fmt), fmt, maps, EvalConfig(maps=4, episodes=6, seed=0))
    written = write_outputs(result, tmp_path, maps)
    data = json.loads((tmp_path / "eval.json").read_text())
    assert {"experiment", "num_maps", "episodes", "success_rate", "ci95", "baselines", "config"} <= set(data)
    assert data["num_maps"] == 4 and data["episodes"] == 6 and len(data["success_rate"]) == 6
    assert all(lo <= s <= hi for s, (lo, hi) in zip(data["success_rate"], data["ci95"]))
    assert set(data["baselines"]) == {"random", "tabular_q", "optimal"}
    assert all(len(v) == 6 for v in data["baselines"].values()) and data["baselines"]["optimal"] == [1.0] * 6
    assert [p.name for p in written] == ["eval.json", "eval.png", "trajectories.png"]
    assert all(p.stat().st_size > 1000 for p in written)


@pytest.mark.parametrize("fmt", [compact_format(), paper_format(), StepFormat()],
                         ids=["compact", "paper", "step"])
def test_evaluation_contexts_are_in_the_training_format(fmt):
    """Each evaluation context decodes (with the training decoder) into exactly the episodes that were played."""
    from icrl_fast.data.formats import decode

    maps = generate_maps(5, seed=2)
    out = RolloutEngine(tiny(fmt), fmt).run(maps, 6, paper_ramp(6), seed=0)
    for b in range(5):
        episodes = decode(fmt, out.tokens[b])
        assert len(episodes) == 6
        for e, ep in enumerate(episodes):
            assert ep["obs"] == out.paths[b][e][:-1]  # the observations the agent saw, in order
            assert (ep["rewards"][-1] == 1.0) == bool(out.success[b, e])
            assert ep["truncated"] == bool(out.truncated[b, e])


def test_ood_size_flag(tmp_path, capsys):
    from icrl_fast.checkpoint import OOD_SIZE as DEFAULT_MAPS
    from icrl_fast.evaluate import OOD_SIZE, main, parse_size
    assert parse_size("6-7x3-5") == ((6, 7), (3, 5)) and parse_size("5x6-7") == ((5, 5), (6, 7))
    assert parse_size(OOD_SIZE) == DEFAULT_MAPS  # the flag's default is the ood experiment's maps
    for bad in ("6-7", "axb", "7-6x3-5", "6-7x3-5x2", "1x3"):
        with pytest.raises(ValueError, match="--ood-size"):
            parse_size(bad)
    assert main([str(tmp_path), "--experiment", "ood", "--ood-size", "6x"]) == 2  # a one-line error, no traceback
    assert "--ood-size must look like" in capsys.readouterr().err
    assert main([str(tmp_path), "--ood-size", "6-7x3-5"]) == 2
    assert "applies to --experiment ood only" in capsys.readouterr().err
