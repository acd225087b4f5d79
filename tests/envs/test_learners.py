"""Tabular learners: logs replay exactly in gymnasium, tables solve the maps, seeds fix everything."""

import gymnasium as gym
import numba
import numpy as np
import pytest

from icrl_fast.envs.learners import (EpisodeLog, QLearningConfig, copier, epsilon_schedule, greedy_solves, q_learning,
                                    ramp_ceiling, random_policy)
from icrl_fast.envs.maps import MapBatch, generate_maps


def replay_in_gymnasium(maps: MapBatch, log: EpisodeLog, episodes) -> int:
    """Replay episodes in gymnasium's FrozenLake-v1 from their logged start; assert every transition."""
    envs = {}
    for e in episodes:
        b = int(log.map_id[e])
        env = envs.setdefault(b, gym.make("FrozenLake-v1", desc=maps.to_desc(b), is_slippery=False))
        obs, acts, rews = log.episode(e)
        env.reset(seed=0)
        env.unwrapped.s = int(obs[0])
        for t in range(len(acts)):
            assert int(obs[t]) == int(env.unwrapped.s)
            s2, r, term, trunc, _ = env.step(int(acts[t]))
            assert float(r) == float(rews[t])
            last = t == len(acts) - 1
            assert (term or trunc) == last, (e, t)
        assert s2 == int(log.final_obs[e]) and term == bool(log.terminated[e]) and trunc == bool(log.truncated[e])
        assert float(log.returns[e]) == float(rews.sum())
    return len(episodes)


def test_logs_replay_exactly_in_gymnasium():
    maps = generate_maps(40, seed=1, height=(2, 6), width=(2, 6), p_start=0.2, min_hops=2)
    log, _ = q_learning(maps, QLearningConfig(episodes=150, max_episode_steps=100), seed=3)
    assert log.num_episodes == 40 * 150 and log.obs.size == int(log.length.sum())
    assert log.truncated.any() and log.success.any() and (log.terminated & ~log.success).any()
    rng = np.random.default_rng(0)
    replay_in_gymnasium(maps, log, rng.choice(log.num_episodes, 1500, replace=False))
    rand = random_policy(maps, 50, seed=4)
    replay_in_gymnasium(maps, rand, range(0, rand.num_episodes, 3))


def test_q_learning_solves_the_paper_maps():
    maps = generate_maps(250, seed=0)
    log, q = q_learning(maps, seed=0)
    solved = greedy_solves(maps, q)
    assert solved.mean() >= 0.95, solved.mean()
    per_episode = log.success.reshape(250, -1).mean(0)
    assert per_episode[-100:].mean() > per_episode[:100].mean() + 0.5  # it learns


def expectimax_in_gymnasium(desc, p: float, steps: int) -> float:
    """The best success probability within ``steps`` when each action is replaced by a uniform one with probability
    ``1 - p``, from gymnasium's own transition table and start distribution (an independent reference)."""
    env = gym.make("FrozenLake-v1", desc=desc, is_slippery=False).unwrapped
    n = env.observation_space.n
    v = np.zeros(n)
    for _ in range(steps):
        q = np.array([[sum(prob * (r if done else v[s2]) for prob, s2, r, done in env.P[s][a]) for a in range(4)]
                      for s in range(n)])
        v = p * q.max(1) + (1 - p) * q.mean(1)
    return float(env.initial_state_distrib @ v)


def test_the_ramp_ceiling_is_the_best_success_under_forced_random_moves():
    maps = generate_maps(12, seed=5, height=(2, 5), width=(2, 5), p_start=0.2, min_hops=2)
    ps = [0.0, 0.3, 0.75, 1.0]
    for steps in (3, 8, 100):
        got = ramp_ceiling(maps, ps, max_episode_steps=steps)
        want = np.array([[expectimax_in_gymnasium(maps.to_desc(b), p, steps) for p in ps] for b in range(len(maps))])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.allclose(ramp_ceiling(maps, [1.0]), 1.0)  # knowing the map and acting on it always succeeds
    # P(optimal) 0 is the random policy: its sampled success agrees within sampling error
    rand = random_policy(maps, 400, seed=1).success.reshape(len(maps), 400).mean(1)
    exact = ramp_ceiling(maps, [0.0])[:, 0]
    assert (np.abs(rand - exact) < 4 * np.sqrt(exact * (1 - exact) / 400) + 1e-9).all()
    # repeated values map back to their episodes
    assert ramp_ceiling(maps, [0.3, 1.0, 0.3]).tolist() == ramp_ceiling(maps, [0.3, 1.0, 0.3]).tolist()
    np.testing.assert_array_equal(ramp_ceiling(maps, [0.3, 1.0, 0.3])[:, 0], ramp_ceiling(maps, [0.3])[:, 0])
    with pytest.raises(ValueError, match="p_optimal"):
        ramp_ceiling(maps, np.array([0.5, 1.5]))


