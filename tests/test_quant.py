"""model/quant.py: the ggml block formats dequantized bit for bit as gguf does (random blocks and the embedded
SmolLM2's own Q4_1 and Q8_0 tensors), row lookups, our int8/int4 round trips within their error bounds and
exact on weights that already lie on their grid, the checks' messages, the Triton kernels under Triton's
interpreter (a subprocess, TRITON_INTERPRET=1) and on CUDA."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from model import quant
from model.errors import ConfigError
from runtime.format.embedded import embedded_gguf

ROOT = Path(__file__).resolve().parent.parent
GGML = tuple(quant.GGUF_SCHEMES)
SHAPES = [(1, 256), (3, 512), (5, 768)]
# byte offsets of the fp16 fields of each block, overwritten with finite values in random blocks
FP16_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q4_k": (0, 2),
               "q5_k": (0, 2), "q6_k": (208,)}


def finite_fp16(gen: np.random.Generator, n: int) -> np.ndarray:
    """n random fp16 bit patterns, subnormals and the largest values included, never inf or NaN."""
    bits = gen.integers(0, 1 << 16, n, dtype=np.uint16)
    return np.where((bits & 0x7C00) == 0x7C00, bits ^ 0x4000, bits).astype(np.uint16)


def random_raw(scheme: str, shape: tuple[int, int], group: int | None = None, seed: int = 0) -> torch.Tensor:
    """Random storage bytes of ``scheme``: random quantized values, random finite fp16 scales."""
    gen = np.random.default_rng(seed)
    raw = gen.integers(0, 256, quant.storage_bytes(scheme, shape, group), dtype=np.uint8)
    if scheme in GGML:
        bs, ts = gguf.GGML_QUANT_SIZES[quant.GGUF_SCHEMES[scheme]]
        blocks = raw.reshape(-1, ts)
        for off in FP16_FIELDS[scheme]:
            blocks[:, off:off + 2] = finite_fp16(gen, len(blocks)).view(np.uint8).reshape(-1, 2)
    else:
        qbytes = shape[0] * shape[1] // (1 if scheme == "int8" else 2)
        raw[qbytes:] = finite_fp16(gen, (len(raw) - qbytes) // 2).view(np.uint8)
    return torch.from_numpy(raw)


def reference(raw: torch.Tensor, scheme: str, shape: tuple[int, int]) -> np.ndarray:
    return gguf.quants.dequantize(raw.numpy().reshape(shape[0], -1), quant.GGUF_SCHEMES[scheme])


# ---- ggml formats -------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", GGML)
def test_ggml_random_blocks_equal_gguf(scheme):
    for i, shape in enumerate(SHAPES):
        raw = random_raw(scheme, shape, seed=i)
        got = quant.dequantize(raw, scheme, shape)
        assert got.dtype == torch.float32 and got.shape == shape
        ref = reference(raw, scheme, shape)
        assert np.array_equal(got.numpy(), ref), (scheme, shape)
        assert torch.equal(quant.dequantize(raw, scheme, shape, dtype=torch.bfloat16), got.to(torch.bfloat16))
        rows = torch.tensor([shape[0] - 1, 0, shape[0] // 2, 0])
        assert np.array_equal(quant.dequantize_rows(raw, scheme, shape, None, rows).numpy(), ref[rows.numpy()])


def test_ggml_chunks_of_rows():
    """A matrix larger than one chunk of the torch path, each chunk written in place."""
    shape = (4 * (quant._CHUNK // 1024) + 3, 1024)
    raw = random_raw("q4_k", shape, seed=9)
    assert np.array_equal(quant.dequantize(raw, "q4_k", shape).numpy(), reference(raw, "q4_k", shape))


@pytest.fixture(scope="module")
def smollm2_tensors():
    """The embedded SmolLM2's quantized tensors: every layer's in Q4_1, the embedding in Q8_0."""
    reader = gguf.GGUFReader(embedded_gguf())
    kinds = {gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0}
    return [t for t in reader.tensors if t.tensor_type in kinds]


def test_smollm2_tensors_equal_gguf(smollm2_tensors):
    tensors = smollm2_tensors
    assert {t.tensor_type.name.lower() for t in tensors} == {"q4_1", "q8_0"}
    for t in tensors:
        scheme = t.tensor_type.name.lower()
        shape = tuple(int(s) for s in reversed(t.shape))
        raw = torch.from_numpy(np.array(t.data).reshape(-1))
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.array_equal(quant.dequantize(raw, scheme, shape).numpy(), ref), t.name
        if t.name == "token_embd.weight":
            ids = torch.tensor([0, 1, 2, 49151, 1000])
            assert np.array_equal(quant.dequantize_rows(raw, scheme, shape, None, ids).numpy(), ref[ids.numpy()])


@pytest.mark.parametrize("scheme", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_ggml_quantize_is_gguf(scheme):
    w = torch.randn(6, 128, generator=torch.Generator().manual_seed(1))
    raw = quant.quantize(w, scheme)
    assert raw.dtype == torch.uint8 and raw.numel() == quant.storage_bytes(scheme, (6, 128))
    ref = gguf.quants.quantize(w.numpy(), quant.GGUF_SCHEMES[scheme])
    assert np.array_equal(raw.numpy(), ref.reshape(-1))


def test_kquant_quantize_is_gguf_or_refused():
    w = torch.randn(2, 256)
    for scheme in ("q4_k", "q5_k", "q6_k"):
        try:
            raw = quant.quantize(w, scheme)
        except ConfigError as e:
            assert "cannot quantize" in str(e) and scheme in str(e)
        else:
            assert raw.numel() == quant.storage_bytes(scheme, (2, 256))


def test_sizes():
    assert quant.SCHEMES == ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "int8", "int4")
    assert quant.GGUF_SCHEMES["q4_k"] == gguf.GGMLQuantizationType.Q4_K
    assert [quant.block_size(s) for s in GGML] == [32] * 5 + [256] * 3
    assert quant.block_size("int4", 64) == 64
    assert quant.storage_bytes("q4_1", (2, 64)) == 2 * 2 * 20
    assert quant.storage_bytes("q6_k", (3, 512)) == 3 * 2 * 210
    assert quant.storage_bytes("int8", (2, 128), 64) == 2 * 128 + 2 * 2 * 2
    assert quant.storage_bytes("int4", (2, 128), 32) == 2 * 64 + 2 * 2 * 4 * 2
    # a 70B layer in int4 g64: 4.5 bits a weight
    assert quant.storage_bytes("int4", (28672, 8192), 64) == 28672 * 8192 * 9 // 16


# ---- int8 / int4 --------------------------------------------------------------------------------------

def int_params(raw: torch.Tensor, scheme: str, shape: tuple[int, int], group: int) -> list[torch.Tensor]:
    """The stored scales (and minimums) as float32 (rows, groups, 1)."""
    return [p.float().reshape(shape[0], -1, 1) for p in quant._parts(raw, scheme, shape, group)[1:]]


def heavy_tailed(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Gaussian weights with a few outliers (what clipping is for) and an all-zero row."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    w[torch.rand(shape, generator=gen) < 0.01] *= 8
    w[0] = 0
    return w


@pytest.mark.parametrize("group", quant.GROUP_SIZES)
def test_int8_round_trip_bound(group):
    """Per element |w - w'| <= max(s/2, |w| - 127 s) (round to nearest inside the range, clamp outside), the
    scale within the search's clipping (0.9 .. 1 times absmax / 127, fp16-rounded), and each group's squared
    error no larger than that of the unclipped scale fp16(absmax / 127)."""
    shape = (6, 384)
    w = heavy_tailed(shape, group)
    raw = quant.quantize(w, "int8", group)
    assert raw.numel() == quant.storage_bytes("int8", shape, group)
    got = quant.dequantize(raw, "int8", shape, group)
    (s,) = int_params(raw, "int8", shape, group)
    x, y = w.view(shape[0], -1, group), got.view(shape[0], -1, group)
    err = (x - y).abs()
    slack = 1e-6 * (x.abs() + s)
    assert (err <= torch.maximum(s / 2, x.abs() - 127 * s) + slack).all()
    amax = x.abs().amax(-1, keepdim=True)
    assert (s >= 0.9 * amax / 127 * (1 - 2 ** -10)).all() and (s <= amax / 127 * (1 + 2 ** -10)).all()
    s1 = (amax / 127).half().float()
    plain = (torch.where(s1 > 0, x / s1, 0.0).round().clamp(-127, 127) * s1 - x).square().sum(-1)
    assert (err.square().sum(-1) <= plain * (1 + 1e-5) + 1e-30).all()
    assert (got[0] == 0).all()


@pytest.mark.parametrize("group", quant.GROUP_SIZES)
def test_int4_round_trip_bound(group):
    """Per element |w - w'| <= s/2 + how far w lies outside the stored range [m, m + 15 s] (round to nearest
    inside, clamp outside), and each group's squared error no larger than that of the plain min/max range
    with fp16 parameters (the search tries it)."""
    shape = (6, 384)
    w = heavy_tailed(shape, group)
    raw = quant.quantize(w, "int4", group)
    assert raw.numel() == quant.storage_bytes("int4", shape, group)
    got = quant.dequantize(raw, "int4", shape, group)
    s, m = int_params(raw, "int4", shape, group)
    x, y = w.view(shape[0], -1, group), got.view(shape[0], -1, group)
    err = (x - y).abs()
    outside = torch.clamp(torch.maximum(m - x, x - (m + 15 * s)), min=0)
    assert (err <= s / 2 + outside + 1e-6 * (x.abs() + m.abs() + 16 * s)).all()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s0, m0 = ((hi - lo) / 15).half().float(), lo.half().float()
    q0 = torch.where(s0 > 0, (x - m0) / s0, 0.0).round().clamp(0, 15)
    plain = (q0 * s0 + m0 - x).square().sum(-1)
    assert (err.square().sum(-1) <= plain * (1 + 1e-5) + 1e-30).all()
    assert (got[0] == 0).all()


def test_int_quantizers_reduce_error():
    """Clipping and refitting beat plain min/max (int4) and absmax (int8) on Gaussian weights."""
    w = torch.randn(16, 1024, generator=torch.Generator().manual_seed(5))
    mse = lambda s, g: (quant.dequantize(quant.quantize(w, s, g), s, w.shape, g) - w).square().mean().item()
    x = w.view(16, -1, 64)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s0, m0 = ((hi - lo) / 15).half().float(), lo.half().float()
    plain4 = ((((x - m0) / s0).round().clamp(0, 15) * s0 + m0) - x).square().mean().item()
    assert mse("int4", 64) < 0.9 * plain4
    assert mse("int4", 32) < mse("int4", 64) < mse("int4", 128)
    assert mse("int8", 32) < mse("int8", 128) < 1e-4


def on_grid(shape: tuple[int, int], group: int, seed: int) -> torch.Tensor:
    """Weights exactly q * d + m per group (float32, two roundings), fp16 d and m, q in 0..15 using both ends."""
    gen = torch.Generator().manual_seed(seed)
    rows, ng = shape[0], shape[1] // group
    q = torch.randint(0, 16, (rows, ng, group), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(rows, ng, 1, generator=gen) * 0.01 + 1e-4).half().float()
    m = (torch.randn(rows, ng, 1, generator=gen) * 0.05).half().float()
    return (q * d + m).view(shape)


def test_int4_exact_on_its_grid(smollm2_tensors):
    """Weights on a 16-level grid with fp16 parameters come back exactly: synthetic ones, and SmolLM2's
    Q4_1 tensors dequantized (the same 32-value blocks as int4 with group 32)."""
    w = on_grid((8, 256), 32, 0)
    assert torch.equal(quant.dequantize(quant.quantize(w, "int4", 32), "int4", w.shape, 32), w)
    w = on_grid((8, 256), 64, 1)
    assert torch.equal(quant.dequantize(quant.quantize(w, "int4", 64), "int4", w.shape, 64), w)
    t = next(t for t in smollm2_tensors if t.name == "blk.0.attn_q.weight")
    w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
    assert torch.equal(quant.dequantize(quant.quantize(w, "int4", 32), "int4", w.shape, 32), w)


def test_int8_exact_on_q8_0_grid(smollm2_tensors):
    """SmolLM2's Q8_0 embedding, dequantized, comes back exactly as int8 with group 32."""
    t = next(t for t in smollm2_tensors if t.name == "token_embd.weight")
    w = torch.from_numpy(gguf.quants.dequantize(t.data[:512], t.tensor_type))
    assert torch.equal(quant.dequantize(quant.quantize(w, "int8", 32), "int8", w.shape, 32), w)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_int_random_bytes_rows_and_out(scheme):
    shape, group = (5, 256), 64
    raw = random_raw(scheme, shape, group, seed=3)
    full = quant.dequantize(raw, scheme, shape, group)
    q, *params = quant._parts(raw, scheme, shape, group)
    v = (q.float() if scheme == "int8" else torch.stack([q & 15, q >> 4], -1).reshape(5, -1).float())
    ref = v.view(5, -1, group) * params[0].float().unsqueeze(-1)
    if scheme == "int4":
        ref = ref + params[1].float().unsqueeze(-1)
    assert torch.equal(full, ref.view(shape))
    rows = torch.tensor([4, 1, 1])
    assert torch.equal(quant.dequantize_rows(raw, scheme, shape, group, rows), full[rows])
    buf = torch.full((shape[0] * shape[1] + 7,), 7.0, dtype=torch.bfloat16)
    got = quant.dequantize(raw, scheme, shape, group, torch.bfloat16, out=buf)
    assert got.data_ptr() == buf.data_ptr() and torch.equal(got, full.to(torch.bfloat16))
    assert (buf[-7:] == 7).all()


