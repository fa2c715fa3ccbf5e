"""Quantized weight formats: storage sizes and checks, dequantization with plain torch ops (CPU and CUDA, or
the Triton kernels of model/quant_triton.py on CUDA when triton is importable), and our own int8/int4
quantizers.

Schemes (lowercase names):

- GGUF block formats, kept byte for byte as llama.cpp stores them: ``q8_0 q4_0 q4_1 q5_0 q5_1`` (blocks of 32
  values) and ``q4_k q5_k q6_k`` (super-blocks of 256). A matrix of logical shape (rows, cols) is
  rows x (cols / block) blocks, each row's blocks contiguous (a GGUF tensor of ggml shape [cols, rows]).
  Dequantization equals ``gguf.quants.dequantize`` bit for bit in float32: every step below mirrors the
  reference's order of operations (fp16 fields go to float32 first, Q4_1 is ``d * q + m`` in two roundings,
  Q4_K ``(d * sc) * q - dmin * m``).
- ``int8``: symmetric per group of ``group`` values along a row, w ~= q * scale, q in [-127, 127]. Storage: q
  int8 [rows, cols], then the scales fp16 [rows, cols / group].
- ``int4``: asymmetric per group, w ~= q * scale + minimum, q in 0..15. Storage: q packed two per byte
  [rows, cols / 2] (the even column in the low nibble), then scale fp16 [rows, cols / group], then minimum
  fp16 [rows, cols / group]. Dequantized as ``q.float() * scale.float() + minimum.float()`` (two roundings).

Groups are 32, 64 or 128 values. Another output dtype (bf16, fp16) is the float32 result cast to it.

Our quantizers search each group's scale (int8: a clipped absmax; int4: a grid of clipped [min, max] ranges,
then least-squares refits of scale and minimum) for the smallest squared error as dequantization computes it,
with the fp16-rounded parameters; a group that already lies on a 16-level (int4) or 255-level (int8) grid
of fp16 parameters comes back exactly. They work on chunks of rows, so a large matrix needs little memory.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from model.errors import ConfigError
from model.qformats import (  # noqa: F401  (re-exported: the sizes and checks are model/qformats.py's)
    DEQUANT_CHUNK,
    GGML_BLOCKS,
    GGUF_SCHEMES,
    GROUP_SIZES,
    OURS,
    SCHEMES,
    block_size,
    check_quantizable,
    row_layout,
    storage_bytes,
)

_CHUNK = 1 << 20  # elements per chunk of rows in the torch paths (temporaries stay a few MB)
_INT8_ALPHAS = (1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9)  # absmax clipping factors tried
_INT4_SHRINK = (0.0, 0.03, 0.07)  # fractions of the range cut off each end, every pair tried
_INT4_REFITS = 3  # least-squares refits of (scale, minimum) after the grid
_FP16_MAX = 65504.0
_TORCH_TYPES = {"u8": torch.uint8, "i8": torch.int8, "f16": torch.float16}


def _row_layout(scheme: str, cols: int, group: int | None) -> list[tuple[int, torch.dtype]]:
    """Each storage section as (elements per row, torch dtype) (model.qformats.row_layout)."""
    return [(n, _TORCH_TYPES[t]) for n, t in row_layout(scheme, cols, group)]


def _parts(raw: torch.Tensor, scheme: str, shape: tuple[int, int], group: int | None) -> list[torch.Tensor]:
    """The storage sections of ``raw`` as (rows, n) tensors of their dtypes (views, where aligned)."""
    check_quantizable(scheme, "raw", shape, group)
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != storage_bytes(scheme, shape, group):
        raise ConfigError(f"raw bytes of a {scheme} matrix of shape {tuple(shape)}: expected a 1-D uint8 tensor of "
                          f"{storage_bytes(scheme, shape, group)} bytes, found {raw.dtype} of shape "
                          f"{tuple(raw.shape)}")
    rows, parts, off = shape[0], [], 0
    for n, dt in _row_layout(scheme, shape[1], group):
        size = rows * n * dt.itemsize
        sec = raw[off:off + size]
        if (sec.storage_offset() * raw.element_size()) % dt.itemsize or not sec.is_contiguous():
            sec = sec.clone()  # an odd offset cannot be viewed as fp16
        parts.append(sec.view(dt).view(rows, n))
        off += size
    return parts


# ---- dequantization with torch ops ---------------------------------------------------------------------

def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """The fp16 field at byte ``off`` of each block, as float32 (N, 1)."""
    return b[:, off:off + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, 16) bytes -> (N, 32): the low nibbles, then the high ones (ggml's order within a 32-block)."""
    return torch.cat([qs & 15, qs >> 4], dim=1)


