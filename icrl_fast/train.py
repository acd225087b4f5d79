"""``python -m icrl_fast.train``: train a transformer to learn Frozen Lake in context by RL, then evaluate it.

The default (``--preset default``, ``--mode protocol``): the simulator plays the evaluation protocol on fresh maps,
the context teacher (least-tried, forgetting at a surprise) beside the paper's ramp of random actions, 30 % of the
contexts going on on a second map, in the ``step-grid`` format (one token per env step, cells named on one 8 x 8
grid) into a 2 x 128 Llama with the same-state memory head; the loss is the paper's Double-DQN TD loss alone on the
Q head (the action tokens' LM-head logits), its target bootstrapping across episode ends (``--dqn.gamma_episode``).
``--objective.imitation`` / ``--objective.observation`` add the teacher's choices and the environment's answers on the
same head; ``--mode offline`` is the paper's offline Double DQN on dataset slices, ``--mode online`` rollouts into a
replay. ``run`` reads top to bottom: check the config, join the processes, the data (its test maps), the learner,
the context source (``icrl_fast.rl.sources``), the loop over the weighted objectives (``icrl_fast.rl.objectives``),
then save and evaluate. Configuration and presets live in ``icrl_fast.presets``, run directories and checkpoints in
``icrl_fast.checkpoint``.

    python -m icrl_fast.train                         # default preset: a small model on this CPU
    python -m icrl_fast.train --preset smoke          # < 1 minute, for tests
    python -m icrl_fast.train --preset paper --model.path /models/Llama-3.1-8B-Instruct   # IA3, on a GPU
    python -m icrl_fast.train --out runs/x --resume   # continue a run (bit-identical on the CPU)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from icrl_fast import distributed, threads
from icrl_fast.checkpoint import (  # noqa: F401
    build_qnet,
    init_networks,
    load_checkpoint,
    load_run_for_eval,
    run_format,
    save_checkpoint,
)
from icrl_fast.config import ArgumentParser, add_dataclass_args, apply_overrides, from_dict
from icrl_fast.data.dataset import OfflineDataset, build_dataset
from icrl_fast.data.formats import FORMATS, GRID_FORMATS
from icrl_fast.evaluate import evaluate, summary_rows, write_outputs
from icrl_fast.model.qnet import SHARD_NEEDS_PRETRAINED, ModelConfig, QNetwork  # noqa: F401  (ModelConfig: tests)
from icrl_fast.presets import (  # noqa: F401
    FIELD_RANGES,
    PRESETS,
    OnlineConfig,
    OptimConfig,
    TrainConfig,
    deterministic_on,
    preset,
    validate_fields,
)
from icrl_fast.rl.dqn import dqn_loss
from icrl_fast.rl.objectives import Objectives
from icrl_fast.rl.prefetch import PrefetchSource
from icrl_fast.rl.replay import ContextReplay
from icrl_fast.rl.rollout import RolloutEngine
from icrl_fast.rl.sources import OfflineSource, ProtocolSource, ReplaySource
from icrl_fast.rl.train_step import FiniteWatch, make_optimizer, train_step


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------------- the run
def run(cfg: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) and evaluate; returns the final metrics. Raises ``TrainingDiverged`` on a NaN or infinite
    loss: the step itself reads nothing back from the device (``icrl_fast.rl.train_step``), so the loss is watched on
    the device and read at the next logged step (every ``log_every`` steps) or checkpoint, whichever comes first: up
    to ``log_every - 1`` steps after it happened, always before a checkpoint could save what came after it.

    Stages: check the config (every rank, before any work) -> join the processes -> the data -> the learner
    (networks, optimiser, objectives; restored on resume) -> the context source -> the loop -> save and evaluate."""
    check_config(cfg)
    world, device = distributed.setup(resolve_device(cfg.device))
    # On the CPU, without this, multithreaded backward accumulations made two runs of the default model differ by ~1e-7
    # after 6 steps (5e-5 after 300). On CUDA it is opt-in (--deterministic true): cuBLAS then needs a fixed workspace.
    if deterministic_on(cfg.deterministic, device) and device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic_on(cfg.deterministic, device), warn_only=device != "cpu")
    threads.configure(cfg.threads)  # 0: the cores the other processes leave free, re-read each step
    progress = progress and world.main
    ds = prepare_data(cfg, run_dir, world, progress)
    fmt = run_format(cfg, ds)
    qnet, opt, sched = build_learner(cfg, fmt, world, device)
    state = {"step": 0, "epoch": 0, "cursor": 0, "tokens": 0, "last_rollout": -1}
    replay = ContextReplay(fmt, cfg.online.capacity, cfg.online.slice_len) if cfg.mode == "online" else None
    if replay is not None and cfg.online.init and not resume:
        init_networks(Path(cfg.online.init), qnet)
    if resume:
        state = {"last_rollout": -1, **load_checkpoint(run_dir, qnet, opt, sched, replay, rank=world.rank)}
    source = make_source(cfg, ds, fmt, replay, world, progress, qnet, device)
    objective = Objectives(qnet, cfg.objective, cfg.dqn,
                           lambda *a, **k: dqn_loss(*a, **k),  # dqn_loss looked up per call (tests patch it)
                           landing_block=getattr(fmt, "landing_block", None))
    ddp = world.distributed and not qnet.sharded
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(objective, device_ids=[world.local_rank] if device != "cpu" else None)
    collective = qnet.sharded or (replay is not None and world.distributed)  # checkpoints gather from every rank

    watch = FiniteWatch(state["step"], device)  # the NaN/inf guard, on the device (read with the logged steps)

    def checkpoint(alone: bool = False):
        """Rank 0 writes; where the checkpoint gathers from every process, every process takes part. The watch is
        read first (``TrainingDiverged`` instead of saving diverged weights); ``alone``: this process only (Ctrl-C)."""
        _raise_if_diverged(watch.values(), world, run_dir, alone=alone)  # host-device sync, per checkpoint
        if world.main or collective:
            return save_checkpoint(run_dir, qnet, opt, sched, state, cfg, replay, write=world.main, world=world)

    metrics_file = (run_dir / "metrics.jsonl").open("a") if world.main else None
    tb = _tensorboard(run_dir) if world.main else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()
    engine = None if replay is None else RolloutEngine(qnet, fmt, window=cfg.online.window, device=device,
                                                       max_positions=cfg.model.max_positions,
                                                       **cfg.rollout.engine_options())
    bar = tqdm(total=cfg.optim.steps, initial=state["step"], desc="training", unit="step", disable=not progress)
    t_last, tok_last = time.perf_counter(), state["tokens"]
    # --- the loop ---------------------------------------------------------------------------------------------
    try:
        while state["step"] < cfg.optim.steps:
            if replay is not None and state["step"] % cfg.online.rollout_every == 0 \
                    and state["last_rollout"] != state["step"]:  # once per step, also across an interruption
                t0 = time.perf_counter()
                _log(metrics_file, tb, collect(engine, ds, replay, cfg, state["step"], world))
                state["last_rollout"] = state["step"]
                t_last += time.perf_counter() - t0  # tokens/s counts training time only
            threads.poll()  # follows the other processes' load: two runs side by side settle at a core each
            # the data position is committed only with the step, so an interrupted step is redone
            data_pos = {"epoch": state["epoch"], "cursor": state["cursor"]}
            # The micro-batches, with the transitions and memory features the source made on the host, go to the device
            # before the step, which then reads nothing back: the next host-device sync is the logged step's read.
            host = [source.batch(state["step"], micro, data_pos) for micro in range(cfg.optim.grad_accum)]
            batches = [{k: upload(v, device) for k, v in b.items() if k != "length"} for b in host]
            # tokens fed: every row as long as the batch's longest context (not the length bucket's padding)
            step_tokens = sum(len(b["length"]) * int(b["length"].max()) if "length" in b else b["input_ids"].size
                              for b in host) * world.size
            loss, stats = train_step(objective, opt, batches, params=qnet.trainable_parameters(), clip=cfg.optim.clip,
                                     scheduler=sched, qnet=qnet, tau=cfg.dqn.tau, ddp=ddp, autocast=autocast,
                                     watch=watch)
            state.update(data_pos)
            state["step"] += 1
            state["tokens"] += step_tokens
            bar.update()
            if state["step"] % cfg.log_every == 0 or state["step"] == cfg.optim.steps:
                loss_value, stat_values, watched = _read_step(loss, stats, watch, world)  # the host-device sync
                _raise_if_diverged(watched, world, run_dir)
                now = time.perf_counter()
                rec = {"step": state["step"], "losses/total": loss_value, **_stat_record(stat_values),
                       "charts/lr": sched.get_last_lr()[0], "charts/epoch": state["epoch"],
                       "perf/tokens": state["tokens"],
                       "perf/tokens_per_s": (state["tokens"] - tok_last) / max(now - t_last, 1e-9)}
                if getattr(source, "dagger_success", None):
                    rec["rollout/dagger_success"] = source.dagger_success[-1]  # the model's latest DAgger chunk
                t_last, tok_last = now, state["tokens"]
                _log(metrics_file, tb, rec)
                bar.set_postfix(_postfix(rec))
            if state["step"] % cfg.ckpt_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        bar.close()
        if world.main and not collective:  # gathering would need every process in step
            path = checkpoint(alone=True)
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
        if isinstance(source, PrefetchSource):
            source.close()
    bar.close()
    # --- save and evaluate --------------------------------------------------------------------------------------
    result = {"step": state["step"], "tokens": state["tokens"]}
    checkpoint()  # before the other ranks leave: a gathering checkpoint needs them
    adapters = None
    if qnet.sharded:  # every process takes part in gathering the adapters and then the whole model for the eval
        adapters = {k: distributed.full(v.detach()) for k, v in qnet.train_state().items()}
        qnet.gather()
    if world.main:
        if qnet.pretrained:
            qnet.save_adapters(run_dir / "adapters", adapters)
        if cfg.eval.maps > 0:
            result |= final_evaluation(cfg, qnet, ds, fmt, run_dir, device, tb, state["step"], progress)
        if tb is not None:
            tb.close()
    world.barrier()  # the other ranks wait while rank 0 saves and evaluates
    # Drop the DDP wrapper while the process group is alive and idle: freed after teardown (when run returned), its
    # reducer held the last reference to the gloo group, whose destructor joined a worker thread waiting for the GIL
    # this thread held: a hang seen twice under load (gdb: ~ProcessGroupGloo -> thread join in Reducer dealloc).
    del objective
    gc.collect()
    world.barrier()
    distributed.teardown(world)
    return result


