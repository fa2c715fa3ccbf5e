"""Daemon pools (runtime/services/pools.py, runtime/pool/daemon.py) with real processes and real signals: every
fault ends with no leftover segment, semaphore, record or process (checked by the ``pools`` fixture after each test).

  test_lifecycle_security_and_list     start / list --json / attach / stop; /dev/shm names carry the uid and have
      mode 0600; the ring of an attached client is read-only; a record of another uid, or a record file another
      user owns (as root), is refused; stop removes everything.
  test_two_clients_concurrently        two ``run --attach`` processes attached at once (held at the same point by
      SIGSTOPped workers, then released together) both give exactly their solo outputs.
  test_worker_killed_mid_run           an I/O worker with a read in flight is SIGKILLed during an attached run that
      streams: replaced, its reads issued again, the run's tokens identical to an undisturbed run.
  test_client_killed                   a streaming ``run --attach`` is SIGKILLed holding its whole window READY: its
      client row and window slots come back within 2 s, the pool keeps serving, the next attach gives the right output.
  test_coordinator_killed              SIGKILL of the coordinator: the attached run fails within 10 s with one
      ``error:`` line naming the pool (exit 2, no traceback); the workers exit by themselves; attach to the dead
      pool is refused; ``pool start`` of the same name removes the leftovers (and says so) and starts fresh;
      ``pool cleanup NAME`` removes them after a second kill.
  test_read_error_and_checksum_mismatch   a silently corrupted streamed group (mtime restored): retried once, then
      the run fails naming group, offset and file; the pool stays RUNNING and another client streams the other
      groups byte-exact; then the image is cut under that client: EIO, reported the same way, the pool still up.
  test_image_changed                   mtime touched, bytes appended, a manifest checksum changed, a new header
      (uuid) written in place, a real re-pack: every attach refused with a clear message.
  test_stop_escalates                  a coordinator that cannot take SIGTERM (SIGSTOPped): an attached run fails
      within 10 s on its stale heartbeat; ``pool stop`` escalates to SIGKILL and still removes everything.
  test_cleanup_spares_live_pool_of_other_dir   ``pool cleanup NAME`` / ``pool start NAME`` from another pool dir never
      unlink the names of a live pool of that name.
  test_bad_start_input / test_bad_input_with_live_pool   refused up front with the numbers, exit 2, one line, no
      traceback, nothing left (record, /dev/shm name, process).

  test_server_runs_and_bench           ``pool serve``: runs and a bench attached to the pool go through its server
      with the reference's tokens, two at once too; status names it; what it cannot serve is refused with the
      numbers and it keeps serving; a second server is refused; ``--no-server`` runs in-process; ``--stop``.
  test_server_client_and_server_killed a client SIGKILLed mid-request only loses its request; the server
      SIGKILLed mid-request: its client fails at once naming it, its client row comes back, later runs attach
      in-process, the next ``pool serve`` removes its leftovers and serves.
  test_server_exits_with_its_pool      SIGKILL of the coordinator: the server exits by itself, removing its files.
  test_server_batches_waiting_requests two greedy requests sent while the server is busy join its running batch
      (--batch-size 3): each gets exactly its solo tokens, as many as it asked for, as they come.
  test_server_with_a_draft             --draft with a batch: a lone request decodes from trees, the reference's
      tokens.

CPU only; tiny fp32 images; about 45 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from conftest import ROOT, assert_user_error, run_launch

from model.errors import UserError
from model.synthetic import SyntheticCheckpoint
from runtime.engine.config import EngineConfig
from runtime.engine.generate import Generator, SamplingConfig
from runtime.engine.source import open_source
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image
from runtime.format.pack import pack
from runtime.ipc import records
from runtime.ipc.records import handle_of, pool_file, read_record
from runtime.ipc.shm import (
    CLIENT_ATTACHED,
    CLIENT_FREE,
    POOL_RUNNING,
    SLOT_FREE,
    SLOT_QUEUED,
    SLOT_READY,
    PoolResources,
    leftover_names,
)
from runtime.pool import attach as attaching
from runtime.pool.attach import release_row
from runtime.pool.client import PoolClient
from runtime.services import pools as pool_cmds
from runtime.services import server

PROMPTS = ([1, 2, 3, 4], [9, 8, 7, 6, 5])
NEW = 8
# --dram-gb 0.018 with 2 clients x 2 window slots: the pool holds 7 of the 10 groups of the 4-layer tiny
# model; 3 FFN groups stream through each client's window, 3 reads per forward pass.
POOL_ARGS = ("--dram-gb", "0.018", "--clients", "2", "--window-slots", "2")
_ids = itertools.count()


# ---- images, references -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("daemon") / "tiny.img"
    pack(SyntheticCheckpoint("tiny", n_layers=4), out, dtype="fp32", quiet=True)
    return out


def copy_image(src: Path, dst_dir: Path) -> Path:
    """A private copy (image + manifest) for a test that modifies it."""
    dst = dst_dir / src.name
    shutil.copyfile(src, dst)
    shutil.copyfile(f"{src}.manifest.json", f"{dst}.manifest.json")
    return dst


_REFS: dict[tuple, list[int]] = {}


def reference(image: Path, prompt: list[int], new: int = NEW) -> list[int]:
    """Greedy tokens of --mode full (the in-memory reference), cached per image and prompt."""
    key = (str(image), tuple(prompt), new)
    if key not in _REFS:
        gen = Generator(InMemoryWeights(Image.open(image), "cpu", quiet=True), len(prompt) + new)
        _REFS[key] = gen.generate(prompt, SamplingConfig(new)).output_token_ids
    return _REFS[key]


def attached_run(name: str, prompt: list[int], new: int = NEW, on_token=None, image: Path | None = None):
    """An in-process ``run --attach name`` (the same code path: runtime.engine.source._attached_source)."""
    rec = read_record(name)
    img = Image.open(image or rec["image"]["path"])
    cfg = EngineConfig.of(attach=name, quiet=True)
    max_len = len(prompt) + new
    with open_source(img, cfg, torch.device("cpu"), max_len=max_len) as (source, plan, _):
        assert plan.stream, f"the run streams nothing: {plan.describe()}"
        assert source.res.ring_readonly, "an attached client must map the ring read-only"
        return Generator(source, max_len).generate(prompt, SamplingConfig(new), on_token=on_token).output_token_ids


def launch_bg(tmp_path: Path, tag: str, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """``python launch.py ARGS`` in the background; stdout and stderr to files."""
    out, err = tmp_path / f"{tag}.out", tmp_path / f"{tag}.err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], stdout=fo, stderr=fe, cwd=ROOT,
                                env=dict(os.environ), stdin=subprocess.DEVNULL)
    return proc, out, err


def attach_args(name: str, prompt: list[int], new: int, out_json: Path | None = None) -> list[str]:
    args = ["run", "--attach", name, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(new),
            "--device", "cpu", "--quiet"]
    return args + (["--out-json", str(out_json)] if out_json else [])


def wait_until(cond, timeout_s: float, what: str, tick: float = 0.005) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(tick)
    return time.monotonic() - t0


def alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---- pools and leftovers ---------------------------------------------------------------------------------


class Pools:
    """The pools, processes and pool dir of one test; ``finish`` stops and cleans up and says what was left."""

    def __init__(self, pool_dir: Path) -> None:
        self.dir = pool_dir
        self.names: list[str] = []
        self.pids: set[int] = set()

    def name(self, tag: str) -> str:
        n = f"dt{os.getpid()}-{tag}-{next(_ids)}"
        self.names.append(n)
        return n

    def start(self, image: Path, name: str, *args: str, check: bool = True):
        proc = run_launch("pool", "start", "--image", str(image), "--name", name, *(args or POOL_ARGS), "--quiet",
                          check=check, timeout=120)
        if proc.returncode == 0:
            self.watch_pool(name)
        return proc

    def watch_pool(self, name: str) -> dict:
        """Remember the coordinator's and its workers' pids (for the leftover check)."""
        rec = read_record(name)
        self.pids.add(int(rec["pid"]))
        self.pids.update(self.workers(rec))
        return rec

    @staticmethod
    def workers(rec: dict, timeout_s: float = 30.0) -> list[int]:
        res = PoolResources.attach(handle_of(rec), ring=False)
        try:
            wait_until(lambda: all(int(p) > 0 for p in res.workers["pid"]), timeout_s, "workers up")
            return [int(p) for p in res.workers["pid"]]
        finally:
            res.close()

    def ours(self, pid: int) -> bool:
        """``pid`` is alive and started under this test's pool dir (not a reused pid)."""
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            return p.status() != psutil.STATUS_ZOMBIE and p.environ().get("LLMS_POOL_DIR") == str(self.dir)
        return False

    def tagged(self) -> list[psutil.Process]:
        """Live processes started under this test's pool dir (coordinators, workers, their resource trackers,
        client runs): they inherit LLMS_POOL_DIR."""
        out = []
        for p in psutil.process_iter():
            if p.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if p.environ().get("LLMS_POOL_DIR") == str(self.dir) and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
        return out

    def leftovers(self) -> list[str]:
        names = sorted(n for pool in self.names for n in leftover_names(pool=pool))
        procs = []
        for p in self.tagged():
            with contextlib.suppress(psutil.Error):  # gone, or a zombie, since tagged() looked: not left behind
                procs.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        procs += [f"{pid} (coordinator or worker)" for pid in sorted(self.pids) if self.ours(pid)]
        records = sorted(p.name for pat in ("*.json", "*.server", "*.sock", "*.lock", "*.log")  # records, sockets,
                         for p in self.dir.glob(pat)) if self.dir.exists() else []  # locks and logs
        return ([f"/dev/shm names: {names}"] if names else []) + ([f"processes: {procs}"] if procs else []) + \
            ([f"records: {records}"] if records else [])

    def finish(self) -> list[str]:
        for name in self.names:
            with contextlib.suppress(UserError, OSError, ValueError, KeyError):
                if records.coordinator_alive(json.loads(pool_file(name, "record").read_text())):
                    pool_cmds.stop(name, 5.0)
            with contextlib.suppress(UserError):
                pool_cmds.cleanup(name)
        deadline = time.monotonic() + 10
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = self.leftovers()
        for p in self.tagged():  # remove them anyway, so a failure does not leak into other tests
            with contextlib.suppress(psutil.Error):
                p.kill()
        for n in (n for pool in self.names for n in leftover_names(pool=pool)):
            pool_cmds._unlink_name(n)
        return left


