"""A hard-wired same-state head for the step formats: what each action did from this cell before, in this context.

Issue 17's model option "a hard-wired same-state (n-gram induction) attention head" (arXiv 2411.01958). At a
decision position ``p`` (a ``START(o)`` or ``LAND(a, move, o)`` token: the agent stands on ``o``) the head looks at
every earlier decision on the same ``o`` and at the token that followed it (the action taken there and where it
landed), and returns, per action ``a`` and outcome class (``icrl_fast.envs.outcomes``, what any environment with
discrete observations returns: ``MOVED`` elsewhere, ``STAYED`` on ``o`` (a wall or a slip back), the episode
ended without a reward (``HOLE`` on Frozen Lake) or with one (``GOAL``)):

* ``log1p(count)``: how often ``a`` from ``o`` had that outcome so far (16 values): a fixed attention head with
  equal weight on every same-state position and one-hot values, summed instead of averaged;
* a one-hot of the **latest** outcome of ``a`` from ``o`` (16 values, all zero if ``a`` was never tried there):
  the same head with all its weight on the most recent same-state position per action (what a changed map
  needs: the count remembers the old map, the latest outcome the new one).

With ``forget`` (``--model.memory_forget``) a *surprise* -- an action whose outcome from a cell differs from its
latest there, which on the deterministic (non-slippery) maps happens only when the map changed -- empties the
context's counts before it is counted: after a switch the head reads the new map as a fresh one, as the
forgetting teacher (``learners.teacher_observe``) does, by the same rule: a cut landing (whose outcome the teacher
cannot see, and which ``step-noend`` shows without its cell) is neither a surprise nor what one is checked against.
On a map that does not change the features are the same either way.

So ``MEMORY_DIM = 32`` features per position, zero at every position that is not a decision. A ``cut`` landing
(time limit) counts by where it landed, as a move. The features are a pure function of the tokens up to and
including ``p``: a model adds ``Linear(32, d)`` of them to the token embedding (``FactoredEmbedding``). The
rollout engine reads each context's new tokens into that context's counts (``MemoryStream``), so a cached step sees
what a full forward of the context sees (tested).
"""

from __future__ import annotations

import itertools

import numpy as np
from numba import njit

from icrl_fast.data.step_format import KINDS, TYPE_LAND0, TYPE_START
from icrl_fast.envs.outcomes import ENDED_REWARDED, ENDED_UNREWARDED, MOVED, STAYED, outcome_class, surprised  # noqa: F401 (re-exported)

HOLE, GOAL = ENDED_UNREWARDED, ENDED_REWARDED  # on Frozen Lake (icrl_fast.envs.outcomes: any discrete env's classes)
MEMORY_DIM = 32
_KIND_MOVE, _KIND_GOAL, _KIND_HOLE, _KIND_CUT = (KINDS.index(k) for k in ("move", "goal", "hole", "cut"))


@njit(cache=True)
def _scan(types, acts, obs, ids, begin, first, forget, out, count, latest, known):
    """Read positions ``begin ..`` of one sequence ``ids`` into ``count`` ``[obs, 4, 4]`` and ``latest`` ``[obs, 4]``
    (what positions before ``begin`` left there; position ``begin - 1`` is read only as the decision a landing at
    ``begin`` answers) and write the features of positions ``first >= begin ..`` into ``out[:len(ids) - first]``;
    ``forget``: a surprise empties ``count``, ``latest`` and ``known`` first (see the module docstring); ``known``
    ``[obs, 4]`` holds the latest outcome seen at a landing that is not a cut, what a surprise is checked against."""
    land0 = TYPE_LAND0
    for p in range(begin, ids.shape[0]):
        t = types[ids[p]]
        if p > 0 and t >= land0:  # a landing: the action taken at p - 1, if p - 1 was a decision
            tp = types[ids[p - 1]]
            if tp == TYPE_START or tp == land0 + _KIND_MOVE:
                s = obs[ids[p - 1]] - 1
                a = acts[ids[p]] - 1
                kind = t - land0
                ended = kind == _KIND_GOAL or kind == _KIND_HOLE  # the step format's goal: ended with a reward
                c = outcome_class(not ended and obs[ids[p]] - 1 == s, ended, kind == _KIND_GOAL)
                if forget and kind != _KIND_CUT and surprised(known, s, a, c):
                    count[:] = 0
                    latest[:] = -1
                count[s, a, c] += 1
                latest[s, a] = c
        if p < first:
            continue
        row = out[p - first]
        row[:] = 0.0
        if t == TYPE_START or t == land0 + _KIND_MOVE:
            s = obs[ids[p]] - 1
            for a in range(4):
                for c in range(4):
                    if count[s, a, c] > 0:
                        row[a * 4 + c] = np.log1p(np.float32(count[s, a, c]))
                if latest[s, a] >= 0:
                    row[16 + a * 4 + latest[s, a]] = 1.0