def test_quant_weight():
    w = torch.randn(4, 128)
    raw = torch.zeros(1000, dtype=torch.uint8)
    n = quant.storage_bytes("int4", (4, 128), 32)
    raw[100:100 + n] = quant.quantize(w, "int4", 32)
    qw = quant.QuantWeight(raw[100:100 + n], "int4", (4, 128), 32)  # an even offset into a caller's buffer
    assert qw.nbytes == n and qw.device == torch.device("cpu")
    dense = qw.dense()
    assert (dense - w).square().mean() < 0.01
    assert torch.equal(qw.rows(torch.tensor([2]), torch.bfloat16), dense[2:3].to(torch.bfloat16))
    odd = torch.zeros(n + 1, dtype=torch.uint8)
    odd[1:] = raw[100:100 + n]
    assert torch.equal(quant.QuantWeight(odd[1:], "int4", (4, 128), 32).dense(), dense)  # fp16 at odd offsets
    with pytest.raises(ConfigError, match="expected a 1-D uint8 tensor of"):
        quant.QuantWeight(raw[:n - 1], "int4", (4, 128), 32)


# ---- checks -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme, shape, group, why", [
    ("int4", (4, 33), 32, "even row length"),
    ("int8", (4, 96), 64, "multiple of 64"),
    ("q4_k", (4, 512 + 32), None, "multiple of 256"),
    ("q8_0", (64,), None, "2-D"),
    ("int4", (2, 3, 64), 32, "2-D"),
    ("q3_k", (4, 256), None, "unknown quantization scheme 'q3_k'"),
    ("int8", (4, 256), 48, "group size of 32, 64, 128"),
    ("int4", (4, 256), None, "group size of 32, 64, 128"),
    ("q4_0", (4, 256), 64, "fixed block of 32"),
])
def test_check_quantizable_messages(scheme, shape, group, why):
    name = "layers.3.feed_forward.w2.weight"
    with pytest.raises(ConfigError) as e:
        quant.check_quantizable(scheme, name, shape, group)
    assert name in str(e.value) and str(shape) in str(e.value) and why in str(e.value)
    quant.check_quantizable("int4", name, (4, 256), 128)
    with pytest.raises(ConfigError, match="2-D"):
        quant.quantize(torch.zeros(64), "int8", 32)


