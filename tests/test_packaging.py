"""Package layout contracts: icrl_kernels stands alone, and CI runs exactly the README's test command."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_icrl_kernels_imports_without_icrl_fast():
    code = "import sys, icrl_kernels; assert 'icrl_fast' not in sys.modules, sorted(sys.modules); print(icrl_kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert pathlib.Path(out.strip()).parent.name == "kernels"


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
