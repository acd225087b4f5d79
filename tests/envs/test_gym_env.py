"""The gymnasium surface: registered ids are drop-in replacements for gymnasium's FrozenLake-v1."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import icrl_fast  # noqa: F401  (registers the ids)
from icrl_fast.envs.maps import MapBatch, generate_maps
from icrl_fast.envs.vector import FrozenLakeVectorEnv

RANDOM_DESCS = [generate_maps(1, seed=s, height=(2, 7), width=(2, 7), p_start=0.2, min_hops=1).to_desc(0)
                for s in range(12)]


@pytest.mark.parametrize("kwargs", [
    dict(),  # gymnasium's defaults: 4x4, slippery
    dict(map_name="8x8", is_slippery=False),
    dict(is_slippery=True, success_rate=0.8, reward_schedule=(10, -2, -0.5)),
    *[dict(desc=d, is_slippery=i % 2 == 0) for i, d in enumerate(RANDOM_DESCS)],
])
def test_same_seed_same_trajectory_as_gymnasium(kwargs):
    """One uniform per reset and per step, exactly as gymnasium draws them: seeded runs match bit for bit."""
    ours, ref = gym.make("icrl_fast/FrozenLake-v1", **kwargs), gym.make("FrozenLake-v1", **kwargs)
    assert ours.observation_space == ref.observation_space and ours.action_space == ref.action_space
    for seed in range(5):
        assert ours.reset(seed=seed) == ref.reset(seed=seed)
        rng = np.random.default_rng(seed)
        for _ in range(250):
            a = int(rng.integers(4))
            got, want = ours.step(a), ref.step(a)
            assert got == want and type(got[1]) is type(want[1])
            if got[2] or got[3]:
                assert ours.reset() == ref.reset()


@pytest.mark.parametrize("kwargs", [dict(), dict(is_slippery=False), dict(map_name="8x8", success_rate=0.0),
                                    dict(desc=RANDOM_DESCS[3], success_rate=1.0, reward_schedule=(3, 1, 2))])
def test_unwrapped_attributes_equal_gymnasium(kwargs):
    ours, ref = gym.make("icrl_fast/FrozenLake-v1", **kwargs).unwrapped, gym.make("FrozenLake-v1", **kwargs).unwrapped
    assert ours.P == ref.P
    np.testing.assert_array_equal(ours.desc, ref.desc)
    assert ours.desc.dtype == ref.desc.dtype and (ours.nrow, ours.ncol) == (ref.nrow, ref.ncol)
    np.testing.assert_array_equal(ours.initial_state_distrib, ref.initial_state_distrib)
    assert ours.reward_range == ref.reward_range


def test_state_is_settable_like_gymnasium():
    ours = gym.make("icrl_fast/FrozenLake-v1", is_slippery=False)
    ours.reset(seed=0)
    ours.unwrapped.s = 14
    assert ours.step(2)[:3] == (15, 1, True)
    ours.unwrapped.s = 5  # standing on a hole: gymnasium stays there, reward 0, terminated
    assert ours.step(1)[:3] == (5, 0, True)


def test_passes_gymnasium_env_checker():
    for kwargs in (dict(), dict(is_slippery=False, map_name="8x8"), dict(desc=RANDOM_DESCS[0])):
        check_env(gym.make("icrl_fast/FrozenLake-v1", **kwargs).unwrapped)


def test_registered_limits_match_gymnasium():
    for ours_id, ref_id in (("icrl_fast/FrozenLake-v1", "FrozenLake-v1"),
                            ("icrl_fast/FrozenLake8x8-v1", "FrozenLake8x8-v1")):
        ours, ref = gym.spec(ours_id), gym.spec(ref_id)
        assert (ours.max_episode_steps, ours.kwargs, ours.reward_threshold) == \
            (ref.max_episode_steps, ref.kwargs, ref.reward_threshold)
    env = gym.make("icrl_fast/FrozenLake-v1", is_slippery=False)
    env.reset(seed=0)
    assert [env.step(0)[3] for _ in range(100)][-2:] == [False, True]


def test_render_modes_match_gymnasium():
    for mode in ("ansi", "rgb_array"):
        ours = gym.make("icrl_fast/FrozenLake-v1", render_mode=mode, is_slippery=False)
        ref = gym.make("FrozenLake-v1", render_mode=mode, is_slippery=False)
        ours.reset(seed=0), ref.reset(seed=0)
        ours.step(1), ref.step(1)
        np.testing.assert_array_equal(np.asarray(ours.render()), np.asarray(ref.render()))


def test_random_map_when_no_map_is_given():
    env = gym.make("icrl_fast/FrozenLake-v1", desc=None, map_name=None)
    assert env.unwrapped.desc.shape == (8, 8) and env.observation_space.n == 64


def test_make_vec_returns_the_numba_batch_by_default():
    vec = gym.make_vec("icrl_fast/FrozenLake-v1", num_envs=32, is_slippery=False)
    assert isinstance(vec, FrozenLakeVectorEnv)
    assert vec.single_observation_space == gym.spaces.Discrete(16) and vec.single_action_space == gym.spaces.Discrete(4)
    assert vec.metadata["autoreset_mode"] == gym.vector.AutoresetMode.SAME_STEP
    assert vec.sim.max_episode_steps == 100
    obs, info = vec.reset(seed=0)
    assert obs.dtype == np.int64 and obs.shape == (32,) and vec.observation_space.contains(obs)
    obs, rew, term, trunc, info = vec.step(vec.action_space.sample())
    assert (rew.dtype, term.dtype, trunc.dtype) == (np.float64, np.bool_, np.bool_)
    sync = gym.make_vec("icrl_fast/FrozenLake-v1", num_envs=2, vectorization_mode="sync")
    assert isinstance(sync, gym.vector.SyncVectorEnv)  # the single env vectorises the gymnasium way too


def test_vector_env_with_one_map_per_env_of_mixed_sizes():
    maps = generate_maps(10, seed=0, height=(3, 7), width=(3, 7))
    vec = FrozenLakeVectorEnv(maps=maps, is_slippery=False, copy=False)
    assert vec.num_envs == 10 and vec.single_observation_space.n == int(maps.num_cells.max())
    obs, _ = vec.reset(seed=1)
    assert all(obs[b] in maps.starts[b, : maps.n_starts[b]] for b in range(10))
    out = vec.step(np.zeros(10, dtype=np.int64))
    assert out[0] is vec.sim.obs  # copy=False: the in-place buffers


def test_copy_true_never_writes_an_array_it_returned():
    """gymnasium's copy=True: what step and reset returned stays as it was through later steps and partial resets
    (a reset once wrote the masked envs' starts into the last step's observation array)."""
    vec = FrozenLakeVectorEnv(maps=generate_maps(6, seed=0), is_slippery=True, copy=True)
    first, _ = vec.reset(seed=0)
    obs, rewards, terminated, truncated, _ = vec.step(np.full(6, 2))
    held = [a.copy() for a in (first, obs, rewards, terminated, truncated)]
    vec.reset(options={"reset_mask": np.arange(6) % 2 == 0})
    for t in range(10):
        vec.step(np.full(6, t % 4))
    for a, b in zip((first, obs, rewards, terminated, truncated), held):
        np.testing.assert_array_equal(a, b)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="action must be an int in 0..3"):
        env = gym.make("icrl_fast/FrozenLake-v1").unwrapped
        env.reset(seed=0)
        env.step(7)
    with pytest.raises(ValueError, match="unknown tile letters"):
        gym.make("icrl_fast/FrozenLake-v1", desc=["SFQ", "FFG"])
    with pytest.raises(ValueError, match="different lengths"):
        gym.make_vec("icrl_fast/FrozenLake-v1", num_envs=2, desc=["SFF", "FG"])
    with pytest.raises(ValueError, match="unknown map_name"):
        gym.make("icrl_fast/FrozenLake-v1", map_name="9x9")
    with pytest.raises(ValueError, match="either desc"):
        FrozenLakeVectorEnv(desc=["SG"], maps=MapBatch.repeat(["SG"], 2))
    with pytest.raises(ValueError, match="maps holds 2"):
        FrozenLakeVectorEnv(3, maps=MapBatch.repeat(["SG"], 2))
    with pytest.raises(ValueError, match="num_envs"):
        FrozenLakeVectorEnv(0)
