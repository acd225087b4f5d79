"""The outcome of one step, in classes any environment with discrete observations and actions defines.

From what a step returns and nothing about the map: the episode ended (terminated, not cut by a time limit) with a
reward (``ENDED_REWARDED``; on Frozen Lake: the goal) or without one (``ENDED_UNREWARDED``: a hole), or it goes on
with the next observation equal to the one acted from (``STAYED``: a wall, or a slip back) or another (``MOVED``).
A cut step (the time limit) has no class: what it would have led to is not shown.

The context teacher (``icrl_fast.envs.learners``) and the same-state memory (``icrl_fast.model.same_state_memory``)
both read steps through ``outcome_class``, and both forget at a ``surprised`` outcome: this module is what they share,
so neither depends on the other.
"""

from __future__ import annotations

from numba import njit

MOVED, STAYED, ENDED_UNREWARDED, ENDED_REWARDED = range(4)
NAMES = ("moved", "stayed", "ended without reward", "ended with reward")


@njit(inline="always", cache=True)
def outcome_class(same_observation, terminated, rewarded):
    """The class of a step that was not cut: ``terminated`` with ``rewarded`` (a reward > 0) or not, else the next
    observation the same as the one acted from (``same_observation``) or not."""
    if terminated:
        return ENDED_REWARDED if rewarded else ENDED_UNREWARDED
    return STAYED if same_observation else MOVED


@njit(inline="always", cache=True)
def surprised(known, s, a, c):
    """Record outcome class ``c`` of action ``a`` from ``s`` in ``known`` (``[observations, actions]``, -1: not seen)
    and say whether it is a surprise: it differs from the last one recorded there. A surprise also empties ``known``
    before recording; the caller wipes the rest of what it knew. On a deterministic environment a surprise means the
    environment changed."""
    surprise = known[s, a] >= 0 and known[s, a] != c
    if surprise:
        known[:] = -1
    known[s, a] = c
    return surprise
