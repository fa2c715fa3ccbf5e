"""Packing: checkpoint (Meta / HF / GGUF / synthetic) -> runtime image + manifest + tokenizer files.

Memory stays bounded by the largest group: each group is converted into one extent-sized buffer,
checksummed and written at its offset, then dropped.

Nothing is lost on failure. A file image is written beside its target (an unnamed O_TMPFILE inode where the
filesystem has them, else ``OUT.pack-PID.tmp``), then the tokenizer directory and the manifest under
temporary names; the new image is verified (header, layout, every group's crc32 read back), and only then
are the three renamed into place together (runtime/format/staged.py: a guard process removes the temporaries if
this process fails or is killed before the renames, and finishes them if it is killed during them). So a
failed or killed pack leaves an existing image exactly as it was. A block device cannot be renamed: its
old manifest is removed first and the new one written last, so a manifest never describes a half-written
device. ``check_sources`` refuses targets that are the checkpoint's own files. Runs in the ``launch.py pack``
process.

    python launch.py pack --checkpoint PATH --out IMAGE [--manifest PATH] [--dtype bf16] [--force]
    python launch.py pack --synthetic llama3.1-8b [--layers N] --out IMAGE
    python launch.py pack ... --tensor-parallel N       # each group as N contiguous shards (format 3)
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid as uuidlib
from collections import Counter
from pathlib import Path

import torch

from model.arch.schema import MATRIX, OUTPUT
from model.checkpoint import Checkpoint
from model.errors import ConfigError, UserError
from model.groups import global_names, group_prefix, role
from model.qformats import OURS, check_quantizable
from model.quant import quantize
from model.shards import COLS, ROWS, shard_range
from model.tokenizer import load_tokenizer
from runtime.env import pack_kill_at
from runtime.format.blockdev import check_pack_target, is_block_device
from runtime.format.image import (
    FORMAT_VERSION,
    TORCH_DTYPES,
    GroupSpec,
    Image,
    WeightFormat,
    crc32_of,
    default_manifest_path,
    pack_header,
    plan_layout,
)
from runtime.format.staged import Staging, link_tmpfile, open_tmpfile
from runtime.format.tokens import tokenizer_dir_for
from runtime.progress import Progress


def weight_formats(ck: Checkpoint, wf: WeightFormat) -> tuple[dict[str, tuple[str, int | None]], list[str]]:
    """Each quantized tensor's (format, group) by state-dict key, every matrix checked before anything is
    written; and what the pack does, line by line (kept blocks, quantized, dequantized types)."""
    formats: dict[str, tuple[str, int | None]] = {}
    kept, ours, unkept = Counter(), 0, Counter()
    for _, _, key in global_names(ck.args):
        if wf.keep_blocks:
            fmt = ck.stored_format(key)
            if fmt is not None:
                formats[key] = (fmt, None)
                kept[fmt] += 1
                continue
            if ck.stored_type(key) not in PLAIN_TYPES:
                unkept[ck.stored_type(key)] += 1
        kind = role(ck.args, key)
        if wf.quantize and (kind == MATRIX or (wf.quantize_output and kind == OUTPUT)):
            group = wf.group_size if wf.quantize in OURS else None
            check_quantizable(wf.quantize, key, ck.shapes[key], group)
            formats[key] = (wf.quantize, group)
            ours += 1
    lines = []
    if kept:
        lines.append("kept as the GGUF stores them: " + ", ".join(f"{f} x{n}" for f, n in sorted(kept.items())))
    if unkept:
        lines.append(f"dequantized to {wf.dtype} (types not kept): " +
                     ", ".join(f"{t} x{n}" for t, n in sorted(unkept.items())))
    if ours:
        g = f" in groups of {wf.group_size}" if wf.quantize in OURS else ""
        lines.append(f"quantized to {wf.quantize}{g}: {ours} matrices")
    return formats, lines


def pack(ck: Checkpoint, out: str | Path, manifest: str | Path | None = None, dtype: str | WeightFormat = "bf16",
         force: bool = False, quiet: bool = False, verify: bool = True, device: str | None = None,
         tensor_parallel: int = 1) -> Path:
    """Write ``ck`` as an image at ``out``; returns the manifest path. ``dtype``: a plain dtype, or a
    WeightFormat. ``verify``: read the new image back and check every group's crc32 before it replaces
    anything. ``device``: where our int8/int4 quantizers run (default CUDA when there is one: the clipping
    search costs seconds per large matrix on a few CPU cores). ``tensor_parallel`` N > 1: every group as N
    shards, one per rank (image.py, format 3; model/shards.py), the values those of a plain pack."""
    out = Path(out)
    wf = dtype if isinstance(dtype, WeightFormat) else WeightFormat(dtype)
    dtype = wf.dtype
    if device is None:
        device = "cuda" if wf.quantize in OURS and torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"--device {device}: where the quantizers run, cpu or cuda (this machine has "
                          f"{'a' if torch.cuda.is_available() else 'no'} CUDA device)")
    manifest_path = _manifest_path(out, manifest)
    tok_dir = tokenizer_dir_for(manifest_path)
    check_sources(ck, out, manifest_path, tok_dir)
    formats, lines = weight_formats(ck, wf)
    if not quiet:
        for line in lines:
            print(f"pack: {line}", file=sys.stderr)
    layout = plan_layout(ck.args, dtype, formats, tensor_parallel)
    image_size = layout[-1].offset + layout[-1].size
    check_pack_target(out, image_size, force)
    block = is_block_device(out)
    kill_at = pack_kill_at()
    with Staging() as st:
        if block:
            manifest_path.unlink(missing_ok=True)  # the device is overwritten now: its old manifest goes first
        tmp_image, groups, image_uuid = _write_image(st, ck, out, layout, image_size, block, quiet, kill_at, device,
                                                     tensor_parallel)
        tok_tmp = st.temp(tok_dir)
        tok_name = _save_tokenizer(ck, tok_tmp, tok_dir.name)
        man_tmp = st.temp(manifest_path)
        _write_manifest(man_tmp, ck, dtype, groups, image_uuid, image_size, tok_name, tensor_parallel)
        _verify(tmp_image, man_tmp, verify, quiet, out)
        if kill_at == "before-commit":
            os.kill(os.getpid(), 9)
        pairs = [(tok_tmp if tok_name else None, tok_dir)] if tok_name or tok_dir.is_dir() else []
        pairs += ([] if block else [(tmp_image, out)]) + [(man_tmp, manifest_path)]
        st.commit(pairs, kill_at)
    return manifest_path


def _manifest_path(out: Path, manifest: str | Path | None) -> Path:
    if manifest is not None:
        return Path(manifest)
    if is_block_device(out):
        raise ConfigError(f"{out} is a block device: give --manifest PATH for its manifest")
    return default_manifest_path(out)


def check_sources(ck: Checkpoint, out: Path, manifest_path: Path, tok_dir: Path) -> None:
    """Refuse a target that is one of the checkpoint's own files (the same inode: also through links and
    other names), a manifest that is the image, and a tokenizer directory that holds checkpoint files."""
    def ident(p: Path) -> tuple[int, int] | None:
        try:
            st = os.stat(p)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    sources = {ident(f): f for f in ck.source_files()}
    sources.pop(None, None)
    for flag, target in (("--out", out), ("--manifest", manifest_path)):
        hit = sources.get(ident(target))
        if hit is not None:
            raise UserError(f"{flag} {target} is the checkpoint's own file {hit}: packing would overwrite what it "
                            f"reads; write the image elsewhere")
    if ident(out) is not None and ident(out) == ident(manifest_path):
        raise UserError(f"--manifest {manifest_path} is the image itself ({out}); give another path")
    if tok_dir.is_dir():
        inside = [f for f in ck.source_files() if Path(os.path.realpath(f)).is_relative_to(os.path.realpath(tok_dir))]
        if inside:
            raise UserError(f"{tok_dir}: the image's tokenizer directory, which packing replaces, holds the "
                            f"checkpoint's {inside[0]}; name the image or --manifest otherwise")


def _write_image(st: Staging, ck: Checkpoint, out: Path, layout: list[GroupSpec], image_size: int, block: bool,
                 quiet: bool, kill_at: str | None, device: str, tp: int = 1) -> tuple[Path, list[GroupSpec], str]:
    """Every group and the header, fsynced: into the device itself, else into a new file beside ``out`` (named
    only once complete). Returns the path written, the groups with their checksums and the image's uuid."""
    progress = Progress(f"packing {out}", image_size, quiet=quiet)
    named, unnamed = None, False
    if block:
        fd = os.open(out, os.O_WRONLY)
    else:
        named = st.temp(out)  # announced to the guard before anything has this name
        fd = open_tmpfile(out.parent, named)
        if fd is None:  # no O_TMPFILE here: the named temporary from the start
            fd = os.open(named, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            unnamed = False
        else:
            unnamed = True
    try:
        groups = []
        for i, g in enumerate(layout):
            groups.append(_write_group(fd, ck, g, progress, device, tp))
            if kill_at == f"group-{i}":
                os.kill(os.getpid(), 9)
        image_uuid = uuidlib.uuid4().bytes
        os.pwrite(fd, pack_header(len(groups), image_size, image_uuid, FORMAT_VERSION), 0)
        os.fsync(fd)
        if not block and unnamed:
            link_tmpfile(fd, named)
    finally:
        os.close(fd)
    progress.done()
    return (out if block else named), groups, image_uuid.hex()


def _write_group(fd: int, ck: Checkpoint, g: GroupSpec, progress: Progress, device: str, tp: int = 1) -> GroupSpec:
    buf = torch.empty(g.size, dtype=torch.uint8)
    prefix, pos = group_prefix(g.name), 0
    for t in g.tensors:  # zero only the alignment padding; every tensor byte is written below
        buf[pos:t.offset].zero_()
        pos = t.offset + t.nbytes
    buf[pos:].zero_()
    dtypes = TORCH_DTYPES
    if tp > 1:
        _fill_shards(ck, g, buf, tp)
    for t in g.tensors if tp == 1 else ():
        key, dst = prefix + t.name, buf[t.offset:t.offset + t.nbytes]
        if not t.quantized:
            ck.fill(key, dst.view(dtypes[t.dtype]).view(t.shape))
        elif ck.stored_format(key) == t.dtype:  # a GGUF's own blocks, as they are
            dst.copy_(ck.raw(key))
        else:
            dst.copy_(quantize(ck.tensor(key).to(device).float(), t.dtype, t.group))
    data = buf.numpy()
    crc = crc32_of(data)
    _pwrite_all(fd, memoryview(data), g.offset)
    progress.update(g.size, g.name)
    return GroupSpec(g.name, g.offset, g.size, crc, g.tensors)


def _fill_shards(ck: Checkpoint, g: GroupSpec, buf: torch.Tensor, n: int) -> None:
    """Each tensor of ``g`` whole, in the plain pack's order (a synthetic checkpoint's values depend on it),
    then its rows or columns into each rank's shard (model/shards.py)."""
    dtypes, prefix = TORCH_DTYPES, group_prefix(g.name)
    by_name: dict[str, list] = {}
    for t in g.tensors:
        by_name.setdefault(t.name, []).append(t)
    for name, shards in by_name.items():
        shape = ck.shapes[prefix + name]
        full = torch.empty(shape, dtype=dtypes[shards[0].dtype])
        ck.fill(prefix + name, full)
        for t in shards:
            split, lo, hi = shard_range(ck.args, name, n, t.shard)
            part = full[lo:hi] if split == ROWS else full[:, lo:hi] if split == COLS else full
            buf[t.offset:t.offset + t.nbytes].view(dtypes[t.dtype]).view(t.shape).copy_(part)


def _pwrite_all(fd: int, mv: memoryview, offset: int, chunk: int = 64 << 20) -> None:
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:done + chunk], offset + done)


