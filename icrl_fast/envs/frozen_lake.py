"""Batched Frozen Lake: Numba step/reset over structure-of-arrays state, one random stream per env.

The dynamics are gymnasium's ``FrozenLake-v1`` (``gymnasium/envs/toy_text/frozen_lake.py``), proven equal by
``tests/envs``. They live in small ``@njit`` functions that every caller shares — the batched kernel here, the
single :class:`~icrl_fast.envs.gym_env.FrozenLakeEnv`, the ``P`` table it exposes, and the learners (the batched
kernel writes :func:`landing`'s rule out as selects, for speed; ``tests/envs/test_step_reference.py`` holds it to
the rules):

* :func:`slip_branch` — gymnasium's categorical draw over ``[(a - 1) % 4, a, (a + 1) % 4]`` with probabilities
  ``[fail, success_rate, fail]`` (``fail = (1 - success_rate) / 2``); non-slippery always takes ``a``;
* :func:`move` — one move, walls clamp; :func:`transition` — that move, the landing tile, and gymnasium's rule
  that stepping *from* a goal or hole stays put (:func:`landing`: reward 0 and ``terminated=True``);
* :func:`start_from_uniform` — gymnasium's reset draw, uniform over the S tiles.

Rewards follow ``reward_schedule = (goal, hole, other)``; ``terminated`` means the agent landed on G or H and
``truncated`` means the step count reached ``max_episode_steps`` (like gymnasium's ``TimeLimit``, both can be
true together). Autoreset modes are gymnasium's: SAME_STEP (default: a finished env is reset inside the same
``step`` call, the observation it ended on goes to ``final_obs``), NEXT_STEP, and DISABLED.

A batch starts in one thread below ``PARALLEL_MIN_ENVS`` envs and in at most the usable cores above it
(:func:`step_threads`); from ``ADAPTIVE_MIN_ENVS`` envs on, the step times then choose between the two
(:class:`~icrl_fast.envs.thread_choice.ThreadChooser`). Every env draws from its own stream, so results are
bit-identical for any thread count.
"""

from __future__ import annotations

import sys
import time

import numba
import numpy as np
from gymnasium.vector import AutoresetMode
from numba import njit, prange, types

from icrl_fast.envs.maps import GOAL, HOLE, MapBatch
from icrl_fast.envs.rng import as_seed, choose_seed, next_uniform, stream_state
from icrl_fast.envs.thread_choice import ThreadChooser
from icrl_fast.threads import affinity_cores

NEXT_STEP, SAME_STEP, DISABLED = 0, 1, 2
_DR = np.array([0, 1, 0, -1], dtype=np.int32)  # row change of left, down, right, up (gymnasium's order)
_DC = np.array([-1, 0, 1, 0], dtype=np.int32)
# Below this many envs a step runs in one thread. Measured with the step kernel (median per step, paper maps,
# non-slippery, 1 vs 2 threads; benchmarks/bench_env.py::test_step_threads times the same: re-run it on a quiet
# machine) on a 2-core AMD EPYC VM with a training run on one core, ours at nice -15 to stand in for a quiet
# machine: 1,024 envs 25 vs 28 us, 2,048 45 vs 36, 4,096 84 vs 58, 16,384 331 vs 211; from 4,096 up two threads
# win steadily (~1.5x), at 2,048 it varied between runs (0.65x-1.16x). At normal priority beside that run, two
# threads took ~8-12 ms per step at every size up to 65,536 (one: 8 us at 64 envs, 17 us at 1,024, 2.1 ms at
# 65,536): a parallel step waits for a worker that the scheduler has parked behind the other process. With the
# machine to itself (bench_env, 2026-11-30) two threads were ~2x faster at every size from 1,024 envs (78.8 M vs
# 39.3 M env-steps/s at 1,024), so this threshold trades that for not collapsing beside a busy core (one thread:
# 1,011x SyncVectorEnv there; two: 482x). It is now only where the timing-driven choice below starts. With the
# two-pass kernel (2026-12-02, 2-core Xeon VM, machine to itself, two recorded runs) two threads vs one: 1,024 envs
# 1.20-1.34x, 2,048 1.39-1.58x, 4,096 1.59-1.60x, 16,384 1.86-1.88x: on a quiet machine two threads pay from 1,024
# envs, which the chooser finds by itself; the fixed threshold stays for the busy machine, where they collapse.
PARALLEL_MIN_ENVS = 4096
# From this many envs on, the automatic thread count starts as above and then follows the step times: probes of the
# other count switch when it is faster (``thread_choice.ThreadChooser``), which gets two threads' 2x on a quiet
# machine and one thread's resilience beside a busy core.
ADAPTIVE_MIN_ENVS = 1024
_SPARE_SETS = 3  # output buffer sets a fresh step may recycle (see FrozenLakeBatch._fresh_buffers)
_MODE_CODE = {AutoresetMode.NEXT_STEP: NEXT_STEP, AutoresetMode.SAME_STEP: SAME_STEP, AutoresetMode.DISABLED: DISABLED}


