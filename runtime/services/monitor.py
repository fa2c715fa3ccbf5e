"""``launch.py pool status NAME [--watch] [--interval S] [--json]``: what a daemon pool is doing.

One *snapshot* (``snapshot``) reads the pool's record and its control block (mapped without the data ring)
and samples every process of the pool with psutil: the coordinator (the header's pid), each I/O worker (the
worker table's pids) and each attached client (the client table's rows in state ATTACHED). Per process: CPU %,
RSS, locked (``VmLck``) and pinned (``VmPin``) memory from /proc/PID/status, disk read bytes and their rate.
The slot table is summarised per state for the DRAM-tier slots and the window slots, with the pool's I/O
counters (bytes read per tier, reads, retries, errors, worker restarts) and the attached clients.

CPU % and rates are differences between two snapshots: ``status`` takes one, waits ``--interval`` and
reports the second (with ``--watch``, every later one against the one before). A metric the OS does not give
(no /proc, another user's process, a process that exited) is null in the JSON and ``-`` on screen; a process
that exited between two samples is reported with ``alive: false``.

The JSON (``--json``; with ``--watch`` one object per line) has the schema ``SCHEMA`` documented field by field
in docs/POOL.md ("pool status --json schema"); a change of a field's name, type or meaning bumps ``SCHEMA``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from model.args import human_bytes
from model.errors import ConfigError, UserError
from runtime.ipc.records import coordinator_alive, handle_of, live_server, read_record
from runtime.ipc.shm import CLIENT_ATTACHED, MAGIC, SLOT_QUEUED, SLOT_READY, STATE_NAMES, VERSION, PoolResources

SCHEMA = "llmstream.pool-status/1"
STATE_KEYS = ("free", "queued", "ready", "error")  # slot states SLOT_FREE..SLOT_ERROR, in order


# ---- per-process samples --------------------------------------------------------------------------
def _proc_status_bytes(pid: int, keys: tuple[str, ...]) -> dict[str, int | None]:
    """``VmLck`` / ``VmPin`` (kB in /proc/PID/status) in bytes; None where unreadable or absent."""
    out: dict[str, int | None] = dict.fromkeys(keys)
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in out:
                    parts = v.split()
                    out[k] = int(parts[0]) * 1024 if parts and parts[0].isdigit() else None
    except OSError:
        pass
    return out


def _get(fn):
    """One psutil metric, None if the OS refuses or lacks it (NoSuchProcess propagates: the process is gone)."""
    import psutil

    try:
        return fn()
    except psutil.NoSuchProcess:
        raise
    except (psutil.AccessDenied, AttributeError, NotImplementedError, OSError):
        return None


def _rate(cur, prev, dt: float | None):
    if cur is None or prev is None or not dt or dt <= 0:
        return None
    return max(cur - prev, 0) / dt


def sample_process(pid: int, role: str, index: int | None, prev: dict | None, dt: float | None) -> dict:
    """One row of ``processes``; ``prev`` is the same process's row of the previous snapshot (or None)."""
    import psutil

    row = {"pid": pid, "role": role, "index": index, "alive": False, "started_unix": None, "cpu_pct": None,
           "cpu_time_s": None, "rss_bytes": None, "shared_bytes": None, "locked_bytes": None, "pinned_bytes": None,
           "read_bytes": None, "read_bytes_per_s": None}
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            if _get(p.status) == psutil.STATUS_ZOMBIE:
                return row
            row["started_unix"] = _get(p.create_time)
            t = _get(p.cpu_times)
            mem = _get(p.memory_info)
            io = _get(p.io_counters)
    except psutil.NoSuchProcess:
        return row
    row["alive"] = True
    if t is not None:
        row["cpu_time_s"] = t.user + t.system
    if mem is not None:
        row["rss_bytes"] = int(mem.rss)
        shared = getattr(mem, "shared", None)
        row["shared_bytes"] = int(shared) if shared is not None else None
    if io is not None:
        row["read_bytes"] = int(io.read_bytes)
    vm = _proc_status_bytes(pid, ("VmLck", "VmPin"))
    row["locked_bytes"], row["pinned_bytes"] = vm["VmLck"], vm["VmPin"]
    if prev is not None and prev.get("alive") and prev.get("started_unix") == row["started_unix"]:
        cpu = _rate(row["cpu_time_s"], prev.get("cpu_time_s"), dt)
        row["cpu_pct"] = None if cpu is None else round(100.0 * cpu, 1)
        row["read_bytes_per_s"] = _rate(row["read_bytes"], prev.get("read_bytes"), dt)
    return row


