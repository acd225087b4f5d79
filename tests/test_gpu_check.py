"""benchmarks/gpu/check.sh --dry-run runs here, so the prepared GPU check cannot rot: every GPU step prints a one-line
skip reason, the environment report and the result files (device, versions, commit, date, command) are written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["throughput", "ext", "kernels", "e2e-tests", "smoke", "bench_q_td_loss", "bench_train", "bench_rollout"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_dry_run_skips_every_gpu_step_and_writes_its_results(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    before = {p: p.stat().st_mtime for p in (ROOT / "benchmarks" / "results").glob("*")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    skips = [line for line in done.stdout.splitlines() if line.startswith("SKIP step")]
    assert [line.split()[3].rstrip(":") for line in skips] == STEPS
    assert all(line.endswith(": --dry-run") for line in skips)
    out = tmp_path / "out"
    env_report = json.loads((out / "env.json").read_text())
    assert env_report["torch"] and "triton" in env_report["versions"] and env_report["commit"]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == STEPS and {s["status"] for s in summary["steps"]} == {"skip"}
    device = env_report["device"]
    result = json.loads((out / "results" / f"gpu-check-{device}.json").read_text())
    assert {"device", "versions", "commit", "date", "command"} <= result.keys() and "--dry-run" in result["command"]
    assert (out / "results" / f"gpu-check-{device}.md").read_text().startswith(f"# GPU check ({device})")
    assert "check.sh --dry-run" in (out / "check.log").read_text()
    after = {p: p.stat().st_mtime for p in (ROOT / "benchmarks" / "results").glob("*")}
    assert after == before  # a dry run leaves the checkout's results alone


def test_unknown_arguments_are_refused(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "check.sh"), "--fast"], cwd=tmp_path,
                          env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "unknown argument: --fast" in done.stderr
