"""The dense decoder the registry's architectures share (torch-free): Llama's groups, with the tensors that
Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm) add, present only where the model arguments say so;
and the parts of reading a config.json or a GGUF's metadata that every such architecture shares.

    tok_embeddings          tok_embeddings.weight                                   (vocab, dim)
    layers.{i}.attention    attention.{wq,wk,wv,wo}.weight, attention_norm.weight,
                            [attention.{wq,wk,wv}.bias]  (qkv_bias), [attention.{q,k}_norm.weight]  (qk_norm)
    layers.{i}.feed_forward feed_forward.{w1,w2,w3}.weight, ffn_norm.weight        (w1, w3: gate, up; w2: down)
    head                    norm.weight, [output.weight]  (absent when tied to the embedding)

The optional tensors follow Llama's in each group, so a Llama image's layout is what it always was.
"""

from __future__ import annotations

from typing import Any

from model.arch.schema import (
    COLS,
    EMBEDDING,
    MATRIX,
    OUTPUT,
    ROWS,
    VECTOR,
    VOCAB,
    WHOLE,
    GroupKind,
    TensorDef,
)
from model.errors import ConfigError


def _q_rows(a):
    return a.n_heads * a.head_dim


def _kv_rows(a):
    return a.n_kv_heads * a.head_dim


def _bias(a) -> bool:
    return a.qkv_bias


def _qk_norm(a) -> bool:
    return a.qk_norm


ATTENTION = GroupKind("attention", "attn", forward="attention", gpu_rank=1, tensors=(
    TensorDef("attention.wq.weight", lambda a: (_q_rows(a), a.dim), MATRIX, ROWS, "self_attn.q_proj.weight",
              "attn_q.weight", rope="q"),
    TensorDef("attention.wk.weight", lambda a: (_kv_rows(a), a.dim), MATRIX, ROWS, "self_attn.k_proj.weight",
              "attn_k.weight", rope="k"),
    TensorDef("attention.wv.weight", lambda a: (_kv_rows(a), a.dim), MATRIX, ROWS, "self_attn.v_proj.weight",
              "attn_v.weight"),
    TensorDef("attention.wo.weight", lambda a: (a.dim, _q_rows(a)), MATRIX, COLS, "self_attn.o_proj.weight",
              "attn_output.weight"),
    TensorDef("attention_norm.weight", lambda a: (a.dim,), VECTOR, WHOLE, "input_layernorm.weight",
              "attn_norm.weight"),
    TensorDef("attention.wq.bias", lambda a: (_q_rows(a),), VECTOR, ROWS, "self_attn.q_proj.bias", "attn_q.bias",
              rope="q", when=_bias),
    TensorDef("attention.wk.bias", lambda a: (_kv_rows(a),), VECTOR, ROWS, "self_attn.k_proj.bias", "attn_k.bias",
              rope="k", when=_bias),
    TensorDef("attention.wv.bias", lambda a: (_kv_rows(a),), VECTOR, ROWS, "self_attn.v_proj.bias", "attn_v.bias",
              when=_bias),
    TensorDef("attention.q_norm.weight", lambda a: (a.head_dim,), VECTOR, WHOLE, "self_attn.q_norm.weight",
              "attn_q_norm.weight", rope="head", when=_qk_norm),
    TensorDef("attention.k_norm.weight", lambda a: (a.head_dim,), VECTOR, WHOLE, "self_attn.k_norm.weight",
              "attn_k_norm.weight", rope="head", when=_qk_norm),
))

FEED_FORWARD = GroupKind("feed_forward", "ffn", forward="ffn", gpu_rank=0, stateless=True, tensors=(
    TensorDef("feed_forward.w1.weight", lambda a: (a.ffn_hidden, a.dim), MATRIX, ROWS, "mlp.gate_proj.weight",
              "ffn_gate.weight"),
    TensorDef("feed_forward.w2.weight", lambda a: (a.dim, a.ffn_hidden), MATRIX, COLS, "mlp.down_proj.weight",
              "ffn_down.weight"),
    TensorDef("feed_forward.w3.weight", lambda a: (a.ffn_hidden, a.dim), MATRIX, ROWS, "mlp.up_proj.weight",
              "ffn_up.weight"),
    TensorDef("ffn_norm.weight", lambda a: (a.dim,), VECTOR, WHOLE, "post_attention_layernorm.weight",
              "ffn_norm.weight"),
))

EMBED_KIND = GroupKind("tok_embeddings", "embedding", tensors=(
    TensorDef("tok_embeddings.weight", lambda a: (a.vocab_size, a.dim), EMBEDDING, VOCAB, "model.embed_tokens.weight",
              "token_embd.weight"),
))

