"""Nothing lost on bad input (issue 16): every case a new user met, each checked for its message and for what it
leaves behind (nothing in /dev/shm, the pool dir or the output directory).

  packing            over its own checkpoint (also through a symlink and a hard link), onto an HF directory's own
                     safetensors; a failed pack onto an existing image (truncated checkpoint); a pack killed at
                     each point of its write and commit (LLMS_PACK_KILL_AT); a fuzz of truncations, corruptions
                     and kills at random times (seed printed): the old image, manifest and tokenizer stay byte for
                     byte, or the new ones are whole, and no temporary is left.
  token ids          out of the vocabulary, equal to its size, negative, in --mode full and streaming: one line,
                     before any pool starts.
  checkpoint shapes  a safetensors q_proj of the wrong shape is named before any transformation.
  flags              --temperature -1, --top-p 0 / 1.5, --max-new-tokens -1, --workers 1000, --topk-blk 0,
                     pool start --dram-gb -1: refused before any process starts.
  the coordinator    SIGTERM while it starts its workers, and its run SIGKILLed meanwhile: it stops its workers and
                     unlinks everything within seconds.
  threads            runs on one machine share its cores (runtime/engine/threads.py).
  small              a directory or /dev/null as the image; a manifest of a larger image; the streamed text ends
                     its line before "interrupted".
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ckpt_writers import write_gguf, write_hf
from conftest import ROOT, assert_user_error, run_launch

from model.errors import CheckpointError
from runtime.format.image import Image
from runtime.ipc.shm import leftover_names

PACK_S = 120


def snapshot(d: Path) -> dict[str, str]:
    """Every file under ``d`` (relative path -> sha256), the tokenizer directory's too."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def temporaries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".pack-" in p.name)


def wait_no_temporaries(d: Path, timeout_s: float = 15.0) -> list[str]:
    """The guard process finishes after its writer dies: wait for it, then say what is left."""
    deadline = time.monotonic() + timeout_s
    while temporaries(d) and time.monotonic() < deadline:
        time.sleep(0.05)
    return temporaries(d)


def pack_cmd(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "launch.py"), "pack", "--checkpoint", str(ckpt), "--out", str(out), "--quiet",
            *extra]


@pytest.fixture
def packed(tmp_path):
    """A tiny GGUF (with a tokenizer) and its image in ``tmp_path/out``; returns (gguf, image, out dir)."""
    ckpt = tmp_path / "tiny.gguf"
    write_gguf(ckpt, seed=1)
    out = tmp_path / "out"
    out.mkdir()
    run_launch("pack", "--checkpoint", str(ckpt), "--out", str(out / "m.img"), "--dtype", "fp32", "--quiet")
    assert (out / "m.img.tokenizer").is_dir()
    return ckpt, out / "m.img", out


# ---- packing -------------------------------------------------------------------------------------------------

def test_pack_over_its_own_checkpoint_refused(tmp_path):
    ckpt = tmp_path / "c.gguf"
    write_gguf(ckpt)
    (tmp_path / "link.gguf").symlink_to(ckpt)
    os.link(ckpt, tmp_path / "hard.gguf")
    before = snapshot(tmp_path)
    for src, out in ((ckpt, ckpt), (tmp_path / "link.gguf", tmp_path / "hard.gguf"), (ckpt, tmp_path / "link.gguf")):
        proc = run_launch("pack", "--checkpoint", str(src), "--out", str(out), check=False)
        assert_user_error(proc, str(out), "checkpoint's own file")
    hf = tmp_path / "hf"
    write_hf(hf)
    before_hf = snapshot(hf)
    proc = run_launch("pack", "--checkpoint", str(hf), "--out", str(hf / "model.safetensors"), check=False)
    assert_user_error(proc, "model.safetensors", "checkpoint's own file")
    proc = run_launch("pack", "--checkpoint", str(hf), "--out", str(tmp_path / "x.img"), "--manifest",
                      str(hf / "config.json"), check=False)
    assert_user_error(proc, "config.json", "checkpoint's own file")
    assert snapshot(tmp_path / "hf") == before_hf and snapshot(tmp_path) == {**before, **{
        f"hf/{k}": v for k, v in before_hf.items()}}
    assert not temporaries(tmp_path) and not (tmp_path / "x.img").exists()


