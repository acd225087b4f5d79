"""icrl_kernels.q_td_loss: the Triton path (CPU interpreter here, fp32) against the float64 torch reference."""

import os
import subprocess
import sys

import pytest
import torch
from icrl_kernels import QTDLoss, q_td_loss, q_td_loss_reference, select_backend
from icrl_kernels.q_td_loss import vocab_argmax

A_IDS = torch.tensor([3, 130, 257, 299])  # action tokens spread over three 128-wide tiles of V = 300
V = 300  # 2 full tiles + a ragged last tile of 44


def make(n, d, *, lm=True, argmax="actions", seed=0, dtype=torch.float32):
    """Random inputs whose next-state argmax has a clear margin (a planted row), so fp32 and fp64 agree on it."""
    g = torch.Generator().manual_seed(seed)
    rows = V if lm else 4
    w = torch.randn(rows, d, generator=g, dtype=torch.float64) / d ** 0.5
    wt = w + 0.05 * torch.randn(rows, d, generator=g, dtype=torch.float64) / d ** 0.5
    hn = torch.randn(n, d, generator=g, dtype=torch.float64)
    candidates = torch.arange(V) if (lm and argmax == "vocab") else (A_IDS if lm else torch.arange(4))
    planted = candidates[torch.randint(0, candidates.numel(), (n,), generator=g)]
    hn += 12.0 * w[planted] / w[planted].norm(dim=1, keepdim=True) ** 2  # +12 on the planted logit
    seq = torch.sort(torch.randint(0, max(1, n // 6), (n,), generator=g)).values
    dones = torch.rand(n, generator=g) < 0.25
    dones[-1] = True  # the slice's last transition ends an episode...
    if n > 1:
        dones[0] = True  # ...and so does the first
        seq[-1] = seq[-2] + 1  # a sequence of one transition at the slice edge
    inputs = dict(hidden=torch.randn(n, d, generator=g, dtype=torch.float64), weight=w, next_hidden=hn,
                  next_target_hidden=torch.randn(n, d, generator=g, dtype=torch.float64),
                  actions=torch.randint(0, 4, (n,), generator=g), rewards=(torch.rand(n, generator=g) < 0.3).double(),
                  dones=dones, seq_ids=seq, target_weight=wt, action_ids=A_IDS if lm else None)
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}, planted


def run(fn, inputs, grad_weight=False, upstream=None, **kw):
    x = {k: (v.clone().requires_grad_(k == "hidden" or (grad_weight and k == "weight")) if torch.is_tensor(v) else v)
         for k, v in inputs.items()}
    out = fn(x["hidden"], x["weight"], x["next_hidden"], x["next_target_hidden"],
             x["actions"], x["rewards"], x["dones"], x["seq_ids"], action_ids=x["action_ids"],
             target_weight=x["target_weight"], **kw)
    gout = upstream if upstream is not None else torch.tensor(1.7, dtype=out.dtype)
    out.backward(gout.to(out.dtype))
    return out.detach(), x["hidden"].grad, x["weight"].grad if grad_weight else None


def rel_err(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


SHAPES = [(1, 31), (7, 64), (1023, 96), (4099, 129)]


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("argmax", ["actions", "vocab"])
@pytest.mark.parametrize("loss", ["paper", "mse", "huber"])
def test_forward_and_hidden_grad_match_float64_reference(n, d, argmax, loss):
    inputs, _ = make(n, d, argmax=argmax, seed=n + d)
    kw = dict(argmax=argmax, loss=loss, gamma=0.9, reward_scale=30.0, huber_delta=5.0)
    got, dh, _ = run(q_td_loss, inputs, backend="triton", **kw)
    ref, dh_ref, _ = run(q_td_loss_reference, {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                                               for k, v in inputs.items()}, **kw)
    assert got.dtype == torch.float32 and dh.dtype == torch.float32
    assert rel_err(got, ref) <= 1e-5 and rel_err(dh, dh_ref) <= 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lm", [True, False])
def test_reductions_weight_grad_and_upstream_grad(reduction, lm):
    n, d = 257, 48
    inputs, _ = make(n, d, lm=lm, seed=3)
    upstream = torch.randn(n, dtype=torch.float64) if reduction == "none" else torch.tensor(-0.37)
    kw = dict(loss="huber" if lm else "paper", reduction=reduction)
    got, dh, dw = run(q_td_loss, inputs, grad_weight=True, upstream=upstream, backend="triton", **kw)
    ref, dh_ref, dw_ref = run(q_td_loss_reference, {k: (v.double() if torch.is_tensor(v) and v.is_floating_point()
                                                       else v) for k, v in inputs.items()},
                              grad_weight=True, upstream=upstream, **kw)
    assert got.shape == ref.shape == ((n,) if reduction == "none" else ())
    assert rel_err(got, ref) <= 1e-5 and rel_err(dh, dh_ref) <= 1e-5 and rel_err(dw, dw_ref) <= 1e-5
    if lm:  # only the action rows of the LM head get a gradient
        others = torch.ones(V, dtype=torch.bool)
        others[A_IDS] = False
        assert (dw[others] == 0).all()


@pytest.mark.parametrize("max_programs", [1, 1024])  # one V split streamed by each program, or one tile per split
def test_vocab_argmax_streams_tiles_and_breaks_ties_low(max_programs):
    inputs, planted = make(513, 40, argmax="vocab", seed=5)
    w = inputs["weight"].clone()
    w[298] = w[2]  # an exact tie between the first and the ragged last tile: the lower index must win
    hn = inputs["next_hidden"].clone()
    hn[0] = 50.0 * w[2]
    got = vocab_argmax(hn, w, max_programs=max_programs)
    want = (hn.double() @ w.double().T).argmax(1)
    assert torch.equal(got, want) and got[0] == 2
    kept = (planted != 2) & (planted != 298)  # rows planted on the overwritten row no longer have that maximum
    kept[0] = False
    assert torch.equal(got[kept], planted[kept]) and kept.sum() > 400


def test_no_bootstrap_across_episode_ends():
    inputs, _ = make(64, 32, seed=7)
    inputs["dones"][:] = True
    inputs["rewards"][:] = 1.0
    _, parts = q_td_loss_reference(**{k: v for k, v in inputs.items()}, return_parts=True)
    assert torch.allclose(parts["y"], torch.full((64,), 30.0))
    got = q_td_loss(**inputs, loss="mse", backend="triton")
    want = ((parts["q"] - 30.0) ** 2).mean()
    assert rel_err(got, want) <= 1e-5


def test_module_matches_functional():
    inputs, _ = make(50, 33, seed=9)
    mod = QTDLoss(argmax="vocab", loss="paper", backend="triton")
    assert "vocab" in repr(mod)
    assert torch.equal(mod(**inputs), q_td_loss(**inputs, argmax="vocab", loss="paper", backend="triton"))


def test_dispatch_picks_the_reference_on_plain_cpu_tensors():
    code = ("import torch, icrl_kernels as k; x = torch.zeros(2, 2); "
            "print(k.select_backend(x), k.select_backend(x, backend='reference'))")
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["reference", "reference"]
    assert select_backend(torch.zeros(1)) == "triton"  # this session runs under TRITON_INTERPRET=1 (conftest)
    inputs, _ = make(20, 16, seed=1)
    assert torch.allclose(q_td_loss(**inputs, backend="reference"), q_td_loss(**inputs, backend="triton"), rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(hidden=torch.zeros(8, 16)), r"next_hidden \(10, 16\) must match hidden \(8, 16\)"),
    (dict(weight=torch.zeros(300, 17)), "must be \\[V or A, d\\] with d = 16"),
    (dict(actions=torch.full((10,), 4)), "actions must be in 0..3"),
    (dict(actions=torch.zeros(9, dtype=torch.long)), r"actions must be a tensor of shape \[N\] = \[10\]"),
    (dict(hidden=torch.zeros(16, 10).T), "contiguous"),
    (dict(next_target_hidden=torch.zeros(10, 16, dtype=torch.bfloat16)), "share one dtype"),
    (dict(hidden=torch.zeros(10)), "2-D"),
    (dict(action_ids=torch.tensor([0, 1, 2, 300])), "action_ids must index rows"),
    (dict(seq_ids=torch.zeros(10)), "integer"),
])
def test_bad_inputs_are_value_errors_with_shapes(change, message):
    inputs, _ = make(10, 16, seed=2)
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        q_td_loss(**inputs, backend="triton")


def test_bad_modes_are_value_errors():
    inputs, _ = make(10, 16, lm=False, seed=2)
    with pytest.raises(ValueError, match="argmax='vocab' needs the LM head"):
        q_td_loss(**inputs, argmax="vocab")
    with pytest.raises(ValueError, match="loss one of"):
        q_td_loss(**inputs, loss="l1")
    with pytest.raises(ValueError, match="backend must be one of"):
        q_td_loss(**inputs, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 numerics and speed are checked on a CUDA GPU")
@pytest.mark.parametrize("argmax", ["actions", "vocab"])
def test_bf16_error_within_twice_eager_bf16_on_gpu(argmax):
    inputs, _ = make(4099, 129, argmax=argmax, seed=11)
    to = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    bf16 = {k: (v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in to.items()}
    f64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in to.items()}
    ref, dh_ref, _ = run(q_td_loss_reference, f64, argmax=argmax)
    eager, dh_eager, _ = run(q_td_loss_reference, bf16, argmax=argmax)
    got, dh, _ = run(q_td_loss, bf16, argmax=argmax, backend="triton")
    assert rel_err(got, ref) <= 2 * max(rel_err(eager, ref), 1e-3)
    assert rel_err(dh, dh_ref) <= 2 * max(rel_err(dh_eager, dh_ref), 1e-3)
