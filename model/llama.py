"""The Llama architecture with Meta's module and state-dict names, split into weight groups.

A model is a sequence of *groups*, the unit the runtime stores, streams and binds:

    tok_embeddings                     tok_embeddings.weight
    layers.{i}.attention               layers.{i}.attention.{wq,wk,wv,wo}.weight, layers.{i}.attention_norm.weight
    layers.{i}.feed_forward            layers.{i}.feed_forward.{w1,w2,w3}.weight, layers.{i}.ffn_norm.weight
    head                               norm.weight, output.weight (output absent when tied to the embedding)

Each group's forward is a plain function that takes its weights as a mapping of *local* names (the
state-dict key with the group's layer prefix removed, e.g. ``attention.wq.weight``) to tensors. The
runtime passes views into a staging buffer or a shared-memory slot; nothing here allocates weights.

Rotary embeddings follow Meta's layout: q/k features are interleaved (re, im) pairs. Loaders of Hugging
Face checkpoints undo HF's row permutation so that every image holds Meta's layout.

Attention meets the KV cache through one seam, ``cache.attend(layer, q, k, v, start)`` (as gpt-fast's
``kv_cache.update``): the cache stores the new keys and values and chooses how to attend (the runtime's cache,
runtime/engine/kv.py, keeps them on the GPU or in DRAM and attends there or on the CPU). Nothing here knows
where the cache lives.

``Transformer`` (an nn.Module with Meta's names) exists so that a Meta state dict loads with strict=True;
its forward goes through the same group functions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.args import ModelArgs, RopeScaling
from model.groups import group_names, group_prefix, group_tensor_shapes
from model.quant import QuantWeight

Weights = Mapping[str, "torch.Tensor | QuantWeight"]


class Cache(Protocol):
    """What attention needs of a KV cache (runtime/engine/kv.py implements it): the padding of a left-padded
    batch, and ``attend``, which stores k and v at slots [start, start+S) and returns the attention output."""

    pad: torch.Tensor | None  # (B,) leading slots of each sequence that hold no token, or None
    tree: TreeQueries | None  # the queries are nodes of a token tree (speculative decoding), or None
    rows: RowQueries | None  # each sequence's queries at its own slots (continuous batching), or None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """q (B, S, n_heads, hd), k and v (B, S, n_kv, hd), rotated -> (B, S, n_heads * hd)."""

@dataclasses.dataclass(frozen=True)
class TreeQueries:
    """Queries that are the nodes of a token tree (speculative decoding, runtime/engine/speculative.py), one
    sequence: the tree's slots begin at ``base``; query i sees every slot before ``base`` and the tree slots
    its row of ``visible`` marks (its ancestors and itself), and sits at rotary position ``positions[i]``
    (the prefix's length plus its depth), not at its slot's."""

    base: int
    positions: torch.Tensor  # (S,) int64, on the cache's device
    visible: torch.Tensor  # (S, start + S - base) bool, on the cache's device


@dataclasses.dataclass(frozen=True)
class RowQueries:
    """Queries of a continuous batch (runtime/engine/scheduler.py): every sequence (row) of the batch is at its
    own length. Row b's S queries are its tokens right-aligned in the pass (a decode row feeds one token, a
    joining row a chunk of its prompt; the columns before them are padding): query (b, j) sits at rotary
    position ``positions[b, j]``, writes its key and value to slot ``slots[b, j]`` of row b, and sees row b's
    key slots [0, visible[b, j]]. A padding query writes to the cache's scratch slot (the last, which no real
    query sees) and sees slot 0 only, so its row stays finite. ``end``: the pass attends to key slots [0, end);
    ``lo``, ``hi``: the real queries write within slots [lo, hi)."""

    positions: torch.Tensor  # (B, S) int64, on the cache's device
    slots: torch.Tensor  # (B, S) int64
    visible: torch.Tensor  # (B, S) int64
    end: int
    lo: int
    hi: int


# ---- numerics ----------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, as Meta's reference does, then cast back to x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.type_as(x) * weight


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,) in fp64, with Llama-3.1 scaling when configured."""
    hd = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = args.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(mid, (1 - smooth) * inv / s.factor + smooth * inv, scaled)