def test_failed_pack_leaves_the_old_image(packed, tmp_path):
    ckpt, image, out = packed
    before = snapshot(out)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size * 2 // 3])  # the tensors' data cut short
    proc = run_launch("pack", "--checkpoint", str(cut), "--out", str(image), check=False)
    assert_user_error(proc, str(cut))
    assert snapshot(out) == before and not wait_no_temporaries(out)
    Image.open(image).verify()


@pytest.mark.parametrize("point", ["group-1", "before-commit", "rename-0", "rename-1", "rename-2", "rename-3"])
def test_pack_killed_at_each_point(packed, point):
    """Killed before its commit: the old image exactly; killed during it: the guard completes the new one."""
    ckpt, image, out = packed
    before = snapshot(out)
    proc = subprocess.run(pack_cmd(ckpt, image, "--dtype", "bf16"), env={**os.environ, "LLMS_PACK_KILL_AT": point},
                          capture_output=True, text=True, timeout=PACK_S)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    assert not wait_no_temporaries(out), f"left behind: {temporaries(out)}"
    img = Image.open(image)
    img.verify()
    if point.startswith("rename"):  # the commit had begun: rolled forward, whole
        assert img.dtype == "bf16" and (out / "m.img.tokenizer").is_dir()
        assert sorted(p.name for p in out.iterdir()) == ["m.img", "m.img.manifest.json", "m.img.tokenizer"]
    else:
        assert snapshot(out) == before


