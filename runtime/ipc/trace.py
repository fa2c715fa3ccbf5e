"""``--trace FILE``: a Chrome trace-event JSON of one run, across the pool's processes (open it in
https://ui.perfetto.dev or chrome://tracing; render it with benchmarks/render_trace.py).

What it shows, one row per process and track, so a reader sees what hides what:
  io-worker N / disk reads[ K]   one span per group read, from submit to verified (name: the group; args:
                                 slot, seq, bytes, read_ms, GBps, chunks, crc_ms, status), with the crc32
                                 check nested at its end. Reads in flight at once go on lanes "disk reads",
                                 "disk reads 2", ... (a track's spans must nest, not overlap).
  coordinator / pool             the fill of the DRAM tier, one span (from queueing its reads, so it holds
                                 the workers' start).
  client / H2D copy stream       (CUDA) one span per group copy into a staging buffer.
  client / compute               one span per group: compute of group p runs from get(p) (after the compute
                                 stream's wait for its copy) to get(p+1); "embed" opens each pass; the pass's
                                 last group ends at the next pass's embed (so it also holds the output
                                 projection and sampling) or when the run ends. args: pass.
  client / slot waits            host time blocked in wait_ready for a streamed group's window slot.

Clocks. Every process stamps with time.monotonic_ns() (CLOCK_MONOTONIC, one clock for all processes of the
host), so spans line up without any exchange. CUDA work is stamped with timing events on its stream, and
converted to host time by anchoring: after a synchronize, one event is recorded at a known host time, and an
event's host time is anchor_host + anchor.elapsed_time(event). The anchor moves forward to a converted event
at least every REANCHOR_MS so cudaEventElapsedTime's float milliseconds keep sub-microsecond precision on
long runs; the anchor's own uncertainty (half the record-and-synchronize time) is in the file's metadata.
Events completed on the GPU are converted as the run goes, so only a few hundred CUDA events are alive.

The recorder and the merge live here, torch-free, for the pool's processes (``WorkerTrace``, the coordinator's
``Recorder``); the client's recorder and the session that writes FILE are runtime/engine/trace.py.

Processes and files. Each process records into a list in its own memory (no per-event IPC) and writes it
once, at exit or STOP, to ``<trace dir>/<process>-<pid>.json`` (written to .tmp, then renamed). The trace
dir is a temporary directory next to FILE that ``TraceSession`` (in the client, the launch.py process)
creates and owns: the pool gets its path through ``WorkerOptions.trace_dir``; after the pool has stopped
the session merges every process's file with the client's events into FILE and removes the directory, also
when the run failed. A process killed with SIGKILL loses its events (the merge lists the files it found).

Bounds. At most MAX_EVENTS spans per process and in FILE (the earliest are kept); when capped, the metadata
(``otherData``) says so and counts the spans dropped per process. A span costs about 0.5 KB of memory.
Tracing off costs nothing: every hook is behind a ``None`` check.

Run the tests with: ``python -m pytest -q tests/test_trace.py``
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

MAX_EVENTS = 1_000_000
REANCHOR_MS = 1000.0  # move the CUDA anchor at least this often (float ms precision)
CONVERT_EVERY = 256  # convert completed CUDA spans once this many are pending
SORT_WORKER, SORT_COORDINATOR, SORT_CLIENT = 0, 1000, 2000  # process order: disk, then pool, then GPU
READS, COPIES, COMPUTE, WAITS = "disk reads", "H2D copy stream", "compute", "slot waits"  # the tracks


class Recorder:
    """One process's spans in host CLOCK_MONOTONIC ns, in memory until ``dump``. Thread-safe appends."""

    def __init__(self, process: str, sort: int, cap: int = MAX_EVENTS) -> None:
        self.process, self.sort, self.cap, self.pid = process, sort, cap, os.getpid()
        self.threads: dict[str, int] = {}  # track name -> tid (1, 2, ... in order of first use)
        self.events: list[tuple] = []  # (name, cat, tid, t0_ns, t1_ns, args)
        self.dropped = 0
        self.lanes: dict[str, list[int]] = {}  # track -> end (ns) of the last span on each of its lanes
        self.lock = threading.Lock()

    def tid(self, thread: str) -> int:
        with self.lock:
            return self.threads.setdefault(thread, len(self.threads) + 1)

    def span(self, name: str, cat: str, thread: str, t0: int, t1: int, args: dict | None = None) -> None:
        if len(self.events) >= self.cap:
            self.dropped += 1
            return
        self.events.append((name, cat, self.tid(thread), t0, t1, args or {}))

    def lane(self, thread: str, t0: int, t1: int) -> str:
        """The first lane of ``thread`` free at ``t0`` (spans are recorded as they end, so a lane's spans
        follow each other); lane 0 is ``thread`` itself, lane k is "``thread`` k+1"."""
        with self.lock:
            ends = self.lanes.setdefault(thread, [])
            k = next((i for i, end in enumerate(ends) if end <= t0), len(ends))
            ends[k:k + 1] = [t1]
        return thread if k == 0 else f"{thread} {k + 1}"

    def part(self) -> dict:
        return {"process": self.process, "pid": self.pid, "sort": self.sort, "dropped": self.dropped,
                "threads": sorted((t, n) for n, t in self.threads.items()), "events": self.events}

    def dump(self, directory: str) -> Path | None:
        """Write this process's spans to ``directory`` (tmp + rename: the merge never sees half a file). A
        failure (the client gone and its directory with it) is reported, never raised: we are exiting."""
        path = Path(directory) / f"{self.process.replace(' ', '-')}-{self.pid}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.part(), separators=(",", ":")))
            tmp.rename(path)
        except OSError as e:
            print(f"[{self.process} pid {self.pid}] trace: cannot write {path}: {e}", file=sys.stderr, flush=True)
            return None
        return path


