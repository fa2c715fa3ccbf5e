"""The engine's typed configuration: frozen dataclasses, one per concern, every default defined here once.

    EngineConfig            what a run needs besides its prompts (runtime/engine/source.py, generate.py)
      placement: PlacementConfig   --mode, --gpu-mem-gb, --dram-gb, --gpu-cached-layers, --cpu-cache-layers,
                                   --prefetch-distance, --group-prefetch-depth, --cpu-compute (docs/DESIGN.md,
                                   placement)
      pool: PoolOptions            --workers, --staging-mb: a private pool's I/O processes
      kv: KVConfig                 --kv-block-tokens, --kv-offload, --host-attention, --topk-blk
      prefill: PrefillConfig       --prefill-chunk, --[no-]prefill-by-sequence
      speculative: SpeculativeConfig  --draft, --draft-tokens
      attach, trace, threads, cuda_graphs, quiet
    SamplingConfig          --max-new-tokens, --temperature, --top-p, --seed (per request)

Each part names the command-line flags it is made from (``FLAGS``: argparse dest -> field), so the CLI
(runtime/cli) builds the config from its namespace once (``from_flags``) and takes every default from here
(``flag_default``); nothing below the CLI reads a namespace. Each config checks itself when built and raises
ConfigError naming the flag, the value and the allowed range. Torch-free: the CLI checks a run's flags before
torch starts (and before a private pool does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from model.errors import ConfigError

MODES = ("full", "preload", "stream", "mixed")


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, found {value}")


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"--{name.replace('_', '-')} must be positive, found {value}")


def cpu_compute_value(value: str | int) -> str | int:
    """``--cpu-compute``'s value: "off", "auto" or a count of groups (an int, or its digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value in ("off", "auto"):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ConfigError(f"--cpu-compute {value!r}: expected off, auto or a number of groups (0 or more)")


