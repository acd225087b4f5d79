"""benchmarks/gpu/throughput.py --dry-run runs every phase of issue 31's device check at toy sizes on the CPU, so the
script a lent GPU will run cannot rot: each phase writes its JSON with status ok, the player equals the committed
CPU reference, and the summary names the device, versions, commit, date and command."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["floor", "correctness", "rollout", "train", "profile"]


def test_throughput_dry_run_every_phase_ok(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "throughput.py"), "--dry-run", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["phases"]) == PHASES and {p["status"] for p in summary["phases"].values()} == {"ok"}
    assert {"device", "versions", "commit", "date", "command"} <= summary.keys() and summary["dry_run"]
    correct = json.loads((tmp_path / "correctness.json").read_text())
    assert correct["ok"] and all(correct["equal_to_cpu_reference"].values()) and correct["compiled_equals_eager"]
    rollout = json.loads((tmp_path / "rollout.json").read_text())
    assert any(r.get("engine") for r in rollout["rows"]) and all(r["env_steps"] > 0 for r in rollout["rows"])
    train = json.loads((tmp_path / "train.json").read_text())
    assert [(r["preset"], r["prefetch"]) for r in train["rows"]] == [("default", 0), ("gpu", 0), ("gpu", 2)]
    assert all(r["tokens_per_s"] for r in train["rows"])
    assert (tmp_path / "profile.txt").read_text().strip()


def test_throughput_refuses_an_unknown_phase(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "throughput.py"), "--dry-run",
                           "--phases", "floor,warp", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "warp" in done.stderr