# ---- one snapshot ---------------------------------------------------------------------------------
def _read_tables(rec: dict) -> dict:
    """Copies of the control block's header and tables (mapped without the ring, closed again)."""
    res = PoolResources.attach(handle_of(rec), ring=False)
    try:
        hd = res.header
        if int(hd["magic"]) != MAGIC or int(hd["version"]) != VERSION or int(hd["coord_pid"]) != int(rec["pid"]):
            raise UserError(f"pool {rec['name']!r}: its control block does not belong to coordinator pid "
                            f"{rec['pid']} (stale); launch.py pool cleanup {rec['name']}")
        return {"header": hd.copy(), "slots": res.slots.copy(), "workers": res.workers.copy(),
                "clients": res.clients.copy(), "error": res.get_error(), "now_ns": time.monotonic_ns()}
    finally:
        res.close()


def _server_pid(name: str) -> int | None:
    """The pid of the pool's running server (``pool serve``; one of its attached clients), else None."""
    srv = live_server(name)
    return int(srv["pid"]) if srv else None


def snapshot(rec: dict, prev: dict | None = None) -> dict:
    """One sample of pool ``rec`` (its record, runtime.ipc.records.read_record); rates against ``prev``, the
    previous snapshot of the same pool (None: rates and CPU % are null). Layout: docs/POOL.md."""
    tabs = _read_tables(rec)
    mono, now = time.monotonic(), time.time()
    dt = mono - prev["monotonic_s"] if prev else None
    hd, slots, workers, clients = tabs["header"], tabs["slots"], tabs["workers"], tabs["clients"]
    n_dram = len(rec["dram_groups"])
    n_window = len(slots) - n_dram
    per_client = int(rec.get("window_slots") or 0)

    prev_rows = {(r["pid"], r["role"]): r for r in (prev or {}).get("processes", [])}
    wanted = [(int(hd["coord_pid"]), "coordinator", None)]
    wanted += [(int(w["pid"]), "worker", i) for i, w in enumerate(workers) if int(w["pid"]) > 0]
    attached = [(j, c) for j, c in enumerate(clients) if int(c["state"]) == CLIENT_ATTACHED]
    wanted += [(int(c["pid"]), "client", j) for j, c in attached]
    processes = []
    for pid, role, index in wanted:
        row = sample_process(pid, role, index, prev_rows.get((pid, role)), dt)
        w = workers[index] if role == "worker" else None
        row["worker_reads"] = None if w is None else int(w["reads"])
        row["worker_read_bytes"] = None if w is None else int(w["bytes_read"])
        row["worker_errors"] = None if w is None else int(w["errors"])
        row["worker_inflight"] = None if w is None else int(w["inflight"])
        row["worker_direct"] = None if w is None else bool(w["direct"])
        processes.append(row)

    def counts(rows) -> dict[str, int]:
        return {k: int((rows["state"] == s).sum()) for s, k in enumerate(STATE_KEYS)}

    dram_rows, window_rows = slots[:n_dram], slots[n_dram:]
    dram_total = int(dram_rows["capacity"].sum())
    dram_ready = int(dram_rows["capacity"][dram_rows["state"] == SLOT_READY].sum())
    slot_summary = {"total": int(len(slots)), "dram_total": n_dram,
                    **{f"dram_{k}": v for k, v in counts(dram_rows).items()},
                    "window_total": n_window, **{f"window_{k}": v for k, v in counts(window_rows).items()},
                    "window_orphaned": int(((window_rows["state"] == SLOT_QUEUED) & (window_rows["owner"] < 0)).sum()),
                    "window_slots_per_client": per_client,
                    "window_slot_bytes": int(window_rows["capacity"].max()) if n_window else 0,
                    "dram_tier_bytes": dram_total, "dram_ready_bytes": dram_ready,
                    "dram_occupancy": (dram_ready / dram_total) if dram_total else 1.0}

    pio = prev.get("io") if prev else None
    io = {"dram_read_bytes": int(hd["bytes_dram"]), "stream_read_bytes": int(hd["bytes_stream"]),
          "reads": int(hd["reads"]), "retries": int(hd["retries"]), "errors": int(hd["errors"]),
          "worker_restarts": int(hd["worker_restarts"]),
          "reads_in_flight": int(workers["inflight"].sum()), "reads_queued": int((slots["state"] == SLOT_QUEUED).sum()),
          "disk_read_bytes": int(workers["bytes_read"].sum())}
    for k in ("dram_read_bytes", "stream_read_bytes", "reads", "disk_read_bytes"):
        io[f"{k}_per_s" if k.endswith("_bytes") else "reads_per_s"] = _rate(io[k], (pio or {}).get(k), dt)

    alive = {(r["pid"], r["role"]): r["alive"] for r in processes}
    client_rows = []
    for j, c in attached:
        # client j's window (runtime.pool.coordinator.Coordinator)
        mine = window_rows[j * per_client:(j + 1) * per_client]
        held = mine[mine["owner"] == j]
        by_state = counts(held)
        by_state["free"] = int(len(mine) - len(held))
        client_rows.append({"index": j, "pid": int(c["pid"]), "alive": alive.get((int(c["pid"]), "client"), False),
                            "seq_len": int(c["seq_len"]), "cyclic": bool(c["cyclic"]), "window_slots": int(len(mine)),
                            **{f"slots_{k}": v for k, v in by_state.items()}})

    img = rec.get("image") or {}
    state = STATE_NAMES.get(int(hd["state"]), "unknown")
    pool = {"name": rec["name"], "state": state, "pid": int(rec["pid"]), "image": img.get("path"),
            "image_uuid": img.get("uuid"), "image_bytes": img.get("size"), "started_unix": rec["started_unix"],
            "uptime_s": now - rec["started_unix"],
            "heartbeat_age_s": max((tabs["now_ns"] - int(hd["heartbeat_ns"])) / 1e9, 0.0),
            "groups": int(hd["n_groups"]), "dram_groups": n_dram, "workers": int(hd["n_workers"]),
            "client_slots": int(hd["n_clients"]), "clients_attached": len(attached),
            "ring_bytes": int(hd["ring_bytes"]), "dram_budget_bytes": rec.get("dram_budget"), "log": rec.get("log"),
            "error": tabs["error"] or None, "server_pid": _server_pid(rec["name"])}
    return {"schema": SCHEMA, "time_unix": now, "monotonic_s": mono, "interval_s": dt, "pool": pool,
            "processes": processes, "slots": slot_summary, "io": io, "clients": client_rows}


