"""The embedded SmolLM2-135M-Instruct (a real Llama-architecture model, Q4_1 GGUF) against Hugging Face
transformers loading the same GGUF: logits, greedy generation through ``launch.py run --mode full``, and
perplexity through ``launch.py perplexity``. fp32 on the CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_launch

from runtime.engine.generate import Generator
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image

pytestmark = pytest.mark.slow

CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about solid state disks.",
                "List three prime numbers greater than 50.", "Explain in two sentences why the sky is blue."]

TEXT = """The history of computing is a story of moving data. Early machines kept their programs on punched
cards and paper tape, and the speed at which a reader could pull those cards through its sensors set the pace
of every calculation. Magnetic drums replaced the cards, then core memory replaced the drums, and each change
moved the bottleneck somewhere new. When disks arrived, engineers learned to arrange records so that the
heads moved as little as possible, because a seek cost thousands of times more than a read of the next block.
Today the same lesson returns in a new form. A large language model holds tens of billions of parameters,
and generating a single word requires reading every one of them. If the weights do not fit in the memory of
the accelerator, they must be brought in from somewhere slower, and the speed of the whole system becomes
the speed of that link. A careful design keeps as much as possible close to the processor, streams the rest
in large sequential reads, and overlaps every transfer with useful work. Nothing about this is new: it is
the oldest rule of systems engineering, that the slowest path decides how fast you go, and that the way to
go faster is to stop waiting on it. Libraries, kitchens and factories follow the same rule. A cook keeps salt
within reach and the sacks of flour in the cellar; a librarian shelves the popular books near the door. In
each case the cost of fetching an item, multiplied by how often it is needed, decides where it should live.
"""


def test_logits_match_transformers(smol_image, hf_smol):
    image = Image.open(smol_image)
    gen = Generator(InMemoryWeights(image, "cpu", quiet=True), max_seq_len=160)
    tokens = torch.randint(0, image.args.vocab_size, (2, 150), generator=torch.Generator().manual_seed(0))
    ours = gen.forward(tokens, 0, gen.new_cache(2)).log_softmax(-1)
    with torch.no_grad():
        ref = hf_smol(tokens).logits.float().log_softmax(-1)
    assert (ours - ref).abs().max().item() < 1e-4


def test_greedy_32_tokens_match_transformers(smol_image, hf_smol, hf_smol_tokenizer, tmp_path):
    """``run --prompts --chat --mode full``, one prompt at a time: each its chat template and transformers'
    greedy 32 tokens."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out.json"
    prompts.write_text("\n".join(CHAT_PROMPTS) + "\n")
    run_launch("run", "--image", str(smol_image), "--mode", "full", "--prompts", str(prompts), "--chat",
               "--batch-size", "1", "--max-new-tokens", "32", "--device", "cpu", "--quiet", "--out-json", str(out))
    results = json.loads(out.read_text())["results"]
    assert len(results) == len(CHAT_PROMPTS)
    eos = {hf_smol_tokenizer.eos_token_id}
    for prompt, res in zip(CHAT_PROMPTS, results):
        ref_prompt = hf_smol_tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                           add_generation_prompt=True, tokenize=True)
        ref_prompt = list(ref_prompt["input_ids"] if hasattr(ref_prompt, "keys") else ref_prompt)
        assert res["prompt_token_ids"] == ref_prompt
        with torch.no_grad():
            ids = hf_smol.generate(torch.tensor([ref_prompt]), max_new_tokens=32, do_sample=False)
        ref_out = ids[0, len(ref_prompt):].tolist()
        assert res["output_token_ids"] == ref_out, prompt
        assert res["text"] == hf_smol_tokenizer.decode([t for t in ref_out if t not in eos])


def hf_window_perplexity(model, ids: list[int], context: int) -> float:
    nll, count = 0.0, 0
    for i in range(0, len(ids), context):
        window = ids[i:i + context]
        if len(window) < 2:
            break
        x = torch.tensor([window])
        with torch.no_grad():
            loss = model(x, labels=x).loss.item()  # mean over the window's len-1 predictions
        nll += loss * (len(window) - 1)
        count += len(window) - 1
    return math.exp(nll / count)


def test_perplexity_matches_transformers(smol_image, hf_smol, hf_smol_tokenizer, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    out = tmp_path / "ppl.json"
    run_launch("perplexity", "--image", str(smol_image), "--text-file", str(text_file), "--context", "128",
               "--device", "cpu", "--out-json", str(out))
    res = json.loads(out.read_text())
    ids = hf_smol_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    ref = hf_window_perplexity(hf_smol, ids, 128)
    assert res["tokens"] == len(ids) - math.ceil(len(ids) / 128)
    assert abs(res["perplexity"] - ref) / ref < 1e-3, (res["perplexity"], ref)
    assert 1.5 < ref < 100  # a real model on English text
