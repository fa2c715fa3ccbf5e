"""The bench command: time one generation and judge it against the bound (docs/DESIGN.md, the cost model).

    python launch.py bench --image model.img --prompts prompts.txt --max-new-tokens 32 --out-json b.json
    python launch.py bench --checkpoints DIR --mode mixed --raw-device /dev/nvme0n1p4 --manifest M.json \\
        --prompts P.txt --batch-size 1 --max-new-tokens 32 --max-seq-len 2048 --temperature 0.6 --top-p 0.9 \\
        --warmup-rounds 1 --prefetch-distance 6 --group-prefetch-depth 4 --gpu-cached-layers 4 \\
        --cpu-cache-layers 40 --warmup-layers 4 --staging-mb 64 --topk-blk 8 --out-json b.json --verbose

Accepts the original bench script's command line verbatim (docs/DESIGN.md, the bench tool's interface).
What it does, in order:

1. Opens the image (``--image FILE`` or ``--raw-device DEV --manifest M``; neither: the embedded model).
   ``--checkpoints DIR`` must describe the same model (its ModelArgs equal the image's); it supplies the
   tokenizer when the image has none.
2. Reads the prompts (``--prompts``: one per line, the first ``--batch-size`` non-empty lines; lines of
   comma-separated token ids for an image without a tokenizer) and keeps the last
   ``max_seq_len - max_new_tokens`` tokens of each (the original bench's rule), reporting every truncation.
3. Measures the links the bound needs, unless given (``--disk-gbps``, ``--h2d-gbps``), before the pool
   starts so nothing else uses them:
     disk  DISK_PROBE_BYTES of O_DIRECT reads of DISK_PROBE_READ bytes each, spread evenly over the image,
           as many in flight as the pool's workers keep at most (--workers x 16; workers/odirect.DirectReader);
     H2D   (CUDA only) copies of H2D_PROBE_BYTES from pinned host memory, timed with CUDA events, the median
           of H2D_PROBE_REPEATS after one warm-up copy. The runtime copies from the cudaHostRegister'ed
           ring, which docs/DESIGN.md lists at the same rate as torch's pinned memory.
4. Opens the weight source once (one pool for all rounds), runs ``--warmup-rounds`` whole generations,
   then the measured one. End-of-sequence tokens are ignored, so every round decodes the same count.
   ``load_ms`` is the pool's start to the weight source's readiness (``load_breakdown_ms``: pool start,
   ring registration, the rest of the DRAM-tier fill, the GPU tier); ``process_start_to_first_token_ms``
   is the first round's first token against the process's creation (interpreter, imports, CUDA start-up
   and the link measurement included: pass --disk-gbps/--h2d-gbps to leave the latter out);
   ``open_to_first_token_ms`` from opening the weight source (a private pool's start, or the attach to a
   daemon pool with --attach) to that first token; the CUDA context is created before it (process start-up,
   in ``process_start_to_load``).
   Step boundaries are taken when each token reaches the host (after the GPU finished the step), and the
   pool's byte counters are read at each boundary.
5. Prints the original summary block plus our lines (plan, bytes per token, achieved GB/s per link, the
   bound and achieved/bound), and writes the original JSON keys plus ours with ``--out-json``.

The bound per decode step is max(disk bytes / disk GB/s, H2D bytes / H2D GB/s) with the plan's bytes per
pass, and with ``--host-attention`` (an offloaded cache attended on the CPU) also the CPU's attention time
per decode step measured in the run (``links.host_attention``: its rate); GPU compute time is not modelled
yet. achieved/bound >= 1 means slower than the bound.
Runs in the launch.py process (the client); owns nothing shared beyond what ``open_source`` owns.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from model.args import ModelArgs
from model.errors import ConfigError, UserError
from runtime.engine.batching import kv_cache_bytes
from runtime.engine.config import EngineConfig, FlagConfig, SamplingConfig
from runtime.engine.placement import Plan
from runtime.engine.source import EarlyStart, open_source
from runtime.format.image import Image
from runtime.ipc.options import WorkerOptions
from runtime.measure.links import GB, MB, device_name, fmt_gb, measure_disk_quick, measure_h2d, process_age_s

if TYPE_CHECKING:
    import torch

    from model.tokenizer import Tokenizer
    from runtime.engine.weights import WeightSource


# Keys of the original bench's JSON (docs/DESIGN.md, the bench tool's interface), every one written.
SEED_KEYS = ("batch_size", "max_new_tokens", "prompt_lens", "prefill_tokens_total", "decode_tokens_total",
             "prefill_ms", "first_token_decode_ms", "ttft_ms", "decode_ms", "e2e_ms", "throughput_tok_s",
             "end_to_end_tok_s", "io_bw_MBps", "gpu_mem_GB", "mode", "device")
SUMMARY_KEYS = ("ttft_ms", "prefill_ms", "first_token_decode_ms", "decode_ms", "e2e_ms", "throughput_tok_s",
                "end_to_end_tok_s")
# Seeds' flags accepted but not applied yet: argparse dest -> why.
UNUSED_FLAGS = {
    "warmup_layers": "the fixed tiers (GPU and DRAM) are filled before the first token, so there is nothing "
                     "to warm",
}
NOTES = [
    "bound = max(disk bytes / disk bandwidth, H2D bytes / H2D bandwidth) per decode step with the plan's "
    "bytes per pass (docs/DESIGN.md, the cost model); compute time is not modelled yet; achieved/bound >= 1 "
    "means slower than the bound",
    "kv_h2d_MBps and kv_d2h_MBps: KV bytes moved between DRAM and the GPU during decode (--kv-offload) over "
    "the decode time; 0 when the KV cache stays on the compute device",
    "the first token comes from the prefill pass: prefill_ms includes sampling it and ttft_ms = prefill_ms; "
    "first_token_decode_ms is the first decode step",
    "decode_tokens_total counts tokens produced by decode steps (max_new_tokens - 1 per sequence); "
    "end_to_end_tok_s counts every generated token",
    "end-of-sequence tokens are ignored: every round generates max_new_tokens tokens",
    "decode_io holds the bytes the pool's workers read while decoding; it differs from the plan's bytes per "
    "pass by what the window prefetched across the phase boundaries",
]


@dataclass(frozen=True)
class BenchConfig(FlagConfig):
    """The bench's own flags (the engine's are EngineConfig); sampling defaults are SamplingConfig's."""

    image: str | None = None
    manifest: str | None = None
    raw_device: str | None = None  # the image on a raw block device (or file); its --manifest
    checkpoints: str | None = None  # the checkpoint the image was packed from (the original bench's flag)
    device: str | None = None
    prompts: str | None = None
    batch_size: int = 1
    max_new_tokens: int = 32
    max_seq_len: int | None = None
    temperature: float = SamplingConfig.temperature
    top_p: float = SamplingConfig.top_p
    seed: int = SamplingConfig.seed
    warmup_rounds: int = 1
    warmup_layers: int | None = None  # accepted for the original command line; unused
    h2d_gbps: float | None = None
    disk_gbps: float | None = None
    verbose: bool = False
    out_json: str | None = None
    no_server: bool = False  # with --attach: in this process even when the pool has a server

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, found {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1 for a benchmark, found {self.max_new_tokens}")
        if self.warmup_rounds < 0:
            raise ConfigError(f"--warmup-rounds must be >= 0, found {self.warmup_rounds}")
        if self.raw_device and self.image:
            raise ConfigError(f"give either --image ({self.image}) or --raw-device ({self.raw_device}), not both")
        for key in ("h2d_gbps", "disk_gbps"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, found {v}")
        SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.seed)  # checked now

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.seed)

    def unused_flags(self) -> list[dict[str, Any]]:
        return [{"flag": "--" + k.replace("_", "-"), "value": getattr(self, k), "reason": why}
                for k, why in UNUSED_FLAGS.items() if getattr(self, k) is not None]


