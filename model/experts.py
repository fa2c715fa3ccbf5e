"""A mixture of experts' group forwards (Mixtral, Qwen2-MoE, Qwen3-MoE; model/arch/moe.py their groups).

A mixture's layer is several groups, which the pass fetches one at a time (a streaming source frees each before
the next): its attention group routes (``moe_attention_forward``: attention, then the router), leaving a
``Routing`` on the ``Pass`` (the normed hidden states, and the pass's tokens sorted by expert with their
weights, one read of the expert counts on the host per layer); each expert group (``expert_forward``) then
computes its own tokens with one matmul per weight and adds them to the residual stream; a shared expert
(``shared_expert_forward``) computes every token. An expert no token chose is not fetched at all: once a layer has
routed, ``forward_groups`` (model/passes.py) asks ``needed_groups`` for the experts the pass's tokens chose, tells
the weight source (``source.route(layer, groups)``, where it has one: a streaming source then copies or reads only
those) and fetches only those.

The prefetch guess (the trick of Eliseev and Mazur's Mixtral runtime): where the weight source can hand over the
next layer's router without fetching anything (``source.next_router(layer)``: its attention group resident),
``forward_groups`` leaves it on the ``Pass`` before the layer's attention group runs, and ``moe_attention_forward``
applies it to the current hidden state, RMSNorm(h) with the next layer's FFN norm: each token's top k there is a
guess of the experts the next layer will route it to, known a layer ahead. The guess (the union over the pass's
tokens) is read on the host in the same copy as the layer's expert counts (no further synchronisation) and handed to
the source (``source.guess(layer + 1, groups)``), which counts how often it was right once that layer routes, and
a streaming source reads the guessed disk-tier experts while this layer computes (runtime/engine/streamed.py). It
changes nothing that is computed.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import torch
import torch.nn.functional as F

from model.args import ModelArgs
from model.groups import kind_groups, routed_kinds
from model.transformer import Pass, Weights, attention_forward, linear, rms_norm


@dataclasses.dataclass(frozen=True)
class Routing:
    """One MoE layer's router result (``moe_attention_forward``), read by the layer's expert groups after it."""

    layer: int
    x: torch.Tensor  # (T, dim): RMSNorm(h) of the pass's T = B*S tokens, every expert's input
    tokens: torch.Tensor  # (T*k,) int64: token indices sorted by expert, expert e's at [bounds[e], bounds[e+1])
    weights: torch.Tensor  # (T*k, 1): their routing weights, in x's dtype
    bounds: tuple[int, ...]  # n_experts + 1 offsets into tokens, read on the host once per layer
    guess: tuple[int, ...] | None = None  # the next layer's experts its router picks on this layer's h (module doc)


def _swiglu(x: torch.Tensor, w1, w3, w2) -> torch.Tensor:
    return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)


def moe_attention_forward(h: torch.Tensor, w: Weights, p: Pass, layer: int) -> torch.Tensor:
    """A mixture's attention group: h (B, S, dim) -> h + Attention(RMSNorm(h)), then the router on
    x = RMSNorm(h) (the FFN norm): each token's top k = n_experts_used of softmax(gate x) (in fp32), their
    weights renormalised to sum to 1 where ``norm_topk_prob``; the tokens sorted by expert, left on ``p`` for the
    layer's expert groups. One host read per layer: the expert counts."""
    args = p.args
    h = attention_forward(h, w, p, layer)
    x = rms_norm(h, w["ffn_norm.weight"], args.norm_eps).flatten(0, 1)  # (T, dim)
    probs = F.softmax(linear(x, w["feed_forward.gate.weight"]).float(), dim=-1)  # (T, n_experts)
    top, idx = torch.topk(probs, args.n_experts_used, dim=-1)  # (T, k)
    if args.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    flat = idx.flatten()  # (T*k,): entry j is token j // k's choice
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=args.n_experts)
    n, nxt = args.n_experts, p.routing.get("next_router")
    guessing = nxt is not None and nxt[0] == layer + 1
    if guessing:  # the prefetch guess, read with the counts (module docstring)
        xg = rms_norm(h, nxt[1]["ffn_norm.weight"], args.norm_eps).flatten(0, 1)  # (T, dim)
        picks = torch.topk(linear(xg, nxt[1]["feed_forward.gate.weight"]).float(), args.n_experts_used, dim=-1)[1]
        counts = torch.cat([counts, torch.bincount(picks.flatten(), minlength=n)])  # (2 n,)
    host = counts.tolist()  # the one host read of the layer
    bounds = (0, *itertools.accumulate(host[:n]))
    guess = tuple(e for e in range(n) if host[n + e]) if guessing else None
    p.routing.clear()
    p.routing["layer"] = Routing(layer, x, order // args.n_experts_used,
                                 top.flatten()[order].unsqueeze(1).to(x.dtype), bounds, guess)
    return h


