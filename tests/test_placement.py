"""Placement (runtime/engine/placement.py): fixed GPU / DRAM / stream tiers from budgets, docs/DESIGN.md, the cost
model and placement.

Pure arithmetic on real group sizes (runtime.format.image.plan_layout), so every shape, 70B included, runs in
milliseconds on any machine. Run: python -m pytest -q tests/test_placement.py -s  (-s shows the plan tables)
"""

from __future__ import annotations

import json
import random

import pytest

from model.args import preset
from model.errors import ConfigError
from model.groups import group_kind, spread_layers
from runtime.engine.placement import Budgets, layout_group_bytes, pass_sequence, plan_placement

GiB = 1 << 30
_SIZES: dict[str, dict[str, int]] = {}


def shape(name: str):
    args = preset(name)
    if name not in _SIZES:
        _SIZES[name] = layout_group_bytes(args, "bf16")
    return args, _SIZES[name]


def kv_bytes(args, tokens: int) -> int:
    return tokens * args.n_layers * 2 * args.n_kv_heads * args.head_dim * 2  # K and V, bf16


def layer_groups(layers) -> set[str]:
    return {f"layers.{i}.{k}" for i in layers for k in ("attention", "feed_forward")}


# ---- the docs/DESIGN.md example ----------------------------------------------------------------------------------

def test_design_example_70b_on_24gb_gpu_with_64gb_ring():
    args, sizes = shape("llama3.1-70b")
    budgets = Budgets(gpu_bytes=24 * GiB, dram_bytes=64 * GiB, kv_bytes=kv_bytes(args, 8192),
                      activation_bytes=2 * GiB)
    plan = plan_placement(sizes, args, "mixed", budgets)
    print("\n" + plan.describe())
    layer = sizes["layers.0.attention"] + sizes["layers.0.feed_forward"]  # 1.711 GB (docs/DESIGN.md, the cost model)
    assert abs(layer - 1.711e9) < 0.01e9
    gpu_layers = plan.gpu_tier_bytes / layer
    dram_layers = (plan.dram_tier_bytes - plan.host_bytes) / layer
    stream_layers = plan.disk_bytes_per_pass / layer
    print(f"layers' worth: gpu {gpu_layers:.1f}, dram {dram_layers:.1f}, stream {stream_layers:.1f}; "
          f"disk per token {plan.disk_bytes_per_pass / 1e9:.1f} GB")
    assert 7 <= gpu_layers <= 12  # docs/DESIGN.md: "about 8"
    assert 32 <= dram_layers <= 40  # "about 36"
    assert 30 <= stream_layers <= 40  # "36 streamed"
    assert 55e9 <= plan.disk_bytes_per_pass <= 70e9  # "about 62 GB", against 137 GB for a rolling ring window
    assert plan.weight_bytes / plan.disk_bytes_per_pass > 2
    assert plan.gpu_bytes_total <= budgets.gpu_bytes and plan.ring_bytes <= budgets.dram_bytes
    assert plan.window_slots == 4 and plan.staging_buffers == 2
    json.loads(json.dumps(plan.to_dict()))  # goes into the bench JSON as is


def test_8b_preload_in_6gib_gpu_copies_the_rest_every_pass_and_reads_no_disk():
    args, sizes = shape("llama3.1-8b")
    plan = plan_placement(sizes, args, "preload", Budgets(gpu_bytes=6 * GiB, dram_bytes=None))
    print("\n" + plan.describe())
    total = sum(sizes[g] for g in plan.sequence)
    assert plan.h2d_bytes_per_pass == total - plan.gpu_tier_bytes
    assert plan.disk_bytes_per_pass == 0 and plan.stream == () and plan.window_slots == 0
    assert plan.dram_tier_bytes == total - plan.gpu_tier_bytes + sizes["tok_embeddings"]
    # more resident than accelerate's 4.98 GB in the same 6 GiB (docs/DESIGN.md, the cost model)
    assert 4.98e9 < plan.gpu_tier_bytes and plan.gpu_bytes_total <= 6 * GiB


# ---- the partition property -----------------------------------------------------------------------------------

