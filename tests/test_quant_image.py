"""Quantized images (issue 18): a GGUF's ggml blocks kept as they are give the logits of the same GGUF packed
dequantized to fp32 (the gguf package's dequantizer), in every mode, and transformers' on the weights the file
dequantizes to; our int8/int4 images run in every mode as in memory; what cannot be kept or quantized is said
or refused before anything is written; format-1 images still read.

The random GGUF holds every kept type (q8_0 q4_0 q4_1 q5_0 q5_1 q4_k q5_k q6_k, random blocks with finite
fp16 scales) and one that is not kept (IQ4_NL), in shapes the K-quants' 256-value blocks divide."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib

import pytest
import torch
from ckpt_writers import hf_reference_logits, tiny_args, write_gguf
from conftest import STREAMING_MODES, assert_user_error, run_launch
from test_streaming import reference, run_streamed

from model.checkpoint import open_checkpoint
from model.errors import ConfigError
from model.synthetic import SyntheticCheckpoint
from runtime.engine.config import EngineConfig
from runtime.format.image import HEADER_FMT, HEADER_SIZE, Image, WeightFormat
from runtime.format.pack import pack

ARGS = dataclasses.replace(tiny_args(scaling=None), dim=256, ffn_hidden=512, n_heads=8, n_kv_heads=2)
TYPES = {"layers.0.attention.wq.weight": "Q4_K", "layers.0.attention.wk.weight": "Q5_K",
         "layers.0.attention.wv.weight": "Q6_K", "layers.0.attention.wo.weight": "Q8_0",
         "layers.0.feed_forward.w1.weight": "Q4_0", "layers.0.feed_forward.w2.weight": "Q5_0",
         "layers.0.feed_forward.w3.weight": "Q5_1", "layers.1.attention.wq.weight": "Q4_1",
         "layers.1.feed_forward.w2.weight": "IQ4_NL", "tok_embeddings.weight": "Q8_0", "output.weight": "Q6_K"}
PROMPT = [3, 17, 42, 7, 99, 5, 23, 250, 1]
NEW = 6
MODES = STREAMING_MODES


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """(the GGUF, its blocks image, its fp32 image, the state dict the file dequantizes to)."""
    d = tmp_path_factory.mktemp("qgguf")
    sd = write_gguf(d / "t.gguf", seed=5, args=ARGS, types=TYPES)
    ck = open_checkpoint(d / "t.gguf")
    pack(ck, d / "blocks.img", dtype=WeightFormat("fp32", keep_blocks=True), quiet=True)
    pack(ck, d / "fp32.img", dtype="fp32", quiet=True)
    return d / "t.gguf", Image.open(d / "blocks.img"), Image.open(d / "fp32.img"), sd


def test_kept_blocks_are_the_files_and_the_rest_is_named(ggufs, tmp_path):
    path, blocks, plain, _ = ggufs
    kept = {k: v.lower() for k, v in TYPES.items() if v != "IQ4_NL"}
    assert {k: f for k, (f, _) in blocks.formats().items()} == kept
    ck = open_checkpoint(path)
    g = blocks.groups["layers.0.attention"]
    t = next(t for t in g.tensors if t.name == "attention.wq.weight")
    assert bytes(blocks.read_group(g.name)[t.offset:t.offset + t.nbytes]) == ck.raw("layers.0.attention.wq.weight") \
        .numpy().tobytes()
    assert blocks.groups[g.name].size < plain.groups[g.name].size / 3 and not plain.formats()
    # the CLI: without --dtype the blocks are kept, and the pack says what it did with each type
    proc = run_launch("pack", "--checkpoint", str(path), "--out", str(tmp_path / "cli.img"))
    assert "kept as the GGUF stores them: q4_0 x1, q4_1 x1, q4_k x1, q5_0 x1, q5_1 x1, q5_k x1, q6_k x2, " \
           "q8_0 x2" in proc.stderr, proc.stderr
    assert "dequantized to bf16 (types not kept): IQ4_NL x1" in proc.stderr
    assert "q6_k (2 tensors" in proc.stdout and Image.open(tmp_path / "cli.img").dtype == "bf16"
    # --dtype alone dequantizes every tensor
    run_launch("pack", "--checkpoint", str(path), "--out", str(tmp_path / "deq.img"), "--dtype", "fp32", "--quiet")
    assert not Image.open(tmp_path / "deq.img").formats()


def test_blocks_match_transformers(ggufs):
    _, blocks, _, sd = ggufs
    tokens = torch.tensor([PROMPT * 4])
    ref = hf_reference_logits(blocks.args, sd, tokens)
    _, logits = reference(blocks, tokens[0].tolist(), 1)
    assert (logits.log_softmax(-1) - ref).abs().max().item() < 1e-4


def test_blocks_equal_dequantized_fp32_in_memory(ggufs):
    _, blocks, plain, _ = ggufs
    tokens, logits = reference(blocks, PROMPT, NEW)
    ref_tokens, ref_logits = reference(plain, PROMPT, NEW)
    assert tokens == ref_tokens and (logits - ref_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mode", sorted(MODES))
def test_blocks_equal_dequantized_fp32_streamed(ggufs, mode):
    """Streamed on the CPU: the DRAM tier is dequantized once, streamed groups at every use."""
    _, blocks, plain, _ = ggufs
    ref_tokens, ref_logits = reference(plain, PROMPT, NEW)
    cfg = EngineConfig.of(workers=2, quiet=True, **MODES[mode])
    tokens, logits, plan, *_ = run_streamed(blocks, cfg, PROMPT, NEW)
    assert tokens == ref_tokens and (logits - ref_logits).abs().max().item() <= 1e-4
    assert mode == "preload" or plan.stream
    assert plan.stored_as == blocks.format_summary() and "q6_k (2 tensors" in plan.describe()


@pytest.mark.slow
def test_smollm2_blocks_equal_dequantized_fp32(smol_gguf, smol_image, tmp_path):
    """The real model's Q4_1 and Q8_0 blocks, in memory (dequantized once) and streamed (at every use)."""
    out = tmp_path / "smol.blocks.img"
    pack(open_checkpoint(smol_gguf), out, dtype=WeightFormat("fp32", keep_blocks=True), quiet=True)
    blocks, plain = Image.open(out), Image.open(smol_image)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575]
    ref_tokens, ref_logits = reference(plain, prompt, 2)
    tokens, logits = reference(blocks, prompt, 2)
    assert tokens == ref_tokens and (logits - ref_logits).abs().max().item() <= 1e-4
    tokens, logits, *_ = run_streamed(blocks, EngineConfig.of(mode="stream", workers=2, quiet=True), prompt, 2)
    assert tokens == ref_tokens and (logits - ref_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("scheme, group", [("int8", 64), ("int4", 32), ("q4_0", None)])
def test_quantized_image_runs_as_in_memory(tmp_path, scheme, group):
    """Our formats (and a gguf quantizer's) of a random model: every mode computes what memory does, and the
    layer matrices (and with --quantize-output the output matrix) are stored so, the rest plain."""
    ck = SyntheticCheckpoint(tiny_args(scaling=None), seed=3)
    out = tmp_path / "q.img"
    pack(ck, out, dtype=WeightFormat("fp32", scheme, group or 64, quantize_output=True), quiet=True)
    image = Image.open(out)
    fmts = image.formats()
    assert set(fmts) == {k for k in ck.shapes if k.startswith("layers.") and len(ck.shapes[k]) == 2} | {"output.weight"}
    assert set(fmts.values()) == {(scheme, group)}
    ref_tokens, ref_logits = reference(image, PROMPT, NEW)
    for mode in ("stream", "mixed"):
        tokens, logits, *_ = run_streamed(image, EngineConfig.of(workers=2, quiet=True, **MODES[mode]), PROMPT, NEW)
        assert tokens == ref_tokens and (logits - ref_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("scheme, group, ffn, why", [
    ("int8", 64, 480, "layers.0.feed_forward.w2.weight of shape (128, 480): int8 with a group 64 needs a row "
                      "length that is a multiple of 64, found 480"),
    ("int4", 32, 97, "layers.0.feed_forward.w2.weight of shape (128, 97): int4 packs two values a byte"),
])
def test_unquantizable_matrix_refused_before_writing(tmp_path, scheme, group, ffn, why):
    args = dataclasses.replace(tiny_args(scaling=None), ffn_hidden=ffn)
    with pytest.raises(ConfigError, match=why.replace("(", r"\(").replace(")", r"\)")):
        pack(SyntheticCheckpoint(args, seed=1), tmp_path / "x.img", dtype=WeightFormat("fp32", scheme, group))
    assert not list(tmp_path.iterdir())


def test_quantize_flags_checked(tmp_path):
    out = str(tmp_path / "x.img")
    assert_user_error(run_launch("pack", "--synthetic", "tiny", "--out", out, "--quantize-output", check=False),
                      "--quantize-output needs --quantize")
    assert not list(tmp_path.iterdir())


def test_format_1_image_still_reads(tmp_path):
    """An image written before quantized formats (version 1: every tensor plain) opens and runs."""
    ck = SyntheticCheckpoint(tiny_args(scaling=None), seed=2)
    out = tmp_path / "v1.img"
    pack(ck, out, dtype="fp32", quiet=True)
    ref_tokens, ref_logits = reference(Image.open(out), PROMPT, NEW)
    with open(out, "r+b") as f:  # the header as version 1 wrote it
        n = struct.calcsize(HEADER_FMT)
        head = bytearray(f.read(HEADER_SIZE))
        fields = list(struct.unpack(HEADER_FMT, bytes(head[:n])))
        fields[1] = 1
        body = struct.pack(HEADER_FMT, *fields)
        f.seek(0)
        f.write(body + struct.pack("<I", zlib.crc32(body)))
    man = out.with_name(out.name + ".manifest.json")
    m = json.loads(man.read_text())
    m["version"] = 1
    man.write_text(json.dumps(m))
    tokens, logits = reference(Image.open(out), PROMPT, NEW)
    assert tokens == ref_tokens and torch.equal(logits, ref_logits)


# ---- GPU (skipped without CUDA; run on the GPU machine) ----------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_gpu_blocks_equal_dequantized_fp32(ggufs):
    """Every kept type dequantized on the GPU (Triton's kernels where triton imports) gives the logits of the
    fp32 image on the GPU: full mode (the blocks stay quantized on the device) and streamed."""
    from runtime.engine.generate import Generator, SamplingConfig
    from runtime.engine.weights import InMemoryWeights

    _, blocks, plain, _ = ggufs
    dev = torch.device("cuda")

    def full(image):
        gen = Generator(InMemoryWeights(image, dev, quiet=True), len(PROMPT) + NEW)
        return gen.generate(PROMPT, SamplingConfig(NEW)).output_token_ids, \
            gen.forward(torch.tensor([PROMPT], device=dev), 0, gen.new_cache(1)).cpu()

    ref_tokens, ref_logits = full(plain)
    tokens, logits = full(blocks)
    assert tokens == ref_tokens and (logits - ref_logits).abs().max().item() <= 1e-4
    from runtime.engine.source import open_source

    cfg = EngineConfig.of(mode="stream", workers=2, quiet=True, gpu_mem_gb=4.0, gpu_cached_layers=0)
    with open_source(blocks, cfg, dev, max_len=len(PROMPT) + NEW) as (src, plan, _):
        assert plan.stream
        gen = Generator(src, len(PROMPT) + NEW)
        assert gen.generate(PROMPT, SamplingConfig(NEW)).output_token_ids == ref_tokens


@cuda
@pytest.mark.parametrize("scheme, group", [("int4", 64), ("int8", 64)])
def test_gpu_quantized_streamed_equals_full(tmp_path, scheme, group):
    """A bf16 image quantized by us: preload, stream and mixed on the GPU give the tokens of full mode, where
    every matrix stays quantized on the device; the plan's GPU budget holds."""
    from conftest import gpu_cap_gb

    from runtime.engine.generate import Generator, SamplingConfig
    from runtime.engine.source import open_source
    from runtime.engine.weights import InMemoryWeights

    out = tmp_path / "q.img"
    pack(SyntheticCheckpoint("llama3.2-1b", n_layers=4, seed=3), out, dtype=WeightFormat("bf16", scheme, group),
         quiet=True)
    image = Image.open(out)
    dev = torch.device("cuda")
    prompt, new = PROMPT * 3, 12
    src = InMemoryWeights(image, dev, quiet=True)
    assert all(not isinstance(t, torch.Tensor) for k, t in src.groups["layers.0.attention"].items()
               if k.endswith("wq.weight"))  # resident quantized
    ref = Generator(src, len(prompt) + new).generate(prompt, SamplingConfig(new)).output_token_ids
    del src
    torch.cuda.empty_cache()
    for mode in ("preload", "stream", "mixed"):
        kw = dict(mode=mode, gpu_mem_gb=gpu_cap_gb(1.5), gpu_cached_layers=1 if mode == "mixed" else 0,
                  workers=2, quiet=True)
        torch.cuda.reset_peak_memory_stats()
        with open_source(image, EngineConfig.of(**kw), dev, max_len=len(prompt) + new) as (s, plan, _):
            out_tokens = Generator(s, len(prompt) + new).generate(prompt, SamplingConfig(new)).output_token_ids
        assert out_tokens == ref, mode
        assert torch.cuda.max_memory_allocated() <= kw["gpu_mem_gb"] * 1e9
