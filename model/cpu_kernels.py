"""Quantized matrices that a CPU run holds for the whole run, repacked into row tiles, and their decode-sized
matmuls, reading the held bytes once a token, a decode step's groups each one call (issue 28 item 1;
benchmarks/cpu_kernels.py measured the candidates, benchmarks/cpu_peer.sh compares a run with llama.cpp's). Two
kernel families multiply the tiles: model/cpu_simd.c (C with AVX-512 or AVX2, built with the host's compiler; the
default, every format below, ``TiledWeight.c``) and inductor's compiled graphs of the torch ops here (q4_0, q4_1,
int4, q8_0 and int8; ``_Graphs``, 10-25 s to compile in a fresh process and cache; where the C does not build and
the run asks for them, ``Kernels``).

A CPU run used to hold such a matrix dequantized to float32 (``model.quant.dequantized``): 4 bytes a value,
6.4x the Q4_1 blocks, read in full every decode step. ``TiledWeight`` holds the same stored values moved
(``tile``): TILE output rows side by side, so that a vectorised loop runs across rows, each lane one row of
the matrix, and the values of x are scalars broadcast to the lanes (along K it would need a horizontal sum per
row).

    4-bit (q4_0, q4_1, int4,   q    int32 (N / TILE, G, H, W)     byte k of word w holds row 16k + w of the tile
           q4_k)                                                 (W = TILE / 4 words); byte j of group g holds
                                                                 value g*gs + j in its low nibble and value
                                                                 g*gs + H + j in its high one (H = gs / 2: ggml's
                                                                 order within a block)
    8-bit (q8_0, int8, q5_0,   q    int32 (N / TILE, G, gs, W)    byte k of word w: row 16k + w, as above; signed
           q5_1, q5_k, q6_k)        (inductor's); model/cpu_simd.c's int8 (N / TILE, G, gs, TILE), rows in order
                                    (one sign-extending load a vector)
    both:                      s, o scale and offset (N / TILE, G, TILE), value = q * s + o (o: none for q8_0, int8,
                                    q5_0, q6_k; q4_0's -8 * d as float32; the K-quants' sub-block scales d * sc and
                                    offsets -(dmin * m) as float32, ``_gguf_planes``; the rest fp16 as stored)

G groups of gs values a row (32 for the GGUF blocks, 16 for q6_k, the group for ours). N is padded to whole tiles
with zero rows, which the results leave out. The bytes are those stored for q4_0, q4_1, q8_0 and ours (q4_0: 4
more a block for its float32 offset); q5_* take 8.5-9 bits a value against 5.5-6, the K-quants 6 (q4_k), 10
(q5_k, q6_k) against 4.5-6.6: still a third or less of float32's. The tiles are read as whole int32 vectors, each
shift (4-bit: 0, 8, 16, 24, and 4 more for the high nibbles; 8-bit: left then arithmetic right, for the sign)
giving 16 rows' values.

``TiledWeight.linear``: for at most ROWS_MAX rows of x (a decode step) the kernel, which computes each group's
sum of q * x first and scales it once (``acc * s + o * sum(x)``: the values of x times the dequantized matrix in
another order of float32 roundings; within 1e-6 of the reference's max |y|, tests/test_cpu_kernels.py). More
rows (a prefill): the matrix dequantized exactly as the reference dequantizer does (model/quant.py: the same
float32 operations, so the same values), DEQUANT_CHUNK values at a time, then a batched GEMM.

Runs in the process that computes (the client). Where neither family works here, the matrices are held
dequantized (``hold``, ``available``).

``BlockWeight``: a matrix model/cpu_simd.c reads where it lies, in the stored bytes (its BLOCKS: q4_0, q4_1,
q8_0, q4_k, q6_k, int8, int4), row by row along K with a horizontal sum a row: no copy and no repacking, for bytes
that are not the run's own to hold (a split's DRAM tier, a ring slot). Its rates against the tiles':
benchmarks/cpu_kernels.py ``in-place`` and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from model import cpu_simd, quant
from model.qformats import DEQUANT_CHUNK, GGML_BLOCKS
from model.quant import QuantWeight, _parts, _unpack4

TILE = 64  # output rows a tile: 4 AVX-512 vectors of float32
ROWS_MAX = 4  # rows of x the compiled kernel takes (one compile per row count); more are a prefill
NIBBLE = ("q4_0", "q4_1", "int4", "q4_k")
BYTE = ("q8_0", "int8", "q5_0", "q5_1", "q5_k", "q6_k")
# the formats inductor's kernels take; model/cpu_simd.c takes every one of NIBBLE and BYTE: the K-quants and q5_*
# as 4-bit (q4_k) or 8-bit values with their sub-blocks' scales and offsets as planes (``_gguf_planes``)
SCHEMES = ("q4_0", "q4_1", "int4", "q8_0", "int8")
SIMD_SCHEMES = NIBBLE + BYTE
# The sibling matrices that take the same x, concatenated by ``hold`` so that a decode step calls one kernel
# for them (each compiled call costs about 7 us of Python on the 2-core machine besides its kernel).
SIBLINGS = (("attention.wq.weight", "attention.wk.weight", "attention.wv.weight"),
            ("feed_forward.w1.weight", "feed_forward.w3.weight"))


# ---- the kernels ------------------------------------------------------------------------------------------

def _nibbles(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit tiles' words (n, G, H, W) -> the low and the high nibbles as float32 (n, G, H, 4, W): [..., k, w] is
    row 16k + w of the tile."""
    qk = q.unsqueeze(-2) >> torch.arange(0, 32, 8, dtype=torch.int32, device=q.device).view(4, 1)
    return (qk & 15).float(), ((qk >> 4) & 15).float()


