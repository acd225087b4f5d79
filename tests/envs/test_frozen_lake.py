"""The batched Numba simulator against gymnasium's FrozenLake-v1: exact where deterministic, by frequencies
where random (4 sigma), and independent of the thread count."""

from collections import Counter

import gymnasium as gym
import numba
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from icrl_fast.envs.frozen_lake import FrozenLakeBatch
from icrl_fast.envs.maps import MAPS, MapBatch, generate_maps
from icrl_fast.envs.selfcheck import exact_against_gymnasium


def test_exact_against_gymnasium_on_thousands_of_random_maps():
    """Non-square, mixed sizes in one batch, several S and G, holes; random actions; SAME_STEP autoreset."""
    maps = generate_maps(2000, seed=1, height=(2, 7), width=(2, 7), p_start=0.2, p_goal=0.15, min_hops=1)
    assert (maps.n_starts > 1).sum() > 500 and (maps.nrow != maps.ncol).sum() > 1000
    assert exact_against_gymnasium(maps, steps=150, seed=0) == 300_000


def test_exact_on_hole_free_maps_including_truncation_at_100():
    """Open 7x7 maps: random walks often last 100 steps, so truncation (and its reset) is exercised."""
    maps = generate_maps(400, seed=2, height=7, width=7, p_start=0.05, p_goal=0.02, p_hole=0.0, min_hops=6)
    env = FrozenLakeBatch(maps, is_slippery=False, seed=0)
    env.reset()
    truncations = 0
    for t in range(300):
        truncations += int(env.step(np.random.default_rng(t).integers(0, 4, 400))[3].sum())
    assert truncations > 20
    assert exact_against_gymnasium(maps, steps=300, seed=1) == 120_000


def test_truncation_exactly_at_max_episode_steps_and_same_step_reset():
    env = FrozenLakeBatch(MapBatch.repeat(MAPS["4x4"], 3), is_slippery=False, max_episode_steps=100, seed=0)
    env.reset()
    left = np.zeros(3, dtype=np.int64)  # LEFT from the top-left start: the agent never moves
    for t in range(1, 100):
        obs, rew, term, trunc = env.step(left)
        assert not trunc.any() and not term.any() and env.elapsed_steps[0] == t
    obs, rew, term, trunc = env.step(left)
    assert trunc.all() and not term.any() and (env.final_obs == 0).all() and (obs == 0).all()
    assert (env.elapsed_steps == 0).all()
    short = FrozenLakeBatch(MapBatch.repeat(MAPS["4x4"], 1), max_episode_steps=7, is_slippery=False, seed=0)
    short.reset()
    assert [bool(short.step(left[:1])[3][0]) for _ in range(8)] == [False] * 6 + [True, False]
    never = FrozenLakeBatch(MapBatch.repeat(MAPS["4x4"], 1), max_episode_steps=None, is_slippery=False, seed=0)
    never.reset()
    assert not any(bool(never.step(left[:1])[3][0]) for _ in range(1000))


def test_goal_on_the_last_step_is_terminated_and_truncated():
    """Like gymnasium's TimeLimit, truncation does not hide termination: both flags can be true together."""
    env = FrozenLakeBatch(MapBatch.repeat(["SFG"], 1), is_slippery=False, max_episode_steps=2, seed=0)
    env.reset()
    env.step(np.array([2]))
    obs, rew, term, trunc = env.step(np.array([2]))
    assert term[0] and trunc[0] and rew[0] == 1.0 and env.final_obs[0] == 2 and obs[0] == 0
    ref = gym.make("FrozenLake-v1", desc=["SFG"], is_slippery=False, max_episode_steps=2)
    ref.reset(seed=0)
    ref.step(2)
    assert ref.step(2)[1:4] == (1, True, True)


@pytest.mark.parametrize("mode", [AutoresetMode.SAME_STEP, AutoresetMode.NEXT_STEP])
@pytest.mark.parametrize("map_name", ["4x4", "8x8"])
def test_autoreset_modes_equal_gymnasium_sync_vector_env(mode, map_name):
    """Single-start maps make resets deterministic, so whole vector trajectories must be identical."""
    n = 16
    ours = gym.make_vec("icrl_fast/FrozenLake-v1", num_envs=n, map_name=map_name, is_slippery=False,
                        autoreset_mode=mode)
    ref = gym.make_vec("FrozenLake-v1", num_envs=n, map_name=map_name, is_slippery=False, vectorization_mode="sync",
                       vector_kwargs={"autoreset_mode": mode})
    o1, _ = ours.reset(seed=0)
    o2, _ = ref.reset(seed=0)
    np.testing.assert_array_equal(o1, o2)
    rng = np.random.default_rng(0)
    for _ in range(400):
        a = rng.integers(0, 4, n)
        s1, s2 = ours.step(a), ref.step(a)
        for x, y in zip(s1[:4], s2[:4]):
            np.testing.assert_array_equal(x, y)
            assert x.dtype == y.dtype
        if mode is AutoresetMode.SAME_STEP and "_final_obs" in s2[4]:
            np.testing.assert_array_equal(s1[4]["_final_obs"], s2[4]["_final_obs"])
            done = s2[4]["_final_obs"]
            np.testing.assert_array_equal(s1[4]["final_obs"][done], s2[4]["final_obs"][done].astype(np.int64))


