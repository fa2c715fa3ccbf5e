"""Strided copies between host and device as one DMA each: ``cudaMemcpy2DAsync``.

PyTorch copies a non-contiguous slice across devices through contiguous temporaries, the host one pageable
and the copy synchronous (3 GB/s for a batch-32 KV cache's rows). A slice whose elements form rows of equal
length at a fixed pitch (``[:, :, a:b]`` of a contiguous (B, H, slots, d) tensor: B x H rows of (b-a) x d
elements) is one 2-D copy for the DMA engine. PyTorch does not expose it, so it is called from the CUDA
runtime library PyTorch itself loaded (found in this process's mappings, so the same copy of it).
"""

from __future__ import annotations

import ctypes
import math

import torch

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the pointers (unified addressing)
_lib: ctypes.CDLL | None = None


def _cudart() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        torch.cuda.init()
        names = []
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and "libcudart" in fields[5] and fields[5] not in names:
                    names.append(fields[5])
        names += ["libcudart.so", "libcudart.so.13", "libcudart.so.12"]
        for name in names:
            try:
                lib = ctypes.CDLL(name)
                fn = lib.cudaMemcpy2DAsync
            except (OSError, AttributeError):
                continue
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                           ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            _lib = lib
            break
        else:
            raise RuntimeError(f"no CUDA runtime library with cudaMemcpy2DAsync found (tried {names})")
    return _lib


def rows_of(t: torch.Tensor) -> tuple[int, int, int]:
    """(rows, row bytes, pitch bytes) of t seen as rows of equal length at one pitch: every dimension but the
    first contiguous after the leading ones, which must step evenly (shapes (..., n, d) sliced on n)."""
    shape, stride = list(t.shape), list(t.stride())
    # the contiguous tail: the innermost dimensions laid out densely
    inner, tail = 1, len(shape)
    while tail > 0 and (shape[tail - 1] == 1 or stride[tail - 1] == inner):
        inner *= shape[tail - 1]
        tail -= 1
    rows = math.prod(shape[:tail])
    if tail == 0:
        return 1, inner * t.element_size(), inner * t.element_size()
    pitch = stride[tail - 1]
    expect = pitch  # the leading dimensions must be one run of rows at that pitch
    for d in range(tail - 1, -1, -1):
        if shape[d] != 1 and stride[d] != expect:
            raise ValueError(f"tensor of shape {tuple(shape)} and strides {tuple(stride)} is not rows at one pitch")
        expect *= shape[d]
    return rows, inner * t.element_size(), pitch * t.element_size()


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, row bytes, dst pitch, src pitch) of one 2-D copy of src into dst (same shape, each rows at one
    pitch, ``rows_of``). A side laid out densely is one row of everything; it takes the other side's rows at
    their width (a packed sub-batch's device buffer against the host store's strided slots)."""
    rows, width, dpitch = rows_of(dst)
    srows, swidth, spitch = rows_of(src)
    if (rows, width) != (srows, swidth) and rows * width == srows * swidth:
        if srows == 1 and swidth % width == 0:
            srows, swidth, spitch = rows, width, width
        elif rows == 1 and width % swidth == 0:
            rows, width, dpitch = srows, swidth, swidth
    if (rows, width) != (srows, swidth):
        raise ValueError(f"copy_2d: rows differ ({srows} x {swidth} B into {rows} x {width} B)")
    return rows, width, dpitch, spitch


def copy_2d(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
    """dst.copy_(src) for same-shaped host/device tensors that are each rows at one pitch, as one
    cudaMemcpy2DAsync on ``stream`` (default: the current one). The host side must be pinned for the copy to
    be asynchronous. On the CPU (both tensors there) a plain copy."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"copy_2d: {tuple(src.shape)} {src.dtype} into {tuple(dst.shape)} {dst.dtype}")
    if dst.device.type != "cuda" and src.device.type != "cuda":
        dst.copy_(src)
        return
    if dst.numel() == 0:
        return
    rows, width, dpitch, spitch = copy_rows(dst, src)
    dev = dst.device if dst.device.type == "cuda" else src.device
    s = stream if stream is not None else torch.cuda.current_stream(dev)
    err = _cudart().cudaMemcpy2DAsync(ctypes.c_void_p(dst.data_ptr()), dpitch, ctypes.c_void_p(src.data_ptr()),
                                      spitch, width, rows, _MEMCPY_DEFAULT, ctypes.c_void_p(s.cuda_stream))
    if err:
        raise RuntimeError(f"cudaMemcpy2DAsync({rows} rows of {width} B, pitches {dpitch}/{spitch}) failed with "
                           f"CUDA error {err}")
