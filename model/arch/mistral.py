"""Mistral (7B, Nemo, Small): Llama's layers with head_dim from the config (Nemo: 32 heads of 128 over a 5120
model) and, in the first models, a sliding attention window (``sliding_window`` 4096): a run whose context is
no longer than the window computes exactly what windowed attention does; a longer one is refused with the
numbers. Hugging Face ``MistralForCausalLM`` (its q/k rows permuted as Llama's are); llama.cpp converts
Mistral to ``llama`` GGUFs, which read as Llama."""

from __future__ import annotations

from model.arch.common import (
    DENSE_LAYER,
    EMBED_KIND,
    HEAD_KIND,
    check_window,
    hf_decoder_args,
    refuse_biases,
    sliding_window,
)
from model.arch.schema import Architecture


def _hf_args(c: dict, path: str) -> dict:
    refuse_biases(c, path)
    return {**hf_decoder_args(c, path), "sliding_window": sliding_window(c)}


ARCH = Architecture(
    name="mistral", layer_kinds=DENSE_LAYER, embed=EMBED_KIND, head=HEAD_KIND,
    hf_classes=("MistralForCausalLM",), hf_model_types=("mistral",), hf_args=_hf_args,
    check_run=check_window,
)