def _most_references(arrays: tuple) -> int:
    """The highest reference count among ``arrays`` (as this function sees it)."""
    most = 0
    for a in arrays:
        most = max(most, sys.getrefcount(a))
    return most


@njit(inline="always", cache=True)
def slip_branch(u, slippery, success_rate):
    """Which of gymnasium's outcomes ``[(a-1)%4, a, (a+1)%4]`` a uniform ``u`` selects: returns 0, 1 or 2.

    Mirrors ``categorical_sample``: the first index whose cumulative probability exceeds ``u``, else 0.
    """
    if not slippery:
        return 1
    fail = (1.0 - success_rate) / 2.0
    c1 = fail + success_rate
    if fail > u:
        return 0
    if c1 > u:
        return 1
    if c1 + fail > u:
        return 2
    return 0


@njit(inline="always", cache=True)
def move(nrow, ncol, r, c, a, branch):
    """The cell ``(r', c')`` that action ``a`` (0 left, 1 down, 2 right, 3 up) bent by slip ``branch`` leads to from
    ``(r, c)`` on a ``nrow x ncol`` map; walls clamp."""
    d = (a + branch + 3) & 3  # branch 0, 1, 2 -> a - 1, a, a + 1 (mod 4); a is in 0..3
    # Branch-free move: random actions make a 4-way `if` mispredict most of the time (measured ~1.5x slower).
    return min(max(r + _DR[d], 0), nrow - 1), min(max(c + _DC[d], 0), ncol - 1)


@njit(inline="always", cache=True)
def transition(tiles, b, nrow, ncol, r, c, a, branch):
    """Apply action ``a`` bent by slip ``branch`` (see :func:`move`) at cell ``(r, c)`` of map ``b`` of ``tiles [B,
    rows, cols]`` (indexed, not sliced: a slice per env costs two atomic refcount updates).

    Returns ``(r', c', tile, from_terminal)``: the new cell, its tile code, and whether ``(r, c)`` was already a
    goal or hole (then gymnasium keeps the agent there with reward 0 and ``terminated=True``).
    """
    here = tiles[b, r, c]
    if here == GOAL or here == HOLE:
        return r, c, here, True
    r, c = move(nrow, ncol, r, c, a, branch)
    return r, c, tiles[b, r, c], False


@njit(inline="always", cache=True)
def start_from_uniform(starts, b, n_starts, u):
    """The start observation gymnasium's reset picks for uniform ``u``: its initial-state distribution puts
    ``1 / n_starts`` on each S tile in row-major order, and the first cumulative sum above ``u`` wins."""
    p = 1.0 / n_starts
    acc = 0.0
    for k in range(n_starts):
        acc += p
        if acc > u:
            return starts[b, k]
    return starts[b, n_starts - 1]  # u within rounding of 1 (gymnasium would pick cell 0 here, S or not)


@njit(inline="always", cache=True)
def start_slot(u, n_starts):
    """Which of ``n_starts`` S tiles a uniform ``u`` picks in the batched env and the learners: one multiply
    (``floor(u * n)``), uniform over the S tiles. (The single env keeps gymnasium's draw, ``start_from_uniform``.)"""
    return min(np.int64(u * n_starts), n_starts - 1)


