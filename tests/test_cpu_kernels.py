"""model/cpu_kernels.py: quantized matrices a CPU run holds, in row tiles, multiplied by torch.compile's kernels.

Each covered format against the reference (float32 x times model/quant.py's dequantized matrix): the decode kernel
and the prefill path within 1e-5 of the largest |y| (other float32 roundings), the dequantized values and an
embedding lookup bit for bit; a group's siblings tiled together; and a quantized model's tokens and logits with the
kernels equal to those without, in memory and from a streamed run's DRAM tier. Tiny shapes, rows that do not fill a
tile: each compile takes about a second on the 2-core machine the first time (inductor caches them on disk)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ckpt_writers import tiny_args
from test_streaming import reference, run_streamed

from model import cpu_kernels as ck
from model import cpu_simd, quant
from model.synthetic import SyntheticCheckpoint
from model.transformer import linears
from runtime.engine.config import EngineConfig
from runtime.env import cache_dir
from runtime.format.image import Image, WeightFormat
from runtime.format.pack import pack

SHAPE = (96, 64)  # one and a half tiles: the padded rows are left out
# model/cpu_simd.c as the runtime builds it (built once per host and source, into the runtime's cache), and its AVX2
# code where the host has AVX-512 too
SIMD = {isa: cpu_simd.library(cache_dir() / "cpu-kernels", isa) for isa in cpu_simd.ISA_FLAGS}
NEEDS = "model/cpu_simd.c needs AVX-512F or AVX2 (and a C compiler)"
# the kernel families: model/cpu_simd.c's and inductor's
BACKENDS = [pytest.param("simd", marks=pytest.mark.skipif(SIMD["native"] is None, reason=NEEDS)),
            pytest.param("simd-avx2", marks=pytest.mark.skipif(SIMD["avx2"] is None, reason=NEEDS)), "inductor"]


def backends(*names: str) -> list:
    return [b for b in BACKENDS if getattr(b, "values", (b,))[0] in names]


def lib(backend: str):
    return SIMD["avx2" if backend == "simd-avx2" else "native"] if backend.startswith("simd") else None


def kernels(backend: str) -> ck.Kernels:
    return ck.Kernels(cache_dir() / "cpu-kernels") if backend == "simd" else ck.Kernels(inductor=True)


def random_weight(scheme: str, shape: tuple[int, int], group: int | None, seed: int) -> quant.QuantWeight:
    """Random levels and random finite fp16 scales and offsets of either sign."""
    gen = torch.Generator().manual_seed(seed)
    w = quant.random_quantized(scheme, shape, group, gen)
    fp16 = lambda n: (torch.randn(n, generator=gen) * 0.02).half()  # noqa: E731
    if scheme in quant.GGML_BLOCKS:
        blocks = w.raw.view(-1, quant.GGML_BLOCKS[scheme][1])
        for off in quant.FP16_FIELDS[scheme]:
            blocks[:, off:off + 2] = fp16(blocks.shape[0]).view(torch.uint8).view(-1, 2)
    else:
        for part in quant._parts(w.raw, scheme, shape, group)[1:]:
            part.copy_(fp16(part.numel()).view(part.shape))
    return w


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme, group", [("q4_0", None), ("q4_1", None), ("int4", 32), ("q8_0", None),
                                           ("int8", 32), ("int4", 64), ("int8", 64), ("q5_0", None),
                                           ("q5_1", None), ("q4_k", None), ("q5_k", None), ("q6_k", None)])
def test_tiles_equal_the_reference(scheme, group, backend):
    """Dequantized values and an embedding lookup bit for bit, decode rows (1-4) and a prefill's within 1e-5; the
    K-quants and q5_* by model/cpu_simd.c only (K: a row of two 256-value super-blocks)."""
    if backend == "inductor" and scheme not in ck.SCHEMES:
        pytest.skip(f"inductor's kernels do not take {scheme}")
    shape = (SHAPE[0], 512) if scheme.endswith("_k") else SHAPE  # two super-blocks a row
    w = random_weight(scheme, shape, group, seed=1)
    t = ck.tile(w, lib(backend))
    dense = w.dense()
    assert torch.equal(t.dense(), dense)
    idx = torch.tensor([[0, 63], [64, 95]])
    assert torch.equal(t.rows(idx), w.rows(idx))
    gen = torch.Generator().manual_seed(2)
    for m in (1, 2, 3, ck.ROWS_MAX, ck.ROWS_MAX + 1):  # the decode kernel, then a prefill's dequantized chunk
        x = torch.randn(2, m, shape[1], generator=gen)[:1]  # (1, m, K), as a pass's activations
        y = t.linear(x)
        assert y.shape == (1, m, shape[0]) and rel_err(y, F.linear(x, dense)) < 1e-5, (scheme, m)


@pytest.mark.parametrize("backend", backends("simd", "simd-avx2"))
@pytest.mark.parametrize("scheme, group", [("q4_1", None), ("int4", 64), ("q4_k", None)])
def test_nibble_tiles_with_subnormals_flushed(scheme, group, backend):
    """AVX2's nibble tiles take the masked bits as subnormal floats (model/cpu_simd.c SUBNORMAL): with DAZ set in the
    computing thread (torch.set_flush_denormal: one thread, this one) they convert the values instead, and the
    products are the same within 1e-5; x of every magnitude a model's activations take."""
    shape = (SHAPE[0], 512) if scheme.endswith("_k") else SHAPE
    w = random_weight(scheme, shape, group, seed=3)
    assert_with_and_without_daz(ck.tile(w, lib(backend)), w.dense(), torch.Generator().manual_seed(4))


