"""The client side of a pool: attach, ask for group sequences, and a streamed weight source for the model.

Runs in the GPU process (or the CPU process on a machine without a GPU). ``PoolClient`` is the attachment:
it claims a client row, writes sequences of group ids into its region, sends START / RELEASE / STOP_STREAM
commands, and waits for READY events on its semaphore; events that arrive before the STARTED answer to its
latest START are stale (an earlier sequence, or a dead client on the same index) and dropped. Every wait has
a timeout and checks that the coordinator is alive (its pid, and a heartbeat it refreshes every loop), so a
dead pool is reported within ``dead_after_s`` instead of hanging.

``StreamedWeights`` is the weight source for ``runtime.generate``. Its tiers come from a placement plan
(runtime/placement.py):
  - GPU tier: streamed through the window once at start and copied into tensors resident on the device.
  - DRAM tier: read in place from its ring slot (pinned for the pool's lifetime).
  - streamed set: the coordinator keeps the client's window filled in cyclic order; each group is used
    from its slot and the slot released right after.
On CUDA the ring is registered once with cudaHostRegister, and DRAM/streamed groups are copied on a
dedicated copy stream into K staging buffers, up to K groups ahead of compute, with CUDA events between the
streams (no synchronize in the layer loop); a slot is released once the event recorded after its copy has
completed. On the CPU the model computes straight from slot memory.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from model.errors import UserError
from model.llama import Weights
from runtime.image import TORCH_DTYPES, Image, tensor_views
from runtime.shm import (
    CLIENT_ATTACHED,
    MAGIC,
    MSG_FAILED,
    MSG_READY,
    MSG_RELEASE,
    MSG_START,
    MSG_STARTED,
    MSG_STOP_STREAM,
    POOL_FAILED,
    POOL_RUNNING,
    POOL_STOPPING,
    SLOT_READY,
    VERSION,
    PoolHandle,
    PoolResources,
    sem_wait,
)

REGISTER_CHUNK = 512 << 20  # the ring is registered in chunks of at least this size (at slot boundaries) ...
REGISTER_THREADS = min(16, os.cpu_count() or 1)  # ... from this many threads
MADV_POPULATE_READ = 22  # Linux 5.14: fault a range's pages in (read) before pinning them; faster from threads


class PoolDied(UserError):
    """The pool's coordinator is gone or failed; the message says which and why."""


