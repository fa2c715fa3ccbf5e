"""The links a bound is computed from, measured: host -> GPU copies (from torch's pinned memory, from a POSIX shm
segment registered with cudaHostRegister as the runtime's ring is, from pageable memory) and O_DIRECT reads of
the image; and the small helpers the bench and the probe print with. Torch is imported inside the functions
that need it: the probe's reader processes import this module.
"""

from __future__ import annotations

import mmap
import os
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from model.args import human_bytes
from model.errors import UserError
from workers.odirect import DirectReader, aligned_buffer

if TYPE_CHECKING:
    import torch

GB, MB = 1e9, 1e6
H2D_REPEATS = 5
DISK_PROBE_BYTES = 2 << 30  # about a second: shorter samples of a virtual disk swing by 20 %
DISK_PROBE_READ = 16 << 20
H2D_PROBE_BYTES = 512 << 20


def fmt_gb(n: float, digits: int = 2) -> str:
    """Decimal units, as the cost model: GB above 0.1 GB, else MB."""
    return f"{n / GB:.{digits}f} GB" if n >= 1e8 else f"{n / MB:.2f} MB"


def device_name(device: torch.device, model: bool = False) -> str:
    """``cuda:N`` (with ``model``: and the GPU's name) or ``cpu``."""
    import torch

    if device.type != "cuda":
        return str(device)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})" if model else f"cuda:{idx}"


def process_age_s() -> float:
    """Seconds since this process started (/proc/self/stat starttime against CLOCK_BOOTTIME: 10 ms ticks,
    where psutil's create_time adds the boot time's whole-second rounding)."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


# ---- host -> GPU ----------------------------------------------------------------------------------------

def copy_gbps(host: torch.Tensor, dev: torch.Tensor, repeats: int) -> list[float]:
    """GB/s of ``repeats`` copies host -> dev (same byte count), CUDA events, after one warm-up copy."""
    import torch

    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(dev.device)
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        samples.append(host.numel() * host.element_size() / (start.elapsed_time(end) / 1e3) / GB)
    return samples


def _link(samples: list[float], method: str, **extra) -> dict[str, Any]:
    return {"gbps": statistics.median(samples), "samples_gbps": samples, "method": method, **extra}


def measure_h2d_pinned(dev: torch.Tensor, repeats: int = H2D_REPEATS) -> dict[str, Any]:
    """Copies from torch's pinned memory into ``dev`` (a uint8 tensor on the GPU)."""
    import torch

    n = dev.numel()
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    samples = copy_gbps(host, dev, repeats)
    return _link(samples, f"pinned host -> {dev.device} copies of {human_bytes(n)}, CUDA events, median of "
                          f"{repeats} after one warm-up", bytes=n)


def measure_h2d_pageable(dev: torch.Tensor, repeats: int = H2D_REPEATS) -> dict[str, Any]:
    import torch

    n = dev.numel()
    host = torch.ones(n, dtype=torch.uint8)  # ones: every page touched before the clock starts
    samples = copy_gbps(host, dev, repeats)
    return _link(samples, f"pageable host -> {dev.device} copies of {human_bytes(n)}, median of {repeats}", bytes=n)


def probe_shm_name() -> str:
    """The probe's one shm segment; the ``/llms.<uid>.`` prefix makes runtime.ipc.shm.leftover_names see it."""
    return f"/llms.{os.getuid()}.probe{os.getpid()}.h2d"


