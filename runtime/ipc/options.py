"""Plain configuration data handed to the pool's processes (picklable, spawn-safe): what a coordinator is told
to build (``PoolConfig``) and how its I/O workers read (``WorkerOptions``). Torch-free; imported by the pool
(runtime/pool), its workers (workers/) and the engine that starts private pools."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerOptions:
    direct: bool = True  # O_DIRECT (falls back to buffered + fadvise(DONTNEED) where refused)
    inflight: int = 16  # chunk reads in flight in this worker: one large group read alone keeps the disk busy
    chunk_bytes: int = 16 << 20  # a group read is split into chunks of this size, issued in parallel
    max_delay_s: float = 0.0  # tests only: sleep a random 0..max_delay_s before each read (shakes the ordering)
    trace_dir: str | None = None  # --trace: record each read, write them here at exit (runtime/ipc/trace.py)


@dataclass(frozen=True)
class PoolConfig:
    image: str
    manifest: str | None
    name: str
    dram_groups: tuple[str, ...]  # the DRAM tier: read once, pinned for the pool's lifetime
    window_slots: int  # per client
    slot_bytes: int  # capacity of one window slot
    n_clients: int = 1
    workers: int = 2
    worker_opts: WorkerOptions = field(default_factory=WorkerOptions)
    owner_pid: int | None = None  # private pool: exit when this process is gone
    demand_slots: int = 0  # per client, after its window: groups read on demand (runtime/ipc/shm.py, demands)
    demand_slot_bytes: int = 0  # capacity of one demand slot
    quiet: bool = False  # no progress lines (the DRAM tier's fill); faults are always logged
