"""The user's pool dir and what it holds: every pool's record, log and lock, its server's record, socket and
log. Torch-free; the one place these paths are spelled.

The pool dir is private to the user (mode 0700, checked): ``$LLMS_POOL_DIR``, else
``$XDG_RUNTIME_DIR/llmstream``, else ``/tmp/llmstream-<uid>`` (runtime/env.py). Per pool NAME:

    NAME.json         the pool's record (runtime/pool/daemon.py writes it): coordinator pid, handle, image, tiers
    NAME.log          the coordinator's output
    NAME.lock         serialises start / cleanup / client-row claims / server start of NAME
    NAME.server       its server's record (runtime/services/server.py), NAME.sock its socket,
    NAME.server.log   the server's output

A record is replaced whole (readers never see half a file) and is mode 0600. ``pool_lock`` survives the
removal of its file (``forget``, under the lock): a waiter that wakes on a removed file takes the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from pathlib import Path

from model.errors import UserError
from runtime.ipc.procs import DAEMON_MODULE, SERVER_MODULE, kill_wait, runs_module
from runtime.ipc.shm import PoolHandle, validate_pool_name

RECORD_VERSION = 1
SERVER_RECORD_VERSION = 1
SUFFIXES = {"record": ".json", "log": ".log", "lock": ".lock", "server": ".server", "socket": ".sock",
            "server_log": ".server.log"}


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


def pool_file(name: str, kind: str) -> Path:
    """The pool dir's ``kind`` file of pool ``name`` (record, log, lock, server, socket, server_log)."""
    return pool_dir() / f"{validate_pool_name(name)}{SUFFIXES[kind]}"


def write_private(path: Path, obj: dict) -> None:
    """``obj`` as JSON at ``path``, mode 0600, replaced whole (readers never see half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ---- pool records ------------------------------------------------------------------------------------------

def read_record(name: str) -> dict:
    """The record of pool ``name``; UserError if there is none or it is not this user's."""
    p = pool_file(name, "record")
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


def coordinator_alive(rec: dict) -> bool:
    """The record's coordinator is running (and is a pool coordinator: a reused pid is not)."""
    return runs_module(rec.get("pid"), DAEMON_MODULE)


# ---- server records ----------------------------------------------------------------------------------------

def read_server_record(name: str) -> dict | None:
    p = pool_file(name, "server")
    try:
        st = p.stat()
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if st.st_uid != os.getuid() or rec.get("uid") != os.getuid() or rec.get("version") != SERVER_RECORD_VERSION:
        return None
    return rec


def server_alive(rec: dict) -> bool:
    """The record's pid runs a server (a reused pid does not)."""
    return runs_module(rec.get("pid"), SERVER_MODULE)


def live_server(name: str) -> dict | None:
    """The record of pool ``name``'s running server, else None. A server still loading has a placeholder
    record (``"starting": true``, written by ``pool serve`` as it spawns it, so a second one is refused)."""
    rec = read_server_record(name)
    return rec if rec is not None and server_alive(rec) else None


def list_servers() -> list[dict]:
    """The records of this user's running servers (every pool of the pool dir)."""
    out = []
    for p in sorted(pool_dir().glob(f"*{SUFFIXES['server']}")):
        with contextlib.suppress(UserError, ValueError):
            rec = live_server(p.name[:-len(SUFFIXES["server"])])
            if rec is not None:
                out.append(rec)
    return out


def clean_stale_server(name: str) -> list[str]:
    """Remove a dead server's record and socket (never a live one's); returns the paths removed."""
    rec = read_server_record(name)
    if rec is not None and server_alive(rec):
        return []
    removed = []
    for p in (pool_file(name, "server"), pool_file(name, "socket")):
        if p.exists():
            p.unlink(missing_ok=True)
            removed.append(str(p))
    return removed


def stop_server(name: str, timeout_s: float = 10.0) -> str:
    """Stop pool ``name``'s server (SIGTERM, SIGKILL after ``timeout_s``), remove its files; says what it did.
    Here, below both, because ``pool stop`` (runtime/services/pools.py) stops a pool's server first and ``pool
    serve --stop`` (runtime/services/server.py) stops it alone."""
    rec = read_server_record(name)
    if rec is None or not server_alive(rec):
        removed = clean_stale_server(name)
        return f"pool {name}: no server running" + (f"; removed {', '.join(removed)}" if removed else "")
    pid = int(rec["pid"])
    how = "stopped"
    if not kill_wait(pid, timeout_s, signal.SIGTERM):
        kill_wait(pid, 5.0)
        how = f"did not stop within {timeout_s:g} s: killed"
    clean_stale_server(name)
    return f"pool {name}: server pid {pid} {how}"


# ---- the lock, logs ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def pool_lock(name: str):
    """The pool's lock file (serialises start / cleanup / client-row claims of one pool name). The file is
    removed with the pool (``forget``, under the lock), so a waiter that wakes on a removed file takes the
    new one instead."""
    path = pool_file(name, "lock")
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


def forget(name: str) -> list[str]:
    """Under the pool's lock, once nothing of pool ``name`` is alive: remove its logs and its lock file."""
    removed = []
    for kind in ("log", "server_log", "lock"):
        p = pool_file(name, kind)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(str(p))
    return removed


def has_files(name: str) -> bool:
    """Whether pool ``name`` has anything in the pool dir."""
    return any(os.path.lexists(pool_file(name, k)) for k in SUFFIXES)


def log_tail(log: Path, n: int = 8) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("  " + x for x in lines[-n:])
