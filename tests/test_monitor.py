"""``pool status`` (runtime/services/monitor.py): a real daemon pool of a tiny synthetic image in a private pool
dir, the JSON schema checked against docs/POOL.md in both directions, the values that must hold, an attached client, the
text screen, --watch (Ctrl-C, and the pool dying under it), a missing pool. CPU only, a few seconds."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, assert_user_error, run_launch

DOC = ROOT / "docs" / "POOL.md"
WORKERS, CLIENTS, WINDOW = 2, 2, 2

# The schema of pool status --json, as the test knows it; must equal the tables of docs/POOL.md.
STR, INT, NUM, BOOL, ARR, OBJ = "string", "integer", "number", "boolean", "array", "object"
INT_, NUM_, STR_, BOOL_ = (t + " or null" for t in (INT, NUM, STR, BOOL))
SCHEMA = {
    "schema": STR, "time_unix": NUM, "monotonic_s": NUM, "interval_s": NUM_, "pool": OBJ, "processes": ARR,
    "slots": OBJ, "io": OBJ, "clients": ARR,
    **{f"pool.{k}": t for k, t in {
        "name": STR, "state": STR, "pid": INT, "image": STR, "image_uuid": STR, "image_bytes": INT,
        "started_unix": NUM, "uptime_s": NUM, "heartbeat_age_s": NUM, "groups": INT, "dram_groups": INT,
        "workers": INT, "client_slots": INT, "clients_attached": INT, "ring_bytes": INT, "dram_budget_bytes": INT,
        "log": STR, "error": STR_, "server_pid": INT_}.items()},
    **{f"processes[].{k}": t for k, t in {
        "pid": INT, "role": STR, "index": INT_, "alive": BOOL, "started_unix": NUM_, "cpu_pct": NUM_,
        "cpu_time_s": NUM_, "rss_bytes": INT_, "shared_bytes": INT_, "locked_bytes": INT_, "pinned_bytes": INT_,
        "read_bytes": INT_, "read_bytes_per_s": NUM_, "worker_reads": INT_, "worker_read_bytes": INT_,
        "worker_errors": INT_, "worker_inflight": INT_, "worker_direct": BOOL_}.items()},
    **{f"slots.{k}": INT for k in (
        "total", "dram_total", "dram_free", "dram_queued", "dram_ready", "dram_error", "window_total", "window_free",
        "window_queued", "window_ready", "window_error", "window_orphaned", "window_slots_per_client",
        "window_slot_bytes", "dram_tier_bytes", "dram_ready_bytes")},
    "slots.dram_occupancy": NUM,
    **{f"io.{k}": INT for k in ("dram_read_bytes", "stream_read_bytes", "reads", "retries", "errors",
                                "worker_restarts", "reads_in_flight", "reads_queued", "disk_read_bytes")},
    **{f"io.{k}": NUM_ for k in ("dram_read_bytes_per_s", "stream_read_bytes_per_s", "reads_per_s",
                                 "disk_read_bytes_per_s")},
    **{f"clients[].{k}": t for k, t in {
        "index": INT, "pid": INT, "alive": BOOL, "seq_len": INT, "cyclic": BOOL, "window_slots": INT,
        "slots_free": INT, "slots_queued": INT, "slots_ready": INT, "slots_error": INT}.items()},
}


def doc_schema() -> dict[str, str]:
    """The field tables under docs/POOL.md's heading "pool status --json schema": {path: type}."""
    text = DOC.read_text()
    m = re.search(r"^## pool status --json schema\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "docs/POOL.md lacks the section 'pool status --json schema'"
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+?) \|", m.group(1), re.M)
    out = dict(rows)
    assert len(out) == len(rows), "a field is documented twice"
    return out


def type_ok(value, typ: str) -> bool:
    kinds = {STR: str, INT: int, NUM: (int, float), BOOL: bool, ARR: list, OBJ: dict}
    for t in typ.split(" or "):
        if t == "null" and value is None:
            return True
        if t in kinds and isinstance(value, kinds[t]) and (t == BOOL or not isinstance(value, bool)):
            return True
    return False


