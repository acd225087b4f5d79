"""Frozen Lake maps: parsing, named maps, the paper's parametric generator, and BFS goal distances.

A batch of maps of possibly different sizes is stored padded (structure of arrays) in :class:`MapBatch`:
``tiles[b, r, c]`` holds a tile code for ``r < nrow[b]``, ``c < ncol[b]`` and :data:`PAD` elsewhere. The
observation of a cell is ``r * ncol[b] + c`` exactly as in gymnasium's ``FrozenLake-v1``.

The generator follows arXiv 2501.14176 (see ``DESIGN.md`` §1): height and width drawn independently; every
cell is a start with ``p_start``, then every remaining cell a goal with ``p_goal``, then every remaining cell a
hole with ``p_hole``. A map is valid iff it has at least one S and one G and, from *every* S, a breadth-first
search that avoids holes reaches the nearest G in at least ``min_hops`` moves. Maps of one batch are unique.
Candidate ``k`` of a seed draws from its own random stream ``(seed, k)``; candidates are sampled in parallel
and accepted serially in index order, so a seed determines the batch whatever the thread count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

from icrl_fast.envs.rng import as_seed, mix64, next_uniform, stream_state

# Tile codes. Order chosen so that a code indexes LETTERS; PAD marks storage outside a smaller map.
FROZEN, START, HOLE, GOAL, PAD = 0, 1, 2, 3, 4
LETTERS = "FSHG"
_CODE_OF = {"F": FROZEN, "S": START, "H": HOLE, "G": GOAL}

#: Named maps: gymnasium's two, and the behaviour-stitching map of the paper (4 wide x 6 high).
MAPS: dict[str, list[str]] = {
    "4x4": ["SFFF", "FHFH", "FFFH", "HFFG"],
    "8x8": ["SFFFFFFF", "FFFFFFFF", "FFFHFFFF", "FFFFFHFF", "FFFHFFFF", "FHHFFFHF", "FHFFHFHF", "FFFHFFFG"],
    "stitching": ["HHFF", "FFFF", "SFFH", "HFFF", "HFFF", "HFGF"],
}

_MOVES_R = np.array([0, 1, 0, -1], dtype=np.int64)  # left, down, right, up (gymnasium's action order)
_MOVES_C = np.array([-1, 0, 1, 0], dtype=np.int64)


def parse_desc(desc) -> np.ndarray:
    """Parse a gymnasium-style map description into a ``uint8 [nrow, ncol]`` array of tile codes.

    Accepts a sequence of strings (``["SFFF", "FHFH", ...]``), of bytes, of sequences of one-letter strings, or a
    2-D numpy array of single characters (gymnasium's ``desc``, dtype ``'S1'``). Raises ``ValueError`` naming the
    problem for an empty map, ragged rows, letters other than F/S/H/G, or a map without an S or a G.
    """
    if isinstance(desc, (str, bytes)):
        raise ValueError(f"desc must be a list of rows such as ['SFF', 'FHG'], got a single string {desc!r}")
    if isinstance(desc, np.ndarray) and desc.ndim == 2:
        rows = ["".join(x.decode() if isinstance(x, bytes) else str(x) for x in row) for row in desc]
    else:
        try:
            rows = [r.decode() if isinstance(r, bytes) else r if isinstance(r, str) else "".join(r) for r in desc]
        except TypeError as e:
            raise ValueError(f"desc must be a list of rows of tile letters, got {desc!r}") from e
    if not rows or not rows[0]:
        raise ValueError("desc is empty: give at least one row with at least one tile")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"desc rows have different lengths {[len(r) for r in rows]}: every row must be as wide")
    bad = sorted({ch for r in rows for ch in r} - set(LETTERS))
    if bad:
        raise ValueError(f"desc has unknown tile letters {bad}; only F (frozen), S, H (hole) and G are allowed")
    tiles = np.array([[_CODE_OF[ch] for ch in r] for r in rows], dtype=np.uint8)
    if not (tiles == START).any():
        raise ValueError(f"desc has no start tile 'S': {rows}")
    if not (tiles == GOAL).any():
        raise ValueError(f"desc has no goal tile 'G': {rows}")
    return tiles


def resolve_desc(desc=None, map_name: str | None = "4x4", seed: int | None = None) -> list[str]:
    """gymnasium's map selection: ``desc`` if given, else the named map, else a random 8x8 map.

    The random 8x8 case calls gymnasium's own ``generate_random_map`` (the reference semantics), seeded by
    ``seed`` when one is given.
    """
    if desc is not None:
        tiles = parse_desc(desc)
        return ["".join(LETTERS[t] for t in row) for row in tiles]
    if map_name is None:
        from gymnasium.envs.toy_text.frozen_lake import generate_random_map

        return list(generate_random_map(seed=seed))
    if map_name not in MAPS:
        raise ValueError(f"unknown map_name {map_name!r}; known maps: {sorted(MAPS)} (or pass desc=...)")
    return list(MAPS[map_name])


@dataclass(frozen=True, eq=False)
class MapBatch:
    """A batch of maps in padded structure-of-arrays storage.

    Attributes:
        tiles: ``uint8 [B, max_rows, max_cols]`` tile codes (:data:`FROZEN`, :data:`START`, :data:`HOLE`,
            :data:`GOAL`), :data:`PAD` outside each map.
        nrow, ncol: ``int32 [B]`` size of each map.
        starts: ``int32 [B, max S tiles in the batch]`` observations (``r * ncol + c``) of each map's S tiles in
            row-major order, then ``-1``; derived.
        n_starts: ``int32 [B]`` number of S tiles; derived.
    """

    tiles: np.ndarray
    nrow: np.ndarray
    ncol: np.ndarray
    starts: np.ndarray = field(init=False, repr=False)
    n_starts: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        tiles = np.ascontiguousarray(self.tiles, dtype=np.uint8)
        if tiles.ndim != 3:
            raise ValueError(f"tiles must be [B, rows, cols], got shape {tiles.shape}")
        nrow = np.ascontiguousarray(self.nrow, dtype=np.int32)
        ncol = np.ascontiguousarray(self.ncol, dtype=np.int32)
        if nrow.shape != (tiles.shape[0],) or ncol.shape != (tiles.shape[0],):
            raise ValueError(f"nrow {nrow.shape} and ncol {ncol.shape} must be [B] with B = {tiles.shape[0]}")
        object.__setattr__(self, "tiles", tiles)
        object.__setattr__(self, "nrow", nrow)
        object.__setattr__(self, "ncol", ncol)
        starts, n_starts = _start_tables(tiles, nrow, ncol)
        if (n_starts == 0).any():  # a reset would have no tile to start on (the step kernels assume one)
            raise ValueError(f"every map needs an S tile; map {int(np.flatnonzero(n_starts == 0)[0])} has none")
        object.__setattr__(self, "starts", starts)
        object.__setattr__(self, "n_starts", n_starts)

    @classmethod
    def from_descs(cls, descs: Sequence) -> MapBatch:
        """Build a batch from gymnasium-style descriptions (each validated by :func:`parse_desc`)."""
        parsed = [parse_desc(d) for d in descs]
        if not parsed:
            raise ValueError("from_descs needs at least one map")
        max_r = max(t.shape[0] for t in parsed)
        max_c = max(t.shape[1] for t in parsed)
        tiles = np.full((len(parsed), max_r, max_c), PAD, dtype=np.uint8)
        for b, t in enumerate(parsed):
            tiles[b, : t.shape[0], : t.shape[1]] = t
        return cls(tiles, [t.shape[0] for t in parsed], [t.shape[1] for t in parsed])

    @classmethod
    def repeat(cls, desc, n: int) -> MapBatch:
        """``n`` copies of one map."""
        one = cls.from_descs([desc])
        return cls(np.repeat(one.tiles, n, axis=0), np.repeat(one.nrow, n), np.repeat(one.ncol, n))

    def __len__(self) -> int:
        return self.tiles.shape[0]

    def __getitem__(self, index) -> MapBatch:
        """A sub-batch (an int selects a batch of one)."""
        if isinstance(index, (int, np.integer)):
            index = [index]
        return MapBatch(self.tiles[index], self.nrow[index], self.ncol[index])

    @property
    def num_cells(self) -> np.ndarray:
        """``int32 [B]``: observations per map (``nrow * ncol``)."""
        return self.nrow * self.ncol

    def to_desc(self, b: int) -> list[str]:
        """Map ``b`` as gymnasium's ``desc`` (a list of strings)."""
        r, c = int(self.nrow[b]), int(self.ncol[b])
        return ["".join(LETTERS[t] for t in row) for row in self.tiles[b, :r, :c]]

    def goal_distances(self) -> np.ndarray:
        """``int32 [B, max_rows * max_cols]``: hole-free moves from each cell (flat ``r * ncol + c``) to its
        nearest goal; ``0`` on goals, ``-1`` for holes, padding and cells that cannot reach a goal."""
        cells = self.tiles.shape[1] * self.tiles.shape[2]
        out = np.empty((len(self), cells), dtype=np.int32)
        _goal_distances_batch(self.tiles, self.nrow, self.ncol, out)
        return out

    def shortest_start_goal(self) -> np.ndarray:
        """``int32 [B]``: min over S tiles of the moves to the nearest goal (``-1`` if some S cannot reach one)."""
        d = self.goal_distances()
        out = np.empty(len(self), dtype=np.int32)
        for b in range(len(self)):
            ds = d[b, self.starts[b, : self.n_starts[b]]]
            out[b] = -1 if (ds < 0).any() else ds.min()
        return out


@njit(cache=True)
def _start_tables(tiles, nrow, ncol):
    n, max_r, max_c = tiles.shape
    starts = np.full((n, max_r * max_c), -1, dtype=np.int32)
    n_starts = np.zeros(n, dtype=np.int32)
    for b in range(n):
        k = 0
        for r in range(nrow[b]):
            for c in range(ncol[b]):
                if tiles[b, r, c] == START:
                    starts[b, k] = r * ncol[b] + c
                    k += 1
        n_starts[b] = k
    # Keep only as many columns as the most S tiles any map has: resets read this table at random rows,
    # and a narrow table stays in cache (25 -> ~6 columns for 3-5 maps).
    return starts[:, : max(1, n_starts.max())].copy(), n_starts


@njit(cache=True)
def _goal_bfs(tiles, nrow, ncol, dist, queue):
    """Multi-source BFS from every goal through S/F tiles of one map ``tiles [rows, cols]``.

    Fills ``dist`` (flat ``r * ncol + c``, length >= nrow * ncol) with moves to the nearest goal, -1 where
    unreachable. ``queue`` is scratch of the same length. Goals and holes end an episode, so a path only passes
    through S and F tiles: the search never expands *through* a goal or into a hole.
    """
    head = 0
    tail = 0
    for s in range(nrow * ncol):
        dist[s] = -1
    for r in range(nrow):
        for c in range(ncol):
            if tiles[r, c] == GOAL:
                s = r * ncol + c
                dist[s] = 0
                queue[tail] = s
                tail += 1
    while head < tail:
        s = queue[head]
        head += 1
        r = s // ncol
        c = s - r * ncol
        for a in range(4):
            nr = r + _MOVES_R[a]
            nc = c + _MOVES_C[a]
            if nr < 0 or nr >= nrow or nc < 0 or nc >= ncol:
                continue
            if tiles[nr, nc] == HOLE:  # goals are sources at distance 0 already, so never re-entered
                continue
            ns = nr * ncol + nc
            if dist[ns] == -1:
                dist[ns] = dist[s] + 1
                queue[tail] = ns
                tail += 1


@njit(parallel=True, cache=True)
def _goal_distances_batch(tiles, nrow, ncol, out):
    n = tiles.shape[0]
    out[:] = -1
    for b in prange(n):
        queue = np.empty(out.shape[1], dtype=np.int32)
        _goal_bfs(tiles[b], nrow[b], ncol[b], out[b], queue)


@njit(cache=True)
def _min_start_goal(tiles, nrow, ncol, dist, queue):
    """min over S of moves to the nearest G; -1 if there is no S, no G, or an S that cannot reach a G."""
    _goal_bfs(tiles, nrow, ncol, dist, queue)
    best = -1
    for r in range(nrow):
        for c in range(ncol):
            if tiles[r, c] == START:
                d = dist[r * ncol + c]
                if d < 0:
                    return -1
                if best < 0 or d < best:
                    best = d
    return best


@njit(cache=True)
def _map_hash(tiles, nrow, ncol):
    h = mix64(np.uint64(nrow) * np.uint64(1000003) + np.uint64(ncol))
    for r in range(nrow):
        for c in range(ncol):
            h = mix64(h ^ np.uint64(tiles[r, c] + 1))
    return h


@njit(inline="always", cache=True)
def _paint_frozen(t, h, w, st, p, code):
    """Turn each still-frozen cell of ``t[:h, :w]`` into ``code`` with probability ``p``; returns (state, count)."""
    n = 0
    for r in range(h):
        for c in range(w):
            if t[r, c] == FROZEN:
                st, u = next_uniform(st)
                if u < p:
                    t[r, c] = code
                    n += 1
    return st, n


@njit(parallel=True, cache=True)
def _sample_chunk(seed, first, rows_lo, rows_hi, cols_lo, cols_hi, p_start, p_goal, p_hole, min_hops,
                  tiles, nrow, ncol, valid, hashes, dist, queue):
    """Sample candidates ``first .. first + len(valid) - 1``, each from its own stream, and test validity."""
    for i in prange(valid.shape[0]):
        st = stream_state(seed, first + np.uint64(i))  # uint64 + int64 would promote to float64
        st, u = next_uniform(st)
        h = rows_lo + min(int(u * (rows_hi - rows_lo + 1)), rows_hi - rows_lo)
        st, u = next_uniform(st)
        w = cols_lo + min(int(u * (cols_hi - cols_lo + 1)), cols_hi - cols_lo)
        t = tiles[i]
        t[:, :] = PAD
        nrow[i] = h
        ncol[i] = w
        valid[i] = False
        n_s = 0
        for r in range(h):  # pass 1: starts
            for c in range(w):
                st, u = next_uniform(st)
                if u < p_start:
                    t[r, c] = START
                    n_s += 1
                else:
                    t[r, c] = FROZEN
        if n_s == 0:  # rejected already: skip the remaining draws (each candidate has its own stream)
            continue
        st, n_g = _paint_frozen(t, h, w, st, p_goal, GOAL)  # pass 2: goals among the remaining cells
        if n_g == 0:
            continue
        st, _ = _paint_frozen(t, h, w, st, p_hole, HOLE)  # pass 3: holes among the remaining cells
        if _min_start_goal(t, h, w, dist[i], queue[i]) >= min_hops:
            valid[i] = True
            hashes[i] = _map_hash(t, h, w)


@njit(cache=True)
def _accept(tiles, nrow, ncol, valid, hashes, unique, slot_map, out_tiles, out_nrow, out_ncol, count):
    """Append valid (and, if ``unique``, unseen) candidates in index order; return the new count.

    ``slot_map`` is an open-addressing table (power-of-two length) of accepted indices keyed by map hash;
    a hash hit is confirmed by comparing the maps, so uniqueness is exact.
    """
    n_out = out_nrow.shape[0]
    mask = np.uint64(slot_map.shape[0] - 1)
    for i in range(valid.shape[0]):
        if count == n_out:
            break
        if not valid[i]:
            continue
        h, w = nrow[i], ncol[i]
        if unique:
            slot = hashes[i] & mask
            dup = False
            while slot_map[slot] >= 0:
                j = slot_map[slot]
                if out_nrow[j] == h and out_ncol[j] == w and (out_tiles[j, :h, :w] == tiles[i, :h, :w]).all():
                    dup = True
                    break
                slot = (slot + np.uint64(1)) & mask
            if dup:
                continue
            slot_map[slot] = count
        out_tiles[count] = tiles[i]
        out_nrow[count] = h
        out_ncol[count] = w
        count += 1
    return count


def _size_range(value, name: str) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer))) or lo < 1 or lo > hi:
        raise ValueError(f"{name} must be an int >= 1 or an inclusive range (lo, hi) with 1 <= lo <= hi, got {value}")
    return int(lo), int(hi)


