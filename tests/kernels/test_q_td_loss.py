"""icrl_kernels.q_td_loss: the Triton path against the float64 torch reference -- in the CPU interpreter where there is
no GPU, compiled on CUDA tensors where there is one (tests/conftest.py sets TRITON_INTERPRET only without a GPU)."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from icrl_kernels import QTDLoss, q_td_loss, q_td_loss_reference, select_backend
from icrl_kernels.q_td_loss import vocab_argmax

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels on a GPU machine, the interpreter elsewhere
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
    inputs = {"hidden": torch.randn(n, d, generator=g, dtype=torch.float64), "weight": w, "next_hidden": hn,
              "next_target_hidden": torch.randn(n, d, generator=g, dtype=torch.float64),
              "actions": torch.randint(0, 4, (n,), generator=g),
              "rewards": (torch.rand(n, generator=g) < 0.3).double(), "dones": dones, "seq_ids": seq,
              "target_weight": wt, "action_ids": A_IDS if lm else None}
    return {k: (v.to(DEV, dtype) if v.is_floating_point() else v.to(DEV)) if torch.is_tensor(v) else v
            for k, v in inputs.items()}, planted.to(DEV)


def run(fn, inputs, grad_weight=False, upstream=None, **kw):
    x = {k: (v.clone().requires_grad_(k == "hidden" or (grad_weight and k == "weight")) if torch.is_tensor(v) else v)
         for k, v in inputs.items()}
    out = fn(x["hidden"], x["weight"], x["next_hidden"], x["next_target_hidden"],
             x["actions"], x["rewards"], x["dones"], x["seq_ids"], action_ids=x["action_ids"],
             target_weight=x["target_weight"], **kw)
    gout = upstream if upstream is not None else torch.tensor(1.7, dtype=out.dtype)
    out.backward(gout.to(out.device, out.dtype))
    return out.detach(), x["hidden"].grad, x["weight"].grad if grad_weight else None


def rel_err(got, want):
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


SHAPES = [(1, 31), (7, 64), (1023, 96), (4099, 129)]


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("argmax", ["actions", "vocab"])
@pytest.mark.parametrize("loss", ["paper", "mse", "huber"])
def test_forward_and_hidden_grad_match_float64_reference(n, d, argmax, loss):
    inputs, _ = make(n, d, argmax=argmax, seed=n + d)
    kw = {"argmax": argmax, "loss": loss, "gamma": 0.9, "reward_scale": 30.0, "huber_delta": 5.0}
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
    kw = {"loss": "huber" if lm else "paper", "reduction": reduction}
    got, dh, dw = run(q_td_loss, inputs, grad_weight=True, upstream=upstream, backend="triton", **kw)
    ref, dh_ref, dw_ref = run(q_td_loss_reference, {k: (v.double() if torch.is_tensor(v) and v.is_floating_point()
                                                       else v) for k, v in inputs.items()},
                              grad_weight=True, upstream=upstream, **kw)
    assert got.shape == ref.shape == ((n,) if reduction == "none" else ())
    assert rel_err(got, ref) <= 1e-5 and rel_err(dh, dh_ref) <= 1e-5 and rel_err(dw, dw_ref) <= 1e-5
    if lm:  # only the action rows of the LM head get a gradient
        others = torch.ones(V, dtype=torch.bool)
        others[A_IDS] = False
        assert (dw[others.to(DEV)] == 0).all()


@pytest.mark.parametrize("path", ["triton", "cublas"])  # the GEMM-tile kernel, torch.mm over V chunks (of 128 here)
def test_vocab_argmax_streams_tiles_and_breaks_ties_low(path):
    inputs, planted = make(513, 40, argmax="vocab", seed=5)
    w = inputs["weight"].clone()
    w[298] = w[2]  # an exact tie between the first and the ragged last tile: the lower index must win
    hn = inputs["next_hidden"].clone()
    hn[0] = 50.0 * w[2]
    got = vocab_argmax(hn, w, path=path)
    want = (hn.double() @ w.double().T).argmax(1)
    # rows planted on 2 or 298 tie there too, but only row 0 is exact in fp32 (50 * w[2]: the same products in both
    # columns); in the others BLAS blocking may round the two columns differently (seen with one BLAS thread)
    kept = (planted != 2) & (planted != 298)
    kept[0] = False
    assert got[0] == 2 and torch.equal(got[kept], want[kept])
    assert torch.equal(got[kept], planted[kept]) and kept.sum() > 400


def test_no_bootstrap_across_episode_ends():
    inputs, _ = make(64, 32, seed=7)
    inputs["dones"][:] = True
    inputs["rewards"][:] = 1.0
    _, parts = q_td_loss_reference(**{k: v for k, v in inputs.items()}, return_parts=True)
    assert torch.allclose(parts["y"], torch.full((64,), 30.0, device=DEV))
    got = q_td_loss(**inputs, loss="mse", backend="triton")
    want = ((parts["q"] - 30.0) ** 2).mean()
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("argmax", ["actions", "vocab"])
def test_per_transition_discounts_replace_gamma_times_not_done(argmax):
    """``discounts``: y = r * scale + discount * Q_target(next), the fused path (gamma 1, done 1 - discount) against
    the float64 reference, and the reference against gamma * (1 - done) where the discounts say exactly that."""
    inputs, _ = make(1023, 96, seed=11, argmax=argmax)
    g = torch.Generator().manual_seed(3)
    discounts = torch.where(inputs["dones"].cpu(), 0.5, 0.9) * torch.rand(1023, generator=g, dtype=torch.float64)
    want, want_grad, _ = run(q_td_loss_reference, inputs, argmax=argmax, discounts=discounts.to(DEV))
    f32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}
    got, got_grad, _ = run(q_td_loss, f32, argmax=argmax, backend="triton", discounts=discounts.float().to(DEV))
    assert rel_err(got, want) <= 1e-5 and rel_err(got_grad, want_grad) <= 1e-5
    same = torch.where(inputs["dones"], 0.0, 0.9).double()
    a = run(q_td_loss_reference, inputs, argmax=argmax, discounts=same)[0]
    b = run(q_td_loss_reference, inputs, argmax=argmax, gamma=0.9)[0]
    assert rel_err(a, b) <= 1e-12
    with pytest.raises(ValueError, match="discounts"):
        q_td_loss(**inputs, discounts=discounts[:5].to(DEV))


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
    # this session runs under TRITON_INTERPRET=1 where there is no GPU (conftest), compiled on CUDA tensors otherwise
    assert select_backend(torch.zeros(1, device=DEV)) == "triton"
    inputs, _ = make(20, 16, seed=1)
    assert torch.allclose(q_td_loss(**inputs, backend="reference"), q_td_loss(**inputs, backend="triton"), rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"hidden": torch.zeros(8, 16)}, r"next_hidden \(10, 16\) must match hidden \(8, 16\)"),
    ({"weight": torch.zeros(300, 17)}, "must be \\[V or A, d\\] with d = 16"),
    ({"actions": torch.full((10,), 4)}, "actions must be in 0..3"),
    ({"actions": torch.zeros(9, dtype=torch.long)}, r"actions must be a tensor of shape \[N\] = \[10\]"),
    ({"hidden": torch.zeros(16, 10).T}, "contiguous"),
    ({"next_target_hidden": torch.zeros(10, 16, dtype=torch.bfloat16)}, "share one dtype"),
    ({"hidden": torch.zeros(10)}, "2-D"),
    ({"action_ids": torch.tensor([0, 1, 2, 300])}, "action_ids must index rows"),
    ({"seq_ids": torch.zeros(10)}, "integer"),
])
def test_bad_inputs_are_value_errors_with_shapes(change, message, monkeypatch):
    monkeypatch.setenv("ICRL_KERNELS_DEBUG", "1")  # value checks (ranges) are a sync on CUDA: on in debug mode
    inputs, _ = make(10, 16, seed=2)
    inputs.update({k: v.to(DEV) for k, v in change.items()})
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


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@contextlib.contextmanager
def host_reads():
    """Record every way torch code reads a tensor's value on the host (on CUDA: a device-to-host sync)."""
    calls, saved = [], {name: getattr(torch.Tensor, name) for name in SYNCS}
    unique = torch.unique

    def spy(name):
        return lambda self, *a, **k: calls.append(name) or saved[name](self, *a, **k)

    for name in SYNCS:
        setattr(torch.Tensor, name, spy(name))
    torch.unique = lambda *a, **k: calls.append("unique") or unique(*a, **k)
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.unique = unique


