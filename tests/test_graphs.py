"""Decode steps at static shapes (runtime/engine/graphs.py): run without capture on the CPU they give the eager
path's logits (fp32, within 1e-5) and greedy tokens; replayed from CUDA graphs, the eager path's greedy tokens
(fp32), batch 1 and a left-padded batch of 3, across a KV-length bucket boundary, plain and int8/int4 images;
and the same per group where the weights stream (preload, stream, mixed); and a continuous batch's one-token passes
(each row at its own slot, batch sizes in power-of-two buckets)."""

from __future__ import annotations

import pytest
import torch
from conftest import gpu_cap_gb

from model.args import preset
from model.synthetic import SyntheticCheckpoint
from runtime.engine.config import EngineConfig
from runtime.engine.generate import Generator, SamplingConfig, generator_for, padding
from runtime.engine.graphs import StaticDecode, applies, batch_bucket, kv_bucket, kv_buckets
from runtime.engine.scheduler import Scheduler, SchedulerConfig, SeqRequest
from runtime.engine.source import open_source
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image, WeightFormat
from runtime.format.pack import pack

# three prompts of 243..250 tokens: decoding NEW tokens crosses the 256-slot bucket into the last (320 slots)
PROMPTS = [[(7 * i + 3 * n) % 500 + 1 for i in range(n)] for n in (250, 243, 247)]
NEW, MAX_LEN = 12, 300


def tiny_image(tmp_path, scheme: str | None = None) -> Image:
    out = tmp_path / f"tiny-{scheme}.img"
    fmt = "fp32" if scheme is None else WeightFormat("fp32", scheme, 32, quantize_output=True)
    pack(SyntheticCheckpoint(preset("tiny", 2), seed=5), out, dtype=fmt, quiet=True)
    return Image.open(out)


def test_kv_buckets():
    assert kv_buckets(320) == [256, 320] and kv_buckets(1024) == [256, 512, 1024] and kv_buckets(64) == [64]
    assert kv_bucket(256, 320) == 256 and kv_bucket(257, 320) == 320 and kv_bucket(1, 64) == 64
    with pytest.raises(ValueError, match="expected 1..320"):
        kv_bucket(321, 320)


def test_static_decode_equals_eager_cpu(tmp_path):
    gen = Generator(InMemoryWeights(tiny_image(tmp_path), "cpu", quiet=True), MAX_LEN)
    assert Generator(gen.source, MAX_LEN, cuda_graphs=True).static is None  # not on the CPU
    static = StaticDecode(gen, capture=False)
    longest = max(map(len, PROMPTS))
    pad = [longest - len(p) for p in PROMPTS]
    pad_t, x = padding(pad, "cpu"), torch.tensor([[0] * n + p for n, p in zip(pad, PROMPTS)])
    eager = gen.new_cache(len(PROMPTS))
    logits = gen.forward(x, 0, eager, last_only=True, pad=pad_t)[:, -1]
    gen.forward(x, 0, static.begin(len(PROMPTS), pad_t), last_only=True, pad=pad_t)
    for pos in range(longest, longest + NEW):  # the same tokens into both caches, the logits compared
        nxt = logits.argmax(-1)
        logits = gen.forward(nxt.view(-1, 1), pos, eager, last_only=True, pad=pad_t)[:, -1]
        assert (static.step(nxt, pos) - logits).abs().max().item() <= 1e-5, pos
    cfg = SamplingConfig(NEW)

    def outputs() -> list[list[int]]:
        return [r.output_token_ids for r in gen.generate_batch(PROMPTS, cfg)] + \
            [gen.generate(PROMPTS[1], cfg).output_token_ids]

    want = outputs()
    gen.static = static  # generate and generate_batch now decode through it (its cache kept: the batch's 3 rows)
    assert outputs() == want and gen.cache is static.cache
    gen.static = StaticDecode(gen, capture=False)
    gen.static.grouped = True  # piece by piece, every group resident: one run (as a streamed source's GPU tier)
    assert outputs() == want