def _mv_nibble(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """x (m, K) float32 times the 4-bit tiles -> (m, NT * TILE); the rows share one pass over q."""
    nt, g, h, w = q.shape
    xs = x.view(x.shape[0], g, 2, h)  # (m, G, 2, H): the low nibbles' values, then the high ones'
    lo, hi = _nibbles(q)
    ys = []
    for r in range(x.shape[0]):
        acc = (lo * xs[r, :, 0, :, None, None]).sum(2) + (hi * xs[r, :, 1, :, None, None]).sum(2)  # (NT, G, 4, W)
        acc = acc.reshape(nt, g, 4 * w)  # rows in order
        ys.append((acc * s.float() + o.float() * xs[r].sum((1, 2))[:, None]).sum(1).view(nt * 4 * w))
    return torch.stack(ys, 0)


def _bytes(q: torch.Tensor) -> torch.Tensor:
    """8-bit tiles' words (n, G, gs, W) -> the signed values as float32 (n, G, gs, 4, W): [..., k, w] is row
    16k + w of the tile."""
    shl = torch.arange(24, -1, -8, dtype=torch.int32, device=q.device).view(4, 1)  # byte k to the top byte
    return ((q.unsqueeze(-2) << shl) >> 24).float()


def _mv_byte(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x (m, K) float32 times the 8-bit tiles -> (m, NT * TILE)."""
    nt, g, gs, w = q.shape
    xs = x.view(x.shape[0], g, gs)
    qf = _bytes(q)
    return torch.stack([((qf * xs[r, :, :, None, None]).sum(2).reshape(nt, g, 4 * w) * s.float()).sum(1)
                        .view(nt * 4 * w) for r in range(x.shape[0])], 0)


def _dequant(q: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None) -> torch.Tensor:
    """Tiles' planes (n, G, H|gs, L), (n, G, L) (L lanes: TILE, or 1 for rows picked out; 4-bit tiles as their words,
    4-bit rows picked out as uint8 bytes) -> float32 (n, K, L), lane l of tile t row t * L + l of the matrix: the
    values of model/quant.py's dequantizers by the same float32 operations (q4_1, int4: q * s + o in two
    roundings; q4_0: exact either way; 8-bit: q * s; inductor does not contract a * b + c), so the same bits."""
    if q.dtype == torch.int32 and o is None:  # 8-bit tiles
        n, g, gs, w = q.shape
        return (_bytes(q) * s.float().view(n, g, 1, 4, w)).reshape(n, g * gs, 4 * w)
    if q.dtype == torch.int32:  # 4-bit tiles
        n, g, h, w = q.shape
        s4, o4 = s.float().view(n, g, 1, 4, w), o.float().view(n, g, 1, 4, w)
        lo, hi = _nibbles(q)
        return torch.stack([lo * s4 + o4, hi * s4 + o4], 2).reshape(n, 2 * g * h, 4 * w)  # (n, G, 2, H, 4, W)
    s = s.float().unsqueeze(2)
    if q.dtype == torch.uint8:  # 4-bit
        v = torch.stack([(q & 15).float() * s, (q >> 4).float() * s], 2)  # (n, G, 2, H, L)
        v = v + o.float()[:, :, None, None]
    else:
        v = q.float() * s  # (n, G, gs, L)
        v = v if o is None else v + o.float().unsqueeze(2)
    return v.reshape(q.shape[0], -1, q.shape[-1])


def _dequant_into(q: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """``_dequant`` written into ``out`` (n, K, L) float32: compiled, the kernel writes there directly."""
    return out.copy_(_dequant(q, s, o))


# ---- a decode step's groups, each one compiled graph --------------------------------------------------------
# An eager decode step of the embedded SmolLM2 ran about 40 torch ops a layer at 3-15 us each, as long as its
# matmuls; here a group's norm, its fused matrices (whole tiles' kernels), the rotation and the residual adds
# are one inductor graph (the elementwise work fused into the kernels' loops), called once a group. The KV
# cache's write and attention stay eager between them (model/transformer.py: the cache's own seam). Same float32
# operations as model/transformer.py's (rms_norm, Rope.apply), in inductor's order of roundings.

def _mv(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, n: int) -> torch.Tensor:
    """x (m, K) times a tiled matrix's planes (4-bit; 8-bit: o None) -> (m, n): its n rows."""
    y = _mv_byte(x, q, s) if o is None else _mv_nibble(x, q, s, o)
    return y if y.shape[1] == n else y[:, :n]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w  # model.transformer.rms_norm in float32


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (m, H, hd) of interleaved (re, im) pairs, cos and sin (hd / 2,): model.transformer.Rope.apply."""
    xf = x.unflatten(-1, (-1, 2))
    re, im = xf[..., 0], xf[..., 1]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2)


def _attention_in(h, norm, eps, qkv, sizes, heads, cos, sin):
    """h (m, dim) -> q (m, n_heads, hd), k, v (m, n_kv, hd): the norm, the fused q/k/v matrix, the rotation."""
    y = _mv(_rms(h, norm, eps), *qkv, sum(sizes))
    q, k, v = y.split(sizes, dim=-1)
    hd = sizes[0] // heads[0]
    return (_rotate(q.view(-1, heads[0], hd), cos, sin), _rotate(k.view(-1, heads[1], hd), cos, sin),
            v.view(-1, heads[1], hd))


def _residual(h, a, wo, n):
    """h + wo a: the attention group's output projection."""
    return h + _mv(a, *wo, n)