def _bits(qh: torch.Tensor, k: int, width: int) -> torch.Tensor:
    """(N, n) bytes -> (N, n, k): fields of ``width`` bits, lowest first."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=qh.device)[:k]
    return (qh.unsqueeze(-1) >> shifts) & ((1 << width) - 1)


def _q5_high(b: torch.Tensor, off: int) -> torch.Tensor:
    """Q5's fifth bits: the little-endian uint32 at ``off``, bit i for value i, as (N, 32) values 0 or 16."""
    return _bits(b[:, off:off + 4], 8, 1).reshape(-1, 32) << 4


def _deq_q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].view(torch.int8).float() * _f16(b, 0)


def _deq_q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _deq_q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _deq_q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * ((_nibbles(b[:, 6:]) | _q5_high(b, 2)).to(torch.int8) - 16).float()


def _deq_q5_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_nibbles(b[:, 8:]) | _q5_high(b, 4)).float() + _f16(b, 2)


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the 6-bit scales and minimums of the 8 sub-blocks, (N, 8) each, as ggml packs them."""
    s = b[:, 4:16]
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 2) & 48)], dim=1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 2) & 48)], dim=1)
    return sc, mn


def _k_apply(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(d * sc) * q - (dmin * m) per 32-value sub-block; q (N, 8, 32) float32."""
    sc, mn = _k_scales(b)
    d = (_f16(b, 0) * sc.float()).unsqueeze(-1)
    dm = (_f16(b, 2) * mn.float()).unsqueeze(-1)
    return (d * q - dm).reshape(-1, 256)


def _k_low(qs: torch.Tensor) -> torch.Tensor:
    """(N, 128) bytes -> (N, 8, 32): sub-block 2c holds chunk c's low nibbles, 2c+1 its high ones."""
    return _bits(qs.reshape(-1, 4, 32), 2, 4).permute(0, 1, 3, 2).reshape(-1, 8, 32)


def _deq_q4_k(b: torch.Tensor) -> torch.Tensor:
    return _k_apply(b, _k_low(b[:, 16:144]).float())


def _deq_q5_k(b: torch.Tensor) -> torch.Tensor:
    high = _bits(b[:, 16:48], 8, 1).permute(0, 2, 1) << 4  # sub-block j takes bit j of each of the 32 bytes
    return _k_apply(b, (_k_low(b[:, 48:176]) | high).float())


def _deq_q6_k(b: torch.Tensor) -> torch.Tensor:
    low = _bits(b[:, :128].reshape(-1, 2, 64), 2, 4).permute(0, 1, 3, 2).reshape(-1, 8, 32)
    high = _bits(b[:, 128:192].reshape(-1, 2, 32), 4, 2).permute(0, 1, 3, 2).reshape(-1, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).float().reshape(-1, 16, 16)
    d = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).unsqueeze(-1)
    return (d * q).reshape(-1, 256)


_GGUF_DEQ = {"q8_0": _deq_q8_0, "q4_0": _deq_q4_0, "q4_1": _deq_q4_1, "q5_0": _deq_q5_0, "q5_1": _deq_q5_1,
             "q4_k": _deq_q4_k, "q5_k": _deq_q5_k, "q6_k": _deq_q6_k}


def _unpack4(q: torch.Tensor) -> torch.Tensor:
    """(r, n) packed bytes -> (r, 2n) values 0..15, the low nibble first."""
    return torch.stack([q & 15, q >> 4], dim=-1).reshape(q.shape[0], -1)


