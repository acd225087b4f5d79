"""Package layout contracts: icrl_kernels stands alone, and CI runs exactly the README's test command."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_icrl_kernels_imports_without_icrl_fast():
    code = "import sys, icrl_kernels; assert 'icrl_fast' not in sys.modules, sorted(sys.modules); print(icrl_kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert pathlib.Path(out.strip()).parent == ROOT / "kernels" / "icrl_kernels"


def _run_from_root(code: str) -> str:
    """Run ``python -c code`` from the repository root, as a user does (the root is then first on sys.path)."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_hugging_face_kernels_is_installed_and_wins_from_the_repo_root():
    """transformers imports Hugging Face's ``kernels`` when it is installed (5.25 depends on it); from the repository
    root that import must find the installed package, never this project's ``kernels/`` folder (the 2026-12-05 break).
    The test extra installs ``kernels`` so this runs in CI whatever transformers' own dependencies are."""
    from importlib.metadata import version

    assert version("kernels"), "Hugging Face's kernels must be installed for this check (the test extra pins it)"
    origin = _run_from_root("import kernels; print(kernels.__file__)").strip()
    assert origin != "None" and not pathlib.Path(origin).resolve().is_relative_to(ROOT / "kernels"), origin
    assert _run_from_root("from transformers import LlamaModel; print('ok')").strip() == "ok"


def test_train_help_runs_from_the_repo_root():
    out = subprocess.run([sys.executable, "-m", "icrl_fast.train", "--help"], cwd=ROOT, capture_output=True, check=False,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: python -m icrl_fast.train")


def test_no_top_level_name_shadows_an_installed_module():
    """Every name at the repository root that Python could import (a folder or a ``.py`` file) either is this
    project's own package or loses to an installed module of the same name: a folder other than ``icrl_fast`` may
    not be a regular package (a namespace portion never beats one), and a root module must not share its name with
    an installed one. Checked by resolving each name from the root and from elsewhere."""
    names = sorted(p.stem if p.suffix == ".py" else p.name for p in ROOT.iterdir()
                   if (p.is_dir() and p.name.isidentifier() and not p.name.startswith(".")) or p.suffix == ".py")
    assert {"kernels", "tests", "benchmarks", "icrl_fast"} <= set(names)
    regular = [n for n in names if n != "icrl_fast" and (ROOT / n / "__init__.py").exists()]
    assert not regular, f"top-level folders that are regular packages and would shadow installed ones: {regular}"
    code = ("import importlib.util, json, sys; "
            f"print(json.dumps({{n: getattr(importlib.util.find_spec(n), 'origin', None) for n in {names!r}}}))")
    import json
    import tempfile

    from_root = json.loads(_run_from_root(code))
    with tempfile.TemporaryDirectory() as elsewhere:
        installed = json.loads(subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True,
                                              text=True, check=True).stdout)
    for name in names:
        if name == "icrl_fast" or installed.get(name) is None:
            continue  # our own package, or nothing installed under that name to shadow
        assert from_root[name] == installed[name], f"{name}: {from_root[name]} shadows {installed[name]}"


def test_importing_icrl_fast_registers_the_gymnasium_ids():
    code = "import gymnasium, icrl_fast; print(sorted(i for i in gymnasium.registry if i.startswith('icrl_fast/')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['icrl_fast/FrozenLake-v1', 'icrl_fast/FrozenLake8x8-v1']"


def test_ci_runs_the_readme_test_command():
    """.ci/run extracts the block after the README's marker; the block must be the one-line test command."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- test-command -->", 1)[1].split("```", 2)[1].splitlines()[1:]
    assert len(block) == 1 and "pytest" in block[0] and "pip install" in block[0]
    run = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in run
    assert "<!-- train-command -->" in readme
