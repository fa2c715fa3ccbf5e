"""The packed runtime image: layout, manifest, validation, and plain (buffered) group reads.

Layout of an image (a regular file or a raw block device):

    offset 0        header, HEADER_SIZE = 4096 bytes (struct HEADER_FMT, little-endian):
                      magic    8s   b"LLMSTRM\\0"
                      version  u32  FORMAT_VERSION
                      hdr_size u32  4096
                      align    u32  4096: every group extent starts and ends on this boundary
                      n_groups u32
                      img_size u64  bytes from offset 0 to the end of the last extent
                      uuid     16s  random; the manifest carries the same value
                      hdr_crc  u32  zlib.crc32 of the bytes above
    offset 4096     group extents in forward order (model/groups.py: the embedding, each layer's groups,
                    the head); each one contiguous, 4 KiB-aligned, zero-padded to a
                    multiple of 4 KiB. Tensors inside a group start on TENSOR_ALIGN (256 B) boundaries so
                    that views into a staging buffer are aligned for any kernel.

The manifest (JSON, ``IMAGE.manifest.json`` beside a file image; given explicitly for a block device)
holds the model arguments, dtype, the uuid and image size, and for every group its offset, size (the
padded extent), crc32 of the whole extent, and each tensor's local name, dtype, shape, offset and nbytes.
Since format version 4 the model arguments name the architecture (``args.arch``, model/arch/: its schema gives
the groups and their tensors); images of versions 1-3 are Llama's. ``pack --tensor-parallel N`` (format 3,
and 4 with the manifest key ``tensor_parallel``) stores each group as N
contiguous shards, one per tensor-parallel rank (model/shards.py: which rows or columns each holds), every
shard starting on a 4 KiB boundary: a rank's bytes of a group are one contiguous read and one copy. Each
tensor entry then names its ``shard``; the group stays one crc32 extent (pools, reads and ``verify`` see no
difference). Plain images (versions 1 and 2) are N = 1.
Since format version 2 a tensor's dtype may name a quantized format (model/qformats.py: llama.cpp's blocks as
a GGUF stored them, or our int8 / int4 with its ``group``): its bytes are that format's, its shape the
matrix's logical shape; the image's own dtype is then that of every other tensor and of the compute. Version
1 images (every tensor plain) still read. Tokenizer files are copied beside the manifest.

``Image.open`` validates manifest and header against each other and against the target's size; group
reads verify the crc32 and raise ``ImageFormatError`` naming the image, the group, the offset and the
values expected and found. This module is used by ``launch.py`` (pack, run) and by the I/O workers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.args import ModelArgs
from model.errors import ConfigError, ImageFormatError, ReadError
from model.groups import global_names, group_kind, group_layer, group_names, group_prefix, group_tensor_shapes
from model.qformats import OURS, SCHEMES, block_size, is_quantized, storage_bytes
from model.shards import check_tensor_parallel, shard_shape
from runtime.format.blockdev import check_readable, is_block_device, target_size

if TYPE_CHECKING:
    import torch

    from model.quant import QuantWeight

MAGIC = b"LLMSTRM\0"
# 2: a tensor's dtype may name a quantized format (model/qformats.py); 3: groups stored as tensor-parallel shards
# (manifest key tensor_parallel); 4: the model arguments name the architecture (args.arch), shards or not
FORMAT_VERSION = 4
ARCH_VERSION = 4  # the first version whose manifests must name the architecture
READABLE_VERSIONS = (1, 2, 3, 4)
HEADER_SIZE = 4096
ALIGN = 4096
TENSOR_ALIGN = 256
HEADER_FMT = "<8sIIIIQ16s"
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def __getattr__(name: str):
    """``TORCH_DTYPES`` on first use: the pool's processes import this module without paying for torch."""
    if name == "TORCH_DTYPES":
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class TensorSpec:
    name: str  # local name within the group, e.g. "attention.wq.weight"
    dtype: str  # bf16 / fp16 / fp32, or a quantized format (model/qformats.py: q4_1, int4, ...)
    shape: tuple[int, ...]  # the logical shape (a quantized matrix's rows and columns)
    offset: int  # bytes from the start of the group extent
    nbytes: int
    group: int | None = None  # int8 / int4: values per scale along a row
    shard: int | None = None  # format 3: the tensor-parallel rank whose shard this is (shape: the shard's)

    @property
    def quantized(self) -> bool:
        return is_quantized(self.dtype)


