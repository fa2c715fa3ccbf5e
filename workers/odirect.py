"""The O_DIRECT read handle: aligned reads from a packed image (a regular file or a raw block device) straight into
caller-owned memory, without the page cache, with several reads in flight.

Used by the I/O worker processes (docs/DESIGN.md, processes and shared resources): each worker opens one
``DirectReader`` on the image and reads whole group extents (4 KiB-aligned offsets and sizes) into ring slots in
shared memory. Nothing here touches shared memory itself; the reader owns only its file descriptor, a small thread
pool for ``submit`` and the bounce buffers of ``read_range``.

Modes:
  direct    the fd was opened with O_RDONLY | O_DIRECT. Offsets, sizes and buffer addresses must be multiples of
            ``alignment`` = max(the requested alignment, the device's logical block size for a block device);
            ``read_into`` checks this and raises ValueError before any system call.
  buffered  the filesystem refused O_DIRECT at open (EINVAL: tmpfs before Linux 6.6, some FUSE filesystems), or the
            caller passed ``direct=False``. Reads go through the page cache and every read is followed by
            posix_fadvise(POSIX_FADV_DONTNEED) on its range, so the cache neither silently serves the weights (and
            makes a benchmark lie) nor grows with them. A fallback is reported once, through ``log``, naming the path.

Failures are exceptions that carry the path, the offset and the byte counts: a read that ends
at end of file raises ``ReadError(path, offset, expected, got, "end of file")``; an errno from preadv raises
``ReadError`` naming the errno and the offset where it failed; a missing or unreadable path raises ``UserError``.

Run the tests with: ``python -m pytest -q tests/test_odirect.py``
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import fcntl
import mmap
import os
import stat
import struct
import sys
import threading
from collections.abc import Callable

import numpy as np

from model.errors import ReadError, UserError

DEFAULT_ALIGNMENT = 4096  # the image's extent alignment (runtime.format.image.ALIGN)
DEFAULT_CHUNK_BYTES = 16 << 20
DEFAULT_MAX_INFLIGHT = 4
BLKSSZGET = 0x1268  # _IO(0x12, 104): the block device's logical sector size, as an int


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def aligned_buffer(size: int, alignment: int = DEFAULT_ALIGNMENT) -> memoryview:
    """A writable, zero-filled ``size``-byte buffer whose address is a multiple of ``alignment`` (a power of two).

    Backed by a private anonymous mmap (page-aligned; over-allocated and sliced when ``alignment`` exceeds the page
    size). The mapping is unmapped when the last view of it is released or collected.
    """
    if size < 0 or not _is_pow2(alignment):
        raise ValueError(f"aligned_buffer: size {size} must be >= 0 and alignment {alignment} a power of two")
    extra = 0 if alignment <= mmap.PAGESIZE else alignment
    mm = mmap.mmap(-1, max(size + extra, 1), flags=mmap.MAP_PRIVATE)
    mv = memoryview(mm)
    skip = -buffer_address(mv) % alignment
    return mv[skip:skip + size]


def buffer_address(mv: memoryview) -> int:
    """The address of the first byte of a contiguous buffer (for alignment checks)."""
    return np.frombuffer(mv, dtype=np.uint8).__array_interface__["data"][0] if mv.nbytes else 0


def _byte_view(buf) -> memoryview:
    """``buf`` as a writable, contiguous, one-dimensional byte memoryview."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.readonly:
        raise ValueError(f"read buffer is read-only ({type(buf).__name__})")
    if not mv.c_contiguous:
        raise ValueError(f"read buffer is not contiguous ({type(buf).__name__}, shape {mv.shape})")
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


