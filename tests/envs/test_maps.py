"""The map generator and map parsing, checked against an independent pure-Python BFS and the paper's rules."""

from collections import deque

import numba
import numpy as np
import pytest

from icrl_fast.envs import maps as M
from icrl_fast.envs.maps import MAPS, MapBatch, generate_maps, parse_desc


def bfs_to_nearest_goal(rows: list[str], start: tuple[int, int]) -> int:
    """Reference: moves from ``start`` to the nearest G, never stepping on H or through G; -1 if none."""
    h, w = len(rows), len(rows[0])
    seen, q = {start}, deque([(start, 0)])
    while q:
        (r, c), d = q.popleft()
        if rows[r][c] == "G":
            return d
        for dr, dc in ((0, -1), (1, 0), (0, 1), (-1, 0)):
            nr, nc = r + dr, c + dc
            if 0 <= nr < h and 0 <= nc < w and (nr, nc) not in seen and rows[nr][nc] != "H":
                seen.add((nr, nc))
                q.append(((nr, nc), d + 1))
    return -1


def test_every_generated_map_is_valid_and_in_range():
    batch = generate_maps(2000, seed=3, height=(3, 5), width=(3, 5), min_hops=4)
    assert len(batch) == 2000
    assert set(batch.nrow.tolist()) == {3, 4, 5} and set(batch.ncol.tolist()) == {3, 4, 5}
    assert (batch.nrow != batch.ncol).any(), "height and width are drawn independently: non-square maps appear"
    for b in range(len(batch)):
        rows = batch.to_desc(b)
        starts = [(r, c) for r in range(len(rows)) for c in range(len(rows[0])) if rows[r][c] == "S"]
        assert starts and any("G" in row for row in rows)
        for s in starts:
            d = bfs_to_nearest_goal(rows, s)
            assert d >= 4, (rows, s, d)


def test_out_of_distribution_sizes_and_min_hops():
    batch = generate_maps(300, seed=5, height=(6, 7), width=(6, 7), min_hops=6)
    assert set(batch.nrow.tolist()) == {6, 7} and set(batch.ncol.tolist()) == {6, 7}
    assert (batch.shortest_start_goal() >= 6).all()


def test_maps_in_a_batch_are_unique():
    batch = generate_maps(3000, seed=11, height=3, width=3, min_hops=2)  # 3x3: duplicates are common
    keys = {(tuple(batch.to_desc(b))) for b in range(len(batch))}
    assert len(keys) == len(batch)
    loose = generate_maps(3000, seed=11, height=3, width=3, min_hops=2, unique=False)
    assert len({tuple(loose.to_desc(b)) for b in range(len(loose))}) < len(loose)


def test_seed_determines_the_batch_on_any_thread_count():
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = generate_maps(700, seed=42)
        numba.set_num_threads(old)
        many = generate_maps(700, seed=42)
    finally:
        numba.set_num_threads(old)
    assert np.array_equal(one.tiles, many.tiles) and np.array_equal(one.nrow, many.nrow)
    other = generate_maps(700, seed=43)
    assert not np.array_equal(one.tiles, other.tiles)
    # A prefix property: asking for fewer maps gives the first maps of the larger batch.
    assert np.array_equal(generate_maps(100, seed=42).tiles, one.tiles[:100])


def test_sampler_cell_frequencies_match_the_probabilities():
    """Raw candidates (before the validity filter): S on every cell with p_start; G on each non-S cell of a
    map that has an S with p_goal; H on each remaining cell of a map with S and G with p_hole (paper order)."""
    n, hi = 40000, 5
    cells = hi * hi
    tiles = np.empty((n, hi, hi), np.uint8)
    nrow, ncol = np.empty(n, np.int32), np.empty(n, np.int32)
    valid, hashes = np.empty(n, bool), np.empty(n, np.uint64)
    scratch = np.empty((n, cells), np.int32), np.empty((n, cells), np.int32)
    M._sample_chunk(np.uint64(7), np.uint64(0), 3, 5, 3, 5, 0.1, 0.1, 0.2, 4, tiles, nrow, ncol, valid, hashes,
                    *scratch)
    inside = np.arange(hi)[None, :, None] < nrow[:, None, None]
    inside = inside & (np.arange(hi)[None, None, :] < ncol[:, None, None])
    n_s = ((tiles == M.START) & inside).sum((1, 2))
    n_g = ((tiles == M.GOAL) & inside).sum((1, 2))

    def check(hits, trials, p):
        sigma = np.sqrt(p * (1 - p) / trials)
        assert abs(hits / trials - p) < 4 * sigma, (hits / trials, p, sigma)

    check(n_s.sum(), inside.sum(), 0.1)
    has_s = n_s > 0
    check(n_g[has_s].sum(), (inside & (tiles != M.START))[has_s].sum(), 0.1)
    has_sg = has_s & (n_g > 0)
    rest = inside & (tiles != M.START) & (tiles != M.GOAL)
    check(((tiles == M.HOLE) & inside)[has_sg].sum(), rest[has_sg].sum(), 0.2)
    for h in (3, 4, 5):  # sizes uniform over the range
        check((nrow == h).sum(), n, 1 / 3)
    assert valid.mean() > 0.01


