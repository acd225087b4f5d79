"""Batched lockstep acting with KV-cache reuse: every model call costs only the tokens that call added.

``RolloutEngine.run`` plays ``episodes`` episodes on each of B maps, one growing context per map, in the
training format (``ContextFormat``: compact or paper, through ``ContextStreams``; a step format, through
``StepStreams``, its observations named as the format shows them). Each step:

1. every context gets the tokens it gained since its last decision (the action just taken, a reward block, an
   episode end and the next episode's header when an episode ended, the next observation and the action header;
   in a step format the one ``LAND`` token, plus the next ``START`` after an episode end); the counts differ per
   context (ragged); a model with the same-state memory gets those tokens' features from a ``MemoryStream``;
2. one model call over the left-padded block ``[B, width]`` through a ``RolloutCache`` (per-context lengths,
   absolute positions, optional sliding-window ring), reading Q of the 4 action tokens at each context's new
   decision point (the last column);
3. the batched env steps with the chosen actions (the C++/CUDA extension's env on a CUDA device when it is
   loaded, the Numba ``FrozenLakeBatch`` otherwise; both draw the same random streams; with the extension and a
   ``ContextFormat`` without a map switch the whole loop stays on the device, ``icrl_fast.rl.device_loop``):
   greedy over Q with probability ``p_model[k]`` in episode ``k``, a uniform random action otherwise (the paper's
   evaluation ramp, or online exploration).

The result (``Rollout``) holds the outcomes per episode and every context with its per-token episode index and
per-episode return/termination: what the online learner's replay stores.

``RolloutEngine.collect`` (continuous batching, for collection) plays M maps, M possibly much larger than its
``width``, with at most ``width`` contexts per call: when a context has played its episodes, its cache row is
restarted (``RolloutCache.restart``) and the next map starts there, so calls stay ``width`` wide until the maps run
out, instead of lasting as long as each batch's longest context with ever fewer contexts per call (``run``'s tail).
Both loops keep their books in a ``ContextLog`` and make their model calls through ``RolloutEngine._forward``.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from tqdm import tqdm

from icrl_fast import threads
from icrl_fast.data.formats import ContextFormat
from icrl_fast.data.step_format import StepFormat, StepStreams, observation_names
from icrl_fast.envs.frozen_lake import FrozenLakeBatch
from icrl_fast.envs.maps import GOAL, HOLE, MapBatch
from icrl_fast.envs.rng import as_seed, next_u64, next_uniform, stream_state
from icrl_fast.model.attention import KVCACHE, rollout_attention
from icrl_fast.model.kv_cache import CACHE_ARG, RolloutCache
from icrl_fast.rl.device_loop import run_on_device
from icrl_fast.rl.player import ContextPlayer, switch_env_maps
from icrl_fast.rl.rollout_result import Rollout


class ContextStreams:
    """The tokens a context gains at each step, exactly as ``encode_episodes`` lays out whole episodes."""

    def __init__(self, fmt: ContextFormat):
        self.fmt = fmt
        self.head = fmt.episode_start.tolist()

    def first_block(self, obs: int) -> list[int]:
        return self.head + self.step_block(obs)

    def step_block(self, obs: int) -> list[int]:
        f = self.fmt
        return f.pre_obs.tolist() + f.obs_table[obs, : f.obs_len[obs]].tolist() + f.post_obs.tolist()

    def first_width(self) -> int:
        """The longest first block (an episode's opening) of any observation."""
        f = self.fmt
        return len(self.head) + len(f.pre_obs) + int(f.obs_len.max()) + len(f.post_obs)

    def after_action(self, action: int, reward: float, ended: bool, cut: bool, next_obs: int | None,
                     landed: int | None = None) -> tuple[list[int], list[int]]:
        """Tokens from the action to the next decision point, split into ``(this episode's, the next one's)``;
        ``landed`` (where an ending episode ended) is not shown in this format."""
        f = self.fmt
        tail = [int(f.action_ids[action])] + f.post_action.tolist()
        if reward != 0:
            tail += f.reward_block.tolist()
        if not ended:
            return tail + self.step_block(next_obs), []
        tail += (f.trunc_block.tolist() if cut else []) + f.episode_end.tolist()
        return tail, ([] if next_obs is None else self.first_block(next_obs))

    def episode(self, obs: list[int], actions: list[int], rewards: list[float], cut: bool = False) -> list[int]:
        """The tokens of one whole episode: observations ``obs`` (one more than ``actions``: the last is where it
        ended), the actions and their rewards; ``cut``: ended by the time limit."""
        if len(obs) != len(actions) + 1 or len(rewards) != len(actions) or not actions:
            raise ValueError("an episode needs n >= 1 actions, n rewards and n + 1 observations")
        out = self.first_block(obs[0])
        for k, (a, r) in enumerate(zip(actions, rewards)):
            last = k == len(actions) - 1
            tail, _ = self.after_action(a, r, last, cut and last, None if last else obs[k + 1])
            out += tail
        return out

    def max_block(self) -> int:
        """An upper bound on the tokens one step adds to one context."""
        f = self.fmt
        return (2 + len(f.post_action) + len(f.reward_block) + len(f.trunc_block) + len(f.episode_end)
                + self.first_width())


class ContextLog:
    """What a rollout has played so far, per map: the tokens each context's next model call feeds (``pending``),
    every token fed with its episode index, the decision positions and the Q read there, the paths and the outcome of
    every episode. The lockstep loop (``run``) and continuous batching (``collect``) both keep their books here.

    ``names``: int ``[envs, cells]``, the number env ``k``'s observation ``o`` shows as in the tokens (a grid step
    format's ``observation_names``); context ``b`` plays env ``b`` until ``record`` moves it (``next_env``: a switch
    of map). ``None``: the observations as they are. ``paths`` keep the env's own observation numbers."""

    def __init__(self, streams: ContextStreams, maps: int, episodes: int, names: np.ndarray | None = None):
        m = maps
        self.streams, self.episodes, self.names = streams, episodes, names
        self.env = np.arange(m)  # the env (row of ``names``) each context plays
        self.episode = np.zeros(m, dtype=np.int64)  # the episode each map is playing (== episodes: done)
        self.out = {k: np.zeros((m, episodes), dtype=bool) for k in ("success", "hole", "truncated")}
        self.length = np.zeros((m, episodes), dtype=np.int64)
        self.ret = np.zeros((m, episodes), dtype=np.float32)
        self.paths: list[list[list[int]]] = [[] for _ in range(m)]
        self.tokens: list[list[int]] = [[] for _ in range(m)]
        self.tok_ep: list[list[int]] = [[] for _ in range(m)]
        self.dpos: list[list[int]] = [[] for _ in range(m)]
        self.q_read: list[list[np.ndarray]] = [[] for _ in range(m)]
        self.pending: list[list[int]] = [[] for _ in range(m)]
        self.pending_ep: list[list[int]] = [[] for _ in range(m)]

    def start(self, b: int, obs: int, prefix: list[int]) -> None:
        """Map ``b``'s context opens: its ``prefix`` (episode index -1), then the first episode at ``obs``."""
        head = self.streams.first_block(self._name(b, obs))
        self.pending[b] = list(prefix) + head
        self.pending_ep[b] = [-1] * len(prefix) + [0] * len(head)
        self.paths[b] = [[obs]]

    def _name(self, b: int, obs: int | None) -> int | None:
        return obs if obs is None or self.names is None else int(self.names[self.env[b], obs])

    def feed(self, b: int) -> list[int]:
        """Map ``b``'s pending tokens, now appended to its context; the last one is a decision point."""
        block = self.pending[b]
        self.tokens[b] += block
        self.tok_ep[b] += self.pending_ep[b]
        self.dpos[b].append(len(self.tokens[b]) - 1)
        return block

    def record(self, b: int, action: int, reward, ended: bool, landed: int, tile, cut: bool, next_obs: int,
               next_env: int | None = None) -> None:
        """Book map ``b``'s step: ``action`` earned ``reward`` and landed on tile index ``landed``; when the episode
        ``ended`` (``cut``: by the time limit), ``tile`` is the landing tile's code and ``next_obs`` the next
        episode's start (on env ``next_env`` when given: a switch), else ``next_obs`` is ``landed``. Sets the tokens
        of ``b``'s next call (none when done: the closing tokens go straight into the context)."""
        st, e = self.streams, self.episode[b]
        self.length[b, e] += 1
        self.ret[b, e] += reward
        self.paths[b][-1].append(landed)
        if not ended:
            tail, _ = st.after_action(action, float(reward), False, False, self._name(b, next_obs))
            self.pending[b], self.pending_ep[b] = tail, [e] * len(tail)
            return
        out = self.out
        out["success"][b, e], out["hole"][b, e] = tile == GOAL, tile == HOLE
        out["truncated"][b, e] = cut and tile != GOAL and tile != HOLE
        self.episode[b] += 1
        more = self.episode[b] < self.episodes
        if more:
            self.paths[b].append([next_obs])
        landed_name = self._name(b, landed)
        if next_env is not None:
            self.env[b] = next_env
        tail, head = st.after_action(action, float(reward), True, bool(out["truncated"][b, e]),
                                     self._name(b, next_obs) if more else None, landed=landed_name)
        if not more:  # the context is complete: its closing tokens need no model call
            self.tokens[b] += tail
            self.tok_ep[b] += [e] * len(tail)
            tail = []
        self.pending[b] = tail + head
        self.pending_ep[b] = [e] * len(tail) + [e + 1] * len(head)

    def result(self) -> Rollout:
        out = self.out
        return Rollout(success=out["success"], hole=out["hole"], truncated=out["truncated"], length=self.length,
                       episode_return=self.ret, tokens=[np.asarray(t, dtype=np.int64) for t in self.tokens],
                       token_episode=[np.asarray(t, dtype=np.int64) for t in self.tok_ep],
                       decision_pos=[np.asarray(d, dtype=np.int64) for d in self.dpos],
                       q=[np.stack(x).astype(np.float32) for x in self.q_read], paths=self.paths)


_EXPLORE_SALT = np.uint64(0x6A09E667F3BCC908)  # sqrt(2)'s fraction bits: exploration streams apart from env streams


@njit(cache=True)
def _explore_streams(seed, maps):
    """The initial state of every map's exploration stream ``(seed, b)`` (``collect``)."""
    state = np.empty(maps, dtype=np.uint64)
    for b in range(maps):
        state[b] = stream_state(seed, np.uint64(b))
    return state


@njit(cache=True)
def _explore_draws(state, maps, u, action):
    """Advance the exploration streams of ``maps`` by two draws each: ``u[i]`` uniform on [0, 1) (explore when
    ``u >= p_model``) and ``action[i]`` uniform on 0..3 (the top two bits of the second draw)."""
    for i in range(maps.shape[0]):
        s, x = next_uniform(state[maps[i]])
        s, z = next_u64(s)
        state[maps[i]] = s
        u[i] = x
        action[i] = np.int64(z >> np.uint64(62))


class HostView:
    """The rollout's env as numpy arrays on the host, whichever backend steps it: ``numba`` (``FrozenLakeBatch``)
    or ``ext`` (``TorchFrozenLakeBatch`` on ``device``: the step runs there, its outputs are copied back).
    ``step`` returns copies ``(obs, reward, terminated, truncated, final_obs)``; ``reset`` a copy of ``obs``."""

    def __init__(self, maps: MapBatch, backend: str, device, **kwargs):
        if backend == "ext":
            from icrl_fast.envs.ext import TorchFrozenLakeBatch

            self.env, self.torch = TorchFrozenLakeBatch(maps, device=device, **kwargs), True
        elif backend == "numba":
            self.env, self.torch = FrozenLakeBatch(maps, **kwargs), False
        else:
            raise ValueError(f"env backend must be numba or ext, got {backend!r}")

    def _host(self, x):
        return x.cpu().numpy() if self.torch else x.copy()

    def reset(self, mask: np.ndarray | None = None, seed: int | None = None) -> np.ndarray:
        if mask is not None and self.torch:
            mask = torch.from_numpy(mask).to(self.env.device)
        return self._host(self.env.reset(seed=seed, mask=mask))

    def step(self, actions: np.ndarray):
        out = self.env.step(torch.from_numpy(actions).to(self.env.device) if self.torch else actions)
        return (*map(self._host, out), self._host(self.env.final_obs))


class RolloutEngine:
    """Acts on many maps at once with one model call per step (see the module docstring).

    ``window``: attend to the last ``window`` tokens only (ring buffer; contexts may then exceed the model's
    positions). ``max_positions``: without a window, a context longer than this is a ``ValueError``.
    ``env_backend``: ``auto`` (the extension on CUDA when it has CUDA kernels, else Numba: ``ext.backend``),
    ``numba`` or ``ext``. On ``ext`` the loop stays on the device (``icrl_fast.rl.device_loop``; the host reads it
    back every ``sync_every`` steps), except for a map switch (the non-stationary experiment), which the host loop
    plays. ``cache_dtype``: the dtype the KV cache stores keys and values in (e.g. ``torch.bfloat16`` under an fp32
    model: half the bytes, Q within bf16 rounding of the keys and values); ``None``: the model's own dtype.

    ``player``: step formats play through the device-resident ``ContextPlayer`` (``icrl_fast.rl.player``), whose
    ``graph`` (a CUDA graph of its step) and ``compile`` (``torch.compile``) these pass on.

    ``run`` plays B maps in lockstep (evaluation); ``collect`` plays M maps with at most ``width`` contexts per call
    (continuous batching, collection). ``batch_sizes``: the contexts of every model call of the last host-loop call
    of either (empty after ``run`` on the device loop).
    """

    def __init__(self, qnet, fmt: ContextFormat, *, window: int | None = None, device: str = "cpu",
                 max_positions: int | None = None, env_backend: str = "auto", sync_every: int = 16,
                 cache_dtype: torch.dtype | None = None, player: bool = True, graph: bool = False,
                 compile: bool | str = False):
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.qnet, self.fmt, self.window, self.device = qnet, fmt, window, device
        self.cache_dtype = cache_dtype
        self.max_positions, self.sync_every = max_positions, sync_every
        self.streams = StepStreams(fmt) if isinstance(fmt, StepFormat) else ContextStreams(fmt)
        self.batch_sizes: list[int] = []  # the contexts of every model call of the last host-loop run or collect
        from icrl_fast.envs import ext

        if env_backend == "auto":
            env_backend = ext.backend(device)
        elif env_backend == "ext" and (ext.HAS_EXT or ext.load()) and not ext.has_kernel(device):
            raise ValueError(f"env_backend='ext' on {device}: the C++ extension has no kernels for that device "
                             f"(it has {ext.kernel_keys()}; {ext.EXT_REASON}); rebuild it with CUDA (see "
                             f"icrl_fast/envs/ext.py) or use env_backend='auto'")
        self.env_backend = env_backend
        self.use_player, self.graph, self.compile = player, graph, compile

    def player(self, prefix=None) -> ContextPlayer | None:
        """The device-resident player (``icrl_fast.rl.player``) when it can play this engine's rollouts: a step
        format, no window, no prefix (``collect``; ``run`` passes none: the player reads one in lockstep), the model's
        own cache dtype and ``player=True``; else ``None`` (the host loops below)."""
        if not (self.use_player and isinstance(self.fmt, StepFormat) and self.window is None and prefix is None
                and self.cache_dtype is None and not getattr(self.qnet, "pretrained", False)):
            return None
        return ContextPlayer(self.qnet, self.fmt, device=self.device, max_positions=self.max_positions,
                             graph=self.graph, compile=self.compile)

    def first_blocks(self, obs, prefix: list[list[int]] | None) -> tuple[list[list[int]], list[list[int]]]:
        """Each context's first block (its ``prefix``, then the first episode's opening at observation ``obs[b]``)
        and the prefix, one empty list per context when there is none."""
        prefix = prefix if prefix is not None else [[] for _ in range(len(obs))]
        return [list(prefix[b]) + self.streams.first_block(int(o)) for b, o in enumerate(obs)], prefix

    def new_cache(self, contexts: int, first_width: int) -> RolloutCache:
        """The rollout cache for ``contexts`` contexts whose first block is at most ``first_width`` tokens."""
        dtype = self.qnet.head_weight().dtype
        return RolloutCache(self.qnet.num_layers, contexts, window=self.window,
                            max_block=max(self.streams.max_block(), first_width), device=self.device,
                            dtype=dtype if dtype.is_floating_point else torch.float32,
                            seqlens=getattr(self.qnet.model.config, "_attn_implementation", None) == KVCACHE,
                            cache_dtype=self.cache_dtype)

    def check_length(self, longest: int) -> None:
        """Without a window, a context may not outgrow the model's positions."""
        if self.window is None and self.max_positions is not None and longest > self.max_positions:
            raise ValueError(f"a context reached {longest} tokens, more than the model's "
                             f"{self.max_positions} positions: raise the model's max_positions or set a window")

    def run(self, maps: MapBatch, episodes: int, p_model, seed: int, **kwargs) -> Rollout:
        """See ``_run``. A model on flash-attn 2 rolls out on flash-attn's kv-cache kernel with per-context
        ``cache_seqlens`` (``icrl_fast.model.attention.KVCACHE``), or on SDPA with a window (the ring's mask), and
        is switched back afterwards (``rollout_attention``)."""
        return self._under_rollout_attention(self._run, maps, episodes, p_model, seed, **kwargs)

    def collect(self, maps: MapBatch, episodes: int, p_model, seed: int, *, width: int, **kwargs) -> Rollout:
        """See ``_collect`` (continuous batching); the attention switch is ``run``'s."""
        return self._under_rollout_attention(self._collect, maps, episodes, p_model, seed, width=width, **kwargs)

    def _under_rollout_attention(self, play, *args, **kwargs) -> Rollout:
        model = self.qnet.model
        impl = getattr(model.config, "_attn_implementation", None)
        use = rollout_attention(impl, self.window)
        self.batch_sizes = []
        if use is None:
            return play(*args, **kwargs)
        model.set_attn_implementation(use)
        try:
            return play(*args, **kwargs)
        finally:
            model.set_attn_implementation(impl)

    def _memory_stream(self, contexts: int):
        """The same-state memory's incremental reader of ``contexts`` contexts, or ``None`` without a memory."""
        memory = getattr(self.qnet, "memory", None)
        return None if memory is None else memory.stream(contexts)

    def _forward(self, cache: RolloutCache, log: ContextLog, rows, memory) -> np.ndarray:
        """One model call: cache row ``r`` gets the pending tokens of context ``rows[r]`` of ``log`` (at least one
        each; fed to the log here), left-padded so every context's decision token is the last column. Returns Q
        there, ``float32 [rows, 4]``, and appends the call's batch size to ``batch_sizes``. ``memory``: for a model
        with the same-state memory, the ``MemoryStream`` of the log's contexts (``_memory_stream``), which reads the
        new tokens into each context's counts; else ``None``."""
        threads.poll()  # the thread budget follows the other processes' load (icrl_fast.threads)
        blocks = [log.feed(b) for b in rows]
        counts = np.array([len(x) for x in blocks], dtype=np.int64)
        width = int(counts.max())
        ids = np.zeros((len(blocks), width), dtype=np.int64)
        for row, block in enumerate(blocks):  # left-pad: every context's decision token is the last column
            ids[row, width - counts[row]:] = block
        pos, mask = cache.plan(torch.from_numpy(counts), width)
        self.check_length(cache.get_seq_length())  # the cache knows every live context's length
        if memory is not None:
            tails = memory.tails(rows, [(log.tokens[b], len(x)) for b, x in zip(rows, blocks)], width)
            memory = torch.from_numpy(tails).to(self.device)
        h = self.qnet.hidden(torch.from_numpy(ids).to(self.device), attention_mask=mask, position_ids=pos,
                             **{CACHE_ARG: cache}, use_cache=True, memory=memory, **cache.attention_kwargs())
        self.batch_sizes.append(len(blocks))
        return self.qnet.q_values(h[:, -1]).cpu().numpy()

    @torch.no_grad()
    def _run(self, maps: MapBatch, episodes: int, p_model, seed: int, *, is_slippery: bool = False,
            progress: bool = False, switch_to: MapBatch | None = None, switch_after: int | None = None,
            prefix: list[list[int]] | None = None) -> Rollout:
        """Play ``episodes`` episodes per map; in episode ``k`` the greedy action is taken with probability
        ``p_model[k]`` (a scalar applies to every episode). ``seed`` fixes the env streams and the exploration.

        ``switch_to``/``switch_after``: after episode ``switch_after`` context ``b`` goes on on map
        ``switch_to[b]``, with nothing in the context marking the change (the non-stationary experiment).
        ``prefix``: tokens put before each context's first episode (e.g. hand-written episodes; their
        ``token_episode`` is -1).
        """
        m = len(maps)
        p_model = np.broadcast_to(np.asarray(p_model, dtype=np.float64), (episodes,))
        player = self.player()
        if player is not None:  # a step format: the device-resident player, with run's lockstep draws
            return player.play(maps, episodes, p_model, seed, draws="lockstep", is_slippery=is_slippery,
                               switch_to=switch_to, switch_after=switch_after, progress=progress, prefix=prefix)
        if self.env_backend == "ext" and switch_to is None and not isinstance(self.fmt, StepFormat):
            # the extension's env: the loop stays on the device (it writes ContextFormat's token runs; the step
            # format plays the host loop on the same env)
            return run_on_device(self, maps, episodes, p_model, seed, is_slippery=is_slippery, progress=progress,
                                 prefix=prefix, sync_every=self.sync_every)
        env_maps = switch_env_maps(maps, episodes, switch_to, switch_after)
        env = HostView(env_maps, self.env_backend, self.device, is_slippery=is_slippery, seed=seed)
        which = np.arange(m)  # the env each context plays on (b, or b + m after a switch)
        obs = env.reset()[:m]
        rng = np.random.default_rng(seed)
        log = ContextLog(self.streams, m, episodes, observation_names(self.fmt, env_maps))
        memory = self._memory_stream(m)
        prefix = prefix if prefix is not None else [[] for _ in range(m)]
        for b in range(m):
            log.start(b, int(obs[b]), prefix[b])
        episode = log.episode
        cache = self.new_cache(m, max(map(len, log.pending)))  # the first blocks, as the log opened them
        bar = tqdm(total=m * episodes, desc="rollout", unit="episode", leave=False, disable=not progress)
        live = np.arange(m)  # the maps still playing, in cache-row order (finished ones are dropped)
        q = np.zeros((m, 4), dtype=np.float32)
        while (episode < episodes).any():
            if (episode[live] >= episodes).any():
                keep = np.flatnonzero(episode[live] < episodes)
                cache.keep(torch.from_numpy(keep).to(self.device))
                live = live[keep]
            q[live] = self._forward(cache, log, live, memory)
            for b in live:
                log.q_read[b].append(q[b].copy())
            explore = rng.random(m) >= p_model[np.minimum(episode, episodes - 1)]
            actions = np.where(explore, rng.integers(0, 4, m), q.argmax(-1)).astype(np.int64)
            active = episode < episodes
            env_actions = np.zeros(len(env_maps), dtype=np.int64)
            env_actions[which] = actions
            o, r, term, trunc, final_obs = (x[which] for x in env.step(env_actions))
            for b in np.flatnonzero(active):
                ended = bool(term[b] or trunc[b])
                landed = int(final_obs[b]) if ended else int(o[b])
                k, next_env = which[b], None
                tile = env_maps.tiles[k, landed // env_maps.ncol[k], landed % env_maps.ncol[k]] if ended else None
                if ended and switch_to is not None and episode[b] + 1 == switch_after:  # the next episode: map B
                    which[b] = next_env = k + m
                    fresh = np.zeros(len(env_maps), dtype=bool)
                    fresh[next_env] = True
                    o[b] = env.reset(fresh)[next_env]
                log.record(b, int(actions[b]), r[b], ended, landed, tile, bool(trunc[b]), int(o[b]), next_env)
                if ended:
                    bar.update()
        bar.close()
        return log.result()

    @torch.no_grad()
    def _collect(self, maps: MapBatch, episodes: int, p_model, seed: int, *, width: int, is_slippery: bool = False,
                 progress: bool = False, prefix: list[list[int]] | None = None) -> Rollout:
        """Continuous batching: play ``episodes`` episodes on each of the M maps with at most ``width`` contexts in a
        model call. Maps start in index order; when a context has played its episodes its cache row is restarted
        (``RolloutCache.restart``: length 0, positions from 0, the old keys and values never attended again) and the
        next map starts there, so every call carries ``width`` contexts until fewer than ``width`` maps are left
        (then finished rows are dropped, as in ``run``). ``batch_sizes`` holds the contexts of every call.
        ``p_model``, ``is_slippery``, ``progress``, ``prefix``: as in ``_run``. Returns ``run``'s ``Rollout``, one
        entry per map in map order.

        Determinism: map ``b``'s env draws from stream ``(seed, b)``, reseeded when the map starts (exactly as
        ``run``'s env ``b``), and its exploration from its own stream ``(seed ^ salt, b)``, advanced twice per step
        of map ``b`` only; so given the Q-values, map ``b``'s episodes are a function of ``(seed, b)`` alone, not of
        ``width`` or of the other maps (with random actions, ``p_model = 0``, they are identical for every width).
        The Q-values themselves are computed in batches whose make-up depends on the schedule and agree with a full
        forward to fp32 rounding, which can flip a greedy action only at a near-tie. With greedy actions
        (``p_model = 1``) and ``width >= M`` the result equals ``run``'s; with exploration it does not, since ``run``
        draws the exploration of all its contexts from one shared generator (element ``b`` of each lockstep step's
        draw), which a per-map stream cannot reproduce.
        """
        if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
            raise ValueError(f"width must be a positive int (contexts per model call), got {width!r}")
        if episodes < 1:
            raise ValueError(f"episodes must be >= 1, got {episodes}")
        m = len(maps)
        if prefix is not None and len(prefix) != m:
            raise ValueError(f"prefix needs one token list per map ({m}), got {len(prefix)}")
        prefix = prefix if prefix is not None else [[] for _ in range(m)]
        p_model = np.broadcast_to(np.asarray(p_model, dtype=np.float64), (episodes,))
        player = self.player(None if all(len(x) == 0 for x in prefix) else prefix)
        if player is not None:  # a step format: the device-resident player, with collect's per-map draws
            return player.play(maps, episodes, p_model, seed, width=width, is_slippery=is_slippery, progress=progress)
        env = HostView(maps, self.env_backend, self.device, is_slippery=is_slippery, seed=seed)
        obs = env.reset()  # seeds every map's stream (seed, b); later starts reseed theirs
        explore_state = _explore_streams(as_seed(seed) ^ _EXPLORE_SALT, m)
        log = ContextLog(self.streams, m, episodes, observation_names(self.fmt, maps))
        memory = self._memory_stream(m)
        first_width = max(map(len, prefix), default=0) + self.streams.first_width()  # any map's first block
        slots = np.arange(min(width, m))  # the map each cache row plays
        for b in slots:
            log.start(b, int(obs[b]), prefix[b])
        following = len(slots)  # the next map to start
        cache = self.new_cache(len(slots), first_width)
        bar = tqdm(total=m * episodes, desc="collect", unit="episode", leave=False, disable=not progress)
        u = np.zeros(len(slots), dtype=np.float64)
        rand = np.zeros(len(slots), dtype=np.int64)
        while len(slots):
            q = self._forward(cache, log, slots, memory)
            for row, b in enumerate(slots):
                log.q_read[b].append(q[row].copy())
            _explore_draws(explore_state, slots, u, rand)
            explore = u[: len(slots)] >= p_model[log.episode[slots]]
            actions = np.where(explore, rand[: len(slots)], q.argmax(-1)).astype(np.int64)
            env_actions = np.zeros(m, dtype=np.int64)  # maps not playing step too: a map's start reseeds its stream
            env_actions[slots] = actions
            o, r, term, trunc, final_obs = env.step(env_actions)
            for row, b in enumerate(slots):
                ended = bool(term[b] or trunc[b])
                landed = int(final_obs[b]) if ended else int(o[b])
                tile = maps.tiles[b, landed // maps.ncol[b], landed % maps.ncol[b]] if ended else None
                log.record(b, int(actions[row]), r[b], ended, landed, tile, bool(trunc[b]), int(o[b]))
                if ended:
                    bar.update()
            done = np.flatnonzero(log.episode[slots] >= episodes)
            if not len(done):
                continue
            refill = done[: m - following]  # rows that take the next maps, in map order
            if len(refill):
                new = np.arange(following, following + len(refill))
                following += len(refill)
                fresh = np.zeros(m, dtype=bool)
                fresh[new] = True
                obs = env.reset(fresh, seed=seed)
                for b in new:
                    log.start(b, int(obs[b]), prefix[b])
                slots[refill] = new
                cache.restart(torch.from_numpy(refill).to(self.device))
            if len(refill) < len(done):  # no maps left to start: drop the finished rows
                keep = np.setdiff1d(np.arange(len(slots)), done[len(refill):])
                cache.keep(torch.from_numpy(keep).to(self.device))
                slots = slots[keep]
        bar.close()
        return log.result()