class PoolClient:
    def __init__(self, handle: PoolHandle, index: int = 0, dead_after_s: float = 5.0, ring: str = "rw") -> None:
        """``ring``: "ro" maps the pool's data read-only (a client of a daemon pool; see runtime/daemon.py)."""
        self.handle, self.j, self.dead_after_s = handle, index, dead_after_s
        self.res = PoolResources.attach(handle, ring=ring)
        hd = self.res.header
        if int(hd["magic"]) != MAGIC or int(hd["version"]) != VERSION:
            raise UserError(f"pool {handle.name!r}: control block magic/version {int(hd['magic']):#x}/"
                            f"{int(hd['version'])}, expected {MAGIC:#x}/{VERSION}")
        row = self.res.clients[index]
        row["pid"], row["state"] = os.getpid(), CLIENT_ATTACHED
        self.ready: dict[int, tuple[int, int]] = {}  # sequence position -> (slot, seq)
        self.started = False  # the coordinator's STARTED for our latest START has arrived

    # ---- liveness ------------------------------------------------------------------------------
    def check_alive(self) -> None:
        hd = self.res.header
        state, pid = int(hd["state"]), int(hd["coord_pid"])
        if state == POOL_FAILED:
            raise PoolDied(f"pool {self.handle.name!r} failed: {self.res.get_error()}")
        if state == POOL_STOPPING:
            raise PoolDied(f"pool {self.handle.name!r} is stopping")
        age = (time.monotonic_ns() - int(hd["heartbeat_ns"])) / 1e9
        from runtime.pool import pid_alive

        if not pid_alive(pid):
            raise PoolDied(f"pool {self.handle.name!r}: coordinator pid {pid} is gone (last heartbeat {age:.1f} s "
                           f"ago); its clients cannot continue")
        if age > self.dead_after_s:
            raise PoolDied(f"pool {self.handle.name!r}: coordinator pid {pid} is not responding (last heartbeat "
                           f"{age:.1f} s ago: stopped or hung); its clients cannot continue")

    def wait_running(self, timeout_s: float = 3600.0) -> None:
        """Wait until the DRAM tier is filled (the pool serves)."""
        deadline = time.monotonic() + timeout_s
        while int(self.res.header["state"]) != POOL_RUNNING:
            self.check_alive()
            if time.monotonic() > deadline:
                raise PoolDied(f"pool {self.handle.name!r} did not finish filling its DRAM tier in {timeout_s:.0f} s")
            time.sleep(0.01)

    # ---- sequences -----------------------------------------------------------------------------
    def start(self, groups: list[int], cyclic: bool) -> None:
        seq = self.res.sequences[self.j]
        if len(groups) > len(seq):
            raise ValueError(f"sequence of {len(groups)} groups exceeds the region of {len(seq)}")
        seq[:len(groups)] = groups
        self.ready.clear()
        self.started = False
        self.res.events[self.j].drain()  # all stale (see _drain); keeps the queue short across restarts
        self.res.commands[self.j].put(MSG_START, len(groups), int(cyclic))

    def wait_ready(self, pos: int, timeout_s: float = 600.0) -> tuple[int, int]:
        """Block until the group at sequence position ``pos`` is in a slot; returns (slot, seq)."""
        deadline = time.monotonic() + timeout_s
        while pos not in self.ready:
            self._drain()
            if pos in self.ready:
                break
            if not sem_wait(self.res.sem_clients[self.j], 0.1):
                self.check_alive()
                if time.monotonic() > deadline:
                    raise PoolDied(f"pool {self.handle.name!r}: no data for sequence position {pos} after "
                                   f"{timeout_s:.0f} s")
        return self.ready.pop(pos)

    def _drain(self) -> None:
        for kind, a, b, c in self.res.events[self.j].drain():
            if kind == MSG_STARTED:
                self.started = True
            elif not self.started:
                continue  # an event of an earlier sequence (or of a dead client on this index): stale
            elif kind == MSG_READY:
                self.ready[c] = (a, b)
            elif kind == MSG_FAILED:
                raise PoolDied(f"pool {self.handle.name!r}: {self.res.get_error()}")

    def release(self, slot: int, seq: int) -> None:
        self.res.commands[self.j].put(MSG_RELEASE, slot, seq)

    def stop_stream(self, detach: bool = False) -> None:
        try:
            self.res.commands[self.j].put(MSG_STOP_STREAM, 0, 0, int(detach))
        except (ValueError, RuntimeError):
            pass

    def close(self) -> None:
        self.stop_stream(detach=True)
        self.res.close()