def generate_maps(
    n: int,
    *,
    seed: int,
    height: int | tuple[int, int] = (3, 5),
    width: int | tuple[int, int] = (3, 5),
    p_start: float = 0.1,
    p_goal: float = 0.1,
    p_hole: float = 0.2,
    min_hops: int = 4,
    unique: bool = True,
    max_candidates: int | None = None,
) -> MapBatch:
    """Generate ``n`` valid maps with the paper's semantics, fully determined by ``seed``.

    Args:
        n: number of maps.
        seed: non-negative int; the same seed and arguments give the same batch on any thread count.
        height, width: inclusive ranges drawn independently per map (3-5 in distribution, 6-7 out of it).
        p_start, p_goal, p_hole: per-cell probabilities, applied in that order to the still-frozen cells.
        min_hops: every S must reach its nearest G in at least this many hole-free moves.
        unique: no map appears twice in the batch.
        max_candidates: give up (``ValueError``) after sampling this many candidates; default
            ``1_000_000 + 2_000 * n``. Guards against parameters that (almost) never give a valid map.

    Returns:
        A :class:`MapBatch` of ``n`` maps, padded to the largest size in the ranges.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    seed_u = as_seed(seed)
    rows_lo, rows_hi = _size_range(height, "height")
    cols_lo, cols_hi = _size_range(width, "width")
    for name, p in (("p_start", p_start), ("p_goal", p_goal), ("p_hole", p_hole)):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    if p_start <= 0.0 or p_goal <= 0.0 or p_start >= 1.0:
        raise ValueError(f"need 0 < p_start < 1 and p_goal > 0 for a map to hold both S and G, got "
                         f"p_start={p_start}, p_goal={p_goal}")
    if isinstance(min_hops, bool) or not isinstance(min_hops, (int, np.integer)) or min_hops < 1:
        raise ValueError(f"min_hops must be an int >= 1, got {min_hops!r}")
    longest = rows_hi * cols_hi - 1  # a shortest path visits distinct cells, so it has at most cells - 1 moves
    if min_hops > longest:
        raise ValueError(f"min_hops={min_hops} is impossible: on maps of at most {rows_hi}x{cols_hi} no shortest "
                         f"path has more than {longest} moves; lower min_hops or allow larger maps")
    budget = 1_000_000 + 2_000 * int(n) if max_candidates is None else int(max_candidates)

    out_tiles = np.full((n, rows_hi, cols_hi), PAD, dtype=np.uint8)
    out_nrow = np.zeros(n, dtype=np.int32)
    out_ncol = np.zeros(n, dtype=np.int32)
    slot_map = np.full(1 << max(4, int(2 * n - 1).bit_length()), -1, dtype=np.int64)
    # Chunk: big enough to amortise the parallel launch, small enough not to waste work past n.
    chunk = int(min(max(4 * n, 4096), 1 << 16))
    cells = rows_hi * cols_hi
    tiles = np.empty((chunk, rows_hi, cols_hi), dtype=np.uint8)
    nrow = np.empty(chunk, dtype=np.int32)
    ncol = np.empty(chunk, dtype=np.int32)
    valid = np.empty(chunk, dtype=np.bool_)
    hashes = np.empty(chunk, dtype=np.uint64)
    dist = np.empty((chunk, cells), dtype=np.int32)
    queue = np.empty((chunk, cells), dtype=np.int32)
    count, sampled, n_valid = 0, 0, 0
    while count < n:
        if sampled >= budget:
            raise ValueError(
                f"found only {count} of {n} {'unique ' if unique else ''}valid maps in {sampled} candidates "
                f"({n_valid} valid): height={height}, width={width}, p_start={p_start}, p_goal={p_goal}, "
                f"p_hole={p_hole}, min_hops={min_hops} almost never give such maps (or there are not {n} "
                f"distinct ones); relax them, ask for fewer maps, or raise max_candidates")
        _sample_chunk(seed_u, np.uint64(sampled), rows_lo, rows_hi, cols_lo, cols_hi, float(p_start),
                      float(p_goal), float(p_hole), int(min_hops), tiles, nrow, ncol, valid, hashes, dist, queue)
        n_valid += int(valid.sum())
        count = _accept(tiles, nrow, ncol, valid, hashes, unique, slot_map, out_tiles, out_nrow, out_ncol, count)
        sampled += chunk
    return MapBatch(out_tiles, out_nrow, out_ncol)
