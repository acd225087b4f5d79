"""Offline data: learner env-steps/s (ours vs a plain-Python tabular Q-learner on gymnasium's FrozenLake-v1, the
usual way to produce such logs) and the paper-scale dataset build time.

Targets (issue #3, 2-core CPU): all 250 maps' learning <= 10 s; paper-scale build (250 maps, ~9,500 slices x
4,096 tokens) <= 60 s.
"""

import gc

import gymnasium as gym
import numpy as np

from icrl_fast.data.dataset import DatasetConfig, build_dataset
from icrl_fast.envs.learners import QLearningConfig, q_learning
from icrl_fast.envs.maps import generate_maps

SUITE = "data"
MAPS = generate_maps(250, seed=0)


def python_q_learning(desc, episodes: int, seed: int) -> int:
    """Reference: the textbook epsilon-greedy tabular Q-learner on gymnasium (same hyperparameters)."""
    cfg = QLearningConfig()
    env = gym.make("FrozenLake-v1", desc=desc, is_slippery=False)
    rng = np.random.default_rng(seed)
    q = np.zeros((env.observation_space.n, 4))
    steps = 0
    s, _ = env.reset(seed=seed)
    for e in range(episodes):
        eps = max(cfg.epsilon_end, cfg.epsilon_start - (cfg.epsilon_start - cfg.epsilon_end) * e /
                  cfg.epsilon_decay_episodes)
        done = False
        while not done:
            a = int(rng.integers(4)) if rng.random() < eps else int(rng.choice(np.flatnonzero(q[s] == q[s].max())))
            s2, r, term, trunc, _ = env.step(a)
            q[s, a] += cfg.alpha * (r + (0 if term else cfg.gamma * q[s2].max()) - q[s, a])
            s, done, steps = s2, term or trunc, steps + 1
        s, _ = env.reset()
    return steps


def test_python_q_learning_reference(benchmark, record):
    """Reference on 5 maps (the full 250 would take minutes); throughput in env-steps/s."""
    steps = []
    benchmark.pedantic(lambda: steps.append(sum(python_q_learning(MAPS.to_desc(b), 1200, b) for b in range(5))),
                       rounds=3, iterations=1)
    record(SUITE, "Python Q-learning on gymnasium (5 maps)", float(np.mean(steps)), "env-steps/s",
           "Q-learning, 1,200 episodes per map", "reference")


def test_ours_q_learning_250_maps(benchmark, record):
    q_learning(MAPS[:2], seed=0)
    steps = []
    gc.collect()
    benchmark.pedantic(lambda: steps.append(q_learning(MAPS, seed=0)[0].obs.size), rounds=5, iterations=1)
    record(SUITE, "q_learning (Numba, 250 maps)", float(np.mean(steps)), "env-steps/s",
           "Q-learning, 1,200 episodes per map", "ours")


def test_paper_scale_build(benchmark, record, tmp_path):
    cfg = DatasetConfig(learner=QLearningConfig(episodes=2600))
    slices = []
    benchmark.pedantic(lambda: slices.append(len(build_dataset(cfg, tmp_path / "ds", overwrite=True, progress=False))),
                       rounds=3, iterations=1)
    record(SUITE, f"build_dataset (250 maps, {slices[-1]:,} slices x 4,096)", float(slices[-1]), "slices/s",
           "paper-scale build", "ours")