class FlagConfig:
    """A config built from command-line values: ``FLAGS`` maps argparse dests to its fields (default: each
    field's own name)."""

    FLAGS: ClassVar[dict[str, str]] = {}

    @classmethod
    def flags(cls) -> dict[str, str]:
        return cls.FLAGS or {f.name: f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_flags(cls, values: Mapping[str, Any], **override):
        """The config of the flags in ``values`` that name its fields (the others are left at their defaults)."""
        kw = {f: values[d] for d, f in cls.flags().items() if d in values}
        return cls(**{**kw, **override})

    @classmethod
    def flag_default(cls, dest: str):
        """The default of flag ``dest`` (``dataclasses.MISSING`` for a required one)."""
        name = cls.flags()[dest]
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass(frozen=True)
class PlacementConfig(FlagConfig):
    """Which groups stay on the GPU, which in DRAM, and how far ahead the rest is read (engine/placement.py)."""

    mode: str = "mixed"
    gpu_mem_gb: float | None = None  # None: the GPU's free memory
    dram_gb: float | None = None  # None: 80% of the available memory
    gpu_cached_layers: int | None = None
    cpu_cache_layers: int | None = None
    prefetch_distance: int | None = None  # window slots; None: 2 x group_prefetch_depth
    group_prefetch_depth: int = 2  # GPU staging buffers: copies up to this many groups ahead of compute
    expert_counts: str | None = None  # a mixture's routing counts (JSON); None: IMAGE.expert-counts.json if present
    cpu_compute: str = "off"  # "off", "auto" or N: DRAM-tier groups the CPU computes in place (placement.py)
    expert_prefetch: int = 2  # a mixture: disk-tier experts read a layer ahead on the router's guess (0: none)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {MODES}, found {self.mode!r}")
        _at_least("group_prefetch_depth", self.group_prefetch_depth, 1)
        _at_least("expert_prefetch", self.expert_prefetch, 0)
        for key in ("gpu_cached_layers", "cpu_cache_layers"):
            _at_least(key, getattr(self, key), 0)
        _at_least("prefetch_distance", self.prefetch_distance, 1)
        _positive("gpu_mem_gb", self.gpu_mem_gb)
        _positive("dram_gb", self.dram_gb)
        cpu_compute_value(self.cpu_compute)


@dataclass(frozen=True)
class PoolOptions(FlagConfig):
    """A private pool's I/O processes (runtime/pool)."""

    workers: int = 2
    staging_mb: int = 16  # each group read is split into chunks of this many MiB, read in parallel
    direct_io: bool = True

    def __post_init__(self) -> None:
        _at_least("workers", self.workers, 1)
        _at_least("staging_mb", self.staging_mb, 1)


@dataclass(frozen=True)
class KVConfig(FlagConfig):
    """The KV cache (engine/kv.py): its blocks, where it lives, where decode attention runs."""

    FLAGS: ClassVar[dict[str, str]] = {"kv_block_tokens": "block_tokens", "kv_offload": "offload",
                                       "host_attention": "host_attention", "topk_blk": "topk_blk"}
    block_tokens: int = 64  # slots come in whole blocks: the unit of KV moves and of top-k
    offload: str = "auto"  # "on" | "off" | "auto" (engine/source.py plan_with_kv decides)
    host_attention: int | str | None = None  # N layers (spread evenly) or "all" attended on the CPU
    topk_blk: int | None = None  # approximate decode attention over the K best blocks (None: exact)

    def __post_init__(self) -> None:
        _at_least("kv_block_tokens", self.block_tokens, 1)
        _at_least("topk_blk", self.topk_blk, 1)
        if self.offload not in ("auto", "on", "off"):
            raise ConfigError(f"--kv-offload must be auto, on or off, found {self.offload!r}")
        h = self.host_attention
        if h is True:  # "every layer", as the flag without a number means
            object.__setattr__(self, "host_attention", "all")
        elif h is False:
            object.__setattr__(self, "host_attention", None)
        elif h is not None and h != "all" and not (isinstance(h, int) and h >= 1):
            raise ConfigError(f"--host-attention: expected a number of layers (1 or more) or all, found {h!r}")
        if self.host_attention is not None and self.topk_blk is not None:
            raise ConfigError("--host-attention and --topk-blk do not go together: top-k scores blocks on the GPU")


@dataclass(frozen=True)
class PrefillConfig(FlagConfig):
    """How a prompt is cut into weight passes (engine/generate.py)."""

    FLAGS: ClassVar[dict[str, str]] = {"prefill_chunk": "chunk", "prefill_by_sequence": "by_sequence"}
    chunk: int = 2048  # prompt tokens per weight pass, shared by a batch's sequences
    by_sequence: bool | None = None  # an offloaded batch whole prompts at a time (None: when no more passes)

    def __post_init__(self) -> None:
        _at_least("prefill_chunk", self.chunk, 16)


@dataclass(frozen=True)
class SamplingConfig(FlagConfig):
    """One request's sampling. The first four are run's flags; the rest come from the HTTP server's requests
    (runtime/engine/sampling.py applies them; their defaults change nothing): the filters ``top_k`` and
    ``min_p`` beside ``top_p`` (generate.sample), and the logit processing before them, ``logit_bias`` ((token
    id, bias) pairs), ``repetition_penalty`` (over the prompt and the output), ``frequency_penalty`` and
    ``presence_penalty`` (over the output)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0  # 0: no limit
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens must be >= 0, found {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature must be >= 0, found {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], found {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: no limit), found {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p must be in [0, 1], found {self.min_p}")
        for key in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, key) <= 2:
                raise ConfigError(f"{key} must be in [-2, 2], found {getattr(self, key)}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be positive, found {self.repetition_penalty}")
        bad = [(t, b) for t, b in self.logit_bias if not (isinstance(t, int) and t >= 0 and -100 <= b <= 100)]
        if bad:
            raise ConfigError(f"logit_bias: token ids >= 0 and biases in [-100, 100], found {bad[0]}")

    @property
    def processed(self) -> bool:
        """Whether the logits are changed before the filters (runtime/engine/sampling.py)."""
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0 or \
            self.repetition_penalty != 1


@dataclass(frozen=True)
class SpeculativeConfig(FlagConfig):
    """Speculative decoding (engine/speculative.py): the draft and the tree's size."""

    FLAGS: ClassVar[dict[str, str]] = {"draft": "draft", "draft_tokens": "tokens"}
    draft: str | None = None  # an image path (a small model kept on the device) or "ngram"; None: no draft
    tokens: int | None = None  # tree nodes verified per pass, the root included (None: DEFAULT_DRAFT_TOKENS)

    def __post_init__(self) -> None:
        _at_least("draft_tokens", self.tokens, 1)
        if self.tokens is not None and self.draft is None:
            raise ConfigError(f"--draft-tokens {self.tokens} needs --draft IMAGE or --draft ngram")

    def tree_tokens(self, device_type: str, chunk: int) -> int:
        """--draft-tokens, or where the choice starts for this draft and device (at most a prefill chunk;
        engine/speculative.py ``TreeSize`` starts from the probe's costs instead where it has them)."""
        if self.tokens is not None:
            return self.tokens
        return min(chunk, DEFAULT_DRAFT_TOKENS["ngram" if self.draft == "ngram" else device_type])

    def tree_limit(self, device_type: str, chunk: int) -> int:
        """The most nodes a pass's tree may have: --draft-tokens, or the largest size the choice may grow to.
        The plan reserves that many nodes' logits and the KV cache that many slots past the last token."""
        if self.tokens is not None:
            return self.tokens
        return min(chunk, CHOSEN_LIMIT[device_type])

    def tree_room(self, device_type: str, chunk: int) -> int:
        """KV slots the last tree of a run may take past its last token (0 without a draft)."""
        return 0 if self.draft is None else self.tree_limit(device_type, chunk)


# Without --draft-tokens the tree's size is chosen as the run goes (engine/speculative.py TreeSize). Where that
# starts without the probe's costs: a prompt lookup rarely matches more than a few tokens ahead; a model draft
# on the GPU verifies more nodes per pass than one on the CPU, whose pass costs grow with its tokens. How far
# it may grow: each node's logits (vocab x 6 bytes) are reserved, 256 x 128256 x 6 = 197 MB for Llama 3.
DEFAULT_DRAFT_TOKENS = {"ngram": 8, "cpu": 8, "cuda": 32}
CHOSEN_LIMIT = {"cpu": 64, "cuda": 256}

PARTS = {"placement": PlacementConfig, "pool": PoolOptions, "kv": KVConfig, "prefill": PrefillConfig,
         "speculative": SpeculativeConfig}


@dataclass(frozen=True)
class EngineConfig(FlagConfig):
    """Everything a run needs besides its prompts and sampling."""

    FLAGS: ClassVar[dict[str, str]] = {"attach": "attach", "trace": "trace", "threads": "threads",
                                       "cuda_graphs": "cuda_graphs", "quiet": "quiet"}
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    pool: PoolOptions = field(default_factory=PoolOptions)
    kv: KVConfig = field(default_factory=KVConfig)
    prefill: PrefillConfig = field(default_factory=PrefillConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    attach: str | None = None  # --attach NAME: the daemon pool NAME instead of a private pool
    trace: str | None = None  # --trace FILE: a Chrome trace of the run (engine/trace.py)
    threads: int | None = None  # CPU compute threads (None: the cores shared by the machine's runs)
    cuda_graphs: str = "on"  # "on" | "off": decode steps replayed from CUDA graphs (runtime/engine/graphs.py)
    quiet: bool = False

    def __post_init__(self) -> None:
        _at_least("threads", self.threads, 1)
        if self.cuda_graphs not in ("on", "off"):
            raise ConfigError(f"--cuda-graphs must be on or off, found {self.cuda_graphs!r}")
        if self.attach is not None:
            p = self.placement
            fixed = {"--mode": p.mode != PlacementConfig.mode, "--dram-gb": p.dram_gb is not None,
                     "--cpu-cache-layers": p.cpu_cache_layers is not None,
                     "--prefetch-distance": p.prefetch_distance is not None, "--trace": self.trace is not None}
            bad = [k for k, v in fixed.items() if v]
            if bad:
                raise ConfigError(f"{', '.join(bad)} cannot be given with --attach: the pool fixed its DRAM tier and "
                                  f"window when it started, and its processes are not traced")
        s = self.speculative
        if s.draft is not None and self.kv.topk_blk is not None:
            raise ConfigError("--draft and --topk-blk do not go together: a token tree's KV entries are moved, "
                              "top-k's block summaries are not")
        if s.tokens is not None and s.tokens > self.prefill.chunk:
            raise ConfigError(f"--draft-tokens {s.tokens} exceeds --prefill-chunk {self.prefill.chunk}: a pass "
                              f"verifies at most one prefill chunk's tokens")

    @classmethod
    def flags(cls) -> dict[str, str]:
        return {**cls.FLAGS, **{d: f"{p}.{f}" for p, c in PARTS.items() for d, f in c.flags().items()}}

    @classmethod
    def from_flags(cls, values: Mapping[str, Any], **override) -> EngineConfig:
        parts = {p: c.from_flags(values) for p, c in PARTS.items()}
        own = {f: values[d] for d, f in cls.FLAGS.items() if d in values}
        return cls(**{**parts, **own, **override})

    @classmethod
    def flag_default(cls, dest: str):
        for c in PARTS.values():
            if dest in c.flags():
                return c.flag_default(dest)
        return super().flag_default(dest)

    def replace(self, **changes) -> EngineConfig:
        """A copy with fields of the parts changed by flag name (``quiet=True``, ``mode="mixed"``, ...)."""
        own = {k: v for k, v in changes.items() if k in self.FLAGS}
        parts = {}
        for p, c in PARTS.items():
            mine = {c.flags()[k]: v for k, v in changes.items() if k in c.flags()}
            if mine:
                parts[p] = dataclasses.replace(getattr(self, p), **mine)
        unknown = set(changes) - set(own) - {k for c in PARTS.values() for k in c.flags()}
        if unknown:
            raise TypeError(f"EngineConfig.replace: unknown flags {sorted(unknown)}")
        return dataclasses.replace(self, **own, **parts)

    @classmethod
    def of(cls, **flags) -> EngineConfig:
        """The config of these flag values, the others at their defaults (``EngineConfig.of(mode="stream",
        workers=2)``): tests and benchmarks."""
        unknown = set(flags) - set(cls.flags())
        if unknown:
            raise TypeError(f"EngineConfig.of: unknown flags {sorted(unknown)}")
        return cls.from_flags(flags)

    def get_flag(self, dest: str):
        """The value of the flag ``dest`` in this config (``cfg.get_flag("kv_block_tokens")``)."""
        obj = self
        for name in self.flags()[dest].split("."):
            obj = getattr(obj, name)
        return obj

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EngineConfig:
        """The inverse of ``to_dict`` (a server's record, a config file)."""
        parts = {p: c(**d[p]) for p, c in PARTS.items() if p in d}
        own = {f: d[f] for f in cls.FLAGS.values() if f in d}
        return cls(**parts, **own)