@dataclass(frozen=True)
class GroupSpec:
    name: str
    offset: int  # bytes from the start of the image
    size: int  # padded extent size, a multiple of ALIGN
    crc32: int | None
    tensors: tuple[TensorSpec, ...]

    @property
    def quantized(self) -> bool:
        return any(t.quantized for t in self.tensors)

    @property
    def kind(self) -> str:
        return group_kind(self.name)

    @property
    def layer(self) -> int | None:
        return group_layer(self.name)

    @property
    def n_shards(self) -> int:
        return 1 + max((t.shard or 0 for t in self.tensors), default=0)

    def shard(self, r: int) -> GroupSpec:
        """Shard r of a format-3 group as a group of its own: offset and size of its extent within this group's
        (4 KiB-aligned, the last one padded to the group's end), tensors relative to it."""
        mine = [t for t in self.tensors if t.shard == r]
        if not mine:
            raise KeyError(f"group {self.name} has no shard {r} ({self.n_shards} shards)")
        lo = min(t.offset for t in mine)
        later = [t.offset for t in self.tensors if t.shard is not None and t.shard > r]
        hi = align_up(min(later)) if later else self.size
        return GroupSpec(self.name, lo, hi - lo, None,
                         tuple(dataclasses.replace(t, offset=t.offset - lo, shard=None) for t in mine))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "layer": self.layer, "offset": self.offset,
                "size": self.size, "crc32": self.crc32,
                "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset,
                             "nbytes": t.nbytes, **({"group": t.group} if t.group else {}),
                             **({"shard": t.shard} if t.shard is not None else {})} for t in self.tensors]}


QUANTIZERS = ("int8", "int4", "q8_0", "q4_0", "q4_1")  # --quantize: ours, and gguf's quantizers


@dataclass(frozen=True)
class WeightFormat:
    """How a pack stores the weights: ``dtype`` for every tensor not quantized (and the compute); ``quantize``
    the attention and FFN matrices (and with ``quantize_output`` the output matrix) in a format of
    model/qformats.py (int8 / int4 in groups of ``group_size``; q8_0 / q4_0 / q4_1 with gguf's quantizers);
    ``keep_blocks``: a GGUF's tensors of a kept type stay in their blocks (the others are dequantized)."""

    dtype: str = "bf16"
    quantize: str | None = None
    group_size: int = 64
    quantize_output: bool = False
    keep_blocks: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"--dtype must be one of {sorted(DTYPE_BYTES)}, found {self.dtype!r}")
        if self.quantize is not None and self.quantize not in QUANTIZERS:
            raise ConfigError(f"--quantize {self.quantize!r}: one of {QUANTIZERS}")
        if self.quantize in OURS:
            block_size(self.quantize, self.group_size)  # refuses a group size it does not take
        if self.quantize_output and self.quantize is None:
            raise ConfigError("--quantize-output needs --quantize")


Formats = Mapping[str, tuple[str, int | None]]  # state-dict key -> (quantized format, group); others plain


def largest_quantized(args: ModelArgs, formats: Formats) -> int:
    """Values of the largest quantized matrix: its dequantized rows are scratch of every pass that uses it
    (at most DEQUANT_CHUNK of them at a time: runtime.engine.batching.activation_bytes)."""
    shapes = {key: group_tensor_shapes(args, g)[local] for g, local, key in global_names(args)}
    return max((shapes[k][0] * shapes[k][1] for k in formats), default=0)


def plan_layout(args: ModelArgs, dtype: str, formats: Formats | None = None,
                tensor_parallel: int = 1) -> list[GroupSpec]:
    """Offsets of every group and tensor for ``args`` stored in ``dtype``, the tensors named in ``formats`` in
    their quantized format (crc32 not yet known). ``tensor_parallel`` N > 1: each group as N shards (format
    3; plain dtypes only), each starting on an ALIGN boundary."""
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPE_BYTES)}, found {dtype!r}")
    formats = formats or {}
    if tensor_parallel > 1:
        return _plan_sharded(args, dtype, formats, tensor_parallel)
    groups, offset = [], HEADER_SIZE
    for g in group_names(args):
        tensors, pos = [], 0
        for local, shape in group_tensor_shapes(args, g).items():
            scheme, group = formats.get(group_prefix(g) + local, (dtype, None))
            if is_quantized(scheme):
                nbytes = storage_bytes(scheme, shape, group)
            else:
                nbytes, scheme, group = DTYPE_BYTES[dtype] * _numel(shape), dtype, None
            tensors.append(TensorSpec(local, scheme, tuple(shape), pos, nbytes, group))
            pos = align_up(pos + nbytes, TENSOR_ALIGN)
        size = align_up(pos)
        groups.append(GroupSpec(g, offset, size, None, tuple(tensors)))
        offset += size
    return groups