def test_pack_fuzz_truncate_corrupt_kill(packed, tmp_path):
    """Random faults at random points: every outcome is the old image byte for byte, or a whole new one."""
    seed = random.randrange(1 << 30)
    print(f"test_pack_fuzz_truncate_corrupt_kill: seed {seed}")
    rng = random.Random(seed)
    ckpt, image, out = packed
    t0 = time.monotonic()
    run_launch("pack", "--checkpoint", str(ckpt), "--out", str(image), "--dtype", "fp32", "--quiet")
    full_s = time.monotonic() - t0
    good = ckpt.read_bytes()
    for trial in range(5):
        before = snapshot(out)
        action = rng.choice(["truncate", "corrupt", "kill", "kill"])
        src = tmp_path / f"t{trial}.gguf"
        data = bytearray(good)
        if action == "truncate":
            del data[rng.randrange(1, len(data)):]
        elif action == "corrupt":
            for _ in range(8):
                data[rng.randrange(len(data))] = rng.randrange(256)
        src.write_bytes(bytes(data))
        p = subprocess.Popen(pack_cmd(src, image, "--dtype", rng.choice(["fp32", "bf16"])), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        if action == "kill":
            time.sleep(rng.uniform(0, full_s))
            p.kill()
        _, err = p.communicate(timeout=PACK_S)
        what = f"seed {seed} trial {trial} {action} rc {p.returncode}: {err[-500:]}"
        assert "Traceback" not in err, what
        assert not wait_no_temporaries(out), f"{what}: left behind {temporaries(out)}"
        if p.returncode != 0:
            assert snapshot(out) == before or (action == "kill" and _whole(image)), what
        assert _whole(image), what


def _whole(image: Path) -> bool:
    try:
        Image.open(image).verify()
        return True
    except Exception:
        return False


def test_hf_q_proj_of_the_wrong_shape_named(tmp_path):
    from safetensors.torch import load_file, save_file

    from model.checkpoint import open_checkpoint

    hf = tmp_path / "hf"
    write_hf(hf)
    sd = load_file(str(hf / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    rows, cols = sd[key].shape
    sd[key] = torch.zeros(rows - 2, cols)  # no longer whole heads: the un-permute would raise on it
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    shape = rf"\({rows - 2}, {cols}\), expected \({rows}, {cols}\)"
    with pytest.raises(CheckpointError, match=rf"layers\.0\.attention\.wq\.weight has shape {shape}"):
        open_checkpoint(hf).tensor("layers.0.attention.wq.weight")
    proc = run_launch("pack", "--checkpoint", str(hf), "--out", str(tmp_path / "x.img"), check=False)
    assert_user_error(proc, "wq.weight", f"({rows - 2}, {cols})")
    assert not (tmp_path / "x.img").exists() and not temporaries(tmp_path)


# ---- flags and token ids: refused before any process starts ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from model.synthetic import SyntheticCheckpoint
    from runtime.format.pack import pack

    out = tmp_path_factory.mktemp("inputs") / "tiny.img"
    pack(SyntheticCheckpoint("tiny", n_layers=2), out, dtype="fp32", quiet=True)
    return out


def launch_tracked(*args: str):
    """``run_launch(*args, check=False)`` that also names what the process's private pool would be called
    (runPID-N: its shared memory carries it), so the leftover check sees only this run's, not those of tests
    running beside it."""
    p = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err), f"run{p.pid}"


def refused_first(proc, *needles, pool: str) -> None:
    """One error line and nothing before it (no plan printed, no pool started), nothing of pool ``pool`` (a
    prefix of its name) left in /dev/shm."""
    assert_user_error(proc, *needles)
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    mine = [n for n in leftover_names() if f".{pool}" in n]
    assert not mine, mine


@pytest.mark.parametrize("mode", ["full", "stream"])
def test_token_ids_outside_the_vocabulary(tiny, mode):
    vocab = Image.open(tiny).args.vocab_size
    for ids, bad in (("1,2,999999", "999999"), (f"1,{vocab}", str(vocab)), ("-1", "-1")):
        proc, pool = launch_tracked("run", "--image", str(tiny), "--mode", mode, "--prompt-ids", ids)
        refused_first(proc, "--prompt-ids", bad, f"0..{vocab - 1}", pool=pool)


@pytest.mark.parametrize("flags,needle", [
    (["--temperature", "-1"], "--temperature must be >= 0, found -1.0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], found 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], found 1.5"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, found -1"),
    (["--workers", "1000"], "--workers 1000: 1 to"),
    (["--topk-blk", "0"], "--topk-blk must be at least 1, found 0"),
    (["--threads", "0"], "--threads must be at least 1, found 0"),
    (["--max-seq-len", "2"], "exceeds --max-seq-len 2"),
])
def test_run_flags_refused_before_the_pool(tiny, flags, needle):
    proc, pool = launch_tracked("run", "--image", str(tiny), "--mode", "stream", "--prompt-ids", "1,2,3", *flags)
    refused_first(proc, needle, pool=pool)


def test_pool_start_flags_refused_first(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMS_POOL_DIR", str(tmp_path / "pools"))
    for flags, needle in ((["--dram-gb", "-1"], "--dram-gb must be positive, found -1.0"),
                          (["--workers", "1000"], "--workers 1000: 1 to"),
                          (["--clients", "100000"], "--clients 100000: at most")):
        proc = run_launch("pool", "start", "--image", str(tiny), "--name", "bad", *flags, check=False)
        refused_first(proc, needle, pool="bad.")
    assert not any((tmp_path / "pools").glob("bad*"))


# ---- the coordinator: told to stop, or orphaned, while it starts its workers ---------------------------------

def _private_pool_script(image: Path, name: str) -> str:
    return f"""
import os, sys, time
from runtime.format.image import Image
from runtime.ipc.options import PoolConfig
from runtime.pool.coordinator import PrivatePool
img = Image.open({str(image)!r})
pool = PrivatePool(PoolConfig(str(img.path), str(img.manifest_path), {name!r}, tuple(img.groups), 0, 4096,
                              workers=48, owner_pid=os.getpid()))
print(pool.proc.pid, flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["sigterm", "owner killed"])
def test_coordinator_stops_while_starting_workers(tiny, how):
    """The coordinator answers its start at once and then spawns its workers, here 48 (more than any run may ask
    for: 10-20 s of spawning on 2 cores): the signal or the owner's death arrives during that, and it must stop
    within seconds, the workers it started and every name it made included."""
    import psutil

    name = f"inp{os.getpid()}{how[:3]}"
    owner = subprocess.Popen([sys.executable, "-c", _private_pool_script(tiny, name)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        coord = psutil.Process(int(owner.stdout.readline()))
        if how == "sigterm":
            coord.send_signal(signal.SIGTERM)
        else:
            owner.kill()
        t0 = time.monotonic()

        def gone() -> bool:  # exited (a zombie until the owner reaps it)
            try:
                return coord.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        deadline = time.monotonic() + 5
        while (not gone() or leftover_names(pool=name)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone(), f"coordinator pid {coord.pid} still runs 5 s after the {how}"
        assert not leftover_names(pool=name), leftover_names(pool=name)
        workers = [p for p in psutil.process_iter(["cmdline"]) if "llms-io" in " ".join(p.info["cmdline"] or [])
                   and p.ppid() == coord.pid]
        assert not workers and time.monotonic() - t0 < 6
    finally:
        owner.kill()
        _, err = owner.communicate()
    m = re.search(r"stopping while starting its I/O workers \((\d+) of 48 started\)", err)
    assert m and int(m.group(1)) < 48, err


# ---- compute threads -------------------------------------------------------------------------------------------

def test_runs_share_the_cores(tmp_path, monkeypatch):
    from runtime.engine.threads import ComputeThreads

    monkeypatch.setenv("LLMS_POOL_DIR", str(tmp_path / "pools"))
    before = torch.get_num_threads()
    try:
        a = ComputeThreads(cores=8)
        assert torch.get_num_threads() == 8 and a.runs() == 1
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        (tmp_path / "pools" / "compute" / str(other.pid)).write_text("x")  # a second live run
        (tmp_path / "pools" / "compute" / "999999999").write_text("x")  # a dead one's file: not counted, removed
        try:
            assert a.refresh(force=True) == 4 and torch.get_num_threads() == 4
            assert not (tmp_path / "pools" / "compute" / "999999999").exists()
        finally:
            other.kill()
            other.wait()
        assert a.refresh(force=True) == 8
        assert ComputeThreads(3).current == 3  # --threads 3: fixed, not registered
        a.close()
        assert not (tmp_path / "pools").exists()  # the last run out removes the registry and the empty pool dir
    finally:
        torch.set_num_threads(before)


# ---- small ----------------------------------------------------------------------------------------------------

def test_directory_and_dev_null_as_the_image(tmp_path):
    proc = run_launch("run", "--image", str(tmp_path), "--prompt-ids", "1", check=False)
    assert_user_error(proc, str(tmp_path), "is a directory, not an image")
    proc = run_launch("run", "--image", "/dev/null", "--prompt-ids", "1", check=False)
    assert_user_error(proc, "/dev/null", "is a character device, not an image")


def test_manifest_of_a_larger_image(tiny, tmp_path):
    from model.synthetic import SyntheticCheckpoint
    from runtime.format.pack import pack

    big = tmp_path / "big.img"
    pack(SyntheticCheckpoint("tiny", n_layers=4), big, dtype="fp32", quiet=True)
    proc = run_launch("run", "--image", str(tiny), "--manifest", f"{big}.manifest.json", "--prompt-ids", "1",
                      check=False)
    assert_user_error(proc, "does not match manifest", "manifest of another image")
    cut = tmp_path / "cut.img"
    cut.write_bytes(big.read_bytes()[:-4096])
    shutil.copyfile(f"{big}.manifest.json", f"{cut}.manifest.json")
    assert_user_error(run_launch("run", "--image", str(cut), "--prompt-ids", "1", check=False), "truncated image")


def test_interrupted_after_streamed_text(tiny):
    p = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "run", "--image", str(tiny), "--mode", "full",
                          "--prompt-ids", "1,2", "--max-new-tokens", "4000", "--max-seq-len", "4096"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.set_blocking(p.stdout.fileno(), False)
    got, deadline = b"", time.monotonic() + 60
    while len(got.split()) < 3 and time.monotonic() < deadline and p.poll() is None:
        got += p.stdout.read() or b""
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    os.set_blocking(p.stdout.fileno(), True)
    out, err = p.communicate(timeout=30)
    out = (got + out).decode()
    assert len(got.split()) >= 3, (got, err)
    assert p.returncode == 130 and "interrupted" in err.decode(), (p.returncode, err)
    assert out.endswith("\n") and not out.endswith(" \n\n"), repr(out[-40:])
