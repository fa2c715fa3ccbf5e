"""model/triton_ops.py, a layer's small steps in one Triton kernel each on CUDA: RMSNorm, the rotary embedding and
silu(gate) * up against model/transformer.py's torch ops. On the CPU under Triton's interpreter in float32 (its
numpy casts to bf16 do not round as the GPU's do); on CUDA in bf16 and float32."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

CHECKS = """
import torch
import torch.nn.functional as F
from model import triton_ops as ops
from model.args import ModelArgs
from model.transformer import Rope
torch.manual_seed(0)

def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

def rms_ref(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w

def rope_ref(rope, x, pos):
    p = pos.expand(x.shape[0], x.shape[1])
    cos, sin = rope.cos[p].unsqueeze(2), rope.sin[p].unsqueeze(2)
    xf = x.float().unflatten(-1, (-1, 2))
    re, im = xf[..., 0], xf[..., 1]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2).type_as(x)

def run(dt, dev, tol):
    out = []
    for shape in [(2, 3, 576), (1, 1, 4096), (2, 5, 9, 64)]:  # a hidden state, a per-head (q/k) norm
        x = torch.randn(*shape, device=dev).to(dt)
        w = (torch.rand(shape[-1], device=dev) + 0.5).to(dt)
        got, ref = ops.rms_norm(x, w, 1e-5), rms_ref(x, w, 1e-5)
        out.append(("rms_norm", shape, got.dtype == ref.dtype and got.shape == ref.shape and rel(got, ref) < tol))
    g, u = torch.randn(3, 1536, device=dev).to(dt), torch.randn(3, 1536, device=dev).to(dt)
    out.append(("silu_mul", g.shape, rel(ops.silu_mul(g, u), F.silu(g) * u) < tol))
    rope = Rope(ModelArgs(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, vocab_size=10, ffn_hidden=8), 64, dev)
    x = torch.randn(2, 4, 9, 64, device=dev).to(dt)
    for pos in ([[5, 6, 7, 8]], [[1, 2, 3, 4], [9, 3, 0, 1]]):  # shared by the rows, each row its own
        pos = torch.tensor(pos, device=dev)
        out.append(("rope", tuple(pos.shape), rel(ops.rope(x, rope.cos, rope.sin, pos), rope_ref(rope, x, pos)) < tol))
    return out
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_ops_interpreter_float32():
    script = CHECKS + "\nfor name, shape, ok in run(torch.float32, 'cpu', 1e-6):\n    print(name, shape, ok)\n"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(  # ahead of the rest
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 6 and all(line.endswith(" True") for line in lines), proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_triton_ops_cuda(dtype, tol):
    """On the GPU against the torch ops: float32 to rounding, bf16 within one unit of its last place (2^-7 of the
    largest value) where a reduction's order or an exp flips a rounding."""
    scope: dict = {}
    exec(CHECKS, scope)  # noqa: S102  (the same checks as the interpreter's)
    results = scope["run"](dtype, "cuda", tol)
    assert len(results) == 6 and all(ok for _, _, ok in results), results


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layer_uses_one_kernel_per_step():
    """A decode step's dense layer on CUDA launches the fused kernels (not the torch ops' casts and powers)."""
    from model import transformer as T

    x = torch.randn(1, 1, 256, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        T.rms_norm(x, torch.ones(256, device="cuda"), 1e-5)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("_rms_norm_kernel" in n for n in names) and not any("pow" in n for n in names), names
