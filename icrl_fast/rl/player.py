"""The device-resident context player: rollouts of a step-format model as one fixed-shape step, no host read per step.

``ContextPlayer.play`` plays ``episodes`` episodes on each of ``M`` maps, one growing context per map, in the step
formats (``StepFormat``: one token per env step; the default's ``step-grid``), with or without the same-state memory
head, through ``W`` cache rows. Everything a step does is a tensor op on the model's device (``_step``):

1. the model reads each row's new block ``[W, 2]`` (the landing, and the next ``START`` when an episode ended or
   a row took a new map; padding otherwise) through ``decode_step`` over a ``StaticKVCache``, Q at the last column;
2. exploration (greedy with probability ``p_model[episode]``, else a uniform action): ``draws="per-map"`` from
   each map's counter-based stream ``(seed ^ salt, map)`` (``RolloutEngine.collect``'s: a map's episodes then
   depend on ``(seed, map)`` alone, not on ``W`` or the schedule), ``draws="lockstep"`` from the host generator
   ``RolloutEngine.run`` uses (drawn ``sync_every`` steps ahead and uploaded, never read back);
3. the env step (``TorchFrozenLake``: the Numba env's dynamics and streams), the landing token, the same-state
   memory's counts (and forgetting at a surprise) and the features of the next block, per row;
4. continuous batching with refill: a row whose map played its episodes restarts in place (cache length 0, counts
   emptied, env reseeded to the next map's stream ``(seed, map)``) on the next map, until the maps run out; with
   ``width >= M`` it is the lockstep loop (``run``), where a context may also switch maps (``switch_to``).

What each step plays is written to per-map tapes on the device (tokens, env observations, Q) and turned into a
``Rollout`` once, at the end. The host reads one small tensor every ``sync_every`` steps (any row busy, the longest
context, episodes done: to stop, to grow the cache and tapes ahead of the contexts, and for the progress bar).

Equality (tests/rl/test_player.py): with per-map draws the player equals ``RolloutEngine.collect`` for every width,
with lockstep draws ``RolloutEngine.run`` (switches included): contexts, decisions and outcomes bit-equal, Q within
1e-5. ``RolloutEngine`` plays step formats through it (``RolloutEngine.player``).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from tqdm import tqdm

from icrl_fast.data.step_format import KINDS, START0, TYPE_START, StepFormat, observation_names
from icrl_fast.envs.maps import MapBatch
from icrl_fast.envs.outcomes import ENDED_REWARDED, ENDED_UNREWARDED, MOVED, STAYED
from icrl_fast.envs.rng import as_seed
from icrl_fast.envs.torch_frozen_lake import MapTables, TorchFrozenLake, _shr, next_u64, next_uniform, stream_state
from icrl_fast.model.decode_step import StaticKVCache, decode_step, sdpa_decode_attention, triton_decode_attention
from icrl_fast.model.same_state_memory import MEMORY_DIM
from icrl_fast.rl.rollout_result import Rollout

EXPLORE_SALT = 0x6A09E667F3BCC908  # RolloutEngine.collect's: exploration streams apart from the env streams
_KIND_MOVE, _KIND_GOAL, _KIND_HOLE, _KIND_CUT = (KINDS.index(k) for k in ("move", "goal", "hole", "cut"))
DRAWS = ("per-map", "lockstep")
VIEW_BUCKET = 128  # attention reads a multiple of this many cache slots (few distinct shapes for a compiled step)


def default_attention(device) -> callable:
    """The Triton ragged kernel on CUDA (it reads each row's slots up to its own length), else torch's fused SDPA
    over the masked slots (``sdpa_decode_attention``)."""
    return triton_decode_attention if torch.device(device).type == "cuda" else sdpa_decode_attention


def switch_env_maps(maps: MapBatch, episodes: int, switch_to: MapBatch | None, switch_after: int | None) -> MapBatch:
    """The envs a lockstep rollout steps: ``maps``, then (a switch of map after episode ``switch_after``) context
    ``b``'s second map ``switch_to[b]`` as env ``b + len(maps)``. ``ValueError`` on a switch that does not fit."""
    if switch_to is None:
        return maps
    m = len(maps)
    if len(switch_to) != m or switch_after is None or not 0 < switch_after < episodes:
        raise ValueError("switch_to needs one map per context and 0 < switch_after < episodes")
    return MapBatch.from_descs([maps.to_desc(b) for b in range(m)] + [switch_to.to_desc(b) for b in range(m)])


class _State:
    """The player's device tensors (every one ``[W, ...]`` per row unless noted)."""


class ContextPlayer:
    """Plays step-format contexts on the model's device (see the module docstring).

    ``qnet``: a from-scratch ``QNetwork`` built for ``fmt`` (a pretrained model plays the text formats, on the host
    loop). ``max_positions``: a context longer than this is a ``ValueError`` (checked every ``sync_every`` steps).
    ``compile``: run the step through ``torch.compile(fullgraph=True, dynamic=False)`` (``True``: inductor, or a
    backend's name); the rows still playing are then kept in power-of-two widths (few shapes to compile).
    ``attention``: the decode attention (default: ``default_attention(device)``). ``graph``: on CUDA, capture the
    step in a CUDA graph and replay it (re-captured when the rows are narrowed or the cache grows; attention then
    reads the whole cache, which the ragged kernel does in O(length) anyway); elsewhere, or if a capture fails,
    the step runs eagerly (a warning says so)."""

    def __init__(self, qnet, fmt: StepFormat, *, device="cpu", max_positions: int | None = None,
                 sync_every: int = 32, compile: bool | str = False, attention=None, initial_capacity: int = 256,
                 graph: bool = False):
        if not isinstance(fmt, StepFormat):
            raise ValueError(f"the context player plays the step formats (step, step-grid, step-noend); format "  # noqa: TRY004
                             f"{getattr(fmt, 'name', fmt)!r} plays on RolloutEngine's host loop")
        if getattr(qnet, "pretrained", False):
            raise ValueError("the context player runs a from-scratch model (the step formats' factored tokens)")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.qnet, self.fmt, self.device = qnet, fmt, torch.device(device)
        self.max_positions, self.sync_every = max_positions, sync_every
        self.attention = attention or default_attention(self.device)
        self.initial_capacity = initial_capacity
        memory = getattr(qnet, "memory", None)
        self.memory, self.forget = memory is not None, bool(memory is not None and memory.forget)
        self.compiled = bool(compile)
        if compile:  # a backend name (e.g. "aot_eager") or True: inductor
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            backend = compile if isinstance(compile, str) else "inductor"
            self.step_fn = torch.compile(self._step, fullgraph=True, dynamic=False, backend=backend)
        else:
            self.step_fn = self._step
        self.graph = bool(graph)
        if self.graph and self.device.type != "cuda":
            warnings.warn(f"CUDA graphs need a CUDA device: the player's step runs eagerly on {self.device}",
                          stacklevel=2)
            self.graph = False
        self.steps = 0  # steps of the last play

    # -- the step -------------------------------------------------------------------------------------------------
    def _features(self, s: _State, cell: torch.Tensor) -> torch.Tensor:
        """The same-state memory's features ``[W, 32]`` of each row's decision on ``cell`` (a format cell name)."""
        rows = s.rows
        count = s.count[rows, cell].float()  # [W, 4, 4]
        latest = s.latest[rows, cell]  # [W, 4]
        onehot = (latest[..., None] == torch.arange(4, device=cell.device)) & (latest[..., None] >= 0)
        return torch.cat((torch.log1p(count).flatten(1), onehot.float().flatten(1)), dim=1)

    @staticmethod
    def _forget(s: _State, rows: torch.Tensor) -> None:
        """Empty the same-state memory of ``rows`` (a bool mask): its counts, latest and known outcomes."""
        keep = ~rows
        s.count.mul_(keep.view(-1, 1, 1, 1).int())
        s.latest.copy_(torch.where(keep.view(-1, 1, 1), s.latest, -1))
        s.known.copy_(torch.where(keep.view(-1, 1, 1), s.known, -1))

    def _step(self, s: _State) -> None:
        fmt, episodes = self.fmt, s.episodes
        q = decode_step(self.qnet, s.cache, s.ids, s.valid, s.mem if self.memory else None, self.attention,
                        view=s.view)
        busy = s.busy
        tgt = torch.where(busy, s.map_id, torch.full_like(s.map_id, s.maps))  # tape row (maps: the spare one)
        if s.record:
            s.q_tape.index_put_((tgt, s.n_dec), q)
        s.n_dec.add_(busy.long())
        # exploration
        ep = s.episode.clamp(max=episodes - 1)
        if s.lockstep:  # this step's draws of each row's context
            u = s.draw_u.index_select(0, s.k)[0][s.map_id]
            rand = s.draw_a.index_select(0, s.k)[0][s.map_id]
            s.k.add_(1)
        else:
            state, u = next_uniform(s.explore)
            state, z = next_u64(state)
            s.explore.copy_(state)
            rand = _shr(z, 62)
        explore = u >= s.p_model[ep]
        actions = torch.where(explore, rand, q.argmax(-1))
        # the env
        env_actions = torch.zeros_like(s.env.rng).index_put_((s.which,), actions)
        o, reward, term, trunc, landed, _tile = (x[s.which] for x in s.env.step(env_actions))
        ended = term | trunc
        goal = ended & (reward != 0)
        kind = torch.where(~ended, _KIND_MOVE, torch.where(goal, _KIND_GOAL, torch.where(trunc & ~term, _KIND_CUT,
                                                                                        _KIND_HOLE)))
        slot_map = s.env.map_of[s.which]
        landed_name = s.names[slot_map, landed]
        shown = landed_name if fmt.show_end else torch.where(kind == _KIND_MOVE, landed_name, 0)
        land = fmt.land0 + (actions * len(KINDS) + kind) * fmt.max_obs + shown
        # the same-state memory reads the landing (the answer to the decision on s.cell)
        if self.memory:
            c = torch.where(kind == _KIND_GOAL, ENDED_REWARDED, torch.where(kind == _KIND_HOLE, ENDED_UNREWARDED,
                                                                           torch.where(shown == s.cell, STAYED, MOVED)))
            sa = s.cell * 4 + actions
            known = s.known.view(len(busy), -1)
            if self.forget:
                old = known.gather(1, sa[:, None])[:, 0]
                check = busy & (kind != _KIND_CUT)
                self._forget(s, check & (old >= 0) & (old != c))  # a surprise
                # (a row not checked was not emptied: its entry is still ``old``)
                known.scatter_(1, sa[:, None], torch.where(check, c, old).to(known.dtype)[:, None])
            s.count.view(len(busy), -1).scatter_add_(1, (sa * 4 + c)[:, None], busy.int()[:, None])
            latest = s.latest.view(len(busy), -1)
            latest.scatter_(1, sa[:, None], torch.where(busy, c, latest.gather(1, sa[:, None])[:, 0]).to(
                latest.dtype)[:, None])
            land_feat = self._features(s, shown) * (kind == _KIND_MOVE)[:, None]
        # the tapes: the landing goes to this map's context
        if s.record:
            s.tok_tape.index_put_((tgt, s.n_tok), land.int())
            s.obs_tape.index_put_((tgt, s.n_tok), landed.int())
        s.n_tok.add_(busy.long())
        ep_end = busy & ended
        s.episode.add_(ep_end.long())
        s.out_tape.index_put_((tgt, ep), torch.where(
            ep_end, kind, s.out_tape[tgt, ep]).to(s.out_tape.dtype))
        s.len_tape.index_put_((tgt, ep), busy.long(), accumulate=True)
        finished = ep_end & (s.episode >= episodes)
        more = ep_end & ~finished
        # a switch of map (lockstep): the next episode plays on env slot which + maps
        if s.switch_after is not None:
            sw = ep_end & (s.episode == s.switch_after) & more
            s.which.copy_(torch.where(sw, s.which + s.maps, s.which))
            slot_mask = torch.zeros_like(s.env.rng, dtype=torch.bool).index_put_((s.which,), sw)
            o = torch.where(sw, s.env.start(slot_mask)[s.which], o)
        # continuous batching: a finished row takes the next map
        fresh = torch.zeros_like(finished)
        if s.refill:
            rank = finished.long().cumsum(0) - 1
            new_map = s.next_map + rank
            fresh = finished & (new_map < s.maps)
            s.map_id.copy_(torch.where(fresh, new_map, s.map_id))
            s.next_map.add_(finished.long().sum())
            o = torch.where(fresh, s.env.start(fresh, maps=new_map.clamp(max=s.maps - 1), seed=s.seed,
                                               stream=new_map)[s.which], o)
            s.explore.copy_(torch.where(fresh, stream_state(s.explore_seed, new_map), s.explore))
            s.cache.restart(fresh)
            for t in (s.episode, s.n_dec, s.n_tok):
                t.copy_(torch.where(fresh, 0, t))
            if self.memory:
                self._forget(s, fresh)
        s.busy.copy_(busy & ~finished | fresh)
        # the next block: [pad, LAND] (a move), [LAND, START] (a new episode), [pad, START] (a new map)
        start_name = s.names[s.env.map_of[s.which], o]
        start = START0 + start_name
        opens = more | fresh
        tgt2 = torch.where(opens, s.map_id, s.maps)
        if s.record:
            s.tok_tape.index_put_((tgt2, s.n_tok), start.int())
            s.obs_tape.index_put_((tgt2, s.n_tok), o.int())
        s.n_tok.add_(opens.long())
        pad = torch.full_like(land, fmt.pad_id)
        s.ids.copy_(torch.stack((torch.where(more, land, pad), torch.where(opens, start, land)), 1))
        s.valid.copy_(torch.stack((more, s.busy), 1))
        s.cell.copy_(torch.where(opens, start_name, shown))
        if self.memory:
            start_feat = self._features(s, start_name)
            second = torch.where(opens[:, None], start_feat, land_feat)
            first = torch.where(more[:, None], land_feat, 0.0)
            s.mem.copy_(torch.stack((first, second), 1))

    # -- the loop -------------------------------------------------------------------------------------------------
    def play(self, maps: MapBatch, episodes: int, p_model, seed: int, *, width: int | None = None,
             draws: str = "per-map", is_slippery: bool = False, switch_to: MapBatch | None = None,
             switch_after: int | None = None, progress: bool = False, record: bool = True,
             prefix: list[list[int]] | None = None) -> Rollout:
        """Play (see the module docstring). ``width``: cache rows (default and with ``draws="lockstep"``: one per map).
        ``p_model``: greedy probability per episode (a scalar: every episode). ``switch_to``/``switch_after``
        (lockstep only): after episode ``switch_after`` context ``b`` goes on on map ``switch_to[b]``.
        ``record=False``: keep only the outcomes (``tokens``, ``q``, ... empty; a benchmark's mode). ``prefix``
        (lockstep only): tokens put before each context's first episode (their ``token_episode`` is -1), read in
        one prefill call before the first step."""
        s = self.start(maps, episodes, p_model, seed, width=width, draws=draws, is_slippery=is_slippery,
                       switch_to=switch_to, switch_after=switch_after, record=record, prefix=prefix)
        m, dev = s.maps, self.device
        rng = np.random.default_rng(seed) if s.lockstep else None
        bound, steps, done = int(s.prefix_lens.max()) + 1, 0, 0
        bar = tqdm(total=m * episodes, desc="play", unit="episode", leave=False, disable=not progress)
        with torch.no_grad():
            while True:
                if s.lockstep:  # RolloutEngine.run's draws: random(m), then integers(0, 4, m), per step
                    self.upload_draws(s, rng)
                for _ in range(self.sync_every):
                    if bound + 2 > s.cache.capacity:  # grow ahead of the longest context (host-side bound)
                        self._grow(s, 2 * s.cache.capacity)
                    # attention reads the slots up to a bucket above the longest context's bound (static shapes)
                    s.view = min(s.cache.capacity, -(-(bound + 2) // VIEW_BUCKET) * VIEW_BUCKET)
                    if self.graph:
                        self._graph_step(s)
                    else:
                        self.step_fn(s)
                    bound += 2
                    steps += 1
                read = torch.cat((s.cache.lengths.max()[None], (s.out_tape[:m] >= 0).sum()[None], s.busy.long()))
                longest, finished, *rows_busy = read.cpu().tolist()  # the one read of a sync window
                busy = any(rows_busy)
                bound = longest
                if busy and not all(rows_busy):  # drop the rows that have nothing left to play
                    keep = np.flatnonzero(rows_busy)
                    if self.compiled:  # a power-of-two width (idle rows fill it): few shapes to compile
                        width = 1 << int(np.ceil(np.log2(len(keep))))
                        keep = np.sort(np.concatenate((keep, np.flatnonzero(~np.asarray(rows_busy, bool))[
                            : width - len(keep)])))
                    if len(keep) < len(rows_busy):
                        self._keep(s, torch.tensor(keep, device=dev))
                bar.update(finished - done)
                done = finished
                if self.max_positions is not None and longest > self.max_positions:
                    raise ValueError(f"a context reached {longest} tokens, more than the model's "
                                     f"{self.max_positions} positions: raise the model's max_positions")
                if not busy:
                    break
        bar.close()
        self.steps = steps
        return self._result(s)

    def upload_draws(self, s: _State, rng: np.random.Generator) -> None:
        """The next ``sync_every`` steps' lockstep draws (``RolloutEngine.run``'s ``random(m)``, then ``integers(0,
        4, m)``, per step), uploaded (a host-to-device copy, never a read back)."""
        m = s.maps
        u = np.empty((self.sync_every, m))
        a = np.empty((self.sync_every, m), dtype=np.int64)
        for k in range(self.sync_every):
            u[k], a[k] = rng.random(m), rng.integers(0, 4, m)
        u, a = torch.as_tensor(u, device=self.device), torch.as_tensor(a, device=self.device)
        if getattr(s, "draw_u", None) is not None and s.draw_u.shape == u.shape:  # in place: a captured step reads them
            s.draw_u.copy_(u)
            s.draw_a.copy_(a)
        else:
            s.draw_u, s.draw_a = u, a
        s.k.zero_()

    def _graph_step(self, s: _State) -> None:
        """One step through a CUDA graph of ``step_fn``, captured (after one eager warm-up step on a side stream,
        which is this call's step) whenever the rows or the cache changed shape; the eager step if a capture fails."""
        s.view = s.cache.capacity
        key = (len(s.busy), s.cache.capacity)
        if getattr(s, "graph_key", None) == key:
            s.cuda_graph.replay()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step_fn(s)  # the warm-up is a real step
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step_fn(s)  # recorded, not run
        except RuntimeError as e:
            warnings.warn(f"the player's step could not be captured in a CUDA graph ({e}); it runs eagerly",
                          stacklevel=2)
            self.graph = False
            return
        s.cuda_graph, s.graph_key = graph, key

    def start(self, maps: MapBatch, episodes: int, p_model, seed: int, *, width: int | None = None,
              draws: str = "per-map", is_slippery: bool = False, switch_to: MapBatch | None = None,
              switch_after: int | None = None, record: bool = True, prefix: list[list[int]] | None = None) -> _State:
        """The state of a play before its first step (``play``'s arguments): every row's first block is ready
        (after the prefix's prefill, when there is one)."""
        m = len(maps)
        if prefix is not None and (draws != "lockstep" or len(prefix) != m):
            raise ValueError(f"a prefix plays in lockstep (draws='lockstep') with one token list per map ({m})")
        width = m if width is None else int(width)
        if draws not in DRAWS:
            raise ValueError(f"draws must be one of {DRAWS}, got {draws!r}")
        if width < 1 or episodes < 1 or m < 1:
            raise ValueError(f"need width >= 1, episodes >= 1 and at least one map, got {width}, {episodes}, {m}")
        lockstep = draws == "lockstep"
        if lockstep and width < m:
            raise ValueError("lockstep draws (RolloutEngine.run's) play every map at once: width must be >= maps")
        width = min(width, m)
        if switch_to is not None and not lockstep:
            raise ValueError("a switch of map plays in lockstep (draws='lockstep')")
        env_maps = switch_env_maps(maps, episodes, switch_to, switch_after)
        dev, fmt = self.device, self.fmt
        seed_u = int(as_seed(seed))
        p_model = np.broadcast_to(np.asarray(p_model, dtype=np.float64), (episodes,))
        s = _State()
        s.maps, s.episodes, s.seed, s.record = m, episodes, seed_u, record
        s.lockstep, s.refill = lockstep, not lockstep and width < m
        s.switch_after = switch_after if switch_to is not None else None
        s.explore_seed = seed_u ^ EXPLORE_SALT
        s.rows = torch.arange(width, device=dev)
        s.p_model = torch.tensor(p_model, device=dev)
        names = observation_names(fmt, env_maps)
        cells = int(env_maps.num_cells.max())
        if names is None:
            if cells > fmt.max_obs:
                raise ValueError(f"a map has {cells} cells, more than format {fmt.name}'s {fmt.max_obs} (max_obs)")
            names = np.tile(np.arange(cells), (len(env_maps), 1))
        # (observation_names refuses a map that does not fit; the names of cells beyond a map's own are never used)
        s.names = torch.as_tensor(np.minimum(names, fmt.max_obs - 1), dtype=torch.long, device=dev)
        # env slots: lockstep steps every env of RolloutEngine.run (a switch's maps included, from the start); per-map
        # draws one slot per row, reseeded to (seed, map) when the row takes a map
        slots = len(env_maps) if lockstep else width
        s.env = TorchFrozenLake(MapTables(env_maps, dev), slots, is_slippery=is_slippery)
        ids0 = torch.arange(slots, device=dev)
        s.env.start(torch.ones(slots, dtype=torch.bool, device=dev), maps=ids0, seed=seed_u, stream=ids0)
        s.which = torch.arange(width, device=dev)
        s.map_id = torch.arange(width, device=dev)
        s.next_map = torch.tensor(width, device=dev)
        s.busy = torch.ones(width, dtype=torch.bool, device=dev)
        z = torch.zeros(width, dtype=torch.long, device=dev)
        s.episode, s.n_dec, s.n_tok = z.clone(), z.clone(), z.clone()
        s.explore = stream_state(s.explore_seed, s.map_id)
        s.k = torch.zeros(1, dtype=torch.long, device=dev)
        o = s.env.obs()[s.which]
        start_name = s.names[s.env.map_of[s.which], o]
        s.cell = start_name.clone()
        s.ids = torch.stack((torch.full_like(o, fmt.pad_id), START0 + start_name), 1)
        s.valid = torch.stack((torch.zeros_like(s.busy), s.busy), 1)
        s.mem = torch.zeros((width, 2, MEMORY_DIM), device=dev)
        if self.memory:
            s.count = torch.zeros((width, fmt.max_obs, 4, 4), dtype=torch.int32, device=dev)
            s.latest = torch.full((width, fmt.max_obs, 4), -1, dtype=torch.int8, device=dev)
            s.known = torch.full((width, fmt.max_obs, 4), -1, dtype=torch.int8, device=dev)
        model_cfg = self.qnet.model.config
        head_dim = getattr(model_cfg, "head_dim", None) or model_cfg.hidden_size // model_cfg.num_attention_heads
        s.prefix_lens = np.array([len(x) for x in prefix] if prefix is not None else [0] * m, dtype=np.int64)
        longest = int(s.prefix_lens.max())
        cap = max(self.initial_capacity, 1 << int(np.ceil(np.log2(longest + 4))))
        s.cache = StaticKVCache(model_cfg.num_hidden_layers, width, model_cfg.num_key_value_heads, head_dim, cap,
                                device=dev, dtype=self.qnet.head_weight().dtype)
        s.out_tape = torch.full((m + 1, episodes), -1, dtype=torch.int8, device=dev)
        s.len_tape = torch.zeros((m + 1, episodes), dtype=torch.long, device=dev)
        tape_cap = cap + 2
        if record:
            s.tok_tape = torch.full((m + 1, tape_cap), -1, dtype=torch.int32, device=dev)
            s.obs_tape = torch.full((m + 1, tape_cap), -1, dtype=torch.int32, device=dev)
            s.q_tape = torch.zeros((m + 1, tape_cap, 4), dtype=torch.float32, device=dev)
        if longest:
            self._prefill(s, prefix, start_name)
        first = torch.as_tensor(s.prefix_lens, device=dev)[s.map_id]
        if record:
            s.tok_tape[s.map_id, first] = s.ids[:, 1].int()
            s.obs_tape[s.map_id, first] = o.int()
        s.n_tok.copy_(first + 1)
        s.view = s.cache.capacity
        return s

    def _prefill(self, s: _State, prefix: list[list[int]], start_name: torch.Tensor) -> None:
        """Read every context's prefix into the cache (one call, left-padded) and into the memory's counts; write it to
        the tapes; the first block's START then gets the features the counts give."""
        dev, width = self.device, len(prefix)
        longest = int(s.prefix_lens.max())
        ids = np.full((width, longest), self.fmt.pad_id, dtype=np.int64)
        for b, toks in enumerate(prefix):
            ids[b, longest - len(toks):] = toks
        valid = np.arange(longest)[None, :] >= (longest - s.prefix_lens)[:, None]
        mem = None
        if self.memory:
            stream = self.qnet.memory.stream(width)
            rows = np.flatnonzero(s.prefix_lens)
            feats = np.zeros((width, longest, MEMORY_DIM), dtype=np.float32)
            feats[rows] = stream.tails(rows, [(list(prefix[b]), len(prefix[b])) for b in rows], longest)
            mem = torch.as_tensor(feats, device=dev)
            s.count.copy_(torch.as_tensor(stream.count[:, : self.fmt.max_obs], device=dev))
            s.latest.copy_(torch.as_tensor(stream.latest[:, : self.fmt.max_obs], device=dev))
            s.known.copy_(torch.as_tensor(stream.known[:, : self.fmt.max_obs], device=dev))
            s.mem[:, 1] = self._features(s, start_name)
        with torch.no_grad():
            decode_step(self.qnet, s.cache, torch.as_tensor(ids, device=dev), torch.as_tensor(valid, device=dev),
                        mem, self.attention)
        if s.record:
            for b, toks in enumerate(prefix):
                s.tok_tape[b, : len(toks)] = torch.as_tensor(toks, dtype=torch.int32, device=dev)

    def _keep(self, s: _State, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (between steps: the rows still playing, so later steps are narrower)."""
        for name in ("ids", "valid", "mem", "cell", "busy", "map_id", "episode", "n_dec", "n_tok", "explore", "which",
                     *(("count", "latest", "known") if self.memory else ())):
            setattr(s, name, getattr(s, name)[keep])
        s.cache.keep(keep)
        if not s.lockstep:  # one env slot per row
            s.env.keep(keep)
            s.which = torch.arange(len(keep), device=keep.device)
        s.rows = torch.arange(len(keep), device=keep.device)

    def _grow(self, s: _State, capacity: int) -> None:
        s.cache.grow(capacity)
        if s.record:
            def wider(t, fill):
                new = t.new_full((t.shape[0], capacity + 2, *t.shape[2:]), fill)
                new[:, : t.shape[1]] = t
                return new
            s.tok_tape, s.obs_tape, s.q_tape = wider(s.tok_tape, -1), wider(s.obs_tape, -1), wider(s.q_tape, 0.0)

    def _result(self, s: _State) -> Rollout:
        """The ``Rollout`` from the tapes (one read of them)."""
        m, fmt = s.maps, self.fmt
        kinds = s.out_tape[:m].cpu().numpy()
        length = s.len_tape[:m].cpu().numpy()
        success, hole, cut = kinds == _KIND_GOAL, kinds == _KIND_HOLE, kinds == _KIND_CUT
        ret = success.astype(np.float32)
        tokens, tok_ep, dpos, q_read, paths = [], [], [], [], []
        if s.record:
            toks, obs, qs = (t[:m].cpu().numpy() for t in (s.tok_tape, s.obs_tape, s.q_tape))
            for b in range(m):
                n = int(np.argmax(toks[b] < 0)) if (toks[b] < 0).any() else toks.shape[1]
                t = toks[b, :n].astype(np.int64)
                own = np.arange(n) >= s.prefix_lens[b]  # the context's own tokens (after its prefix)
                is_start = (fmt.token_factors[t, 0] == TYPE_START) & own
                decision = fmt.is_decision[t] & own  # a START or a move's landing
                ep = np.where(own, np.cumsum(is_start) - 1, -1)
                tokens.append(t)
                tok_ep.append(ep)
                dpos.append(np.flatnonzero(decision))
                q_read.append(qs[b, : len(dpos[-1])].copy())
                path = []
                for p in range(int(s.prefix_lens[b]), n):
                    if is_start[p]:
                        path.append([int(obs[b, p])])
                    else:
                        path[-1].append(int(obs[b, p]))
                paths.append(path)
        return Rollout(success=success, hole=hole, truncated=cut, length=length, episode_return=ret, tokens=tokens,
                       token_episode=tok_ep, decision_pos=dpos, q=q_read, paths=paths)