def _ffn(h, norm, eps, w13, hidden, w2, n):
    """h + W2(silu(W1 x) * W3 x), x = RMSNorm(h), W1 and W3 one fused matrix."""
    gate, up = _mv(_rms(h, norm, eps), *w13, 2 * hidden).split([hidden, hidden], dim=-1)
    return h + _mv(F.silu(gate) * up, *w2, n)


def _planes_of(t: TiledWeight) -> tuple:
    return (t.q, t.s, t.o if t.nibble else None)


def decode_rows(h: torch.Tensor) -> bool:
    """Whether activations h (B, S, dim) are a decode step the group graphs take: float32 on the CPU, S == 1,
    B <= ROWS_MAX (the kernels' rows)."""
    return h.device.type == "cpu" and h.dtype == torch.float32 and h.shape[1] == 1 and h.shape[0] <= ROWS_MAX


def attention_in(h: torch.Tensor, norm: torch.Tensor, eps: float, ws: tuple, heads: tuple[int, int],
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple | None:
    """A decode step's q, k, v (B, 1, heads, hd) from h (B, 1, dim) by one C call where model/cpu_simd.c multiplies
    q, k and v (one fused tiled matrix, or three of any formats), else by one compiled graph where they are one
    fused tiled matrix (``hold``); None otherwise (the eager path)."""
    if not decode_rows(h):
        return None
    arr = _simd_qkv(ws)
    if arr is not None:
        return cpu_simd.attention_in(ws[0].lib, arr, h.view(h.shape[0], -1), norm, eps, heads,
                                     ws[0].shape[0] // heads[0], cos, sin)
    whole = fused(ws)
    if whole is None:
        return None
    sizes = tuple(w.shape[0] for w in ws)
    q, k, v = _compiled("attention_in")(h.view(h.shape[0], -1), norm, eps, _planes_of(whole), sizes, heads,
                                         cos, sin)
    return q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)


def _simd_qkv(ws: tuple) -> object | None:
    """model/cpu_simd.c's matrices of q, k and v (``cpu_simd.matrices``: the fused one, or the three where they are
    not fused), made once and kept on the first; None where the C does not multiply them all."""
    if not all(getattr(w, "c", None) is not None for w in ws):
        return None
    got = ws[0].qkv
    if got is None or got[0] is not ws[1] or got[1] is not ws[2]:
        whole = fused(ws)
        got = ws[0].qkv = (ws[1], ws[2], cpu_simd.matrices([w.c for w in ((whole,) if whole else ws)]))
    return got[2]


def residual(h: torch.Tensor, a: torch.Tensor, wo) -> torch.Tensor | None:
    """h + wo a (h (B, 1, dim), a (B, 1, K)) by one C call or compiled graph for a tiled wo (or one read in place);
    None otherwise."""
    if not isinstance(wo, (TiledWeight, BlockWeight)) or not decode_rows(h) or a.dtype != torch.float32:
        return None
    b = h.shape[0]
    if wo.c is not None:
        return cpu_simd.residual(wo.lib, wo.c, h.view(b, -1), a.reshape(b, -1)).view(h.shape)
    return _compiled("residual")(h.view(b, -1), a.reshape(b, -1), _planes_of(wo), wo.shape[0]).view(h.shape)


def ffn(h: torch.Tensor, norm: torch.Tensor, eps: float, w1, w3, w2) -> torch.Tensor | None:
    """A decode step's FFN group, h (B, 1, dim) -> h + W2(silu(W1 x) * W3 x), by one C call where model/cpu_simd.c
    multiplies all three (W1 and W3 one fused tiled matrix or two), else one compiled graph where W1 and W3 are one
    fused tiled matrix and W2 is tiled; None otherwise."""
    if not decode_rows(h):
        return None
    b, whole = h.shape[0], fused((w1, w3))
    if all(getattr(w, "c", None) is not None for w in (w1, w3, w2)):
        return cpu_simd.ffn(w2.lib, (whole or w1).c, None if whole else w3.c, w2.c, h.view(b, -1), norm, eps,
                            w1.shape[0]).view(h.shape)
    if whole is None or not isinstance(w2, TiledWeight):
        return None
    return _compiled("ffn")(h.view(b, -1), norm, eps, _planes_of(whole), w1.shape[0], _planes_of(w2),
                            w2.shape[0]).view(h.shape)


class _Graphs:
    """``fn`` compiled by inductor (``torch._inductor.standalone_compile`` of the graph ``make_fx`` traces, static
    shapes), once per argument signature: the arguments' structure (tensors, tuples of them, None, Python numbers,
    which the graph holds as constants) and every tensor's shape, strides and dtype. Specialised on the shapes, as
    ``torch.compile(dynamic=False)`` would (a symbolic K or N ran 20x slower), but without Dynamo's frame evaluation
    and guards: a call costs about 7 us of Python on the 2-core machine against 38 us through ``torch.compile``, 90
    calls a decode step of the embedded SmolLM2. A later process reads the compiled code from inductor's FX graph
    cache (on disk: ``standalone_compile`` gives the graph the shape environment the cache needs, which
    ``torch._inductor.compile`` of a real-tensor trace lacks, so every process generated its C++ again)."""

    def __init__(self, fn) -> None:
        self.fn, self.graphs = fn, {}

    def __call__(self, *args):
        tensors, key = [], []
        for a in args:
            for v in (a if isinstance(a, tuple) else (a,)):
                if isinstance(v, torch.Tensor):
                    tensors.append(v)
                    key.append((v.shape, v.stride(), v.dtype))
                else:
                    key.append(v)
            key.append(len(a) if isinstance(a, tuple) else -1)
        key = tuple(key)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._compile(args, tensors)
        return g(*tensors)

    def _compile(self, args: tuple, tensors: list[torch.Tensor]):
        import torch._inductor
        from torch.fx.experimental.proxy_tensor import make_fx

        def rebuilt(*ts):  # args with the traced tensors in place of the given ones, in order
            it = iter(ts)
            return self.fn(*(tuple(next(it) if isinstance(v, torch.Tensor) else v for v in a) if isinstance(a, tuple)
                             else next(it) if isinstance(a, torch.Tensor) else a for a in args))

        with torch.no_grad():
            return torch._inductor.standalone_compile(make_fx(rebuilt)(*tensors), tensors,
                                                      dynamic_shapes="from_example_inputs")


@functools.cache
def _compiled(what: str) -> _Graphs:
    """The compiled function ``what`` ("nibble", "byte": the kernels; "dequant": ``_dequant``; "attention_in",
    "residual", "ffn": a decode step's groups)."""
    return _Graphs({"nibble": _mv_nibble, "byte": _mv_byte, "dequant": _dequant_into, "attention_in": _attention_in,
                    "residual": _residual, "ffn": _ffn}[what])


@functools.cache
def available(lib=None) -> bool:
    """Whether the kernels build and run here (inductor's: a C++ compiler, a working inductor; with ``lib``,
    model/cpu_simd.c's library): checked once per process on a one-tile matrix of each family, against the
    reference; False (with one line on stderr) holds the matrices dequantized instead."""
    what = "inductor" if lib is None else "model/cpu_simd.c"
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 64, generator=gen)
        for scheme in ("q4_1", "q8_0"):
            w = QuantWeight(torch.randint(0, 256, (TILE * (40 if scheme == "q4_1" else 68),), generator=gen,
                                          dtype=torch.uint8), scheme, (TILE, 64))
            _fp16_fields(w)
            ref, t = F.linear(x, w.dense()), tile(w, lib)
            if not torch.equal(t.dense(), w.dense()):
                raise RuntimeError(f"{scheme}: the dequantizer differs from the reference")
            got = t._kernel(x)
            if not torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()):
                raise RuntimeError(f"{scheme}: the kernel is off by {(got - ref).abs().max().item():.3g}")
        return True
    except Exception as e:  # no compiler, an inductor that fails here: the dequantized path still works
        print(f"CPU kernels: {what}'s failed here ({type(e).__name__}: {str(e).splitlines()[0][:200]}); quantized "
              f"weights are held dequantized to float32", file=sys.stderr)
        return False


