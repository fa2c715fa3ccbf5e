"""Shared memory of a pool: the data ring, the control block (slot table, group table, queues), semaphores.

Owners. The coordinator creates every resource below (``PoolResources.create``) and unlinks them all in a
``finally`` (``PoolResources.unlink``); I/O workers and clients only attach (``PoolResources.attach``) and
never unlink. Names are per user and per pool, ``/llms.<uid>.<pool>.<what>``, created with mode 0600.

    /llms.<uid>.<pool>.ring    data: DRAM-tier extents and window slots, 4 KiB-aligned, O_DIRECT targets
    /llms.<uid>.<pool>.ctl     control block (layout below)
    /llms.<uid>.<pool>.coord   semaphore: posted to wake the coordinator (a worker or client queued something)
    /llms.<uid>.<pool>.w<i>    semaphore: posted to wake I/O worker i
    /llms.<uid>.<pool>.c<j>    semaphore: posted to wake client j

Control block layout (little-endian; numpy structured arrays over one mmap, offsets from ``ControlLayout``):

    header     HEADER_DTYPE: magic, version, state, coordinator pid, heartbeat (CLOCK_MONOTONIC ns), sizes,
               image uuid, counters (bytes read per tier, reads, retries, errors)
    groups     GROUP_DTYPE x n_groups: image offset, extent size, crc32, tier, DRAM slot (or -1)
    slots      SLOT_DTYPE x n_slots: ring offset, capacity, group, state, seq, owner, worker, error, reads
    queues     for each worker i: requests (coordinator -> worker i), completions (worker i -> coordinator);
               for each client j: commands (client j -> coordinator), events (coordinator -> client j)
    workers    WORKER_DTYPE x n_workers: pid, bytes read, reads, errors, reads in flight (row i written by worker i)
    error      1 KiB of UTF-8: the pool's fatal error, if any (coordinator writes, clients report it)
    clients    CLIENT_DTYPE x n_clients: state, pid, sequence length, cyclic flag, and a sequence of group ids
    demands    per client: a demand's group ids (n_groups int32)

Every queue is single-producer single-consumer (``SpscQueue``): ``head`` is written only by the producer,
``tail`` only by the consumer. The producer writes the entry, then advances ``head``, then posts the
consumer's semaphore; the semaphore post/wait pair orders the entry's bytes before the consumer reads them.
Capacity is 2 x n_slots + 16: at most one message per slot is outstanding in any queue (plus, in a client's
events, the STARTED answers to its STARTs; the client drains its events at every START), so a queue never
fills (a full queue is a protocol bug and raises).

Slot states and who moves them (``seq`` increments on every new assignment; a message whose seq does not
match the slot's current seq is stale and ignored, which is what makes re-issued reads safe):

    FREE --coordinator: assign group, seq+1, queue READ to a worker--> QUEUED
    QUEUED --worker: read + crc32 ok--> (DONE message) --coordinator--> READY
    QUEUED --worker: read error / crc mismatch--> (DONE with error) --coordinator: retry once, else--> ERROR
    READY (window slot) --coordinator: READY event to its client; client RELEASE message--> FREE
    READY / ERROR (window slot) --coordinator: its client's STOP_STREAM, or the client died--> FREE
    QUEUED (window slot) --coordinator: its client's STOP_STREAM, or the client died--> QUEUED, owner -1 (orphaned:
        a worker may still be writing into it) --coordinator, on its DONE, whatever the status--> FREE
    READY (DRAM tier) stays READY for the pool's lifetime; clients read it in place and never release it.
    any --coordinator: its worker died--> re-queued to a live worker with seq+1
A slot's ``reads`` counts the completed reads of its current assignment (a retry is the second); FREE resets it.

Sequences. A client writes its sequence into its region and sends START; READY events carry the sequence position
they fill. The coordinator answers START with STARTED before any READY of the new sequence, and a client drops
every event it drains before that marker: they belong to its earlier sequence, or to a dead client that had the
same index (the coordinator sends nothing to a client's index after processing its STOP_STREAM or its death).

Demands (a mixture's streamed experts, read out of the cycle's order once a layer has routed: runtime/engine/
streamed.py). A client's ring region is its W window slots, then its D *demand slots*. It writes a list of group
ids into its demand region and sends DEMAND(count, id); the coordinator copies the list, answers DEMANDED(count,
id), and reads the groups in order into the client's free demand slots, each READY announced by DEMAND_READY(slot,
seq, id << 32 | position) and released by the client's RELEASE like a window slot's. A new DEMAND replaces what is
left unissued of the last; a client writes its demand region again only once the DEMANDED of its last DEMAND has
arrived (so the coordinator has copied it). A client drops a DEMAND_READY of another id (an earlier demand, or a
dead client's on the same index) and releases its slot (a stale slot of a dead client is no longer its: the
coordinator ignores the release). A demand read that fails twice is DEMAND_FAILED(slot, seq, id << 32 | position).
Demand slots follow the window slots' states and faults (re-issued when their worker dies, orphaned by STOP_STREAM
or the client's death while a read is in flight).

Message entries are four int64 fields ``(kind, a, b, c)``; the kinds are the ``MSG_*`` constants.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
import posix_ipc

from model.errors import UserError
from runtime.ipc.procs import DAEMON_MODULE, pid_alive

MAGIC = 0x4C4C4D5343544C31  # "LLMSCTL1"
VERSION = 2  # 2: demands (their messages, the demand regions, bytes_demand)

# pool states (header.state)
POOL_STARTING, POOL_FILLING, POOL_RUNNING, POOL_STOPPING, POOL_FAILED = 1, 2, 3, 4, 5
STATE_NAMES = {POOL_STARTING: "starting", POOL_FILLING: "filling", POOL_RUNNING: "running",
               POOL_STOPPING: "stopping", POOL_FAILED: "failed"}
# slot states
SLOT_FREE, SLOT_QUEUED, SLOT_READY, SLOT_ERROR = 0, 1, 2, 3
# tiers (groups.tier)
TIER_GPU, TIER_DRAM, TIER_STREAM = 0, 1, 2
# client states
CLIENT_FREE, CLIENT_ATTACHED = 0, 1

# message kinds
MSG_READ = 1  # coordinator -> worker: a=slot, b=seq
MSG_STOP = 2  # coordinator -> worker: exit
MSG_DONE = 3  # worker -> coordinator: a=slot, b=seq, c=0 ok / errno > 0 / ERR_CRC with crc stored in slot.error
MSG_START = 4  # client -> coordinator: a=sequence length (in the client's region), b=cyclic (0/1)
MSG_RELEASE = 5  # client -> coordinator: a=slot, b=seq
MSG_STOP_STREAM = 6  # client -> coordinator: cancel the client's sequence; c=detach (1) or not (0)
MSG_READY = 7  # coordinator -> client: a=slot, b=seq, c=sequence position
MSG_FAILED = 8  # coordinator -> client: a=slot, b=group, c=error code (crc, errno)
MSG_STARTED = 9  # coordinator -> client: a=sequence length; START is in effect (events before it are stale)
MSG_DEMAND = 10  # client -> coordinator: a=group count (in the client's demand region), b=demand id
MSG_DEMANDED = 11  # coordinator -> client: a=group count, b=demand id; the demand region may be written again
MSG_DEMAND_READY = 12  # coordinator -> client: a=slot, b=seq, c=demand id << 32 | position
MSG_DEMAND_FAILED = 13  # coordinator -> client: a=slot, b=seq, c=demand id << 32 | position (the pool's error text)
DEMAND_ID_BITS = 31  # a demand id is below 2**31
ERR_CRC = -1

HEADER_DTYPE = np.dtype([
    ("magic", "<u8"), ("version", "<u4"), ("state", "<u4"), ("coord_pid", "<i8"), ("heartbeat_ns", "<u8"),
    ("n_groups", "<u4"), ("n_slots", "<u4"), ("n_workers", "<u4"), ("n_clients", "<u4"), ("queue_cap", "<u4"),
    ("max_seq", "<u4"), ("ring_bytes", "<u8"), ("uuid", "S16"),
    ("bytes_dram", "<u8"), ("bytes_stream", "<u8"), ("reads", "<u8"), ("retries", "<u8"), ("errors", "<u8"),
    ("worker_restarts", "<u8"), ("bytes_demand", "<u8"),
])
GROUP_DTYPE = np.dtype([("offset", "<u8"), ("size", "<u8"), ("crc", "<u4"), ("tier", "<i4"), ("slot", "<i4"),
                        ("reads", "<u4")])  # reads: completed disk reads of this group (coordinator counts)
WORKER_DTYPE = np.dtype([("pid", "<i8"), ("bytes_read", "<u8"), ("reads", "<u8"), ("errors", "<u8"),
                         ("inflight", "<u4"), ("direct", "<u4")])  # each row written only by its worker
ERROR_TEXT_BYTES = 1024
SLOT_DTYPE = np.dtype([("ring_offset", "<u8"), ("capacity", "<u8"), ("group", "<i4"), ("state", "<u4"),
                       ("seq", "<u8"), ("owner", "<i4"), ("worker", "<i4"), ("error", "<i8"), ("reads", "<u4"),
                       ("pad", "<u4")])
CLIENT_DTYPE = np.dtype([("state", "<u4"), ("pid", "<i4"), ("seq_len", "<u4"), ("cyclic", "<u4")])
QUEUE_HEAD_DTYPE = np.dtype([("head", "<u8"), ("pad0", "<u8", (7,)), ("tail", "<u8"), ("pad1", "<u8", (7,))])
ENTRY_DTYPE = np.dtype([("kind", "<i8"), ("a", "<i8"), ("b", "<i8"), ("c", "<i8")])


def sem_wait(sem: posix_ipc.Semaphore, timeout_s: float) -> bool:
    """Wait on ``sem`` for at most ``timeout_s``; False on timeout or when a signal interrupted the wait."""
    try:
        sem.acquire(timeout_s)
        return True
    except (posix_ipc.BusyError, posix_ipc.SignalError):
        return False


def _align(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class PoolHandle:
    """Everything a process needs to attach: plain names and sizes (picklable, spawn-safe)."""

    name: str
    uid: int
    n_groups: int
    n_slots: int
    n_workers: int
    n_clients: int
    ring_bytes: int

    @property
    def prefix(self) -> str:
        return f"/llms.{self.uid}.{self.name}"

    def sem_name(self, what: str) -> str:
        return f"{self.prefix}.{what}"

    @property
    def queue_cap(self) -> int:
        return 2 * self.n_slots + 16

    @property
    def max_seq(self) -> int:
        return 2 * self.n_groups + 2


def validate_pool_name(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_" for c in name):
        raise UserError(f"pool name {name!r} must be 1-64 characters of letters, digits, '-' and '_'")
    return name


class ControlLayout:
    """Byte offsets of every table in the control block, computed from the handle's sizes."""

    def __init__(self, h: PoolHandle) -> None:
        pos = 0

        def take(nbytes: int) -> int:
            nonlocal pos
            start, pos = pos, _align(pos + nbytes)
            return start

        qbytes = QUEUE_HEAD_DTYPE.itemsize + h.queue_cap * ENTRY_DTYPE.itemsize
        self.header = take(HEADER_DTYPE.itemsize)
        self.groups = take(GROUP_DTYPE.itemsize * h.n_groups)
        self.slots = take(SLOT_DTYPE.itemsize * h.n_slots)
        self.workers = take(WORKER_DTYPE.itemsize * h.n_workers)
        self.error = take(ERROR_TEXT_BYTES)
        self.worker_queues = [(take(qbytes), take(qbytes)) for _ in range(h.n_workers)]
        self.client_queues = [(take(qbytes), take(qbytes)) for _ in range(h.n_clients)]
        self.clients = take(CLIENT_DTYPE.itemsize * h.n_clients)
        self.sequences = [take(4 * h.max_seq) for _ in range(h.n_clients)]
        self.demands = [take(4 * h.n_groups) for _ in range(h.n_clients)]
        self.size = _align(pos, mmap.PAGESIZE)


