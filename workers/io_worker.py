"""An I/O worker process: reads whole groups from the image into ring slots and verifies them.

Started by the coordinator (runtime/pool/coordinator.py) with the ``spawn`` method and given only plain data: the pool
handle, its index, the image path and options. It attaches to the pool's shared memory (never unlinks),
then loops: wait on its semaphore (with a timeout), take READ(slot, seq) requests from its queue, read the
slot's group from the image with O_DIRECT straight into the slot (``workers.odirect.DirectReader``, several
reads in flight), verify the group's crc32, and report DONE(slot, seq, status) on its completion queue.
No weight byte passes through a pipe or a pickle.

It exits on a STOP request, or by itself when its coordinator is gone (parent pid changed), so a SIGKILLed
coordinator never leaves workers behind. Row ``index`` of the control block's worker table is written only
by this process: pid, bytes read, reads, errors, reads in flight.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
import zlib

from runtime.ipc.options import WorkerOptions
from runtime.ipc.shm import ERR_CRC, MSG_DONE, MSG_READ, MSG_STOP, PoolHandle, PoolResources, sem_wait
from runtime.ipc.trace import WorkerTrace
from workers.odirect import DirectReader

POLL_S = 0.25


class Worker:
    def __init__(self, handle: PoolHandle, index: int, image: str, opts: WorkerOptions) -> None:
        self.index, self.parent, self.opts = index, os.getppid(), opts
        self.res = PoolResources.attach(handle)
        coord = int(self.res.header["coord_pid"])
        if coord != self.parent:  # it died while this process started
            self.res.close()
            raise RuntimeError(f"coordinator pid {coord} is gone")
        self.row = self.res.workers[index]
        self.reader = DirectReader(image, direct=opts.direct, max_inflight=opts.inflight,
                                   chunk_bytes=opts.chunk_bytes, log=self.log)
        self.row["pid"], self.row["direct"], self.row["inflight"] = os.getpid(), int(self.reader.direct), 0
        self.lock = threading.Lock()  # completion queue producer side and the row's counters
        self.pending = 0
        self.trace = WorkerTrace(index) if opts.trace_dir else None

    def log(self, msg: str) -> None:
        print(f"[io-worker {self.index} pid {os.getpid()}] {msg}", file=sys.stderr, flush=True)

    def run(self) -> None:
        stopping = False
        while not (stopping and self.pending == 0):
            sem_wait(self.res.sem_workers[self.index], POLL_S)
            if os.getppid() != self.parent:
                self.log("coordinator is gone; exiting")
                return
            for kind, slot, seq, _ in self.res.requests[self.index].drain():
                if kind == MSG_STOP:
                    stopping = True
                elif kind == MSG_READ:
                    self.submit(slot, seq)

    def submit(self, slot: int, seq: int) -> None:
        s = self.res.slots[slot]
        g = self.res.groups[int(s["group"])]
        offset, size, crc = int(g["offset"]), int(g["size"]), int(g["crc"])
        with self.lock:
            self.pending += 1
            self.row["inflight"] = self.pending
        if self.opts.max_delay_s:
            time.sleep(random.uniform(0, self.opts.max_delay_s))
        traced = (time.monotonic_ns(), int(s["group"])) if self.trace else None  # (submitted at, group)
        fut = self.reader.submit(self.res.slot_view(slot, size), offset, size)
        fut.add_done_callback(lambda f: self.complete(f, slot, seq, size, crc, traced))

    def complete(self, fut, slot: int, seq: int, size: int, crc: int, traced: tuple | None = None) -> None:
        t1 = time.monotonic_ns() if traced else 0  # the bytes are in the slot; the crc check follows
        status, err = 0, fut.exception()
        if err is not None:
            status = getattr(err, "errno", None) or 5  # EIO when the error carries no errno
            self.log(f"read of slot {slot} failed: {err}")
        else:
            got = zlib.crc32(self.res.slot_view(slot, size))
            if got != crc:
                status = ERR_CRC
                self.res.slots[slot]["error"] = got  # the crc found, for the coordinator's message
        with self.lock:
            self.pending -= 1
            self.row["inflight"] = self.pending
            self.row["reads"] += 1
            self.row["bytes_read"] += size if err is None else 0
            self.row["errors"] += status != 0
            self.res.completions[self.index].put(MSG_DONE, slot, seq, status)
        if traced:
            self.trace.read(traced[1], slot, seq, size, self.opts.chunk_bytes, traced[0], t1, status)

    def close(self) -> None:
        self.reader.close()
        if self.trace:
            self.trace.dump(self.opts.trace_dir)
        self.res.close()


def worker_main(handle: PoolHandle, index: int, image: str, opts: WorkerOptions) -> None:
    """Process entry point (spawn target)."""
    try:
        w = Worker(handle, index, image, opts)
    except Exception as e:  # attach or open failed: say why; the coordinator sees the exit code
        print(f"[io-worker {index}] cannot start: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    try:
        w.run()
    finally:
        w.close()