@pytest.fixture
def pools(tmp_path, monkeypatch):
    d = tmp_path / "pools"
    monkeypatch.setenv("LLMS_POOL_DIR", str(d))
    t = Pools(d)
    yield t
    left = t.finish()
    assert not left, "left behind: " + "; ".join(left)


def control(name: str) -> PoolResources:
    return PoolResources.attach(handle_of(read_record(name)), ring=False)


def client_index(res: PoolResources, pid: int) -> int | None:
    for j, row in enumerate(res.clients):
        if int(row["state"]) == CLIENT_ATTACHED and int(row["pid"]) == pid:
            return j
    return None


def window_of(rec: dict, j: int) -> list[int]:
    n_dram, w = len(rec["dram_groups"]), int(rec["window_slots"])
    return list(range(n_dram + j * w, n_dram + (j + 1) * w))


def streaming(res: PoolResources, rec: dict, pid: int) -> bool:
    """The client process ``pid`` is attached and the pool serves its window."""
    j = client_index(res, pid)
    return j is not None and any(int(res.slots[s]["owner"]) == j and int(res.slots[s]["state"]) in
                                 (SLOT_QUEUED, SLOT_READY) for s in window_of(rec, j))


def pool_state(name: str) -> str:
    rows = json.loads(run_launch("pool", "list", "--json").stdout)["pools"]
    return {r["name"]: r["state"] for r in rows}.get(name, "absent")


# ---- lifecycle, list, security ------------------------------------------------------------------------


