"""The README is a short guide that stays true: at most 300 lines, every relative link in it and in docs/*.md points
at a file that exists, and its icrl_kernels example runs."""

import os
import pathlib
import re
import subprocess
import sys
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 300

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)  # fenced code blocks
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)  # inline code: `x`, ``x``
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)


def markdown_files() -> list[pathlib.Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def relative_targets(text: str) -> list[str]:
    """Link and image targets of a Markdown text that name a local path: code blocks and code spans are not links,
    and web addresses, mail links and pure ``#anchors`` are left alone."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = INLINE_LINK.findall(text) + REFERENCE_DEF.findall(text)
    return [t for t in targets if not re.match(r"^(https?:|mailto:|#)", t)]


def test_relative_targets_parses_what_it_should():
    text = ("![fig](docs/a.png) [b](b.md#x) [web](https://x.org) [anchor](#top) `[no](code.md)`\n"
            "```\n[no](fenced.md)\n```\n[ref]: c/d.md\n[t](e.md \"title\")")
    assert relative_targets(text) == ["docs/a.png", "b.md#x", "e.md", "c/d.md"]


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, (f"README.md has {lines} lines (at most {MAX_README_LINES}): move the detail "
                                       "into docs/ and link to it")


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    missing = []
    for target in relative_targets(doc.read_text()):
        path = urllib.parse.unquote(target.split("#", 1)[0].split("?", 1)[0])
        if path and not (doc.parent / path).exists():
            missing.append(target)
    assert not missing, f"{doc.relative_to(ROOT)} links to paths that do not exist (relative to its folder): {missing}"


def test_readme_keeps_its_markers():
    text = README.read_text()
    for marker in ("<!-- headline -->", "<!-- train-command -->", "<!-- test-command -->", "<!-- kernels-example -->"):
        assert text.count(marker) == 1, marker
    assert text.index("<!-- headline -->") < text.index("<!-- train-command -->")


def test_generated_blocks_are_marked_once_in_the_results_doc():
    """``python -m icrl_fast.report --readme docs/results.md`` replaces the text after the *first* start marker up to
    the end marker: a second mention (in prose, say) would make it overwrite the wrong text."""
    text = (ROOT / "docs" / "results.md").read_text()
    for name in ("training", "report"):
        for edge in ("start", "end"):
            assert text.count(f"<!-- {name}:{edge} -->") == 1, f"<!-- {name}:{edge} -->"
        assert text.index(f"<!-- {name}:start -->") < text.index(f"<!-- {name}:end -->")


def kernels_example() -> str:
    """The ```python block right after the README's ``<!-- kernels-example -->`` marker."""
    after = README.read_text().split("<!-- kernels-example -->", 1)[1]
    match = re.match(r"\s*```python\n(.*?)^```", after, re.DOTALL | re.MULTILINE)
    assert match, "no ```python block right after <!-- kernels-example --> in README.md"
    return match.group(1)


def _run_example(code: str, **env_changes) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as in a user's shell, unless given
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **env_changes)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=False, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", line)]


def test_kernels_example_runs():
    """The example as a user runs it (CPU tensors: the pure-torch reference), and again with Triton's CPU
    interpreter, which runs the fused kernels themselves: both print the same loss and gradient norm (fp32,
    the example's 4 decimals)."""
    code = kernels_example()
    assert "cuda" not in code, "the README example must run on a CPU"
    as_user = _run_example(code)
    assert as_user.startswith("loss "), as_user
    import icrl_kernels

    if not icrl_kernels.HAS_TRITON:
        pytest.skip("triton is not installed: the reference path ran, the kernels cannot")
    interpreted = _run_example(code, TRITON_INTERPRET="1")
    assert _numbers(interpreted) == pytest.approx(_numbers(as_user), rel=1e-3, abs=1e-4), (as_user, interpreted)