def _deq_torch(parts: list[torch.Tensor], scheme: str, cols: int, group: int | None) -> torch.Tensor:
    """float32 (r, cols) from the row sections of ``r`` rows."""
    r = parts[0].shape[0]
    if scheme in GGUF_SCHEMES:
        ts = GGML_BLOCKS[scheme][1]
        return _GGUF_DEQ[scheme](parts[0].reshape(-1, ts)).reshape(r, cols)
    q = (parts[0] if scheme == "int8" else _unpack4(parts[0])).float().view(r, cols // group, group)
    y = q * parts[1].float().unsqueeze(-1)
    if scheme == "int4":
        y = y + parts[2].float().unsqueeze(-1)
    return y.view(r, cols)


def _into_torch(parts: list[torch.Tensor], scheme: str, group: int | None, dst: torch.Tensor) -> None:
    step = max(1, _CHUNK // dst.shape[1])
    for a in range(0, dst.shape[0], step):
        dst[a:a + step].copy_(_deq_torch([p[a:a + step] for p in parts], scheme, dst.shape[1], group))


_TRITON: dict = {}  # module name -> the module, or None without triton (looked up once)


def triton_module(name: str = "quant_triton"):
    """model.<name>, or None without triton (imported on first use on CUDA only): quant_triton, the dequantizers
    and our int8/int4 fused matmul; quant_gemv, the GGUF formats' fused matmul; triton_ops, a layer's small steps
    (model/transformer.py)."""
    if name not in _TRITON:
        try:
            _TRITON[name] = importlib.import_module(f"model.{name}")
        except ImportError:
            _TRITON[name] = None
    return _TRITON[name]


def _into(parts: list[torch.Tensor], scheme: str, group: int | None, dst: torch.Tensor) -> None:
    """Dequantize into ``dst`` (rows, cols): the Triton kernels on CUDA where triton imports, else torch ops."""
    kernels = triton_module() if dst.is_cuda else None
    if kernels is None:
        _into_torch(parts, scheme, group, dst)
    else:
        kernels.dequantize_into(scheme, [p.contiguous() for p in parts], group, dst)


def _output(out: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    n = shape[0] * shape[1]
    if out.dtype != dtype or out.device != device or not out.is_contiguous() or out.numel() < n:
        raise ConfigError(f"output buffer for shape {tuple(shape)}: expected a contiguous {dtype} tensor of at "
                          f"least {n} elements on {device}, found {out.dtype} of shape {tuple(out.shape)} on "
                          f"{out.device}")
    return out.view(-1)[:n].view(shape)


def dequantize(raw: torch.Tensor, scheme: str, shape: tuple[int, int], group: int | None = None,
               dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """``raw`` (1-D uint8 of storage_bytes(), CPU or CUDA) -> (rows, cols) of ``dtype`` on raw's device, written
    into ``out`` (at least rows * cols elements of ``dtype``) when given."""
    parts = _parts(raw, scheme, tuple(shape), group)
    dst = _output(out, tuple(shape), dtype, raw.device)
    _into(parts, scheme, group, dst)
    return dst


def dequantize_rows(raw: torch.Tensor, scheme: str, shape: tuple[int, int], group: int | None,
                    rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Only the rows ``rows`` (a LongTensor of row indices) -> (len(rows), cols): the embedding lookup."""
    parts = _parts(raw, scheme, tuple(shape), group)
    idx = rows.reshape(-1).to(device=raw.device, dtype=torch.long)
    dst = torch.empty((idx.numel(), shape[1]), dtype=dtype, device=raw.device)
    if idx.numel():
        _into([p.index_select(0, idx) for p in parts], scheme, group, dst)
    return dst


# ---- our quantizers ------------------------------------------------------------------------------------

def _fp16(x: torch.Tensor) -> torch.Tensor:
    """What storing as fp16 and loading back gives (clamped to the finite range)."""
    return x.clamp(-_FP16_MAX, _FP16_MAX).half().float()


def _round_q(x: torch.Tensor, scale: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """round(x / scale) clamped to [lo, hi]; 0 where the scale is 0."""
    q = torch.where(scale > 0, x / scale, 0.0)
    return q.round_().clamp_(lo, hi)


class _Best:
    """The smallest squared error per group so far and the parameters that gave it."""

    def __init__(self, x: torch.Tensor, *params: torch.Tensor) -> None:
        self.x, self.err, self.params = x, torch.full_like(params[0], math.inf), list(params)

    def offer(self, y: torch.Tensor, *params: torch.Tensor) -> None:
        err = (y - self.x).square_().sum(-1, keepdim=True)
        better = err < self.err
        self.err = torch.where(better, err, self.err)
        self.params = [torch.where(better, p, old) for p, old in zip(params, self.params)]


def _int8_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (r, ng, g) float32 -> q int8 (r, ng, g), scale fp16 (r, ng, 1)."""
    amax = x.abs().amax(-1, keepdim=True)
    best = _Best(x, torch.zeros_like(amax))
    for alpha in _INT8_ALPHAS:
        s = _fp16(amax * alpha / 127)
        best.offer(_round_q(x, s, -127, 127) * s, s)
    s = best.params[0]
    return _round_q(x, s, -127, 127).to(torch.int8), s.half()


def _int4_try(best: _Best, scale: torch.Tensor, minimum: torch.Tensor) -> None:
    s, m = _fp16(scale), _fp16(minimum)
    q = _round_q(best.x - m, s, 0, 15)
    best.offer(q * s + m, s, m)


def _int4_refit(best: _Best) -> None:
    """Least-squares (scale, minimum) for the levels the best parameters choose, offered in turn."""
    x, (s, m) = best.x, best.params
    q = _round_q(x - m, s, 0, 15)
    n = x.shape[-1]
    sq, sx = q.sum(-1, keepdim=True), x.sum(-1, keepdim=True)
    den = n * q.square().sum(-1, keepdim=True) - sq * sq
    fit = torch.where(den > 0, (n * (q * x).sum(-1, keepdim=True) - sq * sx) / den.clamp(min=1e-30), s)
    _int4_try(best, fit, torch.where(den > 0, (sx - fit * sq) / n, m))


def _int4_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (r, ng, g) float32 -> q uint8 0..15 (r, ng, g), scale and minimum fp16 (r, ng, 1)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    span = hi - lo
    best = _Best(x, torch.zeros_like(lo), lo)
    for a in _INT4_SHRINK:
        for b in _INT4_SHRINK:
            _int4_try(best, (span * (1 - a - b)) / 15, lo + span * a)
    for _ in range(_INT4_REFITS):
        _int4_refit(best)
    s, m = best.params
    return _round_q(x - m, s, 0, 15).to(torch.uint8), s.half(), m.half()


def _quantize_int(w: torch.Tensor, scheme: str, group: int) -> torch.Tensor:
    rows, cols = w.shape
    raw = torch.empty(storage_bytes(scheme, (rows, cols), group), dtype=torch.uint8, device=w.device)
    parts = _parts(raw, scheme, (rows, cols), group)  # views: each chunk is written in place
    step = max(1, _CHUNK // cols)
    for a in range(0, rows, step):
        x = w[a:a + step].float().reshape(-1, cols // group, group)
        if scheme == "int8":
            got = _int8_groups(x)
        else:
            q, s, m = _int4_groups(x)
            q = q.view(x.shape[0], cols // 2, 2)
            got = (q[..., 0] | (q[..., 1] << 4), s, m)
        for p, g in zip(parts, got):
            p[a:a + step] = g.reshape(p[a:a + step].shape)
    return raw


def quantize(w: torch.Tensor, scheme: str, group: int | None = None) -> torch.Tensor:
    """``w`` (rows, cols) float -> the 1-D uint8 storage of ``scheme`` (storage_bytes() long), on w's device.
    int8/int4 are ours; the ggml types are gguf.quants.quantize (which has no quantizer for the K-quants)."""
    check_quantizable(scheme, "w", tuple(w.shape), group)
    if not w.is_floating_point():
        raise ConfigError(f"w of shape {tuple(w.shape)}: quantize takes a float tensor, found {w.dtype}")
    if scheme in OURS:
        return _quantize_int(w, scheme, group)
    from gguf import quants as gguf_quants  # only gguf's own quantizers need the package

    try:
        blocks = gguf_quants.quantize(w.detach().float().cpu().numpy(),
                                      gguf_quants.GGMLQuantizationType(GGUF_SCHEMES[scheme]))
    except NotImplementedError as e:
        raise ConfigError(f"w of shape {tuple(w.shape)}: the gguf package cannot quantize to {scheme} "
                          f"(it only dequantizes it); use one of q8_0, q4_0, q4_1, q5_0, q5_1, int8, int4") from e
    return torch.from_numpy(np.ascontiguousarray(blocks)).reshape(-1).to(w.device)


@dataclasses.dataclass
class QuantWeight:
    """A quantized matrix: its raw bytes (a view into a buffer the caller owns), scheme, logical shape, group."""

    raw: torch.Tensor
    scheme: str
    shape: tuple[int, int]
    group: int | None = None

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        parts = _parts(self.raw, self.scheme, self.shape, self.group)  # checks the scheme, shape, group and size
        # Views of raw are kept (a decode step calls linear 7 times a layer: the Python of slicing them again
        # showed in an 8B step); a copied section (an odd offset) would go stale when raw's buffer is refilled.
        lo, hi = self.raw.data_ptr(), self.raw.data_ptr() + self.raw.numel()
        self._views = parts if all(lo <= p.data_ptr() < hi for p in parts) else None

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def nbytes(self) -> int:
        return storage_bytes(self.scheme, self.shape, self.group)

    def dense(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        return dequantize(self.raw, self.scheme, self.shape, self.group, dtype, out)

    def rows(self, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The embedding lookup: idx (any shape) -> idx.shape + (cols,)."""
        out = dequantize_rows(self.raw, self.scheme, self.shape, self.group, idx, dtype)
        return out.view(*idx.shape, self.shape[1])

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, w)``. On CUDA, with at most FUSED_MAX_ROWS rows of x (a decode step): a fused kernel that
        reads the quantized bytes once (``_fused``). Otherwise the matrix is dequantized to x's dtype where it is (the
        compute stream on CUDA), at most DEQUANT_CHUNK values (whole rows) at a time, so the scratch is bounded
        whatever the matrix."""
        rows, cols = self.shape
        parts = self._views or _parts(self.raw, self.scheme, self.shape, self.group)
        flat = x.reshape(-1, cols)
        out = self._fused(flat, parts) if self.raw.is_cuda else None
        if out is not None:  # a decode step: the bytes read once
            return out.view(*x.shape[:-1], rows)
        step = max(1, DEQUANT_CHUNK // cols)
        if rows <= step:
            return F.linear(x, self.dense(x.dtype))
        outs = []
        for a in range(0, rows, step):
            w = torch.empty((min(step, rows - a), cols), dtype=x.dtype, device=self.raw.device)
            _into([p[a:a + step] for p in parts], self.scheme, self.group, w)
            outs.append(F.linear(x, w))
        return torch.cat(outs, dim=-1)

    def _fused(self, flat: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor | None:
        """flat (m, cols) @ w.T by a fused kernel, or None where none applies (no triton, more than FUSED_MAX_ROWS
        rows; for the GGUF formats, x neither float32, bf16 nor fp16, or bytes not aligned as model/quant_gemv.py
        reads them: an image aligns every tensor).
        int8/int4: model/quant_triton.py int_matmul; the GGUF formats: model/quant_gemv.py gguf_matmul."""
        kernels = triton_module()
        if kernels is None or flat.shape[0] > kernels.FUSED_MAX_ROWS:
            return None
        if self.scheme in OURS:
            return kernels.int_matmul(flat.contiguous(), self.scheme, [p.contiguous() for p in parts], self.group,
                                      *self.shape)
        gemv = triton_module("quant_gemv")
        if gemv is None or not gemv.usable(self.raw, self.scheme, flat.dtype):
            return None
        return gemv.gguf_matmul(flat, self.scheme, self.raw, *self.shape)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> QuantWeight:
        return QuantWeight(self.raw.to(device, non_blocking=non_blocking), self.scheme, self.shape, self.group)


# byte offsets of the fp16 fields (scales, minima) in each ggml block
FP16_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q4_k": (0, 2),
               "q5_k": (0, 2), "q6_k": (208,)}


def random_quantized(scheme: str, shape: tuple[int, int], group: int | None, gen: torch.Generator,
                     device: torch.device | str = "cpu", scale: float = 1e-3) -> QuantWeight:
    """Random quantized values with every fp16 scale ``scale`` (int4's minima -8 * scale), built on ``device``
    without quantizing anything: weights of a realistic magnitude for timing (runtime/measure/probe.py)."""
    raw = torch.randint(0, 256, (storage_bytes(scheme, shape, group),), generator=gen, dtype=torch.uint8,
                        device=device)
    if scheme in GGML_BLOCKS:
        blocks = raw.view(-1, GGML_BLOCKS[scheme][1])
        for off in FP16_FIELDS[scheme]:
            blocks[:, off:off + 2].view(torch.float16).fill_(scale)
    else:
        parts = _parts(raw, scheme, shape, group)
        parts[1].fill_(scale)
        if scheme == "int4":
            parts[2].fill_(-8 * scale)
    return QuantWeight(raw, scheme, shape, group)


def warm_up(scheme: str, group: int | None, dtype: torch.dtype, device: torch.device | str) -> None:
    """Run the kernels a ``scheme`` matrix will use on ``device`` once, on a small random one, so that Triton compiles
    them now rather than in the first pass: the dequantizer, and on CUDA for the GGUF formats the fused matmul's
    launches of a decode step (model/quant_gemv.py warm_up)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    random_quantized(scheme, (8, 2 * block_size(scheme, group)), group, gen, device).dense(dtype)
    gemv = triton_module("quant_gemv") if device.type == "cuda" and scheme in GGUF_SCHEMES else None
    if gemv is not None and dtype in (torch.float32, torch.bfloat16, torch.float16):
        gemv.warm_up(scheme, dtype, device)


def dequantized(weights, dtype: torch.dtype) -> dict:
    """A group's weights with every QuantWeight replaced by its dense matrix in ``dtype`` (plain ones as they
    are): what a CPU computes from when it holds a group for the whole run (dequantizing it at every use would
    cost many times the matmul there)."""
    return {k: v.dense(dtype) if isinstance(v, QuantWeight) else v for k, v in weights.items()}
