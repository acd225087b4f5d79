"""torchrun data parallelism on the CPU (gloo, 2 processes) equals one process on the same global batch."""

import json
import os

import pytest
import torch

import icrl_fast.train as T
from icrl_fast.distributed import World
from icrl_fast.testing import latest_checkpoint as weights
from icrl_fast.testing import run_losses as losses
from icrl_fast.testing import torchrun_train as torchrun

ARGS = ["--preset", "smoke", "--optim.steps", "6", "--log_every", "1", "--eval.maps", "0"]


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    stdout = torchrun(*ARGS, "--out", str(tmp_path / "ddp"))
    assert stdout.count("done: 6 steps") == 1 and stdout.count("icrl_fast: preset") == 1  # rank 0 speaks alone
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


ONLINE = ["--preset", "smoke", "--mode", "online", "--online.maps", "4", "--online.episodes", "3",
          "--online.rollout_every", "2", "--online.slice_len", "96", "--optim.steps", "4", "--ckpt_every", "2",
          "--log_every", "1", "--eval.maps", "0"]


def test_online_mode_under_torchrun_rolls_out_per_rank_and_resumes(tmp_path):
    """Each process plays its share of the maps into its own replay; checkpoints hold every process's replay, and
    a resume from one (each process taking its own back) reproduces the straight run."""
    import shutil

    full = tmp_path / "full"
    torchrun(*ONLINE, "--out", str(full))
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "rollout/success" in r] == [0, 2]
    assert all(r["rollout/contexts"] in (2, 4) for r in records if "rollout/contexts" in r)  # 2 maps per rank
    w = weights(full)
    ranks = [{k.split("/", 2)[2]: v for k, v in w.items() if k.startswith(f"replay/rank{r}/")} for r in (0, 1)]
    assert ranks[0] and ranks[0].keys() == ranks[1].keys() and "replay/tokens" not in w
    assert not torch.equal(ranks[0]["tokens"][:50], ranks[1]["tokens"][:50])  # different maps per rank

    half = tmp_path / "half"
    shutil.copytree(full, half, ignore=shutil.ignore_patterns("step-000004", "tensorboard"))
    (half / "checkpoints" / "latest").write_text("step-000002")
    kept = [line for line, r in zip((full / "metrics.jsonl").read_text().splitlines(), records)
            if r["step"] < 2 or (r["step"] == 2 and "losses/total" in r)]  # the step-2 rollout comes after the save
    (half / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    torchrun("--out", str(half), "--resume")
    torch.testing.assert_close(torch.tensor(losses(half)), torch.tensor(losses(full)), rtol=1e-5, atol=1e-6)
    for k, v in weights(half).items():
        torch.testing.assert_close(v, w[k], rtol=1e-5, atol=1e-6)


def test_a_cpu_statistic_is_reduced_on_the_collectives_device(monkeypatch):
    """Online rollouts report their success as a CPU tensor; under NCCL it must reach the all-reduce on the GPU."""
    import torch

    from icrl_fast import distributed

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(distributed.torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device() == torch.device("cuda", 3)
    seen = []
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))  # stands in for a GPU here
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t: seen.append(t.device))
    with pytest.raises(RuntimeError, match="meta"):  # float() of a meta tensor: the reduce itself was reached
        distributed.World(rank=0, size=2).mean(torch.tensor(0.5))
    assert seen == [torch.device("meta")]
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "gloo")
    monkeypatch.undo()
    assert distributed.collective_device() == torch.device("cpu")
