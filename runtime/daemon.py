"""Daemon pools: a pool that outlives the run that started it, and the runs that attach to it.

``launch.py pool start --image IMG --name NAME`` starts a coordinator detached from the terminal (its own
session, stdin from /dev/null, stdout and stderr to a log file). The coordinator (``python -m
runtime.daemon CONFIG``) creates the pool's shared memory, writes the pool's *record* and serves until
SIGTERM (``pool stop``). The record, ``<pool dir>/<NAME>.json``, is what every other command reads: the
coordinator's pid, the handle to attach with, the image it serves (path, uuid, size, mtime, inode) and its
tiers. The pool dir is private to the user (mode 0700, checked): ``$LLMS_POOL_DIR``, else
``$XDG_RUNTIME_DIR/llmstream``, else ``/tmp/llmstream-<uid>``; it also holds ``NAME.log`` and ``NAME.lock``
(clients claim their row of the client table under it).

The pool holds a fixed DRAM tier (the host embedding, then groups in pass order while ``--dram-gb``
lasts, or the whole model) and ``--clients`` x ``--window-slots`` window slots for the rest. A client
(``run --attach NAME``) plans its GPU tier from its own GPU budget (``runtime.engine.plan_for_pool``): its
DRAM tier is what the pool holds and it streams the rest through its own window slots; the GPU tier is
copied from the pool's DRAM where the pool holds it. Clients map the ring read-only.

Leftovers: a record whose coordinator is gone (SIGKILL, a crash, a reboot of the machine's /dev/shm) is
stale. ``pool start`` of the same name and ``pool cleanup`` unlink its segments and semaphores and remove
the record; nothing stale is ever attached to (``attach`` checks the coordinator's pid and heartbeat). A pool
may also have a server (``pool serve``, runtime/server.py): ``pool stop`` stops it first, and a dead one's
record and socket go with the pool's other leftovers. /dev/shm
is one namespace for all of a user's pool dirs: names whose control block belongs to a live coordinator (a
pool of the same name recorded in another pool dir, or a private pool) are never removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from model.errors import ConfigError, UserError
from runtime.image import Image
from runtime.shm import (
    POOL_FAILED,
    POOL_FILLING,
    POOL_RUNNING,
    POOL_STARTING,
    PoolHandle,
    leftover_names,
    unlink_all,
    validate_pool_name,
)

RECORD_VERSION = 1
STATE_NAMES = {POOL_STARTING: "starting", POOL_FILLING: "filling", POOL_RUNNING: "running", 4: "stopping",
               POOL_FAILED: "failed"}
DEFAULT_CLIENTS = 4
MAX_CLIENTS = 64  # runs attached at once: each has its own semaphore, queues and window slots
DEFAULT_WINDOW = 4


# ---- the pool dir and records ---------------------------------------------------------------------
def pool_dir(create: bool = True) -> Path:
    """This user's pool dir (see the module doc); refuses one another user owns or others can write."""
    from runtime.env import pool_dir_path

    d = pool_dir_path()
    if create:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    if d.exists():
        st = d.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise UserError(f"pool dir {d} is owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o}: it must "
                            f"be this user's (uid {os.getuid()}) and not writable by others; set LLMS_POOL_DIR")
    return d


def record_path(name: str) -> Path:
    return pool_dir() / f"{validate_pool_name(name)}.json"


def log_path(name: str) -> Path:
    return pool_dir() / f"{validate_pool_name(name)}.log"


def read_record(name: str) -> dict:
    """The record of pool ``name``; UserError if there is none or it is not this user's."""
    p = record_path(name)
    try:
        st = p.stat()
        rec = json.loads(p.read_text())
    except FileNotFoundError:
        known = ", ".join(sorted(r["name"] for r in list_records())) or "none"
        raise UserError(f"no pool named {name!r} for this user (pools: {known}; launch.py pool list)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: unreadable pool record ({e}); launch.py pool cleanup {name}") from None
    if st.st_uid != os.getuid() or rec.get("uid") != os.getuid():
        owner = st.st_uid if st.st_uid != os.getuid() else rec.get("uid")  # the one that is not ours
        raise UserError(f"pool {name!r} belongs to uid {owner} (record {p} owned by uid {st.st_uid}, its uid "
                        f"field {rec.get('uid')}), not to this user (uid {os.getuid()}): refused")
    if rec.get("version") != RECORD_VERSION:
        raise UserError(f"{p}: record version {rec.get('version')}, expected {RECORD_VERSION}; launch.py pool "
                        f"cleanup {name}")
    return rec


