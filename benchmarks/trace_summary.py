#!/usr/bin/env python3
"""Per-pass figures of a ``--trace`` file (runtime/ipc/trace.py), to see what a decode step waits for.

    python benchmarks/trace_summary.py run.trace.json            # every pass
    python benchmarks/trace_summary.py run.trace.json --last 4   # the last 4 passes (decode steps)

One line per weight pass (prefill chunk or decode step): its wall time on the compute stream (from its
"embed" span to the end of its last span), the time the H2D copy stream was busy inside it and its share of the wall
time, the bytes copied, and the compute stream's time in attention groups, FFN groups and the rest (a
group's compute span runs from the compute stream reaching it, after the wait for its copy, to the next
group's: with --host-attention an attention group's span holds the CPU's attention). A copy stream idle
while the compute stream is busy means the copies wait for buffers the compute has not freed. Runs on its
own; reads only the trace file.
"""

from __future__ import annotations

import argparse
import bisect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from render_trace import kind, load  # noqa: E402


def busy_ms(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of ``spans`` (start, end; sorted) in microseconds clipped to [lo, hi), in ms."""
    total, cur_end = 0.0, lo
    for s, e in spans:
        s, e = max(s, cur_end), min(e, hi)
        if e > s:
            total += e - s
            cur_end = e
    return total / 1e3


def summarize(path: str) -> list[dict]:
    rows, spans = load(path)
    label = {(p, t): name for p, t, name in rows}
    compute = [e for e in spans if label[(e["pid"], e["tid"])].endswith("/ compute")]
    copies = sorted((e for e in spans if e.get("cat") == "copy"), key=lambda e: e["ts"])
    starts = [e["ts"] for e in copies]
    compute.sort(key=lambda e: e["ts"])
    passes: list[list[dict]] = []
    for e in compute:
        if e["name"] == "embed" or not passes:
            passes.append([])
        passes[-1].append(e)
    cspans = [(e["ts"], e["ts"] + e["dur"]) for e in copies]
    longest = max((e - s for s, e in cspans), default=0.0)
    out = []
    for i, p in enumerate(passes):
        lo, hi = p[0]["ts"], p[-1]["ts"] + p[-1]["dur"]
        kinds = {"attention": 0.0, "FFN": 0.0, "other": 0.0}
        for e in p:
            k = kind(e)
            kinds[k if k in kinds else "other"] += e["dur"] / 1e3  # a wait on the compute stream: other
        a, b = bisect.bisect_left(starts, lo), bisect.bisect_left(starts, hi)  # the copies starting in the pass
        nbytes = sum(e["args"].get("bytes", 0) for e in copies[a:b])
        wall = (hi - lo) / 1e3
        busy = busy_ms(cspans[bisect.bisect_left(starts, lo - longest):b], lo, hi)  # and those reaching into it
        out.append({"pass": i, "wall_ms": wall, "copy_busy_ms": busy, "copy_busy_frac": busy / wall if wall else 0,
                    "copied_GB": nbytes / 1e9, "attention_ms": kinds["attention"], "ffn_ms": kinds["FFN"],
                    "other_ms": kinds["other"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", help="a --trace file")
    ap.add_argument("--last", type=int, help="only the last N passes")
    a = ap.parse_args(argv)
    rows = summarize(a.trace)
    if a.last:
        rows = rows[-a.last:]
    print("| pass | wall ms | copy busy ms (share) | copied GB | attention ms | FFN ms | other ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pass']} | {r['wall_ms']:.1f} | {r['copy_busy_ms']:.1f} ({r['copy_busy_frac']:.0%}) | "
              f"{r['copied_GB']:.2f} | {r['attention_ms']:.1f} | {r['ffn_ms']:.1f} | {r['other_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
