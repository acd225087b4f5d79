"""The online learner's replay: whole multi-episode contexts from rollouts, sampled as slices in the token contract.

A context is stored as it was played (``Rollout``: its tokens, the episode of every token, and each episode's
return and end). ``sample`` draws contexts uniformly and, from each, a window of ``slice_len`` tokens starting at
a uniform offset (a context shorter than the window is taken whole); rows are right-padded with a token that is
neither a decision nor an action, so padding adds no transition and, being after every real token, changes no
causal attention. The result is exactly the learner's contract (``icrl_fast.data``): ``input_ids``,
``decision_mask``, ``action``, ``episode_id``, ``episode_return``, ``terminated``, ``truncated``.

The oldest contexts leave first once ``capacity`` is reached. ``state_dict``/``load_state_dict`` make the replay
part of a checkpoint, so an online run resumes exactly.
"""

from __future__ import annotations

import numpy as np

from icrl_fast.data.formats import ContextFormat, pad_token, token_contract
from icrl_fast.rl.rollout import Rollout


class ContextReplay:
    """A FIFO of at most ``capacity`` played contexts (see the module docstring)."""

    def __init__(self, fmt: ContextFormat, capacity: int, slice_len: int):
        if capacity < 1 or slice_len < 2:
            raise ValueError(f"need capacity >= 1 and slice_len >= 2, got {capacity} and {slice_len}")
        self.fmt, self.capacity, self.slice_len = fmt, capacity, slice_len
        self.pad = pad_token(fmt)
        self.contexts: list[dict[str, np.ndarray]] = []
        self.added = 0

    def __len__(self) -> int:
        return len(self.contexts)

    def add(self, rollout: Rollout) -> None:
        if any((ep < 0).any() for ep in rollout.token_episode):
            raise ValueError("a rollout with a hand-written prefix (token_episode -1) has no returns for it: "
                             "it cannot enter the replay")
        for b, ids in enumerate(rollout.tokens):
            ended = rollout.success[b] | rollout.hole[b]
            self.contexts.append({"tokens": ids, "episode": rollout.token_episode[b],
                                  "return": rollout.episode_return[b], "terminated": ended,
                                  "truncated": rollout.truncated[b]})
            self.added += 1
        del self.contexts[: max(0, len(self.contexts) - self.capacity)]

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """``n`` slices ``[n, L]`` (``L``: the longest drawn window, at most ``slice_len``), the learner's contract."""
        if not self.contexts:
            raise ValueError("the replay is empty: collect a rollout first")
        picks = rng.integers(0, len(self.contexts), n)
        spans = []
        for i in picks:
            c = self.contexts[i]
            length = min(self.slice_len, len(c["tokens"]))
            start = int(rng.integers(0, len(c["tokens"]) - length + 1))
            spans.append((c, start, length))
        width = max(length for _, _, length in spans)
        ids = np.full((n, width), self.pad, dtype=np.int64)
        episode = np.zeros((n, width), dtype=np.int64)
        ret = np.zeros((n, width), dtype=np.float32)
        term = np.zeros((n, width), dtype=bool)
        trunc = np.zeros((n, width), dtype=bool)
        for row, (c, start, length) in enumerate(spans):
            ep = c["episode"][start: start + length]
            ids[row, :length] = c["tokens"][start: start + length]
            episode[row, :length] = ep
            episode[row, length:] = ep[-1] + 1  # padding is its own "episode": no transition crosses into it
            ret[row, :length], term[row, :length], trunc[row, :length] = c["return"][ep], c["terminated"][ep], \
                c["truncated"][ep]
        mask, action = token_contract(self.fmt, ids)
        return {"input_ids": ids, "decision_mask": mask, "action": action, "episode_id": episode,
                "episode_return": ret, "terminated": term, "truncated": trunc}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Flat arrays (for a safetensors checkpoint)."""
        if not self.contexts:
            return {"added": np.array([self.added])}
        cat = {k: np.concatenate([c[k] for c in self.contexts]) for k in self.contexts[0]}
        cat["terminated"], cat["truncated"] = cat["terminated"].astype(np.uint8), cat["truncated"].astype(np.uint8)
        cat["token_counts"] = np.array([len(c["tokens"]) for c in self.contexts])
        cat["episode_counts"] = np.array([len(c["return"]) for c in self.contexts])
        cat["added"] = np.array([self.added])
        return cat

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.added = int(state["added"][0])
        self.contexts = []
        if "token_counts" not in state:
            return
        t_off = np.concatenate([[0], np.cumsum(state["token_counts"])])
        e_off = np.concatenate([[0], np.cumsum(state["episode_counts"])])
        for i in range(len(state["token_counts"])):
            t, e = slice(t_off[i], t_off[i + 1]), slice(e_off[i], e_off[i + 1])
            self.contexts.append({"tokens": np.asarray(state["tokens"][t]), "episode": np.asarray(state["episode"][t]),
                                  "return": np.asarray(state["return"][e]),
                                  "terminated": np.asarray(state["terminated"][e]).astype(bool),
                                  "truncated": np.asarray(state["truncated"][e]).astype(bool)})