def _torch_forward(hidden, weight, next_hidden, next_target_hidden, target_weight, taken_tok, action_ids, rewards,
                   dones, gamma, reward_scale, argmax):
    """``q_td_forward`` in torch (the kernels' job), for checking the glue around the launches."""
    rows = weight if argmax == "vocab" else weight[action_ids]
    nxt = (next_hidden.float() @ rows.float().T).argmax(1)
    tgt = target_weight[nxt] if argmax == "vocab" else target_weight[action_ids][nxt]
    y = rewards * reward_scale + gamma * (1.0 - dones) * (next_target_hidden.float() * tgt.float()).sum(1)
    return (hidden.float() * weight[taken_tok].float()).sum(1), y, nxt


@pytest.mark.parametrize("argmax", ["actions", "vocab"])
@pytest.mark.parametrize("loss", ["paper", "mse"])
def test_the_loss_call_reads_nothing_back_to_the_host(argmax, loss, monkeypatch):
    """A training step must not wait for the GPU inside the loss: no ``.item()``, ``int(t)``, ``bool(t)``,
    ``torch.unique`` ... in the reference path or in the fused path's torch glue (its kernel launches are replaced
    by torch equivalents here: the CPU interpreter itself copies to the host), forward and backward. The value
    checks that need a read run only in debug mode (``ICRL_KERNELS_DEBUG=1``; the default on CPU tensors), in one
    read."""
    fused = sys.modules["icrl_kernels.q_td_loss"]  # the module (the package's `q_td_loss` is the function)
    monkeypatch.setattr(fused, "q_td_forward", _torch_forward)
    monkeypatch.setattr(fused, "q_td_dhidden", lambda g, w, tok, dtype: (g[:, None] * w[tok]).to(dtype))
    monkeypatch.setenv("ICRL_KERNELS_DEBUG", "0")
    inputs, _ = make(40, 16, argmax=argmax, seed=4)
    want = q_td_loss_reference(**inputs, argmax=argmax, loss=loss)
    for backend in ("reference", "triton"):
        x = {k: (v.clone().requires_grad_(k == "hidden") if torch.is_tensor(v) else v) for k, v in inputs.items()}
        with host_reads() as calls:
            out = q_td_loss(**x, backend=backend, argmax=argmax, loss=loss)
            out.backward()
        assert calls == [], f"{backend}: host reads {calls}"
        torch.testing.assert_close(out.detach(), want.detach().float(), rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("ICRL_KERNELS_DEBUG", "1")
    with host_reads() as calls:
        q_td_loss(**inputs, backend="reference", argmax=argmax, loss=loss)
    assert calls == ["tolist"]  # debug mode: every value check in one read
    inputs["actions"] = inputs["actions"] + 4
    with pytest.raises(ValueError, match="actions must be in 0..3"):
        q_td_loss(**inputs, backend="reference")
    monkeypatch.setenv("ICRL_KERNELS_DEBUG", "0")
    q_td_loss(**{**inputs, "actions": inputs["actions"] - 4}, backend="reference")  # off: no check, no read


def test_sequence_mean_with_sparse_unsorted_ids():
    """Sequences are found without reading ``seq_ids`` on the host: any non-negative ids, in any order."""
    from icrl_kernels.reference import reduce_loss, sequence_index, sequence_mean

    seq = torch.tensor([7, 0, 7, 1000, 0, 7], device=DEV)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 6.0, 5.0], device=DEV)
    dense, n_seq = sequence_index(seq)
    assert dense.tolist() == [1, 0, 1, 2, 0, 1] and int(n_seq) == 3
    mean, count = sequence_mean(vals, seq)
    assert mean.tolist() == [3.0, 4.0, 3.0, 4.0, 4.0, 3.0] and count.tolist() == [3, 2, 3, 1, 2, 3]
    per_row = torch.ones(6, device=DEV)
    assert float(reduce_loss(per_row, seq, "paper", "mean")) == 1.0  # mean over 3 sequences of their means


