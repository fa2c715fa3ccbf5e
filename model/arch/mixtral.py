"""Mixtral (8x7B, 8x22B): Mistral's attention (head_dim from the config, a sliding window where the config has
one) with every FFN a mixture of ``num_local_experts`` experts, each token routed to the top
``num_experts_per_tok`` (2) of softmax(gate x), their weights renormalised to sum to 1. Hugging Face
``MixtralForCausalLM`` (``block_sparse_moe.experts.{e}.w1`` per expert); llama.cpp converts Mixtral to ``llama``
GGUFs with ``llama.expert_count`` set and the experts stacked (model/arch/moe.py), read here, not as Llama."""

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
from model.arch.moe import attention_kind, expert_kind, gguf_expert_args, hf_expert_args
from model.arch.schema import Architecture


def _hf_args(c: dict, path: str) -> dict:
    refuse_biases(c, path)
    return {**hf_decoder_args(c, path), "sliding_window": sliding_window(c), "norm_topk_prob": True,
            **hf_expert_args(c, path, "intermediate_size", ("num_local_experts", "num_experts"))}


def _gguf_args(gg, path: str) -> dict:
    return {**gguf_decoder_args(gg, path), **gguf_expert_args(gg, path, None), "norm_topk_prob": True}


ARCH = Architecture(
    name="mixtral",
    layer_kinds=(attention_kind("block_sparse_moe.gate.weight"),
                 expert_kind({w: f"block_sparse_moe.experts.{{e}}.{w}.weight" for w in ("w1", "w2", "w3")})),
    embed=EMBED_KIND, head=HEAD_KIND, hf_classes=("MixtralForCausalLM",), hf_model_types=("mixtral",),
    hf_args=_hf_args, gguf_names=("llama",), gguf_args=_gguf_args, check_run=check_window,
)
