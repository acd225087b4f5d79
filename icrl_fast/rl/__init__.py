"""Reinforcement learning over multi-episode contexts: the Double-DQN TD loss (``dqn``, also the default's only
objective, with its cross-episode target), the weighted objectives on one Q head (``objectives``), where training
contexts come from (``sources``: protocol contexts played by the teacher, a tabular Q-learner or the model; offline
slices; the online replay), and the batched KV-cache rollout engine (``rollout``, ``device_loop``)."""
