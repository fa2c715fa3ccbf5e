"""Progress lines for long work (packing, verifying, filling the DRAM tier), printed to stderr.

On a terminal the line is redrawn in place; otherwise a line is printed at most every ``interval`` seconds,
so logs stay short. Used in whichever process does the long work.
"""

from __future__ import annotations

import sys
import time

from model.args import human_bytes


class Progress:
    def __init__(self, what: str, total_bytes: int, quiet: bool = False, interval: float = 2.0) -> None:
        self.what, self.total, self.quiet, self.interval = what, total_bytes, quiet, interval
        self.done_bytes, self.t0, self.last = 0, time.monotonic(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, nbytes: int, label: str = "") -> None:
        self.done_bytes += nbytes
        now = time.monotonic()
        if self.quiet or (now - self.last < (0.2 if self.tty else self.interval) and self.done_bytes < self.total):
            return
        self.last = now
        rate = self.done_bytes / max(now - self.t0, 1e-9)
        eta = (self.total - self.done_bytes) / rate if rate > 0 else 0.0
        line = (f"{self.what}: {human_bytes(self.done_bytes)} / {human_bytes(self.total)} "
                f"({100 * self.done_bytes / max(self.total, 1):.0f}%) {rate / 1e9:.2f} GB/s ETA {eta:.0f} s {label}")
        sys.stderr.write(("\r\x1b[K" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def done(self) -> float:
        dt = time.monotonic() - self.t0
        if not self.quiet:
            end = "\n" if self.tty else ""
            sys.stderr.write(f"{end}{self.what}: done, {human_bytes(self.done_bytes)} in {dt:.1f} s "
                             f"({self.done_bytes / max(dt, 1e-9) / 1e9:.2f} GB/s)\n")
        return dt
