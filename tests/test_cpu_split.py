"""The split (issue 28 item 2, runtime/engine/placement.py ``with_cpu_set``): which DRAM-tier groups the CPU computes
in place (``--cpu-compute off|auto|N``), from a fake cost table; and that a CPU run with the flag computes what it
computes without it (on the CPU every group already computes there). Planner tests are arithmetic on real group
sizes (milliseconds); the run test is the tiny model's. The CUDA test is skipped without a GPU.
Run: python -m pytest -q -n 0 tests/test_cpu_split.py
"""

from __future__ import annotations

import pytest
import torch

from model.args import preset
from model.errors import ConfigError
from model.groups import group_kind, group_layer, stateless_kinds
from runtime.engine.config import EngineConfig
from runtime.engine.placement import Budgets, Rates, layout_group_bytes, plan_placement


class FakeCosts:
    """A cost table: the link at 25 GB/s, the CPU at ``cpu_gbps`` (a fake device's measured rates)."""

    def __init__(self, cpu_gbps: float = 30.0) -> None:
        self.cpu_gbps, self.calls = cpu_gbps, 0

    def link_s(self, nbytes: int) -> float:
        return nbytes / 25e9

    def cpu_s(self, group: str, nbytes: int) -> float:
        self.calls += 1
        return nbytes / (self.cpu_gbps * 1e9)

    def describe(self) -> str:
        return f"fake: link 25 GB/s, CPU {self.cpu_gbps:g} GB/s"


def plan_8b(cpu_compute="off", costs=None, device="cuda", gpu_layers=8):
    """Llama-3.1-8B, layers 0..7 on the GPU, the other 24 layers in the DRAM tier (preload)."""
    args = preset("llama3.1-8b")
    return args, plan_placement(layout_group_bytes(args, "bf16"), args, "preload", Budgets(None, None), device=device,
                                gpu_cached_layers=gpu_layers, cpu_compute=cpu_compute, costs=costs)


def candidates(args, plan) -> list[str]:
    kinds = set(stateless_kinds(args))
    return [g for g in plan.dram if group_kind(g) in kinds]


def test_off_and_cpu_device_compute_nothing_in_place():
    args, off = plan_8b()
    assert off.cpu == () and off.cpu_bytes_per_pass == 0 and off.h2d_bytes_per_pass == off.h2d_bytes_many_tokens
    assert "cpu compute" not in off.describe()
    _, cpu = plan_8b(3, device="cpu", gpu_layers=None)
    assert cpu.cpu == () and cpu.h2d_bytes_per_pass == 0
    assert "every group computes there already" in cpu.describe()


def test_n_takes_exactly_n_stateless_dram_groups_spread_over_the_pass():
    args, plan = plan_8b(6)
    cands = candidates(args, plan)
    assert len(cands) == 24 and len(plan.cpu) == 6
    assert set(plan.cpu) <= set(cands) and plan.cpu == tuple(g for g in plan.sequence if g in plan.cpu)
    layers = [group_layer(g) for g in plan.cpu]
    assert layers == [11, 15, 19, 23, 27, 31]  # every 4th of layers 8..31: interleaved, not the first six
    _, off = plan_8b()
    moved = sum(plan.group_bytes[g] for g in plan.cpu)
    assert plan.cpu_bytes_per_pass == moved and plan.h2d_bytes_per_pass == off.h2d_bytes_per_pass - moved
    assert plan.h2d_bytes_many_tokens == off.h2d_bytes_per_pass  # a prefill copies them as before
    assert plan_8b("0")[1].cpu == () and plan_8b(24)[1].cpu == tuple(cands)


def test_auto_balances_the_two_pipes():
    fake = FakeCosts(30.0)
    args, plan = plan_8b("auto", fake)
    assert fake.calls and 0 < len(plan.cpu) < 24 and set(plan.cpu) <= set(candidates(args, plan))
    link, cpu = plan.pipes_ms["link"], plan.pipes_ms["cpu"]
    one = max(plan.group_bytes[g] for g in plan.cpu) / 25e9 * 1e3  # one group's time over the link
    assert abs(link - cpu) <= one, (link, cpu)
    for n in range(len(candidates(args, plan)) + 1):  # no count does better
        assert max(plan_8b(n, fake)[1].pipes_ms.values()) >= max(link, cpu) - 1e-9
    # a CPU slower than the link takes fewer groups; one far slower none
    assert len(plan_8b("auto", FakeCosts(10.0))[1].cpu) < len(plan.cpu)
    assert plan_8b("auto", FakeCosts(0.1))[1].cpu == ()
    assert len(plan_8b("auto", FakeCosts(75.0))[1].cpu) == 24  # a fast CPU takes all it may (still link-bound)
    assert plan_8b("auto", Rates(25.0, 30.0))[1].cpu == plan.cpu  # the measured-rates table agrees