PLAIN_TYPES = ("plain", "F32", "F16", "BF16")  # stored types that are not quantized (Checkpoint.stored_type)


def _write_manifest(path: Path, ck: Checkpoint, dtype: str, groups: list[GroupSpec], image_uuid: str,
                    image_size: int, tok_name: str | None, tp: int = 1) -> None:
    m = {"format": "llmstream-image", "version": FORMAT_VERSION, "uuid": image_uuid, "image_size": image_size,
         "dtype": dtype, "checksum": "crc32", "args": ck.args.to_dict(),
         "source": {"format": ck.format, "path": str(ck.path), "packed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
         "tokenizer": tok_name, **({"tensor_parallel": tp} if tp > 1 else {}), "groups": [g.to_dict() for g in groups]}
    with open(path, "x") as f:
        json.dump(m, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _verify(image_path: Path, manifest_path: Path, full: bool, quiet: bool, out: Path) -> None:
    """Open the new image as a run would (header, size, layout) and, with ``full``, check every group."""
    image = Image.open(image_path, manifest_path)
    if full:
        progress = Progress(f"verifying the new {out}", image.image_size, quiet=quiet)
        image.verify(lambda i, n, size: progress.update(size))
        progress.done()


def _save_tokenizer(ck: Checkpoint, directory: Path, final_name: str) -> str | None:
    """Save the checkpoint's tokenizer into ``directory``; returns the name it will have in place, or None when
    the checkpoint ships none."""
    src = ck.tokenizer_source()
    if src is None:
        return None
    tok = load_tokenizer(src)
    directory.mkdir()
    tok.save(directory)
    return final_name
