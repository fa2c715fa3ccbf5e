"""The pool: a coordinator process and its I/O workers around one image's shared-memory ring.

The coordinator creates the ring, the control block and the semaphores (runtime/ipc/shm.py), starts the
workers (workers/io_worker.py) and watches them, fills the DRAM tier once, then serves clients: each
client hands it a sequence of groups (its streamed set in forward order, cyclic, or a one-off list such as
its GPU tier), and the coordinator keeps the client's window slots filled with the next groups of that
sequence, as far ahead as the window allows (the prefetch distance), recycling each slot the client
releases. Beside the sequence, a client may *demand* a list of groups out of its order (a mixture's experts its
tokens chose: runtime/ipc/shm.py, demands), read in order into its own demand slots with the same checks,
retries and cleanup. It is the only process that moves slots between states (see runtime/ipc/shm.py), unlinks every
resource in a ``finally``, and exits when its owner process dies (a private pool) or on SIGTERM/SIGINT, at
every stage: while it makes its shared memory, starts its workers, fills the DRAM tier and serves.

Faults it handles: a worker that dies is replaced and its reads are issued again (with a new seq, so a
late completion of the old read is ignored); a failed read or checksum mismatch is retried once on
another worker, then reported to the client with the group, offset and device; a client that dies (or stops
its stream) has its window slots freed, those with a read in flight once the read completes. Every worker
that exits with a non-zero code is logged, during the run and at shutdown.

Its ``PoolConfig`` is plain data (runtime/ipc/options.py, spawn-safe). ``PrivatePool`` runs a coordinator as
a child of the calling process for one run; the daemon pool (runtime/pool/daemon.py, ``launch.py pool
start``) runs the same ``Coordinator`` in a detached process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from model.errors import ConfigError, UserError
from runtime.format.blockdev import worker_limit
from runtime.format.image import ALIGN, Image, align_up
from runtime.ipc.options import PoolConfig
from runtime.ipc.procs import pid_alive, stop_processes
from runtime.ipc.shm import (
    CLIENT_ATTACHED,
    CLIENT_FREE,
    ERR_CRC,
    MAGIC,
    MSG_DEMAND,
    MSG_DEMAND_FAILED,
    MSG_DEMAND_READY,
    MSG_DEMANDED,
    MSG_DONE,
    MSG_FAILED,
    MSG_READ,
    MSG_READY,
    MSG_RELEASE,
    MSG_START,
    MSG_STARTED,
    MSG_STOP,
    MSG_STOP_STREAM,
    POOL_FAILED,
    POOL_FILLING,
    POOL_RUNNING,
    POOL_STARTING,
    POOL_STOPPING,
    SLOT_ERROR,
    SLOT_FREE,
    SLOT_QUEUED,
    SLOT_READY,
    TIER_DRAM,
    TIER_STREAM,
    VERSION,
    PoolHandle,
    PoolResources,
    sem_wait,
    unlink_all,
    validate_pool_name,
)
from runtime.ipc.trace import SORT_COORDINATOR, Recorder
from workers.io_worker import worker_main

LOOP_S = 0.05  # the coordinator wakes at least this often (heartbeat, liveness checks)
_SIGNALLED = [False]  # SIGTERM/SIGINT seen in this process (set by the handler, read at every stage)


def on_stop_signal(signum, _frame) -> None:
    """The coordinator's SIGTERM (and a daemon's SIGINT) handler: only a flag, so that a signal at any moment,
    the creation of the shared memory included, leaves nothing half made; every stage checks it."""
    _SIGNALLED[0] = True


@dataclass
class ClientState:
    slots: list[int]  # this client's window slots
    sequence: list[int] = field(default_factory=list)
    cyclic: bool = False
    cursor: int = 0  # next position of the sequence to issue
    active: bool = False
    demand_slots: list[int] = field(default_factory=list)  # this client's demand slots (after its window)
    demand: list[int] = field(default_factory=list)  # its latest demand's groups ...
    demand_id: int = 0  # ... its id ...
    demand_cursor: int = 0  # ... and the next position of it to issue


class Coordinator:
    def __init__(self, cfg: PoolConfig) -> None:
        self.cfg = cfg
        self.trace = Recorder("coordinator", SORT_COORDINATOR) if cfg.worker_opts.trace_dir else None
        validate_pool_name(cfg.name)
        self.image = Image.open(cfg.image, cfg.manifest)
        self.names = list(self.image.groups)
        self.index = {n: i for i, n in enumerate(self.names)}
        unknown = [g for g in cfg.dram_groups if g not in self.index]
        if unknown:
            raise UserError(f"DRAM tier names groups the image lacks: {unknown}")
        dram_bytes = sum(self.image.groups[g].size for g in cfg.dram_groups)
        slot_bytes = align_up(cfg.slot_bytes, ALIGN)
        demand_bytes = align_up(cfg.demand_slot_bytes, ALIGN) if cfg.demand_slots else 0
        per_client = cfg.window_slots + cfg.demand_slots  # a client's slots: its window, then its demand slots
        n_window = per_client * cfg.n_clients
        ring = dram_bytes + cfg.n_clients * (cfg.window_slots * slot_bytes + cfg.demand_slots * demand_bytes)
        self.handle = PoolHandle(cfg.name, os.getuid(), len(self.names), len(cfg.dram_groups) + n_window,
                                 cfg.workers, cfg.n_clients, max(ring, ALIGN))
        self.res = PoolResources.create(self.handle)
        try:
            self._init_tables(slot_bytes, demand_bytes)
        except BaseException:
            self.res.unlink()
            raise
        self.procs: list[mp.process.BaseProcess | None] = [None] * cfg.workers
        self.outstanding: list[dict[int, int]] = [{} for _ in range(cfg.workers)]  # worker -> {slot: seq}
        first = [len(cfg.dram_groups) + j * per_client for j in range(cfg.n_clients)]
        self.clients = [ClientState(list(range(f, f + cfg.window_slots)),
                                    demand_slots=list(range(f + cfg.window_slots, f + per_client))) for f in first]
        self.owner_of = {s: j for j, cl in enumerate(self.clients) for s in cl.slots + cl.demand_slots}
        self.demand_slots = {s for cl in self.clients for s in cl.demand_slots}
        self.position: dict[int, int] = {}  # window slot -> sequence position it holds (demand: id << 32 | pos)
        self.stop_requested = False

    # ---- setup ---------------------------------------------------------------------------------
    def _init_tables(self, slot_bytes: int, demand_bytes: int) -> None:
        r, h = self.res, self.handle
        hd = r.header
        hd["magic"], hd["version"], hd["state"], hd["coord_pid"] = MAGIC, VERSION, POOL_STARTING, os.getpid()
        hd["n_groups"], hd["n_slots"], hd["n_workers"], hd["n_clients"] = h.n_groups, h.n_slots, h.n_workers, \
            h.n_clients
        hd["queue_cap"], hd["max_seq"], hd["ring_bytes"] = h.queue_cap, h.max_seq, h.ring_bytes
        hd["uuid"] = bytes.fromhex(self.image.uuid)
        dram = set(self.cfg.dram_groups)
        for i, name in enumerate(self.names):
            g = self.image.groups[name]
            r.groups[i] = (g.offset, g.size, g.crc32, TIER_DRAM if name in dram else TIER_STREAM, -1, 0)
        pos = 0
        for s, name in enumerate(self.cfg.dram_groups):
            size = self.image.groups[name].size
            r.slots[s] = (pos, size, self.index[name], SLOT_FREE, 0, -1, -1, 0, 0, 0)
            r.groups[self.index[name]]["slot"] = s
            pos += size
        per_client = self.cfg.window_slots + self.cfg.demand_slots
        for s in range(len(self.cfg.dram_groups), h.n_slots):
            size = slot_bytes if (s - len(self.cfg.dram_groups)) % per_client < self.cfg.window_slots else \
                demand_bytes
            r.slots[s] = (pos, size, -1, SLOT_FREE, 0, -1, -1, 0, 0, 0)
            pos += size
        r.clients[:] = (CLIENT_FREE, 0, 0, 0)
        self.heartbeat()

    def heartbeat(self) -> None:
        self.res.header["heartbeat_ns"] = time.monotonic_ns()

    def log(self, msg: str) -> None:
        print(f"[pool {self.cfg.name} pid {os.getpid()}] {msg}", file=sys.stderr, flush=True)

    def should_stop(self) -> bool:
        """Asked to stop (``pool stop``, SIGTERM) or orphaned (a private pool whose run is gone)."""
        return self.stop_requested or _SIGNALLED[0] or not self.owner_alive()

    def start_workers(self) -> bool:
        """Start every worker, heartbeating between them; False if told to stop meanwhile (the started ones
        are stopped by ``shutdown``)."""
        for i in range(self.cfg.workers):
            if self.should_stop():
                self.log(f"stopping while starting its I/O workers ({i} of {self.cfg.workers} started)")
                return False
            self.start_worker(i)
            self.heartbeat()
        return True

    def start_worker(self, i: int) -> None:
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=worker_main, args=(self.handle, i, str(self.image.path), self.cfg.worker_opts),
                        name=f"llms-io-{i}", daemon=False)
        p.start()
        self.procs[i] = p

    # ---- reads ---------------------------------------------------------------------------------
    def queue_read(self, slot: int, group: int, avoid: int = -1) -> None:
        """Assign ``group`` to ``slot`` with a new seq and hand the read to the least busy worker (not ``avoid``
        when there is another)."""
        s = self.res.slots[slot]
        s["group"], s["seq"], s["state"], s["error"] = group, int(s["seq"]) + 1, SLOT_QUEUED, 0
        w = min((i for i in range(self.cfg.workers) if i != avoid or self.cfg.workers == 1),
                key=lambda i: len(self.outstanding[i]))
        s["worker"] = w
        self.outstanding[w][slot] = int(s["seq"])
        self.res.requests[w].put(MSG_READ, slot, int(s["seq"]))

    def on_done(self, w: int, slot: int, seq: int, status: int) -> None:
        s = self.res.slots[slot]
        if self.outstanding[w].get(slot) == seq:
            del self.outstanding[w][slot]
        if int(s["seq"]) != seq or int(s["state"]) != SLOT_QUEUED:
            return  # stale: the read was re-issued after its worker died
        s["reads"] += 1
        g = int(s["group"])
        if status == 0:
            self._on_read_ok(slot, g)
        elif self._is_orphan(slot):
            self._recycle_orphan(slot)
        elif int(s["reads"]) < 2:
            self.res.header["retries"] += 1
            self.log(f"read of group {self.names[g]} failed ({self._status_text(slot, g, status)}); retrying once")
            self.queue_read(slot, g, avoid=w)
        else:
            self._on_read_failed(slot, g, status)

    def _is_orphan(self, slot: int) -> bool:
        """A window slot whose client stopped its stream or died while the slot's read was in flight."""
        return slot >= len(self.cfg.dram_groups) and int(self.res.slots[slot]["owner"]) < 0

    def _recycle_orphan(self, slot: int) -> None:
        self.free_slot(slot)  # its read is over: the slot can take a new one
        self.fill_window(self.owner_of[slot])

    def _on_read_ok(self, slot: int, g: int) -> None:
        r, s = self.res, self.res.slots[slot]
        s["state"] = SLOT_READY
        r.groups[g]["reads"] += 1
        tier = int(r.groups[g]["tier"])
        demand = slot in self.demand_slots
        r.header["bytes_demand" if demand else "bytes_dram" if tier == TIER_DRAM and slot < len(self.cfg.dram_groups)
                 else "bytes_stream"] += int(r.groups[g]["size"])
        r.header["reads"] += 1
        owner = int(s["owner"])
        if owner >= 0:
            r.events[owner].put(MSG_DEMAND_READY if demand else MSG_READY, slot, int(s["seq"]),
                                self.position.get(slot, -1))
        elif self._is_orphan(slot):
            self._recycle_orphan(slot)

    def _status_text(self, slot: int, g: int, status: int) -> str:
        grp = self.res.groups[g]
        where = f"group {self.names[g]} at offset {int(grp['offset'])} of {self.image.path}"
        if status == ERR_CRC:
            return f"{where}: crc32 {int(self.res.slots[slot]['error']):#010x}, expected {int(grp['crc']):#010x}"
        return f"{where}: {os.strerror(status)}"

    def _on_read_failed(self, slot: int, g: int, status: int) -> None:
        r, s = self.res, self.res.slots[slot]
        s["state"] = SLOT_ERROR
        r.header["errors"] += 1
        text = self._status_text(slot, g, status)
        self.log(f"read failed twice: {text}")
        owner = int(s["owner"])
        if owner >= 0 and slot in self.demand_slots:
            r.set_error(text)
            r.events[owner].put(MSG_DEMAND_FAILED, slot, int(s["seq"]), self.position.get(slot, -1))
        elif owner >= 0:
            r.set_error(text)
            r.events[owner].put(MSG_FAILED, slot, g, status)
        else:  # a DRAM-tier fill failed: the pool cannot serve
            r.set_error(text)
            r.header["state"] = POOL_FAILED

    # ---- clients -------------------------------------------------------------------------------
    def on_command(self, j: int, kind: int, a: int, b: int, c: int) -> None:
        cl, r = self.clients[j], self.res
        if kind == MSG_START:
            cl.sequence, cl.cyclic, cl.cursor, cl.active = [int(x) for x in r.sequences[j][:a]], bool(b), 0, True
            r.clients[j]["seq_len"], r.clients[j]["cyclic"] = a, int(bool(b))  # for pool status
            r.events[j].put(MSG_STARTED, a)  # the client drops every event before this one (runtime/ipc/shm.py)
            self.fill_window(j)
        elif kind == MSG_RELEASE:
            s = r.slots[a]
            if int(s["owner"]) == j and int(s["seq"]) == b and int(s["state"]) == SLOT_READY:
                self.free_slot(a)
                self.fill_window(j)
        elif kind == MSG_DEMAND:  # the rest of an earlier demand not issued yet is dropped
            cl.demand, cl.demand_id, cl.demand_cursor = [int(x) for x in r.demands[j][:a]], b, 0
            r.events[j].put(MSG_DEMANDED, a, b)  # the client may write its demand region again
            self.fill_window(j)
        elif kind == MSG_STOP_STREAM:
            cl.active = False
            cl.demand, cl.demand_cursor = [], 0
            r.clients[j]["seq_len"], r.clients[j]["cyclic"] = 0, 0
            for slot in cl.slots + cl.demand_slots:
                if int(r.slots[slot]["state"]) in (SLOT_READY, SLOT_ERROR):
                    self.free_slot(slot)
                elif int(r.slots[slot]["state"]) == SLOT_QUEUED:  # freed when its read completes (on_done)
                    r.slots[slot]["owner"] = -1
            if c:
                r.clients[j]["state"] = CLIENT_FREE

    def free_slot(self, slot: int) -> None:
        s = self.res.slots[slot]
        s["state"], s["owner"], s["group"], s["reads"] = SLOT_FREE, -1, -1, 0
        self.position.pop(slot, None)

    def fill_window(self, j: int) -> None:
        """Issue reads into client ``j``'s free window slots (its sequence) and demand slots (its demand)."""
        cl = self.clients[j]
        for slot in cl.demand_slots:
            if cl.demand_cursor >= len(cl.demand):
                break
            s = self.res.slots[slot]
            if int(s["state"]) != SLOT_FREE:
                continue
            s["owner"] = j
            self.position[slot] = cl.demand_id << 32 | cl.demand_cursor
            self.queue_read(slot, cl.demand[cl.demand_cursor])
            cl.demand_cursor += 1
        if not cl.active or not cl.sequence:
            return
        for slot in cl.slots:
            if not cl.cyclic and cl.cursor >= len(cl.sequence):
                return
            s = self.res.slots[slot]
            if int(s["state"]) != SLOT_FREE:
                continue
            s["owner"] = j
            self.position[slot] = cl.cursor
            self.queue_read(slot, cl.sequence[cl.cursor % len(cl.sequence)])
            cl.cursor += 1

    def check_clients(self) -> None:
        for j, row in enumerate(self.res.clients):
            if int(row["state"]) == CLIENT_ATTACHED and not pid_alive(int(row["pid"])):
                self.log(f"client {j} (pid {int(row['pid'])}) died; releasing its slots")
                self.on_command(j, MSG_STOP_STREAM, 0, 0, 1)

    # ---- workers -------------------------------------------------------------------------------
    def check_workers(self) -> None:
        for i, p in enumerate(self.procs):
            if p is not None and p.exitcode is not None and not self.should_stop():
                self.replace_worker(i, p.exitcode)

    def replace_worker(self, i: int, exitcode: int) -> None:
        self.log(f"I/O worker {i} (pid {self.procs[i].pid}) exited with {exitcode}; replacing it and re-issuing "
                 f"{len(self.outstanding[i])} read(s)")
        self.res.header["worker_restarts"] += 1
        for kind, slot, seq, status in self.res.completions[i].drain():  # results it managed to post still count
            if kind == MSG_DONE:
                self.on_done(i, slot, seq, status)
        self.res.requests[i].reset()
        lost, self.outstanding[i] = self.outstanding[i], {}
        self.start_worker(i)
        for slot in lost:
            if int(self.res.slots[slot]["state"]) == SLOT_QUEUED:
                self.queue_read(slot, int(self.res.slots[slot]["group"]))

    # ---- main loop -----------------------------------------------------------------------------
    def step(self) -> None:
        sem_wait(self.res.sem_coord, LOOP_S)
        self.heartbeat()
        for i in range(self.cfg.workers):
            for kind, slot, seq, status in self.res.completions[i].drain():
                if kind == MSG_DONE:
                    self.on_done(i, slot, seq, status)
        for j in range(self.cfg.n_clients):
            for kind, a, b, c in self.res.commands[j].drain():
                self.on_command(j, kind, a, b, c)

    def fill_dram_tier(self) -> None:
        r = self.res
        r.header["state"] = POOL_FILLING
        n, total = len(self.cfg.dram_groups), sum(self.image.groups[g].size for g in self.cfg.dram_groups)
        t0, last = time.monotonic(), 0.0
        for s in range(n):
            self.queue_read(s, int(r.slots[s]["group"]) if int(r.slots[s]["group"]) >= 0 else
                            self.index[self.cfg.dram_groups[s]])
        while sum(int(r.slots[s]["state"]) == SLOT_READY for s in range(n)) < n:
            if int(r.header["state"]) == POOL_FAILED or self.should_stop():
                return
            self.step()
            self.check_workers()
            if time.monotonic() - last > 2.0 and total and not self.cfg.quiet:
                last = time.monotonic()
                done = int(r.header["bytes_dram"])
                self.log(f"filling DRAM tier: {done / 1e9:.2f} / {total / 1e9:.2f} GB "
                         f"({done / 1e9 / max(last - t0, 1e-9):.2f} GB/s)")
        if n:
            dt = time.monotonic() - t0
            if not self.cfg.quiet:
                self.log(f"DRAM tier filled: {n} groups, {total / 1e9:.2f} GB in {dt:.2f} s "
                         f"({total / 1e9 / max(dt, 1e-9):.2f} GB/s)")
            if self.trace:
                self.trace.span("fill DRAM tier", "pool", "pool", int(t0 * 1e9), time.monotonic_ns(),
                                {"groups": n, "bytes": total, "GBps": round(total / 1e9 / max(dt, 1e-9), 3)})

    def owner_alive(self) -> bool:
        return self.cfg.owner_pid is None or pid_alive(self.cfg.owner_pid)

    def serve(self) -> None:
        if not self.start_workers():
            return
        self.fill_dram_tier()
        if int(self.res.header["state"]) == POOL_FILLING:
            self.res.header["state"] = POOL_RUNNING
        last_check = 0.0
        while not self.should_stop():
            self.step()
            if time.monotonic() - last_check > 0.2:
                last_check = time.monotonic()
                self.check_workers()
                self.check_clients()

    def shutdown(self) -> None:
        """Idempotent: stop workers (STOP, then terminate, then kill), unlink every resource."""
        self.stop_requested = True
        try:
            self.res.header["state"] = POOL_STOPPING
            for i, p in enumerate(self.procs):
                if p is not None and p.exitcode is None:
                    self.res.requests[i].put(MSG_STOP)
            stop_processes([p for p in self.procs if p is not None], grace_s=2.0 if self.trace is None else 30.0)
            for i, p in enumerate(self.procs):
                if p is not None and p.exitcode != 0:
                    self.log(f"I/O worker {i} (pid {p.pid}) exited with {p.exitcode} at shutdown")
        finally:
            self.res.unlink()
            if self.trace:
                self.trace.dump(self.cfg.worker_opts.trace_dir)


