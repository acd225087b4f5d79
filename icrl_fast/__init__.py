"""icrl_fast: train transformers that learn in context by reinforcement learning, fast.

Importing the package registers the gymnasium ids ``icrl_fast/FrozenLake-v1`` and
``icrl_fast/FrozenLake8x8-v1`` (drop-in replacements for gymnasium's ``FrozenLake-v1`` / ``FrozenLake8x8-v1``).
"""

from icrl_fast.envs import register_envs

__version__ = "0.1.0"

register_envs()
