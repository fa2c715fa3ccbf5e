"""Weight groups of the Llama architecture: names, tensor shapes and state-dict keys (no torch here, so
the pool's processes can import it cheaply). model/llama.py documents the groups and computes with them."""

from __future__ import annotations

from collections.abc import Iterator

from model.args import ModelArgs

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