class SameStateMemory:
    """The features above for one step format, from its ``token_factors`` (type, action + 1, observation + 1)."""

    def __init__(self, token_factors, forget: bool = False):
        f = np.asarray(token_factors)
        if f.ndim != 2 or f.shape[1] != 3:
            raise ValueError("the same-state memory reads a step format's token factors [vocab, 3] (type, action, "
                             f"observation): use --data.format step or step-grid, got factors of shape {f.shape}")
        self.types, self.acts, self.obs = (np.ascontiguousarray(f[:, i], dtype=np.int64) for i in range(3))
        self.vocab = len(f)
        self.cells = int(self.obs.max()) + 1
        self.forget = bool(forget)

    def _check(self, ids: np.ndarray) -> np.ndarray:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise ValueError(f"token ids must be in 0..{self.vocab - 1} for this format")
        return ids

    def features(self, ids) -> np.ndarray:
        """float32 ``[..., L, MEMORY_DIM]`` of ``ids`` ``[..., L]``: each row one whole context from its start."""
        ids = self._check(ids)
        rows = ids.reshape(-1, ids.shape[-1]) if ids.ndim else ids.reshape(1, 1)
        out = np.zeros((*rows.shape, MEMORY_DIM), dtype=np.float32)
        for r in range(rows.shape[0]):
            count, latest, known = self._fresh(1)
            _scan(self.types, self.acts, self.obs, rows[r], 0, 0, self.forget, out[r], count[0], latest[0], known[0])
        return out.reshape(*ids.shape, MEMORY_DIM)

    def _fresh(self, contexts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Empty ``(count, latest, known)`` of ``contexts`` contexts."""
        return (np.zeros((contexts, self.cells, 4, 4), dtype=np.int32),
                np.full((contexts, self.cells, 4), -1, dtype=np.int8),
                np.full((contexts, self.cells, 4), -1, dtype=np.int8))

    def stream(self, contexts: int) -> MemoryStream:
        """Incremental features of ``contexts`` growing contexts (the rollout engine's)."""
        return MemoryStream(self, contexts)


class MemoryStream:
    """The features of contexts that grow by a few tokens per call: each context's counts so far and how many of its
    tokens were read are kept, so a call reads only the new tokens (what ``features`` of the whole context gives for
    them; tested)."""

    def __init__(self, memory: SameStateMemory, contexts: int):
        self.memory = memory
        self.count, self.latest, self.known = memory._fresh(contexts)
        self.read = np.zeros(contexts, dtype=np.int64)

    def tails(self, rows, contexts, width: int) -> np.ndarray:
        """float32 ``[len(rows), width, MEMORY_DIM]``: the features of the last ``n <= width`` tokens of context
        ``rows[i]`` (``contexts[i]``: ``(tokens, n)``, the whole context fed so far, of which all but the last ``n``
        were read by earlier calls), right-aligned, zero on the left (the rollout engine's left-padded call).

        One kernel call reads every context's new tokens (``_scan_tails``): per context only a slice is taken here
        (a call per context cost ~10 us, half the features' time in a rollout step of 50 contexts)."""
        m = self.memory
        rows, contexts = np.asarray(rows, dtype=np.int64), list(contexts)
        if rows.ndim != 1 or len(contexts) != len(rows) or len(np.unique(rows)) != len(rows) \
                or (rows.size and (rows.min() < 0 or rows.max() >= len(self.read))):
            raise ValueError(f"tails needs one (tokens, n) per row and distinct rows in 0..{len(self.read) - 1}, got "
                             f"rows {rows.tolist()} and {len(contexts)} contexts")
        pieces, backs, ns = [], np.zeros(len(rows), np.int64), np.zeros(len(rows), np.int64)
        for i, (b, (tokens, n)) in enumerate(zip(rows.tolist(), contexts)):
            read = int(self.read[b])
            if not 0 < n <= width or len(tokens) - n != read:
                raise ValueError(f"context {b}: {len(tokens)} tokens of which {read} were read; a tail of {n} tokens "
                                 f"needs 0 < n <= width ({width}) and exactly the unread ones")
            backs[i] = back = min(read, 1)  # the decision a first new landing answers
            ns[i] = n
            pieces.append(tokens[read - back:])
        sizes = backs + ns
        ids = m._check(np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int64, count=int(sizes.sum())))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        out = np.zeros((len(rows), width, MEMORY_DIM), dtype=np.float32)
        _scan_tails(m.types, m.acts, m.obs, ids, offsets, backs, ns, rows, m.forget, out, self.count, self.latest,
                    self.known)
        self.read[rows] += ns
        return out


@njit(cache=True)
def _scan_tails(types, acts, obs, ids, offsets, backs, ns, rows, forget, out, count, latest, known):
    """``MemoryStream.tails``' reads: context ``rows[i]``'s tokens are ``ids[offsets[i]:offsets[i + 1]]`` (``backs[i]``
    already read, then ``ns[i]`` new ones), its features go to the right end of ``out[i]``."""
    width = out.shape[1]
    for i in range(rows.shape[0]):
        b = rows[i]
        _scan(types, acts, obs, ids[offsets[i]:offsets[i + 1]], backs[i], backs[i], forget, out[i, width - ns[i]:],
              count[b], latest[b], known[b])