# ---- inputs ----------------------------------------------------------------------------------------------

def check_checkpoint(path: str, image: Image):
    """Open ``path`` and refuse it when its ModelArgs differ from the image's; returns the checkpoint."""
    from model.checkpoint import open_checkpoint  # torch: the original bench's --checkpoints only

    ck = open_checkpoint(path)
    mine, theirs = image.args.to_dict(), ck.args.to_dict()
    diff = [f"{k}: checkpoint {theirs[k]!r}, image {mine[k]!r}" for k in mine if mine[k] != theirs.get(k)]
    if diff:
        raise UserError(f"--checkpoints {path} does not match the image {image.path} (manifest "
                        f"{image.manifest_path}): {'; '.join(diff)}")
    return ck


def fit_prompts(prompts: list[list[int]], cfg: BenchConfig, args: ModelArgs) -> tuple[list[list[int]], int, list]:
    """Keep the last max_seq_len - max_new_tokens tokens of each prompt (the original bench's rule; without
    --max-seq-len the model's context, ``ModelArgs.context``).

    Returns (prompts, KV length to allocate, truncations as dicts)."""
    limit = cfg.max_seq_len or args.context
    args.check_context(limit)
    keep = limit - cfg.max_new_tokens
    if keep < 1:
        raise ConfigError(f"--max-seq-len {limit} leaves no room for a prompt after --max-new-tokens "
                          f"{cfg.max_new_tokens}")
    cut = [{"prompt": i, "tokens": len(p), "kept": keep} for i, p in enumerate(prompts) if len(p) > keep]
    prompts = [p[-keep:] for p in prompts]
    return prompts, cfg.max_seq_len or max(map(len, prompts)) + cfg.max_new_tokens, cut


# ---- link measurements -----------------------------------------------------------------------------------

def host_attention_link(host_kv: float, cpu_ms: float) -> dict[str, Any] | None:
    """The CPU's attention rate for the bound: the step's host-attended KV bytes over the CPU's attention time
    per decode step in the run itself (``TieredKVCache.attend_on_host``), so the bound's host term is that
    time. (A separate measurement after the run read 16-22 GB/s on the H200 machine where the runs attended
    at 34-46 GB/s; benchmarks/host_attention_probe.py measures the CPU's rate alone.) None without time."""
    if cpu_ms <= 0:
        return None
    return {"gbps": host_kv / (cpu_ms / 1e3) / GB, "source": "measured in the run",
            "method": f"{host_kv / GB:.3f} GB of keys and values per decode step attended on the CPU in "
                      f"{cpu_ms:.1f} ms (this run's mean)"}


def links(cfg: BenchConfig, image: Image, device: torch.device, workers: int) -> dict[str, Any]:
    """Disk and H2D bandwidths for the bound: given on the command line, else measured now (the disk with as
    many reads in flight as the pool's ``workers`` keep at most)."""
    disk = ({"gbps": cfg.disk_gbps, "source": "--disk-gbps"} if cfg.disk_gbps
            else measure_disk_quick(str(image.path), image.image_size, workers * WorkerOptions().inflight))
    if device.type != "cuda":
        h2d = None if cfg.h2d_gbps is None else {"gbps": cfg.h2d_gbps, "source": "--h2d-gbps",
                                                 "note": "unused: the model computes on the CPU (no H2D link)"}
    else:
        h2d = {"gbps": cfg.h2d_gbps, "source": "--h2d-gbps"} if cfg.h2d_gbps else measure_h2d(device)
    return {"disk": disk, "h2d": h2d}


