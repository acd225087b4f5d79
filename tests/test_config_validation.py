"""Every bad input refused: each field of ``TrainConfig`` (every section, recursively) and each numeric option of
``python -m icrl_fast.evaluate`` outside its declared range or choices is one line on stderr naming the flag and the
value, exit status 2, no traceback; a numeric field added without a declared range fails this suite; every preset
still validates."""

import dataclasses
import os
import subprocess
import sys
import typing
from dataclasses import field

import pytest

import icrl_fast.evaluate as E
import icrl_fast.train as T
from icrl_fast.config import COUNT, Range, leaves, undeclared
from icrl_fast.presets import FIELD_RANGES, PRESETS, TrainConfig, preset, validate_fields

NOT_FLAGS = {"preset", "data.seed"}  # --preset picks the start; --seed (TrainConfig.seed) seeds every stream


def outside(allowed: Range, integer: bool) -> list:
    """A value just past each bounded end of ``allowed``."""
    step = 1 if integer else 0.5
    values = []
    if allowed.lo is not None:
        values.append(allowed.lo if allowed.open_lo else allowed.lo - step)
    if allowed.hi is not None:
        values.append(allowed.hi if allowed.open_hi else allowed.hi + step)
    return values


def spell(v) -> str:
    """``v`` as typed on the command line, and as the refusal quotes it (``-5``, ``-0.5``, ``3 5``)."""
    if isinstance(v, (tuple, list)):
        return " ".join(spell(x) for x in v)
    return str(int(v)) if float(v).is_integer() else str(v)


def bad_values():
    """``(flag, [argv words], expected message)`` for every CLI field of ``TrainConfig`` that declares a range or
    choices: each bounded end crossed, an out-of-order pair for a range pair, an unknown word for a choice."""
    default = TrainConfig()
    cases = []
    for leaf in leaves(TrainConfig, FIELD_RANGES):
        if leaf.name in NOT_FLAGS:
            continue
        flag = f"--{leaf.name}"
        if isinstance(leaf.allowed, Range) and leaf.kind is tuple:
            hi = _get(default, leaf.name)[1]
            what = f"must be {leaf.length} ascending integers {leaf.allowed}"
            for v in [(bad, hi) for bad in outside(leaf.allowed, True)] + [(hi + 1, hi)]:
                cases.append((leaf.name, [flag, *spell(v).split()], f"error: {flag} {what} (got {spell(v)})"))
        elif isinstance(leaf.allowed, Range):
            for v in outside(leaf.allowed, leaf.kind is int):
                cases.append((leaf.name, [flag, spell(v)], f"error: {flag} must be {leaf.allowed} (got {spell(v)})"))
        elif isinstance(leaf.allowed, tuple):
            cases.append((leaf.name, [flag, "bogus"],
                          f"error: {flag} must be one of {', '.join(leaf.allowed)} (got 'bogus')"))
    return cases


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def refusal(parse, argv: list[str], capsys) -> str:
    """Run ``parse(argv)`` in-process; it must exit with status 2. Returns its stderr."""
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err  # one line
    return err.rstrip("\n")


def test_every_numeric_field_declares_its_range():
    """A numeric field added without a declared range (field metadata or ``FIELD_RANGES``) fails here, and so does
    a table entry naming no field."""
    assert undeclared(TrainConfig, FIELD_RANGES) == []


@dataclasses.dataclass
class _Inner:
    bounded: int = field(default=1, metadata={"range": COUNT})
    unbounded: float = 0.5
    name: str = "x"


@dataclasses.dataclass
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    steps: int = 3
    window: int | None = None
    size: tuple[int, int] = (1, 2)


def test_a_field_without_a_declared_range_is_caught():
    table = {_Outer: {"steps": COUNT, "window": COUNT, "size": COUNT}}
    assert undeclared(_Outer, table) == ["inner.unbounded"]
    assert undeclared(_Outer, {_Outer: {"steps": COUNT}}) == ["inner.unbounded", "window", "size"]
    assert undeclared(_Outer, {**table, _Inner: {"unbounded": COUNT, "renamed": COUNT}}) == ["_Inner.renamed"]


