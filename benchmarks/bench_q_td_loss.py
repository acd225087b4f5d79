"""q_td_loss: the Triton kernel vs the eager torch reference vs torch.compile of the reference, in one run.

Forward and forward+backward, time and peak memory, at the paper's shape (N = 40,960 decision-bearing tokens of
a 10 x 4,096 batch, d = 4,096, V = 128,256, full-vocabulary argmax, bf16) and at a small-model shape (the
default from-scratch model: d = 128, the 78-token offline vocabulary). GPU targets (issue #4): >= 3x eager and
>= 1.5x torch.compile, peak memory <= 10 % of eager's.

Memory: the "peak memory" column is ``torch.cuda.max_memory_allocated()`` over the timed calls, inputs included
(hidden states, LM head: held before the first call); a note per row splits it into the inputs and what the calls
allocate on top. Memory outside PyTorch's caching allocator (cuBLAS/Triton workspaces) is not counted.

On a CPU machine only the small shape runs, eager vs torch.compile: the Triton kernel's speed is a GPU matter
(the CPU interpreter is a correctness tool) and the paper shape's eager logits alone are 21 GB in fp32.
"""

import gc

import pytest
import torch
from conftest import add_note
from icrl_kernels import q_td_loss, q_td_loss_reference

SUITE = "q_td_loss"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SHAPES = {
    "paper (N=40960, d=4096, V=128256, bf16)": dict(n=40960, d=4096, v=128256, dtype=torch.bfloat16, gpu_only=True),
    "small (N=8192, d=128, V=78, fp32)": dict(n=8192, d=128, v=78, dtype=torch.float32, gpu_only=False),
}


def make(n, d, v, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=DEVICE, dtype=dtype)  # noqa: E731
    return dict(hidden=r(n, d).requires_grad_(), weight=r(v, d) / d ** 0.5, next_hidden=r(n, d),
                next_target_hidden=r(n, d), actions=torch.randint(0, 4, (n,), device=DEVICE, generator=g),
                rewards=(torch.rand(n, device=DEVICE, generator=g) < 0.1).to(dtype),
                dones=torch.rand(n, device=DEVICE, generator=g) < 0.05,
                seq_ids=torch.arange(n, device=DEVICE) // 4096, action_ids=torch.tensor([3, 7, 11, 19], device=DEVICE))


IMPLS = {
    "triton": lambda **x: q_td_loss(**x, argmax="vocab", backend="triton"),
    "eager": lambda **x: q_td_loss_reference(**x, argmax="vocab"),
    "compile": torch.compile(lambda **x: q_td_loss_reference(**x, argmax="vocab")),
}


@pytest.mark.parametrize("impl", ["triton", "eager", "compile"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_q_td_loss(benchmark, record, impl, shape, backward):
    cfg = SHAPES[shape]
    if impl == "triton" and not CUDA:
        pytest.skip("Triton speed is measured on a CUDA GPU (the CPU interpreter is for correctness only)")
    if cfg["gpu_only"] and not CUDA:
        pytest.skip("the paper shape needs a GPU (its eager [N, V] logits alone are 21 GB in fp32)")
    x = make(cfg["n"], cfg["d"], cfg["v"], cfg["dtype"])
    fn = IMPLS[impl]

    def step():
        out = fn(**x)
        if backward:
            out.backward()
            x["hidden"].grad = None
        if CUDA:
            torch.cuda.synchronize()  # host-device sync so the round time covers the kernels

    step()
    step()  # compile / autotune / warm caches outside the timing
    gc.collect()
    if CUDA:
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()  # the inputs (hidden states, LM head) and nothing of the calls
        torch.cuda.reset_peak_memory_stats()  # the peak restarts at `held`
    benchmark.pedantic(step, rounds=10 if CUDA else 5, iterations=1)
    peak = torch.cuda.max_memory_allocated() if CUDA else None
    role = "reference" if impl != "triton" else "ours"
    name = f"{impl} ({'fwd+bwd' if backward else 'fwd'})"
    record(SUITE, name, cfg["n"], "transitions/s", f"{shape} {'fwd+bwd' if backward else 'fwd'}", role,
           peak_bytes=peak)
    if CUDA:
        add_note(SUITE, f"{shape} {name}: peak allocated during the calls {peak / 2**20:,.0f} MiB = inputs "
                        f"{held / 2**20:,.0f} MiB (held before the calls) + {(peak - held) / 2**20:,.0f} MiB the "
                        f"calls themselves allocate (logits, gradients, workspace); PyTorch's caching allocator only")
