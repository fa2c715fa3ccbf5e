"""Speculative decoding (issue 19): greedy output equals plain greedy decoding token for token with every
draft (prompt lookup, the target itself, an unrelated random model that rarely agrees), in memory, in every
streaming mode and with the KV cache offloaded; sampled output is the target's distribution (the same tokens
as plain sampling for a seed, and a chi-square test against the exact distribution); the tree attention
agrees with running each path alone; bad drafts are refused before anything starts."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import STREAMING_MODES, assert_user_error, run_launch

from model.synthetic import SyntheticCheckpoint
from runtime.engine.config import EngineConfig, SamplingConfig
from runtime.engine.generate import Generator
from runtime.engine.source import open_source
from runtime.engine.speculative import ModelDraft, NgramDraft, SpeculativeGenerator, Tree
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image
from runtime.format.pack import pack

# repeats, so that prompt lookup finds continuations; the tiny random model repeats itself too
PROMPT = [3, 4, 5, 6, 3, 4, 5, 7, 3, 4, 9, 11, 3, 4, 5]
NEW = 24
MODES = STREAMING_MODES


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(target, a different random model of the same vocabulary: the low-acceptance draft)."""
    d = tmp_path_factory.mktemp("spec")
    pack(SyntheticCheckpoint("tiny", n_layers=3), d / "t.img", dtype="fp32", quiet=True)
    pack(SyntheticCheckpoint("tiny", n_layers=2, seed=7), d / "other.img", dtype="fp32", quiet=True)
    return Image.open(d / "t.img"), Image.open(d / "other.img")


def plain(image: Image, prompt, cfg: SamplingConfig, max_len: int = 96) -> list[int]:
    return Generator(InMemoryWeights(image, "cpu", quiet=True), max_len).generate(prompt, cfg).output_token_ids


def drafts(images):
    target, other = images
    return {"ngram": lambda: NgramDraft(),
            "self": lambda: ModelDraft(Generator(InMemoryWeights(target, "cpu", quiet=True), 96)),
            "other": lambda: ModelDraft(Generator(InMemoryWeights(other, "cpu", quiet=True), 96))}


@pytest.mark.parametrize("draft", ["ngram", "self", "other"])
@pytest.mark.parametrize("n", [2, 8, 32])
def test_greedy_equals_plain_in_memory(images, draft, n):
    target = images[0]
    ref = plain(target, PROMPT, SamplingConfig(NEW))
    spec = SpeculativeGenerator(Generator(InMemoryWeights(target, "cpu", quiet=True), 96), drafts(images)[draft](), n)
    assert spec.generate(PROMPT, SamplingConfig(NEW)).output_token_ids == ref
    st = spec.stats.to_dict()
    assert st["tokens"] == NEW - 1 and sum(st["tokens_per_pass_histogram"].values()) == st["passes"]
    if draft == "self":  # the target as its own draft: nearly every pass keeps a path
        assert st["tokens_per_pass"] > 1.5, st
    if draft == "other":
        assert st["tokens_per_pass"] < 1.5, st  # low acceptance, still exact


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kv_offload", ["off", "on"])
def test_greedy_equals_plain_streamed(images, mode, kv_offload):
    target = images[0]
    ref = plain(target, PROMPT, SamplingConfig(NEW))
    cfg = EngineConfig.of(workers=2, quiet=True, kv_offload=kv_offload, **MODES[mode])
    with open_source(target, cfg, torch.device("cpu"), max_len=96) as (src, plan, _):
        assert mode == "preload" or plan.stream
        gen = Generator(src, 96, offload=src.kv_offload or kv_offload == "on")
        for name, make in drafts(images).items():
            if name == "other":
                continue
            spec = SpeculativeGenerator(gen, make(), 8)
            assert spec.generate(PROMPT, SamplingConfig(NEW)).output_token_ids == ref, (name, mode, kv_offload)
            assert spec.stats.passes < NEW - 1  # some pass verified more than one token


