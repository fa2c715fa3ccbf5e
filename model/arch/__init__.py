"""The architecture registry: every model family the runtime computes, each a module of model/arch/ that
declares an ``Architecture`` (model/arch/schema.py): its arguments (from config.json, GGUF metadata, Meta's
params.json), its weight groups and their tensors, the group forwards, its checkpoint names and its
tensor-parallel split. Torch-free: the pool's processes import it.

    python -c "from model.arch import ARCHITECTURES; print(sorted(ARCHITECTURES))"

A model's ``ModelArgs.arch`` names its architecture; ``architecture(args)`` returns it. Readers find theirs with
``for_hf_config`` and ``for_gguf``, which refuse an unknown one with one line naming it and the supported list
(and, for the mixtures of experts we do not compute, DeepSeek's and gpt-oss's, what they need that is missing).
"""

from __future__ import annotations

from model.arch import llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe
from model.arch.moe import UNSUPPORTED
from model.arch.schema import EMBED, HEAD, LAYER_PREFIX, Architecture, GroupKind, TensorDef
from model.errors import ConfigError

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (llama.ARCH, qwen2.ARCH, qwen3.ARCH, mistral.ARCH,
                                                               mixtral.ARCH, qwen2_moe.ARCH, qwen3_moe.ARCH)}

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
    why = next((f" ({UNSUPPORTED[c]} are not implemented)" for c in classes if c in UNSUPPORTED), "")
    raise ConfigError(f"{path}: architecture {classes or c.get('model_type')!r} is not supported{why}; supported: "
                      f"{', '.join(supported_hf())}")


def for_gguf(name: str | None, path: str, routed: bool = False) -> Architecture:
    """The architecture of a GGUF's ``general.architecture``; ``routed``: the file has experts (its
    ``{arch}.expert_count``), which tells Mixtral from Llama (llama.cpp writes both as ``llama``)."""
    for a in ARCHITECTURES.values():
        if name in a.gguf_names and a.routed == routed:
            return a
    if any(name in a.gguf_names for a in ARCHITECTURES.values()):
        have = "with" if routed else "without"
        raise ConfigError(f"{path}: a GGUF of architecture {name!r} {have} {name}.expert_count is not supported")
    names = list(dict.fromkeys(n for a in ARCHITECTURES.values() for n in a.gguf_names))  # Mixtral's is llama
    why = f" ({UNSUPPORTED[name]} are not implemented)" if name in UNSUPPORTED else ""
    raise ConfigError(f"{path}: GGUF architecture {name!r} is not supported{why}; supported: {', '.join(names)}")
