"""Weight groups of a model: names, kinds, tensor lists, shapes and state-dict keys, read from its architecture's
schema (model/arch/). No torch here, so the pool's processes can import it cheaply; model/transformer.py computes
with the groups. A group is named ``tok_embeddings`` (``EMBED``), ``layers.{i}.{kind}`` for each layer kind of the
architecture in order (``layers.{i}.{kind}.{e}`` for each of a repeated kind's groups: a mixture's experts), or
``head`` (``HEAD``); its tensors have local names (the state-dict key without the group's prefix: ``layers.{i}.``,
or a repeated kind's whole group name and a dot, ``layers.{i}.expert.{e}.``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from model.arch import EMBED, HEAD, LAYER_PREFIX, architecture
from model.arch.schema import EMBEDDING, OUTPUT, GroupKind, TensorDef
from model.errors import ConfigError

if TYPE_CHECKING:
    from model.args import ModelArgs  # which imports this module (group_params)


def layer_group(layer: int, kind: str, index: int | None = None) -> str:
    """The name of layer ``layer``'s group of ``kind`` (of a repeated kind: its group ``index``)."""
    return f"{LAYER_PREFIX}{layer}.{kind}" if index is None else f"{LAYER_PREFIX}{layer}.{kind}.{index}"


def kind_count(args: ModelArgs, kind: GroupKind) -> int:
    """How many groups of ``kind`` each layer has: one, or a repeated kind's count (its experts)."""
    return 1 if kind.count is None else kind.count(args)


def kind_groups(args: ModelArgs, layer: int, kind: GroupKind) -> tuple[str, ...]:
    """Layer ``layer``'s groups of ``kind``, in pass order."""
    if kind.count is None:
        return (layer_group(layer, kind.name),)
    return tuple(layer_group(layer, kind.name, e) for e in range(kind.count(args)))


def layer_groups(args: ModelArgs, layers: Iterable[int]) -> tuple[str, ...]:
    """Every group of the given layers, in pass order."""
    kinds = architecture(args).layer_kinds
    return tuple(g for i in layers for k in kinds for g in kind_groups(args, i, k))


def group_names(args: ModelArgs) -> list[str]:
    """All groups in forward order (the order of the cyclic scan)."""
    return [EMBED, *layer_groups(args, range(args.n_layers)), HEAD]


def routed_kinds(args: ModelArgs) -> tuple[GroupKind, ...]:
    """The repeated layer kinds of ``args``' architecture (a mixture's experts): a pass fetches only the groups of
    these its router chose (model/experts.py ``needed_groups``); none for a dense model."""
    return tuple(k for k in architecture(args).layer_kinds if k.count is not None)


def routed_groups(args: ModelArgs) -> dict[str, tuple[int, int]]:
    """Every routed group (a mixture's expert) -> (its layer, its index), in pass order: what the placement and the
    weight sources ask of a group name instead of parsing it."""
    kinds = routed_kinds(args)
    return {g: (i, e) for i in range(args.n_layers) for k in kinds
            for e, g in enumerate(kind_groups(args, i, k))}


def stateless_kinds(args: ModelArgs) -> tuple[str, ...]:
    """The layer kinds of ``args``' architecture whose groups a pass may compute wherever their weights lie (the CPU
    compute set of runtime/engine/placement.py): stateless (``GroupKind.stateless``: h to h from their own weights,
    no KV cache, no routing) and not repeated (a mixture's experts are fetched by routing, not in every pass)."""
    return tuple(k.name for k in architecture(args).layer_kinds if k.stateless and k.count is None)


def group_kind(group: str) -> str:
    """The kind of a group name: its layer kind (``layers.3.attention`` -> ``attention``, ``layers.3.expert.5`` ->
    ``expert``), or the name itself."""
    return group.split(".")[2] if group.startswith(LAYER_PREFIX) else group


def group_layer(group: str) -> int | None:
    return int(group.split(".")[1]) if group.startswith(LAYER_PREFIX) else None


def group_index(group: str) -> int | None:
    """A repeated kind's group's index (``layers.3.expert.5`` -> 5); None for every other group."""
    parts = group.split(".")
    return int(parts[3]) if group.startswith(LAYER_PREFIX) and len(parts) == 4 else None


def split_key(key: str) -> tuple[int | None, int | None, str]:
    """State-dict key -> (layer or None, a repeated kind's group index or None, local name):
    ``layers.3.attention.wq.weight`` -> (3, None, ``attention.wq.weight``); ``layers.3.expert.5.w1.weight`` ->
    (3, 5, ``w1.weight``); ``norm.weight`` -> (None, None, ``norm.weight``)."""
    if not key.startswith(LAYER_PREFIX):
        return None, None, key
    parts = key.split(".")
    if len(parts) > 4 and parts[3].isdigit():
        return int(parts[1]), int(parts[3]), ".".join(parts[4:])
    return int(parts[1]), None, ".".join(parts[2:])


