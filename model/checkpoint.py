"""Checkpoint readers: Meta ``consolidated.NN.pth``, Hugging Face safetensors, GGUF.

Every reader exposes the same small interface (``Checkpoint``): the model's ``ModelArgs``, the tokenizer
source, and ``tensor(key)`` returning one full tensor under Meta's state-dict name and in Meta's q/k row
layout. Tensors are read lazily (mmap), one at a time, so packing a 70B checkpoint holds one group in RAM.

Layouts:
  - Meta shards split each tensor along its own model-parallel dimension (column-parallel wq/wk/wv/w1/w3
    and output on dim 0, row-parallel wo/w2 on dim 1, the embedding on dim 0 in Llama 3 and dim 1 in
    Llama 2; norms replicated). The split dimension is inferred from the shard shapes against the full
    shape, so every variant merges right.
  - Hugging Face's conversion permutes wq/wk rows so that rotate-half RoPE works; ``unpermute_hf`` undoes
    it (Meta uses interleaved pairs).
  - llama.cpp's converter applies the inverse of HF's permutation, so GGUF q/k rows are already in Meta's
    interleaved order; GGUF tensors are dequantized with the ``gguf`` package.

Runs in the ``launch.py pack`` process. ``torch.load`` is always called with weights_only=True.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.args import ModelArgs, RopeScaling
from model.errors import CheckpointError, ConfigError
from model.groups import global_names, group_tensor_shapes
from model.llama import rope_scaling_matches
from model.qformats import GGUF_SCHEMES, storage_bytes


class Checkpoint(ABC):
    format: str

    def __init__(self, path: Path, args: ModelArgs) -> None:
        self.path, self.args = path, args
        self.shapes = {key: group_tensor_shapes(args, g)[local] for g, local, key in global_names(args)}

    @abstractmethod
    def tensor(self, key: str) -> torch.Tensor:
        """Full tensor under Meta's state-dict ``key``, Meta layout, source dtype (fp32 if dequantized)."""

    def fill(self, key: str, out: torch.Tensor) -> None:
        """Write tensor ``key`` into ``out`` (converting dtype); readers may override to avoid temporaries."""
        out.copy_(self.tensor(key))

    def stored_format(self, key: str) -> str | None:
        """The quantized format (model/qformats.py) this checkpoint stores ``key`` in, that an image can keep as
        it is; None when it is stored plain (or in a format that is not kept: see ``stored_type``)."""
        return None

    def stored_type(self, key: str) -> str:
        """The name of the type ``key`` is stored as (for messages)."""
        return "plain"

    def raw(self, key: str) -> torch.Tensor:
        """The bytes of ``key`` in its ``stored_format`` (1-D uint8)."""
        raise NotImplementedError(f"{type(self).__name__} stores {key} plain")

    def tokenizer_source(self) -> Path | None:
        """A path ``model.tokenizer.load_tokenizer`` accepts, or None if the checkpoint ships none."""
        return None

    def source_files(self) -> list[Path]:
        """The files this checkpoint is read from: the file, or every file of its directory (a pack must not
        write over any of them)."""
        p = Path(self.path)
        return [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())

    def _check_shape(self, key: str, t: torch.Tensor, where: str) -> torch.Tensor:
        want = tuple(self.shapes[key])
        if tuple(t.shape) != want:
            raise CheckpointError(f"{where}: tensor {key} has shape {tuple(t.shape)}, expected {want}")
        return t

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor at once (small models and tests only)."""
        return {key: self.tensor(key) for key in self.shapes}


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Pick the reader from what ``path`` holds: a .gguf file, a Meta directory or an HF directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".gguf" or _has_gguf_magic(path):
            return GGUFCheckpoint(path)
        raise CheckpointError(f"{path}: expected a .gguf file or a checkpoint directory")
    if (path / "params.json").exists():
        return MetaCheckpoint(path)
    if (path / "config.json").exists():
        return HFCheckpoint(path)
    raise CheckpointError(f"{path}: neither params.json (Meta) nor config.json (Hugging Face) found")


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# ---- Meta --------------------------------------------------------------------------------------------

class MetaCheckpoint(Checkpoint):
    format = "meta"

    def __init__(self, path: Path) -> None:
        try:
            args = ModelArgs.from_params_json(path / "params.json")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        super().__init__(path, args)
        self.files = sorted(path.glob("consolidated.*.pth"))
        if not self.files:
            raise CheckpointError(f"{path}: no consolidated.*.pth shards found beside params.json")
        self._check_shard_numbers()
        self.shards = [self._load(f) for f in self.files]

    def _check_shard_numbers(self) -> None:
        nums = sorted(int(m.group(1)) for f in self.files if (m := re.match(r"consolidated\.(\d+)\.pth$", f.name)))
        if nums != list(range(len(self.files))):
            raise CheckpointError(f"{self.path}: shards must be consolidated.00.pth .. consolidated."
                                  f"{len(self.files) - 1:02d}.pth, found {[f.name for f in self.files]}")

    @staticmethod
    def _load(f: Path) -> dict[str, torch.Tensor]:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises RuntimeError/UnpicklingError/EOFError for broken files
            raise CheckpointError(f"{f}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else 'truncated?'})") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{f}: expected a state dict, found {type(sd).__name__}")
        return sd

    def tensor(self, key: str) -> torch.Tensor:
        parts = []
        for f, sd in zip(self.files, self.shards):
            if key not in sd:
                raise CheckpointError(f"{f}: tensor {key} missing")
            parts.append(sd[key])
        return self._check_shape(key, merge_shards(key, parts, self.shapes[key], self.files), str(self.files[0]))

    def tokenizer_source(self) -> Path | None:
        p = self.path / "tokenizer.model"
        return p if p.exists() else None


def merge_shards(key: str, parts: list[torch.Tensor], full: tuple[int, ...], files: list[Path]) -> torch.Tensor:
    """Concatenate model-parallel shards along the one dimension whose sizes add up to ``full``."""
    if len(parts) == 1 or all(tuple(p.shape) == tuple(full) for p in parts):
        return parts[0]
    shapes = [tuple(p.shape) for p in parts]
    for d in range(len(full)):
        others_ok = all(s[:d] + s[d + 1:] == tuple(full[:d]) + tuple(full[d + 1:]) for s in shapes)
        if others_ok and sum(s[d] for s in shapes) == full[d]:
            return torch.cat(parts, dim=d)
    raise CheckpointError(f"{files[0].parent}: shards of {key} have shapes {shapes}, which do not "
                          f"concatenate to the expected {tuple(full)}")


# ---- Hugging Face ------------------------------------------------------------------------------------

HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def hf_name(key: str) -> str:
    m = re.match(r"layers\.(\d+)\.(.+)$", key)
    return f"model.layers.{m.group(1)}.{HF_NAMES[m.group(2)]}" if m else HF_NAMES[key]


def unpermute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row permutation: (heads, 2, hd/2) row order -> Meta's (heads, hd/2, 2)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's permutation (Meta -> HF row order), used by tests that write HF checkpoints."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


class HFCheckpoint(Checkpoint):
    format = "hf"

    def __init__(self, path: Path) -> None:
        try:
            args = ModelArgs.from_hf_config(path / "config.json")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        super().__init__(path, args)
        self._handles: dict[str, Any] = {}  # before _weight_map, which opens model.safetensors
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        single = self.path / "model.safetensors"
        if not single.exists():
            raise CheckpointError(f"{self.path}: neither model.safetensors nor model.safetensors.index.json found")
        return {name: single.name for name in self._open(single.name).keys()}

    def _open(self, fname: str):
        from safetensors import safe_open

        if fname not in self._handles:
            f = self.path / fname
            if not f.exists():
                raise CheckpointError(f"{f}: shard named in the index is missing")
            try:
                self._handles[fname] = safe_open(str(f), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
        return self._handles[fname]

    def tensor(self, key: str) -> torch.Tensor:
        name = hf_name(key)
        if key == "output.weight" and self.args.tie_embeddings:
            raise KeyError(key)
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name} (for {key}) not found in the checkpoint")
        f = self.path / self.weight_map[name]
        try:
            t = self._open(self.weight_map[name]).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor {name} ({e})") from None
        self._check_shape(key, t, str(f))  # before the un-permute, which would fail on another shape
        if key.endswith("attention.wq.weight"):
            t = unpermute_hf(t, self.args.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = unpermute_hf(t, self.args.n_kv_heads)
        return t

    def tokenizer_source(self) -> Path | None:
        for name in ("tokenizer.json", "tokenizer.model"):
            if (self.path / name).exists():
                return self.path / name
        return None


# ---- GGUF --------------------------------------------------------------------------------------------

GGUF_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}


def gguf_name(key: str) -> str:
    m = re.match(r"layers\.(\d+)\.(.+)$", key)
    return f"blk.{m.group(1)}.{GGUF_NAMES[m.group(2)]}" if m else GGUF_NAMES[key]


class GGUFCheckpoint(Checkpoint):
    format = "gguf"

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path  # _args() names the file in its errors before Checkpoint.__init__ runs
        try:
            self.reader = gguf.GGUFReader(str(path), "r")
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable GGUF file of {path.stat().st_size} bytes, truncated or "
                                  f"corrupt ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        super().__init__(path, self._args())

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def _args(self) -> ModelArgs:
        arch = self.field("general.architecture")
        if arch != "llama":
            raise CheckpointError(f"{self.path}: GGUF architecture {arch!r} is not supported (expected 'llama')")

        def need(k: str) -> Any:
            v = self.field(f"llama.{k}")
            if v is None:
                raise CheckpointError(f"{self.path}: GGUF metadata key llama.{k} missing")
            return v

        scaling_type = self.field("llama.rope.scaling.type", "none")
        if scaling_type not in ("none", None):
            raise CheckpointError(f"{self.path}: rope scaling type {scaling_type!r} is not supported")
        n_heads, dim = int(need("attention.head_count")), int(need("embedding_length"))
        head_dim = int(self.field("llama.attention.key_length", dim // n_heads))
        rope_dims = int(self.field("llama.rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise CheckpointError(f"{self.path}: partial rotary embeddings (rope.dimension_count {rope_dims} "
                                  f"< head_dim {head_dim}) are not supported")
        vocab = self.field("llama.vocab_size") or len(self.reader.fields["tokenizer.ggml.tokens"].data)
        args = dict(dim=dim, n_layers=int(need("block_count")), n_heads=n_heads,
                    n_kv_heads=int(self.field("llama.attention.head_count_kv", n_heads)), head_dim=head_dim,
                    vocab_size=int(vocab), ffn_hidden=int(need("feed_forward_length")),
                    norm_eps=float(need("attention.layer_norm_rms_epsilon")),
                    rope_theta=float(self.field("llama.rope.freq_base", 10000.0)),
                    tie_embeddings="output.weight" not in self.tensors,
                    max_seq_len=int(self.field("llama.context_length", 8192)))
        args["rope_scaling"] = self._rope_scaling(args)
        try:
            return ModelArgs(**args)
        except ConfigError as e:
            raise CheckpointError(f"{self.path}: {e}") from None

    def _rope_scaling(self, args: dict) -> RopeScaling | None:
        """llama.cpp stores Llama-3.1 scaling as a ``rope_freqs`` tensor of divisors; recognise its parameters."""
        if "rope_freqs.weight" not in self.tensors:
            return None
        factors = self._array("rope_freqs.weight").astype(np.float64)
        for factor in (8.0, 32.0, 16.0, 4.0):
            cand = RopeScaling(factor=factor, original_max_position_embeddings=8192)
            if rope_scaling_matches(cand, args["rope_theta"], args["head_dim"], factors):
                return cand
        raise CheckpointError(f"{self.path}: rope_freqs tensor does not match Llama-3 scaling with any known factor")

    def _array(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self.tensors[name]
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {name} has type {t.tensor_type.name}, which the gguf "
                                  f"package cannot dequantize") from None
        except Exception as e:
            raise CheckpointError(f"{self.path}: tensor {name} is unreadable ({e}); truncated file?") from None
        return arr.reshape(tuple(int(n) for n in reversed(t.shape)))

    def _gguf_tensor(self, key: str):
        name = gguf_name(key)
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name} (for {key}) not found")
        return self.tensors[name]

    def stored_type(self, key: str) -> str:
        return self._gguf_tensor(key).tensor_type.name

    def stored_format(self, key: str) -> str | None:
        t = self._gguf_tensor(key)
        fmt = {v: k for k, v in GGUF_SCHEMES.items()}.get(int(t.tensor_type))
        shape = tuple(int(n) for n in reversed(t.shape))
        if fmt is None or len(shape) != 2:
            return None
        self._check_shape(key, torch.empty(shape, device="meta"), str(self.path))
        return fmt

    def raw(self, key: str) -> torch.Tensor:
        t = self._gguf_tensor(key)
        data = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        want = storage_bytes(self.stored_format(key), self.shapes[key])
        if data.size != want:
            raise CheckpointError(f"{self.path}: tensor {t.name} holds {data.size} bytes of {t.tensor_type.name}, "
                                  f"its shape {self.shapes[key]} needs {want}; truncated file?")
        return torch.from_numpy(data.copy())

    def tensor(self, key: str) -> torch.Tensor:
        name = gguf_name(key)
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name} (for {key}) not found")
        arr = self._array(name)
        t = torch.from_numpy(arr if arr.flags.writeable and arr.flags.c_contiguous else arr.copy())
        if t.dtype == torch.float64:
            t = t.float()
        return self._check_shape(key, t, str(self.path))

    def tokenizer_source(self) -> Path | None:
        return self.path

