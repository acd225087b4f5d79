"""The trainer's step (``icrl_fast.rl.train_step``) on the default preset's model and a real protocol batch: no host
sync under ``no_host_sync`` (and the old path is caught), the source's padded transitions give today's loss and
gradients, the foreach Polyak update and the fused AdamW are bit-equal to the loops they replace, a NaN between
logged steps still stops the run, and the loss compiles into one graph (``fullgraph=True``) equal to eager."""

import dataclasses

import numpy as np
import pytest
import torch
from icrl_kernels import use_backend

import icrl_fast.train as T
from icrl_fast.checkpoint import build_qnet
from icrl_fast.data.formats import compact_format, make_format, paper_format
from icrl_fast.data.step_format import StepFormat
from icrl_fast.envs.maps import generate_maps
from icrl_fast.rl.dqn import TRANSITION_KEYS, transition_capacity, transitions
from icrl_fast.rl.objectives import ObjectiveConfig, Objectives
from icrl_fast.rl.sources import ProtocolConfig, ProtocolSource, decision_spacing
from icrl_fast.rl.train_step import FiniteWatch, forward_backward, make_optimizer, train_step
from icrl_fast.sync_guard import HostSyncError, no_host_sync


def default_setup(objective: ObjectiveConfig | None = None, episodes: int = 6, **dqn):
    """The default preset (step-grid, same-state memory with forgetting, td with gamma_episode 0.9, switches and
    shifts), its model shrunk to 2 x 32, and one micro-batch of its protocol source as CPU tensors."""
    cfg = T.preset("default")
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, hidden_size=32, heads=2, intermediate_size=64, max_positions=4096),
        protocol=dataclasses.replace(cfg.protocol, pool_maps=200, episodes=episodes, contexts=4, bucket=1),
        objective=objective or cfg.objective, dqn=dataclasses.replace(cfg.dqn, **dqn))
    assert cfg.data.format == "step-grid" and cfg.model.memory and cfg.model.memory_forget
    assert cfg.dqn.gamma_episode == 0.9 and cfg.protocol.switch > 0 and cfg.protocol.shift > 0
    fmt = make_format(cfg.data.format)
    qnet = build_qnet(cfg, fmt, "cpu")
    src = ProtocolSource(cfg.protocol, fmt, generate_maps(5, seed=0), seed=1, memory=qnet.memory)
    batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in src.batch(0).items() if k != "length"}
    objective = Objectives(qnet, cfg.objective, cfg.dqn, landing_block=fmt.landing_block)
    return cfg, qnet, objective, batch


def learner(cfg, qnet, fused=True):
    """AdamW and the schedule as the trainer makes them; fused: the GPU trainer's (the CPU's foreach one reads its
    step counts with ``.item()``, refused by the guard though they are CPU tensors)."""
    opt = make_optimizer(qnet.trainable_parameters(), cfg.optim.lr, cfg.optim.weight_decay, fused=fused)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, cfg.optim.lr_factor)


def old_batch(batch):
    """The batch as it was before the source computed anything: no transitions, no memory features."""
    return {k: v for k, v in batch.items() if k not in TRANSITION_KEYS and k != "memory"}


def step(cfg, qnet, objective, batch, opt, sched, watch=None):
    return train_step(objective, opt, [batch], params=qnet.trainable_parameters(), clip=cfg.optim.clip,
                      scheduler=sched, qnet=qnet, tau=cfg.dqn.tau, watch=watch)


@pytest.fixture
def kernel_checks_off(monkeypatch):
    """``q_td_loss`` reads action and sequence ids to check them on CPU tensors (one ``.tolist()``); on CUDA that
    is off by default, and so it is here, where the CPU stands in for the GPU."""
    monkeypatch.setenv("ICRL_KERNELS_DEBUG", "0")


