"""How long cudaHostRegister takes on a shared-memory ring, by strategy (GPU machine; issue 4's "4 GiB of
fresh shm took 2.5 s to register: measure and cut it").

    python benchmarks/register_bench.py [--gib 8]

For a fresh /dev/shm mapping and for one whose pages are already populated (as the DRAM tier is once the
I/O workers have read into it), registers it as one range and as 512 MiB chunks from 8 threads (what
runtime/engine/streamed.py does), then copies 512 MiB from a registered chunk to the GPU to check the rate.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import mmap
import os
import time

import torch

CHUNK = 512 << 20


def mapping(nbytes: int) -> tuple[mmap.mmap, str]:
    path = f"/dev/shm/llms-register-bench-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        return mmap.mmap(fd, nbytes), path
    finally:
        os.close(fd)


def populate(buf: torch.Tensor, threads: int) -> None:
    step = buf.numel() // threads
    with cf.ThreadPoolExecutor(threads) as ex:  # torch's fill_ releases the GIL
        list(ex.map(lambda i: buf[i * step:(i + 1) * step if i < threads - 1 else buf.numel()].fill_(1),
                    range(threads)))


def register(base: int, size: int, threads: int) -> tuple[float, list[int]]:
    rt = torch.cuda.cudart()
    chunks = [(o, min(CHUNK, size - o)) for o in range(0, size, CHUNK)] if threads > 1 else [(0, size)]

    def one(c):
        with torch.cuda.device(0):
            return int(rt.cudaHostRegister(base + c[0], c[1], 1))

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as ex:
        errs = list(ex.map(one, chunks))
    dt = time.perf_counter() - t
    assert not any(errs), errs
    return dt, [base + o for o, _ in chunks]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=8.0, help="mapping size in GiB (default 8)")
    a = p.parse_args()
    nbytes = int(a.gib * (1 << 30)) // CHUNK * CHUNK
    torch.cuda.init()
    torch.empty(1, device="cuda")
    rows = []
    for populated in (False, True):
        for threads in (1, 8):
            m, path = mapping(nbytes)
            try:
                buf = torch.frombuffer(m, dtype=torch.uint8)
                tp = 0.0
                if populated:
                    t = time.perf_counter()
                    populate(buf, 8)
                    tp = time.perf_counter() - t
                dt, ptrs = register(buf.data_ptr(), nbytes, threads)
                dev = torch.empty(CHUNK, dtype=torch.uint8, device="cuda")
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(4):
                    dev.copy_(buf[CHUNK:2 * CHUNK], non_blocking=True)
                torch.cuda.synchronize()
                h2d = 4 * CHUNK / (time.perf_counter() - t) / 1e9
                for ptr in ptrs:
                    torch.cuda.cudart().cudaHostUnregister(ptr)
                del buf, dev
                rows.append({"populated_first": populated, "threads": threads, "populate_s": tp, "register_s": dt,
                             "register_GBps": nbytes / dt / 1e9, "h2d_GBps": h2d, "bytes": nbytes})
                print(f"populated {populated!s:5} threads {threads}: populate {tp:.2f} s, register {dt:.2f} s "
                      f"({nbytes / dt / 1e9:.1f} GB/s), H2D from it {h2d:.1f} GB/s", flush=True)
            finally:
                m.close()
                os.unlink(path)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
