"""The per-layer expert-usage heatmap of a mixture (issue 29 item 5): ``bench --out-json FILE`` counts, per layer and
expert, the tokens its measured round routed to the expert (runtime/measure/routing.py ``RoutingCounter`` around
the generator's weight source: prefill and decode passes), keeps them in the report (``expert_usage.counts``) and
draws them beside FILE as FILE's stem + ``.experts.png``: layers down, experts across, one cell a count. A hot
column is an expert worth its place in a faster tier (``probe --experts`` measures the same on text, for the plan).

Needs matplotlib (``pip install matplotlib``, or the ``plot`` extra); without it one line says so and nothing is
drawn: the bench does not fail. Torch-free.
"""

from __future__ import annotations

import sys
from pathlib import Path


def heatmap_path(out_json: str) -> str:
    """Where the PNG of a report written to ``out_json`` goes: beside it, ``STEM.experts.png``."""
    p = Path(out_json)
    return str(p.with_name(f"{p.stem}.experts.png"))


def expert_heatmap(counts: list[list[int]], out: str, title: str) -> str | None:
    """Draw ``counts`` (per layer, per expert) to the PNG ``out``; its path, or None (and one printed line) where
    matplotlib cannot be imported."""
    try:
        import matplotlib
    except ImportError:
        print(f"expert heatmap: matplotlib is not installed (pip install matplotlib, or the plot extra); {out} not "
              f"written", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, experts = len(counts), len(counts[0]) if counts else 0
    fig, ax = plt.subplots(figsize=(min(24, 3 + 0.12 * experts), min(24, 2 + 0.12 * layers)))
    try:
        im = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_xlabel(f"expert (of {experts})")
        ax.set_ylabel(f"layer (of {layers})")
        ax.set_title(title)
        fig.colorbar(im, ax=ax, label="tokens routed")
        fig.tight_layout()
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out
