"""``--trace FILE`` (runtime/ipc/trace.py, runtime/engine/trace.py) and its renderer (benchmarks/render_trace.py).

On a tiny synthetic image, streamed by two I/O workers through a 2-slot window, ``run`` and ``bench`` write
one Chrome trace-event JSON that holds every worker's reads, the client's computes (and on CUDA its copies);
checked: the format and the process / track names; reads from both workers; each streamed group read once
per pass (plus at most the window read ahead); computes in forward order in every pass; every timestamp
inside the run's wall-clock span (CLOCK_MONOTONIC is one clock for every process); spans of one track nest
or follow each other; no temporary files left; nothing written with tracing off. The recorder's caps and
lanes are checked in-process. The PNG test needs matplotlib (skipped without it). CPU; about 30 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict

import pytest
import torch
from conftest import ROOT, run_launch

from model.synthetic import SyntheticCheckpoint
from runtime.format.pack import pack
from runtime.ipc import trace

PROMPT, NEW, WINDOW = "1,2,3", 4, 2
RUN = ["--mode", "stream", "--prefetch-distance", str(WINDOW), "--workers", "2", "--prompt-ids", PROMPT,
       "--max-new-tokens", str(NEW)]
RENDER = ROOT / "benchmarks" / "render_trace.py"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("trace_img") / "tiny.img"
    pack(SyntheticCheckpoint("tiny", n_layers=2), out, dtype="fp32", quiet=True)
    return out


def traced(tmp_path, command: str, *args: str) -> dict:
    """Run launch.py ``command`` with --trace; returns the trace, the wall span and the report (--out-json)."""
    out, rep = tmp_path / "run.trace.json", tmp_path / "report.json"
    t0 = time.monotonic_ns()
    proc = run_launch(command, *args, "--trace", str(out), "--out-json", str(rep))
    t1 = time.monotonic_ns()
    return {"doc": json.loads(out.read_text()), "t0": t0, "t1": t1, "report": json.loads(rep.read_text()),
            "files": sorted(p.name for p in tmp_path.iterdir()), "stderr": proc.stderr}


@pytest.fixture(scope="module")
def run_trace(tiny, tmp_path_factory):
    return traced(tmp_path_factory.mktemp("run_trace"), "run", "--image", str(tiny), "--device", "cpu", *RUN)


def spans(doc: dict, cat: str | None = None) -> list[dict]:
    return [e for e in doc["traceEvents"] if e["ph"] == "X" and (cat is None or e["cat"] == cat)]


def names(doc: dict, kind: str) -> dict:
    return {(e["pid"], e.get("tid")): e["args"]["name"] for e in doc["traceEvents"]
            if e["ph"] == "M" and e["name"] == kind}


def process_of(doc: dict) -> dict[int, str]:
    return {pid: name for (pid, _), name in names(doc, "process_name").items()}


def compute_passes(doc: dict) -> dict[int, list[str]]:
    """Pass number -> compute span names in time order."""
    out = defaultdict(list)
    for e in sorted(spans(doc, "compute"), key=lambda e: e["ts"]):
        out[e["args"]["pass"]].append(e["name"])
    return dict(out)


# ---- run --trace ------------------------------------------------------------------------------------------

def test_trace_is_chrome_trace_json(run_trace):
    doc = run_trace["doc"]
    assert doc["displayTimeUnit"] == "ms" and isinstance(doc["traceEvents"], list)
    for e in spans(doc):
        assert {"name", "cat", "ph", "pid", "tid", "ts", "dur", "args"} <= set(e), e
        assert e["dur"] >= 0 and isinstance(e["ts"], (int, float))
    procs = sorted(process_of(doc).values())
    assert procs == ["client", "coordinator", "io-worker 0", "io-worker 1"], procs
    threads = set(names(doc, "thread_name").values())
    assert {"disk reads", "compute", "slot waits", "pool"} <= threads, threads
    other = doc["otherData"]
    assert other["clock"] == "CLOCK_MONOTONIC" and other["capped"] is False and other["dropped"] == {}
    assert other["events"] == len(spans(doc))
    assert f"trace: {other['events']} events written to" in run_trace["stderr"]


def test_reads_from_both_workers_and_computes_from_the_client(run_trace):
    doc = run_trace["doc"]
    procs = process_of(doc)
    readers = {procs[e["pid"]] for e in spans(doc, "read")}
    assert readers == {"io-worker 0", "io-worker 1"}, readers
    assert {procs[e["pid"]] for e in spans(doc, "compute")} == {"client"}
    for e in spans(doc, "read"):
        a = e["args"]
        assert a["status"] == 0 and a["bytes"] > 0 and a["chunks"] >= 1 and a["GBps"] > 0, e
        assert e["name"] == a["group"]
    assert [e["name"] for e in spans(doc, "pool")] == ["fill DRAM tier"]


def test_every_streamed_group_read_once_per_pass(run_trace):
    doc, plan = run_trace["doc"], run_trace["report"]["plan"]
    passes = len(compute_passes(doc))
    assert passes == 1 + (NEW - 1)  # the prefill pass, then one per decoded token
    reads = Counter(e["name"] for e in spans(doc, "read"))
    assert plan["stream"], plan
    for g in plan["stream"]:
        assert passes <= reads[g] <= passes + 1, (g, reads[g], passes)
    assert sum(reads[g] for g in plan["stream"]) <= passes * len(plan["stream"]) + WINDOW  # read ahead
    for g in plan["dram"] + plan["host"]:
        assert reads[g] == 1, (g, reads[g])  # the DRAM tier is read once, by the fill
    assert sum(e["args"]["groups"] for e in spans(doc, "pool")) == len(set(plan["dram"] + plan["host"]))


def test_computes_in_forward_order_every_pass(run_trace):
    plan = run_trace["report"]["plan"]
    for n, seq in compute_passes(run_trace["doc"]).items():
        assert seq == ["embed"] + plan["sequence"], (n, seq)
    waits = [e["name"] for e in spans(run_trace["doc"], "wait")]
    assert len(waits) == sum(len(plan["stream"]) for _ in compute_passes(run_trace["doc"]))  # one per use


def test_timestamps_inside_the_runs_wall_span(run_trace):
    doc, t0, t1 = run_trace["doc"], run_trace["t0"], run_trace["t1"]
    origin = doc["otherData"]["origin_ns"]
    assert t0 <= origin <= t1
    for e in spans(doc):
        start = origin + e["ts"] * 1e3
        assert t0 <= start and start + e["dur"] * 1e3 <= t1, (e, t0, t1)


def test_spans_of_a_track_nest_or_follow(run_trace):
    """A Chrome track must hold properly nested spans: overlapping reads go on lanes; crc32 inside its read."""
    tracks = defaultdict(list)
    for e in spans(run_trace["doc"]):
        start = round(e["ts"] * 1e3)  # ns, exact: the file holds us with 3 decimals
        tracks[(e["pid"], e["tid"])].append((start, start + round(e["dur"] * 1e3), e))
    for key, evs in tracks.items():
        stack: list[int] = []
        for start, end, e in sorted(evs, key=lambda x: (x[0], -x[1])):
            while stack and stack[-1] <= start:
                stack.pop()
            assert not stack or end <= stack[-1], (key, e)
            assert e["cat"] != "crc" or stack, f"crc32 span outside a read: {e}"
            stack.append(end)


def test_no_temporary_files_left(run_trace):
    assert run_trace["files"] == ["report.json", "run.trace.json"], run_trace["files"]


# ---- bench --trace, tracing off, bad path --------------------------------------------------------------------

def test_bench_trace(tiny, tmp_path):
    (tmp_path / "p.txt").write_text("5,6,7\n")
    t = traced(tmp_path, "bench", "--image", str(tiny), "--device", "cpu", "--prompts", str(tmp_path / "p.txt"),
               "--max-new-tokens", "3", "--warmup-rounds", "1", "--disk-gbps", "1", "--mode", "stream",
               "--prefetch-distance", "2", "--staging-mb", "1")
    doc, plan = t["doc"], t["report"]["plan"]
    assert len(compute_passes(doc)) == 2 * 3  # warm-up round + measured round, 3 passes each
    assert all(seq == ["embed"] + plan["sequence"] for seq in compute_passes(doc).values())
    big = [e["args"] for e in spans(doc, "read") if e["args"]["bytes"] > 1 << 20]
    assert big and all(a["chunks"] == -(-a["bytes"] // (1 << 20)) > 1 for a in big)  # --staging-mb 1: 1 MiB chunks
    assert len({e["pid"] for e in spans(doc, "read")}) == 2
    assert sorted(p for p in t["files"] if p != "p.txt") == ["report.json", "run.trace.json"]


def test_tracing_off_writes_no_files(tiny, tmp_path):
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    before = set(os.listdir(tiny.parent))
    run_launch("run", "--image", str(tiny), "--device", "cpu", *RUN, env={"TMPDIR": str(tmp)})
    assert set(os.listdir(tiny.parent)) == before
    assert list(tmp.iterdir()) == []
    assert not list(ROOT.glob(".*.parts")) and not list(ROOT.glob("*.trace.json"))


def test_trace_into_missing_directory_is_a_user_error(tiny, tmp_path):
    bad = tmp_path / "nope" / "t.json"
    proc = run_launch("run", "--image", str(tiny), "--device", "cpu", *RUN, "--trace", str(bad), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"--trace {bad}" in proc.stderr


# ---- the recorder in-process -----------------------------------------------------------------------------------

def test_overlapping_reads_go_on_lanes():
    w = trace.WorkerTrace(0)
    t = time.monotonic_ns()
    w.read(0, 1, 1, 4096, 4096, t, t + 50, 0)  # recorded as it ends: lane 0
    w.read(1, 2, 1, 4096, 4096, t + 10, t + 60, 0)  # overlaps the first: lane 2
    w.read(2, 3, 1, 4096, 4096, w.events[0][4] + 1, w.events[0][4] + 2, 0)  # after the first ended: lane 0
    by_tid = {e[2] for e in w.events if e[1] == "read"}
    assert len(by_tid) == 2 and set(w.threads) == {"disk reads", "disk reads 2"}
    assert [e[2] for e in w.events if e[1] == "read"] == [1, 2, 1]


def test_caps_are_reported(monkeypatch):
    r = trace.Recorder("io-worker 0", 0, cap=3)
    for i in range(5):
        r.span(f"g{i}", "pool", "pool", i, i + 1)
    assert len(r.events) == 3 and r.dropped == 2
    part = {"process": r.process, "pid": 1, "sort": 0, "dropped": r.dropped,
            "threads": [(1, "pool")], "events": r.events}
    monkeypatch.setattr(trace, "MAX_EVENTS", 2)
    doc = trace.merge([part], ["a"], 0, None)
    assert len(spans(doc)) == 2 and [e["name"] for e in spans(doc)] == ["g0", "g1"]  # the earliest kept
    assert doc["otherData"]["capped"] is True
    assert doc["otherData"]["dropped"] == {"io-worker 0 (pid 1)": 2, "merge (latest spans)": 1}


# ---- the renderer ------------------------------------------------------------------------------------------

def test_render_png(run_trace, tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "t.json"
    src.write_text(json.dumps(run_trace["doc"]))
    first = min(e["ts"] for e in spans(run_trace["doc"], "compute")) / 1e3
    for extra, png in (([], "all.png"), (["--window-ms", str(first), str(first + 50)], "win.png")):
        proc = subprocess.run([sys.executable, str(RENDER), str(src), str(tmp_path / png), *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert "ms" in proc.stdout


def test_render_without_matplotlib_skips_cleanly(run_trace, tmp_path):
    src, png = tmp_path / "t.json", tmp_path / "t.png"
    src.write_text(json.dumps(run_trace["doc"]))
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['render_trace.py', {str(src)!r}, {str(png)!r}]; "
            f"runpy.run_path({str(RENDER)!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "matplotlib is not installed" in proc.stderr and not png.exists()


# ---- CUDA: copies on the copy stream, each before its compute ------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_copies_precede_their_computes(tiny, tmp_path):
    t = traced(tmp_path, "run", "--image", str(tiny), "--device", "cuda", *RUN, "--gpu-cached-layers", "0")
    doc, plan = t["doc"], t["report"]["plan"]
    assert "H2D copy stream" in names(doc, "thread_name").values()
    tol_us = doc["otherData"]["cuda_anchor_error_us"] + 50
    copies, computes = defaultdict(list), defaultdict(list)
    for e in sorted(spans(doc, "copy"), key=lambda e: e["ts"]):
        copies[e["name"]].append(e)
    for e in sorted(spans(doc, "compute"), key=lambda e: e["ts"]):
        computes[e["name"]].append(e)
    for g in plan["dram"] + plan["stream"]:
        if g not in plan["sequence"]:
            continue
        assert len(copies[g]) >= len(computes[g]) > 0, g
        for c, k in zip(copies[g], computes[g]):  # the k-th use of g computes from its k-th copy
            assert c["ts"] + c["dur"] <= k["ts"] + tol_us, (g, c, k)
    origin = doc["otherData"]["origin_ns"]
    assert all(t["t0"] <= origin + e["ts"] * 1e3 <= t["t1"] for e in spans(doc))


def test_trace_summary_per_pass(tmp_path):
    """benchmarks/trace_summary.py: a pass runs from its embed span to the end of its last group; the copy
    stream's busy time is the union of the copies inside it (overlaps counted once, clipped to the pass)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import trace_summary

    meta = [{"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "compute"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "H2D copy stream"}}]

    def x(name, cat, tid, ts, dur, **args):
        return {"ph": "X", "name": name, "cat": cat, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}

    spans = [x("embed", "compute", 1, 0, 10), x("layers.0.attention", "compute", 1, 10, 40),
             x("layers.0.feed_forward", "compute", 1, 50, 50),
             x("embed", "compute", 1, 100, 10), x("layers.0.attention", "compute", 1, 110, 90),
             x("layers.0.feed_forward", "copy", 2, 5, 30, bytes=1000),  # 5-35
             x("layers.0.attention", "copy", 2, 20, 30, bytes=500),  # 20-50: overlaps, counted once
             x("layers.0.feed_forward", "copy", 2, 90, 40, bytes=2000)]  # 90-130: split between passes
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": meta + spans}))
    rows = trace_summary.summarize(str(path))
    assert [r["wall_ms"] for r in rows] == [0.1, 0.1]
    assert rows[0]["copy_busy_ms"] == pytest.approx(0.055)  # 5-50 and 90-100
    assert rows[1]["copy_busy_ms"] == pytest.approx(0.030)  # 100-130
    assert rows[0]["copied_GB"] == pytest.approx(3500 / 1e9) and rows[1]["copied_GB"] == 0
    assert rows[0]["attention_ms"] == pytest.approx(0.04) and rows[0]["ffn_ms"] == pytest.approx(0.05)
    assert rows[1]["attention_ms"] == pytest.approx(0.09) and rows[1]["other_ms"] == pytest.approx(0.01)
