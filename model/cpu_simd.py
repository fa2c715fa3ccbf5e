"""model/cpu_simd.c, built with the host's C compiler and called through ctypes: a CPU decode step's matmuls over
row tiles (model/cpu_kernels.py's layout) and its groups (the norm, the matmuls, the rotation, silu * up, the
residual add) as one C call each, and its attention, where the host has AVX-512F or AVX2 (with FMA and F16C).

Built once per source, compiler and CPU (``-march=native``) into ``cache`` (the runtime's: LLMSTREAM_CACHE_DIR's
``cpu-kernels``), about a second, then loaded from there; written under a temporary name and renamed, so that runs
starting together never load half a file (a build killed midway leaves its temporary file, which the next build
removes once it is an hour old). Where building fails (no compiler, neither ISA: the source's #error) ``library``
says so once on stderr and gives None; model/cpu_kernels.py ``available`` checks what it computes against the
reference before a run uses it.

The C code reads the tiles in place (their data pointers), never copies them; the results go to fresh tensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_simd.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
_P = ctypes.c_void_p


class _Tiles(ctypes.Structure):
    _fields_ = [("q", _P), ("s", _P), ("o", _P), ("d", _P), ("dm", _P), ("st", ctypes.c_int), ("ot", ctypes.c_int),
                ("nt", ctypes.c_int), ("groups", ctypes.c_int), ("gs", ctypes.c_int), ("nibble", ctypes.c_int),
                ("ksub", ctypes.c_int), ("blocks", ctypes.c_int), ("rows", ctypes.c_int)]


_TYPES = {torch.float16: 0, torch.float32: 1, torch.uint8: 2, torch.int8: 3}  # the C's F16, F32, U8, I8


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


# extra flags of ``library``'s ``isa``: "native", whatever the host has (AVX-512 where it has it), or "avx2", the
# AVX2 code on a host that also has AVX-512 (the tests run both where they can)
ISA_FLAGS = {"native": (), "avx2": ("-mno-avx512f",)}


def _key(cc: str, flags: tuple[str, ...]) -> str:
    """The source, the compiler's version and the CPU's flags: what the built file depends on."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join((cc,) + flags).encode())
    h.update(subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.encode())
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    h.update(flags.encode())
    return h.hexdigest()[:16]


@functools.cache
def library(cache: Path, isa: str = "native") -> ctypes.CDLL | None:
    """The built library (built into ``cache`` when not there yet); None (one line on stderr) where it cannot be
    had here. ``isa``: ISA_FLAGS."""
    cc = _compiler()
    if cc is None:
        return _none("no C compiler (cc, gcc or $CC)")
    flags = FLAGS + ISA_FLAGS[isa]
    try:
        path = Path(cache) / f"cpu_simd-{_key(cc, flags)}.so"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            for old in path.parent.glob("cpu_simd-*.tmp"):  # a build killed midway (the hour: one still going)
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - old.stat().st_mtime > 3600:
                        old.unlink()
            fd, tmp = tempfile.mkstemp(prefix="cpu_simd-", suffix=".tmp", dir=path.parent)
            os.close(fd)
            try:
                got = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                                     timeout=300)
                if got.returncode:
                    err = next((ln for ln in got.stderr.splitlines() if "error" in ln), got.stderr.strip()[:200])
                    return _none(f"{cc} failed: {err.strip()}")
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        return _none(f"{type(e).__name__}: {e}")
    for name, ret in (("llms_mv", None), ("llms_attention_in", None), ("llms_residual", None), ("llms_ffn", None),
                      ("llms_dequant", None), ("llms_decode_attention", None)):
        getattr(lib, name).restype = ret
    lib.llms_mv.argtypes = [_P, ctypes.c_int, _P, _P, ctypes.c_int, ctypes.c_int]
    lib.llms_decode_attention.argtypes = [ctypes.c_int] * 4 + [_P, ctypes.c_long] * 3 + [_P, _P, ctypes.c_long,
                                                                                     ctypes.c_int, _P, ctypes.c_int]
    lib.llms_dequant.argtypes = [_P, ctypes.c_int, ctypes.c_int, _P, ctypes.c_int]
    lib.llms_residual.argtypes = [_P, ctypes.c_int, ctypes.c_int, _P, _P, _P, ctypes.c_int]
    lib.llms_attention_in.argtypes = [_P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _P, ctypes.c_float] \
        + [ctypes.c_int] * 4 + [_P] * 5 + [ctypes.c_int]
    lib.llms_ffn.argtypes = [_P, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int, _P, _P, ctypes.c_float, _P,
                             ctypes.c_int]
    return lib


def _none(why: str) -> None:
    print(f"CPU kernels: model/cpu_simd.c not built here ({why}); quantized matrices are held another way (model/"
          f"cpu_kernels.py hold)", file=sys.stderr)
    return None


def tiles(q: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, nibble: bool, sup: tuple | None = None) -> _Tiles:
    """The C view of a tiled matrix's planes, q (NT, G, gs / 2 or gs, 16) int32 (4-bit ``nibble``, or 8-bit), s and
    o (NT, G, 64) fp16 or float32 (o: None, 8-bit only), or a K-quant's 6-bit scales and minimums (uint8; q6_k's
    scales int8) with ``sup`` = (d, dm or None, ksub): its super-blocks' fp16 (NT, G / ksub, 64); all contiguous.
    They must stay alive while it is used (TiledWeight holds both)."""
    d, dm, ksub = sup if sup is not None else (None, None, 0)
    if not all(t is None or t.is_contiguous() for t in (q, s, o, d, dm)):
        raise ValueError("tile planes must be contiguous")
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    return _Tiles(q.data_ptr(), s.data_ptr(), ptr(o), ptr(d), ptr(dm), _TYPES[s.dtype],
                  0 if o is None else _TYPES[o.dtype], q.shape[0], q.shape[1], q.shape[2] * (2 if nibble else 1),
                  int(nibble), ksub)


