"""Context sources: where a training batch's token contexts come from.

* ``offline`` -- :class:`OfflineSource`: the paper's 4,096-token cross-map slices of a built dataset
  (``icrl_fast.data``);
* ``online`` -- :class:`ReplaySource`: slices of the network's own rollouts (``icrl_fast.rl.replay``);
* ``protocol`` -- :class:`ProtocolSource`: the Numba simulator plays the evaluation protocol itself, one fresh map
  per context (test maps excluded by content), ``episodes`` episodes with the paper's ramp mixing the context
  teacher (``icrl_fast.envs.learners.play_protocol``) with uniform random actions, generated on the fly. Every
  decision carries the teacher's choice (``label``), also where a random action was executed. With ``dagger`` > 0
  a fraction of the chunks is played by the model itself through the rollout engine (same ramp: the evaluation's
  own distribution of contexts) and labelled by the same teacher -- DAgger. ``behaviour`` chooses who plays beside
  the ramp's random actions: the teacher, a tabular Q-learner from scratch in each context
  (``icrl_fast.envs.learners.q_learning_protocol``; labels all zero: nothing of the teacher reaches training) or the
  model itself through the rollout engine (labels all zero). With ``switch`` > 0 a fraction of the
  teacher-played contexts go on, after their episodes, on a second fresh map (the non-stationary experiment's
  contexts: two maps in one context). With ``relabel`` > 0 a fraction of the contexts have their observation
  numbers renamed by a random permutation (``relabel_observations``). A grid format (``step-grid``) numbers every
  map on its grid; with ``shift`` > 0 a fraction of the maps sit at a random offset on it (``shift_observations``).

Every source has ``batch(step, micro, pos) -> dict of numpy arrays``. A batch is the learner's token contract
(``input_ids``, ``decision_mask``, ``action``, ``episode_id``,
``episode_return``, ``terminated``, ``truncated``; ``[B, L]``), its TD transitions made here on the host
(``tr_row``, ``tr_pos``, ``tr_next_pos``, ``tr_action``, ``tr_reward``, ``tr_done``, ``tr_valid``: flat, padded to
``transition_capacity`` of the batch's shape and the format's ``decision_spacing``; see
``icrl_fast.rl.dqn.padded_transitions``) plus, from the protocol source, ``label`` (uint8 bit
mask of the teacher's choices at decisions, 0 elsewhere), ``outcome_mask`` (bool: positions from an action token
up to the next decision, whose next token -- what the environment answered -- the observation loss predicts) and,
given the model's same-state memory, its features ``memory`` (float32 ``[B, L, 32]``). So the TD loss reads
nothing of the batch back from the device (``icrl_fast.rl.train_step``).
Contexts are right-padded with a token that is neither a decision nor an action; causal attention never lets a real
token see padding, so no attention mask is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from icrl_fast.data.formats import ContextFormat, decode, encode_episodes, pad_token, token_contract
from icrl_fast.data.step_format import StepFormat, grid_numbered, names_on_grid, observation_names
from icrl_fast.envs.learners import EpisodeLog, play_protocol, q_learning_protocol, rename_observations, teacher_labels
from icrl_fast.envs.maps import MapBatch, generate_maps
from icrl_fast.protocol import paper_ramp
from icrl_fast.rl.dqn import padded_transitions, transition_capacity

TEACHER_RULES = ("any", "least-tried")


BEHAVIOURS = ("teacher", "q-learning", "self")  # who plays protocol contexts (--protocol.behaviour)


@dataclass
class ProtocolConfig:
    """The protocol context source (``--mode protocol``)."""

    pool_maps: int = field(default=20000, metadata={"help": "fresh training maps the contexts are drawn from (test "
                                                            "maps removed by content)"})
    episodes: int = field(default=30, metadata={"help": "episodes per context (the evaluation's 30)"})
    contexts: int = field(default=8, metadata={"help": "contexts (one map each, two with switch) per micro-batch"})
    bucket: int = field(default=8, metadata={"help": "micro-batches generated together and grouped by length (less "
                                                     "padding)"})
    ramp: str = field(default="paper", metadata={"help": "P(teacher) per episode: paper (the evaluation's ramp, "
                                                         "0.0 -> 1.0 over 20 episodes) or teacher (always)"})
    max_len: int = field(default=2048, metadata={"help": "contexts longer than this are cut (tokens)"})
    noise: float = field(default=0.0, metadata={"help": "P(random action) at least this in every episode, the late "
                                                        "ones too: contexts where a copied success is broken and the "
                                                        "teacher's label says go back to it"})
    dagger: float = field(default=0.0, metadata={"help": "fraction of chunks the model itself plays (through the "
                                                         "rollout engine, same ramp), labelled by the teacher: DAgger"})
    switch: float = field(default=0.0, metadata={"help": "fraction of (teacher-played) contexts that go on, after "
                                                         "their episodes, on a fresh map for as many more, the ramp "
                                                         "restarted and the teacher starting over, nothing marking "
                                                         "the switch: the non-stationary experiment's contexts"})
    widen: float = field(default=0.0, metadata={"help": "fraction of maps whose observations are numbered as if "
                                                        "the map sat in a wider grid (up to widen_to columns; the "
                                                        "extra columns never reached): a probe of what observation "
                                                        "numbers mean on wider maps"})
    widen_to: int = field(default=7, metadata={"help": "the widest grid --protocol.widen numbers a map in"})
    shift: float = field(default=0.0, metadata={"help": "a grid format (step-grid) only: fraction of maps placed at a "
                                                        "random offset on the grid (same map, same row stride, its "
                                                        "cells named as if it sat elsewhere): every cell's name gets "
                                                        "trained, also those only larger maps reach"})
    teacher: str = field(default="any", metadata={"help": "the context teacher's rule once every safe action at a "
                                                         "state was tried: any (uniform over them) or least-tried "
                                                         "(those tried least often there; e41)"})
    forget: bool = field(default=False, metadata={"help": "the teacher forgets what it knew at a surprise (an "
                                                          "action's outcome from a state differs from the last time: "
                                                          "on these deterministic maps, a changed map) and starts "
                                                          "over; switch contexts are labelled by it from the context "
                                                          "alone instead of by a teacher told of the switch"})
    behaviour: str = field(default="teacher", metadata={"help": "who plays the training contexts, beside the ramp's "
                                                                "random actions: teacher (the context teacher, "
                                                                "whose choices are the imitation labels), q-learning "
                                                                "(a tabular Q-learner from scratch in each context: "
                                                                "the paper's kind of data, no teacher anywhere) or "
                                                                "self (the model, through the rollout engine; its "
                                                                "contexts do not switch maps)"})
    relabel: float = field(default=0.0, metadata={"help": "fraction of contexts whose observation numbers are renamed "
                                                          "by a random permutation of 0 .. max_obs - 1 (one per "
                                                          "context): every observation token is trained, and a map "
                                                          "can be known only from the context"})
    length_bucket: int = field(default=0, metadata={"help": "pad every batch's length up to a multiple of this many "
                                                            "tokens (a few static shapes for a compiled or captured "
                                                            "step on a GPU; padding is masked out of every loss); 0: "
                                                            "as long as the longest context"})
    prefetch: int = field(default=0, metadata={"help": "chunks of contexts a worker process makes ahead of the "
                                                       "trainer (the same batches, sooner; not with dagger or "
                                                       "behaviour self); 0: the trainer makes each when it needs it"})

    def validate(self) -> None:
        if min(self.pool_maps, self.episodes, self.contexts, self.bucket) < 1 or self.max_len < 8:
            raise ValueError(f"protocol needs pool_maps, episodes, contexts, bucket >= 1 and max_len >= 8, got "
                             f"{self.pool_maps}, {self.episodes}, {self.contexts}, {self.bucket}, {self.max_len}")
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"protocol noise must be a probability below 1, got {self.noise}")
        if self.teacher not in TEACHER_RULES:
            raise ValueError(f"protocol teacher must be one of {TEACHER_RULES}, got {self.teacher!r}")
        if not 0.0 <= self.dagger <= 1.0:
            raise ValueError(f"protocol dagger must be a fraction in [0, 1], got {self.dagger}")
        if not 0.0 <= self.switch <= 1.0:
            raise ValueError(f"protocol switch must be a fraction in [0, 1], got {self.switch}")
        if not 0.0 <= self.widen <= 1.0 or self.widen_to < 2:
            raise ValueError(f"protocol widen must be a fraction in [0, 1] and widen_to >= 2, got {self.widen}, "
                             f"{self.widen_to}")
        if not 0.0 <= self.shift <= 1.0:
            raise ValueError(f"protocol shift must be a fraction in [0, 1], got {self.shift}")
        if not 0.0 <= self.relabel <= 1.0:
            raise ValueError(f"protocol relabel must be a fraction in [0, 1], got {self.relabel}")
        if self.ramp not in ("paper", "teacher"):
            raise ValueError(f"protocol ramp must be paper or teacher, got {self.ramp!r}")
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"--protocol.behaviour must be one of {', '.join(BEHAVIOURS)}, got {self.behaviour!r}")
        if self.behaviour != "teacher" and self.dagger > 0:
            raise ValueError(f"--protocol.dagger labels the model's contexts with the teacher; with --protocol.behaviour "
                             f"{self.behaviour} no teacher is used: set --protocol.dagger 0")

    def p_teacher(self) -> np.ndarray:
        """P(the behaviour acts, not a uniform random action) per episode: the ramp, capped at ``1 - noise``."""
        ramp = paper_ramp(self.episodes) if self.ramp == "paper" else np.ones(self.episodes)
        return np.minimum(ramp, 1.0 - self.noise)


def exclude_maps(pool: MapBatch, excluded: MapBatch) -> MapBatch:
    """``pool`` without the maps that equal (same size and tiles) any map of ``excluded``."""
    def key(maps, b):
        r, c = int(maps.nrow[b]), int(maps.ncol[b])
        return r, c, maps.tiles[b, :r, :c].tobytes()

    banned = {key(excluded, b) for b in range(len(excluded))}
    keep = np.array([key(pool, b) not in banned for b in range(len(pool))])
    return pool[np.flatnonzero(keep)]


def contexts_log(fmt: ContextFormat, contexts: list[np.ndarray]) -> EpisodeLog:
    """The episodes of whole token contexts (one map each, e.g. a rollout's ``tokens``) as an :class:`EpisodeLog`,
    map ``b`` = context ``b``. Only what a context shows is filled in: ``final_obs`` is -1 where the format does not
    show it (the step format does)."""
    obs, actions, rewards, map_id, length, returns, term, trunc, final = [], [], [], [], [], [], [], [], []
    for b, ids in enumerate(contexts):
        for ep in decode(fmt, ids):
            obs += ep["obs"]
            actions += ep["actions"]
            rewards += ep["rewards"]
            map_id.append(b)
            length.append(len(ep["actions"]))
            returns.append(sum(ep["rewards"]))
            term.append(ep["terminated"])
            trunc.append(ep["truncated"])
            final.append(ep.get("final_obs", -1))
    length = np.asarray(length, dtype=np.int32)
    return EpisodeLog(obs=np.asarray(obs, np.int16), actions=np.asarray(actions, np.int8),
                      rewards=np.asarray(rewards, np.float32), map_id=np.asarray(map_id, np.int32),
                      start=np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64), length=length,
                      returns=np.asarray(returns, np.float32), terminated=np.asarray(term, bool),
                      truncated=np.asarray(trunc, bool), final_obs=np.asarray(final, np.int16))


def append_contexts(first: EpisodeLog, second: EpisodeLog, partner: np.ndarray) -> tuple[EpisodeLog, np.ndarray]:
    """One log of ``len(partner)`` contexts: context ``c`` is ``first``'s episodes of map ``c``, then, where
    ``partner[c] >= 0``, ``second``'s episodes of map ``partner[c]``. ``map_id`` becomes the context.

    Returns ``(log, take)``: ``take`` picks the joined log's steps out of both logs' steps concatenated (``first``'s
    then ``second``'s), for per-step arrays such as teacher labels."""
    n = len(partner)
    fa = np.searchsorted(first.map_id, np.arange(n + 1))
    fb = np.searchsorted(second.map_id, np.arange(int(partner.max(initial=-1)) + 2))
    episodes, context = [], []
    for c in range(n):
        own = list(range(fa[c], fa[c + 1]))
        more = [] if partner[c] < 0 else list(range(first.num_episodes + fb[partner[c]],
                                                     first.num_episodes + fb[partner[c] + 1]))
        episodes += own + more
        context += [c] * (len(own) + len(more))
    g = np.asarray(episodes, dtype=np.int64)
    per_episode = {k: np.concatenate([getattr(first, k), getattr(second, k)])[g]
                   for k in ("length", "returns", "terminated", "truncated", "final_obs")}
    starts = np.concatenate([first.start, second.start + first.obs.shape[0]])[g]
    take = (np.concatenate([np.arange(s, s + n_) for s, n_ in zip(starts, per_episode["length"])])
            if g.size else np.zeros(0, dtype=np.int64))
    steps = {k: np.concatenate([getattr(first, k), getattr(second, k)])[take] for k in ("obs", "actions", "rewards")}
    start = np.concatenate([[0], np.cumsum(per_episode["length"])[:-1]]).astype(np.int64)
    return EpisodeLog(**steps, **per_episode, map_id=np.asarray(context, dtype=np.int32), start=start), take


def relabel_observations(log: EpisodeLog, contexts: int, rng, fraction: float, max_obs: int) -> EpisodeLog:
    """``log`` with the observation numbers of each context (``map_id``) renamed, with probability ``fraction``, by
    its own random permutation of ``0 .. max_obs - 1`` (``obs`` and ``final_obs``; -1 stays -1). Actions, rewards
    and episode ends are unchanged, so the teacher's labels still hold: a renamed map is the same map under other
    names, which a model can only learn from the context."""
    names = np.tile(np.arange(max_obs, dtype=np.int64), (contexts, 1))
    for c in np.flatnonzero(rng.random(contexts) < fraction):
        names[c] = rng.permutation(max_obs)
    return rename_observations(log, names)


def widen_observations(log: EpisodeLog, maps: MapBatch, rng, fraction: float, widest: int) -> EpisodeLog:
    """``log`` (of ``maps``: map ``b`` = ``map_id``, ``ncol[b]`` columns) with, for a fraction of its maps, every
    observation ``r * ncol + c`` numbered ``r * w + c`` as if the map sat in the corner of a grid ``w`` columns
    wide (``w`` drawn from ``ncol + 1 .. widest``; the extra columns are never reached). Same map, same moves, same
    labels: only the numbers' row stride changes, which is what an observation number means on a wider map."""
    ncol = maps.ncol.astype(np.int64)
    stride = ncol.copy()  # a map's own width: its cells as they are
    for b in np.flatnonzero(rng.random(len(maps)) < fraction):
        stride[b] = int(rng.integers(ncol[b] + 1, widest + 1)) if ncol[b] < widest else int(ncol[b])
    return rename_observations(log, names_on_grid(maps, stride))


def shift_observations(log: EpisodeLog, maps: MapBatch, rng, fraction: float, fmt: StepFormat) -> EpisodeLog:
    """``log`` (of ``maps``) with observation ``r * ncol + c`` named ``(r + dr) * grid + c + dc``: the map placed on
    grid format ``fmt``'s grid (``grid`` columns, ``max_obs`` cells), at offset ``(dr, dc)`` drawn uniformly among
    those where it fits for a fraction of the maps, at ``(0, 0)`` (``observation_names``) for the others. Same map,
    same moves, same row stride, same labels: only where on the grid its cells are named changes."""
    grid, ncol, nrow = fmt.grid, maps.ncol.astype(np.int64), maps.nrow.astype(np.int64)
    offset = np.zeros(len(maps), dtype=np.int64)
    for b in np.flatnonzero(rng.random(len(maps)) < fraction):
        dr = int(rng.integers(0, fmt.max_obs // grid - nrow[b] + 1))
        dc = int(rng.integers(0, grid - ncol[b] + 1))
        offset[b] = dr * grid + dc
    return rename_observations(log, observation_names(fmt, maps) + offset[:, None])


def outcome_mask(fmt: ContextFormat, input_ids: np.ndarray, decision_mask: np.ndarray,
                 length: np.ndarray) -> np.ndarray:
    """bool ``[B, L]``: positions from an action token up to (not including) the next decision, whose next token is
    a real one -- where the observation loss predicts the environment's answer (compact format: the token after
    the action; paper format: the reward and observation runs up to the next decision)."""
    if isinstance(fmt, StepFormat):  # the answer to a decision's action is its next token
        return decision_mask.copy()
    is_action = np.isin(input_ids, fmt.action_ids)
    event = np.where(is_action, 1, np.where(decision_mask, -1, 0))
    idx = np.where(event != 0, np.arange(event.shape[1])[None, :], 0)
    np.maximum.accumulate(idx, axis=1, out=idx)
    filled = np.take_along_axis(event, idx, axis=1)
    return (filled == 1) & (np.arange(event.shape[1])[None, :] < (length[:, None] - 1))


def decision_spacing(fmt: ContextFormat) -> int:
    """The fewest tokens between two decisions of one slice in ``fmt``: 1 in a step format (a landing is the next
    decision), else the action, what follows it and the next observation up to its decision token."""
    if isinstance(fmt, StepFormat):
        return 1
    return 1 + len(fmt.post_action) + len(fmt.pre_obs) + int(fmt.obs_len.min()) + len(fmt.post_obs)


def with_transitions(batch: dict[str, np.ndarray], fmt: ContextFormat, memory=None) -> dict[str, np.ndarray]:
    """``batch`` (the token contract, ``[B, L]``) with its padded TD transitions (``padded_transitions`` at
    ``transition_capacity(B, L, decision_spacing(fmt))``) and, given a ``SameStateMemory``, its features
    ``memory``."""
    rows, width = batch["input_ids"].shape
    batch.update(padded_transitions(batch["decision_mask"], batch["action"], batch["episode_id"],
                                    batch["episode_return"], transition_capacity(rows, width, decision_spacing(fmt))))
    if memory is not None:
        batch["memory"] = memory.features(batch["input_ids"])
    return batch


class ProtocolSource:
    """Batches of protocol contexts, a pure function of ``(seed, step, micro-batch, rank)``: a resumed run draws the
    same batches. The ``bucket`` micro-batches of one chunk are played together and grouped by length."""

    def __init__(self, cfg: ProtocolConfig, fmt: ContextFormat, test_maps: MapBatch, *, seed: int,
                 height=(3, 5), width=(3, 5), min_hops: int = 4, grad_accum: int = 1, rank_key: tuple = (),
                 engine=None, progress: bool = False, memory=None):
        """``grad_accum``: micro-batches per optimizer step; ``rank_key``: this process's key under torchrun (each
        process plays its own maps); ``engine``: the model's ``RolloutEngine``, for DAgger chunks; ``memory``: the
        model's ``SameStateMemory``, whose features every batch then carries."""
        cfg.validate()
        self.cfg, self.fmt, self.seed = cfg, fmt, seed
        self.grad_accum, self.rank_key = grad_accum, tuple(rank_key)
        self.engine, self.memory = engine, memory
        self.dagger_success: list[float] = []  # success rate of each model-played chunk (logged by the trainer)
        pool = generate_maps(cfg.pool_maps, seed=seed + 101, height=height, width=width, min_hops=min_hops)
        self.pool = exclude_maps(pool, test_maps)
        observation_names(fmt, self.pool)  # a grid format that cannot number the pool's maps: a clear error now
        if cfg.shift > 0 and getattr(fmt, "grid", None) is None:
            raise ValueError(f"protocol shift places maps on the grid of a grid format (--data.format step-grid); "
                             f"format {fmt.name} has none")
        if cfg.widen > 0 and getattr(fmt, "grid", None) is not None:
            raise ValueError(f"protocol widen renumbers maps on wider grids; format {fmt.name} numbers every map on "
                             f"one grid already")
        if cfg.widen > 0 and int(self.pool.nrow.max()) * cfg.widen_to > fmt.max_obs:
            raise ValueError(f"protocol widen_to {cfg.widen_to}: maps of {int(self.pool.nrow.max())} rows would need "
                             f"observation numbers beyond the format's {fmt.max_obs}")
        self.p_teacher = cfg.p_teacher()
        self.least_tried = cfg.teacher == "least-tried"
        self.forget = cfg.forget and cfg.behaviour == "teacher"  # the teacher's rule: nothing else forgets
        self.pad = pad_token(fmt)
        self._chunk: tuple[tuple, list[dict]] | None = None
        self.make_chunk = self._make_chunk  # key -> the chunk's micro-batches (a prefetcher puts its own here)
        if progress:
            print(f"protocol source: {len(self.pool)} training maps ({cfg.pool_maps - len(self.pool)} equal to a test "
                  f"map removed), {cfg.episodes} episodes per context, ramp {cfg.ramp}")

    def batch(self, step: int, micro: int = 0, pos: dict | None = None) -> dict[str, np.ndarray]:
        """Micro-batch ``micro`` of optimizer step ``step`` (numpy arrays, ``[contexts, L]``); ``pos`` is unused (the
        batch is a function of the step)."""
        chunk, i = divmod(step * self.grad_accum + micro, self.cfg.bucket)
        key = (chunk, *self.rank_key)
        if self._chunk is None or self._chunk[0] != key:
            self._chunk = (key, self.make_chunk(key))
        return self._chunk[1][i]

    def is_dagger(self, chunk: int) -> bool:
        """Chunk ``chunk`` is played by the model (spread evenly: ``dagger`` of all chunks)."""
        f = self.cfg.dagger
        return f > 0 and int((chunk + 1) * f) > int(chunk * f)

    def _make_chunk(self, key: tuple) -> list[dict]:
        cfg, fmt = self.cfg, self.fmt
        n = cfg.contexts * cfg.bucket
        rng = np.random.default_rng([self.seed, 6, *key])
        maps = self._draw_maps(rng, n)
        seed = int(np.random.SeedSequence([self.seed, 7, *key]).generate_state(1)[0])
        if cfg.behaviour == "self" or self.is_dagger(key[0]):
            if self.engine is None:
                raise ValueError("protocol dagger > 0 or behaviour self needs the model's rollout engine "
                                 "(ProtocolSource(engine=...))")
            was_training = self.engine.qnet.training
            self.engine.qnet.eval()
            try:
                played = self.engine.run(maps, cfg.episodes, self.p_teacher, seed)
            finally:
                self.engine.qnet.train(was_training)
            log = contexts_log(fmt, played.tokens)
            labels = (teacher_labels(log, fmt.max_obs, self.least_tried, self.forget) if cfg.behaviour == "teacher"
                      else np.zeros(log.obs.shape[0], dtype=np.uint8))
            self.dagger_success.append(float(played.success.mean()))
        else:
            log, labels = self._play(maps, seed)
            log = self._number(log, maps, key, 0)
            if cfg.switch > 0:
                log, labels = self._switch(log, labels, rng, key)
        # Renaming comes after play (a DAgger chunk is renamed after the model played it under the real names; its
        # labels stay right, the teacher being blind to names). Its own stream: relabel 0 leaves every draw alone.
        if cfg.relabel > 0:
            rename = np.random.default_rng([self.seed, 9, *key])
            log = relabel_observations(log, n, rename, cfg.relabel, fmt.max_obs)
        ids, ep_of_token = encode_episodes(fmt, log, np.arange(log.num_episodes))
        first_ep = np.searchsorted(log.map_id, np.arange(n + 1))  # context b's: first_ep[b] .. first_ep[b+1]
        tok_start = np.searchsorted(ep_of_token, first_ep)  # episode indices per token are in play order
        step_start = np.append(log.start, log.obs.shape[0])[first_ep]
        contexts = []
        for b in range(n):
            row = ids[tok_start[b]: tok_start[b + 1]][: cfg.max_len]
            ep = ep_of_token[tok_start[b]: tok_start[b + 1]][: cfg.max_len]
            contexts.append((row, ep, labels[step_start[b]: step_start[b + 1]]))
        order = np.argsort([len(c[0]) for c in contexts], kind="stable")  # group similar lengths
        groups = [order[g * cfg.contexts: (g + 1) * cfg.contexts] for g in range(cfg.bucket)]
        perm = rng.permutation(cfg.bucket)  # do not feed short contexts first, long ones last
        return [self._collate([contexts[j] for j in groups[g]], log) for g in perm]

    def _play(self, maps: MapBatch, seed: int) -> tuple[EpisodeLog, np.ndarray]:
        """The protocol on ``maps`` played by the behaviour (teacher or q-learning) beside the ramp's random actions:
        the log and the per-step labels (the teacher's choices; all zero without a teacher)."""
        if self.cfg.behaviour == "q-learning":
            log = q_learning_protocol(maps, self.p_teacher, seed=seed)
            return log, np.zeros(log.obs.shape[0], dtype=np.uint8)
        return play_protocol(maps, self.p_teacher, seed=seed, least_tried=self.least_tried, forget=self.forget)

    def _draw_maps(self, rng, n: int) -> MapBatch:
        """``n`` pool maps (with replacement only when the pool is smaller than ``n``)."""
        return self.pool[rng.choice(len(self.pool), size=n, replace=len(self.pool) < n)]

    def _number(self, log: EpisodeLog, maps: MapBatch, key: tuple, part: int) -> EpisodeLog:
        """The teacher-played maps of a chunk (``part`` 0, or 1: the maps switched to) numbered as the format shows
        them (``grid_numbered``), or placed on its grid by ``shift_observations``, or ``widen_observations``: each
        from its own stream (shift 0 and widen 0 change no draw)."""
        if self.cfg.shift > 0:
            rng = np.random.default_rng([self.seed, 11, part, *key])
            return shift_observations(log, maps, rng, self.cfg.shift, self.fmt)
        log = grid_numbered(self.fmt, log, maps)
        if self.cfg.widen <= 0:
            return log
        rng = np.random.default_rng([self.seed, 10, part, *key])
        return widen_observations(log, maps, rng, self.cfg.widen, self.cfg.widen_to)

    def _switch(self, log: EpisodeLog, labels: np.ndarray, rng, key: tuple) -> tuple[EpisodeLog, np.ndarray]:
        """Each context goes on with probability ``switch`` on a fresh pool map, played from scratch (the teacher
        knows nothing of the first map). Its labels: without ``forget``, the fresh teacher's (what to do given the
        context since the switch, which the context does not mark); with it, the forgetting teacher's read from the
        whole context as shown (it keeps the first map's knowledge until a surprise tells it the map changed)."""
        n = self.cfg.contexts * self.cfg.bucket
        switched = np.flatnonzero(rng.random(n) < self.cfg.switch)
        if switched.size == 0:
            return log, labels
        maps_b = self._draw_maps(rng, switched.size)
        seed_b = int(np.random.SeedSequence([self.seed, 8, *key]).generate_state(1)[0])
        log_b, labels_b = self._play(maps_b, seed_b)
        log_b = self._number(log_b, maps_b, key, 1)
        partner = np.full(n, -1)
        partner[switched] = np.arange(switched.size)
        log, take = append_contexts(log, log_b, partner)
        if self.forget:
            return log, teacher_labels(log, self.fmt.max_obs, self.least_tried, forget=True)
        return log, np.concatenate([labels, labels_b])[take]

    def _collate(self, contexts: list, log) -> dict[str, np.ndarray]:
        fmt = self.fmt
        length = np.array([len(c[0]) for c in contexts])
        width = int(length.max())
        if self.cfg.length_bucket:  # a few static shapes: round up to the bucket
            width = -(-width // self.cfg.length_bucket) * self.cfg.length_bucket
        ids = np.full((len(contexts), width), self.pad, dtype=np.int32)
        ep = np.full((len(contexts), width), -1, dtype=np.int64)
        for r, (row, e, _) in enumerate(contexts):
            ids[r, : len(row)] = row
            ep[r, : len(row)] = e
        mask, action = token_contract(fmt, ids)
        label = np.zeros(ids.shape, dtype=np.uint8)
        for r, (_, _, lab) in enumerate(contexts):
            pos = np.flatnonzero(mask[r])
            label[r, pos] = lab[: pos.size]  # decisions are the steps, in order (a cut context keeps a prefix)
        real = ep >= 0
        safe = np.where(real, ep, 0)
        batch = {"input_ids": ids, "decision_mask": mask, "action": action, "episode_id": np.where(real, ep, -1),
                 "episode_return": np.where(real, log.returns[safe], 0.0).astype(np.float32),
                 "terminated": real & log.terminated[safe], "truncated": real & log.truncated[safe],
                 "label": label, "outcome_mask": outcome_mask(fmt, ids, mask, length), "length": length}
        return with_transitions(batch, fmt, self.memory)


class OfflineSource:
    """The paper's source: slices of a built dataset in a per-epoch permutation seeded by ``(seed, epoch)``. Its
    position (``epoch``, ``cursor``) lives in the run's state, so a resumed run continues the same permutation; under
    torchrun each process takes its share of every batch."""

    def __init__(self, ds, batch_slices: int, seed: int, world):
        self.ds, self.batch_slices, self.seed, self.world = ds, batch_slices, seed, world

    def batch(self, step: int, micro: int, pos: dict) -> dict[str, np.ndarray]:
        """The next slices; advances ``pos`` (committed by the caller with the optimizer step)."""
        idx = batch_indices(len(self.ds), pos, self.batch_slices, self.seed)
        return with_transitions(self.ds.contract(self.world.shard(idx)), self.ds.format)


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


class ReplaySource:
    """Online mode: slices sampled from the replay of the network's own rollouts, keyed by ``(seed, step, micro,
    rank)``; each process samples its share of the global batch from its own replay."""

    def __init__(self, replay, batch_slices: int, seed: int, world):
        self.replay, self.batch_slices, self.seed, self.world = replay, batch_slices, seed, world

    def batch(self, step: int, micro: int, pos: dict) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 4, step, micro, *self.world.key()])
        return with_transitions(self.replay.sample(self.batch_slices // self.world.size, rng), self.replay.fmt)
