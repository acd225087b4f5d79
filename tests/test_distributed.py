"""torchrun data parallelism on the CPU (gloo, 2 processes) equals one process on the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import icrl_fast.train as T
from icrl_fast.distributed import World

ARGS = ["--preset", "smoke", "--optim.steps", "6", "--log_every", "1", "--eval.maps", "0"]


def losses(run):
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [r["losses/td"] for r in records if "losses/td" in r]


def weights(run):
    name = (run / "checkpoints" / "latest").read_text()
    return load_file(str(run / "checkpoints" / name / "state.safetensors"))


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "icrl_fast.train", *ARGS, "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert T.main([*ARGS, "--out", str(tmp_path / "one")]) == 0
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
    meta = [json.loads((r / "checkpoints" / (r / "checkpoints" / "latest").read_text() / "meta.json").read_text())
            for r in (tmp_path / "ddp", tmp_path / "one")]
    assert meta[0]["state"]["tokens"] == meta[1]["state"]["tokens"]  # each rank took half the batch, not all of it
    wa, wb = weights(tmp_path / "ddp"), weights(tmp_path / "one")
    assert wa.keys() == wb.keys()
    for k in wa:  # weights, target and optimizer moments after 6 steps
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_a_global_batch_is_shared_evenly_and_must_divide():
    import numpy as np

    idx = np.arange(10)
    assert World(0, 2).shard(idx).tolist() == [0, 2, 4, 6, 8] and World(1, 2).shard(idx).tolist() == [1, 3, 5, 7, 9]
    cfg = T.preset("smoke")
    os.environ["WORLD_SIZE"] = "3"  # smoke: 4 slices per step do not split over 3 processes
    try:
        with pytest.raises(ValueError, match="multiple of the number of processes"):
            T.run(cfg, __import__("pathlib").Path("/nonexistent"), progress=False)
    finally:
        os.environ.pop("WORLD_SIZE")
