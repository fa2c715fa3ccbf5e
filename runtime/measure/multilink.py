"""Host -> GPU links of several GPUs: each alone, and all at once (issue 21, tensor parallelism).

GPUs behind one PCIe switch, or one socket's root complex, share its uplink: N links measured one at a time
add up to more than they carry together. A tensor-parallel step moves every rank's shards at once, so its
bound is the pass's bytes over the *aggregate* measured here, never over N times one link:

    step >= max over ranks (rank bytes) / (aggregate / N)   (equal shards: total bytes / aggregate)

``measure_links(devices, nbytes)``: per device, pinned host -> device copies of ``nbytes`` alone; then one
thread per device copying at the same time on its own stream, started together (a barrier), the aggregate the
total bytes over the wall time of the slowest. ``tp_bound_ms`` is the bound from it. CUDA only; runs in the
probe's process (launch.py probe --devices) and benchmarks/tp_decode.py. Not yet run on a machine with
several GPUs (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

REPEATS = 5


def _buffers(device: str, nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    return host, torch.empty(nbytes, dtype=torch.uint8, device=device)


def _copy_s(host: torch.Tensor, dev: torch.Tensor, stream: torch.cuda.Stream) -> float:
    with torch.cuda.stream(stream):
        t0 = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        stream.synchronize()
    return time.perf_counter() - t0


def measure_links(devices: list[str], nbytes: int = 1 << 30, repeats: int = REPEATS) -> dict[str, Any]:
    """{"each": {device: GB/s alone (best of ``repeats``)}, "aggregate_gbps": all at once (best), "sum_gbps",
    "shared": aggregate / sum (1.0: independent links)}."""
    bufs = {d: _buffers(d, nbytes) for d in devices}
    streams = {d: torch.cuda.Stream(torch.device(d)) for d in devices}
    each = {}
    for d in devices:
        _copy_s(*bufs[d], streams[d])  # first touch, driver paths warmed
        each[d] = max(nbytes / _copy_s(*bufs[d], streams[d]) / 1e9 for _ in range(repeats))
    best = 0.0

    def run(d: str, barrier: threading.Barrier) -> None:
        torch.cuda.set_device(torch.device(d))
        barrier.wait()
        _copy_s(*bufs[d], streams[d])

    for _ in range(repeats):
        barrier = threading.Barrier(len(devices) + 1)
        threads = [threading.Thread(target=run, args=(d, barrier)) for d in devices]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        barrier.wait()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        best = max(best, len(devices) * nbytes / wall / 1e9)
    total = sum(each.values())
    return {"bytes": nbytes, "each": each, "aggregate_gbps": best, "sum_gbps": total,
            "shared": best / total if total else None, "method": "pinned, one thread and stream per device"}


def tp_bound_ms(rank_bytes: list[int], aggregate_gbps: float) -> float:
    """A tensor-parallel pass's link bound: the ranks' bytes move at once over links that together carry
    ``aggregate_gbps``; equal shares of it, so the largest rank sets the time."""
    n = len(rank_bytes)
    return max(rank_bytes) / (aggregate_gbps / n * 1e9) * 1e3