def test_disabled_autoreset_and_masked_reset():
    env = FrozenLakeBatch(MapBatch.repeat(["SFG"], 2), is_slippery=False, autoreset_mode="Disabled", seed=0)
    env.reset()
    env.step(np.array([2, 0]))
    obs, rew, term, _ = env.step(np.array([2, 0]))
    assert obs.tolist() == [2, 0] and term.tolist() == [True, False]
    obs, rew, term, _ = env.step(np.array([0, 0]))  # stepping a finished episode: gymnasium stays, reward 0
    assert obs.tolist() == [2, 0] and rew.tolist() == [0.0, 0.0] and term.tolist() == [True, False]
    env.reset(mask=np.array([True, False]))
    assert env.obs.tolist() == [0, 0] and env.elapsed_steps.tolist() == [0, 3]


def transition_counts(env: FrozenLakeBatch, steps: int, seed: int) -> Counter:
    """Count (s, a, s') over random steps, using final_obs where an episode ended."""
    counts: Counter = Counter()
    rng = np.random.default_rng(seed)
    prev = env.reset().copy()
    for _ in range(steps):
        a = rng.integers(0, 4, env.num_envs)
        obs, _, term, trunc = env.step(a)
        landed = np.where(term | trunc, env.final_obs, obs)
        counts.update(zip(prev.tolist(), a.tolist(), landed.tolist()))
        prev = obs.copy()
    return counts


