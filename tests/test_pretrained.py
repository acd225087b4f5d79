"""The pretrained path end to end on the CPU: a local Llama checkpoint with its own tokenizer (Llama-3 special
tokens), the paper preset (paper format, IA3 online/target adapters, bf16, full-vocab Double DQN), PEFT adapters
saved and loaded back by the evaluation."""

import json

import torch
from safetensors.torch import load_file

import icrl_fast.train as T
from icrl_fast.data.dataset import OfflineDataset
from icrl_fast.data.formats import ACTION_WORDS, SPECIAL_TOKENS
from icrl_fast.evaluate import main as evaluate_main
from icrl_fast.testing import save_tiny_llama


def test_paper_preset_with_a_local_checkpoint_trains_saves_reloads_and_evaluates(tmp_path):
    model = save_tiny_llama(tmp_path / "llama", filler=17)  # ids shifted: nothing may assume Llama-3's numbers
    run = tmp_path / "run"
    args = ["--preset", "paper", "--model", str(model), "--out", str(run), "--data.train_maps", "6",
            "--data.test_maps", "2", "--data.slice_len", "384", "--data.learner.episodes", "60",
            "--optim.steps", "3", "--optim.grad_accum", "2", "--optim.lr", "0.05", "--eval.maps", "2",
            "--eval.episodes", "3", "--eval.batch_maps", "2", "--ckpt_every", "2", "--log_every", "1"]
    assert T.main(args) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["tokenizer"] == str(model) and cfg["model"]["dtype"] == "bfloat16"
    assert cfg["dqn"]["argmax"] == "vocab"

    # the format's special tokens and action words are the tokenizer's own ids
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    fmt = OfflineDataset.load(run / "dataset").format
    assert fmt.episode_start.tolist() == [tok.convert_tokens_to_ids(SPECIAL_TOKENS[0])]
    assert fmt.episode_end.tolist() == [tok.convert_tokens_to_ids(SPECIAL_TOKENS[1])]
    assert fmt.action_ids.tolist() == tok.convert_tokens_to_ids(list(ACTION_WORDS))
    assert min(fmt.action_ids) > 17

    # PEFT adapters: both saved, loadable by plain PEFT, equal to the checkpoint, and trained (IA3 starts at 1)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert (run / "adapters" / "adapter_config.json").is_file()
    assert (run / "adapters" / "delayed" / "adapter_model.safetensors").is_file()
    ckpt = load_file(str(run / "checkpoints" / "step-000003" / "state.safetensors"))
    online = {k: v for k, v in ckpt.items() if ".ia3_l.default" in k}
    assert online and any(not torch.allclose(v.float(), torch.ones_like(v.float())) for v in online.values())
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), str(run / "adapters"))
    loaded = {n: p for n, p in peft_model.named_parameters() if ".ia3_l.default" in n}
    for name, value in online.items():
        torch.testing.assert_close(loaded[name[len("model/"):]].float(), value.float())

    qnet, _, maps, _ = T.load_run_for_eval(run, "in-distribution", 2)  # the evaluation loads the adapters back
    params = dict(qnet.model.named_parameters())
    for name, value in ckpt.items():
        if ".ia3_l." in name:
            torch.testing.assert_close(params[name[len("model/"):]].float(), value.float())
    assert params[next(k for k in params if ".ia3_l.delayed" in k)].dtype == torch.float32
    assert evaluate_main([str(run), "--maps", "2", "--episodes", "2", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["num_maps"] == 2
    _fused_loss_matches_eager(qnet, OfflineDataset.load(run / "dataset"))


def _fused_loss_matches_eager(qnet, ds):
    """The trained paper-preset model's TD loss (full-vocabulary argmax, IA3 adapters) through the fused kernels
    equals the eager reference: fp32 within 1e-5 -- loss and the online adapters' gradients -- in the interpreter on
    the CPU, compiled on a GPU; on a GPU also bf16 (the preset's dtype) within 2x eager bf16's error vs fp32."""
    from icrl_fast.rl.dqn import DQNConfig, dqn_loss

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    batch = {k: torch.from_numpy(v).to(dev) for k, v in ds.contract(slice(0, 2)).items()}
    cfg = DQNConfig(argmax="vocab")

    def loss_and_grads(backend):
        qnet.zero_grad(set_to_none=True)
        loss, _ = dqn_loss(qnet, batch, cfg, backend=backend)
        loss.backward()
        return loss.detach().double(), torch.cat([p.grad.double().flatten() for p, _ in qnet._ia3_pairs])

    rel = lambda got, want: float((got - want).abs().max() / want.abs().max())  # noqa: E731
    qnet.to(dev).float()
    want, want_g = loss_and_grads("reference")
    got, got_g = loss_and_grads(None)  # auto: the Triton kernels (interpreted on the CPU)
    assert want_g.abs().max() > 0 and rel(got, want) <= 1e-5 and rel(got_g, want_g) <= 1e-5
    if dev == "cuda":
        qnet.to(torch.bfloat16)
        for _, target in qnet._ia3_pairs:
            target.data = target.data.float()  # the target adapter stays fp32, as in training
        eager, eager_g = loss_and_grads("reference")
        got, got_g = loss_and_grads(None)
        assert rel(got, want) <= 2 * max(rel(eager, want), 1e-3)
        assert rel(got_g, want_g) <= 2 * max(rel(eager_g, want_g), 1e-3)