@njit(inline="always", cache=True)
def landing(tile, from_terminal, reward_of_tile):
    """``(reward, done)`` of a move that landed on ``tile``: stepping *from* a goal or hole gives 0 and done
    (gymnasium's rule); otherwise the tile's reward, done on G or H."""
    if from_terminal:
        return 0.0, True
    return reward_of_tile[tile], tile == GOAL or tile == HOLE


@njit(cache=True)
def _first_bad_action(actions):
    for i in range(actions.shape[0]):
        if actions[i] < 0 or actions[i] > 3:
            return i
    return -1


@njit(inline="always", cache=True)
def _reset_one(i, tiles, ncol, starts, n_starts, pos, rng):
    st, u = next_uniform(rng[i])
    rng[i] = st
    s = starts[i, start_slot(u, n_starts[i])]
    w = np.int32(ncol[i])
    r = np.int32(s) // w  # int32 division: several times cheaper than int64 on x86
    pos[0, i] = r
    pos[1, i] = np.int32(s) - r * w
    pos[2, i] = 0
    pos[3, i] = 0
    return s


# The thread count is thread-local and set inside the kernel: numba.set_num_threads costs ~3 us per call from
# Python (measured: +8 us per step at 1,024 envs for a set and a restore), and called inside a kernel it is a
# ctypes pointer that stops the kernel from being cached. Numba's threading layer exports both functions to
# compiled code by name once its threads are launched (its own parallel loops call get_num_threads that way, and
# declare it as returning intp: the same declaration here, since a module holds one; the C function returns int).
_get_num_threads = types.ExternalFunction("get_num_threads", types.intp())
_set_num_threads = types.ExternalFunction("set_num_threads", types.void(types.intc))


# One kernel for every batch size, told how many threads to use: the prange kernel beats a plain-range one even
# in one thread (measured at 1,024 envs: 24 vs 115 us per step), because in a plain loop Numba keeps ~20 atomic
# refcount updates per env for the inlined helpers' array arguments, which its parfor lowering prunes.
# Two passes (issue #19): the move of every env first, with no branch on its outcome, then the resets of the envs
# that need one. With the reset inside the move loop, the "did it end?" branch (taken by a random ~1 in 6 envs per
# step on paper maps under random actions) mispredicted and kept the loop from being vectorised; the default modes
# (SAME_STEP, slippery or not) also get loops of their own in which the inlined move sees the mode as a constant.
# Measured (2-core Xeon VM, 2026-12-02, results bit-equal; the old and new kernels interleaved in one process, median
# of 7): 65,536 paper maps 72 -> 114 M env-steps/s in two threads, 39 -> 61 M in one; slippery 45 -> 93 M and
# 23 -> 52 M.
# pos rows: 0 row, 1 col, 2 elapsed steps, 3 reset flag (_PENDING: the episode ended under NEXT_STEP and the next
# step resets; _RESET_NOW: the second pass resets the env in this step).
_PENDING, _RESET_NOW = 1, 2


