"""The same-state memory's features (``icrl_fast.model.same_state_memory``): our Numba scan vs the same head written
as what it is, a fixed attention head in PyTorch eager, on the default preset's own training contexts; and the
rollout's incremental reader vs re-reading whole contexts.

* ``training batch``: the features of one micro-batch of the default preset (``ProtocolSource``: teacher-played
  protocol contexts in the step-grid format, 30 % switched). Ours: ``SameStateMemory.features``, one O(L) pass per
  context (counts and latest outcome per cell kept as it reads). Reference: the head as attention, per context: a
  same-cell mask over (decision, earlier landing) pairs times one-hot outcomes gives the counts (an ``[L, L]``
  matmul), and a masked argmax over positions per action gives the latest outcome; O(L^2), what a transformer
  implementation of the head computes. Both without forgetting (the reference has no sequential reset); the
  forgetting scan, the default's, is a row of its own. The run checks the two agree before timing them.
* ``rollout step``: the features of one new token for each of 50 contexts that already hold ~L tokens. Ours:
  ``MemoryStream.tails`` (reads only the new tokens into each context's kept counts). Reference: ``features`` of the
  whole contexts again, keeping the last column (what a reader without kept state pays).

The memory's cost next to the model is printed as a note: the forward of the default model on the same batch.

Run: ``python -m pytest benchmarks/bench_memory.py``.
"""

import time

import numpy as np
import pytest
import torch
from conftest import add_note, rows_of

from icrl_fast.data.formats import make_format
from icrl_fast.data.step_format import KINDS, TYPE_LAND0, TYPE_START
from icrl_fast.envs.maps import generate_maps
from icrl_fast.model.qnet import QNetwork
from icrl_fast.model.same_state_memory import GOAL, HOLE, MEMORY_DIM, MOVED, STAYED, SameStateMemory
from icrl_fast.presets import preset
from icrl_fast.rl.sources import ProtocolSource

SUITE = "memory"
CFG = preset("default")
FMT = make_format(CFG.data.format)


@pytest.fixture(scope="module")
def batch():
    """One micro-batch of the default preset's protocol source: ``(ids [B, L] right-padded, lengths [B])``."""
    source = ProtocolSource(CFG.protocol, FMT, generate_maps(8, seed=5), seed=0)
    b = source.batch(0)
    return b["input_ids"].astype(np.int64), b["length"]


def attention_head_features(ids: np.ndarray) -> np.ndarray:
    """The head in PyTorch eager, one context ``ids [L]`` (no forgetting): float32 ``[L, MEMORY_DIM]``."""
    f = torch.from_numpy(np.asarray(FMT.token_factors, dtype=np.int64))
    t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    typ, act, obs = f[t, 0], f[t, 1] - 1, f[t, 2]
    move = TYPE_LAND0 + KINDS.index("move")
    decision = (typ == TYPE_START) | (typ == move)
    # event at landing position j answering the decision at j - 1: its cell, action and outcome class
    answered = torch.zeros_like(decision)
    answered[1:] = decision[:-1] & (typ[1:] >= TYPE_LAND0)
    cell = torch.full_like(obs, -1)
    cell[1:] = torch.where(answered[1:], obs[:-1], -1)
    kind = typ - TYPE_LAND0
    outcome = torch.where(obs == cell, STAYED, MOVED)
    outcome = torch.where(kind == KINDS.index("hole"), HOLE, outcome)
    outcome = torch.where(kind == KINDS.index("goal"), GOAL, outcome)
    onehot = torch.zeros(len(t), 16)
    rows = answered.nonzero()[:, 0]
    onehot[rows, act[rows] * 4 + outcome[rows]] = 1.0
    pos = torch.arange(len(t))
    same = (cell[None, :] == obs[:, None]) & (pos[None, :] <= pos[:, None]) & decision[:, None]  # [query, key]
    out = torch.zeros(len(t), MEMORY_DIM)
    out[:, :16] = torch.log1p(same.float() @ onehot)
    for a in range(4):
        mine = same & (act[None, :] == a)
        last = torch.where(mine, pos[None, :], -1).amax(1)
        seen = last >= 0
        out[seen, 16 + 4 * a + outcome[last[seen]]] = 1.0
    return out.numpy()


