"""Training throughput: our train step (fused Q-head + TD loss, no [N, V] logits) vs the paper's way of computing the
same loss (full-vocabulary logits, eager loss), same model and batch, one run.

Shapes:
* ``8B`` (GPU only): Llama-3.1-8B's architecture, randomly initialised (same FLOPs as the real weights), bf16, IA3
  online/target adapters, the paper's batch (10 x 4,096-token slices per optimizer step, run here as 10
  micro-batches of 1 like the paper's gradient accumulation), full-vocabulary Double-DQN argmax, gradient
  checkpointing, flash-attn and Liger when installed. Reports tokens/s, model FLOP utilisation (MFU, vs the
  device's dense bf16 peak) and peak memory, and the estimated wall time of the 956-step recipe.
* ``small``: the default from-scratch CPU model (4 x 128) on 4 x 1,024-token slices, fp32: what runs on a CPU.

Run: ``python -m pytest benchmarks/bench_train.py`` (on a GPU machine this is the one command for issue #9).
"""

import gc

import pytest
import torch
from conftest import add_note

from icrl_fast.model.qnet import ModelConfig, QNetwork
from icrl_fast.rl.dqn import DQNConfig, dqn_loss

SUITE = "train"
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072)
SHAPES = {
    "8B": dict(gpu_only=True, slices=1, accum=10, slice_len=4096),
    "small": dict(gpu_only=False, slices=4, accum=1, slice_len=1024),
}


def build(shape: str, tmp_path_factory) -> QNetwork:
    action_ids = [3, 7, 11, 19]
    if shape == "small":
        return QNetwork(ModelConfig(), 71, action_ids, device=DEVICE, seed=0)
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama8b")
    conf = LlamaConfig(**LLAMA_8B, tie_word_embeddings=False)
    with torch.device(DEVICE):  # random init on the GPU (same FLOPs as the real weights), saved like a checkpoint
        model = LlamaForCausalLM._from_config(conf, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    gc.collect()
    return QNetwork(ModelConfig(path=str(path), dtype="bfloat16", gradient_checkpointing=True,
                                liger=_has_liger()), LLAMA_8B["vocab_size"], action_ids, device=DEVICE)


def _has_liger() -> bool:
    from icrl_fast.model.attention import HAS_LIGER

    return HAS_LIGER and CUDA


def batch(slices: int, length: int, vocab: int, action_ids) -> dict[str, torch.Tensor]:
    """Random tokens with a decision every 20 tokens, 4 episodes per slice (a realistic transition density)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (slices, length), generator=g)
    mask = torch.zeros(slices, length, dtype=torch.bool)
    mask[:, 19::20] = True
    action = torch.where(mask, torch.randint(0, 4, (slices, length), generator=g), -1).to(torch.int8)
    episode = torch.arange(length).expand(slices, -1) // (length // 4)
    ret = (torch.rand(slices, length, generator=g) < 0.5).float()
    return {k: v.to(DEVICE) for k, v in dict(input_ids=ids, decision_mask=mask, action=action, episode_id=episode,
                                              episode_return=ret).items()}


def model_flops_per_token(qnet: QNetwork, length: int, decisions_per_token: float) -> float:
    """Model FLOPs per token of one train step, counting what runs (no recompute of gradient checkpointing: MFU, not
    hardware FLOPs): the decoder layers' matmuls (2 FLOPs per weight of every Linear inside ``layers``) and attention
    (causal: L/2 keys on average, QK^T and AV) in the online forward, the backward to the activations, the backward
    to the weights when they train, and the target forward; the LM head only where it is applied: at the decision
    points, as the next state's full-vocabulary argmax GEMM (``2 V d`` per decision, forward only) plus the ``q`` and
    target readouts (``2 A d`` each, negligible). The embedding is a lookup (no FLOPs): the previous count took
    every parameter, embedding and LM head included, as a matmul weight applied to every token (~15 % too many)."""
    base = qnet.model.get_base_model() if qnet.pretrained else qnet.model
    c = base.config
    layers = base.model.layers
    matmul_weights = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    per_pass = 2 * matmul_weights + 2 * c.num_hidden_layers * length * c.hidden_size  # linears + QK^T, AV (L/2 keys)
    passes = 3 + (0 if qnet.pretrained else 1)  # fwd, bwd-activations, [bwd-weights], target fwd
    a = qnet.action_ids.numel()
    head = decisions_per_token * 2 * c.hidden_size * (c.vocab_size + 2 * a)
    return per_pass * passes + head


@pytest.fixture(scope="module", params=list(SHAPES))
def setup(request, tmp_path_factory):
    shape = request.param
    if SHAPES[shape]["gpu_only"] and not CUDA:
        pytest.skip("the 8B shape needs a GPU (16 GB of bf16 weights)")
    qnet = build(shape, tmp_path_factory)
    vocab = qnet.head_weight().shape[0]
    s = SHAPES[shape]
    yield shape, qnet, batch(s["slices"], s["slice_len"], vocab, qnet.action_ids.tolist())
    del qnet
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


@pytest.mark.parametrize("impl", ["fused", "paper"])
def test_train_step(benchmark, record, setup, impl):
    shape, qnet, data = setup
    s = SHAPES[shape]
    cfg = DQNConfig(argmax="vocab")
    backend = None if impl == "fused" else "reference"  # reference: full [N, V] logits, eager loss
    opt = torch.optim.AdamW(qnet.trainable_parameters(), lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else torch.autocast("cpu", enabled=False)

    def step():
        opt.zero_grad(set_to_none=True)
        for _ in range(s["accum"]):
            with autocast:
                loss, _ = dqn_loss(qnet, data, cfg, backend=backend)
            (loss / s["accum"]).backward()
        opt.step()
        qnet.polyak_update(0.1)
        if CUDA:
            torch.cuda.synchronize()

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    tokens = s["slices"] * s["accum"] * s["slice_len"]
    peak = torch.cuda.max_memory_allocated() if CUDA else None
    row = record(SUITE, f"{shape}: {impl}", tokens, "tokens/s", shape, "ours" if impl == "fused" else "reference",
                 peak_bytes=peak)
    if CUDA:
        name = torch.cuda.get_device_name(0)
        peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        density = float(data["decision_mask"].float().mean())  # decisions per token (host read, outside timing)
        flops = model_flops_per_token(qnet, s["slice_len"], density) * row["throughput"]
        mfu = f"{flops / peak_flops:.1%}" if peak_flops else "unknown peak"
        add_note(SUITE, f"{shape} {impl}: {flops / 1e12:.0f} TFLOP/s, MFU {mfu}, 956 optimizer steps in "
                        f"{956 * row['median_s'] / 60:.0f} min")