# ------------------------------------------------------------------------------------------------- the stages
def upload(array: np.ndarray, device: str) -> torch.Tensor:
    """A batch array on ``device``: on CUDA through pinned memory, without blocking the host (the step that reads it
    is queued behind the copy); elsewhere the array's own memory."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def check_config(cfg: TrainConfig) -> None:
    """Every configuration error, as a ``ValueError`` naming the flag, before any work (and, under torchrun, before
    joining the process group, so every rank fails fast): first each field against its declared range or choices,
    then across fields."""
    validate_fields(cfg)
    for part in (cfg.dqn, cfg.optim, cfg.objective, cfg.eval):
        part.validate()
    deterministic_on(cfg.deterministic, "cpu")  # a bad value fails here, before any work
    if cfg.mode not in ("offline", "protocol", "online"):
        raise ValueError(f"mode must be offline, protocol or online, got {cfg.mode!r}")
    if cfg.mode != "protocol" and (cfg.objective.imitation or cfg.objective.observation):
        raise ValueError("the imitation and observation objectives need the teacher's labels of --mode protocol")
    if cfg.mode == "protocol":
        cfg.protocol.validate()
        if cfg.protocol.behaviour != "teacher" and cfg.objective.imitation > 0:
            raise ValueError(f"--objective.imitation imitates the context teacher, which --protocol.behaviour "
                             f"{cfg.protocol.behaviour} does not use: set --objective.imitation 0")
    if cfg.mode == "online":
        cfg.online.validate()
    size = distributed.world_size()
    if size > 1 and cfg.mode == "online" and cfg.online.maps < size:
        raise ValueError(f"--online.maps ({cfg.online.maps}) must be at least the number of processes ({size}): "
                         "each process plays its share of the maps")
    if cfg.data.format not in FORMATS:
        raise ValueError(f"--data.format must be one of {FORMATS}, got {cfg.data.format!r}")
    if cfg.mode == "protocol" and cfg.protocol.shift > 0 and cfg.data.format not in GRID_FORMATS:
        raise ValueError(f"--protocol.shift places maps on the grid of a grid format ({', '.join(GRID_FORMATS)}); "
                         f"--data.format {cfg.data.format} has none (pass --protocol.shift 0)")
    if cfg.model.memory and not memory_fits(cfg):
        raise ValueError("--model.memory reads a step format's factored tokens over whole contexts: it needs "
                         "--mode protocol (slices that start mid-context would hide what came before), --data.format "
                         "step, step-grid or step-noend, a from-scratch model and --model.factored_embedding true "
                         "(pass --model.memory false)")
    if cfg.model.memory_forget and not cfg.model.memory:
        raise ValueError("--model.memory_forget empties the same-state memory's counts: it needs --model.memory true")
    if cfg.data.format.startswith("step") and cfg.model.path:
        raise ValueError("--data.format step embeds its own tokens (factored): it trains a from-scratch model, not a "
                         "pretrained one (--model PATH: use --data.format paper)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.device)):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: this machine has no CUDA device; use --device cpu or auto")
    if cfg.model.path is None:  # a from-scratch model's shape (a pretrained one brings its own)
        kv = cfg.model.kv_heads or cfg.model.heads
        if cfg.model.hidden_size % cfg.model.heads or (cfg.model.hidden_size // cfg.model.heads) % 2:
            raise ValueError(f"--model.hidden_size ({cfg.model.hidden_size}) must be --model.heads "
                             f"({cfg.model.heads}) x an even head size (RoPE rotates pairs of dimensions)")
        if cfg.model.heads % kv:
            raise ValueError(f"--model.kv_heads ({kv}) must divide --model.heads ({cfg.model.heads})")
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"--parallel must be ddp or fsdp, got {cfg.parallel!r}")
    if cfg.parallel == "fsdp" and cfg.model.path is None:
        raise ValueError(SHARD_NEEDS_PRETRAINED)
    if cfg.optim.batch_slices % size:
        raise ValueError(f"--optim.batch_slices ({cfg.optim.batch_slices}) must be a multiple of the number of "
                         f"processes ({size}): each process takes an equal share of the global batch")


def prepare_data(cfg: TrainConfig, run_dir: Path, world, progress: bool) -> OfflineDataset:
    """The run directory and the dataset (its maps hold the test split every mode evaluates on): rank 0 writes both;
    the other ranks wait, then read."""
    data_dir = Path(cfg.data_path) if cfg.data_path else run_dir / "dataset"
    if world.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
        if not data_dir.exists():
            build_dataset(dataclasses.replace(cfg.data, seed=cfg.seed), data_dir, progress=progress)
    world.barrier()
    return OfflineDataset.load(data_dir)


def build_learner(cfg: TrainConfig, fmt, world, device: str):
    """The Q-network (sharded under ``--parallel fsdp``), AdamW (``train_step.make_optimizer``) and the learning-rate
    schedule."""
    qnet = build_qnet(cfg, fmt, device)
    if world.distributed and cfg.parallel == "fsdp":
        qnet.shard(distributed.mesh(world, device))
    opt = make_optimizer(qnet.trainable_parameters(), cfg.optim.lr, cfg.optim.weight_decay)  # fused on CUDA
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.optim.lr_factor)
    return qnet, opt, sched


def make_source(cfg: TrainConfig, ds: OfflineDataset, fmt, replay, world, progress: bool, qnet, device: str):
    """The context source of ``cfg.mode`` (``icrl_fast.rl.sources``); DAgger chunks roll the network out."""
    if cfg.mode == "protocol":
        played = cfg.protocol.dagger > 0 or cfg.protocol.behaviour == "self"  # the model plays some contexts
        engine = (RolloutEngine(qnet, fmt, device=device, max_positions=cfg.model.max_positions,
                                **cfg.rollout.engine_options()) if played else None)
        make = functools.partial(ProtocolSource, cfg.protocol, fmt, ds.maps[ds.test_map_ids], seed=cfg.seed,
                                 height=cfg.data.height, width=cfg.data.width, min_hops=cfg.data.min_hops,
                                 grad_accum=cfg.optim.grad_accum, rank_key=world.key(), engine=engine,
                                 memory=qnet.memory)  # the batches carry the memory's features
        if cfg.protocol.prefetch:  # a worker process makes the next chunks (icrl_fast.rl.prefetch)
            return PrefetchSource(make, ahead=cfg.protocol.prefetch)
        return make(progress=progress)
    if cfg.mode == "online":
        return ReplaySource(replay, cfg.optim.batch_slices, cfg.seed, world)
    return OfflineSource(ds, cfg.optim.batch_slices, cfg.seed, world)


def final_evaluation(cfg: TrainConfig, qnet, ds: OfflineDataset, fmt, run_dir: Path, device: str, tb, step: int,
                     progress: bool) -> dict:
    """The paper's protocol on the test maps: eval.json and plots in the run directory; returns the headline."""
    maps = ds.maps[ds.test_map_ids[: cfg.eval.maps]]
    qnet.eval()
    ev = evaluate(qnet, fmt, maps, dataclasses.replace(cfg.eval, maps=len(maps)), device=device,
                  engine_options=cfg.rollout.engine_options(),
                  max_positions=cfg.model.max_positions, extra_config={"train": dataclasses.asdict(cfg)},
                  progress=progress)
    rows = summary_rows(ev)
    written = write_outputs(ev, run_dir, maps)
    _log(None, tb, {"step": step, "eval/success_last10": float(np.mean(ev["success_rate"][-10:]))})
    if progress:
        print("\n".join(rows))
        print("wrote " + ", ".join(str(p) for p in written))
    return {"success_20_29": float(np.mean(ev["success_rate"][20:])) if ev["episodes"] > 20 else None}


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


