"""``python -m icrl_fast.train``: train a transformer to learn in context with offline Double DQN, then evaluate it.

Reads top to bottom: configuration and presets, setup (run directory, dataset, networks, optimiser, resume),
the training loop, teardown (final checkpoint, the paper's evaluation, the ICRL table).

    python -m icrl_fast.train                         # default preset: a small model on this CPU
    python -m icrl_fast.train --preset smoke          # < 1 minute, for tests
    python -m icrl_fast.train --preset paper --model.path /models/Llama-3.1-8B-Instruct   # IA3, on a GPU
    python -m icrl_fast.train --out runs/x --resume   # continue a run (bit-identical on the CPU)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from icrl_fast import distributed
from icrl_fast.config import add_dataclass_args, apply_overrides, from_dict
from icrl_fast.data.dataset import DatasetConfig, OfflineDataset, build_dataset
from icrl_fast.envs.learners import QLearningConfig
from icrl_fast.envs.maps import generate_maps
from icrl_fast.evaluate import EvalConfig, evaluate, summary_rows, write_outputs
from icrl_fast.model.qnet import SHARD_NEEDS_PRETRAINED, ModelConfig, QNetwork
from icrl_fast.rl.dqn import DQNConfig, dqn_loss
from icrl_fast.rl.objectives import ObjectiveConfig, Objectives
from icrl_fast.rl.replay import ContextReplay
from icrl_fast.rl.rollout import RolloutEngine
from icrl_fast.rl.sources import ProtocolConfig, ProtocolSource


# ----------------------------------------------------------------------------------------------- configuration
@dataclass
class OptimConfig:
    """Optimisation."""

    steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_slices: int = field(default=16, metadata={"help": "slices per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate after warm-up"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps (then constant)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    clip: float = field(default=1.0, metadata={"help": "gradient-norm clip (0: off)"})
    schedule: str = field(default="constant", metadata={"help": "after warm-up: constant (the paper) or cosine (to "
                                                                "min_lr_frac x lr at the last step)"})
    min_lr_frac: float = field(default=0.1, metadata={"help": "cosine schedule's final lr as a fraction of lr"})

    def validate(self) -> None:
        if self.schedule not in ("constant", "cosine") or not 0.0 <= self.min_lr_frac <= 1.0:
            raise ValueError(f"optim schedule must be constant or cosine and min_lr_frac in [0, 1], got "
                             f"{self.schedule!r}, {self.min_lr_frac}")

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step`` (0-based): linear warm-up, then the schedule."""
        warm = max(1, self.warmup_steps)
        if step < warm or self.schedule == "constant":
            return min(1.0, (step + 1) / warm)
        frac = min(1.0, (step - warm) / max(1, self.steps - warm))
        return self.min_lr_frac + (1.0 - self.min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * frac))


