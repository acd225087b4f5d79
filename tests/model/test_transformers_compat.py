"""The transformers surface the rollout relies on: the cache argument's name (``past_key_values`` up to ~5.2x,
``cache`` after; the old name is removed in 5.40) and the version bounds in pyproject.toml."""

import re
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from icrl_fast.model import kv_cache
from icrl_fast.model.kv_cache import CACHE_ARG, RolloutCache


def test_the_cache_argument_is_what_the_installed_llama_takes_and_it_is_used():
    """Passing the cache under a name the model does not take would not fail: it would fall into ``**kwargs`` and
    the model would run without it. So: the name is a real parameter, and a step through it fills the cache and
    equals a full forward."""
    import inspect

    from transformers import LlamaConfig, LlamaModel

    assert CACHE_ARG in inspect.signature(LlamaModel.forward).parameters
    conf = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaModel(conf).eval()
    ids = torch.randint(0, 40, (2, 12))
    cache = RolloutCache(2, 2, max_block=8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a deprecated name warns
        full = model(ids).last_hidden_state
        outs = []
        for lo, hi in ((0, 7), (7, 12)):
            counts = torch.full((2,), hi - lo)
            pos, mask = cache.plan(counts, hi - lo)
            outs.append(model(ids[:, lo:hi], attention_mask=mask, position_ids=pos, **{CACHE_ARG: cache},
                              use_cache=True).last_hidden_state)
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_the_cache_argument_name_follows_the_model_signature(monkeypatch):
    from transformers import LlamaModel

    def new(self, input_ids=None, cache=None, **kwargs):
        pass

    def old(self, input_ids=None, past_key_values=None, **kwargs):
        pass

    def neither(self, input_ids=None, **kwargs):
        pass

    for fn, want in ((new, "cache"), (old, "past_key_values")):
        monkeypatch.setattr(LlamaModel, "forward", fn)
        assert kv_cache._cache_arg() == want
    monkeypatch.setattr(LlamaModel, "forward", neither)
    with pytest.raises(ImportError, match="neither `cache` nor `past_key_values`"):
        kv_cache._cache_arg()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_the_declared_transformers_range_holds_the_installed_one():
    """pyproject's bound is the tested range: 5.17 (the GPU machine) to this machine's version; below 5.0 the
    rollout cache's ``DynamicLayer`` does not exist."""
    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("transformers"))
    lower = re.search(r">=\s*([\d.]+)", spec)
    upper = re.search(r"<\s*([\d.]+)", spec)
    assert lower and upper, f"transformers needs a tested lower and an upper bound, got {spec!r}"
    assert _version(lower.group(1)) >= (5, 0)
    assert _version(lower.group(1)) <= _version(transformers.__version__) < _version(upper.group(1))
