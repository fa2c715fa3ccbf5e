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
from model import quant
from model.synthetic import SyntheticCheckpoint
from model.transformer import linears
from runtime.engine.config import EngineConfig
from runtime.format.image import Image, WeightFormat
from runtime.format.pack import pack

SHAPE = (96, 64)  # one and a half tiles: the padded rows are left out


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


@pytest.mark.parametrize("scheme, group", [("q4_0", None), ("q4_1", None), ("int4", 32), ("q8_0", None),
                                           ("int8", 32)])
def test_tiles_equal_the_reference(scheme, group):
    w = random_weight(scheme, SHAPE, group, seed=1)
    t = ck.tile(w)
    dense = w.dense()
    assert torch.equal(t.dense(), dense)
    idx = torch.tensor([[0, 63], [64, 95]])
    assert torch.equal(t.rows(idx), w.rows(idx))
    gen = torch.Generator().manual_seed(2)
    for m in (1, ck.ROWS_MAX + 1):  # the decode kernel, then a prefill's dequantized chunk
        x = torch.randn(2, m, SHAPE[1], generator=gen)[:1]  # (1, m, K), as a pass's activations
        y = t.linear(x)
        assert y.shape == (1, m, SHAPE[0]) and rel_err(y, F.linear(x, dense)) < 1e-5, (scheme, m)


def test_hold_tiles_siblings_together():
    ws = {f"attention.{n}.weight": random_weight("q4_1", (64 if n != "wq" else 128, 64), None, seed=i)
          for i, n in enumerate(("wq", "wk", "wv", "wo"))}
    ws["attention_norm.weight"] = torch.ones(64)
    ws["feed_forward.w1.weight"] = random_weight("q5_0", (64, 64), None, seed=7)  # no kernel: dequantized
    held = ck.hold(ws, torch.float32)
    q, k, v = (held[f"attention.{n}.weight"] for n in ("wq", "wk", "wv"))
    whole = ck.fused((q, k, v))
    assert whole is not None and whole.shape == (256, 64) and q.nbytes == 0 and whole.nbytes > 0
    assert ck.fused((q, v)) is None and isinstance(held["attention.wo.weight"], ck.TiledWeight)
    assert torch.equal(held["feed_forward.w1.weight"], ws["feed_forward.w1.weight"].dense())
    assert held["attention_norm.weight"] is ws["attention_norm.weight"]
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(3))
    for y, name in zip(linears(x, (q, k, v)), ("wq", "wk", "wv")):
        assert rel_err(y, F.linear(x, ws[f"attention.{name}.weight"].dense())) < 1e-5
    # a bf16 run, or no kernels: every quantized matrix dequantized, as before
    assert all(isinstance(t, torch.Tensor) for t in ck.hold(ws, torch.bfloat16).values())
    assert all(isinstance(t, torch.Tensor) for t in ck.hold(ws, torch.float32, kernels=False).values())


@pytest.fixture(scope="module")
def q4_image(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpuk") / "q.img"
    pack(SyntheticCheckpoint(tiny_args(scaling=None), seed=3), out,
         dtype=WeightFormat("fp32", "int4", 32, quantize_output=True), quiet=True)
    return Image.open(out)


def test_model_outputs_unchanged(q4_image, monkeypatch):
    """An int4 model (every matrix, the output too): greedy tokens and every prefill logit with the kernels as
    without, in memory (--mode full) and from a streamed run's DRAM tier (preload)."""
    prompt, new = [3, 17, 42, 7, 99, 5, 23, 250, 1], 4
    monkeypatch.setenv("LLMS_CPU_KERNELS", "0")
    ref_tokens, ref_logits = reference(q4_image, prompt, new)
    monkeypatch.setenv("LLMS_CPU_KERNELS", "1")
    fused_steps = []  # the decode steps' groups went through the compiled group graphs

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
    tokens, logits, *_ = run_streamed(q4_image, EngineConfig.of(mode="preload", workers=1, quiet=True), prompt, new)
    assert tokens == ref_tokens and (logits - ref_logits).abs().max().item() <= 1e-5