def assert_with_and_without_daz(t, dense: torch.Tensor, gen: torch.Generator) -> None:
    """``t.linear`` within 1e-5 of x times ``dense``, x of every magnitude a model's activations take, with DAZ set
    in the computing thread (torch.set_flush_denormal: one thread, this one) and without."""
    x = torch.randn(1, 3, dense.shape[1], generator=gen) * torch.logspace(-6, 4, 3).view(1, 3, 1)
    ref = F.linear(x, dense)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for flush in (False, True):
            assert torch.set_flush_denormal(flush) or not flush  # False: this CPU cannot (then the first pass only)
            for r in range(3):
                assert rel_err(t.linear(x[:, r:r + 1]), ref[:, r:r + 1]) < 1e-5, (flush, r)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", backends("simd", "simd-avx2"))
@pytest.mark.parametrize("scheme, group", [("q4_0", None), ("q4_1", None), ("q8_0", None), ("q4_k", None),
                                           ("q6_k", None), ("int8", 32), ("int8", 64), ("int4", 32), ("int4", 64),
                                           ("int4", 128)])
def test_read_in_place_equals_the_reference(scheme, group, backend):
    """model/cpu_simd.c's BLOCKS read the stored bytes where they lie (``BlockWeight``, no copy): decode rows (1-4)
    within 1e-5 of the reference, a prefill's rows by the QuantWeight itself; bytes at an odd address (a section's
    fp16 scales unaligned) give the same; the 4-bit ones with DAZ set in the computing thread too (they read their
    values as subnormals, else convert them), x of every magnitude a model's activations take."""
    shape = (SHAPE[0], 512) if scheme.endswith("_k") else (SHAPE[0], 256)
    w = random_weight(scheme, shape, group, seed=6)
    buf = torch.empty(w.raw.numel() + 1, dtype=torch.uint8)
    buf[1:] = w.raw
    odd = quant.QuantWeight(buf[1:], scheme, shape, group)
    b, b_odd = ck.BlockWeight(w, lib(backend)), ck.BlockWeight(odd, lib(backend))
    assert b.nbytes == 0 and b.c.q == w.raw.data_ptr() and torch.equal(b.dense(), w.dense())
    dense = w.dense()
    gen = torch.Generator().manual_seed(7)
    for m in (1, 2, 3, ck.ROWS_MAX, ck.ROWS_MAX + 1):
        x = torch.randn(1, m, shape[1], generator=gen)
        y = b.linear(x)
        assert y.shape == (1, m, shape[0]) and rel_err(y, F.linear(x, dense)) < 1e-5, (scheme, m)
        assert torch.equal(b_odd.linear(x), y)
    assert_with_and_without_daz(b, dense, gen)
    held = ck.read_in_place({"w": w, "n": torch.ones(4)}, torch.float32, kernels("simd"))
    assert isinstance(held["w"], ck.BlockWeight) and held["w"].w is w
    assert ck.read_in_place({"w": w}, torch.bfloat16, kernels("simd"))["w"] is w  # a bf16 run: as it is
    assert ck.read_in_place({"w": w}, torch.float32, None)["w"] is w


