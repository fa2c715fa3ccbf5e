"""Mixtures of experts (issue 29 item 1) against transformers' own classes.

Tiny random ``MixtralForCausalLM`` (top-2 of 8, renormalised), ``Qwen3MoeForCausalLM`` (top-3 of 8, norm_topk_prob,
q/k norms) and ``Qwen2MoeForCausalLM`` (top-2 of 6 not renormalised, a shared expert with its sigmoid gate, q/k/v
biases) checkpoints, 2 layers of 64, written with ``save_pretrained`` (one tensor per expert, as the Hub stores
them) and converted to GGUF as llama.cpp's converter does (experts stacked in ``ffn_*_exps``; Mixtral as a
``llama`` GGUF with ``expert_count``): tests/arch_models.py.

  - packed from safetensors and from GGUF: each expert its own group; greedy tokens equal transformers'
    ``generate``, logits within 1e-4 (fp32); Q8_0 blocks of stacked experts kept, split per expert;
  - every streaming mode (each pass fetches only the experts its tokens chose: tests/test_experts.py): preload,
    stream, and mixed with experts in the client's memory, in the DRAM tier and read on demand; nothing left in
    /dev/shm;
  - batched prompts (one batch, and the serving scheduler's continuous batch) equal their solo runs; two
    tensor-parallel ranks equal one process;
  - refused at pack with the tensor's or key's name: an expert count that does not match the router's or the
    stacked tensors' shapes, a top-k beyond the experts, dense layers mixed in; DeepSeek's and gpt-oss's
    architectures named and refused; the probe refuses a mixture (it does not measure one yet).

Run: python -m pytest -q -n 0 tests/test_moe.py
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from arch_models import (
    MOE_CASES,
    MOE_GGUF_ARCH,
    from_hub_tensors,
    gguf_tensors,
    hf_greedy,
    hf_logits,
    hub_tensors,
    moe_config,
    run_image,
    write_gguf,
    write_hf,
)
from conftest import assert_user_error, run_launch

from model.checkpoint import open_checkpoint
from model.errors import CheckpointError, ConfigError
from model.groups import group_kind, group_names
from runtime.engine.config import EngineConfig, SamplingConfig
from runtime.engine.generate import Generator
from runtime.engine.source import open_source
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image, WeightFormat
from runtime.format.pack import pack
from runtime.ipc.shm import leftover_names

pytest.importorskip("transformers")

PROMPT = [5, 77, 140, 12, 200, 9, 61, 33, 101, 250, 7]
PROMPTS = [PROMPT, [44, 3, 180], [9, 9, 120, 230, 17, 64, 2]]
NEW = 10
MAX_LEN = 40
TOL = 1e-4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (transformers model, fp32 image from safetensors, fp32 image from GGUF), each written once."""
    cache = {}

    def get(name: str):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            model = write_hf(d / "hf", name, seed=3, config=moe_config(name))
            pack(open_checkpoint(d / "hf"), d / "hf.img", dtype="fp32", quiet=True)
            write_gguf(d / "m.gguf", model, MOE_GGUF_ARCH[name])
            pack(open_checkpoint(d / "m.gguf"), d / "gguf.img", dtype="fp32", quiet=True)
            cache[name] = model, Image.open(d / "hf.img"), Image.open(d / "gguf.img")
        return cache[name]

    return get


def ours(image: Image, prompt=PROMPT):
    return run_image(image, prompt, NEW, MAX_LEN)


@pytest.mark.parametrize("name", MOE_CASES)
def test_arguments_and_groups(built, name):
    model, image, gguf_image = built(name)
    c, a = model.config, image.args
    assert a.arch == name and dataclasses.replace(gguf_image.args, norm_eps=a.norm_eps) == a  # eps: GGUF's f32
    assert (a.n_experts, a.n_experts_used) == (getattr(c, "num_local_experts", None) or c.num_experts,
                                               c.num_experts_per_tok)
    assert a.ffn_hidden == (c.intermediate_size if name == "mixtral" else c.moe_intermediate_size)
    assert a.norm_topk_prob == (name != "qwen2_moe")
    assert a.shared_ffn_hidden == (96 if name == "qwen2_moe" else 0)
    kinds = [group_kind(g) for g in group_names(a) if g.startswith("layers.0.")]
    assert kinds == ["attention", *["expert"] * a.n_experts, *(["shared_expert"] if a.shared_ffn_hidden else [])]
    assert list(image.groups) == group_names(a)


