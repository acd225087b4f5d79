"""The Q-network (a transformers Llama, Q read from the LM head at decision points), its factored embedding and
hard-wired same-state memory for the step formats, the rollout KV cache, and the attention dispatch."""