def test_the_epsilon_schedule_is_linear_then_flat():
    cfg = QLearningConfig(episodes=7, epsilon_start=1.0, epsilon_end=0.2, epsilon_decay_episodes=4)
    np.testing.assert_allclose(epsilon_schedule(cfg), [1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2])
    assert (epsilon_schedule(QLearningConfig(episodes=3, epsilon_end=0.05, epsilon_decay_episodes=0)) == 0.05).all()


def test_random_policy_is_uniform_and_does_not_learn():
    maps = generate_maps(50, seed=2)
    log = random_policy(maps, 400, seed=0)
    counts = np.bincount(log.actions, minlength=4) / log.actions.size
    assert np.all(np.abs(counts - 0.25) < 4 * np.sqrt(0.25 * 0.75 / log.actions.size))
    half = log.success.reshape(50, -1)
    assert abs(half[:, :200].mean() - half[:, 200:].mean()) < 0.05


def test_seed_fixes_logs_on_any_thread_count():
    maps = generate_maps(30, seed=5)
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one, q1 = q_learning(maps, QLearningConfig(episodes=200), seed=9)
    finally:
        numba.set_num_threads(old)
    two, q2 = q_learning(maps, QLearningConfig(episodes=200), seed=9)
    np.testing.assert_array_equal(one.obs, two.obs)
    np.testing.assert_array_equal(one.actions, two.actions)
    np.testing.assert_array_equal(q1, q2)
    other, _ = q_learning(maps, QLearningConfig(episodes=200), seed=10)
    assert other.obs.size != one.obs.size or not np.array_equal(other.obs, one.obs)


def test_bad_input_is_a_clear_error():
    maps = generate_maps(2, seed=0)
    with pytest.raises(ValueError, match="episodes"):
        q_learning(maps, QLearningConfig(episodes=0), seed=0)
    with pytest.raises(ValueError, match="alpha"):
        q_learning(maps, QLearningConfig(alpha=1.5), seed=0)
    with pytest.raises(TypeError, match="MapBatch"):
        q_learning(["SFG"], seed=0)
    with pytest.raises(ValueError, match="q must be"):
        greedy_solves(maps, np.zeros((2, 3, 4)))


def test_the_copier_replays_its_last_success_and_never_repeats_a_known_dead_end():
    maps = generate_maps(150, seed=5)
    cfg = QLearningConfig(episodes=30, epsilon_start=1.0, epsilon_end=0.0, epsilon_decay_episodes=10)
    log = copier(maps, cfg, seed=2)
    assert replay_in_gymnasium(maps, log, range(0, log.num_episodes, 37)) > 100
    success = log.success.reshape(len(maps), 30)
    first = np.where(success.any(1), success.argmax(1), 30)
    single = np.flatnonzero(maps.n_starts == 1)  # (from another start tile the last success may not pass by)
    assert len(single) > 100
    for b in single:  # once it acts on its own (epsilon 0 from episode 10), one success is enough
        assert success[b, max(first[b] + 1, 10):].all(), b
    assert 0.1 < success[:, :2].mean() < 0.25 and success[:, 20:].mean() > 0.9  # random, then solved
    dead: set[tuple[int, int, int]] = set()
    for e in range(log.num_episodes):  # an epsilon-0 step before any success avoids every known dead end
        b, k = int(log.map_id[e]), e % 30
        obs, acts, _ = log.episode(e)
        for t, (s, a) in enumerate(zip(obs.tolist(), acts.tolist())):
            if k >= 10 and first[b] >= k and len({x for x in range(4) if (b, s, x) in dead}) < 4:
                assert (b, s, a) not in dead, (e, t)
            bumped = t + 1 < len(obs) and int(obs[t + 1]) == s
            fell = t + 1 == len(obs) and log.terminated[e] and log.returns[e] == 0
            if bumped or fell:
                dead.add((b, s, a))
    np.testing.assert_array_equal(copier(maps, cfg, seed=2).actions, log.actions)  # the seed fixes it
    assert not np.array_equal(copier(maps, cfg, seed=3).actions, log.actions)