@dataclass
class OnlineConfig:
    """Online DQN (``--mode online``): rollouts of the current network feed a replay of whole contexts."""

    maps: int = field(default=50, metadata={"help": "training maps per rollout (one context each)"})
    episodes: int = field(default=30, metadata={"help": "episodes per rollout context"})
    rollout_every: int = field(default=10, metadata={"help": "optimizer steps between rollouts"})
    epsilon_start: float = field(default=1.0, metadata={"help": "P(random action) at step 0"})
    epsilon_end: float = field(default=0.1, metadata={"help": "P(random action) after the decay"})
    epsilon_steps: int = field(default=200, metadata={"help": "optimizer steps of the linear epsilon decay"})
    capacity: int = field(default=1000, metadata={"help": "contexts kept in the replay (oldest leave first)"})
    slice_len: int = field(default=1024, metadata={"help": "tokens per sampled slice (shorter contexts: whole)"})
    window: int | None = field(default=None, metadata={"help": "rollout attention window (ring-buffer KV cache)"})
    init: str | None = field(default=None, metadata={"help": "a run directory whose latest networks start this "
                                                             "run (offline pre-training, then online)"})

    def validate(self) -> None:
        """``ValueError`` naming the bad field."""
        if min(self.maps, self.episodes, self.rollout_every, self.capacity) < 1 or self.slice_len < 2:
            raise ValueError(f"online needs maps, episodes, rollout_every, capacity >= 1 and slice_len >= 2, got "
                             f"{self.maps}, {self.episodes}, {self.rollout_every}, {self.capacity}, {self.slice_len}")
        if not (0.0 <= self.epsilon_start <= 1.0 and 0.0 <= self.epsilon_end <= 1.0) or self.epsilon_steps < 0:
            raise ValueError(f"online epsilons must be probabilities and epsilon_steps >= 0, got {self.epsilon_start}, "
                             f"{self.epsilon_end}, {self.epsilon_steps}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"online window must be >= 1 tokens (or unset), got {self.window}")

    def epsilon(self, step: int) -> float:
        frac = min(1.0, step / max(1, self.epsilon_steps))
        return self.epsilon_start + frac * (self.epsilon_end - self.epsilon_start)


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.json in the run directory and in every checkpoint."""

    preset: str = field(default="default", metadata={"help": "the preset this config started from"})
    seed: int = field(default=0, metadata={"help": "seed of every random stream"})
    data: DatasetConfig = field(default_factory=DatasetConfig)
    data_path: str | None = field(default=None, metadata={"help": "an existing dataset folder (default: build one "
                                                                  "into the run directory)"})
    mode: str = field(default="offline", metadata={"help": "offline (the paper: the dataset's slices), protocol "
                                                           "(the simulator plays the evaluation protocol with the "
                                                           "context teacher, per map, on the fly) or online "
                                                           "(rollouts with the KV-cache engine into a replay)"})
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dqn: DQNConfig = field(default_factory=DQNConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log_every: int = field(default=10, metadata={"help": "steps between metric records"})
    ckpt_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda"})
    parallel: str = field(default="ddp", metadata={"help": "under torchrun: ddp (every process holds the model) or "
                                                         "fsdp (FSDP2 shards a pretrained model over the processes)"})
    deterministic: bool = field(default=True, metadata={"help": "torch deterministic algorithms: bit-identical runs "
                                                                "for a seed (measured: no slower on this CPU)"})


def preset(name: str) -> TrainConfig:
    """``default`` (this 2-core CPU, ~15 min), ``smoke`` (< 1 min, tests) or ``paper`` (8B + IA3 on a GPU)."""
    if name == "default":  # cql + success-weighted data: measured best of this CPU's budget (README, Results)
        return TrainConfig(preset="default", data=DatasetConfig(format="compact", slice_len=1024, quality="high"),
                           dqn=DQNConfig(cql=1.0))
    if name == "protocol":  # in-context RL taught on protocol contexts (README, Teaching the model)
        return TrainConfig(
            preset="protocol", mode="protocol", data=DatasetConfig(format="compact", slice_len=1024),
            objective=ObjectiveConfig(td=0.0, imitation=1.0, observation=0.5),
            model=ModelConfig(layers=2),
            optim=OptimConfig(steps=3000, lr=2e-3, warmup_steps=30, schedule="cosine"), log_every=50, ckpt_every=500)
    if name == "smoke":
        return TrainConfig(
            preset="smoke", data=DatasetConfig(train_maps=24, test_maps=6, format="compact", slice_len=256,
                                               learner=QLearningConfig(episodes=200)),
            model=ModelConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64, max_positions=4096),
            optim=OptimConfig(steps=12, batch_slices=4, warmup_steps=2), eval=EvalConfig(maps=6, episodes=4),
            log_every=2, ckpt_every=5)
    if name == "paper":
        return TrainConfig(
            preset="paper", data=DatasetConfig(format="paper", slice_len=4096, learner=QLearningConfig(episodes=2600)),
            model=ModelConfig(dtype="bfloat16", max_positions=131072),
            dqn=DQNConfig(argmax="vocab"),
            optim=OptimConfig(steps=956, batch_slices=1, grad_accum=10, lr=1e-2, warmup_steps=10, clip=0.0),
            eval=EvalConfig(batch_maps=10), ckpt_every=50)
    raise ValueError(f"unknown preset {name!r}; choose default, protocol, smoke or paper")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------------- checkpoints
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


# ---------------------------------------------------------------------------------------------------- the data
def batch_indices(n_slices: int, state: dict, size: int, seed: int) -> np.ndarray:
    """The next ``size`` slice indices of a per-epoch permutation seeded by (seed, epoch); advances ``state``."""
    out = []
    while len(out) < size:
        perm = np.random.default_rng([seed, state["epoch"]]).permutation(n_slices)
        take = perm[state["cursor"]: state["cursor"] + size - len(out)]
        out.extend(take.tolist())
        state["cursor"] += len(take)
        if state["cursor"] >= n_slices:
            state["epoch"], state["cursor"] = state["epoch"] + 1, 0
    return np.sort(np.asarray(out))


def to_batch(ds: OfflineDataset, idx: np.ndarray, device: str) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in ds.contract(idx).items()}


# ------------------------------------------------------------------------------------------------- the run
def run(cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) and evaluate; returns the final metrics. Raises ``TrainingDiverged`` on a NaN loss."""
    # --- setup ------------------------------------------------------------------------------------------------
    cfg.dqn.validate()
    cfg.optim.validate()
    cfg.objective.validate()
    if cfg.mode not in ("offline", "protocol", "online"):
        raise ValueError(f"mode must be offline, protocol or online, got {cfg.mode!r}")
    if cfg.mode != "protocol" and (cfg.objective.imitation or cfg.objective.observation):
        raise ValueError("the imitation and observation objectives need the teacher's labels of --mode protocol")
    if cfg.mode == "protocol":
        cfg.protocol.validate()
    cfg.eval.validate()
    if cfg.mode == "online":
        cfg.online.validate()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    size = distributed.world_size()  # checked before joining the group, so a bad config fails fast on every rank
    if size > 1 and cfg.mode == "online" and cfg.online.maps < size:
        raise ValueError(f"--online.maps ({cfg.online.maps}) must be at least the number of processes ({size}): "
                         "each process plays its share of the maps")
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"--parallel must be ddp or fsdp, got {cfg.parallel!r}")
    if cfg.parallel == "fsdp" and cfg.model.path is None:
        raise ValueError(SHARD_NEEDS_PRETRAINED)  # before joining the group: every rank fails fast
    if cfg.optim.batch_slices % size:
        raise ValueError(f"--optim.batch_slices ({cfg.optim.batch_slices}) must be a multiple of the number of "
                         f"processes ({size}): each process takes an equal share of the global batch")
    world, device = distributed.setup(device)
    # Without this, multithreaded backward accumulations made two runs of the default model differ by ~1e-7 after
    # 6 steps (5e-5 after 300); the small smoke model happened to stay exact. On CUDA: warn, never fail.
    torch.use_deterministic_algorithms(cfg.deterministic, warn_only=device != "cpu")
    progress = progress and world.main
    data_dir = Path(cfg.data_path) if cfg.data_path else run_dir / "dataset"
    if world.main:  # rank 0 writes the run directory; the others wait for the dataset, then read it
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
        if not data_dir.exists():
            build_dataset(dataclasses.replace(cfg.data, seed=cfg.seed), data_dir, progress=progress)
    world.barrier()
    ds = OfflineDataset.load(data_dir)
    fmt = ds.format
    qnet = QNetwork(cfg.model, fmt.vocab_size, fmt.action_ids, device=device, seed=cfg.seed)
    if world.distributed and cfg.parallel == "fsdp":
        qnet.shard(distributed.mesh(world, device))
    opt = torch.optim.AdamW(qnet.trainable_parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.optim.lr_factor)
    state = {"step": 0, "epoch": 0, "cursor": 0, "tokens": 0, "last_rollout": -1}
    replay = ContextReplay(fmt, cfg.online.capacity, cfg.online.slice_len) if cfg.mode == "online" else None
    if replay is not None and cfg.online.init and not resume:
        init_networks(Path(cfg.online.init), qnet)
    if resume:
        state = {"last_rollout": -1, **load_checkpoint(run_dir, qnet, opt, sched, replay, rank=world.rank)}
    source = None
    if cfg.mode == "protocol":
        source = ProtocolSource(cfg.protocol, fmt, ds.maps[ds.test_map_ids], seed=cfg.seed, height=cfg.data.height,
                                width=cfg.data.width, min_hops=cfg.data.min_hops, progress=progress)
    objective = Objectives(qnet, cfg.objective, cfg.dqn,
                           lambda *a, **k: dqn_loss(*a, **k))  # dqn_loss looked up per call (tests patch it)
    ddp = world.distributed and not qnet.sharded
    collective = qnet.sharded or (replay is not None and world.distributed)  # checkpoints gather from every rank

    def checkpoint():
        """Rank 0 writes; where the checkpoint gathers from every process, every process takes part."""
        if world.main or collective:
            return save_checkpoint(run_dir, qnet, opt, sched, state, cfg, replay, write=world.main, world=world)

    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(objective, device_ids=[world.local_rank] if device != "cpu" else None)
    metrics_file = (run_dir / "metrics.jsonl").open("a") if world.main else None
    tb = _tensorboard(run_dir) if world.main else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    engine = None if replay is None else RolloutEngine(qnet, fmt, window=cfg.online.window, device=device,
                                                       max_positions=cfg.model.max_positions)
    bar = tqdm(total=cfg.optim.steps, initial=state["step"], desc="training", unit="step", disable=not progress)
    t_last, tok_last = time.perf_counter(), state["tokens"]
    # --- loop ---------------------------------------------------------------------------------------------------
    try:
        while state["step"] < cfg.optim.steps:
            opt.zero_grad(set_to_none=True)
            stats = {}
            data_pos = {"epoch": state["epoch"], "cursor": state["cursor"]}  # committed only with the step below,
            if replay is not None and state["step"] % cfg.online.rollout_every == 0 \
                    and state["last_rollout"] != state["step"]:  # once per step, also across an interruption
                t0 = time.perf_counter()
                _log(metrics_file, tb, collect(engine, ds, replay, cfg, state["step"], world))
                state["last_rollout"] = state["step"]
                t_last += time.perf_counter() - t0  # tokens/s counts training time only
            step_tokens = 0
            for micro in range(cfg.optim.grad_accum):                       # so an interrupted step is redone
                if source is not None:
                    batch = {k: torch.from_numpy(v).to(device) for k, v in source.batch(
                        state["step"], micro, cfg.optim.grad_accum, world.key()).items() if k != "length"}
                elif replay is None:
                    idx = batch_indices(len(ds), data_pos, cfg.optim.batch_slices, cfg.seed)
                    batch = to_batch(ds, world.shard(idx), device)
                else:
                    rng = np.random.default_rng([cfg.seed, 4, state["step"], micro, *world.key()])
                    batch = {k: torch.from_numpy(v).to(device)  # each process samples its share from its replay
                             for k, v in replay.sample(cfg.optim.batch_slices // world.size, rng).items()}
                step_tokens += batch["input_ids"].numel() * world.size
                last = micro == cfg.optim.grad_accum - 1  # DDP averages gradients once, on the last micro-batch
                with objective.no_sync() if ddp and not last else contextlib.nullcontext():
                    with autocast:
                        loss, stats = objective(batch)
                    (loss / cfg.optim.grad_accum).backward()
            loss_value = world.mean(loss)  # host-device sync: the NaN guard needs the value every step
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"the loss became {loss_value} at step {state['step'] + 1}; the last good "
                                       f"checkpoint is kept in {run_dir / 'checkpoints'} (try a lower --optim.lr)")
            if cfg.optim.clip > 0:
                torch.nn.utils.clip_grad_norm_(qnet.trainable_parameters(), cfg.optim.clip)
            opt.step()
            sched.step()
            qnet.polyak_update(cfg.dqn.tau)
            state.update(data_pos)
            state["step"] += 1
            state["tokens"] += step_tokens
            bar.update()
            if state["step"] % cfg.log_every == 0 or state["step"] == cfg.optim.steps:
                now = time.perf_counter()
                rec = {"step": state["step"], "losses/total": loss_value, **_stat_record(stats),
                       "charts/lr": sched.get_last_lr()[0], "charts/epoch": state["epoch"],
                       "perf/tokens": state["tokens"],
                       "perf/tokens_per_s": (state["tokens"] - tok_last) / max(now - t_last, 1e-9)}
                t_last, tok_last = now, state["tokens"]
                _log(metrics_file, tb, rec)
                bar.set_postfix(loss=f"{loss_value:.3g}", **{k.split("/")[-1][:5]: f"{v:.3g}" for k, v in rec.items()
                                                             if k.startswith(("losses/", "charts/agree", "charts/q"))
                                                             and k != "losses/total"},
                                tok_s=f"{rec['perf/tokens_per_s']:,.0f}")
            if state["step"] % cfg.ckpt_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        if world.main and not collective:  # gathering would need every process in step
            path = checkpoint()
            print(f"\ninterrupted at step {state['step']}: saved {path}; continue with "
                  f"python -m icrl_fast.train --out {run_dir} --resume", file=sys.stderr)
        elif world.main:
            print(f"\ninterrupted at step {state['step']}: a sharded or online torchrun run keeps its last periodic "
                  f"checkpoint (--ckpt_every); continue with torchrun ... -m icrl_fast.train --out {run_dir} --resume",
                  file=sys.stderr)
        raise
    finally:
        if metrics_file is not None:
            metrics_file.close()
    bar.close()
    # --- teardown -----------------------------------------------------------------------------------------------
    result = {"step": state["step"], "tokens": state["tokens"]}
    adapters = None
    checkpoint()  # before the other ranks leave: a gathering checkpoint needs them
    if qnet.sharded:  # every process takes part in gathering the adapters and then the whole model for the eval
        adapters = {k: distributed.full(v.detach()) for k, v in qnet.train_state().items()}
        qnet.gather()
    if not world.main:
        world.barrier()  # rank 0 saves and evaluates
        distributed.teardown(world)
        return result
    if qnet.pretrained:
        qnet.save_adapters(run_dir / "adapters", adapters)
    if cfg.eval.maps > 0:
        maps = ds.maps[ds.test_map_ids[: cfg.eval.maps]]
        qnet.eval()
        ev = evaluate(qnet, fmt, maps, dataclasses.replace(cfg.eval, maps=len(maps)), device=device,
                      max_positions=cfg.model.max_positions, extra_config={"train": dataclasses.asdict(cfg)},
                      progress=progress)
        rows = summary_rows(ev)
        written = write_outputs(ev, run_dir, maps)
        result["success_20_29"] = float(np.mean(ev["success_rate"][20:])) if ev["episodes"] > 20 else None
        _log(None, tb, {"step": state["step"], "eval/success_last10": float(np.mean(ev["success_rate"][-10:]))})
        if progress:
            print("\n".join(rows))
            print("wrote " + ", ".join(str(p) for p in written))
    if tb is not None:
        tb.close()
    world.barrier()
    distributed.teardown(world)
    return result


def init_networks(source: Path, qnet: QNetwork) -> None:
    """Start from another run's latest networks (e.g. offline pre-training before online fine-tuning)."""
    try:
        load_checkpoint(source, qnet)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"cannot start from {source}: its networks do not match this model ({e})") from None


