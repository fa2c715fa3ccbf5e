"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2's attention (q/k/v biases) with every FFN a mixture of
``num_experts`` experts of ``moe_intermediate_size`` (top ``num_experts_per_tok`` of softmax(gate x), renormalised
only where ``norm_topk_prob``) plus a shared expert of ``shared_expert_intermediate_size`` that every token runs,
scaled by sigmoid(shared_expert_gate x). Hugging Face ``Qwen2MoeForCausalLM`` and llama.cpp's ``qwen2moe`` GGUFs
(rotate-half q/k rows in both; ``*_shexp`` tensors for the shared expert)."""

from __future__ import annotations

from model.arch.common import EMBED_KIND, HEAD_KIND, check_window, gguf_decoder_args, hf_decoder_args, sliding_window
from model.arch.moe import QWEN_EXPERT, SHARED_EXPERT, attention_kind, expert_kind, gguf_expert_args, hf_expert_args
from model.arch.schema import Architecture
from model.errors import ConfigError


def _hf_args(c: dict, path: str) -> dict:
    shared = c.get("shared_expert_intermediate_size")
    if not isinstance(shared, int) or shared < 1:
        raise ConfigError(f"{path}: shared_expert_intermediate_size must be a positive integer, found {shared!r}")
    return {**hf_decoder_args(c, path), "qkv_bias": bool(c.get("qkv_bias", True)), "sliding_window": sliding_window(c),
            "norm_topk_prob": bool(c.get("norm_topk_prob", False)), "shared_ffn_hidden": shared,
            **hf_expert_args(c, path, "moe_intermediate_size", ("num_experts", "num_local_experts"))}


def _gguf_args(gg, path: str) -> dict:
    from model.errors import CheckpointError

    arch = gg.field("general.architecture")
    shared = gg.field(f"{arch}.expert_shared_feed_forward_length")
    if shared is None:
        raise CheckpointError(f"{path}: GGUF metadata key {arch}.expert_shared_feed_forward_length missing")
    return {**gguf_decoder_args(gg, path), "qkv_bias": True, "shared_ffn_hidden": int(shared),
            **gguf_expert_args(gg, path, "expert_feed_forward_length"),
            "norm_topk_prob": bool(gg.field(f"{arch}.expert_weights_norm", False))}


ARCH = Architecture(
    name="qwen2_moe", layer_kinds=(attention_kind("mlp.gate.weight"), expert_kind(QWEN_EXPERT), SHARED_EXPERT),
    embed=EMBED_KIND, head=HEAD_KIND, hf_classes=("Qwen2MoeForCausalLM",), hf_model_types=("qwen2_moe",),
    hf_args=_hf_args, gguf_names=("qwen2moe",), gguf_args=_gguf_args, gguf_rope_half=True, check_run=check_window,
)