# ---- Triton -------------------------------------------------------------------------------------------

INTERPRET_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from model import quant, quant_triton
from test_quant import random_raw
assert not quant_triton.EXACT
for scheme in quant.SCHEMES:
    for shape in [(3, 256), (5, 512)]:
        group = 64 if scheme in ("int8", "int4") else None
        raw = random_raw(scheme, shape, group, seed=shape[0])
        ref = quant.dequantize(raw, scheme, shape, group)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = torch.empty(shape, dtype=dtype)
            parts = [p.contiguous() for p in quant._parts(raw, scheme, shape, group)]
            quant_triton.dequantize_into(scheme, parts, group, out)
            want = ref.to(dtype)
            same = torch.equal(out.view(torch.int16), want.view(torch.int16)) if dtype != torch.float32 \\
                else torch.equal(out.view(torch.int32), want.view(torch.int32))
            print(scheme, shape, dtype, "ok" if same else "DIFFERS")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_interpreter_equals_torch_path():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(  # ahead of the rest
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", INTERPRET_SCRIPT.format(tests=str(ROOT / "tests"))],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(quant.SCHEMES) * 2 * 3 and all(line.endswith(" ok") for line in lines), proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_gguf_bit_for_bit():
    """On CUDA (the Triton kernels where triton imports): float32 equal to gguf's dequantize (ours: to the
    torch path on the CPU), bf16 the float32 result cast, rows, and no temporaries beyond the scale sections."""
    for scheme in quant.SCHEMES:
        for shape in [(3, 256), (67, 1536)]:
            group = 64 if scheme in ("int8", "int4") else None
            raw = random_raw(scheme, shape, group, seed=shape[0])
            ref = reference(raw, scheme, shape) if scheme in GGML else quant.dequantize(raw, scheme, shape, group)
            ref = torch.as_tensor(ref)
            dev = raw.cuda()
            got = quant.dequantize(dev, scheme, shape, group)
            assert got.is_cuda and np.array_equal(got.cpu().numpy(), ref.numpy()), (scheme, shape)
            buf = torch.empty(shape[0] * shape[1] + 5, dtype=torch.bfloat16, device="cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            bf = quant.dequantize(dev, scheme, shape, group, torch.bfloat16, out=buf)
            torch.cuda.synchronize()
            assert torch.cuda.max_memory_allocated() - before <= max(1 << 20, raw.numel() // 4)
            assert torch.equal(bf.cpu(), ref.to(torch.bfloat16))
            rows = torch.tensor([shape[0] - 1, 0, 1], device="cuda")
            assert torch.equal(quant.dequantize_rows(dev, scheme, shape, group, rows).cpu(), ref[rows.cpu()])


def compile_for_hopper(kernel, signature: dict, constexprs: dict, aligned: tuple[str, ...] = ()) -> str:
    """PTX of ``kernel`` compiled for sm_90 (no GPU needed: Triton's own toolchain); the arguments named in
    ``aligned`` known divisible by 16, as Triton specializes them at a launch when they are."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constexprs, "constexpr")}, constexprs=constexprs,
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")  # newer Triton's note on its default
def test_triton_ptx_rounds_twice():
    """The kernels whose reference rounds a multiply and then an add (q4_1, q5_1, q4_k, q5_k, int4) compile to
    separate mul and add.rn/sub.rn instructions for sm_90, never to an FMA."""
    from model import quant_triton as qt

    if not qt.EXACT:
        pytest.skip("TRITON_INTERPRET is set in this process")
    raw = {"raw": "*u8", "out": "*fp32"}
    ptx = [compile_for_hopper(qt._blocks32_kernel, {**raw, "n_blocks": "i32"},
                              {"SCHEME": s, "TS": qt._BLOCKS32[s][0], "QOFF": qt._BLOCKS32[s][1],
                               "QHOFF": qt._BLOCKS32[s][2], "NB": 32, "EXACT": True}) for s in ("q4_1", "q5_1")]
    ptx += [compile_for_hopper(qt._kquant_kernel, {**raw, "n_rows": "i32"},
                               {"SCHEME": s, "TS": qt._KQUANTS[s][0], "QOFF": qt._KQUANTS[s][1], "SUB": 32, "NS": 32,
                                "EXACT": True}) for s in ("q4_k", "q5_k")]
    ptx.append(compile_for_hopper(qt._int_kernel, {"q": "*u8", "scale": "*fp16", "minimum": "*fp16", "out": "*fp32",
                                                   "n_groups": "i32"},
                                  {"INT4": True, "GROUP": 64, "NG": 16, "EXACT": True}))
    for text in ptx:
        assert "fma.rn.f32" not in text and ("add.rn.f32" in text or "sub.rn.f32" in text)
        assert "mul.f32" in text or "mul.rn.f32" in text


MATMUL_SCRIPT = """
import torch
from model import quant, quant_triton
torch.manual_seed(0)
for scheme, group, n, k, m in [("int4", 32, 96, 256, 1), ("int8", 64, 64, 576, 3), ("int4", 64, 80, 576, 20),
                               ("int4", 128, 40, 512, 2), ("int8", 32, 33, 96, 64)]:
    w = torch.randn(n, k) * 0.05
    raw = quant.quantize(w, scheme, group)
    parts = [p.contiguous() for p in quant._parts(raw, scheme, (n, k), group)]
    x = torch.randn(m, k)
    y = quant_triton.int_matmul(x, scheme, parts, group, n, k)
    ref = torch.nn.functional.linear(x, quant.dequantize(raw, scheme, (n, k), group))
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    print(scheme, group, n, k, m, "ok" if y.shape == (m, n) and err < 1e-6 else f"DIFFERS {err:.2e}")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_fused_matmul_interpreter():
    """The fused dequantize-and-multiply kernel (decode steps on CUDA), fp32 under Triton's interpreter, equals
    the matmul of the dequantized matrix (to float rounding: the sums run in another order), rows of x from 1
    to FUSED_MAX_ROWS, row lengths that 256 does not divide, partial tiles of N."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(  # ahead of the rest
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", MATMUL_SCRIPT], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and all(line.endswith(" ok") for line in lines), proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dtype, ieee", [("bf16", False), ("fp32", True)])
def test_triton_fused_matmul_compiles_for_hopper(dtype, ieee):
    """The fused kernel compiles for sm_90 in both of its precisions (bf16 tensor-core dots, fp32 IEEE dots),
    reading the int4 bytes with vector loads."""
    from model import quant_triton as qt

    if not qt.EXACT:
        pytest.skip("TRITON_INTERPRET is set in this process")
    ptx = compile_for_hopper(qt._int_matmul_kernel,
                             {"x": f"*{dtype}", "q": "*u8", "scale": "*fp16", "minimum": "*fp16", "y": f"*{dtype}",
                              "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32"},
                             {"INT4": True, "GROUP": 64, "BM": 16, "BN": 64, "BK": 256, "IEEE": ieee})
    assert ("mma" in ptx) == (dtype == "bf16") and "ld.global" in ptx


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_matmul_equals_dense_path():
    """QuantWeight.linear on CUDA: decode-sized x through the fused kernel, prefill-sized through dequantize +
    matmul, both against the matmul of the dequantized matrix in fp32 (bf16: within its rounding)."""
    torch.manual_seed(0)
    for scheme, group in [("int4", 64), ("int8", 64), ("int4", 32)]:
        w = torch.randn(1536, 576) * 0.05
        qw = quant.QuantWeight(quant.quantize(w, scheme, group).cuda(), scheme, (1536, 576), group)
        dense = qw.dense(torch.float32)
        for m in (1, 7, 64, 300):
            x = torch.randn(1, m, 576, device="cuda")
            ref = torch.nn.functional.linear(x.double(), dense.double())
            got32 = qw.linear(x)
            assert got32.shape == (1, m, 1536) and (got32 - ref).abs().max().item() < 1e-4, (scheme, m)
            got16 = qw.linear(x.bfloat16())
            assert (got16.double() - ref).abs().max().item() < 0.05 * ref.abs().max().item(), (scheme, m)


# ---- the GGUF formats' fused matmul (model/quant_gemv.py) ----------------------------------------------

GEMV_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from model import quant, quant_gemv as qg
from test_quant import random_raw
assert not qg.EXACT
L, F = qg.Launch, torch.nn.functional

def close(y, x, w, rel):
    # |y - F.linear(x, w)| within rel of it plus twice the rounding bound of a K-term float32 sum
    ref = F.linear(x.float(), w)
    bound = 2 * x.shape[1] * 2.0 ** -24 * F.linear(x.float().abs(), w.abs())
    return bool(((y.float() - ref).abs() <= rel * ref.abs() + bound).all())

def report(scheme, what, ok):
    print(scheme, what, "ok" if ok else "DIFFERS")

for scheme in qg.BLOCKS:
    n, k = 5, 512
    raw = random_raw(scheme, (n, k), seed=7)
    w = quant.dequantize(raw, scheme, (n, k))
    y = qg.gguf_matmul(torch.eye(k), scheme, raw, n, k, L(True, 64, k, 16, 4, 1))
    report(scheme, "every value exact (DOT, x the identity)", torch.equal(y, w.T))
    x = torch.zeros(3, k)
    x[0, 1], x[1, k - 3], x[2] = 1, 1, torch.randn(k)
    y = qg.gguf_matmul(x, scheme, raw, n, k, L(False, 8, 1, 32, 1, 1))
    report(scheme, "one-hot rows exact (FMA)", torch.equal(y[:2], w[:, [1, k - 3]].T))
    report(scheme, "fp32 (FMA)", close(y[2:], x[2:], w, 0))
    if scheme in qg.FACTORED:
        y = qg.gguf_matmul(x, scheme, raw, n, k, L(False, 8, 1, 32, 1, 1, True))
        report(scheme, "one-hot rows exact (FMA, factored)", torch.equal(y[:2], w[:, [1, k - 3]].T))
        report(scheme, "fp32 (FMA, factored)", close(y[2:], x[2:], w, 0))
    small = quant.random_quantized(scheme, (n, k), None, torch.Generator().manual_seed(1)).raw  # fp16-sized values
    xh = torch.randn(17, k).half()
    y = qg.gguf_matmul(xh, scheme, small, n, k)
    ws = quant.dequantize(small, scheme, (n, k)).half().float()
    report(scheme, "fp16, 17 rows (DOT)", close(y, xh, ws, 2.0 ** -11))

for scheme in ("q4_0", "q4_k"):  # what does not depend on the format: 3 steps of 8 chunks, the last one partial
    n, k = 9, 768
    raw = random_raw(scheme, (n, k), seed=8)
    w = quant.dequantize(raw, scheme, (n, k))
    x = torch.randn(2, k)
    y = qg.gguf_matmul(x, scheme, raw, n, k, L(False, 4, 1, 8, 1, 2))
    report(scheme, "fp32, the row split in two (FMA)", close(y, x, w, 0))
    xb = torch.randn(1, k).bfloat16()
    y = qg.gguf_matmul(xb, scheme, raw, n, k, L(False, 2, 1, 8, 1, 1))
    report(scheme, "bf16 (FMA)", close(y, xb, w, 2.0 ** -7))  # the interpreter truncates to bf16
    y = qg.gguf_matmul(xb, scheme, raw, n, k, L(False, 2, 1, 8, 1, 1, True))  # factored where the format is
    report(scheme, "bf16 (FMA, factored)", close(y, xb, w, 2.0 ** -7))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gguf_matmul_interpreter():
    """model/quant_gemv.py under Triton's interpreter, every GGUF format: every dequantized value the kernel
    multiplies equals gguf's in float32 (x the identity: y = w.T exactly; one-hot rows of x: columns of w exactly),
    and products against dequantize-then-F.linear in float32 within twice a K-term float32 sum's rounding bound
    (plus x's dtype's rounding of the result: fp16 2^-11, bf16 2^-7 as the interpreter truncates); both ways of
    multiplying (FMA: one row of x; DOT: 17 rows, the tensor-core path), rows of w not a multiple of a program's,
    a split row and a partial last step."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(  # ahead of the rest
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", GEMV_SCRIPT.format(tests=str(ROOT / "tests"))],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    from model import quant_gemv as qg

    assert len(lines) == 4 * len(GGML) + 2 * len(qg.FACTORED) + 6, proc.stdout
    assert all(line.endswith(" ok") for line in lines), proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gguf_matmul_launch_config():
    """Launch parameters from the shape: FMA for one row of x (or float32 x), DOT for more; enough programs for the
    GPU where the matrix allows, by fewer rows of w a program then by splitting the row; never an empty split."""
    from model import quant_gemv as qg

    shapes = [(n, k) for n in (1, 5, 1024, 4096, 14336, 128256) for k in (256, 4096, 14336, 28672)]
    for scheme in GGML:
        for n, k in shapes:
            for m, f32 in [(1, False), (1, True), (4, False), (4, True), (16, False), (17, False), (64, False)]:
                lc = qg.launch_config(scheme, m, n, k, f32, 132)
                assert lc.dot == (m > 1 and not f32) and lc.block_m == (qg.DOT_BLOCK_M if lc.dot else 1)
                steps = -(-(k // qg.BLOCKS[scheme][2]) // lc.chunks)
                per = -(-steps // lc.split)
                assert 1 <= lc.split <= steps and (lc.split - 1) * per < steps, (scheme, m, n, k, lc)
                programs = -(-n // lc.block_n) * -(-m // lc.block_m)
                if lc.split > 1:  # split only where the programs are too few, and not beyond what is asked
                    assert programs < qg.SPLIT_PROGRAMS_PER_SM * 132 and (lc.split - 1) * programs < 4 * 132 * 4
                if not lc.dot and lc.block_n > 1:
                    assert -(-n // lc.block_n) * m >= qg.FMA_PROGRAMS_PER_SM * 132


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_gguf_matmul_usable():
    """QuantWeight.linear takes the GGUF kernel only for x in float32, bf16 or fp16 and bytes aligned as the format's
    loads need (else it dequantizes): 16 bytes for Q4_K/Q5_K, 8 for Q5_1, 4 for Q4_1, 2 for the others."""
    from model import quant_gemv as qg

    buf = torch.zeros(4096 + 16, dtype=torch.uint8)
    base = (-buf.data_ptr()) % 16  # the first 16-byte aligned byte
    for scheme, align in [("q4_k", 16), ("q5_k", 16), ("q5_1", 8), ("q4_1", 4), ("q4_0", 2), ("q6_k", 2)]:
        assert qg.usable(buf[base:], scheme, torch.bfloat16) and qg.usable(buf[base + align:], scheme, torch.float32)
        assert not qg.usable(buf[base + align // 2:], scheme, torch.float16), scheme
        assert not qg.usable(buf[base:], scheme, torch.float64) and not qg.usable(buf[base:], "int4", torch.bfloat16)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("scheme, dot, factor", [("q4_k", False, False), ("q4_0", True, False),
                                                 ("q4_k", False, True), ("q6_k", False, True)])
def test_gguf_matmul_compiles_for_hopper(scheme, dot, factor):
    """The GGUF kernel compiles for sm_90 both ways (bf16 x): quantized bytes put under 2^23 by byte permutes (the
    few int -> float conversions are of the scales, one for many values), Q4_K's minimum added by add.rn (never
    fused into the multiply before it), its blocks and x read with vector loads; DOT on the tensor cores."""
    from model import quant_gemv as qg

    if not qg.EXACT:
        pytest.skip("TRITON_INTERPRET is set in this process")
    sig = {"x": "*bf16", "raw": "*u8", "y": "*bf16", **dict.fromkeys(
        ("M", "N", "n_chunks", "stride_xm", "stride_ym", "row_bytes", "iters", "magic"), "i32")}
    ptx = compile_for_hopper(qg._gguf_matmul_kernel, sig,
                             {"SCHEME": scheme, "TS": qg.BLOCKS[scheme][0], "BN": 64 if dot else 8,
                              "NC": 16 if dot else 32, "BM": 16 if dot else 1, "DOT": dot, "XBF16": True,
                              "IEEE": False, "EXACT": True, "FACTOR": factor},
                             aligned=("x", "raw", "y", "stride_xm", "stride_ym", "row_bytes", "magic"))
    assert ptx.count("prmt.b32") >= 8 * ptx.count("cvt.rn.f32.") and "prmt.b32" in ptx
    assert ("mma" in ptx) == dot
    if factor:  # the subnormal bytes multiplied by fma.rn (no .ftz), the chunk's sums scaled once
        assert ptx.count("fma.rn.f32") >= ptx.count("prmt.b32") and ".ftz" not in ptx
    if scheme == "q4_k":
        assert "add.rn.f32" in ptx and "ld.global.v2.b32" in ptx and "ld.global.v4.b32" in ptx


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gguf_matmul():
    """QuantWeight.linear on CUDA, every GGUF format through the fused kernel (no dense scratch allocated): the
    float32 values multiplied are gguf's bit for bit (one-hot rows of x give columns of w exactly, FMA) and DOT
    multiplies their bf16 rounding (rows of the bf16 identity give it exactly); float32 products within twice a
    K-term sum's rounding bound of dequantize-then-F.linear; bf16 x of 1 row (FMA, float32 values) and of 7 and 64
    rows (DOT) within bf16's rounding of the result; a row split in three."""
    from model import quant_gemv as qg

    torch.manual_seed(0)
    f = torch.nn.functional
    n, k = 300, 2304  # 2304: 72 blocks of 32, 9 super-blocks (36 chunks: 32-chunk steps, the last one partial)
    for scheme in GGML:
        quant.warm_up(scheme, None, torch.bfloat16, "cuda")  # every launch of a decode step compiled
        raw = random_raw(scheme, (n, k), seed=11).cuda()
        qw = quant.QuantWeight(raw, scheme, (n, k))
        w = qw.dense(torch.float32)
        assert torch.equal(w.cpu(), torch.from_numpy(reference(raw.cpu(), scheme, (n, k))))

        def close(y, x, ref_w, rel):
            ref = f.linear(x.double(), ref_w.double())
            bound = 2 * k * 2.0 ** -24 * f.linear(x.double().abs(), ref_w.double().abs())
            return bool(((y.double() - ref).abs() <= rel * ref.abs() + bound).all())

        js = [0, 1, 255, 256, k - 1]
        x = torch.zeros(len(js), k, device="cuda")
        x[range(len(js)), js] = 1
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        y = qw.linear(x)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before < n * k, scheme  # no dense copy of w (2 n k bytes)
        assert torch.equal(y, w[:, js].T), scheme
        eye = torch.eye(k, device="cuda", dtype=torch.bfloat16)[:64]  # 64 rows: DOT, the values rounded to bf16
        assert torch.equal(qw.linear(eye), w[:, :64].T.bfloat16()), scheme
        x = torch.randn(3, 1, k, device="cuda")
        assert close(qw.linear(x).view(3, n), x.view(3, k), w, 0), scheme
        y = qg.gguf_matmul(x.view(3, k), scheme, raw, n, k, qg.Launch(False, 4, 1, 32, 1, 3))
        assert close(y, x.view(3, k), w, 0), scheme
        for m in (1, 7, 64):
            xb = torch.randn(m, k, device="cuda").bfloat16()
            assert close(qw.linear(xb), xb, w if m == 1 else w.bfloat16(), 2.0 ** -8), (scheme, m)
