"""The Q-network (a transformers Llama, Q read from the LM head at decision points) and its attention dispatch."""
