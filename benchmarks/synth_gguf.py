"""Synthetic Llama-shaped and mixture-of-experts GGUF files: the same file given to llama.cpp and to our runtime for
the side-by-side comparisons of issues 27 and 28 (benchmarks/gpu_peer.sh) and 29 (benchmarks/gpu_moe.sh). No real
model is needed and nothing is downloaded.

    python benchmarks/synth_gguf.py --preset llama3.1-70b --layers 32 --type q4_k_m --out /tmp/70b-x32.gguf
    python benchmarks/synth_gguf.py --preset qwen3-235b-a22b --layers 8 --type q4_k_m --out /tmp/q235-x8.gguf
    python benchmarks/synth_gguf.py --preset mixtral-8x7b --tiny --layers 1 --type q4_k_m --out /tmp/t.gguf

Shapes are model/args.py's presets (the Llama ones: llama3.1-8b, llama3.1-70b, llama3.2-1b, tiny; the mixtures
mixtral-8x7b and qwen3-235b-a22b), ``--layers`` cutting the layer count, ``--tiny`` shrinking the preset to test
size with its architecture kept (``tiny_shape``: its experts, top-k, q/k norms and a head_dim that is not
dim / heads where the preset's is not). A mixture is written as llama.cpp's converter writes it: Mixtral as a
``llama`` GGUF with ``llama.expert_count`` / ``expert_used_count`` set, Qwen3-MoE as ``qwen3moe`` (with
``expert_feed_forward_length``, ``attention.key_length`` / ``value_length`` = head_dim, the per-head
``attn_q_norm`` / ``attn_k_norm``); each layer's router ``ffn_gate_inp`` (n_experts, dim) in F32 (the converter
keeps it so and llama-quantize never quantizes it), its experts stacked in ``ffn_gate_exps`` / ``ffn_up_exps``
(n_experts, ffn, dim) and ``ffn_down_exps`` (n_experts, dim, ffn). ``--type``:

    bf16    every matrix BF16, norms F32 (what llama.cpp's converter writes with --outtype bf16)
    q8_0    every matrix Q8_0, norms F32 (llama.cpp's Q8_0: the output matrix stays Q8_0)
    q4_k_m  llama.cpp's Q4_K_M mix (llama_tensor_get_type in src/llama-quant.cpp of the llama.cpp that
            benchmarks/llamacpp_prepare.sh pins, for the llama architecture without experts): Q4_K for every
            matrix and token_embd, except output Q6_K; attn_v Q6_K in the layers use_more_bits picks
            (i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2: 16 of 32 layers), else Q4_K, or Q5_K in an 80-layer
            model (llama.cpp's LLM_TYPE_70B rule); ffn_down Q6_K in the use_more_bits layers, else Q4_K. A
            matrix whose rows are not a multiple of 256 values falls back as llama.cpp's does (Q4_K -> Q5_0,
            Q5_K -> Q5_1, Q6_K -> Q8_0; output -> Q8_0). Not followed: the imatrix rules and the
            attn_qkv/Falcon branches. A mixture follows llama.cpp's expert rules: the stacked ffn_down_exps as
            ffn_down (Q6_K in the use_more_bits layers, the layer parsed from the name), the gate/up stacks Q4_K;
            with exactly 8 experts (Mixtral) attn_v and attn_k Q8_0 and attn_output Q5_K ("for the 8-expert
            model, bumping this to Q8_0 trades just ~128MB"). The sizes come out as llama.cpp's own files of the
            real models: 8B x32 4.91 GB (Llama-3.1-8B Q4_K_M: 4.92 GB), 70B x80 42.5 GB (42.5 GB); the 70B shape
            cut to 32 layers is 17.86 GB. Mixtral-8x7B x32 and Qwen3-235B-A22B (x94, or ~1.4 GB a layer): see
            ``--info-json``'s bytes (llama.cpp's Mixtral-8x7B Q4_K_M is 26.4 GB, Qwen3-235B-A22B's 142 GB).

Every block is valid: random quantized values and sub-scales, each block's fp16 scale (and minimum) finite and
set so the weights have a standard deviation of about 0.02, as model/synthetic.py's N(0, 0.02). Blocks are drawn
once per type into a 64 MiB pool; each tensor is a run of the pool's blocks from a random block (wrapping), so
tensors differ and writing runs at memcpy and disk speed (on the 2-core dev machine: 1.2-2.9 GB/s of tensor data
into tmpfs, 380-410 MB/s onto its disk, which dd fills at 445 MB/s; ~2 s more for the pools and the vocabulary's
metadata; at most ~0.5 GB of memory whatever the size). Tensors stream to
the file one after another through gguf.GGUFWriter (a lazy tensor whose ``tofile`` copies pool slices): nothing
tensor-sized is ever held in memory. Norms are 1 + N(0, 0.1) in F32; Llama 3.1's rope scaling is the
``rope_freqs`` tensor llama.cpp's converter writes.

The vocabulary is a byte-level BPE (``tokenizer.ggml.model`` "gpt2", pre-tokenizer "llama-bpe") of exactly the
preset's vocab size: GPT-2's 256 byte characters, then two- and three-character merges of them, then
<|begin_of_text|> and <|end_of_text|> (CONTROL) as BOS and EOS. llama.cpp's loader needs merges for a BPE
vocabulary and tokens made of byte characters (it decodes every token at load); our packer needs a "gpt2" or
"llama" vocabulary to save the image's tokenizer (model/tokenizer.py from_gguf). Runs on any machine with numpy,
torch and the gguf package; in benchmarks/gpu_peer.sh on the GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model.args import PRESETS, ModelArgs, preset  # noqa: E402

Q = gguf.GGMLQuantizationType
TYPES = ("q4_k_m", "q8_0", "bf16")
FILE_TYPES = {"q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16}
LLAMA_PRESETS = tuple(sorted(n for n, p in PRESETS.items() if p.get("arch", "llama") == "llama"))
MOE_PRESETS = ("mixtral-8x7b", "qwen3-235b-a22b")
SYNTH_PRESETS = (*LLAMA_PRESETS, *MOE_PRESETS)
GGUF_ARCH = {"llama": "llama", "mixtral": "llama", "qwen3_moe": "qwen3moe"}  # ours -> llama.cpp's, as converted
EXPERT_STACKS = ("ffn_gate_exps", "ffn_down_exps", "ffn_up_exps")
POOL_BYTES = 64 << 20  # per type: larger than any row, drawn in well under a second
STD = 0.02  # the weights' standard deviation, as model/synthetic.py's
# fp16 fields of each block type: (byte offset, multiple of the block's scale d). A minimum is set so the
# block's values centre on 0: dmin = mean(sub-scale x q) / mean(sub-minimum) for the K-quants (w = d sc q - dmin m,
# sc, m in 0..63, q in 0..15 (Q4_K) or 0..31 (Q5_K)); m = -15.5 d for Q5_1 (w = d q + m, q in 0..31).
FP16_FIELDS = {Q.Q8_0: ((0, 1.0),), Q.Q5_0: ((0, 1.0),), Q.Q5_1: ((0, 1.0), (2, -15.5)),
               Q.Q4_K: ((0, 1.0), (2, 7.5)), Q.Q5_K: ((0, 1.0), (2, 15.5)), Q.Q6_K: ((208, 1.0),)}
FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}  # llama.cpp's, for rows not a multiple of 256
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
MOE_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_inp", *EXPERT_STACKS)
ROUTER = "ffn_gate_inp"  # F32: llama.cpp's converter keeps it so, llama-quantize never quantizes it


# ---- which type each tensor gets ----------------------------------------------------------------------------

def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in its _M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def q4_k_m_type(name: str, layer: int | None, args: ModelArgs) -> Q:
    """The ggml type llama.cpp's Q4_K_M gives tensor ``name`` (llama.cpp's short name, e.g. "attn_v") of
    ``layer``, before the row-length fallback."""
    if name == "output" or (name == "token_embd" and args.tie_embeddings):
        return Q.Q6_K
    if args.n_experts == 8 and name in ("attn_v", "attn_k"):
        return Q.Q8_0  # llama.cpp: "for the 8-expert model, bumping this to Q8_0 trades just ~128MB"
    if args.n_experts == 8 and name == "attn_output":
        return Q.Q5_K
    if name in ("attn_v", "ffn_down", "ffn_down_exps") and use_more_bits(layer, args.n_layers):
        return Q.Q6_K
    if name == "attn_v" and args.n_layers == 80 and args.n_heads != args.n_kv_heads:
        return Q.Q5_K  # llama.cpp's LLM_TYPE_70B: attn_v is 8x smaller than attn_q, so it takes more bits
    return Q.Q4_K


def tensor_type(kind: str, name: str, layer: int | None, cols: int, args: ModelArgs) -> Q:
    """The ggml type of a matrix with rows of ``cols`` values in a file of ``kind`` (TYPES); a router F32."""
    if name == ROUTER:
        return Q.F32
    t = {"bf16": Q.BF16, "q8_0": Q.Q8_0}.get(kind) or q4_k_m_type(name, layer, args)
    if t in FALLBACK and cols % 256:
        t = Q.Q8_0 if name == "output" else FALLBACK[t]
    block = gguf.GGML_QUANT_SIZES[t][0]
    if cols % block:
        raise ValueError(f"{name} (layer {layer}): rows of {cols} values do not divide into {t.name}'s blocks of "
                         f"{block}; llama.cpp would store it F16, which this writer does not (give a shape whose "
                         f"row lengths are multiples of 32)")
    return t


def matrices(args: ModelArgs) -> list[tuple[str, int | None, tuple[int, ...]]]:
    """(llama.cpp name, layer or None, shape) of every matrix, in the order the file holds them: (rows, cols), or
    (n_experts, rows, cols) for a mixture's stacked experts (numpy order: a row's values last)."""
    hd, kv, e, f = args.head_dim, args.n_kv_heads * args.head_dim, args.n_experts, args.ffn_hidden
    shapes = {"attn_q": (args.n_heads * hd, args.dim), "attn_k": (kv, args.dim), "attn_v": (kv, args.dim),
              "attn_output": (args.dim, args.n_heads * hd), "ffn_gate": (f, args.dim), "ffn_up": (f, args.dim),
              "ffn_down": (args.dim, f), ROUTER: (e, args.dim), "ffn_gate_exps": (e, f, args.dim),
              "ffn_up_exps": (e, f, args.dim), "ffn_down_exps": (e, args.dim, f)}
    out = [("token_embd", None, (args.vocab_size, args.dim))]
    out += [(m, i, shapes[m]) for i in range(args.n_layers) for m in (MOE_MATRICES if e else MATRICES)]
    if not args.tie_embeddings:
        out.append(("output", None, (args.vocab_size, args.dim)))
    return out


def tensor_bytes(shape: tuple[int, ...], t: Q) -> int:
    bs, ts = gguf.GGML_QUANT_SIZES[t]
    return int(np.prod(shape[:-1])) * shape[-1] // bs * ts


def tiny_shape(args: ModelArgs) -> ModelArgs:
    """``args``' architecture at test size (``--tiny``): dim 256, 4 heads (2 for k/v), FFN (one expert's) 256,
    vocab 512; its experts, top-k, q/k norms and rope kept, and a head_dim of 128 (not dim / heads) where the
    preset's head_dim is not dim / heads either (Qwen3-MoE's q rows 8192 against dim 4096)."""
    decoupled = args.head_dim * args.n_heads != args.dim
    return dataclasses.replace(args, dim=256, n_heads=4, n_kv_heads=2, head_dim=128 if decoupled else 64,
                               ffn_hidden=256, vocab_size=512, max_seq_len=min(args.max_seq_len, 4096))


def gguf_tensor_name(name: str, layer: int | None) -> str:
    return f"blk.{layer}.{name}.weight" if layer is not None else f"{name}.weight"


# ---- random valid blocks ------------------------------------------------------------------------------------

def random_blocks(qtype: Q, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random valid blocks of ``qtype`` as (n, type size) uint8 (BF16: (n, 2), one value each): random
    quantized values and sub-scales; each block's fp16 fields a random multiple (0.5-1.5) of one scale that makes
    the weights' std about STD (measured on the first blocks with gguf's dequantizer: the weights are linear in
    the fields)."""
    if qtype == Q.BF16:
        f32 = rng.standard_normal(n, dtype=np.float32) * np.float32(STD)
        return (f32.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n, 2)
    ts = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = np.frombuffer(rng.bytes(n * ts), dtype=np.uint8).reshape(n, ts).copy()
    jitter = rng.uniform(0.5, 1.5, n).astype(np.float32)

    def set_fields(scale: float) -> None:
        for off, mult in FP16_FIELDS[qtype]:
            raw[:, off:off + 2] = (jitter * np.float32(scale * mult)).astype(np.float16).view(np.uint8).reshape(n, 2)

    set_fields(1.0)
    sample = raw[:min(n, 4096)]
    set_fields(STD / float(gguf.quants.dequantize(sample, qtype).std()))
    return raw


