"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (per-head q/k RMSNorm, head_dim from the config)
with every FFN a mixture of ``num_experts`` experts of ``moe_intermediate_size``, each token routed to the top
``num_experts_per_tok`` of softmax(gate x), renormalised where ``norm_topk_prob`` (the released models' configs).
Hugging Face ``Qwen3MoeForCausalLM`` and llama.cpp's ``qwen3moe`` GGUFs (rotate-half q/k rows in both; llama.cpp
always renormalises, unless the file says ``expert_weights_norm`` false)."""

from __future__ import annotations

from model.arch.common import (
    EMBED_KIND,
    HEAD_KIND,
    check_window,
    gguf_decoder_args,
    hf_decoder_args,
    refuse_biases,
    sliding_window,
)
from model.arch.moe import QWEN_EXPERT, attention_kind, expert_kind, gguf_expert_args, hf_expert_args
from model.arch.schema import Architecture


def _hf_args(c: dict, path: str) -> dict:
    refuse_biases(c, path, ("attention_bias",))
    return {**hf_decoder_args(c, path), "qk_norm": True, "sliding_window": sliding_window(c),
            "norm_topk_prob": bool(c.get("norm_topk_prob", False)),
            **hf_expert_args(c, path, "moe_intermediate_size", ("num_experts", "num_local_experts"))}


def _gguf_args(gg, path: str) -> dict:
    arch = gg.field("general.architecture")
    return {**gguf_decoder_args(gg, path), "qk_norm": True, **gguf_expert_args(gg, path, "expert_feed_forward_length"),
            "norm_topk_prob": bool(gg.field(f"{arch}.expert_weights_norm", True))}


ARCH = Architecture(
    name="qwen3_moe", layer_kinds=(attention_kind("mlp.gate.weight"), expert_kind(QWEN_EXPERT)),
    embed=EMBED_KIND, head=HEAD_KIND, hf_classes=("Qwen3MoeForCausalLM",), hf_model_types=("qwen3_moe",),
    hf_args=_hf_args, gguf_names=("qwen3moe",), gguf_args=_gguf_args, gguf_rope_half=True, check_run=check_window,
)
