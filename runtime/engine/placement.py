"""Placement: which weight groups stay on the GPU, which stay pinned in DRAM, which stream from disk.

docs/DESIGN.md, the cost model and placement. One forward pass uses the groups in a fixed cyclic order
(``pass_sequence``; model/groups.py names them from the architecture's schema): each layer's groups, one of
each layer kind in order (a dense decoder's attention, then its FFN), then the head, then the embedding only
for tied models, where it is the output matrix (the final norm is applied first, so each group's weights are
used before the next group is fetched). LRU on a
cyclic scan larger than the cache hits nothing, so the plan is a set of *fixed* tiers for the whole run:

    gpu     resident on the compute device; never copied again           costs GPU bytes once
    dram    pinned in ring slots; copied to the GPU every pass           costs DRAM bytes once, H2D every pass
    stream  read from disk every pass through a window of W ring slots   costs disk + H2D every pass
    host    the embedding (``HOST_GROUP``) for the token lookup: always pinned in the ring and gathered there, never
            copied to the GPU for the lookup. Counted in DRAM bytes only. When the model is tied, its use as
            the output matrix is placed like any group, except that it never streams: its bytes are already
            pinned in DRAM for the lookups, so it is either in the GPU tier or in the DRAM tier (the same
            bytes as the host copy, counted once). Reading it from disk every pass would buy nothing.

Per pass (decode step or prefill chunk), time >= max(H2D bytes / link, disk bytes / disk, compute), with
H2D bytes = dram + stream groups of the sequence (CUDA only) and disk bytes = streamed groups.

Which groups go to the GPU tier. For decode every byte costs the same, so only the byte count matters. For
prefill each weight copy must hide under the compute of the groups ahead of it (the copy stream runs at most K
groups ahead): the FFN groups carry the most bytes per FLOP (70B, 2048-token chunk: 1.41 GB for 3.84 ms,
against attention's 0.30 GB for 0.94 ms plus the token-quadratic score FLOPs that need no weights), so they are
the copies hardest to hide and the first to keep resident; then attention, then the head (and a tied
embedding). Each layer kind's ``gpu_rank`` (model/arch/schema.py) gives that order. The resident groups of a
kind are spread evenly over the pass, not the first ones: with the copy stream at most K groups ahead, every
stretch of the pass should carry its share of the copies, so that none idles the link while another makes the
compute wait (the CPU's attention per layer with --host-attention). One more effect can beat that order: every
staging buffer and window slot is as large as the largest group that passes through it, so keeping the largest
group resident (the 70B head, 2.1 GB, or a tied 1B embedding) can free more staging than it costs.
``_fill_gpu`` therefore tries every slot size (groups larger than it are forced resident, the rest filled in
preference order) and keeps the plan with the most resident bytes; ties keep the plain preference order.

Which groups go to the DRAM tier: after reserving the window (W slots) and the host embedding, groups in pass
order, first fit. Any choice with the same bytes is equal for decode (every DRAM or streamed byte crosses
H2D each pass; every streamed byte also crosses the disk).

Window: W = ``prefetch_distance`` (ring slots, in groups) or 2 * ``group_prefetch_depth`` by default. Fewer
than 2 is an error (one slot being filled from disk while another is being copied is the smallest window
that overlaps anything); more than the number of streamed groups is clamped to that number (extra slots
would never be used), and W is 0 when nothing streams. K staging buffers on the GPU (K =
``group_prefetch_depth``) when anything is not resident, 0 on the CPU. On the CPU there is no GPU tier
unless ``gpu_cached_layers`` is given: those layers are then held in the client's own memory, same rules.

A mixture of experts (model/arch/moe.py) is not a cyclic scan in its experts: a pass fetches only the experts its
tokens chose (model/transformer.py ``forward_groups``), so an expert is worth its bytes in a tier by how often it is
routed. ``use`` (``expert_use``) is each expert's expected share of batch-1 passes that fetch it: its routing
counts measured on text (``--expert-counts FILE``, a JSON kept beside the image, ``IMAGE.expert-counts.json``),
else k / n for every one. Every other group has use 1. The GPU tier takes the groups every token uses first (the
attention group with its router and the shared expert by ``gpu_rank``, then the head), then the experts, the most
used first; the DRAM tier the same order; the rest stay on disk. A streamed expert is not in the cyclic stream: the
pool reads it on demand into D *demand slots* per client (``demand_slots``: min(W, the most disk experts of a
layer), each as large as the largest such expert), once its layer has routed; of them, up to ``expert_prefetch``
(min(--expert-prefetch, D - 1): one slot always left to the layer's own reads) take the experts the prefetch guess
names a layer ahead (runtime/engine/streamed.py), so the guess's reads need no memory of their own (none where no
router after the first layer is within reach a layer early: ``guessed``). The per-pass byte counts are then
expectations at batch 1 (each group's bytes times its use), which the plan prints with where ``use`` came from.

The CPU compute set (issue 28, the split; ``--cpu-compute off|auto|N``, off by default). On CUDA a decode step
is its non-resident bytes over the link, while the DRAM tier sits beside a second pipe: the CPU's own memory
bandwidth. So some DRAM-tier groups of a stateless kind (``model.groups.stateless_kinds``: a dense decoder's FFN)
are not copied at all: the CPU computes them in place from their ring slot, h crossing the link (a few KB), while
the link copies the others. N takes that many such groups; auto the count whose two pipes finish together, the
least max(link bytes / link rate, CPU bytes / CPU rate) from a cost table (``CostTable``: ``Rates`` of measured
GB/s, or a test's fake). Either way the set is spread evenly over the pass in layer order (``spread_layers``), so
that the link copies the next streamed group while the CPU computes. It applies to passes of at most
``cpu_tokens_max`` tokens (decode steps of small batches): a prefill chunk, a large batch or a speculative tree
would make the CPU compute-bound, so such passes copy every group to the GPU as before. On the CPU there is no
link: everything already computes on the CPU and the set is empty.

Every infeasible request raises ``ConfigError`` naming the budget, the bytes needed and the bytes there are;
nothing is clamped silently. Pure computation: runs in whichever process plans (launch.py run/bench), owns
nothing. Check it with ``python -m pytest -q tests/test_placement.py``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from model.arch import EMBED, architecture
from model.args import ModelArgs, human_bytes
from model.errors import ConfigError
from model.groups import (
    group_kind,
    group_names,
    layer_group,
    layer_groups,
    routed_groups,
    routed_kinds,
    spread_layers,
    stateless_kinds,
)
from runtime.engine.config import cpu_compute_value
from runtime.format.image import plan_layout

MODES = ("preload", "stream", "mixed")
HOST_GROUP = EMBED
_DRAM_HINTS = {"preload": "raise --dram-gb, or use --mode mixed (or stream) to stream what does not fit",
               "mixed": "raise --dram-gb, or lower --cpu-cache-layers or --prefetch-distance",
               "stream": "raise --dram-gb, or lower --prefetch-distance"}
CPU_TOKENS_MAX = 8  # a pass of more tokens computes every group on the GPU (the CPU would be compute-bound)


class CostTable(Protocol):
    """Seconds each pipe takes for a pass of at most ``CPU_TOKENS_MAX`` tokens (``--cpu-compute auto``)."""

    def link_s(self, nbytes: int) -> float:
        """``nbytes`` of weights over the host -> GPU link."""

    def cpu_s(self, group: str, nbytes: int) -> float:
        """Group ``group`` (``nbytes`` as stored) computed by the CPU in place."""

    def describe(self) -> str:
        """Where the rates come from, for the plan's table."""