@pytest.mark.parametrize("source", ["safetensors", "gguf"])
@pytest.mark.parametrize("name", MOE_CASES)
def test_full_equals_transformers(built, name, source):
    model, hf_image, gguf_image = built(name)
    tokens, logits = ours(hf_image if source == "safetensors" else gguf_image)
    assert tokens == hf_greedy(model, PROMPT, NEW)
    assert (logits - hf_logits(model, [PROMPT])).abs().max().item() <= TOL


# one streamed mode per case, all three covered: qwen2_moe's mixed plan holds layer 0 in the client's memory (the
# CPU's GPU tier), part of layer 1 in the DRAM tier and streams the rest: experts on every tier
MODES = {"mixtral": dict(mode="stream", gpu_cached_layers=0, prefetch_distance=2),
         "qwen3_moe": dict(mode="preload"),
         "qwen2_moe": dict(mode="mixed", gpu_cached_layers=1, dram_gb=0.0004, prefetch_distance=2)}


@pytest.mark.parametrize("name", MOE_CASES)
def test_streamed_mode_equals_transformers(built, name):
    model, image, _ = built(name)
    cfg = EngineConfig.of(**MODES[name], workers=2, quiet=True)
    with open_source(image, cfg, torch.device("cpu"), max_len=MAX_LEN) as (src, plan, handle):
        tiers = {t: {group_kind(g) for g in getattr(plan, t)} for t in ("gpu", "dram", "stream")}
        gen = Generator(src, MAX_LEN)
        tokens = gen.generate(PROMPT, SamplingConfig(NEW)).output_token_ids
        logits = gen.forward(torch.tensor([PROMPT]), 0, gen.new_cache(1))
    assert not leftover_names(pool=handle.name)
    if name == "qwen2_moe":
        assert all("expert" in kinds for kinds in tiers.values()), plan.describe()
    assert tokens == hf_greedy(model, PROMPT, NEW)
    assert (logits - hf_logits(model, [PROMPT])).abs().max().item() <= TOL


@pytest.mark.parametrize("name", MOE_CASES)
def test_batch_equals_solo(built, name):
    """Prompts of different lengths in one batch (left-padded: the padding is routed too, and computes nothing
    a real token sees) equal their solo runs."""
    _, image, _ = built(name)
    gen = Generator(InMemoryWeights(image, "cpu", quiet=True), MAX_LEN)
    res = gen.generate_batch(PROMPTS, SamplingConfig(NEW))
    assert [r.output_token_ids for r in res] == [gen.generate(p, SamplingConfig(NEW)).output_token_ids
                                                 for p in PROMPTS]


def test_continuous_batch_equals_solo(built):
    """The serving scheduler's rows (a decode row beside a joining row's prompt chunk, padding routed too) equal
    their solo runs."""
    from runtime.engine.scheduler import Scheduler, SchedulerConfig, SeqRequest

    _, image, _ = built("qwen2_moe")
    gen = Generator(InMemoryWeights(image, "cpu", quiet=True), MAX_LEN)
    done: dict[int, list[int]] = {}
    sched = Scheduler(gen, SchedulerConfig(max_batch=3))
    for i, p in enumerate(PROMPTS):
        sched.submit(SeqRequest(p, SamplingConfig(NEW), lambda k, x, i=i: k == "done" and done.setdefault(i, x)))
        sched.tick()  # the next joins while the earlier ones decode
    while sched.tick():
        pass
    assert max(r.batched for r in done.values()) >= 2
    assert [done[i].output_token_ids for i in range(len(PROMPTS))] == [
        gen.generate(p, SamplingConfig(NEW)).output_token_ids for p in PROMPTS]


def test_kept_q8_0_blocks_of_stacked_experts(built, tmp_path):
    """Mixtral's stacked expert tensors stored as Q8_0 in a ``llama`` GGUF: kept as blocks, split per expert at pack
    (each expert's rows are whole rows of blocks); logits equal transformers' on the file's values."""
    import gguf

    model = built("mixtral")[0]
    q8 = gguf.GGMLQuantizationType.Q8_0
    tensors, hub = gguf_tensors(model, "llama"), hub_tensors(model)
    back = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}
    for name in [n for n in tensors if n.split(".")[-2] in back]:
        q = gguf.quants.quantize(tensors[name], q8)
        tensors[name] = (q, q8)
        _, i, stack, _ = name.split(".")
        for e, w in enumerate(gguf.quants.dequantize(q, q8)):
            hub[f"model.layers.{i}.block_sparse_moe.experts.{e}.{back[stack]}.weight"] = torch.from_numpy(w.copy())
    write_gguf(tmp_path / "q8.gguf", model, "llama", tensors=tensors)
    pack(open_checkpoint(tmp_path / "q8.gguf"), tmp_path / "q8.img", dtype=WeightFormat("fp32", keep_blocks=True),
         quiet=True)
    image = Image.open(tmp_path / "q8.img")
    kept = {group_kind(g.name) for g in image.groups.values() for t in g.tensors if t.dtype == "q8_0"}
    assert kept == {"expert"}
    theirs = from_hub_tensors(model, hub, tmp_path / "ref")
    tokens, logits = ours(image)
    assert (logits - hf_logits(theirs, [PROMPT])).abs().max().item() <= TOL
    assert tokens == hf_greedy(theirs, PROMPT, NEW)