# ------------------------------------------------------------------------------------------- the context teacher
def hand_log(episodes):
    """An EpisodeLog of one map from ``[(obs, actions, rewards, final_obs, terminated)]``."""
    obs = np.concatenate([np.asarray(o, np.int16) for o, *_ in episodes])
    lengths = np.array([len(o) for o, *_ in episodes], np.int32)
    return EpisodeLog(obs=obs, actions=np.concatenate([np.asarray(a, np.int8) for _, a, *_ in episodes]),
                      rewards=np.concatenate([np.asarray(r, np.float32) for _, _, r, *_ in episodes]),
                      map_id=np.zeros(len(episodes), np.int32),
                      start=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), length=lengths,
                      returns=np.array([sum(r) for _, _, r, *_ in episodes], np.float32),
                      terminated=np.array([t for *_, t in episodes]), truncated=np.array([not t for *_, t in episodes]),
                      final_obs=np.array([f for *_, f, _ in episodes], np.int16))


def test_the_teacher_copies_the_last_success_and_explores_untried_moves_that_are_not_known_bad():
    from icrl_fast.envs.learners import teacher_labels

    # map "SFG" / "HFF": obs 0 1 2 / 3 4 5; bits: 1 left, 2 down, 4 right, 8 up
    log = hand_log([
        ([0, 0, 1], [0, 2, 2], [0, 0, 1], 2, True),  # left bumps the wall, right, right reaches G
        ([0], [1], [0], 3, True),                     # down from 0 falls into the hole at 3
        ([0, 1], [2, 2], [0, 1], 2, True),            # the success again
    ])
    labels = teacher_labels(log, cells=6).tolist()
    assert labels[0] == 15                 # nothing known: every action is untried and not known bad
    assert labels[1] == 2 | 4 | 8          # left bumped the wall: untried, safe actions
    assert labels[2] == 15                 # state 1 is new
    assert labels[3] == 4                  # a success is in context: copy its exit from 0 (right)...
    assert labels[4] == 4 and labels[5] == 4  # ...although down was then tried and fell into the hole
    cut = hand_log([([0, 0, 0], [0, 1, 2], [0, 0, 0], 1, False)])  # left and down bump walls, then right (cut)
    assert teacher_labels(cut, cells=6).tolist()[2] == 4 | 8  # untried and not known bad
    with pytest.raises(ValueError, match="cells"):
        teacher_labels(log, cells=1)  # observation 1 needs 2 cells


def test_once_every_safe_action_was_tried_the_least_tried_teacher_rotates_where_the_any_teacher_ties():
    from icrl_fast.envs.learners import teacher_labels

    # map "SFG" / "HFF" again; at 4 down bumps the wall and left falls into the hole at 3; up and right are safe
    log = hand_log([
        ([0, 1, 4, 4], [2, 1, 1, 0], [0, 0, 0, 0], 3, True),
        ([0, 1, 4, 1, 4, 5, 4, 1, 4], [2, 1, 3, 1, 2, 0, 3, 1, 2], [0] * 9, 5, False),  # cut
    ])
    any_rule, least = teacher_labels(log, cells=6), teacher_labels(log, cells=6, least_tried=True)
    assert least[8] == any_rule[8] == 4      # at 4: right is its last untried safe action
    assert least[10] == any_rule[10] == 4 | 8  # up and right each tried once
    assert any_rule[12] == 4 | 8 and least[12] == 4  # up twice, right once: the rotation goes right
    np.testing.assert_array_equal(np.delete(least, 12), np.delete(any_rule, 12))


def test_a_forgetting_teacher_starts_over_at_a_surprise_and_the_other_keeps_copying_the_old_success():
    from icrl_fast.envs.learners import teacher_labels

    # map A "SFG" / "HFF" for one episode, then, unmarked, map B "SFH" / "FFG" (obs 0 1 2 / 3 4 5)
    log = hand_log([
        ([0, 1], [2, 2], [0, 1], 2, True),        # A: right, right reaches G at 2
        ([0, 1], [2, 2], [0, 0], 2, True),        # B: right moves as before; right from 1 now falls in the hole at 2
        ([0, 1, 4], [2, 1, 2], [0, 0, 1], 5, True),
    ])
    keep, forget = teacher_labels(log, cells=6, least_tried=True), teacher_labels(log, cells=6, least_tried=True,
                                                                                  forget=True)
    assert keep[:4].tolist() == forget[:4].tolist() and forget[3] == 4  # no surprise yet: copy the success
    assert keep[4] == 4 and keep[5] == 4  # the old success is still copied into the new hole
    assert forget[4] == 15                # the surprise wiped it: state 0 is new again
    assert forget[5] == 1 | 2 | 8         # at 1 only the hole just found is known


