"""What an architecture declares: its weight groups, their tensors, and how checkpoints name them (torch-free,
so the pool's processes can import it cheaply).

A model is a sequence of *groups*, the unit the runtime stores, streams and binds: the embedding (``EMBED``),
per layer one group of each of the architecture's layer kinds in order (``layers.{i}.{kind}``), and the head
(``HEAD``: final norm and output matrix). A *repeated* kind (``GroupKind.count``: a mixture of experts' expert)
is ``count(args)`` groups per layer, ``layers.{i}.{kind}.{e}`` for e in order, whose tensors have the same local
names in every one (their state-dict keys are the group's name, a dot and the local name); its Hugging Face
names hold ``{e}`` (the Hub stores one tensor per expert), and llama.cpp's GGUFs stack the ``count`` tensors of
one local name into one along a new first dimension (``ffn_gate_exps``), which readers split per expert.
A ``GroupKind`` lists its tensors; a ``TensorDef`` gives one tensor's *local name* (its state-dict key without
the group's prefix, Meta's names: ``attention.wq.weight``), its shape
from the model arguments, when it is present (a bias, a q/k norm, an untied output matrix), its role (what
quantizers and placement may do with it), its tensor-parallel split and its names in Hugging Face and GGUF
checkpoints. Everything outside model/ reads group kinds and tensor lists from here, never from literals.

Rotary layout: every image holds q/k rows (and their biases and per-head norms) in Meta's interleaved (re, im)
order. Hugging Face checkpoints hold them in rotate-half order (Llama's were permuted into it by the
conversion, Qwen's were trained in it); so do llama.cpp's GGUFs of rotate-half architectures (``qwen2``,
``qwen3``: ``Architecture.gguf_rope_half``), while its ``llama`` GGUFs are already interleaved. ``TensorDef.rope``
says which rows move (model/checkpoint.py ``unpermute_hf``): attention is invariant under one permutation of
the q and k features within a head, so both layouts compute the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.args import ModelArgs

EMBED, HEAD = "tok_embeddings", "head"  # the two groups every architecture has, first and last
LAYER_PREFIX = "layers."

# tensor-parallel splits (model/shards.py): output features (rows), input features (columns), the vocabulary's
# rows, or whole on every rank
ROWS, COLS, VOCAB, WHOLE = "rows", "cols", "vocab", "whole"
# roles: a layer matrix (``pack --quantize`` quantizes these), the embedding table, the output matrix
# (``--quantize-output``), a 1-D vector (norms, biases: always in the image's dtype), a router's matrix (a
# mixture of experts' gate: small, and its rounding would move tokens to other experts, so kept in the image's
# dtype as llama.cpp keeps ``ffn_gate_inp``)
MATRIX, EMBEDDING, OUTPUT, VECTOR, ROUTER = "matrix", "embedding", "output", "vector", "router"


def _always(args: ModelArgs) -> bool:
    return True


@dataclass(frozen=True)
class TensorDef:
    name: str  # local name, Meta's: "attention.wq.weight"
    shape: Callable[[ModelArgs], tuple[int, ...]]
    role: str  # MATRIX, EMBEDDING, OUTPUT or VECTOR
    split: str  # ROWS, COLS, VOCAB or WHOLE
    hf: str  # Hugging Face name: relative to "model.layers.{i}." for layer tensors, else the full name
    gguf: str  # llama.cpp's name: relative to "blk.{i}." for layer tensors, else the full name
    rope: str | None = None  # "q" / "k": rows grouped by query / KV head in rotary order; "head": one head's
    when: Callable[[ModelArgs], bool] = _always  # present for these arguments only


@dataclass(frozen=True)
class GroupKind:
    name: str  # "attention": layer groups are named "layers.{i}.attention"
    label: str  # short name in plans and tables: "attn"
    tensors: tuple[TensorDef, ...]
    forward: str = ""  # a layer kind's group function, by its name in model/passes.py's FORWARDS
    gpu_rank: int = 2  # the GPU tier takes kinds of lower rank first (runtime/engine/placement.py)
    count: Callable[[ModelArgs], int] | None = None  # a repeated kind: this many groups per layer (experts)
    # Its forward maps h to h from its own weights alone: no KV cache, no state of the pass (a routing), so the
    # CPU can compute it where its weights lie in DRAM while the link copies other groups (issue 28's split).
    stateless: bool = False

    def present(self, args: ModelArgs) -> tuple[TensorDef, ...]:
        return tuple(t for t in self.tensors if t.when(args))


@dataclass(frozen=True)
class Architecture:
    """One architecture of the registry (model/arch/__init__.py). ``hf_args`` / ``gguf_args`` turn a
    config.json / a GGUF's metadata into ``ModelArgs`` keywords (model/arch/common.py has the shared parts);
    each layer kind names its group function (``GroupKind.forward``: model/passes.py, which imports this
    package, never the other way). The chat template is not the architecture's: every family's checkpoint ships
    its own (tokenizer_config.json, a GGUF's tokenizer.chat_template), rendered by model/chat.py, with a
    hand-written fallback chosen by the vocabulary's tokens where it ships none."""

    name: str
    layer_kinds: tuple[GroupKind, ...]
    embed: GroupKind
    head: GroupKind
    hf_classes: tuple[str, ...]  # config.json "architectures" entries read as this architecture
    hf_model_types: tuple[str, ...]  # config.json "model_type" values read as this architecture
    hf_args: Callable[[dict, str], dict[str, Any]]
    gguf_names: tuple[str, ...] = ()  # GGUF general.architecture values read as this architecture
    gguf_args: Callable[[Any, str], dict[str, Any]] | None = None
    gguf_rope_half: bool = False  # llama.cpp's converter keeps HF's rotate-half q/k rows (not Meta's)
    check_run: Callable[[ModelArgs, int, str], None] | None = None  # refuses a context it cannot compute exactly
    kinds: dict[str, GroupKind] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        kinds = {k.name: k for k in (self.embed, *self.layer_kinds, self.head)}
        object.__setattr__(self, "kinds", kinds)

    @property
    def routed(self) -> bool:
        """A mixture of experts: some layer kind is repeated per expert, and a router picks which run per token
        (the pass reads the router's choice on the host once per layer: no CUDA graph captures it)."""
        return any(k.count is not None for k in self.layer_kinds)
