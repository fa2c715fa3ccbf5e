"""Safety checks for the packed image's target: a regular file or a raw block device (Linux only).

Implements docs/DESIGN.md's rule (the image) "writing to a block device refuses a mounted device": before the
``launch.py pack`` process writes an image it calls ``check_pack_target``; before the I/O workers open an
image they call ``check_readable`` and ``target_size``. Runs in either process; owns nothing (every file
descriptor it opens is closed before it returns).

What counts as "in use" (``device_in_use``), for the device itself and its family (a whole disk with all
of its partitions, or a partition with its parent disk):
  - mounted: a source in /proc/self/mounts (octal escapes such as ``\\040`` decoded, symlinks resolved);
  - a member of something: a non-empty /sys/class/block/<name>/holders (device-mapper, LVM, md RAID);
  - an active swap device: listed in /proc/swaps;
  - claimed by the kernel: open(O_EXCL) fails with EBUSY (catches mounts in other mount namespaces).
The mounts file, swaps file and sysfs root are parameters so tests can use fake trees.

Refusals raise ``UserError`` with one line naming the path and the values expected and found. ``--force``
(``force=True``) overrides only the "holds a partition table" check, never "in use" or "too small".

Run the tests with: ``python -m pytest -q tests/test_blockdev.py``
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct

from model.errors import UserError

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): device size in bytes, as a u64
SECTOR = 512
GPT_MAGIC = b"EFI PART"
GPT_OFFSETS = (512, 4096)  # the GPT header sits in LBA 1: 512-byte sectors, or 4096 for 4Kn disks
MBR_SIGNATURE = b"\x55\xaa"  # at offset 510
MBR_TABLE, MBR_ENTRY, MBR_ENTRIES = 446, 16, 4  # four 16-byte entries; byte 4 of each is its type
PROBE_BYTES = 34 * SECTOR  # protective MBR + GPT header + 32 sectors of partition entries
GIB = 1 << 30

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_PARTITION_SUFFIX = re.compile(r"p?\d+")


def _fmt(n: int) -> str:
    """A byte count as 'N bytes (X.XX GiB)' for messages."""
    return f"{n} bytes ({n / GIB:.2f} GiB)"


def _unescape(field: str) -> str:
    """Decode the kernel's octal escapes in /proc/self/mounts and /proc/swaps (space is \\040)."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def is_block_device(path) -> bool:
    """True when ``path`` (after following symlinks) is a block special file."""
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _stat_or_raise(path) -> os.stat_result:
    """os.stat, with a missing path or a path we may not look at turned into a UserError."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: does not exist (expected a regular file or a block device)") from None
    except OSError as e:
        raise UserError(f"{path}: stat failed: {e.strerror} (errno {e.errno})") from None


def target_size(path) -> int:
    """Size in bytes: a block device's capacity (BLKGETSIZE64, else lseek to the end), a file's st_size."""
    st = _stat_or_raise(path)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if not stat.S_ISBLK(st.st_mode):
        raise UserError(f"{path}: expected a regular file or a block device, found mode {oct(st.st_mode)}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"{path}: open for size failed: {e.strerror} (errno {e.errno})") from None
    try:
        try:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            return struct.unpack("=Q", buf)[0]
        except OSError:
            return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _parse_table(table_file: str, columns: int) -> list[list[str]]:
    """Whitespace-separated rows of a /proc table with at least ``columns`` fields, escapes decoded."""
    with open(table_file, encoding="utf-8", errors="surrogateescape") as f:
        rows = [line.split() for line in f]
    return [[_unescape(x) for x in row] for row in rows if len(row) >= columns]


def mounted_sources(mounts_file="/proc/self/mounts") -> dict[str, str]:
    """Map each mounted device path (realpath'd) to its first mountpoint. Pseudo sources are skipped."""
    sources: dict[str, str] = {}
    for row in _parse_table(mounts_file, 2):
        if row[0].startswith("/"):  # "proc", "tmpfs", "overlay" ... are not device paths
            sources.setdefault(os.path.realpath(row[0]), row[1])
    return sources


def _swap_devices(swaps_file: str) -> set[str]:
    """Realpath'd active swap areas from /proc/swaps (header line: Filename Type Size Used Priority)."""
    if not os.path.exists(swaps_file):
        return set()
    rows = _parse_table(swaps_file, 5)
    return {os.path.realpath(row[0]) for row in rows if row[0] != "Filename"}


def _block_dir(sys_root: str) -> str:
    return os.path.join(sys_root, "class", "block")


def _kernel_name(path: str, sys_root: str) -> str:
    """The kernel's name for the device (sda, nvme0n1p2, dm-0): via /sys/dev/block/MAJ:MIN when ``path``
    is a real block device, else the basename of its resolved path (fake trees in tests, /dev symlinks)."""
    if is_block_device(path):
        rdev = os.stat(path).st_rdev
        link = os.path.join(sys_root, "dev", "block", f"{os.major(rdev)}:{os.minor(rdev)}")
        if os.path.exists(link):
            return os.path.basename(os.path.realpath(link))
    return os.path.basename(os.path.realpath(path))


def _partitions(name: str, sys_root: str) -> list[str]:
    """Partitions of whole disk ``name``: its /sys/class/block/<name>/<name>N (or <name>pN) entries."""
    disk_dir = os.path.join(_block_dir(sys_root), name)
    if not os.path.isdir(disk_dir):
        return []
    found = []
    for entry in sorted(os.listdir(disk_dir)):
        sub = os.path.join(disk_dir, entry)
        if not (entry.startswith(name) and os.path.isdir(sub)):
            continue
        if os.path.isfile(os.path.join(sub, "partition")) or _PARTITION_SUFFIX.fullmatch(entry[len(name):]):
            found.append(entry)
    return found


def _parent_disk(name: str, sys_root: str) -> str | None:
    """The whole disk that holds partition ``name`` (the /sys/class/block/<disk> with a <name> entry)."""
    block_dir = _block_dir(sys_root)
    if not os.path.isdir(block_dir):
        return None
    for disk in sorted(os.listdir(block_dir)):
        if disk != name and name.startswith(disk) and os.path.isdir(os.path.join(block_dir, disk, name)):
            return disk
    return None


def _sys_dir(name: str, sys_root: str) -> str:
    """/sys/class/block/<name>, or <parent>/<name> for a partition that has no top-level entry."""
    top = os.path.join(_block_dir(sys_root), name)
    parent = None if os.path.isdir(top) else _parent_disk(name, sys_root)
    return os.path.join(_block_dir(sys_root), parent, name) if parent else top


def _family(path: str, sys_root: str) -> list[tuple[str, str, str]]:
    """(kernel name, device path, role) for the device and its partitions, or its parent disk."""
    real = os.path.realpath(path)
    dev_dir, name = os.path.dirname(real), _kernel_name(path, sys_root)
    family = [(name, real, "the device")]
    parts = _partitions(name, sys_root)
    family += [(p, os.path.join(dev_dir, p), f"its partition {p}") for p in parts]
    parent = None if parts else _parent_disk(name, sys_root)
    if parent:
        family.append((parent, os.path.join(dev_dir, parent), f"its parent disk {parent}"))
    return family


def _exclusively_busy(path: str) -> bool:
    """True when the kernel refuses an O_EXCL open with EBUSY (mounted anywhere, or claimed by dm/md/swap)."""
    if not is_block_device(path):
        return False
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as e:
        return e.errno == errno.EBUSY
    return False


def device_in_use(path, mounts_file="/proc/self/mounts", sys_root="/sys",
                  swaps_file="/proc/swaps") -> str | None:
    """Why block device ``path`` (or a partition of it, or its parent disk) is in use, every reason joined
    with '; '; None when it is free. See the module docstring for what is checked."""
    mounts, swaps = mounted_sources(mounts_file), _swap_devices(swaps_file)
    reasons = []
    for name, dev, role in _family(path, sys_root):
        if dev in mounts:
            reasons.append(f"{role} ({dev}) is mounted at {mounts[dev]}")
        holders_dir = os.path.join(_sys_dir(name, sys_root), "holders")
        holders = sorted(os.listdir(holders_dir)) if os.path.isdir(holders_dir) else []
        if holders:
            reasons.append(f"{role} ({dev}) is a member of {', '.join(holders)} "
                           "(device-mapper/LVM/md holders)")
        if dev in swaps:
            reasons.append(f"{role} ({dev}) is an active swap device")
    if not reasons and _exclusively_busy(path):
        reasons.append("the kernel reports it busy (exclusive open failed with EBUSY: mounted or claimed "
                       "in another mount namespace, or opened exclusively by another process)")
    return "; ".join(reasons) or None


def partition_table(path) -> str | None:
    """'gpt', 'mbr' or None, from the first 34 sectors of ``path`` (a file or a block device)."""
    try:
        with open(path, "rb") as f:
            head = f.read(PROBE_BYTES)
    except OSError as e:
        raise UserError(f"{path}: cannot read its first {PROBE_BYTES} bytes: {e.strerror} "
                        f"(errno {e.errno})") from None
    if any(head[o:o + len(GPT_MAGIC)] == GPT_MAGIC for o in GPT_OFFSETS):
        return "gpt"
    if head[510:512] == MBR_SIGNATURE:
        types = [head[MBR_TABLE + i * MBR_ENTRY + 4] for i in range(MBR_ENTRIES)]
        if any(t != 0 for t in types):  # partition type 0 means "empty entry"
            return "mbr"
    return None


def _check_block_target(path, image_bytes: int, force: bool, mounts_file, swaps_file, sys_root) -> None:
    """Refuse a block device that is in use, too small, not writable, or (unless forced) partitioned."""
    reason = device_in_use(path, mounts_file=mounts_file, sys_root=sys_root, swaps_file=swaps_file)
    if reason:
        raise UserError(f"{path}: refusing to write the image: {reason}; expected an unused device "
                        f"(--force does not override this)")
    size = target_size(path)
    if size < image_bytes:
        raise UserError(f"{path}: device too small for the image: need {_fmt(image_bytes)}, device has "
                        f"{_fmt(size)} (--force does not override this)")
    if not os.access(path, os.W_OK):
        raise UserError(f"{path}: no write permission for uid {os.geteuid()} (expected a writable device)")
    table = partition_table(path)
    if table and not force:
        raise UserError(f"{path}: holds a {table} partition table that the image would destroy; expected no "
                        f"partition table (--force overrides only this check)")


def _check_file_target(path, image_bytes: int) -> None:
    """Refuse a file target whose directory is missing or read-only, or whose filesystem lacks the space. The
    image is written beside an existing file and replaces it only once complete (runtime/format/staged.py), so an
    overwrite needs room for both."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise UserError(f"{path}: parent directory {parent} does not exist (expected an existing directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: parent directory {parent} is not writable by uid {os.geteuid()}")
    exists = os.path.lexists(path)
    if exists:
        st = _stat_or_raise(path)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{path}: expected a regular file or a block device, "
                            f"found mode {oct(st.st_mode)}")
        if not os.access(path, os.W_OK):
            raise UserError(f"{path}: exists and is not writable by uid {os.geteuid()}")
    vfs = os.statvfs(parent)
    free = vfs.f_bavail * vfs.f_frsize
    if free < image_bytes:
        beside = " (the existing image stays until the new one is complete)" if exists else ""
        raise UserError(f"{path}: not enough free space in {parent}: need {_fmt(image_bytes)}, have "
                        f"{_fmt(free)} free{beside}")


def check_pack_target(path, image_bytes: int, force: bool = False, *, mounts_file="/proc/self/mounts",
                      swaps_file="/proc/swaps", sys_root="/sys") -> None:
    """Raise UserError unless an image of ``image_bytes`` may be written to ``path`` (file or device)."""
    if image_bytes < 0:
        raise ValueError(f"image_bytes must be >= 0, got {image_bytes}")
    if is_block_device(path):
        _check_block_target(path, image_bytes, force, mounts_file, swaps_file, sys_root)
    else:
        _check_file_target(path, image_bytes)


def check_readable(path) -> None:
    """Raise UserError naming ``path`` when it does not exist, is neither a regular file nor a block device (a
    directory, /dev/null), or exists but this process may not read it."""
    if not os.path.exists(path):
        raise UserError(f"{path}: does not exist (expected a readable image file or block device)")
    st = os.stat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UserError(f"{path}: is {_file_kind(st.st_mode)}, not an image (expected a regular file or a block "
                        f"device)")
    if not os.access(path, os.R_OK):
        mode = stat.S_IMODE(st.st_mode)
        raise UserError(f"{path}: no read permission for uid {os.geteuid()} (file mode {mode:o}, "
                        f"owner uid {st.st_uid} gid {st.st_gid})")


def _file_kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return f"of mode {oct(mode)}"


def queue_depth(path) -> tuple[int, str] | None:
    """(requests the block layer queues, the device's name) for the device that holds ``path`` (a block device
    itself, or the filesystem of a file), from /sys/dev/block/MAJ:MIN/queue/nr_requests (a partition's is its
    disk's); None where there is no such device (tmpfs, overlay, no /sys)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
    base = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    for q in (f"{base}/queue/nr_requests", f"{base}/../queue/nr_requests"):
        try:
            with open(q) as f:
                return int(f.read().strip()), os.path.basename(os.path.realpath(base))
        except (OSError, ValueError):
            continue
    return None


def worker_limit(path, inflight: int, cores: int | None = None) -> tuple[int, str]:
    """How many I/O worker processes reading ``path`` are useful here, and why: each keeps ``inflight`` reads in
    flight and checksums what it reads, so more than two per core, or more than the device's queue holds,
    only adds processes."""
    cores = cores or os.cpu_count() or 1
    limit, why = 2 * cores, f"2 per core, {cores} cores"
    q = queue_depth(path)
    if q is not None and max(1, q[0] // inflight) < limit:
        limit, why = max(1, q[0] // inflight), f"the queue of {q[1]} holds {q[0]} requests, {inflight} per worker"
    return max(limit, 1), why