def test_tree_logits_equal_each_path_alone(images):
    """Every node's logits from one tree pass equal those of its path run as a plain sequence."""
    target = images[0]
    gen = Generator(InMemoryWeights(target, "cpu", quiet=True), 64)
    tree = Tree([5])
    a = tree.add(0, 9)
    tree.add(0, 17)
    b = tree.add(a, 30)
    tree.add(a, 31)
    tree.add(b, 2)
    cache = gen.new_cache(1)
    gen.forward(torch.tensor([PROMPT[:-1]]), 0, cache)
    start = len(PROMPT) - 1
    got = gen.forward_tree(torch.tensor([tree.tokens]), start, cache, tree.queries(range(len(tree)), start, "cpu"))[0]
    for node in range(len(tree)):
        path, j = [], node
        while j >= 0:
            path.insert(0, tree.tokens[j])
            j = tree.parent[j]
        ref = gen.forward(torch.tensor([PROMPT[:-1] + path]), 0, gen.new_cache(1))[0, -1]
        assert (got[node] - ref).abs().max().item() < 1e-4, node
    # the same pass at static shapes (graphs.StaticDecode.step_tree, no capture), the whole tree and, as the
    # draft expands it, its nodes after the root's, with the root in the cache
    from runtime.engine.graphs import StaticDecode

    static = StaticDecode(gen, capture=False)
    sc = static.begin(1, None)
    gen.forward(torch.tensor([PROMPT[:-1]]), 0, sc)
    q = tree.queries(range(len(tree)), start, "cpu")
    assert static.fits_tree(sc, len(tree), start, q) and not static.fits_tree(cache, len(tree), start, q)
    assert (static.step_tree(torch.tensor(tree.tokens), start, q) - got).abs().max().item() < 1e-5
    rows = range(1, len(tree))
    part = static.step_tree(torch.tensor(tree.tokens[1:]), start + 1, tree.queries(rows, start, "cpu", True))
    assert (part - got[1:]).abs().max().item() < 1e-5
    # keeping path 0 -> a -> b moves their entries to consecutive slots: the next token's logits are then
    # those of the plain sequence
    cache.keep([start, start + a, start + b], start)
    nxt = gen.forward(torch.tensor([[7]]), start + 3, cache)[0, -1]
    ref = gen.forward(torch.tensor([PROMPT[:-1] + [5, 9, 30, 7]]), 0, gen.new_cache(1))[0, -1]
    assert (nxt - ref).abs().max().item() < 1e-4


def test_sampling_same_tokens_as_plain_for_each_seed(images):
    target = images[0]
    gen = Generator(InMemoryWeights(target, "cpu", quiet=True), 96)
    spec = SpeculativeGenerator(gen, drafts(images)["self"](), 8)
    for seed in range(6):
        cfg = SamplingConfig(16, temperature=0.7, top_p=0.9, seed=seed)
        assert spec.generate(PROMPT, cfg).output_token_ids == plain(target, PROMPT, cfg), seed


def nucleus(logits: torch.Tensor, t: float, top_p: float) -> torch.Tensor:
    """The distribution temperature ``t`` and top-p ``top_p`` sample from: the smallest set of most likely
    tokens whose mass reaches top_p, renormalised."""
    p = torch.softmax(logits / t, -1)
    sp, idx = p.sort(descending=True)
    keep = sp.cumsum(-1) - sp <= top_p
    out = torch.zeros_like(p)
    out[idx[keep]] = sp[keep]
    return out / out.sum()


def test_sampling_distribution_chi_square(images):
    """The second token (the first a tree pass decides) over N = 1000 seed values against its exact distribution
    under the target, sum over x1 of p(x1) p(x2 | x1), at temperature 0.1 and top-p 0.8, in K + 1 bins of
    expected count >= 15 (the rest pooled). A total-variation distance d between the binned distributions
    makes the chi-square's noncentrality at least N (2d)^2 (Cauchy-Schwarz): 90 for d = 0.15, so with K <= 20
    degrees of freedom the test at alpha = 0.001 (critical value 45.3 at K = 20) rejects such a difference
    with power above 0.99 (noncentral chi-square mean K + 90, sd sqrt(2 (K + 180))), and d = 0.1 with about
    0.85. The seed values are printed."""
    target = images[0]
    gen = Generator(InMemoryWeights(target, "cpu", quiet=True), 24)
    t, top_p = 0.1, 0.8
    with torch.no_grad():
        p1 = nucleus(gen.forward(torch.tensor([PROMPT]), 0, gen.new_cache(1))[0, -1], t, top_p)
        exact = torch.zeros_like(p1)
        for x1 in p1.nonzero().flatten().tolist():
            exact += p1[x1] * nucleus(gen.forward(torch.tensor([PROMPT + [x1]]), 0, gen.new_cache(1))[0, -1], t, top_p)
    n, base = 1000, 1000
    print(f"seed values {base}..{base + n - 1}")
    spec = SpeculativeGenerator(Generator(InMemoryWeights(target, "cpu", quiet=True), 24), NgramDraft(), 4)
    counts = torch.zeros_like(exact)
    for seed in range(base, base + n):
        counts[spec.generate(PROMPT, SamplingConfig(2, temperature=t, top_p=top_p, seed=seed)).output_token_ids[1]] += 1
    assert counts.sum() == n and counts[exact == 0].sum() == 0  # nothing outside the target's support
    order = exact.argsort(descending=True).tolist()
    bins = [i for i in order if exact[i] * n >= 15]
    rest = [i for i in order if 0 < exact[i] * n < 15]
    obs = [counts[i].item() for i in bins] + ([counts[rest].sum().item()] if rest else [])
    exp = [exact[i].item() * n for i in bins] + ([exact[rest].sum().item() * n] if rest else [])
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    k = len(obs) - 1  # degrees of freedom
    assert 2 <= k <= 20, k
    crit = k * (1 - 2 / (9 * k) + 3.0902 * math.sqrt(2 / (9 * k))) ** 3  # upper 0.001 point (Wilson-Hilferty)
    print(f"chi-square {stat:.1f} on {k} degrees of freedom, critical value {crit:.1f} at alpha 0.001")
    assert stat < crit, (stat, crit, k)