def test_batch_buckets():
    assert [batch_bucket(n, 8) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8] and batch_bucket(5, 6) == 6


def scheduled(gen: Generator, prompts: list[list[int]], graphs: bool, static: StaticDecode | None = None) \
        -> tuple[list[list[int]], Scheduler]:
    """Each prompt's greedy tokens from a continuous batch of 3 rows, the last prompt joining after 4 passes (so
    passes mix decoding rows, a joining row's chunk and free rows)."""
    sched = Scheduler(gen, SchedulerConfig(max_batch=3, graphs=graphs), max_len=MAX_LEN - 1)
    if static is not None:
        sched.static = static
        static.adopt(sched.cache)
    out: dict[int, list[int]] = {}
    reqs = [SeqRequest(p, SamplingConfig(NEW), lambda k, x, i=i: out.__setitem__(i, x.output_token_ids)
                       if k == "done" else None) for i, p in enumerate(prompts)]
    for r in reqs[:-1]:
        sched.submit(r)
    for n in range(400):
        if n == 4:
            sched.submit(reqs[-1])
        if not sched.tick() and n > 4:
            break
    return [out[i] for i in range(len(prompts))], sched


def test_scheduler_static_rows_equal_eager_cpu(tmp_path):
    """A continuous batch's one-token passes at static shapes (capture=False: the graphs' computation) give the
    eager passes' tokens, with rows at different lengths, a joining row and free rows."""
    gen = Generator(InMemoryWeights(tiny_image(tmp_path), "cpu", quiet=True), MAX_LEN)
    prompts = [PROMPTS[0][:40], PROMPTS[1][:200], PROMPTS[2][:90]]
    want, eager = scheduled(gen, prompts, graphs=True)  # on the CPU graphs do not apply: eager
    assert eager.static is None
    static = StaticDecode(gen, capture=False)
    calls = []
    step_rows = static.step_rows
    static.step_rows = lambda *a: calls.append(len(a[0])) or step_rows(*a)
    got, _ = scheduled(gen, prompts, graphs=False, static=static)
    assert got == want and len(calls) >= NEW and set(calls) >= {2, 3}


STREAMED = {"preload": dict(mode="preload"), "stream": dict(mode="stream", prefetch_distance=2),
            "mixed": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=0, prefetch_distance=2)}


@pytest.mark.parametrize("mode", ["preload", "stream"])
def test_grouped_static_decode_equals_eager_cpu(tmp_path, mode):
    """Over a streamed source the static step runs group by group (each group's weights fetched in the pass
    order between the pieces): the eager path's greedy tokens, batch 3 then 1."""
    image, cfg = tiny_image(tmp_path, "int8"), SamplingConfig(NEW)
    with open_source(image, EngineConfig.of(**STREAMED[mode], workers=1, quiet=True), torch.device("cpu"),
                     batch=3, max_len=MAX_LEN) as (src, _, _):
        gen = Generator(src, MAX_LEN)
        want = [[r.output_token_ids for r in gen.generate_batch(p, cfg)] for p in (PROMPTS, [PROMPTS[1]])]
        gen.static = StaticDecode(gen, capture=False)
        assert gen.static.grouped
        assert [[r.output_token_ids for r in gen.generate_batch(p, cfg)] for p in (PROMPTS, [PROMPTS[1]])] == want
        keys, piece = [], gen.static._piece  # a pass's pieces have keys of their own (each its own graph)
        gen.static._piece = lambda key, fn, keep=None: keys.append(key) or piece(key, fn, keep)
        gen.static.step([5], 260)
        assert len(keys) == len(set(keys)) > len(src.plan.sequence), keys


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_cuda_graph_decode_equals_eager(tmp_path, scheme):
    """Greedy tokens replayed from graphs equal the eager steps', for batch 1, 3, then 1 again (its graphs made
    anew over the 3-row cache), each over the 256- and 320-slot buckets; --cuda-graphs off keeps the eager path."""
    src = InMemoryWeights(tiny_image(tmp_path, scheme), torch.device("cuda"), quiet=True)
    eager, graphed = Generator(src, MAX_LEN), generator_for(src, EngineConfig.of(), MAX_LEN)
    assert eager.static is None and generator_for(src, EngineConfig.of(cuda_graphs="off"), MAX_LEN).static is None
    assert graphed.static is not None and graphed.static.capture
    cfg = SamplingConfig(NEW)
    for prompts in ([PROMPTS[0]], PROMPTS, [PROMPTS[2]]):
        want = [r.output_token_ids for r in eager.generate_batch(prompts, cfg)]
        assert [r.output_token_ids for r in graphed.generate_batch(prompts, cfg)] == want, (scheme, len(prompts))
        b = len(prompts)
        assert {k for k in graphed.static.graphs if k[0] == ("step", b)} == {(("step", b), 256), (("step", b), 320)}
    assert graphed.static.cache.shape[0] == 3


