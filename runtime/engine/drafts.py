"""A speculative run's draft, checked before any work starts (torch-free): the draft image of ``--draft``,
that its tokenizer is its target's, and the GPU memory it takes, which the target's plan reserves first
(runtime/engine/source.py). The drafts themselves are runtime/engine/speculative.py's."""

from __future__ import annotations

from pathlib import Path

from model.errors import ConfigError
from runtime.engine.batching import activation_bytes, kv_cache_bytes
from runtime.format.image import Image
from runtime.format.tokens import image_tokenizer


def open_draft_image(draft: str, target: Image) -> Image:
    """--draft IMAGE: the image, verified to read, with its target's vocabulary (its embedding's rows and,
    when both have one, its tokenizer's every token)."""
    if not Path(draft).exists():
        raise ConfigError(f"--draft {draft}: no such image (give a packed image, or ngram for prompt lookup)")
    image = Image.open(draft)
    a, b = image.args.vocab_size, target.args.vocab_size
    if a != b:
        raise ConfigError(f"--draft {draft}: its vocabulary has {a} tokens, the target {target.path}'s {b}: a draft "
                          f"must share its target's tokenizer")
    dt, tt = image_tokenizer(image, required=False), image_tokenizer(target, required=False)
    if dt is not None and tt is not None and dt.vocabulary_digest() != tt.vocabulary_digest():
        raise ConfigError(f"--draft {draft}: its tokenizer (vocabulary {dt.vocabulary_digest()}, {dt.vocab_size} "
                          f"tokens) is not the target {target.path}'s (vocabulary {tt.vocabulary_digest()}, "
                          f"{tt.vocab_size} tokens)")
    return image


def draft_gpu_bytes(draft: Image, max_len: int, chunk: int) -> int:
    """What a model draft holds on the GPU: its weights as stored (quantized ones stay so), its KV cache for
    ``max_len`` slots and one chunk's activations (it prefills the prompt too)."""
    weights = sum(g.size for g in draft.groups.values())
    return weights + kv_cache_bytes(draft, 1, max_len) + activation_bytes(draft, 1, min(chunk, max_len))