def test_cli_draft_and_bad_drafts(images, tmp_path):
    target, other = images
    out = tmp_path / "o.json"
    ids = ",".join(map(str, PROMPT))
    ref = plain(target, PROMPT, SamplingConfig(12))
    for draft in ("ngram", str(other.path)):
        trace = tmp_path / "t.json"
        proc = run_launch("run", "--image", str(target.path), "--prompt-ids", ids, "--max-new-tokens", "12",
                          "--device", "cpu", "--draft", draft, "--draft-tokens", "6", "--out-json", str(out),
                          "--trace", str(trace))
        j = json.loads(out.read_text())
        assert j["output_token_ids"] == ref
        sp = j["speculative"]
        assert sp["passes"] >= 1 and sp["tree_tokens_fixed"] and "speculative, draft" in proc.stderr, proc.stderr
        spans = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "speculative"]
        assert sorted({e["name"] for e in spans}) == ["draft", "verify"] and len(spans) == 2 * sp["passes"]

    def run(*extra):
        return run_launch("run", "--image", str(target.path), "--prompt-ids", ids, "--device", "cpu", *extra,
                          check=False)

    assert_user_error(run("--draft", str(tmp_path / "missing.img")), "missing.img", "no such image")
    assert_user_error(run("--draft", "ngram", "--draft-tokens", "0"), "--draft-tokens", "at least 1", "0")
    assert_user_error(run("--draft-tokens", "4"), "--draft-tokens 4 needs --draft")
    assert_user_error(run("--draft", "ngram", "--draft-tokens", "5000"), "--draft-tokens 5000", "--prefill-chunk")
    assert_user_error(run("--draft", "ngram", "--topk-blk", "2"), "--draft and --topk-blk")
    bad = tmp_path / "bad.img"  # a corrupt draft: the header's magic flipped
    data = bytearray(other.path.read_bytes())
    data[0] ^= 0xFF
    bad.write_bytes(bytes(data))
    (tmp_path / "bad.img.manifest.json").write_text(other.manifest_path.read_text())
    assert_user_error(run("--draft", str(bad)), "bad.img")
    wide = tmp_path / "wide.img"  # another vocabulary
    pack(SyntheticCheckpoint(dataclasses.replace(target.args, n_layers=1, vocab_size=300)), wide, dtype="fp32",
         quiet=True)
    assert_user_error(run("--draft", str(wide)), "300 tokens", str(target.args.vocab_size))
    f = tmp_path / "p.txt"
    f.write_text(f"{ids}\n{ids}\n")
    assert_user_error(run_launch("run", "--image", str(target.path), "--prompts", str(f), "--batch-size", "2",
                                 "--device", "cpu", "--draft", "ngram", check=False), "--batch-size 1", "2")
    # a draft larger than the GPU budget: refused by the plan before torch starts (planned for CUDA here)
    assert_user_error(run_launch("run", "--image", str(target.path), "--prompt-ids", ids, "--device", "cuda",
                                 "--gpu-mem-gb", "0.3", "--draft", str(other.path), check=False),
                      "the draft model", "--gpu-mem-gb")


