"""Tensor-parallel runs: one process per device, over one pool (issue 21; the split: model/shards.py).

``run_ranks`` (in the launching process) checks the image and the split, plans one rank's tiers
(runtime/engine/tensor_parallel.py ``rank_image``: its shards' bytes, its KV heads), starts one private pool
for all ranks (the DRAM tier holds whole groups once; each rank is one of its clients with its own window
slots) or leaves each rank to attach to the daemon pool ``--attach`` names, then starts N rank processes with
the spawn start method, each given a plain ``RankJob`` (names, sizes, configs, the pool's handle).

Each rank (``rank_main``) joins a torch.distributed group (gloo on the CPU, NCCL on CUDA; MASTER at
127.0.0.1 on a free port; every collective times out after ``RankJob.timeout_s``), attaches to the pool as
its client ``rank`` (cudaHostRegister of the ring for its own device), builds its StreamedWeights with its
``RankShard`` (its own GPU tier, staging buffers and copy stream) and a KV cache of its KV heads, and runs
the same Generator as a single process with the collectives of ``Collectives``. Rank 0 reports each step's
tokens and the results through its pipe.

Failure: the launching process watches every rank's sentinel and pipe (``_Monitor``). A rank that dies (a
signal, an exit without its result) or reports an error fails the run on every rank at once: the others are
terminated (SIGTERM, then SIGKILL after a grace period), the private pool is stopped (it unlinks the ring and
semaphores), and ``RankFailed`` names the rank, its pid and how it ended. A rank whose launcher dies gets
SIGKILL from the kernel (PR_SET_PDEATHSIG); its pool's coordinator exits when its owner is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from types import MappingProxyType

from model.errors import ConfigError, UserError
from runtime.engine.batching import default_dram_bytes
from runtime.engine.config import EngineConfig, SamplingConfig
from runtime.engine.placement import Plan
from runtime.engine.source import GB, gpu_tier_in_dram, plan_for_pool, planned
from runtime.format.image import ALIGN, Image
from runtime.ipc.options import PoolConfig, WorkerOptions
from runtime.ipc.procs import stop_processes
from runtime.ipc.shm import PoolHandle
from runtime.pool.coordinator import PrivatePool, check_worker_count

_POOLS = itertools.count()
PR_SET_PDEATHSIG = 1


class RankFailed(UserError):
    """A tensor-parallel rank died or failed: the run was stopped on every rank."""


@dataclass(frozen=True)
class RankJob:
    """Everything one rank process is given (plain data, spawn-safe)."""

    rank: int
    n: int
    port: int
    device: str  # "cpu" or "cuda:I"
    image: str
    manifest: str
    engine: EngineConfig
    sampling: SamplingConfig
    prompts: tuple[tuple[int, ...], ...]
    batch: int
    max_len: int
    stop_ids: frozenset[int]
    pool: PoolHandle | None = None  # the private pool (None: --mode full, or --attach)
    plan_fields: dict | None = None  # the Plan's fields (its mappings dicts: a mappingproxy does not pickle)
    kv_offload: bool = False
    timeout_s: float = 300.0  # every collective's limit (a live rank that stops answering)
    logits: bool = False  # also the first prompt's prefill logits (rank 0's, as numpy: tests)

    @property
    def plan(self) -> Plan | None:
        return None if self.plan_fields is None else Plan(**self.plan_fields)

    @property
    def backend(self) -> str:
        return "nccl" if self.device.startswith("cuda") else "gloo"


# ---- the launching process ---------------------------------------------------------------------------------

def rank_devices(device: str, n: int, devices: str | None) -> list[str]:
    """Each rank's device: --devices I,J,... (CUDA indices, one per rank), else cuda:0..N-1, or cpu for all."""
    if devices is None:
        return [f"cuda:{i}" for i in range(n)] if device == "cuda" else ["cpu"] * n
    if device != "cuda":
        raise ConfigError("--devices picks GPUs: it needs --device cuda")
    try:
        idx = [int(x) for x in devices.split(",")]
    except ValueError:
        raise ConfigError(f"--devices {devices!r}: comma-separated GPU indices, e.g. 0,1") from None
    if len(idx) != n or len(set(idx)) != n or min(idx) < 0:
        raise ConfigError(f"--devices {devices}: give {n} different GPU indices, one per --tensor-parallel rank")
    return [f"cuda:{i}" for i in idx]