#: ``q_td_loss``'s backends: the torch reference (what a CPU run uses) and, under the tests' ``TRITON_INTERPRET=1``
#: (tests/conftest.py), the Triton path that a GPU run takes.
BACKENDS = ["reference", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_step_no_sync_default_preset(kernel_checks_off, backend):
    cfg, qnet, objective, batch = default_setup()
    opt, sched = learner(cfg, qnet)
    watch = FiniteWatch(0, "cpu")
    before = [p.detach().clone() for p in qnet.target.parameters()]
    for _ in range(2):  # the first step also creates AdamW's state
        with use_backend(backend), no_host_sync():
            loss, stats = step(cfg, qnet, objective, batch, opt, sched, watch)
    assert torch.isfinite(loss) and watch.bad_step == 0 and watch.step == 2 and stats["transitions"] > 0
    assert {"losses/td", "q", "target", "transitions", "done_frac"} <= set(stats)
    assert not all(torch.equal(a, b) for a, b in zip(before, qnet.target.parameters()))  # Polyak moved the target


@pytest.mark.parametrize("missing", ["transitions", "memory", "kernel checks"])
def test_the_old_step_is_caught_by_the_no_sync_guard(monkeypatch, missing):
    """What the step was before: ``nonzero`` for the transitions, the memory's features from tokens copied to the
    host, and (on CPU tensors) the kernel's value checks: each is refused, so the test above can fail."""
    cfg, qnet, objective, batch = default_setup()
    opt, sched = learner(cfg, qnet)
    monkeypatch.setenv("ICRL_KERNELS_DEBUG", "1" if missing == "kernel checks" else "0")
    if missing != "kernel checks":
        drop = TRANSITION_KEYS if missing == "transitions" else ("memory",)
        batch = {k: v for k, v in batch.items() if k not in drop}
    with pytest.raises(HostSyncError), no_host_sync():
        step(cfg, qnet, objective, batch, opt, sched)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", ["default", "cql", "mse", "tau 1", "every objective"])
def test_padded_transitions_give_todays_loss_and_gradients(setting, backend):
    """The same batch through the old path (``nonzero`` transitions, memory computed in ``hidden``, the kernel's own
    mean) and the new one (the source's padded transitions and features, the masked mean): fp32, so the loss within
    1e-6 relative (the padded sum adds zeros after the same terms: the last bit may differ) and the gradients within
    1e-5 (they are the same per transition)."""
    kw = {"cql": {"cql": 0.5}, "mse": {"loss": "mse"}, "tau 1": {"tau": 1.0}}.get(setting, {})
    objective = ObjectiveConfig(td=0.5, imitation=1.0, observation=0.5) if setting == "every objective" else None
    _cfg, qnet, obj, batch = default_setup(objective, **kw)
    results = []
    for b in (old_batch(batch), batch):
        qnet.model.zero_grad(set_to_none=True)
        with use_backend(backend):
            loss, stats = obj(b)
        loss.backward()
        results.append((loss.detach(), stats, [p.grad.clone() for p in qnet.trainable_parameters()]))
    (l0, s0, g0), (l1, s1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())
    assert s0.keys() == s1.keys()
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=1e-5, atol=1e-6)
    assert s1["transitions"] < batch["tr_valid"].numel()  # the padding was there, and weighed nothing


def test_padded_transitions_are_the_nonzero_ones_in_order():
    _, _, _, batch = default_setup()
    tr = transitions(batch["decision_mask"], batch["action"], batch["episode_id"], batch["episode_return"])
    valid = batch["tr_valid"]
    t = len(tr["row"])
    assert valid[:t].all() and not valid[t:].any()
    rows, width = batch["input_ids"].shape
    assert valid.numel() == transition_capacity(rows, width) == rows * (width - 2)  # step format: spacing 1
    for key in ("row", "pos", "next_pos", "action", "reward", "done"):
        assert torch.equal(batch[f"tr_{key}"][:t], tr[key]), key


