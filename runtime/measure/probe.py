"""The probe command: the per-layer timing study the project started from, automated and correct.

    python launch.py probe --image model.img --out-json probe.json
    python launch.py probe --image /dev/nvme0n1p4 --manifest m.json --gpu-mem-gb 24 --dram-gb 64
    python launch.py probe --shape llama3.1-70b        # no image: preset shapes, the disk read from a temp file

The model's sizes come from its ModelArgs (the image's manifest, or the preset of --shape, default
llama3.1-8b, in --dtype, default bf16), FFN hidden size included: a 70B layer is 1.711 GB in bf16, not the
0.844 GB of the study it replaces (docs/DESIGN.md, the bench tool's interface).

What it measures, in order (each one section of the printout and of the JSON):

1. links  host -> GPU copies of --probe-gb (CUDA only: on the CPU the section is skipped and says why):
          from torch's pinned memory; from a fresh POSIX shm segment registered with cudaHostRegister, as the
          runtime's ring is (allocation + first touch, and cudaHostRegister, timed too: docs/DESIGN.md lists
          2.5 s for both on 4 GiB); from pageable memory, for comparison. CUDA events, the median of
          H2D_REPEATS after one warm-up copy. The analysis uses the registered-shm figure.
2. disk   O_DIRECT reads of the image (file or block device), or of a temp file of --probe-gb (in $TMPDIR,
          deleted at the end) when there is no image: for every (reader processes N, read size R) of
          --workers-list x --read-mb-list, N spawned processes each with a ``DirectReader`` (R-byte reads, as
          many in flight as an I/O worker keeps) read --probe-gb between them (at most the file; a cell whose
          readers need more than the file is skipped and says so). Each measurement starts where the previous
          one of its read size ended, so no offset is read twice while the file allows, and never twice within
          one measurement (O_DIRECT bypasses the page cache anyway; where the filesystem refuses O_DIRECT the
          readers fall back to buffered reads with posix_fadvise(DONTNEED) before and after, and the table says
          so). Processes start and open the file before the clock starts; GB/s = bytes / (last reader's end -
          first reader's start), CLOCK_MONOTONIC (system-wide).
3. compute one attention group, one FFN group and the head (final norm + output matrix on the last position)
          with random weights (never zeros) in the model's shapes and dtype, on the device: a prefill of
          --prefill-tokens (default 2048 on CUDA, 128 on the CPU so that it ends in seconds) and a decode of one
          token after --decode-context cached tokens. CUDA events or perf_counter; the median of up to
          COMPUTE_REPEATS runs after warm-up (fewer, at least 3, when they take more than COMPUTE_BUDGET_S).
4. analysis per phase: per layer the bytes of each group, the time to copy it (registered-shm H2D), to read it
          (best disk cell) and to compute it; which hides which (compute >= copy? compute >= read?); the serial
          and pipelined layer time; and the pass bound max(H2D, disk, compute) (docs/DESIGN.md, the cost model) for each
          tier choice: every group resident on the compute device (the GPU; on the CPU the client's memory),
          every group in DRAM, every group streamed, and the plan.
5. recommendation: the prefetch distances, per phase, then one setting for both:

          c      = compute time per group ahead = the mean over one layer's groups (attention, FFN)
          t_read = latency of one group read = largest layer group / one reader's bandwidth (each I/O worker
                   reads its own group, so one read runs at a reader's share of the disk, measured with the
                   fewest readers)
          t_copy = largest layer group / H2D bandwidth
          W      = clamp(ceil(t_read / c), 2, streamed groups)   window slots: a read must start W groups
                   ahead of its group's use to be done when the compute gets there
          K      = clamp(ceil(t_copy / c), 1, 8)                 GPU staging buffers: a copy must start K
                   groups ahead of its group's compute to be done in time

          Where no setting can hide a link (disk-bound: streaming every group, the disk term exceeds the
          pass's compute and H2D; copy-bound: the H2D term exceeds the compute), a larger distance buys
          nothing but memory: W = readers of the best disk cell + 1 keeps every reader busy, K = 2 keeps the
          copy engine busy. The setting for both phases is the larger of the two phases' (so bounded) values.
6. plan   with --gpu-mem-gb and/or --dram-gb: the tier plan (runtime/engine/placement.py) with the recommended W
          and K, its description, and its pass bound in the analysis. A budget that cannot hold the plan is
          reported after everything else is printed and written (exit code 2).

Runs in the launch.py process. Owns: the temp file, the shm segment ``/llms.<uid>.probe<pid>.h2d`` and the
reader processes, each released in a ``finally`` (readers are stopped, then terminated, then killed). The
reader processes import this module: it imports torch (and modules that do) only inside functions, so that
they start in a fraction of a second. Tests: ``python -m pytest -q tests/test_probe.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.arch import HEAD, architecture
from model.args import PRESETS, ModelArgs, human_bytes, preset
from model.errors import ConfigError, UserError
from model.groups import (
    group_kind,
    group_layer,
    group_prefix,
    group_tensor_shapes,
    kinds_of_pass,
    layer_group,
    output_tensor,
)
from runtime.engine.batching import activation_bytes, default_dram_bytes, kv_cache_bytes
from runtime.engine.config import FlagConfig
from runtime.engine.placement import (
    HOST_GROUP,
    Budgets,
    layout_group_bytes,
    pass_sequence,
    plan_placement,
)
from runtime.format.image import Image, largest_quantized
from runtime.ipc.options import WorkerOptions
from runtime.measure.links import (
    device_name,
    fmt_gb,
    measure_h2d_pageable,
    measure_h2d_pinned,
    measure_h2d_registered,
    timed_reads,
)
from workers.odirect import DirectReader, aligned_buffer

if TYPE_CHECKING:
    import torch

GB, MiB = 1e9, 1 << 20
COMPUTE_WARMUP = {"cuda": 3, "cpu": 1}
COMPUTE_REPEATS = {"cuda": 20, "cpu": 10}
COMPUTE_MIN_REPEATS = 3
COMPUTE_BUDGET_S = 2.0  # per measurement: stop repeating (after COMPUTE_MIN_REPEATS) once this much time is spent
DEFAULT_PREFILL = {"cuda": 2048, "cpu": 128}
DEFAULT_SHAPE = "llama3.1-8b"
K_MAX = 8
MAX_TREE_TOKENS = 1024  # the largest pass --tree-tokens-list may time
READER_START_S = 60.0  # a reader process must be up and report ready within this
READER_MIN_GBPS = 0.005  # a measurement may take bytes / this (+ READER_START_S) before it is declared stuck
TEMP_BLOCK = 16 * MiB


# ---- configuration -----------------------------------------------------------------------------------------

def parse_int_list(flag: str, text: str, low: int = 1) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); anything else is a ConfigError naming the flag and the bad item."""
    items = [x.strip() for x in str(text).split(",")]
    out = []
    for x in items:
        try:
            v = int(x)
        except ValueError:
            v = None
        if v is None or v < low:
            raise ConfigError(f"{flag} {text!r}: expected comma-separated integers >= {low}, found {x!r}")
        out.append(v)
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class ProbeConfig(FlagConfig):
    """The probe's flags, checked (``--workers-list`` and ``--read-mb-list`` parsed: ``parse_int_list``)."""

    image: str | None = None
    manifest: str | None = None
    shape: str | None = None
    dtype: str | None = None
    device: str | None = None
    workers_list: tuple[int, ...] | str = "1,2,4,8"  # as on the command line; held parsed
    read_mb_list: tuple[int, ...] | str = "1,4,16,64"
    probe_gb: float = 1.0
    prefill_tokens: int | None = None
    decode_context: int = 256
    gpu_mem_gb: float | None = None
    dram_gb: float | None = None
    draft: str | None = None
    tree_tokens_list: tuple[int, ...] | str = "1,2,4,8,16,32,64,128,256,512,1024"
    out_json: str | None = None
    devices: str | None = None  # GPUs whose links are also measured alone and at once (runtime/measure/multilink.py)
    experts: str | None = None  # a text file: count a mixture's routings on it instead (runtime/measure/routing.py)
    experts_tokens: int = 8192  # at most this many of its tokens
    experts_window: int = 512  # in windows (fresh contexts) of this many tokens

    def __post_init__(self) -> None:
        if self.devices is not None and self.device == "cpu":
            raise ConfigError("--devices measures GPU links: it needs CUDA (leave out --device cpu)")
        for key in ("workers_list", "read_mb_list", "tree_tokens_list"):
            if isinstance(getattr(self, key), str):
                object.__setattr__(self, key, parse_int_list(f"--{key.replace('_', '-')}", getattr(self, key)))
        if self.image is None and self.manifest is not None:
            raise ConfigError("--manifest needs --image")
        if self.image is not None and (self.shape or self.dtype):
            raise ConfigError("--shape and --dtype apply only without --image (the image's model arguments and "
                              "dtype are used)")
        if self.shape is not None and self.shape not in PRESETS:
            raise ConfigError(f"--shape {self.shape!r}: choose one of {sorted(PRESETS)}")
        if not self.probe_gb > 0:
            raise ConfigError(f"--probe-gb must be positive, found {self.probe_gb}")
        if self.prefill_tokens is not None and self.prefill_tokens < 1:
            raise ConfigError(f"--prefill-tokens must be at least 1, found {self.prefill_tokens}")
        if self.decode_context < 0:
            raise ConfigError(f"--decode-context must be >= 0, found {self.decode_context}")
        for key in ("gpu_mem_gb", "dram_gb"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, found {v}")
        if self.experts is not None and self.image is None:
            raise ConfigError("--experts needs --image: the counts are kept beside an image")
        for key in ("experts_tokens", "experts_window"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, found {getattr(self, key)}")
        if self.draft is not None and self.image is None:
            raise ConfigError("--draft needs --image: the costs are kept for an image (and its draft)")
        if max(self.tree_tokens_list) > MAX_TREE_TOKENS:
            raise ConfigError(f"--tree-tokens-list {','.join(map(str, self.tree_tokens_list))}: at most "
                              f"{MAX_TREE_TOKENS} tokens a pass")

    @property
    def probe_bytes(self) -> int:
        return max(4096, int(self.probe_gb * GB) // 4096 * 4096)


@dataclass(frozen=True)
class ModelSpec:
    """What the probe needs of a model: arguments, stored dtype, group extent sizes, and where it is stored
    (``path`` None: nowhere, the disk is probed on a temp file). ``args`` and ``dtype`` make it usable by
    runtime/engine/source.py's ``kv_cache_bytes`` and ``activation_bytes``."""

    args: ModelArgs
    dtype: str
    group_bytes: Mapping[str, int]
    source: str
    path: str | None = None
    manifest: str | None = None
    region: int = 0  # bytes of ``path`` the disk probe may read (the image's size)
    formats: Mapping[str, tuple[str, int | None]] = field(default_factory=dict)  # quantized tensors, by key
    stored_as: str = ""  # the image's weight formats (Image.format_summary)

    def largest_quantized(self) -> int:  # as an Image's (activation_bytes reserves its dequantized rows)
        return largest_quantized(self.args, self.formats)


def model_spec(cfg: ProbeConfig) -> ModelSpec:
    if cfg.image is not None:
        image = Image.open(cfg.image, cfg.manifest)
        if architecture(image.args).routed:  # one group of each kind is not a layer's compute when k of n run
            raise ConfigError(f"probe: {image.path} is a {image.args.arch} mixture of experts, whose per-expert "
                              f"compute the probe does not measure yet (issue 29); --experts FILE measures its "
                              f"routing on a text")
        return ModelSpec(image.args, image.dtype, {n: g.size for n, g in image.groups.items()},
                         f"image {image.path}", str(image.path), str(image.manifest_path), image.image_size,
                         image.formats(), image.format_summary())
    shape, dtype = cfg.shape or DEFAULT_SHAPE, cfg.dtype or "bf16"
    args = preset(shape)
    if architecture(args).routed:
        raise ConfigError(f"probe: --shape {shape} is a {args.arch} mixture of experts, whose per-expert compute and "
                          f"routing the probe does not measure yet (issue 29)")
    return ModelSpec(args, dtype, layout_group_bytes(args, dtype), f"preset {shape} (no image)")


# ---- host -> GPU links -------------------------------------------------------------------------------------

def measure_links(device: torch.device, nbytes: int) -> dict[str, Any]:
    """All three H2D links on CUDA; on the CPU a record that says why nothing was measured."""
    import torch

    if device.type != "cuda":
        why = ("--device cpu" if torch.cuda.is_available() else "no CUDA device is available to this process")
        return {"skipped": True, "reason": f"the probe computes on the CPU ({why}): there is no host -> GPU link "
                                           f"to measure; the CPU reads ring memory in place",
                "used": None, "gbps": None}
    n = min(nbytes, torch.cuda.mem_get_info(device)[0] // 4) // 4096 * 4096
    dev = torch.empty(n, dtype=torch.uint8, device=device)
    try:
        out = {"pinned": measure_h2d_pinned(dev), "registered_shm": measure_h2d_registered(dev),
               "pageable": measure_h2d_pageable(dev)}
    finally:
        del dev
        torch.cuda.empty_cache()
    # The runtime copies from the registered ring: that is the link of the analysis.
    return {"skipped": False, **out, "used": "registered_shm", "gbps": out["registered_shm"]["gbps"]}


# ---- disk --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReadJob:
    """One reader process's share of one measurement (plain data: crosses a pipe to a spawned process)."""

    path: str
    offsets: tuple[int, ...]
    read_bytes: int
    inflight: int


def _run_job(conn, job: ReadJob, notes: list[str]) -> None:
    with DirectReader(job.path, max_inflight=job.inflight, chunk_bytes=job.read_bytes, log=notes.append) as r:
        if not r.direct:  # buffered fallback: make sure the page cache holds none of what we will read
            fd = os.open(job.path, os.O_RDONLY)
            try:
                for off in job.offsets:
                    os.posix_fadvise(fd, off, job.read_bytes, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        aligned_buffer(job.read_bytes * job.inflight, r.alignment)  # fault in the allocator path before the clock
        conn.send(("ready", r.direct, list(notes)))
        if conn.recv() != "go":
            return
        t0 = time.monotonic()
        timed_reads(r, job.offsets, job.read_bytes, job.inflight)
        t1 = time.monotonic()
    conn.send(("done", t0, t1, len(job.offsets) * job.read_bytes, r.direct))


def reader_main(index: int, conn) -> None:
    """Reader process entry point (spawn target): run jobs until told to stop or the parent is gone (its end
    of the pipe closed, or this process re-parented)."""
    parent = os.getppid()
    try:
        while True:
            if not conn.poll(1.0):
                if os.getppid() != parent:
                    return
                continue
            job = conn.recv()
            if job is None:
                return
            notes: list[str] = []
            try:
                _run_job(conn, job, notes)
            except (EOFError, BrokenPipeError):
                raise
            except UserError as e:
                conn.send(("error", "user", str(e)))
            except Exception:
                conn.send(("error", "bug", traceback.format_exc()))
    except (EOFError, BrokenPipeError):
        return  # the parent is gone


class ReaderPool:
    """N reader processes (spawn), started once and reused for every measurement; ``close`` is idempotent and
    escalates (stop message, terminate, kill)."""

    def __init__(self, n: int) -> None:
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        try:
            for i in range(n):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=reader_main, args=(i, child), name=f"llms-probe-reader-{i}", daemon=True)
                p.start()
                child.close()
                self.procs.append(p)
                self.conns.append(parent)
        except BaseException:
            self.close()
            raise

    def _recv(self, i: int, what: str, timeout_s: float):
        conn, proc = self.conns[i], self.procs[i]
        deadline = time.monotonic() + timeout_s
        while not conn.poll(0.2):
            if not proc.is_alive():
                raise UserError(f"disk probe: reader process {i} (pid {proc.pid}) died with exit code "
                                f"{proc.exitcode} while the probe waited for {what}")
            if time.monotonic() > deadline:
                raise UserError(f"disk probe: reader process {i} (pid {proc.pid}) did not report {what} within "
                                f"{timeout_s:.0f} s")
        msg = conn.recv()
        if msg[0] == "error":
            if msg[1] == "user":
                raise UserError(f"disk probe: reader process {i}: {msg[2]}")
            raise RuntimeError(f"disk probe: reader process {i} failed:\n{msg[2]}")
        return msg

    def run(self, jobs: Sequence[ReadJob]) -> dict[str, Any]:
        """Run one job per reader (readers 0..len(jobs)-1), all started together; returns the aggregate."""
        for i, job in enumerate(jobs):
            self.conns[i].send(job)
        ready = [self._recv(i, "ready (reader opened)", READER_START_S) for i in range(len(jobs))]
        for i in range(len(jobs)):
            self.conns[i].send("go")
        total = sum(len(j.offsets) * j.read_bytes for j in jobs)
        limit = READER_START_S + total / (READER_MIN_GBPS * GB)
        done = [self._recv(i, "the end of its reads", limit) for i in range(len(jobs))]
        seconds = max(d[2] for d in done) - min(d[1] for d in done)
        notes = sorted({n for r in ready for n in r[2]})
        return {"bytes": total, "seconds": seconds, "gbps": total / seconds / GB, "direct": all(r[1] for r in ready),
                "notes": notes}

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(5.0)
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_temp_file(nbytes: int) -> tuple[Path, float]:
    """A file of ``nbytes`` of random bytes (every 4 KiB page distinct) in $TMPDIR, flushed and dropped from
    the page cache; returns (path, seconds to write it). The caller deletes it."""
    fd, name = tempfile.mkstemp(prefix="llms-probe-", suffix=".bin")
    block = np.random.default_rng(0).integers(0, 256, TEMP_BLOCK, dtype=np.uint8)
    stamp = block.view(np.uint64)[::4096 // 8]  # one word per page: no two pages of the file are equal
    t0 = time.perf_counter()
    try:
        done = 0
        while done < nbytes:
            stamp[:] = np.arange(done // 4096, done // 4096 + len(stamp), dtype=np.uint64)
            n = min(TEMP_BLOCK, nbytes - done)
            done += os.write(fd, memoryview(block)[:n])
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    os.close(fd)
    return Path(name), time.perf_counter() - t0


def plan_cells(region: int, probe_bytes: int, workers_list: Sequence[int], read_list: Sequence[int]) -> list[dict]:
    """Every (workers, read bytes) measurement: its reads, as per-worker offset lists, or why it is skipped.

    The region is cut into read-sized slots; each measurement takes the next ``reads`` slots after the previous
    measurement's (wrapping at the end), so offsets repeat only once the whole region has been read."""
    cells, pos = [], {}
    for read in read_list:
        slots = region // read
        for n in workers_list:
            cell: dict[str, Any] = {"workers": n, "read_bytes": read, "read_mib": read / MiB}
            if slots < n:
                cell["skipped"] = (f"{_readers(n)} of {read // MiB} MiB reads need {_gb(n * read)}, more than the "
                                   f"{_gb(region)} probed")
                cells.append(cell)
                continue
            per = min(max(1, min(probe_bytes, region) // read // n), slots // n)  # no offset twice in one cell
            start = pos.get(read, 0)
            idx = [(start + k) % slots for k in range(per * n)]
            pos[read] = start + per * n
            cell.update(reads=per * n, first_offset=idx[0] * read, repeats_offsets=start + per * n > slots,
                        offsets=[[i * read for i in idx[w * per:(w + 1) * per]] for w in range(n)])
            cells.append(cell)
    return cells


def measure_disk(path: str, region: int, cfg: ProbeConfig, log: Callable[[str], None]) -> dict[str, Any]:
    """The (workers x read size) table of O_DIRECT read bandwidth over the first ``region`` bytes of ``path``."""
    inflight = WorkerOptions().inflight
    reads = [mb * MiB for mb in cfg.read_mb_list]
    cells = plan_cells(region // 4096 * 4096, cfg.probe_bytes, cfg.workers_list, reads)
    with ReaderPool(max(cfg.workers_list)) as pool:
        for k, cell in enumerate(cells):
            offsets = cell.pop("offsets", None)
            if offsets is None:
                continue
            log(f"probe: disk {k + 1}/{len(cells)}: {cell['workers']} reader(s) x {cell['read_mib']:g} MiB reads")
            cell.update(pool.run([ReadJob(path, tuple(o), cell["read_bytes"], inflight) for o in offsets]))
    measured = [c for c in cells if "gbps" in c]
    if not measured:
        raise ConfigError(f"--read-mb-list {','.join(map(str, cfg.read_mb_list))}: every read size exceeds the "
                          f"{human_bytes(region)} of {path} the disk probe may read")
    best = max(measured, key=lambda c: c["gbps"])
    fewest = min(c["workers"] for c in measured)
    per_reader = max(c["gbps"] for c in measured if c["workers"] == fewest) / fewest
    direct = all(c["direct"] for c in measured)
    return {"path": path, "region_bytes": region, "bytes_per_measurement": min(cfg.probe_bytes, region),
            "inflight_per_reader": inflight, "direct": direct, "table": cells,
            "best": {k: best[k] for k in ("workers", "read_bytes", "read_mib", "gbps")},
            "gbps": best["gbps"], "reader_gbps": per_reader, "reader_gbps_from_workers": fewest,
            "fallback": None if direct else sorted({n for c in measured for n in c["notes"]})}


# ---- compute -----------------------------------------------------------------------------------------------

def random_weights(args: ModelArgs, group: str, dtype: torch.dtype, device: torch.device,
                   gen: torch.Generator, formats: Mapping[str, tuple[str, int | None]] | None = None) -> dict:
    """Random weights of one group (matrices N(0, 0.02), norms 1 + N(0, 0.1)), in the group's shapes; the
    tensors ``formats`` names (state-dict keys) as random quantized values in their format."""
    import torch

    from model.quant import random_quantized  # torch: the reader processes import this module

    formats = formats or {}

    shapes = group_tensor_shapes(args, group)
    out_name, out_key = output_tensor(args)
    if group == HEAD:  # tied or not, the head computes with an output matrix (a tied model's is the embedding)
        shapes = group_tensor_shapes(dataclasses.replace(args, tie_embeddings=False), HEAD)
    out = {}
    for name, shape in shapes.items():
        key = out_key if group == HEAD and name == out_name else group_prefix(group) + name
        if key in formats:
            out[name] = random_quantized(*formats[key][:1], tuple(shape), formats[key][1], gen, device)
            continue
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if len(shape) == 1 else dtype)
        out[name] = (1 + 0.1 * t).to(dtype) if len(shape) == 1 else t.mul_(0.02)
    return out


def time_op(fn: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Median milliseconds of ``fn`` after warm-up: CUDA events on the GPU, perf_counter on the CPU."""
    import torch

    kind = device.type
    for _ in range(COMPUTE_WARMUP[kind]):
        fn()
    if kind == "cuda":
        torch.cuda.synchronize(device)
    samples: list[float] = []
    t_start = time.perf_counter()
    while len(samples) < COMPUTE_REPEATS[kind]:
        if kind == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= COMPUTE_MIN_REPEATS and time.perf_counter() - t_start > COMPUTE_BUDGET_S:
            break
    return {"ms": statistics.median(samples), "samples_ms": samples, "warmup": COMPUTE_WARMUP[kind]}


def _inputs(args: ModelArgs, tokens: int, dtype, device, gen) -> torch.Tensor:
    import torch

    return torch.randn(1, tokens, args.dim, generator=gen, device=device, dtype=dtype)  # (B, S, dim)


def _time_dequant(w: dict, dtype, device) -> dict[str, Any] | None:
    """Dequantizing the group's quantized matrices to ``dtype`` (inside its compute already; timed alone to
    set against its copy), None when it has none."""
    from model.quant import QuantWeight  # torch: the reader processes import this module

    qs = [t for t in w.values() if isinstance(t, QuantWeight)]
    return time_op(lambda: [q.dense(dtype) for q in qs], device) if qs else None


def _time_group(args: ModelArgs, kind: str, dtype, device, gen, prefill: int, context: int,
                formats) -> dict[str, Any]:
    """One group of ``kind`` (layer 0's, or the head) on random weights: a prefill of ``prefill`` tokens, then a
    decode token after ``context`` cached ones (random keys and values); the head on the last position only, the
    same in both phases (logits of one position)."""
    from model.passes import kind_forward  # torch: readers import this module
    from model.transformer import Pass, Queries, Rope, head_forward
    from runtime.engine.kv import KVCache

    w = random_weights(args, HEAD if kind == HEAD else layer_group(0, kind), dtype, device, gen, formats)
    dequant = _time_dequant(w, dtype, device)
    if kind == HEAD:
        h = _inputs(args, 1, dtype, device, gen)
        t = time_op(lambda: head_forward(h, w, args), device)
        return {"prefill": t, "decode": t, "dequant": dequant}
    fwd = kind_forward(args, kind)
    max_len = max(prefill, context + 1)
    rope = Rope(args, max_len, device)
    cache = KVCache(dataclasses.replace(args, n_layers=1), 1, max_len, dtype, device)  # one layer's cache
    h_pre, h_dec = _inputs(args, prefill, dtype, device, gen), _inputs(args, 1, dtype, device, gen)
    pre = time_op(lambda: fwd(h_pre, w, Pass(args, rope, cache, Queries(0)), 0), device)
    for t in (cache.k[0], cache.v[0]):  # the decode's cached tokens: random keys and values
        t[:, :context].normal_(generator=gen)
    dec = time_op(lambda: fwd(h_dec, w, Pass(args, rope, cache, Queries(context)), 0), device)
    return {"prefill": pre, "decode": dec, "dequant": dequant}


def measure_compute(spec: ModelSpec, device: torch.device, prefill: int, context: int) -> dict[str, Any]:
    """Prefill and decode time of one group of each layer kind and of the head, random weights; each group's
    weights are freed before the next is built."""
    import torch

    from runtime.format.image import TORCH_DTYPES  # torch: the reader processes import this module

    args, dtype = spec.args, TORCH_DTYPES[spec.dtype]
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # as the runtime does (runtime/engine/generate.py)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        out = {kind: _time_group(args, kind, dtype, device, gen, prefill, context, spec.formats)
               for kind in kinds_of_pass(args)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def measure_tree_passes(spec: ModelSpec, device: torch.device, sizes: Sequence[int], context: int) -> dict:
    """Compute of one group of each layer kind and of the head for a pass of n tokens after ``context`` cached
    ones, for each n of ``sizes`` (random weights; each group's built once): what a pass that verifies n tree
    tokens computes (the tree's mask costs what a causal one does)."""
    import torch

    from model.passes import kind_forward
    from model.transformer import Pass, Queries, Rope, head_forward
    from runtime.engine.kv import KVCache
    from runtime.format.image import TORCH_DTYPES

    args, dtype, f = spec.args, TORCH_DTYPES[spec.dtype], spec.formats
    gen = torch.Generator(device=device).manual_seed(0)
    max_len = context + max(sizes)
    rope = Rope(args, max_len, device)
    cache = KVCache(dataclasses.replace(args, n_layers=1), 1, max_len, dtype, device)
    for t in (cache.k[0], cache.v[0]):
        t[:, :context].normal_(generator=gen)
    p = Pass(args, rope, cache, Queries(context))
    ops = {kind: partial(_layer_op, kind_forward(args, kind), p) for kind in kinds_of_pass(args) if kind != HEAD}
    ops[HEAD] = lambda h, w: head_forward(h, w, args)
    out: dict[str, dict[int, float]] = {}
    with torch.inference_mode():
        for kind, op in ops.items():
            w = random_weights(args, HEAD if kind == HEAD else layer_group(0, kind), dtype, device, gen, f)
            out[kind] = {n: time_op(partial(op, _inputs(args, n, dtype, device, gen), w), device)["ms"] for n in sizes}
            del w
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _layer_op(fwd: Callable, p, h, w):
    return fwd(h, w, p, 0)


def measure_draft(draft: str, target: Image, device: torch.device, sizes: Sequence[int], context: int) -> dict:
    """The draft's milliseconds to build a tree of each size (median of 3) after ``context`` tokens of random
    text, held on ``device`` as a run holds it; ngram: nothing to time (a lookup in the text so far)."""
    import torch

    from runtime.engine.drafts import open_draft_image
    from runtime.engine.generate import Generator
    from runtime.engine.speculative import ModelDraft
    from runtime.engine.weights import InMemoryWeights

    if draft == "ngram":
        return {n: 0.0 for n in sizes}
    image = open_draft_image(draft, target)
    trials = 3
    max_len = context + trials * len(sizes) + max(sizes) + 2
    md = ModelDraft(Generator(InMemoryWeights(image, device, quiet=True), max_len))
    try:
        rng = torch.Generator().manual_seed(0)
        seq = torch.randint(1, image.args.vocab_size, (context,), generator=rng).tolist()
        md.reset()
        with torch.inference_mode():
            md.propose(seq, 2)  # the context's prefill, once
            out = {}
            for n in sizes:
                samples = []
                for _ in range(trials):  # one more token of text each time, as a run's next pass has
                    seq.append(int(torch.randint(1, image.args.vocab_size, (1,), generator=rng)))
                    t0 = time.perf_counter()
                    md.propose(seq, n)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    samples.append((time.perf_counter() - t0) * 1e3)
                out[n] = statistics.median(samples)
        return out
    finally:
        md.close()


def tree_costs(spec: ModelSpec, cfg: ProbeConfig, device: torch.device, r: Rates, plan) -> dict[str, Any]:
    """--draft: a pass's time by the tokens it verifies (the bound of the pass: its compute at that many
    tokens against the plan's link bytes, as the analysis above) and the draft's time for a tree of that size;
    where the run's choice of a size starts; the costs kept in the cache for runs of this image."""
    from runtime.engine.treecosts import PassCosts, save_costs

    sizes = cfg.tree_tokens_list
    _log(f"probe: a pass of {', '.join(map(str, sizes))} tokens after {cfg.decode_context}, and the draft {cfg.draft}")
    comp = measure_tree_passes(spec, device, sizes, cfg.decode_context)
    cuda = device.type == "cuda"
    held = {k: 0.0 if cuda else (r.dequant_ms.get(k) or 0.0) for k in comp}  # a CPU dequantizes held groups once
    h2d = plan.h2d_bytes_per_pass if plan is not None else 0
    disk = plan.disk_bytes_per_pass if plan is not None else 0
    rows = {}
    for n in sizes:
        c = pass_compute(spec.args, {k: comp[k][n] - held[k] for k in comp})
        rows[n] = bound(h2d, disk, max(c, 0.0), r, n, cuda)
    target = Image.open(cfg.image, cfg.manifest)
    draft_ms = measure_draft(cfg.draft, target, device, sizes, cfg.decode_context)
    costs = PassCosts({n: rows[n]["bound_ms"] for n in sizes}, draft_ms)
    limit = max(sizes)
    saved = save_costs(target, device, h2d, cfg.draft, costs)
    return {"draft": cfg.draft, "context": cfg.decode_context, "h2d_bytes": h2d, "group_compute_ms": comp,
            "passes": {str(n): rows[n] for n in sizes}, "draft_ms": {str(n): v for n, v in draft_ms.items()},
            "start": costs.start(limit), "saved": str(saved)}


def tree_lines(t: dict[str, Any]) -> list[str]:
    one = t["passes"][min(t["passes"], key=int)]["bound_ms"]
    lines = [f"speculative decoding with --draft {t['draft']}: a pass's time by the tokens it verifies (its compute "
             f"at that many tokens after {t['context']} cached ones, against the plan's link bytes), the draft's time "
             f"to build a tree of that size (after random text), and the tokens a pass that pays for both against "
             f"a plain pass of {_ms(one)}:"]
    for n, row in t["passes"].items():
        d = t["draft_ms"][n]
        lines.append(f"  {n:>5} tokens: pass {_ms(row['bound_ms'])} ({row['limited_by']}), draft {_ms(d)}: "
                     f"{(row['bound_ms'] + d) / one:.2f} tokens a pass to break even")
    lines.append(f"  a run's tree size starts at {t['start']} (the largest whose draft and pass cost at most 1.1x a "
                 f"plain pass), then follows the tokens a second it measures; costs kept in {t['saved']}")
    return lines


# ---- analysis ----------------------------------------------------------------------------------------------

def pass_compute(args: ModelArgs, per_kind: Mapping[str, float]) -> float:
    """A pass's compute from one group's of each kind (``kinds_of_pass``): every layer's groups, then the head."""
    return sum(v * (1 if kind == HEAD else args.n_layers) for kind, v in per_kind.items())


def layer_kinds(d: Mapping[str, Any]) -> list[str]:
    """The layer kinds among a per-kind table's keys (all but the head), in pass order."""
    return [k for k in d if k != HEAD]


@dataclass
class Rates:
    """The measured rates the analysis uses: GB/s (None: no such link) and compute ms per group kind."""

    h2d_gbps: float | None
    disk_gbps: float
    reader_gbps: float
    disk_workers: int
    compute_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> kind -> ms
    dequant_ms: dict[str, float | None] = field(default_factory=dict)  # kind -> ms (inside compute_ms)

    def ms(self, nbytes: int, gbps: float | None) -> float | None:
        return None if gbps is None else nbytes / (gbps * GB) * 1e3


def pass_bytes(spec: ModelSpec) -> dict[str, int]:
    """Bytes one pass uses: one layer's groups, the rest of the pass (head, a tied embedding), the pass, and
    the streamable part (a tied embedding never streams: runtime/engine/placement.py)."""
    g = spec.group_bytes
    seq = pass_sequence(spec.args)
    rest = sum(g[n] for n in seq if group_layer(n) is None)
    total = sum(g[n] for n in seq)
    tied = g[HOST_GROUP] if HOST_GROUP in seq else 0
    layer0 = {k: g[layer_group(0, k)] for k in kinds_of_pass(spec.args) if k != HEAD}
    return {**layer0, HEAD: rest,
            "head_streamable": rest - tied, "pass": total, "streamable": total - tied,
            "streamable_groups": len([n for n in seq if n != HOST_GROUP]), "groups": len(seq)}


def group_rows(b: dict[str, int], r: Rates, phase: str) -> dict[str, dict[str, Any]]:
    rows = {}
    for kind in r.compute_ms[phase]:
        c, h2d = r.compute_ms[phase][kind], r.ms(b[kind], r.h2d_gbps)
        disk = r.ms(b["head_streamable" if kind == HEAD else kind], r.disk_gbps)  # a tied embedding never streams
        dq = r.dequant_ms.get(kind)
        rows[kind] = {"bytes": b[kind], "h2d_ms": h2d, "disk_ms": disk, "compute_ms": c, "dequant_ms": dq,
                      "dequant_vs_copy": None if dq is None or not h2d else dq / h2d,
                      "compute_hides_copy": None if h2d is None else c >= h2d,
                      "copy_wait_ms": None if h2d is None else max(0.0, h2d - c),
                      "compute_hides_read": c >= disk, "read_wait_ms": max(0.0, disk - c)}
    return rows


def layer_row(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One layer (its groups of each kind): serial (compute, then copy, then read: no overlap) against pipelined."""
    lay = [rows[k] for k in layer_kinds(rows)]
    terms = {"compute": sum(x["compute_ms"] for x in lay), "disk": sum(x["disk_ms"] for x in lay)}
    if lay[0]["h2d_ms"] is not None:
        terms["h2d"] = sum(x["h2d_ms"] for x in lay)
    pipelined = max(terms.values())
    serial = sum(terms.values())
    return {"bytes": sum(x["bytes"] for x in lay), **{f"{k}_ms": v for k, v in terms.items()},
            "serial_ms": serial, "pipelined_ms": pipelined, "speedup": serial / pipelined,
            "limited_by": max(terms, key=terms.get)}


def bound(h2d_bytes: int | None, disk_bytes: int, compute_ms: float, r: Rates, tokens: int,
          cuda: bool) -> dict[str, Any]:
    """max(H2D bytes / link, disk bytes / disk, compute) for one pass (docs/DESIGN.md, the cost model)."""
    terms: dict[str, float | None] = {"compute": compute_ms}
    if cuda and h2d_bytes:
        terms["h2d"] = r.ms(h2d_bytes, r.h2d_gbps)  # None: the link was not measured (a CPU probe)
    if disk_bytes:
        terms["disk"] = r.ms(disk_bytes, r.disk_gbps)
    known = {k: v for k, v in terms.items() if v is not None}
    lim = max(known, key=known.get)
    return {"h2d_bytes": h2d_bytes if cuda else 0, "disk_bytes": disk_bytes,
            "terms_ms": terms, "bound_ms": known[lim], "limited_by": lim, "tokens": tokens,
            "tokens_per_s": tokens / (known[lim] / 1e3),
            "incomplete": "H2D not measured (the probe ran on the CPU)" if None in terms.values() else None}


def tier_choices(spec: ModelSpec, b: dict[str, int], r: Rates, phase: str, tokens: int, cuda: bool,
                 plan) -> dict[str, Any]:
    compute = pass_compute(spec.args, r.compute_ms[phase])
    # a CPU dequantizes the groups it holds once (runtime/engine/streamed.py): only streamed ones per use
    dq = {k: r.dequant_ms.get(k) or 0.0 for k in r.compute_ms[phase]}
    held = compute if cuda else compute - pass_compute(spec.args, dq)
    out = {"all_resident": bound(0, 0, held, r, tokens, cuda),
           "all_dram": bound(b["pass"], 0, held, r, tokens, cuda),
           "all_streamed": bound(b["pass"], b["streamable"], compute, r, tokens, cuda)}
    if plan is not None:
        if not plan.is_cuda:  # the groups it does not stream are dequantized once, the streamed ones per use
            kind = {g: group_kind(g) if group_layer(g) is not None else HEAD for g in plan.stream}  # (the embedding
            compute = held + sum(dq[kind[g]] for g in plan.stream)  # never streams)
        out["plan"] = bound(plan.h2d_bytes_per_pass, plan.disk_bytes_per_pass, compute, r, tokens, plan.is_cuda)
    return out


def analyse(spec: ModelSpec, r: Rates, tokens: dict[str, int], cuda: bool, plan=None) -> dict[str, Any]:
    b = pass_bytes(spec)
    out = {}
    for phase in ("prefill", "decode"):
        rows = group_rows(b, r, phase)
        out[phase] = {"tokens": tokens[phase], "groups": rows, "layer": layer_row(rows),
                      "pass": tier_choices(spec, b, r, phase, tokens[phase], cuda, plan)}
    return out


def recommend(spec: ModelSpec, r: Rates, analysis: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """W and K per phase and for both (the module docstring gives the formulas)."""
    b = pass_bytes(spec)
    layer = layer_kinds(r.compute_ms["decode"])
    largest = max(b[k] for k in layer)
    streamed = b["streamable_groups"]
    out: dict[str, Any] = {}
    for phase in ("prefill", "decode"):
        c = sum(r.compute_ms[phase][k] for k in layer) / len(layer)
        t_read = r.ms(largest, r.reader_gbps)
        w_raw = math.ceil(t_read / c)
        w = min(max(w_raw, 2), max(streamed, 2))
        p = analysis[phase]["pass"]
        disk_bound = p["all_streamed"]["limited_by"] == "disk"
        rec = {"c_ms": c, "t_read_ms": t_read, "w_raw": w_raw, "w": w, "disk_bound": disk_bound,
               "w_effective": min(w, max(2, r.disk_workers + 1)) if disk_bound else w}
        if cuda and r.h2d_gbps is not None:
            t_copy = r.ms(largest, r.h2d_gbps)
            k_raw = math.ceil(t_copy / c)
            copy_bound = p["all_dram"]["limited_by"] == "h2d"
            k = min(max(k_raw, 1), K_MAX)
            rec.update(t_copy_ms=t_copy, k_raw=k_raw, k=k, copy_bound=copy_bound,
                       k_effective=min(k, 2) if copy_bound else k)
        else:
            rec.update(t_copy_ms=None, k_raw=None, k=None, copy_bound=None, k_effective=None)
        out[phase] = rec
    w = max(out[p]["w_effective"] for p in ("prefill", "decode"))
    ks = [out[p]["k_effective"] for p in ("prefill", "decode") if out[p]["k_effective"] is not None]
    k = max(ks) if ks else None
    out.update(window_slots=w, staging_buffers=k, slot_bytes=largest, streamable_groups=streamed,
               flags=f"--prefetch-distance {w}" + (f" --group-prefetch-depth {k}" if k else ""),
               formula=FORMULA)
    return out


FORMULA = ("c = a layer group's compute, the mean over its kinds; t_read = largest layer group / one reader's disk "
           "bandwidth; t_copy = largest layer group / H2D bandwidth; W = clamp(ceil(t_read / c), 2, streamed "
           "groups): reads start W groups ahead of use; K = clamp(ceil(t_copy / c), 1, 8): copies start K groups "
           "ahead of compute. Disk-bound phase: W = readers of the best disk cell + 1 (keeps every reader busy); "
           "copy-bound phase: K = 2 (keeps the copy engine busy); both phases: the larger value")


# ---- the plan ----------------------------------------------------------------------------------------------

def make_probe_plan(spec: ModelSpec, cfg: ProbeConfig, device: torch.device, w: int, k: int | None,
                    tokens: dict[str, int]):
    """plan_placement for the budgets given, with the recommended W and K; None without budgets.

    A GPU budget means a plan for CUDA (also from a CPU probe); otherwise the probe's device. A missing
    budget defaults as in ``launch.py run`` (runtime/engine/source.py make_plan)."""
    import torch

    if cfg.gpu_mem_gb is None and cfg.dram_gb is None:
        return None
    target = "cuda" if cfg.gpu_mem_gb is not None else device.type
    gpu = None
    if target == "cuda":
        gpu = int(cfg.gpu_mem_gb * GB) if cfg.gpu_mem_gb else torch.cuda.mem_get_info(device)[0]
    dram = int(cfg.dram_gb * GB) if cfg.dram_gb else default_dram_bytes()
    max_len = max(tokens["prefill"], tokens["decode_context"] + 1)
    budgets = Budgets(gpu, dram, kv_cache_bytes(spec, 1, max_len), activation_bytes(spec, 1, tokens["prefill"]))
    return plan_placement(dict(spec.group_bytes), spec.args, "mixed", budgets, device=target,
                          prefetch_distance=w, group_prefetch_depth=k or 2)


# ---- printing ----------------------------------------------------------------------------------------------

def _gb(n: float) -> str:
    return fmt_gb(n, digits=3)


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e3:.2f} s" if v >= 1e4 else f"{v:.3f} ms"


def model_lines(spec: ModelSpec, b: dict[str, int]) -> list[str]:
    a = spec.args
    kinds = [k for k in kinds_of_pass(a) if k != HEAD]
    return [f"=== probe: {spec.source} ===",
            f"model: {a.arch}, {a.n_layers} layers, dim {a.dim}, FFN hidden {a.ffn_hidden}, heads {a.n_heads}/"
            f"{a.n_kv_heads} (q/kv) of {a.head_dim}, vocab {a.vocab_size}, {spec.dtype}" +
            (f"; stored as {spec.stored_as}" if spec.formats else ""),
            f"bytes: layer {_gb(sum(b[k] for k in kinds))} (" + " + ".join(f"{k} {_gb(b[k])}" for k in kinds) +
            f"), head {_gb(b[HEAD])}, pass {_gb(b['pass'])} in {b['groups']} groups"]


def link_lines(links: dict[str, Any]) -> list[str]:
    if links["skipped"]:
        return [f"links: host -> GPU: skipped: {links['reason']}"]
    lines = ["links: host -> GPU"]
    for key, label in (("pinned", "pinned (torch)"), ("registered_shm", "registered shm"), ("pageable", "pageable")):
        lk = links[key]
        lines.append(f"  {label:<16} {lk['gbps']:7.2f} GB/s  ({lk['method']})")
    reg = links["registered_shm"]
    lines.append(f"  registering {human_bytes(reg['bytes'])} of fresh shm: first touch {reg['first_touch_s']:.3f} s, "
                 f"cudaHostRegister {reg['register_s']:.3f} s ({reg['register_gbps']:.2f} GB/s)")
    return lines


def _readers(n: int) -> str:
    return f"{n} reader{'s' if n != 1 else ''}"


def disk_lines(disk: dict[str, Any], temp: dict | None) -> list[str]:
    mode = "O_DIRECT" if disk["direct"] else "BUFFERED (O_DIRECT refused; posix_fadvise DONTNEED after each read)"
    where = f"temp file {disk['path']} ({_gb(disk['region_bytes'])}, written at {temp['write_gbps']:.2f} GB/s, " \
            f"deleted at the end)" if temp else f"{disk['path']} ({_gb(disk['region_bytes'])})"
    reads = sorted({c["read_bytes"] for c in disk["table"]})
    workers = sorted({c["workers"] for c in disk["table"]})
    lines = [f"disk: {mode} reads of {where}, {_gb(disk['bytes_per_measurement'])} per measurement, "
             f"{disk['inflight_per_reader']} reads in flight per reader process",
             f"  {'GB/s':<10} " + "".join(f"{r // MiB:>7} MiB" for r in reads)]
    cell = {(c["workers"], c["read_bytes"]): c for c in disk["table"]}
    for n in workers:
        vals = [cell[n, r].get("gbps") for r in reads]
        lines.append(f"  {_readers(n):<10} " + "".join(
            f"{v:>11.3f}" if v is not None else f"{'skip':>11}" for v in vals))
    best = disk["best"]
    lines.append(f"  best {best['gbps']:.3f} GB/s ({_readers(best['workers'])} x {best['read_mib']:g} MiB); one "
                 f"reader's share {disk['reader_gbps']:.3f} GB/s (from the {disk['reader_gbps_from_workers']}-reader "
                 f"row)")
    lines += [f"  skipped {c['workers']} x {c['read_mib']:g} MiB: {c['skipped']}" for c in disk["table"]
              if "skipped" in c]
    if any(c.get("repeats_offsets") for c in disk["table"]):
        lines.append("  note: the file is smaller than all measurements together: later ones re-read offsets ("
                     + ("O_DIRECT: the page cache cannot serve them)" if disk["direct"]
                        else "dropped from the page cache before each measurement)"))
    lines += [f"  fallback: {n}" for n in disk["fallback"] or []]
    return lines


def compute_lines(comp: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    clock = "CUDA events" if meta["device"].startswith("cuda") else "perf_counter"
    lines = [f"compute ({meta['dtype']} on {meta['device']}, random weights; {clock}, median of up to "
             f"{meta['repeats']} runs after {meta['warmup']} warm-up):"]
    if meta.get("prefill_note"):
        lines.append(f"  note: {meta['prefill_note']}")
    lines.append(f"  {'group':<14} {'prefill ' + str(meta['prefill_tokens']) + ' tok':>18} "
                 f"{'decode 1 tok (' + str(meta['decode_context']) + ' cached)':>26}")
    for kind in comp:
        label = kind + (" (last pos)" if kind == HEAD else "")
        dq = comp[kind].get("dequant")
        lines.append(f"  {label:<14} {_ms(comp[kind]['prefill']['ms']):>18} {_ms(comp[kind]['decode']['ms']):>26}"
                     + (f"   of which dequantizing {_ms(dq['ms'])}" if dq else ""))
    return lines


def _hide(ok: bool | None, wait: float | None, what: str) -> str:
    if ok is None:
        return f"{what}: n/a"
    return f"{what}: yes" if ok else f"{what}: NO (waits {_ms(wait)})"


def analysis_lines(an: dict[str, Any], links: dict[str, Any], disk: dict[str, Any], n_layers: int) -> list[str]:
    h2d = "no H2D link (CPU)" if links["skipped"] else f"H2D {links['gbps']:.2f} GB/s (registered shm)"
    lines = []
    for phase, p in an.items():
        what = f"prefill of {p['tokens']} tokens" if phase == "prefill" else "decode of 1 token"
        lines.append(f"analysis, {what}: {h2d}, disk {disk['gbps']:.3f} GB/s (best cell)")
        lines.append(f"  {'group':<13} {'bytes':>10} {'copy':>11} {'read':>11} {'compute':>11}   compute hides")
        for kind, g in p["groups"].items():
            dq = "" if g["dequant_vs_copy"] is None else f"; dequantizing {g['dequant_vs_copy']:.0%} of its copy"
            lines.append(f"  {kind:<13} {_gb(g['bytes']):>10} {_ms(g['h2d_ms']):>11} {_ms(g['disk_ms']):>11} "
                         f"{_ms(g['compute_ms']):>11}   {_hide(g['compute_hides_copy'], g['copy_wait_ms'], 'copy')}; "
                         f"{_hide(g['compute_hides_read'], g['read_wait_ms'], 'read')}{dq}")
        ly = p["layer"]
        lines.append(f"  per layer: serial {_ms(ly['serial_ms'])} (compute + copy + read), pipelined "
                     f"{_ms(ly['pipelined_ms'])} ({ly['speedup']:.2f}x), bound by {ly['limited_by']}")
        lines.append(f"  per pass ({n_layers} layers + head), bound = max(H2D, disk, compute):")
        for choice, bd in p["pass"].items():
            terms = ", ".join(f"{k} {_ms(v)}" for k, v in bd["terms_ms"].items())
            extra = f"; {bd['incomplete']}" if bd["incomplete"] else ""
            lines.append(f"    {choice.replace('_', ' '):<13} {terms:<52} -> {_ms(bd['bound_ms'])} "
                         f"({bd['limited_by']}), {bd['tokens_per_s']:.2f} tok/s{extra}")
    return lines


def recommend_lines(rec: dict[str, Any], disk: dict[str, Any]) -> list[str]:
    lines = ["recommended prefetch distances:",
             "  c = compute per group = the mean over one layer's groups; t_read = largest group / one reader's "
             "disk share; t_copy = largest group / H2D",
             f"  W = clamp(ceil(t_read / c), 2, {rec['streamable_groups']} streamed groups): window slots, a read "
             "starts W groups ahead of its use",
             f"  K = clamp(ceil(t_copy / c), 1, {K_MAX}): GPU staging buffers, a copy starts K groups ahead of its "
             "compute"]
    for phase in ("prefill", "decode"):
        r = rec[phase]
        k = "K n/a (no H2D link)" if r["k"] is None else \
            f"t_copy {_ms(r['t_copy_ms'])} -> K {r['k_raw']} -> {r['k']}"
        lines.append(f"  {phase}: c {_ms(r['c_ms'])}; t_read {_ms(r['t_read_ms'])} -> W {r['w_raw']} -> {r['w']}; {k}")
        if r["disk_bound"]:
            lines.append(f"    disk-bound: no window hides the reads; W = {r['w_effective']} ("
                         f"{_readers(disk['best']['workers'])} + 1) keeps every reader busy; bytes in the DRAM tier "
                         "help, slots do not")
        if r["copy_bound"]:
            lines.append(f"    copy-bound: no depth hides the copies; K = {r['k_effective']} keeps the copy engine "
                         "busy; bytes on the GPU help, buffers do not")
    k = rec["staging_buffers"]
    cost = f"window {rec['window_slots']} x {_gb(rec['slot_bytes'])} of DRAM" + (
        f", staging {k} x {_gb(rec['slot_bytes'])} of GPU memory" if k else "")
    lines.append(f"  use: {rec['flags']} ({cost})")
    return lines


def report_text(rep: dict[str, Any], spec: ModelSpec, plan) -> str:
    lines = model_lines(spec, pass_bytes(spec))
    lines += link_lines(rep["links"])
    lines += disk_lines(rep["disk"], rep["temp_file"])
    lines += compute_lines(rep["compute"]["groups"], rep["compute"])
    lines += analysis_lines(rep["analysis"], rep["links"], rep["disk"], spec.args.n_layers)
    lines += recommend_lines(rep["recommendation"], rep["disk"])
    if plan is not None:
        given = [f"--{k.replace('_', '-')} {v:g}" for k in ("gpu_mem_gb", "dram_gb")
                 if (v := rep["flags"].get(k)) is not None]
        lines.append(f"plan for {', '.join(given)} with the W and K above:")
        lines += ["  " + ln for ln in plan.describe().splitlines()]
    elif rep["plan_error"]:
        lines.append(f"plan: not possible: {rep['plan_error']}")
    else:
        lines.append("plan: none (give --gpu-mem-gb and/or --dram-gb)")
    if rep.get("speculative"):
        lines += tree_lines(rep["speculative"])
    return "\n".join(lines)


# ---- the command -------------------------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _compute_section(spec: ModelSpec, cfg: ProbeConfig, device: torch.device) -> dict[str, Any]:
    kind = device.type
    prefill = cfg.prefill_tokens or DEFAULT_PREFILL[kind]
    note = None
    if cfg.prefill_tokens is None and kind == "cpu":
        note = (f"on the CPU the prefill is {prefill} tokens by default ({DEFAULT_PREFILL['cuda']} on CUDA), so "
                f"that the probe ends in seconds; give --prefill-tokens to change it")
    _log(f"probe: compute of one attention group, one FFN group and the head on {device} (prefill {prefill} "
         f"tokens, decode after {cfg.decode_context})")
    groups = measure_compute(spec, device, prefill, cfg.decode_context)
    return {"device": device_name(device, model=True), "dtype": spec.dtype, "prefill_tokens": prefill,
            "decode_context": cfg.decode_context, "prefill_note": note, "warmup": COMPUTE_WARMUP[kind],
            "repeats": COMPUTE_REPEATS[kind], "groups": groups}


def _disk_section(spec: ModelSpec, cfg: ProbeConfig, cleanup: list[Path]) -> tuple[dict, dict | None]:
    temp = None
    path, region = spec.path, spec.region
    if path is None:
        _log(f"probe: writing a {_gb(cfg.probe_bytes)} temp file for the disk measurement")
        tmp, secs = make_temp_file(cfg.probe_bytes)
        cleanup.append(tmp)
        path, region = str(tmp), cfg.probe_bytes
        temp = {"path": path, "bytes": region, "write_s": secs, "write_gbps": region / secs / GB}
    return measure_disk(path, region, cfg, _log), temp


def _multi_links(cfg: ProbeConfig, device) -> dict:
    """Each of --devices' links alone and all at once (runtime/measure/multilink.py), one line printed."""
    if device.type != "cuda":
        raise ConfigError("--devices measures GPU links: this run has no CUDA device")
    from runtime.engine.ranks import check_devices, rank_devices
    from runtime.measure.multilink import measure_links as measure_each_and_all

    devs = rank_devices("cuda", len(cfg.devices.split(",")), cfg.devices)
    check_devices(devs)
    m = measure_each_and_all(devs, min(cfg.probe_bytes, 1 << 30))
    _log(f"probe: links alone {', '.join(f'{d} {g:.1f}' for d, g in m['each'].items())} GB/s; all at once "
         f"{m['aggregate_gbps']:.1f} GB/s ({m['shared']:.2f} of their sum)")
    return m


def run_probe(cfg: ProbeConfig) -> int:
    from runtime.engine.generate import pick_device  # torch: the reader processes import this module

    if cfg.experts is not None:  # a mixture's routing on a text, instead of the timing study
        from runtime.measure.routing import run_expert_probe

        return run_expert_probe(cfg)
    spec = model_spec(cfg)
    device = pick_device(cfg.device)
    cleanup: list[Path] = []
    try:
        _log(f"probe: host -> GPU links on {device}")
        links = measure_links(device, cfg.probe_bytes)
        if cfg.devices:
            links["tensor_parallel"] = _multi_links(cfg, device)
        disk, temp = _disk_section(spec, cfg, cleanup)
    finally:
        for p in cleanup:
            p.unlink(missing_ok=True)
    comp = _compute_section(spec, cfg, device)
    rates = Rates(links["gbps"], disk["gbps"], disk["reader_gbps"], disk["best"]["workers"],
                  {ph: {k: v[ph]["ms"] for k, v in comp["groups"].items()} for ph in ("prefill", "decode")},
                  {k: v["dequant"] and v["dequant"]["ms"] for k, v in comp["groups"].items()})
    tokens = {"prefill": comp["prefill_tokens"], "decode": 1, "decode_context": cfg.decode_context}
    cuda = device.type == "cuda"
    rec = recommend(spec, rates, analyse(spec, rates, tokens, cuda), cuda)
    plan, plan_error = None, None
    try:
        plan = make_probe_plan(spec, cfg, device, rec["window_slots"], rec["staging_buffers"], tokens)
    except ConfigError as e:
        plan_error = str(e)
    trees = tree_costs(spec, cfg, device, rates, plan) if cfg.draft is not None else None
    rep = {"model": {"source": spec.source, "image": spec.path if cfg.image else None, "manifest": spec.manifest,
                     "args": spec.args.to_dict(), "dtype": spec.dtype, "bytes": pass_bytes(spec)},
           "device": device_name(device, model=True), "links": links, "disk": disk, "temp_file": temp, "compute": comp,
           "analysis": analyse(spec, rates, tokens, cuda, plan), "recommendation": rec,
           "plan": None if plan is None else {**plan.to_dict(), "describe": plan.describe()},
           "plan_error": plan_error, "speculative": trees, "flags": dataclasses.asdict(cfg)}
    print(report_text(rep, spec, plan))
    if cfg.out_json:
        Path(cfg.out_json).write_text(json.dumps(rep, indent=1))
        print(f"JSON written to {cfg.out_json}")
    if plan_error:
        print(f"error: {plan_error}", file=sys.stderr)
        return 2
    return 0