def kind_of(args: ModelArgs, group: str) -> GroupKind:
    kinds = architecture(args).kinds
    name = group_kind(group)
    if name not in kinds:
        raise KeyError(f"unknown group {group!r} for architecture {args.arch} (kinds {sorted(kinds)})")
    return kinds[name]


def group_tensor_defs(args: ModelArgs, group: str) -> tuple[TensorDef, ...]:
    """The tensors of one group present for ``args``, in storage order."""
    return kind_of(args, group).present(args)


def group_tensor_shapes(args: ModelArgs, group: str) -> dict[str, tuple[int, ...]]:
    """Local tensor name -> shape for one group."""
    return {t.name: tuple(t.shape(args)) for t in group_tensor_defs(args, group)}


def group_prefix(group: str) -> str:
    """State-dict prefix of a group's local names: 'layers.3.' for layer groups, the group's name and a dot for
    a repeated kind's ('layers.3.expert.5.'), '' otherwise."""
    if not group.startswith(LAYER_PREFIX):
        return ""
    return group + "." if group_index(group) is not None else LAYER_PREFIX + group.split(".")[1] + "."


def global_names(args: ModelArgs) -> Iterator[tuple[str, str, str]]:
    """(group, local name, state-dict key) for every tensor of the model."""
    for g in group_names(args):
        for t in group_tensor_defs(args, g):
            yield g, t.name, group_prefix(g) + t.name


def tensor_def(args: ModelArgs, local: str) -> TensorDef:
    """The definition of local tensor name ``local`` (in any group of the architecture)."""
    for kind in architecture(args).kinds.values():
        for t in kind.tensors:
            if t.name == local:
                return t
    raise KeyError(f"no tensor {local!r} in architecture {args.arch}")


def role(args: ModelArgs, key: str) -> str:
    """The role (model/arch/schema.py: matrix, embedding, output, vector, router) of state-dict key ``key``."""
    return tensor_def(args, split_key(key)[2]).role


def output_tensor(args: ModelArgs) -> tuple[str, str]:
    """(the head's local name for its output matrix, the state-dict key that matrix's values are: the embedding
    table's for a tied model, whose head group does not hold it)."""
    untied = dataclasses.replace(args, tie_embeddings=False)
    out = next(t for t in group_tensor_defs(untied, HEAD) if t.role == OUTPUT)
    table = next(t for t in group_tensor_defs(args, EMBED) if t.role == EMBEDDING)
    return out.name, (table.name if args.tie_embeddings else out.name)


def first_group(args: ModelArgs, layer: int, kind: str) -> str:
    """Layer ``layer``'s first group of ``kind`` (a repeated kind's group 0): the one the probe times."""
    return kind_groups(args, layer, kind_of(args, layer_group(layer, kind)))[0]


def kinds_of_pass(args: ModelArgs) -> tuple[str, ...]:
    """The layer kinds in pass order, then the head: the groups whose compute a pass repeats (the probe's rows)."""
    return (*(k.name for k in architecture(args).layer_kinds), HEAD)


def kind_params(args: ModelArgs) -> dict[str, int]:
    """Parameter count of one group of each kind (a layer kind's group includes its norms and biases)."""
    out = {}
    for name, kind in architecture(args).kinds.items():
        n = 0
        for t in kind.present(args):
            size = 1
            for s in t.shape(args):
                size *= s
            n += size
        out[name] = n
    return out


def spread_layers(count: int, n_layers: int) -> frozenset[int]:
    """``count`` of ``n_layers`` layers (or any items in order) spread evenly: layer i when floor((i+1) count /
    n) passes an integer; layer 0 only when all are taken. Host-attended layers (runtime.engine.kv.TieredKVCache)
    and each kind's GPU-resident groups (runtime.engine.placement) are chosen this way."""
    if not 0 <= count <= n_layers:
        raise ValueError(f"spread_layers: count must be 0 to {n_layers}, found {count}")
    return frozenset(i for i in range(n_layers) if (i + 1) * count // n_layers > i * count // n_layers)


def host_layer_count(value: bool | int | str | None, n_layers: int) -> int:
    """How many layers ``--host-attention [N|all]`` attends on the host: none for None/False, every layer for
    True or "all", else N (1 to n_layers)."""
    if value is None or value is False:
        return 0
    if value is True or value == "all":
        return n_layers
    n = int(value)
    if not 1 <= n <= n_layers:
        raise ConfigError(f"--host-attention {value}: the model has {n_layers} layers (give 1 to {n_layers}, or all)")
    return n
