"""The KV cache in blocks: offloaded to DRAM (TieredKVCache) with outputs identical to the resident cache,
the bytes it moves, the automatic offload decision under a GPU budget, and top-k block attention (exact when
K covers every block, reading fewer blocks when it does not)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import gpu_cap_gb, pack_tiny, run_launch

from model.args import preset
from model.errors import ConfigError
from model.groups import host_layer_count, spread_layers
from model.synthetic import SyntheticCheckpoint
from runtime.engine.batching import activation_bytes, chunk_per_sequence, kv_cache_bytes, kv_device_rows, prefill_passes
from runtime.engine.config import EngineConfig, KVConfig, PrefillConfig
from runtime.engine.copy2d import copy_rows
from runtime.engine.generate import Generator, SamplingConfig, padding
from runtime.engine.kv import TieredKVCache
from runtime.engine.source import make_plan, open_source, plan_with_kv
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image
from runtime.format.pack import pack

PROMPTS = [[3, 17, 42, 7, 99, 5, 23, 11, 2] * 6, [5, 6] * 5, [100, 200, 300, 400, 1] * 4]


@pytest.fixture(scope="module", params=["untied", "tied"])
def tiny(request, tmp_path_factory):
    return pack_tiny(tmp_path_factory, request.param, seed=5)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """One variant for the command-line tests: the flags do not depend on it (the engine's tests above take both)."""
    return pack_tiny(tmp_path_factory, "untied", seed=5)


def outputs(gen: Generator, new: int = 16):
    return [r.output_token_ids for r in gen.generate_batch(PROMPTS, SamplingConfig(new))]


@pytest.mark.parametrize("block", [64, 7])
def test_offloaded_kv_equals_resident(tiny, block):
    src = InMemoryWeights(tiny, "cpu", quiet=True)
    ref = outputs(Generator(src, 96, prefill=PrefillConfig(chunk=16)))
    gen = Generator(src, 96, KVConfig(block_tokens=block), PrefillConfig(chunk=16), offload=True)
    assert outputs(gen) == ref
    a = tiny.args
    row = a.n_kv_heads * a.head_dim * 4  # fp32 bytes of one slot's K (or V) of one sequence
    longest = max(len(p) for p in PROMPTS)
    h2d, d2h = gen.kv_moved()
    assert d2h == 2 * a.n_layers * len(PROMPTS) * (longest + 15) * row  # every written slot once, K and V
    assert h2d > d2h  # each layer's written blocks come back before every pass


def test_host_attention_equals_resident(tiny):
    """Decode attention on the host over the offloaded cache (FlexGen's CPU attention): the same tokens for a
    batch of mixed lengths (padding masked) and for one sequence; while decoding no KV block is copied to
    the device, and the decode steps' new slots reach the host cache directly."""
    src = InMemoryWeights(tiny, "cpu", quiet=True)
    ref = outputs(Generator(src, 96, prefill=PrefillConfig(chunk=16)))
    gen = Generator(src, 96, KVConfig(host_attention=True), PrefillConfig(chunk=16), offload=True)
    h2d = []
    res = gen.generate_batch(PROMPTS, SamplingConfig(16), on_step=lambda t: h2d.append(gen.kv_moved()[0]))
    assert [r.output_token_ids for r in res] == ref
    assert h2d[0] > 0 and h2d[-1] == h2d[0]  # prefill fetched blocks; the 15 decode steps none
    assert gen.cache.written == [max(len(p) for p in PROMPTS) + 15] * tiny.args.n_layers
    one = Generator(src, 80, KVConfig(host_attention=True), offload=True)
    assert one.generate(PROMPTS[0], SamplingConfig(12)).output_token_ids == \
        Generator(src, 80).generate(PROMPTS[0], SamplingConfig(12)).output_token_ids
    with pytest.raises(ConfigError, match="--topk-blk"):
        Generator(src, 80, KVConfig(host_attention=True, topk_blk=2), offload=True)


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    return pack_tiny(tmp_path_factory, "untied", seed=7, layers=6)


@pytest.mark.parametrize("n_host", [2, 3])
def test_host_attention_on_some_layers(six, n_host, monkeypatch):
    """--host-attention N: N layers spread evenly are attended on the host, the others read back: the same
    tokens, and while decoding exactly the other layers' blocks are fetched to the device."""
    src = InMemoryWeights(six, "cpu", quiet=True)
    ref = outputs(Generator(src, 96, prefill=PrefillConfig(chunk=16)))
    fetched, fetch = [], TieredKVCache._fetch
    monkeypatch.setattr(TieredKVCache, "_fetch", lambda self, layer, b: (fetched.append(layer), fetch(self, layer, b)))
    gen = Generator(src, 96, KVConfig(host_attention=n_host), PrefillConfig(chunk=16), offload=True)
    steps = []
    res = gen.generate_batch(PROMPTS, SamplingConfig(16), on_step=lambda t: steps.append(len(fetched)))
    assert [r.output_token_ids for r in res] == ref
    host = gen.cache.host_layers
    assert host == spread_layers(n_host, 6) and len(host) == n_host
    assert set(fetched[steps[0]:]) == set(range(6)) - host  # the decode steps' fetches (after the first token)
    assert set(fetched[:steps[0]]) == set(range(6))  # prefill reads every layer's earlier chunks back


@pytest.mark.parametrize("chunk", [64, 32, 16])
def test_prefill_by_sequence(six, chunk):
    """--[no-]prefill-by-sequence: an offloaded batch prefilled whole prompts at a time (chunk 64 holds one 54-token
    prompt per pass; chunk 32 and 16 cut each prompt on its own): the same tokens as the resident cache, with
    all layers or some attended on the host, and only a prompt's own earlier chunks read back while
    prefilling (nothing when a pass holds whole prompts), against every earlier slot of the batch chunked
    across it."""
    src = InMemoryWeights(six, "cpu", quiet=True)
    ref = outputs(Generator(src, 96, prefill=PrefillConfig(chunk=chunk)))
    moved = {}
    for name, (by_sequence, host) in {"across": (False, None), "by_sequence": (True, None), "host": (True, 3),
                                      "default": (None, None)}.items():
        gen = Generator(src, 96, KVConfig(host_attention=host), PrefillConfig(chunk, by_sequence), offload=True)
        first = []
        res = gen.generate_batch(PROMPTS, SamplingConfig(16),
                                 on_step=lambda t, gen=gen, first=first: first.append(gen.kv_moved()))
        assert [r.output_token_ids for r in res] == ref, name
        moved[name] = first[0]  # (H2D, D2H) by the first token: the prefill's
        assert gen.cache.written == [max(len(p) for p in PROMPTS) + 15] * 6
    a, longest = six.args, max(len(p) for p in PROMPTS)
    row = a.n_kv_heads * a.head_dim * 4
    assert moved["by_sequence"][1] == moved["across"][1] == 2 * 6 * len(PROMPTS) * longest * row  # each slot once
    assert moved["across"][0] > 0
    if chunk >= longest:
        assert moved["by_sequence"][0] == 0 and moved["host"][0] == 0
    else:
        assert 0 < moved["by_sequence"][0] < moved["across"][0]
    # by default whole prompts when that takes no more passes: chunk 64, 3 passes either way; chunk 32 and 16,
    # across the batch: 4 passes of 16 tokens a prompt, against 6 and 12
    assert moved["default"] == moved["by_sequence" if chunk == 64 else "across"]
    assert prefill_passes(chunk, 3, longest) == {64: (3, 3), 32: (4, 6), 16: (4, 12)}[chunk]


def test_device_buffers_of_one_pass_when_every_layer_is_on_the_host(six, tiny, monkeypatch):
    """With --host-attention all no layer's cache is read back while decoding, so with whole prompts per pass
    (the default) the device buffers hold one pass's prefill_chunk tokens, not the batch's (the plan reserves
    that much): whole rows of max_len slots, into which a pass packs as many shorter prompts as fit. The
    tokens are the resident cache's, with the rows plain (max_len 96: two rows for 128 tokens), packed (max_len
    400: two 54-slot prompts in one row's memory) and chunked across the batch (--no-prefill-by-sequence: the
    batch's rows)."""
    src = InMemoryWeights(six, "cpu", quiet=True)
    ref = outputs(Generator(src, 96, prefill=PrefillConfig(chunk=128)))
    subs = []
    real = TieredKVCache.sub_batch
    monkeypatch.setattr(TieredKVCache, "sub_batch", lambda self, b0, b1, length: subs.append(
        (b1 - b0, self.device_rows)) or real(self, b0, b1, length))
    for max_len, by_sequence, rows, passes in ((96, None, 2, [(2, 2), (1, 2)]), (400, None, 1, [(2, 1), (1, 1)]),
                                               (96, False, 3, [])):
        subs.clear()
        gen = Generator(src, max_len, KVConfig(host_attention="all"), PrefillConfig(128, by_sequence), offload=True)
        assert outputs(gen) == ref, (max_len, by_sequence)
        assert gen.cache.device_rows == rows and gen.cache.buf_store_k[0].shape[0] == rows
        assert subs == passes  # (sequences of a pass, the cache's device rows): 128 // 54 prompts a pass
    some = Generator(src, 96, KVConfig(host_attention=5), PrefillConfig(chunk=128, by_sequence=True), offload=True)
    assert outputs(some) == ref and some.cache.device_rows == len(PROMPTS)  # one layer is read back
    # rows of max_len slots holding one pass's prefill_chunk tokens, whole prompts by default (None)
    assert kv_device_rows(64, 2080, 8192, True, 80, 80) == 4 and kv_device_rows(64, 2080, 8192, None, 80, 80) == 4
    assert kv_device_rows(64, 2080, 8192, False, 80, 80) == 64 and kv_device_rows(64, 2080, 2048, None, 80, 80) == 1
    assert kv_device_rows(2, 2080, 8192, True, 80, 80) == 2 and kv_device_rows(64, 2080, 8192, True, 79, 80) == 64
    with pytest.raises(ValueError, match="device rows"):  # three 54-slot prompts do not fit one 96-slot row
        TieredKVCache(six.args, 3, 96, torch.float32, "cpu", host_attention="all", device_rows=1).sub_batch(0, 3, 54)
    seen = []
    cfg = EngineConfig.of(mode="preload", gpu_mem_gb=1, kv_offload="on", host_attention="all", prefill_by_sequence=True,
                        prefill_chunk=256, quiet=True)
    plan_with_kv(tiny, cfg, SimpleNamespace(type="cuda"), 8, 100,
                 lambda kv: seen.append(kv) or SimpleNamespace(h2d_bytes_per_pass=0))
    assert seen == [kv_cache_bytes(tiny, 8, 100, True, 64, device_rows=3)]  # 256 tokens in rows of 100


def test_spread_layers_and_counts():
    assert spread_layers(0, 8) == frozenset()
    assert spread_layers(8, 8) == frozenset(range(8))
    assert spread_layers(2, 8) == {3, 7} and spread_layers(6, 8) == {1, 2, 3, 5, 6, 7}
    assert all(0 not in spread_layers(k, 32) and len(spread_layers(k, 32)) == k for k in range(32))
    assert host_layer_count(None, 4) == 0 and host_layer_count(True, 4) == 4 and host_layer_count("all", 4) == 4
    assert host_layer_count(3, 4) == 3
    with pytest.raises(ValueError, match="4 layers"):
        host_layer_count(5, 4)


def test_single_sequence_offloaded(tiny):
    src = InMemoryWeights(tiny, "cpu", quiet=True)
    p = PROMPTS[0]
    ref = Generator(src, 80).generate(p, SamplingConfig(12)).output_token_ids
    gen = Generator(src, 80, KVConfig(block_tokens=5), offload=True)
    assert gen.generate(p, SamplingConfig(12)).output_token_ids == ref


def test_auto_offload_when_the_gpu_budget_cannot_hold_the_kv(tmp_path):
    """The plan for a CUDA device: a budget that holds the weights but not the whole KV cache offloads it
    (two layers' buffers on the GPU); one that holds it does not; --kv-offload off refuses."""
    pack(SyntheticCheckpoint(preset("tiny", 8), seed=5), tmp_path / "t8.img", dtype="fp32", quiet=True)
    tiny = Image.open(tmp_path / "t8.img")
    dev = SimpleNamespace(type="cuda")
    batch, max_len, act = 64, 2048, 1 << 20
    full = kv_cache_bytes(tiny, batch, max_len)
    weights = sum(g.size for g in tiny.groups.values())

    def plan(gb, mode="auto"):
        cfg = EngineConfig.of(mode="preload", gpu_mem_gb=gb, kv_offload=mode, quiet=True)
        return plan_with_kv(tiny, cfg, dev, batch, max_len, lambda kv: make_plan(tiny, cfg, dev, kv, act))

    # what this process already holds on a real GPU (earlier tests' allocations) is not the plan's: add it back
    held = torch.cuda.memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
    roomy = (full + 4 * weights + act + held) / 1e9
    tight = (kv_cache_bytes(tiny, batch, max_len, True) + 4 * weights + act + held) / 1e9
    assert tight * 1e9 - held < full
    assert plan(roomy)[1] is False
    p, off = plan(tight)
    assert off is True and p.budgets.kv_bytes == kv_cache_bytes(tiny, batch, max_len, True)
    with pytest.raises(Exception, match="gpu-mem-gb"):
        plan(tight, "off")


def test_copy_rows_of_packed_and_strided_slots():
    """One 2-D copy between the host store's slots [0, 40) of two sequences (16 rows at the store's pitch)
    and a packed sub-batch's device buffer (dense: one row of everything, split at the other side's width)."""
    host = torch.zeros(4, 8, 100, 64)[1:3, :, :40]
    packed = torch.zeros(2 * 8 * 40 * 64).view(2, 8, 40, 64)
    width, pitch = 40 * 64 * 4, 100 * 64 * 4
    assert copy_rows(host, packed) == (16, width, pitch, width)
    assert copy_rows(packed, host) == (16, width, width, pitch)
    assert copy_rows(host, host) == (16, width, pitch, pitch)
    with pytest.raises(ValueError, match="one pitch"):  # sequence-major rows of a head-major store
        copy_rows(torch.zeros(8, 2, 40, 64).transpose(0, 1), packed)


def test_auto_offload_takes_the_fewer_bytes_per_step(tiny):
    """Both plans feasible: "auto" compares the weights each moves per step, plus the whole cache read back
    when offloaded (the GPU tier holds whole groups, so the device's KV can displace more than its size)."""
    batch, max_len, dev = 8, 512, SimpleNamespace(type="cuda")
    full, two = kv_cache_bytes(tiny, batch, max_len), kv_cache_bytes(tiny, batch, max_len, True)
    cfg = EngineConfig.of(mode="preload", gpu_mem_gb=1, kv_offload="auto", quiet=True)

    def choose(on_device_h2d: int, offloaded_h2d: int, two: int = two) -> bool:
        plans = {full: SimpleNamespace(h2d_bytes_per_pass=on_device_h2d),
                 two: SimpleNamespace(h2d_bytes_per_pass=offloaded_h2d)}
        plan, off = plan_with_kv(tiny, cfg, dev, batch, max_len, lambda kv: plans[kv])
        assert plan is plans[two if off else full]
        return off

    assert choose(10**9 + full + 1, 10**9) is True  # the device's KV displaced more weights than it reads back
    assert choose(10**9 + full, 10**9) is False  # a tie stays on the device
    assert choose(10**9, 10**9) is False
    cfg = EngineConfig.of(mode="preload", gpu_mem_gb=1, kv_offload="auto", host_attention=True, quiet=True)
    # attended on the host, the offloaded cache costs the link nothing, and its device buffers hold one
    # prefill pass's 2048 tokens: 4 of the 8 sequences
    assert choose(10**9 + 1, 10**9, kv_cache_bytes(tiny, batch, max_len, True, device_rows=4)) is True
    cpu = plan_with_kv(tiny, cfg, SimpleNamespace(type="cpu"), batch, max_len,
                       lambda kv: SimpleNamespace(h2d_bytes_per_pass=0))
    assert cpu[1] is False  # on the CPU only --kv-offload on offloads


@pytest.mark.parametrize("offload", [False, True])
def test_topk_covering_every_block_is_exact(tiny, offload):
    src = InMemoryWeights(tiny, "cpu", quiet=True)
    ref = outputs(Generator(src, 96))
    gen = Generator(src, 96, KVConfig(block_tokens=8, topk_blk=12), offload=offload)
    assert outputs(gen) == ref
    assert gen.attended_fraction() == 1.0


def test_topk_reads_fewer_blocks(tiny):
    src = InMemoryWeights(tiny, "cpu", quiet=True)
    exact = Generator(src, 96, KVConfig(block_tokens=4))
    approx = Generator(src, 96, KVConfig(block_tokens=4, topk_blk=2), profile_attention=True)
    out = outputs(approx)
    assert all(len(o) == 16 for o in out)
    frac = approx.attended_fraction()
    assert frac is not None and 0 < frac < 0.5  # first + 2 recent + 2 best of up to 18 blocks
    assert approx.attn_time_ms > 0
    # the first decode steps see few enough blocks to be exact: the first token and the next agree
    assert [o[:2] for o in out] == [o[:2] for o in outputs(exact)]


def test_topk_scores_pick_the_matching_block(tiny):
    """A block whose keys align with the query outranks the others (the Quest upper bound)."""
    from runtime.engine.kv import KVCache

    a = tiny.args
    cache = KVCache(a, 1, 64, torch.float32, "cpu", block_tokens=4, topk_blk=1, window_blocks=1)
    k = torch.randn(1, 64, a.n_kv_heads, a.head_dim) * 0.01
    q = torch.randn(1, a.n_heads, 1, a.head_dim)
    k[0, 20:24] = q[0, ::a.n_rep, 0].unsqueeze(0) * 3  # block 5: keys along the first query head of each group
    cache.k[0][:] = k
    cache.release(0, 0, 64)
    blocks = cache.topk_blocks(0, q, 64)
    assert blocks is not None and (blocks[0, :, -1] == 5).all()


def test_cli_kv_flags(untied, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(",".join(map(str, p)) for p in PROMPTS) + "\n")
    res = {}
    for name, extra in {"ref": [], "off": ["--kv-offload", "on", "--kv-block-tokens", "8"],
                        "host": ["--kv-offload", "on", "--host-attention"],
                        "half": ["--kv-offload", "on", "--host-attention", "2"],
                        "seq": ["--kv-offload", "on", "--prefill-by-sequence", "--prefill-chunk", "64"],
                        "across": ["--kv-offload", "on", "--no-prefill-by-sequence", "--prefill-chunk", "64"]}.items():
        js = tmp_path / f"{name}.json"
        run_launch("bench", "--image", str(untied.path), "--prompts", str(f), "--batch-size", "3", "--max-new-tokens",
                   "8", "--warmup-rounds", "0", "--device", "cpu", "--mode", "preload", "--disk-gbps", "1",
                   "--out-json", str(js), *extra)
        res[name] = json.loads(js.read_text())
    assert [r["output_token_ids"] for r in res["off"]["results"]] == [r["output_token_ids"]
                                                                      for r in res["ref"]["results"]]
    kv = res["off"]["kv"]
    assert kv["offload"] and kv["decode_h2d_bytes"] > 0 and kv["decode_d2h_bytes"] > 0
    assert res["off"]["io_bw_MBps"]["kv_h2d_MBps"] > 0 and res["ref"]["io_bw_MBps"]["kv_h2d_MBps"] == 0
    max_len = max(len(p) for p in PROMPTS[:3]) + 8  # bench's --max-seq-len: the longest prompt + new tokens
    slots = -(-max_len // 8) * 8  # whole blocks of --kv-block-tokens 8; the host store is exactly that (fp32)
    assert kv["host_bytes"] == 2 * untied.args.n_layers * 3 * slots * untied.args.n_kv_heads * untied.args.head_dim * 4
    assert kv["alloc_ms"] > 0 and res["ref"]["kv"]["host_bytes"] == 0
    host = res["host"]  # decode attention on the host: same tokens, no KV block fetched while decoding, and the
    assert [r["output_token_ids"] for r in host["results"]] == [r["output_token_ids"]  # bound has its term
                                                                for r in res["ref"]["results"]]
    a, longest = untied.args, max(len(p) for p in PROMPTS[:3])
    assert host["kv"]["host_attention"] and host["kv"]["decode_h2d_bytes"] == 0
    assert host["kv"]["host_kv_bytes_per_step"] == 2 * a.n_layers * 3 * (longest + 4) * a.n_kv_heads * a.head_dim * 4
    assert host["links"]["host_attention"]["gbps"] > 0 and host["bound"]["terms_ms"]["host_attention"] > 0
    assert host["kv"]["host_attention_ms_per_step"] > 0 and res["off"]["kv"]["host_attention_ms_per_step"] == 0
    assert not res["off"]["kv"]["host_attention"] and "host_attention" not in res["off"]["links"]
    half = res["half"]["kv"]  # two of the three layers on the host: their share of the bytes there
    assert [r["output_token_ids"] for r in res["half"]["results"]] == [r["output_token_ids"]
                                                                       for r in res["ref"]["results"]]
    assert half["host_attention_layers"] == 2 and host["kv"]["host_attention_layers"] == a.n_layers
    assert half["host_kv_bytes_per_step"] * a.n_layers == host["kv"]["host_kv_bytes_per_step"] * 2
    assert half["decode_h2d_bytes"] == 0  # the one other layer stays in its device buffer (of two)
    seq = res["seq"]  # a whole prompt per pass: nothing read back while prefilling, every slot written once
    assert [r["output_token_ids"] for r in seq["results"]] == [r["output_token_ids"] for r in res["ref"]["results"]]
    assert seq["kv"]["prefill_h2d_bytes"] == 0 and seq["kv"]["prefill_d2h_bytes"] > 0
    across = res["across"]  # a slice of every prompt per pass: the batch's earlier slots read back
    assert [r["output_token_ids"] for r in across["results"]] == [r["output_token_ids"] for r in res["ref"]["results"]]
    assert across["kv"]["prefill_h2d_bytes"] > 0 and across["kv"]["prefill_d2h_bytes"] == seq["kv"]["prefill_d2h_bytes"]
    assert seq["kv"]["prefill_by_sequence"] and not across["kv"]["prefill_by_sequence"]
    for bad, why in (("0", "1 or more"), ("x", "1 or more"), (str(a.n_layers + 1), f"{a.n_layers} layers")):
        r = run_launch("run", "--image", str(untied.path), "--prompt-ids", "1,2", "--kv-offload", "on",
                       "--host-attention", bad, "--device", "cpu", check=False)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
    bad = run_launch("run", "--image", str(untied.path), "--prompt-ids", "1,2", "--topk-blk", "0", "--device", "cpu",
                     check=False)
    assert bad.returncode == 2 and "--topk-blk" in bad.stderr and "Traceback" not in bad.stderr


def first_decode_logits(gen: Generator, prompts: list[list[int]]) -> torch.Tensor:
    """The logits (B, vocab) of the first decode step after a greedy prefill of the left-padded prompts."""
    cache, longest = gen.new_cache(len(prompts)), max(len(p) for p in prompts)
    pad = [longest - len(p) for p in prompts]
    dev = gen.source.device
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], dtype=torch.long, device=dev)
    nxt = gen._prefill(tokens, cache, pad)[:, -1].argmax(-1).view(-1, 1)
    return gen.forward(nxt, longest, cache, last_only=True, pad=padding(pad, dev))[:, -1].float().cpu()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_gpu_kv_over_budget_offloads_and_matches(tmp_path, monkeypatch):
    """On CUDA: a batch whose KV cache exceeds the GPU budget runs with the cache offloaded (auto), with the
    same tokens as a run with all KV on the GPU; KV bytes moved are reported."""
    out = tmp_path / "s.img"
    pack(SyntheticCheckpoint("llama3.2-1b", n_layers=4, seed=3), out, dtype="bf16", quiet=True)
    image = Image.open(out)
    dev = torch.device("cuda")
    prompts = [[(i * 37 + j) % 1000 + 1 for j in range(900 + 50 * i)] for i in range(4)]
    max_len = 900 + 50 * 3 + 8
    ref_gen = Generator(InMemoryWeights(image, dev, quiet=True), max_len)
    ref = [r.output_token_ids for r in ref_gen.generate_batch(prompts, SamplingConfig(8))]
    short = [p[:300 + 20 * i] for i, p in enumerate(prompts)]  # two to a pass of 1024 tokens
    ref_short = [r.output_token_ids for r in ref_gen.generate_batch(short, SamplingConfig(8))]
    del ref_gen
    torch.cuda.empty_cache()
    # The budget: what the plan needs with two layers' KV buffers, plus half of what the whole cache adds
    # (the plan's own arithmetic, as open_source makes it): offloaded it fits, on the device it does not.
    b = len(prompts)
    act = activation_bytes(image, b, min(chunk_per_sequence(2048, b), max_len))
    kv_two, kv_full = kv_cache_bytes(image, b, max_len, True, 64), kv_cache_bytes(image, b, max_len, block_tokens=64)
    need = make_plan(image, EngineConfig.of(mode="preload", gpu_mem_gb=100, gpu_cached_layers=0), dev, kv_two,
                     act).gpu_bytes_total
    cfg = EngineConfig.of(mode="preload", gpu_mem_gb=gpu_cap_gb((need + (kv_full - kv_two) / 2) / 1e9),
                        gpu_cached_layers=0, quiet=True)
    with pytest.raises(ConfigError):
        make_plan(image, cfg, dev, kv_full, act)
    try:
        with open_source(image, cfg, dev, batch=b, max_len=max_len) as (src, plan, _):
            offloaded = src.kv_offload
            gen = Generator(src, max_len, offload=True)
            out = [r.output_token_ids for r in gen.generate_batch(prompts, SamplingConfig(8))]
            moved = gen.kv_moved()
            # decode attention on the CPU, after the same prefill as gen's
            host = Generator(src, max_len, KVConfig(host_attention="all"), PrefillConfig(by_sequence=False),
                             offload=True)
            steps = []
            res = host.generate_batch(prompts, SamplingConfig(8), on_step=lambda _: steps.append(host.kv_moved()))
            out_host = [r.output_token_ids for r in res]
            # The CPU's attention sums in another order than the GPU's kernel: the same to bf16 rounding, not
            # to the bit, so a random model's greedy tokens may part after a few steps. Its first decode step's
            # logits are compared instead, with the GPU's attention over the same offloaded cache.
            on_gpu, on_host = first_decode_logits(gen, prompts), first_decode_logits(host, prompts)
            # whole prompts per pass (--prefill-by-sequence): nothing read back while prefilling; its passes
            # differ from the chunked ones (bf16 rounding), so the first tokens are compared
            by_seq = Generator(src, max_len, prefill=PrefillConfig(by_sequence=True), offload=True)
            seq_moved = []
            seq = by_seq.generate_batch(prompts, SamplingConfig(8),
                                        on_step=lambda _: seq_moved.append(by_seq.kv_moved()))
            out_seq, seq_prefill_h2d = [r.output_token_ids for r in seq], seq_moved[0][0]
            by_seq = None
            # every layer on the host, whole prompts per pass by default: device buffers of one 1058-slot row,
            # into which two short prompts are packed a pass
            subs = []
            real = TieredKVCache.sub_batch
            monkeypatch.setattr(TieredKVCache, "sub_batch", lambda self, b0, b1, length: subs.append(
                (b1 - b0, self.device_rows)) or real(self, b0, b1, length))
            packed = Generator(src, max_len, KVConfig(host_attention=True), PrefillConfig(chunk=1024), offload=True)
            out_packed = [r.output_token_ids for r in packed.generate_batch(short, SamplingConfig(8))]
            packed_rows, packed = packed.cache.device_rows, None
            del src, gen
            host = None  # its cache and buffers go before the cap is lifted
    finally:
        torch.cuda.empty_cache()
    assert offloaded and out == ref
    assert moved[0] > 0 and moved[1] > 0
    assert [o[:1] for o in out_host] == [r[:1] for r in ref]
    assert seq_prefill_h2d == 0 and [o[:1] for o in out_seq] == [r[:1] for r in ref]
    # two 360-slot prompts a pass in the memory of one 1058-slot row
    assert packed_rows == 1 and subs == [(2, 1), (2, 1)] and [o[:1] for o in out_packed] == [r[:1] for r in ref_short]
    err = float((on_host - on_gpu).abs().max() / on_gpu.abs().max())
    print(f"host attention: logits' largest difference {err:.4f} of the largest logit")
    assert err < 0.02, f"host attention's logits differ from the GPU's by {err:.3f} of their largest"
    a = image.args  # 7 decode steps moved no KV block to the GPU: only each layer's attention output (bf16)
    assert steps[-1][0] - steps[0][0] == 7 * a.n_layers * b * a.n_heads * a.head_dim * 2