def collect(engine: RolloutEngine, ds: OfflineDataset, replay: ContextReplay, cfg: TrainConfig, step: int,
            world: distributed.World | None = None) -> dict:
    """One online rollout of the current network on training maps into the replay; returns its metrics. Under
    torchrun every process plays its share of the maps (its own exploration stream) into its own replay."""
    on, world = cfg.online, world or distributed.World()
    rng = np.random.default_rng([cfg.seed, 3, step])
    ids = rng.choice(ds.train_map_ids, size=min(on.maps, len(ds.train_map_ids)), replace=False)
    ids = world.shard(np.sort(ids))
    eps = on.epsilon(step)
    seed = int(np.random.SeedSequence([cfg.seed, 5, step, *world.key()]).generate_state(1)[0])
    t0 = time.perf_counter()
    was_training = engine.qnet.training
    engine.qnet.eval()
    try:
        out = engine.run(ds.maps[ids], on.episodes, 1.0 - eps, seed)
    finally:
        engine.qnet.train(was_training)
    replay.add(out)
    return {"step": step, "rollout/success": world.mean(torch.tensor(float(out.success.mean()))),
            "rollout/epsilon": eps,
            "rollout/contexts": len(replay),
            "perf/rollout_env_steps_per_s": float(out.length.sum()) / max(time.perf_counter() - t0, 1e-9)}