def test_lifecycle_security_and_list(image, pools):
    name = pools.name("life")
    pools.start(image, name)
    rec = read_record(name)
    uid = os.getuid()
    # names per user, mode 0600; the pool dir and its files private
    names = leftover_names(pool=name)
    assert len(names) == 2 + 1 + 2 + 2, names  # ctl, ring; coord, w0, w1, c0, c1
    for n in names:
        assert f"llms.{uid}.{name}." in n, n
        st = os.stat(f"/dev/shm/{n}")
        assert (st.st_mode & 0o777, st.st_uid) == (0o600, uid), (n, oct(st.st_mode), st.st_uid)
    assert pools.dir.stat().st_mode & 0o777 == 0o700
    for f in (pool_file(name, "record"), pool_file(name, "log")):
        assert f.stat().st_mode & 0o777 == 0o600, f

    listed = json.loads(run_launch("pool", "list", "--json").stdout)
    row = next(r for r in listed["pools"] if r["name"] == name)
    assert (row["state"], row["pid"], row["image"], row["client_slots"], row["clients_attached"]) == \
        ("running", rec["pid"], str(image), 2, 0), row
    assert listed["pool_dir"] == str(pools.dir)

    # a client maps the ring read-only: writing raises
    res = PoolResources.attach(handle_of(rec), ring="ro")
    try:
        assert res.ring_readonly
        with pytest.raises(TypeError):
            res.ring[0] = 1
        with pytest.raises(TypeError):
            res.slot_view(0)[0] = 1
    finally:
        res.close()

    assert attached_run(name, PROMPTS[0]) == reference(image, PROMPTS[0])

    # a record of another uid, and (as root) a record file another user owns: refused before anything attaches
    path = pool_file(name, "record")
    text = path.read_text()
    try:
        path.write_text(json.dumps({**rec, "uid": uid + 4242}))
        proc = run_launch(*attach_args(name, PROMPTS[0], 2), check=False)
        assert_user_error(proc, repr(name), f"uid {uid + 4242}", "refused")
        path.write_text(text)
        if os.geteuid() == 0:
            os.chown(path, 4243, -1)
            proc = run_launch(*attach_args(name, PROMPTS[0], 2), check=False)
            assert_user_error(proc, repr(name), "uid 4243", "refused")
    finally:
        if os.geteuid() == 0:
            os.chown(path, uid, -1)
        path.write_text(text)
    res = control(name)
    try:
        assert (res.clients["state"] == CLIENT_FREE).all(), res.clients
    finally:
        res.close()

    workers = Pools.workers(rec)
    proc = run_launch("pool", "stop", name)
    assert f"pool {name} (pid {rec['pid']}) stopped" in proc.stdout, proc.stdout
    assert leftover_names(pool=name) == [] and not path.exists()
    assert not any(alive(p) for p in [rec["pid"], *workers])
    assert pool_state(name) == "absent"


# ---- two clients at once ----------------------------------------------------------------------------------


def test_two_clients_concurrently(image, pools, tmp_path):
    name = pools.name("two")
    pools.start(image, name)
    rec = read_record(name)
    new = 24
    solo = [attached_run(name, p, new) for p in PROMPTS]
    assert solo == [reference(image, p, new) for p in PROMPTS]
    workers = Pools.workers(rec)
    res = control(name)
    procs = []
    try:
        # Both runs wait on the window of their first streamed group while the workers are stopped: both are
        # attached at once; then they stream side by side.
        for w in workers:
            os.kill(w, signal.SIGSTOP)
        outs = [tmp_path / f"c{i}.json" for i in range(2)]
        procs = [launch_bg(tmp_path, f"c{i}", *attach_args(name, p, new, outs[i])) for i, p in enumerate(PROMPTS)]
        wait_until(lambda: all(client_index(res, p.pid) is not None for p, _, _ in procs) or
                   any(p.poll() is not None for p, _, _ in procs), 60, "both clients attached")
        assert all(p.poll() is None for p, _, _ in procs), [e.read_text() for _, _, e in procs]
        rows = sorted(client_index(res, p.pid) for p, _, _ in procs)
        assert rows == [0, 1], res.clients
        time.sleep(0.2)
        assert all(p.poll() is None for p, _, _ in procs)  # held by the stopped workers
        with pytest.raises(UserError, match="all 2 client slots are attached"):  # a third is refused meanwhile
            attaching.attach(name)
        reads0 = int(res.header["reads"])
        for w in workers:
            os.kill(w, signal.SIGCONT)
        for p, _, err in procs:
            assert p.wait(60) == 0, err.read_text()
        got = [json.loads(o.read_text())["output_token_ids"] for o in outs]
        assert got == solo, f"concurrent {got} != solo {solo}"
        assert int(res.header["reads"]) - reads0 >= 2 * 3 * new  # both streamed every pass
        wait_until(lambda: (res.clients["state"] == CLIENT_FREE).all(), 2, "both rows given back")
        assert int(res.header["state"]) == POOL_RUNNING and int(res.header["errors"]) == 0
    finally:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGCONT)
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        res.close()


# ---- a worker killed ----------------------------------------------------------------------------------------


def test_worker_killed_mid_run(image, pools):
    name = pools.name("wkill")
    pools.start(image, name)
    res = control(name)
    new = 64
    want = reference(image, PROMPTS[0], new)
    tokens, killed, go = [0], [], threading.Event()

    def on_token(_t: int) -> None:
        tokens[0] += 1
        if tokens[0] == 3:
            go.set()

    def killer() -> None:
        # Freeze worker 0 until a read of the run's window is queued on it (the run then waits for that read),
        # then SIGKILL it: its read is certainly outstanding and must be issued again.
        if not go.wait(60):
            return
        pid = int(res.workers[0]["pid"])
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                int(s["state"]) == SLOT_QUEUED and int(s["worker"]) == 0 for s in res.slots):
            time.sleep(0.002)
        killed.append((pid, tokens[0], [int(s["group"]) for s in res.slots
                                        if int(s["state"]) == SLOT_QUEUED and int(s["worker"]) == 0]))
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        assert int(res.header["worker_restarts"]) == 0
        got = attached_run(name, PROMPTS[0], new, on_token=on_token)
        thread.join(10)
        assert killed, "the killer did not run"
        pid, at, queued = killed[0]
        assert queued, "no read was in flight on the killed worker"
        assert at < new - 5, f"the kill landed after token {at} of {new}"
        assert got == want, f"with worker {pid} killed: {got} != {want}"
        assert int(res.header["worker_restarts"]) == 1, res.header
        new_pid = int(res.workers[0]["pid"])
        pools.pids.add(new_pid)
        assert new_pid not in (0, pid) and alive(new_pid) and not alive(pid), (pid, new_pid)
        log = pool_file(name, "log").read_text()
        line = next(ln for ln in log.splitlines() if f"(pid {pid}) exited with -9" in ln)
        assert "re-issuing" in line and "re-issuing 0 " not in line, line
        assert int(res.header["errors"]) == 0 and int(res.header["state"]) == POOL_RUNNING
        assert attached_run(name, PROMPTS[1]) == reference(image, PROMPTS[1])  # the new worker serves
    finally:
        go.set()
        res.close()


