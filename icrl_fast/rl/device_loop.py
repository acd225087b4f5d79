"""The rollout loop that stays on the model's device: the C++/CUDA env steps there and writes the next tokens of
every context straight into the model's input buffer (``torch.ops.icrl.emit``), so a step never copies to the host.

``RolloutEngine.run`` uses it when its env backend is the extension (``ext``: automatically on CUDA when the
extension is loaded), the format is a ``ContextFormat`` (compact or paper: ``emit`` writes their token runs) and no
context switches maps; a step format (the default's) or a switch plays the host loop on the same env. It plays exactly what the host loop (``RolloutEngine._run`` with the Numba env) plays for
the same seed -- the same env streams, the same exploration draws, the same contexts and outcomes (tested on the
CPU build of the extension) -- but every per-step quantity stays a device tensor:

* the input block is a fixed ``[B, max_block]`` buffer the env's ``emit`` fills right-aligned (the decision token
  in the last column), so no step depends on a host-side width;
* greedy actions, the exploration choice (its uniform draws are made on the host ahead of time, ``sync_every``
  steps at a time, from the same numpy stream as the host loop, and uploaded: no read-back), episode counters and
  per-episode outcomes are device tensors updated with ``where``/``scatter``;
* the cache is told an upper bound on the longest context (``RolloutCache.plan(bound=...)``) instead of reading it.

The host reads the device back once every ``sync_every`` steps: to drop finished contexts from the batch, to check
the position limit, to update the progress bar and to stop. What each step emitted is kept on the device and turned
into the ``Rollout`` (contexts, per-token episode index, decision positions, Q, paths) once, at the end.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from icrl_fast.envs.maps import GOAL, HOLE, MapBatch
from icrl_fast.model.kv_cache import CACHE_ARG
from icrl_fast.rl.rollout_result import Rollout


def _host_draws(rng: np.random.Generator, m: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The host loop's per-step exploration draws (``random(m)`` then ``integers(0, 4, m)``) for ``steps`` steps."""
    u, a = np.empty((steps, m)), np.empty((steps, m), dtype=np.int64)
    for k in range(steps):
        u[k], a[k] = rng.random(m), rng.integers(0, 4, m)
    return u, a


