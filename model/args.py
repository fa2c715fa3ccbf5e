"""ModelArgs: a model's hyper-parameters, built from their source of truth, for every architecture of the
registry (model/arch/): ``arch`` names it, the flags after it say which optional tensors its layers have.

Three sources, one frozen dataclass:
  - Meta's params.json (``ModelArgs.from_params_json``, Llama): FFN hidden size derived exactly as Meta does.
  - Hugging Face config.json (``ModelArgs.from_hf_config``): the registry picks the architecture from its
    "architectures" and that architecture reads its keys.
  - GGUF metadata (model/checkpoint.py ``GGUFCheckpoint``): likewise by ``general.architecture``.

Unknown keys, missing keys and broken invariants raise ``ConfigError`` naming the file, the key, and the
values expected and found. Runs in any process; owns nothing.

Sizes used by the cost model (docs/DESIGN.md, the cost model) come from here: ``group_params`` and ``layer_bytes``
(summed over the architecture's schema, model/groups.py ``kind_params``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import ConfigError

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 frequency-dependent RoPE scaling (Meta's ``apply_scaling``)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    ffn_hidden: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 8192
    arch: str = "llama"  # the registry's name (model/arch/); images packed before it existed are Llama
    qkv_bias: bool = False  # q/k/v projections have biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotary embedding (Qwen3)
    sliding_window: int | None = None  # attention within this many tokens (Mistral 7B); None: full
    n_experts: int = 0  # a mixture of experts' experts per layer (0: a dense model); ffn_hidden is one expert's
    n_experts_used: int = 0  # experts each token is routed to (the router's top-k)
    norm_topk_prob: bool = False  # the top-k routing weights renormalised to sum to 1 (Mixtral; Qwen3-MoE's)
    shared_ffn_hidden: int = 0  # hidden size of the shared expert every token runs (Qwen2-MoE); 0: none

    def __post_init__(self) -> None:
        from model.arch import get

        arch = get(self.arch)  # an unknown architecture: one line naming it and the supported ones
        self._check_experts(arch.routed)
        if isinstance(self.rope_scaling, dict):  # as model/arch/ reads it from a config
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for key in ("dim", "n_heads"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key} must be a positive integer, found {value!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        for key in ("dim", "n_layers", "n_heads", "vocab_size", "ffn_hidden", "n_kv_heads", "head_dim",
                    "max_seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key} must be a positive integer, found {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ConfigError(f"norm_eps {self.norm_eps} and rope_theta {self.rope_theta} must be positive")
        if self.sliding_window is not None and not self.sliding_window > 0:
            raise ConfigError(f"sliding_window must be a positive number of tokens or None, found "
                              f"{self.sliding_window}")

    def _check_experts(self, routed: bool) -> None:
        for key in ("n_experts", "n_experts_used", "shared_ffn_hidden"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{key} must be a non-negative integer, found {value!r}")
        if not routed:
            if self.n_experts or self.n_experts_used or self.shared_ffn_hidden:
                raise ConfigError(f"a {self.arch} model has no experts; found n_experts {self.n_experts}, "
                                  f"n_experts_used {self.n_experts_used}, shared_ffn_hidden {self.shared_ffn_hidden}")
            return
        if self.n_experts < 1:
            raise ConfigError(f"a {self.arch} model needs n_experts >= 1, found {self.n_experts}")
        if not 1 <= self.n_experts_used <= self.n_experts:
            raise ConfigError(f"n_experts_used (top-k) must be 1 to n_experts {self.n_experts}, found "
                              f"{self.n_experts_used}")

    @property
    def context(self) -> int:
        """The longest context a run computes exactly: the model's, or its sliding window where that is shorter."""
        return min(self.max_seq_len, self.sliding_window or self.max_seq_len)

    def check_context(self, n: int, flag: str = "--max-seq-len") -> None:
        """Refuse a run's context of ``n`` tokens the model cannot compute exactly: longer than its own context,
        or than the sliding window it attends within (model/arch/common.py ``check_window``). One line, naming
        ``flag`` and the numbers."""
        from model.arch import architecture

        if n > self.max_seq_len:
            raise ConfigError(f"{flag} {n} exceeds the model's context {self.max_seq_len}")
        check = architecture(self).check_run
        if check is not None:
            check(self, n, flag)

    # ---- derived sizes ---------------------------------------------------------------------------
    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    def group_params(self) -> dict[str, int]:
        """Parameter count of one group of each kind (layer kinds include their norms and biases)."""
        from model.groups import kind_params

        return kind_params(self)

    def layer_params(self) -> int:
        """Parameters of one layer: every group of each layer kind (each expert of a mixture's)."""
        from model.arch import architecture
        from model.groups import kind_count

        p = self.group_params()
        return sum(p[k.name] * kind_count(self, k) for k in architecture(self).layer_kinds)

    def layer_bytes(self, dtype: str = "bf16") -> int:
        return self.layer_params() * DTYPE_BYTES[dtype]

    def total_params(self) -> int:
        from model.arch import EMBED, HEAD

        p = self.group_params()
        return self.n_layers * self.layer_params() + p[EMBED] + p[HEAD]

    # ---- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "manifest") -> ModelArgs:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown model argument(s) {unknown}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_params_json(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        p = _read_json(path)
        return cls.from_params(p, source=str(path))

    @classmethod
    def from_params(cls, p: dict[str, Any], source: str = "params.json") -> ModelArgs:
        known = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                 "norm_eps", "rope_theta", "use_scaled_rope", "rope_scaling_factor", "max_batch_size",
                 "max_seq_len"}
        unknown = sorted(set(p) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        for key in ("dim", "n_layers", "n_heads", "vocab_size"):
            if key not in p:
                raise ConfigError(f"{source}: missing key {key!r}")
        if p["vocab_size"] is None or p["vocab_size"] <= 0:
            raise ConfigError(f"{source}: vocab_size must be positive, found {p['vocab_size']!r}")
        scaled = bool(p.get("use_scaled_rope", False))
        if "rope_scaling_factor" in p and not scaled:
            raise ConfigError(f"{source}: rope_scaling_factor={p['rope_scaling_factor']} contradicts "
                              f"use_scaled_rope={p.get('use_scaled_rope')!r}")
        scaling = RopeScaling(factor=float(p.get("rope_scaling_factor", 8.0))) if scaled else None
        try:
            return cls(
                dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads"),
                vocab_size=p["vocab_size"],
                ffn_hidden=meta_ffn_hidden(p["dim"], p.get("multiple_of", 256), p.get("ffn_dim_multiplier")),
                norm_eps=float(p.get("norm_eps", 1e-5)), rope_theta=float(p.get("rope_theta", 10000.0)),
                rope_scaling=scaling, tie_embeddings=False,
                max_seq_len=int(p.get("max_seq_len", 131072 if scaled else 8192)),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelArgs:
        """A Hugging Face config.json of any architecture of the registry (model/arch/); an unsupported one is
        refused with one line naming it and the supported classes."""
        from model.arch import for_hf_config

        path = Path(path)
        c = _read_json(path)
        arch = for_hf_config(c, str(path))
        try:
            return cls(arch=arch.name, **arch.hf_args(c, str(path)))
        except ConfigError as e:
            raise ConfigError(e.args[0] if str(path) in e.args[0] else f"{path}: {e}") from None


def meta_ffn_hidden(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """FFN hidden size exactly as Meta's FeedForward computes it (llama-models, model.py)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


# Published shapes for synthetic images and the cost model: Meta params.json values (Llama), or ModelArgs
# keywords with their "arch" (the others, from their config.json).
PRESETS: dict[str, dict[str, Any]] = {
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256, multiple_of=4096,
                         ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                        ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                        ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True,
                        rope_scaling_factor=32.0),
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=64,
                 ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True),
    "qwen2.5-72b": dict(arch="qwen2", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=152064,
                        ffn_hidden=29568, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, qkv_bias=True),
    "qwen2.5-7b": dict(arch="qwen2", dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, vocab_size=152064,
                       ffn_hidden=18944, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, qkv_bias=True),
    "qwen3-32b": dict(arch="qwen3", dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, head_dim=128,
                      vocab_size=151936, ffn_hidden=25600, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960,
                      qk_norm=True),
    "mistral-nemo-12b": dict(arch="mistral", dim=5120, n_layers=40, n_heads=32, n_kv_heads=8, head_dim=128,
                             vocab_size=131072, ffn_hidden=14336, norm_eps=1e-5, rope_theta=1000000.0,
                             max_seq_len=131072),
    # mixtures of experts (ffn_hidden: one expert's): 8 experts of 14336 (top-2); 128 of 768 / 1536 (top-8); 64
    # of 2560 (top-8) and a shared expert of 20480
    "mixtral-8x7b": dict(arch="mixtral", dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000,
                         ffn_hidden=14336, norm_eps=1e-5, rope_theta=1000000.0, max_seq_len=32768, n_experts=8,
                         n_experts_used=2, norm_topk_prob=True),
    "qwen3-30b-a3b": dict(arch="qwen3_moe", dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128,
                          vocab_size=151936, ffn_hidden=768, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=40960,
                          qk_norm=True, n_experts=128, n_experts_used=8, norm_topk_prob=True),
    "qwen3-235b-a22b": dict(arch="qwen3_moe", dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, head_dim=128,
                            vocab_size=151936, ffn_hidden=1536, norm_eps=1e-6, rope_theta=1000000.0,
                            max_seq_len=40960, qk_norm=True, n_experts=128, n_experts_used=8, norm_topk_prob=True),
    "qwen2-57b-a14b": dict(arch="qwen2_moe", dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, vocab_size=151936,
                           ffn_hidden=2560, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, qkv_bias=True,
                           n_experts=64, n_experts_used=8, shared_ffn_hidden=20480),
    # tiny shapes of the other architectures, for tests: biases and a tied embedding; head_dim != dim / heads
    "tiny-qwen2": dict(arch="qwen2", dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=512, ffn_hidden=704,
                       norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=8192, qkv_bias=True, tie_embeddings=True),
    "tiny-qwen3": dict(arch="qwen3", dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=48, vocab_size=512,
                       ffn_hidden=704, norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=8192, qk_norm=True),
    "tiny-mixtral": dict(arch="mixtral", dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden=96,
                         norm_eps=1e-5, rope_theta=1000000.0, max_seq_len=8192, n_experts=8, n_experts_used=2,
                         norm_topk_prob=True),
}


def preset(name: str, n_layers: int | None = None) -> ModelArgs:
    if name not in PRESETS:
        raise ConfigError(f"unknown model shape {name!r}; choose one of {sorted(PRESETS)}")
    p = dict(PRESETS[name])
    if n_layers is not None:
        p["n_layers"] = n_layers
    if "arch" in p:
        return ModelArgs(**p)
    args = ModelArgs.from_params(p, source=f"preset {name}")
    if name == "llama3.2-1b":
        args = dataclasses.replace(args, tie_embeddings=True)
    return args


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    units = ["KiB", "MiB", "GiB", "TiB"]
    e = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** e:.2f} {units[e - 1]}"