@cuda
@pytest.mark.parametrize("mode", sorted(STREAMED))
@pytest.mark.parametrize("scheme", [None, "int4"])
def test_cuda_graph_streamed_decode_equals_eager(tmp_path, mode, scheme):
    """Streamed through staging buffers, a graph per group: the eager steps' greedy tokens, batch 3 then 1."""
    image, cfg, dev = tiny_image(tmp_path, scheme), SamplingConfig(NEW), torch.device("cuda")
    want = [[r.output_token_ids for r in Generator(InMemoryWeights(image, dev, quiet=True), MAX_LEN)
             .generate_batch(p, cfg)] for p in (PROMPTS, [PROMPTS[2]])]
    torch.cuda.empty_cache()
    kw = dict(STREAMED[mode], gpu_mem_gb=gpu_cap_gb(1.0), workers=2, quiet=True)
    kw.setdefault("gpu_cached_layers", 0)
    with open_source(image, EngineConfig.of(**kw), dev, batch=3, max_len=MAX_LEN) as (src, plan, _):
        assert plan.stream or plan.dram
        gen = generator_for(src, EngineConfig.of(**kw), MAX_LEN)
        assert applies(gen) and gen.static is not None and gen.static.grouped
        got = [[r.output_token_ids for r in gen.generate_batch(p, cfg)] for p in (PROMPTS, [PROMPTS[2]])]
        assert sum(isinstance(k[0], tuple) for k in gen.static.graphs) >= len(plan.stream), list(gen.static.graphs)
    assert got == want, (mode, scheme)


@cuda
@pytest.mark.parametrize("mode", ["full", "preload"])
def test_cuda_graph_scheduler_equals_eager(tmp_path, mode):
    """The continuous batch's one-token passes replayed from graphs (whole passes; per group where the weights
    stream): the eager passes' greedy tokens."""
    image, dev = tiny_image(tmp_path, "int4"), torch.device("cuda")
    prompts = [PROMPTS[0][:40], PROMPTS[1][:200], PROMPTS[2][:90]]
    ref = Generator(InMemoryWeights(image, dev, quiet=True), MAX_LEN)
    want, _ = scheduled(ref, prompts, graphs=False)
    if mode == "full":
        got, sched = scheduled(ref, prompts, graphs=True)
        assert sched.static is not None and not sched.static.grouped
    else:
        del ref
        torch.cuda.empty_cache()
        kw = dict(mode="preload", gpu_mem_gb=gpu_cap_gb(1.0), gpu_cached_layers=0, workers=2, quiet=True)
        with open_source(image, EngineConfig.of(**kw), dev, batch=3, max_len=MAX_LEN) as (src, _, _):
            got, sched = scheduled(Generator(src, MAX_LEN), prompts, graphs=True)
            assert sched.static is not None and sched.static.grouped
    assert sched.static.graphs and got == want, mode
