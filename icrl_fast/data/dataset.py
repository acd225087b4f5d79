"""The offline dataset: learner episodes -> sets of one map -> a token stream -> fixed-length slices, on disk.

Build (``build_dataset`` / ``python -m icrl_fast.data build``):

1. ``train_maps + test_maps`` unique maps from one seed; the first ``train_maps`` are the training split, the
   rest the test split (disjoint by construction: maps of one batch are unique). Only training maps get data.
2. A tabular learner (or a random policy) plays ``episodes_per_map`` episodes on every training map.
3. Each map's episodes are drawn into ``sets_per_map`` sets of ``set_size`` (20-40) episodes of that map,
   without replacement inside a set and in random order, weighted by quality: ``high`` draws successful episodes
   5x as often as failed ones, ``mid`` uniformly, ``low`` failed ones 5x as often.
4. All sets of all maps are shuffled and encoded back to back in one token stream (no marker at a map change).
5. The stream is cut into slices of ``slice_len`` tokens; the incomplete tail is dropped.

**Slice boundaries.** A boundary can cut an episode: its first part ends slice ``k`` and the rest starts slice
``k + 1`` (without its episode-start token). ``episode_id`` (per token) indexes the dataset's episode table,
so the learner knows each decision's episode return and termination even when the episode's end lies in the
next slice; a decision whose action token would be the first token of the next slice is not a decision of
slice ``k`` (``token_contract``), so the last action of a slice always has a token in that slice.

On disk (schema version :data:`SCHEMA_VERSION`): ``tokens.safetensors`` (``input_ids``, ``episode_id``: int32
``[slices, slice_len]``), ``tables.safetensors`` (per-episode and per-map arrays) and ``manifest.json`` (the
config, the seed, the format, the map of every set, counts and a sha256 of each file). A build is written to a
temporary folder and renamed into place, so an interrupted build never looks like a dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from icrl_fast.config import from_dict
from icrl_fast.data.formats import ContextFormat, encode_episodes, make_format, token_contract
from icrl_fast.data.step_format import grid_numbered
from icrl_fast.envs.learners import EpisodeLog, QLearningConfig, copier, q_learning, random_policy
from icrl_fast.envs.maps import MapBatch, generate_maps

SCHEMA_VERSION = 1
QUALITY_WEIGHT = {"high": (1.0, 5.0), "mid": (1.0, 1.0), "low": (5.0, 1.0)}  # (failed, successful)
FILES = ("tokens.safetensors", "tables.safetensors")
SOURCES = ("q_learning", "random", "copier")


@dataclass(frozen=True)
class DatasetConfig:
    """How an offline dataset is built. Every field is saved in the manifest."""

    train_maps: int = 250
    """Maps that get data (the paper: 250)."""
    test_maps: int = 50
    """Held-out maps for evaluation (the paper: 50); they never appear in the data."""
    height: tuple[int, int] = (3, 5)
    """Map height range (inclusive)."""
    width: tuple[int, int] = (3, 5)
    """Map width range (inclusive)."""
    min_hops: int = 4
    """Every start is at least this many moves from its nearest goal."""
    source: str = "q_learning"
    """Who plays the episodes: ``q_learning`` (the paper), ``random``, or ``copier`` (a hand-written in-context
    learner, ``icrl_fast.envs.learners.copier``: its sets keep the play order, from each map's first episode)."""
    learner: QLearningConfig = field(default_factory=QLearningConfig)
    """Learner settings; ``learner.episodes`` is the number of episodes per map."""
    quality: str = "mid"
    """``high`` / ``mid`` / ``low``: successful episodes drawn 5x / 1x / 0.2x as often as failed ones."""
    set_size: tuple[int, int] = (20, 40)
    """Episodes per set (inclusive range, uniform)."""
    sets_per_map: int | None = None
    """Sets drawn per map; default ``episodes_per_map // mean set size`` (each episode about once)."""
    format: str = "paper"
    """Context format: ``paper``, ``compact`` or ``step`` (one token per step). In protocol mode the contexts are
    played in the run's own ``--data.format``; a dataset built in another format serves for its test maps."""
    tokenizer: str | None = None
    """Local tokenizer directory or ``.gguf`` file for the ``paper`` format (default: the built-in offline
    vocabulary)."""
    max_obs: int = 64
    """Observation tokens in the format (64 covers maps up to 8x8)."""
    slice_len: int = 4096
    """Tokens per slice."""
    seed: int = 0
    """Seed of every random stream (maps, learner, sets, shuffling)."""

    def validate(self) -> None:
        for name in ("train_maps", "slice_len", "min_hops", "max_obs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.test_maps, bool) or not isinstance(self.test_maps, int) or self.test_maps < 0:
            raise ValueError(f"test_maps must be an int >= 0, got {self.test_maps!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "copier" and self.quality != "mid":
            raise ValueError("the copier's sets keep its play order: quality weighting (high/low) does not apply; "
                             "use quality 'mid'")
        if self.quality not in QUALITY_WEIGHT:
            raise ValueError(f"quality must be one of {sorted(QUALITY_WEIGHT)}, got {self.quality!r}")
        lo, hi = self.set_size
        if not (1 <= lo <= hi <= self.learner.episodes):
            raise ValueError(f"set_size {self.set_size} must satisfy 1 <= lo <= hi <= episodes per map "
                             f"({self.learner.episodes})")
        if self.sets_per_map is not None and self.sets_per_map < 1:
            raise ValueError(f"sets_per_map must be >= 1, got {self.sets_per_map}")
        if self.height[1] * self.width[1] > self.max_obs:
            raise ValueError(f"maps up to {self.height[1]}x{self.width[1]} need max_obs >= "
                             f"{self.height[1] * self.width[1]}, got {self.max_obs}")
        self.learner.validate()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> DatasetConfig:
        return from_dict(cls, d)


def sample_sets(log: EpisodeLog, n_maps: int, cfg: DatasetConfig, rng: np.random.Generator):
    """Draw the sets of every map. Returns ``(set_map int32 [S], order int64 [total episodes], set_of int32 [.])``:
    the sets in their (shuffled) stream order, and for each episode occurrence its index in ``log`` and its set.

    The paper's sources: each set draws its episodes from the whole log of its map, weighted by ``quality``, in
    random order. The copier: a set is a run of consecutive episodes in play order, the first from episode 0 (a
    context shows the copier learning the map), the next ones following on while the map's episodes last."""
    w_fail, w_success = QUALITY_WEIGHT[cfg.quality]
    per_map = cfg.learner.episodes
    lo, hi = cfg.set_size
    n_sets = cfg.sets_per_map or max(1, per_map // ((lo + hi) // 2))
    success = log.success.reshape(n_maps, per_map)
    sets = []
    for b in range(n_maps):
        if cfg.source == "copier":
            first = 0
            for _ in range(n_sets):
                k = int(rng.integers(lo, hi + 1))
                if first + k > per_map:
                    break
                sets.append((b, b * per_map + first + np.arange(k)))
                first += k
            continue
        w = np.where(success[b], w_success, w_fail)
        p = w / w.sum()
        for _ in range(n_sets):
            k = int(rng.integers(lo, hi + 1))
            sets.append((b, b * per_map + rng.choice(per_map, size=k, replace=False, p=p)))
    perm = rng.permutation(len(sets))
    set_map = np.array([sets[i][0] for i in perm], dtype=np.int32)
    order = np.concatenate([sets[i][1] for i in perm]).astype(np.int64)
    set_of = np.repeat(np.arange(len(sets), dtype=np.int32), [len(sets[i][1]) for i in perm])
    return set_map, order, set_of


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def build_dataset(cfg: DatasetConfig, out: str | os.PathLike, *, overwrite: bool = False,
                  progress: bool = True) -> OfflineDataset:
    """Build the dataset described by ``cfg`` into folder ``out`` and return it loaded."""
    cfg.validate()
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite (overwrite=True)")
    fmt = make_format(cfg.format, cfg.tokenizer, cfg.max_obs)
    bar = tqdm(total=6, desc="building dataset", unit="stage", disable=not progress)
    maps = generate_maps(cfg.train_maps + cfg.test_maps, seed=cfg.seed, height=cfg.height, width=cfg.width,
                         min_hops=cfg.min_hops)
    train = maps[np.arange(cfg.train_maps)]
    bar.update()
    if cfg.source == "q_learning":
        log, _ = q_learning(train, cfg.learner, seed=cfg.seed + 1)
    elif cfg.source == "copier":
        log = copier(train, cfg.learner, seed=cfg.seed + 1)
    else:
        log = random_policy(train, cfg.learner.episodes, seed=cfg.seed + 1,
                            max_episode_steps=cfg.learner.max_episode_steps)
    bar.update()
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2]))
    set_map, order, set_of = sample_sets(log, cfg.train_maps, cfg, rng)
    bar.update()
    stream, occurrence = encode_episodes(fmt, grid_numbered(fmt, log, train), order)
    n_slices = stream.size // cfg.slice_len
    if n_slices == 0:
        raise ValueError(f"the data holds {stream.size} tokens, less than one slice of {cfg.slice_len}: play more "
                         f"episodes (learner.episodes) or draw more sets (sets_per_map)")
    keep = n_slices * cfg.slice_len
    bar.update()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({"input_ids": stream[:keep].reshape(n_slices, cfg.slice_len),
               "episode_id": occurrence[:keep].reshape(n_slices, cfg.slice_len)}, str(tmp / FILES[0]))
    n_occ = int(occurrence[keep - 1]) + 1  # episodes with at least one token in the kept slices
    src = order[:n_occ]
    save_file({
        "episode_source": src, "episode_set": set_of[:n_occ], "episode_map": log.map_id[src].astype(np.int32),
        "episode_return": log.returns[src], "episode_length": log.length[src],
        "episode_terminated": log.terminated[src].astype(np.uint8),
        "episode_truncated": log.truncated[src].astype(np.uint8),
        "map_tiles": maps.tiles, "map_nrow": maps.nrow, "map_ncol": maps.ncol,
    }, str(tmp / FILES[1]))
    bar.update()
    manifest = {
        "schema_version": SCHEMA_VERSION, "config": cfg.to_json(), "seed": cfg.seed, "format": fmt.describe(),
        "counts": {"slices": n_slices, "slice_len": cfg.slice_len, "tokens": keep, "episodes": n_occ,
                   "dropped_tail_tokens": int(stream.size - keep), "sets": int(set_map.size),
                   "learner_success_rate": float(log.success.mean())},
        "splits": {"train_maps": list(range(cfg.train_maps)),
                   "test_maps": list(range(cfg.train_maps, cfg.train_maps + cfg.test_maps))},
        "set_map": set_map.tolist(),
        "files": {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in FILES},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    bar.update()
    bar.close()
    return OfflineDataset.load(out)


class OfflineDataset:
    """A built dataset, loaded and verified. Use :meth:`load`."""

    def __init__(self, path: Path, manifest: dict, tokens: dict, tables: dict):
        self.path = path
        self.manifest = manifest
        self.config = DatasetConfig.from_json(manifest["config"])
        self.input_ids: np.ndarray = tokens["input_ids"]
        """int32 [slices, slice_len]"""
        self.episode_id: np.ndarray = tokens["episode_id"]
        """int32 [slices, slice_len]: row of the episode table each token belongs to"""
        self.episodes = {k.removeprefix("episode_"): v for k, v in tables.items() if k.startswith("episode_")}
        """per-episode arrays: source, set, map, return, length, terminated, truncated"""
        self.maps = MapBatch(tables["map_tiles"], tables["map_nrow"], tables["map_ncol"])
        self.train_map_ids = np.asarray(manifest["splits"]["train_maps"], dtype=np.int64)
        self.test_map_ids = np.asarray(manifest["splits"]["test_maps"], dtype=np.int64)
        self._format: ContextFormat | None = None

    @property
    def format(self) -> ContextFormat:
        if self._format is None:
            self._format = make_format(self.config.format, self.config.tokenizer, self.config.max_obs)
        return self._format

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def contract(self, index=slice(None)) -> dict[str, np.ndarray]:
        """The learner's token-level contract for slices ``index``: ``input_ids``, ``decision_mask``, ``action``
        (at decisions, else -1), ``episode_id``, and per token ``episode_return``, ``terminated``, ``truncated``
        of its episode."""
        ids, ep = self.input_ids[index], self.episode_id[index]
        mask, action = token_contract(self.format, ids)
        return {"input_ids": ids, "decision_mask": mask, "action": action, "episode_id": ep,
                "episode_return": self.episodes["return"][ep], "terminated": self.episodes["terminated"][ep] != 0,
                "truncated": self.episodes["truncated"][ep] != 0}

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True) -> OfflineDataset:
        """Load a dataset folder; ``ValueError`` for another schema version, a missing, truncated or altered file."""
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            raise ValueError(f"{path} is not a dataset: no manifest.json (build one with python -m icrl_fast.data build)")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{mf} is not valid JSON ({e}): the dataset is damaged; rebuild it") from None
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{path} has dataset schema version {version}, this icrl_fast reads version "
                             f"{SCHEMA_VERSION}: rebuild the dataset with this version")
        arrays = []
        for name in FILES:
            f = path / name
            want = manifest["files"][name]
            if not f.is_file():
                raise ValueError(f"{f} is missing: the dataset is incomplete; rebuild it")
            if f.stat().st_size != want["bytes"]:
                raise ValueError(f"{f} has {f.stat().st_size} bytes, the manifest says {want['bytes']}: the file is "
                                 f"truncated or altered; rebuild the dataset")
            if verify and _sha256(f) != want["sha256"]:
                raise ValueError(f"{f} does not match its sha256 checksum in the manifest: the file is corrupt or "
                                 f"altered; rebuild the dataset")
            try:
                arrays.append(load_file(str(f)))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{f} cannot be read ({e}): rebuild the dataset") from None
        return cls(path, manifest, *arrays)
