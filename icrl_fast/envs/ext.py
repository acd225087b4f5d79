"""The optional C++/CUDA Frozen Lake (``csrc/``): loading it, its fake implementations, and ``TorchFrozenLakeBatch``.

The extension registers ops ``torch.ops.icrl.{step, reset, seed_streams, emit}`` over torch tensors on the CPU and,
when built with CUDA, on the GPU (one thread per env). Its dynamics and random streams are the Numba simulator's
(``icrl_fast.envs.frozen_lake``), so both give identical trajectories for a seed.

Where it comes from, in order:

1. ``icrl_fast/_C*.so``, built by ``setup.py`` at install time (``ICRL_BUILD_EXT=1 pip install -e .
   --no-build-isolation``; see ``setup.py``);
2. a just-in-time build of ``csrc/`` with ``torch.utils.cpp_extension`` when asked (``load(build=True)``, or the
   environment variable ``ICRL_JIT_EXT=1``) -- what the tests do, so CI builds and tests the C++ on every run. With
   a CUDA build of torch and nvcc (``CUDA_HOME``) the CUDA kernels are built in (``-DICRL_WITH_CUDA``); otherwise
   the ops have CPU kernels only.

``HAS_EXT`` / ``EXT_REASON`` say whether it is loaded and why (not); ``kernel_keys()`` the dispatch keys its ops
have kernels for; ``backend(device)`` is the choice the rollout code makes: the extension on CUDA when its ops have
a CUDA kernel, the Numba simulator elsewhere (a CPU-only build is never picked for a CUDA device).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from icrl_fast.data.formats import pad_token
from icrl_fast.envs.frozen_lake import _MODE_CODE, parse_autoreset_mode, validate_dynamics
from icrl_fast.envs.maps import MapBatch
from icrl_fast.envs.rng import as_seed, choose_seed

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ["frozen_lake_ops.cpp"]
CUDA_SOURCES = ["frozen_lake_cuda.cu"]  # built in only with a CUDA torch and nvcc
OPS = ("step", "reset", "seed_streams", "emit")
HAS_EXT = False
EXT_REASON = "not loaded yet"


def _registered() -> bool:
    return hasattr(torch.ops, "icrl") and hasattr(torch.ops.icrl, "step")


def load(build: bool | None = None, verbose: bool = False) -> bool:
    """Load the extension (built copy first, else a JIT build of ``csrc/`` if ``build``); sets ``HAS_EXT`` and
    ``EXT_REASON`` and returns ``HAS_EXT``. Never raises: a failure is the reason."""
    global HAS_EXT, EXT_REASON
    if _registered():
        HAS_EXT, EXT_REASON = True, EXT_REASON if HAS_EXT else "loaded"
        return True
    built = sorted(Path(__file__).resolve().parents[1].glob("_C*.so"))
    if built:
        try:
            torch.ops.load_library(str(built[0]))
            HAS_EXT, EXT_REASON = True, f"built extension {built[0].name}"
        except OSError as e:
            EXT_REASON = f"{built[0].name} does not load ({e}); rebuild it against this torch"
    if not HAS_EXT and (build if build is not None else os.environ.get("ICRL_JIT_EXT") == "1"):
        if not (CSRC / SOURCES[0]).is_file():
            EXT_REASON = f"no C++ sources at {CSRC} (an installed wheel without csrc/)"
        else:
            try:
                from torch.utils.cpp_extension import load as jit_load

                cuda = _can_build_cuda()
                sources = SOURCES + (CUDA_SOURCES if cuda else [])
                flags = ["-O3"] + (["-DICRL_WITH_CUDA"] if cuda else [])
                jit_load(name="icrl_fast_C_cuda" if cuda else "icrl_fast_C", sources=[str(CSRC / s) for s in sources],
                         is_python_module=False, extra_cflags=flags,
                         extra_cuda_cflags=["-O3", "-std=c++17", "-DICRL_WITH_CUDA"] if cuda else None,
                         verbose=verbose)
                HAS_EXT = True
                EXT_REASON = f"JIT-built from csrc/ ({'CPU and CUDA' if cuda else 'CPU'} ops)"
            except Exception as e:  # noqa: BLE001 - a missing compiler or ninja is a reason, not a crash
                EXT_REASON = f"JIT build of csrc/ failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if not HAS_EXT and EXT_REASON == "not loaded yet":
        EXT_REASON = "not built (plain install: the Numba simulator is used; see icrl_fast/envs/ext.py to build)"
    if HAS_EXT:
        _register_fakes()
    return HAS_EXT


_FAKES_DONE = False


def _register_fakes() -> None:
    """Meta/fake implementations: every op only mutates its buffers, so tracing needs no output shapes."""
    global _FAKES_DONE
    if _FAKES_DONE:
        return
    for name in ("step", "reset", "seed_streams", "emit"):
        torch.library.register_fake(f"icrl::{name}", lambda *args, **kwargs: None)
    _FAKES_DONE = True


def _can_build_cuda() -> bool:
    """A JIT build can compile the CUDA kernels: a CUDA build of torch and nvcc under ``CUDA_HOME``."""
    if not torch.version.cuda:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").is_file()


def _dispatch_key(device: str | torch.device) -> str:
    """The dispatch key of a device's dense tensors (``cuda`` -> ``CUDA``, ``cpu`` -> ``CPU``)."""
    return torch.device(device).type.upper()


