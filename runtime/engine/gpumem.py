"""What holds the GPU's memory when a run runs out of it.

A plan fills the GPU budget to within tens of MB (runtime/engine/placement.py), so an out-of-memory error means an
estimate was wrong: the weights, staging buffers and KV cache are the plan's, activations are
``runtime.engine.batching.activation_bytes``'s guess. ``oom_report`` lists the live allocations by size, and with
``LLMS_CUDA_MEMORY_HISTORY`` set (runtime/env.py) by the line of this project's code that made them.
"""

from __future__ import annotations

import os
from collections import defaultdict

OURS = ("/runtime/", "/model/", "/workers/", "/benchmarks/", "launch.py")


def start_history() -> bool:
    """Record the Python stack of every CUDA allocation from now on (PyTorch's memory history) when
    ``LLMS_CUDA_MEMORY_HISTORY`` is set; costs a little time per allocation. True when recording."""
    from runtime.env import cuda_memory_history

    if not cuda_memory_history():
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=100_000)
    return True


def _where(frames: list[dict]) -> str:
    """The innermost frame in this project's code (else the innermost frame), as file:line function."""
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in OURS):
            return f"{os.path.basename(name)}:{f.get('line')} {f.get('name')}"
    if frames:
        f = frames[0]
        return f"{os.path.basename(f.get('filename', '?'))}:{f.get('line')} {f.get('name')}"
    return "?"


def live_allocations(snapshot: list[dict]) -> list[tuple[str, int, int]]:
    """(where or size class, bytes, count) of the allocated blocks of a ``torch.cuda.memory_snapshot()``,
    largest first. Without recorded stacks a block is classed by its size alone."""
    agg: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for seg in snapshot:
        for blk in seg.get("blocks", []):
            if blk.get("state") != "active_allocated":
                continue
            size = int(blk.get("requested_size") or blk.get("size", 0))
            frames = blk.get("frames") or []
            key = _where(frames) if frames else f"blocks of {size / 2**20:.1f} MiB"
            agg[key][0] += size
            agg[key][1] += 1
    return sorted(((k, b, n) for k, (b, n) in agg.items()), key=lambda r: -r[1])


def oom_report(top: int = 12) -> str:
    """Allocated and reserved bytes, and the largest live allocations (by code line with memory history,
    else by size). Empty when CUDA is not in use."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return ""
    dev = torch.cuda.current_device()
    lines = [f"GPU memory: {torch.cuda.memory_allocated(dev) / 2**30:.2f} GiB allocated, "
             f"{torch.cuda.memory_reserved(dev) / 2**30:.2f} GiB reserved by PyTorch, peak allocated "
             f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB; the largest live allocations:"]
    rows = live_allocations(torch.cuda.memory_snapshot())
    for where, nbytes, count in rows[:top]:
        lines.append(f"  {nbytes / 2**20:10.1f} MiB  {count:5d} x  {where}")
    if len(rows) > top:
        rest = rows[top:]
        lines.append(f"  {sum(r[1] for r in rest) / 2**20:10.1f} MiB  in {sum(r[2] for r in rest)} more")
    from runtime.env import cuda_memory_history

    if not cuda_memory_history():
        lines.append("  (set LLMS_CUDA_MEMORY_HISTORY=1 to see which lines of code made them)")
    return "\n".join(lines)