def check_devices(devs: list[str]) -> None:
    if not devs[0].startswith("cuda"):
        return
    import torch

    have = torch.cuda.device_count()
    bad = [d for d in devs if int(d.split(":")[1]) >= have]
    if bad:
        raise ConfigError(f"--tensor-parallel {len(devs)}: device {bad[0]} does not exist (this machine has {have} "
                          f"CUDA devices)")


def plan_ranks(image: Image, cfg: EngineConfig, device: str, n: int, batch: int, max_len: int) -> tuple[Plan, bool]:
    """One rank's plan (every rank's: their shards are the same size) and its KV decision. ``--gpu-mem-gb`` is
    each GPU's. The DRAM tier is the pool's, which holds whole groups: the rank plans with the DRAM budget
    divided by the share of each group it moves (1/N of a packed image's, all of a plain image's)."""
    from runtime.engine.tensor_parallel import rank_image

    view = rank_image(image, n)
    moved = sum(g.size for g in view.groups.values()) / sum(g.size for g in image.groups.values())
    dram = int(cfg.placement.dram_gb * GB) if cfg.placement.dram_gb else default_dram_bytes()
    rank_cfg = cfg.replace(dram_gb=dram * moved / GB) if cfg.placement.mode != "full" else cfg
    rank_cfg = rank_cfg.replace(expert_prefetch=0)  # a rank has no prefetch guess (streamed.py next_router)
    return planned(view, rank_cfg, device.split(":")[0], batch, max_len, cfg.prefill.chunk, False)


def describe(plan: Plan | None, image: Image, n: int) -> str:
    """The plan's lines for a tensor-parallel run: what each rank moves, and the pool's whole-group tiers."""
    from runtime.engine.tensor_parallel import RankShard

    sh = RankShard(image, 0, n)
    how = ("its own shard of each group (a format-3 image)" if sh.packed else
           f"whole groups, sliced on the host (a plain image: {n} x the bytes a --tensor-parallel {n} pack moves)")
    head = f"tensor parallel: {n} ranks, each copies {how}; per rank:"
    if plan is None:
        return head + " every shard on its device (--mode full)"
    tail = (f"\n  the pool holds whole groups once for all ranks; each rank reads its streamed groups through its own "
            f"window ({n} x the disk bytes)" if plan.stream else "\n  the pool holds whole groups once for all ranks")
    return head + "\n" + plan.describe() + tail


def _rank_pool(image: Image, cfg: EngineConfig, plan: Plan, n: int) -> PrivatePool:
    """One private pool for N clients: the plan's DRAM tier as whole groups, W window slots per rank."""
    opts = WorkerOptions(direct=cfg.pool.direct_io, chunk_bytes=cfg.pool.staging_mb << 20)
    check_worker_count(cfg.pool.workers, str(image.path), opts.inflight)
    mirror = gpu_tier_in_dram(plan)
    through = plan.cyclic + (() if mirror else plan.gpu)
    window = plan.window_slots if mirror else max(plan.window_slots, min(2, len(plan.gpu)))
    slot_bytes = max([image.groups[g].size for g in through], default=ALIGN)
    dram_groups = tuple(dict.fromkeys(plan.host + (plan.gpu if mirror else ()) + plan.dram))
    name = f"run{os.getpid()}-tp{next(_POOLS)}"
    return PrivatePool(PoolConfig(str(image.path), str(image.manifest_path), name, dram_groups, window, slot_bytes,
                                  n_clients=n, workers=cfg.pool.workers, worker_opts=opts, owner_pid=os.getpid(),
                                  quiet=cfg.quiet, demand_slots=plan.demand_slots,
                                  demand_slot_bytes=plan.demand_slot_bytes))