def test_many_token_passes_keep_everything_on_the_gpu():
    _, plan = plan_8b(4)
    assert plan.cpu_for(1) == set(plan.cpu) and plan.cpu_for(plan.cpu_tokens_max) == set(plan.cpu)
    assert plan.cpu_for(plan.cpu_tokens_max + 1) == frozenset() and plan.cpu_for(512) == frozenset()


@pytest.mark.parametrize("value, expect", [(25, "expected 0..24, auto or off"), ("-1", "off, auto or a number"),
                                           ("some", "off, auto or a number"), ("auto", "cost table")])
def test_bad_values_are_refused_in_one_line_with_the_range(value, expect):
    with pytest.raises(ConfigError, match=expect) as e:
        plan_8b(value)
    assert "\n" not in str(e.value) and "--cpu-compute" in str(e.value)
    if value != "auto" and value != 25:
        with pytest.raises(ConfigError, match=expect):
            EngineConfig.of(cpu_compute=value)


def test_describe_prints_both_pipes_and_the_bound():
    _, plan = plan_8b("auto", FakeCosts())
    text = plan.describe()
    print("\n" + text)
    line = next(x for x in text.splitlines() if "cpu compute auto" in x)
    assert "link" in line and "CPU" in line and "in place" in line and "bound max" in line
    assert f"{max(plan.pipes_ms.values()):.2f} ms" in line
    assert "passes of more tokens: every group on the GPU" in text
    d = plan.to_dict()
    assert d["cpu"] == list(plan.cpu) and d["cpu_bytes_per_pass"] == plan.cpu_bytes_per_pass and d["pipes_ms"]


# ---- runs: the tiny model, preload (every group in the DRAM tier) ------------------------------------------------

PROMPTS = [[(7 * i + 3 * n) % 500 + 1 for i in range(n)] for n in (20, 13, 17)]
NEW, MAX_LEN = 6, 64


def tiny_image(tmp_path, scheme: str | None = None):
    from model.synthetic import SyntheticCheckpoint
    from runtime.format.image import Image, WeightFormat
    from runtime.format.pack import pack

    out = tmp_path / f"tiny-{scheme}.img"
    fmt = "fp32" if scheme is None else WeightFormat("fp32", scheme, 32, quantize_output=True)
    pack(SyntheticCheckpoint(preset("tiny", 2), seed=5), out, dtype=fmt, quiet=True)
    return Image.open(out)


def greedy(image, device, graphs: bool = False, **flags) -> tuple[list, object, object]:
    """Greedy tokens of a batch of 3 then 1 prompt in --mode preload, the plan, and the source's CPU-set views."""
    from runtime.engine.generate import SamplingConfig, generator_for
    from runtime.engine.source import open_source

    kw = dict(mode="preload", workers=1, quiet=True, cuda_graphs="on" if graphs else "off", **flags)
    if device.type == "cuda":
        from conftest import gpu_cap_gb

        kw.update(gpu_cached_layers=0, gpu_mem_gb=gpu_cap_gb(1.0))
    cfg = SamplingConfig(NEW)
    with open_source(image, EngineConfig.of(**kw), device, batch=3, max_len=MAX_LEN) as (src, plan, _):
        gen = generator_for(src, EngineConfig.of(**kw), MAX_LEN)
        out = [[r.output_token_ids for r in gen.generate_batch(p, cfg)] for p in (PROMPTS, [PROMPTS[2]])]
        return out, plan, dict(src.host_views)


def test_cpu_compute_on_the_cpu_equals_off(tmp_path):
    """On a CPU-only machine every group computes on the CPU already: --cpu-compute 2 plans no CPU set and gives
    the same greedy tokens as off (auto too: test_off_and_cpu_device_compute_nothing_in_place's planner path)."""
    image, dev = tiny_image(tmp_path, "int8"), torch.device("cpu")
    want, off, _ = greedy(image, dev)
    got, plan, views = greedy(image, dev, cpu_compute="2")
    assert got == want and plan.cpu == () and plan.cpu_compute == "2" and not views
    assert plan_8b("auto", device="cpu", gpu_layers=None)[1].cpu == ()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("graphs", [False, True])
def test_cpu_compute_on_cuda_equals_off(tmp_path, graphs):
    """On CUDA, --cpu-compute 2 (the tiny model's two FFN groups, both in the DRAM tier) computes them on the CPU
    in place in decode steps (batch 3 and 1: at most 8 tokens) and copies them for the prefills: the greedy tokens
    of off, fp32, eager and with a graph per group; priced by rates measured at the start. auto: whatever it
    chooses from those rates, the same tokens."""
    image, dev = tiny_image(tmp_path), torch.device("cuda")
    want, off, _ = greedy(image, dev, graphs)
    torch.cuda.empty_cache()
    got, plan, views = greedy(image, dev, graphs, cpu_compute="2")
    assert len(plan.cpu) == 2 and plan.h2d_bytes_per_pass == off.h2d_bytes_per_pass - plan.cpu_bytes_per_pass
    assert set(views) == set(plan.cpu)  # the decode steps took their ring views
    assert got == want
    assert plan.costs_from.startswith("measured: link") and set(plan.pipes_ms) == {"link", "cpu"}
    got, plan, views = greedy(image, dev, graphs, cpu_compute="auto")
    assert got == want and plan.cpu_compute == "auto" and set(views) == set(plan.cpu)