def _read_step(loss: torch.Tensor, stats: dict, watch: FiniteWatch, world) -> tuple[float, dict, list[float]]:
    """A logged step's one device read: the loss (under torchrun averaged over the processes: a collective), the
    objective's stats as floats and the watch's ``[bad_step, bad_loss]``."""
    names = list(stats)
    values = torch.stack([loss.double(), *(stats[k].double() for k in names), *watch.values()]).tolist()
    loss_value = world.mean(loss) if world.distributed else values[0]
    return loss_value, dict(zip(names, values[1: 1 + len(names)])), values[1 + len(names):]


def _raise_if_diverged(watched, world, run_dir: Path, alone: bool = False) -> None:
    """``TrainingDiverged`` if the watch (``FiniteWatch.values()``, or their floats) saw a loss that was not finite, on
    this process or (under torchrun, unless ``alone``: a collective) on any."""
    bad_step, bad_loss = torch.stack(watched).tolist() if torch.is_tensor(watched[0]) else watched  # sync if tensors
    here = bad_step > 0
    if not (world.mean(torch.tensor(float(here))) > 0 if world.distributed and not alone else here):
        return
    where = f"at step {int(bad_step)}" if here else "on another process"
    raise TrainingDiverged(f"the loss became {bad_loss if here else 'nan'} {where}; the last good checkpoint is kept "
                           f"in {run_dir / 'checkpoints'} (try a lower --optim.lr)")


