"""Processes of this runtime: liveness (a zombie is dead, a reused pid runs another program), stopping with
escalation, and starting a detached service process. Torch-free; used by the pool, the engine and the
services."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the repository: a detached process runs from here
DAEMON_MODULE = "runtime.pool.daemon"  # the daemon pool's process: python -m DAEMON_MODULE
SERVER_MODULE = "runtime.services.server"  # the pool's server: python -m SERVER_MODULE


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def runs_module(pid, module: str) -> bool:
    """``pid`` is alive and runs ``python -m module`` (a reused pid does not)."""
    if not pid or not pid_alive(int(pid)):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc: trust the pid
    return module.encode() in cmd


def stop_processes(procs: list, grace_s: float) -> None:
    """multiprocessing children: join, then terminate, then kill; never leaves a process behind."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0))
    for p in procs:
        if p.exitcode is None:
            p.terminate()
            p.join(1.0)
        if p.exitcode is None:
            p.kill()
            p.join(1.0)


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def kill_wait(pid: int, timeout_s: float, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` and wait up to ``timeout_s`` for the process to go; True if it went."""
    kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not pid_alive(pid)


def spawn_detached(module: str, cfg: dict, cfg_file: Path, log: Path) -> subprocess.Popen:
    """``python -m module CFG_FILE`` detached from the terminal: its own session, stdin /dev/null, output
    appended to ``log``; ``cfg`` goes to ``cfg_file`` (mode 0600), which the process reads and removes."""
    fd = os.open(cfg_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f)
    logf = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get("PYTHONPATH")] if x]),
               PYTHONUNBUFFERED="1")
    try:
        return subprocess.Popen([sys.executable, "-m", module, str(cfg_file)], cwd=ROOT, env=env,
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                                close_fds=True)
    finally:
        os.close(logf)


def spawn_foreground(module: str, cfg: dict, cfg_file: Path) -> subprocess.Popen:
    """``python -m module CFG_FILE`` as a child in this process's session and process group (Ctrl-C reaches
    it), its output on this terminal; ``cfg`` goes to ``cfg_file`` (mode 0600), which the process reads and
    removes."""
    fd = os.open(cfg_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [x for x in [os.environ.get("PYTHONPATH")] if x]),
               PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", module, str(cfg_file)], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, close_fds=True)