def run_on_device(engine, maps: MapBatch, episodes: int, p_model: np.ndarray, seed: int, *, is_slippery: bool,
                  progress: bool, prefix: list[list[int]] | None, sync_every: int = 16):
    """``RolloutEngine.run`` on the extension's env, device-resident (see the module docstring)."""
    from icrl_fast.envs.ext import FormatTables, TorchFrozenLakeBatch

    dev, st, fmt, m = torch.device(engine.device), engine.streams, engine.fmt, len(maps)
    env = TorchFrozenLakeBatch(maps, device=dev, is_slippery=is_slippery, seed=seed)
    tables = FormatTables(fmt, dev)
    obs0 = env.reset().cpu().numpy().copy()  # the one read-back before the loop: the first blocks are built on the host
    rng = np.random.default_rng(seed)
    first, prefix = engine.first_blocks(obs0, prefix)
    width = st.max_block()
    width0 = max(map(len, first))
    ids = torch.full((m, width0), tables.pad, dtype=torch.long)
    for b, blk in enumerate(first):
        ids[b, width0 - len(blk):] = torch.tensor(blk, dtype=torch.long)
    ids, counts = ids.to(dev), torch.tensor([len(b) for b in first], dtype=torch.long, device=dev)
    cache = engine.new_cache(m, width0)

    # Constant tables on the device.
    p_model_t = torch.as_tensor(np.append(p_model, p_model[-1]), dtype=torch.float64, device=dev)
    tiles = torch.as_tensor(maps.tiles.reshape(m, -1), dtype=torch.long, device=dev)
    ncol_t, maxcol = torch.as_tensor(maps.ncol, dtype=torch.long, device=dev), maps.tiles.shape[2]
    head_const = len(st.head) + len(fmt.pre_obs) + len(fmt.post_obs)
    obs_len = torch.as_tensor(fmt.obs_len, dtype=torch.long, device=dev)
    rows_all = torch.arange(m, device=dev)

    # Device state: per-context episode counter and per-episode outcomes (column ``episodes`` absorbs the writes of
    # finished contexts, which keep stepping until the next sync drops them).
    episode = torch.zeros(m, dtype=torch.long, device=dev)
    out = {k: torch.zeros((m, episodes + 1), dtype=torch.bool, device=dev) for k in ("success", "hole", "truncated")}
    length = torch.zeros((m, episodes + 1), dtype=torch.long, device=dev)
    ret = torch.zeros((m, episodes + 1), dtype=torch.float32, device=dev)
    q_full = torch.zeros((m, 4), dtype=torch.float32, device=dev)
    ids_full = torch.full((m, width), tables.pad, dtype=torch.long, device=dev)
    counts_full = torch.zeros(m, dtype=torch.long, device=dev)
    no_first = torch.zeros(m, dtype=torch.bool, device=dev)

    # What every step recorded, read back once at the end.
    tape_q, tape_decided = [], []  # per model call: Q of every context, which contexts decided there
    tape_ids, tape_counts, tape_keep, tape_head, tape_ep, tape_ended, tape_landed, tape_obs = ([] for _ in range(8))

    live = rows_all  # the contexts still in the cache, in cache-row order
    bound = 0  # host-side upper bound on the longest context after the next call (set at each sync point)
    steps_done, draws_u, draws_a = 0, None, None
    bar = tqdm(total=m * episodes, desc="rollout", unit="episode", leave=False, disable=not progress)
    while True:
        k = steps_done % sync_every
        if k == 0:  # sync point: read the device back, drop finished contexts, refill the exploration draws
            alive = (episode < episodes).cpu().numpy()
            bar.update(int(np.minimum(episode.cpu().numpy(), episodes).sum()) - bar.n)
            if not alive.any():
                break
            keep = np.flatnonzero(alive[live.cpu().numpy()])
            if len(keep) < len(live):
                rows = torch.from_numpy(keep).to(dev)
                cache.keep(rows)
                live, ids, counts = live[rows], ids[rows], counts[rows]
            longest = cache.get_seq_length()
            engine.check_length(longest)
            bound = longest + int(ids.shape[1])
            u, a = _host_draws(rng, m, sync_every)
            draws_u, draws_a = torch.as_tensor(u, device=dev), torch.as_tensor(a, device=dev)
        elif engine.window is None:
            bound += int(ids.shape[1])
        pos, mask = cache.plan(counts, int(ids.shape[1]), bound=bound if engine.window is None else None)
        h = engine.qnet.hidden(ids, attention_mask=mask, position_ids=pos, **{CACHE_ARG: cache}, use_cache=True,
                               **cache.attention_kwargs())
        q_full[live] = engine.qnet.q_values(h[:, -1])
        active = episode < episodes
        tape_q.append(q_full.clone())
        tape_decided.append(active.clone())
        explore = draws_u[k] >= p_model_t[episode.clamp(max=episodes)]
        actions = torch.where(explore, draws_a[k], q_full.argmax(-1))
        o, r, term, trunc = env.step(actions)
        ended = term | trunc
        landed = torch.where(ended, env.final_obs, o)
        tile = tiles[rows_all, (landed // ncol_t) * maxcol + landed % ncol_t]
        e_col = torch.where(active, episode, torch.full_like(episode, episodes))[:, None]  # finished: the spare column
        length.scatter_add_(1, e_col, torch.ones_like(e_col))
        ret.scatter_add_(1, e_col, r.float()[:, None])
        done = ended & active
        goal, hole = done & (tile == GOAL), done & (tile == HOLE)
        out["success"][rows_all, e_col[:, 0]] |= goal
        out["hole"][rows_all, e_col[:, 0]] |= hole
        out["truncated"][rows_all, e_col[:, 0]] |= trunc & active & ~goal & ~hole
        env.emit_tokens(tables, actions, no_first, ids_full, counts_full)
        last = done & (episode + 1 >= episodes)  # the context is complete: keep only this episode's tail
        head_len = head_const + obs_len[o]  # the next episode's opening block, emitted after an episode ends
        head_n = torch.where(done & ~last, head_len, torch.zeros_like(counts_full))
        keep_n = torch.where(last, counts_full - head_len, counts_full)
        tape_ids.append(ids_full.clone())
        tape_counts.append(counts_full.clone())
        tape_keep.append(torch.where(active, keep_n, torch.zeros_like(keep_n)))
        tape_head.append(head_n)
        tape_ep.append(episode.clone())
        tape_ended.append(done)
        tape_landed.append(landed.clone())
        tape_obs.append(o.clone())
        episode = episode + done.long()
        ids, counts = ids_full[live], counts_full[live]
        steps_done += 1
    bar.close()
    tapes = {k: torch.stack(v).cpu().numpy() for k, v in (
        ("q", tape_q), ("decided", tape_decided), ("ids", tape_ids), ("counts", tape_counts), ("keep", tape_keep),
        ("head", tape_head), ("ep", tape_ep), ("ended", tape_ended), ("landed", tape_landed), ("obs", tape_obs))}
    host = {k: v[:, :episodes].cpu().numpy() for k, v in (*out.items(), ("length", length), ("ret", ret))}
    tokens, tok_ep, dpos, q_read, paths = _contexts(first, prefix, obs0, tapes)
    return Rollout(success=host["success"], hole=host["hole"], truncated=host["truncated"], length=host["length"],
                   episode_return=host["ret"], tokens=tokens, token_episode=tok_ep, decision_pos=dpos, q=q_read,
                   paths=paths)


def _contexts(first, prefix, obs0, t):
    """Every context, its per-token episode index, decision positions, Q reads and paths, from the step tapes."""
    width = t["ids"].shape[2]
    tokens, tok_ep, dpos, q_read, paths = [], [], [], [], []
    for b in range(len(first)):
        toks = list(first[b])
        tep = [-1] * len(prefix[b]) + [0] * (len(first[b]) - len(prefix[b]))
        dp, path = [len(toks) - 1], [[int(obs0[b])]]
        for s in np.flatnonzero(t["keep"][:, b]):
            n, c, e, head = int(t["keep"][s, b]), int(t["counts"][s, b]), int(t["ep"][s, b]), int(t["head"][s, b])
            toks += t["ids"][s, b, width - c: width - c + n].tolist()
            tep += [e] * (n - head) + [e + 1] * head
            path[-1].append(int(t["landed"][s, b]))
            if not t["ended"][s, b] or head:  # the block ends at a decision point (not the context's closing tail)
                dp.append(len(toks) - 1)
            if head:
                path.append([int(t["obs"][s, b])])
        tokens.append(np.asarray(toks, dtype=np.int64))
        tok_ep.append(np.asarray(tep, dtype=np.int64))
        dpos.append(np.asarray(dp, dtype=np.int64))
        q_read.append(t["q"][t["decided"][:, b], b].astype(np.float32))
        paths.append(path)
    return tokens, tok_ep, dpos, q_read, paths
