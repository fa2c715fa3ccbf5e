"""The architecture registry (model/arch/) against transformers' own classes (issue 26).

Tiny random Qwen2 (q/k/v biases; tied and untied embeddings), Qwen3 (per-head q/k norms, head_dim 24 over a 64-wide
model) and Mistral (GQA, head_dim from the config, a sliding window longer than every context here) checkpoints
are written by transformers with ``save_pretrained`` (tests/arch_models.py), and converted to GGUF the way
llama.cpp's converter writes them (its names; Mistral as a ``llama`` GGUF with its q/k permutation, Qwen's with
HF's rows; transformers' own GGUF loader reads each back to the same logits, so the conversion is checked too).

  - packed from safetensors and from GGUF (fp32, and with Q8_0 blocks kept for the q/k matrices, whose rows a
    rotate-half GGUF stores in HF's order): greedy tokens equal transformers' ``generate``, logits within 1e-4;
  - streamed (preload, stream, mixed with a DRAM budget that streams some groups, KV offload), batched prompts
    of different lengths, speculative decoding with a draft of the same family (the int8 image) and prompt
    lookup: the same tokens; an int8 image within its scheme's error;
  - tensor parallelism (2 gloo ranks) equals one process; a context longer than Mistral's window, and an
    architecture outside the registry, are refused with one line (the pack writing nothing);
  - no module outside model/ names a group kind or a tensor of an architecture.

Run: python -m pytest -q -n 0 tests/test_architectures.py
"""

from __future__ import annotations

import io
import json
import re
import tokenize
from pathlib import Path

import numpy as np
import pytest
import torch
from arch_models import CASES, GGUF_ARCH, hf_greedy, hf_logits, run_image, with_image_weights, write_gguf, write_hf
from conftest import ROOT, assert_user_error, run_launch

from model.arch import ARCHITECTURES
from model.args import ModelArgs
from model.checkpoint import open_checkpoint
from runtime.engine.config import EngineConfig, SamplingConfig
from runtime.engine.generate import Generator
from runtime.engine.source import open_source
from runtime.engine.speculative import ModelDraft, NgramDraft, SpeculativeGenerator
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image, WeightFormat
from runtime.format.pack import pack
from runtime.ipc.shm import leftover_names

pytest.importorskip("transformers")

PROMPT = [5, 77, 140, 12, 200, 9, 61, 33, 101, 250, 7]
PROMPTS = [PROMPT, [44, 3, 180], [9, 9, 120, 230, 17, 64, 2]]
NEW = 12
MAX_LEN = 48
TOL = 1e-4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (transformers model, fp32 image from safetensors, fp32 image from GGUF or None, int8 image), each
    case written and packed once for the module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            d = tmp_path_factory.mktemp(name)
            model = write_hf(d / "hf", name, seed=3)
            ck = open_checkpoint(d / "hf")
            pack(ck, d / "hf.img", dtype="fp32", quiet=True)
            pack(ck, d / "int8.img", dtype=WeightFormat("fp32", quantize="int8", group_size=32), quiet=True)
            gguf_img = None
            if name in GGUF_ARCH:
                write_gguf(d / "m.gguf", model, GGUF_ARCH[name])
                pack(open_checkpoint(d / "m.gguf"), d / "gguf.img", dtype="fp32", quiet=True)
                gguf_img = Image.open(d / "gguf.img")
            cache[name] = model, Image.open(d / "hf.img"), gguf_img, Image.open(d / "int8.img")
        return cache[name]

    return get


def ours(image: Image, prompt=PROMPT, new=NEW):
    return run_image(image, prompt, new, MAX_LEN)


@pytest.mark.parametrize("name", CASES)
def test_arguments_from_the_config(built, name):
    model, image, _, _ = built(name)
    args, c = image.args, model.config
    assert args.arch == name.split("-")[0]
    assert (args.qkv_bias, args.qk_norm) == (args.arch == "qwen2", args.arch == "qwen3")
    assert args.tie_embeddings == c.tie_word_embeddings and args.head_dim == (getattr(c, "head_dim", None) or 16)
    assert args.sliding_window == (200 if name == "mistral" else None)
    assert image.manifest["version"] >= 4 and image.manifest["args"]["arch"] == args.arch


@pytest.mark.parametrize("name,source", [*((n, "safetensors") for n in CASES), *((n, "gguf") for n in GGUF_ARCH)])
def test_full_equals_transformers(built, name, source):
    model, hf_image, gguf_image, _ = built(name)
    image = hf_image if source == "safetensors" else gguf_image
    tokens, logits = ours(image)
    assert tokens == hf_greedy(model, PROMPT, NEW)
    assert (logits - hf_logits(model, [PROMPT])).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["qwen2", "mistral"])
