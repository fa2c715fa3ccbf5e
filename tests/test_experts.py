"""Mixtures of experts streamed by the expert (issue 29 items 2 and 3): a pass fetches only the experts its tokens
chose, from whichever tier holds them, and the placement ranks experts by how often they are routed.

  - every streaming mode with experts on each tier (the CPU's GPU tier, the DRAM tier, disk): greedy tokens and
    logits equal --mode full's; the pool read exactly the disk-tier experts the passes chose, as often as they were
    chosen (its per-group read counters), every cyclic-stream group once a pass, the DRAM tier once; the source's
    expert counters agree; nothing left in /dev/shm;
  - a batch equals its solo runs with experts on every tier;
  - an I/O worker SIGKILLed while it reads a demanded expert is replaced and its read issued again: the tokens of
    --mode full;
  - the pool's demand requests alone: read in order into the client's demand slots with the right bytes, a demand
    replaced before it was used (its READY slots released by the client), every slot FREE after STOP_STREAM;
  - placement: attention and shared experts before experts on the GPU tier, the most routed experts first (from an
    expert-counts file), the expected bytes per pass from the counts, a counts file of the wrong shape refused;
    the plan says where the counts came from.

Tiny synthetic mixtures (tiny-mixtral: 3 layers of 8 experts, top-2; a Qwen2-MoE shape with a shared expert), fp32.

Run: python -m pytest -q -n 0 tests/test_experts.py
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import signal
import threading
import time

import pytest
import torch

from model.args import preset
from model.errors import ConfigError
from model.groups import group_kind, routed_groups
from model.synthetic import SyntheticCheckpoint
from runtime.engine.config import EngineConfig, SamplingConfig
from runtime.engine.generate import Generator
from runtime.engine.placement import Budgets, expert_use, layout_group_bytes, plan_placement, read_expert_counts
from runtime.engine.source import open_source
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image
from runtime.format.pack import pack
from runtime.ipc.shm import SLOT_FREE, SLOT_QUEUED, leftover_names

PROMPT = [5, 77, 140, 12, 200, 9, 61]
PROMPTS = [PROMPT, [44, 3, 180], [9, 9, 120, 230, 17]]
NEW = 8
MAX_LEN = 32
MIXTRAL = dataclasses.replace(preset("tiny-mixtral"), n_layers=3)
QWEN2 = dataclasses.replace(MIXTRAL, arch="qwen2_moe", n_experts=6, n_experts_used=2, shared_ffn_hidden=64,
                            qkv_bias=True, norm_topk_prob=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = {}
    for name, args in (("mixtral", MIXTRAL), ("qwen2_moe", QWEN2)):
        path = tmp_path_factory.mktemp(name) / "m.img"
        pack(SyntheticCheckpoint(args, seed=11), path, dtype="fp32", quiet=True)
        out[name] = Image.open(path)
    return out


@functools.lru_cache(maxsize=8)
def reference(path: str, prompt: tuple[int, ...]):
    gen = Generator(InMemoryWeights(Image.open(path), "cpu", quiet=True), MAX_LEN)
    return (gen.generate(list(prompt), SamplingConfig(NEW)).output_token_ids,
            gen.forward(torch.tensor([prompt]), 0, gen.new_cache(1)))


class Recording:
    """A weight source that counts the experts each pass was told it fetches (``route``), and passes."""

    def __init__(self, source) -> None:
        self.source, self.chosen, self.passes = source, collections.Counter(), 0
        self.guessed: dict[int, frozenset[str]] = {}  # the prefetch guess of a layer not routed yet ...
        self.guesses = collections.Counter()  # ... and, over the guessed layers, its layers, experts chosen, hits

    def __getattr__(self, name: str):
        return getattr(self.source, name)

    def embed(self, tokens):
        self.passes += 1
        return self.source.embed(tokens)

    def route(self, layer, groups) -> None:
        self.chosen.update(groups)
        if layer in self.guessed:
            self.guesses.update(layers=1, chosen=len(groups), hits=len(self.guessed.pop(layer) & set(groups)))
        self.source.route(layer, groups)

    def guess(self, layer, groups) -> None:
        self.guessed[layer] = frozenset(groups)
        self.source.guess(layer, groups)


def settle(src, image: Image) -> dict[str, int]:
    """Stop the stream, wait for the reads in flight; the pool's reads per group."""
    src.client.stop_stream()
    deadline = time.monotonic() + 10
    while bool((src.res.slots["state"] == SLOT_QUEUED).any()):
        assert time.monotonic() < deadline, "reads still in flight after 10 s"
        time.sleep(0.02)
    time.sleep(0.1)  # the coordinator counts a completed read when it drains its completion
    return {name: int(src.res.groups[i]["reads"]) for i, name in enumerate(image.groups)}