def has_kernel(device: str | torch.device) -> bool:
    """Every op of the loaded extension has a kernel for ``device``'s dispatch key (False when not loaded): a build
    without ``-DICRL_WITH_CUDA`` registers CPU kernels only, and calling it on CUDA tensors would raise
    ``NotImplementedError``."""
    if not _registered():
        return False
    key = _dispatch_key(device)
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"icrl::{op}", key) for op in OPS)
    except RuntimeError:  # an unknown dispatch key name (a device type torch has no dense key for)
        return False


def kernel_keys() -> list[str]:
    """The dispatch keys (of ``CPU``, ``CUDA``) the loaded extension's ops all have kernels for."""
    return [key for key in ("CPU", "CUDA") if has_kernel(key.lower())]


def backend(device: str | torch.device) -> str:
    """``ext`` on CUDA when the extension is loaded with CUDA kernels (rollouts stay on the GPU), else ``numba``."""
    return "ext" if HAS_EXT and torch.device(device).type == "cuda" and has_kernel(device) else "numba"


def describe() -> str:
    """One line: which env backend runs where, and why."""
    if HAS_EXT:
        where = "C++ extension on CUDA" if "CUDA" in kernel_keys() else "no CUDA kernels in the C++ extension"
        return f"env backend: {where}, Numba on the CPU ({EXT_REASON}; kernels for {kernel_keys()})"
    return f"env backend: Numba; C++ extension: {EXT_REASON}"


class FormatTables:
    """A ``ContextFormat`` as the tensors the ``emit`` op reads."""

    RUNS = ("episode_start", "pre_obs", "post_obs", "post_action", "reward_block", "trunc_block", "episode_end")

    def __init__(self, fmt, device: str | torch.device = "cpu"):
        runs = [np.asarray(getattr(fmt, name), dtype=np.int64) for name in self.RUNS]
        off = np.concatenate([[0], np.cumsum([len(r) for r in runs])]).astype(np.int64)
        t = lambda x: torch.as_tensor(np.ascontiguousarray(x, dtype=np.int64), device=device)  # noqa: E731
        self.runs, self.run_off = t(np.concatenate(runs) if off[-1] else np.zeros(1)), t(off)
        self.obs_table, self.obs_len, self.action_ids = t(fmt.obs_table), t(fmt.obs_len), t(fmt.action_ids)
        self.pad = pad_token(fmt)


