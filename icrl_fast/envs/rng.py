"""Per-stream random numbers for Numba code: SplitMix64, one independent stream per (seed, stream id).

Every random decision in the simulator and the map generator draws from a stream that is a pure function of
``(seed, stream_id)`` and of how many numbers that stream has produced, never from a global or per-thread
state. Results therefore do not depend on the thread count or on the order in which ``prange`` visits items.

SplitMix64 (Steele, Lea & Flood, OOPSLA 2014) passes BigCrush; its state is one ``uint64``. Streams are
seeded by hashing the seed and the stream id through the SplitMix64 finaliser, so neighbouring ids give
unrelated streams. All functions are ``@njit`` and return the advanced state instead of mutating it, so they
inline into callers.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_INV_2_53 = 1.0 / 9007199254740992.0  # 2**-53: 53 random bits fill a float64 mantissa exactly
_MASK64 = (1 << 64) - 1


@njit(inline="always", cache=True)
def mix64(z):
    """SplitMix64 finaliser: a bijective avalanche hash of one ``uint64``."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(inline="always", cache=True)
def stream_state(seed, stream_id):
    """Initial state of stream ``stream_id`` under ``seed`` (both ``uint64``)."""
    return mix64(mix64(seed) ^ (np.uint64(stream_id) * _GOLDEN + _GOLDEN))


@njit(inline="always", cache=True)
def next_u64(state):
    """Advance ``state``; return ``(new_state, random uint64)``."""
    state = state + _GOLDEN
    return state, mix64(state)


@njit(inline="always", cache=True)
def next_uniform(state):
    """Advance ``state``; return ``(new_state, u)`` with ``u`` uniform on [0, 1) at 53-bit resolution."""
    state, z = next_u64(state)
    return state, np.float64(z >> _S11) * _INV_2_53


def choose_seed(current, seed: int | None) -> np.uint64:
    """The seed a reset uses: ``seed`` when given, else the ``current`` one, else fresh OS entropy (as gymnasium
    does when unseeded)."""
    if seed is not None:
        return as_seed(seed)
    if current is not None:
        return np.uint64(current)
    return np.uint64(np.random.SeedSequence().entropy & _MASK64)


def as_seed(seed: int, name: str = "seed") -> np.uint64:
    """Validate a user seed (a non-negative int, as gymnasium requires) and return it as ``np.uint64``."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be a non-negative int, got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"{name} must be a non-negative int, got {seed}")
    return np.uint64(int(seed) & _MASK64)