@pytest.mark.parametrize("backend", backends("simd", "inductor"))
@pytest.mark.parametrize("scheme", ["q4_1", "q8_0"])
def test_hold_tiles_siblings_together(backend, scheme):
    """q, k and v tiled as one matrix (4-bit or 8-bit tiles: each family's layout), each a view of it."""
    ws = {f"attention.{n}.weight": random_weight(scheme, (64 if n != "wq" else 128, 64), None, seed=i)
          for i, n in enumerate(("wq", "wk", "wv", "wo"))}
    ws["attention_norm.weight"] = torch.ones(64)
    ws["feed_forward.w1.weight"] = random_weight("q5_0", (64, 64), None, seed=7)  # inductor's: no kernel
    held = ck.hold(ws, torch.float32, kernels(backend))
    q, k, v = (held[f"attention.{n}.weight"] for n in ("wq", "wk", "wv"))
    whole = ck.fused((q, k, v))
    assert whole is not None and whole.shape == (256, 64) and q.nbytes == 0 and whole.nbytes > 0
    assert ck.fused((q, v)) is None and isinstance(held["attention.wo.weight"], ck.TiledWeight)
    w1 = held["feed_forward.w1.weight"]  # model/cpu_simd.c tiles it, inductor's leave it dequantized
    assert torch.equal(w1.dense() if backend == "simd" else w1, ws["feed_forward.w1.weight"].dense())
    assert isinstance(w1, ck.TiledWeight) == (backend == "simd")
    assert held["attention_norm.weight"] is ws["attention_norm.weight"]
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(3))
    for y, name in zip(linears(x, (q, k, v)), ("wq", "wk", "wv")):
        assert rel_err(y, F.linear(x, ws[f"attention.{name}.weight"].dense())) < 1e-5
    # a bf16 run, or no kernels: every quantized matrix dequantized, as before
    assert (whole.lib is not None) == (backend == "simd")
    assert all(isinstance(t, torch.Tensor) for t in ck.hold(ws, torch.bfloat16, kernels(backend)).values())
    assert all(isinstance(t, torch.Tensor) for t in ck.hold(ws, torch.float32, None).values())