class TorchFrozenLakeBatch:
    """``FrozenLakeBatch``'s interface on torch tensors (CPU or CUDA), stepped by the extension.

    Same arguments and semantics as :class:`~icrl_fast.envs.frozen_lake.FrozenLakeBatch` (and the same random
    streams: identical trajectories for a seed). Buffers live on ``device`` and are written in place; ``step``
    takes an int64 tensor of actions on that device. ``emit_tokens`` writes the next context tokens of every env
    straight into a ``[B, width]`` input buffer (left-padded), so a GPU rollout never copies to the host.
    """

    def __init__(self, maps: MapBatch, *, device: str | torch.device = "cpu", is_slippery: bool = True,
                 success_rate: float = 1.0 / 3.0, reward_schedule=(1, 0, 0), max_episode_steps: int | None = 100,
                 autoreset_mode="SameStep", seed: int | None = None):
        if not HAS_EXT and not load():
            raise RuntimeError(f"the C++ extension is not available: {EXT_REASON}")
        if not isinstance(maps, MapBatch):
            raise TypeError(f"maps must be a MapBatch (see icrl_fast.envs.maps), got {type(maps).__name__}")
        self.device, self.num_envs, self.maps = torch.device(device), len(maps), maps
        self.is_slippery = bool(is_slippery)
        self.success_rate, reward_of_tile, self._max_steps = validate_dynamics(success_rate, reward_schedule,
                                                                             max_episode_steps)
        self._rewards = [float(reward_of_tile[3]), float(reward_of_tile[2]), float(reward_of_tile[0])]
        self._mode = _MODE_CODE[parse_autoreset_mode(autoreset_mode)]
        self._seed = None if seed is None else int(as_seed(seed))
        t = lambda x: torch.as_tensor(np.ascontiguousarray(x), device=self.device)  # noqa: E731
        self._map = (t(maps.tiles), t(maps.nrow), t(maps.ncol), t(maps.starts), t(maps.n_starts))
        n = self.num_envs
        z = lambda dtype, fill=0: torch.full((n,), fill, dtype=dtype, device=self.device)  # noqa: E731
        self._pos = torch.zeros((4, n), dtype=torch.int32, device=self.device)
        self._rng = z(torch.int64)
        self.obs, self.rewards, self.final_obs = z(torch.int64), z(torch.float64), z(torch.int64, -1)
        self.terminated, self.truncated = z(torch.bool), z(torch.bool)
        self._ready = False

    def _outputs(self):
        return self.obs, self.rewards, self.terminated, self.truncated, self.final_obs

    def reset(self, seed: int | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reset all envs (or those in ``mask``); ``seed`` reseeds their streams. Returns the ``obs`` buffer."""
        n = self.num_envs
        if mask is None:
            mask = torch.ones(n, dtype=torch.bool, device=self.device)
        elif not self._ready and not bool(mask.all()):
            raise ValueError("the first reset must reset every env (mask=None)")
        self._seed = int(choose_seed(self._seed, seed))
        if seed is not None or not self._ready:
            signed = self._seed - (1 << 64) if self._seed >= 1 << 63 else self._seed  # the op takes int64 bits
            torch.ops.icrl.seed_streams(signed, mask, self._rng)
        torch.ops.icrl.reset(mask, *self._map, self._pos, self._rng, *self._outputs())
        self._ready = True
        return self.obs

    def step(self, actions: torch.Tensor):
        """Step every env with int64 ``actions [B]`` on this device; returns the in-place output buffers."""
        if not self._ready:
            raise RuntimeError("call reset() before step()")
        torch.ops.icrl.step(actions, *self._map, self._pos, self._rng, self.is_slippery, self.success_rate,
                            self._rewards, self._max_steps, self._mode, *self._outputs())
        return self.obs, self.rewards, self.terminated, self.truncated

    def emit_tokens(self, tables: FormatTables, actions: torch.Tensor, first: torch.Tensor, out: torch.Tensor,
                    counts: torch.Tensor) -> None:
        """After ``step(actions)`` (or ``reset`` with ``first`` all true): each env's new tokens, right-aligned in
        ``out[i]`` with ``tables.pad`` before them; ``counts[i]`` = their number (-1: the row was too narrow)."""
        torch.ops.icrl.emit(actions, self.obs, self.rewards, self.terminated, self.truncated, first, tables.runs,
                            tables.run_off, tables.obs_table, tables.obs_len, tables.action_ids, tables.pad, out,
                            counts)


load()
