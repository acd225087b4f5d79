"""Context formats: episodes -> token ids (and back), in the paper's Llama-3 layout or a compact one.

Both formats are one :class:`ContextFormat`: fixed token runs around each step, a token run per observation,
one token per action. One episode is::

    episode_start  ( pre_obs  obs_tokens[o]  post_obs  ACTION[a]  post_action  [reward_block] )*  [trunc_block]
    episode_end

The **decision position** of a step (where Q is read) is the token right before its action token: the
``<|end_header_id|>`` closing the ``action`` header in the paper format, the observation token in the compact one.

``paper`` (arXiv 2501.14176, DESIGN.md §1)::

    <|begin_of_text|>
      <|start_header_id|>observation<|end_header_id|>5<|eot_id|>
      <|start_header_id|>action<|end_header_id|>right<|eot_id|>
      ...                                   (reward block only when the reward is nonzero:)
      <|start_header_id|>reward<|end_header_id|>1.0<|eot_id|>
      (truncation marker when the time limit cut a running episode:)
      <|start_header_id|>truncated<|end_header_id|><|eot_id|>
    <|end_of_text|>

A tokenizer without Llama-3's chat tokens but with ChatML's (SmolLM2, Qwen) gets the same layout in its own
markers (``CHAT_LAYOUTS``): ``<|endoftext|><|im_start|>observation\n5<|im_end|><|im_start|>action\nright<|im_end|>
... <|endoftext|>``.

``compact`` (from-scratch models, ~2 tokens per step): ``EPISODE (OBS_o ACT_a [REWARD])* [TRUNCATED]``.

Rewards: the formats encode the paper's rewards, 0 and 1.0 (reaching a goal); anything else is an error.
Termination: an episode without the truncation marker was terminated (on G if it carries a reward block, else
on H). An episode that lands on G or H exactly at the time limit is encoded as terminated (gymnasium would flag
it truncated too): the marker means "cut while still running", which is what a learner needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from icrl_fast.data.step_format import StepFormat, decode_step, encode_step, step_contract

BOT, EOT_TEXT, START_HEADER, END_HEADER, EOT = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
SPECIAL_TOKENS = (BOT, EOT_TEXT, START_HEADER, END_HEADER, EOT)
ACTION_WORDS = ("left", "down", "right", "up")
REWARD_TEXT = "1.0"
FORMATS = ("paper", "compact", "step", "step-noend", "step-grid")
GRID_FORMATS = ("step-grid",)  # formats that name every map's cells on one grid (``StepFormat.grid``)


class OfflineVocab:
    """A small word-level vocabulary with the paper format's token structure; needs no download.

    Tokens: the five Llama-3 special tokens, the header words, the action words, ``1.0`` and the observation
    numbers ``0 .. max_obs - 1``, each one token (as a real Llama-3 tokenizer also keeps them).
    """

    name = "offline"

    def __init__(self, max_obs: int = 64):
        words = ["observation", "action", "reward", "truncated", *ACTION_WORDS, REWARD_TEXT]
        self.tokens = [*SPECIAL_TOKENS, *words, *(str(i) for i in range(max_obs))]
        self._ids = {t: i for i, t in enumerate(self.tokens)}
        self.vocab_size = len(self.tokens)

    def special_id(self, token: str) -> int:
        return self._ids[token]

    def encode(self, text: str) -> list[int]:
        if text not in self._ids:
            raise ValueError(f"{text!r} is not in the offline vocabulary (observations must be < "
                             f"{self.vocab_size - len(SPECIAL_TOKENS) - 9})")
        return [self._ids[text]]

    def decode(self, ids) -> str:
        return "".join(self.tokens[int(i)] for i in ids)


#: The tokens that play the paper format's five markers (keyed by Llama-3's names) in each chat layout a tokenizer
#: may have, tried in this order: Llama-3's own header tokens (the paper's), then ChatML's (SmolLM2, Qwen:
#: ``<|im_start|>role\ncontent<|im_end|>``, the newline closing the header; a document starts and ends with
#: ``<|endoftext|>``, which then opens and closes every episode).
CHAT_LAYOUTS = {
    "llama3": {tok: tok for tok in SPECIAL_TOKENS},
    "chatml": {BOT: "<|endoftext|>", EOT_TEXT: "<|endoftext|>", START_HEADER: "<|im_start|>", END_HEADER: "\n",
               EOT: "<|im_end|>"},
}


class HFVocab:
    """Adapter for a Hugging Face tokenizer (e.g. Llama-3's, loaded from a local directory or ``.gguf`` file): pieces
    are encoded with ``add_special_tokens=False``; the markers' ids are read from the tokenizer, never hard-coded,
    in the first of ``CHAT_LAYOUTS`` whose tokens the tokenizer keeps whole (``layout``)."""

    name = "hf"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        missing = {}
        for layout, tokens in CHAT_LAYOUTS.items():
            ids = {role: self._single_id(tok) for role, tok in tokens.items()}
            if all(i is not None for i in ids.values()):
                self.layout, self._special = layout, ids
                break
            missing[layout] = [tokens[role] for role, i in ids.items() if i is None]
        else:
            raise ValueError("the paper format needs a tokenizer with Llama-3's special tokens or ChatML's; this one lacks "
                             + "; ".join(f"{layout}'s {toks}" for layout, toks in missing.items())
                             + ": use the model's own tokenizer (--data.tokenizer), or a from-scratch model with "
                               "--data.format compact or step")

    def _single_id(self, token: str) -> int | None:
        """The one id ``token`` encodes to and decodes from, or None when the tokenizer splits it or maps it to an
        unknown token."""
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 and self.tokenizer.decode(ids) == token else None

    @classmethod
    def from_pretrained(cls, path: str) -> HFVocab:
        """Load a tokenizer from a local directory or ``.gguf`` file (nothing is downloaded)."""
        from icrl_fast.model.pretrained import load_tokenizer

        return cls(load_tokenizer(path))

    def special_id(self, token: str) -> int:
        return self._special[token]

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def pieces(self, ids) -> list[str]:
        """The tokenizer's own strings of ``ids`` (for error messages)."""
        return list(self.tokenizer.convert_ids_to_tokens([int(i) for i in ids]))


def _arr(ids) -> np.ndarray:
    return np.asarray(list(ids), dtype=np.int32)


@dataclass(frozen=True, eq=False)
class ContextFormat:
    """Token runs of one context format (see the module docstring). Arrays are int32 token ids."""

    name: str
    vocab_size: int
    episode_start: np.ndarray
    pre_obs: np.ndarray
    obs_table: np.ndarray  # [max_obs, max_len] ids, -1 padded
    obs_len: np.ndarray  # [max_obs]
    post_obs: np.ndarray
    action_ids: np.ndarray  # [4]
    post_action: np.ndarray
    reward_block: np.ndarray
    trunc_block: np.ndarray
    episode_end: np.ndarray
    vocab: object = None

    @property
    def max_obs(self) -> int:
        return int(self.obs_table.shape[0])

    @property
    def decision_ids(self) -> np.ndarray:
        """Token ids that can stand at a decision position (right before an action token)."""
        if self.post_obs.size:
            return self.post_obs[-1:]
        return np.unique(self.obs_table[np.arange(self.max_obs), self.obs_len - 1])

    def describe(self) -> dict:
        """JSON-able identity of the format (stored in dataset manifests)."""
        return {"name": self.name, "vocab": getattr(self.vocab, "name", "compact"), "vocab_size": self.vocab_size,
                "max_obs": self.max_obs, "action_ids": self.action_ids.tolist()}


def paper_format(vocab=None, max_obs: int = 64) -> ContextFormat:
    """The paper's layout over ``vocab`` (an :class:`HFVocab`, in its chat layout, or by default an
    :class:`OfflineVocab`)."""
    vocab = OfflineVocab(max_obs) if vocab is None else vocab
    sid = vocab.special_id

    def header(word: str) -> list[int]:
        return [sid(START_HEADER), *vocab.encode(word), sid(END_HEADER)]

    actions = []
    for word in ACTION_WORDS:  # written right after the action header's last token, with no space before it
        ids = vocab.encode(word)
        if len(ids) != 1:
            pieces = vocab.pieces(ids) if hasattr(vocab, "pieces") else ids
            raise ValueError(f"action word {word!r} becomes {len(ids)} tokens {pieces} (ids {list(ids)}) in this "
                             f"tokenizer; the Q-values are read from the LM head at one token per action, so each of "
                             f"{list(ACTION_WORDS)} must be one token: use a tokenizer that keeps them whole (Llama-3's "
                             f"and SmolLM2's do), or a from-scratch model with --data.format compact or step")
        actions.append(ids[0])
    if len(set(actions)) != len(actions):
        raise ValueError(f"the action words {list(ACTION_WORDS)} must be distinct tokens, this tokenizer gives "
                         f"{actions}")
    obs = [vocab.encode(str(i)) for i in range(max_obs)]
    width = max(len(o) for o in obs)
    table = np.full((max_obs, width), -1, dtype=np.int32)
    for i, o in enumerate(obs):
        table[i, : len(o)] = o
    return ContextFormat(
        name="paper", vocab_size=int(vocab.vocab_size), episode_start=_arr([sid(BOT)]), pre_obs=_arr(header("observation")),
        obs_table=table, obs_len=_arr(len(o) for o in obs), post_obs=_arr([sid(EOT), *header("action")]),
        action_ids=_arr(actions), post_action=_arr([sid(EOT)]),
        reward_block=_arr([*header("reward"), *vocab.encode(REWARD_TEXT), sid(EOT)]),
        trunc_block=_arr([*header("truncated"), sid(EOT)]), episode_end=_arr([sid(EOT_TEXT)]), vocab=vocab)


#: Compact vocabulary: EPISODE, REWARD, TRUNCATED, the 4 actions, then one token per observation.
COMPACT_EPISODE, COMPACT_REWARD, COMPACT_TRUNCATED, COMPACT_ACTION0, COMPACT_OBS0 = 0, 1, 2, 3, 7


def compact_format(max_obs: int = 64) -> ContextFormat:
    """About two tokens per step, for from-scratch models."""
    empty = _arr([])
    return ContextFormat(
        name="compact", vocab_size=COMPACT_OBS0 + max_obs, episode_start=_arr([COMPACT_EPISODE]), pre_obs=empty,
        obs_table=(COMPACT_OBS0 + np.arange(max_obs, dtype=np.int32))[:, None], obs_len=np.ones(max_obs, np.int32),
        post_obs=empty, action_ids=_arr(range(COMPACT_ACTION0, COMPACT_ACTION0 + 4)), post_action=empty,
        reward_block=_arr([COMPACT_REWARD]), trunc_block=_arr([COMPACT_TRUNCATED]), episode_end=empty)


def make_format(name: str, tokenizer_path: str | None = None, max_obs: int = 64) -> ContextFormat | StepFormat:
    """``paper`` (offline vocabulary, or the tokenizer in ``tokenizer_path``), ``compact`` or ``step``
    (``icrl_fast.data.step_format``: one token per step; ``step-grid``: its observations numbered on a square grid
    of ``max_obs`` cells, one row stride for every map width)."""
    if name == "paper":
        return paper_format(HFVocab.from_pretrained(tokenizer_path) if tokenizer_path else None, max_obs)
    if name == "compact":
        if tokenizer_path:
            raise ValueError("the compact format has its own vocabulary; --tokenizer applies to the paper format")
        return compact_format(max_obs)
    if name in ("step", "step-noend", "step-grid"):
        if tokenizer_path:
            raise ValueError("the step format has its own vocabulary; --tokenizer applies to the paper format")
        grid = math.isqrt(max_obs) if name in GRID_FORMATS else None  # 64 observations: an 8 x 8 grid
        return StepFormat(max_obs, show_end=name != "step-noend", grid=grid)
    raise ValueError(f"unknown context format {name!r}; choose one of {FORMATS}")


def episode_token_lengths(fmt: ContextFormat, obs, length, start, rewards, trunc_only) -> np.ndarray:
    """int64 [E]: tokens each episode takes in ``fmt``."""
    per_step = fmt.pre_obs.size + fmt.post_obs.size + 1 + fmt.post_action.size
    obs_tokens = np.add.reduceat(fmt.obs_len[obs].astype(np.int64), start) if start.size else np.zeros(0, np.int64)
    n_reward = np.add.reduceat((rewards != 0).astype(np.int64), start) if start.size else np.zeros(0, np.int64)
    return (fmt.episode_start.size + fmt.episode_end.size + length.astype(np.int64) * per_step + obs_tokens
            + n_reward * fmt.reward_block.size + trunc_only.astype(np.int64) * fmt.trunc_block.size)


@njit(inline="always", cache=True)
def _put(run, out, p):
    for j in range(run.shape[0]):
        out[p + j] = run[j]
    return p + run.shape[0]


@njit(parallel=True, cache=True)
def _encode_kernel(order, ep_start, ep_len, obs, actions, rewards, trunc_only, offsets, episode_start, pre_obs,
                   obs_table, obs_len, post_obs, action_ids, post_action, reward_block, trunc_block, episode_end,
                   out_ids, out_episode):
    for k in prange(order.shape[0]):
        e = order[k]
        p = offsets[k]
        p0 = p
        p = _put(episode_start, out_ids, p)
        for t in range(ep_start[e], ep_start[e] + ep_len[e]):
            p = _put(pre_obs, out_ids, p)
            o = obs[t]
            for j in range(obs_len[o]):
                out_ids[p] = obs_table[o, j]
                p += 1
            p = _put(post_obs, out_ids, p)
            out_ids[p] = action_ids[actions[t]]
            p = _put(post_action, out_ids, p + 1)
            if rewards[t] != 0:
                p = _put(reward_block, out_ids, p)
        if trunc_only[e]:
            p = _put(trunc_block, out_ids, p)
        p = _put(episode_end, out_ids, p)
        for j in range(p0, p):
            out_episode[j] = k


def check_encodable(fmt: ContextFormat, obs: np.ndarray, rewards: np.ndarray) -> None:
    """Raise ``ValueError`` for observations outside the format's table or rewards other than 0 and 1.0."""
    if obs.size and (obs.min() < 0 or obs.max() >= fmt.max_obs):
        raise ValueError(f"observations must be in 0..{fmt.max_obs - 1} for this format (max_obs={fmt.max_obs}), "
                         f"got {obs.min()}..{obs.max()}")
    bad = np.unique(rewards[(rewards != 0) & (rewards != 1.0)])
    if bad.size:
        raise ValueError(f"the context formats encode the paper's rewards 0 and 1.0 only, got {bad[:5].tolist()}")


def encode_episodes(fmt: ContextFormat, log, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode episodes ``order`` (indices into an :class:`~icrl_fast.envs.learners.EpisodeLog`) back to back.

    Returns ``(input_ids int32 [T], episode_index int32 [T])`` where ``episode_index`` is the position in
    ``order`` of the episode each token belongs to.
    """
    check_encodable(fmt, log.obs, log.rewards)
    if isinstance(fmt, StepFormat):
        return encode_step(fmt, log, order)
    order = np.ascontiguousarray(order, dtype=np.int64)
    trunc_only = log.truncated & ~log.terminated
    lengths = episode_token_lengths(fmt, log.obs, log.length, log.start, log.rewards, trunc_only)[order]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    out_ids = np.empty(int(offsets[-1]), dtype=np.int32)
    out_episode = np.empty(int(offsets[-1]), dtype=np.int32)
    _encode_kernel(order, log.start, log.length, log.obs.astype(np.int64), log.actions.astype(np.int64), log.rewards,
                   trunc_only, offsets, fmt.episode_start, fmt.pre_obs, fmt.obs_table, fmt.obs_len, fmt.post_obs,
                   fmt.action_ids, fmt.post_action, fmt.reward_block, fmt.trunc_block, fmt.episode_end, out_ids,
                   out_episode)
    return out_ids, out_episode


def token_contract(fmt: ContextFormat, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decision positions and actions of token ids ``[..., L]`` (one slice per row).

    Returns ``(decision_mask bool [..., L], action int8 [..., L])``: position ``p`` is a decision iff it holds a
    decision token and ``p + 1`` *in the same row* holds an action token; ``action`` is that action (0..3), -1
    elsewhere. A decision whose action token falls into the next slice is therefore not a decision of this one.
    """
    if isinstance(fmt, StepFormat):
        return step_contract(fmt, input_ids)
    ids = np.asarray(input_ids)
    lut = np.full(max(fmt.vocab_size, int(ids.max(initial=0)) + 1), -1, dtype=np.int8)
    lut[fmt.action_ids] = np.arange(4, dtype=np.int8)
    nxt = np.full(ids.shape, -1, dtype=np.int8)
    nxt[..., :-1] = lut[ids[..., 1:]]
    mask = np.isin(ids, fmt.decision_ids) & (nxt >= 0)
    return mask, np.where(mask, nxt, np.int8(-1)).astype(np.int8)


def pad_token(fmt: ContextFormat) -> int:
    """A padding id that adds no decision and no action: the smallest id that is neither."""
    if isinstance(fmt, StepFormat):
        return fmt.pad_id
    taken = set(fmt.decision_ids.tolist()) | set(fmt.action_ids.tolist())
    return next(i for i in range(fmt.vocab_size) if i not in taken)


def _match(ids, p: int, run) -> bool:
    return len(run) == 0 or (p + len(run) <= len(ids) and list(ids[p: p + len(run)]) == list(run))


def decode(fmt: ContextFormat, input_ids) -> list[dict]:
    """Turn a token stream of whole episodes back into episodes.

    Returns a list of ``{"obs": [int], "actions": [int], "rewards": [float], "terminated": bool,
    "truncated": bool}``; raises ``ValueError`` at the first token that does not fit the format.
    """
    if isinstance(fmt, StepFormat):
        return decode_step(fmt, input_ids)
    ids = [int(i) for i in np.asarray(input_ids).ravel()]
    obs_of = {tuple(fmt.obs_table[o, : fmt.obs_len[o]].tolist()): o for o in range(fmt.max_obs)}
    widths = sorted({int(x) for x in fmt.obs_len}, reverse=True)
    action_of = {int(a): i for i, a in enumerate(fmt.action_ids)}
    runs = {k: getattr(fmt, k).tolist() for k in ("episode_start", "pre_obs", "post_obs", "post_action",
                                                 "reward_block", "trunc_block", "episode_end")}
    episodes, p = [], 0

    def expect(run_name: str) -> None:
        nonlocal p
        if not _match(ids, p, runs[run_name]):
            raise ValueError(f"token {p}: expected {run_name} {runs[run_name]}, got {ids[p: p + len(runs[run_name])]}")
        p += len(runs[run_name])

    while p < len(ids):
        expect("episode_start")
        ep = {"obs": [], "actions": [], "rewards": [], "terminated": True, "truncated": False}
        while True:
            if not _match(ids, p, runs["pre_obs"]) or (not runs["pre_obs"] and tuple(ids[p: p + 1]) not in obs_of):
                break
            expect("pre_obs")
            for w in widths:
                if tuple(ids[p: p + w]) in obs_of:
                    ep["obs"].append(obs_of[tuple(ids[p: p + w])])
                    p += w
                    break
            else:
                raise ValueError(f"token {p}: expected an observation, got {ids[p: p + widths[0]]}")
            expect("post_obs")
            if p >= len(ids) or ids[p] not in action_of:
                raise ValueError(f"token {p}: expected an action token, got {ids[p: p + 1]}")
            ep["actions"].append(action_of[ids[p]])
            p += 1
            expect("post_action")
            rewarded = _match(ids, p, runs["reward_block"])
            ep["rewards"].append(1.0 if rewarded else 0.0)
            if rewarded:
                p += len(runs["reward_block"])
        if not ep["actions"]:
            raise ValueError(f"token {p}: an episode needs at least one step")
        if _match(ids, p, runs["trunc_block"]) and (runs["trunc_block"] != runs["episode_end"]):
            p += len(runs["trunc_block"])
            ep["terminated"], ep["truncated"] = False, True
        expect("episode_end")
        episodes.append(ep)
    return episodes
