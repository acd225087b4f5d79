"""q_td_loss: the Triton kernel vs the eager torch reference vs torch.compile of the reference, in one run.

Forward and forward+backward, time and peak memory, at the paper's shape (N = 40,960 decision-bearing tokens of
a 10 x 4,096 batch, d = 4,096, V = 128,256, full-vocabulary argmax, bf16), at N = 2,048 and 204 of the same head
(fewer transitions per batch: the vocabulary GEMM narrows), the paper shape in ``actions`` mode (the argmax over the
A action tokens only: no vocabulary GEMM, so these rows time the rest of the fused loss) and a small-model shape
(the default from-scratch model: d = 128, the 78-token offline vocabulary). GPU targets (issue #4): >= 3x eager
and >= 1.5x torch.compile, peak memory <= 10 % of eager's.

``test_vocab_argmax_paths`` times the vocabulary argmax alone (issue 31): the Triton GEMM with its argmax epilogue,
the chunked cuBLAS path, ``auto`` (the per-shape choice between them, timed at its first call; the note gives the
timings it chose by) and eager ``(h @ W.T).argmax(1)``, in TFLOP/s of the ``[N, V]`` GEMM.

Memory: the "peak memory" column is ``torch.cuda.max_memory_allocated()`` over the timed calls, inputs included
(hidden states, LM head: held before the first call); a note per row splits it into the inputs and what the calls
allocate on top. Memory outside PyTorch's caching allocator (cuBLAS/Triton workspaces) is not counted.

On a CPU machine only the small shape runs, eager vs torch.compile: the Triton kernel's speed is a GPU matter
(the CPU interpreter is a correctness tool) and the paper shape's eager logits alone are 21 GB in fp32.
"""

import gc
import importlib

import pytest
import torch
from conftest import add_note
from icrl_kernels import q_td_loss, q_td_loss_reference

SUITE = "q_td_loss"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PAPER = {"d": 4096, "v": 128256, "dtype": torch.bfloat16, "gpu_only": True}
SHAPES = {
    "paper (N=40960, d=4096, V=128256, bf16)": {"n": 40960, "argmax": "vocab", **PAPER},
    "N=2048 (d=4096, V=128256, bf16)": {"n": 2048, "argmax": "vocab", **PAPER},
    "N=204 (d=4096, V=128256, bf16)": {"n": 204, "argmax": "vocab", **PAPER},
    "paper actions (N=40960, d=4096, V=128256, bf16, argmax=actions)": {"n": 40960, "argmax": "actions", **PAPER},
    "small (N=8192, d=128, V=78, fp32)": {"n": 8192, "d": 128, "v": 78, "dtype": torch.float32, "argmax": "vocab",
                                          "gpu_only": False},
}
ARGMAX_N = [204, 2048, 40960]  # test_vocab_argmax_paths, at the paper's head (d 4,096, V 128,256, bf16)


def make(n, d, v, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, device=DEVICE, dtype=dtype)

    return {"hidden": r(n, d).requires_grad_(), "weight": r(v, d) / d ** 0.5, "next_hidden": r(n, d),
            "next_target_hidden": r(n, d), "actions": torch.randint(0, 4, (n,), device=DEVICE, generator=g),
            "rewards": (torch.rand(n, device=DEVICE, generator=g) < 0.1).to(dtype),
            "dones": torch.rand(n, device=DEVICE, generator=g) < 0.05,
            "seq_ids": torch.arange(n, device=DEVICE) // 4096,
            "action_ids": torch.tensor([3, 7, 11, 19], device=DEVICE)}


_COMPILED = {}


def impl_fn(impl: str, argmax: str):
    """The loss of ``impl`` (triton / eager / compile) in ``argmax`` mode; one torch.compile per mode."""
    if impl == "triton":
        return lambda **x: q_td_loss(**x, argmax=argmax, backend="triton")
    if impl == "eager":
        return lambda **x: q_td_loss_reference(**x, argmax=argmax)
    if argmax not in _COMPILED:
        _COMPILED[argmax] = torch.compile(lambda **x: q_td_loss_reference(**x, argmax=argmax))
    return _COMPILED[argmax]


@pytest.mark.parametrize("impl", ["triton", "eager", "compile"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_q_td_loss(benchmark, record, impl, shape, backward):
    cfg = SHAPES[shape]
    if impl == "triton" and not CUDA:
        pytest.skip("Triton speed is measured on a CUDA GPU (the CPU interpreter is for correctness only)")
    if cfg["gpu_only"] and not CUDA:
        pytest.skip("the d 4,096 / V 128,256 shapes need a GPU (the paper shape's eager [N, V] logits alone are "
                    "21 GB in fp32)")
    x = make(cfg["n"], cfg["d"], cfg["v"], cfg["dtype"])
    fn = impl_fn(impl, cfg["argmax"])

    def step():
        out = fn(**x)
        if backward:
            out.backward()
            x["hidden"].grad = None
        if CUDA:
            torch.cuda.synchronize()  # host-device sync so the round time covers the kernels

    step()
    step()  # compile / autotune / choose the argmax path / warm caches outside the timing
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


@pytest.mark.parametrize("path", ["auto", "triton", "cublas", "eager"])
@pytest.mark.parametrize("n", ARGMAX_N)
def test_vocab_argmax_paths(benchmark, record, path, n):
    if not CUDA:
        pytest.skip("the vocabulary argmax paths are timed on a CUDA GPU (d 4,096 x V 128,256 in bf16)")
    fused = importlib.import_module("icrl_kernels.q_td_loss")  # the module (the package's `q_td_loss` is the function)
    d, v, dtype = PAPER["d"], PAPER["v"], PAPER["dtype"]
    x = make(n, d, v, dtype)
    h, w = x["next_hidden"], x["weight"]
    del x
    fn = (lambda: (h @ w.T).argmax(1)) if path == "eager" else (lambda: fused.vocab_argmax(h, w, path=path))

    def step():
        fn()
        torch.cuda.synchronize()  # host-device sync so the round time covers the kernels

    step()
    step()  # autotune, time the paths (auto), warm caches outside the timing
    gc.collect()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=10, iterations=1)
    peak = torch.cuda.max_memory_allocated()
    group = f"vocab argmax N={n} (d={d}, V={v}, bf16)"
    record(SUITE, f"argmax {path}", 2 * n * v * d / 1e12, "TFLOP/s", group,
           "reference" if path == "eager" else "ours", peak_bytes=peak)
    add_note(SUITE, f"{group} argmax {path}: the calls allocate {(peak - held) / 2**20:,.0f} MiB on top of the "
                    f"inputs")
    if path == "auto":
        key = (fused.n_bucket(n), v, d, dtype, h.device)
        times = ", ".join(f"{p} {t:.3f} ms" for p, t in fused.PATH_TIMES.get(key, {}).items())
        add_note(SUITE, f"{group}: auto chose {fused.PATH_CHOICE.get(key)} (first-call timing: {times})")
