"""Training configuration: every field a run depends on (saved as ``config.json`` and in every checkpoint), and the
presets ``python -m icrl_fast.train --preset NAME`` starts from."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from icrl_fast.config import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, Range, check_fields
from icrl_fast.data.dataset import QUALITY_WEIGHT, SOURCES, DatasetConfig
from icrl_fast.data.formats import FORMATS
from icrl_fast.envs.learners import QLearningConfig
from icrl_fast.model.attention import CHOICES as ATTENTION
from icrl_fast.model.qnet import ModelConfig
from icrl_fast.protocol import EXPERIMENTS, EvalConfig
from icrl_fast.rl.dqn import DQNConfig
from icrl_fast.rl.objectives import ObjectiveConfig
from icrl_fast.rl.sources import BEHAVIOURS, TEACHER_RULES, ProtocolConfig

PRESETS = ("default", "protocol", "dqn", "gpu", "smoke", "paper")
#: Optimizer steps of the default: 2,400 x ~3.5k tokens (the step format: one token per env step; 30 % of the
#: contexts switch maps and are twice as long) at ~9.3k tokens/s (two threads, td on) is ~15 min of training, which
#: keeps the README's install-and-train command under 20 minutes. Without switches, 3,200 x ~2.65k tokens measured
#: 19 min 07 s end to end and 0.78 on seed 0; with them 3,200 steps reached 0.89 (e27, one thread).
DEFAULT_STEPS = 2400
#: Fraction of the default's training contexts that switch to a fresh map after their 30 episodes (e27).
DEFAULT_SWITCH = 0.3
#: The default's context format: the step format with every map's cells named on one 8 x 8 grid (e35), and the
#: fraction of its training maps placed at a random offset on that grid (e37), so every cell's name is trained.
DEFAULT_FORMAT, DEFAULT_SHIFT = "step-grid", 0.2
#: The default's same-state memory (a hard-wired head, ``--model.memory``) and its teacher's rule once every safe
#: action was tried (``--protocol.teacher least-tried``): together 0.98 in distribution and greedy on seed 0 (e41).
DEFAULT_MEMORY, DEFAULT_TEACHER = True, "least-tried"
#: Forgetting at a surprise, in the teacher (``--protocol.forget``) and the memory (``--model.memory_forget``): after a
#: map switch, acting by itself, back to 90 % of the pre-switch level in 7 / 7 / 8 episodes on seeds 0 / 1 / 2 (e44-e46)
#: where without it never; on maps that do not change nothing differs.
DEFAULT_FORGET = True
#: The default's objective (issue 32): RL only -- the paper's TD loss alone, no imitation of the teacher and no
#: observation loss -- with a target that bootstraps across episode ends of a context at 0.9 (``--dqn.gamma_episode``).
#: TD alone (e47-e49): 1.00 / 1.00 / 1.00 in episodes 20-29 but 0.57 acting from episode 0 on seed 0; the
#: cross-episode target lifts that to 0.93 (e56). The teacher still plays the training contexts
#: (``--protocol.behaviour teacher``); nothing of it is imitated.
DEFAULT_OBJECTIVE = {"td": 1.0, "imitation": 0.0, "observation": 0.0}
DEFAULT_GAMMA_EPISODE = 0.9


@dataclass
class OptimConfig:
    """Optimisation."""

    steps: int = field(default=300, metadata={"help": "optimizer steps", "range": COUNT})
    batch_slices: int = field(default=16, metadata={"help": "slices per micro-batch", "range": COUNT})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step", "range": COUNT})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate after warm-up", "range": POSITIVE})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up steps (then constant)",
                                                    "range": NON_NEGATIVE})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay", "range": NON_NEGATIVE})
    clip: float = field(default=1.0, metadata={"help": "gradient-norm clip (0: off)", "range": NON_NEGATIVE})
    schedule: str = field(default="constant", metadata={"help": "after warm-up: constant (the paper) or cosine (to "
                                                                "min_lr_frac x lr at the last step)",
                                                        "choices": ("constant", "cosine")})
    min_lr_frac: float = field(default=0.1, metadata={"help": "cosine schedule's final lr as a fraction of lr",
                                                      "range": FRACTION})

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

    maps: int = field(default=50, metadata={"help": "training maps per rollout (one context each)", "range": COUNT})
    episodes: int = field(default=30, metadata={"help": "episodes per rollout context", "range": COUNT})
    rollout_every: int = field(default=10, metadata={"help": "optimizer steps between rollouts", "range": COUNT})
    epsilon_start: float = field(default=1.0, metadata={"help": "P(random action) at step 0", "range": FRACTION})
    epsilon_end: float = field(default=0.1, metadata={"help": "P(random action) after the decay", "range": FRACTION})
    epsilon_steps: int = field(default=200, metadata={"help": "optimizer steps of the linear epsilon decay (0: none)",
                                                      "range": NON_NEGATIVE})
    capacity: int = field(default=1000, metadata={"help": "contexts kept in the replay (oldest leave first)",
                                                  "range": COUNT})
    slice_len: int = field(default=1024, metadata={"help": "tokens per sampled slice (shorter contexts: whole)",
                                                   "range": Range(2)})  # a TD target needs a next decision
    window: int | None = field(default=None, metadata={"help": "rollout attention window (ring-buffer KV cache)",
                                                       "range": COUNT})
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
class RolloutConfig:
    """How the step formats' rollouts run (``icrl_fast.rl.player``): every rollout engine of a run, evaluation
    included."""

    graph: bool = field(default=False, metadata={"help": "on CUDA, replay the player's step from a CUDA graph (eager "
                                                         "with a warning elsewhere or if a capture fails)"})
    compile: bool = field(default=False, metadata={"help": "run the player's step through torch.compile(fullgraph="
                                                           "True, dynamic=False)"})

    def engine_options(self) -> dict:
        """``RolloutEngine`` keyword arguments."""
        return {"graph": self.graph, "compile": self.compile}


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as config.json in the run directory and in every checkpoint."""

    preset: str = field(default="default", metadata={"help": "the preset this config started from"})
    seed: int = field(default=0, metadata={"help": "seed of every random stream", "range": NON_NEGATIVE})
    data: DatasetConfig = field(default_factory=DatasetConfig)
    data_path: str | None = field(default=None, metadata={"help": "an existing dataset folder (default: build one "
                                                                  "into the run directory)"})
    mode: str = field(default="offline", metadata={"help": "offline (the paper: the dataset's slices), protocol "
                                                           "(the simulator plays the evaluation protocol with the "
                                                           "context teacher, per map, on the fly) or online "
                                                           "(rollouts with the KV-cache engine into a replay)",
                                                   "choices": ("offline", "protocol", "online")})
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dqn: DQNConfig = field(default_factory=DQNConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    log_every: int = field(default=10, metadata={"help": "steps between metric records", "range": COUNT})
    ckpt_every: int = field(default=100, metadata={"help": "steps between checkpoints", "range": COUNT})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu or cuda"})
    parallel: str = field(default="ddp", metadata={"help": "under torchrun: ddp (every process holds the model) or "
                                                         "fsdp (FSDP2 shards a pretrained model over the processes)",
                                                 "choices": ("ddp", "fsdp")})
    deterministic: str = field(default="auto", metadata={"help": "torch deterministic algorithms: auto (on for the "
                                                              "CPU, where runs are then bit-identical for a seed at "
                                                              "a fixed --threads and "
                                                              "no slower; off on CUDA, where they warn and fill empty "
                                                              "tensors with NaN), true or false"})
    threads: int = field(default=0, metadata={"help": "CPU threads: 0 = the cores other processes leave free, "
                                                      "re-read every second (two runs side by side settle at one "
                                                      "each; icrl_fast.threads), N = exactly N (bit-identical runs "
                                                      "whatever else the machine does)", "range": NON_NEGATIVE})


#: The allowed values of the fields of the configs that live beside their code (``check_fields``' table; the
#: classes above declare theirs in their fields' metadata). Counts are >= 1 unless 0 has a documented meaning,
#: weights >= 0 (0 turns an objective off), fractions and probabilities in [0, 1].
FIELD_RANGES = {
    DatasetConfig: {
        "train_maps": COUNT, "test_maps": NON_NEGATIVE, "height": COUNT, "width": COUNT, "min_hops": COUNT,
        "source": SOURCES, "quality": tuple(QUALITY_WEIGHT), "set_size": COUNT, "sets_per_map": COUNT,
        "format": FORMATS, "max_obs": COUNT, "slice_len": COUNT, "seed": NON_NEGATIVE},
    QLearningConfig: {
        "episodes": COUNT, "alpha": FRACTION, "gamma": FRACTION, "epsilon_start": FRACTION, "epsilon_end": FRACTION,
        "epsilon_decay_episodes": NON_NEGATIVE, "max_episode_steps": COUNT},
    ProtocolConfig: {
        "pool_maps": COUNT, "episodes": COUNT, "contexts": COUNT, "bucket": COUNT, "ramp": ("paper", "teacher"),
        "max_len": Range(8), "noise": Range(0, 1, open_hi=True),  # noise 1 would leave the teacher no episode
        "dagger": FRACTION, "switch": FRACTION, "widen": FRACTION, "widen_to": Range(2), "shift": FRACTION,
        "teacher": TEACHER_RULES, "behaviour": BEHAVIOURS, "relabel": FRACTION, "prefetch": NON_NEGATIVE,
        "length_bucket": NON_NEGATIVE},
    ObjectiveConfig: {
        "td": NON_NEGATIVE, "imitation": NON_NEGATIVE, "observation": NON_NEGATIVE,
        "label_smoothing": Range(0, 1, open_hi=True)},  # 1 would leave no target to imitate
    ModelConfig: {
        "hidden_size": COUNT, "layers": COUNT, "heads": COUNT, "kv_heads": COUNT, "intermediate_size": COUNT,
        "max_positions": COUNT, "dtype": ("float32", "bfloat16"), "attention": ATTENTION},
    DQNConfig: {
        "gamma": FRACTION, "gamma_episode": FRACTION, "reward_scale": POSITIVE,
        "tau": Range(0, 1, open_lo=True),  # 0 would freeze the target network
        "argmax": ("actions", "vocab"), "loss": ("paper", "mse", "huber"), "huber_delta": POSITIVE,
        "cql": NON_NEGATIVE, "cql_on": ("all", "success")},
    EvalConfig: {
        "maps": NON_NEGATIVE,  # 0: the trainer skips its evaluation
        "episodes": COUNT, "experiment": EXPERIMENTS, "seed": NON_NEGATIVE, "batch_maps": COUNT,
        "ramp": ("paper", "greedy"), "window": COUNT},
}


def validate_fields(cfg: TrainConfig) -> None:
    """``ValueError`` naming the flag and the value at the first field of ``cfg`` outside its declared range or
    choices (every section, whatever the mode; ``icrl_fast.train.check_config`` then checks across fields)."""
    check_fields(cfg, FIELD_RANGES)


def deterministic_on(setting, device: str) -> bool:
    """Whether ``--deterministic`` (auto | true | false; a bool from an older config.json) turns torch's deterministic
    algorithms on for ``device``."""
    value = {"true": True, "false": False, "auto": None}.get(str(setting).lower(), "bad")
    if value == "bad":
        raise ValueError(f"--deterministic must be auto, true or false, got {setting!r}")
    return (not str(device).startswith("cuda")) if value is None else value


def protocol_recipe(preset_name: str = "protocol", td: float = 0.0, data_format: str = "compact",
                    memory: bool = False, memory_forget: bool = False, **protocol) -> TrainConfig:
    """In-context RL taught on protocol contexts: the context teacher's choices (imitation) and the environment's
    answers (observation) on the one Q head of a 2 x 128 Llama, AdamW 2e-3 with a cosine schedule, plus the paper's
    TD loss at weight ``td``, in context format ``data_format`` (docs/training.md; the measured runs are
    in docs/results/icrl-runs.md)."""
    return TrainConfig(
        preset=preset_name, mode="protocol", data=DatasetConfig(format=data_format, slice_len=1024),
        protocol=ProtocolConfig(**protocol), objective=ObjectiveConfig(td=td, imitation=1.0, observation=0.5),
        model=ModelConfig(layers=2, memory=memory, memory_forget=memory_forget),
        optim=OptimConfig(steps=3000, lr=2e-3, warmup_steps=30, schedule="cosine"),
        log_every=50, ckpt_every=500)


def preset(name: str) -> TrainConfig:
    """Where a run starts from (every field can then be changed by a flag):

    * ``default`` -- RL only (issue 32): the paper's TD loss alone with a target that bootstraps across episode
      ends (``--dqn.gamma_episode 0.9``; docs/results/icrl-runs.md e47-e49, e56, e59, e60) on protocol contexts that
      the least-tried context teacher plays beside the ramp's random actions (e41), forgetting at a surprise (e44), 30 %
      of them switching to a fresh map halfway (e27), in the step format (one token per env step, e19) with cells named
      on one 8 x 8 grid (``step-grid``, e35; 20 % of the training maps at a random offset on it, e37), with the
      same-state memory head (e41), for 2,400 steps: what fits 20 minutes here. The default before it (td +
      imitation + observation, e44-e46): ``--objective.imitation 1 --objective.observation 0.5
      --dqn.gamma_episode 0``;
    * ``protocol`` -- the protocol recipe without noise (e01), kept so every logged run can be rerun;
    * ``dqn`` -- the default before protocol contexts: offline Double DQN + CQL on success-weighted slices (0.21);
    * ``gpu`` -- the protocol recipe scaled up for one GPU (a 6 x 256 model, 4x the contexts, 20,000 steps, the
      default's format; td + imitation + observation, without the default's memory, switches or cross-episode
      target: not yet brought in line with the RL-only default); measured once, in the compact format and cut to 750 steps (``--data.format compact``, ~95 s
      on an H200: 0.66, docs/results/icrl-runs.md g01); in the step formats not yet;
    * ``smoke`` -- seconds, what the tests run; ``paper`` -- the paper's recipe (8B + IA3, pure DQN, on a GPU).
    """
    if name == "default":  # the protocol recipe + the paper's TD loss, sized to 20 minutes on this 2-core CPU
        cfg = protocol_recipe("default", td=1.0, data_format=DEFAULT_FORMAT, switch=DEFAULT_SWITCH, shift=DEFAULT_SHIFT,
                              memory=DEFAULT_MEMORY, teacher=DEFAULT_TEACHER, memory_forget=DEFAULT_FORGET,
                              forget=DEFAULT_FORGET)
        return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, steps=DEFAULT_STEPS),
                                   objective=dataclasses.replace(cfg.objective, **DEFAULT_OBJECTIVE),
                                   dqn=dataclasses.replace(cfg.dqn, gamma_episode=DEFAULT_GAMMA_EPISODE))
    if name == "protocol":
        return protocol_recipe("protocol")
    if name == "gpu":
        cfg = protocol_recipe("gpu", td=1.0, data_format=DEFAULT_FORMAT, contexts=32, shift=DEFAULT_SHIFT)
        return dataclasses.replace(
            cfg, model=ModelConfig(hidden_size=256, layers=6, heads=8, intermediate_size=768),
            optim=dataclasses.replace(cfg.optim, steps=20000, lr=1e-3, warmup_steps=200), ckpt_every=1000)
    if name == "dqn":  # cql + success-weighted data: the best of the offline-DQN sessions (0.21)
        return TrainConfig(preset="dqn", data=DatasetConfig(format="compact", slice_len=1024, quality="high"),
                           dqn=DQNConfig(cql=1.0))
    if name == "smoke":
        return TrainConfig(
            preset="smoke", data=DatasetConfig(train_maps=24, test_maps=6, format="compact", slice_len=256,
                                               learner=QLearningConfig(episodes=200)),
            model=ModelConfig(hidden_size=32, layers=2, heads=2, intermediate_size=64, max_positions=4096),
            optim=OptimConfig(steps=12, batch_slices=4, warmup_steps=2), eval=EvalConfig(maps=6, episodes=4),
            log_every=2, ckpt_every=5, threads=1)  # one thread: bit-identical whatever else the machine runs
    if name == "paper":
        return TrainConfig(
            preset="paper", data=DatasetConfig(format="paper", slice_len=4096, learner=QLearningConfig(episodes=2600)),
            model=ModelConfig(dtype="bfloat16", max_positions=131072),
            dqn=DQNConfig(argmax="vocab"),
            optim=OptimConfig(steps=956, batch_slices=1, grad_accum=10, lr=1e-2, warmup_steps=10, clip=0.0),
            eval=EvalConfig(batch_maps=10), ckpt_every=50)
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
