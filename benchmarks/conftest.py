"""Benchmark output contract: every suite records rows here; the session prints ours vs the reference with the
ratio and writes ``benchmarks/results/<suite>-<device>.{md,json}`` with device, versions, commit, date, command."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys

import numpy as np
import pytest

RESULTS = pathlib.Path(__file__).parent / "results"
_ROWS: dict[str, list[dict]] = {}
_NOTES: dict[str, list[str]] = {}


def add_note(suite: str, text: str) -> None:
    """A line printed under the suite's table (derived figures, e.g. a cost ratio between two rows)."""
    _NOTES.setdefault(suite, []).append(text)


def _add(suite: str, name: str, group: str, role: str, unit: str, seconds) -> dict:
    """Store a row of ``seconds`` samples: median and p20/p80 (``throughput`` is the caller's to set)."""
    data = np.asarray(seconds, dtype=np.float64)
    row = {"name": name, "group": group, "role": role, "unit": unit, "rounds": int(data.size),
           "median_s": float(np.median(data)), "p20_s": float(np.percentile(data, 20)),
           "p80_s": float(np.percentile(data, 80))}
    _ROWS.setdefault(suite, []).append(row)
    return row


def add_row(suite: str, name: str, group: str, role: str, unit: str, rates: list[float]) -> dict:
    """A row measured outside ``benchmark`` (e.g. throughputs that other processes report): ``rates`` are the
    measured throughputs in ``unit`` (one per sample); median and p20/p80 are of the time per unit of work."""
    row = _add(suite, name, group, role, unit, 1.0 / np.asarray(rates, dtype=np.float64))
    row["throughput"] = float(np.median(rates))
    return row


def rows_of(suite: str) -> list[dict]:
    return _ROWS.get(suite, [])


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0).replace(" ", "-")
    except ImportError:
        pass
    return "cpu"


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("numpy", "numba", "gymnasium", "torch", "triton"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=RESULTS.parent).stdout.strip()
        # pathspecs from the repository root (this file's folder is benchmarks/); results are outputs, not code
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ":/icrl_fast", ":/kernels", ":/csrc",
                                ":/benchmarks", ":(top,exclude)benchmarks/results"],
                               capture_output=True, text=True, cwd=RESULTS.parent).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@pytest.fixture
def record(benchmark, request):
    """``record(suite, name, work, unit, group, role, peak_bytes=None)`` after ``benchmark.pedantic``: stores the
    median and p20/p80 of the round times, the derived throughput ``work / time`` and the peak memory if given.
    Rows of role ``ours`` get their ratio to every ``reference`` row of the same group. Under
    ``--benchmark-disable`` (each row runs once, as a smoke test) there are no timings: nothing is recorded."""

    def _record(suite: str, name: str, work: float, unit: str, group: str, role: str,
                peak_bytes: int | None = None) -> dict:
        if benchmark.stats is None:  # --benchmark-disable
            return {}
        row = _add(suite, name, group, role, unit, benchmark.stats.stats.data)
        row["throughput"] = work / row["median_s"]
        if peak_bytes is not None:
            row["peak_mib"] = peak_bytes / 2 ** 20
        benchmark.extra_info.update(row)
        return row

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    RESULTS.mkdir(exist_ok=True)
    meta = {"device": device_name(), "cpu": _cpu_model(), "cores": os.cpu_count(), "versions": _versions(),
            "commit": _commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m pytest " + " ".join(sys.argv[1:])}
    for suite, rows in _ROWS.items():
        lines = [f"# {suite} benchmark ({meta['device']})", "",
                 f"- cpu: {meta['cpu']} ({meta['cores']} cores)", f"- versions: {meta['versions']}",
                 f"- commit: {meta['commit']}", f"- date: {meta['date']}", f"- command: `{meta['command']}`", "",
                 "| group | role | name | median | p20 | p80 | throughput | peak memory | vs reference |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in rows:
            refs = [r for r in rows if r["group"] == row["group"] and r["role"] == "reference"]
            row["ratio_vs_reference"] = {r["name"]: row["throughput"] / r["throughput"] for r in refs} \
                if row["role"] == "ours" else {}
            ratios = list(row["ratio_vs_reference"].items())
            if len(ratios) == 1:
                ratio = f"{ratios[0][1]:,.0f}x" if ratios[0][1] >= 10 else f"{ratios[0][1]:.2f}x"
            else:
                ratio = "; ".join(f"{v:.2f}x vs {k}" for k, v in ratios)
            mem = f"{row['peak_mib']:,.0f} MiB" if "peak_mib" in row else ""
            lines.append(f"| {row['group']} | {row['role']} | {row['name']} | {row['median_s'] * 1e3:.3f} ms | "
                         f"{row['p20_s'] * 1e3:.3f} ms | {row['p80_s'] * 1e3:.3f} ms | "
                         f"{row['throughput']:,.0f} {row['unit']} | {mem} | {ratio} |")
        lines += [""] + [f"- {n}" for n in _NOTES.get(suite, [])] if _NOTES.get(suite) else []
        text = "\n".join(lines) + "\n"
        stem = RESULTS / f"{suite}-{meta['device']}"
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        terminalreporter.write_line("")
        for line in lines[8:]:
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"written: {stem}.md / .json")