def test_transformers_reads_the_gguf_conversion_alike(built, name, tmp_path):
    """The test's GGUF writer is checked against a reader no one here wrote: transformers' GGUF loader (not for
    Qwen3: that loader takes head_dim as dim / heads, 16, where this checkpoint's is 24)."""
    from transformers import AutoModelForCausalLM

    model = built(name)[0]
    write_gguf(tmp_path / "m.gguf", model, GGUF_ARCH[name])
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    assert (hf_logits(theirs, [PROMPT]) - hf_logits(model, [PROMPT])).abs().max().item() <= TOL


MODES = {"preload": dict(mode="preload"), "stream": dict(mode="stream", gpu_cached_layers=0, prefetch_distance=2),
         "mixed": dict(mode="mixed", dram_gb=0.0004, prefetch_distance=2),
         "mixed-kv-offload": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=0, kv_offload="on")}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("mode", sorted(MODES))
def test_streamed_modes_equal_transformers(built, name, mode):
    model, image, _, _ = built(name)
    cfg = EngineConfig.of(**MODES[mode], workers=2, quiet=True)
    with open_source(image, cfg, torch.device("cpu"), max_len=MAX_LEN) as (src, plan, handle):
        if mode != "preload":
            assert plan.stream or mode == "mixed-kv-offload", plan.describe()
        gen = Generator(src, MAX_LEN, offload=src.kv_offload or mode.endswith("offload"))
        tokens = gen.generate(PROMPT, SamplingConfig(NEW)).output_token_ids
        logits = gen.forward(torch.tensor([PROMPT]), 0, gen.new_cache(1))
    assert not leftover_names(pool=handle.name)
    assert tokens == hf_greedy(model, PROMPT, NEW)
    assert (logits - hf_logits(model, [PROMPT])).abs().max().item() <= TOL


@pytest.mark.parametrize("name", CASES)
def test_batch_equals_transformers(built, name):
    model, image, _, _ = built(name)
    res = Generator(InMemoryWeights(image, "cpu", quiet=True), MAX_LEN).generate_batch(PROMPTS, SamplingConfig(NEW))
    assert [r.output_token_ids for r in res] == [hf_greedy(model, p, NEW) for p in PROMPTS]


@pytest.mark.parametrize("name", CASES)
def test_speculative_with_a_draft_of_the_family(built, name):
    """The int8 image of the same checkpoint as the draft (same family and vocabulary), and prompt lookup."""
    model, image, _, int8 = built(name)
    want = hf_greedy(model, PROMPT, NEW)
    for draft in (ModelDraft(Generator(InMemoryWeights(int8, "cpu", quiet=True), MAX_LEN)), NgramDraft()):
        spec = SpeculativeGenerator(Generator(InMemoryWeights(image, "cpu", quiet=True), MAX_LEN), draft, 6)
        assert spec.generate(PROMPT, SamplingConfig(NEW)).output_token_ids == want, type(draft).__name__
        if isinstance(draft, ModelDraft):
            assert spec.stats.passes < NEW - 1  # the int8 draft agrees often: some pass kept several tokens


@pytest.mark.parametrize("name", CASES)
def test_int8_within_its_error(built, name):
    """int8 in groups of 32 (every layer matrix): exactly transformers on the rounded weights (its scheme's error
    is all there is), and close to the original."""
    model, _, _, int8 = built(name)
    rounded = with_image_weights(model, int8)
    tokens, logits = ours(int8)
    assert tokens == hf_greedy(rounded, PROMPT, NEW)
    assert (logits - hf_logits(rounded, [PROMPT])).abs().max().item() <= TOL
    err = (logits.log_softmax(-1) - hf_logits(model, [PROMPT]).log_softmax(-1)).abs().max().item()
    assert 0 < err < 0.1, err


