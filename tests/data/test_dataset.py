"""The slice dataset: deterministic, replayable in gymnasium, weighted as asked, split by map, and loud on damage."""

import json

import gymnasium as gym
import numpy as np
import pytest

from icrl_fast.data.__main__ import main as data_cli
from icrl_fast.data.dataset import SCHEMA_VERSION, DatasetConfig, OfflineDataset, build_dataset, sample_sets
from icrl_fast.data.formats import decode, token_contract
from icrl_fast.envs.learners import EpisodeLog, QLearningConfig

SMALL = dict(train_maps=12, test_maps=6, learner=QLearningConfig(episodes=200), slice_len=512)


@pytest.fixture(scope="module", params=["paper", "compact"])
def small(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / request.param
    return build_dataset(DatasetConfig(format=request.param, **SMALL), path, progress=False)


def whole_episodes(ds: OfflineDataset):
    """Decode the stored stream up to its last complete episode; returns (decoded episodes, their table rows)."""
    ids, ep = ds.input_ids.ravel(), ds.episode_id.ravel()
    last = int(ep[-1])
    end = int(np.flatnonzero(ep == last)[0])  # the last episode may be cut by the dropped tail: leave it out
    return decode(ds.format, ids[:end]), np.arange(last)


def test_every_episode_replays_exactly_in_gymnasium(small):
    episodes, rows = whole_episodes(small)
    assert len(episodes) == rows.size > 100
    t = small.episodes
    for k, e in zip(rows, episodes):
        desc = small.maps.to_desc(int(t["map"][k]))
        env = gym.make("FrozenLake-v1", desc=desc, is_slippery=False)
        env.reset(seed=0)
        env.unwrapped.s = e["obs"][0]
        for i, a in enumerate(e["actions"]):
            assert env.unwrapped.s == e["obs"][i]
            _, r, term, trunc, _ = env.step(a)
            assert float(r) == e["rewards"][i]
        assert (term or trunc) and (term, trunc and not term) == (e["terminated"], e["truncated"])
        assert sum(e["rewards"]) == float(t["return"][k]) and len(e["actions"]) == int(t["length"][k])
        assert bool(t["terminated"][k]) == e["terminated"] or bool(t["truncated"][k])


def test_decisions_are_the_actions_taken_and_respect_slice_boundaries(small):
    c = small.contract()
    episodes, rows = whole_episodes(small)
    flat_mask, flat_action = c["decision_mask"].ravel(), c["action"].ravel()
    ep = c["episode_id"].ravel()
    for k, e in zip(rows[:300], episodes[:300]):
        sel = flat_mask & (ep == k)
        got = flat_action[sel].tolist()
        # Only a decision whose action token starts the next slice is missing; everything else is in order.
        assert got == e["actions"] or (len(got) == len(e["actions"]) - 1 and
                                       set(np.flatnonzero(ep == k) // small.config.slice_len).__len__() == 2)
    assert np.all(np.diff(ep) >= 0)  # episodes run on across slice boundaries, never backwards
    assert (c["episode_return"] == small.episodes["return"][c["episode_id"]]).all()
    mask_again, _ = token_contract(small.format, small.input_ids)
    assert not mask_again[:, -1].any()  # the last token of a slice is never a decision: its action would be next


def test_build_is_byte_identical_for_a_seed(tmp_path):
    cfg = DatasetConfig(**SMALL)
    a = build_dataset(cfg, tmp_path / "a", progress=False)
    b = build_dataset(cfg, tmp_path / "b", progress=False)
    for name in ("tokens.safetensors", "tables.safetensors", "manifest.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name
    c = build_dataset(DatasetConfig(**{**SMALL, "seed": 1}), tmp_path / "c", progress=False)
    assert (a.path / "tokens.safetensors").read_bytes() != (c.path / "tokens.safetensors").read_bytes()


def test_train_and_test_maps_are_disjoint(small):
    train = {tuple(small.maps.to_desc(int(b))) for b in small.train_map_ids}
    test = {tuple(small.maps.to_desc(int(b))) for b in small.test_map_ids}
    assert len(train) == 12 and len(test) == 6 and not train & test
    assert set(np.unique(small.episodes["map"]).tolist()) <= set(small.train_map_ids.tolist())
    assert set(small.manifest["set_map"]) <= set(small.train_map_ids.tolist())


@pytest.mark.parametrize("quality, odds", [("high", 5.0), ("mid", 1.0), ("low", 0.2)])
def test_quality_weighting_within_sampling_error(quality, odds):
    """A pool with 30 % successes per map: successful episodes are drawn with odds x5 / x1 / x0.2."""
    n_maps, per_map = 40, 2000
    rng = np.random.default_rng(0)
    success = np.zeros((n_maps, per_map), dtype=bool)
    success[:, : int(0.3 * per_map)] = True
    n = n_maps * per_map
    log = EpisodeLog(obs=np.zeros(n, np.int16), actions=np.zeros(n, np.int8), rewards=success.ravel().astype(np.float32),
                     map_id=np.repeat(np.arange(n_maps, dtype=np.int32), per_map), start=np.arange(n, dtype=np.int64),
                     length=np.ones(n, np.int32), returns=success.ravel().astype(np.float32),
                     terminated=np.ones(n, bool), truncated=np.zeros(n, bool), final_obs=np.zeros(n, np.int16))
    cfg = DatasetConfig(quality=quality, learner=QLearningConfig(episodes=per_map), sets_per_map=40)
    set_map, order, set_of = sample_sets(log, n_maps, cfg, rng)
    assert set_map.size == n_maps * 40 and order.size == set_of.size
    assert all(len(set(order[set_of == s].tolist())) == int((set_of == s).sum()) for s in range(0, 1600, 97))
    assert (log.map_id[order] == set_map[set_of]).all()  # every episode of a set is from the set's map
    frac = success.ravel()[order].mean()
    want = odds * 0.3 / (odds * 0.3 + 0.7)
    sigma = np.sqrt(want * (1 - want) / order.size)
    # Drawing without replacement inside a set of <= 40 from 2,000 shifts the rate by well under 1 %.
    assert abs(frac - want) < 4 * sigma + 0.01, (frac, want)


def test_damaged_datasets_are_clear_errors(tmp_path):
    ds = build_dataset(DatasetConfig(**SMALL), tmp_path / "d", progress=False)
    manifest = json.loads((ds.path / "manifest.json").read_text())

    def write_manifest(m):
        (ds.path / "manifest.json").write_text(json.dumps(m))

    write_manifest({**manifest, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(ValueError, match="schema version"):
        OfflineDataset.load(ds.path)
    write_manifest(manifest)
    tokens = ds.path / "tokens.safetensors"
    data = tokens.read_bytes()
    tokens.write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated or altered"):
        OfflineDataset.load(ds.path)
    tokens.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="checksum"):
        OfflineDataset.load(ds.path)
    tokens.unlink()
    with pytest.raises(ValueError, match="missing"):
        OfflineDataset.load(ds.path)
    (ds.path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        OfflineDataset.load(ds.path)
    with pytest.raises(ValueError, match="no manifest"):
        OfflineDataset.load(tmp_path)


def test_cli_builds_and_describes_a_dataset(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["build", "--out", str(out), "--train-maps", "6", "--test-maps", "2", "--episodes-per-map", "120",
            "--slice-len", "256", "--format", "compact", "--quality", "high", "--quiet"]
    assert data_cli(args) == 0
    assert "slices x 256 tokens" in capsys.readouterr().out
    assert data_cli(["info", str(out)]) == 0 and '"slices"' in capsys.readouterr().out
    assert data_cli(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert data_cli(["build", "--out", str(tmp_path / "x"), "--set-size", "40", "20", "--quiet"]) == 2
    assert "set_size" in capsys.readouterr().err
    assert data_cli(["build", "--out", str(tmp_path / "y"), "--train-maps", "1", "--episodes-per-map", "20",
                     "--set-size", "5", "10", "--quiet"]) == 2
    assert "less than one slice" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob("y.tmp-*"))
    copier = ["build", "--out", str(tmp_path / "c"), "--train-maps", "6", "--test-maps", "2", "--episodes-per-map",
              "40", "--source", "copier", "--epsilon-end", "0", "--epsilon-decay-episodes", "10", "--slice-len", "256",
              "--format", "compact", "--quiet"]
    assert data_cli(copier) == 0
    learner = OfflineDataset.load(tmp_path / "c").manifest["config"]["learner"]
    assert (learner["epsilon_end"], learner["epsilon_decay_episodes"], learner["episodes"]) == (0.0, 10, 40)
    assert data_cli([*copier[:2], str(tmp_path / "d"), *copier[3:], "--quality", "low"]) == 2
    assert "use quality 'mid'" in capsys.readouterr().err


def test_copier_sets_keep_play_order_from_each_maps_first_episode(tmp_path):
    learner = QLearningConfig(episodes=50, epsilon_start=1.0, epsilon_end=0.0, epsilon_decay_episodes=10)
    cfg = DatasetConfig(train_maps=10, test_maps=2, source="copier", learner=learner, set_size=(12, 20),
                        sets_per_map=3, slice_len=256, format="compact")
    n = 10 * 50
    log = EpisodeLog(obs=np.zeros(n, np.int16), actions=np.zeros(n, np.int8), rewards=np.zeros(n, np.float32),
                     map_id=np.repeat(np.arange(10, dtype=np.int32), 50), start=np.arange(n, dtype=np.int64),
                     length=np.ones(n, np.int32), returns=np.zeros(n, np.float32), terminated=np.ones(n, bool),
                     truncated=np.zeros(n, bool), final_obs=np.zeros(n, np.int16))
    set_map, order, set_of = sample_sets(log, 10, cfg, np.random.default_rng(0))
    runs: dict[int, list[tuple[int, int]]] = {}  # map -> (first episode, length) of each set
    for s in range(set_map.size):
        idx = order[set_of == s]
        assert (np.diff(idx) == 1).all() and 12 <= len(idx) <= 20  # consecutive episodes, in play order
        assert int(idx[0]) // 50 == int(idx[-1]) // 50 == set_map[s]  # of the set's map
        runs.setdefault(int(set_map[s]), []).append((int(idx[0]) % 50, len(idx)))
    assert len(runs) == 10 and {len(r) for r in runs.values()} == {2, 3}  # a third set fits when 50 allow it
    for r in map(sorted, runs.values()):  # a map's first set opens at its episode 0; the next ones follow on
        assert r[0][0] == 0 and all(a + k == b for (a, k), (b, _) in zip(r, r[1:]))
        assert r[-1][0] + r[-1][1] <= 50
    assert len(set(set_map[:10].tolist())) > 1  # the sets are shuffled into the stream
    ds = build_dataset(cfg, tmp_path / "c", progress=False)  # and the build plays them with the copier
    assert ds.manifest["config"]["source"] == "copier" and ds.episodes["return"].mean() > 0.4
    with pytest.raises(ValueError, match="quality"):
        DatasetConfig(source="copier", quality="high").validate()
    with pytest.raises(ValueError, match="source must be one of"):
        DatasetConfig(source="oracle").validate()
