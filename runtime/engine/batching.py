"""The batching arithmetic: how prompts are cut into weight passes, and the memory a batch takes (its KV cache
and one pass's activations). The plan (runtime/engine/source.py), the Generator and the benchmarks share these
rules. Torch-free: a private pool is planned before torch starts.
"""

from __future__ import annotations

import psutil

from model.qformats import DEQUANT_CHUNK
from runtime.format.image import DTYPE_BYTES, Image


def chunk_per_sequence(chunk: int, batch: int) -> int:
    """Prefill tokens per sequence in one weight pass: ``chunk`` tokens per pass shared by the batch, so a
    batch's activations stay those of one chunk (runtime.engine.generate.Generator.forward uses the same rule)."""
    return max(16, chunk // max(batch, 1))


def sequences_per_pass(chunk: int, batch: int, length: int) -> int:
    """Prompts of ``length`` tokens one weight pass of a whole-prompt prefill takes (at least one; a longer
    prompt is chunked on its own): runtime.engine.generate.Generator.forward_by_sequence."""
    return min(batch, max(1, chunk // length))


def prefill_passes(chunk: int, batch: int, length: int) -> tuple[int, int]:
    """Weight passes to prefill ``batch`` prompts of ``length`` tokens, ``chunk`` tokens a pass: (chunked
    across the batch, whole prompts at a time)."""
    across = -(-length // (chunk_per_sequence(chunk, batch) if batch > 1 else chunk))
    return across, -(-batch // sequences_per_pass(chunk, batch, length)) * -(-length // chunk)


def kv_cache_bytes(image: Image, batch: int, max_len: int, offload: bool = False, block_tokens: int = 1,
                   device_rows: int | None = None) -> int:
    """The KV cache's bytes on the compute device: all of it, or with offload two layers' buffers of
    ``device_rows`` sequences (default the batch; kv_device_rows); its slots rounded up to whole blocks of
    ``block_tokens``, as runtime.engine.kv.KVCache allocates them."""
    a = image.args
    elem = DTYPE_BYTES[image.dtype]
    slots = -(-max_len // block_tokens) * block_tokens
    rows = batch if not offload or device_rows is None else device_rows
    return 2 * (2 if offload else a.n_layers) * rows * slots * a.n_kv_heads * a.head_dim * elem


def kv_device_rows(batch: int, max_len: int, prefill_chunk: int, by_sequence: bool | None, host_layers: int,
                   n_layers: int) -> int:
    """Sequences of ``max_len`` slots an offloaded cache's two device buffers hold: the batch's, except when
    every layer is attended on the host (no layer's cache is read back while decoding) and the prefill goes
    whole prompts at a time (``by_sequence`` True or None, the default): then only one pass's prompts ever
    reach the device, at most ``prefill_chunk`` tokens, so the buffers hold that many slots, in whole
    sequences of ``max_len`` (at least one; shorter prompts are packed into the same memory,
    ``TieredKVCache.sub_batch``). At batch 128 of the 70B shape that frees the 2.2 GB the buffers took from
    the GPU tier."""
    if by_sequence is False or host_layers != n_layers:
        return batch
    return min(batch, max(1, -(-prefill_chunk // max_len)))


def activation_bytes(image: Image, batch: int, chunk: int, all_logits: bool = False) -> int:
    """Rough upper bound of the workspace of one prefill chunk: hidden states, FFN intermediates (a mixture's
    widest: an expert's over at most every token, or its shared expert's; and its router's fp32 probabilities and
    int64 choices), and fp32 logits (every position's for perplexity, else the last position's)."""
    a = image.args
    elem = DTYPE_BYTES[image.dtype]
    logits = batch * (chunk if all_logits else 1) * a.vocab_size * 4
    scores = batch * a.n_heads * chunk * chunk * 4  # a masked (later) chunk may take the math kernel's scores
    # a quantized matrix's dequantized rows (two chunks: one may still be read while the next is written)
    dequant = 2 * min(image.largest_quantized(), DEQUANT_CHUNK) * elem
    router = batch * chunk * a.n_experts * 12
    ffn = max(a.ffn_hidden, a.shared_ffn_hidden)
    return batch * chunk * (6 * a.dim + 3 * ffn) * elem + router + logits + scores + dequant + (256 << 20)


def default_dram_bytes() -> int:
    return int(psutil.virtual_memory().available * 0.8)