@pytest.mark.parametrize("name", sorted(GGUF_ARCH))
def test_kept_gguf_blocks_of_rotated_rows(built, name, tmp_path):
    """q/k matrices stored as Q8_0 blocks in the GGUF, kept as blocks in the image: a rotate-half GGUF's rows are
    moved as whole rows of blocks; the logits equal transformers' on the file's values (gguf's dequantizer, the
    converter's names and rows undone by the test's own table)."""
    import gguf
    from arch_models import from_gguf_tensors, gguf_tensors

    model = built(name)[0]
    arch = GGUF_ARCH[name]
    f = tmp_path / "q.gguf"
    write_gguf(f, model, arch)
    tensors = gguf_tensors(model, arch)
    w = gguf.GGUFWriter(str(tmp_path / "q8.gguf"), arch)  # the same file, q/k matrices re-encoded as Q8_0
    reader = gguf.GGUFReader(str(f))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        w.add_key_value(field.name, field.contents(), field.types[0],
                        field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for tname, a in tensors.items():
        if re.search(r"attn_[qk]\.weight$", tname):
            q = gguf.quants.quantize(a, q8)
            w.add_tensor(tname, q, raw_shape=q.shape, raw_dtype=q8)
            tensors[tname] = gguf.quants.dequantize(q, q8)
        else:
            w.add_tensor(tname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    pack(open_checkpoint(tmp_path / "q8.gguf"), tmp_path / "q8.img", dtype=WeightFormat("fp32", keep_blocks=True),
         quiet=True)
    image = Image.open(tmp_path / "q8.img")
    assert {t.dtype for g in image.groups.values() for t in g.tensors if t.quantized} == {"q8_0"}
    theirs = from_gguf_tensors(model, tensors, arch)
    tokens, logits = ours(image)
    assert (logits - hf_logits(theirs, [PROMPT])).abs().max().item() <= TOL
    assert tokens == hf_greedy(theirs, PROMPT, NEW)


GPU_MODES = {"full": None, "stream": dict(mode="stream", gpu_cached_layers=0, prefetch_distance=2),
             "mixed": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=0, prefetch_distance=2)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("mode", sorted(GPU_MODES))
@pytest.mark.parametrize("image_kind", ["fp32", "int8"])
def test_gpu_equals_transformers(built, name, mode, image_kind):
    """On CUDA (fp32 compute; int8 through the fused kernels), every streaming mode: transformers' greedy tokens
    (on the weights as the image holds them) and logits within 1e-3 (another summation order than the CPU's)."""
    from conftest import gpu_cap_gb

    model, image, _, int8 = built(name)
    ref = model if image_kind == "fp32" else with_image_weights(model, int8)
    image = image if image_kind == "fp32" else int8
    dev = torch.device("cuda")
    if GPU_MODES[mode] is None:
        gen = Generator(InMemoryWeights(image, dev, quiet=True), MAX_LEN)
        tokens = gen.generate(PROMPT, SamplingConfig(NEW)).output_token_ids
        logits = gen.forward(torch.tensor([PROMPT], device=dev), 0, gen.new_cache(1)).cpu()
    else:
        cfg = EngineConfig.of(**GPU_MODES[mode], gpu_mem_gb=gpu_cap_gb(0.5), workers=2, quiet=True)
        with open_source(image, cfg, dev, max_len=MAX_LEN) as (src, plan, _):
            assert plan.stream, plan.describe()
            gen = Generator(src, MAX_LEN)
            tokens = gen.generate(PROMPT, SamplingConfig(NEW)).output_token_ids
            logits = gen.forward(torch.tensor([PROMPT], device=dev), 0, gen.new_cache(1)).cpu()
    assert tokens == hf_greedy(ref, PROMPT, NEW)
    assert (logits - hf_logits(ref, [PROMPT])).abs().max().item() <= 1e-3


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])  # biases split by rows; per-head norms whole on each rank
def test_two_tensor_parallel_ranks_equal_one(built, name):
    from runtime.engine.ranks import run_ranks

    image = built(name)[1]
    tokens, logits = ours(image, new=6)
    cfg = EngineConfig.from_flags({"quiet": True, "mode": "stream", "prefetch_distance": 2})
    res, _, facts = run_ranks(image, cfg, SamplingConfig(6), [PROMPT], 1, len(PROMPT) + 6, frozenset(), 2, "cpu",
                              logits=True)
    assert res[0]["output_token_ids"] == tokens
    np.testing.assert_allclose(facts["logits"], logits[0].numpy(), rtol=0, atol=TOL)


def test_cli_refuses_a_context_beyond_the_sliding_window(built):
    image = built("mistral")[1]
    common = ("run", "--image", str(image.path), "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--device", "cpu")
    assert_user_error(run_launch(*common, "--max-seq-len", "256", check=False), "--max-seq-len 256",
                      "sliding window of 200 tokens", "200 or less")
    proc = run_launch(*common, "--max-seq-len", "200")
    assert "2 generated" in proc.stderr, proc.stderr