def _plan_sharded(args: ModelArgs, dtype: str, formats: Formats, n: int) -> list[GroupSpec]:
    check_tensor_parallel(args, n)
    if formats:
        raise ConfigError(f"--tensor-parallel {n}: quantized tensors ({next(iter(formats))}, ...) are not split into "
                          f"shards yet; pack plain weights (--dtype) or leave out --tensor-parallel")
    groups, offset = [], HEADER_SIZE
    for g in group_names(args):
        tensors, pos = [], 0
        for r in range(n):
            pos = align_up(pos)
            for local, shape in group_tensor_shapes(args, g).items():
                sh = shard_shape(args, local, tuple(shape), n, r)
                nbytes = DTYPE_BYTES[dtype] * _numel(sh)
                tensors.append(TensorSpec(local, dtype, sh, pos, nbytes, None, r))
                pos = align_up(pos + nbytes, TENSOR_ALIGN)
        size = align_up(pos)
        groups.append(GroupSpec(g, offset, size, None, tuple(tensors)))
        offset += size
    return groups


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def pack_header(n_groups: int, image_size: int, uuid: bytes, version: int = FORMAT_VERSION) -> bytes:
    body = struct.pack(HEADER_FMT, MAGIC, version, HEADER_SIZE, ALIGN, n_groups, image_size, uuid)
    body += struct.pack("<I", zlib.crc32(body))
    return body.ljust(HEADER_SIZE, b"\0")


def unpack_header(raw: bytes, where: str) -> dict[str, Any]:
    n = struct.calcsize(HEADER_FMT)
    if len(raw) < n + 4:
        raise ImageFormatError(f"{where}: header is {len(raw)} bytes, expected {HEADER_SIZE}")
    magic, version, hdr_size, align, n_groups, image_size, uuid = struct.unpack(HEADER_FMT, raw[:n])
    if magic != MAGIC:
        raise ImageFormatError(f"{where}: offset 0: magic {magic!r}, expected {MAGIC!r} (not a packed image?)")
    if version not in READABLE_VERSIONS:
        raise ImageFormatError(f"{where}: format version {version}, this runtime reads {READABLE_VERSIONS}")
    (crc,) = struct.unpack("<I", raw[n:n + 4])
    if crc != zlib.crc32(raw[:n]):
        raise ImageFormatError(f"{where}: header crc32 {crc:#010x}, computed {zlib.crc32(raw[:n]):#010x}")
    if (hdr_size, align) != (HEADER_SIZE, ALIGN):
        raise ImageFormatError(f"{where}: header size/alignment {hdr_size}/{align}, expected {HEADER_SIZE}/{ALIGN}")
    return {"n_groups": n_groups, "image_size": image_size, "uuid": uuid.hex()}


def crc32_of(buf, chunk: int = 64 << 20) -> int:
    """crc32 of a buffer, in chunks (zlib releases the GIL for each)."""
    mv, crc = memoryview(buf).cast("B"), 0
    for i in range(0, len(mv), chunk):
        crc = zlib.crc32(mv[i:i + chunk], crc)
    return crc


def default_manifest_path(image: str | Path) -> Path:
    return Path(str(image) + ".manifest.json")


