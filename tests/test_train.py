"""python -m icrl_fast.train: the smoke preset end to end, bit-identical resume after Ctrl-C, the NaN guard."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import icrl_fast.train as T


def smoke(**optim):
    cfg = T.preset("smoke")
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **optim), eval=dataclasses.replace(
        cfg.eval, maps=0), ckpt_every=4)


def final_state(run_dir):
    name = (run_dir / "checkpoints" / "latest").read_text()
    return load_file(str(run_dir / "checkpoints" / name / "state.safetensors"))


def test_smoke_preset_end_to_end(tmp_path, capsys):
    assert T.main(["--preset", "smoke", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "episode  P(model)" in out and "done: 12 steps" in out
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "eval.json", "eval.png", "trajectories.png", "checkpoints/latest"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 12 and {"losses/td", "charts/q", "perf/tokens_per_s"} <= set(metrics[-1])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["num_maps"] == 6 and ev["episodes"] == 4
    with pytest.raises(SystemExit):  # an existing run is continued with --resume, never overwritten
        T.parse_args(["--preset", "smoke", "--out", str(run)])
    # the saved run evaluates again from the command line, here greedy from episode 0 into its own folder
    from icrl_fast.evaluate import main as evaluate_main

    assert evaluate_main([str(run), "--maps", "3", "--episodes", "3", "--ramp", "greedy"]) == 0
    greedy = json.loads((run / "eval-in-distribution-greedy" / "eval.json").read_text())
    assert greedy["config"]["ramp"] == [1.0, 1.0, 1.0] and greedy["num_maps"] == 3
    assert evaluate_main([str(tmp_path / "nothing")]) == 2
    if not torch.cuda.is_available():  # --device: a clear error where there is no GPU, never a deep traceback
        assert evaluate_main([str(run), "--maps", "2", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert evaluate_main([str(run), "--maps", "2", "--episodes", "2", "--device", "cpu", "--out",
                          str(tmp_path / "cpu")]) == 0


def interrupted_and_resumed(cfg, tmp_path, monkeypatch, at: int):
    """Run ``cfg`` straight; run it again with Ctrl-C inside loss call ``at`` and resume. Returns the straight
    run's final state, the resumed run's, and the checkpoint the interruption left (name, tensors)."""
    T.run(cfg, tmp_path / "straight", progress=False)
    real, calls = T.dqn_loss, {"n": 0}

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "dqn_loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        T.run(cfg, tmp_path / "resumed", progress=False)
    saved = (tmp_path / "resumed" / "checkpoints" / "latest").read_text(), final_state(tmp_path / "resumed")
    monkeypatch.setattr(T, "dqn_loss", real)
    T.run(cfg, tmp_path / "resumed", resume=True, progress=False)
    return final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"), saved


def test_resume_after_ctrl_c_is_bit_identical(tmp_path, monkeypatch):
    a, b, (name, _) = interrupted_and_resumed(smoke(steps=8), tmp_path, monkeypatch, at=6)
    assert name == "step-000005"  # saved on Ctrl-C
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # weights, target weights and optimizer moments, bit for bit


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = T.dqn_loss
    calls = {"n": 0}

    def nan_at_step_6(*a, **k):
        calls["n"] += 1
        loss, stats = real(*a, **k)
        return (loss * float("nan") if calls["n"] == 6 else loss), stats

    monkeypatch.setattr(T, "dqn_loss", nan_at_step_6)
    cfg = smoke(steps=8)
    with pytest.raises(T.TrainingDiverged, match="step 6"):
        T.run(cfg, tmp_path / "nan", progress=False)
    assert (tmp_path / "nan" / "checkpoints" / "latest").read_text() == "step-000004"


def test_cli_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit):
        T.parse_args(["--resume"])
    with pytest.raises(SystemExit):
        T.parse_args(["--preset", "huge"])
    cfg, out, resume = T.parse_args(["--preset", "smoke", "--optim.lr", "0.003", "--model.layers", "3",
                                     "--out", str(tmp_path / "x")])
    assert cfg.optim.lr == 0.003 and cfg.model.layers == 3 and not resume and cfg.preset == "smoke"
    cfg, _, _ = T.parse_args(["--preset", "smoke", "--data_path", "/data/x", "--model.path", "/m", "--data.sets_per_map",
                              "7", "--data.tokenizer", "none", "--out", str(tmp_path / "z")])  # optional fields
    assert (cfg.data_path, cfg.model.path, cfg.data.sets_per_map, cfg.data.tokenizer) == ("/data/x", "/m", 7, None)
    cfg, _, _ = T.parse_args(["--preset", "paper", "--model", "/models/llama", "--out", str(tmp_path / "y")])
    assert cfg.model.path == "/models/llama" and cfg.data.tokenizer == "/models/llama"  # the model's own tokenizer


@pytest.mark.parametrize("flags, message", [
    (["--mode", "online", "--online.maps", "0"], "--online.maps must be >= 1 (got 0)"),
    (["--mode", "online", "--online.epsilon_end", "1.5"], "--online.epsilon_end must be in [0, 1] (got 1.5)"),
    (["--eval.window", "0"], "--eval.window must be >= 1 (got 0)"),
    (["--eval.ramp", "sometimes"], "--eval.ramp must be one of paper, greedy"),
    (["--data.format", "tiny"], "--data.format must be one of"),
    (["--data.format", "step", "--model.path", "/models/llama"], "trains a from-scratch model"),
    (["--mode", "protocol", "--data.format", "compact", "--protocol.shift", "0.5"], "has none (pass --protocol.shift 0)"),
    (["--data.format", "compact", "--model.memory", "true"], "--model.memory reads a step format's factored tokens"),
    (["--mode", "offline", "--data.format", "step", "--model.memory", "true"], "it needs --mode protocol"),
    (["--mode", "protocol", "--protocol.teacher", "best"], "--protocol.teacher must be one of"),
    (["--data.format", "step", "--model.memory_forget", "true"], "it needs --model.memory true"),
])
def test_bad_online_and_eval_settings_stop_before_any_work(tmp_path, capsys, flags, message):
    assert T.main(["--preset", "smoke", "--out", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "dataset").exists()  # rejected before the dataset is built


def test_the_default_on_a_format_without_a_grid_drops_its_shift_and_says_so(tmp_path, capsys):
    """The default names cells on a grid (step-grid) and shifts some maps on it; asked for another format, its shift
    is off (a note says so, the config records 0); the default itself keeps it."""
    assert T.parse_args(["--out", str(tmp_path / "a")])[0].protocol.shift == 0.2
    assert T.parse_args(["--out", str(tmp_path / "a")])[0].data.format == "step-grid"
    cfg, _, _ = T.parse_args(["--data.format", "step", "--out", str(tmp_path / "b")])
    assert cfg.protocol.shift == 0.0 and "--protocol.shift 0.2 is off" in capsys.readouterr().out
    T.check_config(cfg)  # runnable as it stands
    cfg, _, _ = T.parse_args(["--data.format", "compact", "--out", str(tmp_path / "c")])  # nor a same-state memory
    assert not cfg.model.memory and "--model.memory needs protocol contexts in a step format" in capsys.readouterr().out
    T.check_config(cfg)
    default = T.parse_args(["--out", str(tmp_path / "a")])[0]
    assert default.model.memory and default.model.memory_forget and default.protocol.forget
    cfg, _, _ = T.parse_args(["--model.memory", "false", "--out", str(tmp_path / "e")])  # its forgetting goes too
    assert not cfg.model.memory_forget and cfg.protocol.forget
    T.check_config(cfg)
    cfg, _, _ = T.parse_args(["--data.format", "compact", "--model.memory_forget", "true",
                              "--out", str(tmp_path / "f")])
    assert not cfg.model.memory and cfg.model.memory_forget  # asked for, it stays: and is refused
    with pytest.raises(ValueError, match="it needs --model.memory true"):
        T.check_config(cfg)
    cfg, _, _ = T.parse_args(["--mode", "online", "--out", str(tmp_path / "d")])  # online replays slices
    assert not cfg.model.memory and "off for --mode online" in capsys.readouterr().out


def test_two_runs_of_a_default_width_model_are_bit_identical(tmp_path):
    """Separate runs, same seed: identical weights (multithreaded accumulations made them drift before)."""
    cfg = smoke(steps=3)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(T.ModelConfig(), max_positions=4096))
    T.run(cfg, tmp_path / "a", progress=False)
    T.run(cfg, tmp_path / "b", progress=False)
    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def online(**over):
    cfg = smoke(steps=8)
    return dataclasses.replace(cfg, mode="online", online=dataclasses.replace(
        cfg.online, maps=6, episodes=4, rollout_every=3, epsilon_steps=6, slice_len=96, **over))


def test_online_mode_collects_rollouts_and_resumes_bit_identically(tmp_path, monkeypatch):
    a, b, (_, saved) = interrupted_and_resumed(online(), tmp_path, monkeypatch, at=5)
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    rollouts = [r for r in records if "rollout/success" in r]
    assert [r["step"] for r in rollouts] == [0, 3, 6] and [r["rollout/contexts"] for r in rollouts] == [6, 12, 18]
    assert rollouts[0]["rollout/epsilon"] == 1.0 and rollouts[-1]["rollout/epsilon"] == pytest.approx(0.1)
    assert any(k.startswith("replay/") for k in saved)  # the replay is checkpointed
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_online_fine_tuning_starts_from_an_offline_run(tmp_path):
    T.run(smoke(steps=4), tmp_path / "offline", progress=False)
    start = final_state(tmp_path / "offline")
    cfg = dataclasses.replace(online(init=str(tmp_path / "offline")), optim=dataclasses.replace(
        smoke().optim, steps=1, lr=1e-12, warmup_steps=1))
    T.run(cfg, tmp_path / "online", progress=False)
    after = final_state(tmp_path / "online")
    key = "model/online.model.embed_tokens.weight"
    torch.testing.assert_close(after[key], start[key], rtol=0, atol=1e-9)  # started from the offline weights
    bad = dataclasses.replace(online(init=str(tmp_path / "offline")), model=dataclasses.replace(
        cfg.model, hidden_size=48))
    with pytest.raises(ValueError, match="do not match"):
        T.run(bad, tmp_path / "bad", progress=False)
    import shutil  # a run trained with the same-state memory cannot seed online mode, which has none: said so
    shutil.copytree(tmp_path / "offline", tmp_path / "memory")
    config = json.loads((tmp_path / "memory" / "config.json").read_text())
    config["model"]["memory"] = True
    (tmp_path / "memory" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trained with the same-state memory"):
        T.run(dataclasses.replace(cfg, online=dataclasses.replace(cfg.online, init=str(tmp_path / "memory"))),
              tmp_path / "bad2", progress=False)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_stops(tmp_path, sig):
    """``kill -TERM`` and ``kill -INT`` stop with a checkpoint, SIGINT even though the job started with it ignored
    (as a background job of a script does)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "icrl_fast.train", "--preset", "smoke", "--optim.steps", "100000",
                             "--ckpt_every", "100000", "--eval.maps", "0", "--out", str(run)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted at step" in err
    assert (run / "checkpoints" / "latest").read_text().startswith("step-")