def _fields(plan: Plan | None) -> dict | None:
    if plan is None:
        return None
    values = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    return {k: dict(v) if isinstance(v, MappingProxyType) else v for k, v in values.items()}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(image: Image, cfg: EngineConfig, sampling: SamplingConfig, prompts, batch: int, max_len: int,
              stop_ids: frozenset[int], n: int, device: str, devices: str | None = None, on_step=None,
              timeout_s: float = 300.0, on_start=None, logits: bool = False) -> tuple[list[dict], Plan | None, dict]:
    """Generate ``prompts`` (``batch`` at a time) on ``n`` ranks -> (each result as a dict of
    runtime.engine.generate.GenerationResult's fields, rank 0's plan, the run's facts). ``on_step``: each step's
    tokens, as Generator.generate_batch gives them; ``on_start``: the ``_Monitor`` once the rank processes have
    started (tests); ``logits``: the facts get the first prompt's prefill logits (S, vocab) as numpy."""
    from runtime.engine.tensor_parallel import check_image

    check_image(image, n)
    devs = rank_devices(device, n, devices)
    check_devices(devs)
    if cfg.trace is not None:
        raise ConfigError("--trace does not record tensor-parallel runs yet: leave out --trace or --tensor-parallel")
    if cfg.speculative.draft is not None:
        raise ConfigError("--draft with --tensor-parallel is not supported yet")
    plan, offload, pool = None, False, None
    if cfg.placement.mode != "full" and cfg.attach is None:
        plan, offload = plan_ranks(image, cfg, devs[0], n, batch, max_len)
    if not cfg.quiet:
        print(describe(plan, image, n), file=sys.stderr)
    t0 = time.perf_counter()
    try:
        if plan is not None:
            pool = _rank_pool(image, cfg, plan, n)
        port = free_port()
        jobs = [RankJob(r, n, port, devs[r], str(image.path), str(image.manifest_path), cfg, sampling,
                        tuple(tuple(p) for p in prompts), batch, max_len, frozenset(stop_ids),
                        pool.handle if pool else None, _fields(plan), offload, timeout_s, logits) for r in range(n)]
        with _Monitor(jobs, pool) as mon:
            if on_start is not None:
                on_start(mon)
            results, facts = mon.wait(on_step)
    finally:
        if pool is not None:
            pool.stop()
    facts["wall_ms"] = (time.perf_counter() - t0) * 1e3
    return results, plan, facts


class _Monitor:
    """The rank processes, their pipes and sentinels; ``wait`` until every rank is done or one fails."""

    def __init__(self, jobs: list[RankJob], pool: PrivatePool | None) -> None:
        ctx = mp.get_context("spawn")
        self.pool, self.procs, self.conns = pool, [], []
        for job in jobs:
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=rank_main, args=(job, send), name=f"llms-rank{job.rank}", daemon=True)
            p.start()
            send.close()
            self.procs.append(p)
            self.conns.append(recv)

    def __enter__(self) -> _Monitor:
        return self

    def __exit__(self, *exc) -> None:
        stop_processes(self.procs, grace_s=0.0 if exc[0] else 5.0)

    def wait(self, on_step) -> tuple[list[dict], dict]:
        done: dict[int, tuple] = {}
        live = dict(enumerate(self.conns))
        while len(done) < len(self.procs):
            sentinels = {p.sentinel: r for r, p in enumerate(self.procs) if r not in done}
            ready = mpc.wait(list(live.values()) + list(sentinels), timeout=1.0)
            for r, c in list(live.items()):
                if c in ready:
                    self._receive(r, c, live, done, on_step)
            for s in ready:
                r = sentinels.get(s)
                if r is not None and r not in done:
                    if r in live and live[r].poll():
                        self._receive(r, live[r], live, done, on_step)
                    if r not in done:
                        self._fail(r, None)
            if self.pool is not None and not self.pool.proc.is_alive():
                raise RankFailed(f"the pool's coordinator (pid {self.pool.proc.pid}) died: the tensor-parallel run "
                                 f"was stopped on all {len(self.procs)} ranks")
        return done[0][1], done[0][2]

    def _receive(self, r: int, c, live: dict, done: dict, on_step) -> None:
        try:
            msg = c.recv()
        except (EOFError, OSError):
            del live[r]
            return
        if msg[0] == "step":
            if on_step is not None:
                on_step(msg[1])
        elif msg[0] == "done":
            done[r] = msg
        elif msg[0] == "error":
            self._fail(r, msg[1])

    def _fail(self, r: int, error: str | None) -> None:
        """Stop every rank; report the one that died by a signal if any did (the others' errors are then
        the lost peer's), else ``r``'s error or exit."""
        time.sleep(0.2)  # a killed peer's sentinel fires with the survivors' errors: let it show
        killed = [i for i, p in enumerate(self.procs) if p.exitcode is not None and p.exitcode < 0]
        stop_processes(self.procs, grace_s=0.0)
        n = len(self.procs)
        if killed:
            i = killed[0]
            sig = signal.Signals(-self.procs[i].exitcode).name
            raise RankFailed(f"tensor-parallel rank {i} (pid {self.procs[i].pid}) was killed by {sig}: the run was "
                             f"stopped on all {n} ranks")
        p = self.procs[r]
        how = error if error is not None else f"exited with code {p.exitcode} before its result"
        raise RankFailed(f"tensor-parallel rank {r} (pid {p.pid}) failed: {how}; the run was stopped on all {n} "
                         f"ranks")


