"""Staged writes: files and directories written under temporary names beside their targets and renamed into
place together once complete, so that a writer that fails or is killed leaves the old targets exactly as
they were and no temporary behind.

``Staging`` is the writer's side. Every temporary path is announced to a *guard* before it is created. The
guard (``python -m runtime.format.staged``, started in its own session, so a Ctrl-C or a kill of the writer's
process group does not reach it) reads the announcements from a pipe; when the pipe closes it looks at how
it closed:

    "done" received          the commit finished: nothing to do
    "commit" received        the writer died while renaming: the guard finishes the renames (roll forward:
                             every temporary was complete and verified before the commit began)
    neither                  the writer died or failed before committing: the guard removes every
                             announced temporary that exists

A commit is a list of renames done in order; the writer announces each one done. On resuming, only the
first unannounced rename can be in doubt, and its source's existence tells whether it happened.

A large file can also be written through ``open_tmpfile``: an unnamed inode (O_TMPFILE) that the kernel
frees by itself if the writer dies, linked to its temporary name only once written. Runs in the writer's
process (``launch.py pack``) and, for the guard, in a process of its own with no imports beyond the
standard library.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

TEMP_MARK = ".pack-"  # every temporary name holds it: <target>.pack-<pid>.tmp / .old


class Staging:
    """One staged write. ``temp(target)`` names a temporary beside ``target`` (announced to the guard);
    ``commit(pairs)`` renames each (temporary, target) into place, a target directory that exists being
    moved aside first and removed after; ``close()`` ends the write (the guard removes what is left when
    ``commit`` did not run)."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parent.parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
        self.guard = subprocess.Popen([sys.executable, "-m", "runtime.format.staged"], stdin=subprocess.PIPE, cwd=root,
                                      env=env, start_new_session=True, stdout=subprocess.DEVNULL)
        self.temps: list[str] = []
        self.committed = False

    def _say(self, msg: dict) -> None:
        try:
            self.guard.stdin.write((json.dumps(msg) + "\n").encode())
            self.guard.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise OSError(f"the staged write's guard process (pid {self.guard.pid}) is gone ({e}); nothing was "
                          f"renamed into place") from None

    def temp(self, target: str | Path, kind: str = "tmp") -> Path:
        """A temporary name beside ``target``, announced before the caller creates it."""
        target = Path(target).absolute()  # the guard runs elsewhere
        p = target.with_name(f"{target.name}{TEMP_MARK}{os.getpid()}.{kind}")
        self._say({"temp": str(p)})
        self.temps.append(str(p))
        return p

    def commit(self, pairs: list[tuple[Path, Path]], kill_at: str | None = None) -> None:
        """Rename every (temporary, target) into place, in order. A target directory that exists goes aside
        first (removed once all are in place); a target directory whose temporary is None is removed.
        ``kill_at``: tests only (LLMS_PACK_KILL_AT=rename-N), SIGKILL this process before rename N."""
        ops: list[tuple[str, str]] = []
        aside: list[str] = []
        for tmp, dst in pairs:
            tmp, dst = (None if tmp is None else Path(tmp).absolute()), Path(dst).absolute()
            if dst.is_dir() and not dst.is_symlink():
                old = self.temp(dst, "old")
                ops.append((str(dst), str(old)))
                aside.append(str(old))
            if tmp is not None:
                ops.append((str(tmp), str(dst)))
        self._say({"commit": ops, "remove": aside})
        for i, (src, dst) in enumerate(ops):
            if kill_at == f"rename-{i}":
                os.kill(os.getpid(), signal.SIGKILL)
            os.replace(src, dst)
            self._say({"did": i})
        for d in aside:
            shutil.rmtree(d, ignore_errors=True)
        self._say({"done": True})
        self.committed = True

    def close(self) -> None:
        """End the write: the guard removes the temporaries unless the commit finished; waits for it."""
        try:
            self.guard.stdin.close()
        except OSError:
            pass
        try:
            self.guard.wait(30)
        except subprocess.TimeoutExpired:
            self.guard.kill()
            self.guard.wait()

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_tmpfile(directory: str | Path, probe: Path, mode: int = 0o644) -> int | None:
    """An unnamed file in ``directory`` open for writing (O_TMPFILE), or None where the filesystem has none or
    this process cannot give one a name later (tried first on a second unnamed file, linked to ``probe`` and
    removed at once)."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None:
        return None
    try:
        test = os.open(directory, flag | os.O_WRONLY, mode)
    except OSError:  # EOPNOTSUPP, EISDIR (old kernels), EINVAL
        return None
    try:
        link_tmpfile(test, probe)
        os.unlink(probe)
    except OSError:
        return None
    finally:
        os.close(test)
    return os.open(directory, flag | os.O_WRONLY, mode)


def link_tmpfile(fd: int, path: str | Path) -> None:
    """Give the unnamed file ``fd`` the name ``path``: linkat(fd, "", AT_EMPTY_PATH) where this process may
    (CAP_DAC_READ_SEARCH), else through /proc/self/fd (which some sandboxes refuse with EXDEV)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.linkat(fd, b"", -100, os.fsencode(str(path)), 0x1000) == 0:  # AT_FDCWD, AT_EMPTY_PATH
        return
    os.link(f"/proc/self/fd/{fd}", path, follow_symlinks=True)


# ---- the guard process --------------------------------------------------------------------------------------

def _remove(path: str) -> None:
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def guard_main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the writer's Ctrl-C is the writer's; this one cleans up
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    temps: list[str] = []
    commit: list[list[str]] | None = None
    remove: list[str] = []
    did, done = -1, False
    for line in sys.stdin.buffer:
        try:
            msg = json.loads(line)
        except ValueError:
            break  # a torn line: the writer died mid-write
        if "temp" in msg:
            temps.append(msg["temp"])
        elif "commit" in msg:
            commit, remove = msg["commit"], msg.get("remove", [])
        elif "did" in msg:
            did = int(msg["did"])
        elif msg.get("done"):
            done = True
    if done:
        return 0
    if commit is not None:  # roll forward: finish the renames from the first one not announced done
        for i, (src, dst) in enumerate(commit):
            if i <= did or not os.path.lexists(src):
                continue
            try:
                os.replace(src, dst)
            except OSError as e:
                print(f"staged write: cannot rename {src} to {dst}: {e}", file=sys.stderr)
                return 1
        for d in remove:
            _remove(d)
        return 0
    for t in temps:
        _remove(t)
    return 0


if __name__ == "__main__":
    sys.exit(guard_main())
