"""Attention over long contexts: flash-attn (when installed, on CUDA) vs PyTorch SDPA vs eager, time and peak memory.

One training forward + backward of the default model over a single context of L tokens, L = 1k ... 16k, through
each attention implementation of the one dispatch point (``icrl_fast.model.attention``). Eager attention
materialises the ``[heads, L, L]`` scores (quadratic memory; run up to 8k here); SDPA's CPU flash kernel and
flash-attn are linear in L. Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the growth of
the process's peak resident set during the step, measured in a fresh subprocess per point
(``python benchmarks/bench_attention.py --peak IMPL L``).

Run: ``python -m pytest benchmarks/bench_attention.py``.
"""

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SUITE = "attention"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
LENGTHS = [1024, 2048, 4096, 8192, 16384]
EAGER_MAX = 8192  # eager's [heads, L, L] scores, softmax and their gradients: ~16 GB at 16k in fp32
VOCAB = 71


def build(impl: str):
    from icrl_fast.model.qnet import ModelConfig, QNetwork

    return QNetwork(ModelConfig(attention=impl, max_positions=32768), VOCAB, [3, 4, 5, 6], device=DEVICE, seed=0)


def train_step(qnet, ids):
    h = qnet.hidden(ids)
    qnet.q_values(h).square().mean().backward()


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def peak_bytes(impl: str, length: int) -> int:
    """Peak memory of one step, measured apart from the timing process (CPU: in a fresh subprocess)."""
    if CUDA:
        qnet, ids = build(impl), torch.randint(0, VOCAB, (1, length), device=DEVICE)
        train_step(qnet, ids)  # warm
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(qnet, ids)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    out = subprocess.run([sys.executable, __file__, "--peak", impl, str(length)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent)
    return int(out.stdout.split()[-1])


def impls() -> list[str]:
    from icrl_fast.model.attention import HAS_FLASH

    return (["flash_attention_2"] if HAS_FLASH and CUDA else []) + ["sdpa", "eager"]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("impl", ["flash_attention_2", "sdpa", "eager"])
def test_attention(benchmark, record, impl, length):
    if impl not in impls():
        pytest.skip("flash-attn is not installed or there is no CUDA device")
    if impl == "eager" and length > EAGER_MAX:
        pytest.skip(f"eager attention's quadratic scores do not fit this machine beyond {EAGER_MAX} tokens")
    qnet = build(impl)
    ids = torch.randint(0, VOCAB, (1, length), device=DEVICE)

    def step():
        qnet.zero_grad(set_to_none=True)
        train_step(qnet, ids)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=3 if length <= 4096 else 2, iterations=1, warmup_rounds=1)
    record(SUITE, f"{impl} L={length}", length, "tokens/s", f"L={length}", "ours" if impl != "eager" else "reference",
           peak_bytes=peak_bytes(impl, length))


if __name__ == "__main__" and sys.argv[1:2] == ["--peak"]:
    torch.manual_seed(0)
    net, x = build(sys.argv[2]), torch.randint(0, VOCAB, (1, int(sys.argv[3])))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to the current one
    before = _rss_bytes()
    train_step(net, x)
    print(_peak_rss_bytes() - before)