def test_forgetting_changes_nothing_on_a_map_that_stays_and_recovers_after_a_switch_where_keeping_does_not():
    from icrl_fast.envs.learners import play_protocol, teacher_labels
    from icrl_fast.protocol import paper_ramp

    maps = generate_maps(300, seed=12)
    ramp = paper_ramp(30)
    keep = play_protocol(maps, ramp, seed=4, least_tried=True)
    forget = play_protocol(maps, ramp, seed=4, least_tried=True, forget=True)
    for a, b in zip((keep[0].obs, keep[0].actions, keep[1]), (forget[0].obs, forget[0].actions, forget[1])):
        np.testing.assert_array_equal(a, b)  # deterministic maps: a surprise needs a changed map
    other = maps[np.roll(np.arange(300), 1)]
    late = {}
    for f in (False, True):  # the model's non-stationary experiment acting by itself from episode 0 (greedy)
        log, labels = play_protocol(maps, np.ones(60), seed=4, least_tried=True, forget=f, switch_to=other,
                                    switch_after=30)
        np.testing.assert_array_equal(labels, teacher_labels(log, least_tried=True, forget=f))
        late[f] = log.success.reshape(300, 60)[:, 50:].mean()
        assert log.success.reshape(300, 60)[:, 20:30].mean() >= 0.95
    assert late[True] >= 0.9 and late[False] <= 0.7, late  # measured on 2,000 maps: 0.97 and 0.49
    small, large = generate_maps(40, seed=2, height=3, width=3), generate_maps(40, seed=3, height=5, width=5)
    log, labels = play_protocol(small, np.ones(20), seed=1, least_tried=True, forget=True, switch_to=large,
                                switch_after=10)  # cells up to 24 after a switch from 3 x 3 maps
    assert log.obs[log.start[10]:].max() > 8 and log.success.reshape(40, 20)[:, 15:].mean() > 0.5
    np.testing.assert_array_equal(labels, teacher_labels(log, cells=25, least_tried=True, forget=True))
    with pytest.raises(ValueError, match="slippery"):
        play_protocol(maps, ramp, seed=0, forget=True, is_slippery=True)
    with pytest.raises(ValueError, match="together"):
        play_protocol(maps, ramp, seed=0, switch_to=other)
    with pytest.raises(ValueError, match="switch_after"):
        play_protocol(maps, ramp, seed=0, switch_to=other[:3], switch_after=3)


def test_the_protocol_player_labels_its_steps_as_the_context_teacher_would_and_the_teacher_learns_in_context():
    from icrl_fast.envs.learners import play_protocol, teacher_labels
    from icrl_fast.evaluate import paper_ramp

    maps = generate_maps(300, seed=11)
    log, labels = play_protocol(maps, paper_ramp(30), seed=5)
    assert log.num_episodes == 300 * 30 and labels.shape == log.obs.shape
    np.testing.assert_array_equal(labels, teacher_labels(log))  # a pure function of the context
    log_lt, labels_lt = play_protocol(maps, paper_ramp(30), seed=5, least_tried=True)
    np.testing.assert_array_equal(labels_lt, teacher_labels(log_lt, least_tried=True))
    assert log_lt.success.reshape(300, 30)[:, 20:].mean() >= 0.95
    replay_in_gymnasium(maps, log, range(0, log.num_episodes, 7))
    success = log.success.reshape(300, 30)
    assert success[:, :2].mean() < 0.3 and success[:, 20:].mean() >= 0.95  # measured 0.16 -> 0.98 on 3,000 maps
    teacher_acts = (labels >> log.actions.astype(np.uint8)) & 1
    late = np.repeat(np.arange(log.num_episodes) % 30 >= 20, log.length)
    assert teacher_acts[late].all() and teacher_acts[~late].mean() < 0.9  # P(teacher) 1 late; the ramp mixes random in
    again, labels2 = play_protocol(maps, paper_ramp(30), seed=5)
    np.testing.assert_array_equal(again.actions, log.actions)
    np.testing.assert_array_equal(labels2, labels)
    with pytest.raises(ValueError, match="probabilities"):
        play_protocol(maps, [1.5], seed=0)
