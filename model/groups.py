"""Weight groups of the Llama architecture: names, tensor shapes and state-dict keys (no torch here, so
the pool's processes can import it cheaply). model/llama.py documents the groups and computes with them."""

from __future__ import annotations

from collections.abc import Iterator

from model.args import ModelArgs
from model.errors import ConfigError

ATTN_TENSORS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                "attention_norm.weight")
FFN_TENSORS = ("feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight", "ffn_norm.weight")


def group_names(args: ModelArgs) -> list[str]:
    """All groups in forward order (the order of the cyclic scan)."""
    names = ["tok_embeddings"]
    for i in range(args.n_layers):
        names += [f"layers.{i}.attention", f"layers.{i}.feed_forward"]
    return names + ["head"]


def group_tensor_shapes(args: ModelArgs, group: str) -> dict[str, tuple[int, ...]]:
    """Local tensor name -> shape for one group."""
    d, hd = args.dim, args.head_dim
    if group == "tok_embeddings":
        return {"tok_embeddings.weight": (args.vocab_size, d)}
    if group == "head":
        shapes = {"norm.weight": (d,)}
        if not args.tie_embeddings:
            shapes["output.weight"] = (args.vocab_size, d)
        return shapes
    kind = group.rsplit(".", 1)[-1]
    if kind == "attention":
        return {"attention.wq.weight": (args.n_heads * hd, d), "attention.wk.weight": (args.n_kv_heads * hd, d),
                "attention.wv.weight": (args.n_kv_heads * hd, d), "attention.wo.weight": (d, args.n_heads * hd),
                "attention_norm.weight": (d,)}
    if kind == "feed_forward":
        return {"feed_forward.w1.weight": (args.ffn_hidden, d), "feed_forward.w2.weight": (d, args.ffn_hidden),
                "feed_forward.w3.weight": (args.ffn_hidden, d), "ffn_norm.weight": (d,)}
    raise KeyError(f"unknown group {group!r}")


def group_prefix(group: str) -> str:
    """State-dict prefix of a group's local names: 'layers.3.' for layer groups, '' otherwise."""
    return group.rsplit(".", 1)[0] + "." if group.startswith("layers.") else ""


def global_names(args: ModelArgs) -> Iterator[tuple[str, str, str]]:
    """(group, local name, state-dict key) for every tensor of the model."""
    for g in group_names(args):
        for local in group_tensor_shapes(args, g):
            yield g, local, group_prefix(g) + local


def group_kind(group: str) -> str:
    return group.rsplit(".", 1)[-1] if group.startswith("layers.") else group


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