def test_host_store_registers_whole_pages_exactly_once(monkeypatch):
    """The offloaded cache's host store (CUDA's registration faked): one cudaHostRegister of whole pages from a
    page boundary where the tensor starts, exactly the tensor's bytes rounded up to a page (PyTorch's pinned
    allocator would round 136 MB up to 256 MB), and one cudaHostUnregister of the same address once the store
    is collected, after the device's work."""
    import gc

    from runtime.engine.kv import HostStore

    calls = []
    fake = SimpleNamespace(cudaHostRegister=lambda p, n, f: calls.append(("register", p, n, f)) or 0,
                           cudaHostUnregister=lambda p: calls.append(("unregister", p)) or 0)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", device)))
    shape = (2, 3, 5, 7, 11)
    store = HostStore(shape, torch.bfloat16, pin=True)
    t = store.tensor
    assert t.shape == shape and t.dtype == torch.bfloat16 and t.is_contiguous() and not t.any()
    nbytes = 2 * 3 * 5 * 7 * 11 * 2
    assert store.nbytes == nbytes and store.pinned == -(-nbytes // 4096) * 4096
    assert calls == [("register", t.data_ptr(), store.pinned, 0)] and t.data_ptr() % 4096 == 0
    ptr = t.data_ptr()
    del store, t
    gc.collect()
    assert calls[1:] == [("synchronize", 0), ("unregister", ptr)]
    assert HostStore(shape, torch.float32, pin=False).pinned == 0 and len(calls) == 3  # on the CPU: no pinning