# ---- one timed round -------------------------------------------------------------------------------------

def pool_counters(source: WeightSource) -> dict[str, int] | None:
    """The pool's byte and read counters now; None for a source without a pool (--mode full)."""
    client = source.client
    if client is None:
        return None
    hd = client.res.header
    out = {k: int(hd[k]) for k in ("bytes_dram", "bytes_stream", "bytes_demand", "reads", "retries", "errors")}
    out["disk_bytes"] = int(client.res.workers["bytes_read"].sum())
    out.update(getattr(source, "expert_stats", None) or {})  # a mixture's experts by tier (streamed.py)
    return out


EXPERT_TIERS = ("gpu", "dram", "disk")
EXPERT_KEYS = ("routings", *(f"experts_{t}" for t in (*EXPERT_TIERS, "skipped")),
               *(f"expert_bytes_{t}" for t in EXPERT_TIERS), "expert_h2d_bytes", "bytes_demand", "guessed_layers",
               "guessed", "guess_chosen", "guess_hits", "prefetched", "prefetch_used", "prefetch_bytes",
               "prefetch_used_bytes", "prefetch_wasted_bytes")


def guess_report(c: dict) -> dict[str, Any] | None:
    """The prefetch guess (runtime/engine/streamed.py): of the experts the guessed layers chose, the share guessed a
    layer ahead (its hit rate), the experts guessed a layer and the share of them chosen; and what was done on it
    (``prefetch``: the disk-tier experts asked for a layer ahead, those of them chosen and so used, and their bytes:
    asked for, used, wasted); None where no layer was guessed (its router not resident, or a dense model)."""
    layers = c.get("guessed_layers", 0)
    if not layers:
        return None
    n = c.get("prefetched", 0)
    return {"layers": layers, "hit_rate": c["guess_hits"] / c["guess_chosen"] if c["guess_chosen"] else None,
            "guessed_per_layer": c["guessed"] / layers, "chosen_per_layer": c["guess_chosen"] / layers,
            "precision": c["guess_hits"] / c["guessed"] if c["guessed"] else None,
            "prefetch": {"experts": n, "used": c.get("prefetch_used", 0),
                         "used_share": c.get("prefetch_used", 0) / n if n else None,
                         "bytes": c.get("prefetch_bytes", 0), "used_bytes": c.get("prefetch_used_bytes", 0),
                         "wasted_bytes": c.get("prefetch_wasted_bytes", 0)}}


def prefetch_text(gr: dict) -> str:
    """What the guess's reads did, for the summary and ``run --verbose``."""
    pf = gr["prefetch"]
    if not pf["experts"]:
        return "none read ahead on it (--expert-prefetch 0, no demand slot to spare, or no disk-tier expert guessed)"
    return (f"{pf['experts']} disk experts read a layer ahead, {pf['used']} used ({pf['used_share']:.0%}): "
            f"{fmt_gb(pf['bytes'])} read ahead, {fmt_gb(pf['used_bytes'])} used, {fmt_gb(pf['wasted_bytes'])} wasted")


def expert_report(prefill: dict | None, decode: dict | None, tokens: int) -> dict[str, Any] | None:
    """A mixture's experts while decoding (the source's counters, runtime/engine/streamed.py): those fetched per
    token from each tier and their bytes, the bytes they moved to the GPU and read from disk on demand, and each
    tier's share of the experts fetched (its hit rate); with the prefill's counts as they are. None for a dense
    model or a source without a pool."""
    if not decode or not decode.get("routings"):
        return None

    def per_token(x: float) -> float:
        return x / tokens if tokens else 0.0

    fetched = sum(decode[f"experts_{t}"] for t in EXPERT_TIERS)
    return {"decode_tokens": tokens, "layers_routed": decode["routings"],
            "experts_per_token": {t: per_token(decode[f"experts_{t}"]) for t in EXPERT_TIERS},
            "skipped_per_token": per_token(decode["experts_skipped"]),
            "bytes_per_token": {**{t: per_token(decode[f"expert_bytes_{t}"]) for t in EXPERT_TIERS},
                                "h2d": per_token(decode["expert_h2d_bytes"]),
                                "disk_read": per_token(decode["bytes_demand"])},
            "hit_rate": {t: decode[f"experts_{t}"] / fetched if fetched else None for t in EXPERT_TIERS},
            "prefetch_guess": guess_report(decode),
            "prefill": {k: (prefill or {}).get(k) for k in decode if k in EXPERT_KEYS}}