def fields(obj, prefix: str = "") -> dict[str, list]:
    """Every field path of a snapshot with its values ({"processes[].pid": [1, 2], ...})."""
    out: dict[str, list] = {}
    for k, v in obj.items():
        path = prefix + k
        out.setdefault(path, []).append(v)
        items = v if isinstance(v, list) else [v] if isinstance(v, dict) else []
        for item in items:
            for p, vals in fields(item, path + ("[]." if isinstance(v, list) else ".")).items():
                out.setdefault(p, []).extend(vals)
    return out


def check_schema(snap: dict) -> None:
    got = fields(snap)
    undocumented = sorted(set(got) - set(SCHEMA))
    assert not undocumented, f"fields missing from docs/POOL.md: {undocumented}"
    for path, typ in SCHEMA.items():
        parent = path.rsplit(".", 1)[0] if "." in path else None
        if parent and parent.endswith("[]") and not any(got.get(parent[:-2], [])):
            continue  # an empty array: its items' fields cannot be present
        assert path in got, f"documented field {path} missing"
        for v in got[path]:
            assert type_ok(v, typ), f"{path}: {v!r} is not {typ}"
    assert snap["schema"] == "llmstream.pool-status/1"


# ---- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool_env(tmp_path_factory):
    """A private pool dir (LLMS_POOL_DIR) and a tiny image."""
    d = tmp_path_factory.mktemp("monitor")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMS_POOL_DIR", str(d / "pools"))
        img = d / "tiny.img"
        run_launch("pack", "--synthetic", "tiny", "--layers", "4", "--out", str(img), "--dtype", "fp32", "--quiet")
        yield img


def _pid_alive(pid: int) -> bool:
    from runtime.ipc.procs import pid_alive

    return pid_alive(pid)


class Pool:
    """A daemon pool started with launch.py pool start; ``stop`` stops it and checks nothing is left."""

    def __init__(self, image: Path, name: str) -> None:
        from runtime.ipc.records import read_record
        from runtime.services.monitor import snapshot

        self.name = name  # unique per test process: /dev/shm names are per user, not per pool dir
        # --dram-gb 0.02 holds 7 of the 10 groups, so the window slots stream the rest
        run_launch("pool", "start", "--image", str(image), "--name", name, "--dram-gb", "0.02", "--workers",
                   str(WORKERS), "--clients", str(CLIENTS), "--window-slots", str(WINDOW), "--quiet")
        self.rec = read_record(name)
        self.pid = int(self.rec["pid"])
        first = snapshot(self.rec)  # in-process, without a previous sample: no rates yet
        check_schema(first)
        assert first["interval_s"] is None and all(r["cpu_pct"] is None for r in first["processes"])
        self.workers = [r["pid"] for r in first["processes"] if r["role"] == "worker"]
        assert len(self.workers) == WORKERS

    def stop(self) -> None:
        from runtime.ipc.shm import leftover_names

        if _pid_alive(self.pid):
            run_launch("pool", "stop", self.name)
        deadline = time.monotonic() + 5
        while any(map(_pid_alive, [self.pid, *self.workers])) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _pid_alive(self.pid), f"coordinator {self.pid} still running"
        assert not any(map(_pid_alive, self.workers)), f"workers {self.workers} still running"
        assert leftover_names(pool=self.name) == []


@pytest.fixture(scope="module")
def pool(pool_env):
    p = Pool(pool_env, f"mon{os.getpid()}")
    try:
        yield p
    finally:
        p.stop()


def status(pool: Pool, *args: str, check: bool = True):
    return run_launch("pool", "status", pool.name, "--interval", "0.2", *args, check=check, timeout=60)


def status_json(pool: Pool) -> dict:
    return json.loads(status(pool, "--json").stdout)


# ---- tests ----------------------------------------------------------------------------------------
def test_doc_lists_the_schema():
    assert doc_schema() == SCHEMA