def _ring_tensor(res: PoolResources) -> torch.Tensor:
    """The ring as a flat uint8 tensor (not writable through it when the mapping is read-only)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(res.ring, dtype=torch.uint8)


class Registrar:
    """Registers a client's ring with CUDA (cudaHostRegister) in the background, in the order the client
    first copies from it, so that the first pass overlaps the registration instead of waiting for all of it.

    The ring is cut into chunks of >= REGISTER_CHUNK at slot boundaries (every copy reads within one slot,
    so within one registration). Chunks holding none of this client's slots (other clients' windows) are
    not registered. A chunk with DRAM-tier slots is registered once the pool has filled them: pinning a
    page the workers have read into costs little (19 GB/s from 16 threads for a freshly attached mapping
    on the H200 machine, with MADV_POPULATE_READ first), pinning a fresh page faults it in first (2 GB/s).
    Registrations run on REGISTER_THREADS threads; ``wait(slot)`` blocks until the slot's chunk is done and
    raises the registration's error, ``close()`` stops submitting, joins and unregisters everything."""

    def __init__(self, sw: StreamedWeights, first_use: list[int]) -> None:
        import concurrent.futures as cf
        import threading

        self.sw, self.res, self.device = sw, sw.res, sw.device
        self.base, size = sw.ring.data_ptr(), sw.ring.numel()
        offsets = [int(o) for o in self.res.slots["ring_offset"]]
        cuts = sorted(set(offsets) | {0}) + [size]
        chunks, start = [], 0
        for c in cuts[1:]:
            if c - start >= REGISTER_CHUNK or c == size:
                chunks.append((start, c - start))
                start = c
        self.chunk_of = {s: next(i for i, (o, n) in enumerate(chunks) if o <= offsets[s] < o + n)
                         for s in range(len(offsets))}
        rank: dict[int, int] = {}
        for r, s in enumerate(first_use):
            rank.setdefault(self.chunk_of[s], r)
        dram = {int(s) for s in self.res.groups["slot"] if s >= 0}
        self.members = {i: [s for s in dram if self.chunk_of[s] == i] for i in rank}
        self.order = sorted(rank, key=rank.get)  # the chunks to register, in the order of first use
        self.chunks = chunks
        self.flags = 1 | (8 if self.res.ring_readonly else 0)  # Portable, + ReadOnly for a read-only mapping
        self.done = {i: threading.Event() for i in self.order}
        self.errors: dict[int, int] = {}
        self.registered: list[int] = []
        self.pinned_bytes = 0  # registered so far
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self.t0 = time.perf_counter()
        self.pool = cf.ThreadPoolExecutor(max(1, min(REGISTER_THREADS, len(self.order))))
        self.thread = threading.Thread(target=self._submit_all, name="ring-registrar", daemon=True)
        self.thread.start()

    def _register(self, i: int) -> None:
        off, n = self.chunks[i]
        try:
            if self.stopping.is_set():
                return
            try:
                self.res.ring.madvise(MADV_POPULATE_READ, off, n)
            except (OSError, ValueError):
                pass  # an older kernel: cudaHostRegister faults the pages in itself
            with torch.cuda.device(self.device):
                err = int(torch.cuda.cudart().cudaHostRegister(self.base + off, n, self.flags))
            with self.lock:
                if err:
                    self.errors[i] = err
                else:
                    self.registered.append(self.base + off)
                    self.pinned_bytes += n
                if len(self.registered) + len(self.errors) == len(self.order):
                    self.sw.load_ms["ring_registered"] = (time.perf_counter() - self.t0) * 1e3
        finally:
            self.done[i].set()

    def _submit_all(self) -> None:
        """Submit each chunk, in order of first use, once its DRAM-tier slots are filled."""
        pending = list(self.order)
        try:
            while pending and not self.stopping.is_set():
                states = self.res.slots["state"]
                for i in [i for i in pending if all(int(states[s]) == SLOT_READY for s in self.members[i])]:
                    self.pool.submit(self._register, i)
                    pending.remove(i)
                if pending:
                    self.sw.client.check_alive()
                    time.sleep(0.002)
        except BaseException as e:  # the pool died or failed during the fill: waiters re-raise it
            self.failure = e
            for i in pending:
                self.done[i].set()

    def ready(self, slot: int) -> bool:
        i = self.chunk_of[slot]
        return i not in self.done or (self.done[i].is_set() and i not in self.errors and self.failure is None)

    def wait(self, slot: int, what: str) -> None:
        i = self.chunk_of[slot]
        if i not in self.done:
            raise RuntimeError(f"slot {slot} ({what}) is not among the client's slots to register")
        while not self.done[i].wait(0.05):
            self.sw.client.check_alive()
        if self.failure is not None:
            raise self.failure
        if i in self.errors:
            off, n = self.chunks[i]
            ro = " (a read-only mapping: this driver may not support cudaHostRegisterReadOnly)" \
                if self.flags & 8 else ""
            raise UserError(f"cudaHostRegister of the pool's ring failed with error {self.errors[i]} at offset "
                            f"{off} ({n} bytes), needed for {what}{ro}")

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.pool.shutdown(wait=True)  # every submitted registration has returned
        for ptr in self.registered:
            torch.cuda.cudart().cudaHostUnregister(ptr)
        self.registered, self.pinned_bytes = [], 0


