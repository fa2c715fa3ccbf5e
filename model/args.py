"""ModelArgs: the Llama architecture's hyper-parameters, built from their source of truth.

Three sources, one frozen dataclass:
  - Meta's params.json (``ModelArgs.from_params_json``): FFN hidden size derived exactly as Meta does.
  - Hugging Face config.json of a LlamaForCausalLM (``ModelArgs.from_hf_config``).
  - GGUF metadata of a ``llama`` architecture file (``ModelArgs.from_gguf_fields`` in model/gguf_loader.py
    feeds plain values to ``ModelArgs(...)``).

Unknown keys, missing keys and broken invariants raise ``ConfigError`` naming the file, the key, and the
values expected and found. Runs in any process; owns nothing.

Sizes used by the cost model (docs/DESIGN.md, the cost model) come from here: ``group_params`` and ``layer_bytes``.
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

    def __post_init__(self) -> None:
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

    # ---- derived sizes ---------------------------------------------------------------------------
    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    def group_params(self) -> dict[str, int]:
        """Parameter count of each group kind (attention and FFN include their norm)."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2 + d
        ffn = 3 * d * self.ffn_hidden + d
        embed = self.vocab_size * d
        head = d + (0 if self.tie_embeddings else self.vocab_size * d)
        return {"attention": attn, "feed_forward": ffn, "tok_embeddings": embed, "head": head}

    def layer_bytes(self, dtype: str = "bf16") -> int:
        p = self.group_params()
        return (p["attention"] + p["feed_forward"]) * DTYPE_BYTES[dtype]

    def total_params(self) -> int:
        p = self.group_params()
        return self.n_layers * (p["attention"] + p["feed_forward"]) + p["tok_embeddings"] + p["head"]

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
        path = Path(path)
        c = _read_json(path)
        archs = c.get("architectures") or []
        if "LlamaForCausalLM" not in archs and c.get("model_type") != "llama":
            raise ConfigError(f"{path}: expected a LlamaForCausalLM config, found architectures={archs} "
                              f"model_type={c.get('model_type')!r}")
        for key in ("attention_bias", "mlp_bias"):
            if c.get(key):
                raise ConfigError(f"{path}: {key}=true is not a Llama layout this runtime supports")
        if c.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{path}: hidden_act must be 'silu', found {c.get('hidden_act')!r}")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if key not in c:
                raise ConfigError(f"{path}: missing key {key!r}")
        scaling = None
        rs = c.get("rope_scaling") or c.get("rope_parameters")  # transformers >= 5 saves rope_parameters
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind == "default":
                scaling = None
            elif kind == "llama3":
                try:
                    scaling = RopeScaling(float(rs["factor"]), float(rs["low_freq_factor"]),
                                          float(rs["high_freq_factor"]), int(rs["original_max_position_embeddings"]))
                except KeyError as e:
                    raise ConfigError(f"{path}: rope_scaling of type llama3 lacks {e.args[0]!r}") from None
            else:
                raise ConfigError(f"{path}: rope_scaling type {kind!r} is not supported (llama3 or none)")
        theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        try:
            return cls(
                dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                n_kv_heads=c.get("num_key_value_heads"), head_dim=c.get("head_dim"), vocab_size=c["vocab_size"],
                ffn_hidden=c["intermediate_size"], norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta), rope_scaling=scaling,
                tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                max_seq_len=int(c.get("max_position_embeddings", 8192)),
            )
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


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


# Published shapes (Meta params.json values) for synthetic images and the cost model.
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
}


def preset(name: str, n_layers: int | None = None) -> ModelArgs:
    if name not in PRESETS:
        raise ConfigError(f"unknown model shape {name!r}; choose one of {sorted(PRESETS)}")
    p = dict(PRESETS[name])
    if n_layers is not None:
        p["n_layers"] = n_layers
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
