"""Tests for runtime/format/blockdev.py: the pack-target and readability checks for image files and block devices.

Everything runs on fake trees built in tmp_path (a /dev with regular files standing in for devices, a /sys
with class/block entries, fake mounts and swaps files), so no root and no real block device is needed.
One optional test attaches a real loop device; it runs only as root where /dev/loop-control and losetup
exist, and always detaches the device in a ``finally``.

Run: python -m pytest -q tests/test_blockdev.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import namedtuple

import pytest

from model.errors import UserError
from runtime.format import blockdev
from runtime.format.blockdev import (
    check_pack_target,
    check_readable,
    device_in_use,
    is_block_device,
    mounted_sources,
    partition_table,
    target_size,
)

MiB = 1 << 20
FakeStatvfs = namedtuple("FakeStatvfs", "f_bavail f_frsize")


# ---- fake /dev, /sys, mounts and swaps --------------------------------------------------------------------

class FakeSystem:
    """A tmp_path tree: dev/ (regular files standing in for device nodes), sys/class/block/, mounts, swaps.

    Disks: sdx with partitions sdx1 (top-level sysfs symlink, like the real kernel) and sdx2 (only nested
    under sdx); sdy without partitions; nvme0n1 with nvme0n1p1 (no `partition` file: found by its name).
    """

    def __init__(self, root):
        self.root = root
        self.dev, self.sys = root / "dev", root / "sys"
        self.block = self.sys / "class" / "block"
        self.mounts, self.swaps = root / "mounts", root / "swaps"
        self.mounts.write_text("proc /proc proc rw 0 0\ntmpfs /run tmpfs rw 0 0\n")
        self.swaps.write_text("Filename\t\t\t\tType\t\tSize\tUsed\tPriority\n")
        (self.dev / "disk" / "by-id").mkdir(parents=True)
        self.disk("sdx", ["sdx1", "sdx2"], marked=True)
        self.disk("sdy", [])
        self.disk("nvme0n1", ["nvme0n1p1"], marked=False)
        (self.block / "sdx1").symlink_to("sdx/sdx1")
        (self.dev / "disk" / "by-id" / "ata-FAKE").symlink_to("../../sdx")
        (self.dev / "disk" / "by-id" / "ata-FAKE-part1").symlink_to("../../sdx1")

    def disk(self, name, parts, marked=True):
        (self.block / name / "holders").mkdir(parents=True)
        (self.dev / name).write_bytes(b"")
        for p in parts:
            (self.block / name / p / "holders").mkdir(parents=True)
            if marked:
                (self.block / name / p / "partition").write_text(p[-1] + "\n")
            (self.dev / p).write_bytes(b"")

    def path(self, name):
        return str(self.dev / name)

    def mount(self, source, target):
        with open(self.mounts, "a") as f:
            f.write(f"{source} {target} ext4 rw,relatime 0 0\n")

    def hold(self, sys_rel, holder):
        (self.block / sys_rel / "holders" / holder).mkdir()

    def in_use(self, name):
        return device_in_use(self.path(name), mounts_file=str(self.mounts), sys_root=str(self.sys),
                             swaps_file=str(self.swaps))


@pytest.fixture
def fake(tmp_path):
    return FakeSystem(tmp_path)


# ---- mounted_sources -----------------------------------------------------------------------------------

def test_mounted_sources_decodes_escapes_and_resolves_symlinks(tmp_path):
    (tmp_path / "sdz1").write_bytes(b"")
    (tmp_path / "by-label").mkdir()
    (tmp_path / "by-label" / "DATA").symlink_to("../sdz1")
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "proc /proc proc rw,nosuid 0 0\n"
        "/dev/sdb1 /mnt/my\\040disk ext4 rw,relatime 0 0\n"
        "/dev/sdc1 /mnt/tab\\011and\\134slash vfat rw 0 0\n"
        f"{tmp_path}/by-label/DATA /data xfs rw 0 0\n"
        "/dev/sdb1 /second/mount ext4 rw 0 0\n"
        "overlay / overlay rw 0 0\n")
    got = mounted_sources(str(mounts))
    assert got == {"/dev/sdb1": "/mnt/my disk", "/dev/sdc1": "/mnt/tab\tand\\slash",
                   str(tmp_path / "sdz1"): "/data"}


def test_mounted_sources_on_this_machine_parses():
    assert isinstance(mounted_sources(), dict)


# ---- device_in_use -------------------------------------------------------------------------------------

def test_unused_devices_are_free(fake):
    for name in ("sdx", "sdx1", "sdx2", "sdy", "nvme0n1", "nvme0n1p1", "disk/by-id/ata-FAKE"):
        assert fake.in_use(name) is None, name


def test_mounted_partition_marks_disk_and_partition_in_use(fake):
    fake.mount(fake.path("sdx1"), "/mnt/a\\040b")
    for name in ("sdx", "sdx1", "disk/by-id/ata-FAKE"):
        reason = fake.in_use(name)
        assert reason is not None and "sdx1" in reason and "/mnt/a b" in reason, (name, reason)
    assert fake.in_use("sdx2") is None  # a sibling partition being mounted does not block this one
    assert fake.in_use("sdy") is None


def test_mount_source_given_as_by_id_symlink(fake):
    fake.mount(str(fake.dev / "disk" / "by-id" / "ata-FAKE-part1"), "/boot")
    assert "/boot" in fake.in_use("sdx")


def test_mounted_whole_disk(fake):
    fake.mount(fake.path("sdy"), "/srv")
    assert "mounted at /srv" in fake.in_use("sdy")


def test_partition_holder_marks_disk_in_use(fake):
    fake.hold("sdx/sdx2", "dm-0")  # sdx2 is nested only: found through its parent
    for name in ("sdx", "sdx2"):
        reason = fake.in_use(name)
        assert reason is not None and "dm-0" in reason and "sdx2" in reason, (name, reason)
    assert fake.in_use("sdx1") is None


def test_disk_holder_marks_partition_in_use(fake):
    fake.hold("sdx", "md0")
    reason = fake.in_use("sdx1")
    assert reason is not None and "md0" in reason and "parent disk sdx" in reason


def test_swap_partition(fake):
    with open(fake.swaps, "a") as f:
        f.write(f"{fake.path('sdx2')}\tpartition\t1048572\t0\t-2\n")
    assert "swap" in fake.in_use("sdx")
    assert "swap" in fake.in_use("sdx2")
    assert fake.in_use("sdx1") is None


def test_every_reason_is_reported(fake):
    fake.mount(fake.path("sdx1"), "/boot")
    fake.hold("sdx/sdx2", "dm-1")
    reason = fake.in_use("sdx")
    assert "/boot" in reason and "dm-1" in reason and reason.count("; ") == 1


def test_missing_swaps_file_is_ignored(fake):
    fake.swaps.unlink()
    assert fake.in_use("sdx") is None


def test_nvme_style_partition_found_by_name(fake):
    fake.mount(fake.path("nvme0n1p1"), "/home")
    assert "nvme0n1p1" in fake.in_use("nvme0n1")
    fake.hold("nvme0n1", "dm-3")
    assert "dm-3" in fake.in_use("nvme0n1p1")


# ---- partition_table -----------------------------------------------------------------------------------

def _image(tmp_path, name, patches, size=64 * 1024):
    data = bytearray(size)
    for offset, raw in patches:
        data[offset:offset + len(raw)] = raw
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return str(path)


def test_partition_table_kinds(tmp_path):
    sig = (510, b"\x55\xaa")
    entry = (446 + 16 + 4, b"\x83")  # second entry, type 0x83 (Linux)
    assert partition_table(_image(tmp_path, "gpt", [sig, (446 + 4, b"\xee"), (512, b"EFI PART")])) == "gpt"
    assert partition_table(_image(tmp_path, "gpt4k", [(4096, b"EFI PART")])) == "gpt"
    assert partition_table(_image(tmp_path, "mbr", [sig, entry])) == "mbr"
    assert partition_table(_image(tmp_path, "mbr-empty", [sig])) is None
    assert partition_table(_image(tmp_path, "entry-no-sig", [entry])) is None
    assert partition_table(_image(tmp_path, "zeros", [])) is None
    assert partition_table(_image(tmp_path, "short", [], size=100)) is None


def test_partition_table_missing_path(tmp_path):
    with pytest.raises(UserError, match="nope"):
        partition_table(str(tmp_path / "nope"))


# ---- target_size, is_block_device, check_readable ------------------------------------------------------

def test_target_size_regular_file(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(b"x" * 12345)
    assert target_size(str(path)) == 12345


def test_target_size_missing_names_path(tmp_path):
    missing = str(tmp_path / "no" / "such-image")
    with pytest.raises(UserError) as exc:
        target_size(missing)
    assert missing in str(exc.value) and "does not exist" in str(exc.value)


def test_target_size_directory_refused(tmp_path):
    with pytest.raises(UserError, match="expected a regular file or a block device"):
        target_size(str(tmp_path))


def test_is_block_device_false_cases(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    assert not is_block_device(str(tmp_path / "f"))
    assert not is_block_device(str(tmp_path / "missing"))
    assert not is_block_device("/dev/null")  # a character device


def test_check_readable(tmp_path, monkeypatch):
    path = tmp_path / "img"
    path.write_bytes(b"x")
    check_readable(str(path))
    with pytest.raises(UserError, match="does not exist") as exc:
        check_readable(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(exc.value)
    monkeypatch.setattr(blockdev.os, "access", lambda p, mode: False)  # works as root and non-root
    with pytest.raises(UserError, match="no read permission") as exc:
        check_readable(str(path))
    assert str(path) in str(exc.value)


# ---- check_pack_target: regular files ------------------------------------------------------------------

def test_pack_target_new_and_existing_file_ok(tmp_path):
    check_pack_target(str(tmp_path / "new.img"), 4096)
    existing = tmp_path / "old.img"
    existing.write_bytes(b"\1" * 8192)
    check_pack_target(str(existing), 4096)


def test_pack_target_missing_parent(tmp_path):
    target = str(tmp_path / "no-dir" / "x.img")
    with pytest.raises(UserError, match="parent directory .* does not exist") as exc:
        check_pack_target(target, 4096)
    assert target in str(exc.value)


def test_pack_target_parent_not_writable(tmp_path, monkeypatch):
    monkeypatch.setattr(blockdev.os, "access", lambda p, mode: False)
    with pytest.raises(UserError, match="not writable"):
        check_pack_target(str(tmp_path / "x.img"), 4096)


def test_pack_target_directory_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="expected a regular file or a block device"):
        check_pack_target(str(tmp_path / "d"), 4096)


def test_pack_target_not_enough_space(tmp_path, monkeypatch):
    monkeypatch.setattr(blockdev.os, "statvfs", lambda p: FakeStatvfs(f_bavail=100, f_frsize=4096))
    with pytest.raises(UserError, match="not enough free space") as exc:
        check_pack_target(str(tmp_path / "x.img"), 10 * MiB)
    msg = str(exc.value)
    assert str(10 * MiB) in msg and str(100 * 4096) in msg and "GiB" in msg


def test_pack_target_overwrite_needs_room_for_both(tmp_path, monkeypatch):
    """The new image is written beside the old one (which stays until it is complete): no credit for the old."""
    existing = tmp_path / "old.img"
    existing.write_bytes(os.urandom(2 * MiB))
    monkeypatch.setattr(blockdev.os, "statvfs", lambda p: FakeStatvfs(f_bavail=256, f_frsize=4096))  # 1 MiB
    check_pack_target(str(existing), MiB)
    with pytest.raises(UserError, match="not enough free space.*existing image stays"):
        check_pack_target(str(existing), MiB + 1)


# ---- check_pack_target: block devices, simulated on the fake tree --------------------------------------

@pytest.fixture
def fake_disk(fake, monkeypatch):
    """sdx as a 1 MiB 'block device' (is_block_device patched for that one path)."""
    dev = fake.path("sdx")
    with open(dev, "wb") as f:
        f.truncate(MiB)
    monkeypatch.setattr(blockdev, "is_block_device", lambda p: os.path.realpath(p) == dev)
    return fake, dev


def _pack(fake, dev, image_bytes, force=False):
    check_pack_target(dev, image_bytes, force, mounts_file=str(fake.mounts), swaps_file=str(fake.swaps),
                      sys_root=str(fake.sys))


def test_pack_block_device_ok(fake_disk):
    fake, dev = fake_disk
    _pack(fake, dev, MiB)


def test_pack_block_device_in_use_not_overridden_by_force(fake_disk):
    fake, dev = fake_disk
    fake.mount(fake.path("sdx1"), "/mnt")
    for force in (False, True):
        with pytest.raises(UserError, match="mounted at /mnt.*--force does not override") as exc:
            _pack(fake, dev, 4096, force)
        assert dev in str(exc.value)


def test_pack_block_device_too_small_not_overridden_by_force(fake_disk):
    fake, dev = fake_disk
    for force in (False, True):
        with pytest.raises(UserError, match="too small") as exc:
            _pack(fake, dev, 2 * MiB, force)
        msg = str(exc.value)
        assert str(2 * MiB) in msg and str(MiB) in msg and "GiB" in msg


def test_pack_block_device_partition_table_needs_force(fake_disk):
    fake, dev = fake_disk
    with open(dev, "r+b") as f:
        f.seek(512)
        f.write(b"EFI PART")
    with pytest.raises(UserError, match="gpt partition table.*--force overrides only this check"):
        _pack(fake, dev, 4096)
    _pack(fake, dev, 4096, force=True)


# ---- optional: a real loop device (root only) ----------------------------------------------------------

def _can_use_loop():
    return os.geteuid() == 0 and os.path.exists("/dev/loop-control") and shutil.which("losetup")


@pytest.mark.skipif(not _can_use_loop(), reason="needs root, /dev/loop-control and losetup")
def test_real_loop_device(tmp_path):
    backing = _image(tmp_path, "disk.img", [(510, b"\x55\xaa"), (446 + 4, b"\xee"), (512, b"EFI PART")],
                     size=8 * MiB)
    attach = subprocess.run(["losetup", "--find", "--show", backing], capture_output=True, text=True)
    if attach.returncode != 0:
        pytest.skip(f"losetup could not attach a loop device: {attach.stderr.strip()}")
    dev = attach.stdout.strip()
    try:
        assert is_block_device(dev)
        assert target_size(dev) == 8 * MiB
        assert partition_table(dev) == "gpt"
        assert device_in_use(dev) is None
        with pytest.raises(UserError, match="--force overrides only this check"):
            check_pack_target(dev, 4 * MiB)
        check_pack_target(dev, 4 * MiB, force=True)
        with pytest.raises(UserError, match="too small"):
            check_pack_target(dev, 9 * MiB, force=True)
        mounts = tmp_path / "mounts"
        mounts.write_text(f"{dev} /mnt/x ext4 rw 0 0\n")
        with pytest.raises(UserError, match="mounted at /mnt/x"):
            check_pack_target(dev, 4 * MiB, force=True, mounts_file=str(mounts))
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)
