"""Streamed modes against the in-memory reference (``--mode full``): identical greedy tokens and logits
within 1e-5 (fp32, CPU), for tiny random models (untied and tied) and SmolLM2, in preload, stream and
mixed, with windows from the smallest workable (2 slots) to the whole model; and the byte accounting:
disk bytes per pass are exactly the streamed set's, and no DRAM-tier group is ever read twice."""

from __future__ import annotations

import gc
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, gpu_cap_gb, pack_tiny

from model.synthetic import SyntheticCheckpoint
from runtime.engine.config import EngineConfig, PrefillConfig
from runtime.engine.generate import Generator, SamplingConfig
from runtime.engine.source import open_source
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image
from runtime.format.pack import pack
from runtime.ipc.shm import SLOT_QUEUED, leftover_names

PROMPT = [3, 17, 42, 7, 99, 5, 23]
NEW = 10


@pytest.fixture(scope="module", params=["untied", "tied"])
def tiny(request, tmp_path_factory):
    return pack_tiny(tmp_path_factory, request.param, seed=7)


def reference(image: Image, prompt: list[int], new: int):
    gen = Generator(InMemoryWeights(image, "cpu", quiet=True), len(prompt) + new)
    tokens = gen.generate(prompt, SamplingConfig(new)).output_token_ids
    logits = gen.forward(torch.tensor([prompt]), 0, gen.new_cache(1))
    return tokens, logits


def counters(src, image: Image) -> tuple[dict, dict]:
    reads = {name: int(src.res.groups[i]["reads"]) for i, name in enumerate(image.groups)}
    return reads, {k: int(src.res.header[k]) for k in ("bytes_dram", "bytes_stream", "reads")}


def in_flight(src) -> bool:
    return bool((src.res.slots["state"] == SLOT_QUEUED).any())


def run_streamed(image: Image, cfg: EngineConfig, prompt: list[int], new: int):
    """Greedy tokens, prefill logits, the plan and the pool's per-group read counts."""
    max_len = len(prompt) + new
    with open_source(image, cfg, torch.device("cpu"), max_len=max_len) as (src, plan, handle):
        gen = Generator(src, max_len)
        tokens = gen.generate(prompt, SamplingConfig(new)).output_token_ids
        logits = gen.forward(torch.tensor([prompt]), 0, gen.new_cache(1))
        passes = len(tokens) + 1  # one prefill pass + one per decode step, + the logits pass above
        src.client.stop_stream()  # no new reads; then wait for those in flight, so the counters agree
        reads, header = counters(src, image)
        deadline = time.monotonic() + 10
        while (reads, header) != (again := counters(src, image)) or in_flight(src):
            assert time.monotonic() < deadline, "reads still in flight after 10 s"
            time.sleep(0.05)
            reads, header = again
    assert not leftover_names(pool=handle.name), "the private pool left shared memory behind"
    return tokens, logits, plan, passes, reads, header


CONFIGS = {
    "preload": dict(mode="preload"),
    "stream-w2": dict(mode="stream", prefetch_distance=2),
    "stream-wall": dict(mode="stream", prefetch_distance=10_000),
    "mixed-tiers": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=1, prefetch_distance=2),
    "mixed-budget": dict(mode="mixed", dram_gb=0.012, prefetch_distance=3),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streamed_equals_full(tiny, name):
    ref_tokens, ref_logits = reference(tiny, PROMPT, NEW)
    cfg = EngineConfig.of(**CONFIGS[name], workers=2, quiet=True)
    tokens, logits, plan, passes, reads, header = run_streamed(tiny, cfg, PROMPT, NEW)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    check_accounting(tiny, plan, passes, reads, header)