class Image:
    """A validated image: manifest + header + target size. Cheap to open; reads groups on demand."""

    def __init__(self, path: Path, manifest_path: Path, manifest: dict[str, Any]) -> None:
        self.path, self.manifest_path, self.manifest = path, manifest_path, manifest
        self.args = ModelArgs.from_dict(manifest["args"], source=str(manifest_path))
        self.dtype: str = manifest["dtype"]
        self.uuid: str = manifest["uuid"]
        self.image_size: int = manifest["image_size"]
        self.tensor_parallel: int = int(manifest.get("tensor_parallel", 1))  # format 3: shards per group
        self.groups: dict[str, GroupSpec] = {g.name: g for g in (_group_from_dict(d, manifest_path)
                                                                 for d in manifest["groups"])}

    # ---- opening and validation ----------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, manifest_path: str | Path | None = None) -> Image:
        path = Path(path)
        check_readable(path)
        if manifest_path is None:
            if is_block_device(path):
                raise ConfigError(f"{path} is a block device: give its manifest with --manifest")
            manifest_path = default_manifest_path(path)
        manifest_path = Path(manifest_path)
        image = cls(path, manifest_path, _load_manifest(manifest_path))
        image._validate(target_size(path))
        return image

    def _validate(self, size: int) -> None:
        """The header first (its uuid tells a manifest of another image from a truncated image), then the size,
        then the layout of the model arguments."""
        with open(self.path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE:
            raise ImageFormatError(f"{self.path}: {size} bytes, shorter than the {HEADER_SIZE}-byte header that "
                                   f"manifest {self.manifest_path} expects (truncated, or not an image)")
        hdr = unpack_header(raw, str(self.path))
        if hdr["uuid"] != self.uuid:
            raise ImageFormatError(f"{self.path}: header uuid {hdr['uuid']} does not match manifest "
                                   f"{self.manifest_path} uuid {self.uuid} (manifest of another image?)")
        if size < self.image_size:
            raise ImageFormatError(f"{self.path}: size {size} bytes, manifest {self.manifest_path} expects "
                                   f"at least {self.image_size} (truncated image?)")
        if (hdr["n_groups"], hdr["image_size"]) != (len(self.groups), self.image_size):
            raise ImageFormatError(f"{self.path}: header says {hdr['n_groups']} groups / {hdr['image_size']} "
                                   f"bytes, manifest says {len(self.groups)} / {self.image_size}")
        expected = plan_layout(self.args, self.dtype, self.formats(), self.tensor_parallel)
        got = list(self.groups.values())
        for e, g in zip(expected, got):
            if (e.name, e.offset, e.size, e.tensors) != (g.name, g.offset, g.size, g.tensors):
                raise ImageFormatError(f"{self.manifest_path}: group {g.name} at offset {g.offset} size {g.size} "
                                       f"does not match the layout of its model arguments ({e.name} at "
                                       f"{e.offset} size {e.size})")
        if len(expected) != len(got):
            raise ImageFormatError(f"{self.manifest_path}: {len(got)} groups, the model needs {len(expected)}")

    def formats(self) -> dict[str, tuple[str, int | None]]:
        """The quantized tensors' formats, by state-dict key (plan_layout's ``formats``)."""
        return {group_prefix(g.name) + t.name: (t.dtype, t.group) for g in self.groups.values() for t in g.tensors
                if t.quantized}

    def format_summary(self) -> str:
        """What the weights are stored as: each format with its tensor count and bytes."""
        by: dict[str, list[int]] = {}
        for g in self.groups.values():
            for t in g.tensors:
                key = t.dtype + (f" g{t.group}" if t.group else "")
                n = by.setdefault(key, [0, 0])
                n[0], n[1] = n[0] + 1, n[1] + t.nbytes
        return ", ".join(f"{k} ({n} tensors, {b / 1e6:.1f} MB)" for k, (n, b) in
                         sorted(by.items(), key=lambda kv: -kv[1][1]))

    @property
    def quantized(self) -> bool:
        return any(t.quantized for g in self.groups.values() for t in g.tensors)

    def largest_quantized(self) -> int:
        return largest_quantized(self.args, self.formats())

    def manifest_crcs(self) -> dict[str, list[int | None]]:
        """Every group's [offset, size, crc32]: what a pool checks to know the image is the one it serves."""
        return {n: [g.offset, g.size, g.crc32] for n, g in self.groups.items()}

    # ---- reading -------------------------------------------------------------------------------
    def read_group(self, name: str, out: memoryview | None = None, verify: bool = True) -> memoryview:
        """Buffered read of a whole group extent into ``out`` (or a new buffer), crc32-verified."""
        g = self.groups[name]
        buf = out if out is not None else memoryview(bytearray(g.size))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            pread_into(fd, buf[:g.size], g.offset, str(self.path))
        finally:
            os.close(fd)
        if verify:
            self.check_crc(name, buf[:g.size])
        return buf

    def check_crc(self, name: str, buf) -> None:
        g = self.groups[name]
        crc = crc32_of(buf)
        if crc != g.crc32:
            raise ImageFormatError(f"{self.path}: group {name} at offset {g.offset} ({g.size} bytes): crc32 "
                                   f"{crc:#010x}, manifest {self.manifest_path} says {g.crc32:#010x}")

    def verify(self, progress=None) -> None:
        """Read every group and check its crc32."""
        for i, name in enumerate(self.groups):
            self.read_group(name)
            if progress:
                progress(i + 1, len(self.groups), self.groups[name].size)

    def group_bytes(self, name: str) -> int:
        return sum(t.nbytes for t in self.groups[name].tensors)


def pread_into(fd: int, buf: memoryview, offset: int, path: str) -> None:
    """Fill ``buf`` from ``fd`` at ``offset``, looping over partial reads; short or failed reads raise ReadError."""
    done, n = 0, len(buf)
    while done < n:
        try:
            got = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as e:
            raise ReadError(path, offset + done, n - done, 0, f"{os.strerror(e.errno)}") from None
        if got == 0:
            raise ReadError(path, offset, n, done, "end of file")
        done += got


def tensor_views(group: GroupSpec, buf) -> dict[str, torch.Tensor | QuantWeight]:
    """Tensors of ``group`` as views into ``buf`` (bytes-like or a uint8 tensor holding the extent); a quantized
    matrix as a ``model.quant.QuantWeight`` over its raw bytes (dequantized where it is used)."""
    import torch

    from model.quant import QuantWeight  # torch, as the views: the pool's processes never build them

    dtypes = __getattr__("TORCH_DTYPES")
    if group.n_shards > 1:
        raise ImageFormatError(f"group {group.name} is stored as {group.n_shards} tensor-parallel shards: "
                               f"its tensors are read by rank (GroupSpec.shard), not whole")
    base = buf if isinstance(buf, torch.Tensor) else torch.frombuffer(buf, dtype=torch.uint8)
    out = {}
    for t in group.tensors:
        raw = base[t.offset:t.offset + t.nbytes]
        out[t.name] = (QuantWeight(raw, t.dtype, t.shape, t.group) if t.quantized
                       else raw.view(dtypes[t.dtype]).view(t.shape))
    return out


def _group_from_dict(d: dict[str, Any], where: Path) -> GroupSpec:
    try:
        tensors = tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"]), int(t["offset"]), int(t["nbytes"]),
                                   t.get("group"), t.get("shard")) for t in d["tensors"])
        return GroupSpec(d["name"], int(d["offset"]), int(d["size"]), int(d["crc32"]), tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise ImageFormatError(f"{where}: malformed group entry {str(d)[:120]} ({type(e).__name__}: {e})") from None


MANIFEST_KEYS = ("format", "version", "uuid", "image_size", "dtype", "args", "groups")


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise ImageFormatError(f"{path}: manifest not found (give --manifest, or pack the image again)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ImageFormatError(f"{path}: manifest is not valid JSON ({e})") from None
    missing = [k for k in MANIFEST_KEYS if k not in m] if isinstance(m, dict) else list(MANIFEST_KEYS)
    if missing:
        raise ImageFormatError(f"{path}: manifest lacks {missing}")
    if m["format"] != "llmstream-image" or m["version"] not in READABLE_VERSIONS:
        raise ImageFormatError(f"{path}: manifest format {m['format']!r} version {m['version']}, expected "
                               f"'llmstream-image' version {' or '.join(map(str, READABLE_VERSIONS))}")
    for g in m["groups"] if isinstance(m["groups"], list) else []:
        for t in g.get("tensors", []) if isinstance(g, dict) else []:
            dt = t.get("dtype") if isinstance(t, dict) else None
            if dt not in DTYPE_BYTES and not is_quantized(dt):
                raise ImageFormatError(f"{path}: tensor {t.get('name') if isinstance(t, dict) else t!r} of group "
                                       f"{g.get('name')} has dtype {dt!r}, expected one of "
                                       f"{sorted(DTYPE_BYTES) + list(SCHEMES)}")
    if m["dtype"] not in DTYPE_BYTES:
        raise ImageFormatError(f"{path}: dtype {m['dtype']!r}, expected one of {sorted(DTYPE_BYTES)}")
    if m["version"] >= ARCH_VERSION and not (isinstance(m["args"], dict) and "arch" in m["args"]):
        raise ImageFormatError(f"{path}: a version {m['version']} manifest must name its architecture (args.arch); "
                               f"pack the image again")
    return m
