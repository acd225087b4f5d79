"""Batched players of Frozen Lake contexts: the tabular learners that produce the offline data (epsilon-greedy
Q-learning, a random policy, the ``copier``: a hand-written in-context learner), the **context teacher** that plays and
labels the protocol contexts the default trains on, and the evaluation's yardsticks.

* the context teacher, a pure function of the context so far (:func:`teacher_choices`, :func:`teacher_observe`):
  copy the last successful episode's action at a state; else try the actions untried there that are not known to end
  in a hole or bump a wall; else (``least_tried``) those tried least often; with ``forget`` a surprise (an action's
  outcome from a state differs from its latest, the rule ``icrl_fast.envs.outcomes`` shares with the same-state
  memory) wipes what it knew. :func:`play_protocol` plays the evaluation protocol with it beside the ramp's random
  actions (and a map switch), :func:`teacher_labels` reads its choices off any played context (DAgger);
* :func:`q_learning_protocol`: the same protocol played by a tabular Q-learner from scratch in each context
  (``--protocol.behaviour q-learning``); :func:`ramp_ceiling` and :func:`greedy_solves`: what a player that knows
  the map reaches under a ramp, and whether a greedy policy solves a map.

One Numba ``prange`` kernel runs *every* episode of one map per iteration, all maps in parallel, on the same
dynamics core as the simulator (:func:`~icrl_fast.envs.frozen_lake.transition`, ``slip_branch``); map ``b``
draws from random stream ``(seed, b)``, so the logs do not depend on the thread count. Every step is logged
(observation, action, reward) and every episode summarised (map, length, return, terminated, truncated, the
observation it ended on) in an :class:`EpisodeLog`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numba import njit, prange

from icrl_fast.envs.frozen_lake import landing, slip_branch, start_slot, transition, validate_dynamics
from icrl_fast.envs.maps import GOAL, HOLE, MapBatch
from icrl_fast.envs.outcomes import outcome_class, surprised
from icrl_fast.envs.rng import as_seed, next_u64, next_uniform, stream_state


@dataclass(frozen=True)
class QLearningConfig:
    """Tabular Q-learning hyperparameters (defaults solve >= 95 % of the paper's 3-5 maps; see tests)."""

    episodes: int = 1200
    """Episodes per map."""
    alpha: float = 0.5
    """Learning rate."""
    gamma: float = 0.95
    """Discount."""
    epsilon_start: float = 1.0
    """Exploration probability in the first episode."""
    epsilon_end: float = 0.05
    """Exploration probability after the decay."""
    epsilon_decay_episodes: int = 600
    """Episodes over which epsilon falls linearly from start to end."""
    max_episode_steps: int = 100
    """Truncation length (the paper's 100)."""

    def validate(self) -> None:
        if isinstance(self.episodes, bool) or not isinstance(self.episodes, int) or self.episodes < 1:
            raise ValueError(f"episodes must be a positive int, got {self.episodes!r}")
        for name in ("alpha", "gamma", "epsilon_start", "epsilon_end"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.epsilon_decay_episodes < 0 or self.max_episode_steps < 1:
            raise ValueError("epsilon_decay_episodes must be >= 0 and max_episode_steps >= 1, got "
                             f"{self.epsilon_decay_episodes}, {self.max_episode_steps}")


@dataclass(frozen=True)
class EpisodeLog:
    """Every logged episode, flat. Episodes of map ``b`` are contiguous and in the order they were played.

    Per step (``S`` steps in all): ``obs`` int16 (observation before the action), ``actions`` int8, ``rewards``
    float32. Per episode (``E``): ``map_id`` int32, ``start`` int64 (index of its first step), ``length`` int32,
    ``returns`` float32, ``terminated`` / ``truncated`` bool, ``final_obs`` int16 (where it ended).
    """

    obs: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    map_id: np.ndarray
    start: np.ndarray
    length: np.ndarray
    returns: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    final_obs: np.ndarray

    @property
    def num_episodes(self) -> int:
        return int(self.map_id.shape[0])

    @property
    def success(self) -> np.ndarray:
        """bool [E]: the episode reached a goal (terminated with a positive return)."""
        return self.terminated & (self.returns > 0)

    def episode(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(obs, actions, rewards)`` of episode ``e``."""
        s = slice(int(self.start[e]), int(self.start[e] + self.length[e]))
        return self.obs[s], self.actions[s], self.rewards[s]


def rename_observations(log: EpisodeLog, names: np.ndarray) -> EpisodeLog:
    """``log`` with observation ``o`` of map (context) ``b`` renamed ``names[b, o]`` (``obs`` and ``final_obs``; -1
    stays -1)."""
    episode_of_step = np.repeat(np.arange(log.num_episodes), log.length)
    step = log.start[episode_of_step] + np.arange(episode_of_step.size) - \
        np.repeat(np.cumsum(log.length) - log.length, log.length)
    obs = log.obs.copy()
    obs[step] = names[log.map_id[episode_of_step], log.obs[step]]
    final = np.where(log.final_obs >= 0, names[log.map_id, np.maximum(log.final_obs, 0)], log.final_obs)
    return replace(log, obs=obs.astype(log.obs.dtype), final_obs=final.astype(log.final_obs.dtype))


@njit(inline="always", cache=True)
def _greedy(q, b, s, st):
    """argmax_a q[b, s, a] with uniform random tie-breaking; returns ``(state, action)``."""
    best = q[b, s, 0]
    for a in range(1, 4):
        if q[b, s, a] > best:
            best = q[b, s, a]
    n_best = 0
    for a in range(4):
        if q[b, s, a] == best:
            n_best += 1
    st, z = next_u64(st)
    k = np.int64(z % np.uint64(n_best))
    for a in range(4):
        if q[b, s, a] == best:
            if k == 0:
                return st, a
            k -= 1
    return st, 0


@njit(inline="always", cache=True)
def pick_from_mask(mask, st):
    """Uniform among the set bits of ``mask`` (1..15); returns ``(state, action)``."""
    n = 0
    for a in range(4):
        if (mask >> a) & 1:
            n += 1
    st, z = next_u64(st)
    k = np.int64(z % np.uint64(n))
    for a in range(4):
        if (mask >> a) & 1:
            if k == 0:
                return st, np.int64(a)
            k -= 1
    return st, np.int64(0)


@njit(inline="always", cache=True)
def _copier_action(winner, avoid, b, s, st):
    """The copier's action at ``s``: the last successful episode's (``winner[b, s] >= 0``), else uniform among the
    actions not known to end in a hole or bump a wall (all four if none is left); returns ``(state, action)``."""
    if winner[b, s] >= 0:
        return st, np.int64(winner[b, s])
    ok = np.int64(0)
    for a in range(4):
        if not avoid[b, s, a]:
            ok |= np.int64(1) << a
    return pick_from_mask(ok if ok else np.int64(15), st)


@njit(inline="always", cache=True)
def _move(tiles, b, nrow, w, s, a, slippery, success_rate, reward_of_tile, st):
    """One step of the env from observation ``s`` with action ``a`` (a slip drawn first when slippery); returns
    ``(state, s2, reward, done)``."""
    branch = 1
    if slippery:
        st, u = next_uniform(st)
        branch = slip_branch(u, slippery, success_rate)
    r = s // w
    r2, c2, tile, from_terminal = transition(tiles, b, nrow, w, r, s - r * w, a, branch)
    reward, done = landing(tile, from_terminal, reward_of_tile)
    return st, r2 * w + c2, reward, done


@njit(inline="always", cache=True)
def _summarise(ep_len, ep_ret, ep_term, ep_trunc, ep_final, b, e, length, ret, terminated, truncated, final):
    """Write episode ``e`` of map ``b``'s summary into the per-episode logs."""
    ep_len[b, e] = length
    ep_ret[b, e] = ret
    ep_term[b, e] = terminated
    ep_trunc[b, e] = truncated
    ep_final[b, e] = final


NO_UPDATE, Q_LEARNING, COPIER = 0, 1, 2  # what _learn_kernel's acting policy learns from its episodes


@njit(parallel=True, cache=True)
def _learn_kernel(tiles, nrow, ncol, starts, n_starts, seed, episodes, max_steps, alpha, gamma, eps_by_episode,
                  learn, slippery, success_rate, reward_of_tile, q, winner, avoid, obs_log, act_log,
                  rew_log, ep_len, ep_ret, ep_term, ep_trunc, ep_final):
    for b in prange(tiles.shape[0]):
        st = stream_state(seed, np.uint64(b))
        w = ncol[b]
        cursor = 0
        current = np.full(tiles.shape[1] * tiles.shape[2], -1, dtype=np.int8)  # copier: this episode's last exits
        for e in range(episodes):
            eps = eps_by_episode[e]
            st, u = next_uniform(st)
            s = starts[b, start_slot(u, n_starts[b])]
            ret = 0.0
            t = 0
            while True:
                st, u = next_uniform(st)
                if u < eps:
                    st, z = next_u64(st)
                    a = np.int64(z & np.uint64(3))
                elif learn == COPIER:
                    st, a = _copier_action(winner, avoid, b, s, st)
                else:
                    st, a = _greedy(q, b, s, st)
                st, s2, reward, done = _move(tiles, b, nrow[b], w, s, a, slippery, success_rate, reward_of_tile, st)
                t += 1
                obs_log[b, cursor] = s
                act_log[b, cursor] = a
                rew_log[b, cursor] = reward
                cursor += 1
                ret += reward
                if learn == COPIER:
                    current[s] = a
                    if s2 == s or (done and reward <= 0.0):  # a wall bump or a hole: never worth repeating
                        avoid[b, s, a] = True
                if learn == Q_LEARNING:
                    target = reward
                    if not done:
                        best = q[b, s2, 0]
                        for k in range(1, 4):
                            best = max(best, q[b, s2, k])
                        target += gamma * best
                    q[b, s, a] += alpha * (target - q[b, s, a])
                s = s2
                if done or t >= max_steps:
                    if learn == COPIER:
                        if done and reward > 0.0:  # following each state's last exit replays it without loops
                            winner[b, :] = current
                        current[:] = -1
                    _summarise(ep_len, ep_ret, ep_term, ep_trunc, ep_final, b, e, t, ret, done, t >= max_steps, s)
                    break


def _log_buffers(n: int, episodes: int, max_steps: int) -> tuple[list, list]:
    """Per-map step logs ``[obs int16, actions int8, rewards float32]`` of ``[n, episodes * max_steps]`` (untouched
    pages cost nothing: only logged steps are written) and per-episode logs ``[length, return, terminated,
    truncated, final_obs]`` of ``[n, episodes]``, in the kernels' argument order."""
    cap = episodes * max_steps
    steps = [np.empty((n, cap), dtype=np.int16), np.empty((n, cap), dtype=np.int8), np.empty((n, cap), np.float32)]
    eps = [np.empty((n, episodes), dtype=np.int32), np.empty((n, episodes), dtype=np.float32),
           np.empty((n, episodes), dtype=np.bool_), np.empty((n, episodes), dtype=np.bool_),
           np.empty((n, episodes), dtype=np.int16)]
    return steps, eps


def _episode_log(steps: list, eps: list) -> tuple[EpisodeLog, np.ndarray]:
    """The :class:`EpisodeLog` of filled ``_log_buffers``, and the mask of the step buffers' logged entries."""
    (obs, actions, rewards), (length, returns, term, trunc, final) = steps, eps
    n, episodes = length.shape
    keep = np.arange(obs.shape[1])[None, :] < length.sum(axis=1)[:, None]
    start = np.concatenate([[0], np.cumsum(length.ravel())[:-1]]).astype(np.int64)
    log = EpisodeLog(obs=obs[keep], actions=actions[keep], rewards=rewards[keep],
                     map_id=np.repeat(np.arange(n, dtype=np.int32), episodes), start=start, length=length.ravel(),
                     returns=returns.ravel(), terminated=term.ravel(), truncated=trunc.ravel(), final_obs=final.ravel())
    return log, keep


def epsilon_schedule(cfg: QLearningConfig) -> np.ndarray:
    """Exploration probability per episode: linear from ``epsilon_start`` to ``epsilon_end`` over
    ``epsilon_decay_episodes``, then ``epsilon_end``."""
    e = np.arange(cfg.episodes)
    start, end, decay = float(cfg.epsilon_start), float(cfg.epsilon_end), int(cfg.epsilon_decay_episodes)
    return np.where(e < decay, start + (end - start) * e / max(decay, 1), end)


def _run(maps: MapBatch, cfg: QLearningConfig, seed: int, learn: int, is_slippery: bool, success_rate: float,
         reward_schedule, eps_by_episode: np.ndarray | None = None) -> tuple[EpisodeLog, np.ndarray]:
    """``eps_by_episode``: P(uniform random action) per episode, ``cfg.episodes`` of them (default: the config's
    linear ``epsilon_schedule``)."""
    if not isinstance(maps, MapBatch):
        raise TypeError(f"maps must be a MapBatch, got {type(maps).__name__}")
    cfg.validate()
    eps_by_episode = epsilon_schedule(cfg) if eps_by_episode is None else np.ascontiguousarray(eps_by_episode, float)
    success_rate, reward_of_tile, _ = validate_dynamics(success_rate, reward_schedule, cfg.max_episode_steps)
    n, e_count = len(maps), cfg.episodes
    cells = maps.tiles.shape[1] * maps.tiles.shape[2]
    q = np.zeros((n, cells, 4), dtype=np.float64)
    winner = np.full((n, cells), -1, dtype=np.int8)
    avoid = np.zeros((n, cells, 4), dtype=np.bool_)
    steps, eps = _log_buffers(n, e_count, cfg.max_episode_steps)
    _learn_kernel(maps.tiles, maps.nrow, maps.ncol, maps.starts, maps.n_starts, as_seed(seed), e_count,
                  cfg.max_episode_steps, float(cfg.alpha), float(cfg.gamma), eps_by_episode, learn,
                  bool(is_slippery), success_rate, reward_of_tile, q, winner, avoid, *steps, *eps)
    return _episode_log(steps, eps)[0], q


def q_learning(maps: MapBatch, config: QLearningConfig = QLearningConfig(), *, seed: int, is_slippery: bool = False,
               success_rate: float = 1.0 / 3.0, reward_schedule=(1, 0, 0)) -> tuple[EpisodeLog, np.ndarray]:
    """Run epsilon-greedy tabular Q-learning on every map at once (the paper's data source).

    Returns the :class:`EpisodeLog` of every episode played and the final tables ``q`` float64
    ``[B, max_rows * max_cols, 4]`` (rows indexed by observation ``r * ncol + c`` of each map).
    Defaults to the paper's non-slippery env.
    """
    return _run(maps, config, seed, Q_LEARNING, is_slippery, success_rate, reward_schedule)


def _ramp(p, name: str) -> np.ndarray:
    """``p`` (a protocol's P(the player acts) per episode) as float64, or a ``ValueError`` naming ``name``."""
    p = np.ascontiguousarray(p, dtype=np.float64)
    if p.ndim != 1 or p.size < 1 or ((p < 0) | (p > 1)).any():
        raise ValueError(f"{name} must be a non-empty 1-D array of probabilities, got {p!r}")
    return p


def q_learning_protocol(maps: MapBatch, p_learner, *, seed: int, alpha: float = 0.5, gamma: float = 0.95,
                        max_episode_steps: int = 100, is_slippery: bool = False, success_rate: float = 1.0 / 3.0,
                        reward_schedule=(1, 0, 0)) -> EpisodeLog:
    """Play the evaluation protocol with a tabular Q-learner that starts from scratch in every context (a zero
    table per map, updated after every step: the paper's kind of data, a generic learner's history): one context of
    ``len(p_learner)`` episodes per map; in episode ``k`` each action is the learner's greedy one (ties broken
    uniformly) with probability ``p_learner[k]``, else uniform random (the ramp's random actions are its
    exploration). Nothing of the context teacher is used. Map ``b`` draws from stream ``(seed, b)``."""
    p_learner = _ramp(p_learner, "p_learner")
    cfg = QLearningConfig(episodes=p_learner.size, alpha=alpha, gamma=gamma, max_episode_steps=max_episode_steps)
    return _run(maps, cfg, seed, Q_LEARNING, is_slippery, success_rate, reward_schedule,
                eps_by_episode=1.0 - p_learner)[0]


def random_policy(maps: MapBatch, episodes: int, *, seed: int, max_episode_steps: int = 100,
                  is_slippery: bool = False, success_rate: float = 1.0 / 3.0, reward_schedule=(1, 0, 0)) -> EpisodeLog:
    """Log ``episodes`` uniformly random episodes per map (the low-quality source)."""
    cfg = QLearningConfig(episodes=episodes, epsilon_start=1.0, epsilon_end=1.0, epsilon_decay_episodes=0,
                          max_episode_steps=max_episode_steps)
    return _run(maps, cfg, seed, NO_UPDATE, is_slippery, success_rate, reward_schedule)[0]


def copier(maps: MapBatch, config: QLearningConfig = QLearningConfig(), *, seed: int, is_slippery: bool = False,
           success_rate: float = 1.0 / 3.0, reward_schedule=(1, 0, 0)) -> EpisodeLog:
    """Log episodes of a hand-written in-context learner, what ICRL should learn to do from its context alone.

    In each episode it acts uniformly at random with probability epsilon (``config``'s schedule; start 1, end 0
    over 20 episodes is close to the paper's evaluation ramp), otherwise: from a state the last *successful* episode
    left, it takes the action that episode last took there (so it replays the success, loops erased); elsewhere it
    explores uniformly among the actions not yet seen to end in a hole or bump a wall. On the non-slippery env one
    success is enough to succeed ever after (when it acts). ``alpha`` and ``gamma`` are unused.
    """
    return _run(maps, config, seed, COPIER, is_slippery, success_rate, reward_schedule)[0]


@njit(parallel=True, cache=True)
def _ceiling_kernel(tiles, nrow, ncol, starts, n_starts, p_values, max_steps, out):
    cells = tiles.shape[1] * tiles.shape[2]
    for b in prange(tiles.shape[0]):
        w = ncol[b]
        n = nrow[b] * w
        nxt = np.empty((n, 4), dtype=np.int64)
        for s in range(n):
            for a in range(4):
                r2, c2, _, _ = transition(tiles, b, nrow[b], w, s // w, s % w, a, 1)
                nxt[s, a] = r2 * w + c2
        v = np.empty(cells)
        new = np.empty(cells)
        for k in range(p_values.shape[0]):
            p = p_values[k]
            v[:] = 0.0  # no step left: truncated, no success
            for _ in range(max_steps):
                for s in range(n):
                    tile = tiles[b, s // w, s % w]
                    if tile == GOAL or tile == HOLE:
                        continue  # never acted from: an episode ends on arrival
                    best = -1.0
                    mean = 0.0
                    for a in range(4):
                        s2 = nxt[s, a]
                        t2 = tiles[b, s2 // w, s2 % w]
                        val = 1.0 if t2 == GOAL else (0.0 if t2 == HOLE else v[s2])
                        best = max(best, val)
                        mean += 0.25 * val
                    new[s] = p * best + (1.0 - p) * mean
                for s in range(n):
                    v[s] = new[s]
            total = 0.0
            for i in range(n_starts[b]):
                total += v[starts[b, i]]
            out[b, k] = total / n_starts[b]


def ramp_ceiling(maps: MapBatch, p_optimal, max_episode_steps: int = 100) -> np.ndarray:
    """float64 ``[B, E]``: the highest success probability of episode ``k`` on map ``b`` for a player that knows the
    map (non-slippery) but whose every action is replaced by a uniform random one with probability
    ``1 - p_optimal[k]`` (the evaluation's ramp), within ``max_episode_steps`` steps: value iteration on that mixed
    dynamics from a uniform S tile. Exact, so no learner does better under the ramp, whatever it knows (a
    shortest path is not always best: a longer one may pass fewer holes for the forced random moves to find)."""
    p = np.asarray(p_optimal, dtype=np.float64)
    if p.ndim != 1 or p.size < 1 or ((p < 0) | (p > 1)).any():
        raise ValueError(f"p_optimal must be a non-empty 1-D array of probabilities, got {p_optimal!r}")
    values, index = np.unique(p, return_inverse=True)
    out = np.empty((len(maps), values.size))
    _ceiling_kernel(maps.tiles, maps.nrow, maps.ncol, maps.starts, maps.n_starts, values, int(max_episode_steps), out)
    return out[:, index]


@njit(parallel=True, cache=True)
def _greedy_kernel(tiles, nrow, ncol, starts, n_starts, q, max_steps, solved):
    for b in prange(tiles.shape[0]):
        w = ncol[b]
        ok = n_starts[b] > 0
        for k in range(n_starts[b]):
            s = starts[b, k]
            reached = False
            for _ in range(max_steps):
                a = 0
                for j in range(1, 4):  # deterministic first-max greedy action
                    if q[b, s, j] > q[b, s, a]:
                        a = j
                r = s // w
                r2, c2, tile, _ = transition(tiles, b, nrow[b], w, r, s - r * w, a, 1)
                s = r2 * w + c2
                if tile == GOAL:
                    reached = True
                    break
                if tile == HOLE:
                    break
            ok = ok and reached
        solved[b] = ok


def greedy_solves(maps: MapBatch, q: np.ndarray, max_episode_steps: int = 100) -> np.ndarray:
    """bool [B]: the deterministic greedy policy of ``q`` reaches a goal from *every* start tile of the map
    (non-slippery) within ``max_episode_steps``."""
    if q.shape[:2] != (len(maps), maps.tiles.shape[1] * maps.tiles.shape[2]) or q.shape[2] != 4:
        raise ValueError(f"q must be [B, cells, 4] = [{len(maps)}, {maps.tiles.shape[1] * maps.tiles.shape[2]}, 4], "
                         f"got {q.shape}")
    solved = np.empty(len(maps), dtype=np.bool_)
    _greedy_kernel(maps.tiles, maps.nrow, maps.ncol, maps.starts, maps.n_starts, q, max_episode_steps, solved)
    return solved


# ------------------------------------------------------------------------------------------- the context teacher
# What the teacher knows is what the context shows: per map, for every (state, action) whether it was tried, whether
# it is known bad (bumped a wall: the next observation is the same; or ended the episode without reward: a hole),
# its latest outcome, the exits of the episode being played, and the exits of the last successful episode.
# ``teacher_choices`` turns that into the set of actions it prefers at a state; ``teacher_observe`` folds one step
# into it. With ``forget`` a *surprise* -- an action whose outcome from a state differs from the last time it was
# seen, which on the deterministic (non-slippery) maps happens only when the map changed -- wipes that knowledge,
# so after a switch the teacher starts over as on a fresh map.
# The outcome classes and the surprise rule are shared with the same-state memory (icrl_fast.envs.outcomes): on these
# maps a rewarded end is the goal and an unrewarded one a hole.


@njit(cache=True)
def teacher_knowledge(cells) -> tuple[np.ndarray, ...]:
    """Fresh ``(winner, current, tried, avoid, known)`` of one map with ``cells`` observations."""
    return (np.full(cells, -1, dtype=np.int8), np.full(cells, -1, dtype=np.int8),
            np.zeros((cells, 4), dtype=np.int32), np.zeros((cells, 4), dtype=np.bool_),
            np.full((cells, 4), -1, dtype=np.int8))


@njit(inline="always", cache=True)
def teacher_choices(winner, tried, avoid, s, least_tried):
    """Bit mask (bit ``a`` for action ``a``) of the teacher's preferred actions at state ``s``.

    Copy: the action the last successful episode last took at ``s``. Else explore: the actions untried at ``s`` that
    are not known to end in a hole or bump a wall; else the actions not known bad (``least_tried``: those of them
    tried least often at ``s``, ``tried`` holding counts); else all four.

    Why ``least_tried`` (e41): a model that imitates "any action not known bad" learns equal logits there, and its
    greedy argmax then takes the same one at every visit: two cells that are each other's only tried exits become a
    loop to the time limit. Least-tried turns the tie into a rotation the context shows.
    """
    if winner[s] >= 0:
        return np.int64(1) << np.int64(winner[s])
    untried = np.int64(0)
    ok = np.int64(0)
    for a in range(4):
        if not avoid[s, a]:
            ok |= np.int64(1) << a
            if not tried[s, a]:
                untried |= np.int64(1) << a
    if untried:
        return untried
    if ok and least_tried:
        fewest, best = np.int64(1) << np.int64(62), np.int64(0)
        for a in range(4):
            if ok & (np.int64(1) << a):
                c = np.int64(tried[s, a])
                if c < fewest:
                    fewest, best = c, np.int64(1) << a
                elif c == fewest:
                    best |= np.int64(1) << a
        return best
    if ok:
        return ok
    return np.int64(15)


@njit(inline="always", cache=True)
def teacher_observe(winner, current, tried, avoid, known, s, a, s2, reward, done, ended, forget):
    """Fold step ``s --a--> s2`` (``reward``, ``done``: terminated; ``ended``: the episode ends here, terminated or
    cut; ``s2`` is not read when it does) into the teacher's knowledge (``forget``: see above)."""
    # A wall bump shows as the same observation next; after a cut episode's last step the context shows no next
    # observation, so the teacher (a function of the context) cannot know its outcome there.
    if done or not ended:
        c = outcome_class(not done and s2 == s, done, reward > 0.0)
        if forget and surprised(known, s, a, c):
            winner[:] = -1
            current[:] = -1
            tried[:] = 0
            avoid[:] = False
    tried[s, a] += 1
    current[s] = a
    if (s2 == s and not ended) or (done and reward <= 0.0):
        avoid[s, a] = True
    if ended:
        if done and reward > 0.0:  # following each state's last exit replays the success without its loops
            winner[:] = current
        current[:] = -1


@njit(parallel=True, cache=True)
def _protocol_kernel(tiles, nrow, ncol, starts, n_starts, tiles_b, nrow_b, ncol_b, starts_b, n_starts_b, switch_after,
                     seed, p_teacher, max_steps, slippery, success_rate, reward_of_tile, least_tried, forget, obs_log,
                     act_log, rew_log, lab_log, ep_len, ep_ret, ep_term, ep_trunc, ep_final):
    cells = max(tiles.shape[1] * tiles.shape[2], tiles_b.shape[1] * tiles_b.shape[2])
    for b in prange(tiles.shape[0]):
        st = stream_state(seed, np.uint64(b))
        winner, current, tried, avoid, known = teacher_knowledge(cells)
        cursor = 0
        for e in range(p_teacher.shape[0]):
            if e < switch_after:
                tl, nr, w, sts, ns = tiles, nrow[b], ncol[b], starts, n_starts[b]
            else:  # the context goes on, on map b of the second set
                tl, nr, w, sts, ns = tiles_b, nrow_b[b], ncol_b[b], starts_b, n_starts_b[b]
            st, u = next_uniform(st)
            s = sts[b, start_slot(u, ns)]
            ret = 0.0
            t = 0
            while True:
                label = teacher_choices(winner, tried, avoid, s, least_tried)
                st, u = next_uniform(st)
                if u < p_teacher[e]:
                    st, a = pick_from_mask(label, st)
                else:
                    st, z = next_u64(st)
                    a = np.int64(z & np.uint64(3))
                st, s2, reward, done = _move(tl, b, nr, w, s, a, slippery, success_rate, reward_of_tile, st)
                t += 1
                obs_log[b, cursor] = s
                act_log[b, cursor] = a
                rew_log[b, cursor] = reward
                lab_log[b, cursor] = label
                cursor += 1
                ret += reward
                ended = done or t >= max_steps
                teacher_observe(winner, current, tried, avoid, known, s, a, s2, reward, done, ended, forget)
                s = s2
                if ended:
                    _summarise(ep_len, ep_ret, ep_term, ep_trunc, ep_final, b, e, t, ret, done, t >= max_steps, s)
                    break


def play_protocol(maps: MapBatch, p_teacher, *, seed: int, max_episode_steps: int = 100, is_slippery: bool = False,
                  success_rate: float = 1.0 / 3.0, reward_schedule=(1, 0, 0), least_tried: bool = False,
                  forget: bool = False, switch_to: MapBatch | None = None,
                  switch_after: int | None = None) -> tuple[EpisodeLog, np.ndarray]:
    """Play the evaluation protocol with the context teacher on every map: one context of ``len(p_teacher)``
    episodes per map; in episode ``k`` each action is the teacher's (uniform among its choices) with probability
    ``p_teacher[k]``, else uniform random (the paper's ramp: ``icrl_fast.evaluate.paper_ramp``).

    Returns the :class:`EpisodeLog` (episodes of map ``b`` contiguous, in play order) and ``labels`` uint8 ``[S]``:
    per step, the bit mask of the teacher's choices at that step's observation, given the context before it -- also
    where a random action was executed (the imitation target). Map ``b`` draws from stream ``(seed, b)``.
    ``least_tried``: the teacher's rule once every safe action at a state was tried (``teacher_choices``);
    ``forget``: a surprise wipes its knowledge (see ``teacher_observe``). ``switch_to``: from episode
    ``switch_after`` on, context ``b`` goes on on ``switch_to[b]`` (the non-stationary experiment), nothing marking
    the switch: the teacher keeps what it knew (with ``forget``, until a surprise). ``forget`` reads a changed outcome
    as a changed map, which holds on deterministic maps only: with ``is_slippery`` it is an error.
    """
    if not isinstance(maps, MapBatch):
        raise TypeError(f"maps must be a MapBatch, got {type(maps).__name__}")
    p_teacher = _ramp(p_teacher, "p_teacher")
    if max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be >= 1, got {max_episode_steps}")
    if forget and is_slippery:
        raise ValueError("forget reads a changed outcome as a changed map: on slippery maps outcomes change by chance")
    if (switch_to is None) != (switch_after is None):
        raise ValueError("switch_to and switch_after go together")
    if switch_to is None:
        switch_to, switch_after = maps, p_teacher.size
    elif not isinstance(switch_to, MapBatch) or len(switch_to) != len(maps) or not 0 <= switch_after <= p_teacher.size:
        raise ValueError(f"switch_to must be a MapBatch of {len(maps)} maps and switch_after in 0..{p_teacher.size}")
    success_rate, reward_of_tile, _ = validate_dynamics(success_rate, reward_schedule, max_episode_steps)
    n = len(maps)
    steps, eps = _log_buffers(n, p_teacher.size, max_episode_steps)
    labels = np.empty_like(steps[0], dtype=np.uint8)
    _protocol_kernel(maps.tiles, maps.nrow, maps.ncol, maps.starts, maps.n_starts, switch_to.tiles, switch_to.nrow,
                     switch_to.ncol, switch_to.starts, switch_to.n_starts, int(switch_after), as_seed(seed), p_teacher,
                     int(max_episode_steps), bool(is_slippery), success_rate, reward_of_tile, bool(least_tried),
                     bool(forget), *steps, labels, *eps)
    log, keep = _episode_log(steps, eps)
    return log, labels[keep]


@njit(cache=True)
def _label_kernel(obs, actions, rewards, map_id, start, length, terminated, cells, least_tried, forget, labels):
    e = 0
    n_ep = map_id.shape[0]
    while e < n_ep:
        winner, current, tried, avoid, known = teacher_knowledge(cells)
        m = map_id[e]
        while e < n_ep and map_id[e] == m:
            for t in range(start[e], start[e] + length[e]):
                s = np.int64(obs[t])
                labels[t] = teacher_choices(winner, tried, avoid, s, least_tried)
                last = t == start[e] + length[e] - 1
                s2 = np.int64(-1) if last else np.int64(obs[t + 1])  # the context shows no observation after an end
                teacher_observe(winner, current, tried, avoid, known, s, np.int64(actions[t]), s2,
                                np.float64(rewards[t]), last and terminated[e], last, forget)
            e += 1


def teacher_labels(log: EpisodeLog, cells: int = 64, least_tried: bool = False, forget: bool = False) -> np.ndarray:
    """The teacher's choice masks (uint8 ``[S]``, bit ``a`` = action ``a``) at every step of ``log``, read from the
    context alone: each map's episodes (contiguous in ``log``, in play order) are one context. Any behaviour's log
    can be labelled -- the model's own rollouts too (DAgger); ``final_obs`` is not read (the context does not show
    it). ``cells``: observations per map (at least the largest observation + 1). ``least_tried``, ``forget``: as in
    ``play_protocol``."""
    if log.obs.size and int(log.obs.max()) >= cells:
        raise ValueError(f"observations go up to {int(log.obs.max())}; cells must exceed that, got {cells}")
    labels = np.empty(log.obs.shape[0], dtype=np.uint8)
    _label_kernel(log.obs, log.actions, log.rewards, log.map_id, log.start, log.length, log.terminated, int(cells),
                  bool(least_tried), bool(forget), labels)
    return labels