def moved_bound(plan, lk: dict, decode: dict | None, steps: int, batch: int, step_ms: float | None) \
        -> dict[str, Any] | None:
    """A mixture's bound from the bytes its decode steps actually moved (the plan's is an expectation at batch 1
    from the routing counts): per step, H2D = the non-expert groups a pass copies (the DRAM tier's and the
    streamed ones, less the CPU compute set of a pass of ``batch`` tokens) + the experts' H2D bytes counted by the
    source; disk = the bytes the pool's workers read (cyclic stream and demands); each over its link, the longer
    of the two. None for a dense model or without a decode step or a pool."""
    if not plan or not plan.routed or not decode or not steps:
        return None
    terms, routed, cpu = {}, set(plan.routed), plan.cpu_for(batch)
    per_step = {"disk": decode["disk_bytes"] / steps, "h2d": 0.0}
    if plan.is_cuda and lk.get("h2d"):
        moving = set(plan.dram) | set(plan.stream)
        fixed = sum(plan.group_bytes[g] for g in plan.sequence if g in moving and g not in routed and g not in cpu)
        per_step["h2d"] = fixed + decode["expert_h2d_bytes"] / steps
        terms["h2d"] = per_step["h2d"] / (lk["h2d"]["gbps"] * GB) * 1e3
    if per_step["disk"] and lk.get("disk"):
        terms["disk"] = per_step["disk"] / (lk["disk"]["gbps"] * GB) * 1e3
    if not terms:
        return {"step_ms": None, "limited_by": None, "terms_ms": {}, "bytes_per_step": per_step, "ratio": None}
    limited = max(terms, key=terms.get)
    return {"step_ms": terms[limited], "limited_by": limited, "terms_ms": terms, "bytes_per_step": per_step,
            "ratio": step_ms / terms[limited] if step_ms and terms[limited] else None}


def experts_line(c: dict) -> str:
    """One line of a run's expert counters (a streamed source's ``expert_stats``, prefill and decode together): the
    experts fetched from each tier and its share (hit rate), and the prefetch guess's (``run --verbose``)."""
    fetched = sum(c[f"experts_{t}"] for t in EXPERT_TIERS)
    tiers = ", ".join(f"{t} {c[f'experts_{t}']} ({c[f'experts_{t}'] / fetched if fetched else 0:.0%})"
                      for t in EXPERT_TIERS)
    gr = guess_report(c)
    guess = (f"; prefetch guess right for {gr['hit_rate'] or 0:.0%} of the experts chosen in {gr['layers']} layers, "
             f"{prefetch_text(gr)}" if gr else "; no prefetch guess (no router resident a layer ahead)")
    return f"experts: {c['routings']} layer routings fetched {fetched}: {tiers}{guess}"


def _bytes(plan, groups) -> int:
    return sum(plan.group_bytes[g] for g in groups)


def _delta(a: dict | None, b: dict | None) -> dict[str, int] | None:
    return None if a is None or b is None else {k: b[k] - a[k] for k in a}


@dataclass
class Round:
    """Wall-clock stamps of one generation: start, each token's arrival on the host, end; pool counters at
    the start and at each token."""

    start: float = 0.0
    stamps: list[float] = field(default_factory=list)
    counters: list[dict | None] = field(default_factory=list)
    end: float = 0.0
    tokens: list[list[int | None]] = field(default_factory=list)  # per step, each sequence's token
    results: list = field(default_factory=list)  # runtime.engine.generate.GenerationResult per sequence
    kv_after_prefill: tuple[int, int] = (0, 0)  # KV bytes moved (H2D, D2H) by the end of prefill ...
    kv_end: tuple[int, int] = (0, 0)  # ... and by the end
    host_ms: tuple[float, float] = (0.0, 0.0)  # host attention: the CPU's attention, its wait for q, k, v (ms)
    attended: float | None = None  # with --topk-blk: the fraction of KV blocks decode attention read
    kv_alloc_ms: float = 0.0  # the KV cache's allocation, inside the prefill time (an offloaded one is pinned)
    kv_host_bytes: int = 0  # an offloaded cache's host store
    by_sequence: bool = False  # the batch was prefilled whole prompts at a time (Generator._prefill)
    speculative: dict | None = None  # --draft: runtime.engine.speculative.SpecStats.to_dict

    @property
    def step_ms(self) -> list[float]:
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]

    @property
    def step_disk_bytes(self) -> list[int] | None:
        """Bytes the pool's workers read during each decode step (None without a pool)."""
        if self.counters[0] is None:
            return None
        return [y["disk_bytes"] - x["disk_bytes"] for x, y in zip(self.counters[1:], self.counters[2:])]

    def timings(self, batch: int) -> dict[str, float]:
        ttft = (self.stamps[0] - self.start) * 1e3
        steps = self.step_ms
        decode, e2e = sum(steps), (self.end - self.start) * 1e3
        return {"prefill_ms": ttft, "first_token_decode_ms": steps[0] if steps else 0.0, "ttft_ms": ttft,
                "decode_ms": decode, "e2e_ms": e2e,
                "throughput_tok_s": batch * len(steps) / (decode / 1e3) if decode > 0 else 0.0,
                "end_to_end_tok_s": batch * len(self.tokens) / (e2e / 1e3)}


def run_round(gen, source, prompts: Sequence[list[int]], sampling, on_step=None) -> Round:
    """One whole generation of the batch: every sequence decodes ``max_new_tokens`` (no stop tokens).
    ``on_step`` also gets each pass's tokens (the pool's server sends them on)."""
    r = Round()

    def record(toks: list[int | None]) -> None:  # called once the step's tokens are on the host
        r.stamps.append(time.perf_counter())
        r.counters.append(pool_counters(source))
        r.tokens.append(toks)
        if len(r.tokens) == 1:
            r.kv_after_prefill = gen.kv_moved()
            r.by_sequence = gen.prefilled_by_sequence
        if on_step is not None:
            on_step(toks)

    gen.reset_counters()
    r.counters.append(pool_counters(source))
    r.start = time.perf_counter()
    r.results = gen.generate_batch(prompts, sampling, frozenset(), record)
    r.end = time.perf_counter()
    r.kv_end = gen.kv_moved()
    r.host_ms = gen.host_attention_ms()
    r.kv_alloc_ms = gen.cache_alloc_ms
    r.kv_host_bytes = gen.cache.host_bytes if gen.cache is not None else 0
    r.attended = gen.attended_fraction()
    if hasattr(gen, "stats"):  # speculative: every pass's tokens arrive at once, so a pass is the step
        r.speculative = gen.report()
    return r