def list_records() -> list[dict]:
    out = []
    for p in sorted(pool_dir().glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            rec = {"name": p.stem, "pid": None, "broken": True}
        out.append(rec)
    return out


def handle_of(rec: dict) -> PoolHandle:
    return PoolHandle(**rec["handle"])


def _write_record(rec: dict) -> None:
    write_private(record_path(rec["name"]), rec)


def write_private(path: Path, obj: dict) -> None:
    """``obj`` as JSON at ``path``, mode 0600, replaced whole (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def runs_module(pid, module: str) -> bool:
    """``pid`` is alive and runs ``python -m module`` (a reused pid does not)."""
    from runtime.pool import pid_alive

    if not pid or not pid_alive(int(pid)):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid
    return module.encode() in cmd


def coordinator_alive(rec: dict) -> bool:
    """The record's coordinator is running (and is a pool coordinator: a reused pid is not)."""
    return runs_module(rec.get("pid"), "runtime.daemon")


def image_identity(path: str) -> dict:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}


# ---- pool start ------------------------------------------------------------------------------------
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


def plan_pool(image: Image, dram_gb: float | None, n_clients: int, window: int | None) -> DaemonConfig:
    """The pool's DRAM tier and window from ``--dram-gb``: the whole model if it fits, else the host
    embedding and groups in pass order (runtime.placement, mode mixed), plus ``n_clients`` windows of
    slots large enough for any group the pool does not hold. Refuses a budget over available memory."""
    import psutil

    from runtime.placement import HOST_GROUP, Budgets, plan_placement

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
    floor = sizes[HOST_GROUP] + n_clients * w * largest
    if floor > budget:
        raise ConfigError(f"--dram-gb {budget / 1e9:g} GB ({budget} bytes) cannot hold the host embedding "
                          f"({sizes[HOST_GROUP]} bytes) and {n_clients} clients x {w} window slots of up to {largest} "
                          f"bytes ({floor} bytes); raise --dram-gb or lower --clients / --window-slots")
    plan = plan_placement(sizes, image.args, "mixed", Budgets(None, max(budget - (n_clients - 1) * w * largest, 0)),
                          device="cpu", prefetch_distance=max(w, 2))
    held = list(dict.fromkeys(plan.host + plan.dram))
    slot = max((sizes[g] for g in sizes if g not in held), default=0)
    ring = sum(sizes[g] for g in held) + n_clients * w * slot
    if ring > budget:
        raise ConfigError(f"--dram-gb {budget / 1e9:.2f} GB cannot hold the host embedding and {n_clients} "
                          f"clients x {w} window slots of {slot / 1e9:.3f} GB ({ring} > {budget} bytes); raise "
                          f"--dram-gb or lower --clients / --window-slots")
    return DaemonConfig("", "", "", held, w, slot, n_clients, 0, 0, True, budget)


def _clean_stale(name: str, quiet: bool = False) -> list[str]:
    """Remove what a dead pool ``name`` left (segments, semaphores, record); returns the names removed. Names
    whose control block belongs to a live coordinator (a pool of the same name started from another pool dir,
    or a private pool) are never removed (``_live_owner``)."""
    from runtime import server

    removed = server.clean_stale(name)  # a dead server's record and socket (a live one's never)
    p = record_path(name)
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
    if _live_owner(name) is None:
        if rec is not None and rec.get("handle"):
            removed += unlink_all(handle_of(rec))
        for n in leftover_names(pool=name):  # names no record accounts for
            removed += _unlink_name(n)
    if removed and not quiet:
        print(f"pool {name}: removed the leftovers of a dead pool: {', '.join(removed)}", file=sys.stderr)
    return removed


