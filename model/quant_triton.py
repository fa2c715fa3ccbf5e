"""Triton kernels that dequantize model/quant.py's formats on CUDA, straight from the raw bytes into the output
(no temporaries): one kernel for the ggml 32-value blocks (q8_0 q4_0 q4_1 q5_0 q5_1, the scheme a constexpr),
one for the K-quants (q4_k q5_k q6_k), one for our int8/int4.

Each computes in float32 with the reference's order of operations (model/quant.py) and casts to the output's
dtype on the store, so the float32 result equals gguf's dequantize bit for bit. The compiler would contract
a multiply followed by an add into an FMA (one rounding instead of two): every add or subtract that follows a
multiply goes through ``add.rn.f32`` / ``sub.rn.f32`` inline assembly, which PTX never fuses. Under Triton's
interpreter (TRITON_INTERPRET=1, CPU tensors, numpy) inline assembly is unavailable and plain ops already
round twice.

model/quant.py imports this module only on CUDA, so the project runs without triton.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

EXACT = os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "yes", "on", "y")
ELEMS = 4096  # output values per program
WARPS = 4

# scheme -> (block bytes, offset of the 4-bit values, offset of the 5th bits or 0)
_BLOCKS32 = {"q8_0": (34, 2, 0), "q4_0": (18, 2, 0), "q4_1": (20, 4, 0), "q5_0": (22, 6, 2), "q5_1": (24, 8, 4)}
# scheme -> (super-block bytes, offset of the 4-bit values, values per scale)
_KQUANTS = {"q4_k": (144, 16, 32), "q5_k": (176, 48, 32), "q6_k": (210, 0, 16)}


@triton.jit
def _add(a, b, EXACT: tl.constexpr):
    """a + b rounded once, never fused with the multiply that made a."""
    b = tl.broadcast_to(b, a.shape)
    if EXACT:
        r = tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        r = a + b
    return r


@triton.jit
def _sub(a, b, EXACT: tl.constexpr):
    """a - b rounded once, never fused with the multiplies that made a and b."""
    b = tl.broadcast_to(b, a.shape)
    if EXACT:
        r = tl.inline_asm_elementwise("sub.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        r = a - b
    return r


@triton.jit
def _f16(ptr, off, mask):
    """The little-endian fp16 at byte offsets ``off``, as float32."""
    lo = tl.load(ptr + off, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + off + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _store(ptr, y, mask, EXACT: tl.constexpr):
    """Store float32 ``y`` as the pointers' dtype, rounding to nearest even (the interpreter's own fp32 -> bf16
    cast truncates, so there it is done by hand)."""
    if ptr.dtype.element_ty == tl.bfloat16 and not EXACT:
        b = y.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        tl.store(ptr, b.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, y.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _blocks32_kernel(raw, out, n_blocks, SCHEME: tl.constexpr, TS: tl.constexpr, QOFF: tl.constexpr,
                     QHOFF: tl.constexpr, NB: tl.constexpr, EXACT: tl.constexpr):
    """NB blocks of 32 values a program: a tile of (block, value)."""
    pid = tl.program_id(0).to(tl.int64)
    src = raw + pid * (NB * TS)
    dst = out + pid * (NB * 32)
    blk = tl.arange(0, NB)[:, None]
    lane = tl.arange(0, 32)[None, :]
    ok = blk < n_blocks - pid * NB
    base = blk * TS
    d = _f16(src, base, ok)
    if SCHEME == "q8_0":
        x = tl.load(src + base + 2 + lane, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        y = x * d
    else:
        q = (tl.load(src + base + QOFF + lane % 16, mask=ok, other=0).to(tl.int32) >> (lane // 16 * 4)) & 15
        if QHOFF > 0:
            q = q | (((tl.load(src + base + QHOFF + lane // 8, mask=ok, other=0).to(tl.int32) >> (lane % 8)) & 1) << 4)
        if SCHEME == "q4_0":
            y = d * (q - 8).to(tl.float32)
        elif SCHEME == "q5_0":
            y = d * (q - 16).to(tl.float32)
        else:
            y = _add(d * q.to(tl.float32), _f16(src, base + 2, ok), EXACT)
    _store(dst + blk * 32 + lane, y, ok, EXACT)


@triton.jit
def _k6(src, base, j, lane, ok):
    """Q6_K: (d * scale) * (q - 32) for sub-block j (16 values) of each super-block at ``base``."""
    r = j * 16 + lane
    h = r // 128 * 64
    lo = (tl.load(src + base + h + r % 64, mask=ok, other=0).to(tl.int32) >> (r % 128 // 64 * 4)) & 15
    hi = (tl.load(src + base + 128 + h // 2 + r % 32, mask=ok, other=0).to(tl.int32) >> (r % 128 // 32 * 2)) & 3
    sc = tl.load(src + base + 192 + j, mask=ok, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return (_f16(src, base + 208, ok) * sc) * ((lo | (hi << 4)) - 32).to(tl.float32)


@triton.jit
def _k45(src, base, j, lane, ok, SCHEME: tl.constexpr, QOFF: tl.constexpr, EXACT: tl.constexpr):
    """Q4_K/Q5_K: (d * sc) * q - dmin * m for sub-block j (32 values) of each super-block at ``base``."""
    s = src + base + 4
    x = tl.load(s + j + 4, mask=ok, other=0).to(tl.int32)
    y = tl.load(s + j, mask=ok, other=0).to(tl.int32)
    z = tl.load(s + j % 4, mask=ok, other=0).to(tl.int32)
    sc = tl.where(j < 4, y & 63, (x & 15) | ((z >> 6) << 4)).to(tl.float32)
    mn = tl.where(j < 4, x & 63, (x >> 4) | ((y >> 6) << 4)).to(tl.float32)
    q = (tl.load(src + base + QOFF + j // 2 * 32 + lane, mask=ok, other=0).to(tl.int32) >> (j % 2 * 4)) & 15
    if SCHEME == "q5_k":
        q = q | (((tl.load(src + base + 16 + lane, mask=ok, other=0).to(tl.int32) >> j) & 1) << 4)
    return _sub((_f16(src, base, ok) * sc) * q.to(tl.float32), _f16(src, base + 2, ok) * mn, EXACT)


@triton.jit
def _kquant_kernel(raw, out, n_rows, SCHEME: tl.constexpr, TS: tl.constexpr, QOFF: tl.constexpr,
                   SUB: tl.constexpr, NS: tl.constexpr, EXACT: tl.constexpr):
    """NS sub-blocks of SUB values (whole super-blocks of 256) a program: a tile of (sub-block, value)."""
    pid = tl.program_id(0).to(tl.int64)
    src = raw + pid * (NS * SUB // 256 * TS)
    dst = out + pid * (NS * SUB)
    row = tl.arange(0, NS)[:, None]
    lane = tl.arange(0, SUB)[None, :]
    ok = row < n_rows - pid * NS
    base = row // (256 // SUB) * TS
    j = row % (256 // SUB)
    if SCHEME == "q6_k":
        y = _k6(src, base, j, lane, ok)
    else:
        y = _k45(src, base, j, lane, ok, SCHEME, QOFF, EXACT)
    _store(dst + row * SUB + lane, y, ok, EXACT)


@triton.jit
def _int_kernel(q, scale, minimum, out, n_groups, INT4: tl.constexpr, GROUP: tl.constexpr, NG: tl.constexpr,
                EXACT: tl.constexpr):
    """NG groups a program: int8 q * scale, or int4 q * scale + minimum (two values a byte, low nibble first)."""
    pid = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, NG)[:, None]
    lane = tl.arange(0, GROUP)[None, :]
    ok = g < n_groups - pid * NG
    s = tl.load(scale + pid * NG + g, mask=ok, other=0).to(tl.float32)
    if INT4:
        half = tl.arange(0, GROUP // 2)[None, :]
        byte = tl.load(q + pid * (NG * GROUP // 2) + g * (GROUP // 2) + half, mask=ok, other=0).to(tl.int32)
        v = tl.reshape(tl.join(byte & 15, byte >> 4), (NG, GROUP)).to(tl.float32)  # even column: low nibble
        y = _add(v * s, tl.load(minimum + pid * NG + g, mask=ok, other=0).to(tl.float32), EXACT)
    else:
        y = tl.load(q + pid * (NG * GROUP) + g * GROUP + lane, mask=ok, other=0).to(tl.float32) * s
    _store(out + pid * (NG * GROUP) + g * GROUP + lane, y, ok, EXACT)


def dequantize_into(scheme: str, parts: list[torch.Tensor], group: int | None, out: torch.Tensor) -> None:
    """Dequantize the contiguous storage sections ``parts`` (model/quant.py's layout) into the contiguous ``out``:
    for a ggml scheme the raw blocks; for int8 q (int8) and the scales; for int4 q (packed) and the scales and
    minimums (fp16)."""
    n = out.numel()
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        if scheme in _BLOCKS32:
            ts, qoff, qhoff = _BLOCKS32[scheme]
            nb = ELEMS // 32
            _blocks32_kernel[(triton.cdiv(n // 32, nb),)](parts[0], out, n // 32, SCHEME=scheme, TS=ts, QOFF=qoff,
                                                           QHOFF=qhoff, NB=nb, EXACT=EXACT, num_warps=WARPS)
        elif scheme in _KQUANTS:
            ts, qoff, sub = _KQUANTS[scheme]
            ns = ELEMS // sub
            _kquant_kernel[(triton.cdiv(n // sub, ns),)](parts[0], out, n // sub, SCHEME=scheme, TS=ts, QOFF=qoff,
                                                          SUB=sub, NS=ns, EXACT=EXACT, num_warps=WARPS)
        else:
            ng = ELEMS // group
            scale, minimum = parts[1], parts[-1]
            _int_kernel[(triton.cdiv(n // group, ng),)](parts[0], scale, minimum, out, n // group,
                                                         INT4=scheme == "int4", GROUP=group, NG=ng, EXACT=EXACT,
                                                         num_warps=WARPS)



# ---- fused dequantize + matmul, for a few rows of activations -------------------------------------------
# A decode step multiplies one token (or a few) by every matrix: dequantizing into scratch first writes and reads
# the bf16 matrix (4 bytes a value of memory traffic against int4's 0.56), so there the matmul reads the
# quantized bytes itself. Its accumulation order differs from dequantize-then-matmul (not bit for bit equal
# to it); every mode of a run uses the same path for the same shapes.

FUSED_MAX_ROWS = 64  # up to this many rows of x the fused kernel is used; beyond, dequantize then matmul


@triton.jit
def _int_matmul_kernel(x, q, scale, minimum, y, M, N, K, stride_xm, stride_ym, INT4: tl.constexpr,
                       GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       IEEE: tl.constexpr):
    """y[m, n] = sum_k x[m, k] * w[n, k], w = q * scale (+ minimum) dequantized a (BN, BK) tile at a time in
    float32, then cast to x's dtype for the dot (as dequantizing to x's dtype then multiplying would)."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    n_ok = (rn < N)[:, None]
    m_ok = (rm < M)[:, None]
    G: tl.constexpr = BK // GROUP
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        xt = tl.load(x + rm[:, None] * stride_xm + rk[None, :], mask=m_ok, other=0.0)
        rg = k0 // GROUP + tl.arange(0, G)
        s = tl.load(scale + rn[:, None] * (K // GROUP) + rg[None, :], mask=n_ok, other=0).to(tl.float32)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BN, G, GROUP)), (BN, BK))
        if INT4:
            rb = k0 // 2 + tl.arange(0, BK // 2)
            byte = tl.load(q + rn[:, None] * (K // 2) + rb[None, :], mask=n_ok, other=0).to(tl.int32)
            v = tl.reshape(tl.join(byte & 15, byte >> 4), (BN, BK)).to(tl.float32)
            mn = tl.load(minimum + rn[:, None] * (K // GROUP) + rg[None, :], mask=n_ok, other=0).to(tl.float32)
            w = v * s + tl.reshape(tl.broadcast_to(mn[:, :, None], (BN, G, GROUP)), (BN, BK))
        else:
            w = tl.load(q + rn[:, None] * K + rk[None, :], mask=n_ok, other=0).to(tl.float32) * s
        w = w.to(xt.dtype)
        if IEEE:
            acc += tl.dot(xt, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(w))
    tl.store(y + rm[:, None] * stride_ym + rn[None, :], acc.to(y.dtype.element_ty), mask=m_ok & (rn < N)[None, :])


def _k_tile(k: int, group: int) -> int:
    """The K tile: the largest of 256, 128, 64, 32 that divides the row and holds whole groups."""
    return next(bk for bk in (256, 128, 64, 32) if k % bk == 0 and bk % group == 0)


def int_matmul(x: torch.Tensor, scheme: str, parts: list[torch.Tensor], group: int, n: int, k: int,
               block_n: int | None = None, warps: int = 4) -> torch.Tensor:
    """x (M, K), a contiguous 2-D activation of M <= FUSED_MAX_ROWS rows, times the int8 / int4 matrix of ``parts``
    (N, K) transposed -> (M, N) in x's dtype."""
    m = x.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm = 16 if m <= 16 else (32 if m <= 32 else 64)
    bn = block_n or (64 if n >= 4096 else 32)
    bk = _k_tile(k, group)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _int_matmul_kernel[grid](x, parts[0], parts[1], parts[-1], y, m, n, k, x.stride(0), y.stride(0),
                                 INT4=scheme == "int4", GROUP=group, BM=bm, BN=bn, BK=bk,
                                 IEEE=x.dtype == torch.float32, num_warps=warps)
    return y