class StreamedWeights:
    """Weight source over a pool (see module docstring). ``plan`` is a runtime.placement.Plan."""

    def __init__(self, image: Image, plan, client: PoolClient, device: torch.device, staging: int = 2,
                 trace=None) -> None:
        self.image, self.args, self.plan, self.client = image, image.args, plan, client
        self.trace = trace  # runtime.trace.ClientTrace with --trace: records copies and slot waits
        self.device, self.dtype = torch.device(device), TORCH_DTYPES[image.dtype]
        self.names = list(image.groups)
        self.gid = {n: i for i, n in enumerate(self.names)}
        self.res = client.res
        self.ring = _ring_tensor(self.res)
        self.cuda = self.device.type == "cuda"
        self.resident: dict[str, Weights] = {}
        self._check_dram_tier()
        self.sched = [g for g in plan.sequence if g not in plan.gpu]  # non-resident groups, pass order
        self.stream_seq = [g for g in plan.sequence if g in plan.stream]
        self.load_ms: dict[str, float] = {}
        # No waiting for the DRAM-tier fill or the ring's registration here: both go on in the background
        # (the pool's workers; the Registrar, in the order of first use), and each copy waits only for its
        # own slot (_wait_usable). The first pass thus overlaps the rest of the fill and registration.
        self.registered = self.cuda
        self.registrar = Registrar(self, self._first_use_slots()) if self.cuda else None
        try:
            t0 = time.perf_counter()
            self._load_gpu_tier()
            self.load_ms["gpu_tier"] = (time.perf_counter() - t0) * 1e3
            self.pos = 0  # position in sched (cyclic)
            self.stream_pos = 0  # absolute position in the streamed sequence
            self.held: tuple[int, int] | None = None  # CPU: the streamed slot the last group was computed from
            if self.stream_seq:
                client.start([self.gid[g] for g in self.stream_seq], cyclic=True)
            if self.cuda:
                self._init_pipeline(staging)
        except BaseException:
            if self.registrar is not None:
                self.registrar.close()
            raise

    # ---- setup ---------------------------------------------------------------------------------
    def _check_dram_tier(self) -> None:
        for g in self.plan.dram:
            if int(self.res.groups[self.gid[g]]["slot"]) < 0:
                raise UserError(f"pool {self.client.handle.name!r} does not hold {g} in its DRAM tier")

    def _slot_of(self, g: str) -> int:
        return int(self.res.groups[self.gid[g]]["slot"])

    def _window_slots(self) -> list[int]:
        """This client's window slots (the coordinator's layout: DRAM-tier slots, then W per client)."""
        n_dram = int((self.res.groups["slot"] >= 0).sum())
        w = (self.client.handle.n_slots - n_dram) // max(self.client.handle.n_clients, 1)
        return list(range(n_dram + self.client.j * w, n_dram + (self.client.j + 1) * w))

    def _first_use_slots(self) -> list[int]:
        """Every slot this client copies from, in the order of first use: the GPU tier (from the DRAM tier,
        or through the window), then one pass's groups (a streamed group: the window)."""
        order, window = [], self._window_slots()
        for g in list(self.plan.gpu) + self.sched:
            s = self._slot_of(g)
            order += [s] if s >= 0 and g not in self.plan.stream else window
        return list(dict.fromkeys(order))

    def _wait_usable(self, slot: int, what: str) -> None:
        """A DRAM-tier slot: wait until the pool has filled it; on CUDA also until it is registered."""
        if int(self.res.slots[slot]["state"]) != SLOT_READY:
            while int(self.res.slots[slot]["state"]) != SLOT_READY:
                self.client.check_alive()  # raises if the fill failed or the pool died
                time.sleep(0.001)
        if self.registrar is not None:
            self.registrar.wait(slot, what)

    def _usable_now(self, slot: int) -> bool:
        return int(self.res.slots[slot]["state"]) == SLOT_READY and (
            self.registrar is None or self.registrar.ready(slot))

    @property
    def pinned_bytes(self) -> int:
        """Bytes of the ring this process has registered with CUDA (its chunks; not other clients' windows)."""
        return self.registrar.pinned_bytes if self.registrar is not None else 0

    def slot_tensor(self, slot: int, nbytes: int) -> torch.Tensor:
        off = int(self.res.slots[slot]["ring_offset"])
        return self.ring[off:off + nbytes]

    def dram_views(self, g: str) -> Weights:
        spec = self.image.groups[g]
        return tensor_views(spec, self.slot_tensor(int(self.res.groups[self.gid[g]]["slot"]), spec.size))

    def _load_gpu_tier(self) -> None:
        """Copy the GPU tier to the device: from the pool's DRAM tier where it holds those groups (see
        runtime.engine.gpu_tier_in_dram), each group once its slot is filled and registered; else through
        the window, one group after another."""
        for g in self.plan.gpu:
            if self._slot_of(g) >= 0:
                self._wait_usable(self._slot_of(g), g)
                self.resident[g] = {k: v.to(self.device, copy=True, non_blocking=True)
                                    for k, v in self.dram_views(g).items()}
        if self.cuda and self.resident:
            torch.cuda.current_stream(self.device).synchronize()
        gpu = [g for g in self.plan.gpu if g not in self.resident]
        if not gpu:
            return
        self.client.start([self.gid[g] for g in gpu], cyclic=False)
        for pos, g in enumerate(gpu):
            slot, seq = self.client.wait_ready(pos)
            if self.registrar is not None:
                self.registrar.wait(slot, g)
            views = tensor_views(self.image.groups[g], self.slot_tensor(slot, self.image.groups[g].size))
            self.resident[g] = {k: v.to(self.device, copy=True) for k, v in views.items()}
            if self.cuda:
                torch.cuda.current_stream(self.device).synchronize()  # copies done before the slot is reused
            self.client.release(slot, seq)
        self.client.stop_stream()

    # ---- the weight-source interface ------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if "tok_embeddings" in self.resident:
            return F.embedding(tokens, self.resident["tok_embeddings"]["tok_embeddings.weight"])
        host = self._slot_of("tok_embeddings")
        while int(self.res.slots[host]["state"]) != SLOT_READY:  # a CPU lookup: no registration needed
            self.client.check_alive()
            time.sleep(0.001)
        table = self.dram_views("tok_embeddings")["tok_embeddings.weight"]  # host lookup, rows only
        return F.embedding(tokens.cpu(), table).to(self.device, non_blocking=True)

    def get(self, group: str) -> Weights:
        if group in self.resident:
            return self.resident[group]
        if self.pos % len(self.sched) == 0:
            self.client.check_alive()  # once a pass: a dead pool fails the run even if nothing streams
        expected = self.sched[self.pos % len(self.sched)]
        if group != expected:
            raise RuntimeError(f"weights requested out of order: {group}, expected {expected}")
        self.pos += 1
        return self._get_cuda(group) if self.cuda else self._get_cpu(group)

    def _next_slot(self, group: str) -> tuple[int, int]:
        """DRAM tier: its fixed slot (seq -1: never released); streamed: wait for the next window slot."""
        if group in self.plan.dram:
            slot = self._slot_of(group)
            if not self._usable_now(slot):  # only during the first pass, while the fill or registration runs
                self._wait_usable(slot, group)
            return slot, -1
        pos = self.stream_pos
        self.stream_pos += 1
        if self.cuda:
            self._free_window_for(pos)
        t0 = time.monotonic_ns() if self.trace else 0
        ready = self.client.wait_ready(pos)
        if self.registrar is not None:
            self.registrar.wait(ready[0], group)
        if self.trace:
            self.trace.wait(group, t0, pos)
        return ready

    def _free_window_for(self, pos: int) -> None:
        """Release copied slots until ``pos`` is ready or none is held: the pool can only fill the window
        slot we are about to wait for once we give one back (else: deadlock with a full window)."""
        self._release_finished()
        while self.pending:
            self.client._drain()
            if pos in self.client.ready:
                return
            ev, slot, seq = self.pending.pop(0)
            ev.synchronize()  # a copy only waits on compute already enqueued: this always finishes
            self.client.release(slot, seq)

    def _get_cpu(self, group: str) -> Weights:
        if self.held is not None:  # the previous group's compute has finished: CPU ops are synchronous
            self.client.release(*self.held)
            self.held = None
        slot, seq = self._next_slot(group)
        if seq >= 0:
            self.held = (slot, seq)
        return tensor_views(self.image.groups[group], self.slot_tensor(slot, self.image.groups[group].size))

    # ---- CUDA pipeline -------------------------------------------------------------------------
    def _init_pipeline(self, k: int) -> None:
        k = max(1, min(k, len(self.sched))) if self.sched else 0
        self.k = k
        self.copy_stream = torch.cuda.Stream(self.device)
        self.staging = [torch.empty(self.plan.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(k)]
        self.copied = [None] * k  # event recorded after the copy into buffer b
        self.freed = [None] * k  # event recorded on the compute stream after the last use of buffer b
        self.issued = 0  # copies issued so far (absolute sched positions)
        self.pending: list[tuple[torch.cuda.Event, int, int]] = []  # (copy event, slot, seq) awaiting release

    def _issue(self, p: int) -> None:
        """Copy the group at absolute sched position ``p`` into staging buffer p % k on the copy stream."""
        g = self.sched[p % len(self.sched)]
        b, size = p % self.k, self.image.groups[g].size
        slot, seq = self._next_slot(g)
        with torch.cuda.stream(self.copy_stream):
            if self.freed[b] is not None:
                self.copy_stream.wait_event(self.freed[b])
            c0 = self.trace.mark(self.copy_stream) if self.trace else None  # after the wait: the copy itself
            self.staging[b][:size].copy_(self.slot_tensor(slot, size), non_blocking=True)
            ev = torch.cuda.Event(enable_timing=self.trace is not None)
            ev.record(self.copy_stream)
        if self.trace:
            self.trace.copy(g, c0, ev, size, b)
        self.copied[b] = ev
        if seq >= 0:
            self.pending.append((ev, slot, seq))
        self.issued += 1

    def _release_finished(self) -> None:
        while self.pending and self.pending[0][0].query():
            _, slot, seq = self.pending.pop(0)
            self.client.release(slot, seq)

    def _get_cuda(self, group: str) -> Weights:
        p = self.pos - 1  # absolute position of ``group``
        compute = torch.cuda.current_stream(self.device)
        if p > 0:  # everything for position p-1 is enqueued: its buffer is free once that work runs
            ev = torch.cuda.Event()
            ev.record(compute)
            self.freed[(p - 1) % self.k] = ev
        while self.issued <= p:  # must have this group's copy in flight
            self._issue(self.issued)
        while self.issued < p + self.k and self._ready_without_wait(self.issued):
            self._issue(self.issued)  # run ahead while data is already in DRAM
        self._release_finished()
        b = p % self.k
        compute.wait_event(self.copied[b])
        return tensor_views(self.image.groups[group], self.staging[b][:self.image.groups[group].size])

    def _ready_without_wait(self, p: int) -> bool:
        g = self.sched[p % len(self.sched)]
        if g in self.plan.dram:
            return self._usable_now(self._slot_of(g))
        self.client._drain()
        return self.stream_pos in self.client.ready

    # ---- teardown ------------------------------------------------------------------------------
    def close(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self._release_finished()
        elif self.held is not None:
            self.client.release(*self.held)
            self.held = None
        self.client.stop_stream()
        if self.registrar is not None:
            self.registrar.close()
            self.registered = False


__all__ = ["PoolClient", "StreamedWeights", "PoolDied"]