HEAD_KIND = GroupKind("head", "head", tensors=(
    TensorDef("norm.weight", lambda a: (a.dim,), VECTOR, WHOLE, "model.norm.weight", "output_norm.weight"),
    TensorDef("output.weight", lambda a: (a.vocab_size, a.dim), OUTPUT, VOCAB, "lm_head.weight", "output.weight",
              when=lambda a: not a.tie_embeddings),
))

DENSE_LAYER = (ATTENTION, FEED_FORWARD)


# ---- config.json ---------------------------------------------------------------------------------------------

def hf_decoder_args(c: dict, path: str) -> dict[str, Any]:
    """The ModelArgs keywords a Llama-shaped config.json gives (transformers' key names; a rope scaling as the
    dict of RopeScaling's fields, which ModelArgs turns into one: model/args.py imports this package)."""
    if c.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act must be 'silu', found {c.get('hidden_act')!r}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if key not in c:
            raise ConfigError(f"{path}: missing key {key!r}")
    scaling = None
    rs = c.get("rope_scaling") or c.get("rope_parameters")  # transformers >= 5 saves rope_parameters
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        if kind == "llama3":
            try:
                scaling = dict(factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                               high_freq_factor=float(rs["high_freq_factor"]),
                               original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
            except KeyError as e:
                raise ConfigError(f"{path}: rope_scaling of type llama3 lacks {e.args[0]!r}") from None
        elif kind not in ("default", None):
            raise ConfigError(f"{path}: rope_scaling type {kind!r} is not supported (llama3 or none)")
    theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return dict(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                n_kv_heads=c.get("num_key_value_heads"), head_dim=c.get("head_dim"), vocab_size=c["vocab_size"],
                ffn_hidden=c["intermediate_size"], norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta), rope_scaling=scaling,
                tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                max_seq_len=int(c.get("max_position_embeddings", 8192)))


def refuse_biases(c: dict, path: str, keys: tuple[str, ...] = ("attention_bias", "mlp_bias")) -> None:
    for key in keys:
        if c.get(key):
            raise ConfigError(f"{path}: {key}=true is a layout this architecture's reader does not support")


def sliding_window(c: dict) -> int | None:
    """The window a config attends within, or None: Mistral's ``sliding_window`` (null in its later models);
    Qwen's only where ``use_sliding_window`` is set (its configs carry a window they do not use)."""
    if "use_sliding_window" in c and not c["use_sliding_window"]:
        return None
    w = c.get("sliding_window")
    return int(w) if w else None


def check_window(args, n: int, flag: str) -> None:
    """A model that attends within a sliding window of W tokens computes what full attention does as long as
    no sequence is longer than W; a longer context is refused, with the numbers (no windowed attention here)."""
    w = args.sliding_window
    if w is not None and n > w:
        raise ConfigError(f"{flag} {n}: this {args.arch} model attends within a sliding window of {w} tokens, "
                          f"which this runtime computes exactly only for contexts up to {w} tokens; give {flag} "
                          f"{w} or less")


# ---- GGUF metadata ---------------------------------------------------------------------------------------------

def gguf_decoder_args(gg, path: str) -> dict[str, Any]:
    """The ModelArgs keywords of a Llama-shaped GGUF: ``gg`` is model/checkpoint.py's GGUFCheckpoint (``field``,
    ``tensors``), its keys prefixed with the file's architecture as llama.cpp writes them."""
    from model.errors import CheckpointError

    arch = gg.field("general.architecture")

    def need(k: str) -> Any:
        v = gg.field(f"{arch}.{k}")
        if v is None:
            raise CheckpointError(f"{path}: GGUF metadata key {arch}.{k} missing")
        return v

    scaling_type = gg.field(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise CheckpointError(f"{path}: rope scaling type {scaling_type!r} is not supported")
    n_heads, dim = int(need("attention.head_count")), int(need("embedding_length"))
    head_dim = int(gg.field(f"{arch}.attention.key_length", dim // n_heads))
    rope_dims = int(gg.field(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise CheckpointError(f"{path}: partial rotary embeddings (rope.dimension_count {rope_dims} < head_dim "
                              f"{head_dim}) are not supported")
    vocab = gg.field(f"{arch}.vocab_size") or len(gg.field("tokenizer.ggml.tokens") or ())
    return dict(dim=dim, n_layers=int(need("block_count")), n_heads=n_heads,
                n_kv_heads=int(gg.field(f"{arch}.attention.head_count_kv", n_heads)), head_dim=head_dim,
                vocab_size=int(vocab), ffn_hidden=int(need("feed_forward_length")),
                norm_eps=float(need("attention.layer_norm_rms_epsilon")),
                rope_theta=float(gg.field(f"{arch}.rope.freq_base", 10000.0)),
                tie_embeddings="output.weight" not in gg.tensors,
                max_seq_len=int(gg.field(f"{arch}.context_length", 8192)))