def _routing(p: Pass, layer: int) -> Routing:
    r = p.routing.get("layer")
    if r is None or r.layer != layer:
        raise RuntimeError(f"layer {layer}'s expert ran before its router (routing held: "
                           f"{None if r is None else r.layer})")
    return r


def needed_groups(args: ModelArgs, r: Routing) -> tuple[str, ...]:
    """The routed groups of layer ``r.layer`` that at least one of the pass's tokens chose (from ``r.bounds``), in
    pass order: the only ones of that layer the pass fetches (``forward_groups``)."""
    return tuple(g for k in routed_kinds(args) for e, g in enumerate(kind_groups(args, r.layer, k))
                 if r.bounds[e + 1] > r.bounds[e])


def guessed_groups(args: ModelArgs, layer: int, experts) -> tuple[str, ...]:
    """The routed groups of ``layer`` of expert indices ``experts`` (a ``Routing.guess``)."""
    return tuple(g for k in routed_kinds(args) for e, g in enumerate(kind_groups(args, layer, k)) if e in experts)


@functools.lru_cache(maxsize=64)
def routed_set(args: ModelArgs) -> frozenset[str]:
    """Every routed group (expert) of the model."""
    return frozenset(g for i in range(args.n_layers) for k in routed_kinds(args) for g in kind_groups(args, i, k))


def expert_forward(h: torch.Tensor, w: Weights, p: Pass, layer: int, expert: int) -> torch.Tensor:
    """One expert of a mixture's layer: h (B, S, dim) -> h plus, for each token routed to ``expert``, its weight
    times W2(silu(W1 x) * W3 x); h itself where no token was (``forward_groups`` does not fetch such a group)."""
    r = _routing(p, layer)
    lo, hi = r.bounds[expert], r.bounds[expert + 1]
    if lo == hi:
        return h
    tok = r.tokens[lo:hi]
    y = _swiglu(r.x[tok], w["w1.weight"], w["w3.weight"], w["w2.weight"]) * r.weights[lo:hi]  # (n, dim)
    if p.reduce is None:
        return h.flatten(0, 1).index_add(0, tok, y.to(h.dtype)).view_as(h)
    o = torch.zeros_like(r.x).index_add_(0, tok, y.to(r.x.dtype))  # a rank's partial sums, for the all-reduce
    return p.out(h, o.view_as(h))


def shared_expert_forward(h: torch.Tensor, w: Weights, p: Pass, layer: int) -> torch.Tensor:
    """Qwen2-MoE's shared expert, run for every token: h + sigmoid(gate x) * W2(silu(W1 x) * W3 x)."""
    x = _routing(p, layer).x
    y = _swiglu(x, w["shared_expert.w1.weight"], w["shared_expert.w3.weight"], w["shared_expert.w2.weight"])
    return p.out(h, (torch.sigmoid(linear(x, w["shared_expert_gate.weight"])) * y).view_as(h))