def protocol_smoke(steps: int):
    from icrl_fast.rl.objectives import ObjectiveConfig
    from icrl_fast.rl.sources import ProtocolConfig

    cfg = smoke(steps=steps)
    return dataclasses.replace(cfg, mode="protocol", protocol=ProtocolConfig(pool_maps=200, episodes=4, contexts=2,
                                                                             bucket=3),
                               objective=ObjectiveConfig(td=0.5, imitation=1.0, observation=0.5))


def test_protocol_mode_trains_every_objective_and_resumes_bit_identically(tmp_path, monkeypatch):
    a, b, (name, _) = interrupted_and_resumed(protocol_smoke(8), tmp_path, monkeypatch, at=6)
    assert name == "step-000005"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert {"losses/td", "losses/imitation", "losses/observation", "charts/agreement", "charts/q"} <= set(records[-1])
    total = records[-1]
    assert total["losses/total"] == pytest.approx(0.5 * total["losses/td"] + total["losses/imitation"]
                                                  + 0.5 * total["losses/observation"], rel=1e-5)


def test_a_protocol_run_plays_its_own_format_over_a_dataset_built_in_another(tmp_path, monkeypatch):
    """``--data.format step`` with ``--data_path`` to a compact dataset: the contexts, the network, the evaluation and
    ``load_run_for_eval`` are the step format's (before, the dataset's format silently replaced the run's)."""
    from icrl_fast.checkpoint import load_run_for_eval
    from icrl_fast.model.factored_embedding import FactoredEmbedding
    from icrl_fast.rl.objectives import Objectives

    compact = protocol_smoke(2)
    T.run(compact, tmp_path / "compact", progress=False)
    step = dataclasses.replace(compact, data=dataclasses.replace(compact.data, format="step"),
                               data_path=str(tmp_path / "compact" / "dataset"),
                               eval=dataclasses.replace(compact.eval, maps=2, episodes=3))
    built = []
    monkeypatch.setattr(T, "Objectives", lambda *a, **k: built.append(Objectives(*a, **k)) or built[-1])
    T.run(step, tmp_path / "step", progress=False)
    assert built[0].blocks is not None and built[0].blocks[1] == 4 * 64  # the landing-block observation loss
    tokens = [json.loads((tmp_path / r / "metrics.jsonl").read_text().splitlines()[-1])["perf/tokens"]
              for r in ("compact", "step")]
    assert tokens[1] < 0.6 * tokens[0]  # the same maps and steps in about half the tokens
    qnet, fmt, maps, _ = load_run_for_eval(tmp_path / "step", "in-distribution", 2)
    assert fmt.name == "step" and isinstance(qnet.model.model.embed_tokens, FactoredEmbedding) and len(maps) == 2
    _, _, tall, _ = load_run_for_eval(tmp_path / "step", "ood", 3, ood_size=((6, 7), (3, 5)))  # --ood-size 6-7x3-5
    assert len(tall) == 3 and (tall.nrow >= 6).all() and (tall.ncol <= 5).all()
    with pytest.raises(ValueError, match="81 cells"):
        load_run_for_eval(tmp_path / "step", "ood", 2, ood_size=((9, 9), (9, 9)))
    ev = json.loads((tmp_path / "step" / "eval.json").read_text())
    assert ev["config"]["train"]["data"]["format"] == "step" and len(ev["success_rate"]) == 3