@pytest.mark.slow
def test_smollm2_with_its_int4_image_as_draft(smol_gguf, smol_image, tmp_path):
    """The embedded SmolLM2 (fp32 image) with its own int4 g64 image as the draft, and with prompt lookup:
    greedy output equals plain greedy, in memory and streamed from disk; the int4 draft agrees often."""
    from model.checkpoint import open_checkpoint
    from runtime.format.image import WeightFormat

    draft_path = tmp_path / "smol.int4.img"
    pack(open_checkpoint(smol_gguf), draft_path, dtype=WeightFormat("fp32", "int4", 64), quiet=True)
    target, draft = Image.open(smol_image), Image.open(draft_path)
    # the chat template of a request to repeat a sentence: the answer copies it (prompt lookup's case)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
              8182, 2, 198, 1, 4093, 198, 48010, 3869, 42, 378, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 411,
              260, 4626, 30, 2, 198, 1, 520, 9531, 198]  # "Repeat exactly: The quick brown fox ... river."
    new, max_len = 12, len(prompt) + 12 + 8
    ref = plain(target, prompt, SamplingConfig(new), max_len)
    gen = Generator(InMemoryWeights(target, "cpu", quiet=True), max_len)
    for make in (lambda: ModelDraft(Generator(InMemoryWeights(draft, "cpu", quiet=True), max_len)), NgramDraft):
        spec = SpeculativeGenerator(gen, make(), 8)
        assert spec.generate(prompt, SamplingConfig(new)).output_token_ids == ref
        if isinstance(spec.draft, ModelDraft):
            assert spec.stats.to_dict()["tokens_per_pass"] > 2, spec.stats.to_dict()  # int4 agrees with fp32
    cfg = EngineConfig.of(workers=2, quiet=True, mode="stream", prefetch_distance=2)
    with open_source(target, cfg, torch.device("cpu"), max_len=max_len) as (src, plan, _):
        assert plan.stream
        spec = SpeculativeGenerator(Generator(src, max_len),
                                    ModelDraft(Generator(InMemoryWeights(draft, "cpu", quiet=True), max_len)), 8)
        assert spec.generate(prompt, SamplingConfig(new)).output_token_ids == ref


@pytest.mark.parametrize("n", [8])
def test_static_tree_passes_equal_plain(images, n):
    """The target's verify passes and the draft's expansions and catch-ups at static shapes (graphs.StaticDecode
    .step_tree without capture: the graphs' computation), over an in-memory and a streamed target: plain greedy."""
    from runtime.engine.graphs import StaticDecode

    target, other = images
    ref = plain(target, PROMPT, SamplingConfig(NEW))
    cfg = EngineConfig.of(workers=2, quiet=True, mode="stream")
    with open_source(target, cfg, torch.device("cpu"), max_len=96) as (src, _, _):
        for gen in (Generator(InMemoryWeights(target, "cpu", quiet=True), 96), Generator(src, 96)):
            gen.static = StaticDecode(gen, capture=False)
            calls = []
            step_tree = gen.static.step_tree
            gen.static.step_tree = lambda *a, c=calls, f=step_tree: c.append(len(a[0])) or f(*a)
            for image in (target, other):
                dgen = Generator(InMemoryWeights(image, "cpu", quiet=True), 96)
                dgen.static = StaticDecode(dgen, capture=False)
                spec = SpeculativeGenerator(gen, ModelDraft(dgen), n)
                assert spec.generate(PROMPT, SamplingConfig(NEW)).output_token_ids == ref, (n, image.path)
                assert dgen.static.tree_in is not None  # the draft's passes took the static path
            assert calls and max(calls) > 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_offload", ["off", "on"])
def test_cuda_greedy_equals_plain(images, kv_offload):
    """On CUDA (the masked SDPA path, the offloaded cache's copy stream): speculative greedy equals plain,
    in memory and streamed."""
    target = images[0]
    dev = torch.device("cuda")
    ref = Generator(InMemoryWeights(target, dev, quiet=True), 96).generate(PROMPT, SamplingConfig(NEW)).output_token_ids
    for mode in ("full", "stream"):
        cfg = EngineConfig.of(workers=2, quiet=True, mode=mode, kv_offload=kv_offload, gpu_cached_layers=0)
        with open_source(target, cfg, dev, max_len=96) as (src, _, _):
            gen = Generator(src, 96, offload=kv_offload == "on")
            for draft in (NgramDraft(), ModelDraft(Generator(InMemoryWeights(target, dev, quiet=True), 96))):
                spec = SpeculativeGenerator(gen, draft, 8)
                assert spec.generate(PROMPT, SamplingConfig(NEW)).output_token_ids == ref, (mode, kv_offload)
        if kv_offload == "off":  # replayed from CUDA graphs: the target's passes and the draft's
            with open_source(target, cfg, dev, max_len=96) as (src, _, _):
                gen = Generator(src, 96, cuda_graphs=True)
                draft = ModelDraft(Generator(InMemoryWeights(target, dev, quiet=True), 96, cuda_graphs=True))
                spec = SpeculativeGenerator(gen, draft, 8)
                assert spec.generate(PROMPT, SamplingConfig(NEW)).output_token_ids == ref, mode
                assert any(k[0][0] == "tree" for k in draft.gen.static.graphs), list(draft.gen.static.graphs)[:4]
                assert gen.static is not None and gen.static.tree_in is not None


