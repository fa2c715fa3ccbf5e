"""``--trace FILE``, the client's side: its copies, computes and slot waits, and the session that merges every
process's part into FILE (the format, the clocks and the files: runtime/ipc/trace.py). Runs in the client."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import torch

from model.errors import ConfigError
from runtime.ipc.trace import COMPUTE, CONVERT_EVERY, COPIES, REANCHOR_MS, SORT_CLIENT, WAITS, Recorder, merge


class ClientTrace(Recorder):
    """The client's copies, computes and waits. ``mark`` stamps now: host ns on the CPU, a recorded CUDA
    timing event (on ``stream``, default the compute stream) on CUDA; spans between two marks are converted
    to host ns once their end event has completed (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__("client", SORT_CLIENT)
        self.torch_cuda = torch.cuda
        self.device, self.cuda = torch.device(device), torch.device(device).type == "cuda"
        for t in ((COPIES,) if self.cuda else ()) + (COMPUTE, WAITS):
            self.tid(t)  # track order: copies above computes above waits
        self.pending: deque = deque()  # CUDA spans: (name, cat, thread, start event, end event, args)
        self.open: tuple | None = None  # the compute span in progress: (name, pass, start mark)
        self.passes = 0
        self.anchor_error_ns = 0
        if self.cuda:
            self._anchor()

    def _anchor(self) -> None:
        self.torch_cuda.synchronize(self.device)
        ev = self.torch_cuda.Event(enable_timing=True)
        t0 = time.monotonic_ns()
        ev.record(self.torch_cuda.current_stream(self.device))
        ev.synchronize()
        t1 = time.monotonic_ns()
        self.ref, self.ref_ns, self.anchor_error_ns = ev, (t0 + t1) // 2, (t1 - t0) // 2

    def mark(self, stream=None):
        if not self.cuda:
            return time.monotonic_ns()
        ev = self.torch_cuda.Event(enable_timing=True)
        ev.record(stream if stream is not None else self.torch_cuda.current_stream(self.device))
        return ev

    def stamped(self, name: str, cat: str, thread: str, m0, m1, args: dict | None = None) -> None:
        """A span between two marks."""
        if not self.cuda:
            self.span(name, cat, thread, m0, m1, args)
            return
        self.pending.append((name, cat, thread, m0, m1, args))
        if len(self.pending) >= CONVERT_EVERY:
            self.convert()

    def convert(self, wait: bool = False) -> None:
        """Turn pending CUDA spans whose end event completed (all of them with ``wait``) into host spans."""
        if wait and self.pending:
            self.torch_cuda.synchronize(self.device)
        while self.pending and (wait or self.pending[0][4].query()):
            name, cat, thread, e0, e1, args = self.pending.popleft()
            self.span(name, cat, thread, self._host_ns(e0), self._host_ns(e1), args)

    def _host_ns(self, ev) -> int:
        dt_ms = self.ref.elapsed_time(ev)
        t = self.ref_ns + round(dt_ms * 1e6)
        if abs(dt_ms) > REANCHOR_MS:
            self.ref, self.ref_ns = ev, t
        return t

    # ---- hooks: runtime/engine/streamed.py (copies, waits) and TracedSource (computes) ---------------------------
    def copy(self, group: str, m0, m1, size: int, buffer: int) -> None:
        self.stamped(group, "copy", COPIES, m0, m1, {"bytes": size, "staging_buffer": buffer})

    def wait(self, group: str, t0: int, position: int) -> None:
        self.span(group, "wait", WAITS, t0, time.monotonic_ns(), {"position": position})

    def compute_begin(self, name: str) -> None:
        self.open = (name, self.passes, self.mark())

    def compute_end(self) -> None:
        if self.open is not None:
            name, n, m0 = self.open
            self.open = None
            self.stamped(name, "compute", COMPUTE, m0, self.mark(), {"pass": n})


class TracedSource:
    """A weight source that records each group's compute (see the module docstring); everything else is
    the wrapped source's. A context manager: leaving it ends the span in progress."""

    def __init__(self, source, trace: ClientTrace) -> None:
        self.source, self.trace = source, trace

    def __getattr__(self, name: str):
        return getattr(self.source, name)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        self.trace.compute_end()
        self.trace.passes += 1
        self.trace.compute_begin("embed")
        return self.source.embed(tokens)

    def get(self, group: str):
        self.trace.compute_end()  # group p-1's work is all enqueued
        w = self.source.get(group)  # on CUDA this enqueues the compute stream's wait for the copy
        self.trace.compute_begin(group)
        return w

    def __enter__(self) -> TracedSource:
        return self

    def __exit__(self, *exc) -> None:
        self.trace.compute_end()


class TraceSession:
    """One traced run (client side): the parts directory, the client's recorder, the merge into FILE.

    Use as a context manager around the pool's lifetime: on exit (after the pool stopped and its processes
    wrote their parts) it writes FILE and removes the parts directory."""

    def __init__(self, out: str, device: torch.device, group_names: list[str]) -> None:
        self.out = Path(out)
        if self.out.is_dir() or not self.out.parent.is_dir():
            raise ConfigError(f"--trace {out}: needs a file path in an existing directory")
        self.names = list(group_names)
        self.origin_ns = time.monotonic_ns()
        self.client = ClientTrace(device)
        self.dir = tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".parts", dir=self.out.parent)

    def wrap(self, source) -> TracedSource:
        return TracedSource(source, self.client)

    def __enter__(self) -> TraceSession:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            n = self.write()
            print(f"trace: {n} events written to {self.out}", file=sys.stderr)
        except Exception as e:  # never hide the run's own error behind the trace's
            if exc is None:
                raise
            print(f"trace: not written ({e})", file=sys.stderr)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def write(self) -> int:
        """Merge the parts and the client's spans into FILE; returns the number of spans written."""
        self.client.compute_end()
        if self.client.cuda:
            self.client.convert(wait=True)
        parts = [json.loads(p.read_text()) for p in sorted(Path(self.dir).glob("*.json"))]
        parts.append(self.client.part())
        doc = merge(parts, self.names, self.origin_ns, self.client.anchor_error_ns if self.client.cuda else None)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(doc, separators=(",", ":")))
        tmp.rename(self.out)
        return doc["otherData"]["events"]


