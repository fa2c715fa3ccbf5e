"""From an EngineConfig to a weight source: the placement plan, a private pool or a daemon pool's attachment.

``open_source(image, cfg, device, ...)`` is a context manager that yields the weight source generation runs
on. ``--mode full`` loads every group onto the device (runtime/engine/weights.py, the reference); the other
modes plan the tiers (runtime/engine/placement.py), start a private pool (coordinator + I/O workers,
runtime/pool) sized for the plan, attach to it as its client and stop the pool on exit, also when the run
fails; with ``--attach NAME`` they attach to the daemon pool NAME instead (runtime/pool/attach.py). With
``--trace FILE`` the source is wrapped to record its computes, the pool's processes record their reads, and
FILE is written once the pool has stopped (runtime/engine/trace.py). ``start_early`` starts the private pool
before torch is imported, so the DRAM tier fills while torch and CUDA start.

Torch-free at import (the weight sources, which need torch, are imported where they are built). Runs in the
launch.py process (the client).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from model.errors import ConfigError
from model.groups import host_layer_count
from runtime.engine.batching import (
    activation_bytes,
    chunk_per_sequence,
    default_dram_bytes,
    kv_cache_bytes,
    kv_device_rows,
)
from runtime.engine.config import EngineConfig, cpu_compute_value
from runtime.engine.drafts import draft_gpu_bytes, open_draft_image
from runtime.engine.placement import (
    Budgets,
    Plan,
    cpu_candidates,
    expert_counts_path,
    guessed,
    plan_placement,
    prefetch_room,
    read_expert_counts,
    with_cpu_set,
)
from runtime.format.image import Image
from runtime.ipc.options import PoolConfig, WorkerOptions
from runtime.pool.attach import attach, release_row
from runtime.pool.client import PoolClient
from runtime.pool.coordinator import PrivatePool, check_worker_count

if TYPE_CHECKING:
    import torch

GB = 1e9
_POOL_NUMBERS = itertools.count()  # private pools of this process: run<pid>-<n>


def _kind(device) -> str:
    """"cuda" or "cpu" of a torch.device or a device name."""
    return (device if isinstance(device, str) else device.type).split(":")[0]


def check_for_image(cfg: EngineConfig, image: Image) -> None:
    """What needs the image, checked before anything starts: the I/O workers its device makes useful, and a
    --draft image (that it reads and shares the image's tokenizer)."""
    if cfg.placement.mode != "full" and cfg.attach is None:
        check_worker_count(cfg.pool.workers, str(image.path), WorkerOptions().inflight)
    if cfg.speculative.draft not in (None, "ngram"):
        open_draft_image(cfg.speculative.draft, image)


def device_kind(name: str | None) -> str:
    """"cuda" or "cpu" for --device ``name``; None: cuda where the machine has an NVIDIA device (a guess made
    before torch starts; runtime.engine.generate.pick_device decides)."""
    return name or ("cuda" if os.path.exists("/dev/nvidiactl") else "cpu")


def plan_with_kv(image: Image, cfg: EngineConfig, device, batch: int, max_len: int, plan_fn) -> tuple[Plan, bool]:
    """(plan, kv offload?) for ``cfg.kv.offload``. "auto" on CUDA plans both ways (the whole cache on the
    device, or two layers' buffers there and the cache in pinned DRAM) and takes the one that moves fewer bytes
    over the H2D link per decode step: the weights not resident, plus, offloaded, the cache of the layers read
    back (not those of ``cfg.kv.host_attention``: their decode attention runs where the cache lives). The
    device's KV displaces at most its own bytes of weights, but the GPU tier holds whole groups, so either can
    win (70B-shaped, batch 32: the cache on the device pushed the tier from 2.7 to 0.3 GB). Ties stay on the
    device. An offloaded cache must fit the available memory (pinned)."""
    kv, n = cfg.kv, image.args.n_layers
    n_host = host_layer_count(kv.host_attention, n)
    rows = kv_device_rows(batch, max_len, cfg.prefill.chunk, cfg.prefill.by_sequence, n_host, n)
    want = {"on": [True], "off": [False], "auto": [False, True]}[kv.offload]
    if _kind(device) != "cuda":
        want = [kv.offload == "on"]  # on the CPU the "device" is DRAM: offload only when asked (tests)
    err, plans = None, {}
    for off in want:
        try:
            plans[off] = plan_fn(kv_cache_bytes(image, batch, max_len, off, kv.block_tokens, rows))
        except ConfigError as e:
            err = err or e
    if not plans:
        raise err
    full = kv_cache_bytes(image, batch, max_len, block_tokens=kv.block_tokens)
    read_back = full * (n - n_host) // n
    off = min(plans, key=lambda o: (plans[o].h2d_bytes_per_pass + (read_back if o else 0), o))
    if off:
        avail = psutil.virtual_memory().available
        if full > avail:
            raise ConfigError(f"the KV cache ({full / GB:.2f} GB for batch {batch} x {max_len} tokens) does not "
                              f"fit the available memory {avail / GB:.2f} GB; lower --max-seq-len or "
                              f"--batch-size") from err
    return plans[off], off


def _gpu_budget(device, gpu_mem_gb: float | None) -> tuple[int | None, int]:
    """(bytes the plan may use on the GPU, bytes this process already holds there) for ``device``."""
    if _kind(device) != "cuda":
        return None, 0
    if gpu_mem_gb and "torch" not in sys.modules:  # planned before torch starts (start_early): nothing held
        return int(gpu_mem_gb * GB), 0
    import torch

    if gpu_mem_gb:  # checked against the GPU's memory by cap_gpu_memory
        # the cap is the process's: what it already holds (an earlier model, cuBLAS workspaces) is not ours
        held = torch.cuda.memory_allocated(device) if torch.cuda.is_initialized() else 0
        return int(gpu_mem_gb * GB) - held, held
    return torch.cuda.mem_get_info(device)[0], 0


def expert_counts_file(image: Image, given: str | None) -> str | None:
    """The expert-counts file a plan of ``image`` ranks its experts by: ``given`` (--expert-counts), else
    IMAGE.expert-counts.json where it exists; None for a dense model or where there is none."""
    if not image.args.n_experts:
        if given:
            raise ConfigError(f"--expert-counts {given}: {image.path} is a {image.args.arch} model, which has no "
                              f"experts")
        return None
    if given:
        return given
    default = expert_counts_path(str(image.path))
    return default if os.path.exists(default) else None


def make_plan(image: Image, cfg: EngineConfig, device, kv_bytes: int, act_bytes: int, draft_bytes: int = 0) -> Plan:
    p = cfg.placement
    gpu, held = _gpu_budget(device, p.gpu_mem_gb)
    if p.dram_gb:
        dram, avail = int(p.dram_gb * GB), psutil.virtual_memory().available
        if dram > avail:
            raise ConfigError(f"--dram-gb {p.dram_gb:g} ({dram} bytes) exceeds the available memory "
                              f"{avail / GB:.2f} GB ({avail} bytes, psutil.virtual_memory().available)")
    else:
        dram = default_dram_bytes()
    sizes = {name: g.size for name, g in image.groups.items()}
    counts_file = expert_counts_file(image, p.expert_counts)
    counts = read_expert_counts(counts_file, image.args) if counts_file else None
    try:
        plan = plan_placement(sizes, image.args, p.mode, Budgets(gpu, dram, kv_bytes, act_bytes, draft_bytes),
                              device=_kind(device), gpu_cached_layers=p.gpu_cached_layers,
                              cpu_cache_layers=p.cpu_cache_layers, prefetch_distance=p.prefetch_distance,
                              group_prefetch_depth=p.group_prefetch_depth, expert_counts=counts,
                              routing_from=counts_file or "", expert_prefetch=p.expert_prefetch)
        plan = with_measured_cpu_set(plan, image, p.cpu_compute, device)
        return dataclasses.replace(plan, stored_as=image.format_summary())
    except ConfigError as e:
        if held:
            raise ConfigError(f"{e} (the budget is --gpu-mem-gb {p.gpu_mem_gb:g} less the {held / 2**20:.0f} MiB "
                              f"this process already held on the GPU)") from None
        raise


def plan_for_pool(image: Image, cfg: EngineConfig, device, rec: dict, kv_bytes: int, act_bytes: int,
                  draft_bytes: int = 0) -> Plan:
    """A client's placement within what the daemon pool ``rec`` holds: the GPU tier from the client's own
    GPU budget (as ``make_plan``); the DRAM tier is every other group the pool holds; the rest streams
    through this client's window slots. Refuses what the pool cannot serve."""
    base = make_plan(image, cfg.replace(mode="mixed", dram_gb=None, attach=None, cpu_compute="off"), device,
                     kv_bytes, act_bytes, draft_bytes)
    held, name = set(rec["dram_groups"]), rec["name"]
    dram = tuple(g for g in base.sequence if g not in base.gpu and g in held)
    stream = tuple(g for g in base.sequence if g not in base.gpu and g not in held)
    window = int(rec["window_slots"])
    if stream and window < 1:
        raise ConfigError(f"pool {name!r} holds {len(held)} of {len(image.groups)} groups and has no window slots "
                          f"for the other {len(stream)}: start it with --window-slots, or give this run more "
                          f"--gpu-mem-gb")
    too_big = [g for g in stream if base.group_bytes[g] > int(rec["slot_bytes"])]
    if too_big:
        raise ConfigError(f"pool {name!r}: group {too_big[0]} ({base.group_bytes[too_big[0]]} bytes) does not fit its "
                          f"window slots of {rec['slot_bytes']} bytes")
    routed = set(base.routed)
    on_demand = [g for g in stream if g in routed]
    demand = int(rec.get("demand_slots") or 0)
    if on_demand and demand < 1:
        raise ConfigError(f"pool {name!r} holds {len(held)} of {len(image.groups)} groups and has no demand slots for "
                          f"the {len(on_demand)} experts it does not hold (a pool started before experts were read "
                          f"on demand): restart it, or give this run more --gpu-mem-gb")
    plan = dataclasses.replace(base, dram=dram, stream=stream,
                               window_slots=window if any(g not in routed for g in stream) else 0,
                               demand_slots=demand if on_demand else 0,
                               demand_slot_bytes=int(rec["slot_bytes"]) if on_demand else 0,
                               expert_prefetch=prefetch_room(cfg.placement.expert_prefetch, demand if on_demand else 0)
                               if guessed(image.args, base.gpu, dram, _kind(device) == "cuda") else 0,
                               budgets=dataclasses.replace(base.budgets, dram_bytes=None))
    return with_measured_cpu_set(plan, image, cfg.placement.cpu_compute, device)  # of the DRAM tier the pool holds


def with_measured_cpu_set(plan: Plan, image: Image, value, device) -> Plan:
    """``plan`` with its CPU compute set (``--cpu-compute``), priced on CUDA by the link's and the CPU kernels'
    rates measured here and now (runtime/engine/costs.py): auto chooses from them, N shows both pipes."""
    value = cpu_compute_value(value)
    if value == "off" or not plan.is_cuda:
        return with_cpu_set(plan, image.args, value)
    if isinstance(value, int):
        with_cpu_set(plan, image.args, value)  # a count beyond the candidates refused before anything is measured
    from runtime.engine.costs import measure
    from runtime.env import cpu_kernels

    cands = cpu_candidates(plan, image.args)
    costs = measure({g: image.groups[g].tensors for g in cands}, device, cpu_kernels()) if cands else None
    return with_cpu_set(plan, image.args, value, costs)


def planned(image: Image, cfg: EngineConfig, device, batch: int, max_len: int, chunk: int, all_logits: bool,
             plan_fn=make_plan) -> tuple[Plan, bool]:
    """The plan and KV decision for a batch of ``batch`` x ``max_len``, one pass's activations reserved."""
    act = activation_bytes(image, batch, min(chunk_per_sequence(chunk, batch), max_len), all_logits)
    draft = 0
    if cfg.speculative.draft is not None:  # a tree's every node's logits (bf16, then fp32); a model draft first
        act += cfg.speculative.tree_limit(_kind(device), chunk) * image.args.vocab_size * 6
        if cfg.speculative.draft != "ngram" and _kind(device) == "cuda":
            draft = draft_gpu_bytes(open_draft_image(cfg.speculative.draft, image), max_len, chunk)
    return plan_with_kv(image, cfg, device, batch, max_len,
                        lambda kv: plan_fn(image, cfg, device, kv, act, draft_bytes=draft))


def cap_gpu_memory(device: torch.device, gb: float | None) -> None:
    """Make ``--gpu-mem-gb`` a hard cap: PyTorch's allocator refuses to hold more (emulates a smaller card;
    the CUDA context itself, a few hundred MB, is outside any allocator and not counted). None lifts it."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    if gb is not None and gb * GB > total:
        raise ConfigError(f"--gpu-mem-gb {gb:g} ({int(gb * GB)} bytes) exceeds the GPU's memory: "
                          f"{torch.cuda.get_device_name(index)} has {total / GB:.2f} GB ({total} bytes)")
    torch.cuda.set_per_process_memory_fraction(1.0 if gb is None else min(1.0, gb * GB / total), index)


@dataclass
class EarlyStart:
    """A private pool started before torch and CUDA (``start_early``); ``open_source`` takes it over."""

    plan: Plan
    pool: PrivatePool
    device_type: str
    started_ms: float
    kv_offload: bool = False

    def stop(self) -> None:
        self.pool.stop()  # idempotent: a no-op once open_source has stopped it


def start_early(image: Image, cfg: EngineConfig, device: str | None, batch: int = 1, max_len: int = 2048,
                chunk: int | None = None, all_logits: bool = False) -> EarlyStart | None:
    """Start the run's pool now, before the caller imports torch and starts CUDA (seconds with a cold page
    cache), so the DRAM tier fills meanwhile. Only where the plan needs neither: a streaming mode, no trace,
    and on CUDA a given --gpu-mem-gb. ``device`` None guesses CUDA from /dev/nvidiactl; ``open_source``
    discards the pool if the guess was wrong. The caller must ``stop()`` it if it never reaches
    ``open_source`` (``stop`` is idempotent, so a ``finally`` may always call it)."""
    if cfg.placement.mode == "full" or cfg.trace is not None or cfg.attach is not None:
        return None
    kind = device_kind(device)
    if kind == "cuda" and not cfg.placement.gpu_mem_gb:
        return None
    plan, offload = planned(image, cfg, kind, batch, max_len, chunk or cfg.prefill.chunk, all_logits)
    t0 = time.perf_counter()
    pool = _start_pool(image, cfg, plan, None)
    return EarlyStart(plan, pool, kind, (time.perf_counter() - t0) * 1e3, offload)


def gpu_tier_in_dram(plan: Plan) -> bool:
    """Whether a private pool also reads the GPU tier into DRAM with its DRAM tier. Worth it when nothing
    streams (the disk is idle after the fill; with a cold start the fill runs while torch and CUDA start,
    and the GPU tier is then copied from pinned DRAM at the H2D rate instead of read from disk after
    them) and the DRAM budget holds the copy: it stays for the run (pinned)."""
    b = plan.budgets.dram_bytes
    return bool(plan.gpu) and plan.is_cuda and not plan.stream and (b is None or
                                                                    plan.ring_bytes + plan.gpu_tier_bytes <= b)


def _start_pool(image: Image, cfg: EngineConfig, plan: Plan, trace) -> PrivatePool:
    opts = WorkerOptions(direct=cfg.pool.direct_io, chunk_bytes=cfg.pool.staging_mb << 20,
                         trace_dir=trace.dir if trace else None)
    check_worker_count(cfg.pool.workers, str(image.path), opts.inflight)
    if not cfg.quiet:
        print(plan.describe(), file=sys.stderr)
    mirror = gpu_tier_in_dram(plan)
    if mirror:  # read with the DRAM tier, so it fills while torch and CUDA start, then copied from DRAM
        window, slot_bytes = plan.window_slots, plan.slot_bytes
    else:  # loaded through the window once: 2 slots at least (one filling while the other is copied)
        window = max(plan.window_slots, min(2, len(plan.gpu)))
        slot_bytes = max([plan.slot_bytes] + [image.groups[g].size for g in plan.gpu])
    # In the order of first use: the embedding, the GPU tier (loaded first), the DRAM tier in pass order.
    dram_groups = tuple(dict.fromkeys(plan.host + (plan.gpu if mirror else ()) + plan.dram))
    pool_cfg = PoolConfig(str(image.path), str(image.manifest_path), f"run{os.getpid()}-{next(_POOL_NUMBERS)}",
                          dram_groups, window, slot_bytes, workers=cfg.pool.workers, worker_opts=opts,
                          owner_pid=os.getpid(), quiet=cfg.quiet, demand_slots=plan.demand_slots,
                          demand_slot_bytes=plan.demand_slot_bytes)
    return PrivatePool(pool_cfg)


@contextlib.contextmanager
def open_source(image: Image, cfg: EngineConfig, device: torch.device, batch: int = 1, max_len: int = 2048,
                chunk: int | None = None, all_logits: bool = False, early: EarlyStart | None = None):
    """Yield (weight source, plan or None, pool handle or None) for ``cfg.placement.mode``. With ``cfg.trace``
    the source records its computes and the pool its reads; the trace is written once the pool has stopped.
    ``early``: the pool ``start_early`` started for this run (used if it was planned for ``device``'s type).
    ``chunk``: prompt tokens per weight pass the plan makes room for (default ``cfg.prefill.chunk``)."""
    chunk = chunk or cfg.prefill.chunk
    if early is not None and early.device_type != device.type:
        early.stop()
        early = None
    if cfg.trace is None:
        with _open_source(image, cfg, device, batch, max_len, chunk, all_logits, None, early) as out:
            yield out
        return
    from runtime.engine.trace import TraceSession  # torch: imported once a run needs it

    with TraceSession(cfg.trace, device, list(image.groups)) as ts, \
            _open_source(image, cfg, device, batch, max_len, chunk, all_logits, ts) as (source, plan, handle), \
            ts.wrap(source) as traced:
        yield traced, plan, handle


@contextlib.contextmanager
def _open_source(image: Image, cfg: EngineConfig, device: torch.device, batch: int, max_len: int, chunk: int,
                 all_logits: bool, trace, early: EarlyStart | None = None, capped: bool = False):
    gpu_gb = cfg.placement.gpu_mem_gb
    if device.type == "cuda" and gpu_gb and not capped:
        cap_gpu_memory(device, gpu_gb)
        try:
            with _open_source(image, cfg, device, batch, max_len, chunk, all_logits, trace, early, True) as out:
                yield out
        finally:
            cap_gpu_memory(device, None)  # the cap is the process's: lift it with the source
        return
    if cfg.placement.mode == "full":
        from runtime.engine.weights import InMemoryWeights  # torch: imported once a run needs it

        yield InMemoryWeights(image, device, quiet=cfg.quiet, kv_offload=cfg.kv.offload == "on"), None, None
        return
    if cfg.attach is not None:
        with _attached_source(image, cfg, device, batch, max_len, chunk, all_logits) as out:
            yield out
        return
    if early is not None:
        plan, pool, started_ms, offload = early.plan, early.pool, early.started_ms, early.kv_offload
    else:
        plan, offload = planned(image, cfg, device, batch, max_len, chunk, all_logits)
        t0 = time.perf_counter()
        pool = _start_pool(image, cfg, plan, trace)
        started_ms = (time.perf_counter() - t0) * 1e3
    with pool:
        client = PoolClient(pool.handle)
        try:
            with _streamed(image, plan, client, device, max_len, chunk, {"pool_start": started_ms}, offload,
                           trace.client if trace else None) as source:
                yield source, plan, pool.handle
        finally:
            client.close()


@contextlib.contextmanager
def _streamed(image: Image, plan: Plan, client: PoolClient, device: torch.device, max_len: int, chunk: int,
              load_ms: dict, offload: bool, trace=None):
    """The StreamedWeights over ``client`` (built while CUDA warms up), closed on exit; ``load_ms`` goes first
    in its load breakdown, ``offload`` is the KV-offload decision the Generator takes from it."""
    from runtime.engine.streamed import StreamedWeights  # torch: imported once a run needs it

    warm = _WarmUp(image, device, max_len, chunk)
    try:
        source = StreamedWeights(image, plan, client, device, staging=max(plan.staging_buffers, 1), trace=trace,
                                 on_allocated=warm.start, kv_offload=offload)
    finally:
        warm.join()
    try:
        waited = {} if warm.waited_ms is None else {"warm_up_wait": warm.waited_ms}
        source.load_ms = {**load_ms, **source.load_ms, **waited}
        yield source
    finally:
        source.close()


@contextlib.contextmanager
def _attached_source(image: Image, cfg: EngineConfig, device: torch.device, batch: int, max_len: int, chunk: int,
                     all_logits: bool):
    """The weight source over the daemon pool ``cfg.attach`` (runtime/pool/attach.py): claim a client row, plan
    within what the pool holds, map the ring read-only; the row is given back on exit, also on failure."""
    t0 = time.perf_counter()
    att = attach(cfg.attach, str(image.path))
    client = None
    try:
        def fn(img, c, dev, kv, act, draft_bytes=0):
            return plan_for_pool(img, c, dev, att.record, kv, act, draft_bytes)

        plan, offload = planned(att.image, cfg, device, batch, max_len, chunk, all_logits, fn)
        if not cfg.quiet:
            print(f"attached to pool {cfg.attach!r} (pid {att.record['pid']}) as client {att.index}\n"
                  + plan.describe(), file=sys.stderr)
        client = PoolClient(att.handle, att.index, ring="ro")
        attach_ms = (time.perf_counter() - t0) * 1e3
        with _streamed(att.image, plan, client, device, max_len, chunk, {"attach": attach_ms}, offload) as source:
            yield source, plan, att.handle
    finally:
        if client is not None:
            client.close()
        else:
            release_row(att)


class _WarmUp:
    """Load CUDA's libraries and kernels (runtime.engine.generate.warm_up) in a thread while the ring is
    registered and the GPU tier copied. Started by the weight source once its own device memory (staging
    buffers, GPU tier) is allocated, so the warm-up's tensors live in the activations' share of the budget and
    never take what the plan gave the source. A failed warm-up costs nothing but the warm-up."""

    def __init__(self, image: Image, device: torch.device, max_len: int, chunk: int) -> None:
        self.image, self.device, self.tokens = image, device, max(1, min(chunk, max_len - 1))
        self.thread = None
        self.waited_ms: float | None = None

    def start(self) -> None:
        if self.device.type != "cuda" or self.thread is not None:
            return
        import threading

        self.thread = threading.Thread(target=self._run, name="cuda-warm-up", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from runtime.engine.generate import warm_up  # torch: only on CUDA, by then imported
        from runtime.format.image import TORCH_DTYPES

        try:
            warm_up(self.image.args, TORCH_DTYPES[self.image.dtype], self.device, self.tokens,
                    self.image.formats().values())
        except Exception as e:  # e.g. out of memory under a tight cap: the first pass pays instead
            print(f"note: CUDA warm-up skipped ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)

    def join(self) -> None:
        if self.thread is not None:
            t0 = time.perf_counter()
            self.thread.join()
            self.waited_ms = (time.perf_counter() - t0) * 1e3
