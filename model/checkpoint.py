"""Checkpoint readers: Meta ``consolidated.NN.pth``, Hugging Face safetensors, GGUF, for every architecture of
the registry (model/arch/): the reader finds the architecture (config.json's "architectures", the GGUF's
``general.architecture``), which gives the model's arguments and every tensor's name in the checkpoint.

Every reader exposes the same small interface (``Checkpoint``): the model's ``ModelArgs``, the tokenizer
source, and ``tensor(key)`` returning one full tensor under Meta's state-dict name and in Meta's q/k row
layout. Tensors are read lazily (mmap), one at a time, so packing a 70B checkpoint holds one group in RAM.

Layouts:
  - Meta shards split each tensor along its own model-parallel dimension (column-parallel wq/wk/wv/w1/w3
    and output on dim 0, row-parallel wo/w2 on dim 1, the embedding on dim 0 in Llama 3 and dim 1 in
    Llama 2; norms replicated). The split dimension is inferred from the shard shapes against the full
    shape, so every variant merges right.
  - Hugging Face checkpoints hold q/k rows (and their biases, and Qwen3's per-head q/k norms) in rotate-half
    order (Llama's conversion permuted Meta's rows into it; Qwen was trained in it); ``unpermute_hf`` turns
    them into Meta's interleaved pairs (model/arch/schema.py ``TensorDef.rope``).
  - llama.cpp's converter applies the inverse of HF's permutation to ``llama`` GGUFs, so their q/k rows are
    already in Meta's order; its ``qwen2``/``qwen3`` GGUFs keep HF's (``Architecture.gguf_rope_half``), and are
    un-permuted here, blocks too (a row permutation moves whole rows of blocks). GGUF tensors are dequantized
    with the ``gguf`` package.

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

from model.arch import LAYER_PREFIX, for_gguf
from model.arch.schema import TensorDef
from model.args import ModelArgs, RopeScaling
from model.errors import CheckpointError, ConfigError
from model.groups import global_names, group_tensor_shapes, split_key, tensor_def
from model.qformats import GGUF_SCHEMES, storage_bytes
from model.transformer import rope_scaling_matches


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

    def _check_shape(self, key: str, t: torch.Tensor, where: str, name: str | None = None) -> torch.Tensor:
        """``t`` if it has ``key``'s shape; else the error names the checkpoint's tensor ``name`` too."""
        want = tuple(self.shapes[key])
        if tuple(t.shape) != want:
            what = key if name is None or name == key else f"{name} for {key}"
            raise CheckpointError(f"{where}: tensor {what} has shape {tuple(t.shape)}, expected {want}")
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
    """Meta's params.json + consolidated.NN.pth: Llama's own format (model/arch/llama.py)."""

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

def _split_key(key: str) -> tuple[int | None, str]:
    """State-dict key -> (layer index or None, local name)."""
    layer, _, local = split_key(key)
    return layer, local


def hf_name(key: str, args: ModelArgs) -> str:
    """The Hugging Face name of state-dict ``key`` in a checkpoint of ``args``' architecture (an expert's: its
    own tensor, ``{e}`` in the schema's name)."""
    layer, expert, local = split_key(key)
    t = tensor_def(args, local)
    name = t.hf if expert is None else t.hf.format(e=expert)
    return f"model.{LAYER_PREFIX}{layer}.{name}" if layer is not None else name


def gguf_name(key: str, args: ModelArgs) -> str:
    """llama.cpp's name of state-dict ``key`` (an expert's: the layer's tensor that stacks every expert)."""
    layer, _, local = split_key(key)
    t = tensor_def(args, local)
    return f"blk.{layer}.{t.gguf}" if layer is not None else t.gguf


def rope_heads(t: TensorDef, args: ModelArgs) -> int | None:
    """How many heads' rows of tensor ``t`` are in rotary order (None: none are)."""
    return {"q": args.n_heads, "k": args.n_kv_heads, "head": 1}.get(t.rope) if t.rope else None


def to_meta_rows(t: torch.Tensor, local: str, args: ModelArgs) -> torch.Tensor:
    """Rows of tensor ``local`` from rotate-half into Meta's interleaved order (any dtype; a 1-D bias or norm
    is one column; a block-quantized matrix's bytes as (rows, row bytes)); others as they are."""
    heads = rope_heads(tensor_def(args, local), args)
    if heads is None:
        return t
    return unpermute_hf(t.reshape(t.shape[0], -1), heads).reshape(t.shape)


def unpermute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's q/k row permutation: (heads, 2, hd/2) row order -> Meta's (heads, hd/2, 2)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's permutation (Meta -> HF row order), used by tests that write HF checkpoints."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


