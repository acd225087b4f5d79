"""Context formats: exact round trips (hypothesis), the token-level contract, and a real HF tokenizer."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from icrl_fast.data.formats import (EOT, SPECIAL_TOKENS, HFVocab, compact_format, decode, encode_episodes,
                                    make_format, paper_format, token_contract)
from icrl_fast.envs.learners import EpisodeLog


def make_log(episodes) -> EpisodeLog:
    """episodes: list of (obs list, actions list, outcome) with outcome in goal / hole / truncated."""
    obs, acts, rews, start, length, ret, term, trunc = [], [], [], [], [], [], [], []
    for o, a, outcome in episodes:
        start.append(len(obs))
        length.append(len(o))
        obs += o
        acts += a
        r = [0.0] * len(o)
        if outcome == "goal":
            r[-1] = 1.0
        rews += r
        ret.append(sum(r))
        term.append(outcome != "truncated")
        trunc.append(outcome == "truncated")
    n = len(episodes)
    return EpisodeLog(obs=np.array(obs, np.int16), actions=np.array(acts, np.int8), rewards=np.array(rews, np.float32),
                      map_id=np.zeros(n, np.int32), start=np.array(start, np.int64), length=np.array(length, np.int32),
                      returns=np.array(ret, np.float32), terminated=np.array(term), truncated=np.array(trunc),
                      final_obs=np.zeros(n, np.int16))


episode = st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 48), min_size=n, max_size=n), st.lists(st.integers(0, 3), min_size=n, max_size=n),
    st.sampled_from(["goal", "hole", "truncated"])))


def build_hf_tokenizer(path):
    """A real Hugging Face fast tokenizer with Llama-3's special tokens, built and saved locally: numbers and
    words are tokens, and '1.0' splits into three tokens as in Llama-3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["observation", "action", "reward", "truncated", "left", "down", "right", "up", ".", "<unk>"]
    vocab = {w: i for i, w in enumerate(words + [str(i) for i in range(100)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    fast.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3_like_tokenizer")
    build_hf_tokenizer(str(path))
    return str(path)


def check_round_trip(fmt, episodes):
    log = make_log(episodes)
    ids, idx = encode_episodes(fmt, log, np.arange(len(episodes)))
    got = decode(fmt, ids)
    assert len(got) == len(episodes)
    for g, (o, a, outcome) in zip(got, episodes):
        assert g["obs"] == o and g["actions"] == a
        assert g["rewards"] == [0.0] * (len(o) - 1) + [1.0 if outcome == "goal" else 0.0]
        assert (g["terminated"], g["truncated"]) == (outcome != "truncated", outcome == "truncated")
    mask, action = token_contract(fmt, ids)
    assert action[mask].tolist() == [x for _, a, _ in episodes for x in a]  # every decision's action, in order
    assert np.bincount(idx[mask], minlength=len(episodes)).tolist() == [len(o) for o, _, _ in episodes]
    return ids


@settings(max_examples=60, deadline=None)
@given(st.lists(episode, min_size=1, max_size=8))
def test_paper_format_round_trip(episodes):
    check_round_trip(paper_format(), episodes)


@settings(max_examples=60, deadline=None)
@given(st.lists(episode, min_size=1, max_size=8))
def test_compact_format_round_trip(episodes):
    ids = check_round_trip(compact_format(), episodes)
    steps = sum(len(o) for o, _, _ in episodes)
    assert len(ids) <= 2 * steps + 3 * len(episodes)  # ~2 tokens per step


def test_paper_format_text_is_the_llama3_layout():
    fmt = paper_format()
    ids, _ = encode_episodes(fmt, make_log([([0, 1], [2, 1], "goal"), ([3], [0], "truncated")]), np.arange(2))
    hdr = "<|start_header_id|>{}<|end_header_id|>"
    step = hdr.format("observation") + "{}<|eot_id|>" + hdr.format("action") + "{}<|eot_id|>"
    want = ("<|begin_of_text|>" + step.format(0, "right") + step.format(1, "down") + hdr.format("reward") + "1.0"
            + EOT + "<|end_of_text|>" + "<|begin_of_text|>" + step.format(3, "left") + hdr.format("truncated") + EOT
            + "<|end_of_text|>")
    assert fmt.vocab.decode(ids) == want
    mask, _ = token_contract(fmt, ids)
    assert all(fmt.vocab.decode([ids[p]]) == "<|end_header_id|>" and
               fmt.vocab.decode(ids[p - 2: p]) == "<|start_header_id|>action" for p in np.flatnonzero(mask))


def test_paper_format_with_a_real_hf_tokenizer(hf_dir):
    fmt = make_format("paper", tokenizer_path=hf_dir)
    tok = fmt.vocab.tokenizer
    assert fmt.episode_start.tolist() == [tok.convert_tokens_to_ids("<|begin_of_text|>")]
    assert len(fmt.reward_block) == 3 + 3 + 1  # header (3) + "1", ".", "0" + eot
    episodes = [([0, 17, 42], [2, 1, 3], "goal"), ([5, 6], [0, 0], "hole"), ([9], [3], "truncated")]
    ids = check_round_trip(fmt, episodes)
    # Tokenizing the whole text at once gives the same ids: pieces never merge across special tokens.
    assert tok.encode(tok.decode(ids.tolist()), add_special_tokens=False) == ids.tolist()


def test_slice_boundary_drops_a_decision_whose_action_is_in_the_next_slice():
    fmt = compact_format()
    ids, _ = encode_episodes(fmt, make_log([([0, 1, 2], [1, 2, 3], "hole")]), np.arange(1))  # E o a o a o a
    cut = ids[:4].reshape(1, 4), ids[4:].reshape(1, -1)  # E o a o | a o a
    assert token_contract(fmt, cut[0])[0].sum() == 1 and token_contract(fmt, cut[1])[0].sum() == 1
    assert token_contract(fmt, ids)[0].sum() == 3


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown context format"):
        make_format("verbose")
    with pytest.raises(ValueError, match="rewards 0 and 1.0"):
        log = make_log([([0], [1], "goal")])
        encode_episodes(paper_format(), EpisodeLog(**{**log.__dict__, "rewards": np.array([0.5], np.float32)}),
                        np.arange(1))
    with pytest.raises(ValueError, match="observations must be in 0..15"):
        encode_episodes(compact_format(max_obs=16), make_log([([16], [1], "hole")]), np.arange(1))
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        make_format("paper", tokenizer_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="expected"):
        decode(compact_format(), [0, 7, 99])
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                    unk_token="<unk>")
    with pytest.raises(ValueError, match="special token"):
        HFVocab(plain)