def _random_request(rng: random.Random):
    args, sizes = shape(rng.choice(["tiny", "llama3.2-1b", "llama3.1-8b"]))
    total = sum(sizes.values())
    device = rng.choice(["cuda", "cuda", "cpu"])
    mode = rng.choice(["preload", "stream", "mixed"])
    gpu = None if device == "cpu" and rng.random() < 0.7 else int(rng.uniform(0, 1.2) * total)
    budgets = Budgets(gpu_bytes=gpu, dram_bytes=rng.choice([None, int(rng.uniform(0, 1.2) * total)]),
                      kv_bytes=int(rng.uniform(0, 0.05) * total), activation_bytes=int(rng.uniform(0, 0.02) * total))
    kw = dict(device=device, group_prefetch_depth=rng.randint(1, 4),
              prefetch_distance=rng.choice([None, rng.randint(2, 12)]))
    if rng.random() < 0.3:
        kw["gpu_cached_layers"] = rng.randint(0, args.n_layers)
    if mode == "mixed" and rng.random() < 0.3:
        kw["cpu_cache_layers"] = rng.randint(0, args.n_layers - (kw.get("gpu_cached_layers") or 0))
    if device == "cuda" and gpu is None:
        kw.setdefault("gpu_cached_layers", rng.randint(0, args.n_layers))
    return args, sizes, mode, budgets, kw


def _check_plan(plan, args, sizes, mode, budgets, kw):
    seq, cuda = plan.sequence, kw["device"] == "cuda"
    tiers = [set(plan.gpu), set(plan.dram), set(plan.stream)]
    assert len(set(seq)) == len(seq) == 2 * args.n_layers + 1 + args.tie_embeddings
    for g in seq:
        assert sum(g in t for t in tiers) == 1, g
    assert set().union(*tiers) == set(seq)
    assert plan.gpu_tier_bytes + sum(sizes[g] for g in plan.dram) + plan.disk_bytes_per_pass \
        == sum(sizes[g] for g in seq)
    assert plan.dram_tier_bytes == sum(sizes[g] for g in set(plan.dram) | {"tok_embeddings"})
    assert plan.disk_bytes_per_pass == sum(sizes[g] for g in plan.stream)
    assert plan.h2d_bytes_per_pass == (sum(sizes[g] for g in plan.dram + plan.stream) if cuda else 0)
    if budgets.gpu_bytes is not None:
        assert plan.gpu_bytes_total <= budgets.gpu_bytes
    if budgets.dram_bytes is not None:
        assert plan.ring_bytes <= budgets.dram_bytes
    if mode == "stream":
        assert set(plan.dram) <= {"tok_embeddings"}  # only the host copy, as a tied model's output matrix
    if mode == "preload":
        assert plan.stream == () and plan.window_slots == 0
    assert "tok_embeddings" not in plan.stream  # its host copy is already in DRAM
    through = plan.stream + (plan.dram if cuda else ())
    assert plan.slot_bytes == max((sizes[g] for g in through), default=0)
    depth, distance = kw["group_prefetch_depth"], kw["prefetch_distance"]
    assert plan.staging_buffers == (depth if cuda and (plan.dram or plan.stream) else 0)
    assert plan.window_slots == min(distance or max(2, 2 * depth), len(plan.stream))
    if kw.get("gpu_cached_layers") is not None:
        assert set(plan.gpu) == layer_groups(range(kw["gpu_cached_layers"]))
    elif not cuda:
        assert plan.gpu == ()
    if kw.get("cpu_cache_layers") is not None:  # the first M layers not wholly on the GPU
        layers = [i for i in range(args.n_layers) if not layer_groups([i]) <= set(plan.gpu)]
        expected = layer_groups(layers[:kw["cpu_cache_layers"]]) - set(plan.gpu)
        assert {g for g in plan.dram if g != "tok_embeddings"} == expected


def test_every_group_is_in_exactly_one_tier_and_budgets_hold():
    seed = random.randrange(1 << 32)
    print(f"\nseed {seed}")
    rng, ok, refused = random.Random(seed), 0, 0
    for _ in range(600):
        args, sizes, mode, budgets, kw = _random_request(rng)
        try:
            plan = plan_placement(sizes, args, mode, budgets, **kw)
        except ConfigError as e:
            refused += 1
            assert "cannot hold" in str(e) and " bytes)" in str(e), (seed, str(e))
            continue
        ok += 1
        _check_plan(plan, args, sizes, mode, budgets, kw)
    print(f"{ok} plans checked, {refused} refused with the numbers")
    assert ok > 200 and refused > 20


# ---- the pass sequence and the group choice -----------------------------------------------------------------------