def check_accounting(image: Image, plan, passes: int, reads: dict, header: dict) -> None:
    size = {n: g.size for n, g in image.groups.items()}
    for g in set(plan.dram) | set(plan.host):
        assert reads[g] == 1, f"DRAM-tier group {g} read {reads[g]} times"
    for g in plan.gpu:
        assert reads[g] == 1, f"GPU-tier group {g} read {reads[g]} times"  # once, through the window
    stream = set(plan.stream)
    for g in stream:  # every pass reads each streamed group once; the window may have read the next pass ahead
        assert reads[g] in (passes, passes + 1), (g, reads[g], passes)
    ahead = sum(reads[g] for g in stream) - passes * len(stream)
    assert 0 <= ahead <= max(plan.window_slots, 1)
    assert header["bytes_stream"] == sum(size[g] * reads[g] for g in stream | set(plan.gpu))
    assert header["bytes_dram"] == sum(size[g] for g in set(plan.dram) | set(plan.host))
    if stream:  # per pass: exactly the streamed set's bytes
        assert plan.disk_bytes_per_pass == sum(size[g] for g in stream)


def test_plans_cover_the_tiers(tiny):
    """The configurations above really exercise each tier (a test that streams nothing proves nothing)."""
    from runtime.engine.source import make_plan

    def plan(**kw):
        return make_plan(tiny, EngineConfig.of(**kw, quiet=True), torch.device("cpu"), 0, 0)

    assert plan(**CONFIGS["preload"]).stream == ()
    assert len(plan(**CONFIGS["stream-w2"]).stream) > 4 and plan(**CONFIGS["stream-w2"]).window_slots == 2
    p = plan(**CONFIGS["stream-wall"])
    assert p.window_slots == len(p.stream)  # the whole model in the window
    p = plan(**CONFIGS["mixed-tiers"])
    assert p.gpu and p.dram and p.stream
    p = plan(**CONFIGS["mixed-budget"])
    assert p.dram and p.stream


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["preload", "stream", "mixed"])
def test_smollm2_streamed_equals_full(smol_image, mode):
    image = Image.open(smol_image)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575]
    ref_tokens, ref_logits = reference(image, prompt, 8)
    kw = dict(mode=mode, workers=2, quiet=True)
    if mode == "mixed":
        kw.update(gpu_cached_layers=4, cpu_cache_layers=10, prefetch_distance=2)
    tokens, logits, plan, passes, reads, header = run_streamed(image, EngineConfig.of(**kw), prompt, 8)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    check_accounting(image, plan, passes, reads, header)


# ---- GPU (skipped without CUDA; run on the GPU machine) ----------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def synth_bf16(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "synth.img"
    pack(SyntheticCheckpoint("llama3.2-1b", n_layers=4, seed=3), out, dtype="bf16", quiet=True)
    return Image.open(out)


@cuda
@pytest.mark.parametrize("mode", ["preload", "stream", "mixed", "preload-gpu-tier"])
def test_gpu_streamed_equals_full_bf16(synth_bf16, mode):
    """Every mode equals the reference. preload-gpu-tier: a layer resident on the GPU, copied there from
    the pool's DRAM tier (the GPU tier read with the fill); mixed loads its GPU layer through the window."""
    dev = torch.device("cuda")
    prompt, new = PROMPT * 3, 16
    gen = Generator(InMemoryWeights(synth_bf16, dev, quiet=True), len(prompt) + new)
    ref = gen.generate(prompt, SamplingConfig(new)).output_token_ids
    del gen  # the reference's weights must not count against the streamed run's cap
    torch.cuda.empty_cache()
    kw = dict(mode=mode, gpu_mem_gb=gpu_cap_gb(1.5), gpu_cached_layers=0, workers=2, quiet=True)
    if mode == "mixed":
        kw.update(gpu_cached_layers=1, cpu_cache_layers=1, prefetch_distance=2)
    if mode == "preload-gpu-tier":
        kw.update(mode="preload", gpu_cached_layers=1)
    with open_source(synth_bf16, EngineConfig.of(**kw), dev, max_len=len(prompt) + new) as (src, plan, _):
        # the ring's pages this client copies from are registered with CUDA
        assert src.registered and src.slot_tensor(min(src._own_slots()), 16).is_pinned()
        assert plan.h2d_bytes_per_pass > 0 and (mode.startswith("preload") or plan.stream)
        in_dram = [g for g in plan.gpu if int(src.res.groups[src.gid[g]]["slot"]) >= 0]
        assert len(plan.gpu) == {"preload": 0, "stream": 0, "mixed": 2, "preload-gpu-tier": 2}[mode]
        assert in_dram == (list(plan.gpu) if mode == "preload-gpu-tier" else [])
        out = Generator(src, len(prompt) + new).generate(prompt, SamplingConfig(new)).output_token_ids
    assert out == ref