@njit(inline="always", cache=True)
def _move_one(i, a, tiles, nrow, ncol, pos, rng, slippery, success_rate, reward_of_tile, max_steps, mode, obs, rew,
              term, trunc, final_obs):
    """First pass for env ``i``: its move and outputs, or (NEXT_STEP, reset pending) the outputs of a reset step with
    the reset left to the second pass (which also resets where a SAME_STEP episode ended)."""
    if mode == NEXT_STEP and pos[3, i] == _PENDING:
        pos[3, i] = _RESET_NOW
        rew[i] = 0.0
        term[i] = False
        trunc[i] = False
        final_obs[i] = -1
        return
    branch = 1
    if slippery:
        st, u = next_uniform(rng[i])
        rng[i] = st
        branch = slip_branch(u, slippery, success_rate)
    r0, c0 = pos[0, i], pos[1, i]
    nc = ncol[i]
    # Only DISABLED ever steps from a goal or hole: SAME_STEP resets a finished env in its last step and NEXT_STEP in
    # the next one, and every reset lands on an S tile, so the other modes skip reading the tile they stand on.
    if mode == DISABLED:
        r, c, tile, from_terminal = transition(tiles, i, nrow[i], nc, r0, c0, a, branch)
    else:
        r, c = move(nrow[i], nc, r0, c0, a, branch)
        tile, from_terminal = tiles[i, r, c], False
    elapsed = pos[2, i] + 1
    # landing()'s rule written out as selects: through the call (a tuple, a branch) the loop measured ~1.7x slower
    done = from_terminal | (tile == GOAL) | (tile == HOLE)
    rew[i] = 0.0 if from_terminal else reward_of_tile[tile]
    cut = (max_steps > 0) & (elapsed >= max_steps)
    end = done | cut
    s = r * nc + c
    term[i] = done
    trunc[i] = cut
    final_obs[i] = s if end & (mode == SAME_STEP) else -1
    obs[i] = s
    pos[0, i] = r
    pos[1, i] = c
    pos[2, i] = elapsed
    if mode == NEXT_STEP:  # (SAME_STEP's second pass resets where the step ended: no flag to store)
        pos[3, i] = np.int32(end) * _PENDING


@njit(parallel=True, cache=True)
def _step_kernel(n_threads, actions, tiles, nrow, ncol, starts, n_starts, pos, rng, slippery, success_rate,
                 reward_of_tile, max_steps, mode, obs, rew, term, trunc, final_obs):
    """Step every env in ``n_threads`` threads (1 .. NUMBA_NUM_THREADS); returns how many envs returned terminated
    or truncated (>= 0), or ``-1 - i`` for the first env ``i`` whose action is outside 0..3 (nothing stepped).
    The calling thread's Numba thread count is restored on return."""
    bad = np.int64(0)
    for i in range(actions.shape[0]):  # no early exit: a loop the compiler vectorises
        bad |= (actions[i] < 0) | (actions[i] > 3)
    if bad:
        return -1 - _first_bad_action(actions)
    caller = np.int32(_get_num_threads())  # the low 32 bits hold the C int
    _set_num_threads(n_threads)
    # the default modes get loops of their own, where the inlined move sees mode and slippery as constants
    if mode == SAME_STEP and not slippery:
        for i in prange(actions.shape[0]):
            _move_one(i, actions[i], tiles, nrow, ncol, pos, rng, False, success_rate, reward_of_tile,
                      max_steps, SAME_STEP, obs, rew, term, trunc, final_obs)
    elif mode == SAME_STEP:
        for i in prange(actions.shape[0]):
            _move_one(i, actions[i], tiles, nrow, ncol, pos, rng, True, success_rate, reward_of_tile,
                      max_steps, SAME_STEP, obs, rew, term, trunc, final_obs)
    else:
        for i in prange(actions.shape[0]):
            _move_one(i, actions[i], tiles, nrow, ncol, pos, rng, slippery, success_rate, reward_of_tile,
                      max_steps, mode, obs, rew, term, trunc, final_obs)
    ended = 0  # counted here, not in the first pass: a reduction there keeps it from being vectorised
    for i in prange(actions.shape[0]):
        end = term[i] | trunc[i]
        ended += np.int64(end)
        if end if mode == SAME_STEP else pos[3, i] == _RESET_NOW:
            obs[i] = _reset_one(i, tiles, ncol, starts, n_starts, pos, rng)
    _set_num_threads(caller)
    return ended


def step_threads(num_envs: int, num_threads: int | None = None) -> int:
    """How many threads a step of ``num_envs`` envs uses: ``num_threads`` if given (1 .. NUMBA_NUM_THREADS,
    else ``ValueError``); otherwise 1 below ``PARALLEL_MIN_ENVS`` envs, and above it the cores this process may
    run on (``os.sched_getaffinity``), never more than ``numba.config.NUMBA_NUM_THREADS``."""
    limit = numba.config.NUMBA_NUM_THREADS
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) \
                or not 1 <= num_threads <= limit:
            raise ValueError(f"num_threads must be an int in 1..{limit} (NUMBA_NUM_THREADS) or None (automatic), "
                             f"got {num_threads!r}")
        return int(num_threads)
    return 1 if num_envs < PARALLEL_MIN_ENVS else usable_threads()