def _live_owner(name: str) -> int | None:
    """The pid of the live coordinator whose control block ``/llms.<uid>.<name>.ctl`` names it, else None
    (no control block, an unwritten or foreign one, or its coordinator is gone). /dev/shm is one namespace
    for every pool dir of this user: a pool of the same name recorded elsewhere must not be taken for dead."""
    hd = _live_header(name)
    return None if hd is None else int(hd["coord_pid"])


def _live_header(name: str):
    """The control-block header of pool ``name`` when a live coordinator owns it (its pid runs a daemon pool
    or a private pool's multiprocessing child: a reused pid does not), else None."""
    import mmap

    import numpy as np
    import posix_ipc

    from runtime.pool import pid_alive
    from runtime.shm import HEADER_DTYPE, MAGIC

    try:
        shm = posix_ipc.SharedMemory(f"/llms.{os.getuid()}.{name}.ctl", 0, read_only=True)
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
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return hd
    return hd if b"runtime.daemon" in cmd or b"multiprocessing" in cmd else None


def pools_serving(path: str | os.PathLike) -> list[str]:
    """The live pools of this user that serve the image at ``path`` (the same file, by path or inode, for a
    daemon pool's record; the same header uuid for any pool, private ones included): what re-packing it would
    break under them."""
    from runtime.image import HEADER_SIZE, unpack_header
    from runtime.shm import POOL_STOPPING

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
        hd = _live_header(name)
        if name not in hits and hd is not None and bytes(hd["uuid"]).ljust(16, b"\0").hex() == uuid and \
                int(hd["state"]) != POOL_STOPPING:
            hits[name] = f"pool {name!r} (coordinator pid {int(hd['coord_pid'])})"
    return list(hits.values())


def _unlink_name(entry: str) -> list[str]:
    """Unlink one /dev/shm entry of ours by its directory name (``sem.NAME`` is a semaphore)."""
    import posix_ipc

    try:
        if entry.startswith("sem."):
            posix_ipc.unlink_semaphore("/" + entry[4:])
        else:
            posix_ipc.unlink_shared_memory("/" + entry)
        return ["/" + entry.removeprefix("sem.")]
    except posix_ipc.ExistentialError:
        return []


def start(a) -> None:
    """``pool start``: refuse bad input up front, start the daemon, wait until it serves (progress shown)."""
    from runtime.blockdev import check_readable
    from runtime.pool import check_worker_count
    from workers.io_worker import WorkerOptions

    name = validate_pool_name(a.name)
    for key in ("clients", "staging_mb"):
        if getattr(a, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, found {getattr(a, key)}")
    if a.clients > MAX_CLIENTS:
        raise ConfigError(f"--clients {a.clients}: at most {MAX_CLIENTS} runs may attach to one pool")
    if a.dram_gb is not None and not a.dram_gb > 0:
        raise ConfigError(f"--dram-gb must be positive, found {a.dram_gb}")
    if a.window_slots is not None and a.window_slots < 0:
        raise ConfigError(f"--window-slots must be >= 0, found {a.window_slots}")
    if not a.start_timeout > 0:
        raise ConfigError(f"--start-timeout must be positive, found {a.start_timeout}")
    check_readable(a.image)
    image = Image.open(os.path.abspath(a.image), a.manifest and os.path.abspath(a.manifest))
    check_worker_count(a.workers, str(image.path), WorkerOptions().inflight)
    dc = plan_pool(image, a.dram_gb, a.clients, a.window_slots)  # refused before anything is created
    with _lock(name):
        p = record_path(name)
        if p.exists():
            with contextlib.suppress(OSError, ValueError):
                rec = json.loads(p.read_text())
                if coordinator_alive(rec):
                    raise UserError(f"pool name {name!r} is in use: pid {rec['pid']} serves {rec['image']['path']} "
                                    f"(launch.py pool stop {name}, or choose another name)")
        _clean_stale(name)
        owner = _live_owner(name)
        if owner is not None:
            raise UserError(f"pool name {name!r} is in use: coordinator pid {owner} serves it, recorded in another "
                            f"pool dir than {pool_dir()} (or a private pool); choose another name")
        dc = DaemonConfig(name, str(image.path), str(image.manifest_path), dc.dram_groups, dc.window_slots,
                          dc.slot_bytes, a.clients, a.workers, a.staging_mb, not a.no_direct, dc.dram_budget)
        log = log_path(name)
        proc = spawn_detached("runtime.daemon", asdict(dc), pool_dir() / f"{name}.start.json", log)
        held = sum(image.groups[g].size for g in dc.dram_groups)
        rec = _wait_record(name, proc, log, a.start_timeout)
    print(f"pool {name}: coordinator pid {rec['pid']}, {a.workers} I/O workers, {a.clients} client slots; DRAM "
          f"tier {len(dc.dram_groups)} of {len(image.groups)} groups ({held / 1e9:.2f} GB), window "
          f"{dc.window_slots} x {dc.slot_bytes / 1e6:.1f} MB per client; log {log}", file=sys.stderr)
    if not a.no_wait:
        _wait_filled(rec, held, proc, log, quiet=a.quiet)
    print(f"pool {name} is serving {image.path}: launch.py run --attach {name}")


def spawn_detached(module: str, cfg: dict, cfg_file: Path, log: Path) -> subprocess.Popen:
    """``python -m module CFG_FILE`` detached from the terminal: its own session, stdin /dev/null, output
    appended to ``log``; ``cfg`` goes to ``cfg_file`` (mode 0600), which the process reads and removes."""
    fd = os.open(cfg_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f)
    logf = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [x for x in [os.environ.get("PYTHONPATH")] if x]),
               PYTHONUNBUFFERED="1")
    try:
        return subprocess.Popen([sys.executable, "-m", module, str(cfg_file)], cwd=root, env=env,
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                                close_fds=True)
    finally:
        os.close(logf)