def _stat_record(stats: dict) -> dict:
    """Metric names for an objective's stats: ``losses/*`` and ``charts/*`` keep theirs; the TD statistics become
    ``charts/q``, ``charts/target`` and ``losses/cql`` (host-device sync: logged steps only)."""
    names = {"q": "charts/q", "target": "charts/target", "cql": "losses/cql", "transitions": "charts/transitions",
             "done_frac": "charts/done_frac"}
    return {names.get(k, k): float(v) for k, v in stats.items()}


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency; a broken install only loses the TensorBoard copy
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _log(metrics_file, tb, rec: dict) -> None:
    if metrics_file is not None:
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()
    if tb is not None:
        for k, v in rec.items():
            if k != "step" and v is not None:
                tb.add_scalar(k, v, rec["step"])


# ----------------------------------------------------------------------------------------- evaluate a saved run
def load_run_for_eval(run_dir: Path, experiment: str, n_maps: int):
    """The trained network, its format, the maps to evaluate (test split, or fresh 6-7 maps for ``ood``) and
    the run's config."""
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    cfg = from_dict(TrainConfig, json.loads((run_dir / "config.json").read_text()))
    ds = OfflineDataset.load(Path(cfg.data_path) if cfg.data_path else run_dir / "dataset", verify=False)
    qnet = QNetwork(cfg.model, ds.format.vocab_size, ds.format.action_ids, seed=cfg.seed)
    if qnet.pretrained and (run_dir / "adapters").is_dir():
        qnet.load_adapters(run_dir / "adapters")  # the PEFT adapters of the finished run
    else:
        load_checkpoint(run_dir, qnet)
    qnet.eval()
    if experiment == "ood":
        maps = generate_maps(n_maps, seed=cfg.seed + 7919, height=(6, 7), width=(6, 7), min_hops=cfg.data.min_hops)
    else:
        maps = ds.maps[ds.test_map_ids[:n_maps]]
    return qnet, ds.format, maps, cfg


