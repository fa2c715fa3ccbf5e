"""launch.py probe: the per-layer timing study on a tiny synthetic image and without an image (temp file
deleted), on the CPU: every JSON section, H2D skipped with its reason, positive disk and compute figures, the
recommended W and K within their bounds, the plan for the budgets, no /dev/shm leftovers, --help and the
one-line errors. The formulas are checked on given rates; the CUDA test is skipped without CUDA.

Run: python -m pytest -q tests/test_probe.py   (about 15 s on two CPU cores)
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import assert_user_error, run_launch

from model.args import preset
from model.errors import UserError
from model.synthetic import SyntheticCheckpoint
from runtime.engine.placement import layout_group_bytes
from runtime.format.pack import pack
from runtime.ipc.shm import leftover_names
from runtime.measure.probe import (
    K_MAX,
    ModelSpec,
    ProbeConfig,
    Rates,
    ReaderPool,
    ReadJob,
    analyse,
    parse_int_list,
    plan_cells,
    recommend,
)

FAST = ["--workers-list", "1,2", "--read-mb-list", "1,16", "--probe-gb", "0.004", "--decode-context", "16",
        "--prefill-tokens", "32"]
SECTIONS = ("model", "device", "links", "disk", "compute", "analysis", "recommendation", "plan")
FLAGS = ["--image", "--manifest", "--shape", "--dtype", "--device", "--workers-list", "--read-mb-list", "--probe-gb",
         "--prefill-tokens", "--decode-context", "--gpu-mem-gb", "--dram-gb", "--draft", "--tree-tokens-list",
         "--out-json"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "tiny.img"
    pack(SyntheticCheckpoint("tiny", n_layers=2), out, dtype="fp32", quiet=True)
    return out


@pytest.fixture()
def no_shm_leftovers():
    before = set(leftover_names())
    yield
    assert [n for n in set(leftover_names()) - before if ".probe" in n] == []


def probe_names() -> list[str]:
    return [n for n in leftover_names() if ".probe" in n]



def check_common(rep: dict, streamable: int) -> None:
    for key in SECTIONS:
        assert key in rep, key
    disk = rep["disk"]
    measured = [c for c in disk["table"] if "gbps" in c]
    assert {(c["workers"], c["read_mib"]) for c in measured} == {(1, 1.0), (2, 1.0)}
    assert all(c["gbps"] > 0 and c["bytes"] > 0 and c["seconds"] > 0 for c in measured)
    skipped = [c for c in disk["table"] if "skipped" in c]  # 16 MiB reads exceed the tiny files
    assert {(c["workers"], c["read_mib"]) for c in skipped} == {(1, 16.0), (2, 16.0)}
    assert disk["gbps"] == max(c["gbps"] for c in measured) and disk["reader_gbps"] > 0
    for kind, phases in rep["compute"]["groups"].items():
        for phase in ("prefill", "decode"):
            assert phases[phase]["ms"] > 0 and len(phases[phase]["samples_ms"]) >= 3, (kind, phase)
    assert rep["compute"]["prefill_tokens"] == 32 and rep["compute"]["decode_context"] == 16
    rec = rep["recommendation"]
    for phase in ("prefill", "decode"):
        r = rec[phase]
        assert 2 <= r["w_effective"] <= r["w"] <= max(2, streamable), r
        assert r["w_raw"] == math.ceil(r["t_read_ms"] / r["c_ms"])
        a = rep["analysis"][phase]
        assert set(a["groups"]) == {"attention", "feed_forward", "head"}
        assert set(a["pass"]) >= {"all_resident", "all_dram", "all_streamed"}
        assert all(b["bound_ms"] > 0 for b in a["pass"].values())
    assert 2 <= rec["window_slots"] <= max(2, streamable)
    assert rec["flags"].startswith(f"--prefetch-distance {rec['window_slots']}")


def check_cpu_links(rep: dict, proc) -> None:
    links = rep["links"]
    assert links["skipped"] is True and "CPU" in links["reason"] and links["gbps"] is None
    assert "links: host -> GPU: skipped:" in proc.stdout
    for phase in ("prefill", "decode"):
        r = rep["recommendation"][phase]
        assert r["k"] is None and r["t_copy_ms"] is None
        assert all(g["h2d_ms"] is None for g in rep["analysis"][phase]["groups"].values())
    assert rep["recommendation"]["staging_buffers"] is None


def test_probe_on_tiny_image(tiny, tmp_path, no_shm_leftovers):
    out = tmp_path / "probe.json"
    proc = run_launch("probe", "--image", str(tiny), *FAST, "--device", "cpu", "--dram-gb", "1", "--out-json", str(out))
    rep = json.loads(out.read_text())
    check_common(rep, streamable=5)
    check_cpu_links(rep, proc)
    assert rep["disk"]["path"] == str(tiny) and rep["temp_file"] is None and rep["model"]["image"] == str(tiny)
    assert rep["model"]["bytes"]["feed_forward"] == rep["plan"]["group_bytes"]["layers.0.feed_forward"]
    plan = rep["plan"]
    assert plan["device"] == "cpu" and plan["budgets"]["dram_bytes"] == 10**9 and plan["describe"]
    assert "plan" in rep["analysis"]["decode"]["pass"]
    for needle in ("compute hides", "per layer: serial", "recommended prefetch distances", "W = clamp(ceil(t_read / c)",
                   "placement: mode mixed on cpu", "plan for --dram-gb 1 with the W and K above", "best ",
                   f"JSON written to {out}"):
        assert needle in proc.stdout, needle


def test_probe_without_image_deletes_its_temp_file(tmp_path, no_shm_leftovers):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    out = tmp_path / "probe.json"
    proc = run_launch("probe", "--shape", "tiny", "--dtype", "fp32", *FAST, "--device", "cpu", "--out-json", str(out),
                      env={"TMPDIR": str(tmpdir)})
    rep = json.loads(out.read_text())
    check_common(rep, streamable=len(layout_group_bytes(preset("tiny"), "fp32")) - 1)
    check_cpu_links(rep, proc)
    temp = rep["temp_file"]
    assert temp["path"].startswith(str(tmpdir)) and rep["disk"]["path"] == temp["path"]
    assert temp["bytes"] == 4_000_000 // 4096 * 4096 == rep["disk"]["region_bytes"]
    assert list(tmpdir.iterdir()) == [], "the temp file was not deleted"
    assert rep["plan"] is None and "plan: none" in proc.stdout
    assert "the prefill is" not in proc.stdout  # --prefill-tokens given: no default to explain


def test_budget_too_small_is_one_error_after_the_report(tiny, tmp_path):
    """Also: without --prefill-tokens the CPU prefill is 128 tokens, and the report says so."""
    out = tmp_path / "probe.json"
    flags = [f for f in FAST if f not in ("--prefill-tokens", "32")]
    proc = run_launch("probe", "--image", str(tiny), *flags, "--device", "cpu", "--gpu-mem-gb", "0.0001",
                      "--out-json", str(out), check=False)
    assert_user_error(proc, "--gpu-mem-gb")
    rep = json.loads(out.read_text())  # everything measured is still written
    assert rep["plan"] is None and "--gpu-mem-gb" in rep["plan_error"] and rep["disk"]["gbps"] > 0
    assert rep["compute"]["prefill_tokens"] == 128 and "128 tokens by default" in rep["compute"]["prefill_note"]
    assert "128 tokens by default" in proc.stdout and "plan: not possible" in proc.stdout


def test_probe_with_a_draft_times_passes_and_keeps_the_costs(tiny, tmp_path, no_shm_leftovers):
    """--draft: a pass's time for each size of --tree-tokens-list and the draft's time to build each tree; the
    costs are kept in the cache, and a run of the image with that draft and no --draft-tokens starts from them
    (its line names the file)."""
    draft = tmp_path / "draft.img"
    pack(SyntheticCheckpoint("tiny", n_layers=1, seed=3), draft, dtype="fp32", quiet=True)
    env = {"LLMSTREAM_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "p.json"
    proc = run_launch("probe", "--image", str(tiny), *FAST, "--device", "cpu", "--draft", str(draft),
                      "--tree-tokens-list", "1,4,16", "--out-json", str(out), env=env)
    sp = json.loads(out.read_text())["speculative"]
    assert set(sp["passes"]) == set(sp["draft_ms"]) == {"1", "4", "16"}
    assert all(p["bound_ms"] > 0 and p["tokens"] == int(n) for n, p in sp["passes"].items())
    assert all(v > 0 for v in sp["draft_ms"].values()) and sp["start"] in (2, 4, 8, 16)
    assert "a run's tree size starts at" in proc.stdout and (tmp_path / "cache" / "spec-costs").is_dir()
    run = run_launch("run", "--image", str(tiny), "--draft", str(draft), "--prompt-ids", "3,4,5,3,4",
                     "--max-new-tokens", "12", "--device", "cpu", env=env)
    assert "pass costs from the probe (" + str(tmp_path / "cache" / "spec-costs") in run.stderr, run.stderr
    other = run_launch("run", "--image", str(tiny), "--draft", "ngram", "--prompt-ids", "3,4,5,3,4",
                       "--max-new-tokens", "12", "--device", "cpu", env=env)
    assert "pass costs measured in this run" in other.stderr, other.stderr  # no probe for this draft


def test_help_lists_every_flag():
    out = run_launch("probe", "--help").stdout
    for flag in FLAGS:
        assert flag in out, flag


@pytest.mark.parametrize("flags,needle", [(["--workers-list", "1,x"], "--workers-list '1,x'"),
                                          (["--read-mb-list", "4,,8"], "--read-mb-list"),
                                          (["--image", "x.img", "--shape", "tiny"], "--shape"),
                                          (["--draft", "ngram"], "--draft needs --image"),
                                          (["--tree-tokens-list", "1,2048"], "at most 1024")])
def test_bad_values_are_one_line_errors(flags, needle):
    assert_user_error(run_launch("probe", *flags, "--device", "cpu", check=False), needle)


# ---- the formulas, on given rates ------------------------------------------------------------------------

def spec_70b() -> ModelSpec:
    args = preset("llama3.1-70b")
    return ModelSpec(args, "bf16", layout_group_bytes(args, "bf16"), "preset llama3.1-70b")


def test_recommendation_on_the_design_figures():
    """docs/DESIGN.md's H200 figures: 70B, H2D 55.2 GB/s, disk 1.5 GB/s (8 readers, 0.4 GB/s each), compute
    0.94 + 3.84 ms (prefill 2048) and 0.19 + 0.36 ms (decode): both phases are disk- and copy-bound."""
    spec = spec_70b()
    r = Rates(55.2, 1.5, 0.4, 8, {"prefill": {"attention": 0.94, "feed_forward": 3.84, "head": 0.5},
                                   "decode": {"attention": 0.19, "feed_forward": 0.36, "head": 0.5}})
    an = analyse(spec, r, {"prefill": 2048, "decode": 1}, cuda=True)
    rec = recommend(spec, r, an, cuda=True)
    ffn = spec.group_bytes["layers.0.feed_forward"]
    assert abs(an["decode"]["groups"]["feed_forward"]["h2d_ms"] - ffn / 55.2e6) < 1e-9
    assert an["prefill"]["groups"]["feed_forward"]["compute_hides_copy"] is False
    assert an["prefill"]["pass"]["all_resident"]["limited_by"] == "compute"
    assert an["prefill"]["pass"]["all_dram"]["limited_by"] == "h2d"
    assert an["decode"]["pass"]["all_streamed"]["limited_by"] == "disk"
    for phase in ("prefill", "decode"):
        p = rec[phase]
        assert p["disk_bound"] and p["copy_bound"]
        assert p["w"] == 161 and p["w_effective"] == 9  # 161 streamable groups; 8 readers + 1
        assert p["k"] == K_MAX and p["k_effective"] == 2
    assert rec["window_slots"] == 9 and rec["staging_buffers"] == 2
    assert rec["flags"] == "--prefetch-distance 9 --group-prefetch-depth 2"


def test_recommendation_when_compute_hides_the_links():
    """A slow GPU and a fast disk: prefill hides both links, so W and K come from the formulas unclamped."""
    spec = spec_70b()
    r = Rates(50.0, 20.0, 10.0, 2, {"prefill": {"attention": 100.0, "feed_forward": 300.0, "head": 5.0},
                                     "decode": {"attention": 100.0, "feed_forward": 300.0, "head": 5.0}})
    rec = recommend(spec, r, analyse(spec, r, {"prefill": 2048, "decode": 1}, cuda=True), cuda=True)
    p = rec["prefill"]
    ffn = spec.group_bytes["layers.0.feed_forward"]
    assert not p["disk_bound"] and not p["copy_bound"]
    assert p["w_raw"] == math.ceil(ffn / 10e9 * 1e3 / 200.0) == 1 and p["w"] == 2
    assert p["k_raw"] == 1 and p["k"] == 1 and rec["staging_buffers"] == 1


def test_measurements_read_distinct_offsets():
    region, read = 64 << 20, 1 << 20
    cells = plan_cells(region, 16 << 20, [1, 2, 4], [read, 32 << 20, 128 << 20])
    seen = set()
    for c in cells:
        if c["read_bytes"] == 128 << 20 or (c["read_bytes"] == 32 << 20 and c["workers"] == 4):
            assert "more than the" in c["skipped"]
            continue
        offs = [o for worker in c["offsets"] for o in worker]
        assert len(c["offsets"]) == c["workers"] and all(o % 4096 == 0 and o + c["read_bytes"] <= region
                                                          for o in offs)
        assert len(set(offs)) == len(offs)
        if c["read_bytes"] == read:  # 3 x 16 MiB of 64 MiB: no offset read twice
            assert not seen & set(offs) and not c["repeats_offsets"]
            seen |= set(offs)
    assert len(seen) == 48


def test_flag_checks():
    assert parse_int_list("--workers-list", "8, 1,2,2") == (1, 2, 8)
    with pytest.raises(UserError, match="--workers-list '1,-2'.*'-2'"):
        parse_int_list("--workers-list", "1,-2")
    with pytest.raises(UserError, match="--read-mb-list '0'"):
        parse_int_list("--read-mb-list", "0")
    for kw, needle in (({"probe_gb": 0}, "--probe-gb"), ({"shape": "llama9"}, "--shape 'llama9'"),
                       ({"manifest": "m.json"}, "--manifest needs --image"), ({"decode_context": -1}, "--decode")):
        with pytest.raises(UserError, match=needle):
            ProbeConfig(**kw)


def test_a_failing_reader_is_reported(tmp_path):
    with ReaderPool(1) as pool, pytest.raises(UserError, match="reader process 0.*nope.bin"):
        pool.run([ReadJob(str(tmp_path / "nope.bin"), (0,), 4096, 1)])


# ---- CUDA ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_probe_on_cuda(tiny, tmp_path, no_shm_leftovers):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path / "probe.json"
    run_launch("probe", "--image", str(tiny), *FAST, "--probe-gb", "0.1", "--device", "cuda", "--gpu-mem-gb", "1",
               "--out-json", str(out))
    rep = json.loads(out.read_text())
    check_common(rep, streamable=5)
    links = rep["links"]
    assert links["skipped"] is False and links["used"] == "registered_shm"
    for key in ("pinned", "registered_shm", "pageable"):
        assert links[key]["gbps"] > 0 and len(links[key]["samples_gbps"]) > 1, key
    assert links["registered_shm"]["register_s"] > 0 and links["registered_shm"]["first_touch_s"] > 0
    for phase in ("prefill", "decode"):
        r = rep["recommendation"][phase]
        assert 1 <= r["k_effective"] <= r["k"] <= K_MAX
    assert rep["plan"]["device"] == "cuda" and rep["recommendation"]["staging_buffers"] >= 1
    assert probe_names() == []