def _fp16_fields(w: QuantWeight) -> None:
    """Random blocks with finite fp16 scales (available's check)."""
    b = w.raw.view(-1, 20 if w.scheme == "q4_1" else 34)
    for off in ((0, 2) if w.scheme == "q4_1" else (0,)):
        b[:, off:off + 2] = (torch.rand(b.shape[0]) * 0.01).half().view(torch.uint8).view(-1, 2)


# ---- the layout -------------------------------------------------------------------------------------------

_SCRATCH = threading.local()


def _scratch(n: int) -> torch.Tensor:
    """float32 scratch of at least ``n`` values for a prefill's dequantized chunk, this thread's, kept: a fresh
    buffer of a few MB every matmul cost more in page faults than the dequantization itself."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.buf = torch.empty(n, dtype=torch.float32)
    return buf[:n]


def _tiles(a: torch.Tensor, n_pad: int) -> torch.Tensor:
    """(N, G, ...) -> (NP / TILE, G, ..., TILE), rows N..NP zero."""
    if n_pad > a.shape[0]:
        a = torch.cat([a, a.new_zeros((n_pad - a.shape[0], *a.shape[1:]))])
    a = a.reshape(n_pad // TILE, TILE, *a.shape[1:])
    return a.permute(0, *range(2, a.dim()), 1).contiguous()


def _gguf_planes(w: QuantWeight) -> tuple:
    """``_planes`` of q5_0, q5_1 and the K-quants, from model/quant.py's own unpacking, so that q * s + o (q * s)
    are its dequantizer's float32 operations: q5_0 (q - 16) * d, q5_1 q * d + m (8-bit, fp16 planes); q4_k and
    q5_k (d * sc) * q - (dmin * m) per 32-value sub-block (q4_k 4-bit, q5_k 8-bit), q6_k (d * sc) * (q - 32) per 16
    values (8-bit), each K-quant's s and o its 6-bit scales and minimums as bytes and its super-blocks' d and dmin
    the ``sup`` planes (fp16, a 256-value super-block: 8 or 16 groups), which the kernels multiply as the
    dequantizer does: q4_k 4.6 bits a value against the blocks' 4.5, q5_k 8.6 against 5.5, q6_k 8.6 against
    6.6."""
    n, k = w.shape
    b = w.raw.view(-1, GGML_BLOCKS[w.scheme][1])  # blocks in row order
    half = lambda off: b[:, off:off + 2].contiguous().view(torch.float16)  # noqa: E731  (blocks, 1) as stored
    if w.scheme in ("q5_0", "q5_1"):
        qs, hi, o = (b[:, 6:], 2, None) if w.scheme == "q5_0" else (b[:, 8:], 4, half(2))
        q = (quant._nibbles(qs) | quant._q5_high(b, hi)).to(torch.int8) - (16 if w.scheme == "q5_0" else 0)
        return q.view(n, k // 32, 32), half(0).view(n, -1), None if o is None else o.view(n, -1), 32, None
    if w.scheme == "q6_k":
        low = quant._bits(b[:, :128].reshape(-1, 2, 64), 2, 4).permute(0, 1, 3, 2).reshape(-1, 8, 32)
        high = quant._bits(b[:, 128:192].reshape(-1, 2, 32), 4, 2).permute(0, 1, 3, 2).reshape(-1, 8, 32)
        q = (low | (high << 4)).to(torch.int8) - 32
        sc = b[:, 192:208].contiguous().view(torch.int8)  # (blocks, 16): d * sc scales 16 values
        return q.view(n, k // 16, 16), sc.view(n, -1), None, 16, (half(208).view(n, -1), None, 16)
    sc, mn = quant._k_scales(b)  # (blocks, 8) each: d * sc and -(dmin * m) of a 32-value sub-block
    sup = (half(0).view(n, -1), half(2).view(n, -1), 8)
    if w.scheme == "q4_k":
        v = quant._k_low(b[:, 16:144])  # (blocks, 8, 32) values 0..15: byte j holds values j and 16 + j
        return (v[..., :16] | (v[..., 16:] << 4)).view(n, k // 32, 16), sc.view(n, -1), mn.view(n, -1), 32, sup
    high = quant._bits(b[:, 16:48], 8, 1).permute(0, 2, 1) << 4
    q = (quant._k_low(b[:, 48:176]) | high).to(torch.int8)
    return q.view(n, k // 32, 32), sc.view(n, -1), mn.view(n, -1), 32, sup


def _planes(w: QuantWeight) -> tuple:
    """(q (N, G, H or gs), s (N, G), o (N, G) or None, gs, sup) of a matrix of SIMD_SCHEMES, in the tiles' element
    order; sup: a K-quant's (d, dmin or None (N, G / ksub), ksub), else None (``_gguf_planes``)."""
    n, k = w.shape
    if w.scheme in ("q5_0", "q5_1", "q4_k", "q5_k", "q6_k"):
        return _gguf_planes(w)
    if w.scheme in ("q4_0", "q4_1", "q8_0"):
        b = w.raw.view(n, k // 32, -1)
        d = b[..., 0:2].contiguous().view(torch.float16)[..., 0]
        if w.scheme == "q8_0":
            return b[..., 2:].contiguous().view(torch.int8), d, None, 32, None
        if w.scheme == "q4_0":
            return b[..., 2:].contiguous(), d, -8 * d.float(), 32, None  # d * (q - 8) = q * d + (-8 d), both exact
        return b[..., 4:].contiguous(), d, b[..., 2:4].contiguous().view(torch.float16)[..., 0], 32, None
    parts = _parts(w.raw, w.scheme, w.shape, w.group)
    g = w.group
    if w.scheme == "int8":
        return parts[0].reshape(n, k // g, g), parts[1], None, g, None
    v = _unpack4(parts[0]).view(n, k // g, 2, g // 2)  # values 0..15; ours pack the even column low
    return v[:, :, 0] | (v[:, :, 1] << 4), parts[1], parts[2], g, None


class TiledWeight:
    """A quantized matrix held in row tiles (module docstring): ``linear`` for decode steps and prefills, ``rows``
    for an embedding lookup, ``dense`` for the rest. ``parent``/``first``: a sibling's tiles are a view of its
    parent's (``hold``), from tile ``first``."""

    def __init__(self, q: torch.Tensor, s: torch.Tensor, o: torch.Tensor | None, scheme: str,
                 shape: tuple[int, int], group: int | None, parent: TiledWeight | None = None,
                 first: int = 0, lib=None, sup: tuple | None = None) -> None:
        self.q, self.s, self.o, self.sup = q, s, o, sup  # sup: a K-quant's tiled (d, dmin or None, ksub)
        self.scheme, self.shape, self.group = scheme, (int(shape[0]), int(shape[1])), group
        self.parent, self.first = parent, first
        self.nibble = scheme in NIBBLE
        # model/cpu_simd.c's view of the planes where its library is loaded (``hold``), else inductor's kernels
        self.lib, self.c = lib, None if lib is None else cpu_simd.tiles(q, s, o, self.nibble, sup)
        self.qkv: tuple | None = None  # (k, v, the C views of q|k|v) where this is q (``_simd_qkv``)

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        """Bytes held (a sibling's are its parent's)."""
        planes = (self.q, self.s, self.o) + (self.sup[:2] if self.sup else ())
        return 0 if self.parent is not None else sum(t.nbytes for t in planes if t is not None)

    def view(self, first: int, n: int, shape: tuple[int, int]) -> TiledWeight:
        """Tiles [first, first + n) as a matrix of ``shape`` (a sibling of ``hold``'s concatenation)."""
        sl = slice(first, first + n)
        cut = lambda t: None if t is None else t[sl]  # noqa: E731
        sup = None if self.sup is None else (cut(self.sup[0]), cut(self.sup[1]), self.sup[2])
        return TiledWeight(self.q[sl], self.s[sl], cut(self.o), self.scheme, shape, self.group, self, first,
                           self.lib, sup)

    def _kernel(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (m <= ROWS_MAX, K) float32 -> (m, N)."""
        if self.c is not None:
            y = cpu_simd.mv(self.lib, self.c, flat)
        elif self.nibble:
            y = _compiled("nibble")(flat, self.q, self.s, self.o)
        else:
            y = _compiled("byte")(flat, self.q, self.s)
        return y if y.shape[1] == self.shape[0] else y[:, :self.shape[0]]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, w)`` for float32 x: the compiled kernel for at most ROWS_MAX rows; more (a prefill) multiply
        the matrix dequantized a chunk of tiles at a time (DEQUANT_CHUNK values; ``_values``), as a batch of
        (K, TILE) matrices in the tiles' order."""
        rows, cols = self.shape
        flat = x.reshape(-1, cols)
        if flat.shape[0] <= ROWS_MAX and x.dtype == torch.float32:
            return self._kernel(flat.contiguous()).view(*x.shape[:-1], rows)
        step, nt = max(1, DEQUANT_CHUNK // (TILE * cols)), self.q.shape[0]
        outs = [torch.matmul(flat, self._values(a, min(a + step, nt), x.dtype)) for a in range(0, nt, step)]
        y = torch.cat(outs) if len(outs) > 1 else outs[0]  # (NT, m, TILE)
        return y.permute(1, 0, 2).reshape(flat.shape[0], -1)[:, :rows].reshape(*x.shape[:-1], rows)

    def _values(self, a: int, b: int, dtype: torch.dtype, own: bool = False) -> torch.Tensor:
        """Tiles [a, b) dequantized (``_dequant``, compiled) -> (b - a, K, TILE) in ``dtype``: in this thread's
        scratch (valid until the next call), or in a tensor of its own with ``own``."""
        n = (b - a) * TILE * self.shape[1]
        out = (torch.empty(n) if own else _scratch(n)).view(b - a, self.shape[1], TILE)
        if self.c is not None:
            cpu_simd.dequant(self.lib, self.c, a, b, out)
        else:
            _compiled("dequant")(self.q[a:b], self.s[a:b], None if self.o is None else self.o[a:b], out)
        return out.to(dtype)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) in ``dtype``: the reference dequantizer's values."""
        v = self._values(0, self.q.shape[0], dtype, own=True)
        return v.transpose(1, 2).reshape(-1, self.shape[1])[:self.shape[0]]

    def rows(self, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The embedding lookup: idx (any shape) -> idx.shape + (K,), the reference dequantizer's values."""
        flat = idx.reshape(-1).long()
        t, lane = flat // TILE, flat % TILE
        shift = (lane // (TILE // 4) * 8).to(torch.int32).view(-1, 1, 1)  # row 16k + w of a tile: byte k of word w
        if self.q.dtype == torch.int8:  # model/cpu_simd.c's 8-bit tiles: rows in order
            q = self.q[t, ..., lane].unsqueeze(-1)  # (n, G, gs, 1)
        else:
            q = ((self.q[t, ..., lane % (TILE // 4)] >> shift) & 255).to(torch.uint8)  # (n, G, H|gs)
            q = (q if self.nibble else q.view(torch.int8)).unsqueeze(-1)
        s = self.s[t, :, lane]  # (n, G)
        o = None if self.o is None else self.o[t, :, lane]
        if self.sup is not None:  # a K-quant: d * sc and -(dmin * m), as its dequantizer computes them
            d, dm, ksub = self.sup
            s = d[t, :, lane].float().repeat_interleave(ksub, dim=1) * s.float()
            o = None if o is None else -(dm[t, :, lane].float().repeat_interleave(ksub, dim=1) * o.float())
        s, o = s.unsqueeze(-1), None if o is None else o.unsqueeze(-1)  # (n, G, 1)
        return _dequant(q, s, o)[..., 0].to(dtype).view(*idx.shape, self.shape[1])


class BlockWeight:
    """A quantized matrix read where it lies (model/cpu_simd.c's BLOCKS: the image's bytes, no copy): a split's
    DRAM tier or a ring slot, for as long as its bytes stay there. ``linear`` of at most ROWS_MAX float32 rows by the
    C kernel; more rows (a prefill) and everything else by the QuantWeight itself (dequantized where it is)."""

    parent = None  # never a sibling's view (``fused``)

    def __init__(self, w: QuantWeight, lib) -> None:
        self.w, self.lib, self.c = w, lib, cpu_simd.blocks(w.raw, w.scheme, w.shape, w.group)
        self.scheme, self.shape, self.group = w.scheme, w.shape, w.group
        self.qkv: tuple | None = None  # as TiledWeight's (``_simd_qkv``)

    device = property(lambda self: self.w.device)
    raw = property(lambda self: self.w.raw)  # the stored bytes it reads
    nbytes = 0  # nothing held beside the stored bytes

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.shape[1])
        if flat.shape[0] <= ROWS_MAX and x.dtype == torch.float32:
            y = cpu_simd.mv(self.lib, self.c, flat)[:, :self.shape[0]]
            return y.reshape(*x.shape[:-1], self.shape[0])
        return self.w.linear(x)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.w.dense(dtype)

    def rows(self, idx: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.w.rows(idx, dtype)


def reads_in_place(w, lib) -> bool:
    """Whether ``w`` is read in place by model/cpu_simd.c's library ``lib`` (a QuantWeight of its BLOCKS on the
    CPU)."""
    return lib is not None and isinstance(w, QuantWeight) and w.scheme in cpu_simd.BLOCKS \
        and w.raw.device.type == "cpu" and w.raw.dim() == 1 and w.raw.is_contiguous()


def tile(w: QuantWeight, lib=None) -> TiledWeight:
    """``w`` (a scheme of SCHEMES) in row tiles; ``lib``: model/cpu_simd.c's library, which then multiplies it."""
    q, s, o, gs, sup = _planes(w)
    n_pad = -(-w.shape[0] // TILE) * TILE
    q = _tiles(q, n_pad)  # (NT, G, H|gs, TILE) bytes; model/cpu_simd.c reads 8-bit ones so, rows in order
    if lib is None or w.scheme in NIBBLE:  # words: byte k of word j is row 16k + j
        q = q.view(*q.shape[:3], 4, TILE // 4).transpose(-1, -2).contiguous().view(torch.int32).squeeze(-1)
    planes = lambda t: None if t is None else _tiles(t, n_pad)  # noqa: E731
    sup = None if sup is None else (planes(sup[0]), planes(sup[1]), sup[2])
    return TiledWeight(q, planes(s), planes(o), w.scheme, w.shape, w.group, lib=lib, sup=sup)


def _concat(ts: list[TiledWeight], lib=None) -> TiledWeight:
    """Tiled siblings of one scheme, group and K, each of whole tiles, as one matrix."""
    cat = (lambda xs: None if xs[0] is None else torch.cat(xs))  # noqa: E731
    sup = None if ts[0].sup is None else (cat([t.sup[0] for t in ts]), cat([t.sup[1] for t in ts]), ts[0].sup[2])
    return TiledWeight(cat([t.q for t in ts]), cat([t.s for t in ts]), cat([t.o for t in ts]), ts[0].scheme,
                       (sum(t.shape[0] for t in ts), ts[0].shape[1]), ts[0].group, lib=lib, sup=sup)


def tileable(w, dtype: torch.dtype, simd: bool = False) -> bool:
    """Whether ``w`` is held in tiles by a float32 CPU run: by model/cpu_simd.c (``simd``) or inductor's kernels."""
    return isinstance(w, QuantWeight) and w.scheme in (SIMD_SCHEMES if simd else SCHEMES) \
        and dtype == torch.float32 and w.raw.device.type == "cpu"


@dataclasses.dataclass(frozen=True)
class Kernels:
    """Which kernels multiply the quantized matrices a CPU run holds: model/cpu_simd.c, built in ``build`` (None:
    not those), else, where it does not build here, inductor's (``inductor``; they take 10-25 s to compile in a
    fresh process and cache); neither: the matrices are held dequantized to float32."""
    build: Path | None = None
    inductor: bool = False


def hold(weights, dtype: torch.dtype, kernels: Kernels | None = None, dequantize: bool = True,
         in_place: bool = False) -> dict:
    """A group's weights as a CPU run holds them for the whole run: every QuantWeight of SCHEMES in row tiles
    (``TiledWeight``) where the run computes in float32 and ``kernels`` has kernels that work here (``Kernels``:
    model/cpu_simd.c, ``cpu_simd.library``; inductor's, ``available``); each other QuantWeight dequantized to
    ``dtype`` (``model.quant.dequantized``); plain ones as they are. Siblings (SIBLINGS) of one format and whole
    tiles are tiled together, each a view of the whole (``fused``): one kernel call for all of them. Not
    ``dequantize``: where no kernel takes a matrix, it is left as it is (``weights`` itself where none is tiled).
    ``in_place``: a matrix that model/cpu_simd.c reads where it lies (``reads_in_place``) is not copied but read
    there (``BlockWeight``; its bytes must stay while the result is used); the others as above."""
    from model.quant import dequantized

    untiled = (lambda: dequantized(weights, dtype)) if dequantize else (lambda: weights)  # noqa: E731
    if kernels is None or not any(tileable(w, dtype, kernels.build is not None) for w in weights.values()):
        return untiled()
    lib = _library(kernels)
    if lib is None and not (kernels.inductor and available()):
        return untiled()
    simd = lib is not None
    out = read_in_place(weights, dtype, kernels) if in_place else dict(weights)
    for names in SIBLINGS:
        ws = [out.get(n) for n in names]
        if all(tileable(w, dtype, simd) for w in ws) and len({(w.scheme, w.group, w.shape[1]) for w in ws}) == 1 \
                and all(w.shape[0] % TILE == 0 for w in ws):
            whole, first = _concat([tile(w, lib) for w in ws], lib), 0
            for n, w in zip(names, ws):
                out[n] = whole.view(first, w.shape[0] // TILE, w.shape)
                first += w.shape[0] // TILE
    for k, w in weights.items():
        if not isinstance(out[k], (TiledWeight, BlockWeight)):
            out[k] = tile(w, lib) if tileable(w, dtype, simd) else \
                w.dense(dtype) if isinstance(w, QuantWeight) and dequantize else w
    return out


def read_in_place(weights, dtype: torch.dtype, kernels: Kernels | None) -> dict:
    """``weights`` with each matrix that model/cpu_simd.c reads where it lies (``reads_in_place``) as a
    ``BlockWeight`` of the same bytes, where the run computes in float32 and the C builds here; the others as they
    are."""
    lib = _library(kernels) if dtype == torch.float32 else None
    return {k: BlockWeight(w, lib) if reads_in_place(w, lib) else w for k, w in weights.items()}


def _library(kernels: Kernels | None):
    """model/cpu_simd.c's library of ``kernels`` where it builds and checks out here, else None."""
    lib = cpu_simd.library(kernels.build) if kernels is not None and kernels.build is not None else None
    return lib if lib is not None and available(lib) else None


def fused(ws) -> TiledWeight | None:
    """The parent whose tiles ``ws`` are, in order and all of them, or None (``hold``'s siblings)."""
    p = getattr(ws[0], "parent", None)
    if p is None or any(getattr(w, "parent", None) is not p for w in ws):
        return None
    first = 0
    for w in ws:
        if w.first != first:
            return None
        first += w.q.shape[0]
    return p if first == p.q.shape[0] else None
