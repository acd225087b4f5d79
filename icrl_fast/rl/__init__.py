"""Reinforcement learning over multi-episode contexts: where a batch's contexts come from (``sources``: offline
slices, protocol contexts, the online replay), the objectives on the one Q head (``objectives``: the Double-DQN TD loss
of ``dqn``, imitation, observation) and the batched rollout engine with its KV cache (``rollout``, ``device_loop``)."""
