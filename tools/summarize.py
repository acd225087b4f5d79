"""Print one line per experiment run directory: the curve and every evaluation the bars read.

    python tools/summarize.py runs/e47-td-only runs/e48-...   # any number of run directories
"""
import json
import sys
from pathlib import Path

import numpy as np


def curve(ev: dict) -> str:
    s = np.asarray(ev["success_rate"])
    return f"{s[:2].mean():.2f} / {s[10:20].mean():.2f} / {s[20:30].mean():.2f}"


def line(run: Path) -> str:
    parts = [run.name]
    main = run / "eval.json"
    if main.is_file():
        parts.append("paper " + curve(json.loads(main.read_text())))
    g = run / "eval-in-distribution-greedy" / "eval.json"
    if g.is_file():
        parts.append("greedy " + curve(json.loads(g.read_text())))
    o = run / "eval-ood" / "eval.json"
    if o.is_file():
        parts.append("ood " + curve(json.loads(o.read_text())))
    ns = run / "eval-non-stationary-greedy" / "eval.json"
    if ns.is_file():
        rec = json.loads(ns.read_text()).get("recovery", {})
        parts.append(f"non-stat greedy recover {rec.get('episodes_to_recover')} (pre {rec.get('pre_switch', 0):.2f})")
    st = run / "eval-stitching" / "eval.json"
    if st.is_file():
        ev = json.loads(st.read_text())
        st = ev.get("stitching", {})
        parts.append(f"stitching {st.get('successes')}/{st.get('trials')} ({sum(st.get('stitched', []))} stitched)")
    m = run / "metrics.jsonl"
    if m.is_file():
        recs = [json.loads(x) for x in m.read_text().splitlines() if x.strip()]
        recs = [r for r in recs if "perf/tokens_per_s" in r]
        if recs:
            tok = [0] + [r["perf/tokens"] for r in recs]
            seconds = sum((b - a) / r["perf/tokens_per_s"] for a, b, r in zip(tok, tok[1:], recs))
            parts.append(f"{tok[-1] / 1e6:.1f} M tok, {seconds / 60:.1f} train min, "
                         f"{np.median([r['perf/tokens_per_s'] for r in recs]):,.0f} tok/s")
    return " | ".join(parts)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(line(Path(arg)))