# experts on every tier: layer 0 in the client's memory (the CPU's GPU tier), the non-experts and some experts in the
# DRAM tier, the rest on disk, read on demand (mixed: and a layer ahead on the prefetch guess; mixed0: without)
CONFIGS = {"stream": dict(mode="stream", prefetch_distance=2),
           "mixed": dict(mode="mixed", gpu_cached_layers=1, dram_gb=0.0025, prefetch_distance=2),
           "mixed0": dict(mode="mixed", gpu_cached_layers=1, dram_gb=0.0025, prefetch_distance=2, expert_prefetch=0),
           "preload": dict(mode="preload")}


def demands(src) -> collections.Counter:
    """Counts, by group, how often the source's pool client is asked for it on demand (wraps ``demand``)."""
    asked, demand, names = collections.Counter(), src.client.demand, list(src.image.groups)

    def counting(groups, *a, **kw):
        asked.update(names[i] for i in groups)
        return demand(groups, *a, **kw)

    src.client.demand = counting
    return asked


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_only_chosen_experts_are_read(images, name):
    image = images["mixtral"]
    ref_tokens, ref_logits = reference(str(image.path), tuple(PROMPT))
    cfg = EngineConfig.of(**CONFIGS[name], workers=2, quiet=True)
    with open_source(image, cfg, torch.device("cpu"), max_len=MAX_LEN) as (src, plan, handle):
        rec, asked = Recording(src), demands(src)
        gen = Generator(rec, MAX_LEN)
        tokens = gen.generate(PROMPT, SamplingConfig(NEW)).output_token_ids
        logits = gen.forward(torch.tensor([PROMPT]), 0, gen.new_cache(1))
        reads, stats = settle(src, image), dict(src.expert_stats)
        header = {k: int(src.res.header[k]) for k in ("bytes_demand", "bytes_stream")}
    assert not leftover_names(pool=handle.name)
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    experts = routed_groups(image.args)
    tiers = {"gpu": set(plan.gpu), "dram": set(plan.dram), "disk": set(plan.stream)}
    held = {t: {g for g in experts if g in groups} for t, groups in tiers.items()}
    assert {t for t, g in held.items() if g} == {"stream": {"disk"}, "mixed": {"gpu", "dram", "disk"},
                                                 "mixed0": {"gpu", "dram", "disk"}, "preload": {"dram"}}[name]
    size = {g: image.groups[g].size for g in image.groups}
    for g in experts:  # a disk-tier expert is read once each time a pass chose it, never else ...
        assert reads[g] == (rec.chosen[g] if g in held["disk"] else 1 if g in held["gpu"] | held["dram"] else 0) or (
            g in held["disk"] and rec.chosen[g] < reads[g] <= asked[g]), g  # ... but where guessed and not chosen
    assert header["bytes_demand"] == sum(size[g] * reads[g] for g in held["disk"])
    # acting on the guess (mixed): the disk experts asked for beyond those chosen are the guessed ones not chosen
    room = {"stream": 0, "mixed": 1, "mixed0": 0, "preload": 0}[name]  # min(--expert-prefetch, D - 1), D = 2
    assert plan.expert_prefetch == room, plan.describe()
    assert stats["prefetched"] - stats["prefetch_used"] == sum(asked[g] - rec.chosen[g] for g in held["disk"])
    assert stats["prefetch_wasted_bytes"] == sum((asked[g] - rec.chosen[g]) * size[g] for g in held["disk"])
    assert stats["prefetch_bytes"] == stats["prefetch_used_bytes"] + stats["prefetch_wasted_bytes"]
    assert (stats["prefetch_used"] > 0) == (stats["prefetch_wasted_bytes"] > 0) == bool(room), stats
    assert stats["prefetch_used"] <= stats["guess_hits"]
    passes, per_layer = rec.passes, image.args.n_experts
    assert sum(rec.chosen.values()) < passes * len(experts)  # decode steps chose 2 of 8: the rest never moved
    for g in plan.cyclic:  # the non-experts stream once a pass (the window may have read one pass ahead)
        assert reads[g] in (passes, passes + 1), (g, reads[g], passes)
    for t in ("gpu", "dram", "disk"):
        assert stats[f"experts_{t}"] == sum(n for g, n in rec.chosen.items() if g in held[t])
        assert stats[f"expert_bytes_{t}"] == sum(n * size[g] for g, n in rec.chosen.items() if g in held[t])
    assert stats["routings"] == passes * image.args.n_layers
    assert stats["experts_skipped"] == passes * image.args.n_layers * per_layer - sum(rec.chosen.values())
    assert stats["expert_h2d_bytes"] == 0  # the CPU computes from the slots
    # the prefetch guess: every layer after the first is guessed where its router lies in the client's memory or
    # the DRAM tier (not where its attention group streams); counted as the pass saw it
    guessed = {"stream": 0, "mixed": passes * (image.args.n_layers - 1), "mixed0": passes * (image.args.n_layers - 1),
               "preload": passes * (image.args.n_layers - 1)}
    assert stats["guessed_layers"] == rec.guesses["layers"] == guessed[name]
    assert (stats["guess_chosen"], stats["guess_hits"]) == (rec.guesses["chosen"], rec.guesses["hits"])
    assert stats["guessed"] >= rec.guesses["layers"] * image.args.n_experts_used  # k a token, the prompt's more


