"""Environment variables: the one place the runtime reads the environment .

LLMSTREAM_CACHE_DIR   where the embedded default model is packed (default: $XDG_CACHE_HOME/llmstream, or
                      ~/.cache/llmstream).
LLMS_POOL_DIR         where daemon pools keep their records, logs and locks (default: $XDG_RUNTIME_DIR/llmstream,
                      or /tmp/llmstream-UID); runtime/services/pools.py checks it is the user's and private.
PYTORCH_CUDA_ALLOC_CONF  PyTorch's; when neither it nor PYTORCH_ALLOC_CONF is set, launch.py sets
                      expandable_segments:True before torch starts (allocator_defaults).
LLMS_CUDA_MEMORY_HISTORY  set (to anything but 0 or empty): record the Python stack of every CUDA allocation,
                      so that an out-of-memory error names the lines of code holding the memory
                      (runtime/engine/gpumem.py).
LLMS_API_KEY          the API key the HTTP server of ``pool serve --http`` / ``serve --http`` demands
                      (``Authorization: Bearer KEY``) when --api-key is not given (runtime/services/http.py).
LLMS_CPU_KERNELS      how a float32 CPU run multiplies the quantized weights it holds (every GGUF format we keep and our
                      int4/int8, in row tiles: model/cpu_kernels.py): auto (the default) by model/cpu_simd.c, built
                      with the host's C compiler on first use (about a second, kept in LLMSTREAM_CACHE_DIR's
                      cpu-kernels) where the CPU has AVX-512F or AVX2, else held dequantized to float32; 1: the same,
                      and inductor's kernels (q4_0, q4_1, q8_0, int4, int8) where the C does not build (10-25 s to
                      compile in a fresh process); inductor: inductor's only; 0: held dequantized to float32 (4 bytes
                      a value, the fastest prefill of a K-quant on a few cores, a third of the decode speed).
LLMS_PACK_KILL_AT     tests only: the pack process SIGKILLs itself at a named point, to show that nothing is
                      lost there (runtime/format/pack.py, runtime/format/staged.py): group-N (after writing group N),
                      before-commit, rename-N (before the commit's rename N).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    explicit = os.environ.get("LLMSTREAM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmstream"


def api_key_env() -> str | None:
    return os.environ.get("LLMS_API_KEY") or None


def pool_dir_path() -> Path:
    explicit = os.environ.get("LLMS_POOL_DIR")
    if explicit:
        return Path(explicit)
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "llmstream"
    import tempfile

    return Path(tempfile.gettempdir()) / f"llmstream-{os.getuid()}"


def allocator_defaults() -> None:
    """Expandable segments for PyTorch's CUDA allocator unless the user configured it: plans fill the GPU
    budget to within tens of MB, and with fixed segments a batched prefill's varying activation sizes left
    100-230 MiB reserved but unusable and ran out of memory under the cap (the 8B and 70B batch sweeps at
    batch 32). Must run before torch initialises CUDA; a no-op on the CPU."""
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def cuda_memory_history() -> bool:
    return os.environ.get("LLMS_CUDA_MEMORY_HISTORY", "") not in ("", "0")


CPU_KERNELS = ("auto", "1", "inductor", "0")


def cpu_kernels():
    """The kernels a CPU run multiplies the quantized weights it holds with (model/cpu_kernels.py ``Kernels``), or
    None: held dequantized. LLMS_CPU_KERNELS of another value is refused by name."""
    from model.cpu_kernels import Kernels  # here: launch.py reads this module before torch may start
    from model.errors import ConfigError

    v = os.environ.get("LLMS_CPU_KERNELS", "auto")
    if v not in CPU_KERNELS:
        raise ConfigError(f"LLMS_CPU_KERNELS={v!r}: expected one of {', '.join(CPU_KERNELS)}")
    build = cache_dir() / "cpu-kernels"
    return None if v == "0" else Kernels(None if v == "inductor" else build, inductor=v != "auto")


def pack_kill_at() -> str | None:
    return os.environ.get("LLMS_PACK_KILL_AT") or None
