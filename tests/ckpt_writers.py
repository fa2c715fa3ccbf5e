"""Writers of tiny random Llama checkpoints, and the transformers reference, for the checkpoint tests.

Not a test module: test files import these helpers.

  write_meta(dir, ...)   params.json + consolidated.NN.pth, split as Meta's model parallel does
  write_hf(dir, ...)     config.json (LlamaForCausalLM) + safetensors, single file or two shards + index
  write_gguf(path, ...)  a llama GGUF with f32 tensors (or any ggml type by tensor), llama.cpp names and a
                         minimal gpt2 tokenizer
  hf_reference_logits    log-softmax of transformers' LlamaForCausalLM on the same weights (fp32)

Every writer draws its weights from a seeded generator (matrices ~ N(0, 0.1^2), norms 1 + N(0, 0.1^2);
never zeros, so a tensor read from the wrong place or in the wrong row order changes the output) and
returns the full state dict under Meta's names and in Meta's q/k row layout, the expected result of
reading the checkpoint back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.args import ModelArgs, RopeScaling
from model.checkpoint import gguf_name, hf_name, permute_hf
from model.groups import global_names, group_tensor_shapes

# Shapes shared by every tiny checkpoint: head_dim 32 (many rotary frequencies), GQA with n_rep 2,
# ffn_hidden 448 from Meta's rule (int(1.3 * int(2 * 512 / 3)) = 443, rounded up to 64).
META_PARAMS: dict[str, Any] = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=64,
                                   ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
# Small original context (32), so that Llama-3.1 scaling changes logits on sequences of a few dozen tokens.
HF_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)

# Meta's model-parallel split dimension per tensor kind (Llama 3: VocabParallelEmbedding splits dim 0).
_COLUMN_PARALLEL = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight", "output.weight",
                    "tok_embeddings.weight")
_ROW_PARALLEL = ("wo.weight", "w2.weight")


# ---- random weights ----------------------------------------------------------------------------------

def random_state_dict(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Meta-named fp32 state dict: matrices ~ N(0, 0.1^2), 1-D norms 1 + N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for group, local, key in global_names(args):
        shape = group_tensor_shapes(args, group)[local]
        noise = torch.randn(shape, generator=gen) * 0.1
        sd[key] = noise + 1.0 if len(shape) == 1 else noise
    return sd


def tiny_args(vocab_size: int = 256, tie: bool = False, scaling: RopeScaling | None = HF_SCALING) -> ModelArgs:
    """The HF/GGUF test shape (the Meta shape of META_PARAMS, with an explicit ffn_hidden)."""
    base = ModelArgs.from_params(META_PARAMS)
    return ModelArgs(dim=base.dim, n_layers=base.n_layers, n_heads=base.n_heads, n_kv_heads=base.n_kv_heads,
                     vocab_size=vocab_size, ffn_hidden=base.ffn_hidden, norm_eps=base.norm_eps,
                     rope_theta=base.rope_theta, rope_scaling=scaling, tie_embeddings=tie, max_seq_len=256)


# ---- Meta --------------------------------------------------------------------------------------------

def shard_dim(key: str) -> int | None:
    """Dimension Meta's model parallel splits ``key`` along; None for replicated tensors (norms)."""
    if key.endswith(_ROW_PARALLEL):
        return 1
    if key.endswith(_COLUMN_PARALLEL):
        return 0
    return None


def write_meta(directory: str | Path, n_shards: int = 2, seed: int = 0,
               **param_overrides: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """params.json + consolidated.00.pth .. consolidated.{n_shards-1}.pth; returns (params, full state dict)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    params = {**META_PARAMS, **param_overrides}
    full = random_state_dict(ModelArgs.from_params(params), seed)
    (directory / "params.json").write_text(json.dumps(params, indent=2))
    for rank in range(n_shards):
        shard = {}
        for key, t in full.items():
            d = shard_dim(key)
            # clone: torch.save of a view would store the whole underlying tensor
            shard[key] = t.clone() if d is None else t.chunk(n_shards, dim=d)[rank].clone()
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    return params, full


# ---- Hugging Face ------------------------------------------------------------------------------------

def hf_config_dict(args: ModelArgs) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM equivalent to ``args`` (legacy ``rope_scaling`` key)."""
    c = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=args.dim,
             num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads,
             head_dim=args.head_dim, intermediate_size=args.ffn_hidden, vocab_size=args.vocab_size,
             rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_position_embeddings=args.max_seq_len,
             tie_word_embeddings=args.tie_embeddings, hidden_act="silu", attention_bias=False, mlp_bias=False,
             bos_token_id=0, eos_token_id=1)
    s = args.rope_scaling
    if s is not None:
        c["rope_scaling"] = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                                 high_freq_factor=s.high_freq_factor,
                                 original_max_position_embeddings=s.original_max_position_embeddings)
    return c


def to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Meta names and layout -> HF names, with HF's row permutation applied to wq/wk."""
    out = {}
    for key, t in sd.items():
        if key.endswith("attention.wq.weight"):
            t = permute_hf(t, args.n_heads)
        elif key.endswith("attention.wk.weight"):
            t = permute_hf(t, args.n_kv_heads)
        out[hf_name(key, args)] = t.contiguous()
    return out


