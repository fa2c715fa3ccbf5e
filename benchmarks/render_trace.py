#!/usr/bin/env python3
"""Draw a ``--trace`` file (runtime/ipc/trace.py) as a Gantt chart PNG, for docs/BENCHMARKS.md.

    python benchmarks/render_trace.py run.trace.json run.png                   # the whole run
    python benchmarks/render_trace.py run.trace.json decode.png --window-ms 2800 2900

One row per process track, in the trace's order (each I/O worker's disk reads, the coordinator, the client's
H2D copy stream, compute and slot waits); each span a bar colored by its group's kind (attention, FFN,
other), slot waits in red, the crc32 check as a dark strip inside its read. The title gives the time span
shown. Needs matplotlib (``pip install matplotlib``, or the ``plot`` extra); without it the script says so
and exits 0 without writing anything. Runs on its own; reads only the trace file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLORS = {"attention": "#4C72B0", "FFN": "#DD8452", "other": "#8C8C8C", "wait": "#C44E52", "crc": "#222222"}


def kind(event: dict) -> str:
    if event.get("cat") in ("wait", "crc"):
        return event["cat"]
    name = event["name"]
    return "attention" if name.endswith(".attention") else "FFN" if name.endswith(".feed_forward") else "other"


def load(path: str) -> tuple[list[tuple[int, int, str]], list[dict]]:
    """(rows as (pid, tid, label) in display order, "X" events) of a trace file."""
    try:
        doc = json.loads(Path(path).read_text())
        events = doc["traceEvents"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path}: not a Chrome trace-event JSON ({e})") from None
    names, order = {}, {}  # (pid, tid or None) -> name / sort index
    for e in events:
        if e.get("ph") == "M" and e["name"] in ("process_name", "thread_name"):
            names[(e["pid"], e.get("tid"))] = e["args"]["name"]
        elif e.get("ph") == "M" and e["name"] in ("process_sort_index", "thread_sort_index"):
            order[(e["pid"], e.get("tid"))] = e["args"]["sort_index"]
    spans = [e for e in events if e.get("ph") == "X"]
    used = {(e["pid"], e["tid"]) for e in spans}
    rows = sorted(used, key=lambda k: (order.get((k[0], None), 0), k[0], order.get(k, k[1]), k[1]))
    return [(p, t, f"{names.get((p, None), p)} / {names.get((p, t), t)}") for p, t in rows], spans


def render(path: str, out: str, window: tuple[float, float] | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows, spans = load(path)
    if not spans:
        raise SystemExit(f"error: {path}: the trace holds no spans")
    t_lo = min(e["ts"] for e in spans) / 1e3
    t_hi = max(e["ts"] + e["dur"] for e in spans) / 1e3
    lo, hi = window if window else (t_lo, t_hi)
    index = {(p, t): i for i, (p, t, _) in enumerate(rows)}
    bars: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for e in spans:
        start, dur = e["ts"] / 1e3, e["dur"] / 1e3
        if start + dur >= lo and start <= hi:
            bars.setdefault((index[(e["pid"], e["tid"])], kind(e)), []).append((start, max(dur, 1e-4)))
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.38 * len(rows)))
    for (row, k), xs in bars.items():
        y, h = (row - 0.12, 0.24) if k == "crc" else (row - 0.4, 0.8)
        ax.broken_barh(xs, (y, h), facecolors=COLORS[k], linewidth=0)
    ax.set_yticks(range(len(rows)), [label for _, _, label in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("ms since the trace's origin (pool start)")
    ax.grid(axis="x", alpha=0.3)
    shown = f"{lo:.1f} to {hi:.1f} ms ({hi - lo:.1f} ms)" + (f" of {t_lo:.1f} to {t_hi:.1f} ms" if window else "")
    ax.set_title(f"{Path(path).name}: {shown}")
    ax.legend(handles=[Patch(color=COLORS[k], label=k if k != "crc" else "crc32 check") for k in COLORS],
              loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / max(len(rows), 1)), ncol=len(COLORS),
              frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return shown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="a --trace file (Chrome trace-event JSON)")
    p.add_argument("out", help="PNG to write")
    p.add_argument("--window-ms", nargs=2, type=float, metavar=("A", "B"),
                   help="draw only this time window, in ms since the trace's origin")
    a = p.parse_args(argv)
    if a.window_ms and not a.window_ms[0] < a.window_ms[1]:
        p.error(f"--window-ms {a.window_ms[0]} {a.window_ms[1]}: A must be below B")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("render_trace: matplotlib is not installed (pip install matplotlib); no PNG written", file=sys.stderr)
        return 0
    shown = render(a.trace, a.out, tuple(a.window_ms) if a.window_ms else None)
    print(f"wrote {a.out}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