def _stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class DirectReader:
    """A read handle on one file or block device, O_DIRECT when the filesystem allows it.

    ``read_into`` (blocking, in the caller's thread; preadv releases the GIL), ``read_range`` (any offset and size,
    through an aligned bounce buffer) and ``submit`` (a future; large reads split into ``chunk_bytes`` chunks issued
    in parallel on up to ``max_inflight`` threads). Close it (or use it as a context manager) to join the threads and
    close the fd.
    """

    def __init__(self, path: str, alignment: int = DEFAULT_ALIGNMENT, direct: bool = True,
                 log: Callable[[str], None] | None = None, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if not _is_pow2(alignment):
            raise ValueError(f"{path}: alignment {alignment} must be a power of two")
        if max_inflight < 1:
            raise ValueError(f"{path}: max_inflight {max_inflight} must be >= 1")
        self.path = os.fspath(path)
        self._log = log or _stderr_log
        self._fd = -1
        self._fd, self._direct = self._open(direct)
        try:
            self._alignment = max(alignment, self._logical_block_size())
        except BaseException:
            os.close(self._fd)
            raise
        if chunk_bytes < self._alignment or chunk_bytes % self._alignment:
            os.close(self._fd)
            raise ValueError(f"{path}: chunk_bytes {chunk_bytes} must be a positive multiple of the alignment "
                             f"{self._alignment}")
        self._chunk_bytes, self._max_inflight = chunk_bytes, max_inflight
        self._pool: cf.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    # ---- open ------------------------------------------------------------------------------------------------

    def _open(self, direct: bool) -> tuple[int, bool]:
        """Open read-only, O_DIRECT if asked and allowed; returns (fd, direct)."""
        base = os.O_RDONLY | os.O_CLOEXEC
        refused = None
        try:
            try:
                fd = os.open(self.path, base | (os.O_DIRECT if direct else 0))
            except OSError as e:
                if not (direct and e.errno == errno.EINVAL):
                    raise
                fd, refused = os.open(self.path, base), e
        except OSError as e:
            raise UserError(f"{self.path}: cannot open for reading: {os.strerror(e.errno)} "
                            f"[{errno.errorcode.get(e.errno, e.errno)}]") from None
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):  # a directory also fails O_DIRECT with EINVAL
            os.close(fd)
            raise UserError(f"{self.path}: expected a regular file or a block device, found mode {oct(mode)}")
        if refused is not None:
            self._log(f"{self.path}: the filesystem refuses O_DIRECT (open: {os.strerror(refused.errno)}); reading "
                      f"buffered, with posix_fadvise(POSIX_FADV_DONTNEED) after each read")
        return fd, direct and refused is None

    def _logical_block_size(self) -> int:
        """The logical sector size of a block device (BLKSSZGET); 0 for a regular file."""
        if not stat.S_ISBLK(os.fstat(self._fd).st_mode):
            return 0
        try:
            return struct.unpack("i", fcntl.ioctl(self._fd, BLKSSZGET, struct.pack("i", 0)))[0]
        except OSError as e:
            raise UserError(f"{self.path}: ioctl(BLKSSZGET) failed: {os.strerror(e.errno)}") from None

    # ---- properties ------------------------------------------------------------------------------------------

    @property
    def alignment(self) -> int:
        """Offsets, sizes and buffer addresses of direct reads must be multiples of this."""
        return self._alignment

    @property
    def direct(self) -> bool:
        """True when reads bypass the page cache (O_DIRECT); False after a fallback or with direct=False."""
        return self._direct

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        mode = "closed" if self._closed else ("direct" if self._direct else "buffered")
        return f"DirectReader({self.path!r}, {mode}, alignment={self._alignment})"

    # ---- blocking reads --------------------------------------------------------------------------------------

    def read_into(self, buf, offset: int, size: int | None = None) -> None:
        """Fill the first ``size`` bytes of ``buf`` (default: all of it) from ``offset``.

        Direct mode: ``offset``, ``size`` and the buffer's address must be multiples of ``alignment`` (ValueError,
        before any read). Ending at end of file raises ReadError(..., "end of file"); an errno raises ReadError.
        """
        mv = self._check(buf, offset, size)
        self._read_exact(mv, offset)

    def read_range(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset``, both arbitrary: reads the covering aligned extent into a bounce buffer."""
        if offset < 0 or size < 0:
            raise ValueError(f"{self.path}: read_range offset {offset} and size {size} must be >= 0")
        self._check_open()
        if size == 0:
            return b""
        a = self._alignment
        start, end = offset // a * a, -(-(offset + size) // a) * a
        bounce = aligned_buffer(end - start, a)
        try:
            got = self._read_upto(bounce, start) - (offset - start)
            if got < size:
                raise ReadError(self.path, offset, size, max(got, 0), "end of file")
            return bytes(bounce[offset - start:offset - start + size])
        finally:
            bounce.release()

    # ---- asynchronous reads ----------------------------------------------------------------------------------

    def submit(self, buf, offset: int, size: int | None = None) -> cf.Future:
        """Start reading ``size`` bytes at ``offset`` into ``buf``; returns a Future that resolves to None.

        Arguments are checked now (ValueError as for ``read_into``). Reads larger than ``chunk_bytes`` are split into
        chunks issued in parallel on the handle's threads. The future completes when every chunk has finished (so the
        buffer is no longer being written) and raises the ReadError of the lowest-offset failed chunk, if any.
        """
        mv = self._check(buf, offset, size)
        n, step = mv.nbytes, self._chunk_bytes
        spans = [(i, min(i + step, n)) for i in range(0, n, step)] or [(0, 0)]
        out: cf.Future = cf.Future()
        out.set_running_or_notify_cancel()  # chunks cannot be recalled once issued: cancel() returns False
        pending, errors, lock = [len(spans)], {}, threading.Lock()

        def chunk_done(fut: cf.Future, k: int) -> None:
            exc = fut.exception()
            with lock:
                if exc is not None:
                    errors[k] = exc
                pending[0] -= 1
                if pending[0]:
                    return
            if not errors:
                out.set_result(None)
                return
            k0 = min(errors)
            out.set_exception(self._chunk_error(errors[k0], k0, len(spans), offset, n))

        pool = self._executor()
        for k, (i, j) in enumerate(spans):
            fut = pool.submit(self._read_exact, mv[i:j], offset + i)
            fut.add_done_callback(lambda f, k=k: chunk_done(f, k))
        return out

    def _chunk_error(self, exc: BaseException, k: int, n_chunks: int, offset: int, size: int) -> BaseException:
        """Add which chunk of which request failed to a chunk's ReadError."""
        if n_chunks == 1 or not isinstance(exc, ReadError):
            return exc
        prefix = f"{exc.path}: read at offset {exc.offset} returned {exc.got} of {exc.expected} bytes"
        detail = str(exc).removeprefix(prefix).removeprefix(" (").removesuffix(")")
        where = f"chunk {k + 1} of {n_chunks} of the {size}-byte read at offset {offset}"
        new = ReadError(exc.path, exc.offset, exc.expected, exc.got, f"{detail}; {where}" if detail else where)
        new.__cause__ = exc
        return new

    def _executor(self) -> cf.ThreadPoolExecutor:
        with self._lock:
            self._check_open()
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(self._max_inflight, thread_name_prefix="odirect")
            return self._pool

    # ---- close -----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for reads in flight, stop the threads, close the fd. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)  # no read may outlive the fd (its number could be reused)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> DirectReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: read on a closed DirectReader")

    def _check(self, buf, offset: int, size: int | None) -> memoryview:
        """Validate a read request; returns the byte view of the destination, ``size`` bytes long."""
        self._check_open()
        mv = _byte_view(buf)
        size = mv.nbytes if size is None else size
        if offset < 0 or size < 0 or size > mv.nbytes:
            raise ValueError(f"{self.path}: bad read: offset {offset}, size {size}, buffer of {mv.nbytes} bytes")
        mv = mv[:size]
        a = self._alignment
        if self._direct and (offset % a or size % a or buffer_address(mv) % a):
            raise ValueError(f"{self.path}: O_DIRECT read needs offset, size and buffer address aligned to {a} "
                             f"bytes; got offset {offset}, size {size}, address {buffer_address(mv):#x}")
        return mv

    def _read_exact(self, mv: memoryview, offset: int) -> None:
        got = self._read_upto(mv, offset)
        if got < mv.nbytes:
            raise ReadError(self.path, offset, mv.nbytes, got, "end of file")

    def _read_upto(self, mv: memoryview, offset: int) -> int:
        """Read into ``mv`` from ``offset`` until it is full or end of file; returns the bytes read."""
        size, done, a = mv.nbytes, 0, self._alignment
        try:
            while done < size:
                try:
                    got = os.preadv(self._fd, [mv[done:]], offset + done)
                except OSError as e:
                    raise ReadError(self.path, offset + done, size - done, 0,
                                    f"preadv: [Errno {e.errno}] {os.strerror(e.errno)}; {done} of {size} bytes "
                                    f"from offset {offset} were read before it") from None
                done += got
                # Direct I/O is short only at end of file; an unaligned count means the file ended mid-block, and a
                # further O_DIRECT read at that unaligned position would fail with EINVAL instead of returning 0.
                if got == 0 or (self._direct and got % a):
                    break
        finally:
            if not self._direct and size:
                os.posix_fadvise(self._fd, offset, size, os.POSIX_FADV_DONTNEED)
        return done