def write_hf(directory: str | Path, sharded: bool = False, seed: int = 0, tie: bool = False,
             rope_scaling: bool = True) -> dict[str, torch.Tensor]:
    """config.json + model.safetensors (or two shards and an index); returns the Meta-layout state dict."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    args = tiny_args(tie=tie, scaling=HF_SCALING if rope_scaling else None)
    sd = random_state_dict(args, seed)
    (directory / "config.json").write_text(json.dumps(hf_config_dict(args), indent=2))
    hf = to_hf_state_dict(sd, args)
    if not sharded:
        save_file(hf, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return sd
    names = list(hf)
    halves = [names[:len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, half in enumerate(halves):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: hf[n] for n in half}, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(half, fname))
    total = sum(t.numel() * t.element_size() for t in hf.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return sd


# ---- GGUF --------------------------------------------------------------------------------------------

def _byte_level_chars() -> list[str]:
    """GPT-2's byte -> printable unicode character table, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def gguf_vocab() -> tuple[list[str], list[int], list[str]]:
    """Tokens (256 bytes, 4 merges, bos, eos), their llama.cpp types and the merges: 262 tokens."""
    merges = ["Ġ t", "Ġ a", "h e", "i n"]
    tokens = _byte_level_chars() + [m.replace(" ", "") for m in merges] + ["<|begin_of_text|>", "<|end_of_text|>"]
    types = [1] * (len(tokens) - 2) + [3, 3]  # NORMAL, then CONTROL for bos/eos
    return tokens, types, merges


# byte offsets of the fp16 fields (scales, minima) of a ggml block, by type
_FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
                "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,), "Q2_K": (80, 82)}


def random_blocks(type_name: str, shape: tuple[int, int], seed: int, std: float = 0.1) -> np.ndarray:
    """Random ggml blocks of ``type_name`` for a (rows, cols) matrix, as a (rows, row bytes) uint8 array: random
    quantized values and sub-scales, the fp16 fields one common value chosen so the weights' std is ``std``."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    gen = np.random.default_rng(seed)
    raw = gen.integers(0, 256, (shape[0], shape[1] // bs * ts), dtype=np.uint8)
    blocks = raw.reshape(-1, ts)

    def set_fields(v: float) -> None:
        for off in _FP16_FIELDS[type_name]:
            blocks[:, off:off + 2] = np.full(len(blocks), v, dtype=np.float16).view(np.uint8).reshape(-1, 2)

    set_fields(1.0)
    set_fields(std / float(gguf.quants.dequantize(raw, qtype).std()))  # the weights are linear in the fields
    return raw


def write_gguf(path: str | Path, seed: int = 0, arch: str = "llama", args: ModelArgs | None = None,
               types: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """A tiny GGUF as llama.cpp writes one (q/k rows in Meta's order); returns the Meta state dict: what the
    file dequantizes to. ``args``: the shapes (tiny_args' by default, its vocabulary always gguf_vocab's);
    ``types``: ggml type names by state-dict key (default F32): random blocks of that type."""
    import dataclasses

    import gguf

    tokens, types_, merges = gguf_vocab()
    args = dataclasses.replace(args or tiny_args(scaling=None), vocab_size=len(tokens))
    sd = random_state_dict(args, seed)
    stored = {}
    for i, (key, name) in enumerate(sorted((types or {}).items())):
        raw = random_blocks(name, tuple(sd[key].shape), seed * 1000 + i)
        qtype = gguf.GGMLQuantizationType[name]
        stored[key] = (raw, qtype)
        sd[key] = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(args.n_layers)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.ffn_hidden)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_context_length(args.max_seq_len)
    w.add_vocab_size(args.vocab_size)
    w.add_rope_dimension_count(args.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types_)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    for key, t in sd.items():
        if key in stored:
            raw, qtype = stored[key]
            w.add_tensor(gguf_name(key, args), raw, raw_shape=raw.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(key, args), t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sd


# ---- the reference -----------------------------------------------------------------------------------

def hf_reference_logits(config_or_args: Any, meta_state_dict: dict[str, torch.Tensor],
                        tokens: torch.Tensor) -> torch.Tensor:
    """Log-softmax (B, S, vocab) of transformers' LlamaForCausalLM (fp32, eager) on Meta-layout weights.

    ``config_or_args`` is a ModelArgs (converted with hf_config_dict, llama3 rope_scaling where set) or a
    transformers LlamaConfig.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if isinstance(config_or_args, ModelArgs):
        config = LlamaConfig(**hf_config_dict(config_or_args))
        args = config_or_args
    else:
        config = config_or_args
        args = ModelArgs(dim=config.hidden_size, n_layers=config.num_hidden_layers,
                         n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
                         vocab_size=config.vocab_size, ffn_hidden=config.intermediate_size)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).float().eval()
    hf = to_hf_state_dict(meta_state_dict, args)
    missing, unexpected = model.load_state_dict(hf, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert not unexpected and set(missing) <= allowed, (missing, unexpected)
    with torch.no_grad():
        return model(tokens).logits.float().log_softmax(-1)
