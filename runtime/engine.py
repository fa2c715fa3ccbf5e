"""From the command line to a weight source: ``RuntimeConfig``, the placement plan, a private pool.

``open_source(image, cfg, device, ...)`` is a context manager that yields the weight source generation
runs on. ``--mode full`` loads every group onto the device (runtime/weights.py, the reference); the other
modes plan the tiers (runtime/placement.py), start a private pool (coordinator + I/O workers,
runtime/pool.py) sized for the plan, attach to it as its client (runtime/client.py) and stop the pool on
exit, also when the run fails. With ``--trace FILE`` (``RuntimeConfig.trace``) the source is wrapped to
record its computes, the pool's processes record their reads, and FILE is written once the pool has
stopped (runtime/trace.py). Runs in the launch.py process (the client).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model.errors import ConfigError
from model.groups import host_layer_count
from runtime.image import DTYPE_BYTES, Image

if TYPE_CHECKING:
    import torch

    from runtime.placement import Plan
    from runtime.pool import PrivatePool

GB = 1e9
_POOL_NUMBERS = itertools.count()  # private pools of this process: run<pid>-<n>
MODES = ("full", "preload", "stream", "mixed")


@dataclass(frozen=True)
class RuntimeConfig:
    mode: str = "mixed"
    gpu_mem_gb: float | None = None
    dram_gb: float | None = None
    gpu_cached_layers: int | None = None
    cpu_cache_layers: int | None = None
    prefetch_distance: int | None = None
    group_prefetch_depth: int = 2
    workers: int = 2
    staging_mb: int = 16  # the I/O workers split each group read into chunks of this size, issued in parallel
    direct_io: bool = True
    quiet: bool = False
    trace: str | None = None  # --trace FILE: a Chrome trace of the run (runtime/trace.py)
    attach: str | None = None  # --attach NAME: use the daemon pool NAME (runtime/daemon.py), no private pool
    kv_offload: str = "auto"  # --kv-offload: "on" | "off" | "auto" (when the GPU budget cannot hold the KV cache)
    prefill_chunk: int = 2048  # --prefill-chunk: prompt tokens per weight pass, shared by a batch's sequences
    host_attention: bool | int | str | None = None  # --host-attention [N|all]: layers of an offloaded KV cache
    # attended on the host when decoding
    # --[no-]prefill-by-sequence: an offloaded batch prefilled whole prompts at a time (None: when that takes no
    # more weight passes, and always with every layer attended on the host; runtime.generate.Generator._prefill)
    prefill_by_sequence: bool | None = None
    kv_block_tokens: int = 64  # --kv-block-tokens: the cache's slots come in whole blocks (model.llama.KVCache)
    topk_blk: int | None = None  # --topk-blk: decode attention over the K best blocks (None: exact)
    threads: int | None = None  # --threads: CPU compute threads (None: the cores shared by the machine's runs)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, found {self.threads}")
        if self.topk_blk is not None and self.topk_blk < 1:
            raise ConfigError(f"--topk-blk must be at least 1, found {self.topk_blk}")
        if self.host_attention and self.topk_blk is not None:
            raise ConfigError("--host-attention and --topk-blk do not go together: top-k scores blocks on the GPU")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {MODES}, found {self.mode!r}")
        if self.kv_block_tokens < 1:
            raise ConfigError(f"--kv-block-tokens must be at least 1, found {self.kv_block_tokens}")
        if self.prefill_chunk < 16:
            raise ConfigError(f"--prefill-chunk must be at least 16 tokens, found {self.prefill_chunk}")
        for key in ("workers", "staging_mb", "group_prefetch_depth"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be at least 1, found {getattr(self, key)}")
        if self.kv_offload not in ("auto", "on", "off"):
            raise ConfigError(f"--kv-offload must be auto, on or off, found {self.kv_offload!r}")
        for key in ("gpu_mem_gb", "dram_gb"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, found {v}")

        if self.attach is not None:
            fixed = {"--mode": self.mode not in ("mixed",), "--dram-gb": self.dram_gb is not None,
                     "--cpu-cache-layers": self.cpu_cache_layers is not None,
                     "--prefetch-distance": self.prefetch_distance is not None, "--trace": self.trace is not None}
            bad = [k for k, v in fixed.items() if v]
            if bad:
                raise ConfigError(f"{', '.join(bad)} cannot be given with --attach: the pool fixed its DRAM tier and "
                                  f"window when it started, and its processes are not traced")

    def check_for(self, image: Image) -> None:
        """What needs the image: the I/O workers its device makes useful (a private pool's)."""
        if self.mode != "full" and self.attach is None:
            from runtime.pool import check_worker_count
            from workers.io_worker import WorkerOptions

            check_worker_count(self.workers, str(image.path), WorkerOptions().inflight)

    @classmethod
    def from_args(cls, a) -> RuntimeConfig:
        keys = [f for f in cls.__dataclass_fields__ if hasattr(a, f)]
        return cls(**{k: getattr(a, k) for k in keys})


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens must be >= 0, found {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature must be >= 0, found {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], found {self.top_p}")


def chunk_per_sequence(chunk: int, batch: int) -> int:
    """Prefill tokens per sequence in one weight pass: ``chunk`` tokens per pass shared by the batch, so a
    batch's activations stay those of one chunk (runtime.generate.Generator.forward uses the same rule)."""
    return max(16, chunk // max(batch, 1))


def sequences_per_pass(chunk: int, batch: int, length: int) -> int:
    """Prompts of ``length`` tokens one weight pass of a whole-prompt prefill takes (at least one; a longer
    prompt is chunked on its own): runtime.generate.Generator.forward_by_sequence."""
    return min(batch, max(1, chunk // length))


def prefill_passes(chunk: int, batch: int, length: int) -> tuple[int, int]:
    """Weight passes to prefill ``batch`` prompts of ``length`` tokens, ``chunk`` tokens a pass: (chunked
    across the batch, whole prompts at a time)."""
    across = -(-length // (chunk_per_sequence(chunk, batch) if batch > 1 else chunk))
    return across, -(-batch // sequences_per_pass(chunk, batch, length)) * -(-length // chunk)


def kv_cache_bytes(image: Image, batch: int, max_len: int, offload: bool = False, block_tokens: int = 1,
                   device_rows: int | None = None) -> int:
    """The KV cache's bytes on the compute device: all of it, or with offload two layers' buffers of
    ``device_rows`` sequences (default the batch; kv_device_rows); its slots rounded up to whole blocks of
    ``block_tokens``, as model.llama.KVCache allocates them."""
    a = image.args
    elem = DTYPE_BYTES[image.dtype]
    slots = -(-max_len // block_tokens) * block_tokens
    rows = batch if not offload or device_rows is None else device_rows
    return 2 * (2 if offload else a.n_layers) * rows * slots * a.n_kv_heads * a.head_dim * elem


def kv_device_rows(batch: int, max_len: int, prefill_chunk: int, by_sequence: bool | None, host_layers: int,
                   n_layers: int) -> int:
    """Sequences of ``max_len`` slots an offloaded cache's two device buffers hold: the batch's, except when
    every layer is attended on the host (no layer's cache is read back while decoding) and the prefill goes
    whole prompts at a time (``by_sequence`` True or None, the default): then only one pass's prompts ever
    reach the device, at most ``prefill_chunk`` tokens, so the buffers hold that many slots, in whole
    sequences of ``max_len`` (at least one; shorter prompts are packed into the same memory,
    ``TieredKVCache.sub_batch``). At batch 128 of the 70B shape that frees the 2.2 GB the buffers took from
    the GPU tier."""
    if by_sequence is False or host_layers != n_layers:
        return batch
    return min(batch, max(1, -(-prefill_chunk // max_len)))


def plan_with_kv(image: Image, cfg: RuntimeConfig, device, batch: int, max_len: int, act_bytes: int, plan_fn):
    """(plan, kv offload?) for ``cfg.kv_offload``. "auto" on CUDA plans both ways (the whole cache on the
    device, or two layers' buffers there and the cache in pinned DRAM) and takes the one that moves fewer bytes
    over the H2D link per decode step: the weights not resident, plus, offloaded, the cache of the layers read
    back (not those of ``cfg.host_attention``: their decode attention runs where the cache lives). The device's KV
    displaces at most its own bytes of weights, but the GPU tier holds whole groups, so either can win
    (70B-shaped, batch 32: the cache on the device pushed the tier from 2.7 to 0.3 GB). Ties stay on the
    device. An offloaded cache must fit the available memory (pinned)."""
    n = image.args.n_layers
    n_host = host_layer_count(cfg.host_attention, n)
    rows = kv_device_rows(batch, max_len, cfg.prefill_chunk, cfg.prefill_by_sequence, n_host, n)
    want = {"on": [True], "off": [False], "auto": [False, True]}[cfg.kv_offload]
    if getattr(device, "type", "cpu") != "cuda":
        want = [cfg.kv_offload == "on"]  # on the CPU the "device" is DRAM: offload only when asked (tests)
    err, plans = None, {}
    for off in want:
        try:
            plans[off] = plan_fn(kv_cache_bytes(image, batch, max_len, off, cfg.kv_block_tokens, rows))
        except ConfigError as e:
            err = err or e
    if not plans:
        raise err
    full = kv_cache_bytes(image, batch, max_len, block_tokens=cfg.kv_block_tokens)
    read_back = full * (n - n_host) // n
    off = min(plans, key=lambda o: (plans[o].h2d_bytes_per_pass + (read_back if o else 0), o))
    if off:
        import psutil

        avail = psutil.virtual_memory().available
        if full > avail:
            raise ConfigError(f"the KV cache ({full / GB:.2f} GB for batch {batch} x {max_len} tokens) does not "
                              f"fit the available memory {avail / GB:.2f} GB; lower --max-seq-len or "
                              f"--batch-size") from err
    return plans[off], off


def activation_bytes(image: Image, batch: int, chunk: int, all_logits: bool = False) -> int:
    """Rough upper bound of the workspace of one prefill chunk: hidden states, FFN intermediates, and fp32
    logits (every position's for perplexity, else the last position's)."""
    a = image.args
    elem = DTYPE_BYTES[image.dtype]
    logits = batch * (chunk if all_logits else 1) * a.vocab_size * 4
    scores = batch * a.n_heads * chunk * chunk * 4  # a masked (later) chunk may take the math kernel's scores
    return batch * chunk * (6 * a.dim + 3 * a.ffn_hidden) * elem + logits + scores + (256 << 20)


def default_dram_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available * 0.8)


def make_plan(image: Image, cfg: RuntimeConfig, device: torch.device, kv_bytes: int, act_bytes: int):
    from runtime.placement import Budgets, plan_placement

    gpu, held = None, 0
    if device.type == "cuda":
        import torch

        if cfg.gpu_mem_gb:  # checked against the GPU's memory by cap_gpu_memory
            # the cap is the process's: what it already holds (an earlier model, cuBLAS workspaces) is not ours
            held = torch.cuda.memory_allocated(device) if torch.cuda.is_initialized() else 0
            gpu = int(cfg.gpu_mem_gb * GB) - held
        else:
            gpu = torch.cuda.mem_get_info(device)[0]
    if cfg.dram_gb:
        import psutil

        dram, avail = int(cfg.dram_gb * GB), psutil.virtual_memory().available
        if dram > avail:
            raise ConfigError(f"--dram-gb {cfg.dram_gb:g} ({dram} bytes) exceeds the available memory "
                              f"{avail / GB:.2f} GB ({avail} bytes, psutil.virtual_memory().available)")
    else:
        dram = default_dram_bytes()
    sizes = {name: g.size for name, g in image.groups.items()}
    try:
        return plan_placement(sizes, image.args, cfg.mode, Budgets(gpu, dram, kv_bytes, act_bytes),
                              device=device.type, gpu_cached_layers=cfg.gpu_cached_layers,
                              cpu_cache_layers=cfg.cpu_cache_layers, prefetch_distance=cfg.prefetch_distance,
                              group_prefetch_depth=cfg.group_prefetch_depth)
    except ConfigError as e:
        if held:
            raise ConfigError(f"{e} (the budget is --gpu-mem-gb {cfg.gpu_mem_gb:g} less the {held / 2**20:.0f} MiB "
                              f"this process already held on the GPU)") from None
        raise


def plan_for_pool(image: Image, cfg: RuntimeConfig, device: torch.device, rec: dict, kv_bytes: int,
                  act_bytes: int):
    """A client's placement within what the daemon pool ``rec`` holds: the GPU tier from the client's own
    GPU budget (as ``make_plan``); the DRAM tier is every other group the pool holds; the rest streams
    through this client's window slots. Refuses what the pool cannot serve."""
    import dataclasses

    base = make_plan(image, dataclasses.replace(cfg, mode="mixed", dram_gb=None, attach=None), device, kv_bytes,
                     act_bytes)
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
    return dataclasses.replace(base, dram=dram, stream=stream, window_slots=window if stream else 0,
                               budgets=dataclasses.replace(base.budgets, dram_bytes=None))


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


def start_early(image: Image, cfg: RuntimeConfig, device: str | None, batch: int = 1, max_len: int = 2048,
                chunk: int | None = None, all_logits: bool = False) -> EarlyStart | None:
    """Start the run's pool now, before the caller imports torch and starts CUDA (seconds with a cold page
    cache), so the DRAM tier fills meanwhile. Only where the plan needs neither: a streaming mode, no trace,
    and on CUDA a given --gpu-mem-gb. ``device`` None guesses CUDA from /dev/nvidiactl; ``open_source``
    discards the pool if the guess was wrong. The caller must ``stop()`` it if it never reaches
    ``open_source`` (``stop`` is idempotent, so a ``finally`` may always call it)."""
    from types import SimpleNamespace

    if cfg.mode == "full" or cfg.trace is not None or cfg.attach is not None:
        return None
    kind = (device or ("cuda" if os.path.exists("/dev/nvidiactl") else "cpu")).split(":")[0]
    if kind == "cuda" and not cfg.gpu_mem_gb:
        return None
    dev = SimpleNamespace(type=kind)
    chunk = chunk or cfg.prefill_chunk
    act = activation_bytes(image, batch, min(chunk_per_sequence(chunk, batch), max_len), all_logits)
    plan, offload = plan_with_kv(image, cfg, dev, batch, max_len, act,
                                 lambda kv: make_plan(image, cfg, dev, kv, act))
    t0 = time.perf_counter()
    pool = _start_pool(image, cfg, plan, None)
    return EarlyStart(plan, pool, kind, (time.perf_counter() - t0) * 1e3, offload)


def gpu_tier_in_dram(plan) -> bool:
    """Whether a private pool also reads the GPU tier into DRAM with its DRAM tier. Worth it when nothing
    streams (the disk is idle after the fill; with a cold start the fill runs while torch and CUDA start,
    and the GPU tier is then copied from pinned DRAM at the H2D rate instead of read from disk after
    them) and the DRAM budget holds the copy: it stays for the run (pinned)."""
    b = plan.budgets.dram_bytes
    return bool(plan.gpu) and plan.is_cuda and not plan.stream and (b is None or
                                                                    plan.ring_bytes + plan.gpu_tier_bytes <= b)


def _start_pool(image: Image, cfg: RuntimeConfig, plan, trace) -> PrivatePool:
    from runtime.pool import PoolConfig, PrivatePool, check_worker_count
    from workers.io_worker import WorkerOptions

    opts = WorkerOptions(direct=cfg.direct_io, chunk_bytes=cfg.staging_mb << 20, trace_dir=trace.dir if trace else None)
    check_worker_count(cfg.workers, str(image.path), opts.inflight)

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
                          dram_groups, window, slot_bytes, workers=cfg.workers, worker_opts=opts,
                          owner_pid=os.getpid(), quiet=cfg.quiet)
    return PrivatePool(pool_cfg)


@contextlib.contextmanager
def open_source(image: Image, cfg: RuntimeConfig, device: torch.device, batch: int = 1, max_len: int = 2048,
                chunk: int | None = None, all_logits: bool = False, early: EarlyStart | None = None):
    """Yield (weight source, plan or None, pool handle or None) for ``cfg.mode``. With ``cfg.trace`` the
    source records its computes and the pool its reads; the trace is written once the pool has stopped.
    ``early``: the pool ``start_early`` started for this run (used if it was planned for ``device``'s type).
    ``chunk``: prompt tokens per weight pass the plan makes room for (default ``cfg.prefill_chunk``)."""
    chunk = chunk or cfg.prefill_chunk
    if early is not None and early.device_type != device.type:
        early.stop()
        early = None
    if cfg.trace is None:
        with _open_source(image, cfg, device, batch, max_len, chunk, all_logits, None, early) as out:
            yield out
        return
    from runtime.trace import TraceSession

    with TraceSession(cfg.trace, device, list(image.groups)) as ts, \
            _open_source(image, cfg, device, batch, max_len, chunk, all_logits, ts) as (source, plan, handle), \
            ts.wrap(source) as traced:
        yield traced, plan, handle


@contextlib.contextmanager
def _open_source(image: Image, cfg: RuntimeConfig, device: torch.device, batch: int, max_len: int, chunk: int,
                 all_logits: bool, trace, early: EarlyStart | None = None, capped: bool = False):
    if device.type == "cuda" and cfg.gpu_mem_gb and not capped:
        cap_gpu_memory(device, cfg.gpu_mem_gb)
        try:
            with _open_source(image, cfg, device, batch, max_len, chunk, all_logits, trace, early, True) as out:
                yield out
        finally:
            cap_gpu_memory(device, None)  # the cap is the process's: lift it with the source
        return
    if cfg.mode == "full":
        from runtime.weights import InMemoryWeights

        source = InMemoryWeights(image, device, quiet=cfg.quiet)
        source.kv_offload = cfg.kv_offload == "on"
        yield source, None, None
        return
    from runtime.client import PoolClient

    if cfg.attach is not None:
        with _attached_source(image, cfg, device, batch, max_len, chunk, all_logits) as out:
            yield out
        return

    if early is not None:
        plan, pool, started_ms, offload = early.plan, early.pool, early.started_ms, early.kv_offload
    else:
        act = activation_bytes(image, batch, min(chunk_per_sequence(chunk, batch), max_len), all_logits)
        plan, offload = plan_with_kv(image, cfg, device, batch, max_len, act,
                                     lambda kv: make_plan(image, cfg, device, kv, act))
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
def _streamed(image: Image, plan, client, device: torch.device, max_len: int, chunk: int, load_ms: dict,
              offload: bool, trace=None):
    """The StreamedWeights over ``client`` (built while CUDA warms up), closed on exit; ``load_ms`` goes first
    in its load breakdown, ``offload`` is the KV-offload decision the Generator takes from it."""
    from runtime.client import StreamedWeights

    warm = _WarmUp(image, device, max_len, chunk)
    try:
        source = StreamedWeights(image, plan, client, device, staging=max(plan.staging_buffers, 1), trace=trace,
                                 on_allocated=warm.start)
    finally:
        warm.join()
    try:
        waited = {} if warm.waited_ms is None else {"warm_up_wait": warm.waited_ms}
        source.load_ms = {**load_ms, **source.load_ms, **waited}
        source.kv_offload = offload
        yield source
    finally:
        source.close()


@contextlib.contextmanager
def _attached_source(image: Image, cfg: RuntimeConfig, device: torch.device, batch: int, max_len: int, chunk: int,
                     all_logits: bool):
    """The weight source over the daemon pool ``cfg.attach`` (runtime/daemon.py): claim a client row, plan
    within what the pool holds, map the ring read-only; the row is given back on exit, also on failure."""
    from runtime.client import PoolClient
    from runtime.daemon import attach

    t0 = time.perf_counter()
    att = attach(cfg.attach, str(image.path))
    client = None
    try:
        act = activation_bytes(image, batch, min(chunk_per_sequence(chunk, batch), max_len), all_logits)
        plan, offload = plan_with_kv(image, cfg, device, batch, max_len, act,
                                     lambda kv: plan_for_pool(att.image, cfg, device, att.record, kv, act))
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
            _release_row(att)


def _release_row(att) -> None:
    """Give back a claimed client row that no PoolClient took over (planning failed)."""
    from runtime.shm import CLIENT_FREE, PoolResources

    res = PoolResources.attach(att.handle, ring=False)
    try:
        if int(res.clients[att.index]["pid"]) == os.getpid():
            res.clients[att.index]["state"] = CLIENT_FREE
    finally:
        res.close()


class _WarmUp:
    """Load CUDA's libraries and kernels (runtime.generate.warm_up) in a thread while the ring is registered
    and the GPU tier copied. Started by the weight source once its own device memory (staging buffers, GPU
    tier) is allocated, so the warm-up's tensors live in the activations' share of the budget and never take
    what the plan gave the source. A failed warm-up costs nothing but the warm-up."""

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
        from runtime.generate import warm_up
        from runtime.image import TORCH_DTYPES

        try:
            warm_up(self.image.args, TORCH_DTYPES[self.image.dtype], self.device, self.tokens)
        except Exception as e:  # e.g. out of memory under a tight cap: the first pass pays instead
            print(f"note: CUDA warm-up skipped ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr)

    def join(self) -> None:
        if self.thread is not None:
            t0 = time.perf_counter()
            self.thread.join()
            self.waited_ms = (time.perf_counter() - t0) * 1e3
