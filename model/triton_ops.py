"""One Triton kernel each for the small elementwise steps of a layer on CUDA: RMSNorm, the rotary embedding and
SwiGLU's silu(gate) * up.

Written as torch ops they are 5 to 10 kernels each (casts, powers, means, the rotation's halves, a stack), and
at a decode step each kernel costs its launch (2-3 us replayed from a CUDA graph, more eagerly), not its bytes:
the 135M-parameter SmolLM2 spent 3.4 ms a graphed step on some 55 kernels a layer. Here each is one kernel that
reads its inputs once, computing in float32 with the torch ops' order and roundings (FMA contraction off: a
product then a sum round twice, as two torch kernels do): RMSNorm ``(x * rsqrt(mean(x^2) + eps))`` rounded to
x's dtype, then times the weight; the rotation ``re * cos - im * sin`` and ``re * sin + im * cos`` of each
interleaved (re, im) pair; silu rounded to the gate's dtype, then times up. The reductions' order and the
``rsqrt``/``exp`` instructions are the GPU's, so values may differ from the torch ops' in the last bit.

model/transformer.py calls these on CUDA tensors when triton imports (``available``), so eager passes and CUDA
graphs compute the same; the CPU keeps the torch ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FUSION = {"enable_fp_fusion": False}  # launch option: no FMA contraction (a torch op rounds each step)


@triton.jit
def _rms_norm_kernel(x, w, y, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < D
    xf = tl.load(x + row * D + i, mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    t = (xf * r).to(x.dtype.element_ty).to(tl.float32)  # type_as(x)
    out = t * tl.load(w + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(y + row * D + i, out.to(y.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.transformer.rms_norm over x's last dimension (x contiguous in it), one program a row."""
    d = x.shape[-1]
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(d)
    _rms_norm_kernel[(xc.numel() // d,)](xc, weight, y, d, eps, BLOCK=block, num_warps=min(8, max(1, block // 256)),
                                         **FUSION)
    return y


@triton.jit
def _rope_kernel(x, cos, sin, pos, y, S, HALF, PAIRS, stride_pb, BLOCK: tl.constexpr):
    """One program a token: its PAIRS (re, im) pairs (heads x HALF) rotated by its position's angles."""
    t = tl.program_id(0).to(tl.int64)
    b, s = t // S, t % S
    p = tl.load(pos + b * stride_pb + s)
    j = tl.arange(0, BLOCK)
    ok = j < PAIRS
    re = tl.load(x + t * PAIRS * 2 + 2 * j, mask=ok, other=0.0).to(tl.float32)
    im = tl.load(x + t * PAIRS * 2 + 2 * j + 1, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos + p * HALF + j % HALF, mask=ok, other=0.0)
    sn = tl.load(sin + p * HALF + j % HALF, mask=ok, other=0.0)
    tl.store(y + t * PAIRS * 2 + 2 * j, (re * c - im * sn).to(y.dtype.element_ty), mask=ok)
    tl.store(y + t * PAIRS * 2 + 2 * j + 1, (re * sn + im * c).to(y.dtype.element_ty), mask=ok)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, hd) with interleaved pairs, rotated at positions ``pos`` (B or 1, S) int64 (row b of a (1, S)
    ``pos`` is every sequence's) from the (max_len, hd/2) float32 tables -> same shape and dtype."""
    b, s, h, hd = x.shape
    xc = x.contiguous()
    y = torch.empty_like(xc)
    pairs = h * hd // 2
    _rope_kernel[(b * s,)](xc, cos, sin, pos, y, s, hd // 2, pairs, pos.stride(0) if pos.shape[0] > 1 else 0,
                           BLOCK=triton.next_power_of_2(pairs), num_warps=4, **FUSION)
    return y


@triton.jit
def _silu_mul_kernel(g, u, y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    gf = tl.load(g + i, mask=ok, other=0.0).to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(g.dtype.element_ty).to(tl.float32)
    tl.store(y + i, (silu * tl.load(u + i, mask=ok, other=0.0).to(tl.float32)).to(y.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up, gate and up of one shape and dtype."""
    g, u = gate.contiguous(), up.contiguous()
    y = torch.empty_like(g)
    n = g.numel()
    _silu_mul_kernel[(triton.cdiv(n, 1024),)](g, u, y, n, BLOCK=1024, num_warps=4, **FUSION)
    return y