# ---- a rank process ----------------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """SIGKILL from the kernel when the launching process goes (so no rank outlives a killed launcher)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)


def rank_main(job: RankJob, conn) -> None:
    """A rank process: join the group, open its source, generate; errors go to the launcher as one line."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's: it stops the ranks
    import datetime

    import torch
    import torch.distributed as dist

    try:
        device = torch.device(job.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(job.backend, init_method=f"tcp://127.0.0.1:{job.port}", rank=job.rank,
                                world_size=job.n, timeout=datetime.timedelta(seconds=job.timeout_s))
        results, facts = _generate(job, device, conn)
        conn.send(("done", results if job.rank == 0 else None, facts))
    except BaseException as e:  # noqa: BLE001 - everything goes to the launcher, which stops the others
        line = str(e).splitlines()[0] if str(e) else ""
        with contextlib.suppress(OSError):
            conn.send(("error", f"{type(e).__name__}: {line}", traceback.format_exc()))
        os._exit(1)  # no teardown that could wait on a lost peer; the launcher cleans up
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def _generate(job: RankJob, device, conn) -> tuple[list[dict], dict]:
    from runtime.engine.generate import generator_for
    from runtime.engine.tensor_parallel import Collectives, RankShard

    image = Image.open(job.image, job.manifest)
    shard = RankShard(image, job.rank, job.n)
    t0 = time.perf_counter()
    with _rank_source(image, shard, job, device) as source:
        load_ms = (time.perf_counter() - t0) * 1e3
        gen = generator_for(source, job.engine, job.max_len)
        gen.parallel = coll = Collectives(job.rank, job.n, image.args.vocab_size)
        results = []
        step = (lambda toks: conn.send(("step", toks))) if job.rank == 0 else None
        for i in range(0, len(job.prompts), job.batch):
            chunk = [list(p) for p in job.prompts[i:i + job.batch]]
            results += gen.generate_batch(chunk, job.sampling, job.stop_ids, on_step=step)
        out = None
        if job.logits:  # every rank takes part in the pass; rank 0 sends it (numpy: no torch shared memory)
            import torch

            ids = torch.tensor([list(job.prompts[0])], dtype=torch.long, device=device)
            out = gen.forward(ids, 0, gen.new_cache(1))[0].cpu().numpy()
    facts = {"load_ms": load_ms, "reduced_bytes": coll.reduced_bytes, "device": job.device,
             "bytes_per_pass": shard.bytes_moved(), **({"logits": out} if job.rank == 0 and out is not None else {})}
    return [dataclasses.asdict(r) for r in results], facts


@contextlib.contextmanager
def _rank_source(image: Image, shard, job: RankJob, device):
    """This rank's weight source: its shards in memory (--mode full), or its StreamedWeights as client ``rank``
    of the private pool, or as a client of the daemon pool --attach names (planned here, within what it holds)."""
    from runtime.engine.streamed import StreamedWeights
    from runtime.engine.tensor_parallel import RankWeights, rank_image
    from runtime.pool.attach import attach, release_row
    from runtime.pool.client import PoolClient

    cfg = job.engine
    if cfg.placement.mode == "full":
        yield RankWeights(image, shard, device)
        return
    att, plan, offload = None, job.plan, job.kv_offload
    if job.pool is not None:
        client = PoolClient(job.pool, job.rank)
    else:
        att = attach(cfg.attach, str(image.path))
        try:
            def fn(img, c, dev, kv, act, draft_bytes=0):
                return plan_for_pool(img, c, dev, att.record, kv, act, draft_bytes)

            plan, offload = planned(rank_image(att.image, job.n), cfg, device, job.batch, job.max_len,
                                     cfg.prefill.chunk, False, fn)
            client = PoolClient(att.handle, att.index, ring="ro")
        except BaseException:
            release_row(att)
            raise
    try:
        source = StreamedWeights(image, plan, client, device, staging=max(plan.staging_buffers, 1),
                                 kv_offload=offload, shard=shard)
        try:
            yield source
        finally:
            source.close()
    finally:
        client.close()
