"""launch.py bench: the original bench's command line accepted verbatim (paths replaced), its summary
block and JSON keys, our plan / bytes / links / bound, unused flags reported, and the refusals (batch > 1, a
checkpoint that is not the image's). CPU, a tiny synthetic image and a tiny Meta checkpoint; a few seconds."""

from __future__ import annotations

import json

import pytest
from ckpt_writers import write_meta
from conftest import assert_user_error, run_launch

from model.checkpoint import open_checkpoint
from model.synthetic import SyntheticCheckpoint
from runtime.format.pack import pack
from runtime.measure.bench import SEED_KEYS, SUMMARY_KEYS

# The original bench's quick-start flags (docs/DESIGN.md, the bench tool's interface), values scaled to a 2-layer
# model; paths added per test.
SEED_FLAGS = ["--mode", "mixed", "--batch-size", "1", "--max-new-tokens", "4", "--max-seq-len", "64",
              "--temperature", "0.6", "--top-p", "0.9", "--warmup-rounds", "1", "--prefetch-distance", "2",
              "--group-prefetch-depth", "2", "--gpu-cached-layers", "0", "--cpu-cache-layers", "1",
              "--warmup-layers", "4", "--staging-mb", "1", "--topk-blk", "8", "--verbose"]
CPU = ["--device", "cpu"]
SEED_TYPES = {"batch_size": int, "max_new_tokens": int, "prompt_lens": list, "prefill_tokens_total": int,
              "decode_tokens_total": int, "io_bw_MBps": dict, "gpu_mem_GB": dict, "mode": str, "device": str}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny.img"
    pack(SyntheticCheckpoint("tiny", n_layers=2), out, dtype="fp32", quiet=True)
    return out


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    """A tiny Meta checkpoint (2 shards) and its packed image."""
    root = tmp_path_factory.mktemp("bench_meta")
    write_meta(root / "ckpt")
    pack(open_checkpoint(root / "ckpt"), root / "meta.img", root / "meta.manifest.json", dtype="fp32", quiet=True)
    return root


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n" + ",".join(str(i) for i in range(1, 81)) + "\n5,6,7\n")  # 80 ids: truncated to 60
    return p



def check_report(proc, out_json, device: str = "cpu") -> dict:
    assert "=== Benchmark Summary ===" in proc.stdout, proc.stdout
    block = proc.stdout.split("=== Benchmark Summary ===", 1)[1].splitlines()[1:]
    for key, line in zip(SUMMARY_KEYS, block):
        assert line.strip().startswith(key + ":"), (key, line)
        float(line.split(":", 1)[1])
    assert len({ln.index(":") for ln in block[:len(SUMMARY_KEYS)]}) == 1, "keys are not right-aligned"
    assert "achieved/bound" in proc.stdout and f"JSON written to {out_json}" in proc.stdout
    rep = json.loads(out_json.read_text())
    for key in SEED_KEYS:
        assert key in rep, key
        assert isinstance(rep[key], SEED_TYPES.get(key, float)), (key, rep[key])
    assert set(rep["io_bw_MBps"]) >= {"weight_h2d_MBps", "kv_h2d_MBps", "kv_d2h_MBps"}
    assert set(rep["gpu_mem_GB"]) >= {"allocated_GB", "reserved_GB"}
    assert rep["device"].startswith(device) and rep["mode"] == "mixed"
    assert rep["decode_tokens_total"] == 3 and rep["max_new_tokens"] == 4
    return rep


def check_cost_model(rep: dict, limited_by: str = "disk") -> None:
    plan = rep["plan"]
    assert plan["dram"] == ["layers.0.attention", "layers.0.feed_forward"] and plan["gpu"] == []
    assert rep["bytes_per_token"]["disk"] == plan["disk_bytes_per_pass"] > 0
    assert rep["bound"]["step_ms"] > 0 and rep["achieved_over_bound"] > 0
    assert rep["bound"]["ratio"] == rep["achieved_over_bound"] and rep["bound"]["limited_by"] == limited_by
    assert rep["decode_io"]["disk_bytes"] > 0 and rep["achieved_GBps"]["disk_GBps"] > 0
    assert len(rep["step_ms"]) == 3 and rep["links"]["disk"]["gbps"] > 0
    assert {u["flag"] for u in rep["unused_flags"]} == {"--warmup-layers"}
    assert all(u["reason"] for u in rep["unused_flags"])