def test_two_tensor_parallel_ranks_equal_one(built):
    """Every expert and the shared expert split by rows/columns, the router whole: every rank routes alike."""
    from runtime.engine.ranks import run_ranks

    image = built("qwen2_moe")[1]
    tokens, logits = ours(image)
    cfg = EngineConfig.from_flags({"quiet": True, "mode": "stream", "prefetch_distance": 2})
    res, _, facts = run_ranks(image, cfg, SamplingConfig(NEW), [PROMPT], 1, len(PROMPT) + NEW, frozenset(), 2, "cpu",
                              logits=True)
    assert res[0]["output_token_ids"] == tokens
    np.testing.assert_allclose(facts["logits"], logits[0].numpy(), rtol=0, atol=TOL)


# ---- bad input ----------------------------------------------------------------------------------------------------

def _edit_config(d, **changes):
    cfg = d / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), **changes}))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A fresh copy of a case's safetensors directory, to break."""
    import shutil

    src = {}

    def get(name: str, into):
        if name not in src:
            src[name] = tmp_path_factory.mktemp(f"{name}-src")
            write_hf(src[name], name, seed=1, config=moe_config(name))
        shutil.copytree(src[name], into)
        return into

    return get


def test_expert_count_that_does_not_match_the_tensors_is_refused(hf_dirs, tmp_path):
    d = hf_dirs("mixtral", tmp_path / "fewer")
    _edit_config(d, num_local_experts=4)  # the router holds 8 rows
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.block_sparse_moe\.gate\.weight for "
                                              r"\S+ has shape \(8, 64\), expected \(4, 64\)"):
        pack(open_checkpoint(d), tmp_path / "x.img", dtype="fp32", quiet=True)
    d = hf_dirs("qwen3_moe", tmp_path / "more")
    _edit_config(d, num_local_experts=9)  # no ninth expert
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.gate\.weight for \S+ has shape "
                                              r"\(8, 64\), expected \(9, 64\)"):
        pack(open_checkpoint(d), tmp_path / "y.img", dtype="fp32", quiet=True)
    assert not any(tmp_path.glob("*.img"))


def test_gguf_expert_count_that_does_not_match_the_stack_is_refused(built, tmp_path):
    model = built("qwen2_moe")[0]
    tensors = gguf_tensors(model, "qwen2moe")
    tensors["blk.1.ffn_up_exps.weight"] = tensors["blk.1.ffn_up_exps.weight"][:5]  # 5 of the 6 experts
    write_gguf(tmp_path / "bad.gguf", model, "qwen2moe", tensors=tensors)
    with pytest.raises(CheckpointError, match=r"tensor blk\.1\.ffn_up_exps\.weight has shape \(5, 48, 64\), "
                                              r"expected \(6, 48, 64\)"):
        pack(open_checkpoint(tmp_path / "bad.gguf"), tmp_path / "bad.img", dtype="fp32", quiet=True)
    assert not (tmp_path / "bad.img").exists()


@pytest.mark.parametrize("name,changes,words", [
    ("mixtral", {"num_experts_per_tok": 9}, ["num_experts_per_tok 9", "number of experts 8"]),
    ("qwen3_moe", {"mlp_only_layers": [1]}, ["mlp_only_layers [1]", "dense FFN layers"]),
    ("qwen2_moe", {"decoder_sparse_step": 2}, ["decoder_sparse_step 2", "dense FFN layers"]),
    ("qwen2_moe", {"num_experts": 6, "num_local_experts": 4}, ["expert counts disagree", "num_local_experts"]),
])
def test_bad_moe_config_is_refused_by_name(hf_dirs, tmp_path, name, changes, words):
    d = hf_dirs(name, tmp_path / "hf")
    _edit_config(d, **changes)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(d)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_unsupported_mixtures_are_named_and_refused(hf_dirs, tmp_path):
    d = hf_dirs("qwen3_moe", tmp_path / "hf")
    for cls, why in (("DeepseekV3ForCausalLM", r"multi-head latent attention \(MLA\)"),
                     ("GptOssForCausalLM", "attention sinks")):
        _edit_config(d, architectures=[cls])
        with pytest.raises(CheckpointError, match=rf"architecture \['{cls}'\] is not supported \(.*{why}"):
            open_checkpoint(d)
    out = tmp_path / "out" / "x.img"
    out.parent.mkdir()
    proc = run_launch("pack", "--checkpoint", str(d), "--out", str(out), check=False)
    assert_user_error(proc, "GptOssForCausalLM", "not supported", "MixtralForCausalLM")
    assert list(out.parent.iterdir()) == []