def measure_h2d_registered(dev: torch.Tensor, repeats: int = H2D_REPEATS) -> dict[str, Any]:
    """Copies from a fresh POSIX shm segment registered with cudaHostRegister, as the runtime's ring is.

    Times the first touch of every page and cudaHostRegister separately; unregisters and unlinks in ``finally``.
    """
    import posix_ipc
    import torch

    n, name = dev.numel(), probe_shm_name()
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=n)
    mm = host = None
    registered = False
    cudart = torch.cuda.cudart()
    try:
        t0 = time.perf_counter()
        try:  # allocate now: a /dev/shm too small must fail here, not with SIGBUS at the first touch
            os.posix_fallocate(shm.fd, 0, n)
        except OSError as e:
            raise UserError(f"{name}: cannot allocate {human_bytes(n)} of shared memory ({os.strerror(e.errno)}); "
                            f"lower --probe-gb or enlarge /dev/shm") from None
        mm = mmap.mmap(shm.fd, n)
        shm.close_fd()
        np.frombuffer(mm, dtype=np.uint8)[::mmap.PAGESIZE] = 1  # first touch: every page mapped
        touch_s = time.perf_counter() - t0
        host = torch.frombuffer(mm, dtype=torch.uint8)
        t0 = time.perf_counter()
        err = int(cudart.cudaHostRegister(host.data_ptr(), n, 0))
        register_s = time.perf_counter() - t0
        if err:
            raise UserError(f"cudaHostRegister of the probe's shm segment {name} ({n} bytes) failed with error {err}")
        registered = True
        samples = copy_gbps(host, dev, repeats)
        t0 = time.perf_counter()
        cudart.cudaHostUnregister(host.data_ptr())
        registered, unregister_s = False, time.perf_counter() - t0
    finally:
        try:
            if registered:
                cudart.cudaHostUnregister(host.data_ptr())
            del host
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass  # a view is still alive somewhere; the OS unmaps at exit, the name goes below
        finally:
            if shm.fd != -1:
                shm.close_fd()
            shm.unlink()
    return _link(samples, f"POSIX shm {name} registered with cudaHostRegister -> {dev.device} copies of "
                          f"{human_bytes(n)}, CUDA events, median of {repeats} after one warm-up", bytes=n,
                 first_touch_s=touch_s, register_s=register_s, register_gbps=n / register_s / GB,
                 unregister_s=unregister_s)


def measure_h2d(device: torch.device) -> dict[str, Any]:
    """H2D_PROBE_REPEATS pinned host -> GPU copies of H2D_PROBE_BYTES, timed with CUDA events: the H2D term of a
    run's bound (the runtime copies from the cudaHostRegister'ed ring, which docs/DESIGN.md measured at the same
    rate as torch's pinned memory)."""
    import torch

    nbytes = min(H2D_PROBE_BYTES, torch.cuda.mem_get_info(device)[0] // 4) // 4096 * 4096
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    link = measure_h2d_pinned(dev, H2D_REPEATS)
    del dev
    torch.cuda.empty_cache()  # give the probe's memory back before the plan reads the free memory
    return {"gbps": link["gbps"], "source": "measured", "samples_gbps": link["samples_gbps"],
            "method": link["method"]}


# ---- disk --------------------------------------------------------------------------------------------------

def timed_reads(reader: DirectReader, offsets: Sequence[int], read_bytes: int, inflight: int) -> float:
    """Read ``read_bytes`` at each offset through ``reader``, ``inflight`` reads at a time; returns seconds.

    ``reader`` must allow ``inflight`` reads in flight (its ``max_inflight``) and split no read (its
    ``chunk_bytes`` >= ``read_bytes``). The probe's reader processes and ``measure_disk_quick`` read with it.
    """
    buf = aligned_buffer(read_bytes * inflight, reader.alignment)
    futures: list = [None] * inflight
    t0 = time.perf_counter()
    for i, off in enumerate(offsets):
        b = i % inflight
        if futures[b] is not None:
            futures[b].result()
        futures[b] = reader.submit(buf[b * read_bytes:(b + 1) * read_bytes], off)
    for f in futures:
        if f is not None:
            f.result()
    return time.perf_counter() - t0


def measure_disk_quick(path: str, size: int, inflight: int) -> dict[str, Any]:
    """DISK_PROBE_BYTES of O_DIRECT reads of DISK_PROBE_READ each, spread evenly over the first ``size`` bytes of
    ``path``, ``inflight`` at a time from this process (as many as the pool's workers keep at most): the disk
    term of a run's bound, measured before its pool starts (runtime/measure/bench.py)."""
    notes: list[str] = []
    with DirectReader(path, max_inflight=inflight, chunk_bytes=DISK_PROBE_READ, log=notes.append) as r:
        a = r.alignment
        region = size // a * a
        read = min(DISK_PROBE_READ, region) // a * a
        n = max(1, min(DISK_PROBE_BYTES, region) // read)
        offsets = [i * (region - read) // max(n - 1, 1) // a * a for i in range(n)]
        seconds = timed_reads(r, offsets, read, inflight)
        direct = r.direct
    method = (f"{n} {'O_DIRECT' if direct else 'buffered (O_DIRECT refused)'} reads of {human_bytes(read)} spread "
              f"over {human_bytes(region)} of {path}, {inflight} in flight")
    return {"gbps": n * read / seconds / GB, "source": "measured", "method": method, "bytes": n * read,
            "seconds": seconds, "direct": direct, "notes": notes}
