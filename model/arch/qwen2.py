"""Qwen2 / Qwen2.5: the dense decoder with q/k/v biases (no output-projection bias), tied or untied
embeddings. Hugging Face ``Qwen2ForCausalLM`` and llama.cpp's ``qwen2`` GGUFs (rotate-half q/k rows in both)."""

from __future__ import annotations

from model.arch.common import (
    DENSE_LAYER,
    EMBED_KIND,
    HEAD_KIND,
    check_window,
    gguf_decoder_args,
    hf_decoder_args,
    sliding_window,
)
from model.arch.schema import Architecture


def _hf_args(c: dict, path: str) -> dict:
    return {**hf_decoder_args(c, path), "qkv_bias": True, "sliding_window": sliding_window(c)}


def _gguf_args(gg, path: str) -> dict:
    return {**gguf_decoder_args(gg, path), "qkv_bias": True}


ARCH = Architecture(
    name="qwen2", layer_kinds=DENSE_LAYER, embed=EMBED_KIND, head=HEAD_KIND,
    hf_classes=("Qwen2ForCausalLM",), hf_model_types=("qwen2",), hf_args=_hf_args,
    gguf_names=("qwen2",), gguf_args=_gguf_args, gguf_rope_half=True, check_run=check_window,
)
