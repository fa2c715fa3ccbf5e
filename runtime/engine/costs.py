"""``--cpu-compute auto``'s cost table, measured where the run starts (issue 28, the split).

The planner (runtime/engine/placement.py ``with_cpu_set``) chooses how many DRAM-tier groups the CPU computes
in place from two rates: the host -> GPU link's, and the rate at which the CPU's kernels stream a group's weights
at one row. Both are measured here, in the process that will run the passes, before anything is loaded:

- the link: a pinned host buffer copied to the GPU (``LINK_MB``), the best of a few copies;
- the CPU: for each format the candidate groups store (model/cpu_kernels.py's kernels for the quantized ones,
  as ``hold`` tiles them; ``F.linear`` for plain ones), one row of float32 x times random matrices of that format
  and of the groups' column count, rotated through ``POOL_MB`` so that the weights come from DRAM, not the
  caches; with the threads this process computes with (runtime/engine/threads.py).

A group's CPU time is then the sum over its matrices of their stored bytes over their format's rate (``cpu_s``).
Pure measurement: no file, no process, no state outside the returned table; about a second on a 16-core host.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from model.quant import random_quantized

LINK_MB = 256  # one pinned buffer copied to the GPU
POOL_MB = 256  # a format's random matrices together: more than a CPU's last-level cache
ROWS = 2048  # rows of each random matrix (its columns: the groups' own)
REPS = 3  # rounds over the pool; the best is kept


@dataclass(frozen=True)
class MeasuredCosts:
    """placement.CostTable from measured rates: the link's GB/s and, per stored format, the GB/s of its bytes the
    CPU multiplies one row at; ``groups`` gives each candidate group's bytes by format."""

    link_gbps: float
    cpu_gbps: Mapping[str, float]
    groups: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def link_s(self, nbytes: int) -> float:
        return nbytes / (self.link_gbps * 1e9)

    def cpu_s(self, group: str, nbytes: int) -> float:
        parts = self.groups.get(group) or {}
        if not parts:
            raise KeyError(f"group {group!r} was not measured")
        return sum(b / (self.cpu_gbps[fmt] * 1e9) for fmt, b in parts.items())

    def describe(self) -> str:
        cpu = ", ".join(f"{fmt} {r:.1f}" for fmt, r in sorted(self.cpu_gbps.items()))
        return f"measured: link {self.link_gbps:.1f} GB/s; CPU at one row, GB/s of stored bytes: {cpu}"


def link_gbps(device: torch.device, mb: int = LINK_MB, reps: int = 5) -> float:
    """GB/s of a pinned host buffer of ``mb`` MiB copied to ``device``, the best of ``reps`` copies."""
    host = torch.empty(mb << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device=device)
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    del host, dev
    return (mb << 20) / best / 1e9


def _matrix(fmt: str, group: int | None, k: int, gen: torch.Generator, kernels):
    """A random (ROWS, k) matrix of ``fmt`` as a split's CPU set holds it (model/cpu_kernels.py ``hold``: read in
    place where the C kernels can, else tiled), and its stored bytes."""
    from model.cpu_kernels import hold
    from runtime.format.image import TORCH_DTYPES

    if fmt in TORCH_DTYPES:
        w = (torch.randn(ROWS, k, generator=gen) * 0.02).to(TORCH_DTYPES[fmt])
        return w, w.numel() * w.element_size()
    qw = random_quantized(fmt, (ROWS, k), group, gen)
    return hold({"w": qw}, torch.float32, kernels, in_place=True)["w"], qw.raw.numel()


def _linear(w, x: torch.Tensor) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return torch.nn.functional.linear(x.to(w.dtype), w)
    return w.linear(x)


def cpu_gbps(fmt: str, group: int | None, k: int, kernels, pool_mb: int = POOL_MB, reps: int = REPS) -> float:
    """GB/s of stored bytes at which this process's CPU multiplies one float32 row by (ROWS, k) matrices of
    ``fmt`` (int8/int4: values per scale ``group``), held as a run holds them (``kernels``: runtime.env
    cpu_kernels())."""
    gen = torch.Generator().manual_seed(0)
    first, nbytes = _matrix(fmt, group, k, gen, kernels)
    pool = [first] + [_matrix(fmt, group, k, gen, kernels)[0] for _ in range(max(0, (pool_mb << 20) // nbytes - 1))]
    x = torch.randn(1, k, generator=gen)
    _linear(first, x)  # a first call: any lazy set-up out of the timing
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for w in pool:
            _linear(w, x)
        best = min(best, time.perf_counter() - t)
    return nbytes * len(pool) / best / 1e9


def group_formats(tensors: Iterable) -> dict[tuple[str, int | None, int], int]:
    """A group's matrices (runtime.format.image.TensorSpec) by (format, group size, columns) -> stored bytes;
    vectors (norms) are left out: their bytes are nothing beside the matrices'."""
    out: dict[tuple[str, int | None, int], int] = {}
    for t in tensors:
        if len(t.shape) == 2:
            key = (t.dtype, t.group, t.shape[1])
            out[key] = out.get(key, 0) + t.nbytes
    return out


_MEASURED: dict = {}  # (device, kernels, the groups' matrices) -> the table: a run plans more than once (KV on/off)


def measure(groups: Mapping[str, Iterable], device: torch.device, kernels, progress=None) -> MeasuredCosts:
    """The cost table of ``groups`` (name -> its TensorSpecs), the candidates of the CPU compute set, on this
    machine: the link to ``device`` and each (format, group size, columns) the groups store; measured once a
    process for the same groups."""
    key = (str(device), kernels, tuple((g, tuple(ts)) for g, ts in groups.items()))
    if key not in _MEASURED:
        _MEASURED[key] = _measure(groups, device, kernels, progress)
    return _MEASURED[key]


def _measure(groups: Mapping[str, Iterable], device: torch.device, kernels, progress=None) -> MeasuredCosts:
    link = link_gbps(device)
    shapes: dict[str, dict[tuple[str, int | None, int], int]] = {g: group_formats(ts) for g, ts in groups.items()}
    keys = sorted({key for parts in shapes.values() for key in parts}, key=str)
    rates = {}
    for fmt, size, k in keys:
        if progress:
            progress(f"cpu-compute auto: timing the CPU kernels: {fmt} x {k} columns")
        rates[f"{fmt}/{size or ''}/{k}"] = cpu_gbps(fmt, size, k, kernels)
    return MeasuredCosts(link, rates, {g: {f"{f}/{s or ''}/{k}": b for (f, s, k), b in parts.items()}
                                       for g, parts in shapes.items()})


__all__ = ["MeasuredCosts", "cpu_gbps", "group_formats", "link_gbps", "measure"]
