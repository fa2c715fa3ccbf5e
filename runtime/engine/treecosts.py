"""The pass costs a speculative run chooses its tree size from (engine/speculative.py ``TreeSize``): what
``launch.py probe --draft`` measured for an image on a device under a budget, a target pass's time by the
tokens it verifies and the draft's time to build a tree of each size, kept in the cache (one JSON file per
image, ``costs_file``; an entry per device, H2D bytes a pass and draft) so that later runs find them."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.env import cache_dir
from runtime.format.image import Image


def pow2_sizes(limit: int) -> list[int]:
    """2, 4, 8, ... up to ``limit``, and ``limit`` itself: the sizes the choice compares."""
    out, m = [], 2
    while m < limit:
        out.append(m)
        m *= 2
    return out + [limit] if limit >= 2 else out


def interpolate(table: dict[int, float], n: int) -> float:
    """A pass's time at ``n`` tokens from a table of measured sizes: linear between the two around it, the
    nearest end outside them."""
    xs = sorted(table)
    if n <= xs[0]:
        return table[xs[0]]
    if n >= xs[-1]:
        return table[xs[-1]]
    hi = next(x for x in xs if x >= n)
    lo = max(x for x in xs if x <= n)
    return table[lo] if hi == lo else table[lo] + (table[hi] - table[lo]) * (n - lo) / (hi - lo)


@dataclass(frozen=True)
class PassCosts:
    """What ``launch.py probe --draft`` measured for an image under its budget on one device: a target pass's
    milliseconds by the tokens it verifies, and the draft's milliseconds to build a tree of each size
    (runtime/measure/probe.py; kept in the cache, ``costs_file``)."""

    pass_ms: dict[int, float]
    draft_ms: dict[int, float]
    source: str = ""

    def start(self, limit: int, tolerance: float = 1.10) -> int:
        """Where the choice starts before any acceptance is seen: the largest size whose draft and pass
        together cost at most ``tolerance`` times a plain pass (so a tree that is never accepted loses at most
        that), at least 2."""
        one = interpolate(self.pass_ms, 1)
        fits = [m for m in pow2_sizes(limit)
                if interpolate(self.pass_ms, m) + interpolate(self.draft_ms, m) <= tolerance * one]
        return max(fits, default=2)


def costs_file(target: Image) -> Path:
    """Where ``launch.py probe --draft`` keeps its pass costs for ``target`` (one file per image, an entry per
    device, GPU budget and draft)."""
    return cache_dir() / "spec-costs" / f"{target.uuid}.json"


def device_key(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def draft_key(draft: str) -> str:
    return "ngram" if draft == "ngram" else Image.open(draft).uuid


def save_costs(target: Image, device: torch.device, h2d_bytes: int, draft: str, costs: PassCosts) -> Path:
    """Add (or replace) the entry of this device, H2D bytes a pass and draft; written atomically."""
    path = costs_file(target)
    entries = [e for e in _entries(path) if (e["device"], e["h2d_bytes"], e["draft"])
               != (device_key(device), h2d_bytes, draft_key(draft))]
    entries.append({"device": device_key(device), "h2d_bytes": h2d_bytes, "draft": draft_key(draft),
                    "pass_ms": costs.pass_ms, "draft_ms": costs.draft_ms, "measured": time.time()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"image": str(target.path), "entries": entries}, indent=1))
    os.replace(tmp, path)
    return path


def load_costs(target: Image, device: torch.device, h2d_bytes: int, draft: str) -> PassCosts | None:
    """The probe's costs for this image, device and draft whose pass moves the same bytes over the link (within
    10%: the budget placed the same groups), or None."""
    path, key = costs_file(target), (device_key(device), draft_key(draft))
    for e in reversed(_entries(path)):
        if (e["device"], e["draft"]) == key and abs(e["h2d_bytes"] - h2d_bytes) <= 0.1 * max(h2d_bytes, 1):
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["measured"]))
            return PassCosts({int(k): v for k, v in e["pass_ms"].items()},
                             {int(k): v for k, v in e["draft_ms"].items()}, f"{path}, {when}")
    return None


def _entries(path: Path) -> list[dict]:
    try:
        return list(json.loads(path.read_text())["entries"])
    except (OSError, ValueError, KeyError, TypeError):
        return []  # none yet, or unreadable: the probe writes it again