@pytest.mark.parametrize("fmt", [compact_format(), paper_format(), StepFormat()], ids=["compact", "paper", "step"])
def test_decision_spacing_bounds_real_contexts(fmt):
    """The capacity assumes two decisions of a slice are ``decision_spacing`` tokens apart at least: true of played
    contexts in every format, and tight (some decisions are exactly that far apart)."""
    src = ProtocolSource(ProtocolConfig(pool_maps=100, episodes=6, contexts=3, bucket=1), fmt, generate_maps(3, seed=0),
                         seed=2)
    batch = src.batch(0)  # padded_transitions raises if the batch holds more than the capacity
    gaps = np.concatenate([np.diff(np.flatnonzero(row)) for row in batch["decision_mask"]])
    assert gaps.min() == decision_spacing(fmt)
    rows, width = batch["input_ids"].shape
    assert batch["tr_valid"].size == rows * ((width - 2) // decision_spacing(fmt))
    assert batch["tr_valid"].sum() == batch["decision_mask"].sum() - rows  # each row's last decision has no target


def test_polyak_update_foreach_is_bit_equal_to_the_loop():
    cfg, qnet, objective, batch = default_setup()
    opt, sched = learner(cfg, qnet)
    step(cfg, qnet, objective, batch, opt, sched)  # online and target now differ
    expected = [t.detach().clone().mul_(1.0 - 0.1).add_(o.detach(), alpha=0.1)
                for o, t in zip(qnet.model.parameters(), qnet.target.parameters())]
    qnet.polyak_update(0.1)
    assert all(torch.equal(a, b) for a, b in zip(expected, qnet.target.parameters()))


def test_the_cpu_optimizer_is_bit_equal_to_the_single_tensor_loop():
    """``make_optimizer`` on the CPU (foreach) makes the weights the per-tensor AdamW the trainer had made."""
    _cfg, qnet, objective, batch = default_setup()
    start = {k: v.clone() for k, v in qnet.model.state_dict().items()}
    weights = []
    for new in (True, False):
        qnet.model.load_state_dict(start)
        params = qnet.trainable_parameters()
        opt = (make_optimizer(params, 1e-3, 0.01) if new
               else torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=False))
        assert not opt.defaults["fused"] and opt.defaults["foreach"] == new
        for _ in range(3):
            forward_backward(objective, [batch])
            opt.step()
            opt.zero_grad(set_to_none=True)
        weights.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_a_nan_between_logged_steps_stops_the_run_at_the_next_read(tmp_path, monkeypatch):
    """The watch is read with the logged steps (smoke: every 2) and before each checkpoint (every 4): a NaN loss at
    step 5 stops the run at step 6, naming step 5, with the step-4 checkpoint the latest."""
    real, calls = T.dqn_loss, {"n": 0}

    def nan_at_step_5(*a, **k):
        calls["n"] += 1
        loss, stats = real(*a, **k)
        return (loss * float("nan") if calls["n"] == 5 else loss), stats

    monkeypatch.setattr(T, "dqn_loss", nan_at_step_5)
    cfg = T.preset("smoke")
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, steps=8),
                              eval=dataclasses.replace(cfg.eval, maps=0), ckpt_every=4)
    with pytest.raises(T.TrainingDiverged, match="nan at step 5"):
        T.run(cfg, tmp_path / "nan", progress=False)
    assert calls["n"] == 6  # one more step ran before the read
    assert (tmp_path / "nan" / "checkpoints" / "latest").read_text() == "step-000004"


def compiled_matches_eager(backend: str):
    _cfg, qnet, objective, batch = default_setup()

    def loss_and_grads(fn):
        qnet.model.zero_grad(set_to_none=True)
        loss, _ = fn(objective, [batch])
        return loss, [p.grad.clone() for p in qnet.trainable_parameters()]

    with use_backend("reference"):  # the Triton interpreter's launches cannot be traced (UntypedStorage.data_ptr)
        eager = loss_and_grads(forward_backward)
        torch._dynamo.reset()
        compiled = torch.compile(forward_backward, fullgraph=True, dynamic=False, backend=backend)
        with torch._dynamo.config.patch(trace_autograd_ops=True):  # Tensor.backward() inside the graph
            out = loss_and_grads(compiled)
    torch.testing.assert_close(out[0], eager[0], rtol=1e-5, atol=0)
    for a, b in zip(eager[1], out[1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_forward_backward_compiles_fullgraph_aot_eager(kernel_checks_off):
    """Dynamo traces the whole micro-batch loop -- embedding with the memory's features, Llama, the TD loss (its
    torch reference) and the backward -- as one graph (``fullgraph=True`` raises at any break), and gives eager's
    loss and gradients. The kernel's value checks (on for CPU tensors) would break it: they are off, as on CUDA."""
    compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_forward_backward_compiles_fullgraph_inductor(kernel_checks_off):
    compiled_matches_eager("inductor")