class HFCheckpoint(Checkpoint):
    """A Hugging Face checkpoint of any architecture of the registry: config.json + safetensors."""

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
        if key not in self.shapes:
            raise KeyError(key)
        name = hf_name(key, self.args)
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name} (for {key}) not found in the checkpoint")
        f = self.path / self.weight_map[name]
        try:
            t = self._open(self.weight_map[name]).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read tensor {name} ({e})") from None
        self._check_shape(key, t, str(f), name)  # before the un-permute, which would fail on another shape
        return to_meta_rows(t, _split_key(key)[1], self.args)

    def tokenizer_source(self) -> Path | None:
        for name in ("tokenizer.json", "tokenizer.model"):
            if (self.path / name).exists():
                return self.path / name
        return None


# ---- GGUF --------------------------------------------------------------------------------------------

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
        name = self.field("general.architecture")
        try:
            self.arch = for_gguf(name, str(self.path), routed=bool(self.field(f"{name}.expert_count", 0)))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        args = self.arch.gguf_args(self, str(self.path))
        args["rope_scaling"] = self._rope_scaling(args)
        try:
            return ModelArgs(arch=self.arch.name, **args)
        except ConfigError as e:
            raise CheckpointError(f"{self.path}: {e}") from None

    def _rope_scaling(self, args: dict) -> RopeScaling | None:
        """llama.cpp stores Llama-3.1 scaling as a ``rope_freqs`` tensor of divisors; recognise its parameters."""
        if "rope_freqs.weight" not in self.tensors:
            return None
        t = self.tensors["rope_freqs.weight"]
        factors = self._dequantize(t, t.data, tuple(int(n) for n in reversed(t.shape))).astype(np.float64)
        for factor in (8.0, 32.0, 16.0, 4.0):
            cand = RopeScaling(factor=factor, original_max_position_embeddings=8192)
            if rope_scaling_matches(cand, args["rope_theta"], args["head_dim"], factors):
                return cand
        raise CheckpointError(f"{self.path}: rope_freqs tensor does not match Llama-3 scaling with any known factor")

    def _dequantize(self, t, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        from gguf.quants import dequantize

        try:
            arr = dequantize(data, t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, which the gguf "
                                  f"package cannot dequantize") from None
        except Exception as e:
            raise CheckpointError(f"{self.path}: tensor {t.name} is unreadable ({e}); truncated file?") from None
        return arr.reshape(shape)

    def _gguf_tensor(self, key: str):
        name = gguf_name(key, self.args)
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: tensor {name} (for {key}) not found")
        return self.tensors[name]

    def _slice(self, key: str) -> tuple[Any, np.ndarray, tuple[int, ...]]:
        """(the GGUF tensor of ``key``, its data, its shape as stored): for an expert, its slice of the layer's
        stacked tensor (quantized blocks too: a row of blocks per row), after the stack's shape is checked
        against the expert count."""
        t = self._gguf_tensor(key)
        shape = tuple(int(n) for n in reversed(t.shape))
        expert = split_key(key)[1]
        if expert is None:
            return t, t.data, shape
        want = (self.args.n_experts, *self.shapes[key])
        if shape != want:
            raise CheckpointError(f"{self.path}: tensor {t.name} has shape {shape}, expected {want} (the metadata's "
                                  f"{self.args.n_experts} experts of {tuple(self.shapes[key])})")
        return t, t.data[expert], shape[1:]

    def stored_type(self, key: str) -> str:
        return self._gguf_tensor(key).tensor_type.name

    def stored_format(self, key: str) -> str | None:
        t, _, shape = self._slice(key)
        fmt = {v: k for k, v in GGUF_SCHEMES.items()}.get(int(t.tensor_type))
        if fmt is None or len(shape) != 2:
            return None
        self._check_shape(key, torch.empty(shape, device="meta"), str(self.path), t.name)
        return fmt

    def raw(self, key: str) -> torch.Tensor:
        t, data, _ = self._slice(key)
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        want = storage_bytes(self.stored_format(key), self.shapes[key])
        if data.size != want:
            raise CheckpointError(f"{self.path}: tensor {t.name} holds {data.size} bytes of {t.tensor_type.name}, "
                                  f"its shape {self.shapes[key]} needs {want}; truncated file?")
        return self._meta_rows(key, torch.from_numpy(data.copy()).view(self.shapes[key][0], -1)).reshape(-1)

    def tensor(self, key: str) -> torch.Tensor:
        t, data, shape = self._slice(key)
        arr = self._dequantize(t, data, shape)
        if arr.ndim == 1 and tuple(self.shapes[key]) == (1, arr.shape[0]):
            arr = arr.reshape(1, -1)  # a (1, dim) gate llama.cpp may store as (dim,)
        out = torch.from_numpy(arr if arr.flags.writeable and arr.flags.c_contiguous else arr.copy())
        if out.dtype == torch.float64:
            out = out.float()
        return self._meta_rows(key, self._check_shape(key, out, str(self.path), t.name))

    def _meta_rows(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """A rotate-half architecture's q/k rows (model/arch/schema.py) into Meta's order; others as they are."""
        return to_meta_rows(t, _split_key(key)[1], self.args) if self.arch.gguf_rope_half else t

    def tokenizer_source(self) -> Path | None:
        return self.path