def usable_threads() -> int:
    """The cores this process may run on (``threads.affinity_cores``), at most ``numba.config.NUMBA_NUM_THREADS``."""
    return max(1, min(affinity_cores(), numba.config.NUMBA_NUM_THREADS))


@njit(cache=True)
def _reset_masked(mask, tiles, ncol, starts, n_starts, pos, rng, obs, rew, term, trunc, final_obs):
    for i in range(mask.shape[0]):
        if mask[i]:
            obs[i] = _reset_one(i, tiles, ncol, starts, n_starts, pos, rng)
            rew[i] = 0.0
            term[i] = False
            trunc[i] = False
            final_obs[i] = -1


@njit(cache=True)
def _seed_streams(seed, rng, mask):
    for i in range(rng.shape[0]):
        if mask[i]:
            rng[i] = stream_state(seed, np.uint64(i))


@njit(cache=True)
def step_single(tiles, nrow, ncol, s, a, branch):
    """One env (``tiles [1, rows, cols]``), one step along slip ``branch``: returns ``(s', tile, from_terminal)``."""
    r = s // ncol
    r2, c2, tile, from_terminal = transition(tiles, 0, nrow, ncol, r, s - r * ncol, a, branch)
    return r2 * ncol + c2, tile, from_terminal


@njit(cache=True)
def start_single(starts, n_starts, u):
    """Start observation of a single env (``starts [1, cells]``) for uniform ``u`` (gymnasium's reset draw)."""
    return start_from_uniform(starts, 0, n_starts, u)


def parse_autoreset_mode(mode) -> AutoresetMode:
    """Accept an ``AutoresetMode`` or its value (``"SameStep"``, ``"NextStep"``, ``"Disabled"``)."""
    try:
        return mode if isinstance(mode, AutoresetMode) else AutoresetMode(mode)
    except ValueError:
        raise ValueError(f"autoreset_mode must be one of {[m.value for m in AutoresetMode]}, got {mode!r}") from None


def validate_dynamics(success_rate: float, reward_schedule, max_episode_steps) -> tuple[float, np.ndarray, int]:
    """Check the env parameters shared by the single and batched envs; return them in kernel form:
    ``(success_rate, reward of each tile code [4], max steps or 0 for no limit)``."""
    if not 0.0 <= float(success_rate) <= 1.0:
        raise ValueError(f"success_rate must be a probability in [0, 1], got {success_rate}")
    try:
        rewards = np.array([float(x) for x in reward_schedule], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"reward_schedule must be 3 numbers (goal, hole, other), got {reward_schedule!r}") from None
    if rewards.shape != (3,):
        raise ValueError(f"reward_schedule must be 3 numbers (goal, hole, other), got {reward_schedule!r}")
    goal, hole, other = rewards
    reward_of_tile = np.array([other, other, hole, goal], dtype=np.float64)  # indexed by FROZEN, START, HOLE, GOAL
    if max_episode_steps is None:
        return float(success_rate), reward_of_tile, 0
    if isinstance(max_episode_steps, bool) or not isinstance(max_episode_steps, (int, np.integer)) \
            or max_episode_steps < 1:
        raise ValueError(f"max_episode_steps must be a positive int or None, got {max_episode_steps!r}")
    return float(success_rate), reward_of_tile, int(max_episode_steps)


