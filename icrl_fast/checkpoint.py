"""Run directories on disk: checkpoints (atomic, resumable, gathered from every process), starting from another
run's networks, and loading a finished run for evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from icrl_fast import distributed
from icrl_fast.config import from_dict
from icrl_fast.data.dataset import OfflineDataset
from icrl_fast.data.formats import make_format
from icrl_fast.data.step_format import observation_names
from icrl_fast.envs.maps import generate_maps
from icrl_fast.model.qnet import QNetwork
from icrl_fast.presets import TrainConfig
from icrl_fast.rl.replay import ContextReplay


def save_checkpoint(run_dir: Path, qnet: QNetwork, opt, sched, state: dict, cfg: TrainConfig,
                    replay: ContextReplay | None = None, write: bool = True,
                    world: distributed.World | None = None) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically (temp folder + rename), point ``checkpoints/latest`` at it,
    and keep the two newest. An online run's replay is saved with it (under torchrun: every process's replay, as
    ``replay/rankR/``). A sharded model (``--parallel fsdp``) or a distributed replay is gathered first, which every
    process must join; only the one with ``write`` writes."""
    tensors = {f"model/{k}": distributed.full(v.detach()).contiguous().cpu() for k, v in qnet.train_state().items()}
    osd = opt.state_dict()
    for pid, pstate in osd["state"].items():
        for key, value in pstate.items():
            tensors[f"optim/{pid}/{key}"] = distributed.full(torch.as_tensor(value).detach()).contiguous().cpu()
    if replay is not None:
        states = distributed.gather_objects(world or distributed.World(), replay.state_dict())
        for r, rstate in enumerate(states):
            for k, v in rstate.items():
                tensors[f"replay/{k}" if len(states) == 1 else f"replay/rank{r}/{k}"] = \
                    torch.from_numpy(np.ascontiguousarray(v))
    root = run_dir / "checkpoints"
    name = f"step-{state['step']:06d}"
    if not write:
        return root / name
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"state": state, "param_groups": osd["param_groups"], "scheduler": sched.state_dict(),
            "config": dataclasses.asdict(cfg)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    (root / "latest.tmp").write_text(name)
    os.replace(root / "latest.tmp", root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.name != name)[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path, qnet: QNetwork, opt=None, sched=None, replay: ContextReplay | None = None,
                    rank: int = 0) -> dict:
    """Restore the newest checkpoint of ``run_dir`` into the networks (and optimizer, scheduler, replay: this
    process's, ``rank``, when the run was distributed); return its state."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint (checkpoints/latest): nothing to resume or evaluate")
    ckpt = run_dir / "checkpoints" / latest.read_text().strip()
    tensors = load_file(str(ckpt / "state.safetensors"))
    meta = json.loads((ckpt / "meta.json").read_text())
    qnet.load_train_state({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    if opt is not None:
        params = [p for group in opt.param_groups for p in group["params"]]
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, pid, key = k.split("/", 2)
                ref = params[int(pid)]  # moments are laid out like their parameter (this process's shard)
                state.setdefault(int(pid), {})[key] = distributed.like(v, ref) if v.shape == ref.shape else v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if sched is not None:
        sched.load_state_dict(meta["scheduler"])
    if replay is not None:
        head = f"replay/rank{rank}/" if any(k.startswith("replay/rank") for k in tensors) else "replay/"
        replay.load_state_dict({k[len(head):]: v.numpy() for k, v in tensors.items() if k.startswith(head)})
    return meta["state"]


def init_networks(source: Path, qnet: QNetwork) -> None:
    """Start from another run's latest networks (e.g. offline pre-training before online fine-tuning)."""
    config = source / "config.json"
    theirs = json.loads(config.read_text()).get("model", {}).get("memory", False) if config.is_file() else None
    if theirs is not None and bool(theirs) != (qnet.memory is not None):
        if theirs:
            raise ValueError(f"cannot start from {source}: it was trained with the same-state memory "
                             "(--model.memory), which this model has not (online mode replays slices that start "
                             "mid-context, where the memory cannot run): start from a run trained with "
                             "--model.memory false")
        raise ValueError(f"cannot start from {source}: it was trained without the same-state memory, which this "
                         "model has (--model.memory false here, or start from a run trained with it)")
    try:
        load_checkpoint(source, qnet)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"cannot start from {source}: its networks do not match this model ({e})") from None


def run_format(cfg: TrainConfig, ds: OfflineDataset):
    """The context format of a run: the dataset's, whose slices an offline or online run trains on; in protocol mode
    the config's (``--data.format``): the contexts are played on the fly and the dataset gives only the test maps, so
    a dataset built in another format may be reused (``--data_path``)."""
    if cfg.mode == "protocol":
        return make_format(cfg.data.format, cfg.data.tokenizer, cfg.data.max_obs)
    return ds.format


def build_qnet(cfg: TrainConfig, fmt, device: str) -> QNetwork:
    """The run's Q-network for context format ``fmt`` (factored embeddings when the format has them)."""
    factors = getattr(fmt, "token_factors", None) if cfg.model.factored_embedding else None
    return QNetwork(cfg.model, fmt.vocab_size, fmt.action_ids, device=device, seed=cfg.seed, token_factors=factors)


OOD_SIZE = ((6, 7), (6, 7))  # (height, width) ranges of the ood experiment's maps


def load_run_for_eval(run_dir: Path, experiment: str, n_maps: int, device: str = "cpu",
                      ood_size: tuple = OOD_SIZE):
    """The trained network (on ``device``), its format, the maps to evaluate (test split, or fresh maps of
    ``ood_size`` = ((rows lo, hi), (cols lo, hi)), 6-7 x 6-7 by default, for ``ood``) and the run's config."""
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    cfg = from_dict(TrainConfig, json.loads((run_dir / "config.json").read_text()))
    ds = OfflineDataset.load(Path(cfg.data_path) if cfg.data_path else run_dir / "dataset", verify=False)
    fmt = run_format(cfg, ds)
    qnet = build_qnet(cfg, fmt, device)
    if qnet.pretrained and (run_dir / "adapters").is_dir():
        qnet.load_adapters(run_dir / "adapters")  # the PEFT adapters of the finished run
    else:
        load_checkpoint(run_dir, qnet)
    qnet.eval()
    if experiment == "ood":
        cells = ood_size[0][1] * ood_size[1][1]
        if cells > fmt.max_obs:
            raise ValueError(f"ood maps up to {ood_size[0][1]}x{ood_size[1][1]} have {cells} cells; this run's format "
                             f"numbers at most {fmt.max_obs} observations")
        maps = generate_maps(n_maps, seed=cfg.seed + 7919, height=ood_size[0], width=ood_size[1],
                             min_hops=cfg.data.min_hops)
        observation_names(fmt, maps)  # a grid format that cannot number these maps: a clear error before the run
    else:
        maps = ds.maps[ds.test_map_ids[:n_maps]]
    return qnet, fmt, maps, cfg