def test_measured_costs_price_a_group_by_its_formats(monkeypatch):
    """runtime/engine/costs.py: a group's CPU time is the sum of its matrices' stored bytes over their format's
    measured rate (norms left out); the link's time its bytes over the link's; auto chooses from that table as
    from any other, and the plan names where the rates came from."""
    from runtime.engine import costs
    from runtime.format.image import plan_layout

    args = preset("llama3.1-8b")
    groups = {g.name: g.tensors for g in plan_layout(args, "bf16", {"layers.9.feed_forward.w2.weight": ("q6_k", None)})}
    monkeypatch.setattr(costs, "link_gbps", lambda device: 25.0)
    rates = {"bf16": 30.0, "q6_k": 15.0}
    monkeypatch.setattr(costs, "cpu_gbps", lambda fmt, size, k, kernels: rates[fmt])
    ffn = "layers.9.feed_forward"
    table = costs.measure({ffn: groups[ffn]}, torch.device("cpu"), None)
    monkeypatch.setattr(costs, "cpu_gbps", lambda *a: pytest.fail("measured twice"))  # a second plan of the run
    assert costs.measure({ffn: groups[ffn]}, torch.device("cpu"), None) is table
    assert set(table.cpu_gbps) == {"bf16//4096", "q6_k//14336"}
    want = sum(t.nbytes / rates[t.dtype] / 1e9 for t in groups[ffn] if len(t.shape) == 2)  # w1, w3 bf16; w2 q6_k
    assert table.cpu_s(ffn, 0) == pytest.approx(want) and table.link_s(25_000_000) == pytest.approx(1e-3)
    assert "link 25.0 GB/s" in table.describe() and "q6_k//14336 15.0" in table.describe()
    with pytest.raises(KeyError, match="layers.10.feed_forward"):
        table.cpu_s("layers.10.feed_forward", 0)
    flat = costs.MeasuredCosts(25.0, {"bf16//4096": 30.0}, {g: {"bf16//4096": 1} for g in groups})
    _, plan = plan_8b("auto", flat)
    assert plan.costs_from == flat.describe() and "costs measured: link 25.0 GB/s" in plan.describe()


def test_cpu_rate_of_a_format_is_measured_on_its_held_kernels():
    """costs.cpu_gbps on this CPU: a positive, finite rate for a quantized format (through model/cpu_kernels.py's
    kernels) and for a plain one, from a small pool."""
    import math

    from runtime.engine import costs
    from runtime.env import cpu_kernels

    for fmt, size in (("q4_k", None), ("int4", 64), ("bf16", None)):
        r = costs.cpu_gbps(fmt, size, 512, cpu_kernels(), pool_mb=2, reps=1)
        assert 0 < r < math.inf, (fmt, r)


def test_the_run_measures_its_costs_after_checking_the_request(monkeypatch):
    """runtime/engine/source.py with_measured_cpu_set, the run's path on CUDA: a count beyond the candidates is
    refused before anything is measured; auto and N are priced by what costs.measure returns for the candidates
    (here a fake, as a CPU-only machine has no link to time); off and the CPU measure nothing."""
    from types import SimpleNamespace

    from runtime.engine import costs
    from runtime.engine.source import with_measured_cpu_set
    from runtime.format.image import plan_layout

    args, plan = plan_8b()
    image = SimpleNamespace(args=args, groups={g.name: g for g in plan_layout(args, "bf16")})
    asked = []

    def measure(groups, device, kernels):
        asked.append(sorted(groups))
        return FakeCosts(30.0)

    monkeypatch.setattr(costs, "measure", measure)
    with pytest.raises(ConfigError, match="expected 0..24"):
        with_measured_cpu_set(plan, image, "25", "cuda")
    assert asked == []
    auto = with_measured_cpu_set(plan, image, "auto", "cuda")
    assert asked == [sorted(candidates(args, plan))] and auto.cpu == plan_8b("auto", FakeCosts(30.0))[1].cpu
    assert auto.costs_from == "fake: link 25 GB/s, CPU 30 GB/s" and set(auto.pipes_ms) == {"link", "cpu"}
    four = with_measured_cpu_set(plan, image, 4, "cuda")
    assert len(four.cpu) == 4 and four.cpu_compute == "4" and four.pipes_ms
    assert with_measured_cpu_set(plan, image, "off", "cuda") is plan and len(asked) == 2
    _, on_cpu = plan_8b(device="cpu", gpu_layers=None)
    assert with_measured_cpu_set(on_cpu, image, "auto", "cpu").cpu == () and len(asked) == 2
