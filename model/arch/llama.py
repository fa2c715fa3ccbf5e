"""Llama (1, 2, 3.x): the dense decoder of model/arch/common.py without biases, rotary q/k rows in Meta's order.
Read from Meta's params.json + consolidated.*.pth, Hugging Face ``LlamaForCausalLM`` and llama.cpp's ``llama``
GGUFs (which Mistral's GGUFs are too: llama.cpp converts Mistral as ``llama``)."""

from __future__ import annotations

from model.arch.common import (
    DENSE_LAYER,
    EMBED_KIND,
    HEAD_KIND,
    gguf_decoder_args,
    hf_decoder_args,
    refuse_biases,
)
from model.arch.schema import Architecture


def _hf_args(c: dict, path: str) -> dict:
    refuse_biases(c, path)
    return hf_decoder_args(c, path)


ARCH = Architecture(
    name="llama", layer_kinds=DENSE_LAYER, embed=EMBED_KIND, head=HEAD_KIND,
    hf_classes=("LlamaForCausalLM",), hf_model_types=("llama",), hf_args=_hf_args,
    gguf_names=("llama",), gguf_args=gguf_decoder_args,
)