def _stat_record(stats: dict) -> dict:
    """Metric names for an objective's stats (floats, read by ``_read_step``): ``losses/*`` and ``charts/*`` keep
    theirs; the TD statistics become ``charts/q``, ``charts/target`` and ``losses/cql``."""
    names = {"q": "charts/q", "target": "charts/target", "cql": "losses/cql", "transitions": "charts/transitions",
             "done_frac": "charts/done_frac"}
    return {names.get(k, k): float(v) for k, v in stats.items()}


def _postfix(rec: dict) -> dict:
    """The progress bar's short view of a metric record."""
    short = {k.split("/")[-1][:5]: f"{v:.3g}" for k, v in rec.items()
             if k.startswith(("losses/", "charts/agree", "charts/q")) and k != "losses/total" and v is not None}
    return {"loss": f"{rec['losses/total']:.3g}", **short, "tok_s": f"{rec['perf/tokens_per_s']:,.0f}"}


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


# ---------------------------------------------------------------------------------------------------------- CLI
def memory_fits(cfg: TrainConfig) -> bool:
    """The same-state memory can run: whole protocol contexts in a step format, factored, from scratch."""
    return (cfg.mode == "protocol" and cfg.data.format.startswith("step") and cfg.model.factored_embedding
            and not cfg.model.path)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, Path, bool]:
    """The config, run directory and resume flag of a command line. A bad flag or value exits with status 2 and one
    line on stderr (``error: --optim.steps must be >= 1 (got -1)``): every field is checked against its declared
    range or choices here; the checks across fields (``check_config``) run first thing in ``run``, before any work,
    and reach the user through ``main`` the same way."""
    p = ArgumentParser(prog="python -m icrl_fast.train", description=__doc__.split("\n\n")[0],
                       usage="%(prog)s [--preset NAME] [--out DIR] [--resume] [--SECTION.FIELD VALUE ...]",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[2])
    p.add_argument("--preset", choices=PRESETS, default="default", help="starting config")
    p.add_argument("--out", default=None, help="run directory (default: a fresh folder under runs/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--model", dest="model.path", metavar="PATH", default=argparse.SUPPRESS,
                   help="local pretrained Llama directory or .gguf file (same as --model.path; nothing is "
                        "downloaded)")
    add_dataclass_args(p, TrainConfig, exclude=("preset", "data.seed"),  # --preset: the start; --seed: every stream
                       table=FIELD_RANGES)
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
        validate_fields(cfg)
    except (TypeError, ValueError) as e:
        p.error(str(e))
    if cfg.model.path and cfg.data.format == "paper" and cfg.data.tokenizer is None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=cfg.model.path))  # its own
    if cfg.mode == "protocol" and cfg.protocol.shift > 0 and cfg.data.format not in GRID_FORMATS \
            and "protocol.shift" not in args:
        # the preset's shift places maps on a grid format's grid: another format has none, so it is off (a shift
        # asked for on the command line stays, and check_config refuses it)
        print(f"note: --data.format {cfg.data.format} has no grid to place maps on: the preset's --protocol.shift "
              f"{cfg.protocol.shift} is off (0)")
        cfg = dataclasses.replace(cfg, protocol=dataclasses.replace(cfg.protocol, shift=0.0))
    if cfg.model.memory and "model.memory" not in args and not memory_fits(cfg):
        # the preset's same-state memory reads a step format's factored tokens over whole contexts: elsewhere it is
        # off (asked for on the command line it stays, and check_config refuses it)
        print(f"note: the preset's --model.memory needs protocol contexts in a step format with factored embeddings "
              f"and a from-scratch model: off for --mode {cfg.mode} --data.format {cfg.data.format}")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, memory=False))
    if cfg.model.memory_forget and not cfg.model.memory and "model.memory_forget" not in args:
        # the preset's forgetting belongs to its memory: without the memory (dropped above, or --model.memory false)
        # it goes too (asked for on the command line it stays, and check_config refuses it)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, memory_forget=False))
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
    try:
        cfg, run_dir, resume = parse_args(argv)
    except SystemExit as e:  # --help (0), or a refused flag (2; its one-line error is already on stderr)
        return e.code if isinstance(e.code, int) else 0
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