def rope_scaling_matches(s: RopeScaling, theta: float, head_dim: int, divisors: np.ndarray) -> bool:
    """Whether llama.cpp's ``rope_freqs`` divisors equal what scaling ``s`` does to the base frequencies."""
    base = ModelArgs(dim=head_dim, n_layers=1, n_heads=1, vocab_size=1, ffn_hidden=1, rope_theta=theta)
    scaled = dataclasses.replace(base, rope_scaling=s)
    ratio = (rope_frequencies(base) / rope_frequencies(scaled)).numpy()
    return ratio.shape == divisors.shape and bool(np.allclose(ratio, divisors, rtol=1e-3))


class Rope:
    """cos/sin tables for positions [0, max_len), built once per device."""

    def __init__(self, args: ModelArgs, max_len: int, device: torch.device | str = "cpu") -> None:
        t = torch.arange(max_len, dtype=torch.float64)
        angles = torch.outer(t, rope_frequencies(args))  # (max_len, hd/2)
        self.cos = angles.cos().float().to(device)
        self.sin = angles.sin().float().to(device)
        self.max_len = max_len
        self._padded: tuple | None = None  # (start, S, pad, cos, sin) of the last padded lookup

    def apply(self, x: torch.Tensor, start: int, pad: torch.Tensor | None = None,
              positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, S, H, hd) with interleaved (re, im) pairs at cache slots [start, start+S) -> rotated, same
        dtype. ``pad`` (B,): a left-padded batch, sequence b's token at slot j has position j - pad[b].
        ``positions`` (S,) or (B, S): the queries' own positions (a token tree's, ``TreeQueries``; a continuous
        batch's, ``RowQueries``), not their slots."""
        b, s = x.shape[:2]
        if start + s > self.max_len:
            raise ValueError(f"position {start + s} exceeds the rotary table of {self.max_len}")
        if positions is not None and positions.dim() == 2:  # (B, S): every row its own
            cos, sin = self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)  # (B, S, 1, hd/2)
        elif positions is not None:
            cos, sin = self.cos[positions].view(1, s, 1, -1), self.sin[positions].view(1, s, 1, -1)
        elif pad is None:
            cos = self.cos[start:start + s].view(1, s, 1, -1)
            sin = self.sin[start:start + s].view(1, s, 1, -1)
        elif self._padded is not None and self._padded[:2] == (start, s) and self._padded[2] is pad:
            cos, sin = self._padded[3:]  # the same slots as the previous call (q and k, every layer of a pass)
        else:
            pos = (torch.arange(start, start + s, device=pad.device).view(1, s) - pad.view(b, 1)).clamp_(min=0)
            cos, sin = self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)  # (B, S, 1, hd/2)
            self._padded = (start, s, pad, cos, sin)
        xf = x.float().unflatten(-1, (-1, 2))  # (B, S, H, hd/2, 2)
        re, im = xf[..., 0], xf[..., 1]
        out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
        return out.flatten(-2).type_as(x)


# ---- group forwards ----------------------------------------------------------------------------------

def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight) -> torch.Tensor:
    """x @ w.T, for a plain weight or a quantized one (model/quant.py: dequantized where it is, per use)."""
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w.linear(x)


def embed_forward(tokens: torch.Tensor, w: Weights, dtype: torch.dtype | None = None) -> torch.Tensor:
    """tokens (B, S) int64 -> h (B, S, dim); a quantized table's rows are dequantized to ``dtype``."""
    table = w["tok_embeddings.weight"]
    if isinstance(table, torch.Tensor):
        return F.embedding(tokens, table)
    return table.rows(tokens, dtype or torch.float32)


def attention_forward(h: torch.Tensor, w: Weights, args: ModelArgs, layer: int, rope: Rope, cache: Cache,
                      start: int, reduce=None) -> torch.Tensor:
    """h (B, S, dim) -> h + Attention(RMSNorm(h)), with the queries at cache positions [start, start+S).
    ``reduce``: a tensor-parallel rank's all-reduce of its partial output projection (``Parallel``)."""
    b, s, _ = h.shape
    x = rms_norm(h, w["attention_norm.weight"], args.norm_eps)
    q = linear(x, w["attention.wq.weight"]).view(b, s, args.n_heads, args.head_dim)
    k = linear(x, w["attention.wk.weight"]).view(b, s, args.n_kv_heads, args.head_dim)
    v = linear(x, w["attention.wv.weight"]).view(b, s, args.n_kv_heads, args.head_dim)
    rows = getattr(cache, "rows", None)
    pos = cache.tree.positions if cache.tree is not None else rows.positions if rows is not None else None
    q, k = rope.apply(q, start, cache.pad, pos), rope.apply(k, start, cache.pad, pos)
    out = cache.attend(layer, q, k, v, start)  # (B, S, n_heads * hd): the cache writes k, v and picks the kernel
    o = linear(out, w["attention.wo.weight"])
    return h + (o if reduce is None else reduce(o))