class WorkerTrace(Recorder):
    """An I/O worker's reads (workers/io_worker.py). Group names are filled in at the merge (the worker
    knows only group indices)."""

    def __init__(self, index: int) -> None:
        super().__init__(f"io-worker {index}", SORT_WORKER + index)

    def read(self, group: int, slot: int, seq: int, size: int, chunk_bytes: int, t0: int, t1: int,
             status: int) -> None:
        """A read submitted at ``t0``, its bytes in the slot at ``t1``, verified now."""
        t2 = time.monotonic_ns()
        read_s = max(t1 - t0, 1) / 1e9
        args = {"group": group, "slot": slot, "seq": seq, "bytes": size, "read_ms": round(read_s * 1e3, 3),
                "GBps": round(size / read_s / 1e9, 3), "chunks": -(-size // chunk_bytes),
                "crc_ms": round((t2 - t1) / 1e6, 3), "status": status}
        track = self.lane(READS, t0, t2)
        self.span(f"group {group}", "read", track, t0, t2, args)
        self.span("crc32", "crc", track, t1, t2)

def merge(parts: list[dict], names: list[str], origin_ns: int, anchor_error_ns: int | None) -> dict:
    """Processes' parts -> a Chrome trace-event document ("X" spans in us since ``origin_ns``, "M" names)."""
    meta, spans, dropped = [], [], {}
    for part in sorted(parts, key=lambda p: (p["sort"], p["pid"])):
        pid = part["pid"]
        meta.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": part["process"]}})
        meta.append({"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": part["sort"]}})
        for tid, thread in part["threads"]:
            meta.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}})
            meta.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        for name, cat, tid, t0, t1, args in part["events"]:
            if cat == "read":  # the worker knew the group's index only
                name = args["group"] = names[args["group"]]
            spans.append({"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": tid,
                          "ts": round((t0 - origin_ns) / 1e3, 3), "dur": round(max(t1 - t0, 0) / 1e3, 3),
                          "args": args})
        if part["dropped"]:
            dropped[f"{part['process']} (pid {pid})"] = part["dropped"]
    spans.sort(key=lambda e: (e["ts"], -e["dur"]))  # a parent before the spans nested in it
    if len(spans) > MAX_EVENTS:
        dropped["merge (latest spans)"] = len(spans) - MAX_EVENTS
        del spans[MAX_EVENTS:]
    other = {"tool": "llmstream --trace (runtime/ipc/trace.py)", "clock": "CLOCK_MONOTONIC",
             "origin_ns": origin_ns, "events": len(spans), "max_events": MAX_EVENTS, "capped": bool(dropped),
             "dropped": dropped, "processes": [p["process"] for p in parts]}
    if anchor_error_ns is not None:
        other["cuda_anchor_error_us"] = anchor_error_ns / 1e3
    return {"traceEvents": meta + spans, "displayTimeUnit": "ms", "otherData": other}