class SpscQueue:
    """A single-producer single-consumer queue of ENTRY_DTYPE records in shared memory (see module doc)."""

    def __init__(self, buf: memoryview, offset: int, cap: int, sem: posix_ipc.Semaphore, what: str) -> None:
        self.idx = np.frombuffer(buf, QUEUE_HEAD_DTYPE, 1, offset)[0]
        self.entries = np.frombuffer(buf, ENTRY_DTYPE, cap, offset + QUEUE_HEAD_DTYPE.itemsize)
        self.cap, self.sem, self.what = cap, sem, what

    def put(self, kind: int, a: int = 0, b: int = 0, c: int = 0) -> None:
        head, tail = int(self.idx["head"]), int(self.idx["tail"])
        if head - tail >= self.cap:
            raise RuntimeError(f"queue {self.what} is full ({self.cap} entries): protocol bug")
        self.entries[head % self.cap] = (kind, a, b, c)
        self.idx["head"] = head + 1
        self.sem.release()

    def drain(self) -> list[tuple[int, int, int, int]]:
        head, tail = int(self.idx["head"]), int(self.idx["tail"])
        out = [tuple(int(x) for x in self.entries[i % self.cap]) for i in range(tail, head)]
        self.idx["tail"] = head
        return out

    def reset(self) -> None:
        """Drop unconsumed entries (the coordinator does this for a dead consumer's queue only)."""
        self.idx["tail"] = int(self.idx["head"])