class BlockPool:
    """Random valid blocks per type, drawn once (seeded): POOL_BYTES, or all that the file holds of the type when
    that is less (a tiny model's file costs no 64 MiB draws)."""

    def __init__(self, seed: int, type_bytes: dict[Q, int]) -> None:
        self.rng = np.random.default_rng(seed)
        self.type_bytes = type_bytes
        self.pools: dict[Q, np.ndarray] = {}

    def tensor(self, qtype: Q, shape: tuple[int, ...]) -> PoolTensor:
        """A lazy (..., rows, row bytes) tensor of ``qtype`` blocks of logical ``shape``: the pool's, from a random
        block on."""
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        if qtype not in self.pools:
            n = max(1, min(POOL_BYTES, self.type_bytes[qtype]) // ts)
            self.pools[qtype] = random_blocks(qtype, n, self.rng).reshape(-1)
        pool = self.pools[qtype]
        start = int(self.rng.integers(0, pool.size // ts)) * ts
        return PoolTensor(pool, (*shape[:-1], shape[-1] // bs * ts), start)


@dataclasses.dataclass
class PoolTensor:
    """What gguf.GGUFWriter.add_tensor takes for raw blocks (``dtype`` uint8, ``shape`` (..., rows, row bytes),
    ``nbytes``), never materialised: ``tofile`` (called once, by write_tensors_to_file) writes the pool's bytes
    from ``start`` on, wrapping around at the pool's end (a whole number of blocks)."""

    pool: np.ndarray
    shape: tuple[int, ...]
    start: int
    dtype = np.dtype(np.uint8)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def tofile(self, f) -> None:
        view, pos, left = memoryview(self.pool), self.start, self.nbytes
        while left:
            n = min(left, self.pool.size - pos)
            f.write(view[pos:pos + n])
            left, pos = left - n, 0


# ---- vocabulary and metadata --------------------------------------------------------------------------------

def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order (what byte-level BPE tokens are made of)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def vocabulary(n: int) -> tuple[list[str], list[int], list[str]]:
    """``n`` tokens, their GGUF types and the merges: 256 byte characters, n - 258 merges (every two-character
    token before any three-character one, so each merge's parts are tokens), then BOS and EOS (CONTROL)."""
    chars, n_merges = byte_chars(), n - 258
    if not 0 <= n_merges <= 256 ** 2 * 257:
        raise ValueError(f"vocab size {n}: this writer makes 258 to {258 + 256 ** 2 * 257} tokens")
    pairs = ((a, b) for a in chars for b in chars)
    triples = ((a + b, c) for a in chars for b in chars for c in chars)
    merges = list(itertools.islice(itertools.chain(pairs, triples), n_merges))
    tokens = chars + [a + b for a, b in merges] + ["<|begin_of_text|>", "<|end_of_text|>"]
    types = [int(gguf.TokenType.NORMAL)] * (n - 2) + [int(gguf.TokenType.CONTROL)] * 2
    return tokens, types, [f"{a} {b}" for a, b in merges]


def add_metadata(w: gguf.GGUFWriter, args: ModelArgs, kind: str, label: str) -> None:
    """The {arch}.* keys llama.cpp's loader and ours read (model/arch/common.py gguf_decoder_args; a mixture's
    model/arch/moe.py gguf_expert_args), and the tokenizer."""
    w.add_name(label)
    w.add_file_type(int(FILE_TYPES[kind]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.head_dim)
    if args.head_dim * args.n_heads != args.dim:  # else llama.cpp and ours take dim / heads
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    if args.n_experts:
        w.add_expert_count(args.n_experts)
        w.add_expert_used_count(args.n_experts_used)
        if args.arch == "qwen3_moe":  # a llama GGUF's feed_forward_length is the expert's (Mixtral)
            w.add_expert_feed_forward_length(args.ffn_hidden)
    tokens, types, merges = vocabulary(args.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(args.vocab_size - 2)
    w.add_eos_token_id(args.vocab_size - 1)
    w.add_add_bos_token(True)


def rope_freqs(args: ModelArgs) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` tensor for Llama-3.1 scaling: each frequency's divisor (our reader checks it
    against model/transformer.py's scaling, which is what computes it here)."""
    if args.rope_scaling is None:
        return None
    from model.transformer import rope_frequencies

    plain = dataclasses.replace(args, rope_scaling=None)
    return (rope_frequencies(plain) / rope_frequencies(args)).numpy().astype(np.float32)


# ---- the file -----------------------------------------------------------------------------------------------

def tensor_plan(args: ModelArgs, kind: str) -> list[tuple[str, int | None, tuple[int, ...], Q]]:
    """(llama.cpp name, layer, shape, ggml type) of every matrix of a file of ``args`` and ``kind``."""
    if kind not in TYPES:
        raise ValueError(f"--type {kind!r}: expected one of {', '.join(TYPES)}")
    if args.arch not in GGUF_ARCH:
        raise ValueError(f"architecture {args.arch!r}: this writer writes {', '.join(GGUF_ARCH)} only")
    return [(name, layer, shape, tensor_type(kind, name, layer, shape[-1], args)) for name, layer, shape in
            matrices(args)]


def file_sizes(args: ModelArgs, kind: str) -> dict:
    """The matrices' bytes of a file of ``args`` and ``kind``, without writing it (the real model's, for a file
    cut to fewer layers): "n_layers", "step_bytes" (the bytes of the matrices a batch-1 decode step reads: all but
    token_embd, of which it reads one row; of a mixture's expert stacks the k / n a token routes to on average;
    the norms and rope_freqs, a few KB, left out), "token_embd_bytes", "output_bytes" (absent when tied), and per
    layer "layer_bytes" (its matrices but the expert stacks) and "expert_bytes" (its three stacks, every expert),
    with "n_experts" and "n_experts_used" (0 for a dense model)."""
    sizes: dict = {"layer_bytes": [0] * args.n_layers, "expert_bytes": [0] * args.n_layers}
    for name, layer, shape, t in tensor_plan(args, kind):
        if layer is None:
            sizes[f"{name}_bytes"] = tensor_bytes(shape, t)
        else:
            sizes["expert_bytes" if name in EXPERT_STACKS else "layer_bytes"][layer] += tensor_bytes(shape, t)
    share = args.n_experts_used / args.n_experts if args.n_experts else 0
    step = sizes.get("output_bytes", 0) + sum(sizes["layer_bytes"]) + round(share * sum(sizes["expert_bytes"]))
    return {"n_layers": args.n_layers, "step_bytes": step, "n_experts": args.n_experts,
            "n_experts_used": args.n_experts_used, **sizes}


def write_gguf(path: str | Path, args: ModelArgs, kind: str, seed: int = 0, label: str = "synthetic") -> dict:
    """Write the file; returns {"bytes": file size, "seconds": wall time, "data_seconds": the time of the tensor
    data alone (the rest is the pools' draws and the vocabulary's metadata, ~2 s), "types": {ggml type: count},
    and ``file_sizes``' keys}."""
    t0 = time.monotonic()
    plan = tensor_plan(args, kind)
    type_bytes: dict[Q, int] = {}
    for _, _, shape, t in plan:
        if t != Q.F32:
            type_bytes[t] = type_bytes.get(t, 0) + tensor_bytes(shape, t)
    rng, pool = np.random.default_rng(seed + 1), BlockPool(seed, type_bytes)
    w = gguf.GGUFWriter(str(path), GGUF_ARCH[args.arch])
    add_metadata(w, args, kind, label)
    counts: dict[str, int] = {}

    def norm(name: str, n: int = args.dim) -> None:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(n)).astype(np.float32))
        counts["F32"] = counts.get("F32", 0) + 1

    if (freqs := rope_freqs(args)) is not None:
        w.add_tensor("rope_freqs.weight", freqs)
    for name, layer, shape, t in plan:
        if name == "attn_q":
            norm(f"blk.{layer}.attn_norm.weight")
        if name in ("ffn_gate", ROUTER):
            norm(f"blk.{layer}.ffn_norm.weight")
        if t == Q.F32:  # the router: N(0, STD), as the matrices
            w.add_tensor(gguf_tensor_name(name, layer), (STD * rng.standard_normal(shape)).astype(np.float32))
        else:
            lazy = pool.tensor(t, shape)
            w.add_tensor(gguf_tensor_name(name, layer), lazy, raw_shape=lazy.shape,  # type: ignore[arg-type]
                         raw_dtype=t)
        counts[t.name] = counts.get(t.name, 0) + 1
        if name == "attn_output" and args.qk_norm:
            norm(f"blk.{layer}.attn_q_norm.weight", args.head_dim)
            norm(f"blk.{layer}.attn_k_norm.weight", args.head_dim)
    norm("output_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    t1 = time.monotonic()
    w.write_tensors_to_file()
    w.close()
    return {"bytes": Path(path).stat().st_size, "seconds": time.monotonic() - t0,
            "data_seconds": time.monotonic() - t1, "types": counts, **file_sizes(args, kind)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", required=True, choices=SYNTH_PRESETS, help="the shape (model/args.py PRESETS)")
    p.add_argument("--layers", type=int, help="number of layers (default: the preset's)")
    p.add_argument("--tiny", action="store_true", help="the preset's architecture at test size (dim 256, FFN 256, "
                                                       "vocab 512; its experts and top-k kept)")
    p.add_argument("--type", required=True, choices=TYPES, help="bf16, q8_0 or llama.cpp's Q4_K_M mix")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--info-json", help="also write what was written (write_gguf's answer) here, for "
                                       "benchmarks/peer_compare.py: reading it back from the GGUF takes seconds")
    a = p.parse_args(argv)
    if a.layers is not None and a.layers < 1:
        p.error(f"--layers must be at least 1, found {a.layers}")
    args = preset(a.preset, a.layers)
    if a.tiny:
        args = tiny_shape(args)
    label = f"synthetic {a.preset}{' tiny' if a.tiny else ''} x{args.n_layers} {a.type}"
    r = write_gguf(a.out, args, a.type, a.seed, label)
    if a.info_json:
        Path(a.info_json).write_text(json.dumps({"file": a.out, "preset": a.preset, "tiny": a.tiny, "type": a.type,
                                                 **r}))
    mix = ", ".join(f"{k} x{n}" for k, n in sorted(r["types"].items()))
    print(f"{a.out}: {label}, {r['bytes'] / 1e9:.2f} GB ({mix}) in {r['seconds']:.1f} s, tensor data at "
          f"{r['bytes'] / 1e6 / max(r['data_seconds'], 1e-9):.0f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