@pytest.fixture(scope="module", params=[("int4", 32), ("int8", 64)])
def q_image(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("cpuk") / "q.img"
    pack(SyntheticCheckpoint(tiny_args(scaling=None), seed=3), out,
         dtype=WeightFormat("fp32", *request.param, quantize_output=True), quiet=True)
    return Image.open(out)


@pytest.mark.parametrize("backend", backends("simd", "inductor"))
def test_model_outputs_unchanged(q_image, monkeypatch, backend):
    """An int4 and an int8 model (every matrix, the output too; 4-bit and 8-bit tiles): greedy tokens and every
    prefill logit with the kernels as without, in memory (--mode full) and from a streamed run's DRAM tier
    (preload); model/cpu_simd.c's decode steps attend by it too."""
    q4_image = q_image
    prompt, new = [3, 17, 42, 7, 99, 5, 23, 250, 1], 4
    monkeypatch.setenv("LLMS_CPU_KERNELS", "0")
    ref_tokens, ref_logits = reference(q4_image, prompt, new)
    monkeypatch.setenv("LLMS_CPU_KERNELS", "auto" if backend == "simd" else "inductor")
    fused_steps = []  # the decode steps' groups went through the group kernels (C or compiled graphs)
    attended, real_attention = [], cpu_simd.decode_attention
    monkeypatch.setattr(cpu_simd, "decode_attention", lambda *a: attended.append(1) or real_attention(*a))

    def spy(f):
        def wrapped(*a, **k):
            fused_steps.append(f(*a, **k))
            return fused_steps[-1]
        return wrapped

    for name in ("attention_in", "ffn"):
        monkeypatch.setattr(ck, name, spy(getattr(ck, name)))
    tokens, logits = reference(q4_image, prompt, new)
    assert tokens == ref_tokens and (logits - ref_logits).abs().max().item() <= 1e-5
    assert sum(r is not None for r in fused_steps) == 2 * q4_image.args.n_layers * (new - 1)
    assert len(attended) == (q4_image.args.n_layers * (new - 1) if backend == "simd" else 0)
    tokens, logits, *_ = run_streamed(q4_image, EngineConfig.of(mode="preload", workers=1, quiet=True), prompt, new)
    assert tokens == ref_tokens and (logits - ref_logits).abs().max().item() <= 1e-5
    if backend == "simd":  # streamed: each group read in place from its ring slot (BlockWeight), w1 and w3 apart
        made, real_blocks = [], cpu_simd.blocks
        monkeypatch.setattr(cpu_simd, "blocks", lambda *a: made.append(a[1]) or real_blocks(*a))
        fused_steps.clear()
        tokens, logits, *_ = run_streamed(q4_image, EngineConfig.of(mode="stream", workers=1, quiet=True), prompt,
                                          new)
        assert tokens == ref_tokens and (logits - ref_logits).abs().max().item() <= 1e-5
        assert made and set(made) == {f for f, _ in q4_image.formats().values()}
        assert sum(r is not None for r in fused_steps) == 2 * q4_image.args.n_layers * (new - 1)


@pytest.mark.parametrize("backend", backends("simd", "simd-avx2"))
@pytest.mark.parametrize("heads, kv_heads, hd", [(9, 3, 64), (4, 4, 44), (8, 2, 16), (2, 1, 272)])
def test_simd_decode_attention_equals_sdpa(heads, kv_heads, hd, backend):
    """model/cpu_simd.c's decode step (two sequences; the new keys and values written to the cache's slot end - 1,
    more slots allocated, then attention over [0, end)) against torch's: grouped-query heads, head sizes of whole
    16-lane vectors and not, queries and keys as views into a wider row (a fused q|k|v output)."""
    gen = torch.Generator().manual_seed(4)
    b, slots, end = 2, 40, 29
    qkv = torch.randn(b, 1, (heads + 2 * kv_heads) * hd, generator=gen)
    q, k, v = (t.view(b, 1, -1, hd) for t in qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1))
    ck_, cv_ = (torch.randn(b + 1, slots, kv_heads, hd, generator=gen) for _ in range(2))
    keys, values = ck_.clone(), cv_.clone()
    keys[:b, end - 1], values[:b, end - 1] = k[:, 0], v[:, 0]
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), keys[:b, :end].transpose(1, 2),
                                         values[:b, :end].transpose(1, 2), enable_gqa=heads != kv_heads)
    got = cpu_simd.decode_attention(lib(backend), q, k, v, ck_, cv_, end - 1)
    assert torch.equal(ck_, keys) and torch.equal(cv_, values)
    assert got.shape == (b, 1, heads * hd) and rel_err(got, ref.transpose(1, 2).reshape(b, 1, -1)) < 1e-5