def test_cli_probe_and_bench_on_a_synthetic_qwen3(tmp_path):
    """pack --synthetic of a Qwen3 shape (head_dim != dim / heads), probe's per-kind compute rows and bench."""
    img = tmp_path / "q3.img"
    run_launch("pack", "--synthetic", "tiny-qwen3", "--layers", "2", "--dtype", "fp32", "--out", str(img))
    fast = ["--workers-list", "1", "--read-mb-list", "1", "--probe-gb", "0.004", "--decode-context", "8",
            "--prefill-tokens", "8"]
    proc = run_launch("probe", "--image", str(img), *fast, "--device", "cpu", "--dram-gb", "1")
    assert "model: qwen3, 2 layers" in proc.stdout and "heads 8/2 (q/kv) of 48" in proc.stdout, proc.stdout
    assert re.search(r"^\s+attention\s+\S", proc.stdout, re.M) and re.search(r"^\s+feed_forward\s", proc.stdout, re.M)
    out, prompts = tmp_path / "b.json", tmp_path / "p.txt"
    prompts.write_text("1,2,3,4\n")
    run_launch("bench", "--image", str(img), "--prompts", str(prompts), "--max-new-tokens", "3", "--max-seq-len", "16",
               "--device", "cpu", "--mode", "stream", "--out-json", str(out))
    assert json.loads(out.read_text())["plan"]["labels"] == {"feed_forward": "ffn", "attention": "attn"}