@cuda
def test_gpu_failed_set_up_unregisters_the_ring(synth_bf16, monkeypatch):
    """A weight source whose set-up fails after the ring was registered (here: its DRAM-tier check) gives
    the registration back before the ring is unmapped; a stale one made the next run's copies fail (CUDA
    error 712 or "invalid argument" on memory later mapped at the same address). The next run works."""
    from runtime.engine.streamed import StreamedWeights

    dev = torch.device("cuda")
    prompt, new = PROMPT, 4
    built = []

    def failing(self):
        built.append(self)
        raise RuntimeError("DRAM tier check: simulated failure")

    cfg = EngineConfig.of(mode="preload", gpu_mem_gb=gpu_cap_gb(1.5), gpu_cached_layers=0, workers=2, quiet=True)
    with monkeypatch.context() as m:
        m.setattr(StreamedWeights, "_check_dram_tier", failing)
        with pytest.raises(RuntimeError, match="simulated"):
            with open_source(synth_bf16, cfg, dev, max_len=len(prompt) + new):
                pass
    assert built and built[0].registrations == [] and not built[0].registered
    built.clear()
    gen = Generator(InMemoryWeights(synth_bf16, dev, quiet=True), len(prompt) + new)
    ref = gen.generate(prompt, SamplingConfig(new)).output_token_ids
    del gen
    cfg = EngineConfig.of(mode="preload", gpu_mem_gb=gpu_cap_gb(1.5), gpu_cached_layers=0, workers=2, quiet=True)
    with open_source(synth_bf16, cfg, dev, max_len=len(prompt) + new) as (src, _, _):
        assert src.registered
        out = Generator(src, len(prompt) + new).generate(prompt, SamplingConfig(new)).output_token_ids
    assert out == ref


@cuda
@pytest.mark.parametrize("dram_gb", [None, 0.95])
def test_gpu_attached_equals_full_bf16(synth_bf16, tmp_path, monkeypatch, dram_gb):
    """A run attached to a daemon pool (the whole model held, or part of it with the rest streaming through
    the client's window) on CUDA: a resident layer copied from the pool's DRAM, the ring mapped read-only
    and registered; tokens equal the reference; the pool leaves nothing behind."""
    dev = torch.device("cuda")
    prompt, new = PROMPT * 3, 16
    gen = Generator(InMemoryWeights(synth_bf16, dev, quiet=True), len(prompt) + new)
    ref = gen.generate(prompt, SamplingConfig(new)).output_token_ids
    del gen
    gc.collect()  # the reference's weights must not count against the attached run's cap
    torch.cuda.empty_cache()
    monkeypatch.setenv("LLMS_POOL_DIR", str(tmp_path / "pools"))
    name = f"gpuattach{'all' if dram_gb is None else 'part'}"
    start = [sys.executable, "launch.py", "pool", "start", "--image", str(synth_bf16.path), "--name", name,
             "--quiet"] + ([] if dram_gb is None else ["--dram-gb", str(dram_gb), "--clients", "1",
                                                       "--window-slots", "2"])
    subprocess.run(start, cwd=ROOT, check=True, timeout=120)
    try:
        cfg = EngineConfig.of(gpu_mem_gb=gpu_cap_gb(1.5), gpu_cached_layers=1, quiet=True, attach=name)
        with open_source(synth_bf16, cfg, dev, max_len=len(prompt) + new) as (src, plan, _):
            assert src.registered and src.res.ring_readonly  # mapped read-only, registered read-only
            assert src.slot_tensor(min(src._own_slots()), 16).is_pinned()
            assert bool(plan.stream) == (dram_gb is not None)
            out = Generator(src, len(prompt) + new).generate(prompt, SamplingConfig(new)).output_token_ids
    finally:
        subprocess.run([sys.executable, "launch.py", "pool", "stop", name], cwd=ROOT, timeout=60)
    assert out == ref
    assert leftover_names(pool=name) == []


