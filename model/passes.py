"""One forward pass over a model's groups (``forward_groups``), in its architecture's order (``layer_passes``),
each group by its kind's function (``FORWARDS``: model/transformer.py's dense ones, model/experts.py's).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from model.arch import EMBED, HEAD, architecture
from model.args import ModelArgs
from model.cpu_kernels import BlockWeight, TiledWeight
from model.experts import (
    Routing,
    expert_forward,
    guessed_groups,
    moe_attention_forward,
    needed_groups,
    routed_set,
    shared_expert_forward,
)
from model.groups import group_index, kind_groups
from model.transformer import (
    Cache,
    Pass,
    Queries,
    Rope,
    Weights,
    attention_forward,
    embed_forward,
    ffn_forward,
    final_norm,
    linear,
    output_matrix,
)


class Parallel(Protocol):
    """A tensor-parallel rank's collectives (runtime/engine/tensor_parallel.py; model/shards.py the split): the
    group functions compute the rank's shard with its own arguments (model.shards.rank_args), these join them."""

    def tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pass's token ids as rank 0 has them (rank 0 samples)."""

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's partial x (an all-reduce)."""

    def gather_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, rows of this rank) -> (B, S, vocab): every rank's vocabulary rows, in order."""


class DictSource:
    """The simplest weight source: every group's weights already in a dict on the compute device."""

    def __init__(self, groups: Mapping[str, Weights]) -> None:
        self.groups = groups

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return embed_forward(tokens, self.groups[EMBED])

    def get(self, group: str) -> Weights:
        return self.groups[group]


FORWARDS: dict[str, Callable] = {"attention": attention_forward, "ffn": ffn_forward,  # by GroupKind.forward
                                  "moe_attention": moe_attention_forward, "expert": expert_forward,
                                  "shared_expert": shared_expert_forward}


def kind_forward(args: ModelArgs, kind: str) -> Callable:
    """The group function of layer kind ``kind`` of ``args``' architecture (a repeated kind's takes its group's
    index too: ``expert=``)."""
    return FORWARDS[architecture(args).kinds[kind].forward]


@functools.lru_cache(maxsize=64)
def layer_passes(args: ModelArgs) -> tuple[tuple[str, Callable, int], ...]:
    """(group name, group forward, layer) of every layer group in pass order, for ``args``' architecture (an
    expert's forward bound to its index)."""
    out = []
    for i in range(args.n_layers):
        for k in architecture(args).layer_kinds:
            fwd = FORWARDS[k.forward]
            for g in kind_groups(args, i, k):
                idx = group_index(g)
                out.append((g, fwd if idx is None else functools.partial(fwd, expert=idx), i))
    return tuple(out)


def weights_device(w: Weights) -> torch.device:
    """Where a group's weights lie (its first tensor's device: a group's views are cut from one buffer)."""
    return next(iter(w.values())).device


def on_weights(fwd: Callable, h: torch.Tensor, w: Weights, p: Pass, layer: int) -> torch.Tensor:
    """``fwd(h, w, p, layer)`` where the weights lie, the result where h is. A weight source may hand a CUDA pass a
    stateless group's weights in host memory (runtime/engine/placement.py's CPU compute set: the CPU computes it in
    place from the DRAM tier while the link copies other groups): h (B, S, dim) then crosses to the host and back,
    a few KB at decode, in float32 where the weights are tiled for the CPU kernels. Only a stateless kind's forward
    (model/arch/schema.py) may get such weights: it reads nothing of ``p`` that lies on the device."""
    if h.device.type == "cpu":
        return fwd(h, w, p, layer)  # everything is on the host
    dev = weights_device(w)
    if dev.type == h.device.type:
        return fwd(h, w, p, layer)
    x = h.to(dev, torch.float32) if any(isinstance(v, (TiledWeight, BlockWeight)) for v in w.values()) \
        else h.to(dev)
    return fwd(x, w, p, layer).to(h.device, h.dtype)  # tiled: the CPU kernels' float32 (model/cpu_kernels.py)


