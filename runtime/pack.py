"""Packing: checkpoint (Meta / HF / GGUF / synthetic) -> runtime image + manifest + tokenizer files.

Memory stays bounded by the largest group: each group is converted into one extent-sized buffer,
checksummed and written at its offset, then dropped. The header and the manifest are written last (the
manifest through a temporary file and a rename), so an interrupted pack never leaves a manifest that
describes a half-written image. Runs in the ``launch.py pack`` process.

    python launch.py pack --checkpoint PATH --out IMAGE [--manifest PATH] [--dtype bf16] [--force]
    python launch.py pack --synthetic llama3.1-8b [--layers N] --out IMAGE
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid as uuidlib
from pathlib import Path

import torch

from model.checkpoint import Checkpoint
from model.errors import ConfigError
from model.llama import group_prefix
from runtime.blockdev import check_pack_target, is_block_device
from runtime.image import (
    FORMAT_VERSION,
    TORCH_DTYPES,
    GroupSpec,
    crc32_of,
    default_manifest_path,
    pack_header,
    plan_layout,
    tensor_views,
)
from runtime.progress import Progress


def pack(ck: Checkpoint, out: str | Path, manifest: str | Path | None = None, dtype: str = "bf16",
         force: bool = False, quiet: bool = False) -> Path:
    """Write ``ck`` as an image at ``out``; returns the manifest path."""
    out = Path(out)
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"--dtype must be one of {sorted(TORCH_DTYPES)}, found {dtype!r}")
    manifest_path = _manifest_path(out, manifest)
    layout = plan_layout(ck.args, dtype)
    image_size = layout[-1].offset + layout[-1].size
    check_pack_target(out, image_size, force)
    image_uuid = uuidlib.uuid4().bytes
    manifest_path.unlink(missing_ok=True)
    progress = Progress(f"packing {out}", image_size, quiet=quiet)
    fd = os.open(out, os.O_WRONLY | (0 if is_block_device(out) else os.O_CREAT | os.O_TRUNC), 0o644)
    try:
        groups = [_write_group(fd, ck, g, progress) for g in layout]
        os.pwrite(fd, pack_header(len(groups), image_size, image_uuid), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    progress.done()
    _write_manifest(manifest_path, ck, dtype, image_uuid.hex(), image_size, groups)
    return manifest_path


def _manifest_path(out: Path, manifest: str | Path | None) -> Path:
    if manifest is not None:
        return Path(manifest)
    if is_block_device(out):
        raise ConfigError(f"{out} is a block device: give --manifest PATH for its manifest")
    return default_manifest_path(out)


def _write_group(fd: int, ck: Checkpoint, g: GroupSpec, progress: Progress) -> GroupSpec:
    buf = torch.empty(g.size, dtype=torch.uint8)
    prefix, pos = group_prefix(g.name), 0
    for t in g.tensors:  # zero only the alignment padding; every tensor byte is written by fill()
        buf[pos:t.offset].zero_()
        pos = t.offset + t.nbytes
    buf[pos:].zero_()
    for name, view in tensor_views(g, buf).items():
        ck.fill(prefix + name, view)
    data = buf.numpy()
    crc = crc32_of(data)
    _pwrite_all(fd, memoryview(data), g.offset)
    progress.update(g.size, g.name)
    return GroupSpec(g.name, g.offset, g.size, crc, g.tensors)


def _pwrite_all(fd: int, mv: memoryview, offset: int, chunk: int = 64 << 20) -> None:
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:done + chunk], offset + done)


def _write_manifest(path: Path, ck: Checkpoint, dtype: str, image_uuid: str, image_size: int,
                    groups: list[GroupSpec]) -> None:
    tok_dir = _copy_tokenizer(ck, path)
    m = {"format": "llmstream-image", "version": FORMAT_VERSION, "uuid": image_uuid, "image_size": image_size,
         "dtype": dtype, "checksum": "crc32", "args": ck.args.to_dict(),
         "source": {"format": ck.format, "path": str(ck.path), "packed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
         "tokenizer": tok_dir, "groups": [g.to_dict() for g in groups]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(m, indent=1))
    os.replace(tmp, path)


def tokenizer_dir_for(manifest_path: Path) -> Path:
    name = manifest_path.name.removesuffix(".json").removesuffix(".manifest")
    return manifest_path.with_name(name + ".tokenizer")


def _copy_tokenizer(ck: Checkpoint, manifest_path: Path) -> str | None:
    """Save the checkpoint's tokenizer beside the manifest; returns the directory name (relative)."""
    src = ck.tokenizer_source()
    if src is None:
        return None
    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(src)
    d = tokenizer_dir_for(manifest_path)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    tok.save(d)
    return d.name