# ---- text -----------------------------------------------------------------------------------------
def _b(n) -> str:
    return "-" if n is None else human_bytes(n)


def _rate_text(n) -> str:
    return "-" if n is None else human_bytes(n) + "/s"


def _duration(s) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def render(snap: dict) -> str:
    """A top-like screen of one snapshot."""
    p, sl, io = snap["pool"], snap["slots"], snap["io"]
    lines = [f"pool {p['name']}  {p['state']}  pid {p['pid']}  up {_duration(p['uptime_s'])}  heartbeat "
             f"{p['heartbeat_age_s']:.2f} s ago  image {p['image']} ({_b(p['image_bytes'])})"]
    if p["error"]:
        lines.append(f"ERROR: {p['error']}")
    rps = "" if io["reads_per_s"] is None else f" ({io['reads_per_s']:.1f}/s)"
    lines.append(f"read    dram tier {_b(io['dram_read_bytes'])}, streamed {_b(io['stream_read_bytes'])} "
                 f"({_rate_text(io['stream_read_bytes_per_s'])}), disk {_b(io['disk_read_bytes'])} "
                 f"({_rate_text(io['disk_read_bytes_per_s'])})")
    lines.append(f"reads   {io['reads']}{rps}, {io['reads_in_flight']} in flight, {io['reads_queued']} queued; "
                 f"{io['retries']} retries, {io['errors']} errors, {io['worker_restarts']} worker restarts")
    lines.append(f"dram    {sl['dram_total']} slots: " + ", ".join(f"{sl['dram_' + k]} {k}" for k in STATE_KEYS) +
                 f"; {_b(sl['dram_ready_bytes'])} of {_b(sl['dram_tier_bytes'])} ready "
                 f"({100 * sl['dram_occupancy']:.0f}%)")
    if sl["window_total"]:
        orph = f", {sl['window_orphaned']} orphaned" if sl["window_orphaned"] else ""
        lines.append(f"window  {sl['window_total']} slots ({p['client_slots']} clients x "
                     f"{sl['window_slots_per_client']} x {_b(sl['window_slot_bytes'])}): " +
                     ", ".join(f"{sl['window_' + k]} {k}" for k in STATE_KEYS) + orph)
    else:
        lines.append("window  none (the DRAM tier holds the whole model)")
    server = f"; client pid {p['server_pid']} is the pool's server (pool serve)" if p["server_pid"] else ""
    lines.append(f"clients {p['clients_attached']} of {p['client_slots']} attached{server}")
    lines.append("")
    lines.append(f"{'PID':>8} {'ROLE':<12} {'CPU%':>6} {'RSS':>10} {'LOCKED':>10} {'PINNED':>10} {'READ':>10} "
                 f"{'READ/s':>12} {'INFL':>4}")
    for r in snap["processes"]:
        role = r["role"] + ("" if r["index"] is None else f" {r['index']}")
        if not r["alive"]:
            lines.append(f"{r['pid']:>8} {role:<12} {'(exited)':>6}")
            continue
        cpu = "-" if r["cpu_pct"] is None else f"{r['cpu_pct']:.1f}"
        infl = "-" if r["worker_inflight"] is None else str(r["worker_inflight"])
        lines.append(f"{r['pid']:>8} {role:<12} {cpu:>6} {_b(r['rss_bytes']):>10} {_b(r['locked_bytes']):>10} "
                     f"{_b(r['pinned_bytes']):>10} {_b(r['read_bytes']):>10} {_rate_text(r['read_bytes_per_s']):>12} "
                     f"{infl:>4}")
    if snap["clients"]:
        lines.append("")
        lines.append(f"{'CLIENT':>6} {'PID':>8} {'ALIVE':>5} {'SEQ':>5} {'CYCLIC':>6} {'FREE':>5} {'QUEUED':>6} "
                     f"{'READY':>5} {'ERROR':>5}")
        for c in snap["clients"]:
            lines.append(f"{c['index']:>6} {c['pid']:>8} {'yes' if c['alive'] else 'no':>5} {c['seq_len']:>5} "
                         f"{'yes' if c['cyclic'] else 'no':>6} {c['slots_free']:>5} {c['slots_queued']:>6} "
                         f"{c['slots_ready']:>5} {c['slots_error']:>5}")
    return "\n".join(lines)