def test_batch_equals_solo_with_experts_on_every_tier(images):
    """A left-padded batch (every token of it routed: each layer fetches the union of the batch's experts once)
    equals its solo runs, with the shared expert of a Qwen2-MoE shape."""
    image = images["qwen2_moe"]
    solo = Generator(InMemoryWeights(image, "cpu", quiet=True), MAX_LEN)
    want = [solo.generate(p, SamplingConfig(NEW)).output_token_ids for p in PROMPTS]
    cfg = EngineConfig.of(**CONFIGS["mixed"], workers=2, quiet=True)
    with open_source(image, cfg, torch.device("cpu"), batch=len(PROMPTS), max_len=MAX_LEN) as (src, plan, handle):
        kinds = {t: {group_kind(g) for g in getattr(plan, t) if g in plan.routed} for t in ("gpu", "dram", "stream")}
        got = [r.output_token_ids for r in Generator(src, MAX_LEN).generate_batch(PROMPTS, SamplingConfig(NEW))]
    assert all(kinds.values()), plan.describe()
    assert got == want
    assert not leftover_names(pool=handle.name)


@pytest.mark.parametrize("name", ["stream", "mixed"])
def test_worker_killed_during_an_on_demand_read(images, monkeypatch, capfd, name):
    """Reads delayed (0-20 ms each), so that a demanded expert's read is caught in flight (mixed: one asked for a
    layer ahead on the prefetch guess): its worker SIGKILLed, replaced, the read issued again; the tokens are --mode
    full's."""
    import runtime.engine.source as source_module
    from runtime.ipc.options import WorkerOptions

    image = images["mixtral"]
    want, _ = reference(str(image.path), tuple(PROMPT))
    monkeypatch.setattr(source_module, "WorkerOptions", functools.partial(WorkerOptions, max_delay_s=0.02))
    cfg = EngineConfig.of(**CONFIGS[name], workers=2, quiet=True)
    killed: list[int] = []
    with open_source(image, cfg, torch.device("cpu"), max_len=MAX_LEN) as (src, plan, handle):
        res, stop = src.res, threading.Event()
        demand = set(range(len(res.slots) - plan.demand_slots, len(res.slots)))  # one client's: the ring's last
        names = list(image.groups)

        def guessed(s: int) -> bool:  # a read asked for on the guess (a racy look at the source's state: a hint)
            return name == "stream" or any(names[int(res.slots[s]["group"])] in a for a in list(src.asked.values()))

        def killer() -> None:  # the worker of the first demand slot seen with a read in flight
            while not stop.is_set() and not killed:
                for s in demand:
                    if int(res.slots[s]["state"]) == SLOT_QUEUED and int(res.slots[s]["worker"]) >= 0 and guessed(s):
                        pid = int(res.workers[int(res.slots[s]["worker"])]["pid"])
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                        break
                time.sleep(0.0005)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            got = Generator(src, MAX_LEN).generate(PROMPT, SamplingConfig(NEW)).output_token_ids
        finally:
            stop.set()
            thread.join(5)
        assert killed, "no demanded read was seen in flight"
        assert name == "stream" or src.expert_stats["prefetched"] > 0
        deadline = time.monotonic() + 10
        while int(res.header["worker_restarts"]) < 1:
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.05)
    assert got == want
    assert not leftover_names(pool=handle.name)
    err = capfd.readouterr().err
    assert f"(pid {killed[0]}) exited with -{int(signal.SIGKILL)}" in err, err[-2000:]