def test_tied_model_uses_the_embedding_as_output_after_the_head():
    tied, _ = shape("llama3.2-1b")
    untied, _ = shape("llama3.1-8b")
    assert tied.tie_embeddings and not untied.tie_embeddings
    assert pass_sequence(tied)[-2:] == ("head", "tok_embeddings") and len(pass_sequence(tied)) == 2 * 16 + 2
    assert "tok_embeddings" not in pass_sequence(untied) and pass_sequence(untied)[-1] == "head"
    assert pass_sequence(untied)[:3] == ("layers.0.attention", "layers.0.feed_forward", "layers.1.attention")


def test_tied_embedding_on_cpu_stream_stays_in_dram_and_is_counted_once():
    args, sizes = shape("llama3.2-1b")
    plan = plan_placement(sizes, args, "stream", Budgets(None, None), device="cpu")
    print("\n" + plan.describe())
    assert plan.dram == ("tok_embeddings",) and plan.dram_tier_bytes == sizes["tok_embeddings"]
    assert plan.h2d_bytes_per_pass == 0 and plan.staging_buffers == 0
    assert plan.disk_bytes_per_pass == sum(sizes[g] for g in plan.sequence) - sizes["tok_embeddings"]


@pytest.mark.parametrize("gib", [3, 4, 6, 10, 13])
def test_ffn_groups_are_preferred_for_the_gpu_tier(gib):
    args, sizes = shape("llama3.1-8b")
    budgets = Budgets(gpu_bytes=int(gib * GiB), dram_bytes=None, kv_bytes=kv_bytes(args, 1024))
    plan = plan_placement(sizes, args, "mixed", budgets)
    ffn = [g for g in plan.gpu if group_kind(g) == "feed_forward"]
    attn = [g for g in plan.gpu if group_kind(g) == "attention"]
    assert ffn, plan.describe()
    # spread evenly over the pass: one in every n_layers / len(ffn) layers, never the first ones bunched
    assert ffn == [f"layers.{i}.feed_forward" for i in sorted(spread_layers(len(ffn), args.n_layers))]
    idx = [int(g.split(".")[1]) for g in ffn]
    if len(ffn) < args.n_layers:
        gaps = [b - a for a, b in zip([-1] + idx, idx)]
        assert max(gaps) - min(gaps) <= 1 and idx[-1] == args.n_layers - 1, idx
    left = budgets.gpu_bytes - plan.gpu_bytes_total
    assert not attn or len(ffn) == args.n_layers or left < sizes["layers.0.feed_forward"]


def test_largest_group_is_kept_resident_when_that_shrinks_the_staging_buffers():
    args, sizes = shape("llama3.1-8b")  # head 1.05 GB, FFN 0.35 GB: resident head frees 2 x 0.7 GB of staging
    plan = plan_placement(sizes, args, "mixed", Budgets(gpu_bytes=6 * GiB, dram_bytes=None))
    assert "head" in plan.gpu and plan.slot_bytes == sizes["layers.0.feed_forward"]


# ---- explicit layer counts (the original bench's flags) ------------------------------------------------

def test_explicit_layer_counts_give_exactly_those_layers():
    args, sizes = shape("llama3.1-8b")
    plan = plan_placement(sizes, args, "mixed", Budgets(None, None), gpu_cached_layers=3, cpu_cache_layers=5)
    assert set(plan.gpu) == layer_groups(range(3)) and set(plan.dram) == layer_groups(range(3, 8))
    assert set(plan.stream) == layer_groups(range(8, 32)) | {"head"}
    tied, tsizes = shape("llama3.2-1b")
    plan = plan_placement(tsizes, tied, "mixed", Budgets(None, None), gpu_cached_layers=2, cpu_cache_layers=1)
    assert set(plan.dram) == layer_groups([2]) | {"tok_embeddings"}  # the output use is the host copy
    plan = plan_placement(sizes, args, "stream", Budgets(None, None), device="cpu", gpu_cached_layers=4)
    assert set(plan.gpu) == layer_groups(range(4)) and plan.staging_buffers == 0 and plan.h2d_bytes_per_pass == 0
    plan = plan_placement(sizes, args, "preload", Budgets(None, None), gpu_cached_layers=32)
    assert plan.dram == ("head",) and plan.stream == () and plan.disk_bytes_per_pass == 0


