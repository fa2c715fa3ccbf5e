"""Fused dequantize-and-multiply Triton kernels for the GGUF block formats at decode sizes (q8_0 q4_0 q4_1 q5_0 q5_1
q4_k q5_k q6_k): y = x @ w.T for x of a few rows, reading each block of w once, straight from its bytes
(model/quant.py's layout: a row's blocks contiguous), instead of dequantizing w into bf16 scratch and reading it
back (a write and a read of 2 bytes a value against 0.56 to 1.06 bytes of blocks).

The values multiplied are gguf's dequantized values bit for bit in float32 (the reference's order of operations,
as in model/quant_triton.py), built without an int -> float conversion a value (those run on a narrower pipe than
the float units, and at HBM rates a 4-bit format needs some 25 values an SM a clock): a byte permute (``prmt``)
puts a quantized byte q under 2^23's exponent, which reads as the float 2^23 + q exactly; then

- ``D (q - z)`` (q8_0 q4_0 q5_0 q6_k: the scale times a centred integer) subtracts 2^23 + z (exact) and multiplies;
- ``fl(D q) + A`` (q4_1 q5_1: the minimum; q4_k q5_k: minus dmin times the sub-block's minimum) takes
  ``fma(D, 2^23 + q, -D 2^23)``, which is D q rounded once (D 2^23 is exact, a power of two times D), then adds A
  with ``add.rn`` (never fused).

A high nibble is taken as 16 q (the byte masked, not shifted) with D / 16 (exact, and no fp16 scale is small
enough to underflow): the same product, one operation less.

*Factored* products (FACTOR; launch_config's choice for Q4_K and Q6_K at one row): the values are not formed.
A byte permute with zero puts q alone in an int32, which read as float32 is the subnormal q 2^-149; one fma.rn
(never flushed to zero) multiplies it by 2^64 x and adds it to the sub-block's sum, exact but for the product's
rounding (x q 2^-85 is a normal float for |x q| >= 2^-41); the sub-block's sum is then scaled once, D 2^85 s +
A 2^-64 sum(2^64 x) (Q6_K: D (2^85 s - 32 2^-64 sum(2^64 x))). Two operations a value instead of four, at the
price of another order of rounding: a one-hot x still gives gguf's values exactly, and any x the products
within a float32 sum's rounding of the exact ones.

Work split: a program takes BN rows of w and walks the row in steps of NC *chunks*, a chunk being what one set of
scales covers (a 32-value block; a quarter of a 256-value super-block, 64 values). The NC chunks of a step lie
across the 32 lanes of a warp, the rows of w (and of x) in each thread's registers, so every load is a lane's own
4 to 16 contiguous bytes, a chunk's scales are decoded once a row, and a row's x values are loaded and converted
once for all BN rows of w. A chunk's quantized bytes are read as int32 pairs (8 bytes: 8 or 16 values); byte k of
each int32 gives a *plane* of values, multiplied by x at the matching positions (x is read in the same order, so
no value moves between threads). Formats whose blocks are only 2-byte aligned (q8_0 q4_0 q5_0 q6_k) are read as
16-bit halves.

Two ways to multiply: *FMA* (one row of x a program; x of one row, or float32 x of any number of rows): float32
products of the exact values, accumulated per lane and summed across the warp at the end; *DOT* (bf16 / fp16 x of 2
to 64 rows): the values rounded to x's dtype (as dequantizing to it would) and multiplied on the tensor cores, BM
rows of x at once. Where a matrix has too few rows to fill the GPU the row is split (split-K) and the partial sums
added in a fixed order by a second kernel, so results do not depend on timing. The launch parameters come from
the shape (``launch_config``), never from a search at run time.

Imported by model/quant.py on CUDA only (and by the tests, under Triton's interpreter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch
import triton
import triton.language as tl

from model.quant_triton import EXACT, _add

# scheme -> (block bytes, values a block, values a chunk, alignment the kernel needs of the blocks' bytes)
BLOCKS = {"q8_0": (34, 32, 32, 2), "q4_0": (18, 32, 32, 2), "q4_1": (20, 32, 32, 4), "q5_0": (22, 32, 32, 2),
          "q5_1": (24, 32, 32, 8), "q4_k": (144, 256, 64, 16), "q5_k": (176, 256, 64, 16),
          "q6_k": (210, 256, 64, 2)}
MAGIC = 0x4B000000  # the float32 2^23; passed at run time, so that ptxas keeps it in one register

LO4 = tl.constexpr(0x0F0F0F0F)  # the low nibble of each byte
HI4 = tl.constexpr(-0x0F0F0F10)  # 0xF0F0F0F0 as an int32: the high nibble of each byte
SIGN8 = tl.constexpr(-0x7F7F7F80)  # 0x80808080: the sign bit of each byte
BITS45 = tl.constexpr(0x30303030)  # bits 4 and 5 of each byte
# FACTOR's powers of two (exact float32 factors): x scaled up, the sums of x q 2^-149 and of 2^64 x scaled back
TWO64 = tl.constexpr(2.0 ** 64)
TWO85 = tl.constexpr(2.0 ** 85)
TWO81 = tl.constexpr(2.0 ** 81)
TWO_64 = tl.constexpr(2.0 ** -64)
M32TWO_64 = tl.constexpr(-32 * 2.0 ** -64)


# ---- values ---------------------------------------------------------------------------------------------

@triton.jit
def _byte(w, magic, K: tl.constexpr, EXACT: tl.constexpr):
    """2^23 + byte K of each int32 of w, as float32 (exact): one byte permute, 0x4B0000xx. With magic 0 the byte
    alone: the subnormal float32 q 2^-149 (FACTOR)."""
    if EXACT:
        m = tl.broadcast_to(magic, w.shape)
        if K == 0:
            r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7650;", "=r,r,r", [w, m], dtype=tl.int32,
                                          is_pure=True, pack=1)
        elif K == 1:
            r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7651;", "=r,r,r", [w, m], dtype=tl.int32,
                                          is_pure=True, pack=1)
        elif K == 2:
            r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7652;", "=r,r,r", [w, m], dtype=tl.int32,
                                          is_pure=True, pack=1)
        else:
            r = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7653;", "=r,r,r", [w, m], dtype=tl.int32,
                                          is_pure=True, pack=1)
    else:
        r = ((w >> (8 * K)) & 0xFF) | magic
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _value(g, D, A, ASYM: tl.constexpr, Z: tl.constexpr, EXACT: tl.constexpr):
    """From g = 2^23 + q: fl(D q) + A in two roundings (ASYM), else D (q - Z) in one."""
    if ASYM:
        r = _add(tl.fma(D, g, D * -8388608.0), A, EXACT)  # D g - D 2^23 = D q exactly, rounded once
    else:
        r = (g - (8388608.0 + Z)) * D  # q - Z exactly, then one rounding
    return r


@triton.jit
def _planes(q, D, A, magic, ASYM: tl.constexpr, Z: tl.constexpr, EXACT: tl.constexpr):
    """The values of the bytes of q (rows, chunks, 2 int32) as four float32 planes: plane k from byte k."""
    w0 = _value(_byte(q, magic, 0, EXACT), D, A, ASYM, Z, EXACT)
    w1 = _value(_byte(q, magic, 1, EXACT), D, A, ASYM, Z, EXACT)
    w2 = _value(_byte(q, magic, 2, EXACT), D, A, ASYM, Z, EXACT)
    w3 = _value(_byte(q, magic, 3, EXACT), D, A, ASYM, Z, EXACT)
    return w0, w1, w2, w3


# ---- x and the products ---------------------------------------------------------------------------------

@triton.jit
def _split4(t):
    """(chunks, 4) -> four (chunks,): column k to the k-th."""
    u, v = tl.split(tl.reshape(t, (t.shape[0], 2, 2)))
    u0, u1 = tl.split(u)
    v0, v1 = tl.split(v)
    return u0, v0, u1, v1


@triton.jit
def _xplanes(xp, XBF16: tl.constexpr):
    """x at xp + 0..7 (xp: (chunks,) pointers) as four (chunks, 2) float32 planes: plane k holds positions 4 e + k,
    e = 0, 1. bf16 is read as int32 pairs and widened by a shift or a mask."""
    if XBF16:
        w = tl.load(xp.to(tl.pointer_type(tl.int32), bitcast=True)[:, None] + tl.arange(0, 4)[None, :])
        lo, hi = tl.split(tl.reshape(w, (w.shape[0], 2, 2)))  # positions 4 e + (0, 1), 4 e + (2, 3)
        r = ((lo << 16).to(tl.float32, bitcast=True), (lo & -65536).to(tl.float32, bitcast=True),
             (hi << 16).to(tl.float32, bitcast=True), (hi & -65536).to(tl.float32, bitcast=True))
    else:
        a0, a1, a2, a3 = _split4(tl.load(xp[:, None] + tl.arange(0, 4)[None, :]).to(tl.float32))
        b0, b1, b2, b3 = _split4(tl.load(xp[:, None] + 4 + tl.arange(0, 4)[None, :]).to(tl.float32))
        r = tl.join(a0, b0), tl.join(a1, b1), tl.join(a2, b2), tl.join(a3, b3)
    return r


@triton.jit
def _use(acc, w0, w1, w2, w3, xp, DOT: tl.constexpr, XBF16: tl.constexpr, IEEE: tl.constexpr):
    """acc + the products of the planes (rows, chunks, 2) with x at xp + 4 e + k. FMA: one row of x, xp (chunks,)
    pointers, acc (rows, chunks, 2) float32 products. DOT: xp (x rows, chunks), acc (x rows, rows), the planes
    rounded to x's dtype."""
    if DOT:
        xt = tl.load(xp[:, :, None] + tl.arange(0, 8)[None, None, :])
        w = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # (rows, chunks, e, k // 2, k % 2): position 4 e + k
        w = tl.trans(tl.reshape(w, (w.shape[0], w.shape[1] * 8)).to(xt.dtype))
        xt = tl.reshape(xt, (xt.shape[0], xt.shape[1] * 8))
        if IEEE:
            acc = tl.dot(xt, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, w, acc)
    else:
        x0, x1, x2, x3 = _xplanes(xp, XBF16)
        acc = acc + w0 * x0[None]
        acc = acc + w1 * x1[None]
        acc = acc + w2 * x2[None]
        acc = acc + w3 * x3[None]
    return acc