def test_pool_demands(images):
    """The protocol alone: a demand read in order into the demand slots (bytes equal the image's), a demand replaced
    before it was used (the client releases the replaced one's READY slots), every slot FREE after STOP_STREAM."""
    from runtime.ipc.options import PoolConfig
    from runtime.pool.client import PoolClient
    from runtime.pool.coordinator import PrivatePool

    image = images["mixtral"]
    names = list(image.groups)
    experts = list(routed_groups(image.args))
    size = max(image.groups[g].size for g in experts)
    cfg = PoolConfig(str(image.path), str(image.manifest_path), f"demand{os.getpid()}", (names[0],), 2, size,
                     workers=2, owner_pid=os.getpid(), demand_slots=2, demand_slot_bytes=size)
    with PrivatePool(cfg) as pool:
        client = PoolClient(pool.handle)
        try:
            client.wait_running()
            ring = memoryview(client.res.ring)

            def check(pos: int, group: str) -> tuple[int, int]:
                slot, seq = client.wait_demand(pos, timeout_s=10)
                off, n = int(client.res.slots[slot]["ring_offset"]), image.groups[group].size
                assert bytes(ring[off:off + n]) == bytes(image.read_group(group)), (pos, group)
                return slot, seq

            first = experts[3:8]
            client.demand([names.index(g) for g in first])
            for pos, g in enumerate(first):
                client.release(*check(pos, g))
            client.demand([names.index(g) for g in experts[:4]])  # replaced before it was used ...
            time.sleep(0.2)
            second = experts[10:13]
            client.demand([names.index(g) for g in second])  # ... by this one
            for pos, g in enumerate(second):
                client.release(*check(pos, g))
            assert int(client.res.header["bytes_demand"]) >= sum(image.groups[g].size for g in first + second)
            client.stop_stream()
            deadline = time.monotonic() + 10
            while not bool((client.res.slots["state"][1:] == SLOT_FREE).all()):
                client._drain()
                assert time.monotonic() < deadline, client.res.slots
                time.sleep(0.02)
        finally:
            client.close()
    assert not leftover_names(pool=cfg.name)


def test_bench_reports_experts_by_tier(images, tmp_path):
    """bench --out-json: the experts fetched per decoded token from each tier, their bytes, the bytes read on demand,
    the hit rates and the bound from the bytes moved, consistent with each other and with the pool's reads; the
    summary prints them."""
    from conftest import run_launch

    prompts, out = tmp_path / "prompts.txt", tmp_path / "bench.json"
    prompts.write_text(",".join(map(str, PROMPT)) + "\n")
    proc = run_launch("bench", "--image", str(images["mixtral"].path), "--prompts", str(prompts), "--mode", "mixed",
                      "--gpu-cached-layers", "1", "--dram-gb", "0.0025", "--prefetch-distance", "2",
                      "--max-new-tokens", "5", "--max-seq-len", str(MAX_LEN), "--device", "cpu", "--disk-gbps", "1",
                      "--out-json", str(out))
    rep = json.loads(out.read_text())
    ex, k = rep["experts"], images["mixtral"].args.n_experts_used
    assert ex["decode_tokens"] == rep["decode_tokens_total"] == 4 and ex["layers_routed"] == 4 * MIXTRAL.n_layers
    assert sum(ex["experts_per_token"].values()) == k * MIXTRAL.n_layers  # batch 1: k experts a layer
    assert abs(sum(ex["hit_rate"].values()) - 1) < 1e-9 and all(ex["hit_rate"].values())
    gr = ex["prefetch_guess"]  # layers 1 and 2 guessed in each of the 4 decode steps (their routers in memory) ...
    pf = gr["prefetch"]  # ... at most one disk expert of a layer asked for ahead (of 2 demand slots), where guessed
    assert 0 < pf["experts"] <= 4 * (MIXTRAL.n_layers - 1) and pf["bytes"] == pf["used_bytes"] + pf["wasted_bytes"]
    assert 0 <= pf["used"] <= pf["experts"] and "read a layer ahead" in proc.stdout
    # the disk read on demand: the experts chosen, and the guessed ones not chosen where read before dropped (a
    # read asked for in the prefill may land in the first decode step)
    disk, read = ex["bytes_per_token"]["disk"] * 4, rep["decode_io"]["bytes_demand"]
    assert 0 < disk <= read <= disk + pf["wasted_bytes"] + ex["prefill"]["prefetch_wasted_bytes"]
    assert ex["bytes_per_token"]["disk_read"] * 4 == read
    assert ex["bytes_per_token"]["h2d"] == 0  # the CPU computes where the experts lie
    assert rep["plan"]["experts"]["disk"]["experts"] > 0 and rep["plan"]["routing_from"] == "uniform"
    assert gr["layers"] == 4 * (MIXTRAL.n_layers - 1) and gr["guessed_per_layer"] == gr["chosen_per_layer"] == k
    assert 0 <= gr["hit_rate"] == gr["precision"] <= 1 and "prefetch guess:" in proc.stdout
    mb = ex["bound_moved"]  # the bound from the bytes the decode steps moved: on the CPU, the disk's alone
    assert mb["bytes_per_step"] == {"disk": rep["decode_io"]["disk_bytes"] / 4, "h2d": 0.0}
    assert mb["limited_by"] == "disk" and mb["step_ms"] == mb["bytes_per_step"]["disk"] / 1e9 * 1e3
    assert abs(mb["ratio"] - rep["bound"]["decode_step_ms"] / mb["step_ms"]) < 1e-9
    assert "experts: per token gpu" in proc.stdout and "bound (moved):" in proc.stdout, proc.stdout
    usage = rep["expert_usage"]  # the measured round's routings: k a token a layer (the prompt's and 4 decoded)
    assert [sum(row) for row in usage["counts"]] == [(len(PROMPT) + 4) * k] * MIXTRAL.n_layers
    assert usage["routed"] == (len(PROMPT) + 4) * k * MIXTRAL.n_layers
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert usage["png"] is None and "matplotlib is not installed" in proc.stderr
    else:
        assert usage["png"] == str(tmp_path / "bench.experts.png") and (tmp_path / "bench.experts.png").stat().st_size