# ---- a client killed -----------------------------------------------------------------------------------------


def test_client_killed(image, pools, tmp_path):
    name = pools.name("ckill")
    pools.start(image, name)
    rec = read_record(name)
    res = control(name)
    proc = None
    try:
        proc, _, err = launch_bg(tmp_path, "victim", *attach_args(name, PROMPTS[1], 4000))
        wait_until(lambda: streaming(res, rec, proc.pid) or proc.poll() is not None, 60, "the client streams")
        assert proc.poll() is None, err.read_text()
        j = client_index(res, proc.pid)
        mine = window_of(rec, j)
        # frozen first, so that it certainly holds pins: its whole window READY (filled, never released)
        os.kill(proc.pid, signal.SIGSTOP)
        wait_until(lambda: all((int(res.slots[s]["state"]), int(res.slots[s]["owner"])) == (SLOT_READY, j)
                               for s in mine), 5, f"client {j}'s window READY")
        os.kill(proc.pid, signal.SIGKILL)
        at_kill = [(int(res.slots[s]["state"]), int(res.slots[s]["owner"])) for s in mine]
        proc.wait(10)
        assert at_kill == [(SLOT_READY, j)] * len(mine), at_kill

        def released() -> bool:
            return int(res.clients[j]["state"]) == CLIENT_FREE and all(
                int(res.slots[s]["owner"]) == -1 and int(res.slots[s]["state"]) == SLOT_FREE for s in mine)

        dt = wait_until(released, 2.0, f"client {j}'s row and window slots {at_kill} released")
        print(f"client {j} killed holding (state, owner) {at_kill}; released in {dt:.2f} s")
        assert int(res.header["state"]) == POOL_RUNNING and int(res.header["errors"]) == 0
        assert pool_state(name) == "running"
        assert attached_run(name, PROMPTS[0]) == reference(image, PROMPTS[0])
        # the run gave its row back as it closed; the coordinator frees it on its next loop
        wait_until(lambda: (res.clients["state"] == CLIENT_FREE).all(), 10, "every client row free again")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        res.close()


# ---- the coordinator killed -----------------------------------------------------------------------------------


