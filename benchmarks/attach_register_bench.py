"""How fast a process that *attaches* to a populated shared-memory ring can cudaHostRegister it (GPU machine).

    python benchmarks/attach_register_bench.py [--gib 16]

An attached run (``run --attach``) maps a ring another process (the pool's workers) has already filled, and
must register it before copying from it: on the H200 machine 16 GB took 0.9-1.4 s, most of an attached
run's time to first token. This creates and fills a /dev/shm segment as the pool does (optionally asking for
transparent huge pages first), then for each strategy starts a fresh process that maps it and registers it,
timing only the mapping's preparation and the registration:

    threads       8 or 16 threads registering >= 512 MiB chunks
    prefault      none | populate (MAP_POPULATE on the mapping) | madvise (MADV_POPULATE_READ per chunk,
                  from the registering threads, right before each chunk's registration)
    readonly      the mapping read-only and cudaHostRegisterReadOnly (what an attached client does)

It prints the machine's shmem huge-page setting and one line per strategy, JSON last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import concurrent.futures as cf, json, mmap, os, sys, time
import torch
path, size, threads, prefault = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
readonly = sys.argv[5] == "1"
torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
rt = torch.cuda.cudart()
CHUNK = 512 << 20
t0 = time.perf_counter()
fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if prefault == "populate" else 0)
m = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE)
os.close(fd)
t1 = time.perf_counter()
import warnings
warnings.filterwarnings("ignore")
buf = torch.frombuffer(m, dtype=torch.uint8)
base = buf.data_ptr()
chunks = [(o, min(CHUNK, size - o)) for o in range(0, size, CHUNK)]
def one(c):
    if prefault == "madvise":
        m.madvise(22, c[0], c[1])  # MADV_POPULATE_READ (Linux 5.14)
    with torch.cuda.device(0):
        return int(rt.cudaHostRegister(base + c[0], c[1], 1 | (8 if readonly else 0)))
with cf.ThreadPoolExecutor(threads) as ex:
    errs = list(ex.map(one, chunks))
t2 = time.perf_counter()
dev = torch.empty(CHUNK, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(4):
    dev.copy_(buf[CHUNK:2 * CHUNK], non_blocking=True)
torch.cuda.synchronize()
h2d = 4 * CHUNK / (time.perf_counter() - t) / 1e9
print(json.dumps({"map_s": t1 - t0, "register_s": t2 - t1, "total_s": t2 - t0, "errors": sorted(set(errs)),
                  "h2d_GBps": h2d}))
"""


def read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        return f"unreadable ({e.strerror})"


def fill(path: str, size: int, huge: bool) -> float:
    import mmap

    import torch

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size)
    os.close(fd)
    if huge:
        m.madvise(mmap.MADV_HUGEPAGE)
    t = time.perf_counter()
    buf = torch.frombuffer(m, dtype=torch.uint8)
    import concurrent.futures as cf

    step = size // 8
    with cf.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: buf[i * step:(i + 1) * step].fill_(1), range(8)))
    dt = time.perf_counter() - t
    buf = None  # noqa: F841  (the tensor must not outlive the mapping)
    m.close()
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=16.0)
    a = p.parse_args()
    size = int(a.gib * (1 << 30)) // (512 << 20) * (512 << 20)
    print("shmem_enabled:", read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"))
    print("/dev/shm:", [x for x in read("/proc/mounts").splitlines() if " /dev/shm " in x])
    rows = []
    for huge in (False, True):
        path = f"/dev/shm/llms-attach-register-{os.getpid()}"
        try:
            fill_s = fill(path, size, huge)
            meminfo = {k: v for k, v in (x.split(":", 1) for x in read("/proc/meminfo").splitlines())
                       if k in ("ShmemHugePages", "ShmemPmdMapped")}
            print(f"filled {size / 1e9:.1f} GB with huge pages {'asked' if huge else 'not asked'} in {fill_s:.2f} s; "
                  f"{ {k: v.strip() for k, v in meminfo.items()} }", flush=True)
            variants = [(8, "none", "0"), (16, "none", "0"), (8, "populate", "0"), (16, "madvise", "0"),
                        (8, "none", "1"), (16, "madvise", "1")] if not huge else [(8, "none", "0"), (16, "none", "1")]
            for threads, prefault, ro in variants:
                out = subprocess.run([sys.executable, "-c", CHILD, path, str(size), str(threads), prefault, ro],
                                     capture_output=True, text=True, timeout=120)
                try:
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                except (ValueError, IndexError):
                    print("child failed:", out.stderr[-800:], flush=True)
                    continue
                r.update({"huge_pages_asked": huge, "threads": threads, "prefault": prefault, "readonly": ro == "1",
                          "bytes": size, "register_GBps": size / r["total_s"] / 1e9})
                rows.append(r)
                print(f"huge {huge!s:5} threads {threads:2} prefault {prefault:8} readonly {ro}: "
                      f"map {r['map_s']:.2f} s "
                      f"+ register {r['register_s']:.2f} s = {r['total_s']:.2f} s ({r['register_GBps']:.1f} GB/s), "
                      f"errors {r['errors']}, H2D {r['h2d_GBps']:.1f} GB/s", flush=True)
        finally:
            if os.path.exists(path):
                os.unlink(path)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
