"""Tensor parallelism on the CPU (gloo, 2-4 rank processes; issue 21): greedy tokens equal to the single-process
run and prefill logits within 1e-4 (fp32; the all-reduce sums in another order than one matmul), for a tiny
random model with 4 KV heads (N = 2 on a plain image and on its --tensor-parallel 2 pack, N = 4 packed) in every
streaming mode, and SmolLM2 (3 KV heads: N = 3 runs, N = 2 is refused with one line naming the heads); the
packed layout against the plain one byte for byte; a rank killed mid-run fails the run on every rank within
seconds, naming it, with no process, shared memory or semaphore of the run left behind."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_launch

from model.args import preset
from model.shards import shard_range
from model.synthetic import SyntheticCheckpoint
from runtime.engine.config import EngineConfig, SamplingConfig
from runtime.engine.generate import Generator
from runtime.engine.ranks import RankFailed, run_ranks
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import FORMAT_VERSION, Image, tensor_views
from runtime.format.pack import pack
from runtime.ipc.shm import leftover_names

PROMPT = [3, 17, 42, 7, 99, 5]
NEW = 6
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset with 4 KV heads (8 query heads), 2 layers, fp32: plain, packed for 2 and for 4 ranks;
    and the single-process reference (greedy tokens, prefill logits)."""
    args = dataclasses.replace(preset("tiny", 2), n_kv_heads=4)
    d = tmp_path_factory.mktemp("tp")
    images = {}
    for n in (1, 2, 4):
        out = d / f"tp{n}.img"
        pack(SyntheticCheckpoint(args, seed=11), out, dtype="fp32", quiet=True, tensor_parallel=n)
        images[n] = Image.open(out)
    gen = Generator(InMemoryWeights(images[1], "cpu", quiet=True), len(PROMPT) + NEW)
    tokens = gen.generate(PROMPT, SamplingConfig(NEW)).output_token_ids
    logits = gen.forward(torch.tensor([PROMPT]), 0, gen.new_cache(1))[0].numpy()
    return images, tokens, logits


def ranked(image: Image, n: int, prompt=PROMPT, new=NEW, **flags):
    cfg = EngineConfig.from_flags({"quiet": True, **flags})
    res, plan, facts = run_ranks(image, cfg, SamplingConfig(new), [prompt], 1, len(prompt) + new, frozenset(), n,
                                 "cpu", logits=True)
    return res[0]["output_token_ids"], facts["logits"], plan


MODES = {"full": dict(mode="full"), "preload": dict(mode="preload"),
         "stream": dict(mode="stream", prefetch_distance=2),
         "mixed": dict(mode="mixed", cpu_cache_layers=1, prefetch_distance=2)}


@pytest.mark.parametrize("packed,mode", [(False, "full"), (False, "stream"), (True, "preload"), (True, "mixed")])
def test_two_ranks_equal_one(tiny, packed, mode):
    images, tokens, logits = tiny
    got, got_logits, plan = ranked(images[2 if packed else 1], 2, **MODES[mode])
    assert got == tokens
    np.testing.assert_allclose(got_logits, logits, rtol=0, atol=TOL)
    if plan is not None:  # a rank plans with its shards: half of each layer group of a packed image (+ padding)
        whole = images[1].groups["layers.0.feed_forward"].size
        moved = plan.group_bytes["layers.0.feed_forward"]
        assert whole // 2 <= moved <= whole // 2 + 4096 if packed else moved == whole


def test_four_ranks_packed_stream(tiny):
    images, tokens, logits = tiny
    got, got_logits, _ = ranked(images[4], 4, **MODES["stream"])
    assert got == tokens
    np.testing.assert_allclose(got_logits, logits, rtol=0, atol=TOL)


def test_packed_shards_are_the_plain_tensors(tiny):
    """Each rank's shard in a --tensor-parallel 4 image holds exactly its rows / columns of the plain image's
    tensors, and each shard is one 4 KiB-aligned extent."""
    images = tiny[0]
    plain, packed = images[1], images[4]
    assert packed.tensor_parallel == 4 and packed.manifest["version"] == FORMAT_VERSION
    for g, spec in plain.groups.items():
        full = tensor_views(spec, plain.read_group(g))
        buf = torch.frombuffer(packed.read_group(g), dtype=torch.uint8)
        for r in range(4):
            sh = packed.groups[g].shard(r)
            assert sh.offset % 4096 == 0 and sh.size % 4096 == 0
            for name, t in tensor_views(sh, buf[sh.offset:sh.offset + sh.size]).items():
                split, lo, hi = shard_range(plain.args, name, 4, r)
                want = full[name][lo:hi] if split == "rows" else full[name][:, lo:hi] if split == "cols" else full[name]
                assert torch.equal(t, want), (g, name, r)


def test_refusals(tiny, smol_image):
    images = tiny[0]
    proc = run_launch("run", "--image", str(smol_image), "--prompt-ids", "1,2", "--device", "cpu",
                      "--tensor-parallel", "2", check=False)
    assert_user_error(proc, "3 KV heads", "9 query heads", "--tensor-parallel 2", "[3]")
    proc = run_launch("run", "--image", str(images[2].path), "--prompt-ids", "1,2", "--device", "cpu",
                      "--tensor-parallel", "4", check=False)
    assert_user_error(proc, "packed for --tensor-parallel 2")
    proc = run_launch("run", "--image", str(images[2].path), "--prompt-ids", "1,2", "--device", "cpu", check=False)
    assert_user_error(proc, "packed for --tensor-parallel 2")


def test_smollm2_three_ranks(smol_image, tmp_path):
    """SmolLM2 (9 query heads, 3 KV heads) on 3 ranks through the command line (a plain image, sliced on the
    host), tokens equal to one process's."""
    import json

    prompt = [1, 9690, 314, 253, 3112]
    gen = Generator(InMemoryWeights(Image.open(smol_image), "cpu", quiet=True), len(prompt) + 4)
    want = gen.generate(prompt, SamplingConfig(4)).output_token_ids
    run_launch("run", "--image", str(smol_image), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "4",
               "--device", "cpu", "--mode", "preload", "--quiet", "--tensor-parallel", "3",
               "--out-json", str(tmp_path / "tp.json"))
    tp = json.loads((tmp_path / "tp.json").read_text())
    assert tp["output_token_ids"] == want and tp["tensor_parallel"] == 3


def test_killed_rank_fails_every_rank(tiny):
    """SIGKILL rank 1 mid-run: RankFailed names it within seconds; no rank process, and nothing of the run's
    pool in /dev/shm, is left."""
    images = tiny[0]
    seen: dict = {}
    steps = []

    def on_start(mon):
        seen["procs"], seen["pool"] = mon.procs, mon.pool.handle.name

    def on_step(toks):
        steps.append(time.monotonic())
        if len(steps) == 3:
            os.kill(seen["procs"][1].pid, signal.SIGKILL)

    cfg = EngineConfig.from_flags({"quiet": True, "mode": "preload"})
    with pytest.raises(RankFailed, match=r"rank 1 \(pid \d+\) was killed by SIGKILL") as err:
        run_ranks(images[2], cfg, SamplingConfig(400), [PROMPT], 1, len(PROMPT) + 400, frozenset(), 2, "cpu",
                  on_start=on_start, on_step=on_step)
    failed_after = time.monotonic() - steps[2]
    assert failed_after < 10, f"the run failed {failed_after:.1f} s after the kill"
    assert "all 2 ranks" in str(err.value)
    assert all(p.exitcode is not None for p in seen["procs"])
    assert not leftover_names(pool=seen["pool"]), "the run's pool left shared memory behind"