# ---- the report ------------------------------------------------------------------------------------------

def io_report(r: Round, plan, decode_s: float, steps: int) -> dict[str, Any]:
    """Bytes per token by tier (plan), bytes read per phase (pool counters) and achieved GB/s per link."""
    prefill, decode = _delta(r.counters[0], r.counters[1]), _delta(r.counters[1], r.counters[-1])
    disk_pp = plan.disk_bytes_per_pass if plan else 0
    h2d_pp = plan.h2d_bytes_per_pass if plan else 0
    per_token = {"disk": disk_pp, "h2d": h2d_pp, "gpu_resident": plan.gpu_tier_bytes if plan else None,
                 "dram_tier": _bytes(plan, plan.dram) if plan else 0, "stream": disk_pp}
    disk_read = decode["disk_bytes"] if decode else 0
    h2d_moved = h2d_pp * steps
    achieved = {"disk_GBps": disk_read / decode_s / GB if decode_s > 0 else 0.0,
                "h2d_GBps": h2d_moved / decode_s / GB if decode_s > 0 else 0.0}
    if decode:
        decode = {**decode, "steps": steps, "disk_bytes_per_step": disk_read / steps if steps else 0.0}
    return {"bytes_per_token": per_token, "prefill_io": prefill, "decode_io": decode, "achieved": achieved,
            "h2d_bytes_decode": h2d_moved}


def bound_report(plan, lk: dict, step_ms: float | None, host_kv_bytes: float = 0,
                 kv_h2d_bytes: float = 0) -> dict[str, Any]:
    """max(disk bytes / disk GB/s, H2D bytes (weights + the offloaded KV cache read back) / H2D GB/s,
    host-attended KV bytes / the CPU's attention rate, the CPU compute set's bytes / the CPU's rate where the plan
    priced it) per decode step, and achieved / bound."""
    terms = {}
    if host_kv_bytes and lk.get("host_attention"):
        terms["host_attention"] = host_kv_bytes / (lk["host_attention"]["gbps"] * GB) * 1e3
    if plan and plan.disk_bytes_per_pass:
        terms["disk"] = plan.disk_bytes_per_pass / (lk["disk"]["gbps"] * GB) * 1e3
    if plan and (plan.h2d_bytes_per_pass or kv_h2d_bytes) and lk["h2d"]:
        terms["h2d"] = (plan.h2d_bytes_per_pass + kv_h2d_bytes) / (lk["h2d"]["gbps"] * GB) * 1e3
    if plan and getattr(plan, "cpu", ()) and getattr(plan, "pipes_ms", None):
        terms["cpu"] = plan.pipes_ms["cpu"]  # --cpu-compute: the CPU set, priced when planned
    if not terms:
        return {"step_ms": None, "limited_by": None, "terms_ms": {}, "decode_step_ms": step_ms, "ratio": None,
                "why_none": "no weight bytes move per step (compute time is not modelled yet)"}
    limited = max(terms, key=terms.get)
    ratio = step_ms / terms[limited] if step_ms else None
    return {"step_ms": terms[limited], "limited_by": limited, "terms_ms": terms, "decode_step_ms": step_ms,
            "ratio": ratio}