def test_the_environment_picks_the_kernels(monkeypatch, tmp_path):
    """LLMS_CPU_KERNELS: auto (the default) the C kernels only, 1 with inductor's where they do not build, inductor
    inductor's only, 0 none; any other value refused by name before a run holds anything."""
    from model.errors import ConfigError
    from runtime.env import cpu_kernels

    monkeypatch.setenv("LLMSTREAM_CACHE_DIR", str(tmp_path))
    want = {"auto": ck.Kernels(tmp_path / "cpu-kernels"), "1": ck.Kernels(tmp_path / "cpu-kernels", inductor=True),
            "inductor": ck.Kernels(None, inductor=True), "0": None}
    for value, kernels in want.items():
        monkeypatch.setenv("LLMS_CPU_KERNELS", value)
        assert cpu_kernels() == kernels, value
    monkeypatch.delenv("LLMS_CPU_KERNELS")
    assert cpu_kernels() == want["auto"]
    monkeypatch.setenv("LLMS_CPU_KERNELS", "yes")
    with pytest.raises(ConfigError, match="LLMS_CPU_KERNELS='yes': expected one of auto, 1, inductor, 0"):
        cpu_kernels()


@pytest.mark.parametrize("backend", backends("simd", "simd-avx2"))
def test_simd_attention_input_of_mixed_formats(backend):
    """q, k and v of different formats (llama.cpp's Q4_K_M gives some layers' v Q6_K): not fused, still one C call,
    against the norm, the three matmuls over the reference's matrices and the rotation in torch."""
    gen = torch.Generator().manual_seed(5)
    heads, hd, dim = (4, 2), 64, 256
    ws = [random_weight(s, (n * hd, dim), None, seed=i)
          for i, (s, n) in enumerate((("q4_k", heads[0]), ("q4_k", heads[1]), ("q6_k", heads[1])))]
    tiled = [ck.tile(w, lib(backend)) for w in ws]
    assert ck.fused(tiled) is None
    h, norm = torch.randn(2, 1, dim, generator=gen), torch.rand(dim, generator=gen) + 0.5
    cos, sin = torch.rand(hd // 2, generator=gen), torch.rand(hd // 2, generator=gen)
    got = ck.attention_in(h, norm, 1e-5, tuple(tiled), heads, cos, sin)
    x = ck._rms(h[:, 0], norm, 1e-5)
    ref = [F.linear(x, w.dense()).view(2, -1, hd) for w in ws]
    ref = [ck._rotate(ref[0], cos, sin), ck._rotate(ref[1], cos, sin), ref[2]]
    for g, r in zip(got, ref):
        assert g.shape == (2, 1, *r.shape[1:]) and rel_err(g[:, 0], r) < 1e-5


@pytest.mark.parametrize("backend", backends("simd"))
def test_hold_without_dequantizing(backend):
    """The CPU compute set of a CUDA run (runtime/engine/streamed.py) holds its quantized matrices tiled where a
    kernel takes them and leaves the rest as they are (no float32 copy); a group with nothing to tile is itself; with
    ``in_place`` (what that set does) the formats model/cpu_simd.c reads in place are not copied."""
    ws = {"feed_forward.w1.weight": random_weight("q4_1", (64, 64), None, seed=1),
          "feed_forward.w2.weight": random_weight("q6_k", (64, 256), None, seed=2), "ffn_norm.weight": torch.ones(64)}
    held = ck.hold(ws, torch.float32, kernels(backend), dequantize=False)
    assert all(isinstance(held[k], ck.TiledWeight) for k in ("feed_forward.w1.weight", "feed_forward.w2.weight"))
    assert held["ffn_norm.weight"] is ws["ffn_norm.weight"]
    q5 = {**ws, "feed_forward.w3.weight": random_weight("q5_0", (64, 64), None, seed=3)}
    inplace = ck.hold(q5, torch.float32, kernels(backend), dequantize=False, in_place=True)
    for k in ("feed_forward.w1.weight", "feed_forward.w2.weight"):  # q4_1, q6_k: read where they lie
        assert isinstance(inplace[k], ck.BlockWeight) and inplace[k].w is ws[k]
    assert isinstance(inplace["feed_forward.w3.weight"], ck.TiledWeight)  # q5_0: not, so tiled
    plain = {"feed_forward.w1.weight": torch.ones(64, 64, dtype=torch.bfloat16)}
    assert ck.hold(plain, torch.float32, kernels(backend), dequantize=False) is plain
    assert ck.hold(ws, torch.float32, None, dequantize=False) is ws
