"""Weight groups of a model: names, kinds, tensor lists, shapes and state-dict keys, read from its architecture's
schema (model/arch/). No torch here, so the pool's processes can import it cheaply; model/transformer.py computes
with the groups. A group is named ``tok_embeddings`` (``EMBED``), ``layers.{i}.{kind}`` for each layer kind of the
architecture in order, or ``head`` (``HEAD``); its tensors have local names (the state-dict key without the
group's ``layers.{i}.`` prefix)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from model.arch import EMBED, HEAD, LAYER_PREFIX, architecture
from model.arch.schema import EMBEDDING, OUTPUT, GroupKind, TensorDef
from model.errors import ConfigError

if TYPE_CHECKING:
    from model.args import ModelArgs  # which imports this module (group_params)


def layer_group(layer: int, kind: str) -> str:
    return f"{LAYER_PREFIX}{layer}.{kind}"


def layer_groups(args: ModelArgs, layers: Iterable[int]) -> tuple[str, ...]:
    """Every group of the given layers, in pass order."""
    kinds = architecture(args).layer_kinds
    return tuple(layer_group(i, k.name) for i in layers for k in kinds)


def group_names(args: ModelArgs) -> list[str]:
    """All groups in forward order (the order of the cyclic scan)."""
    return [EMBED, *layer_groups(args, range(args.n_layers)), HEAD]


def group_kind(group: str) -> str:
    """The kind of a group name: its layer kind (``layers.3.attention`` -> ``attention``), or the name itself."""
    return group.rsplit(".", 1)[-1] if group.startswith(LAYER_PREFIX) else group


def group_layer(group: str) -> int | None:
    return int(group.split(".")[1]) if group.startswith(LAYER_PREFIX) else None


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
    """State-dict prefix of a group's local names: 'layers.3.' for layer groups, '' otherwise."""
    return group.rsplit(".", 1)[0] + "." if group.startswith(LAYER_PREFIX) else ""


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
    """The role (model/arch/schema.py: matrix, embedding, output, vector) of state-dict key ``key``."""
    return tensor_def(args, key.split(".", 2)[2] if key.startswith(LAYER_PREFIX) else key).role


def output_tensor(args: ModelArgs) -> tuple[str, str]:
    """(the head's local name for its output matrix, the state-dict key that matrix's values are: the embedding
    table's for a tied model, whose head group does not hold it)."""
    untied = dataclasses.replace(args, tie_embeddings=False)
    out = next(t for t in group_tensor_defs(untied, HEAD) if t.role == OUTPUT)
    table = next(t for t in group_tensor_defs(args, EMBED) if t.role == EMBEDDING)
    return out.name, (table.name if args.tie_embeddings else out.name)


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
