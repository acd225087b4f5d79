"""``python -m icrl_fast.train`` — the main job.

The DQN trainer (offline Double DQN over multi-episode contexts, issue #5) has not landed yet. Until it does,
this command exercises what exists end to end: it generates the paper's maps, proves the Numba simulator
against gymnasium's ``FrozenLake-v1`` on fresh random maps, and prints the simulator's throughput beside
gymnasium's (see ``icrl_fast/envs/selfcheck.py``).
"""

from __future__ import annotations

import argparse

from icrl_fast.envs import selfcheck


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m icrl_fast.train",
        description="Train an in-context RL transformer. The trainer is not implemented yet (issue #5); for now "
                    "this runs the simulator self-check and prints its throughput beside gymnasium's.")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random stream (default: 0)")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be a non-negative int, got {args.seed}")
    print("icrl_fast: the DQN trainer is not implemented yet (issue #5); running the simulator self-check.")
    selfcheck.main(seed=args.seed)


if __name__ == "__main__":
    main()