def _chain_pass(size, rng, keep=0.9, node_ms=0.5):
    """One simulated pass for TreeSize: a chain of ``size.n`` nodes (the draft takes ``node_ms`` a node), the
    walk keeping each next node with probability ``keep``; returns (tree, accepted path, emitted)."""
    from runtime.engine.speculative import Tree

    tree = Tree([0])
    for i in range(1, size.n):
        tree.add(i - 1, i)
        tree.at_ms[i] = i * node_ms
    path = []
    while len(path) < size.n - 1 and rng.random() < keep:
        path.append(len(path) + 1)
    return tree, path, len(path) + 1


def test_tree_size_climbs_to_the_best_rate():
    """TreeSize on simulated chains (the draft 0.5 ms a node; a pass 100 ms + 2 ms a node; each next node kept
    with probability 0.9, seeded) climbs from 8 and settles on the size of the best expected rate, 16; given the
    probe's costs instead, it starts where a tree costs at most 1.1x a plain pass and uses their pass times; a
    fixed size never moves."""
    import random

    from runtime.engine.speculative import TreeSize
    from runtime.engine.treecosts import PassCosts

    def expected(m):  # tokens a second of an m-node chain
        return (1 + sum(0.9 ** d for d in range(1, m))) / ((m - 1) * 0.5 + 100 + 2 * m) * 1e3

    rng = random.Random(0)
    size = TreeSize(8, 256, fixed=False)
    for _ in range(400):
        tree, path, emitted = _chain_pass(size, rng)
        size.record(tree, path, emitted, 100 + 2 * len(tree))
    best = max([2, 4, 8, 16, 32, 64, 128, 256], key=expected)
    assert best == 16 and size.n == best and size.history[:3] == [8, 16, 32], size.history
    assert abs(size.rates[16] - expected(16)) / expected(16) < 0.05, (size.rates, expected(16))
    assert "16 tree tokens a pass" in size.describe()

    costs = PassCosts({1: 100.0, 8: 104.0, 64: 108.0, 256: 200.0}, {1: 0.0, 256: 2.56})  # flat to 64, then not
    chosen = TreeSize(8, 256, fixed=False, costs=costs)
    assert chosen.n == 64
    chosen.record(*_chain_pass(chosen, rng), 999.0)  # the probe's time for each prefix, not the run's
    assert chosen.pass_ms(32) == 104.0 + 4.0 * 24 / 56 and chosen.pass_ms(64) == 108.0
    fixed = TreeSize(8, 256, fixed=True, costs=costs)
    for _ in range(50):
        fixed.record(*_chain_pass(fixed, rng), 116.0)
    assert fixed.n == 8 and fixed.history == [8]


def test_probe_costs_saved_and_found(images, tmp_path, monkeypatch):
    """The probe's costs round-trip through the cache, keyed by image, device, draft and H2D bytes a pass
    (within 10%); another draft or another budget finds none."""
    from runtime.engine.treecosts import PassCosts, load_costs, save_costs

    monkeypatch.setenv("LLMSTREAM_CACHE_DIR", str(tmp_path))
    target, cpu = images[0], torch.device("cpu")
    save_costs(target, cpu, 1000, "ngram", PassCosts({1: 5.0, 8: 6.0}, {1: 0.0, 8: 0.1}))
    got = load_costs(target, cpu, 1050, "ngram")
    assert got is not None and got.pass_ms == {1: 5.0, 8: 6.0} and got.draft_ms[8] == 0.1
    assert load_costs(target, cpu, 2000, "ngram") is None
    assert load_costs(target, cpu, 1000, str(images[1].path)) is None