def test_unsupported_gguf_mixture_is_named(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "ds.gguf"), "deepseek2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"GGUF architecture 'deepseek2' is not supported \(DeepSeek"):
        open_checkpoint(tmp_path / "ds.gguf")


def test_top_k_beyond_the_experts_in_model_arguments():
    from model.args import ModelArgs

    base = dict(dim=8, n_layers=1, n_heads=2, vocab_size=4, ffn_hidden=8, arch="mixtral")
    with pytest.raises(ConfigError, match="n_experts_used .top-k. must be 1 to n_experts 4, found 5"):
        ModelArgs(**base, n_experts=4, n_experts_used=5)
    with pytest.raises(ConfigError, match="a llama model has no experts"):
        ModelArgs(**{**base, "arch": "llama"}, n_experts=4, n_experts_used=2)


def test_probe_refuses_a_mixture(built):
    from runtime.measure.probe import ProbeConfig, model_spec

    image = built("qwen3_moe")[1]
    with pytest.raises(ConfigError, match="qwen3_moe mixture of experts"):
        model_spec(ProbeConfig(image=str(image.path)))


GPU_MODES = {"full": None, "stream": dict(mode="stream", gpu_cached_layers=0, prefetch_distance=2),
             "mixed": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=0, prefetch_distance=2)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", MOE_CASES)
@pytest.mark.parametrize("mode", sorted(GPU_MODES))
def test_gpu_equals_transformers(built, name, mode):
    """On CUDA (fp32; full mode runs eager: a mixture's decode step is not captured in a CUDA graph), every
    streaming mode: transformers' greedy tokens and logits within 1e-3."""
    from conftest import gpu_cap_gb

    model, image, _ = built(name)
    dev = torch.device("cuda")
    if GPU_MODES[mode] is None:
        gen = Generator(InMemoryWeights(image, dev, quiet=True), MAX_LEN, cuda_graphs=True)
        assert gen.static is None
        tokens = gen.generate(PROMPT, SamplingConfig(NEW)).output_token_ids
        logits = gen.forward(torch.tensor([PROMPT], device=dev), 0, gen.new_cache(1)).cpu()
    else:
        cfg = EngineConfig.of(**GPU_MODES[mode], gpu_mem_gb=gpu_cap_gb(0.5), workers=2, quiet=True)
        with open_source(image, cfg, dev, max_len=MAX_LEN) as (src, plan, _):
            assert plan.stream, plan.describe()
            gen = Generator(src, MAX_LEN)
            tokens = gen.generate(PROMPT, SamplingConfig(NEW)).output_token_ids
            logits = gen.forward(torch.tensor([PROMPT], device=dev), 0, gen.new_cache(1)).cpu()
    assert tokens == hf_greedy(model, PROMPT, NEW)
    assert (logits - hf_logits(model, [PROMPT])).abs().max().item() <= 1e-3


def test_cli_runs_a_synthetic_mixture_streamed(tmp_path):
    """The synthetic tiny-mixtral shape packed, and ``run --mode stream --verbose`` on it: the tokens of an in-process
    full run, the plan names the expert groups' label, and the experts' hit rates are printed."""
    from model.synthetic import SyntheticCheckpoint

    img, out = tmp_path / "mx.img", tmp_path / "out.json"
    pack(SyntheticCheckpoint("tiny-mixtral"), img, dtype="fp32", quiet=True)
    proc = run_launch("run", "--image", str(img), "--prompt-ids", "1,2,3,4,5", "--max-new-tokens", "4", "--device",
                      "cpu", "--mode", "stream", "--out-json", str(out), "--verbose")
    assert "16 exp" in proc.stderr + proc.stdout, proc.stderr
    # --verbose: the tiers' hit rates (every expert streamed: disk 100%); no guess (the routers stream too)
    assert "[experts: 8 layer routings fetched" in proc.stderr and "disk" in proc.stderr, proc.stderr
    assert "(100%); no prefetch guess" in proc.stderr, proc.stderr
    gen = Generator(InMemoryWeights(Image.open(img), "cpu", quiet=True), 16)
    assert json.loads(out.read_text())["output_token_ids"] == gen.generate([1, 2, 3, 4, 5],
                                                                           SamplingConfig(4)).output_token_ids