def test_expert_heatmap(tmp_path, monkeypatch, capsys):
    """The heatmap alone: a PNG of a layers x experts count matrix; without matplotlib one line and no file."""
    from runtime.measure.heatmap import expert_heatmap, heatmap_path

    out = heatmap_path(str(tmp_path / "r.json"))
    assert out == str(tmp_path / "r.experts.png")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert expert_heatmap([[1, 2], [3, 4]], out, "t") is None and not os.path.exists(out)
    assert capsys.readouterr().err.count("matplotlib is not installed") == 1
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert expert_heatmap([[e * i for e in range(8)] for i in range(3)], out, "t") == out
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_run_verbose_line_reports_the_prefetch():
    """``run --verbose``'s expert line (bench.experts_line): the tiers' hit rates, the guess's, and what was read on
    it: experts asked for a layer ahead, used, and their bytes asked for, used and wasted."""
    from runtime.measure.bench import EXPERT_KEYS, experts_line

    c = dict.fromkeys(EXPERT_KEYS, 0)
    c.update(routings=6, experts_gpu=2, experts_dram=4, experts_disk=6, guessed_layers=4, guessed=8, guess_chosen=8,
             guess_hits=6, prefetched=4, prefetch_used=3, prefetch_bytes=4_000_000, prefetch_used_bytes=3_000_000,
             prefetch_wasted_bytes=1_000_000)
    line = experts_line(c)
    assert "disk 6 (50%)" in line and "guess right for 75% of the experts chosen in 4 layers" in line, line
    assert "4 disk experts read a layer ahead, 3 used (75%): 4.00 MB read ahead, 3.00 MB used, 1.00 MB wasted" in line
    assert "none read ahead" in experts_line({**c, "prefetched": 0, "prefetch_used": 0})


def test_daemon_pool_plan_of_a_mixture(images):
    """A daemon pool that does not hold every expert of a mixture gets as many demand slots as window slots per
    client, and its ring fits --dram-gb (the least routed experts it would hold given up for them); a run attached to
    it reads the others on demand, and to a pool without demand slots (started before demands) it is refused."""
    from runtime.engine.source import plan_for_pool
    from runtime.services.pools import plan_pool

    image = images["mixtral"]
    dc = plan_pool(image, 0.004, 1, 2)
    assert dc.demand_slots == dc.window_slots == 2
    sizes = {n: g.size for n, g in image.groups.items()}
    assert sum(sizes[g] for g in dc.dram_groups) + 4 * dc.slot_bytes <= 4_000_000
    rec = {"name": "p", "dram_groups": dc.dram_groups, "window_slots": 2, "slot_bytes": dc.slot_bytes,
           "demand_slots": 2}
    plan = plan_for_pool(image, EngineConfig.of(quiet=True), torch.device("cpu"), rec, 0, 0)
    assert plan.demand and plan.demand_slots == 2 and plan.demand_slot_bytes == dc.slot_bytes
    assert set(plan.demand) == set(routed_groups(image.args)) - set(dc.dram_groups)
    with pytest.raises(ConfigError, match="has no demand slots for the .* experts it does not hold"):
        plan_for_pool(image, EngineConfig.of(quiet=True), torch.device("cpu"), {**rec, "demand_slots": 0}, 0, 0)