# ---------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path, bool]:
    p = argparse.ArgumentParser(prog="python -m icrl_fast.train", description=__doc__.split("\n\n")[0],
                                usage="%(prog)s [--preset NAME] [--out DIR] [--resume] [--SECTION.FIELD VALUE ...]",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[2])
    p.add_argument("--preset", choices=("default", "protocol", "smoke", "paper"), default="default", help="starting config")
    p.add_argument("--out", default=None, help="run directory (default: a fresh folder under runs/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--model", dest="model.path", metavar="PATH", default=argparse.SUPPRESS,
                   help="local pretrained Llama directory (same as --model.path; nothing is downloaded)")
    add_dataclass_args(p, TrainConfig, exclude=("preset", "data.seed"))  # --preset: the start; --seed: every stream
    args = vars(p.parse_args(argv))
    name, out, resume = args.pop("preset"), args.pop("out"), args.pop("resume")
    if resume:
        if out is None or not (Path(out) / "config.json").is_file():
            p.error("--resume needs --out pointing at an existing run directory")
        if args:
            p.error(f"--resume continues the saved config; drop the other flags ({', '.join(args)})")
        return from_dict(TrainConfig, json.loads((Path(out) / "config.json").read_text())), Path(out), True
    try:
        cfg = apply_overrides(preset(name), args)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    if cfg.model.path and cfg.data.format == "paper" and cfg.data.tokenizer is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=cfg.model.path))  # its own
    if out is None:
        out = Path("runs") / time.strftime(f"{name}-%Y%m%d-%H%M%S")
    elif (Path(out) / "checkpoints").exists():
        p.error(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    return cfg, Path(out), False


def _interrupt_on_signals() -> None:
    """Ctrl-C, ``kill -INT`` and ``kill -TERM`` (what torchrun and schedulers send) all save a checkpoint and stop:
    SIGINT gets Python's handler back even where it was started ignored (a background job of a script), and
    SIGTERM raises the same KeyboardInterrupt."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    cfg, run_dir, resume = parse_args(argv)
    from icrl_fast.envs.ext import describe

    main_rank = distributed.rank() == 0  # under torchrun only rank 0 speaks
    if main_rank:
        print(f"icrl_fast: preset {cfg.preset}, run directory {run_dir}; {describe()}")
    _interrupt_on_signals()
    try:
        result = run(cfg, run_dir, resume=resume)
    except KeyboardInterrupt:
        return 130
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if main_rank:
        print(f"done: {result['step']} steps, {result['tokens']:,} tokens; run directory {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
