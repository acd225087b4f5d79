"""Local stand-ins for a pretrained checkpoint, for tests and benchmarks (nothing is downloaded).

``word_tokenizer`` builds a Hugging Face fast tokenizer with the Llama-3 special tokens and the paper format's
words (one token each, like Llama-3's own tokenizer keeps them), so text round-trips through real
``tokenizer(text)`` / ``tokenizer.decode(ids)`` calls. ``save_tiny_llama`` writes a randomly initialised
Llama-architecture checkpoint plus that tokenizer to a folder that ``--model PATH`` loads like a real one.
"""

from __future__ import annotations

from pathlib import Path

from icrl_fast.data.formats import ACTION_WORDS, REWARD_TEXT, SPECIAL_TOKENS

WORDS = ("observation", "action", "reward", "truncated", *ACTION_WORDS, REWARD_TEXT)


def word_tokenizer(max_obs: int = 64, filler: int = 0):
    """A ``PreTrainedTokenizerFast``: ``<unk>``, ``filler`` unused words (to push ids around, so nothing can rely on
    fixed positions), the paper's words, ``0 .. max_obs - 1``, then the Llama-3 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", *(f"filler{i}" for i in range(filler)), *WORDS, *(str(i) for i in range(max_obs))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=SPECIAL_TOKENS[0],
                                   eos_token=SPECIAL_TOKENS[-1])


def save_tiny_llama(path: str | Path, *, hidden_size: int = 32, layers: int = 2, heads: int = 2,
                    intermediate_size: int = 64, max_obs: int = 64, filler: int = 0, seed: int = 0) -> Path:
    """A random Llama checkpoint (safetensors, ``config.json``) and its tokenizer in ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = word_tokenizer(max_obs, filler)
    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=8192, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(conf).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def torchrun_train(*argv: str, nproc: int = 2, timeout: float = 600) -> str:
    """``torchrun --standalone --nproc_per_node=NPROC -m icrl_fast.train ARGV`` on the CPU (gloo), one thread per
    process, from this checkout; returns its stdout; a failure raises with the tail of its stderr."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "icrl_fast.train", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"torchrun exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def run_losses(run: Path) -> list[float]:
    """The logged training losses (``losses/total``, the mean over processes) of a run directory, in order."""
    import json

    return [r["losses/total"] for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines())
            if "losses/total" in r]


def latest_checkpoint(run: Path) -> dict:
    """The tensors of a run directory's latest checkpoint."""
    from safetensors.torch import load_file

    ckpt = Path(run) / "checkpoints"
    return load_file(str(ckpt / (ckpt / "latest").read_text().strip() / "state.safetensors"))