@pytest.mark.parametrize("success_rate", [1.0 / 3.0, 0.75])
def test_slippery_transition_frequencies_match_gymnasium_p(success_rate):
    desc = ["SFFF", "FHFF", "FFFH", "HFFG"]
    env = FrozenLakeBatch(MapBatch.repeat(desc, 4096), is_slippery=True, success_rate=success_rate, seed=5)
    counts = transition_counts(env, 60, seed=0)
    P = gym.make("FrozenLake-v1", desc=desc, is_slippery=True, success_rate=success_rate).unwrapped.P
    checked = 0
    for s in range(16):
        for a in range(4):
            n = sum(counts[(s, a, t)] for t in range(16))
            if desc[s // 4][s % 4] in "GH" or n < 500:
                continue
            expected = Counter()
            for p, t, _, _ in P[s][a]:
                expected[t] += p
            for t in range(16):
                p = expected[t]
                sigma = np.sqrt(max(p * (1 - p), 1e-12) / n)
                assert abs(counts[(s, a, t)] / n - p) <= 4 * sigma + 1e-12, (s, a, t, counts[(s, a, t)] / n, p)
            checked += 1
    assert checked >= 30


def test_starts_are_uniform_over_s_tiles():
    desc = ["SFSF", "FFFF", "SFFG"]  # starts at 0, 2, 8
    env = FrozenLakeBatch(MapBatch.repeat(desc, 30000), is_slippery=False, seed=3)
    starts = Counter(env.reset().tolist())
    assert set(starts) == {0, 2, 8}
    for k in starts.values():
        assert abs(k / 30000 - 1 / 3) < 4 * np.sqrt(2 / 9 / 30000)


def test_results_do_not_depend_on_thread_count():
    maps = generate_maps(5000, seed=4)

    def run(threads):  # the simulator chooses its thread count per step: ask for each explicitly
        env = FrozenLakeBatch(maps, is_slippery=True, seed=9, num_threads=threads)
        assert env.num_threads == threads
        out = [env.reset().copy()]
        for t in range(50):
            out.append(env.step(np.random.default_rng(t).integers(0, 4, 5000))[0].copy())
        return np.stack(out)

    one = run(1)
    np.testing.assert_array_equal(one, run(numba.config.NUMBA_NUM_THREADS))
    other = FrozenLakeBatch(maps, is_slippery=True, seed=10)
    assert not np.array_equal(other.reset(), one[0])


def test_reset_with_seed_replays_the_same_episode_stream():
    env = FrozenLakeBatch(generate_maps(64, seed=0), is_slippery=True, seed=1)
    acts = np.random.default_rng(0).integers(0, 4, (30, 64))
    first = [env.reset(seed=123).copy()] + [env.step(a)[0].copy() for a in acts]
    again = [env.reset(seed=123).copy()] + [env.step(a)[0].copy() for a in acts]
    np.testing.assert_array_equal(np.stack(first), np.stack(again))


def test_custom_reward_schedule():
    env = FrozenLakeBatch(MapBatch.repeat(["SFG", "HFF"], 3), is_slippery=False, reward_schedule=(5, -1, 0.25),
                          seed=0)
    env.reset()
    _, rew, term, _ = env.step(np.array([2, 1, 3]))  # right -> F, down -> H, up -> wall (stays on S)
    assert rew.tolist() == [0.25, -1.0, 0.25] and term.tolist() == [False, True, False]
    _, rew, term, _ = env.step(np.array([2, 2, 2]))
    assert rew[0] == 5.0 and term[0]


def test_bad_input_is_a_clear_error():
    env = FrozenLakeBatch(MapBatch.repeat(MAPS["4x4"], 4), seed=0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(4, dtype=np.int64))
    env.reset()
    with pytest.raises(ValueError, match=r"env 2 got 4"):
        env.step(np.array([0, 1, 4, 0]))
    with pytest.raises(ValueError, match=r"env 0 got -1"):
        env.step(np.array([-1, 1, 2, 0]))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        env.step(np.zeros(5, dtype=np.int64))
    with pytest.raises(TypeError, match="integers"):
        env.step(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="mask"):
        env.reset(mask=np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="success_rate"):
        FrozenLakeBatch(MapBatch.repeat(MAPS["4x4"], 1), success_rate=2.0)
    with pytest.raises(ValueError, match="reward_schedule"):
        FrozenLakeBatch(MapBatch.repeat(MAPS["4x4"], 1), reward_schedule=(1, 0))
    with pytest.raises(ValueError, match="max_episode_steps"):
        FrozenLakeBatch(MapBatch.repeat(MAPS["4x4"], 1), max_episode_steps=0)
    with pytest.raises(ValueError, match="autoreset_mode"):
        FrozenLakeBatch(MapBatch.repeat(MAPS["4x4"], 1), autoreset_mode="sometimes")
    with pytest.raises(TypeError, match="MapBatch"):
        FrozenLakeBatch(MAPS["4x4"])


def test_fresh_buffers_are_recycled_only_when_nothing_else_holds_them():
    """fresh=True hands out buffers that nothing writes again while anything holds them (a variable, a view, a
    tensor); buffers whose results were dropped come back (a handful of sets, not five arrays per step)."""
    torch = pytest.importorskip("torch")
    env = FrozenLakeBatch(generate_maps(16, seed=0), is_slippery=True, seed=0)
    env.reset()
    acts = [np.full(16, t % 4) for t in range(30)]
    seen = set()
    for a in acts:  # results dropped at once, as a loop that reads them and moves on does
        out = env.step(a, fresh=True)
        seen.add(id(out[0]))
        del out
    assert len(env._spare) <= 3 and len(seen) <= 3
    obs, rewards, *_ = env.step(acts[0], fresh=True)
    view, tensor = rewards[2:5], torch.from_numpy(env.step(acts[1], fresh=True)[2])
    snapshot = [obs.copy(), view.copy(), tensor.clone()]
    for a in acts:  # what is still held (obs, a view of rewards, a tensor on terminated) is never written again
        env.step(a, fresh=True)
    np.testing.assert_array_equal(obs, snapshot[0])
    np.testing.assert_array_equal(view, snapshot[1])
    assert torch.equal(tensor, snapshot[2])


def test_fresh_reset_leaves_a_callers_earlier_buffers_alone():
    env = FrozenLakeBatch(generate_maps(8, seed=0), seed=0)
    env.reset()
    obs = env.step(np.full(8, 2), fresh=True)[0]
    before = obs.copy()
    mask = np.zeros(8, dtype=bool)
    mask[::2] = True
    again = env.reset(mask=mask, fresh=True)
    np.testing.assert_array_equal(obs, before)  # the caller's array from the step is untouched
    np.testing.assert_array_equal(again[~mask], before[~mask])  # the envs not reset keep their observation


def test_a_refused_fresh_step_keeps_the_buffers_that_hold_the_state():
    env = FrozenLakeBatch(generate_maps(8, seed=0), is_slippery=False, seed=0)
    env.reset()
    for t in range(6):  # results dropped: the spare sets hold older steps' values
        env.step(np.full(8, t % 4), fresh=True)
    state = [x.copy() for x in (env.obs, env.rewards, env.terminated, env.truncated, env.final_obs)]
    with pytest.raises(ValueError, match="0..3"):
        env.step(np.full(8, 7), fresh=True)
    for got, want in zip((env.obs, env.rewards, env.terminated, env.truncated, env.final_obs), state):
        np.testing.assert_array_equal(got, want)


def test_fresh_step_buffers_are_not_overwritten():
    env = FrozenLakeBatch(generate_maps(32, seed=0), is_slippery=True, seed=0)
    env.reset()
    kept = [env.step(np.full(32, t % 4), fresh=True) for t in range(20)]
    assert all(kept[0][0] is not k[0] for k in kept[1:])
    replay = FrozenLakeBatch(generate_maps(32, seed=0), is_slippery=True, seed=0)
    replay.reset()
    for t in range(20):
        for got, want in zip(kept[t], replay.step(np.full(32, t % 4))):
            np.testing.assert_array_equal(got, want)