def test_json_schema_and_values(pool):
    snap = status_json(pool)
    check_schema(snap)
    rec, p, sl, io = pool.rec, snap["pool"], snap["slots"], snap["io"]
    assert (p["name"], p["state"], p["pid"], p["image"]) == (pool.name, "running", pool.pid, rec["image"]["path"])
    assert p["workers"] == WORKERS and p["client_slots"] == CLIENTS and p["dram_groups"] == len(rec["dram_groups"])
    assert 0 <= p["heartbeat_age_s"] < 2 and p["uptime_s"] > 0 and p["error"] is None
    assert 0.15 < snap["interval_s"] < 5
    roles = [(r["role"], r["index"]) for r in snap["processes"]]
    assert roles == [("coordinator", None)] + [("worker", i) for i in range(WORKERS)]
    assert snap["processes"][0]["pid"] == pool.pid
    for r in snap["processes"]:
        assert r["alive"] and r["rss_bytes"] > 0 and r["cpu_pct"] is not None and r["cpu_time_s"] >= 0
    workers = [r for r in snap["processes"] if r["role"] == "worker"]
    assert sum(r["worker_read_bytes"] for r in workers) == io["disk_read_bytes"] >= rec["dram_tier_bytes"]
    assert len({r["pid"] for r in snap["processes"]}) == 1 + WORKERS
    # the slot table
    assert sl["total"] == sl["dram_total"] + sl["window_total"] == len(rec["dram_groups"]) + CLIENTS * WINDOW
    assert sum(sl[f"dram_{k}"] for k in ("free", "queued", "ready", "error")) == sl["dram_total"]
    assert sum(sl[f"window_{k}"] for k in ("free", "queued", "ready", "error")) == sl["window_total"]
    assert sl["dram_ready"] == sl["dram_total"] and sl["dram_occupancy"] == 1.0
    assert sl["dram_tier_bytes"] == sl["dram_ready_bytes"] == rec["dram_tier_bytes"]
    assert sl["window_slots_per_client"] == WINDOW and sl["window_slot_bytes"] >= rec["slot_bytes"]
    assert io["dram_read_bytes"] == rec["dram_tier_bytes"]
    assert io["retries"] == io["errors"] == io["worker_restarts"] == 0 and io["reads"] >= sl["dram_total"]
    assert snap["clients"] == [] or all(c["pid"] != os.getpid() for c in snap["clients"])


@pytest.fixture
def client(pool):
    """This process attached as a client of the pool, streaming the groups the pool does not hold (cyclic);
    it never releases a slot, so its window fills and stays READY."""
    from runtime.pool.attach import attach
    from runtime.pool.client import PoolClient

    att = attach(pool.name)
    c = PoolClient(att.handle, att.index, ring="none")
    names = list(att.image.groups)
    streamed = [names.index(g) for g in names if g not in pool.rec["dram_groups"]]
    try:
        c.wait_running(10)
        c.start(streamed, cyclic=True)
        yield att.index, streamed
    finally:
        c.close()