def test_teacher_objectives_need_the_protocol_source(tmp_path, capsys):
    assert T.main(["--preset", "smoke", "--objective.imitation", "1", "--out", str(tmp_path / "r")]) == 2
    assert "need the teacher's labels of --mode protocol" in capsys.readouterr().err
    assert T.main(["--preset", "protocol", "--optim.schedule", "linear", "--out", str(tmp_path / "s")]) == 2
    assert "--optim.schedule must be one of constant, cosine" in capsys.readouterr().err


def test_the_cosine_schedule_warms_up_then_falls_to_its_floor():
    optim = T.OptimConfig(steps=110, warmup_steps=10, schedule="cosine", min_lr_frac=0.1)
    factors = [optim.lr_factor(s) for s in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and factors[10] == 1.0
    assert all(x >= y for x, y in zip(factors[10:], factors[11:])) and factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert T.OptimConfig(steps=110, warmup_steps=10).lr_factor(100) == 1.0  # constant: the paper's


def test_deterministic_algorithms_are_on_for_the_cpu_and_opt_in_on_cuda(tmp_path, capsys):
    assert T.deterministic_on("auto", "cpu") and not T.deterministic_on("auto", "cuda:1")
    assert T.deterministic_on("true", "cuda") and not T.deterministic_on("false", "cpu")
    assert T.deterministic_on(True, "cuda")  # a bool from an older config.json
    assert T.main(["--preset", "smoke", "--deterministic", "maybe", "--out", str(tmp_path / "r")]) == 2
    assert "--deterministic must be auto, true or false" in capsys.readouterr().err


def test_the_default_objective_is_rl_only():
    """Issue 32: the default learns from reward alone -- the paper's TD loss with the cross-episode target, no
    imitation of the context teacher (which still plays its contexts) and no observation loss."""
    cfg = T.preset("default")
    assert cfg.objective.imitation == 0.0 and cfg.objective.observation == 0.0 and cfg.objective.td == 1.0
    assert cfg.dqn.gamma_episode == 0.9 and cfg.dqn.gamma == 0.9 and cfg.dqn.cql == 0.0
    T.check_config(cfg)