@triton.jit
def _fma(a, b, c, EXACT: tl.constexpr):
    """a b + c in one rounding, a subnormal a kept as it is (never flushed to zero)."""
    if EXACT:
        r = tl.inline_asm_elementwise("fma.rn.f32 $0, $1, $2, $3;", "=f,f,f,f",
                                      [a, tl.broadcast_to(b, a.shape), tl.broadcast_to(c, a.shape)],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        r = a * b + c
    return r


@triton.jit
def _sums(s, xs, q, xp, XBF16: tl.constexpr, EXACT: tl.constexpr):
    """FACTOR: s + the products of the bytes q (rows, chunks, 2 int32) with 2^64 x at xp + 4 e + k (byte k of word
    e), each byte taken as the subnormal q 2^-149 (one byte permute a value, no conversion, no scale): the products
    are x q 2^-85, exact but for their rounding; and xs + those 2^64 x (chunks, 2), for the offsets and minimums."""
    x0, x1, x2, x3 = _xplanes(xp, XBF16)
    x0 = x0 * TWO64  # 2^64: exact
    x1 = x1 * TWO64
    x2 = x2 * TWO64
    x3 = x3 * TWO64
    zero = tl.zeros(q.shape, tl.int32)
    s = _fma(_byte(q, zero, 0, EXACT), x0[None], s, EXACT)
    s = _fma(_byte(q, zero, 1, EXACT), x1[None], s, EXACT)
    s = _fma(_byte(q, zero, 2, EXACT), x2[None], s, EXACT)
    s = _fma(_byte(q, zero, 3, EXACT), x3[None], s, EXACT)
    return s, xs + ((x0 + x1) + (x2 + x3))


# ---- the formats ----------------------------------------------------------------------------------------

@triton.jit
def _half(p):
    """The fp16 at u8 pointers p (2-aligned), as float32."""
    return tl.load(p.to(tl.pointer_type(tl.float16), bitcast=True)).to(tl.float32)


@triton.jit
def _word(p, ALIGN: tl.constexpr):
    """The little-endian int32 at u8 pointers p, aligned to ALIGN (2 or 4) bytes."""
    if ALIGN >= 4:
        r = tl.load(p.to(tl.pointer_type(tl.int32), bitcast=True))
    else:
        h = p.to(tl.pointer_type(tl.uint16), bitcast=True)
        r = tl.load(h).to(tl.int32) | (tl.load(h + 1).to(tl.int32) << 16)
    return r


@triton.jit
def _words(p, ALIGN: tl.constexpr):
    """The int32 pair at u8 pointers p (rows, chunks), aligned to ALIGN (2, 4 or 8) bytes: (rows, chunks, 2)."""
    if ALIGN >= 8:
        r = tl.load(p.to(tl.pointer_type(tl.int32), bitcast=True)[:, :, None] + tl.arange(0, 2)[None, None, :])
    else:
        r = tl.join(_word(p, ALIGN), _word(p + 4, ALIGN))
    return r


@triton.jit
def _spread(qh, s):
    """Bits s + 4 e + k (k = 0..3) of qh (rows, chunks) to bit 4 of byte k of word e: (rows, chunks, 2)."""
    b = (qh[:, :, None] >> (s + 4 * tl.arange(0, 2))[None, None, :]) & 15
    return (b * 0x2040810) & 0x10101010  # bit k of b lands on bit 8 k + 4; the four shifted copies do not overlap


@triton.jit
def _blocks32(acc, blk, ok, xp, magic, SCHEME: tl.constexpr, DOT: tl.constexpr, XBF16: tl.constexpr,
              IEEE: tl.constexpr, EXACT: tl.constexpr):
    """acc + x times a 32-value block a chunk: blk (rows, chunks) u8 pointers to the blocks, ok (chunks,) the real
    chunks (the others have their scales zeroed), xp pointers to x at each block's first value (as _use takes them).
    Step h reads 8 bytes: 8 values (q8_0), or the low nibbles of values 8 h.. and the high ones of 16 + 8 h.."""
    d = tl.where(ok[None, :], _half(blk), 0.0)[:, :, None]
    if SCHEME == "q8_0":
        for h in tl.static_range(4):
            q = _words(blk + 2 + 8 * h, 2) ^ SIGN8  # q + 128
            w0, w1, w2, w3 = _planes(q, d, 0.0, magic, False, 128, EXACT)
            acc = _use(acc, w0, w1, w2, w3, xp + 8 * h, DOT, XBF16, IEEE)
    elif SCHEME == "q4_0":
        for h in tl.static_range(2):
            q = _words(blk + 2 + 8 * h, 2)
            w0, w1, w2, w3 = _planes(q & LO4, d, 0.0, magic, False, 8, EXACT)
            acc = _use(acc, w0, w1, w2, w3, xp + 8 * h, DOT, XBF16, IEEE)
            w0, w1, w2, w3 = _planes(q & HI4, d * 0.0625, 0.0, magic, False, 128, EXACT)  # 16 q, d / 16
            acc = _use(acc, w0, w1, w2, w3, xp + 16 + 8 * h, DOT, XBF16, IEEE)
    elif SCHEME == "q4_1":
        m = tl.where(ok[None, :], _half(blk + 2), 0.0)[:, :, None]
        for h in tl.static_range(2):
            q = _words(blk + 4 + 8 * h, 4)
            w0, w1, w2, w3 = _planes(q & LO4, d, m, magic, True, 0, EXACT)
            acc = _use(acc, w0, w1, w2, w3, xp + 8 * h, DOT, XBF16, IEEE)
            w0, w1, w2, w3 = _planes(q & HI4, d * 0.0625, m, magic, True, 0, EXACT)
            acc = _use(acc, w0, w1, w2, w3, xp + 16 + 8 * h, DOT, XBF16, IEEE)
    elif SCHEME == "q5_0":  # the fifth bit of value i is bit i of the int32 at byte 2
        qh = _word(blk + 2, 2)
        for h in tl.static_range(2):
            q = _words(blk + 6 + 8 * h, 2)
            w0, w1, w2, w3 = _planes((q & LO4) | _spread(qh, 8 * h), d, 0.0, magic, False, 16, EXACT)
            acc = _use(acc, w0, w1, w2, w3, xp + 8 * h, DOT, XBF16, IEEE)
            w0, w1, w2, w3 = _planes(((q >> 4) & LO4) | _spread(qh, 16 + 8 * h), d, 0.0, magic, False, 16, EXACT)
            acc = _use(acc, w0, w1, w2, w3, xp + 16 + 8 * h, DOT, XBF16, IEEE)
    else:  # q5_1
        m = tl.where(ok[None, :], _half(blk + 2), 0.0)[:, :, None]
        qh = _word(blk + 4, 4)
        for h in tl.static_range(2):
            q = _words(blk + 8 + 8 * h, 8)
            w0, w1, w2, w3 = _planes((q & LO4) | _spread(qh, 8 * h), d, m, magic, True, 0, EXACT)
            acc = _use(acc, w0, w1, w2, w3, xp + 8 * h, DOT, XBF16, IEEE)
            w0, w1, w2, w3 = _planes(((q >> 4) & LO4) | _spread(qh, 16 + 8 * h), d, m, magic, True, 0, EXACT)
            acc = _use(acc, w0, w1, w2, w3, xp + 16 + 8 * h, DOT, XBF16, IEEE)
    return acc


@triton.jit
def _k_scales(s0, s1, s2, c):
    """Q4_K/Q5_K: the 6-bit scales and minimums of sub-blocks 2 c and 2 c + 1 (c: (chunks,) int32), as four float32
    (rows, chunks), from the 12 scale bytes as three int32 (rows, chunks), packed as ggml packs them: sub-block
    j < 4 in the low 6 bits of byte j of s0 (scale) and s1 (minimum); j >= 4 in byte j - 4 of s2 (the scale's low
    4 bits, the minimum's in the high nibble) and in the top 2 bits of byte j - 4 of s0 and s1."""
    sh = (c % 2 * 16)[None, :]  # bytes 2 (c % 2) and 2 (c % 2) + 1 down to bytes 0 and 1
    a = s0 >> sh
    m = s1 >> sh
    b = s2 >> sh
    high = (c >= 2)[None, :]
    sc = tl.where(high, (b & 0x0F0F) | ((a >> 2) & 0x3030), a & 0x3F3F)
    mn = tl.where(high, ((b >> 4) & 0x0F0F) | ((m >> 2) & 0x3030), m & 0x3F3F)
    return ((sc & 0xFF).to(tl.float32), (sc >> 8).to(tl.float32), (mn & 0xFF).to(tl.float32),
            (mn >> 8).to(tl.float32))


@triton.jit
def _kquant(acc, blk, c, ok, xp, magic, SCHEME: tl.constexpr, DOT: tl.constexpr, XBF16: tl.constexpr,
            IEEE: tl.constexpr, EXACT: tl.constexpr, FACTOR: tl.constexpr):
    """acc + x times chunk c ((chunks,), 0..3: 64 values) of the super-blocks at blk (rows, chunks) u8 pointers;
    ok and xp as _blocks32's (xp: pointers to x at the chunk's first value, Q4_K/Q5_K 64 c, Q6_K 128 (c // 2) +
    16 (c % 2))."""
    if SCHEME == "q6_k":  # sub-block 2 g + c % 2 of half c // 2: 16 values l of group g, scale sc[8 (c // 2) + ..]
        d = tl.where(ok[None, :], _half(blk + 208), 0.0)
        sc = blk + 192 + (c // 2 * 8 + c % 2)[None, :]
        D0 = (d * tl.load(sc).to(tl.int8, bitcast=True).to(tl.float32))[:, :, None]
        D1 = (d * tl.load(sc + 2).to(tl.int8, bitcast=True).to(tl.float32))[:, :, None]
        D2 = (d * tl.load(sc + 4).to(tl.int8, bitcast=True).to(tl.float32))[:, :, None]
        D3 = (d * tl.load(sc + 6).to(tl.int8, bitcast=True).to(tl.float32))[:, :, None]
        ql = blk + (c // 2 * 64 + c % 2 * 16)[None, :]
        qhp = blk + (128 + c // 2 * 32 + c % 2 * 16)[None, :]
        if FACTOR:  # D (q - 32) summed as D (2^85 sum(2^64 x q 2^-149) - 32 2^-64 sum(2^64 x)), a sum a group
            p0 = tl.zeros(acc.shape, tl.float32)
            p1, p2, p3 = p0, p0, p0
            xs0 = tl.zeros((acc.shape[1], 2), tl.float32)
            xs1, xs2, xs3 = xs0, xs0, xs0
            for s in tl.static_range(2):
                qa = _words(ql + 8 * s, 2)
                qb = _words(ql + 32 + 8 * s, 2)
                qh = _words(qhp + 8 * s, 2)
                p0, xs0 = _sums(p0, xs0, (qa & LO4) | ((qh << 4) & BITS45), xp + 8 * s, XBF16, EXACT)
                p1, xs1 = _sums(p1, xs1, (qb & LO4) | ((qh << 2) & BITS45), xp + 32 + 8 * s, XBF16, EXACT)
                p2, xs2 = _sums(p2, xs2, ((qa >> 4) & LO4) | (qh & BITS45), xp + 64 + 8 * s, XBF16, EXACT)
                p3, xs3 = _sums(p3, xs3, ((qb >> 4) & LO4) | ((qh >> 2) & BITS45), xp + 96 + 8 * s, XBF16, EXACT)
            acc = acc + D0 * _add(p0 * TWO85, xs0[None] * M32TWO_64, EXACT)
            acc = acc + D1 * _add(p1 * TWO85, xs1[None] * M32TWO_64, EXACT)
            acc = acc + D2 * _add(p2 * TWO85, xs2[None] * M32TWO_64, EXACT)
            acc = acc + D3 * _add(p3 * TWO85, xs3[None] * M32TWO_64, EXACT)
        else:
            for s in tl.static_range(2):
                qa = _words(ql + 8 * s, 2)  # low nibbles: group 0, high: group 2
                qb = _words(ql + 32 + 8 * s, 2)  # low: group 1, high: group 3
                qh = _words(qhp + 8 * s, 2)  # bits 2 g, 2 g + 1: the top two bits of group g
                w0, w1, w2, w3 = _planes((qa & LO4) | ((qh << 4) & BITS45), D0, 0.0, magic, False, 32, EXACT)
                acc = _use(acc, w0, w1, w2, w3, xp + 8 * s, DOT, XBF16, IEEE)
                w0, w1, w2, w3 = _planes((qb & LO4) | ((qh << 2) & BITS45), D1, 0.0, magic, False, 32, EXACT)
                acc = _use(acc, w0, w1, w2, w3, xp + 32 + 8 * s, DOT, XBF16, IEEE)
                w0, w1, w2, w3 = _planes(((qa >> 4) & LO4) | (qh & BITS45), D2, 0.0, magic, False, 32, EXACT)
                acc = _use(acc, w0, w1, w2, w3, xp + 64 + 8 * s, DOT, XBF16, IEEE)
                w0, w1, w2, w3 = _planes(((qb >> 4) & LO4) | ((qh >> 2) & BITS45), D3, 0.0, magic, False, 32, EXACT)
                acc = _use(acc, w0, w1, w2, w3, xp + 96 + 8 * s, DOT, XBF16, IEEE)
    else:  # Q4_K/Q5_K: sub-blocks 2 c (low nibbles) and 2 c + 1 (high), (d sc) q - dmin m
        hdr = tl.load(blk.to(tl.pointer_type(tl.int32), bitcast=True)[:, :, None] + tl.arange(0, 4)[None, None, :])
        u, v = tl.split(tl.reshape(hdr, (hdr.shape[0], hdr.shape[1], 2, 2)))
        dd, s1 = tl.split(u)
        s0, s2 = tl.split(v)
        d = tl.where(ok[None, :], (dd & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32), 0.0)
        dmin = tl.where(ok[None, :], (dd >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32), 0.0)
        sc0, sc1, mn0, mn1 = _k_scales(s0, s1, s2, c)
        D0 = (d * sc0)[:, :, None]
        D1 = (d * sc1)[:, :, None]
        M0 = (-(dmin * mn0))[:, :, None]
        M1 = (-(dmin * mn1))[:, :, None]
        if SCHEME == "q4_k" and FACTOR:  # (D q) + A summed as D 2^85 sum(2^64 x q 2^-149) + A 2^-64 sum(2^64 x)
            qs = blk + (16 + 32 * c)[None, :]
            p0 = tl.zeros(acc.shape, tl.float32)
            p1 = p0
            xs0 = tl.zeros((acc.shape[1], 2), tl.float32)
            xs1 = xs0
            for h in tl.static_range(4):
                q = _words(qs + 8 * h, 8)
                p0, xs0 = _sums(p0, xs0, q & LO4, xp + 8 * h, XBF16, EXACT)
                p1, xs1 = _sums(p1, xs1, q & HI4, xp + 32 + 8 * h, XBF16, EXACT)  # 16 q: D 2^81
            acc = acc + _add(p0 * (D0 * TWO85), M0 * TWO_64 * xs0[None], EXACT)
            acc = acc + _add(p1 * (D1 * TWO81), M1 * TWO_64 * xs1[None], EXACT)
        elif SCHEME == "q4_k":
            qs = blk + (16 + 32 * c)[None, :]
            for h in tl.static_range(4):
                q = _words(qs + 8 * h, 8)
                w0, w1, w2, w3 = _planes(q & LO4, D0, M0, magic, True, 0, EXACT)
                acc = _use(acc, w0, w1, w2, w3, xp + 8 * h, DOT, XBF16, IEEE)
                w0, w1, w2, w3 = _planes(q & HI4, D1 * 0.0625, M1, magic, True, 0, EXACT)  # 16 q, D / 16
                acc = _use(acc, w0, w1, w2, w3, xp + 32 + 8 * h, DOT, XBF16, IEEE)
        else:  # q5_k: bit j of qh[l] is the fifth bit of value l of sub-block j
            qs = blk + (48 + 32 * c)[None, :]
            j = (2 * c)[None, :, None]
            for h in tl.static_range(4):
                q = _words(qs + 8 * h, 8)
                qh = _words(blk + 16 + 8 * h, 8)
                w0, w1, w2, w3 = _planes((q & LO4) | (((qh >> j) & 0x01010101) << 4), D0, M0, magic, True, 0,
                                         EXACT)
                acc = _use(acc, w0, w1, w2, w3, xp + 8 * h, DOT, XBF16, IEEE)
                w0, w1, w2, w3 = _planes(((q >> 4) & LO4) | (((qh >> (j + 1)) & 0x01010101) << 4), D1, M1, magic,
                                         True, 0, EXACT)
                acc = _use(acc, w0, w1, w2, w3, xp + 32 + 8 * h, DOT, XBF16, IEEE)
    return acc


# ---- the kernels ----------------------------------------------------------------------------------------

# One compile for every m, n and k: the sizes are not specialized (the strides are: their alignment decides the
# vector loads).
@triton.jit(do_not_specialize=["M", "N", "n_chunks", "iters"])
def _gguf_matmul_kernel(x, raw, y, M, N, n_chunks, stride_xm, stride_ym, row_bytes, iters, magic,
                        SCHEME: tl.constexpr, TS: tl.constexpr, BN: tl.constexpr, NC: tl.constexpr,
                        BM: tl.constexpr, DOT: tl.constexpr, XBF16: tl.constexpr, IEEE: tl.constexpr,
                        EXACT: tl.constexpr, FACTOR: tl.constexpr):
    """y[m, n] = sum over this program's split of the row (``iters`` steps of NC chunks) of x[m, k] w[n, k]: BN rows
    of w (pid 0), BM rows of x (pid 1), split pid 2 (y then holds float32 partial sums, one (M, N) a split).
    Rows and chunks past the end are clamped to the last one (every load stays in bounds) and their products
    zeroed or left unstored."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    row = raw + tl.minimum(rn, N - 1).to(tl.int64) * row_bytes
    rm = pid_m * BM + tl.arange(0, BM)
    if DOT:
        xrow = x + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * stride_xm  # (BM, 1)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    else:  # BM == 1
        xrow = x + pid_m.to(tl.int64) * stride_xm
        acc = tl.zeros((BN, NC, 2), dtype=tl.float32)
    tl.static_assert(NC % 4 == 0)
    c = tl.arange(0, NC) % 4  # a K-quant chunk's place in its super-block (every step starts a super-block)
    for it in range(pid_s * iters, tl.minimum(pid_s * iters + iters, tl.cdiv(n_chunks, NC))):
        cc = it * NC + tl.arange(0, NC)
        ok = cc < n_chunks
        cc = tl.minimum(cc, n_chunks - 1)  # a clamped chunk keeps its own c: another chunk of the last super-block
        if TS > 34:  # a K-quant: four 64-value chunks a super-block
            if SCHEME == "q6_k":
                xo = cc // 4 * 256 + c // 2 * 128 + c % 2 * 16
            else:
                xo = cc // 4 * 256 + c * 64
            blk = row[:, None] + (cc // 4 * TS)[None, :]
        else:
            xo = cc * 32
            blk = row[:, None] + (cc * TS)[None, :]
        if DOT:
            xp = xrow + xo[None, :]
        else:
            xp = xrow + xo
        if TS > 34:
            acc = _kquant(acc, blk, c, ok, xp, magic, SCHEME, DOT, XBF16, IEEE, EXACT, FACTOR)
        else:
            acc = _blocks32(acc, blk, ok, xp, magic, SCHEME, DOT, XBF16, IEEE, EXACT)
    if not DOT:
        acc = tl.sum(tl.reshape(acc, (BN, NC * 2)), axis=1)[None, :]
    out = y + pid_s.to(tl.int64) * M * N + rm[:, None] * stride_ym + rn[None, :]
    tl.store(out, acc.to(y.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit(do_not_specialize=["n", "splits"])
def _sum_splits_kernel(p, y, n, splits, B: tl.constexpr):
    """y[i] = sum over s of p[s, i], in the order of s (the split-K partial sums; p float32 (splits, n))."""
    i = tl.program_id(0) * B + tl.arange(0, B)
    ok = i < n
    acc = tl.load(p + i, mask=ok, other=0.0)
    for _ in range(1, splits):
        p += n
        acc += tl.load(p + i, mask=ok, other=0.0)
    tl.store(y + i, acc.to(y.dtype.element_ty), mask=ok)


# ---- launching ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Launch:
    """How one call runs: DOT or FMA, rows of w and of x a program (block_n, block_m), chunks a step, warps a
    program, the number of splits of each row, and (FMA, Q4_K and Q6_K) whether the products are factored."""

    dot: bool
    block_n: int
    block_m: int
    chunks: int
    warps: int
    split: int
    factor: bool = False


FACTORED = ("q4_k", "q6_k")  # FMA: the products factored (FACTOR, module docstring)
FMA_ROWS = (2, 1)  # rows of w a one-warp FMA program, the first that gives enough programs (H100, one row: 2 beat
# 4 and 8 on the large Q4_K/Q6_K matrices of the 8B and 70B shapes, quant_kernels.py --gemv-grid)
FMA_PROGRAMS_PER_SM = 8  # enough warps an SM to hide the latency of the loads and of the dependent arithmetic
DOT_BLOCK_N = 64  # DOT: 64 rows of w, 16 a warp
DOT_BLOCK_M = 64  # and 64 rows of x (fewer are padded): sm_90's warpgroup MMA, fewer instructions a value than at 16
DOT_PROGRAMS_PER_SM = 2  # 8 warps an SM
SPLIT_PROGRAMS_PER_SM = 4  # FMA: split a row when there are fewer one-warp programs than this an SM


@functools.cache  # a decode step asks for the same few shapes hundreds of times
def launch_config(scheme: str, m: int, n: int, k: int, float32: bool, sms: int) -> Launch:
    """The launch for x (m, k) times w (n, k) of ``scheme`` on a GPU of ``sms`` SMs: FMA where x has one row (or is
    float32), else DOT; rows of w a program from the shape, and a split of the row where the programs would not
    fill the GPU."""
    n_chunks = k // BLOCKS[scheme][2]
    if m == 1 or float32:
        block_n = next(b for b in FMA_ROWS if triton.cdiv(n, b) * m >= FMA_PROGRAMS_PER_SM * sms or b == 1)
        launch = Launch(False, block_n, 1, 32, 1, 1, scheme in FACTORED)
        programs, want = triton.cdiv(n, block_n) * m, SPLIT_PROGRAMS_PER_SM * sms
    else:
        launch = Launch(True, DOT_BLOCK_N, DOT_BLOCK_M, 16, 4, 1)
        programs, want = triton.cdiv(n, DOT_BLOCK_N) * triton.cdiv(m, DOT_BLOCK_M), DOT_PROGRAMS_PER_SM * sms
    steps = triton.cdiv(n_chunks, launch.chunks)
    split = min(steps, triton.cdiv(want, programs)) if programs < want else 1
    split = triton.cdiv(steps, triton.cdiv(steps, split))  # no empty splits
    return dataclasses.replace(launch, split=split)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def usable(raw: torch.Tensor, scheme: str, dtype: torch.dtype) -> bool:
    """Whether gguf_matmul takes x of ``dtype`` (float32, bf16, fp16) and can read ``raw`` in place (its first
    byte aligned as the format's loads need)."""
    return (scheme in BLOCKS and dtype in (torch.float32, torch.bfloat16, torch.float16)
            and raw.data_ptr() % BLOCKS[scheme][3] == 0)


def gguf_matmul(x: torch.Tensor, scheme: str, raw: torch.Tensor, n: int, k: int,
                launch: Launch | None = None) -> torch.Tensor:
    """x (M, K), a 2-D activation, times the (n, k) matrix of ``scheme`` stored in ``raw`` (1-D uint8, aligned as
    ``usable`` checks) transposed -> (M, n) in x's dtype. ``launch`` overrides launch_config."""
    if not x.is_contiguous() or x.data_ptr() % 16:  # x is read as int32 pairs and 16-byte vectors
        x = x.clone(memory_format=torch.contiguous_format)
    m = x.shape[0]
    ts, bs, cv, _ = BLOCKS[scheme]
    float32 = x.dtype == torch.float32
    if launch is None:
        launch = launch_config(scheme, m, n, k, float32, _sm_count(x.device.index) if x.is_cuda else 4)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    out = y if launch.split == 1 else torch.empty((launch.split, m, n), dtype=torch.float32, device=x.device)
    n_chunks = k // cv
    iters = triton.cdiv(triton.cdiv(n_chunks, launch.chunks), launch.split)
    grid = (triton.cdiv(n, launch.block_n), triton.cdiv(m, launch.block_m), launch.split)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _gguf_matmul_kernel[grid](x, raw, out, m, n, n_chunks, x.stride(0), n, k // bs * ts, iters, MAGIC,
                                  SCHEME=scheme, TS=ts, BN=launch.block_n, NC=launch.chunks, BM=launch.block_m,
                                  DOT=launch.dot, XBF16=x.dtype == torch.bfloat16, IEEE=float32, EXACT=EXACT,
                                  FACTOR=launch.factor and not launch.dot and scheme in FACTORED,
                                  num_warps=launch.warps, num_stages=1)
        if launch.split > 1:
            _sum_splits_kernel[(triton.cdiv(m * n, 1024),)](out, y, m * n, launch.split, B=1024, num_warps=4)
    return y


def warm_up(scheme: str, dtype: torch.dtype, device: torch.device) -> None:
    """Compile now (Triton compiles at a kernel's first use, which would stall the first pass) the launches a
    decode step can take for ``scheme`` and x of ``dtype``: one row of x, each number of rows of w a program that
    FMA_ROWS allows. On an all-zero matrix (every scale 0); the sizes are not specialized, so any will do."""
    ts, bs, _, _ = BLOCKS[scheme]
    n, k = 8, 2 * bs
    raw = torch.zeros(n * k // bs * ts, dtype=torch.uint8, device=device)
    x = torch.zeros((1, k), dtype=dtype, device=device)
    for block_n in FMA_ROWS:
        gguf_matmul(x, scheme, raw, n, k, Launch(False, block_n, 1, 32, 1, 1, scheme in FACTORED))
