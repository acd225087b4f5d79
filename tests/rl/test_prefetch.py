"""The protocol source's chunks made ahead in a worker process (``icrl_fast.rl.prefetch``) are exactly the batches
the source makes itself: the default's kind of source (step-grid, switches, forgetting teacher, memory features),
several chunks, a gradient-accumulation stride and a jump back like a resume's."""

import functools

import numpy as np
import pytest

from icrl_fast.data.step_format import StepFormat
from icrl_fast.envs.maps import generate_maps
from icrl_fast.model.same_state_memory import SameStateMemory
from icrl_fast.rl.prefetch import PrefetchSource
from icrl_fast.rl.sources import ProtocolConfig, ProtocolSource

FMT = StepFormat(grid=8)


def factory(**kw):
    cfg = ProtocolConfig(pool_maps=120, episodes=5, contexts=3, bucket=2, switch=0.3, shift=0.2, forget=True,
                         teacher="least-tried", **kw)
    return functools.partial(ProtocolSource, cfg, FMT, generate_maps(4, seed=0), seed=3, grad_accum=2,
                             memory=SameStateMemory(FMT.token_factors, forget=True))


def test_prefetched_batches_equal_the_sources_own():
    plain = factory()()
    ahead = PrefetchSource(factory(), ahead=2)
    try:
        for step, micro in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (3, 1), (1, 0), (4, 1)]:
            want, got = plain.batch(step, micro), ahead.batch(step, micro)
            assert want.keys() == got.keys() and "memory" in got and "tr_valid" in got
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"step {step} micro {micro}: {k}")
        assert ahead.pending and ahead.from_worker >= 2  # the worker made chunks 1 and 2 (chunk 0: the trainer)
    finally:
        ahead.close()


def test_prefetch_refuses_a_source_the_model_plays():
    class Engine:  # stands in for a RolloutEngine: its presence is what matters
        pass

    with pytest.raises(ValueError, match="prefetch"):
        PrefetchSource(functools.partial(factory(behaviour="self"), engine=Engine()))