def test_named_maps_and_desc_round_trip():
    batch = MapBatch.from_descs([MAPS["4x4"], MAPS["8x8"], MAPS["stitching"], ["SFG"]])
    assert batch.tiles.shape == (4, 8, 8)
    assert [batch.to_desc(b) for b in range(4)] == [MAPS["4x4"], MAPS["8x8"], MAPS["stitching"], ["SFG"]]
    assert (batch.nrow.tolist(), batch.ncol.tolist()) == ([4, 8, 6, 1], [4, 8, 4, 3])
    # The stitching map: 4 wide x 6 high, one start at tile 8, the goal 5 moves away.
    assert batch.to_desc(2) == ["HHFF", "FFFF", "SFFH", "HFFF", "HFFF", "HFGF"]
    assert batch.starts[2, 0] == 8 and batch.shortest_start_goal()[2] == 5
    np.testing.assert_array_equal(parse_desc(np.asarray(MAPS["4x4"], dtype="c")), parse_desc(MAPS["4x4"]))


def test_goal_distances_match_reference_bfs():
    batch = generate_maps(200, seed=9, height=(2, 7), width=(2, 7), p_start=0.3, p_goal=0.2, min_hops=1)
    dist = batch.goal_distances()
    for b in range(len(batch)):
        rows = batch.to_desc(b)
        for r in range(len(rows)):
            for c in range(len(rows[0])):
                want = -1 if rows[r][c] == "H" else bfs_to_nearest_goal(rows, (r, c))
                assert dist[b, r * len(rows[0]) + c] == want


@pytest.mark.parametrize("desc, message", [
    (["SFF", "FG"], "different lengths"),
    (["SFX", "FFG"], "unknown tile letters"),
    (["FFF", "FFG"], "no start"),
    (["SFF", "FFF"], "no goal"),
    ([], "empty"),
    ("SFFG", "single string"),
])
def test_bad_desc_is_a_clear_value_error(desc, message):
    with pytest.raises(ValueError, match=message):
        parse_desc(desc)


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=3, width=3, min_hops=9), "impossible"),
    (dict(height=(5, 3)), "inclusive range"),
    (dict(p_start=0.0), "p_start"),
    (dict(p_goal=1.5), "probability"),
    (dict(min_hops=0), "min_hops"),
    (dict(height=3, width=3, min_hops=8, max_candidates=50_000), "found only"),
])
def test_impossible_generator_parameters_fail_fast(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_maps(10, seed=0, **kwargs)


def test_generator_rejects_bad_count_and_seed():
    with pytest.raises(ValueError, match="positive int"):
        generate_maps(0, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        generate_maps(5, seed=-1)
    with pytest.raises(TypeError, match="non-negative int"):
        generate_maps(5, seed=1.5)


def test_a_map_batch_without_an_s_tile_is_refused():
    """Built from tiles directly (``parse_desc`` already refuses such a desc): a reset would have nowhere to start."""
    tiles = np.array([[[0, 3], [0, 0]], [[1, 3], [0, 0]]], dtype=np.uint8)  # map 0: F G / F F, no S
    with pytest.raises(ValueError, match="map 0 has none"):
        MapBatch(tiles, np.array([2, 2]), np.array([2, 2]))
    assert MapBatch(tiles[1:], np.array([2]), np.array([2])).n_starts.tolist() == [1]