# model/cpu_simd.c's BLOCKS: the formats it reads in place, in the image's bytes (model/quant.py)
BLOCKS = {"q8_0": 1, "q4_k": 2, "q6_k": 3, "int8": 4, "int4": 5, "q4_0": 6, "q4_1": 7}
_BLOCK_VALUES = {"q8_0": 32, "q4_k": 256, "q6_k": 256, "q4_0": 32, "q4_1": 32}  # GGUF: values a block


def blocks(raw: torch.Tensor, scheme: str, shape: tuple[int, int], group: int | None) -> _Tiles:
    """The C view of a matrix of ``BLOCKS`` read where it lies: ``raw`` its stored bytes (model/quant.py's layout),
    which must stay alive while the view is used."""
    n, k = shape
    gs = _BLOCK_VALUES.get(scheme, group)
    base = raw.data_ptr()
    s = o = None
    if scheme in ("int8", "int4"):  # q, then the scales (then the minimums): sections of the rows
        qb = n * (k if scheme == "int8" else k // 2)
        s = base + qb
        o = s + n * (k // group) * 2 if scheme == "int4" else None
    return _Tiles(base, s, o, None, None, 0, 0, -(-n // 64), k // gs, gs, 0, 0, BLOCKS[scheme], n)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t as the C code reads it: float32, contiguous (itself where it is)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def mv(lib: ctypes.CDLL, w: _Tiles, x: torch.Tensor) -> torch.Tensor:
    """x (m <= 4, K) float32 -> (m, nt * 64)."""
    x = _f32(x)
    y = torch.empty(x.shape[0], w.nt * 64)
    lib.llms_mv(ctypes.byref(w), x.shape[0], _ptr(x), _ptr(y), w.nt * 64, torch.get_num_threads())
    return y


def matrices(ws: list[_Tiles]) -> ctypes.Array:
    """An array of pointers to ``ws`` (``attention_in``'s first argument; it keeps them alive)."""
    arr = (ctypes.POINTER(_Tiles) * len(ws))(*(ctypes.pointer(w) for w in ws))
    arr.keep = ws
    return arr


def attention_in(lib, ws: ctypes.Array, h: torch.Tensor, norm: torch.Tensor, eps: float, heads: tuple[int, int],
                 hd: int, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h (m, dim) -> q (m, 1, heads[0], hd), k and v (m, 1, heads[1], hd): RMSNorm(h) times the matrices ``ws``
    (``matrices``: one fused q|k|v, or q, k and v), q and k rotated."""
    h, norm, cos, sin = _f32(h), _f32(norm), _f32(cos), _f32(sin)
    m = h.shape[0]
    q, k, v = torch.empty(m, 1, heads[0], hd), torch.empty(m, 1, heads[1], hd), torch.empty(m, 1, heads[1], hd)
    lib.llms_attention_in(ws, len(ws), m, h.shape[1], _ptr(h), _ptr(norm), eps, heads[0] * hd, heads[1] * hd,
                          heads[1] * hd, hd, _ptr(cos), _ptr(sin), _ptr(q), _ptr(k), _ptr(v), torch.get_num_threads())
    return q, k, v


def residual(lib, w: _Tiles, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """h (m, n) + the matrix times a (m, K)."""
    h, a = _f32(h), _f32(a)
    out = torch.empty_like(h)
    lib.llms_residual(ctypes.byref(w), h.shape[0], h.shape[1], _ptr(h), _ptr(a), _ptr(out), torch.get_num_threads())
    return out


def ffn(lib, w13: _Tiles, w3: _Tiles | None, w2: _Tiles, h: torch.Tensor, norm: torch.Tensor, eps: float,
        hidden: int) -> torch.Tensor:
    """h (m, dim) -> h + W2(silu(W1 x) * W3 x), x = RMSNorm(h): W1|W3 one matrix ``w13`` (``w3`` None) or two."""
    h, norm = _f32(h), _f32(norm)
    out = torch.empty_like(h)
    lib.llms_ffn(ctypes.byref(w13), None if w3 is None else ctypes.byref(w3), ctypes.byref(w2), h.shape[0],
                 h.shape[1], hidden, _ptr(h), _ptr(norm), eps, _ptr(out), torch.get_num_threads())
    return out


def dequant(lib, w: _Tiles, a: int, b: int, out: torch.Tensor) -> torch.Tensor:
    """Tiles [a, b) dequantized into out (b - a, K, 64) float32 contiguous: the reference dequantizer's values."""
    lib.llms_dequant(ctypes.byref(w), a, b, _ptr(out), torch.get_num_threads())
    return out


def decode_attention(lib, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor,
                     slot: int) -> torch.Tensor:
    """A decode step's attention: q (b, 1, H, hd), k and v (b, 1, n_kv, hd), float32, each row's features
    contiguous; k and v written to ``slot`` of the cache's ck, cv (>= b, L, n_kv, hd) float32 contiguous, then
    every slot up to it seen -> (b, 1, H * hd)."""
    b, _, heads, hd = q.shape
    q, k, v = (t if t.stride(3) == 1 and t.stride(2) == hd else t.contiguous() for t in (q, k, v))
    out = torch.empty(b, 1, heads * hd)
    lib.llms_decode_attention(b, heads, k.shape[2], hd, _ptr(q), q.stride(0), _ptr(k), k.stride(0), _ptr(v),
                              v.stride(0), _ptr(ck), _ptr(cv), ck.stride(0), slot + 1, _ptr(out),
                              torch.get_num_threads())
    return out
