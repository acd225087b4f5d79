"""``FrozenLakeVectorEnv``: the Numba-batched simulator behind gymnasium's ``VectorEnv`` surface.

``gymnasium.make_vec("icrl_fast/FrozenLake-v1", num_envs=N, ...)`` returns this class (it is the registered
``vector_entry_point``). It takes gymnasium's ``FrozenLake-v1`` keyword arguments for one map shared by every
env, or ``maps=`` (a :class:`~icrl_fast.envs.maps.MapBatch`) for one map per env, sizes mixed.

Differences from ``SyncVectorEnv`` of ``FrozenLake-v1``, all for speed: the default autoreset mode is SAME_STEP
(pass ``autoreset_mode="NextStep"`` for gymnasium's default); ``info["final_obs"]`` is an int64 array (-1 where
``info["_final_obs"]`` is false) instead of an object array, and there is no per-env ``info["prob"]``;
``copy=False`` returns the simulator's in-place buffers instead of fresh arrays.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from icrl_fast.envs.frozen_lake import FrozenLakeBatch, parse_autoreset_mode
from icrl_fast.envs.maps import MapBatch, resolve_desc


class FrozenLakeVectorEnv(VectorEnv):
    """``num_envs`` Frozen Lake envs stepped by one Numba kernel (see the module docstring).

    Args:
        num_envs: number of envs (with ``maps=``, defaults to ``len(maps)``).
        desc, map_name, is_slippery, success_rate, reward_schedule: as gymnasium's ``FrozenLake-v1``; with
            ``desc=None, map_name=None`` each env gets its own random 8x8 map from gymnasium's generator.
        maps: one map per env; excludes ``desc``.
        max_episode_steps: truncation length (100 as registered); ``None`` = never truncate.
        autoreset_mode: SAME_STEP (default), NEXT_STEP or DISABLED (enum or its string value).
        copy: return fresh arrays (gymnasium's behaviour) or the in-place buffers (fastest).
        seed: default seed when ``reset`` is called without one.
        num_threads: threads per step; ``None`` chooses by batch size (one thread below
            ``frozen_lake.PARALLEL_MIN_ENVS`` envs, see ``frozen_lake.step_threads``). Results do not depend on it.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP, "render_modes": ["ansi"]}

    def __init__(self, num_envs: int | None = None, *, desc=None, map_name: str | None = "4x4",
                 maps: MapBatch | None = None, is_slippery: bool = True, success_rate: float = 1.0 / 3.0,
                 reward_schedule=(1, 0, 0), max_episode_steps: int | None = 100,
                 autoreset_mode=AutoresetMode.SAME_STEP, render_mode: str | None = None, copy: bool = True,
                 seed: int | None = None, num_threads: int | None = None):
        if maps is not None:
            if desc is not None:
                raise ValueError("pass either desc= (one map for every env) or maps= (one per env), not both")
            if not isinstance(maps, MapBatch):
                raise TypeError(f"maps must be a MapBatch, got {type(maps).__name__}")
            num_envs = len(maps) if num_envs is None else num_envs
            if len(maps) == 1 and num_envs > 1:
                maps = MapBatch(np.repeat(maps.tiles, num_envs, 0), np.repeat(maps.nrow, num_envs),
                                np.repeat(maps.ncol, num_envs))
            if len(maps) != num_envs:
                raise ValueError(f"maps holds {len(maps)} maps but num_envs={num_envs}")
        else:
            num_envs = 1 if num_envs is None else num_envs
            if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
                raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
            if desc is None and map_name is None:
                maps = MapBatch.from_descs([resolve_desc(None, None, None if seed is None else seed + i)
                                            for i in range(num_envs)])
            else:
                maps = MapBatch.repeat(resolve_desc(desc, map_name), num_envs)
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        mode = parse_autoreset_mode(autoreset_mode)
        self.sim = FrozenLakeBatch(maps, is_slippery=is_slippery, success_rate=success_rate,
                                   reward_schedule=reward_schedule, max_episode_steps=max_episode_steps,
                                   autoreset_mode=mode, seed=seed, num_threads=num_threads)
        self.num_envs = int(num_envs)
        self.maps = maps
        self.copy = bool(copy)
        self.render_mode = render_mode
        self.metadata = {**self.metadata, "autoreset_mode": mode}
        self.single_observation_space = spaces.Discrete(int(maps.num_cells.max()))
        self.single_action_space = spaces.Discrete(4)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset every env (or those in ``options["reset_mask"]``); ``seed`` seeds env ``i``'s stream (seed, i)."""
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int or None (env i draws from stream (seed, i)), got {seed!r}")
        mask = None if options is None else options.get("reset_mask")
        return self.sim.reset(seed=seed, mask=mask, fresh=self.copy), {}

    def step(self, actions):
        # copy=True: the kernel writes into fresh arrays (gymnasium's semantics without a copy pass).
        sim = self.sim
        obs, rewards, terminated, truncated = sim.step(actions, fresh=self.copy)
        info = {}
        if sim.ended and sim.autoreset_mode is AutoresetMode.SAME_STEP:  # final_obs is -1 where none ended
            final = sim.final_obs
            info = {"final_obs": final if self.copy else final.copy(), "_final_obs": final >= 0}
        return obs, rewards, terminated, truncated, info

    def render(self):
        """``ansi``: one text grid per env with the agent's cell in brackets."""
        if self.render_mode is None:
            return None
        out = []
        for b in range(self.num_envs):
            rows = self.maps.to_desc(b)
            r, c = divmod(int(self.sim.obs[b]), int(self.maps.ncol[b]))
            rows[r] = rows[r][:c] + "[" + rows[r][c] + "]" + rows[r][c + 1:]
            out.append("\n".join(rows))
        return out