@pytest.mark.slow
def test_attached_to_a_daemon_pool_that_holds_part_of_a_mixture(images, tmp_path, monkeypatch):
    """A daemon pool of a mixture that does not hold every expert has demand slots as large as its window's: a run
    attached to it reads the experts it does not hold on demand; tokens equal --mode full's; nothing left behind."""
    import subprocess
    import sys

    from conftest import ROOT

    image = images["mixtral"]
    want, _ = reference(str(image.path), tuple(PROMPT))
    monkeypatch.setenv("LLMS_POOL_DIR", str(tmp_path / "pools"))
    name = f"experts{os.getpid()}"
    subprocess.run([sys.executable, "launch.py", "pool", "start", "--image", str(image.path), "--name", name, "--quiet",
                    "--dram-gb", "0.004", "--clients", "1", "--window-slots", "2"], cwd=ROOT, check=True, timeout=120)
    try:
        cfg = EngineConfig.of(quiet=True, attach=name)
        with open_source(image, cfg, torch.device("cpu"), max_len=MAX_LEN) as (src, plan, _):
            rec, asked = Recording(src), demands(src)
            got = Generator(rec, MAX_LEN).generate(PROMPT, SamplingConfig(NEW)).output_token_ids
            reads = settle(src, image)
    finally:
        subprocess.run([sys.executable, "launch.py", "pool", "stop", name], cwd=ROOT, timeout=60)
    assert plan.demand and plan.demand_slots == 2, plan.describe()
    assert got == want
    assert all(rec.chosen[g] <= reads[g] <= asked[g] for g in plan.demand)  # and the guessed ones not chosen
    assert leftover_names(pool=name) == []


# ---- placement ---------------------------------------------------------------------------------------------------

def test_placement_by_the_expert(tmp_path):
    """The GPU tier takes attention and the shared experts first, then the most routed experts (counts from a file);
    the DRAM tier the next most routed; the rest stream on demand. Expected bytes per pass follow the counts."""
    args = QWEN2
    sizes = layout_group_bytes(args, "fp32")
    experts = routed_groups(args)
    counts = [[(7 * i + 3 * e) % 11 + 1 for e in range(args.n_experts)] for i in range(args.n_layers)]
    counts[1][4] = 0  # never routed
    path = tmp_path / "counts.json"
    path.write_text(json.dumps({"counts": counts}))
    use = expert_use(args, read_expert_counts(str(path), args))
    assert use["layers.1.expert.4"] == 0
    assert all(abs(sum(use[g] for g, (i, _) in experts.items() if i == layer) - args.n_experts_used) < 1e-9
               for layer in range(args.n_layers))  # k experts a token
    others = [g for g in sizes if g not in experts and g != "tok_embeddings"]
    room = sum(sizes[g] for g in others) + 5 * max(sizes[g] for g in experts)
    plan = plan_placement(sizes, args, "mixed", Budgets(room + 2 * max(sizes.values()) + (1 << 20), 1 << 30),
                          expert_counts=read_expert_counts(str(path), args), routing_from=str(path))
    on_gpu = [g for g in plan.gpu if g in experts]
    assert set(others) <= set(plan.gpu) and 0 < len(on_gpu) < len(experts)
    assert min(use[g] for g in on_gpu) >= max(use[g] for g in experts if g not in plan.gpu)  # the hottest
    text = plan.describe()
    assert f"routing {path}" in text and "experts per pass, expected: gpu" in text
    expected = sum(sizes[g] * use[g] for g in plan.dram if g in experts) + sum(
        sizes[g] for g in plan.dram if g not in experts)
    assert plan.h2d_bytes_per_pass == round(expected + sum(sizes[g] * use.get(g, 1) for g in plan.stream))
    dram = plan_placement(sizes, args, "mixed", Budgets(None, sum(sizes[g] for g in others) + 8 * sizes[
        next(iter(experts))]), device="cpu", expert_counts=read_expert_counts(str(path), args), prefetch_distance=2)
    in_dram, streamed = [g for g in dram.dram if g in experts], [g for g in dram.stream if g in experts]
    assert set(others) <= set(dram.dram) and in_dram and streamed and dram.demand == tuple(streamed)
    assert min(use[g] for g in in_dram) >= max(use[g] for g in streamed)
    assert dram.ring_bytes <= dram.budgets.dram_bytes and dram.demand_slots == 2 and dram.window_slots == 0
    uniform = plan_placement(sizes, args, "stream", Budgets(None, None), device="cpu")
    assert uniform.routing_from == "uniform" and uniform.disk_bytes_per_pass == round(
        sum(sizes[g] * (args.n_experts_used / args.n_experts if g in experts else 1) for g in uniform.stream))