def test_reference_equals_ours(batch):
    ids, lengths = batch
    ours = SameStateMemory(FMT.token_factors).features(ids)
    for b in range(len(ids)):
        np.testing.assert_allclose(attention_head_features(ids[b, : lengths[b]]), ours[b, : lengths[b]], rtol=1e-6)


def test_training_batch_reference(benchmark, record, batch):
    ids, lengths = batch
    benchmark.pedantic(lambda: [attention_head_features(ids[b, : lengths[b]]) for b in range(len(ids))], rounds=3,
                       iterations=1, warmup_rounds=1)
    record(SUITE, "fixed attention head, PyTorch eager (O(L^2))", float(lengths.sum()), "tokens/s",
           group_of(batch), "reference")


@pytest.mark.parametrize("forget", [False, True])
def test_training_batch_ours(benchmark, record, batch, forget):
    ids, _ = batch
    memory = SameStateMemory(FMT.token_factors, forget=forget)
    benchmark.pedantic(lambda: memory.features(ids), rounds=20, iterations=1, warmup_rounds=1)
    name = "SameStateMemory.features (Numba scan)" + (", forgetting" if forget else "")
    row = record(SUITE, name, float(batch[1].sum()), "tokens/s", group_of(batch), "ours")
    if forget:
        note_model_cost(row, batch)


def group_of(batch) -> str:
    ids, lengths = batch
    return f"training batch ({len(ids)} contexts, {int(lengths.sum()):,} tokens)"


def note_model_cost(row: dict, batch) -> None:
    """The default model's forward on the same batch, for scale (its features included)."""
    ids, _ = batch
    m = CFG.model
    q = QNetwork(m, FMT.vocab_size, FMT.action_ids, seed=0, token_factors=FMT.token_factors).eval()
    x = torch.from_numpy(ids)
    times = []
    with torch.no_grad():
        for _ in range(6):  # the first one warms up
            t = time.perf_counter()
            q.hidden(x)
            times.append(time.perf_counter() - t)
    forward = float(np.median(times[1:]))
    add_note(SUITE, f"{group_of(batch)}: the forgetting features take {row['median_s'] * 1e3:.2f} ms, the default "
                    f"model's forward on the batch (features included) {forward * 1e3:.1f} ms: "
                    f"{row['median_s'] / forward:.1%} of it (a TD step computes them twice: online and target)")


@pytest.fixture(scope="module")
def grown(batch):
    """50 contexts of the batch's tokens (repeated), as the rollout engine holds them (Python lists)."""
    ids, lengths = batch
    return [ids[b % len(ids), : lengths[b % len(ids)]].tolist() for b in range(50)]


@pytest.mark.parametrize("role", ["reference", "ours"])
def test_rollout_step(benchmark, record, grown, role):
    memory = SameStateMemory(FMT.token_factors, forget=True)
    rows = list(range(len(grown)))
    if role == "ours":
        def setup():
            stream = memory.stream(len(grown))
            stream.tails(rows, [(t[:-1], len(t) - 1) for t in grown], max(map(len, grown)))
            return (stream,), {}

        def step(stream):
            return stream.tails(rows, [(t, 1) for t in grown], 1)

        benchmark.pedantic(step, setup=setup, rounds=20, iterations=1)
        name = "MemoryStream.tails (the new token only)"
    else:
        width = max(map(len, grown))
        padded = np.full((len(grown), width), FMT.pad_id)
        for b, t in enumerate(grown):
            padded[b, : len(t)] = t
        benchmark.pedantic(lambda: memory.features(padded), rounds=5, iterations=1, warmup_rounds=1)
        name = "SameStateMemory.features of the whole contexts"
    mean = int(np.mean([len(t) for t in grown]))
    record(SUITE, name, len(grown), "context-steps/s", f"rollout step (50 contexts of ~{mean:,} tokens, 1 new each)",
           role)
    by = {r["name"]: r for r in rows_of(SUITE)}
    if role == "ours" and "SameStateMemory.features of the whole contexts" in by:
        ours, ref = by[name]["median_s"], by["SameStateMemory.features of the whole contexts"]["median_s"]
        add_note(SUITE, f"rollout step: the new token's features in {ours * 1e6:.0f} us vs {ref * 1e3:.2f} ms re-reading "
                        f"the contexts ({ref / ours:.0f}x)")