def test_explicit_layer_counts_are_checked_against_budgets_and_mode():
    args, sizes = shape("llama3.1-8b")
    with pytest.raises(ConfigError, match=r"--gpu-mem-gb 2\.00 GiB cannot hold .* GPU tier 10 groups"):
        plan_placement(sizes, args, "mixed", Budgets(2 * GiB, None), gpu_cached_layers=5)
    with pytest.raises(ConfigError, match=r"--dram-gb 1\.00 GiB cannot hold .*DRAM tier 10 groups"):
        plan_placement(sizes, args, "mixed", Budgets(None, GiB), gpu_cached_layers=1, cpu_cache_layers=5)
    with pytest.raises(ConfigError, match="--cpu-cache-layers applies to --mode mixed"):
        plan_placement(sizes, args, "preload", Budgets(8 * GiB, None), cpu_cache_layers=5)
    with pytest.raises(ConfigError, match="exceed the model's 32 layers"):
        plan_placement(sizes, args, "mixed", Budgets(None, None), gpu_cached_layers=20, cpu_cache_layers=13)


# ---- infeasible budgets and bad requests -----------------------------------------------------------------------

def test_infeasible_budgets_name_the_numbers():
    args, sizes = shape("llama3.1-70b")
    with pytest.raises(ConfigError, match=r"--gpu-mem-gb 4\.00 GiB cannot hold KV cache 1\.00 GiB \+ activations "
                                          r"0 B \+ staging 2 x 1\.96 GiB .*\d+ > 4294967296 bytes"):
        plan_placement(sizes, args, "mixed", Budgets(4 * GiB, None, kv_bytes=GiB))
    with pytest.raises(ConfigError, match="give --gpu-mem-gb"):
        plan_placement(sizes, args, "mixed", Budgets(None, 64 * GiB))
    with pytest.raises(ConfigError, match=r"--dram-gb 64\.00 GiB cannot hold host embedding 1\.96 GiB \+ DRAM tier "
                                          r".* > 68719476736 bytes\); raise --dram-gb, or use --mode mixed"):
        plan_placement(sizes, args, "preload", Budgets(24 * GiB, 64 * GiB))
    with pytest.raises(ConfigError, match=r"--dram-gb 6\.00 GiB cannot hold host embedding 1\.96 GiB \+ DRAM tier "
                                          r"0 groups 0 B \+ window 4 x 1\.31 GiB"):
        plan_placement(sizes, args, "stream", Budgets(24 * GiB, 6 * GiB))


def test_bad_requests_are_refused():
    args, sizes = shape("tiny")
    with pytest.raises(ConfigError, match="placement modes are"):
        plan_placement(sizes, args, "lru", Budgets(None, None), device="cpu")
    with pytest.raises(ConfigError, match="missing"):
        plan_placement({k: v for k, v in sizes.items() if k != "head"}, args, "mixed", Budgets(None, None))
    with pytest.raises(ConfigError, match="group-prefetch-depth 0"):
        plan_placement(sizes, args, "mixed", Budgets(GiB, None), group_prefetch_depth=0)
    with pytest.raises(ConfigError, match="kv_bytes must be"):
        Budgets(GiB, None, kv_bytes=-1)


# ---- the window -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("distance", [0, 1])
def test_window_below_two_slots_is_an_error(distance):
    args, sizes = shape("llama3.1-8b")
    with pytest.raises(ConfigError, match=f"--prefetch-distance {distance}: the window needs at least 2 slots"):
        plan_placement(sizes, args, "stream", Budgets(GiB, None), prefetch_distance=distance)


def test_window_defaults_to_twice_the_prefetch_depth_and_is_clamped_to_the_streamed_set():
    args, sizes = shape("llama3.1-8b")
    assert plan_placement(sizes, args, "stream", Budgets(4 * GiB, None), group_prefetch_depth=3).window_slots == 6
    assert plan_placement(sizes, args, "stream", Budgets(4 * GiB, None), group_prefetch_depth=1).window_slots == 2
    plan = plan_placement(sizes, args, "stream", Budgets(12 * GiB, None), prefetch_distance=1000)
    assert 0 < len(plan.stream) < 1000 and plan.window_slots == len(plan.stream)  # unused slots are not allocated
    plan = plan_placement(sizes, args, "preload", Budgets(4 * GiB, None), prefetch_distance=8)
    assert plan.window_slots == 0 and plan.window_bytes == 0  # nothing streams