class FrozenLakeBatch:
    """``B`` Frozen Lake envs, one map each (sizes may differ), stepped in lockstep by one Numba kernel.

    State and outputs are structure-of-arrays buffers owned by the object and **written in place**: the
    arrays returned by :meth:`reset` and :meth:`step` are overwritten by the next call (copy what you keep).

    Args:
        maps: one map per env (:class:`~icrl_fast.envs.maps.MapBatch` of length ``B``).
        is_slippery, success_rate, reward_schedule: gymnasium's ``FrozenLake-v1`` arguments (same defaults).
        max_episode_steps: truncation length (gymnasium registers 100 for ``FrozenLake-v1``); ``None`` = never.
        autoreset_mode: ``AutoresetMode`` or its value; SAME_STEP by default.
        seed: default seed of the per-env streams (env ``i`` draws from stream ``(seed, i)``); a seed given to
            :meth:`reset` replaces it. ``None``: fresh OS entropy, as gymnasium does when unseeded.
        num_threads: threads per step (kept in ``self.num_threads``); ``None`` starts from batch size and usable
            cores (:func:`step_threads`) and, from ``ADAPTIVE_MIN_ENVS`` envs, follows the measured step times
            (``self.num_threads`` is then the count in use). Results do not depend on it (one stream per env).

    Buffers: ``obs`` int64 [B], ``rewards`` float64 [B], ``terminated`` bool [B], ``truncated`` bool [B],
    ``final_obs`` int64 [B] (the observation a finished episode ended on under SAME_STEP, else -1).
    """

    def __init__(self, maps: MapBatch, *, is_slippery: bool = True, success_rate: float = 1.0 / 3.0,
                 reward_schedule=(1, 0, 0), max_episode_steps: int | None = 100,
                 autoreset_mode=AutoresetMode.SAME_STEP, seed: int | None = None, num_threads: int | None = None):
        if not isinstance(maps, MapBatch):
            raise TypeError(f"maps must be a MapBatch (see icrl_fast.envs.maps), got {type(maps).__name__}")
        self.maps = maps
        self.num_envs = n = len(maps)
        self.is_slippery = bool(is_slippery)
        self.success_rate, self._reward_of_tile, self._max_steps = validate_dynamics(
            success_rate, reward_schedule, max_episode_steps)
        self.max_episode_steps = max_episode_steps
        self.autoreset_mode = parse_autoreset_mode(autoreset_mode)
        self._mode = _MODE_CODE[self.autoreset_mode]
        self._seed = as_seed(seed) if seed is not None else None
        self.num_threads = step_threads(n, num_threads)
        most = usable_threads()
        # automatic: from ADAPTIVE_MIN_ENVS envs on, the step times themselves choose between one thread and all
        self._chooser = (ThreadChooser(self.num_threads, most if self.num_threads == 1 else 1)
                         if num_threads is None and most > 1 and n >= ADAPTIVE_MIN_ENVS else None)
        numba.get_num_threads()  # launches Numba's threads, which exports the symbols the step kernel calls
        self._pos = np.zeros((4, n), dtype=np.int32)
        self._rng = np.zeros(n, dtype=np.uint64)
        self.obs = np.zeros(n, dtype=np.int64)
        self.rewards = np.zeros(n, dtype=np.float64)
        self.terminated = np.zeros(n, dtype=np.bool_)
        self.truncated = np.zeros(n, dtype=np.bool_)
        self.final_obs = np.full(n, -1, dtype=np.int64)
        self.ended = 0  # envs whose last step returned terminated or truncated
        self._unshared = (np.empty(1),)  # an array only a tuple holds: the reference count of a buffer no one has
        self._spare: list[tuple[np.ndarray, ...]] = []  # output buffers that fresh steps hand out and take back
        self._ready = False

    @property
    def elapsed_steps(self) -> np.ndarray:
        """``int32 [B]`` steps taken in each env's current episode (a view)."""
        return self._pos[2]

    def reset(self, seed: int | None = None, mask: np.ndarray | None = None, *, fresh: bool = False) -> np.ndarray:
        """Reset all envs, or those where ``mask`` (bool [B]) is true; return the ``obs`` buffer.

        ``seed`` reseeds the streams of the envs being reset (env ``i`` gets stream ``(seed, i)``). ``fresh``: as in
        :meth:`step`, the buffers a caller got from an earlier step are left alone (the others' values carried over).
        """
        n = self.num_envs
        if mask is None:
            mask = np.ones(n, dtype=np.bool_)
        else:
            mask = np.asarray(mask)
            if mask.shape != (n,) or mask.dtype != np.bool_:
                raise ValueError(f"mask must be a bool array of shape ({n},), got {mask.dtype} {mask.shape}")
            if not self._ready and not mask.all():
                raise ValueError("the first reset must reset every env (mask=None)")
        if fresh:
            old = (self.obs, self.rewards, self.terminated, self.truncated, self.final_obs)
            new = self._fresh_buffers()
            for a, b in zip(old, new):
                b[...] = a
            self.obs, self.rewards, self.terminated, self.truncated, self.final_obs = new
        self._seed = choose_seed(self._seed, seed)
        if seed is not None or not self._ready:
            _seed_streams(self._seed, self._rng, mask)
        self.ended = 0
        _reset_masked(mask, self.maps.tiles, self.maps.ncol, self.maps.starts, self.maps.n_starts, self._pos,
                      self._rng, self.obs, self.rewards, self.terminated, self.truncated, self.final_obs)
        self._ready = True
        return self.obs

    def step(self, actions, *, fresh: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step every env with ``actions`` (integers in 0..3, shape [B]).

        Returns the ``(obs, rewards, terminated, truncated)`` buffers, overwritten in place by the next call;
        with ``fresh=True`` the step writes into newly allocated buffers instead (safe to keep, and cheaper than
        copying the results afterwards). ``final_obs`` follows the same rule.
        """
        if not self._ready:
            raise RuntimeError("call reset() before step()")
        if type(actions) is not np.ndarray or actions.dtype.kind not in "iu":
            actions = np.asarray(actions)
            if actions.dtype.kind not in "iu":
                raise TypeError(f"actions must be integers in 0..3, got dtype {actions.dtype}")
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {actions.shape}")
        held = None
        if fresh:  # (kept to put back if the step is refused)
            held = (self.obs, self.rewards, self.terminated, self.truncated, self.final_obs)
            self.obs, self.rewards, self.terminated, self.truncated, self.final_obs = self._fresh_buffers()
        m, chooser = self.maps, self._chooser
        threads = self.num_threads if chooser is None else chooser.pick()
        start = time.perf_counter()
        ended = _step_kernel(
            threads, actions, m.tiles, m.nrow, m.ncol, m.starts, m.n_starts, self._pos, self._rng,
            self.is_slippery, self.success_rate, self._reward_of_tile, self._max_steps, self._mode, self.obs,
            self.rewards, self.terminated, self.truncated, self.final_obs)
        if ended < 0:  # nothing was stepped: the buffers stay the ones that hold the state
            if held is not None:
                self.obs, self.rewards, self.terminated, self.truncated, self.final_obs = held
            bad = -1 - ended
            raise ValueError(f"actions must be in 0..3 (left, down, right, up); env {bad} got {actions[bad]}")
        if chooser is not None:
            chooser.record(threads, time.perf_counter() - start)
            self.num_threads = chooser.current
        self.ended = ended
        return self.obs, self.rewards, self.terminated, self.truncated

    def _fresh_buffers(self) -> tuple[np.ndarray, ...]:
        """Output buffers that no one but this object can see: a set handed out by an earlier fresh step whose arrays
        nothing else references any more (their reference counts say so: a caller's variable, a view, a tensor
        sharing the memory all hold one), else newly allocated ones (at most ``_SPARE_SETS`` kept for reuse).
        Either way nothing a caller still holds is ever written again: ``fresh`` semantics, without allocating
        five arrays per step in a loop that drops each step's results. (A raw pointer, ``ctypes.data`` or
        ``__array_interface__``, holds no reference: a caller keeping one must keep the array too.)"""
        current, unshared = self.obs, _most_references(self._unshared)  # measured now, the same way
        for bufs in self._spare:  # (the current set is also referenced by the attributes)
            if bufs[0] is not current and _most_references(bufs) == unshared:
                return bufs
        n = self.num_envs
        bufs = (np.empty(n, np.int64), np.empty(n, np.float64), np.empty(n, np.bool_), np.empty(n, np.bool_),
                np.empty(n, np.int64))
        if len(self._spare) < _SPARE_SETS:
            self._spare.append(bufs)
        return bufs