def memory_report(device: torch.device, source, handle) -> tuple[dict, dict]:
    """gpu_mem_GB (the original keys + peak) and host memory: RSS, peak RSS, pinned (registered ring) bytes."""
    import torch

    cuda = device.type == "cuda"
    gpu = {"allocated_GB": torch.cuda.memory_allocated(device) / GB if cuda else 0.0,
           "reserved_GB": torch.cuda.memory_reserved(device) / GB if cuda else 0.0,
           "peak_allocated_GB": torch.cuda.max_memory_allocated(device) / GB if cuda else 0.0}
    ring = handle.ring_bytes if handle is not None else 0
    rss = psutil.Process().memory_info().rss
    peak = max(rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # ru_maxrss: KiB on Linux
    host = {"rss_GB": rss / GB, "peak_rss_GB": peak / GB,
            "ring_GB": ring / GB, "pinned_GB": source.pinned_bytes / GB}
    return gpu, host


def kv_rates(r: Round, decode_ms: float) -> dict[str, float]:
    """KV MB/s each way during decode (the original keys), from the bytes the KV cache moved."""
    s = decode_ms / 1e3
    h2d, d2h = (r.kv_end[i] - r.kv_after_prefill[i] for i in (0, 1))
    return {"kv_h2d_MBps": h2d / s / MB if s > 0 else 0.0, "kv_d2h_MBps": d2h / s / MB if s > 0 else 0.0}


@dataclass
class BenchContext:
    """What a report is built from besides the round: the run's plan, links and memory, its inputs and load."""

    plan: Plan | None
    links: dict[str, Any]
    prompts: list[list[int]]
    memory: tuple[dict, dict]
    device: torch.device
    image: Image
    source: WeightSource
    host_layers: int  # layers whose decode attention ran on the CPU (the Generator's)
    tokenizer: Tokenizer | None = None
    load_ms: float = 0.0
    load_breakdown_ms: dict[str, float] = field(default_factory=dict)
    process_to_first_token_ms: float | None = None
    open_to_first_token_ms: float | None = None
    cut: list = field(default_factory=list)
    unused: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    expert_usage: list[list[int]] | None = None  # a mixture, with --out-json: the measured round's routings


def build_report(cfg: BenchConfig, engine: EngineConfig, ctx: BenchContext, r: Round) -> dict[str, Any]:
    plan, lk, n = ctx.plan, ctx.links, cfg.batch_size
    t = r.timings(n)
    # a decode step is a weight pass: one per token, or with --draft one per verified tree (several tokens)
    steps = r.speculative["passes"] if r.speculative else len(r.step_ms)
    io = io_report(r, plan, t["decode_ms"] / 1e3, steps)
    step_ms = t["decode_ms"] / steps if steps else None
    host_kv = 0
    if ctx.host_layers and steps:  # the decode steps attended over the host cache: their bytes and time
        image = ctx.image
        # step i reads slots [0, longest + i] of every sequence
        mean_len = max(len(p) for p in ctx.prompts) + (steps + 1) / 2
        host_kv = kv_cache_bytes(image, n, mean_len) * ctx.host_layers / image.args.n_layers
        host = host_attention_link(host_kv, r.host_ms[0] / steps)
        if host is not None:
            lk = {**lk, "host_attention": host}
    kv_h2d = (r.kv_end[0] - r.kv_after_prefill[0]) / steps if steps else 0.0  # the offloaded cache read back
    bound = bound_report(plan, lk, step_ms, host_kv, kv_h2d)
    gpu_mem, host_mem = ctx.memory
    weight_h2d = io["h2d_bytes_decode"] / (t["decode_ms"] / 1e3) / MB if t["decode_ms"] > 0 else 0.0
    out = {"batch_size": n, "max_new_tokens": cfg.max_new_tokens, "prompt_lens": [len(p) for p in ctx.prompts],
           "prefill_tokens_total": sum(len(p) for p in ctx.prompts), "decode_tokens_total": n * steps, **t,
           "io_bw_MBps": {"weight_h2d_MBps": weight_h2d, **kv_rates(r, t["decode_ms"])},
           "gpu_mem_GB": gpu_mem, "mode": engine.placement.mode, "device": device_name(ctx.device)}
    out["kv"] = {"offload": ctx.source.kv_offload, "block_tokens": engine.kv.block_tokens,
                 "topk_blk": engine.kv.topk_blk, "host_attention": bool(ctx.host_layers),
                 "host_attention_layers": ctx.host_layers,
                 "host_kv_bytes_per_step": host_kv, "h2d_bytes_per_step": kv_h2d,
                 # measured in the run: the CPU's attention per decode step, and its wait for the queries
                 "host_attention_ms_per_step": r.host_ms[0] / steps if steps else 0.0,
                 "host_wait_ms_per_step": r.host_ms[1] / steps if steps else 0.0,
                 "decode_h2d_bytes": r.kv_end[0] - r.kv_after_prefill[0],
                 "decode_d2h_bytes": r.kv_end[1] - r.kv_after_prefill[1], "prefill_h2d_bytes": r.kv_after_prefill[0],
                 "prefill_d2h_bytes": r.kv_after_prefill[1], "prefill_by_sequence": r.by_sequence,
                 "attended_block_fraction": r.attended,
                 "alloc_ms": r.kv_alloc_ms, "host_bytes": r.kv_host_bytes}
    tok = ctx.tokenizer
    out["results"] = [{"prompt_token_ids": x.prompt_token_ids, "output_token_ids": x.output_token_ids,
                       "text": tok.answer_text(x.output_token_ids) if tok else None} for x in r.results]
    out["experts"] = expert_report(io["prefill_io"], io["decode_io"], n * steps)
    if ctx.expert_usage is not None:  # drawn beside the JSON by emit (runtime/measure/heatmap.py)
        out["expert_usage"] = {"counts": ctx.expert_usage, "routed": sum(map(sum, ctx.expert_usage)), "png": None}
    if out["experts"] is not None:
        out["experts"]["bound_moved"] = moved_bound(plan, lk, io["decode_io"], steps, n, step_ms)
    out.update({"generated_tokens_total": n * len(r.tokens), "warmup_rounds": cfg.warmup_rounds,
                "load_ms": ctx.load_ms, "load_breakdown_ms": ctx.load_breakdown_ms,
                "process_start_to_first_token_ms": ctx.process_to_first_token_ms,
                "open_to_first_token_ms": ctx.open_to_first_token_ms, "step_ms": r.step_ms,
                "step_disk_bytes": r.step_disk_bytes,
                "image": {"path": str(ctx.image.path), "manifest": str(ctx.image.manifest_path),
                          "dtype": ctx.image.dtype, "stored_as": ctx.image.format_summary()},
                "checkpoints": cfg.checkpoints, "prompts_file": cfg.prompts, "prompt_truncation": ctx.cut,
                "plan": plan.to_dict() if plan else None, **{k: io[k] for k in ("bytes_per_token", "prefill_io",
                                                                                "decode_io")},
                "achieved_GBps": io["achieved"], "links": lk, "bound": bound,
                "achieved_over_bound": bound["ratio"], "host_mem_GB": host_mem,
                "unused_flags": ctx.unused, "notes": NOTES + ctx.notes, "speculative": r.speculative,
                "flags": {"bench": dataclasses.asdict(cfg), "engine": engine.to_dict()}})
    return out


# ---- printing --------------------------------------------------------------------------------------------

def plan_line(plan) -> str:
    if plan is None:
        return "none (--mode full: every group loaded onto the device)"
    return (f"{plan.mode} on {plan.device}: gpu {len(plan.gpu)} groups {fmt_gb(plan.gpu_tier_bytes)}, dram "
            f"{len(plan.dram)} groups {fmt_gb(_bytes(plan, plan.dram))} (+ host {fmt_gb(plan.host_bytes)}), stream "
            f"{len(plan.stream)} groups {fmt_gb(plan.disk_bytes_per_pass)} through {plan.window_slots} slots, "
            f"staging {plan.staging_buffers} x {fmt_gb(plan.slot_bytes)}")


def bytes_line(tok: dict, cuda: bool) -> str:
    if tok["gpu_resident"] is None:
        return "none move (--mode full)"
    h2d = (f"H2D {fmt_gb(tok['h2d'])} (dram tier {fmt_gb(tok['dram_tier'])} + stream {fmt_gb(tok['stream'])})" if cuda
           else f"no H2D (the CPU reads the dram tier's {fmt_gb(tok['dram_tier'])} in place)")
    return f"disk {fmt_gb(tok['disk'])}, {h2d}, resident {fmt_gb(tok['gpu_resident'])}"


def link_line(achieved: float, link: dict | None, moved: float) -> str:
    if link is None:
        return "no H2D link (the model computes on the CPU)"
    how = "measured" if link["source"] == "measured" else f"given with {link['source']}"
    return f"{fmt_gb(moved)} in decode, {achieved:.3f} GB/s achieved of {link['gbps']:.3f} GB/s ({how})"


def bound_line(rep: dict) -> str:
    b = rep["bound"]
    if b["step_ms"] is None:
        return f"none: {b['why_none']}"
    lim = b["limited_by"]
    moved = (rep["kv"]["host_kv_bytes_per_step"] if lim == "host_attention"
             else rep["bytes_per_token"]["disk"] if lim == "disk"
             else rep["bytes_per_token"]["h2d"] + rep["kv"]["h2d_bytes_per_step"])  # weights + KV read back
    if b["ratio"] is None:
        return f"bound {b['step_ms']:.1f} ms per decode step; no decode step was measured (--max-new-tokens 1)"
    low = " (below 1: the link figure is low, e.g. a short measurement)" if b["ratio"] < 0.95 else ""
    if lim == "cpu":  # --cpu-compute: the CPU set's groups at the rates measured when planned
        plan = rep.get("plan") or {}
        how = (f"the CPU computes {fmt_gb(plan.get('cpu_bytes_per_pass') or 0)} in place at the rates measured when "
               f"planned; the link's pipe {b['terms_ms'].get('h2d', 0):.1f} ms")
    else:
        how = f"{lim} {fmt_gb(moved)} @ {rep['links'][lim]['gbps']:.2f} GB/s"
    return (f"decode step {b['decode_step_ms']:.1f} ms, bound {b['step_ms']:.1f} ms ({how}), "
            f"achieved/bound {b['ratio']:.2f}{low}")


def summary(rep: dict, plan_text: str) -> str:
    """The original block, then ours (``plan_text``: plan_line of the run's plan)."""
    ours = {"weights": rep["image"]["stored_as"], "plan": plan_text,
            "bytes_per_token": bytes_line(rep["bytes_per_token"], rep["device"].startswith("cuda")),
            "disk": link_line(rep["achieved_GBps"]["disk_GBps"], rep["links"]["disk"],
                              (rep["decode_io"] or {}).get("disk_bytes", 0)),
            "h2d": link_line(rep["achieved_GBps"]["h2d_GBps"], rep["links"]["h2d"],
                             rep["io_bw_MBps"]["weight_h2d_MBps"] * MB * rep["decode_ms"] / 1e3),
            "bound": bound_line(rep)}
    ex = rep.get("experts")
    if ex:
        ours["experts"] = ("per token " + ", ".join(
            f"{t} {ex['experts_per_token'][t]:.2f} ({fmt_gb(ex['bytes_per_token'][t])}, hit rate "
            f"{ex['hit_rate'][t] or 0:.2f})" for t in EXPERT_TIERS) + f"; {ex['skipped_per_token']:.1f} not chosen")
        gr = ex.get("prefetch_guess")
        if gr:
            ours["prefetch guess"] = (f"{gr['hit_rate'] or 0:.0%} of the experts chosen were guessed a layer ahead "
                                      f"({gr['layers']} layers; {gr['guessed_per_layer']:.1f} guessed and "
                                      f"{gr['chosen_per_layer']:.1f} chosen a layer, {gr['precision'] or 0:.0%} of "
                                      f"the guessed chosen); {prefetch_text(gr)}")
        mb = ex.get("bound_moved")
        if mb and mb["step_ms"] is not None:
            per = mb["bytes_per_step"][mb["limited_by"]]
            ratio = f", achieved/bound {mb['ratio']:.2f}" if mb["ratio"] is not None else ""
            ours["bound (moved)"] = (f"{mb['step_ms']:.1f} ms per decode step from the bytes it moved "
                                     f"({mb['limited_by']} {fmt_gb(per)} a step){ratio}")
    kv = rep["kv"]
    if kv.get("host_attention"):
        ms, gb = kv["host_attention_ms_per_step"], kv["host_kv_bytes_per_step"]
        lk = rep["links"].get("host_attention") or {}
        rate = f" ({lk['gbps']:.1f} GB/s in the run)" if ms > 0 and "gbps" in lk else ""
        ours["host attention"] = (f"{kv['host_attention_layers']} layers: {ms:.1f} ms of CPU attention per decode "
                                  f"step over {fmt_gb(gb)}{rate}, after {kv['host_wait_ms_per_step']:.1f} ms waiting "
                                  f"for the device's queries")
    sp = rep.get("speculative")
    if sp:
        acc = " ".join(f"{a:.2f}" for a in sp["acceptance_by_depth"][:8] if a is not None)
        ours["speculative"] = (f"draft {sp['draft']}, {sp['tree_tokens']} tree tokens a pass: {sp['passes']} passes "
                               f"gave {sp['tokens']} tokens ({sp['tokens_per_pass'] or 0:.2f} a pass); draft "
                               f"{sp['draft_ms']:.0f} ms, verify {sp['verify_ms']:.0f} ms; walks reaching depth 1..: "
                               f"{acc}; tree size: {sp['tree_tokens_choice']}")
    width = max(map(len, [*SUMMARY_KEYS, *ours]))
    lines = ["=== Benchmark Summary ==="]
    lines += [f"  {k:>{width}}: {rep[k]:.{2 if k.endswith('tok_s') else 3}f}" for k in SUMMARY_KEYS]
    lines += [f"  {k:>{width}}: {v}" for k, v in ours.items()]
    return "\n".join(lines)


def verbose_lines(rep: dict, describe: str | None) -> str:
    lines = [describe or "placement: none (--mode full)"]
    for name, lk in rep["links"].items():
        if lk and lk["source"] == "measured":
            lines.append(f"link {name}: {lk['gbps']:.3f} GB/s: {lk['method']}")
    disk_bytes = rep["step_disk_bytes"]
    for i, ms in enumerate(rep["step_ms"]):
        disk = f", disk {fmt_gb(disk_bytes[i])} read" if disk_bytes else ""
        lines.append(f"decode step {i + 1}: {ms:.3f} ms{disk}")
    return "\n".join(lines)


# ---- the command -----------------------------------------------------------------------------------------

def run_local(cfg: BenchConfig, engine: EngineConfig, image: Image, prompts: list[list[int]], max_len: int,
              cut: list, tok: Tokenizer | None, early: EarlyStart | None) -> None:
    """The bench in this process: measure the links, open the weight source, run the warm-up rounds and the
    measured one, print (and write) the report."""
    from runtime.engine.generate import pick_device  # torch: after start_early's pool started
    from runtime.engine.speculative import run_generator

    device = pick_device(cfg.device)
    lk = links(cfg, image, device, engine.pool.workers)
    if device.type == "cuda":  # the CUDA context is the process's start-up, whether or not links were measured
        import torch

        torch.empty(1, device=device)
        torch.cuda.synchronize(device)
    to_open_ms = process_age_s() * 1e3
    t0 = time.perf_counter()
    with open_source(image, engine, device, batch=cfg.batch_size, max_len=max_len, early=early) as (source, plan,
                                                                                                   handle):
        load_ms = (time.perf_counter() - t0) * 1e3
        counter = None  # a mixture's routings per layer and expert, for the heatmap beside the JSON
        if cfg.out_json and image.args.n_experts:
            from runtime.measure.routing import RoutingCounter

            counter = RoutingCounter(source, image.args.n_layers, image.args.n_experts)
        gen = run_generator(counter or source, engine, image, max_len)
        first = None
        for i in range(cfg.warmup_rounds):
            first = first or run_round(gen, source, prompts, cfg.sampling)
            print(f"warm-up round {i + 1}/{cfg.warmup_rounds} done", file=sys.stderr)
        before = [row[:] for row in counter.counts] if counter else None
        r = run_round(gen, source, prompts, cfg.sampling)
        usage = [[a - b for a, b in zip(x, y)] for x, y in zip(counter.counts, before)] if counter else None
        memory = memory_report(device, source, handle)
        breakdown = source.load_ms
    first = first or r
    # The process's first token against the process's start: the whole cold-start cost a user waits for,
    # interpreter and CUDA start-up included.
    to_first_ms = (process_age_s() - (time.perf_counter() - first.stamps[0])) * 1e3
    notes = [] if device.type == "cuda" else ["no H2D link: the model computes on the CPU from ring memory"]
    ctx = BenchContext(plan, lk, prompts, memory, device, image, source, gen.host_layers, tok, load_ms,
                       {"process_start_to_load": to_open_ms, **breakdown}, to_first_ms,
                       (first.stamps[0] - t0) * 1e3, cut, cfg.unused_flags(), notes, usage)
    emit(cfg, build_report(cfg, engine, ctx, r), plan_line(plan), plan.describe() if plan else None)


def emit(cfg: BenchConfig, rep: dict, plan_text: str, placement: str | None) -> None:
    """The summary block, the verbose lines with --verbose, and the JSON with --out-json."""
    print(summary(rep, plan_text))
    if cfg.verbose:
        print(verbose_lines(rep, placement))
    if cfg.out_json:
        usage = rep.get("expert_usage")
        if usage is not None:
            from runtime.measure.heatmap import expert_heatmap, heatmap_path

            usage["png"] = expert_heatmap(usage["counts"], heatmap_path(cfg.out_json),
                                          f"tokens routed per expert, measured round ({usage['routed']} routings)")
            if usage["png"]:
                print(f"expert heatmap written to {usage['png']}")
        Path(cfg.out_json).write_text(json.dumps(rep, indent=1))
        print(f"JSON written to {cfg.out_json}")