def _log_tail(log: Path, n: int = 8) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("  " + x for x in lines[-n:])


def _wait_record(name: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"pool {name}: the coordinator exited with code {proc.returncode} during start; its "
                            f"log {log}:\n{_log_tail(log)}")
        with contextlib.suppress(UserError):
            rec = read_record(name)
            if rec.get("pid") == proc.pid:
                return rec
        time.sleep(0.02)
    _kill(proc.pid)
    proc.wait()
    _clean_stale(name, quiet=True)
    raise UserError(f"pool {name}: the coordinator did not come up within {timeout_s:.0f} s; log {log}:\n"
                    f"{_log_tail(log)}")


def _wait_filled(rec: dict, total: int, proc: subprocess.Popen, log: Path, quiet: bool) -> None:
    from runtime.progress import Progress
    from runtime.shm import PoolResources

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
                                f"log {log}:\n{_log_tail(log)}")
            time.sleep(0.1)
        progress.done()
    finally:
        res.close()


@contextlib.contextmanager
def _lock(name: str):
    """The pool's lock file (serialises start / cleanup / client-row claims of one pool name). The file is
    removed with the pool (``_forget``, under the lock), so a waiter that wakes on a removed file takes the
    new one instead."""
    path = pool_dir() / f"{validate_pool_name(name)}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def _forget(name: str) -> list[str]:
    """Under the pool's lock, once nothing of pool ``name`` is alive: remove its logs and its lock file."""
    from runtime import server

    removed = []
    for p in (log_path(name), server.log_path(name), pool_dir() / f"{name}.lock"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(str(p))
    return removed


def _traces(name: str) -> bool:
    """Whether pool ``name`` has anything in the pool dir or /dev/shm (a record, a log, a lock, names)."""
    from runtime import server

    files = [record_path(name), log_path(name), server.record_path(name), server.log_path(name),
             server.socket_path(name), pool_dir() / f"{name}.lock"]
    return any(os.path.lexists(p) for p in files) or bool(leftover_names(pool=name))


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def kill_wait(pid: int, timeout_s: float, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` and wait up to ``timeout_s`` for the process to go; True if it went."""
    from runtime.pool import pid_alive

    _kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not pid_alive(pid)


# ---- pool stop / list / cleanup ---------------------------------------------------------------------
def stop(a) -> None:
    from runtime import server
    from runtime.pool import pid_alive

    rec = read_record(a.name)
    name, pid = rec["name"], int(rec["pid"])
    t0 = time.monotonic()
    if server.live_server(name) is not None:  # first the server, an attached client of the pool
        print(server.stop(name, a.timeout))
    how = "was not running"
    if coordinator_alive(rec):
        how = "stopped"  # graceful: the coordinator stops its workers and unlinks everything
        if not kill_wait(pid, a.timeout, signal.SIGTERM):
            kill_wait(pid, 5.0)  # escalate
            how = f"did not stop within {a.timeout:g} s: killed"
    workers = _worker_pids(rec)
    with _lock(name):
        removed = _clean_stale(name, quiet=True)
        if not coordinator_alive(rec) and _live_owner(name) is None and server.live_server(name) is None:
            _forget(name)
    for w in workers:  # they exit by themselves once their coordinator is gone; make sure
        deadline = time.monotonic() + 3
        while pid_alive(w) and time.monotonic() < deadline:
            time.sleep(0.02)
        _kill(w)
    extra = f"; removed {len(removed) - 1} leftover names" if len(removed) > 1 else ""
    print(f"pool {name} (pid {pid}) {how} in {time.monotonic() - t0:.2f} s{extra}")


def _worker_pids(rec: dict) -> list[int]:
    from runtime.pool import pid_alive
    from runtime.shm import PoolResources

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
    from runtime.shm import CLIENT_ATTACHED, PoolResources

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


def list_pools(a) -> None:
    rows = [pool_summary(r) for r in list_records()]
    if a.json:
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


def cleanup(a) -> None:
    """Remove dead pools' leftovers: records, segments, semaphores; and names in /dev/shm of this user that
    no live pool (daemon or a private pool of a live process) accounts for."""
    from runtime import server
    from runtime.pool import pid_alive

    names = [a.name] if a.name else sorted({r["name"] for r in list_records()} |
                                           {n.removeprefix("sem.").split(".")[2] for n in leftover_names()} |
                                           {p.name.split(".")[0] for p in pool_dir().glob("*.lock")} |
                                           {p.name.split(".")[0] for p in pool_dir().glob("*.log")})
    removed = []
    for name in names:
        validate_pool_name(name)
        if name.startswith("run") and "-" in name:  # a private pool: run<pid>-<n>
            with contextlib.suppress(ValueError):
                if pid_alive(int(name[3:].split("-")[0])):
                    continue
        if not _traces(name):
            if a.name:
                print(f"pool {name}: nothing to remove (no record, log, lock or shared memory of that name)")
            continue
        with _lock(name):
            removed += _clean_stale(name, quiet=True)
            rec = None
            with contextlib.suppress(UserError):
                rec = read_record(name)
            if (rec is None or not coordinator_alive(rec)) and _live_owner(name) is None and \
                    server.live_server(name) is None:
                removed += _forget(name)
    for n in removed:
        print(f"removed {n}")
    print(f"cleanup: {len(removed)} names removed" if removed else "cleanup: nothing to remove")


# ---- attach ----------------------------------------------------------------------------------------
@dataclass
class Attachment:
    record: dict
    handle: PoolHandle
    index: int  # this client's row of the pool's client table
    image: Image


def check_image_unchanged(rec: dict, image: Image) -> None:
    """Refuse a pool whose image changed after it started: identity (size, mtime, inode), header uuid,
    and every group's extent and checksum."""
    path = rec["image"]["path"]
    name = rec["name"]
    try:
        now = image_identity(path)
    except OSError as e:
        raise UserError(f"pool {name!r}: its image {path} is gone ({e.strerror}); restart the pool") from None
    then = {k: rec["image"][k] for k in now}
    if now != then:
        diff = ", ".join(f"{k} {then[k]} -> {now[k]}" for k in now if now[k] != then[k])
        raise UserError(f"pool {name!r}: image {path} changed since the pool started ({diff}); attach refused, "
                        f"restart the pool (launch.py pool stop {name}; pool start ...)")
    if image.uuid != rec["image"]["uuid"]:
        raise UserError(f"pool {name!r}: image {path} header uuid {image.uuid}, the pool serves "
                        f"{rec['image']['uuid']}; attach refused")
    if image.manifest_crcs() != rec["image"]["groups"]:
        raise UserError(f"pool {name!r}: the manifest of {path} lists other extents or checksums than the pool "
                        f"serves; attach refused")


def attach(name: str, image_path: str | None = None) -> Attachment:
    """Check pool ``name`` (this user's, alive, serving the unchanged image) and claim a client row."""
    from runtime.shm import CLIENT_ATTACHED, CLIENT_FREE, MAGIC, VERSION, PoolResources

    rec = read_record(name)
    if not coordinator_alive(rec):
        raise UserError(f"pool {name!r} is not running (coordinator pid {rec.get('pid')} is gone); "
                        f"launch.py pool cleanup {name}, then pool start")
    if image_path is not None and os.path.realpath(image_path) != os.path.realpath(rec["image"]["path"]):
        raise ConfigError(f"--image {image_path}: pool {name!r} serves {rec['image']['path']} (leave out --image "
                          f"with --attach, or attach to a pool of that image)")
    image = Image.open(rec["image"]["path"], rec["image"]["manifest"])
    check_image_unchanged(rec, image)
    handle = handle_of(rec)
    with _lock(name):
        res = PoolResources.attach(handle, ring=False)
        try:
            if int(res.header["magic"]) != MAGIC or int(res.header["version"]) != VERSION or \
                    int(res.header["coord_pid"]) != int(rec["pid"]):
                raise UserError(f"pool {name!r}: its control block does not belong to coordinator pid {rec['pid']} "
                                f"(stale); launch.py pool cleanup {name}")
            if int(res.header["state"]) == POOL_FAILED:
                raise UserError(f"pool {name!r} failed: {res.get_error()}")
            free = [j for j in range(handle.n_clients) if int(res.clients[j]["state"]) == CLIENT_FREE]
            if not free:
                pids = [int(p) for p in res.clients["pid"]]
                raise UserError(f"pool {name!r}: all {handle.n_clients} client slots are attached (pids {pids}); "
                                f"start the pool with more --clients")
            j = free[0]
            res.clients[j]["pid"], res.clients[j]["state"] = os.getpid(), CLIENT_ATTACHED
        finally:
            res.close()
    return Attachment(rec, handle, j, image)


# ---- the daemon process ----------------------------------------------------------------------------
def daemon_main(cfg_file: str) -> int:
    from runtime.pool import Coordinator, PoolConfig, on_stop_signal
    from workers.io_worker import WorkerOptions

    dc = DaemonConfig(**json.loads(Path(cfg_file).read_text()))
    Path(cfg_file).unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pcfg = PoolConfig(dc.image, dc.manifest, dc.name, tuple(dc.dram_groups), dc.window_slots, max(dc.slot_bytes, 1),
                      n_clients=dc.n_clients, workers=dc.workers,
                      worker_opts=WorkerOptions(direct=dc.direct, chunk_bytes=dc.staging_mb << 20))
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
               "started_unix": time.time(), "log": str(log_path(dc.name)), "handle": asdict(coord.handle),
               "image": {"path": str(img.path), "manifest": str(img.manifest_path), "uuid": img.uuid,
                         "groups": img.manifest_crcs(), **image_identity(str(img.path))},
               "dram_groups": dc.dram_groups, "dram_tier_bytes": sum(img.groups[g].size for g in dc.dram_groups),
               "window_slots": dc.window_slots, "slot_bytes": dc.slot_bytes, "workers": dc.workers,
               "dram_budget": dc.dram_budget}
        _write_record(rec)
        coord.serve()
    finally:
        coord.shutdown()
        with contextlib.suppress(OSError, ValueError):
            p = record_path(dc.name)
            if json.loads(p.read_text()).get("pid") == os.getpid():
                p.unlink()
        print(f"[pool {dc.name} pid {os.getpid()}] stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(daemon_main(sys.argv[1]))
