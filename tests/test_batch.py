"""Batched generation: every sequence of a left-padded batch gets the tokens it gets alone (greedy), with
prompts of mixed lengths, chunked prefill, per-sequence stops, a streamed weight source, the real SmolLM2,
and through ``run --prompts`` / ``bench --batch-size``."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_user_error, pack_tiny, run_launch

from runtime.engine.config import EngineConfig, PrefillConfig
from runtime.engine.generate import Generator, SamplingConfig, padding
from runtime.engine.source import open_source
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image

PROMPTS = [[3, 17, 42, 7, 99, 5, 23, 11, 2], [5, 6], [100, 200, 300, 400, 1], [9], [44, 45, 46]]


@pytest.fixture(scope="module", params=["untied", "tied"])
def tiny(request, tmp_path_factory):
    return pack_tiny(tmp_path_factory, request.param, seed=11)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """One variant for the command-line tests: the flags do not depend on it (the engine's tests above take both)."""
    return pack_tiny(tmp_path_factory, "untied", seed=11)


def solo(gen: Generator, prompts, new: int, stop=frozenset()):
    return [gen.generate(p, SamplingConfig(new), stop).output_token_ids for p in prompts]


@pytest.mark.parametrize("chunk", [2048, 16])
def test_batch_equals_solo(tiny, chunk):
    gen = Generator(InMemoryWeights(tiny, "cpu", quiet=True), 40, prefill=PrefillConfig(chunk=chunk))
    steps = []
    res = gen.generate_batch(PROMPTS, SamplingConfig(12), on_step=steps.append)
    assert [r.output_token_ids for r in res] == solo(gen, PROMPTS, 12)
    assert [r.prompt_token_ids for r in res] == PROMPTS
    assert len(steps) == 12 and all(len(s) == len(PROMPTS) and None not in s for s in steps)


def test_batch_logits_match_solo(tiny):
    """The padded rows change nothing: each sequence's last-position logits equal its solo prefill's."""
    gen = Generator(InMemoryWeights(tiny, "cpu", quiet=True), 16)
    longest = max(len(p) for p in PROMPTS)
    cache = gen.new_cache(len(PROMPTS))
    x = torch.tensor([[0] * (longest - len(p)) + p for p in PROMPTS])
    out = gen.forward(x, 0, cache, last_only=True, pad=padding([longest - len(p) for p in PROMPTS], "cpu"))[:, -1]
    for i, p in enumerate(PROMPTS):
        ref = gen.forward(torch.tensor([p]), 0, gen.new_cache(1), last_only=True)[0, -1]
        assert (out[i] - ref).abs().max().item() <= 1e-4


def test_each_sequence_stops_on_its_own(tiny):
    gen = Generator(InMemoryWeights(tiny, "cpu", quiet=True), 40)
    free = solo(gen, PROMPTS, 10)
    k = next(i for i in range(1, 10) if free[1][i] not in free[1][:i])  # a token sequence 1 first makes at k
    stop = frozenset({free[1][k]})  # sequence 1 stops there; others may stop on it too
    want = solo(gen, PROMPTS, 10, stop)
    steps = []
    res = gen.generate_batch(PROMPTS, SamplingConfig(10), stop, on_step=steps.append)
    assert [r.output_token_ids for r in res] == want
    assert res[1].stop_reason == "stop_token" and len(res[1].output_token_ids) == k + 1
    assert any(len(w) == 10 for w in want)  # others ran on
    assert len(steps) == max(len(w) for w in want)
    assert all(steps[j][1] is None for j in range(k + 1, len(steps)))  # nothing emitted once stopped


def test_streamed_batch_equals_solo(tiny):
    """Through a private pool that streams part of the model (the window recycles every pass)."""
    ref = solo(Generator(InMemoryWeights(tiny, "cpu", quiet=True), 40), PROMPTS, 8)
    cfg = EngineConfig.of(mode="stream", prefetch_distance=2, workers=2, quiet=True)
    with open_source(tiny, cfg, torch.device("cpu"), batch=len(PROMPTS), max_len=40) as (src, plan, _):
        assert plan.stream
        res = Generator(src, 40).generate_batch(PROMPTS, SamplingConfig(8))
    assert [r.output_token_ids for r in res] == ref


def test_smollm2_batch_equals_solo(smol_image):
    from runtime.format.tokens import image_tokenizer

    smol_image = Image.open(smol_image)
    tok = image_tokenizer(smol_image, required=True)
    texts = ["Hi", "What is the capital of France?", "Write a haiku about disks, memory and the speed of light."]
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    gen = Generator(InMemoryWeights(smol_image, "cpu", quiet=True), 96)
    assert len({len(p) for p in prompts}) == 3  # mixed lengths
    res = gen.generate_batch(prompts, SamplingConfig(16), tok.eos_ids)
    assert [r.output_token_ids for r in res] == solo(gen, prompts, 16, tok.eos_ids)


def test_run_prompts_cli(untied, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(",".join(map(str, p)) for p in PROMPTS[:4]) + "\n\n")
    long = tmp_path / "long.txt"  # prompts of 20-45 tokens: --prefill-chunk 16 takes several passes each
    long.write_text("\n".join(",".join(map(str, p * 5)) for p in PROMPTS[:4]) + "\n")
    outs = {}
    for name, file, b, chunk in (("short", f, 1, 2048), ("short", f, 3, 2048), ("long", long, 1, 2048),
                                 ("long", long, 3, 16)):
        js = tmp_path / f"{name}-{b}-{chunk}.json"
        run_launch("run", "--image", str(untied.path), "--prompts", str(file), "--batch-size", str(b),
                   "--max-new-tokens", "6", "--device", "cpu", "--out-json", str(js), "--quiet",
                   "--prefill-chunk", str(chunk))
        j = json.loads(js.read_text())
        outs[name, b] = [r["output_token_ids"] for r in j["results"]]
        assert j["batch_size"] == b and all(len(r["output_token_ids"]) == 6 for r in j["results"])
        if name == "short":
            assert [r["prompt_token_ids"] for r in j["results"]] == PROMPTS[:4]  # input order
    assert outs["short", 3] == outs["short", 1] and outs["long", 3] == outs["long", 1]


def test_bench_batch(untied, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n".join(",".join(map(str, p)) for p in PROMPTS) + "\n")
    js = tmp_path / "b.json"
    run_launch("bench", "--image", str(untied.path), "--prompts", str(f), "--batch-size", "4", "--max-new-tokens", "5",
               "--warmup-rounds", "0", "--device", "cpu", "--mode", "preload", "--disk-gbps", "1",
               "--out-json", str(js))
    j = json.loads(js.read_text())
    assert j["batch_size"] == 4 and j["prompt_lens"] == [len(p) for p in PROMPTS[:4]]
    assert j["decode_tokens_total"] == 4 * 4 and j["generated_tokens_total"] == 4 * 5
    gen = Generator(InMemoryWeights(untied, "cpu", quiet=True), 40)
    assert [r["output_token_ids"] for r in j["results"]] == solo(gen, PROMPTS[:4], 5)


def test_batch_bad_input(untied, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("1,2\n")
    def run(*args):
        return run_launch("run", "--image", str(untied.path), "--device", "cpu", *args, check=False)

    assert_user_error(run("--prompts", str(f), "--batch-size", "0"), "--batch-size")
    assert_user_error(run("--prompts", str(f), "--prefill-chunk", "8"), "--prefill-chunk")
    assert_user_error(run("--prompt-ids", "1,2", "--batch-size", "2"), "--prompts")
    (tmp_path / "e.txt").write_text("\n\n")
    assert_user_error(run("--prompts", str(tmp_path / "e.txt")), "no non-empty line")
    (tmp_path / "x.txt").write_text("1,2\nhello\n")
    assert_user_error(run("--prompts", str(tmp_path / "x.txt")), "x.txt:2")


def test_batch_sweep_cpu(tmp_path):
    """benchmarks/batch_sweep.py end to end on the CPU (tiny shape): one bench per batch size, batch.json with
    every row, the prefill's weight passes, and the table printed last."""
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/batch_sweep.py", "--shape", "tiny", "--layers", "2", "--device",
                           "cpu", "--batches", "1,3", "--prompt-tokens", "40", "--new-tokens", "3",
                           "--prefill-chunk", "32", "--compute-bound", "--workdir", str(tmp_path / "w"),
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "batch.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3] and not any(r.get("failed") for r in rows)
    assert [r["prefill_passes"] for r in rows] == [2, 3]  # 40 tokens: 32 per pass alone, 16 each in a batch of 3
    assert all(r["tok_s"] > 0 and r["step_ms"] > 0 and r["compute_ms"] > 0 for r in rows)  # --mode full ran too
    assert "| 3 |" in proc.stdout.splitlines()[-1]
