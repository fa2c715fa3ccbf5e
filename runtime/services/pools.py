"""Daemon pools from the command line: ``pool start``, ``stop``, ``list``, ``cleanup`` (docs/POOL.md).

``pool start --image IMG --name NAME`` starts a coordinator detached from the terminal (its own session, stdin
from /dev/null, stdout and stderr to a log file): the daemon pool's process (runtime/pool/daemon.py) creates
the pool's shared memory, writes the pool's *record* and serves until SIGTERM (``pool stop``). The record and
the other files of a pool live in the user's pool dir (runtime/ipc/records.py); runs attach to the pool with
``--attach NAME`` (runtime/pool/attach.py) and plan within what it holds.

The pool holds a fixed DRAM tier (the host embedding, then groups in pass order while ``--dram-gb`` lasts, or
the whole model) and ``--clients`` x ``--window-slots`` window slots for the rest (``plan_pool``).

Leftovers: a record whose coordinator is gone (SIGKILL, a crash, a reboot of the machine's /dev/shm) is
stale. ``pool start`` of the same name and ``pool cleanup`` unlink its segments and semaphores and remove the
record; nothing stale is ever attached to. A pool may also have a server (``pool serve``,
runtime/services/server.py): ``pool stop`` stops it first, and a dead one's record and socket go with the
pool's other leftovers. /dev/shm is one namespace for all of a user's pool dirs: names whose control block
belongs to a live coordinator (a pool of the same name recorded in another pool dir, or a private pool) are
never removed. Torch-free; runs in the launch.py process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import posix_ipc
import psutil

from model.errors import ConfigError, UserError
from runtime.engine.config import FlagConfig
from runtime.engine.placement import HOST_GROUP, Budgets, plan_placement
from runtime.format.blockdev import check_readable
from runtime.format.image import HEADER_SIZE, Image, unpack_header
from runtime.ipc.options import WorkerOptions
from runtime.ipc.procs import DAEMON_MODULE, kill, kill_wait, pid_alive, spawn_detached
from runtime.ipc.records import (
    clean_stale_server,
    coordinator_alive,
    forget,
    handle_of,
    has_files,
    list_records,
    live_server,
    log_tail,
    pool_dir,
    pool_file,
    pool_lock,
    read_record,
    stop_server,
)
from runtime.ipc.shm import (
    CLIENT_ATTACHED,
    POOL_FAILED,
    POOL_RUNNING,
    POOL_STOPPING,
    STATE_NAMES,
    PoolResources,
    header_uuid,
    leftover_names,
    live_header,
    unlink_all,
    validate_pool_name,
)
from runtime.pool.coordinator import check_worker_count
from runtime.pool.daemon import DaemonConfig
from runtime.progress import Progress

DEFAULT_WINDOW = 4
MAX_CLIENTS = 64  # runs attached at once: each has its own semaphore, queues and window slots


@dataclass(frozen=True)
class PoolStartConfig(FlagConfig):
    """``pool start``'s flags, checked when built."""

    image: str
    name: str
    manifest: str | None = None
    dram_gb: float | None = None  # None: the whole model if it fits in 80% of the available memory
    workers: int = 2
    clients: int = 4
    window_slots: int | None = None  # None: 4 when the pool does not hold the whole model, else 0
    staging_mb: int = 16
    no_direct: bool = False
    no_wait: bool = False
    start_timeout: float = 60.0
    quiet: bool = False
    owner_pid: int | None = None  # launch.py serve's pid: the pool stops when it is gone (not a flag)

    def __post_init__(self) -> None:
        validate_pool_name(self.name)
        for key in ("clients", "staging_mb"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, found {getattr(self, key)}")
        if self.clients > MAX_CLIENTS:
            raise ConfigError(f"--clients {self.clients}: at most {MAX_CLIENTS} runs may attach to one pool")
        if self.dram_gb is not None and not self.dram_gb > 0:
            raise ConfigError(f"--dram-gb must be positive, found {self.dram_gb}")
        if self.window_slots is not None and self.window_slots < 0:
            raise ConfigError(f"--window-slots must be >= 0, found {self.window_slots}")
        if not self.start_timeout > 0:
            raise ConfigError(f"--start-timeout must be positive, found {self.start_timeout}")


def plan_pool(image: Image, dram_gb: float | None, n_clients: int, window: int | None) -> DaemonConfig:
    """The pool's DRAM tier and window from ``--dram-gb``: the whole model if it fits, else the host
    embedding and groups in pass order (runtime/engine/placement.py, mode mixed), plus ``n_clients`` windows
    of slots large enough for any group the pool does not hold (a mixture's: as many demand slots again, for the
    experts read on demand). Refuses a budget over available memory."""
    avail = psutil.virtual_memory().available
    sizes = {n: g.size for n, g in image.groups.items()}
    total = sum(sizes.values())
    if dram_gb is not None:
        budget = int(dram_gb * 1e9)
        if budget > avail:
            raise ConfigError(f"--dram-gb {dram_gb:g} ({budget} bytes) exceeds the available memory "
                              f"{avail / 1e9:.2f} GB ({avail} bytes, psutil.virtual_memory().available)")
    else:
        budget = min(total, int(avail * 0.8))
    if budget >= total and window is None:
        held = [HOST_GROUP] + [g for g in image.groups if g != HOST_GROUP]
        return DaemonConfig("", "", "", held, 0, 0, n_clients, 0, 0, True, budget)
    w = DEFAULT_WINDOW if window is None else window
    if w < 1:
        raise ConfigError(f"--window-slots {w}: a pool that does not hold the whole model needs at least 1")
    largest = max(n for g, n in sizes.items() if g != HOST_GROUP)  # the host embedding never streams
    demand = w if image.args.n_experts else 0
    floor = sizes[HOST_GROUP] + n_clients * (w + demand) * largest
    if floor > budget:
        raise ConfigError(f"--dram-gb {budget / 1e9:g} GB ({budget} bytes) cannot hold the host embedding "
                          f"({sizes[HOST_GROUP]} bytes) and {n_clients} clients x {w} window slots of up to {largest} "
                          f"bytes ({floor} bytes); raise --dram-gb or lower --clients / --window-slots")
    plan = plan_placement(sizes, image.args, "mixed",
                          Budgets(None, max(budget - (n_clients - 1) * (w + demand) * largest, 0)),
                          device="cpu", prefetch_distance=max(w, 2))
    held = list(dict.fromkeys(plan.host + plan.dram))
    slot = max((sizes[g] for g in sizes if g not in held), default=0)
    ring = sum(sizes[g] for g in held) + n_clients * (w + demand) * slot
    routed = sorted((g for g in held if g in plan.use), key=lambda g: plan.use[g])  # least routed first
    while ring > budget and routed:  # every client's window and demand slots: give up experts until they fit
        held.remove(routed.pop(0))
        slot = max((sizes[g] for g in sizes if g not in held), default=0)
        ring = sum(sizes[g] for g in held) + n_clients * (w + demand) * slot
    if ring > budget:
        raise ConfigError(f"--dram-gb {budget / 1e9:.2f} GB cannot hold the host embedding and {n_clients} "
                          f"clients x {w} window slots of {slot / 1e9:.3f} GB ({ring} > {budget} bytes); raise "
                          f"--dram-gb or lower --clients / --window-slots")
    return DaemonConfig("", "", "", held, w, slot, n_clients, 0, 0, True, budget, demand_slots=demand)


# ---- leftovers -------------------------------------------------------------------------------------------------

def clean_stale(name: str, quiet: bool = False) -> list[str]:
    """Remove what a dead pool ``name`` left (segments, semaphores, record); returns the names removed. Names
    whose control block belongs to a live coordinator (a pool of the same name started from another pool dir,
    or a private pool) are never removed (``live_header``)."""
    removed = clean_stale_server(name)  # a dead server's record and socket (a live one's never)
    p = pool_file(name, "record")
    rec = None
    if p.exists():
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            rec = None
        if rec is not None and coordinator_alive(rec):
            return removed
        p.unlink(missing_ok=True)
        removed.append(str(p))
    if live_header(name) is None:
        if rec is not None and rec.get("handle"):
            removed += unlink_all(handle_of(rec))
        for n in leftover_names(pool=name):  # names no record accounts for
            removed += _unlink_name(n)
    if removed and not quiet:
        print(f"pool {name}: removed the leftovers of a dead pool: {', '.join(removed)}", file=sys.stderr)
    return removed


def _unlink_name(entry: str) -> list[str]:
    """Unlink one /dev/shm entry of ours by its directory name (``sem.NAME`` is a semaphore)."""
    try:
        if entry.startswith("sem."):
            posix_ipc.unlink_semaphore("/" + entry[4:])
        else:
            posix_ipc.unlink_shared_memory("/" + entry)
        return ["/" + entry.removeprefix("sem.")]
    except posix_ipc.ExistentialError:
        return []


def _nothing_alive(name: str) -> bool:
    rec = None
    with contextlib.suppress(UserError):
        rec = read_record(name)
    return (rec is None or not coordinator_alive(rec)) and live_header(name) is None and live_server(name) is None


def pools_serving(path: str | os.PathLike) -> list[str]:
    """The live pools of this user that serve the image at ``path`` (the same file, by path or inode, for a
    daemon pool's record; the same header uuid for any pool, private ones included): what re-packing it would
    break under them."""
    if not os.path.exists(path):
        return []
    st, real = os.stat(path), os.path.realpath(path)
    hits = {}
    for rec in list_records():
        img = rec.get("image") or {}
        same = img.get("path") and (os.path.realpath(img["path"]) == real or
                                    (img.get("ino"), img.get("dev")) == (st.st_ino, st.st_dev))
        if same and coordinator_alive(rec):
            hits[rec["name"]] = f"pool {rec['name']!r} (coordinator pid {rec['pid']})"
    try:
        with open(path, "rb") as f:
            uuid = unpack_header(f.read(HEADER_SIZE), str(path))["uuid"]
    except (OSError, UserError):
        return list(hits.values())
    prefix = f"llms.{os.getuid()}."
    for entry in leftover_names():
        if not (entry.startswith(prefix) and entry.endswith(".ctl")):
            continue
        name = entry[len(prefix):-len(".ctl")]
        hd = live_header(name)
        if name not in hits and hd is not None and header_uuid(hd) == uuid and int(hd["state"]) != POOL_STOPPING:
            hits[name] = f"pool {name!r} (coordinator pid {int(hd['coord_pid'])})"
    return list(hits.values())


# ---- pool start --------------------------------------------------------------------------------------------

def start(cfg: PoolStartConfig) -> None:
    """``pool start``: refuse bad input up front, start the daemon, wait until it serves (progress shown)."""
    name = cfg.name
    check_readable(cfg.image)
    image = Image.open(os.path.abspath(cfg.image), cfg.manifest and os.path.abspath(cfg.manifest))
    check_worker_count(cfg.workers, str(image.path), WorkerOptions().inflight)
    dc = plan_pool(image, cfg.dram_gb, cfg.clients, cfg.window_slots)  # refused before anything is created
    with pool_lock(name):
        p = pool_file(name, "record")
        if p.exists():
            with contextlib.suppress(OSError, ValueError):
                rec = json.loads(p.read_text())
                if coordinator_alive(rec):
                    raise UserError(f"pool name {name!r} is in use: pid {rec['pid']} serves {rec['image']['path']} "
                                    f"(launch.py pool stop {name}, or choose another name)")
        clean_stale(name)
        owner = live_header(name)
        if owner is not None:
            raise UserError(f"pool name {name!r} is in use: coordinator pid {int(owner['coord_pid'])} serves it, "
                            f"recorded in another pool dir than {pool_dir()} (or a private pool); choose another name")
        dc = DaemonConfig(name, str(image.path), str(image.manifest_path), dc.dram_groups, dc.window_slots,
                          dc.slot_bytes, cfg.clients, cfg.workers, cfg.staging_mb, not cfg.no_direct, dc.dram_budget,
                          cfg.owner_pid, dc.demand_slots)
        log = pool_file(name, "log")
        proc = spawn_detached(DAEMON_MODULE, asdict(dc), pool_dir() / f"{name}.start.json", log)
        held = sum(image.groups[g].size for g in dc.dram_groups)
        rec = _wait_record(name, proc, log, cfg.start_timeout)
    print(f"pool {name}: coordinator pid {rec['pid']}, {cfg.workers} I/O workers, {cfg.clients} client slots; DRAM "
          f"tier {len(dc.dram_groups)} of {len(image.groups)} groups ({held / 1e9:.2f} GB), window "
          f"{dc.window_slots} x {dc.slot_bytes / 1e6:.1f} MB per client; log {log}", file=sys.stderr)
    if not cfg.no_wait:
        _wait_filled(rec, held, proc, log, quiet=cfg.quiet)
    print(f"pool {name} is serving {image.path}: launch.py run --attach {name}")


def _wait_record(name: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"pool {name}: the coordinator exited with code {proc.returncode} during start; its "
                            f"log {log}:\n{log_tail(log)}")
        with contextlib.suppress(UserError):
            rec = read_record(name)
            if rec.get("pid") == proc.pid:
                return rec
        time.sleep(0.02)
    kill(proc.pid)
    proc.wait()
    clean_stale(name, quiet=True)
    raise UserError(f"pool {name}: the coordinator did not come up within {timeout_s:.0f} s; log {log}:\n"
                    f"{log_tail(log)}")


def _wait_filled(rec: dict, total: int, proc: subprocess.Popen, log: Path, quiet: bool) -> None:
    res = PoolResources.attach(handle_of(rec), ring=False)
    try:
        progress = Progress(f"pool {rec['name']}: filling the DRAM tier", total, quiet=quiet)
        while True:
            state = int(res.header["state"])
            done = int(res.header["bytes_dram"])
            if done > progress.done_bytes:
                progress.update(done - progress.done_bytes)
            if state == POOL_RUNNING:
                break
            if state == POOL_FAILED or proc.poll() is not None:
                raise UserError(f"pool {rec['name']} failed while filling its DRAM tier: {res.get_error() or ''}\n"
                                f"log {log}:\n{log_tail(log)}")
            time.sleep(0.1)
        progress.done()
    finally:
        res.close()


# ---- pool stop / list / cleanup ---------------------------------------------------------------------------

def stop(name: str, timeout_s: float = 10.0) -> None:
    """SIGTERM the pool's coordinator (its server first), SIGKILL after ``timeout_s``; remove every leftover."""
    rec = read_record(name)
    name, pid = rec["name"], int(rec["pid"])
    t0 = time.monotonic()
    if live_server(name) is not None:  # first the server, an attached client of the pool
        print(stop_server(name, timeout_s))
    how = "was not running"
    if coordinator_alive(rec):
        how = "stopped"  # graceful: the coordinator stops its workers and unlinks everything
        if not kill_wait(pid, timeout_s, signal.SIGTERM):
            kill_wait(pid, 5.0)  # escalate
            how = f"did not stop within {timeout_s:g} s: killed"
    workers = _worker_pids(rec)
    with pool_lock(name):
        removed = clean_stale(name, quiet=True)
        if _nothing_alive(name):
            forget(name)
    for w in workers:  # they exit by themselves once their coordinator is gone; make sure
        deadline = time.monotonic() + 3
        while pid_alive(w) and time.monotonic() < deadline:
            time.sleep(0.02)
        kill(w)
    extra = f"; removed {len(removed) - 1} leftover names" if len(removed) > 1 else ""
    print(f"pool {name} (pid {pid}) {how} in {time.monotonic() - t0:.2f} s{extra}")


def _worker_pids(rec: dict) -> list[int]:
    try:
        res = PoolResources.attach(handle_of(rec), ring=False)
    except UserError:
        return []
    try:
        return [int(p) for p in res.workers["pid"] if int(p) > 0 and pid_alive(int(p))]
    finally:
        res.close()


def pool_summary(rec: dict) -> dict:
    """One line of ``pool list``: state from the control block when the coordinator is alive."""
    out = {"name": rec.get("name"), "pid": rec.get("pid"), "image": (rec.get("image") or {}).get("path"),
           "dram_tier_bytes": rec.get("dram_tier_bytes"), "clients_attached": None,
           "client_slots": (rec.get("handle") or {}).get("n_clients"), "uptime_s": None, "state": "dead"}
    if rec.get("broken") or not coordinator_alive(rec):
        return out
    out["uptime_s"] = time.time() - rec["started_unix"]
    try:
        res = PoolResources.attach(handle_of(rec), ring=False)
    except UserError:
        out["state"] = "gone"
        return out
    try:
        out["state"] = STATE_NAMES.get(int(res.header["state"]), "unknown")
        out["clients_attached"] = int((res.clients["state"] == CLIENT_ATTACHED).sum())
    finally:
        res.close()
    return out


def list_pools(as_json: bool = False) -> None:
    rows = [pool_summary(r) for r in list_records()]
    if as_json:
        print(json.dumps({"pool_dir": str(pool_dir()), "pools": rows}, indent=1))
        return
    if not rows:
        print(f"no pools (pool dir {pool_dir()})")
        return
    print(f"{'NAME':16} {'STATE':8} {'PID':>8} {'DRAM GB':>8} {'CLIENTS':>8} {'UPTIME':>8}  IMAGE")
    for r in rows:
        up = f"{r['uptime_s']:.0f}s" if r["uptime_s"] is not None else "-"
        cl = f"{r['clients_attached']}/{r['client_slots']}" if r["clients_attached"] is not None else "-"
        gb = f"{r['dram_tier_bytes'] / 1e9:.2f}" if r["dram_tier_bytes"] else "-"
        print(f"{r['name']:16} {r['state']:8} {r['pid'] or '-':>8} {gb:>8} {cl:>8} {up:>8}  {r['image'] or '-'}")
    if any(r["state"] == "dead" for r in rows):
        print("dead pools left records behind: launch.py pool cleanup")


def cleanup(name: str | None = None) -> None:
    """Remove dead pools' leftovers: records, segments, semaphores, logs, locks; and names in /dev/shm of this
    user that no live pool (daemon or a private pool of a live process) accounts for. ``name``: that pool only
    (a name nothing knows: nothing is created)."""
    d = pool_dir()
    names = [name] if name else sorted({r["name"] for r in list_records()} |
                                       {n.removeprefix("sem.").split(".")[2] for n in leftover_names()} |
                                       {p.name.split(".")[0] for pat in ("*.lock", "*.log") for p in d.glob(pat)})
    removed = []
    for n in names:
        validate_pool_name(n)
        if n.startswith("run") and "-" in n:  # a private pool: run<pid>-<n>
            with contextlib.suppress(ValueError):
                if pid_alive(int(n[3:].split("-")[0])):
                    continue
        if not has_files(n) and not leftover_names(pool=n):
            if name:
                print(f"pool {n}: nothing to remove (no record, log, lock or shared memory of that name)")
            continue
        with pool_lock(n):
            removed += clean_stale(n, quiet=True)
            if _nothing_alive(n):
                removed += forget(n)
    for n in removed:
        print(f"removed {n}")
    print(f"cleanup: {len(removed)} names removed" if removed else "cleanup: nothing to remove")
