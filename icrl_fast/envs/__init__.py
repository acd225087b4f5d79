"""Frozen Lake simulators: maps, the Numba-batched core, their gymnasium surfaces, the optional C++/CUDA extension
(``ext``), and the batched players that run on the core (``learners``: tabular learners and the context teacher).

Importing :mod:`icrl_fast` registers ``icrl_fast/FrozenLake-v1`` and ``icrl_fast/FrozenLake8x8-v1`` with
gymnasium (string entry points: nothing heavy is imported until an env is made).
"""

from __future__ import annotations

ENV_IDS = ("icrl_fast/FrozenLake-v1", "icrl_fast/FrozenLake8x8-v1")


def register_envs() -> None:
    """Register the drop-in ids with gymnasium's registry (idempotent)."""
    import gymnasium

    specs = {
        "icrl_fast/FrozenLake-v1": ({"map_name": "4x4"}, 100, 0.70),  # same kwargs/limits as gymnasium's ids
        "icrl_fast/FrozenLake8x8-v1": ({"map_name": "8x8"}, 200, 0.85),
    }
    for env_id, (kwargs, max_steps, threshold) in specs.items():
        if env_id not in gymnasium.registry:
            gymnasium.register(
                id=env_id,
                entry_point="icrl_fast.envs.gym_env:FrozenLakeEnv",
                vector_entry_point="icrl_fast.envs.vector:FrozenLakeVectorEnv",
                kwargs=kwargs,
                max_episode_steps=max_steps,
                reward_threshold=threshold,
            )


def make_batch(maps, *, device="cpu", **kwargs):
    """A batched Frozen Lake for ``maps`` where the model runs: the C++/CUDA extension's ``TorchFrozenLakeBatch``
    on a CUDA device when it is loaded (rollouts stay on the GPU), the Numba ``FrozenLakeBatch`` otherwise (see
    ``icrl_fast.envs.ext.HAS_EXT`` / ``EXT_REASON`` for why). Same arguments, dynamics and random streams."""
    from icrl_fast.envs import ext

    if ext.backend(device) == "ext":
        return ext.TorchFrozenLakeBatch(maps, device=device, **kwargs)
    from icrl_fast.envs.frozen_lake import FrozenLakeBatch

    return FrozenLakeBatch(maps, **kwargs)
