"""launch.py as a user meets it: --help for every command, and every bad input a one-line error naming the
file and what was expected and found, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import assert_user_error, run_launch

from model.synthetic import SyntheticCheckpoint
from runtime.format.pack import pack

COMMANDS = {"pack": ["--checkpoint", "--synthetic", "--layers", "--out", "--manifest", "--dtype", "--force"],
            "run": ["--image", "--manifest", "--mode", "--prompt", "--prompt-ids", "--chat", "--max-new-tokens",
                    "--temperature", "--top-p", "--seed", "--device", "--out-json"],
            "perplexity": ["--image", "--text-file", "--context", "--out-json"],
            "verify": ["--image", "--manifest"]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_explains_every_flag(command):
    out = run_launch(command, "--help").stdout
    for flag in COMMANDS[command]:
        assert flag in out, f"{command} --help lacks {flag}"



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "tiny.img"
    pack(SyntheticCheckpoint("tiny", n_layers=2), out, dtype="fp32", quiet=True)
    return out


def test_missing_checkpoint(tmp_path):
    assert_user_error(run_launch("pack", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "x.img"),
                                 check=False), tmp_path / "nope", "no such file")


def test_checkpoint_dir_without_model_files(tmp_path):
    assert_user_error(run_launch("pack", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.img"),
                                 check=False), tmp_path, "params.json")


def test_params_with_unknown_key(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 32,
                                                      "rotary_magic": 3}))
    assert_user_error(run_launch("pack", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.img"),
                                 check=False), tmp_path / "params.json", "rotary_magic")


def test_missing_image(tmp_path):
    assert_user_error(run_launch("run", "--image", str(tmp_path / "none.img"), "--prompt-ids", "1", check=False),
                      tmp_path / "none.img")


def test_missing_manifest(tiny, tmp_path):
    assert_user_error(run_launch("run", "--image", str(tiny), "--manifest", str(tmp_path / "m.json"),
                                 "--prompt-ids", "1", check=False), tmp_path / "m.json", "manifest not found")


def test_corrupt_group_is_named_at_run(tiny, tmp_path):
    bad = tmp_path / "bad.img"
    bad.write_bytes(tiny.read_bytes())
    (tmp_path / "bad.img.manifest.json").write_text((tiny.parent / "tiny.img.manifest.json").read_text())
    m = json.loads((tmp_path / "bad.img.manifest.json").read_text())
    g = next(g for g in m["groups"] if g["name"] == "layers.1.attention")
    with open(bad, "r+b") as f:
        f.seek(g["offset"] + 100)
        f.write(b"\xff\xfe")
    proc = run_launch("run", "--image", str(bad), "--prompt-ids", "1,2", "--max-new-tokens", "2", check=False)
    assert_user_error(proc, bad, "layers.1.attention", g["offset"], "crc32")


def test_not_an_image(tmp_path):
    img = tmp_path / "x.img"
    img.write_bytes(b"\0" * 8192)
    (tmp_path / "x.img.manifest.json").write_text("{}")
    assert_user_error(run_launch("verify", "--image", str(img), check=False), "manifest", "lacks")


@pytest.mark.parametrize("flags,needle", [(["--prompt-ids", "1,x"], "--prompt-ids"),
                                          (["--prompt-ids", "1", "--max-new-tokens", "-1"], "--max-new-tokens"),
                                          (["--prompt-ids", "1", "--top-p", "0"], "--top-p"),
                                          (["--prompt", "hi"], "no tokenizer"),
                                          (["--prompt-ids", "1", "--max-seq-len", "99999999"], "--max-seq-len")])
def test_bad_run_flags(tiny, flags, needle):
    assert_user_error(run_launch("run", "--image", str(tiny), *flags, check=False), needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(tiny):
    assert_user_error(run_launch("run", "--image", str(tiny), "--prompt-ids", "1", "--device", "cuda", check=False),
                      "--device cuda")


def test_layers_without_synthetic(tmp_path):
    assert_user_error(run_launch("pack", "--checkpoint", str(tmp_path), "--layers", "2", "--out",
                                 str(tmp_path / "x.img"), check=False), "--layers")


def test_pack_into_missing_directory(tmp_path):
    assert_user_error(run_launch("pack", "--synthetic", "tiny", "--out", str(tmp_path / "no" / "x.img"),
                                 check=False), tmp_path / "no")


def test_run_prompt_ids_and_json(tiny, tmp_path):
    out = tmp_path / "o.json"
    proc = run_launch("run", "--image", str(tiny), "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--out-json",
                      str(out))
    res = json.loads(out.read_text())
    assert res["prompt_token_ids"] == [5, 6, 7] and len(res["output_token_ids"]) == 4
    assert {"prefill_ms", "decode_ms", "ttft_ms", "text"} <= set(res)
    assert proc.stdout.split()[:4] == [str(t) for t in res["output_token_ids"]]  # printed as generated


def test_sampling_is_seeded(tiny, tmp_path):
    outs = []
    for seed in (1, 1, 2):
        out = tmp_path / f"s{len(outs)}.json"
        run_launch("run", "--image", str(tiny), "--prompt-ids", "5,6", "--max-new-tokens", "12", "--temperature",
                   "1.5", "--top-p", "0.95", "--seed", str(seed), "--out-json", str(out))
        outs.append(json.loads(out.read_text())["output_token_ids"])
    assert outs[0] == outs[1] and outs[0] != outs[2]


@pytest.mark.slow
def test_embedded_default_answers_and_is_packed_once(smol_gguf, tmp_path):
    env = {"LLMSTREAM_CACHE_DIR": str(tmp_path / "cache")}
    first = run_launch("run", "--max-new-tokens", "12", "--device", "cpu", env=env)
    assert "packing the embedded" in first.stderr and str(tmp_path / "cache") in first.stderr
    assert "Paris" in first.stdout and "<|im_end|>" not in first.stdout
    # from the GGUF's own blocks (issue 18): the plan names the formats, the image is a Q4_1 model's size
    assert "stored as q4_1 (210 tensors" in first.stderr and "q8_0 (1 tensors" in first.stderr, first.stderr
    (image,) = (tmp_path / "cache").glob("*.img")
    assert image.stat().st_size < 100e6
    out = tmp_path / "out.json"
    second = run_launch("run", "--max-new-tokens", "12", "--device", "cpu", "--out-json", str(out), env=env)
    assert "using the embedded" in second.stderr and second.stdout == first.stdout
    # --out-json's text is the answer as printed: the stop token that ended it (<|im_end|>) is left out
    res = json.loads(out.read_text())
    assert res["stop_reason"] == "stop_token" and res["output_token_ids"][-1] == 2  # SmolLM2's <|im_end|>
    assert second.stdout == res["text"] + "\n" and "<|im_end|>" not in res["text"]


def _can_use_loop():
    return os.geteuid() == 0 and os.path.exists("/dev/loop-control") and shutil.which("losetup")


@pytest.mark.skipif(not _can_use_loop(), reason="needs root, /dev/loop-control and losetup")
def test_pack_and_run_on_a_block_device(tmp_path, tiny):
    backing = tmp_path / "disk"
    with open(backing, "wb") as f:
        f.truncate(32 << 20)
    attach = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
    if attach.returncode != 0:
        pytest.skip(f"losetup could not attach a loop device: {attach.stderr.strip()}")
    dev, manifest = attach.stdout.strip(), str(tmp_path / "dev.manifest.json")
    try:
        assert_user_error(run_launch("pack", "--synthetic", "tiny", "--layers", "2", "--out", dev, check=False),
                          dev, "--manifest")
        run_launch("pack", "--synthetic", "tiny", "--layers", "2", "--dtype", "fp32", "--out", dev, "--manifest",
                   manifest)
        run_launch("verify", "--image", dev, "--manifest", manifest)
        on_dev = run_launch("run", "--image", dev, "--manifest", manifest, "--prompt-ids", "3,4", "--max-new-tokens",
                            "5", "--quiet").stdout
        on_file = run_launch("run", "--image", str(tiny), "--prompt-ids", "3,4", "--max-new-tokens", "5",
                             "--quiet").stdout
        assert on_dev == on_file  # same seed, same shape: the same model whatever the medium
    finally:
        subprocess.run(["losetup", "--detach", dev], check=True)


def test_out_of_memory_is_an_error_with_a_memory_report(monkeypatch, capsys):
    """A CUDA out-of-memory error (simulated: torch's exception from a command) ends the run with exit code 3
    and a message that says what to lower, not a traceback."""
    import launch
    from runtime.cli import commands

    def oom(_args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 56.00 MiB.\nmore detail")

    monkeypatch.setattr(commands, "run", oom)
    assert launch.main(["run", "--image", "x.img", "--prompt", "hi"]) == 3
    err = capsys.readouterr().err
    assert "error: CUDA out of memory. Tried to allocate 56.00 MiB." in err and "--batch-size" in err
    assert "more detail" not in err and "Traceback" not in err


def test_live_allocations_group_blocks_by_the_line_that_made_them():
    from runtime.engine.gpumem import live_allocations

    mine = [{"filename": "/x/torch/nn/functional.py", "line": 9, "name": "linear"},
            {"filename": "/repo/model/llama.py", "line": 462, "name": "ffn_forward"}]
    snap = [{"blocks": [{"state": "active_allocated", "size": 2 << 20, "requested_size": 3 << 19, "frames": mine},
                        {"state": "active_allocated", "size": 2 << 20, "requested_size": 1 << 20, "frames": mine},
                        {"state": "inactive", "size": 64 << 20},
                        {"state": "active_allocated", "size": 8 << 20}]}]
    rows = live_allocations(snap)
    assert rows == [("blocks of 8.0 MiB", 8 << 20, 1), ("llama.py:462 ffn_forward", (3 << 19) + (1 << 20), 2)]
