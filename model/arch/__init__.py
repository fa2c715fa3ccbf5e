"""The architecture registry: every model family the runtime computes, each a module of model/arch/ that
declares an ``Architecture`` (model/arch/schema.py): its arguments (from config.json, GGUF metadata, Meta's
params.json), its weight groups and their tensors, the group forwards, its checkpoint names and its
tensor-parallel split. Torch-free: the pool's processes import it.

    python -c "from model.arch import ARCHITECTURES; print(sorted(ARCHITECTURES))"

A model's ``ModelArgs.arch`` names its architecture; ``architecture(args)`` returns it. Readers find theirs with
``for_hf_config`` and ``for_gguf``, which refuse an unknown one with one line naming it and the supported list.
"""

from __future__ import annotations

from model.arch import llama, mistral, qwen2, qwen3
from model.arch.schema import EMBED, HEAD, LAYER_PREFIX, Architecture, GroupKind, TensorDef
from model.errors import ConfigError

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (llama.ARCH, qwen2.ARCH, qwen3.ARCH, mistral.ARCH)}

__all__ = ["ARCHITECTURES", "EMBED", "HEAD", "LAYER_PREFIX", "Architecture", "GroupKind", "TensorDef", "architecture",
           "for_gguf", "for_hf_config", "get"]


def get(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(f"architecture {name!r} is not supported; supported: {', '.join(ARCHITECTURES)}") from None


def architecture(args) -> Architecture:
    """The architecture of model arguments ``args`` (``args.arch``)."""
    return get(args.arch)


def supported_hf() -> list[str]:
    return [c for a in ARCHITECTURES.values() for c in a.hf_classes]


def for_hf_config(c: dict, path: str) -> Architecture:
    """The architecture a config.json names (its "architectures", else its "model_type"); one line naming it and
    every supported class otherwise."""
    classes = c.get("architectures") or []
    for a in ARCHITECTURES.values():
        if set(classes) & set(a.hf_classes) or (not classes and c.get("model_type") in a.hf_model_types):
            return a
    raise ConfigError(f"{path}: architecture {classes or c.get('model_type')!r} is not supported; supported: "
                      f"{', '.join(supported_hf())}")


def for_gguf(name: str | None, path: str) -> Architecture:
    for a in ARCHITECTURES.values():
        if name in a.gguf_names:
            return a
    names = [n for a in ARCHITECTURES.values() for n in a.gguf_names]
    raise ConfigError(f"{path}: GGUF architecture {name!r} is not supported; supported: {', '.join(names)}")