@pytest.mark.parametrize("name, argv, message", bad_values(), ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_each_field_out_of_range_is_a_one_line_refusal(tmp_path, capsys, name, argv, message):
    assert refusal(T.parse_args, [*argv, "--out", str(tmp_path / "run")], capsys) == message
    assert not (tmp_path / "run").exists()


def test_the_walk_covers_every_section():
    hints = typing.get_type_hints(TrainConfig)
    sections = {name for name, tp in hints.items() if dataclasses.is_dataclass(tp)}
    only_flags = {"rollout"}  # switches only (true/false: a bad word is the parser's one-line error, tested below)
    assert len(sections) == 9 and sections - only_flags <= {case[0].split(".")[0] for case in bad_values()}
    assert {"optim.steps", "optim.lr", "data.learner.episodes", "data.height", "seed", "threads"} <= \
        {case[0] for case in bad_values()}


@pytest.mark.parametrize("argv, message", [
    (["--rollout.graph", "bogus"], "error: argument --rollout.graph: expected true/false, got 'bogus'"),
    (["--optim.steps", "-1"], "error: --optim.steps must be >= 1 (got -1)"),
    (["--optim.lr", "-5"], "error: --optim.lr must be > 0 (got -5)"),
    (["--optim.lr", "0"], "error: --optim.lr must be > 0 (got 0)"),
    (["--optim.lr", "nan"], "error: --optim.lr must be > 0 (got nan)"),
    (["--optim.steps", "abc"], "error: argument --optim.steps: invalid int value: 'abc'"),
    (["--data.height", "3"], "error: argument --data.height: expected 2 arguments"),
    (["--no-such-flag", "1"], "error: unrecognized arguments: --no-such-flag 1"),
])
def test_explicit_refusals(tmp_path, capsys, argv, message):
    assert refusal(T.parse_args, [*argv, "--out", str(tmp_path / "run")], capsys) == message
    assert T.main([*argv, "--out", str(tmp_path / "run")]) == 2  # main returns the status instead of exiting
    assert capsys.readouterr().err.rstrip("\n") == message


def test_fields_with_a_meaningful_zero_or_none_keep_it(tmp_path):
    # td 0 needs another objective: the default is TD alone, so imitation comes on here
    cfg, _, _ = T.parse_args(["--protocol.switch", "0", "--objective.td", "0", "--objective.imitation", "1",
                              "--optim.clip", "0", "--threads", "0",
                              "--optim.warmup_steps", "0", "--eval.maps", "0", "--dqn.gamma", "0",
                              "--data.test_maps", "0", "--eval.window", "none", "--seed", "0",
                              "--out", str(tmp_path / "run")])
    assert (cfg.protocol.switch, cfg.objective.td, cfg.optim.clip, cfg.eval.maps, cfg.eval.window) == (0, 0, 0, 0, None)
    T.check_config(cfg)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates(tmp_path, name):
    cfg = preset(name)
    validate_fields(cfg)
    T.check_config(cfg)
    assert T.parse_args(["--preset", name, "--out", str(tmp_path / "run")])[0].preset == name


def test_cross_field_checks_are_one_line_exit_2_errors_too(tmp_path, capsys):
    """``check_config`` (across fields, before any work) reaches the user the same way, through ``main``."""
    for argv, message in ((["--model.hidden_size", "30", "--model.heads", "4"], "--model.hidden_size (30) must be"),
                          (["--model.heads", "4", "--model.kv_heads", "3"], "--model.kv_heads (3) must divide"),
                          (["--preset", "smoke", "--objective.imitation", "1"], "need the teacher's labels"),
                          (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N")):
        assert T.main([*argv, "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err
        assert not (tmp_path / "run").exists()


def test_a_config_built_in_code_is_checked_too():
    """``run`` checks every field first (a config from code or a saved config.json never met the parser)."""
    cfg = preset("smoke")
    with pytest.raises(ValueError, match=r"^--data\.seed must be >= 0 \(got -1\)$"):
        T.check_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seed=-1)))
    with pytest.raises(ValueError, match=r"^--optim\.steps must be an integer >= 1 \(got 2\.5\)$"):
        T.check_config(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, steps=2.5)))


# ------------------------------------------------------------------------------------------ the evaluate CLI
def test_every_numeric_evaluate_option_declares_its_range():
    numeric = {a.dest for a in E.build_parser()._actions if a.type in (int, float)}
    assert numeric == set(E.ARG_RANGES)


@pytest.mark.parametrize("dest", sorted(E.ARG_RANGES))
def test_each_evaluate_option_out_of_range_is_a_one_line_refusal(tmp_path, capsys, dest):
    allowed = E.ARG_RANGES[dest]
    for v in outside(allowed, True):
        argv = [str(tmp_path / "run"), f"--{dest.replace('_', '-')}", spell(v)]
        message = f"error: --{dest.replace('_', '-')} must be {allowed} (got {spell(v)})"
        assert refusal(E.parse_args, argv, capsys) == message
        assert E.main(argv) == 2 and capsys.readouterr().err.rstrip("\n") == message


def test_evaluate_ood_size_is_refused_at_parse_time(tmp_path, capsys):
    assert refusal(E.parse_args, [str(tmp_path), "--experiment", "ood", "--ood-size", "1x3"], capsys) == \
        "error: --ood-size ranges must be ascending and at least 2, got '1x3'"


# --------------------------------------------------------------------------------- end to end, two processes
@pytest.mark.parametrize("argv, message", [
    (["-m", "icrl_fast.train", "--optim.steps", "-1"], "error: --optim.steps must be >= 1 (got -1)"),
    (["-m", "icrl_fast.evaluate", "somedir", "--maps", "0"], "error: --maps must be >= 1 (got 0)"),
])
def test_refusals_end_to_end(tmp_path, argv, message):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr == message + "\n"
    assert not list(tmp_path.iterdir())  # nothing written: no run directory
