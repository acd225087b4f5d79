"""``--parallel fsdp``: FSDP2 shards a pretrained model over 2 gloo processes on the CPU and trains exactly what one
process trains on the same global batch; its checkpoints are whole tensors, resume works, the adapters and the
evaluation come out of the gathered model."""

import json

import torch

import icrl_fast.train as T
from icrl_fast.testing import latest_checkpoint as latest
from icrl_fast.testing import run_losses as losses
from icrl_fast.testing import save_tiny_llama
from icrl_fast.testing import torchrun_train as torchrun


def args(model, out, steps):
    return ["--preset", "paper", "--model", str(model), "--out", str(out), "--model.dtype", "float32",
            "--data.train_maps", "6", "--data.test_maps", "2", "--data.slice_len", "256",
            "--data.learner.episodes", "60", "--optim.steps", str(steps), "--optim.batch_slices", "2",
            "--optim.grad_accum", "2", "--optim.lr", "0.05", "--eval.maps", "2", "--eval.episodes", "2",
            "--eval.batch_maps", "2", "--ckpt_every", "2", "--log_every", "1"]


def test_fsdp_over_two_processes_trains_what_one_process_trains(tmp_path):
    model = save_tiny_llama(tmp_path / "llama", filler=5)
    data = tmp_path / "one" / "dataset"
    assert T.main(args(model, tmp_path / "one", 4)) == 0
    torchrun(*args(model, tmp_path / "fsdp", 4), "--parallel", "fsdp", "--data_path", str(data))
    a, b = losses(tmp_path / "fsdp"), losses(tmp_path / "one")
    assert len(a) == len(b) == 4
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
    wa, wb = latest(tmp_path / "fsdp"), latest(tmp_path / "one")
    assert wa.keys() == wb.keys()
    for k in wa:  # whole (gathered) online and target adapters and AdamW moments, equal to one process's
        assert wa[k].shape == wb[k].shape, k
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)
    # the adapters were saved from the gathered model and the evaluation ran on it
    assert (tmp_path / "fsdp" / "adapters" / "delayed" / "adapter_model.safetensors").is_file()
    assert json.loads((tmp_path / "fsdp" / "eval.json").read_text())["num_maps"] == 2

    # resume: from the sharded run's step-2 checkpoint (gathered whole), two more sharded steps land where the
    # straight run did
    import shutil

    half = tmp_path / "half"
    shutil.copytree(tmp_path / "fsdp", half, ignore=shutil.ignore_patterns("step-000004", "tensorboard"))
    (half / "checkpoints" / "latest").write_text("step-000002")
    (half / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                               (half / "metrics.jsonl").read_text().splitlines()[:2]))
    torchrun("--out", str(half), "--resume")
    torch.testing.assert_close(torch.tensor(losses(half)), torch.tensor(b), rtol=1e-5, atol=1e-6)
    for k, v in latest(half).items():
        torch.testing.assert_close(v, wb[k], rtol=1e-4, atol=1e-6)


def test_fsdp_needs_a_pretrained_model():
    assert T.main(["--preset", "smoke", "--parallel", "fsdp", "--out", "/nonexistent/x"]) == 2