# ---- the command ----------------------------------------------------------------------------------
def _check_alive(rec: dict, while_watching: bool = False) -> None:
    if not coordinator_alive(rec):
        what = "stopped or died" if while_watching else "is not running"
        raise UserError(f"pool {rec['name']!r}: coordinator pid {rec.get('pid')} {what}"
                        + ("" if while_watching else f"; launch.py pool cleanup {rec['name']}, then pool start"))


def _sample(rec: dict, prev: dict | None, watching: bool) -> dict:
    _check_alive(rec, watching)
    try:
        return snapshot(rec, prev)
    except UserError:
        _check_alive(rec, watching)  # the pool went away while we read it: say so plainly
        raise


def status(name: str, watch: bool = False, interval: float = 1.0, as_json: bool = False) -> int:
    """``pool status``: one snapshot (rates over ``interval`` seconds), or one per interval with ``watch``."""
    interval = float(interval)
    if not math.isfinite(interval) or interval <= 0:
        raise ConfigError(f"--interval must be a positive number of seconds, found {interval}")
    rec = read_record(name)
    tty = sys.stdout.isatty()
    first = True
    try:
        prev = _sample(rec, None, False)
        while True:
            time.sleep(interval)
            snap = _sample(rec, prev, watch)
            if as_json:
                sys.stdout.write(json.dumps(snap, indent=None if watch else 1) + "\n")
            elif watch and tty:  # cursor home, each line cleared to its end, the rest of the screen cleared
                screen = "".join(line + "\x1b[K\n" for line in render(snap).splitlines())
                sys.stdout.write(("\x1b[2J" if first else "") + "\x1b[H" + screen + "\x1b[J")
            else:
                sys.stdout.write(("" if first else "\n") + render(snap) + "\n")
            sys.stdout.flush()
            if not watch:
                return 0
            prev, first = snap, False
    except KeyboardInterrupt:
        if not watch:
            raise
        if tty and not as_json:
            sys.stdout.write("\n")
        return 0
    except BrokenPipeError:  # the reader went away (``| head``): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
