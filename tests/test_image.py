"""The packed image: layout by construction, read-back, and every corruption caught and named."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from model.args import preset
from model.errors import ImageFormatError
from model.groups import group_names, group_tensor_shapes
from model.synthetic import SyntheticCheckpoint
from runtime.format.image import ALIGN, HEADER_SIZE, TENSOR_ALIGN, Image, plan_layout, tensor_views
from runtime.format.pack import pack


@pytest.fixture
def tiny_image(tmp_path):
    ck = SyntheticCheckpoint("tiny", n_layers=3, seed=1)
    out = tmp_path / "tiny.img"
    pack(ck, out, dtype="fp32", quiet=True)
    return out, ck


@pytest.mark.parametrize("shape,dtype", [("tiny", "fp32"), ("llama3.1-8b", "bf16"), ("llama3.1-70b", "bf16"),
                                         ("llama3.2-1b", "fp16")])
def test_layout_is_aligned_and_contiguous(shape, dtype):
    args = preset(shape)
    groups = plan_layout(args, dtype)
    assert [g.name for g in groups] == group_names(args)
    assert groups[0].offset == HEADER_SIZE
    for prev, g in zip(groups, groups[1:]):
        assert g.offset == prev.offset + prev.size  # contiguous, in forward order
    for g in groups:
        assert g.offset % ALIGN == 0 and g.size % ALIGN == 0
        assert [t.name for t in g.tensors] == list(group_tensor_shapes(args, g.name))
        for t in g.tensors:
            assert t.offset % TENSOR_ALIGN == 0 and t.offset + t.nbytes <= g.size


def test_70b_layer_sizes_match_the_cost_model():
    groups = {g.name: g for g in plan_layout(preset("llama3.1-70b"), "bf16")}
    attn = sum(t.nbytes for t in groups["layers.0.attention"].tensors)
    ffn = sum(t.nbytes for t in groups["layers.0.feed_forward"].tensors)
    assert round(attn / 1e9, 3) == 0.302 and round(ffn / 1e9, 3) == 1.409


def test_pack_read_back_equals_source(tiny_image):
    out, _ = tiny_image
    image = Image.open(out)
    fresh = SyntheticCheckpoint("tiny", n_layers=3, seed=1)  # same seed -> same values in the same order
    for name, spec in image.groups.items():
        views = tensor_views(spec, image.read_group(name))
        prefix = name.rsplit(".", 1)[0] + "." if name.startswith("layers.") else ""
        for local, t in views.items():
            ref = fresh.tensor(prefix + local)
            assert torch.equal(t, ref), f"{name}/{local}"
            assert t.abs().sum() > 0 and t.unique().numel() > 1  # never zeros or constants


def test_groups_differ(tiny_image):
    image = Image.open(tiny_image[0])
    w = [tensor_views(image.groups[f"layers.{i}.feed_forward"], image.read_group(f"layers.{i}.feed_forward"))
         ["feed_forward.w1.weight"] for i in range(3)]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])


@pytest.mark.parametrize("which", ["tok_embeddings", "layers.0.attention", "layers.1.feed_forward", "head"])
def test_flipped_byte_is_caught_and_named(tiny_image, which):
    out, _ = tiny_image
    image = Image.open(out)
    g = image.groups[which]
    pos = g.offset + g.tensors[-1].offset + 3  # inside the group's last tensor
    with open(out, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x10]))
    with pytest.raises(ImageFormatError) as e:
        Image.open(out).verify()
    msg = str(e.value)
    assert str(out) in msg and which in msg and str(g.offset) in msg and "crc32" in msg


def test_padding_byte_flip_is_caught(tiny_image):
    out, _ = tiny_image
    g = Image.open(out).groups["layers.0.attention"]
    with open(out, "r+b") as f:
        f.seek(g.offset + g.size - 1)  # last padding byte of the extent
        f.write(b"\x01")
    with pytest.raises(ImageFormatError, match="layers.0.attention"):
        Image.open(out).read_group("layers.0.attention")


def test_truncated_image(tiny_image):
    out, _ = tiny_image
    size = out.stat().st_size
    with open(out, "r+b") as f:
        f.truncate(size - ALIGN)
    with pytest.raises(ImageFormatError) as e:
        Image.open(out)
    assert str(out) in str(e.value) and str(size - ALIGN) in str(e.value) and str(size) in str(e.value)


def test_bad_magic_and_header_crc(tiny_image):
    out, _ = tiny_image
    with open(out, "r+b") as f:
        f.write(b"NOTANIMG")
    with pytest.raises(ImageFormatError, match="magic"):
        Image.open(out)
    with open(out, "r+b") as f:
        f.write(b"LLMSTRM\0")
        f.seek(20)
        f.write(struct.pack("<I", 999))  # n_groups field, header crc now wrong
    with pytest.raises(ImageFormatError, match="header crc32"):
        Image.open(out)


def test_manifest_of_another_image(tmp_path, tiny_image):
    out, _ = tiny_image
    other = tmp_path / "other.img"
    pack(SyntheticCheckpoint("tiny", n_layers=3, seed=2), other, dtype="fp32", quiet=True)
    with pytest.raises(ImageFormatError, match="uuid"):
        Image.open(out, manifest_path=str(other) + ".manifest.json")


def test_missing_and_broken_manifest(tiny_image, tmp_path):
    out, _ = tiny_image
    with pytest.raises(ImageFormatError, match="manifest not found"):
        Image.open(out, manifest_path=tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ImageFormatError, match="not valid JSON"):
        Image.open(out, manifest_path=bad)
    m = json.loads((tmp_path / "tiny.img.manifest.json").read_text())
    m["groups"][2]["offset"] += ALIGN
    bad.write_text(json.dumps(m))
    with pytest.raises(ImageFormatError, match="layers.0.feed_forward"):
        Image.open(out, manifest_path=bad)
    del m["groups"]
    bad.write_text(json.dumps(m))
    with pytest.raises(ImageFormatError, match="lacks"):
        Image.open(out, manifest_path=bad)


def test_pack_into_existing_block_device_sized_file_keeps_no_stale_manifest(tmp_path):
    out = tmp_path / "x.img"
    pack(SyntheticCheckpoint("tiny", n_layers=2), out, dtype="bf16", quiet=True)
    first = json.loads((tmp_path / "x.img.manifest.json").read_text())["uuid"]
    pack(SyntheticCheckpoint("tiny", n_layers=2, seed=5), out, dtype="bf16", quiet=True)
    second = Image.open(out)
    assert second.uuid != first and second.dtype == "bf16"
    second.verify()