def ffn_forward(h: torch.Tensor, w: Weights, args: ModelArgs, reduce=None) -> torch.Tensor:
    """h (B, S, dim) -> h + W2(silu(W1 x) * W3 x), x = RMSNorm(h); ``reduce`` as in attention_forward."""
    x = rms_norm(h, w["ffn_norm.weight"], args.norm_eps)
    gate = F.silu(linear(x, w["feed_forward.w1.weight"]))
    o = linear(gate * linear(x, w["feed_forward.w3.weight"]), w["feed_forward.w2.weight"])
    return h + (o if reduce is None else reduce(o))


# ---- Meta-named module (strict state-dict loading; in-memory reference) ------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        hd = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * hd, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(args.n_heads * hd, args.dim, bias=False)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_hidden, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.ffn_hidden, bias=False)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)


class Transformer(nn.Module):
    """Meta's module tree. Build on the meta device and ``load_state_dict(sd, strict=True, assign=True)``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if not args.tie_embeddings:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def group_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Group name -> {local name: parameter}, for the group forwards."""
        sd = self.state_dict()
        return {g: {local: sd[key] for local in group_tensor_shapes(self.args, g)
                    for key in [group_prefix(g) + local]}
                for g in group_names(self.args)}

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int, rope: Rope, cache: Cache) -> torch.Tensor:
        return forward_groups(tokens, start, self.args, DictSource(self.group_weights()), rope, cache)


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
        return embed_forward(tokens, self.groups["tok_embeddings"])

    def get(self, group: str) -> Weights:
        return self.groups[group]


def forward_groups(tokens: torch.Tensor, start: int, args: ModelArgs, source, rope: Rope, cache: Cache,
                   last_only: bool = False, parallel: Parallel | None = None,
                   select: torch.Tensor | None = None) -> torch.Tensor:
    """One forward pass -> logits (B, S, vocab), or (B, 1, vocab) for the last position with ``last_only``, or
    (1, N, vocab) for the positions ``select`` (N,) of the flattened (B x S) pass.

    The weight-source contract: ``source.embed(tokens)`` does the lookup; ``source.get(group)`` is called in
    the pass order (runtime/engine/placement.py ``pass_sequence``) and the weights it returns are valid only until
    the next ``get``: a streaming source reuses their buffer for a group further ahead. So every group's
    weights are used before the next group is fetched; a tied model applies the final norm (head group)
    before it fetches the embedding as its output matrix.

    ``parallel``: this pass is one tensor-parallel rank's (``args`` its own, ``source`` its shards): the
    embedding and each layer's two output projections are all-reduced, the logits gathered.
    """
    red = None
    if parallel is not None:
        tokens, red = parallel.tokens(tokens), parallel.reduce
    h = source.embed(tokens)
    if red is not None:
        h = red(h)  # each rank looked up its own vocabulary rows (the others zero)
    for i in range(args.n_layers):
        h = attention_forward(h, source.get(f"layers.{i}.attention"), args, i, rope, cache, start, red)
        h = ffn_forward(h, source.get(f"layers.{i}.feed_forward"), args, red)
    if last_only:
        h = h[:, -1:]
    elif select is not None:
        h = h.flatten(0, 1)[select].unsqueeze(0)  # (1, N, dim)
    head = source.get("head")
    x = rms_norm(h, head["norm.weight"], args.norm_eps)
    out_w = source.get("tok_embeddings")["tok_embeddings.weight"] if args.tie_embeddings else head["output.weight"]
    logits = linear(x, out_w).float()
    return logits if parallel is None else parallel.gather_logits(logits)