class PoolResources:
    """The attached (or created) segments, their numpy views, and the semaphores of one pool."""

    def __init__(self, h: PoolHandle, create: bool, ring: str = "rw") -> None:
        """``ring``: "rw" maps the data ring writable (the coordinator, workers), "ro" read-only (a client of
        a daemon pool), "none" not at all (monitoring, pool commands)."""
        self.handle, self.created, self.layout = h, create, ControlLayout(h)
        self._sems: list[posix_ipc.Semaphore] = []
        flags = posix_ipc.O_CREX if create else 0
        self.ctl: mmap.mmap | None = None
        self.ring: mmap.mmap | None = None
        try:
            self.ctl = self._map(h.prefix + ".ctl", self.layout.size, flags)
            if ring != "none":
                self.ring = self._map(h.prefix + ".ring", h.ring_bytes, flags, read_only=ring == "ro")
            self.sem_coord = self._sem("coord", flags)
            self.sem_workers = [self._sem(f"w{i}", flags) for i in range(h.n_workers)]
            self.sem_clients = [self._sem(f"c{j}", flags) for j in range(h.n_clients)]
        except posix_ipc.ExistentialError as e:
            self.close()
            if create:
                raise UserError(f"pool {h.name!r}: a shared resource of that name exists already ({e}); another "
                                f"pool is running under this name, or a dead one left it: launch.py pool cleanup") \
                    from None
            raise UserError(f"pool {h.name!r}: its shared memory is gone ({e}); the pool has stopped") from None
        except UserError:
            self.close()
            raise
        except BaseException:
            if create:
                unlink_all(h)
            self.close()
            raise
        self._views()

    @classmethod
    def create(cls, h: PoolHandle) -> PoolResources:
        return cls(h, create=True)

    @classmethod
    def attach(cls, h: PoolHandle, ring: str | bool = "rw") -> PoolResources:
        return cls(h, create=False, ring={True: "rw", False: "none"}.get(ring, ring))

    def _map(self, name: str, size: int, flags: int, read_only: bool = False) -> mmap.mmap:
        shm = posix_ipc.SharedMemory(name, flags, mode=0o600, size=size if flags else 0, read_only=read_only)
        try:
            st = os.fstat(shm.fd)
            if st.st_uid != os.getuid():  # names are per user, but /dev/shm is shared: never attach another's
                raise UserError(f"pool {self.handle.name!r}: {name} belongs to uid {st.st_uid}, not to this user "
                                f"(uid {os.getuid()}): refused")
            if st.st_size < size:
                raise UserError(f"pool {self.handle.name!r}: {name} is {st.st_size} bytes, expected {size} (stale "
                                f"or foreign segment); launch.py pool cleanup")
            return mmap.mmap(shm.fd, size, prot=mmap.PROT_READ if read_only else mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            shm.close_fd()

    def _sem(self, what: str, flags: int) -> posix_ipc.Semaphore:
        sem = posix_ipc.Semaphore(self.handle.sem_name(what), flags, mode=0o600, initial_value=0)
        self._sems.append(sem)
        return sem

    def _views(self) -> None:
        h, lay, buf = self.handle, self.layout, memoryview(self.ctl)
        self.header = np.frombuffer(buf, HEADER_DTYPE, 1, lay.header)[0]
        self.groups = np.frombuffer(buf, GROUP_DTYPE, h.n_groups, lay.groups)
        self.slots = np.frombuffer(buf, SLOT_DTYPE, h.n_slots, lay.slots)
        self.clients = np.frombuffer(buf, CLIENT_DTYPE, h.n_clients, lay.clients)
        self.workers = np.frombuffer(buf, WORKER_DTYPE, h.n_workers, lay.workers)
        self.error_text = np.frombuffer(buf, np.uint8, ERROR_TEXT_BYTES, lay.error)
        self.sequences = [np.frombuffer(buf, "<i4", h.max_seq, off) for off in lay.sequences]
        self.demands = [np.frombuffer(buf, "<i4", h.n_groups, off) for off in lay.demands]
        cap = h.queue_cap
        self.requests = [SpscQueue(buf, rq, cap, self.sem_workers[i], f"requests of worker {i}")
                         for i, (rq, _) in enumerate(lay.worker_queues)]
        self.completions = [SpscQueue(buf, cq, cap, self.sem_coord, f"completions of worker {i}")
                            for i, (_, cq) in enumerate(lay.worker_queues)]
        self.commands = [SpscQueue(buf, cq, cap, self.sem_coord, f"commands of client {j}")
                         for j, (cq, _) in enumerate(lay.client_queues)]
        self.events = [SpscQueue(buf, eq, cap, self.sem_clients[j], f"events of client {j}")
                       for j, (_, eq) in enumerate(lay.client_queues)]

    @property
    def ring_readonly(self) -> bool:
        return self.ring is not None and memoryview(self.ring).readonly

    def set_error(self, text: str) -> None:
        """Coordinator only: the pool's fatal error, for clients to report."""
        raw = text.encode()[:ERROR_TEXT_BYTES - 1]
        self.error_text[:] = 0
        self.error_text[:len(raw)] = np.frombuffer(raw, np.uint8)

    def get_error(self) -> str:
        return bytes(self.error_text).split(b"\0", 1)[0].decode(errors="replace")

    def slot_view(self, slot: int, nbytes: int | None = None) -> memoryview:
        s = self.slots[slot]
        off, cap = int(s["ring_offset"]), int(s["capacity"])
        return memoryview(self.ring)[off:off + (cap if nbytes is None else nbytes)]

    def close(self) -> None:
        """Drop this process's mappings (numpy views first, so the mmaps can close)."""
        for attr in ("header", "groups", "slots", "clients", "workers", "error_text", "sequences", "demands",
                     "requests", "completions", "commands", "events"):
            self.__dict__.pop(attr, None)
        for m in (self.ctl, self.ring):
            try:
                if m is not None:
                    m.close()
            except BufferError:
                pass  # a caller still holds a view (e.g. tensors bound to slot memory); the OS unmaps at exit
        for sem in self._sems:
            sem.close()

    def unlink(self) -> None:
        """Creator only: remove every name of this pool (idempotent; missing names are fine)."""
        unlink_all(self.handle)
        self.close()


def unlink_all(h: PoolHandle) -> list[str]:
    """Unlink every segment and semaphore name of pool ``h``; returns the names that existed."""
    removed = []
    for name in (h.prefix + ".ctl", h.prefix + ".ring"):
        try:
            posix_ipc.unlink_shared_memory(name)
            removed.append(name)
        except posix_ipc.ExistentialError:
            pass
    for what in ["coord"] + [f"w{i}" for i in range(h.n_workers)] + [f"c{j}" for j in range(h.n_clients)]:
        try:
            posix_ipc.unlink_semaphore(h.sem_name(what))
            removed.append(h.sem_name(what))
        except posix_ipc.ExistentialError:
            pass
    return removed


def leftover_names(uid: int | None = None, pool: str | None = None) -> list[str]:
    """Shared-memory and semaphore names of this user's pools still present in /dev/shm (Linux)."""
    uid = os.getuid() if uid is None else uid
    prefix = f"llms.{uid}." + (f"{pool}." if pool else "")
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix) or n.startswith("sem." + prefix))