def test_seed_command_on_image(tiny, prompts, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_launch("bench", "--image", str(tiny), "--prompts", str(prompts), *SEED_FLAGS,
                      "--out-json", str(out), "--disk-gbps", "1", *CPU)
    rep = check_report(proc, out)
    check_cost_model(rep)
    assert rep["links"]["disk"] == {"gbps": 1.0, "source": "--disk-gbps"}
    assert rep["prompt_lens"] == [60] and rep["prompt_truncation"] == [{"prompt": 0, "tokens": 80, "kept": 60}]
    assert "kept its last 60" in proc.stderr
    assert "--topk-blk" not in proc.stderr and rep["kv"]["topk_blk"] == 8  # applied now (top-k KV blocks)
    assert "warning: --warmup-layers 4 is accepted but unused" in proc.stderr
    assert "placement: mode mixed" in proc.stdout and "decode step 3:" in proc.stdout  # --verbose


def test_seed_command_with_checkpoints_and_raw_device(meta, prompts, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_launch("bench", "--checkpoints", str(meta / "ckpt"), "--raw-device", str(meta / "meta.img"),
                      "--manifest", str(meta / "meta.manifest.json"), "--prompts", str(prompts), *SEED_FLAGS,
                      "--out-json", str(out), *CPU)
    rep = check_report(proc, out)
    check_cost_model(rep)
    disk = rep["links"]["disk"]  # measured: no --disk-gbps
    assert disk["source"] == "measured" and disk["bytes"] > 0 and "reads of" in disk["method"]
    assert rep["checkpoints"] == str(meta / "ckpt") and rep["image"]["path"] == str(meta / "meta.img")


def test_batch_size_needs_as_many_prompts(tiny, prompts):
    proc = run_launch("bench", "--image", str(tiny), "--prompts", str(prompts), "--batch-size", "3", check=False)
    assert_user_error(proc, "2 non-empty line(s), --batch-size 3 needs 3")


def test_checkpoint_of_another_model_is_refused(meta, tmp_path):
    write_meta(tmp_path / "other", n_shards=1, n_layers=3)
    proc = run_launch("bench", "--raw-device", str(meta / "meta.img"), "--manifest", str(meta / "meta.manifest.json"),
                      "--checkpoints", str(tmp_path / "other"), check=False)
    assert_user_error(proc, tmp_path / "other", meta / "meta.img", "n_layers: checkpoint 3, image 2")


def test_text_prompt_without_tokenizer_is_refused(tiny, tmp_path):
    p = tmp_path / "text.txt"
    p.write_text("Hello there\n")
    proc = run_launch("bench", "--image", str(tiny), "--prompts", str(p), check=False)
    assert_user_error(proc, f"{p}:1", "comma-separated token ids")


def test_seed_command_on_cuda(tiny, prompts, tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path / "bench.json"
    proc = run_launch("bench", "--image", str(tiny), "--prompts", str(prompts), *SEED_FLAGS, "--out-json", str(out),
                      "--device", "cuda", "--disk-gbps", "1000")  # a fast "disk": the bound is the H2D term
    rep = check_report(proc, out, "cuda")
    check_cost_model(rep, limited_by="h2d")
    h2d = rep["links"]["h2d"]
    assert h2d["source"] == "measured" and h2d["gbps"] > 0 and len(h2d["samples_gbps"]) > 1
    assert rep["bytes_per_token"]["h2d"] == rep["plan"]["h2d_bytes_per_pass"] > rep["bytes_per_token"]["disk"]
    assert rep["io_bw_MBps"]["weight_h2d_MBps"] > 0 and rep["gpu_mem_GB"]["allocated_GB"] > 0
    assert rep["host_mem_GB"]["pinned_GB"] == rep["host_mem_GB"]["ring_GB"] > 0


def test_bound_counts_the_offloaded_kv_read_back():
    """An offloaded KV cache read back each decode step crosses the H2D link with the weights: the bound is
    their sum over the link (8B-shaped, batch 32 on the H200: 10.4 + 8.7 GB at 54.6 GB/s, 351 ms)."""
    from types import SimpleNamespace

    from runtime.measure.bench import bound_report

    plan = SimpleNamespace(disk_bytes_per_pass=0, h2d_bytes_per_pass=10_435_870_720)
    lk = {"disk": {"gbps": 1.5}, "h2d": {"gbps": 54.59}}
    b = bound_report(plan, lk, 349.9, kv_h2d_bytes=8_719_958_016)
    assert b["limited_by"] == "h2d" and abs(b["step_ms"] - 19_155_828_736 / 54.59e9 * 1e3) < 1e-6
    assert abs(b["ratio"] - 349.9 / b["step_ms"]) < 1e-12 and 0.99 < b["ratio"] < 1.0
    assert bound_report(plan, lk, 349.9)["step_ms"] < 0.6 * b["step_ms"]  # without the KV: weights only


def test_bound_line_names_the_limiting_pipe():
    """The summary's bound line for each limit: a link's bytes and rate; the CPU compute set (--cpu-compute), whose
    rates were measured when planned and which has no link of its own in the report."""
    from runtime.measure.bench import bound_line

    rep = {"bytes_per_token": {"h2d": 8e9, "disk": 0}, "kv": {"h2d_bytes_per_step": 0, "host_kv_bytes_per_step": 0},
           "links": {"h2d": {"gbps": 50.0}}, "plan": {"cpu_bytes_per_pass": 4e9},
           "bound": {"step_ms": 160.0, "limited_by": "h2d", "terms_ms": {"h2d": 160.0}, "decode_step_ms": 176.0,
                     "ratio": 1.1}}
    assert bound_line(rep) == "decode step 176.0 ms, bound 160.0 ms (h2d 8.00 GB @ 50.00 GB/s), achieved/bound 1.10"
    rep["bound"] = {"step_ms": 90.0, "limited_by": "cpu", "terms_ms": {"h2d": 80.0, "cpu": 90.0},
                    "decode_step_ms": 99.0, "ratio": 1.1}
    line = bound_line(rep)
    assert "bound 90.0 ms (the CPU computes 4.00 GB in place" in line and "link's pipe 80.0 ms" in line, line
    assert line.endswith("achieved/bound 1.10")