@dataclass(frozen=True)
class Rates:
    """A cost table from two measured rates: the link's GB/s and the GB/s of weights the CPU kernels stream."""

    link_gbps: float
    cpu_gbps: float

    def __post_init__(self) -> None:
        for key in ("link_gbps", "cpu_gbps"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be positive, found {getattr(self, key)!r}")

    def link_s(self, nbytes: int) -> float:
        return nbytes / (self.link_gbps * 1e9)

    def cpu_s(self, group: str, nbytes: int) -> float:
        return nbytes / (self.cpu_gbps * 1e9)

    def describe(self) -> str:
        return f"given: link {self.link_gbps:g} GB/s, CPU {self.cpu_gbps:g} GB/s"


@dataclass(frozen=True)
class Budgets:
    gpu_bytes: int | None  # GPU tier and everything else on the GPU: KV cache, activations, K staging buffers
    dram_bytes: int | None  # the ring: DRAM tier + window slots + host embedding
    kv_bytes: int = 0  # KV cache the caller allocates on the GPU (reserved first)
    activation_bytes: int = 0  # workspace estimate reserved on the GPU
    draft_bytes: int = 0  # a speculative run's draft model, wholly on the GPU (reserved first)

    def __post_init__(self) -> None:
        for key in ("gpu_bytes", "dram_bytes", "kv_bytes", "activation_bytes", "draft_bytes"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ConfigError(f"budget {key} must be a non-negative integer of bytes, found {v!r}")
        for key in ("kv_bytes", "activation_bytes", "draft_bytes"):
            if getattr(self, key) is None:
                raise ConfigError(f"budget {key} must be an integer of bytes, found None")


@dataclass(frozen=True)
class Plan:
    mode: str  # "preload" | "stream" | "mixed"
    sequence: tuple[str, ...]  # groups in pass order
    gpu: tuple[str, ...]  # resident on the compute device for the whole run
    dram: tuple[str, ...]  # pinned in DRAM ring slots for the whole run, copied to the GPU every pass
    stream: tuple[str, ...]  # read from disk every pass through the window
    window_slots: int  # W ring slots for the streamed set (0 if nothing streams)
    staging_buffers: int  # K GPU staging buffers (group prefetch depth), 0 on the CPU
    slot_bytes: int  # one window slot / staging buffer: the largest group that passes through them
    group_bytes: Mapping[str, int]
    host: tuple[str, ...] = (HOST_GROUP,)  # pinned in DRAM for the token lookup, never copied for it
    device: str = "cuda"
    budgets: Budgets = field(default_factory=lambda: Budgets(None, None))
    stored_as: str = ""  # the image's weight formats (runtime.format.image.Image.format_summary)
    labels: Mapping[str, str] = field(default_factory=dict)  # layer kind -> its label in ``describe`` (kind_labels)
    routed: tuple[str, ...] = ()  # a mixture's routed groups (its experts), fetched only where a token chose them
    use: Mapping[str, float] = field(default_factory=dict)  # routed group -> expected share of passes fetching it
    routing_from: str = ""  # where ``use`` came from: an expert-counts file, or "uniform" (k / n)
    demand_slots: int = 0  # D ring slots per client for the streamed experts, read on demand
    demand_slot_bytes: int = 0  # one demand slot: the largest streamed expert
    expert_prefetch: int = 0  # of the demand slots, the most a layer's guessed experts take a layer ahead (D - 1)
    cpu: tuple[str, ...] = ()  # DRAM-tier groups the CPU computes in place in passes of <= cpu_tokens_max tokens
    cpu_compute: str = "off"  # the request: "off", "auto" or a count
    cpu_tokens_max: int = CPU_TOKENS_MAX
    pipes_ms: Mapping[str, float] = field(default_factory=dict)  # "link", "cpu": a small pass's ms (with a cost table)
    costs_from: str = ""  # the cost table's rates (CostTable.describe)

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_bytes", MappingProxyType(dict(self.group_bytes)))
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        object.__setattr__(self, "use", MappingProxyType(dict(self.use)))
        object.__setattr__(self, "pipes_ms", MappingProxyType(dict(self.pipes_ms)))

    # ---- derived byte counts ----------------------------------------------------------------------
    def _sum(self, names) -> int:
        return sum(self.group_bytes[g] for g in names)

    def _expected(self, names) -> int:
        """Bytes of ``names`` a batch-1 pass fetches on average: a routed group's times its use."""
        return round(sum(self.group_bytes[g] * self.use.get(g, 1.0) for g in names))

    @property
    def cyclic(self) -> tuple[str, ...]:
        """The streamed groups the cyclic stream reads every pass (the disk tier less its experts)."""
        routed = set(self.routed)
        return tuple(g for g in self.stream if g not in routed)

    @property
    def demand(self) -> tuple[str, ...]:
        """The streamed experts: read by the pool on demand, only in passes whose tokens chose them."""
        routed = set(self.routed)
        return tuple(g for g in self.stream if g in routed)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def cpu_for(self, tokens: int) -> frozenset[str]:
        """The groups the CPU computes in place in a pass of ``tokens`` tokens (B x S): the CPU set for at most
        ``cpu_tokens_max``, none for more (a prefill chunk, a large batch, a tree: the GPU computes them)."""
        return frozenset(self.cpu) if tokens <= self.cpu_tokens_max else frozenset()

    @property
    def gpu_tier_bytes(self) -> int:
        return self._sum(self.gpu)

    @property
    def host_bytes(self) -> int:
        return self._sum(self.host)

    @property
    def dram_tier_bytes(self) -> int:
        """DRAM tier plus the host embedding, counted once when it is both (a tied model)."""
        return self._sum(set(self.dram) | set(self.host))

    @property
    def window_bytes(self) -> int:
        return self.window_slots * self.slot_bytes + self.demand_slots * self.demand_slot_bytes

    @property
    def ring_bytes(self) -> int:
        return self.dram_tier_bytes + self.window_bytes

    @property
    def staging_bytes(self) -> int:
        return self.staging_buffers * self.slot_bytes

    @property
    def disk_bytes_per_pass(self) -> int:
        """Disk bytes of a pass (of a mixture: expected at batch 1, ``use``)."""
        return self._expected(self.stream)

    @property
    def h2d_bytes_per_pass(self) -> int:
        """Host -> GPU bytes of a pass of at most ``cpu_tokens_max`` tokens (of a mixture: expected at batch 1,
        ``use``): the CPU compute set stays in DRAM. A pass of more tokens also copies the set
        (``h2d_bytes_many_tokens``)."""
        return self.h2d_bytes_many_tokens - self.cpu_bytes_per_pass

    @property
    def h2d_bytes_many_tokens(self) -> int:
        """Host -> GPU bytes of a pass of more than ``cpu_tokens_max`` tokens: every non-resident group."""
        if not self.is_cuda:
            return 0
        moving = set(self.dram) | set(self.stream)
        return self._expected(g for g in self.sequence if g in moving)

    @property
    def cpu_bytes_per_pass(self) -> int:
        """Weight bytes the CPU reads in place in a pass of at most ``cpu_tokens_max`` tokens (the CPU set)."""
        return self._sum(self.cpu)

    def expert_tiers(self) -> dict[str, dict[str, float]]:
        """Per tier (gpu, dram, disk): the experts held there and the expected experts and bytes a batch-1 pass
        fetches from it ({} for a dense model)."""
        if not self.routed:
            return {}
        tiers = {"gpu": set(self.gpu), "dram": set(self.dram), "disk": set(self.stream)}
        return {t: {"experts": sum(g in held for g in self.routed),
                    "expected_per_pass": round(sum(self.use.get(g, 1.0) for g in self.routed if g in held), 4),
                    "expected_bytes_per_pass": self._expected(g for g in self.routed if g in held)}
                for t, held in tiers.items()}

    @property
    def gpu_bytes_total(self) -> int:
        b = self.budgets
        return self.gpu_tier_bytes + self.staging_bytes + b.kv_bytes + b.activation_bytes + b.draft_bytes

    @property
    def weight_bytes(self) -> int:
        return self._sum(self.group_bytes)

    # ---- output -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        keys = ("gpu_tier_bytes", "dram_tier_bytes", "host_bytes", "window_bytes", "ring_bytes", "staging_bytes",
                "disk_bytes_per_pass", "h2d_bytes_per_pass", "h2d_bytes_many_tokens", "cpu_bytes_per_pass",
                "gpu_bytes_total", "weight_bytes")
        return {"mode": self.mode, "device": self.device, "sequence": list(self.sequence), "gpu": list(self.gpu),
                "dram": list(self.dram), "stream": list(self.stream), "host": list(self.host),
                "window_slots": self.window_slots, "staging_buffers": self.staging_buffers,
                "slot_bytes": self.slot_bytes, "budgets": asdict(self.budgets),
                **{k: getattr(self, k) for k in keys}, "group_bytes": dict(self.group_bytes),
                "labels": dict(self.labels), "demand_slots": self.demand_slots,
                "demand_slot_bytes": self.demand_slot_bytes, "routing_from": self.routing_from,
                "experts": self.expert_tiers(), "cpu": list(self.cpu), "cpu_compute": self.cpu_compute,
                "cpu_tokens_max": self.cpu_tokens_max, "pipes_ms": dict(self.pipes_ms), "costs_from": self.costs_from}

    def describe(self) -> str:
        """A short table: tier, groups (counts by kind), bytes; then per-pass bytes and the budgets."""
        b, h = self.budgets, human_bytes
        tied = [g for g in self.host if g in self.sequence]
        host_use = "token lookup" + (" + output matrix" if set(tied) & set(self.dram) else "")
        dram_only = [g for g in self.dram if g not in self.host]
        rows = [("gpu", self._counts(self.gpu), self.gpu_tier_bytes),
                ("dram", self._counts(dram_only), self._sum(dram_only)),
                ("host", f"{', '.join(self.host)} ({host_use})", self.host_bytes),
                ("stream", self._counts(self.stream), self._sum(self.stream)),
                ("window", f"{self.window_slots} ring slots x {h(self.slot_bytes)}"
                 + (f" + {self.demand_slots} demand x {h(self.demand_slot_bytes)}" if self.demand_slots else "")
                 + (f" ({self.expert_prefetch} read a layer ahead)" if self.expert_prefetch else ""),
                 self.window_bytes),
                ("staging", f"{self.staging_buffers} GPU buffers x {h(self.slot_bytes)}", self.staging_bytes)]
        width = max(len(r[1]) for r in rows)
        lines = [f"placement: mode {self.mode} on {self.device}, {len(self.sequence)} groups per pass, "
                 f"{h(self.weight_bytes)} of weights" + (f" stored as {self.stored_as}" if self.stored_as else ""),
                 f"  {'tier':<8} {'groups':<{width}} {'bytes':>11}"]
        lines += [f"  {t:<8} {g:<{width}} {h(n):>11}" for t, g, n in rows]
        d, x = self.disk_bytes_per_pass, self.h2d_bytes_per_pass
        per = "per pass" if not self.routed else f"per pass, expected at batch 1 (routing {self.routing_from})"
        lines.append(f"  {per}: disk {h(d)} ({d / 1e9:.1f} GB), H2D {h(x)} ({x / 1e9:.1f} GB)")
        if self.routed:
            t = self.expert_tiers()
            lines.append("  experts per pass, expected: " + ", ".join(
                f"{name} {t[name]['expected_per_pass']:.2f} of {t[name]['experts']} "
                f"({h(t[name]['expected_bytes_per_pass'])})" for name in ("gpu", "dram", "disk")))
        if self.cpu_compute != "off":
            lines += self._pipes()
        draft = f"draft {h(b.draft_bytes)} + " if b.draft_bytes else ""
        lines.append(f"  GPU {h(self.gpu_bytes_total)} = {draft}tier + staging + KV {h(b.kv_bytes)} + activations "
                     f"{h(b.activation_bytes)}, budget {_opt(b.gpu_bytes)}")
        lines.append(f"  ring {h(self.ring_bytes)} = dram + host + window, budget {_opt(b.dram_bytes)}")
        return "\n".join(lines)

    def _pipes(self) -> list[str]:
        """Both pipes of a small pass and its bound (``--cpu-compute``)."""
        h, x, c = human_bytes, self.h2d_bytes_per_pass, self.cpu_bytes_per_pass
        if not self.is_cuda:
            return [f"  cpu compute {self.cpu_compute}: on the CPU every group computes there already"]
        ms = self.pipes_ms
        link = f"link {h(x)}" + (f" {ms['link']:.2f} ms" if ms else "")
        cpu = f"CPU {self._counts(self.cpu)} in place {h(c)}" + (f" {ms['cpu']:.2f} ms" if ms else "")
        bound = f", bound max {max(ms.values()):.2f} ms" if ms else ""
        return [f"  cpu compute {self.cpu_compute}, passes of <= {self.cpu_tokens_max} tokens: {link} | {cpu}{bound}",
                *([f"  costs {self.costs_from}"] if self.costs_from else []),
                f"  passes of more tokens: every group on the GPU, link {h(self.h2d_bytes_many_tokens)}"]

    def _counts(self, names: Sequence[str]) -> str:
        """Layer groups counted by kind ("16 ffn, 16 attn"), the others named."""
        if not names:
            return "-"
        kinds = [group_kind(g) for g in names]
        parts = [f"{n} {label}" for kind, label in self.labels.items() if (n := kinds.count(kind))]
        return ", ".join(parts + [g for g, k in zip(names, kinds) if k not in self.labels])


def kind_labels(args: ModelArgs) -> dict[str, str]:
    """Layer kind -> its short label, in the GPU tier's order of preference (``gpu_rank``)."""
    return {k.name: k.label for k in sorted(architecture(args).layer_kinds, key=lambda k: k.gpu_rank)}


def _opt(n: int | None) -> str:
    return "none" if n is None else human_bytes(n)


def pass_sequence(args: ModelArgs) -> tuple[str, ...]:
    """The groups one forward pass copies or uses on the compute device, in order (not the host lookup)."""
    seq = [g for g in group_names(args) if g != HOST_GROUP]
    return tuple(seq + ([HOST_GROUP] if args.tie_embeddings else []))


def layout_group_bytes(args: ModelArgs, dtype: str = "bf16") -> dict[str, int]:
    """Padded extent size of every group of an image of ``args`` in ``dtype`` (runtime/format/image.py)."""
    return {g.name: g.size for g in plan_layout(args, dtype)}


# ---- how often each expert is routed --------------------------------------------------------------------

def expert_counts_path(image_path: str) -> str:
    """Where an image's expert counts are kept by default: ``IMAGE.expert-counts.json`` beside it."""
    return f"{image_path}.expert-counts.json"


def read_expert_counts(path: str, args: ModelArgs) -> list[list[float]]:
    """An expert-counts file: JSON ``{"counts": [[c_0, ..., c_{n-1}] per layer]}``, c_e how many tokens of some
    text the layer routed to expert e (any non-negative numbers: only their ratios count). Refused, naming the
    file and the numbers, where its shape is not the model's (layers x experts) or a layer counts nothing."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--expert-counts {path}: cannot read it as JSON ({e})") from None
    counts = data.get("counts") if isinstance(data, dict) else None
    n = args.n_experts
    if not isinstance(counts, list) or len(counts) != args.n_layers or any(
            not isinstance(row, list) or len(row) != n for row in counts):
        shape = (len(counts), {len(r) for r in counts if isinstance(r, list)}) if isinstance(counts, list) else None
        raise ConfigError(f"--expert-counts {path}: expected {{\"counts\": [...]}} of {args.n_layers} layers x "
                          f"{n} experts, found {shape}")
    for i, row in enumerate(counts):
        if not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 0 for c in row) or not sum(row):
            raise ConfigError(f"--expert-counts {path}: layer {i}'s counts must be non-negative numbers, not all "
                              f"zero: {row[:8]}")
    return [[float(c) for c in row] for row in counts]


def expert_use(args: ModelArgs, counts: Sequence[Sequence[float]] | None = None) -> dict[str, float]:
    """Routed group -> the expected share of batch-1 passes that fetch it: from per-layer routing counts (a
    token goes to k experts, so layer i's tokens are sum(counts[i]) / k and expert e's share counts[i][e] over
    that), or k / n for every expert ({} for a dense model)."""
    groups = routed_groups(args)
    if not groups:
        return {}
    k, n = args.n_experts_used, args.n_experts
    if counts is None:
        return {g: k / n for g in groups}
    return {g: min(1.0, counts[i][e] * k / sum(counts[i])) for g, (i, e) in groups.items()}


def guessed(args: ModelArgs, gpu: Sequence[str], dram: Sequence[str], cuda: bool) -> bool:
    """Whether any layer's experts are guessed a layer ahead (runtime/engine/streamed.py ``next_router``): the
    router (its attention group) of a layer after the first resident, or on the CPU in the DRAM tier."""
    kinds = [k.name for k in architecture(args).layer_kinds if k.forward == "moe_attention"]
    near = set(gpu) | (set() if cuda else set(dram))
    return any(layer_group(i, k) in near for i in range(1, args.n_layers) for k in kinds)


def prefetch_room(request: int, demand_slots: int) -> int:
    """The demand slots the prefetch guess's reads may take: at most ``request`` (--expert-prefetch), and one fewer
    than the D there are, so that a layer's own reads always have one to cycle through while the guessed experts it
    chose wait in theirs to be fetched (in pass order: with every slot held by a later one, the first would never
    be read)."""
    return max(0, min(request, demand_slots - 1))


def _demand_slots(demand: Sequence[str], sizes: Mapping[str, int], w: int,
                  layers: Mapping[str, tuple[int, int]]) -> tuple[int, int]:
    """(D, bytes of one demand slot) for the streamed experts ``demand``: as many slots as the window's W, but no
    more than the most of them one layer has (a layer's demand is read ahead at most that far)."""
    if not demand:
        return 0, 0
    per_layer: dict[int, int] = {}
    for g in demand:
        per_layer[layers[g][0]] = per_layer.get(layers[g][0], 0) + 1
    return min(w, max(per_layer.values())), max(sizes[g] for g in demand)


# ---- the planner -----------------------------------------------------------------------------------------

def plan_placement(group_bytes: Mapping[str, int], args: ModelArgs, mode: str, budgets: Budgets, *,
                   device: str = "cuda", gpu_cached_layers: int | None = None, cpu_cache_layers: int | None = None,
                   prefetch_distance: int | None = None, group_prefetch_depth: int = 2,
                   expert_counts: Sequence[Sequence[float]] | None = None, routing_from: str = "",
                   cpu_compute: str | int = "off", costs: CostTable | None = None, expert_prefetch: int = 2) -> Plan:
    """Fixed tiers for one run; raises ConfigError for every infeasible or contradictory request.

    group_bytes: every group of ``group_names(args)`` -> its size (``layout_group_bytes``: padded extents).
    mode: "preload" (every non-GPU group in DRAM, nothing streams), "stream" (no DRAM tier but the host
      embedding) or "mixed" (DRAM tier from ``budgets.dram_bytes``, the rest streams; no DRAM budget means
      no limit, so nothing streams).
    device: "cuda" (a GPU budget or ``gpu_cached_layers`` is required) or "cpu" (no GPU tier but the
      explicit one, no staging buffers, no H2D bytes).
    gpu_cached_layers / cpu_cache_layers: the original bench's flags. N puts both groups of layers 0..N-1 in the GPU
      tier whatever the budget prefers (still checked against it); M puts the non-GPU groups of the next M
      layers (the first M not wholly on the GPU) in DRAM, mode mixed only; either replaces its tier's
      budget-driven choice, the other tier is still chosen from its budget.
    prefetch_distance: window slots W (>= 2; clamped to the streamed set); default 2 * group_prefetch_depth.
    group_prefetch_depth: K, the GPU staging buffers the copy stream may run ahead by (>= 1).
    expert_counts: a mixture's routing counts per layer and expert (``read_expert_counts``; None: uniform), which
      order its experts in the tiers; ``routing_from`` names their source in the plan.
    cpu_compute: "off", "auto" or N (a count, or its digits): the CPU compute set (module docstring), from
      ``costs`` (required for auto; with N it only prices the pipes for the plan's table).
    expert_prefetch: the most disk-tier experts a layer reads ahead on the prefetch guess (``prefetch_room``).
    """
    cuda = _check_inputs(group_bytes, args, mode, device, gpu_cached_layers, cpu_cache_layers,
                         prefetch_distance, group_prefetch_depth)
    sizes = dict(group_bytes)
    seq = pass_sequence(args)
    k = group_prefetch_depth if cuda else 0
    w_req = prefetch_distance if prefetch_distance is not None else max(2, 2 * group_prefetch_depth)
    labels = kind_labels(args)
    layers = routed_groups(args)
    use = expert_use(args, expert_counts)
    routed_names = {kind.name for kind in routed_kinds(args)}
    # the tiers' preference: every group a pass uses (pass order), then the experts by use (most used first)
    pref = tuple(sorted(seq, key=lambda g: (g in layers, -use.get(g, 1.0))))
    if gpu_cached_layers is not None:
        gpu = layer_groups(args, range(gpu_cached_layers))
    elif cuda:
        if budgets.gpu_bytes is None:
            raise ConfigError("placement on cuda needs a GPU budget: give --gpu-mem-gb (the GPU memory this run "
                              "may use for resident weights, KV cache, activations and staging buffers), or "
                              "--gpu-cached-layers")
        gpu = _fill_gpu(seq, sizes, budgets.gpu_bytes - budgets.kv_bytes - budgets.activation_bytes -
                        budgets.draft_bytes, k, tuple(x for x in labels if x not in routed_names), pref)
    else:
        gpu = ()
    dram = _choose_dram(seq, sizes, gpu, mode, budgets, args, cuda, w_req, cpu_cache_layers, pref, layers)
    stream = tuple(g for g in seq if g not in set(gpu) | set(dram))
    through = stream + (dram if cuda else ())  # groups that pass through slots or staging buffers
    cyclic = [g for g in stream if g not in layers]
    d, d_bytes = _demand_slots([g for g in stream if g in layers], sizes, w_req, layers)
    plan = Plan(mode=mode, sequence=seq, gpu=gpu, dram=dram, stream=stream,
                window_slots=min(w_req, len(cyclic)), staging_buffers=k if (dram or stream) else 0,
                slot_bytes=max((sizes[g] for g in through), default=0), group_bytes=sizes, host=(HOST_GROUP,),
                device=device, budgets=budgets, labels=labels, routed=tuple(layers), use=use,
                routing_from=(routing_from or "uniform") if layers else "", demand_slots=d, demand_slot_bytes=d_bytes,
                expert_prefetch=prefetch_room(expert_prefetch, d) if guessed(args, gpu, dram, cuda) else 0)
    _check_gpu(plan)
    _check_dram(plan)
    return with_cpu_set(plan, args, cpu_compute, costs)


def with_cpu_set(plan: Plan, args: ModelArgs, value: str | int, costs: CostTable | None = None) -> Plan:
    """``plan`` with its CPU compute set (module docstring): none on the CPU or for off; N or auto's choice of the
    DRAM tier's stateless groups, spread in layer order."""
    value = cpu_compute_value(value)
    if value == "off":
        return plan
    req = str(value)
    if not plan.is_cuda:
        return dataclasses.replace(plan, cpu_compute=req)
    kinds = set(stateless_kinds(args))
    cands = cpu_candidates(plan, args)
    if value == "auto" and not cands:  # nothing to choose from
        return dataclasses.replace(plan, cpu_compute=req)
    if value == "auto" and costs is None:
        raise ConfigError("--cpu-compute auto needs the link's and the CPU's measured rates (a cost table); give a "
                          "number of groups instead")
    if isinstance(value, int) and value > len(cands):
        raise ConfigError(f"--cpu-compute {value}: the DRAM tier holds {len(cands)} groups the CPU can compute "
                          f"({', '.join(kinds) or 'no stateless kind'}); expected 0..{len(cands)}, auto or off")

    def spread(n: int) -> tuple[str, ...]:
        return tuple(cands[i] for i in sorted(spread_layers(n, len(cands))))

    def pipes(cpu: tuple[str, ...]) -> dict[str, float]:
        trial = dataclasses.replace(plan, cpu=cpu)
        return {"link": costs.link_s(trial.h2d_bytes_per_pass) * 1e3,
                "cpu": sum(costs.cpu_s(g, plan.group_bytes[g]) for g in cpu) * 1e3}

    if value == "auto":  # the fewest groups among those of the least bound
        chosen = min((spread(n) for n in range(len(cands) + 1)), key=lambda c: (max(pipes(c).values()), len(c)))
    else:
        chosen = spread(value)
    return dataclasses.replace(plan, cpu=chosen, cpu_compute=req, pipes_ms=pipes(chosen) if costs else {},
                               costs_from=costs.describe() if costs else "")


def cpu_candidates(plan: Plan, args: ModelArgs) -> list[str]:
    """The groups the CPU compute set is chosen from: the DRAM tier's of a stateless kind, in pass order."""
    kinds = set(stateless_kinds(args))
    return [g for g in plan.sequence if g in set(plan.dram) and group_kind(g) in kinds]


def _check_inputs(group_bytes, args, mode, device, gpu_layers, cpu_layers, distance, depth) -> bool:
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: placement modes are {list(MODES)}")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"--device {device!r}: expected 'cpu' or 'cuda'")
    want = set(group_names(args))
    if set(group_bytes) != want:
        raise ConfigError(f"group sizes do not match the model: missing {sorted(want - set(group_bytes))[:4]}, "
                          f"unknown {sorted(set(group_bytes) - want)[:4]}")
    bad = {g: n for g, n in group_bytes.items() if not isinstance(n, int) or n < 0}
    if bad:
        raise ConfigError(f"group sizes must be non-negative integers of bytes, found {dict(list(bad.items())[:4])}")
    if not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"--group-prefetch-depth {depth!r}: needs at least 1 staging buffer")
    if distance is not None and distance < 2:
        raise ConfigError(f"--prefetch-distance {distance}: the window needs at least 2 slots (one filling from "
                          f"disk while another is copied to the GPU)")
    for flag, n in (("--gpu-cached-layers", gpu_layers), ("--cpu-cache-layers", cpu_layers)):
        if n is not None and not 0 <= n <= args.n_layers:
            raise ConfigError(f"{flag} {n}: the model has {args.n_layers} layers")
    if (gpu_layers or 0) + (cpu_layers or 0) > args.n_layers:
        raise ConfigError(f"--gpu-cached-layers {gpu_layers} + --cpu-cache-layers {cpu_layers} exceed the "
                          f"model's {args.n_layers} layers")
    if cpu_layers is not None and mode != "mixed":
        raise ConfigError(f"--cpu-cache-layers applies to --mode mixed; --mode {mode} "
                          + ("keeps every non-GPU group in DRAM" if mode == "preload" else "keeps none in DRAM"))
    return device.startswith("cuda")


def _fill_gpu(seq: tuple[str, ...], sizes: dict[str, int], avail: int, k: int,
              kinds: tuple[str, ...], pref: tuple[str, ...]) -> tuple[str, ...]:
    """GPU tier from ``avail`` bytes (budget minus KV and activations), K staging buffers reserved.

    Staging buffers are as large as the largest non-resident group, so try each slot size s: groups larger
    than s are forced resident, K*s is reserved, the rest fills in preference order (``kinds``: the layer kinds
    by gpu_rank, then the other groups), each kind's resident groups spread evenly over the pass
    (``_spread_within_kinds``); a mixture's experts after all of those, in ``pref``'s order (by use), not spread.
    The most resident bytes wins; ties go to the largest s (the plain preference).
    Returns () when not even the staging buffers fit; the budget check then reports the numbers.
    """
    rank = {kind: i for i, kind in enumerate(kinds)}
    at = {g: i for i, g in enumerate(pref)}
    order = sorted(seq, key=lambda g: (rank.get(group_kind(g), len(kinds)), at[g]))  # pass order within a kind
    best: tuple[int, tuple[str, ...]] = (-1, ())
    for s in sorted({sizes[g] for g in seq}, reverse=True) + [0]:
        forced = [g for g in seq if sizes[g] > s]
        room = avail - k * s - sum(sizes[g] for g in forced)
        if room < 0:
            continue
        chosen = set(forced)
        for g in order:
            if g not in chosen and sizes[g] <= room:
                chosen.add(g)
                room -= sizes[g]
        chosen = _spread_within_kinds(seq, sizes, chosen, set(forced), kinds)
        resident = sum(sizes[g] for g in chosen)
        if resident > best[0]:
            best = (resident, tuple(g for g in seq if g in chosen))
    return best[1]


def _spread_within_kinds(seq: tuple[str, ...], sizes: dict[str, int], chosen: set[str],
                         forced: set[str], kinds: tuple[str, ...]) -> set[str]:
    """The same number of resident groups of each layer kind (all of one size), spread evenly over the pass
    instead of the first ones: the copy stream runs at most K groups ahead of the compute, so a pass whose
    first layers are all resident and last all streamed leaves the link idle early and the compute waiting
    late, whenever a layer's compute is not negligible (host attention's CPU time, prefill). Spread, every
    stretch of the pass carries its share of the copies."""
    from model.groups import spread_layers

    out = set(chosen)
    for kind in kinds:
        groups = [g for g in seq if group_kind(g) == kind and g not in forced]
        if len({sizes[g] for g in groups}) != 1:
            continue
        c = sum(g in chosen for g in groups)
        out -= set(groups)
        out |= {groups[i] for i in spread_layers(c, len(groups))}
    return out


def _choose_dram(seq, sizes, gpu, mode, budgets, args, cuda, w_req, cpu_layers, pref, layers) -> tuple[str, ...]:
    """DRAM tier: a tied embedding's output use always (its host copy is there); then by mode and budget."""
    on_gpu = set(gpu)
    rest = [g for g in seq if g not in on_gpu]
    tied = [g for g in rest if g == HOST_GROUP]
    candidates = [g for g in pref if g not in on_gpu and g != HOST_GROUP]
    if mode == "stream":
        return tuple(tied)
    if mode == "preload" or (budgets.dram_bytes is None and cpu_layers is None):
        return tuple(rest)
    if cpu_layers is not None:
        layers = [i for i in range(args.n_layers) if not set(layer_groups(args, [i])) <= on_gpu][:cpu_layers]
        chosen = set(layer_groups(args, layers)) - on_gpu
    else:
        chosen = _fill_dram(candidates, sizes, budgets.dram_bytes - sizes[HOST_GROUP], rest, cuda, w_req, layers)
    return tuple(g for g in seq if g in chosen or g in tied)


def _fill_dram(candidates, sizes, avail, rest, cuda, w_req, layers) -> set[str]:
    """First fit in preference order (pass order; a mixture's experts last, by use), keeping room for the window
    and the demand slots of what would still stream; both shrink as fewer groups stream."""
    through = rest if cuda else candidates  # on the CPU only streamed groups pass through the slots
    slot = max((sizes[g] for g in through), default=0)
    d_slot = max((sizes[g] for g in candidates if g in layers), default=0)
    cyclic = sum(g not in layers for g in candidates)  # would stream if not taken: non-experts, experts per layer
    per_layer: dict[int, int] = {}
    for g in candidates:
        if g in layers:
            per_layer[layers[g][0]] = per_layer.get(layers[g][0], 0) + 1
    chosen, used = set(), 0
    for g in candidates:
        expert = g in layers
        left = cyclic - (not expert)
        if expert:
            per_layer[layers[g][0]] -= 1
        most = max(per_layer.values(), default=0)
        if used + sizes[g] + min(w_req, left) * slot + min(w_req, most) * d_slot <= avail:
            chosen.add(g)
            used += sizes[g]
            cyclic = left
        elif expert:
            per_layer[layers[g][0]] += 1
    return chosen


def _check_gpu(p: Plan) -> None:
    b, h = p.budgets, human_bytes
    if b.gpu_bytes is None or p.gpu_bytes_total <= b.gpu_bytes:
        return
    where = "--gpu-mem-gb" if p.is_cuda else "--gpu-mem-gb (client memory on the CPU)"
    raise ConfigError(
        f"{where} {h(b.gpu_bytes)} cannot hold " + (f"the draft model {h(b.draft_bytes)} + " if b.draft_bytes else "") +
        f"KV cache {h(b.kv_bytes)} + activations {h(b.activation_bytes)} + "
        f"staging {p.staging_buffers} x {h(p.slot_bytes)} + GPU tier {len(p.gpu)} groups {h(p.gpu_tier_bytes)} "
        f"= {h(p.gpu_bytes_total)} ({p.gpu_bytes_total} > {b.gpu_bytes} bytes); raise --gpu-mem-gb, or lower "
        f"--max-seq-len, --group-prefetch-depth or --gpu-cached-layers" + (", or take a smaller --draft" if
                                                                              b.draft_bytes else ""))


def _check_dram(p: Plan) -> None:
    b, h = p.budgets, human_bytes
    if b.dram_bytes is None or p.ring_bytes <= b.dram_bytes:
        return
    dram_only = p._sum(set(p.dram) - set(p.host))
    demand = f" + {p.demand_slots} demand x {h(p.demand_slot_bytes)}" if p.demand_slots else ""
    raise ConfigError(
        f"--dram-gb {h(b.dram_bytes)} cannot hold host embedding {h(p.host_bytes)} + DRAM tier "
        f"{len(p.dram)} groups {h(dram_only)} + window {p.window_slots} x {h(p.slot_bytes)}{demand} = "
        f"{h(p.ring_bytes)} "
        f"({p.ring_bytes} > {b.dram_bytes} bytes); " + _DRAM_HINTS[p.mode])

