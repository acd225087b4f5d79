"""Reinforcement learning: the offline Double-DQN learner over multi-episode contexts."""
