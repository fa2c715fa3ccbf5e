"""Tests for workers/odirect.py: the O_DIRECT read handle of the I/O workers.

Random bytes are written to files and read back over aligned sizes and offsets (``read_into``, ``submit``) and over
deliberately unaligned ones (``read_range``), in direct mode on a filesystem that allows O_DIRECT and in the
buffered fallback on /dev/shm. The data come from numpy's generator seeded with ODIRECT_TEST_SEED (default 1234);
every test that uses them prints the seed, which pytest shows with the output of a failing test.

Files made outside tmp_path (/var/tmp, the repository's parent, /dev/shm) are removed in a ``finally``. One
optional test attaches a loop device with 4096-byte sectors (root, /dev/loop-control and losetup only).

Run: python -m pytest -q tests/test_odirect.py
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from model.errors import ReadError, UserError
from workers import odirect
from workers.odirect import DirectReader, aligned_buffer, buffer_address

SEED = int(os.environ.get("ODIRECT_TEST_SEED", "1234"))
KiB, MiB = 1024, 1 << 20
FILE_SIZE = 3 * MiB + 12345  # deliberately not a multiple of 4096: the file ends mid-block
ROOT = Path(__file__).resolve().parent.parent
UNALIGNED = [0, 1, 4095, 4096, 4097, MiB + 3]


def odirect_allowed(directory) -> bool:
    """Whether the filesystem holding ``directory`` lets a file be opened with O_DIRECT (EINVAL means no)."""
    fd, probe = tempfile.mkstemp(dir=directory, prefix="odirect-probe-")
    os.close(fd)
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.unlink(probe)
    os.close(fd)
    return True


def random_bytes(n: int = FILE_SIZE) -> bytes:
    print(f"random data: seed {SEED} (set ODIRECT_TEST_SEED to change it), {n} bytes")
    return np.random.default_rng(SEED).integers(0, 256, n, dtype=np.uint8).tobytes()


class LogSpy:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        self.lines.append(msg)


@pytest.fixture(scope="module")
def data() -> bytes:
    return random_bytes()


@pytest.fixture(scope="module")
def direct_file(data, tmp_path_factory):
    """A file of ``data`` on a filesystem that allows O_DIRECT: pytest's tmp dir, /var/tmp or the repo's parent."""
    tmp = tmp_path_factory.mktemp("odirect")
    for base in (tmp, Path("/var/tmp"), ROOT.parent):
        if base.is_dir() and os.access(base, os.W_OK) and odirect_allowed(base):
            break
    else:
        pytest.skip("no filesystem here allows O_DIRECT (tried pytest's tmp dir, /var/tmp and the repo's parent)")
    own = None if base == tmp else Path(tempfile.mkdtemp(dir=base, prefix="odirect-test-"))
    try:
        path = (own or tmp) / "data.bin"
        path.write_bytes(data)
        print(f"direct-mode test file: {path}")
        yield str(path)
    finally:
        if own is not None:
            shutil.rmtree(own)


@pytest.fixture
def reader(direct_file):
    log = LogSpy()
    with DirectReader(direct_file, log=log) as r:
        assert r.direct, f"{direct_file}: O_DIRECT was allowed by the probe but the reader fell back"
        assert log.lines == []
        yield r


@pytest.fixture
def shm_file(data):
    path = f"/dev/shm/odirect-test-{os.getpid()}-{threading.get_ident()}.bin"
    try:
        Path(path).write_bytes(data)
        yield path
    finally:
        if os.path.exists(path):
            os.unlink(path)


def count_preadv(monkeypatch) -> list[tuple[int, int]]:
    """Record (offset, nbytes) of every os.preadv call made while the test runs."""
    calls, real = [], os.preadv

    def spy(fd, bufs, offset, *a):
        calls.append((offset, sum(memoryview(b).nbytes for b in bufs)))
        return real(fd, bufs, offset, *a)

    monkeypatch.setattr(os, "preadv", spy)
    return calls


# ---- the mode follows the filesystem ---------------------------------------------------------------------------

def test_mode_matches_filesystem(tmp_path, data):
    path = tmp_path / "mode.bin"
    path.write_bytes(data[:8192])
    allowed, log = odirect_allowed(tmp_path), LogSpy()
    with DirectReader(str(path), log=log) as r:
        print(f"{tmp_path}: O_DIRECT {'allowed' if allowed else 'refused'}; reader direct={r.direct}")
        assert r.direct == allowed
        assert len(log.lines) == (0 if allowed else 1)
        assert r.alignment == 4096 and r.path == str(path)
        assert r.read_range(0, 8192) == data[:8192]


def test_aligned_buffer():
    for size, a in [(0, 4096), (1, 4096), (5 * KiB, 4096), (100, 65536), (MiB, 2 * MiB)]:
        buf = aligned_buffer(size, a)
        assert buf.nbytes == size and not buf.readonly
        assert size == 0 or buffer_address(buf) % a == 0
    with pytest.raises(ValueError, match="alignment 3000"):
        aligned_buffer(10, 3000)
    assert odirect.DEFAULT_ALIGNMENT == 4096  # runtime.format.image.ALIGN (not imported: it pulls in torch)


# ---- direct mode: aligned and unaligned reads ------------------------------------------------------------------

def test_read_into_aligned(reader, data):
    for offset in (0, 4096, 8192, MiB, 3 * MiB):
        for size in (0, 4096, 8192, 64 * KiB, MiB):
            if offset + size > len(data):
                continue
            buf = aligned_buffer(size)
            reader.read_into(buf, offset)
            assert bytes(buf) == data[offset:offset + size], (SEED, offset, size)
    # a numpy uint8 array and an explicit size smaller than the buffer
    arr = np.frombuffer(aligned_buffer(3 * 4096), dtype=np.uint8)
    reader.read_into(arr, 4096, 2 * 4096)
    assert arr[:8192].tobytes() == data[4096:3 * 4096]
    assert not arr[8192:].any()


def test_read_range_unaligned(reader, data):
    n = len(data)
    for offset in UNALIGNED:
        for size in UNALIGNED:
            assert reader.read_range(offset, size) == data[offset:offset + size], (SEED, offset, size)
    for k in (1, 4095, 4096, 4097, 12345):  # ending exactly at the end of the file
        assert reader.read_range(n - k, k) == data[n - k:], (SEED, k)
    assert reader.read_range(n, 0) == b""
    for offset, size in [(n - 1, 2), (n - 4097, 4098), (n - 12345, MiB + 3), (n, 1), (n + 5000, 3)]:
        with pytest.raises(ReadError) as ei:
            reader.read_range(offset, size)
        got = max(n - offset, 0)
        assert (ei.value.offset, ei.value.expected, ei.value.got) == (offset, size, got)
        msg = str(ei.value)
        assert reader.path in msg and f"offset {offset}" in msg and f"{got} of {size} bytes" in msg, msg
        assert "end of file" in msg


def test_short_read_names_path_offset_and_counts(reader, data):
    n = len(data)
    offset = n // 4096 * 4096 - 4096  # aligned; the file ends 4096 + n % 4096 bytes later
    size = 4 * 4096
    buf = aligned_buffer(size)
    with pytest.raises(ReadError) as ei:
        reader.read_into(buf, offset)
    msg = str(ei.value)
    got = n - offset
    assert (ei.value.path, ei.value.offset, ei.value.expected, ei.value.got) == (reader.path, offset, size, got)
    for part in (reader.path, f"offset {offset}", f"returned {got} of {size} bytes", "end of file"):
        assert part in msg, msg
    assert bytes(buf[:got]) == data[offset:]  # what was there was read
    with pytest.raises(ReadError, match=f"offset {n // 4096 * 4096 + 4096} returned 0 of 4096 bytes"):
        reader.read_into(aligned_buffer(4096), n // 4096 * 4096 + 4096)


def test_misaligned_requests_raise_before_any_read(reader, monkeypatch):
    calls = count_preadv(monkeypatch)
    big = aligned_buffer(3 * 4096)
    cases = [
        (big[1:4097], 0, None, "address"),  # misaligned buffer
        (big[:4096], 1, None, "offset 1"),  # misaligned offset
        (big, 0, 100, "size 100"),  # misaligned size
        (big[:4096], 4096 + 512, None, "offset 4608"),
    ]
    for buf, offset, size, what in cases:
        with pytest.raises(ValueError, match=what) as ei:
            reader.read_into(buf, offset, size)
        assert "aligned to 4096" in str(ei.value) and reader.path in str(ei.value)
        with pytest.raises(ValueError, match=what):
            reader.submit(buf, offset, size)
    with pytest.raises(ValueError, match="read-only"):
        reader.read_into(bytes(4096), 0)
    with pytest.raises(ValueError, match="size 8192, buffer of 4096 bytes"):
        reader.read_into(big[:4096], 0, 8192)
    assert calls == []


def test_oserror_becomes_read_error(reader, monkeypatch, data):
    real, calls = os.preadv, []

    def flaky(fd, bufs, offset, *a):  # one partial read of 4096 bytes, then EIO
        calls.append(offset)
        if len(calls) == 1:
            return real(fd, [memoryview(bufs[0])[:4096]], offset)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", flaky)
    buf = aligned_buffer(4 * 4096)
    with pytest.raises(ReadError) as ei:
        reader.read_into(buf, 8192)
    msg = str(ei.value)
    assert ei.value.offset == 8192 + 4096 and ei.value.expected == 3 * 4096
    for part in (reader.path, "offset 12288", "Input/output error", "4096 of 16384 bytes from offset 8192"):
        assert part in msg, msg
    assert bytes(buf[:4096]) == data[8192:12288]


# ---- submit: several reads in flight ---------------------------------------------------------------------------

def test_submit_concurrent_reads(direct_file, data, monkeypatch):
    calls = count_preadv(monkeypatch)
    sizes = [4096, 64 * KiB, 200 * KiB, 256 * KiB, 8192, 100 * 4096, 12 * 4096, 128 * KiB]
    offsets = [(i * 97 * 4096) % (2 * MiB) for i in range(8)]
    region = [sum(sizes[:i]) for i in range(9)]
    buf = aligned_buffer(region[-1])
    with DirectReader(direct_file, max_inflight=4, chunk_bytes=64 * KiB) as r:
        futs = [r.submit(buf[region[i]:region[i + 1]], offsets[i]) for i in range(8)]
        for f in futs:
            assert f.result(timeout=30) is None
    for i in range(8):
        assert bytes(buf[region[i]:region[i + 1]]) == data[offsets[i]:offsets[i] + sizes[i]], (SEED, i)
    assert max(size for _, size in calls) <= 64 * KiB  # split into chunks
    assert len(calls) >= sum(-(-s // (64 * KiB)) for s in sizes)


def test_submit_failing_chunk_propagates(direct_file, data, monkeypatch):
    n, chunk = len(data), 256 * KiB
    with DirectReader(direct_file, chunk_bytes=chunk) as r:
        # crossing the end of the file: the last chunk is short
        start = 2 * MiB
        size = -(-(n - start) // 4096) * 4096 + 4096
        buf = aligned_buffer(size)
        with pytest.raises(ReadError) as ei:
            r.submit(buf, start).result(timeout=30)
        msg = str(ei.value)
        last = start + (size - 1) // chunk * chunk
        assert ei.value.offset == last and ei.value.got == n - last, msg
        assert r.path in msg and "end of file" in msg and f"of the {size}-byte read at offset {start}" in msg
        assert bytes(buf[:n - start]) == data[start:]  # every chunk finished before the future did

        # an errno in one chunk of the middle: the future raises it, naming the offset where it failed
        real, bad = os.preadv, start - 2 * chunk

        def eio_at(fd, bufs, offset, *a):
            if offset == bad:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(fd, bufs, offset, *a)

        monkeypatch.setattr(os, "preadv", eio_at)
        with pytest.raises(ReadError, match=f"offset {bad} returned 0 of {chunk} bytes.*Input/output error"):
            r.submit(aligned_buffer(MiB), MiB).result(timeout=30)
        monkeypatch.undo()
        f = r.submit(aligned_buffer(0), 0)  # an empty read still completes
        assert f.result(timeout=30) is None


# ---- the buffered fallback on tmpfs ----------------------------------------------------------------------------

def test_buffered_fallback_on_dev_shm(shm_file, data, monkeypatch):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    allowed = odirect_allowed("/dev/shm")
    with DirectReader(shm_file, log=LogSpy()) as r:
        assert r.direct == allowed  # tmpfs accepts O_DIRECT since Linux 6.6
    if allowed:  # simulate an older tmpfs (or a FUSE filesystem): open(O_DIRECT) fails with EINVAL
        print("/dev/shm accepts O_DIRECT on this kernel: the EINVAL of an older tmpfs is simulated")
        real_open = os.open

        def refuse_direct(path, flags, *a, **k):
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
            return real_open(path, flags, *a, **k)

        monkeypatch.setattr(os, "open", refuse_direct)
    fadvised, real_fadvise = [], os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, o, n, adv: (fadvised.append((o, n, adv)),
                                                                      real_fadvise(fd, o, n, adv))[1])
    log = LogSpy()
    with DirectReader(shm_file, log=log) as r:
        assert r.direct is False
        buf = bytearray(5000)  # unaligned sizes, offsets and buffers are fine when buffered
        r.read_into(buf, 3)
        assert bytes(buf) == data[3:5003]
        for offset in UNALIGNED:
            assert r.read_range(offset, 4097) == data[offset:offset + 4097]
        big = aligned_buffer(MiB)
        r.submit(big, 4096).result(timeout=30)
        assert bytes(big) == data[4096:4096 + MiB]
        with pytest.raises(ReadError, match="end of file"):
            r.read_into(bytearray(10), len(data) - 5)
    assert len(log.lines) == 1, log.lines
    assert shm_file in log.lines[0] and "O_DIRECT" in log.lines[0]
    assert (3, 5000, os.POSIX_FADV_DONTNEED) in fadvised
    assert len(fadvised) >= 2 + len(UNALIGNED)

    # direct=False asks for buffered reads: no fallback to report
    log = LogSpy()
    with DirectReader(shm_file, direct=False, log=log) as r:
        assert r.direct is False and r.read_range(1, 10) == data[1:11]
    assert log.lines == []


# ---- opening and closing ---------------------------------------------------------------------------------------

def test_missing_file_and_close(tmp_path, data):
    missing = str(tmp_path / "no-such-image.bin")
    with pytest.raises(UserError, match="no-such-image.bin.*No such file"):
        DirectReader(missing)
    log = LogSpy()
    with pytest.raises(UserError, match="expected a regular file or a block device"):
        DirectReader(str(tmp_path), log=log)
    assert log.lines == []  # a directory's EINVAL is not a filesystem refusing O_DIRECT
    path = tmp_path / "x.bin"
    path.write_bytes(data[:4096])
    if os.geteuid() != 0:  # root reads anything
        path.chmod(0)
        with pytest.raises(UserError, match="x.bin.*Permission denied"):
            DirectReader(str(path), log=LogSpy())
        path.chmod(0o644)
    r = DirectReader(str(path), log=LogSpy())
    r.submit(aligned_buffer(4096), 0).result(timeout=30)
    r.close()
    r.close()
    assert r.closed
    with pytest.raises(ValueError, match="closed"):
        r.read_range(0, 1)
    with pytest.raises(ValueError, match="closed"):
        r.submit(aligned_buffer(4096), 0)
    with pytest.raises(ValueError, match="alignment 1000"):
        DirectReader(str(path), alignment=1000)
    with pytest.raises(ValueError, match="chunk_bytes 1000"):
        DirectReader(str(path), chunk_bytes=1000, log=LogSpy())


# ---- optional: a block device with 4096-byte logical sectors (root only) ---------------------------------------

def _can_use_loop():
    return os.geteuid() == 0 and os.path.exists("/dev/loop-control") and shutil.which("losetup")


@pytest.mark.skipif(not _can_use_loop(), reason="needs root, /dev/loop-control and losetup")
def test_block_device_alignment(direct_file, data):
    size = len(data) // 4096 * 4096
    backing = Path(direct_file).with_name("loop-backing.bin")
    backing.write_bytes(data[:size])
    try:
        attach = subprocess.run(["losetup", "--find", "--show", "--sector-size", "4096", str(backing)],
                                capture_output=True, text=True)
        if attach.returncode != 0:
            pytest.skip(f"losetup could not attach a loop device: {attach.stderr.strip()}")
        dev = attach.stdout.strip()
        try:
            with DirectReader(dev, alignment=512, log=LogSpy()) as r:
                assert r.direct and r.alignment == 4096  # max(512, BLKSSZGET)
                with pytest.raises(ValueError, match="aligned to 4096"):
                    r.read_into(aligned_buffer(512), 512)
                assert r.read_range(4097, 10000) == data[4097:14097]
                buf = aligned_buffer(MiB)
                r.submit(buf, MiB).result(timeout=30)
                assert bytes(buf) == data[MiB:2 * MiB]
                with pytest.raises(ReadError, match=f"{dev}: read at offset {size - 4096} returned 4096 of 8192"):
                    r.read_into(aligned_buffer(8192), size - 4096)
        finally:
            subprocess.run(["losetup", "--detach", dev], check=True)
    finally:
        backing.unlink()
