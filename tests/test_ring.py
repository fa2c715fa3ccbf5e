"""The shared-memory ring under stress and faults, with real processes (spawn): coordinator, I/O workers, clients.

The protocol is specified in runtime/ipc/shm.py, the fault handling in runtime/pool/coordinator.py. What each test
proves:

  test_stress_random_groups_and_delays    random model shape (so every group kind has its own size), random DRAM
      tier, window, worker count, per-read delays and 16/64 KiB chunks; one or two clients consume thousands of
      slot cycles in order (holding up to W-1 slots, random pauses), after restarting their stream while READY
      events of the first one were still unread. Every slot is checked against the manifest's crc32 when it
      arrives and again when it is released (nothing writes into a READY slot), some byte for byte against
      Image.read_group; DRAM-tier slots stay READY and intact. Afterwards the counters add up exactly.
  test_worker_killed_mid_stream           a busy I/O worker is SIGKILLed twice while streaming: it is replaced (new
      pid in its row, worker_restarts), its reads are issued again, and no slot ever holds wrong bytes.
  test_generate_stream_survives_worker_kill   --mode stream generation on the CPU, with a worker SIGKILLed after
      the third token, gives exactly the tokens of --mode full.
  test_coordinator_killed                 SIGKILL of the coordinator while a client waits in wait_ready: PoolDied
      naming the pool within 10 s, the workers exit by themselves, PrivatePool.stop() removes every name.
  test_client_killed                      a client process SIGKILLed while streaming, holding READY slots and with
      a read of its window in flight (its worker SIGSTOPped until the death is noticed): its READY slots come
      back FREE at once, the one in flight once the read completes; the other client keeps streaming, and a
      new client on the dead one's index gets its full window and the right data.
  test_crc_mismatch_and_read_error        one corrupted byte: retried once, then PoolDied naming group, offset,
      image and crc32; the same client restarts a sequence without it and streams correct data. Then the image
      is truncated under the pool: a real read error (EIO), reported the same way. The pool stays up throughout.

Every test runs under the ``leftovers`` fixture: afterwards no /dev/shm name of its pools and no process it
started (children, and the workers it saw) may remain; they are removed anyway so a failure does not leak.
Coordinator and worker exit codes are checked (the coordinator's directly, the workers' through the
coordinator's log, which names every worker that exits with a non-zero code).

Random choices derive from RING_TEST_SEED (random if unset, printed by every test and in every assertion;
``-rP`` also shows each test's configuration and timings):

    RING_TEST_SEED=1234 python -m pytest -q -rP tests/test_ring.py

CPU only; 25-35 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import random
import signal
import sys
import threading
import time
import zlib
from collections import deque
from pathlib import Path

import posix_ipc
import psutil
import pytest
import torch

from model.args import ModelArgs
from model.synthetic import SyntheticCheckpoint
from runtime.format.image import Image
from runtime.format.pack import pack
from runtime.ipc.options import PoolConfig, WorkerOptions
from runtime.ipc.shm import CLIENT_FREE, POOL_RUNNING, SLOT_FREE, SLOT_QUEUED, SLOT_READY, TIER_DRAM, leftover_names
from runtime.pool.client import PoolClient, PoolDied
from runtime.pool.coordinator import PrivatePool

SEED = int(os.environ.get("RING_TEST_SEED") or random.SystemRandom().randrange(1 << 32))
WHY = f"RING_TEST_SEED={SEED}"
WAIT_S = 10.0  # the longest any single wait may take
_pool_ids = itertools.count()


def rng_for(test: str) -> random.Random:
    return random.Random(f"{SEED}:{test}")


# ---- leftovers ----------------------------------------------------------------------------------------


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:80]
    except psutil.Error:  # gone or a zombie since it was listed
        return "(exited)"


def _is_resource_tracker(p: psutil.Process) -> bool:
    try:  # multiprocessing's spawn starts one per process tree and keeps it: not the pool's
        return any("resource_tracker" in a for a in p.cmdline())
    except psutil.Error:
        return False


def _unlink_name(name: str) -> None:
    with contextlib.suppress(posix_ipc.ExistentialError):
        if name.startswith("sem."):
            posix_ipc.unlink_semaphore("/" + name[4:])
        else:
            posix_ipc.unlink_shared_memory("/" + name)


class Leftovers:
    """The pools and processes one test creates; ``finish`` says what is left and removes it."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.before = {p.pid for p in self.me.children(recursive=True)}
        self.pools: list[str] = []
        self.watched: list[psutil.Process] = []  # e.g. workers, which stop being our descendants

    def pool_name(self) -> str:
        name = f"ringtest{os.getpid()}x{next(_pool_ids)}"
        self.pools.append(name)
        return name

    def add_pool(self, name: str) -> None:
        self.pools.append(name)

    def watch(self, *pids: int) -> None:
        for pid in pids:
            with contextlib.suppress(psutil.Error, ValueError):
                if int(pid) > 0:
                    self.watched.append(psutil.Process(int(pid)))

    def processes(self) -> list[psutil.Process]:
        procs = {p.pid: p for p in self.me.children(recursive=True)
                 if p.pid not in self.before and not _is_resource_tracker(p)}
        procs.update({p.pid: p for p in self.watched})
        return [p for p in procs.values() if _alive(p)]

    def names(self) -> list[str]:
        return sorted(n for pool in self.pools for n in leftover_names(pool=pool))

    def finish(self, timeout_s: float = 8.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while (self.processes() or self.names()) and time.monotonic() < deadline:
            time.sleep(0.05)
        procs, names, problems = self.processes(), self.names(), []
        if procs:
            problems.append(f"processes left: {[(p.pid, _cmdline(p)) for p in procs]}")
        if names:
            problems.append(f"/dev/shm names left: {names}")
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        for n in names:
            _unlink_name(n)
        return problems


@pytest.fixture
def leftovers():
    print(WHY)
    lo = Leftovers()
    yield lo
    problems = lo.finish()
    assert not problems, f"{WHY}: " + "; ".join(problems)


# ---- images and pools -----------------------------------------------------------------------------------


def random_args(rng: random.Random) -> ModelArgs:
    dim = 64 * rng.randint(1, 4)
    n_heads = rng.choice([h for h in (1, 2, 4, 8) if (dim // h) % 2 == 0])
    n_kv_heads = rng.choice([k for k in (1, 2, 4, 8) if n_heads % k == 0])
    return ModelArgs(dim=dim, n_layers=rng.randint(6, 12), n_heads=n_heads, n_kv_heads=n_kv_heads,
                     vocab_size=rng.randint(256, 2000), ffn_hidden=rng.randint(64, 3 * dim),
                     tie_embeddings=rng.random() < 0.3, max_seq_len=256)


def make_image(tmp_path: Path, rng: random.Random) -> Image:
    args, dtype = random_args(rng), rng.choice(["fp32", "bf16"])
    out = tmp_path / f"model.{dtype}.img"
    pack(SyntheticCheckpoint(args, seed=rng.randrange(1 << 30)), out, dtype=dtype, quiet=True)
    image = Image.open(out)
    print(f"{WHY}: {args} {dtype}, group sizes {sorted({g.size for g in image.groups.values()})}")
    return image


def start_pool(image: Image, name: str, rng: random.Random, dram: tuple[str, ...], window: int, workers: int,
               n_clients: int = 1, max_delay_s: float = 0.002) -> PrivatePool:
    slot_bytes = max(g.size for n, g in image.groups.items() if n not in dram)
    opts = WorkerOptions(inflight=rng.randint(1, 4), chunk_bytes=rng.choice([16, 64]) << 10, max_delay_s=max_delay_s)
    cfg = PoolConfig(str(image.path), str(image.manifest_path), name, dram, window, slot_bytes, n_clients=n_clients,
                     workers=workers, worker_opts=opts, owner_pid=os.getpid())
    print(f"{WHY}: pool {name}: {len(dram)} DRAM groups, window {window}, {workers} workers, {n_clients} "
          f"client(s), {opts}")
    return PrivatePool(cfg, start_timeout_s=60)


def worker_pids(res, timeout_s: float = 30.0) -> list[int]:
    """The workers' pids once every worker has written its row."""
    deadline = time.monotonic() + timeout_s
    while not all(int(p) > 0 for p in res.workers["pid"]):
        assert time.monotonic() < deadline, f"{WHY}: workers did not start in {timeout_s} s: {res.workers}"
        time.sleep(0.01)
    return [int(p) for p in res.workers["pid"]]


def window_slots(res, pool: PrivatePool, j: int, window: int) -> list[int]:
    n_dram = int(res.header["n_slots"]) - window * pool.handle.n_clients
    return list(range(n_dram + j * window, n_dram + (j + 1) * window))


def wait_until(cond, timeout_s: float, what: str, tick=None) -> float:
    """Poll ``cond`` (calling ``tick`` in between) until true; returns the seconds it took."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"{WHY}: {what} not within {timeout_s} s"
        if tick is not None:
            tick()
        else:
            time.sleep(0.01)
    return time.monotonic() - t0


def stop_pool(pool: PrivatePool, expect_exit: int = 0) -> None:
    pool.stop()
    assert pool.proc.exitcode == expect_exit, f"{WHY}: coordinator exit code {pool.proc.exitcode}"
    assert leftover_names(pool=pool.handle.name) == [], f"{WHY}: {leftover_names(pool=pool.handle.name)}"


def pool_log(capfd) -> str:
    """The stderr of the test and of every pool process it started (they inherit its fd 2). What was captured is
    written back, so that ``-rP`` (or a failure) still shows it."""
    out, err = capfd.readouterr()
    sys.stdout.write(out)
    sys.stderr.write(err)
    return err


def check_log(err: str, killed: tuple[int, ...] = (), failures: int = 0) -> None:
    """The pool's stderr: no traceback, no worker that could not start, and the only non-zero worker exits
    are the SIGKILLs the test sent (the coordinator logs every worker exit it sees, during the run and at
    shutdown)."""
    assert "Traceback" not in err and "cannot start" not in err, f"{WHY}: pool log:\n{err}"
    exits = [line for line in err.splitlines() if "exited with" in line]
    expected = [f"(pid {pid}) exited with -{int(signal.SIGKILL)}" for pid in killed]
    assert len(exits) == len(killed) and all(any(e in line for line in exits) for e in expected), \
        f"{WHY}: worker exits {exits}, expected {expected}\n{err}"
    assert err.count("read failed twice") == failures, f"{WHY}: pool log:\n{err}"


# ---- consuming a stream -----------------------------------------------------------------------------


class Consumer:
    """Consumes one client's cyclic sequence in order and checks every slot it gets against the image.

    Holds up to ``hold_max`` (< window) slots at a time, releasing the oldest first, and re-checks a held slot
    when it releases it; pauses now and then.
    """

    def __init__(self, client: PoolClient, image: Image, seq: list[int], rng: random.Random, hold_max: int = 0,
                 pause_p: float = 0.05, full_every: int = 61) -> None:
        self.c, self.image, self.seq, self.rng = client, image, list(seq), rng
        self.hold_max, self.pause_p, self.full_every = hold_max, pause_p, full_every
        self.names = list(image.groups)
        self.pos = 0  # next sequence position to consume
        self.held: deque[tuple[int, int, int, int]] = deque()  # (slot, seq, pos, group)
        self.file_bytes: dict[str, bytes] = {}

    def start(self) -> Consumer:
        self.c.start(self.seq, cyclic=True)
        return self

    def check(self, slot: int, sq: int, pos: int, g: int, again: bool = False) -> None:
        r, name = self.c.res, self.names[g]
        spec = self.image.groups[name]
        where = f"{WHY}: client {self.c.j}, position {pos} ({name}), slot {slot}{' on release' if again else ''}"
        row = r.slots[slot]
        got = (int(row["state"]), int(row["owner"]), int(row["group"]), int(row["seq"]))
        assert got == (SLOT_READY, self.c.j, g, sq), f"{where}: (state, owner, group, seq) {got}"
        crc = zlib.crc32(r.slot_view(slot, spec.size))
        assert crc == spec.crc32, f"{where}: crc32 {crc:#010x}, manifest says {spec.crc32:#010x}"
        if not again and self.full_every and pos % self.full_every == 0:
            if name not in self.file_bytes:
                self.file_bytes[name] = bytes(self.image.read_group(name))
            assert bytes(r.slot_view(slot, spec.size)) == self.file_bytes[name], f"{where}: bytes differ"

    def step(self) -> None:
        pos, g = self.pos, self.seq[self.pos % len(self.seq)]
        slot, sq = self.c.wait_ready(pos, WAIT_S)
        self.check(slot, sq, pos, g)
        self.held.append((slot, sq, pos, g))
        self.pos += 1
        keep = self.rng.randint(0, self.hold_max)
        while len(self.held) > keep:
            self.release_one()
        if self.rng.random() < self.pause_p:
            time.sleep(self.rng.uniform(0, 0.003))

    def release_one(self) -> None:
        slot, sq, pos, g = self.held.popleft()
        if pos != self.pos - 1:
            self.check(slot, sq, pos, g, again=True)
        self.c.release(slot, sq)

    def release_all(self) -> None:
        while self.held:
            self.release_one()

    def fill_window(self, window: int) -> None:
        """Release everything, then take (and hold) the next ``window`` positions: the client's whole window is
        READY and no read of it can be in flight (no free slot to read into)."""
        self.release_all()
        for _ in range(window):
            pos, g = self.pos, self.seq[self.pos % len(self.seq)]
            slot, sq = self.c.wait_ready(pos, WAIT_S)
            self.check(slot, sq, pos, g)
            self.held.append((slot, sq, pos, g))
            self.pos += 1


def check_dram_tier(res, image: Image, dram: tuple[str, ...]) -> None:
    names = list(image.groups)
    for name in dram:
        g = names.index(name)
        slot = int(res.groups[g]["slot"])
        spec = image.groups[name]
        assert slot >= 0 and int(res.groups[g]["tier"]) == TIER_DRAM, f"{WHY}: {name}: {res.groups[g]}"
        assert int(res.slots[slot]["state"]) == SLOT_READY, f"{WHY}: DRAM slot of {name}: {res.slots[slot]}"
        crc = zlib.crc32(res.slot_view(slot, spec.size))
        assert crc == spec.crc32, f"{WHY}: DRAM slot of {name}: crc32 {crc:#010x}, manifest {spec.crc32:#010x}"


def attach(pool: PrivatePool, index: int = 0) -> PoolClient:
    client = PoolClient(pool.handle, index)
    client.wait_running(60)
    return client


# ---- 1. stress ------------------------------------------------------------------------------------------


def test_stress_random_groups_and_delays(tmp_path, leftovers, capfd):
    rng = rng_for("stress")
    image = make_image(tmp_path, rng)
    names = list(image.groups)
    dram = tuple(n for n in names if rng.random() < 0.3)[:len(names) - 4]
    streamed = [i for i, n in enumerate(names) if n not in dram]
    window, workers, n_clients = rng.randint(2, 5), rng.randint(2, 4), rng.randint(1, 2)
    pool = start_pool(image, leftovers.pool_name(), rng, dram, window, workers, n_clients=n_clients,
                      max_delay_s=rng.uniform(0.0005, 0.003))
    clients: list[PoolClient] = []
    try:
        clients = [attach(pool, j) for j in range(n_clients)]
        res = clients[0].res
        leftovers.watch(*worker_pids(res))
        check_dram_tier(res, image, dram)
        seqs = [streamed] + [[rng.choice(streamed) for _ in range(rng.randint(3, 2 * len(streamed)))]
                             for _ in range(n_clients - 1)]
        # A restart: each client starts another sequence while READY events of its first one are still unread;
        # none of them may be taken for a position of the new sequence (client 0's differs at every position).
        for c, s in zip(clients, seqs):
            c.start(s[1:] + s[:1], cyclic=True)
        wait_until(lambda: all(int(res.slots[s]["state"]) == SLOT_READY
                               for j in range(n_clients) for s in window_slots(res, pool, j, window)), WAIT_S,
                   "the first sequences fill their windows")
        for c in clients:
            c.stop_stream()
        consumers = [Consumer(c, image, s, rng, hold_max=rng.randint(0, window - 1)).start()
                     for c, s in zip(clients, seqs)]
        # a count, not a rate: at least min_cycles however busy the machine is (up to target within budget_s);
        # only a ring that stops cycling for stall_s fails
        t0, target, min_cycles, budget_s, stall_s = time.monotonic(), 4000, 2000, 20.0, 300.0
        total = 0
        while total < target and (total < min_cycles or time.monotonic() - t0 < budget_s) \
                and time.monotonic() - t0 < stall_s:
            rng.choice(consumers).step()
            total = sum(c.pos for c in consumers)
            if total % 256 == 0:
                check_dram_tier(res, image, dram)
        dt = time.monotonic() - t0
        print(f"{WHY}: {total} slot cycles in {dt:.1f} s ({[c.pos for c in consumers]} per client)")
        assert total >= min_cycles, f"{WHY}: only {total} slot cycles in {dt:.1f} s"
        # Quiescent: each client holds its whole window, so no read is in flight and the counters add up exactly.
        for c in consumers:
            c.fill_window(window)
        total = sum(c.pos for c in consumers)
        wait_until(lambda: int(res.workers["inflight"].sum()) == 0, WAIT_S, "no read in flight")
        check_dram_tier(res, image, dram)
        hd, groups, rows = res.header, res.groups, res.workers
        assert (int(hd["retries"]), int(hd["errors"]), int(hd["worker_restarts"])) == (0, 0, 0), f"{WHY}: {hd}"
        expected = {g: 0 for g in streamed}
        for c in consumers:
            for p in range(c.pos):  # every position consumed, each read exactly once
                expected[c.seq[p % len(c.seq)]] += 1
        for c in consumers:  # the first sequences: one window each
            s = c.seq[1:] + c.seq[:1]
            for p in range(window):
                expected[s[p % len(s)]] += 1
        for g, name in enumerate(names):
            want = 1 if name in dram else expected[g]
            assert int(groups[g]["reads"]) == want, f"{WHY}: {name} read {int(groups[g]['reads'])} times, not {want}"
        sizes = [image.groups[n].size for n in names]
        assert sum(int(groups[g]["reads"]) for g in streamed) == total + n_clients * window, WHY
        assert int(hd["reads"]) == int(groups["reads"].sum()), f"{WHY}: {hd} {groups}"
        assert int(hd["bytes_dram"]) == sum(image.groups[n].size for n in dram), f"{WHY}: {hd}"
        assert int(hd["bytes_stream"]) == sum(int(groups[g]["reads"]) * sizes[g] for g in streamed), f"{WHY}: {hd}"
        assert int(rows["bytes_read"].sum()) == int(hd["bytes_dram"]) + int(hd["bytes_stream"]), f"{WHY}: {rows}"
        assert int(rows["reads"].sum()) == int(hd["reads"]) and int(rows["errors"].sum()) == 0, f"{WHY}: {rows}"
    finally:
        for c in clients:
            c.close()
        stop_pool(pool)
    check_log(pool_log(capfd))


# ---- 2. a worker killed -------------------------------------------------------------------------------------


def test_worker_killed_mid_stream(tmp_path, leftovers, capfd):
    rng = rng_for("worker-kill")
    image = make_image(tmp_path, rng)
    names = list(image.groups)
    dram = ("tok_embeddings",) if rng.random() < 0.5 else ()
    streamed = [i for i, n in enumerate(names) if n not in dram]
    window, workers = rng.randint(3, 5), rng.randint(2, 3)
    pool = start_pool(image, leftovers.pool_name(), rng, dram, window, workers, max_delay_s=0.003)
    client = None
    killed: list[int] = []
    try:
        client = attach(pool)
        res = client.res
        leftovers.watch(*worker_pids(res))
        cons = Consumer(client, image, streamed, rng, hold_max=rng.randint(0, window - 1)).start()
        for _ in range(2):
            for _ in range(rng.randint(100, 300)):
                cons.step()
            busy: list[int] = []
            for _ in range(2000):  # kill one that has reads in flight (any one, should none ever be seen busy)
                busy = [i for i in range(workers) if int(res.workers[i]["inflight"]) > 0]
                if busy:
                    break
                cons.step()
            i = rng.choice(busy or list(range(workers)))
            old, reads_before = int(res.workers[i]["pid"]), int(res.workers[i]["reads"])
            os.kill(old, signal.SIGKILL)
            killed.append(old)
            dt = wait_until(lambda i=i, old=old: int(res.header["worker_restarts"]) >= len(killed)
                            and int(res.workers[i]["pid"]) not in (0, old), WAIT_S, f"worker {i} replaced",
                            tick=cons.step)
            new = int(res.workers[i]["pid"])
            leftovers.watch(new)
            assert psutil.pid_exists(new) and not _alive_pid(old), f"{WHY}: worker {i}: old {old}, new {new}"
            print(f"{WHY}: killed worker {i} (pid {old}); replaced by pid {new} within {dt:.2f} s")
            wait_until(lambda i=i, n=reads_before: int(res.workers[i]["reads"]) > n + 5, WAIT_S,
                       f"the new worker {i} reads", tick=cons.step)
        for _ in range(2 * len(streamed)):
            cons.step()
        cons.fill_window(window)
        # Each position completes once, whatever died on the way; a killed worker may have counted bytes it
        # never reported.
        assert sum(int(res.groups[g]["reads"]) for g in streamed) == cons.pos, f"{WHY}: {res.groups}"
        assert int(res.header["worker_restarts"]) == 2 and int(res.header["errors"]) == 0, f"{WHY}: {res.header}"
        assert int(res.workers["bytes_read"].sum()) >= int(res.header["bytes_dram"] + res.header["bytes_stream"])
    finally:
        if client is not None:
            client.close()
        stop_pool(pool)
    check_log(pool_log(capfd), killed=tuple(killed))


def _alive_pid(pid: int) -> bool:
    try:
        return _alive(psutil.Process(pid))
    except psutil.Error:
        return False


def test_generate_stream_survives_worker_kill(tmp_path, leftovers, capfd):
    from runtime.engine.config import EngineConfig
    from runtime.engine.generate import Generator, SamplingConfig
    from runtime.engine.source import open_source

    rng = rng_for("generate")
    image = make_image(tmp_path, rng)
    prompt = [rng.randrange(image.args.vocab_size) for _ in range(rng.randint(3, 12))]
    sampling = SamplingConfig(max_new_tokens=24)
    with open_source(image, EngineConfig.of(mode="full", quiet=True), torch.device("cpu")) as (source, _, _):
        want = Generator(source, len(prompt) + 24).generate(prompt, sampling).output_token_ids
    cfg = EngineConfig.of(mode="stream", prefetch_distance=2, workers=2, quiet=True)
    killed: list[int] = []
    with open_source(image, cfg, torch.device("cpu")) as (source, plan, handle):
        leftovers.add_pool(handle.name)
        res = source.res
        leftovers.watch(*worker_pids(res), int(res.header["coord_pid"]))
        go, stop = threading.Event(), threading.Event()

        def killer() -> None:  # SIGKILL a worker shortly after the third token
            if go.wait(60) and not stop.is_set():
                time.sleep(rng.uniform(0, 0.02))
                busy = [i for i in range(2) if int(res.workers[i]["inflight"]) > 0] or [0, 1]
                pid = int(res.workers[rng.choice(busy)]["pid"])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        n_tokens = [0]

        def on_token(_tok: int) -> None:
            n_tokens[0] += 1
            if n_tokens[0] == 3:
                go.set()

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            got = Generator(source, len(prompt) + 24).generate(prompt, sampling, on_token=on_token).output_token_ids
        finally:
            stop.set()
            go.set()
            thread.join(WAIT_S)
        assert killed, f"{WHY}: the killer thread did not run"
        wait_until(lambda: int(res.header["worker_restarts"]) >= 1, WAIT_S, "the killed worker replaced")
        leftovers.watch(*res.workers["pid"])
        print(f"{WHY}: plan stream {len(plan.stream)} groups, window {plan.window_slots}; killed {killed}; "
              f"worker rows {res.workers}")
    assert got == want, f"{WHY}: prompt {prompt}: --mode stream {got} != --mode full {want}"
    check_log(pool_log(capfd), killed=tuple(killed))


# ---- 3. the coordinator killed ------------------------------------------------------------------------------


def test_coordinator_killed(tmp_path, leftovers, capfd):
    rng = rng_for("coordinator-kill")
    image = make_image(tmp_path, rng)
    names = list(image.groups)
    window, workers = rng.randint(2, 4), rng.randint(2, 4)
    pool = start_pool(image, leftovers.pool_name(), rng, ("tok_embeddings",), window, workers)
    client = None
    try:
        client = attach(pool)
        res = client.res
        pids = worker_pids(res)
        leftovers.watch(*pids, pool.proc.pid)
        assert int(res.header["coord_pid"]) == pool.proc.pid, WHY
        cons = Consumer(client, image, list(range(1, len(names))), rng).start()
        for _ in range(rng.randint(20, 60)):
            cons.step()
        for _ in range(window):  # hold the whole window: the next position can only come from a live pool
            slot, sq = client.wait_ready(cons.pos, WAIT_S)
            cons.pos += 1
        killed_at: list[float] = []

        def killer() -> None:
            time.sleep(rng.uniform(0.2, 0.5))
            killed_at.append(time.monotonic())
            os.kill(pool.proc.pid, signal.SIGKILL)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        with pytest.raises(PoolDied) as info:
            client.wait_ready(cons.pos, 30)
        thread.join(WAIT_S)
        dt = time.monotonic() - killed_at[0]
        print(f"{WHY}: PoolDied {dt:.2f} s after the SIGKILL: {info.value}")
        assert dt < 10 and repr(pool.handle.name) in str(info.value), f"{WHY}: {dt:.2f} s: {info.value}"
        workers_s = wait_until(lambda: not any(_alive_pid(p) for p in pids), 5.0, "the workers exit by themselves")
        print(f"{WHY}: workers gone {workers_s:.2f} s after PoolDied")
    finally:
        if client is not None:
            client.close()
        stop_pool(pool, expect_exit=-int(signal.SIGKILL))
    err = pool_log(capfd)
    assert err.count("coordinator is gone; exiting") == workers, f"{WHY}: pool log:\n{err}"
    assert "Traceback" not in err, f"{WHY}: pool log:\n{err}"


# ---- 4. a client killed ---------------------------------------------------------------------------------


def _client_process(handle, index: int, seq: list[int], sizes: list[int], crcs: list[int], hold: int,
                    progress) -> None:
    """Spawn target: stream ``seq`` as client ``index``, holding ``hold`` slots, until SIGKILLed (60 s at most)."""
    client = PoolClient(handle, index)
    client.wait_running(60)
    client.start(seq, cyclic=True)
    held: deque[tuple[int, int]] = deque()
    deadline = time.monotonic() + 60
    pos = 0
    while time.monotonic() < deadline:
        slot, sq = client.wait_ready(pos, WAIT_S)
        g = seq[pos % len(seq)]
        if zlib.crc32(client.res.slot_view(slot, sizes[g])) != crcs[g]:
            progress.value = -1 - pos
            os._exit(4)
        held.append((slot, sq))
        while len(held) > hold:
            client.release(*held.popleft())
        pos += 1
        progress.value = pos
    os._exit(3)


def test_client_killed(tmp_path, leftovers, capfd):
    rng = rng_for("client-kill")
    image = make_image(tmp_path, rng)
    names = list(image.groups)
    dram = ("tok_embeddings",)
    streamed = list(range(1, len(names)))
    window, workers = rng.randint(2, 4), rng.randint(2, 3)
    pool = start_pool(image, leftovers.pool_name(), rng, dram, window, workers, n_clients=2, max_delay_s=0.004)
    ctx = mp.get_context("spawn")
    client, child, stopped = None, None, []
    try:
        client = attach(pool, 0)
        res = client.res
        pids = worker_pids(res)
        leftovers.watch(*pids)
        cons = Consumer(client, image, streamed, rng, hold_max=rng.randint(0, window - 1)).start()
        seq1 = rng.sample(streamed, len(streamed))
        progress = ctx.Value("q", 0, lock=False)
        child = ctx.Process(target=_client_process, name="ringtest-client", daemon=True,
                            args=(pool.handle, 1, seq1, [g.size for g in image.groups.values()],
                                  [g.crc32 for g in image.groups.values()], window - 1, progress))
        child.start()
        at = rng.randint(30, 120)
        wait_until(lambda: progress.value >= at or progress.value < 0 or child.exitcode is not None, 60,
                   f"the client process consumes {at} positions", tick=cons.step)
        assert progress.value >= at, f"{WHY}: client process: progress {progress.value}, exit {child.exitcode}"
        mine = window_slots(res, pool, 1, window)

        # Freeze the worker that reads for client 1, so that a read of its window is certainly in flight when the
        # coordinator notices the death (a slot orphaned that way must come back once the read completes).
        def frozen_read() -> int | None:
            for s in mine:
                if int(res.slots[s]["state"]) == SLOT_QUEUED and int(res.slots[s]["owner"]) == 1:
                    pid = pids[int(res.slots[s]["worker"])] if int(res.slots[s]["worker"]) >= 0 else 0
                    if pid and pid not in stopped:
                        os.kill(pid, signal.SIGSTOP)
                        stopped.append(pid)
                        time.sleep(0.1)  # a completion posted just before the stop is processed by now
                        if int(res.slots[s]["state"]) == SLOT_QUEUED:
                            return s
                        os.kill(pid, signal.SIGCONT)
                        stopped.remove(pid)
            return None

        frozen: list[int] = []
        wait_until(lambda: frozen.append(frozen_read()) or frozen[-1] is not None, WAIT_S,
                   "a read of client 1 in flight", tick=lambda: time.sleep(0.0005))
        slot_in_flight = frozen[-1]
        os.kill(child.pid, signal.SIGKILL)
        at_kill = [(int(res.slots[s]["state"]), int(res.slots[s]["owner"])) for s in mine]
        child.join(WAIT_S)
        assert child.exitcode == -int(signal.SIGKILL), f"{WHY}: client process exit code {child.exitcode}"
        assert any(st == SLOT_READY and o == 1 for st, o in at_kill), f"{WHY}: at the kill {at_kill}"
        noticed = wait_until(lambda: int(res.clients[1]["state"]) == CLIENT_FREE, 3.0, "client 1 detached")
        for s in mine:
            row = res.slots[s]
            want = SLOT_QUEUED if s == slot_in_flight else SLOT_FREE
            assert (int(row["state"]), int(row["owner"])) == (want, -1), f"{WHY}: slot {s} after the death: {row}"
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped.clear()

        def freed() -> bool:
            return all(int(res.slots[s]["state"]) == SLOT_FREE and int(res.slots[s]["owner"]) == -1 for s in mine)

        dt = wait_until(freed, 3.0, f"client 1's window slots freed (at the kill: {at_kill})", tick=cons.step)
        print(f"{WHY}: client process killed after {progress.value} positions, window (state, owner) {at_kill} "
              f"(READY={SLOT_READY}, QUEUED={SLOT_QUEUED}); death noticed in {noticed:.2f} s; the read in flight "
              f"freed its slot {dt:.2f} s after the worker resumed")
        for _ in range(len(streamed) + window):  # client 0 did not notice
            cons.step()
        # A new client on the dead one's index: full window, right data (no stale event of the dead one).
        again = PoolClient(pool.handle, 1)
        try:
            other = Consumer(again, image, seq1, rng, hold_max=window - 1).start()
            for _ in range(2 * len(seq1) + window):
                other.step()
                cons.step()
            other.release_all()
        finally:
            again.close()
        cons.release_all()
        check_dram_tier(res, image, dram)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        if child is not None and child.exitcode is None:
            child.kill()
            child.join(WAIT_S)
        if client is not None:
            client.close()
        stop_pool(pool)
    check_log(pool_log(capfd))


# ---- 5. read errors ----------------------------------------------------------------------------------------


def stream_until_failure(cons: Consumer, limit: int) -> tuple[int, PoolDied, float]:
    t0 = time.monotonic()
    for _ in range(limit):
        try:
            cons.step()
        except PoolDied as e:
            return cons.pos, e, time.monotonic() - t0
    raise AssertionError(f"{WHY}: no PoolDied within {limit} positions")


def test_crc_mismatch_and_read_error(tmp_path, leftovers, capfd):
    rng = rng_for("read-error")
    image = make_image(tmp_path, rng)
    names = list(image.groups)
    dram = ("tok_embeddings",)
    streamed = list(range(1, len(names)))
    window, workers = rng.randint(2, 4), rng.randint(2, 3)
    # The corrupted group sits at least a window into the sequence: its slot has held other groups before.
    k = rng.randint(window, len(streamed) - 2)
    bad = streamed[k]
    spec = image.groups[names[bad]]
    where = spec.offset + rng.randrange(spec.size)
    with open(image.path, "r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    print(f"{WHY}: flipped byte {where} of {names[bad]} (offset {spec.offset}, {spec.size} bytes)")
    pool = start_pool(image, leftovers.pool_name(), rng, dram, window, workers, n_clients=2)
    clients: list[PoolClient] = []
    try:
        clients.append(attach(pool, 0))
        res = clients[0].res
        leftovers.watch(*worker_pids(res))
        cons = Consumer(clients[0], image, streamed, rng).start()
        pos, err, dt = stream_until_failure(cons, len(streamed))
        msg = str(err)
        print(f"{WHY}: PoolDied at position {pos} after {dt:.2f} s: {msg}")
        assert k - window + 1 <= pos <= k, f"{WHY}: failed waiting for position {pos}, the bad group is at {k}"
        for part in (repr(pool.handle.name), names[bad], f"offset {spec.offset}", str(image.path), "crc32"):
            assert part in msg, f"{WHY}: {part!r} not in {msg!r}"
        hd = res.header
        assert (int(hd["retries"]), int(hd["errors"]), int(hd["state"])) == (1, 1, POOL_RUNNING), f"{WHY}: {hd}"

        # The same client, a sequence without the bad group (nor head, cut below): correct data, nothing of the
        # failed sequence leaks in.
        clients[0].stop_stream()
        head_id = names.index("head")
        cons = Consumer(clients[0], image, [g for g in streamed if g not in (bad, head_id)], rng,
                        hold_max=rng.randint(0, window - 1)).start()
        for _ in range(2 * len(cons.seq)):
            cons.step()

        # A real read error: cut the image under the running pool so that "head" ends past end of file.
        head = image.groups["head"]
        cut = head.offset + head.size // 2 // 4096 * 4096
        os.truncate(image.path, cut)
        clients.append(attach(pool, 1))
        seq1 = rng.sample(cons.seq, 3) + [head_id]
        pos, err, dt = stream_until_failure(Consumer(clients[1], image, seq1, rng).start(), len(seq1) + 1)
        msg = str(err)
        print(f"{WHY}: truncated at {cut}; PoolDied at position {pos} after {dt:.2f} s: {msg}")
        for part in (repr(pool.handle.name), "head", f"offset {head.offset}", str(image.path),
                     os.strerror(5)):
            assert part in msg, f"{WHY}: {part!r} not in {msg!r}"
        assert (int(hd["retries"]), int(hd["errors"]), int(hd["state"])) == (2, 2, POOL_RUNNING), f"{WHY}: {hd}"

        for _ in range(len(cons.seq) + window):  # client 0 still streams
            cons.step()
        cons.release_all()
    finally:
        for c in clients:
            c.close()
        stop_pool(pool)
    err = pool_log(capfd)
    check_log(err, failures=2)
    assert err.count("retrying once") == 2, f"{WHY}: pool log:\n{err}"
