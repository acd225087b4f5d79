"""Batched lockstep acting with KV-cache reuse: every model call costs only the tokens that call added.

``RolloutEngine.run`` plays ``episodes`` episodes on each of B maps, one growing context per map, in the
training format (``ContextFormat``: compact or paper). Each step:

1. every context gets the tokens it gained since its last decision (the action just taken, a reward block, an
   episode end and the next episode's header when an episode ended, the next observation and the action header);
   the counts differ per context (ragged);
2. one model call over the left-padded block ``[B, width]`` through a ``RolloutCache`` (per-context lengths,
   absolute positions, optional sliding-window ring), reading Q of the 4 action tokens at each context's new
   decision point (the last column);
3. the batched env steps with the chosen actions (the C++/CUDA extension's env on a CUDA device when it is
   loaded, the Numba ``FrozenLakeBatch`` otherwise; both draw the same random streams): greedy over Q with
   probability ``p_model[k]``
   in episode ``k``, a uniform random action otherwise (the paper's evaluation ramp, or online exploration).

The result (``Rollout``) holds the outcomes per episode and every context with its per-token episode index and
per-episode return/termination: what the online learner's replay stores.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from icrl_fast.data.formats import ContextFormat
from icrl_fast.envs.frozen_lake import FrozenLakeBatch
from icrl_fast.envs.maps import GOAL, HOLE, MapBatch
from icrl_fast.model.attention import KVCACHE, rollout_attention
from icrl_fast.model.kv_cache import CACHE_ARG, RolloutCache
from icrl_fast.rl.device_loop import run_on_device
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

    def after_action(self, action: int, reward: float, ended: bool, cut: bool,
                     next_obs: int | None) -> tuple[list[int], list[int]]:
        """Tokens from the action to the next decision point, split into ``(this episode's, the next one's)``."""
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
                + len(self.head) + len(f.pre_obs) + int(f.obs_len.max()) + len(f.post_obs))


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

    def reset(self, mask: np.ndarray | None = None) -> np.ndarray:
        if mask is not None and self.torch:
            mask = torch.from_numpy(mask).to(self.env.device)
        return self._host(self.env.reset(mask=mask))

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
    """

    def __init__(self, qnet, fmt: ContextFormat, *, window: int | None = None, device: str = "cpu",
                 max_positions: int | None = None, env_backend: str = "auto", sync_every: int = 16,
                 cache_dtype: torch.dtype | None = None):
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.qnet, self.fmt, self.window, self.device = qnet, fmt, window, device
        self.cache_dtype = cache_dtype
        self.max_positions, self.sync_every = max_positions, sync_every
        self.streams = ContextStreams(fmt)
        from icrl_fast.envs import ext

        if env_backend == "auto":
            env_backend = ext.backend(device)
        elif env_backend == "ext" and (ext.HAS_EXT or ext.load()) and not ext.has_kernel(device):
            raise ValueError(f"env_backend='ext' on {device}: the C++ extension has no kernels for that device "
                             f"(it has {ext.kernel_keys()}; {ext.EXT_REASON}); rebuild it with CUDA (see "
                             f"icrl_fast/envs/ext.py) or use env_backend='auto'")
        self.env_backend = env_backend

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
        model = self.qnet.model
        impl = getattr(model.config, "_attn_implementation", None)
        use = rollout_attention(impl, self.window)
        if use is None:
            return self._run(maps, episodes, p_model, seed, **kwargs)
        model.set_attn_implementation(use)
        try:
            return self._run(maps, episodes, p_model, seed, **kwargs)
        finally:
            model.set_attn_implementation(impl)

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
        if self.env_backend == "ext" and switch_to is None:  # the extension's env: the loop stays on the device
            return run_on_device(self, maps, episodes, p_model, seed, is_slippery=is_slippery, progress=progress,
                                 prefix=prefix, sync_every=self.sync_every)
        if switch_to is not None:
            if len(switch_to) != m or switch_after is None or not 0 < switch_after < episodes:
                raise ValueError("switch_to needs one map per context and 0 < switch_after < episodes")
            env_maps = MapBatch.from_descs([maps.to_desc(b) for b in range(m)] +
                                           [switch_to.to_desc(b) for b in range(m)])
        else:
            env_maps = maps
        env = HostView(env_maps, self.env_backend, self.device, is_slippery=is_slippery, seed=seed)
        which = np.arange(m)  # the env each context plays on (b, or b + m after a switch)
        obs = env.reset()[:m]
        rng = np.random.default_rng(seed)
        st = self.streams
        pending, prefix = self.first_blocks(obs, prefix)
        pending_ep = [[-1] * len(prefix[b]) + [0] * (len(p) - len(prefix[b])) for b, p in enumerate(pending)]
        episode = np.zeros(m, dtype=np.int64)
        out = {k: np.zeros((m, episodes), dtype=bool) for k in ("success", "hole", "truncated")}
        length = np.zeros((m, episodes), dtype=np.int64)
        ret = np.zeros((m, episodes), dtype=np.float32)
        paths = [[[int(obs[b])]] for b in range(m)]
        tokens: list[list[int]] = [[] for _ in range(m)]
        tok_ep: list[list[int]] = [[] for _ in range(m)]
        dpos: list[list[int]] = [[] for _ in range(m)]
        q_read: list[list[np.ndarray]] = [[] for _ in range(m)]
        cache = self.new_cache(m, max(map(len, pending)))
        bar = tqdm(total=m * episodes, desc="rollout", unit="episode", leave=False, disable=not progress)
        live = np.arange(m)  # the maps still playing, in cache-row order (finished ones are dropped)
        q = np.zeros((m, 4), dtype=np.float32)
        while (episode < episodes).any():
            if (episode[live] >= episodes).any():
                keep = np.flatnonzero(episode[live] < episodes)
                cache.keep(torch.from_numpy(keep).to(self.device))
                live = live[keep]
            counts = np.array([len(pending[b]) for b in live], dtype=np.int64)
            width = int(counts.max())
            ids = np.zeros((len(live), width), dtype=np.int64)
            for row, b in enumerate(live):  # left-pad: every context's decision token is the last column
                ids[row, width - counts[row]:] = pending[b]
                tokens[b] += pending[b]
                tok_ep[b] += pending_ep[b]
                dpos[b].append(len(tokens[b]) - 1)
            pos, mask = cache.plan(torch.from_numpy(counts), width)
            self.check_length(cache.get_seq_length())  # the cache knows every live context's length
            h = self.qnet.hidden(torch.from_numpy(ids).to(self.device), attention_mask=mask, position_ids=pos,
                                 **{CACHE_ARG: cache}, use_cache=True, **cache.attention_kwargs())
            q[live] = self.qnet.q_values(h[:, -1]).cpu().numpy()
            for b in live:
                q_read[b].append(q[b].copy())
            explore = rng.random(m) >= p_model[np.minimum(episode, episodes - 1)]
            actions = np.where(explore, rng.integers(0, 4, m), q.argmax(-1)).astype(np.int64)
            active = episode < episodes
            env_actions = np.zeros(len(env_maps), dtype=np.int64)
            env_actions[which] = actions
            o, r, term, trunc, final_obs = (x[which] for x in env.step(env_actions))
            pending, pending_ep = [], []
            for b in range(m):
                if not active[b]:
                    pending.append([])
                    pending_ep.append([])
                    continue
                e = episode[b]
                length[b, e] += 1
                ret[b, e] += r[b]
                ended = bool(term[b] or trunc[b])
                landed = int(final_obs[b]) if ended else int(o[b])
                paths[b][-1].append(landed)
                if ended:
                    k = which[b]
                    tile = env_maps.tiles[k, landed // env_maps.ncol[k], landed % env_maps.ncol[k]]
                    out["success"][b, e], out["hole"][b, e] = tile == GOAL, tile == HOLE
                    out["truncated"][b, e] = bool(trunc[b]) and tile != GOAL and tile != HOLE
                    episode[b] += 1
                    bar.update()
                    more = episode[b] < episodes
                    if switch_to is not None and episode[b] == switch_after:  # the next episode is on map B
                        which[b] += m
                        fresh = np.zeros(len(env_maps), dtype=bool)
                        fresh[which[b]] = True
                        o[b] = env.reset(fresh)[which[b]]
                    if more:
                        paths[b].append([int(o[b])])
                    tail, head = st.after_action(int(actions[b]), float(r[b]), True, bool(out["truncated"][b, e]),
                                                 int(o[b]) if more else None)
                    if not more:  # the context is complete: its closing tokens need no model call
                        tokens[b] += tail
                        tok_ep[b] += [e] * len(tail)
                        tail = []
                    pending.append(tail + head)
                    pending_ep.append([e] * len(tail) + [e + 1] * len(head))
                else:
                    tail, _ = st.after_action(int(actions[b]), float(r[b]), False, False, int(o[b]))
                    pending.append(tail)
                    pending_ep.append([e] * len(tail))
        bar.close()
        return Rollout(success=out["success"], hole=out["hole"], truncated=out["truncated"], length=length,
                       episode_return=ret, tokens=[np.asarray(t, dtype=np.int64) for t in tokens],
                       token_episode=[np.asarray(t, dtype=np.int64) for t in tok_ep],
                       decision_pos=[np.asarray(d, dtype=np.int64) for d in dpos],
                       q=[np.stack(x).astype(np.float32) for x in q_read], paths=paths)