def check_worker_count(workers: int, image_path: str, inflight: int) -> None:
    """Refuse more I/O workers than can be useful for ``image_path`` on this machine (blockdev.worker_limit)."""
    limit, why = worker_limit(image_path, inflight)
    if not 1 <= workers <= limit:
        raise ConfigError(f"--workers {workers}: 1 to {limit} I/O workers are useful for {image_path} here ({why})")


def coordinator_main(cfg: PoolConfig, ready) -> None:
    """Process entry point: build the pool, report its handle (or the error) through ``ready``, serve."""
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN if cfg.owner_pid else on_stop_signal)
    try:
        coord = Coordinator(cfg)
    except Exception as e:
        ready.send(("error", f"{e}"))
        return
    try:
        if coord.should_stop():  # signalled, or the run gone, while the shared memory was made
            return
        ready.send(("ok", coord.handle))
        ready.close()
        coord.serve()
    finally:
        coord.shutdown()


class PrivatePool:
    """A coordinator child process for one run. Use as a context manager; ``handle`` attaches clients."""

    def __init__(self, cfg: PoolConfig, start_timeout_s: float = 60.0) -> None:
        self.handle: PoolHandle | None = None  # set once the coordinator reported its pool
        ctx = mp.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=coordinator_main, args=(cfg, send), name=f"llms-pool-{cfg.name}")
        self.proc.start()
        send.close()
        self.grace_s = 5.0 if cfg.worker_opts.trace_dir is None else 60.0  # traced: its processes write files
        if not recv.poll(start_timeout_s):
            self.stop()
            raise UserError(f"pool {cfg.name!r}: coordinator did not start within {start_timeout_s:.0f} s")
        try:
            status, payload = recv.recv()
        except EOFError:
            self.stop()
            raise UserError(f"pool {cfg.name!r}: coordinator exited during start (code {self.proc.exitcode})") \
                from None
        if status != "ok":
            self.stop()
            raise UserError(payload)
        self.handle = payload

    def stop(self) -> None:
        if self.proc.exitcode is None:
            self.proc.terminate()
        stop_processes([self.proc], grace_s=self.grace_s)
        if self.handle is not None and self.proc.exitcode not in (0, -signal.SIGTERM):
            unlink_all(self.handle)  # the coordinator died without its finally: clean up what it left

    def __enter__(self) -> PrivatePool:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["Coordinator", "PrivatePool", "check_worker_count", "coordinator_main"]
