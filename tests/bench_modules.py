"""Load a ``benchmarks/`` suite as a module inside a test: the suites import their own ``conftest`` (the
benchmarks' recorder), which stands in for the tests' one while the suite loads."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_suite(filename: str):
    """``benchmarks/<filename>`` as a fresh module; ``sys.modules["conftest"]`` is restored afterwards."""
    saved = sys.modules.get("conftest")
    sys.modules["conftest"] = _load("bench_conftest", BENCH / "conftest.py")
    try:
        return _load(f"{Path(filename).stem}_for_test", BENCH / filename)
    finally:
        if saved is None:
            sys.modules.pop("conftest", None)
        else:
            sys.modules["conftest"] = saved