def test_coordinator_killed(image, pools, tmp_path):
    name = pools.name("coord")
    pools.start(image, name)
    rec = read_record(name)
    workers = Pools.workers(rec)
    res = control(name)
    proc = None
    try:
        proc, _, err = launch_bg(tmp_path, "client", *attach_args(name, PROMPTS[0], 4000))
        wait_until(lambda: streaming(res, rec, proc.pid) or proc.poll() is not None, 60, "the client streams")
        assert proc.poll() is None, err.read_text()
        os.kill(rec["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the attached run did not fail within 10 s of the coordinator's SIGKILL:\n{err.read_text()}")
        dt = time.monotonic() - t0
        stderr = err.read_text()
        assert_user_error(SimpleNamespace(returncode=rc, stderr=stderr), repr(name), f"coordinator pid {rec['pid']}")
        print(f"the attached run failed {dt:.2f} s after the SIGKILL: {stderr.strip()}")
        wait_until(lambda: not any(alive(w) for w in workers), 5, "the workers exit by themselves")
    finally:
        res.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    # the leftovers are there, and detected
    left = leftover_names(pool=name)
    assert f"llms.{os.getuid()}.{name}.ctl" in left and pool_file(name, "record").exists(), left
    assert pool_state(name) == "dead"
    assert_user_error(run_launch(*attach_args(name, PROMPTS[0], 2), check=False), repr(name), "not running",
                      f"pool cleanup {name}")

    # pool start of the same name: removes them, says so, starts fresh
    proc2 = pools.start(image, name)
    assert f"pool {name}: removed the leftovers of a dead pool" in proc2.stderr, proc2.stderr
    rec2 = read_record(name)
    assert rec2["pid"] != rec["pid"] and rec2["started_unix"] > rec["started_unix"]
    res = control(name)
    try:
        hd = res.header
        assert (int(hd["coord_pid"]), int(hd["state"]), int(hd["worker_restarts"]), int(hd["bytes_stream"])) == \
            (rec2["pid"], POOL_RUNNING, 0, 0), hd
        assert (res.clients["state"] == CLIENT_FREE).all() and (res.clients["pid"] == 0).all(), res.clients
    finally:
        res.close()
    assert attached_run(name, PROMPTS[1]) == reference(image, PROMPTS[1])

    # killed again: pool cleanup NAME removes everything
    workers = Pools.workers(rec2)
    os.kill(rec2["pid"], signal.SIGKILL)
    wait_until(lambda: not any(alive(w) for w in [rec2["pid"], *workers]), 5, "the coordinator and workers gone")
    assert leftover_names(pool=name)
    out = run_launch("pool", "cleanup", name).stdout
    assert f"removed /llms.{os.getuid()}.{name}.ctl" in out and "names removed" in out, out
    assert leftover_names(pool=name) == [] and not pool_file(name, "record").exists()
    assert pool_state(name) == "absent"


# ---- a corrupted group ------------------------------------------------------------------------------------------


def test_read_error_and_checksum_mismatch(image, pools, tmp_path):
    img = copy_image(image, tmp_path)
    name = pools.name("crc")
    pools.start(img, name)
    rec = read_record(name)
    im = Image.open(img)
    streamed = [g for g in im.groups if g not in rec["dram_groups"]]
    bad = streamed[1]
    spec = im.groups[bad]
    # silent corruption of a group the pool streams (not one it holds): flip bytes, keep mtime and size
    st = os.stat(img)
    with open(img, "r+b") as f:
        f.seek(spec.offset + 1000)
        raw = f.read(8)
        f.seek(spec.offset + 1000)
        f.write(bytes(b ^ 0x5A for b in raw))
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert attaching.image_identity(str(img)) == {k: rec["image"][k] for k in ("size", "mtime_ns", "ino", "dev")}

    proc = run_launch(*attach_args(name, PROMPTS[0], NEW), check=False)
    assert_user_error(proc, repr(name), f"group {bad}", f"offset {spec.offset}", str(img), "crc32")
    res = control(name)
    try:
        hd = res.header
        assert (int(hd["retries"]), int(hd["errors"]), int(hd["state"])) == (1, 1, POOL_RUNNING), hd
        log = pool_file(name, "log").read_text()
        assert log.count("retrying once") == 1 and log.count("read failed twice") == 1, log
        wait_until(lambda: (res.clients["state"] == CLIENT_FREE).all(), 2, "the failed client's row given back")
        assert pool_state(name) == "running"

        # another client that does not need that group streams the others, byte-exact
        att = attaching.attach(name)
        client = PoolClient(att.handle, att.index, ring="ro")
        try:
            names = list(im.groups)
            seq = [names.index(g) for g in streamed if g != bad]
            client.start(seq, cyclic=True)
            for pos in range(3 * len(seq)):
                slot, sq = client.wait_ready(pos, 10)
                g = im.groups[names[seq[pos % len(seq)]]]
                assert zlib.crc32(client.res.slot_view(slot, g.size)) == g.crc32, (pos, g.name)
                client.release(slot, sq)
            assert (int(hd["errors"]), int(hd["state"])) == (1, POOL_RUNNING)

            # a real read error (EIO: the image cut inside the last streamed group, under the attached client)
            last = im.groups[streamed[-1]]
            client.stop_stream()
            os.truncate(img, last.offset + last.size // 2 // 4096 * 4096)
            client.start([names.index(streamed[-1])], cyclic=False)
            with pytest.raises(UserError) as info:
                client.wait_ready(0, 10)
            for part in (repr(name), f"group {streamed[-1]}", f"offset {last.offset}", str(img), os.strerror(5)):
                assert part in str(info.value), (part, str(info.value))
        finally:
            client.close()
        assert (int(hd["retries"]), int(hd["errors"]), int(hd["state"])) == (2, 2, POOL_RUNNING), hd
        assert pool_state(name) == "running"
    finally:
        res.close()


# ---- the image changed under the pool ------------------------------------------------------------------------


def _refused(name: str, *needles: str) -> None:
    with pytest.raises(UserError) as info:
        attaching.attach(name)
    msg = str(info.value)
    for n in (repr(name), "attach refused", *needles):
        assert n in msg, (n, msg)


def test_image_changed(image, pools, tmp_path):
    img = copy_image(image, tmp_path)
    manifest = Path(f"{img}.manifest.json")
    name = pools.name("chg")
    pools.start(img, name)
    st = os.stat(img)
    keep = (st.st_atime_ns, st.st_mtime_ns)

    # touched: mtime
    os.utime(img, ns=(keep[0], keep[1] + 5_000_000_000))
    _refused(name, "changed since the pool started", "mtime_ns")
    os.utime(img, ns=keep)
    att = attaching.attach(name)  # identical again: accepted (and the row given back)
    release_row(att)

    # appended bytes (CLI: exit 2, one line)
    with open(img, "ab") as f:
        f.write(b"\0" * 4096)
    proc = run_launch(*attach_args(name, PROMPTS[0], 2), check=False)
    assert_user_error(proc, repr(name), "changed since the pool started", f"size {st.st_size} -> {st.st_size + 4096}")
    os.truncate(img, st.st_size)
    os.utime(img, ns=keep)

    # a checksum changed in the manifest (image file untouched)
    m = json.loads(manifest.read_text())
    saved = manifest.read_text()
    m["groups"][3]["crc32"] ^= 1
    manifest.write_text(json.dumps(m))
    _refused(name, "checksums")
    manifest.write_text(saved)

    # another image's header and manifest written in place (same size, inode and mtime): the uuid differs
    other = tmp_path / "other" / "tiny.img"
    other.parent.mkdir()
    pack(SyntheticCheckpoint("tiny", n_layers=4, seed=5), other, dtype="fp32", quiet=True)
    with open(img, "r+b") as f, open(other, "rb") as src:
        f.write(src.read())
    shutil.copyfile(f"{other}.manifest.json", manifest)
    os.utime(img, ns=keep)
    _refused(name, "header uuid", Image.open(other).uuid)

    # a real re-pack of the path (launch.py pack refuses it while the pool serves: the library call, as another
    # tool would): a new file renamed over the old one, so the attach is refused on the CLI
    pack(SyntheticCheckpoint("tiny", n_layers=4, seed=9), img, dtype="fp32", quiet=True)
    proc = run_launch(*attach_args(name, PROMPTS[0], 2), check=False)
    assert_user_error(proc, repr(name), "attach refused")
    res = control(name)
    try:
        assert (res.clients["state"] == CLIENT_FREE).all() and int(res.header["state"]) == POOL_RUNNING
    finally:
        res.close()


# ---- pool stop escalates -------------------------------------------------------------------------------------


def test_stop_escalates(image, pools):
    name = pools.name("stop")
    pools.start(image, name)
    rec = read_record(name)
    workers = Pools.workers(rec)
    os.kill(rec["pid"], signal.SIGSTOP)  # SIGTERM stays pending: the coordinator never handles it
    try:
        # a hung coordinator (alive, no heartbeat): an attached run fails within dead_after_s, never hangs
        t0 = time.monotonic()
        with pytest.raises(UserError) as info:
            attached_run(name, PROMPTS[0])
        dt = time.monotonic() - t0
        print(f"attached run against a frozen coordinator failed after {dt:.2f} s: {info.value}")
        assert dt < 10 and repr(name) in str(info.value) and "not responding" in str(info.value), (dt, info.value)
        t0 = time.monotonic()
        proc = run_launch("pool", "stop", name, "--timeout", "1")
        dt = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec["pid"], signal.SIGCONT)
    assert "did not stop within 1 s: killed" in proc.stdout, proc.stdout
    assert dt < 8, dt
    assert not any(alive(p) for p in [rec["pid"], *workers])
    assert leftover_names(pool=name) == [] and not pool_file(name, "record").exists()


# ---- another pool dir ------------------------------------------------------------------------------------------


def test_cleanup_spares_live_pool_of_other_dir(image, pools, tmp_path):
    """/dev/shm is one namespace for all of a user's pool dirs: cleanup or start of NAME from another dir must
    not unlink a live pool's names."""
    name = pools.name("other")
    pools.start(image, name)
    before = leftover_names(pool=name)
    env = {"LLMS_POOL_DIR": str(tmp_path / "elsewhere")}
    out = run_launch("pool", "cleanup", name, env=env).stdout
    assert "nothing to remove" in out and leftover_names(pool=name) == before, out
    proc = run_launch("pool", "start", "--image", str(image), "--name", name, *POOL_ARGS, env=env, check=False)
    assert_user_error(proc, repr(name), "in use", str(read_record(name)["pid"]))
    assert leftover_names(pool=name) == before
    assert not list((tmp_path / "elsewhere").glob("*.json"))
    assert attached_run(name, PROMPTS[0]) == reference(image, PROMPTS[0])


# ---- bad input -------------------------------------------------------------------------------------------------


def _nothing_created(pools: Pools, name: str, procs_before: set[int]) -> None:
    files = sorted(p.name for p in pools.dir.glob("*")) if pools.dir.exists() else []
    assert files == [], files  # no record, log, lock or start file
    assert not name or leftover_names(pool=name) == [], leftover_names(pool=name)  # ("": every pool's names)
    assert {p.pid for p in pools.tagged()} <= procs_before


BAD_START = {
    "dram-over-available": (["--dram-gb", "100000"], ["--dram-gb 100000", "exceeds the available memory", "bytes"]),
    "missing-image": (["--image", "{tmp}/none.img"], ["{tmp}/none.img", "does not exist"]),
    "unreadable-image": (["--image", "{tmp}/locked.img"], ["{tmp}/locked.img", "no read permission"]),
    "clients-0": (["--clients", "0"], ["--clients must be at least 1, found 0"]),
    "clients-1000": (["--clients", "1000"], ["--clients 1000: at most 64"]),
    "dram-negative": (["--dram-gb", "-1"], ["--dram-gb must be positive, found -1.0"]),
    "workers-1000": (["--workers", "1000"], ["--workers 1000: 1 to", "useful"]),
    "image-dir": (["--image", "{tmp}"], ["{tmp}", "is a directory, not an image"]),
    "name-dotdot": (["--name", "../x"], ["'../x'", "1-64 characters"]),
    "name-slash": (["--name", "a/b"], ["'a/b'", "1-64 characters"]),
    "name-empty": (["--name", ""], ["''", "1-64 characters"]),
    "name-65": (["--name", "n" * 65], ["n" * 65, "1-64 characters"]),
}


@pytest.mark.parametrize("case", sorted(BAD_START))
def test_bad_start_input(case, image, pools, tmp_path):
    args, needles = BAD_START[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    needles = [n.replace("{tmp}", str(tmp_path)) for n in needles]
    if case == "unreadable-image":
        if os.geteuid() == 0:
            pytest.skip("root reads any file: os.access is always true")
        img = copy_image(image, tmp_path)
        locked = tmp_path / "locked.img"
        img.rename(locked)
        Path(f"{img}.manifest.json").rename(f"{locked}.manifest.json")
        locked.chmod(0)
    name = pools.name("bad")
    opts = {"--image": str(image), "--name": name, "--dram-gb": "0.018", "--clients": "2", "--window-slots": "2"}
    for k, v in zip(args[::2], args[1::2]):
        opts[k] = v
    if opts["--name"] != name:
        pools.names.remove(name)
    before = {p.pid for p in pools.tagged()}
    proc = run_launch("pool", "start", *itertools.chain.from_iterable(opts.items()), check=False)
    assert_user_error(proc, *needles)
    _nothing_created(pools, opts["--name"], before)


def test_bad_input_with_live_pool(image, pools, tmp_path):
    name = pools.name("live")
    pools.start(image, name)
    rec = read_record(name)
    record = pool_file(name, "record").read_text()
    before, procs = leftover_names(pool=name), {p.pid for p in pools.tagged()}
    # the name in use: refused, the running pool untouched
    proc = pools.start(image, name, check=False)
    assert_user_error(proc, repr(name), "in use", f"pid {rec['pid']}")
    assert pool_file(name, "record").read_text() == record and leftover_names(pool=name) == before
    # run --attach with flags that do not apply, and to a pool that does not exist
    for extra, needles in ((["--dram-gb", "1"], ["--dram-gb", "--attach"]),
                           (["--mode", "preload"], ["--mode", "--attach"])):
        proc = run_launch(*attach_args(name, PROMPTS[0], 2), *extra, check=False)
        assert_user_error(proc, *needles)
    assert_user_error(run_launch(*attach_args("../x", PROMPTS[0], 2), check=False), "'../x'", "1-64 characters")
    missing = f"dt{os.getpid()}-nosuch"
    proc = run_launch(*attach_args(missing, PROMPTS[0], 2), check=False)
    assert_user_error(proc, repr(missing), "no pool named", name)
    assert not pool_file(missing, "record").exists() and leftover_names(pool=missing) == []
    res = control(name)
    try:
        assert (res.clients["state"] == CLIENT_FREE).all(), res.clients  # no row was claimed
        assert int(res.header["state"]) == POOL_RUNNING
    finally:
        res.close()
    assert {p.pid for p in pools.tagged()} == procs  # no process but the pool's (and its resource tracker)
    # re-packing the image the pool serves: refused, the image untouched
    before = (image.read_bytes(), Path(f"{image}.manifest.json").read_bytes())
    proc = run_launch("pack", "--synthetic", "tiny", "--layers", "4", "--seed", "9", "--out", str(image), check=False)
    assert_user_error(proc, f"--out {image}", repr(name), f"pid {rec['pid']}", "serves this image")
    assert (image.read_bytes(), Path(f"{image}.manifest.json").read_bytes()) == before


def test_cleanup_and_stop_leave_no_files(image, pools):
    """``pool cleanup`` of a name nothing knows creates nothing; stop and cleanup remove the lock and the logs."""
    missing = pools.name("nothing")
    out = run_launch("pool", "cleanup", missing).stdout
    assert "nothing to remove" in out and not list(pools.dir.glob(f"{missing}*"))
    name = pools.name("files")
    pools.start(image, name)
    assert sorted(p.name for p in pools.dir.glob(f"{name}*")) == [f"{name}.json", f"{name}.lock", f"{name}.log"]
    run_launch("pool", "stop", name)
    assert not list(pools.dir.glob(f"{name}*"))
    pools.start(image, name)
    rec = read_record(name)
    os.kill(rec["pid"], signal.SIGKILL)
    wait_until(lambda: not alive(rec["pid"]), 10, "the coordinator gone")
    run_launch("pool", "cleanup", name)
    assert not list(pools.dir.glob(f"{name}*")) and leftover_names(pool=name) == []


# ---- the pool's server ------------------------------------------------------------------------------------


def serve(name: str, *args: str, check: bool = True):
    return run_launch("pool", "serve", name, "--device", "cpu", "--max-seq-len", "4096", *args, check=check,
                      timeout=120)


def tokens_of(out_json: Path) -> list[int]:
    return json.loads(out_json.read_text())["output_token_ids"]


def test_server_runs_and_bench(image, pools, tmp_path):
    name = pools.name("srv")
    pools.start(image, name)
    assert f"pool {name} serves on cpu" in serve(name, "--quiet").stdout
    srv = records.live_server(name)
    assert srv is not None and alive(srv["pid"])
    for f in (pool_file(name, "server"), pool_file(name, "socket")):
        assert f.stat().st_mode & 0o777 == 0o600, f
    js = tmp_path / "r.json"
    run_launch(*attach_args(name, PROMPTS[0], NEW, js))
    got = json.loads(js.read_text())
    assert (got["mode"], got["server_pid"]) == ("server", srv["pid"]), got
    assert got["output_token_ids"] == reference(image, PROMPTS[0])

    # two at once: served one after the other, each its solo output
    outs = [tmp_path / f"c{i}.json" for i in range(2)]
    procs = [launch_bg(tmp_path, f"c{i}", *attach_args(name, p, 24, outs[i])) for i, p in enumerate(PROMPTS)]
    for proc, _, err in procs:
        assert proc.wait(60) == 0, err.read_text()
    assert [tokens_of(o) for o in outs] == [reference(image, p, 24) for p in PROMPTS]
    assert [json.loads(o.read_text())["server_pid"] for o in outs] == [srv["pid"]] * 2  # not attached in-process

    # a bench through it: the server's round, this process's time to the first token
    pf, bj = tmp_path / "p.txt", tmp_path / "b.json"
    pf.write_text(",".join(map(str, PROMPTS[1])) + "\n")
    run_launch("bench", "--attach", name, "--prompts", str(pf), "--max-new-tokens", str(NEW), "--warmup-rounds",
               "0", "--out-json", str(bj))  # one round: its prefill (the server's clock) lies inside its first token
    b = json.loads(bj.read_text())
    assert b["mode"] == "server" and b["server"]["pid"] == srv["pid"], b["server"]
    assert b["results"][0]["output_token_ids"] == reference(image, PROMPTS[1])
    assert 0 < b["prefill_ms"] <= b["open_to_first_token_ms"] < b["process_start_to_first_token_ms"], b
    assert len(b["step_ms"]) == NEW - 1 and b["plan"]["mode"] == "mixed"

    snap = json.loads(run_launch("pool", "status", name, "--json").stdout)
    assert snap["pool"]["server_pid"] == srv["pid"] and [c["pid"] for c in snap["clients"]] == [srv["pid"]]

    # what it cannot serve is refused, with the numbers; it keeps serving
    assert_user_error(run_launch(*attach_args(name, PROMPTS[0], 5000), check=False), "5000", "--max-seq-len 4096")
    assert_user_error(run_launch(*attach_args(name, PROMPTS[0], 2), "--gpu-mem-gb", "1", check=False),
                      "--gpu-mem-gb", "--no-server")
    assert_user_error(serve(name, check=False), repr(name), "already has a server", str(srv["pid"]))
    run_launch(*attach_args(name, PROMPTS[1], NEW, js))
    assert tokens_of(js) == reference(image, PROMPTS[1])

    # --no-server: the run attaches itself, same tokens
    run_launch(*attach_args(name, PROMPTS[0], NEW, js), "--no-server")
    assert json.loads(js.read_text())["mode"] == "mixed" and tokens_of(js) == reference(image, PROMPTS[0])

    out = run_launch("pool", "serve", name, "--stop").stdout
    assert f"pool {name}: server pid {srv['pid']} stopped" in out, out
    assert not alive(srv["pid"]) and not pool_file(name, "server").exists() and not pool_file(name, "socket").exists()
    assert attached_run(name, PROMPTS[1]) == reference(image, PROMPTS[1])  # the pool serves on


def test_server_client_and_server_killed(image, pools, tmp_path):
    name = pools.name("srvkill")
    pools.start(image, name)
    serve(name, "--quiet")
    srv = records.live_server(name)

    def long_run(tag: str):
        proc, out, err = launch_bg(tmp_path, tag, *attach_args(name, PROMPTS[0], 4000))
        wait_until(lambda: len(out.read_text().split()) >= 5 or proc.poll() is not None, 60, "tokens arrive")
        assert proc.poll() is None, err.read_text()
        return proc, err

    # a client killed mid-request: only its request is lost
    proc, _ = long_run("killed")
    proc.kill()
    proc.wait()
    log = pool_file(name, "server_log")
    wait_until(lambda: "went away" in log.read_text(), 10, "the server drops the request", tick=0.05)
    js = tmp_path / "r.json"
    run_launch(*attach_args(name, PROMPTS[1], NEW, js))
    assert tokens_of(js) == reference(image, PROMPTS[1]) and json.loads(js.read_text())["server_pid"] == srv["pid"]

    # the server killed mid-request: its client fails at once, naming it
    proc, err = long_run("orphan")
    os.kill(srv["pid"], signal.SIGKILL)
    try:
        rc = proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the client did not fail within 10 s of the server's SIGKILL:\n{err.read_text()}")
    assert_user_error(SimpleNamespace(returncode=rc, stderr=err.read_text()), repr(name), f"pid {srv['pid']}",
                      "closed the connection")
    res = control(name)
    try:  # its client row comes back (the coordinator's check of dead clients)
        wait_until(lambda: (res.clients["state"] == CLIENT_FREE).all(), 5, "the server's row given back")
    finally:
        res.close()
    assert records.live_server(name) is None and pool_file(name, "server").exists()  # stale, not used:
    run_launch(*attach_args(name, PROMPTS[0], NEW, js))
    assert json.loads(js.read_text())["mode"] == "mixed" and tokens_of(js) == reference(image, PROMPTS[0])

    # serves again, removing the leftovers and saying so; while it loads, its placeholder record refuses a
    # second server, and runs attach in-process
    proc, _, err = launch_bg(tmp_path, "serve2", "pool", "serve", name, "--device", "cpu", "--max-seq-len", "4096")
    wait_until(lambda: (records.read_server_record(name) or {}).get("pid", srv["pid"]) != srv["pid"]
               or proc.poll() is not None, 30, "the new server's record")
    starting = records.read_server_record(name)
    # held while loading (SIGSTOP): the placeholder stays for as long as the second serve takes to ask, however
    # slow this machine is (it is written as the server is spawned; the server needs seconds to replace it)
    os.kill(starting["pid"], signal.SIGSTOP)
    try:
        held = records.read_server_record(name)
        assert held["pid"] == starting["pid"] and server.server_for(name) is None, held
        needles = ("starting",) if held.get("starting") else ()  # else it had served before the stop came
        assert_user_error(serve(name, check=False), repr(name), "already has a server", str(starting["pid"]), *needles)
    finally:
        os.kill(starting["pid"], signal.SIGCONT)
    assert proc.wait(120) == 0, err.read_text()
    assert f"pool {name}: removed a dead server's leftovers" in err.read_text(), err.read_text()
    srv2 = records.live_server(name)
    assert srv2["pid"] == starting["pid"] != srv["pid"] and not srv2.get("starting")
    run_launch(*attach_args(name, PROMPTS[0], NEW, js))
    assert json.loads(js.read_text())["server_pid"] == srv2["pid"] and tokens_of(js) == reference(image, PROMPTS[0])


def test_server_exits_with_its_pool(image, pools):
    name = pools.name("srvpool")
    pools.start(image, name)
    serve(name, "--quiet")
    srv, rec = records.live_server(name), read_record(name)
    os.kill(rec["pid"], signal.SIGKILL)
    dt = wait_until(lambda: not alive(srv["pid"]), 15, "the server exits after its pool's coordinator", tick=0.05)
    print(f"the server exited {dt:.2f} s after the coordinator's SIGKILL")
    assert not pool_file(name, "server").exists() and not pool_file(name, "socket").exists()
    assert "died" in pool_file(name, "server_log").read_text() or "gone" in pool_file(name, "server_log").read_text()
    run_launch("pool", "cleanup", name)


def test_server_batches_waiting_requests(image, pools, tmp_path):
    """Greedy requests that come while the server is busy join its running batch (continuous batching,
    runtime/engine/scheduler.py): each gets exactly its solo tokens (and only as many as it asked for), as they
    come, from passes it shared with the others; the busy client killed only loses its own request."""
    name = pools.name("srvbatch")
    pools.start(image, name)
    serve(name, "--batch-size", "3", "--quiet")
    srv = records.live_server(name)
    proc, out, err = launch_bg(tmp_path, "busy", *attach_args(name, PROMPTS[0], 4000))
    wait_until(lambda: len(out.read_text().split()) >= 5 or proc.poll() is not None, 60, "the server is busy")
    assert proc.poll() is None, err.read_text()
    asks = [(PROMPTS[1], 8), ([3, 1, 4, 1, 5, 9, 2], 24)]
    socks = []
    for prompt, new in asks:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60)
        s.connect(srv["socket"])
        s.sendall(json.dumps({"prompt_ids": prompt, "max_new_tokens": new}).encode() + b"\n")
        socks.append(s)
    for s, (prompt, new) in zip(socks, asks):  # the busy one (4000 tokens) runs all along
        with s, s.makefile("rb") as f:
            msgs = [json.loads(line) for line in f]
        streamed = [m["token"] for m in msgs if "token" in m]
        done = msgs[-1]
        assert done.get("done") and done["batched"] == 3, msgs[-1]
        assert streamed == done["results"][0]["output_token_ids"] == reference(image, prompt, new)
    assert proc.poll() is None, err.read_text()
    proc.kill()  # the busy request's client goes: its request is dropped
    proc.wait()
    log = pool_file(name, "server_log")
    wait_until(lambda: "went away" in log.read_text(), 10, "the server drops the request", tick=0.05)
    assert "in batches of up to 3" in log.read_text()


def test_server_with_a_draft(image, pools, tmp_path):
    """pool serve --draft (with a batch of 2): a request alone in the batch decodes from the draft's trees, with
    the in-process run's tokens; a run asking for another draft is refused, as is a missing draft image."""
    name = pools.name("spec")
    pools.start(image, name)
    assert_user_error(serve(name, "--draft", str(tmp_path / "nope.img"), check=False), "nope.img", "no such image")
    serve(name, "--draft", str(image), "--draft-tokens", "4", "--batch-size", "2", "--quiet")  # itself as draft
    srv = records.live_server(name)
    js = tmp_path / "r.json"
    for prompt in PROMPTS:
        run_launch(*attach_args(name, prompt, 24, js))
        got = json.loads(js.read_text())
        assert got["server_pid"] == srv["pid"] and got["output_token_ids"] == reference(image, prompt, 24)
        sp = got["speculative"]
        assert sp["tree_tokens"] == 4 and sp["tokens"] == 23 and sp["passes"] < 23, sp  # several tokens a pass
    assert_user_error(run_launch(*attach_args(name, PROMPTS[0], 4), "--draft", "ngram", check=False),
                      "--draft ngram", "--no-server")
    run_launch("pool", "serve", name, "--stop")