def make_paper_shape(n=4096, d=4096, v=128256, seed=0):
    """The paper's shape: hidden states and a Llama-3-sized LM head with a planted margin on the argmax."""
    g = torch.Generator(device=DEV).manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, device=DEV, dtype=torch.float32)

    w = r(v, d) / d ** 0.5
    planted = torch.randint(0, v, (n,), generator=g, device=DEV)
    hn = r(n, d) + 12.0 * w[planted] / w[planted].norm(dim=1, keepdim=True) ** 2
    dones = torch.rand(n, generator=g, device=DEV) < 0.25
    return {"hidden": r(n, d), "weight": w, "next_hidden": hn, "next_target_hidden": r(n, d),
            "actions": torch.randint(0, 4, (n,), generator=g, device=DEV),
            "rewards": (torch.rand(n, generator=g, device=DEV) < 0.3).float(), "dones": dones,
            "seq_ids": torch.arange(n, device=DEV) // 512, "target_weight": w + 0.05 * r(v, d) / d ** 0.5,
            "action_ids": torch.tensor([3, 130, 257, 299], device=DEV)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the paper shape in bf16 runs on a CUDA GPU")
def test_bf16_paper_shape_within_twice_eager_bf16_on_gpu():
    """N 4,096, d 4,096, V 128,256 (full-vocabulary argmax, the paper's setting) in bf16: the compiled kernels'
    loss and dL/dhidden within 2x the error eager bf16 makes against float64 (STYLE.md 4)."""
    x32 = make_paper_shape()

    def to(x, dt):
        return {k: (v.to(dt) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in x.items()}

    bf16, f64 = to(x32, torch.bfloat16), to(x32, torch.float64)
    del x32
    ref, dh_ref, _ = run(q_td_loss_reference, f64, argmax="vocab")
    del f64
    torch.cuda.empty_cache()
    eager, dh_eager, _ = run(q_td_loss_reference, bf16, argmax="vocab")
    got, dh, _ = run(q_td_loss, bf16, argmax="vocab", backend="triton")
    assert rel_err(got, ref) <= 2 * max(rel_err(eager, ref), 1e-3)
    assert rel_err(dh, dh_ref) <= 2 * max(rel_err(dh_eager, dh_ref), 1e-3)


def test_value_checks_stay_out_of_a_compiled_graph(monkeypatch):
    """The input checks read values on the host (on CPU tensors by default): inside ``torch.compile(fullgraph=True)``
    they are skipped, so the loss compiles as one graph and equals the eager call, which still checks."""
    monkeypatch.delenv("ICRL_KERNELS_DEBUG", raising=False)
    inputs, _ = make(7, 64)
    inputs = {k: v.cpu() if torch.is_tensor(v) else v for k, v in inputs.items()}

    def loss(x):
        return q_td_loss(x["hidden"], x["weight"], x["next_hidden"], x["next_target_hidden"], x["actions"],
                         x["rewards"], x["dones"], x["seq_ids"], action_ids=x["action_ids"],
                         target_weight=x["target_weight"], backend="reference")

    compiled = torch.compile(loss, fullgraph=True, dynamic=False, backend="eager")
    torch.testing.assert_close(compiled(inputs), loss(inputs), rtol=1e-6, atol=0)
    with pytest.raises(ValueError):  # eagerly, a bad action is still refused
        loss({**inputs, "actions": inputs["actions"] + 9})
