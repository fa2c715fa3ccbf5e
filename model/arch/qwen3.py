"""Qwen3 (dense): the dense decoder with a per-head RMSNorm of q and k before the rotary embedding, no
biases, head_dim from the config (not dim / heads: Qwen3-32B has 64 heads of 128 over a 5120 model).
Hugging Face ``Qwen3ForCausalLM`` and llama.cpp's ``qwen3`` GGUFs (rotate-half q/k rows in both)."""

from __future__ import annotations

from model.arch.common import (
    DENSE_LAYER,
    EMBED_KIND,
    HEAD_KIND,
    check_window,
    gguf_decoder_args,
    hf_decoder_args,
    refuse_biases,
    sliding_window,
)
from model.arch.schema import Architecture


def _hf_args(c: dict, path: str) -> dict:
    refuse_biases(c, path, ("attention_bias",))
    return {**hf_decoder_args(c, path), "qk_norm": True, "sliding_window": sliding_window(c)}


def _gguf_args(gg, path: str) -> dict:
    return {**gguf_decoder_args(gg, path), "qk_norm": True}


ARCH = Architecture(
    name="qwen3", layer_kinds=DENSE_LAYER, embed=EMBED_KIND, head=HEAD_KIND,
    hf_classes=("Qwen3ForCausalLM",), hf_model_types=("qwen3",), hf_args=_hf_args,
    gguf_names=("qwen3",), gguf_args=_gguf_args, gguf_rope_half=True, check_run=check_window,
)