def forward_groups(tokens: torch.Tensor, queries: Queries, args: ModelArgs, source, rope: Rope, cache: Cache,
                   last_only: bool = False, parallel: Parallel | None = None,
                   select: torch.Tensor | None = None) -> torch.Tensor:
    """One forward pass of tokens (B, S), laid out in the cache as ``queries`` says -> logits (B, S, vocab), or
    (B, 1, vocab) for the last position with ``last_only``, or (1, N, vocab) for the positions ``select`` (N,)
    of the flattened (B x S) pass.

    The weight-source contract: ``source.embed(tokens)`` does the lookup; ``source.get(group)`` is called in
    the pass order (runtime/engine/placement.py ``pass_sequence``) and the weights it returns are valid only until
    the next ``get``: a streaming source reuses their buffer for a group further ahead (a stateless group's weights
    may be in host memory on a CUDA pass: ``on_weights`` computes it there). So every group's
    weights are used before the next group is fetched; a tied model applies the final norm (head group)
    before it fetches the embedding as its output matrix. A mixture's routed groups (its experts) are fetched only
    where a token chose them (``needed_groups``): right after a layer has routed, ``source.route(layer, groups)``
    (for a source that has it) names the ones of that layer the pass will fetch, in order, before the first of them;
    and ``source.tally(layer, bounds)`` (for a source that has it: runtime/measure/routing.py counts the routings of
    ``probe --experts``) gets the layer's ``Routing.bounds``, how many of the pass's tokens chose each expert. A
    source with ``guess`` and ``next_router`` gets the prefetch guess (model/experts.py): before a layer's attention
    group runs, ``next_router(layer + 1)`` hands over the next layer's router weights if it can without fetching
    (else None: no guess), and once the layer has routed, ``guess(layer + 1, groups)`` the experts they pick, called
    just before ``route(layer, ...)`` (a streaming source starts reading the guessed ones with the layer's own).

    ``parallel``: this pass is one tensor-parallel rank's (``args`` its own, ``source`` its shards): the
    embedding and each layer group's output projection are all-reduced, the logits gathered.
    """
    red = None
    if parallel is not None:
        tokens, red = parallel.tokens(tokens), parallel.reduce
    h = source.embed(tokens)
    if red is not None:
        h = red(h)  # each rank looked up its own vocabulary rows (the others zero)
    p = Pass(args, rope, cache, queries, red)
    routed, route, tally = routed_set(args), getattr(source, "route", None), getattr(source, "tally", None)
    next_router, guess = getattr(source, "next_router", None), getattr(source, "guess", None)
    chosen: frozenset[str] = frozenset()  # the current layer's routed groups that a token chose
    announced: Routing | None = None
    for group, fwd, layer in layer_passes(args):
        if group in routed and group not in chosen:
            continue  # no token of the pass chose this expert: not fetched
        if fwd is moe_attention_forward and guess is not None:  # the next layer's router, where the source has it
            w = next_router(layer + 1) if layer + 1 < args.n_layers else None
            p.routing["next_router"] = None if w is None else (layer + 1, w)
        h = on_weights(fwd, h, source.get(group), p, layer)
        r = p.routing.get("layer")
        if r is not None and r is not announced:  # this group routed: the layer's experts are known
            announced, needed = r, needed_groups(args, r)
            chosen = frozenset(needed)
            if r.guess is not None:  # before route: the source may ask for the guessed experts with this layer's
                guess(r.layer + 1, guessed_groups(args, r.layer + 1, r.guess))
            if route is not None:
                route(r.layer, needed)
            if tally is not None:
                tally(r.layer, r.bounds)
    if last_only:
        h = h[:, -1:]
    elif select is not None:
        h = h.flatten(0, 1)[select].unsqueeze(0)  # (1, N, dim)
    head = source.get(HEAD)
    x = final_norm(h, head, args)  # before a tied model fetches the embedding
    group, name = output_matrix(args)
    logits = linear(x, (head if group == HEAD else source.get(group))[name]).float()
    return logits if parallel is None else parallel.gather_logits(logits)
