"""The daemon pool's process (``python -m runtime.pool.daemon CONFIG``, started detached by ``launch.py pool
start``, runtime/services/pools.py): it builds the pool's Coordinator (runtime/pool/coordinator.py), writes
the pool's record in the pool dir (runtime/ipc/records.py) and serves until SIGTERM, then stops its workers,
unlinks every name and removes its record. A pool of ``launch.py serve`` has that process as its owner: it
stops when the owner is gone (a SIGKILL) and then removes its log and lock too. Torch-free.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from model.errors import UserError
from runtime.ipc.options import PoolConfig, WorkerOptions
from runtime.ipc.procs import pid_alive
from runtime.ipc.records import RECORD_VERSION, forget, pool_file, pool_lock, write_private
from runtime.pool.attach import image_identity
from runtime.pool.coordinator import Coordinator, on_stop_signal


@dataclass(frozen=True)
class DaemonConfig:
    """What ``pool start`` hands the daemon process (as JSON)."""

    name: str
    image: str
    manifest: str
    dram_groups: list[str]
    window_slots: int
    slot_bytes: int
    n_clients: int
    workers: int
    staging_mb: int
    direct: bool
    dram_budget: int
    owner_pid: int | None = None  # launch.py serve: stop when this process is gone, and leave nothing behind
    demand_slots: int = 0  # per client, as large as a window slot: a mixture's experts read on demand


def daemon_main(cfg_file: str) -> int:
    dc = DaemonConfig(**json.loads(Path(cfg_file).read_text()))
    Path(cfg_file).unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pcfg = PoolConfig(dc.image, dc.manifest, dc.name, tuple(dc.dram_groups), dc.window_slots, max(dc.slot_bytes, 1),
                      n_clients=dc.n_clients, workers=dc.workers, owner_pid=dc.owner_pid,
                      worker_opts=WorkerOptions(direct=dc.direct, chunk_bytes=dc.staging_mb << 20),
                      demand_slots=dc.demand_slots, demand_slot_bytes=max(dc.slot_bytes, 1))
    print(f"[pool {dc.name} pid {os.getpid()}] starting: image {dc.image}, {len(dc.dram_groups)} groups in the DRAM "
          f"tier, {dc.n_clients} clients x {dc.window_slots} window slots, {dc.workers} workers", flush=True)
    try:
        coord = Coordinator(pcfg)
    except UserError as e:
        print(f"[pool {dc.name}] error: {e}", flush=True)
        return 2
    try:
        img = coord.image
        rec = {"version": RECORD_VERSION, "name": dc.name, "uid": os.getuid(), "pid": os.getpid(),
               "started_unix": time.time(), "log": str(pool_file(dc.name, "log")), "handle": asdict(coord.handle),
               "image": {"path": str(img.path), "manifest": str(img.manifest_path), "uuid": img.uuid,
                         "groups": img.manifest_crcs(), **image_identity(str(img.path))},
               "dram_groups": dc.dram_groups, "dram_tier_bytes": sum(img.groups[g].size for g in dc.dram_groups),
               "window_slots": dc.window_slots, "slot_bytes": dc.slot_bytes, "workers": dc.workers,
               "demand_slots": dc.demand_slots,
               "dram_budget": dc.dram_budget}
        write_private(pool_file(dc.name, "record"), rec)
        coord.serve()
    finally:
        coord.shutdown()
        with contextlib.suppress(OSError, ValueError):
            p = pool_file(dc.name, "record")
            if json.loads(p.read_text()).get("pid") == os.getpid():
                p.unlink()
        print(f"[pool {dc.name} pid {os.getpid()}] stopped", flush=True)
        if dc.owner_pid is not None and not pid_alive(dc.owner_pid):  # no one is left to remove its files
            with pool_lock(dc.name):
                forget(dc.name)
    return 0


if __name__ == "__main__":
    sys.exit(daemon_main(sys.argv[1]))