def test_expert_counts_kept_beside_the_image(images, tmp_path):
    """make_plan ranks the experts by IMAGE.expert-counts.json where it exists (--expert-counts overrides it); a
    dense model refuses --expert-counts."""
    import shutil

    from runtime.engine.placement import expert_counts_path
    from runtime.engine.source import make_plan

    src = images["mixtral"]
    path = tmp_path / "m.img"
    for suffix in ("", ".manifest.json"):
        shutil.copy(f"{src.path}{suffix}", f"{path}{suffix}")
    image = Image.open(path)
    counts = [[100 if e == 5 else 1 for e in range(8)] for _ in range(MIXTRAL.n_layers)]
    with open(expert_counts_path(str(path)), "w") as f:
        json.dump({"counts": counts}, f)
    plan = make_plan(image, EngineConfig.of(mode="mixed", dram_gb=0.0025, prefetch_distance=2, quiet=True),
                     torch.device("cpu"), 0, 0)
    assert plan.routing_from == expert_counts_path(str(path))
    in_dram = {g for g in plan.dram if g in plan.routed}
    assert {f"layers.{i}.expert.5" for i in range(3)} <= in_dram and plan.demand
    assert min(plan.use[g] for g in in_dram) >= max(plan.use[g] for g in plan.demand)
    assert plan.use["layers.0.expert.5"] == 1.0
    with pytest.raises(ConfigError, match="has no experts"):
        make_plan(Image.open(_dense(tmp_path)), EngineConfig.of(expert_counts="c.json", quiet=True),
                  torch.device("cpu"), 0, 0)


def test_probe_experts_counts_kept_beside_the_image(images, tmp_path):
    """probe --experts FILE (an image without a tokenizer: lines of token ids) counts each layer's routings over the
    file's tokens in windows, equal to the routers' choices in a full-mode run of the same windows, writes them as
    IMAGE.expert-counts.json, and prints the plan ranked by them with the expected bytes per token; a dense image
    is refused."""
    import random
    import shutil

    from conftest import assert_user_error, run_launch

    from runtime.engine.placement import expert_counts_path
    from runtime.engine.source import make_plan
    from runtime.measure.routing import RoutingCounter

    src, path = images["mixtral"], tmp_path / "m.img"
    for suffix in ("", ".manifest.json"):  # a copy: the counts are written beside it
        shutil.copy(f"{src.path}{suffix}", f"{path}{suffix}")
    rnd = random.Random(5)
    ids = [rnd.randrange(MIXTRAL.vocab_size) for _ in range(40)]
    text = tmp_path / "ids.txt"
    text.write_text(",".join(map(str, ids[:25])) + "\n" + ",".join(map(str, ids[25:])) + "\n")
    proc = run_launch("probe", "--image", str(path), "--experts", str(text), "--experts-window", "16", "--device",
                      "cpu", "--dram-gb", "0.0025", "--out-json", str(tmp_path / "p.json"))
    kept = json.loads(open(expert_counts_path(str(path))).read())
    assert kept["tokens"] == 40 and kept["window"] == 16
    assert [sum(row) for row in kept["counts"]] == [40 * MIXTRAL.n_experts_used] * MIXTRAL.n_layers
    gen_src = RoutingCounter(InMemoryWeights(src, "cpu", quiet=True), MIXTRAL.n_layers, MIXTRAL.n_experts)
    gen = Generator(gen_src, 16)
    for start in range(0, 40, 16):
        gen.forward(torch.tensor([ids[start:start + 16]]), 0, gen.new_cache(1))
    assert kept["counts"] == gen_src.counts
    out = proc.stdout
    assert f"written to {expert_counts_path(str(path))}" in out and f"routing {expert_counts_path(str(path))}" in out
    assert "experts per pass, expected: gpu" in out and "before (uniform)" in out, out
    plan = make_plan(Image.open(path), EngineConfig.of(mode="mixed", dram_gb=0.0025, prefetch_distance=2, quiet=True),
                     torch.device("cpu"), 0, 0)
    assert plan.routing_from == expert_counts_path(str(path)) and plan.demand
    assert json.loads((tmp_path / "p.json").read_text())["plan"]["routing_from"] == plan.routing_from
    proc = run_launch("probe", "--image", _dense(tmp_path), "--experts", str(text), "--device", "cpu", check=False)
    assert_user_error(proc, "has no experts")


def _dense(tmp_path) -> str:
    out = tmp_path / "dense.img"
    pack(SyntheticCheckpoint(preset("tiny", 1), seed=1), out, dtype="fp32", quiet=True)
    return str(out)


@pytest.mark.parametrize("counts,words", [
    ({"counts": [[1] * 6] * 2}, ["3 layers x 6 experts", "(2, {6})"]),
    ({"counts": [[1] * 5] * 3}, ["3 layers x 6 experts", "(3, {5})"]),
    ({"counts": [[1] * 6, [0] * 6, [1] * 6]}, ["layer 1's counts", "not all zero"]),
    ([1, 2], ["expected"]),
])
def test_expert_counts_of_the_wrong_shape_are_refused(tmp_path, counts, words):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(counts))
    with pytest.raises(ConfigError) as e:
        read_expert_counts(str(path), QWEN2)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert str(path) in str(e.value)


