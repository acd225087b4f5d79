"""The test session runs Triton in the CPU interpreter only where there is no GPU (tests/conftest.py)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def _conftest():
    spec = importlib.util.spec_from_file_location("_session_conftest", CONFTEST)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_interpreter_only_without_a_gpu():
    triton_env = _conftest().triton_env
    env = {}
    triton_env(env, cuda_available=True)
    assert "TRITON_INTERPRET" not in env  # a GPU machine compiles the kernels (the -m gpu tests need that)
    triton_env(env, cuda_available=False)
    assert env["TRITON_INTERPRET"] == "1"
    env = {"TRITON_INTERPRET": "0"}
    triton_env(env, cuda_available=False)
    assert env["TRITON_INTERPRET"] == "0"  # an explicit choice wins
    if torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    else:
        assert os.environ["TRITON_INTERPRET"] == "1"


def test_torch_import_does_not_import_triton():
    """conftest asks torch whether there is a GPU before triton is imported: that only works if importing torch (and
    asking) leaves triton unimported, since triton reads TRITON_INTERPRET when it is first imported."""
    code = "import sys, torch; torch.cuda.is_available(); print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