def live_header(name: str, uid: int | None = None):
    """The control-block header of pool ``name`` when a live coordinator owns it (its pid runs a daemon pool or
    a private pool's multiprocessing child: a reused pid does not), else None. /dev/shm is one namespace for
    every pool dir of a user: this is how a live pool of a name is recognised wherever it was recorded."""
    uid = os.getuid() if uid is None else uid
    try:
        shm = posix_ipc.SharedMemory(f"/llms.{uid}.{name}.ctl", 0, read_only=True)
    except posix_ipc.ExistentialError:
        return None
    try:
        if os.fstat(shm.fd).st_size < HEADER_DTYPE.itemsize:
            return None
        with mmap.mmap(shm.fd, HEADER_DTYPE.itemsize, prot=mmap.PROT_READ) as m:
            hd = np.frombuffer(m.read(HEADER_DTYPE.itemsize), HEADER_DTYPE, 1)[0]
    finally:
        shm.close_fd()
    pid = int(hd["coord_pid"])
    if int(hd["magic"]) != MAGIC or pid <= 0 or not pid_alive(pid):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except OSError:
        return hd
    return hd if DAEMON_MODULE.encode() in cmd or b"multiprocessing" in cmd else None


def header_uuid(hd) -> str:
    """The image uuid a control-block header holds, as hex (numpy's S16 drops trailing zero bytes)."""
    return bytes(hd["uuid"]).ljust(16, b"\0").hex()