class PoisoningSource:
    """A weight source that enforces the contract of ``forward_groups``: weights are valid only until the
    next ``get``. On every ``get`` it fills the previously returned group with NaN, as a streaming source
    reusing that buffer would (with other weights); a model that still reads them produces NaN."""

    def __init__(self, image: Image) -> None:
        self.ref = InMemoryWeights(image, "cpu", quiet=True)
        self.args, self.device, self.dtype = self.ref.args, self.ref.device, self.ref.dtype
        self.live = {g: {k: v.clone() for k, v in w.items()} for g, w in self.ref.groups.items()}
        self.last = None

    def embed(self, tokens):
        return self.ref.embed(tokens)

    def get(self, group):
        if self.last is not None:
            for t in self.live[self.last].values():
                t.fill_(float("nan"))
        for k, t in self.live[group].items():
            t.copy_(self.ref.groups[group][k])
        self.last = group
        return self.live[group]


def test_model_uses_each_group_before_fetching_the_next(tiny):
    x = torch.tensor([PROMPT])
    full = Generator(InMemoryWeights(tiny, "cpu", quiet=True), 16)
    strict = Generator(PoisoningSource(tiny), 16)
    ref = full.forward(x, 0, full.new_cache(1))
    out = strict.forward(x, 0, strict.new_cache(1))
    assert not out.isnan().any()
    assert torch.equal(out, ref)


def test_chunked_prefill_equals_one_pass(tiny):
    """Prefill in chunks (a causal first chunk, then masked later chunks over the cache) equals one pass."""
    src = InMemoryWeights(tiny, "cpu", quiet=True)
    x = torch.tensor([PROMPT * 6])  # 42 tokens: 3 chunks of at most 16 (the smallest --prefill-chunk)
    one = Generator(src, 64)
    chunked = Generator(src, 64, prefill=PrefillConfig(chunk=16))
    ref = one.forward(x, 0, one.new_cache(1))
    out = chunked.forward(x, 0, chunked.new_cache(1))
    assert (out - ref).abs().max().item() <= 1e-5


def test_early_start_fills_before_torch_and_matches(tiny, tmp_path):
    """start_early plans and starts the pool without importing torch (so the DRAM tier fills while torch and
    CUDA start up); open_source takes the pool over and the tokens equal the reference; the pool is gone
    afterwards. A pool started for the wrong device type is stopped, not leaked."""
    code = f"""
import sys
from runtime.engine.config import EngineConfig
from runtime.engine.source import start_early
from runtime.format.image import Image
from runtime.ipc.shm import leftover_names
image = Image.open({str(tiny.path)!r})
cfg = EngineConfig.of(mode="mixed", dram_gb=1.0, quiet=True)
early = start_early(image, cfg, "cpu", max_len=20)
assert early is not None and "torch" not in sys.modules, sys.modules.get("torch")
assert leftover_names(pool=early.pool.handle.name)
wrong = start_early(image, cfg, "cpu", max_len=20)
import torch
from runtime.engine.source import open_source
from runtime.engine.generate import Generator, SamplingConfig
with open_source(image, cfg, torch.device("cpu"), max_len=20, early=early) as (src, plan, handle):
    print(Generator(src, 20).generate({PROMPT!r}, SamplingConfig(8)).output_token_ids)
wrong.device_type = "cuda"  # as if the guess had been wrong: open_source stops it and starts its own
with open_source(image, cfg, torch.device("cpu"), max_len=20, early=wrong) as (src, plan, handle):
    pass
early.stop(); wrong.stop()
assert not leftover_names(pool=early.pool.handle.name) and not leftover_names(pool=wrong.pool.handle.name)
assert wrong.pool.proc.exitcode is not None
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, _ = reference(tiny, PROMPT, 8)
    assert proc.stdout.strip().splitlines()[-1] == str(ref)
