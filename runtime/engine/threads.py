"""The CPU's compute threads, shared out among the runs of one machine.

PyTorch gives every process as many compute threads as the machine has cores, and its OpenMP threads spin
while they wait. Two runs computing on the CPU at once then keep four spinning threads on two cores, and
both slow down by far more than half (a 30-layer model decoding 400 tokens on 2 cores: 29 s alone, 85 s each
side by side; 30 s each with one thread per run). So each process that computes on the CPU registers
itself here (a file named by its pid in the pool dir's ``compute`` directory) and takes ``cores // runs``
threads, re-counted at most every ``RECOUNT_S`` as runs come and go (``refresh``, called once a pass).
``--threads N`` fixes the count instead. The pool's coordinator and I/O workers do not compute (they wait on
the disk and checksum), so they are not counted. Runs in the client process.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from runtime.ipc.procs import pid_alive
from runtime.ipc.records import pool_dir

RECOUNT_S = 0.5


class ComputeThreads:
    """This process's share of the cores: ``fixed`` threads, or (None) ``cores // live registered runs``."""

    def __init__(self, fixed: int | None = None, quiet: bool = True, cores: int | None = None) -> None:
        self.fixed, self.quiet = fixed, quiet
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.cores = max(1, cores or 1)
        self.path: Path | None = None
        self.checked = 0.0
        self.current: int | None = None
        if fixed is None:
            self._register()
        self.refresh(force=True)

    def _dir(self) -> Path:
        d = pool_dir() / "compute"
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def _register(self) -> None:
        import atexit

        for _ in range(2):  # a second time if another run removed the empty directory meanwhile (close)
            try:
                self.path = self._dir() / str(os.getpid())
                self.path.write_text(f"{os.getpid()}\n")
                atexit.register(self.close)
                return
            except FileNotFoundError:
                continue
            except OSError:  # no pool dir (read-only $TMPDIR): this run takes every core
                break
        self.path = None

    def runs(self) -> int:
        """Live registered runs on this machine, this one included; the files of dead ones are removed."""
        if self.path is None:
            return 1
        n = 0
        for p in self.path.parent.iterdir():
            try:
                pid = int(p.name)
            except ValueError:
                continue
            if pid == os.getpid() or pid_alive(pid):
                n += 1
            else:
                p.unlink(missing_ok=True)
        return max(n, 1)

    def refresh(self, force: bool = False) -> int:
        """Set torch's thread count to this process's share (recounted at most every RECOUNT_S)."""
        now = time.monotonic()
        if not force and (self.fixed is not None or now - self.checked < RECOUNT_S):
            return self.current or 1
        self.checked = now
        n = self.fixed if self.fixed is not None else max(1, self.cores // self.runs())
        if n != self.current:
            import torch

            torch.set_num_threads(n)
            if not self.quiet and self.current is None:
                how = "--threads" if self.fixed is not None else f"{self.cores} cores shared by {self.runs()} " \
                                                                  f"run(s) on this machine; --threads N to fix it"
                print(f"compute threads: {n} ({how})", file=sys.stderr)
            self.current = n
        return n

    def close(self) -> None:
        """Unregister; the directory, and the pool dir it is in, go when this was the last thing in them."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            for d in (self.path.parent, self.path.parent.parent):
                try:
                    d.rmdir()
                except OSError:  # not empty (other runs, pools), or gone
                    break
            self.path = None

    def __del__(self) -> None:
        self.close()