def test_chat_end_to_end_with_the_model_s_own_template(tmp_path):
    """A Qwen2.5-shaped checkpoint as the Hub holds one: transformers' weights, a Qwen2 tokenizer.json (its
    pre-tokenizer) and tokenizer_config.json with Qwen2.5's chat template. ``run --chat`` prompts with exactly
    transformers' apply_chat_template ids and answers with its greedy tokens, without the stop token's text."""
    from arch_models import COMMON, build_model
    from tok_writers import DATA as TOK_DATA
    from tok_writers import train, write_hf_dir
    from transformers import AutoTokenizer, Qwen2Config

    tok = train("qwen2", vocab_size=600)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    model = build_model(Qwen2Config(**{**COMMON, "vocab_size": vocab}, tie_word_embeddings=True), seed=5)
    d = tmp_path / "hf"
    model.save_pretrained(str(d))
    template = (TOK_DATA / "chat_templates" / "Qwen2.5-7B-Instruct.jinja").read_text()
    write_hf_dir(d, tok, {"chat_template": template, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                          "bos_token": None, "add_bos_token": False})
    run_launch("pack", "--checkpoint", str(d), "--out", str(tmp_path / "q.img"), "--dtype", "fp32")
    out = tmp_path / "out.json"
    run_launch("run", "--image", str(tmp_path / "q.img"), "--prompt", "Name three rivers.", "--chat",
               "--max-new-tokens", "8", "--device", "cpu", "--out-json", str(out))
    got = json.loads(out.read_text())
    ref = AutoTokenizer.from_pretrained(str(d))
    ids = ref.apply_chat_template([{"role": "user", "content": "Name three rivers."}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    assert got["prompt_token_ids"] == list(ids)
    want = hf_greedy(model, list(ids), 8)
    n = len(got["output_token_ids"])
    assert got["output_token_ids"] == want[:n] and (n == 8 or got["output_token_ids"][-1] == ref.eos_token_id)
    assert "<|im_end|>" not in got["text"]


def test_mistral_7b_shaped_with_sentencepiece_end_to_end(tmp_path):
    """A Mistral-7B-Instruct-v0.3-shaped checkpoint as the Hub holds it (transformers' weights, a SentencePiece
    tokenizer.model, tokenizer_config.json with its chat template) and as llama.cpp converts it (a ``llama``
    GGUF with the SentencePiece vocabulary: tokens, scores, types): both pack, both images' tokenizers prompt
    with transformers' apply_chat_template ids, and ``run --chat`` of the GGUF's image answers with transformers'
    greedy tokens, without the stop token's text."""
    from arch_models import COMMON, build_model
    from tok_writers import DATA as TOK_DATA
    from tok_writers import add_sentencepiece_vocab, mistral_config, train_sentencepiece, write_sentencepiece_hf_dir
    from transformers import AutoTokenizer, MistralConfig

    from runtime.format.tokens import image_tokenizer

    pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")  # transformers reads a tokenizer.model with it
    proto = train_sentencepiece()
    config = mistral_config(proto, chat_template=(TOK_DATA / "chat_templates" / "Mistral-7B-Instruct-v0.3.jinja")
                            .read_text())
    model = build_model(MistralConfig(**{**COMMON, "vocab_size": 1200}, head_dim=24, sliding_window=200,
                                      tie_word_embeddings=False, rope_theta=1e4), seed=5)
    d = tmp_path / "hf"
    model.save_pretrained(str(d))
    write_sentencepiece_hf_dir(d, proto, config)
    write_gguf(tmp_path / "m.gguf", model, "llama", lambda w, arch: add_sentencepiece_vocab(w, proto, config))
    ref = AutoTokenizer.from_pretrained(str(d))
    chats = [[{"role": "user", "content": "Name three rivers."}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 2+2? 日本 🙂"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]]
    want_ids = [list(ref.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
                for m in chats]
    for src, img in ((d, tmp_path / "hf.img"), (tmp_path / "m.gguf", tmp_path / "gguf.img")):
        pack(open_checkpoint(src), img, dtype="fp32", quiet=True)
        assert [image_tokenizer(Image.open(img), True).encode_chat(m) for m in chats] == want_ids, src
    out = tmp_path / "out.json"
    run_launch("run", "--image", str(tmp_path / "gguf.img"), "--chat", "--prompt", "Name three rivers.",
               "--max-new-tokens", "8", "--device", "cpu", "--out-json", str(out))
    got = json.loads(out.read_text())
    ids = want_ids[0]
    assert got["prompt_token_ids"] == ids
    want = hf_greedy(model, ids, 8)
    n = len(got["output_token_ids"])
    assert got["output_token_ids"] == want[:n] and (n == 8 or got["output_token_ids"][-1] == ref.eos_token_id)
    assert got["text"] == ref.decode(got["output_token_ids"], skip_special_tokens=True) and "</s>" not in got["text"]


# ---- bad input and the shape of the code ------------------------------------------------------------------------

def test_pack_refuses_an_unsupported_architecture(tmp_path):
    write_hf(tmp_path / "hf", "qwen3")
    cfg = tmp_path / "hf" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "architectures": ["DeepseekV3ForCausalLM"]}))
    out = tmp_path / "out" / "x.img"
    out.parent.mkdir()
    proc = run_launch("pack", "--checkpoint", str(tmp_path / "hf"), "--out", str(out), check=False)
    assert_user_error(proc, "DeepseekV3ForCausalLM", "not supported",
                      ", ".join(c for a in ARCHITECTURES.values() for c in a.hf_classes))
    assert list(out.parent.iterdir()) == []


def test_unknown_architecture_in_model_arguments():
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported; supported: llama, qwen2"):
        ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=4, ffn_hidden=8, arch="gpt2")


GENERIC = {"weight", "bias", "norm", "output", "head"}  # words of other meanings too (a queue's head, output.json)


def _schema_words() -> tuple[set[str], set[str]]:
    """(layer kinds and tensor-name parts, whole tensor names) of every architecture, as an outside module would
    spell them; the head and embedding groups, which every architecture has, are named by model.arch's HEAD and
    EMBED, and their generic words are left out of the parts (the whole names still count)."""
    words, names = set(), set()
    for arch in ARCHITECTURES.values():
        words.update(k.name for k in arch.layer_kinds)
        for kind in arch.kinds.values():
            for t in kind.tensors:
                names.add(t.name)
                words.update(p for p in t.name.split(".") if p not in GENERIC)
    return words, names


def _literals(path: Path):
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type == tokenize.STRING and not tok.string.startswith(('"""', "'''", 'r"""', 'f"""')):
            yield tok.start[0], tok.string


def test_no_module_outside_model_names_a_group_kind_or_tensor():
    """Strings in runtime/, workers/ and launch.py never spell a group kind (as a whole string or a dotted
    name's part: "feed_forward", f"layers.{i}.attention") or a tensor's name part ("wq", "ffn_norm"); the
    schema of model/arch/ is where they live. Prose in help texts may use the words, not dotted names."""
    words, names = _schema_words()
    bad = []
    for p in [*sorted((ROOT / "runtime").rglob("*.py")), *sorted((ROOT / "workers").rglob("*.py")),
              ROOT / "launch.py"]:
        for line, s in _literals(p):
            body = re.sub(r"^[a-zA-Z]*['\"]|['\"]$", "", s)
            dotted = {w for w in re.findall(r"[A-Za-z_]\w*", body)
                      if re.search(rf"(^|[\w}}\]]\.){w}(\.|$)|^{w}$|(^|\W){w}\.[\w{{]", body)}
            hit = (dotted & words) | ({body} & words) | {n for n in names if n in body}
            if hit:
                bad.append(f"{p.relative_to(ROOT)}:{line}: {s[:80]} names {sorted(hit)}")
    assert not bad, "\n".join(bad)