def _wait_for(pool: Pool, pred, timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        snap = status_json(pool)
        if pred(snap) or time.monotonic() > deadline:
            return snap


def test_attached_client(pool, client):
    index, streamed = client
    snap = _wait_for(pool, lambda s: s["slots"]["window_ready"] == WINDOW)
    check_schema(snap)
    assert snap["pool"]["clients_attached"] == 1
    (c,) = snap["clients"]
    assert (c["index"], c["pid"], c["alive"], c["window_slots"]) == (index, os.getpid(), True, WINDOW)
    assert (c["slots_ready"], c["slots_free"], c["slots_queued"], c["slots_error"]) == (WINDOW, 0, 0, 0)
    assert snap["slots"]["window_ready"] == WINDOW and snap["slots"]["window_free"] == (CLIENTS - 1) * WINDOW
    rows = [r for r in snap["processes"] if r["role"] == "client"]
    assert [(r["pid"], r["index"], r["alive"]) for r in rows] == [(os.getpid(), index, True)]
    assert snap["io"]["stream_read_bytes"] > 0
    text = status(pool).stdout
    assert re.search(rf"^\s*{os.getpid()} client {index}\s", text, re.M), text
    assert re.search(rf"^\s*{index}\s+{os.getpid()}\s+yes\b", text, re.M), text


def test_client_sequence_shown(pool, client):
    _, streamed = client
    snap = _wait_for(pool, lambda s: bool(s["clients"]), 5)
    assert (snap["clients"][0]["seq_len"], snap["clients"][0]["cyclic"]) == (len(streamed), True)


def test_text_screen(pool):
    out = status(pool).stdout
    lines = out.splitlines()
    assert lines[0].startswith(f"pool {pool.name}  running  pid {pool.pid}  up "), lines[0]
    assert re.search(r"^\s+PID ROLE\s+CPU%\s+RSS\s+LOCKED\s+PINNED\s+READ\s+READ/s", out, re.M), out
    assert re.search(rf"^\s*{pool.pid} coordinator\s+\d+\.\d\s+\d", out, re.M), out
    for i in range(WORKERS):
        assert re.search(rf"^\s*\d+ worker {i}\s+\d+\.\d\s+\d", out, re.M), out
    assert re.search(r"^dram\s+\d+ slots: 0 free, 0 queued, \d+ ready, 0 error; .* \(100%\)$", out, re.M), out


def test_missing_pool(pool_env):
    proc = run_launch("pool", "status", "nosuchpool", "--interval", "0.1", check=False)
    assert_user_error(proc, "no pool named 'nosuchpool'")
    assert proc.stdout == ""
    proc = run_launch("pool", "status", "nosuchpool", "--interval", "0", check=False)
    assert_user_error(proc, "--interval")


def _watch(name: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "pool", "status", name, "--watch",
                             "--interval", "0.2", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_watch_json_lines_until_ctrl_c(pool):
    proc = _watch(pool.name, "--json")
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        snaps = [json.loads(ln) for ln in lines]
        for s in snaps:
            check_schema(s)
        assert snaps[0]["monotonic_s"] < snaps[1]["monotonic_s"] < snaps[2]["monotonic_s"]
        assert abs(snaps[2]["interval_s"] - (snaps[2]["monotonic_s"] - snaps[1]["monotonic_s"])) < 1e-6
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0 and "Traceback" not in err and "interrupted" not in err, err


def test_watch_reports_a_dead_coordinator(pool_env):
    """The coordinator dies (SIGKILL) under --watch: one error line, exit 2; then pool cleanup leaves nothing."""
    from runtime.ipc.shm import leftover_names

    p = Pool(pool_env, f"mondie{os.getpid()}")
    proc = _watch(p.name)
    try:
        seen = []
        while sum(ln.startswith(f"pool {p.name}  running") for ln in seen) < 2:  # two screens
            seen.append(proc.stdout.readline())
            assert seen[-1], seen
        assert seen[0].startswith(f"pool {p.name}  running") and seen[-2] == "\n", seen  # a blank line between
        os.kill(p.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=15)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        assert_user_error(done, f"pool '{p.name}'", f"coordinator pid {p.pid} stopped or died")
    finally:
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while _pid_alive(p.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        run_launch("pool", "cleanup", p.name)
        # the killed coordinator's workers exit by themselves once it is gone (workers.io_worker)
        assert leftover_names(pool=p.name) == []
        p.stop()


def test_sample_of_a_vanished_process():
    from runtime.services.monitor import render, sample_process

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    row = sample_process(child.pid, "worker", 1, None, None)
    assert row["alive"] is False and row["pid"] == child.pid
    assert all(row[k] is None for k in ("cpu_pct", "rss_bytes", "locked_bytes", "pinned_bytes", "read_bytes"))
    me = sample_process(os.getpid(), "client", 0, None, None)
    assert me["alive"] and me["rss_bytes"] > 0 and me["cpu_pct"] is None and me["locked_bytes"] is not None
    again = sample_process(os.getpid(), "client", 0, me, 0.5)
    assert again["cpu_pct"] is not None and again["read_bytes_per_s"] is not None
    snap = {"pool": {"name": "x", "state": "running", "pid": 1, "uptime_s": 3725, "heartbeat_age_s": 0.01,
                     "image": "/i.img", "image_bytes": 2048, "error": None, "client_slots": 1, "clients_attached": 0,
                     "server_pid": None},
            "io": {"dram_read_bytes": 0, "stream_read_bytes": 0, "disk_read_bytes": 0, "reads": 0, "retries": 0,
                   "errors": 0, "worker_restarts": 0, "reads_in_flight": 0, "reads_queued": 0, "reads_per_s": None,
                   "stream_read_bytes_per_s": None, "disk_read_bytes_per_s": None},
            "slots": {"dram_total": 0, "dram_free": 0, "dram_queued": 0, "dram_ready": 0, "dram_error": 0,
                      "dram_ready_bytes": 0, "dram_tier_bytes": 0, "dram_occupancy": 1.0, "window_total": 0},
            "processes": [{**row, "worker_inflight": None}], "clients": []}
    text = render(snap)
    assert "up 1h02m" in text and f"{child.pid} worker 1" in text and "(exited)" in text