# ---- GPU (skipped without CUDA; run on the GPU machine) ----------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["stream", "mixed"])
def test_gpu_only_chosen_experts_move(images, name):
    """On CUDA: experts resident on the GPU (layer 0, mixed), copied from the DRAM tier and read on demand from disk
    into the staging buffers along the routed order; tokens equal --mode full's on the device, the pool read only
    the chosen disk-tier experts, and the experts' H2D bytes are those of the chosen non-resident ones."""
    from conftest import gpu_cap_gb

    from runtime.engine.source import make_plan

    image, dev = images["mixtral"], torch.device("cuda")
    gen = Generator(InMemoryWeights(image, dev, quiet=True), MAX_LEN)
    want = gen.generate(PROMPT, SamplingConfig(NEW)).output_token_ids
    del gen
    kw = dict(mode="stream", gpu_cached_layers=0, prefetch_distance=2)
    if name == "mixed":  # a DRAM budget that leaves experts in DRAM and on disk
        for dram in (0.0025, 0.003, 0.002, 0.0035, 0.0015):
            kw = dict(mode="mixed", gpu_cached_layers=1, dram_gb=dram, prefetch_distance=2)
            p = make_plan(image, EngineConfig.of(**kw, gpu_mem_gb=gpu_cap_gb(0.5), quiet=True), dev, 0, 0)
            if any(g in p.routed for g in p.dram) and p.demand:
                break
    cfg = EngineConfig.of(**kw, gpu_mem_gb=gpu_cap_gb(0.5), workers=2, quiet=True)
    with open_source(image, cfg, dev, max_len=MAX_LEN) as (src, plan, handle):
        rec = Recording(src)
        got = Generator(rec, MAX_LEN).generate(PROMPT, SamplingConfig(NEW)).output_token_ids
        reads, stats = settle(src, image), dict(src.expert_stats)
    assert got == want
    assert not leftover_names(pool=handle.name)
    assert plan.demand and (name == "stream" or any(g in plan.routed for g in plan.dram)), plan.describe()
    size = {g: image.groups[g].size for g in image.groups}
    for g in plan.demand:
        assert reads[g] == rec.chosen[g], g
    moved = sum(n * size[g] for g, n in rec.chosen.items() if g not in plan.gpu)
    assert stats["expert_h2d_bytes"] == moved > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_disk_experts_read_a_layer_ahead(images):
    """On CUDA with every router resident (the GPU budget just above the attention groups, KV and activations) and
    experts in DRAM and on disk: the disk-tier experts guessed a layer ahead are read with the layer before's
    demand and the chosen ones copied from their slots in pass order; tokens equal --mode full's on the device, the
    pool read each disk expert at least as often as chosen and at most as often as asked, the bytes add up."""
    from conftest import gpu_cap_gb

    from runtime.engine.source import planned

    image, dev = images["mixtral"], torch.device("cuda")
    gen = Generator(InMemoryWeights(image, dev, quiet=True), MAX_LEN)
    want = gen.generate(PROMPT, SamplingConfig(NEW)).output_token_ids
    del gen
    kw = dict(mode="mixed", dram_gb=0.0025, prefetch_distance=2, workers=2, quiet=True)
    cfg = EngineConfig.of(**kw, gpu_mem_gb=gpu_cap_gb(0.5))
    b = planned(image, cfg, dev, 1, MAX_LEN, cfg.prefill.chunk, False)[0].budgets
    need = b.kv_bytes + b.activation_bytes + sum(image.groups[g].size for g in image.groups if "attention" in g)
    for step in range(16):  # the first budget whose plan guesses and reads experts on demand
        cfg = EngineConfig.of(**kw, gpu_mem_gb=gpu_cap_gb((need + 600_000 + step * 150_000) / 1e9))
        plan = planned(image, cfg, dev, 1, MAX_LEN, cfg.prefill.chunk, False)[0]
        if plan.expert_prefetch and plan.demand:
            break
    assert plan.expert_prefetch and plan.demand, plan.describe()
    with open_source(image, cfg, dev, max_len=MAX_LEN) as (src, plan, handle):
        rec, asked = Recording(src), demands(src)
        got = Generator(rec, MAX_LEN).generate(PROMPT, SamplingConfig(NEW)).output_token_ids
        reads, stats = settle(src, image), dict(src.expert_stats)
    assert got == want
    assert not leftover_names(pool=handle.name)
    size = {g: image.groups[g].size for g in image.groups}
    assert all(rec.chosen[g] <= reads[g] <= asked[g] for g in plan.demand)
    assert stats["prefetched"] > 0 and stats["prefetch_bytes"] == stats["prefetch_used_bytes"] + stats[
        "prefetch_wasted_bytes"]
    assert stats["prefetch_wasted_bytes"] == sum((asked[g] - rec.chosen[g]) * size[g] for g in plan.demand)
    assert stats["expert_h2d_bytes"] == sum(n * size[g] for g, n in rec.chosen.items() if g not in plan.gpu)
