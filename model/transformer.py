"""The numerics and the dense group forwards every architecture of the registry (model/arch/) computes with.

A model is a sequence of *groups* (model/groups.py, model/arch/schema.py): the embedding, per layer one group
of each of its architecture's layer kinds, and the head. Each layer kind's forward is a plain function
``fwd(h, w, p, layer) -> h`` that takes its weights as a mapping of *local* names (the state-dict key with the
group's layer prefix removed, e.g. ``attention.wq.weight``) to tensors and the pass's ``Pass`` (arguments,
rotary tables, KV cache, start position, tensor-parallel reduce). The runtime passes views into a staging
buffer or a shared-memory slot; nothing here allocates weights. The dense decoder's two (Llama, Qwen2,
Qwen3, Mistral: ``attention_forward`` with optional q/k/v biases and per-head q/k norms, ``ffn_forward``) are
here; a mixture of experts' three in model/experts.py; one forward pass over them in model/passes.py.

Rotary embeddings follow Meta's layout: q/k features are interleaved (re, im) pairs. Loaders of checkpoints
in rotate-half order (Hugging Face's, Qwen's GGUFs) un-permute those rows so that every image holds Meta's
layout.

Attention meets the KV cache through one seam, ``cache.attend(layer, q, k, v, queries)`` (as gpt-fast's
``kv_cache.update``): the cache stores the new keys and values and chooses how to attend (the runtime's cache,
runtime/engine/kv.py, keeps them on the GPU or in DRAM and attends there or on the CPU). Nothing here knows
where the cache lives. ``queries`` (``Queries``) is the pass's attention layout, built once per forward by its
caller and carried by the ``Pass``: where the queries sit, which keys each sees, at which rotary positions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from model import cpu_kernels
from model.arch import EMBED, HEAD
from model.args import ModelArgs, RopeScaling
from model.cpu_kernels import fused
from model.errors import ConfigError
from model.groups import group_names, group_prefix, group_tensor_shapes
from model.quant import QuantWeight, triton_module

Weights = Mapping[str, "torch.Tensor | QuantWeight"]


class Cache(Protocol):
    """What attention needs of a KV cache (runtime/engine/kv.py implements it): ``attend``, which stores k and v
    at the queries' slots and returns the attention output."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               queries: Queries, simd=None) -> torch.Tensor:
        """q (B, S, n_heads, hd), k and v (B, S, n_kv, hd), rotated -> (B, S, n_heads * hd). ``simd``: the CPU
        kernels' library (model/cpu_simd.py) the caller's weights use, which may attend a decode step."""


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


@dataclasses.dataclass(frozen=True)
class Queries:
    """The attention layout of one forward pass, built once by its caller (runtime/engine/generate.py) and passed
    to every layer's attention (``Pass.queries``, ``Cache.attend``). Plain: the queries of every sequence sit
    at slots [start, start+S), each seeing the slots up to its own; ``pad`` (B,) int64 on the cache's device: a
    left-padded batch, whose sequence b holds no token in its first pad[b] slots (its attention masks them, its
    positions start at 0 at slot pad[b]). Or the queries are a token tree's nodes (``tree``, from slot
    ``start``) or a continuous batch's rows (``rows``; ``start`` 0)."""

    start: int = 0
    pad: torch.Tensor | None = None
    tree: TreeQueries | None = None
    rows: RowQueries | None = None

    @property
    def positions(self) -> torch.Tensor | None:
        """The queries' own rotary positions where they are not their slots' (a tree's, a continuous batch's)."""
        return self.tree.positions if self.tree is not None else self.rows.positions if self.rows is not None \
            else None


# ---- numerics ----------------------------------------------------------------------------------------

def _fused(x: torch.Tensor):
    """model.triton_ops (one kernel a step) for a CUDA tensor where triton imports, else None (torch ops)."""
    return triton_module("triton_ops") if x.is_cuda else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, as Meta's reference does, then cast back to x's dtype."""
    if (ops := _fused(x)) is not None:
        return ops.rms_norm(x, weight, eps)
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
        self._last: tuple | None = None  # (start, S, pad, positions) of the last lookup without positions
        self._row: tuple | None = None  # (position, cos, sin) of the last ``at``

    def at(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos and sin rows (hd/2,) of one position: a decode step's, looked up once for every layer."""
        if self._row is None or self._row[0] != position:
            self._row = (position, self.cos[position], self.sin[position])
        return self._row[1], self._row[2]

    def _positions(self, start: int, s: int, pad: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The rotary positions (1 or B, S) of slots [start, start+S), less a left-padded batch's ``pad``: made once
        for the q and k of every layer of a pass (the previous call's, where its slots and pad are these)."""
        if self._last is not None and self._last[:2] == (start, s) and self._last[2] is pad:
            return self._last[3]
        pos = torch.arange(start, start + s, device=device).view(1, s)
        if pad is not None:
            pos = (pos - pad.view(-1, 1)).clamp_(min=0)
        self._last = (start, s, pad, pos)
        return pos

    def apply(self, x: torch.Tensor, start: int, pad: torch.Tensor | None = None,
              positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, S, H, hd) with interleaved (re, im) pairs at cache slots [start, start+S) -> rotated, same
        dtype. ``pad`` (B,): a left-padded batch, sequence b's token at slot j has position j - pad[b].
        ``positions`` (S,) or (B, S): the queries' own positions (a token tree's, ``TreeQueries``; a continuous
        batch's, ``RowQueries``), not their slots."""
        b, s = x.shape[:2]
        if start + s > self.max_len:
            raise ValueError(f"position {start + s} exceeds the rotary table of {self.max_len}")
        if (ops := _fused(x)) is not None:  # one kernel, at each query's position
            pos = positions if positions is not None else self._positions(start, s, pad, x.device)
            return ops.rope(x, self.cos, self.sin, pos.view(-1, s).contiguous())
        if positions is not None and positions.dim() == 2:  # (B, S): every row its own
            cos, sin = self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)  # (B, S, 1, hd/2)
        elif positions is not None:
            cos, sin = self.cos[positions].view(1, s, 1, -1), self.sin[positions].view(1, s, 1, -1)
        elif pad is None:
            cos = self.cos[start:start + s].view(1, s, 1, -1)
            sin = self.sin[start:start + s].view(1, s, 1, -1)
        else:
            pos = self._positions(start, s, pad, x.device)
            cos, sin = self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)  # (B, S, 1, hd/2)
        xf = x.float().unflatten(-1, (-1, 2))  # (B, S, H, hd/2, 2)
        re, im = xf[..., 0], xf[..., 1]
        out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1)
        return out.flatten(-2).type_as(x)


# ---- group forwards ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pass:
    """What every group of one forward pass shares: the model's arguments, the rotary tables, the KV cache, the
    pass's attention layout (``Queries``), and a tensor-parallel rank's all-reduce (None: one process).
    ``routing``: a mixture's current layer's ``Routing`` (model/experts.py), set by its attention group for its
    experts (one entry, replaced layer by layer)."""

    args: ModelArgs
    rope: Rope
    cache: Cache
    queries: Queries
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    routing: dict[str, object] = dataclasses.field(default_factory=dict, compare=False)

    def out(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The residual stream after a group whose output projection gave ``o`` (a rank's partial sum)."""
        return h + (o if self.reduce is None else self.reduce(o))


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias), for a plain weight or a quantized one (model/quant.py: dequantized where it is)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = w.linear(x)
    return y if bias is None else y + bias


def linears(x: torch.Tensor, ws: tuple, biases: tuple | None = None) -> list[torch.Tensor]:
    """``[linear(x, w, b) for w, b in zip(ws, biases)]``: one matmul where the weights are a CPU run's tiled
    siblings (model/cpu_kernels.py ``hold``: q, k and v, or w1 and w3, held as one matrix)."""
    whole = fused(ws)
    if whole is None:
        return [linear(x, w, b) for w, b in zip(ws, biases or (None,) * len(ws))]
    ys = whole.linear(x).split([w.shape[0] for w in ws], dim=-1)
    return list(ys) if biases is None else [y if b is None else y + b for y, b in zip(ys, biases)]


def embed_forward(tokens: torch.Tensor, w: Weights, dtype: torch.dtype | None = None,
                  rows: tuple[int, int] | None = None) -> torch.Tensor:
    """tokens (B, S) int64 -> h (B, S, dim); a quantized table's rows are dequantized to ``dtype``. ``rows``: a
    tensor-parallel rank's vocabulary rows [lo, hi) (model/shards.py), which the table holds: the others'
    tokens give zeros (the pass all-reduces the ranks' lookups)."""
    table = w["tok_embeddings.weight"]
    if rows is not None:
        lo, hi = rows
        mine = (tokens >= lo) & (tokens < hi)
        return F.embedding((tokens - lo).masked_fill(~mine, 0), table).masked_fill(~mine.unsqueeze(-1), 0)
    if isinstance(table, torch.Tensor):
        return F.embedding(tokens, table)
    return table.rows(tokens, dtype or torch.float32)


def attention_forward(h: torch.Tensor, w: Weights, p: Pass, layer: int) -> torch.Tensor:
    """h (B, S, dim) -> h + Attention(RMSNorm(h)), the queries where ``p.queries`` puts them.
    Qwen2's q/k/v biases and Qwen3's per-head q/k RMSNorm where the arguments have them."""
    args, qs = p.args, p.queries
    b, s, _ = h.shape
    fast = _cpu_decode_attention(h, w, p, layer)
    if fast is not None:
        return fast
    x = rms_norm(h, w["attention_norm.weight"], args.norm_eps)
    biases = tuple(w[f"attention.{n}.bias"] for n in ("wq", "wk", "wv")) if args.qkv_bias else None
    q, k, v = linears(x, (w["attention.wq.weight"], w["attention.wk.weight"], w["attention.wv.weight"]), biases)
    q = q.view(b, s, args.n_heads, args.head_dim)
    k = k.view(b, s, args.n_kv_heads, args.head_dim)
    v = v.view(b, s, args.n_kv_heads, args.head_dim)
    if args.qk_norm:  # over each head's features, before the rotation
        q = rms_norm(q, w["attention.q_norm.weight"], args.norm_eps)
        k = rms_norm(k, w["attention.k_norm.weight"], args.norm_eps)
    pos = qs.positions
    q, k = p.rope.apply(q, qs.start, qs.pad, pos), p.rope.apply(k, qs.start, qs.pad, pos)
    out = p.cache.attend(layer, q, k, v, qs)  # (B, S, n_heads * hd): the cache writes k, v and picks the kernel
    return p.out(h, linear(out, w["attention.wo.weight"]))


def _cpu_decode_attention(h: torch.Tensor, w: Weights, p: Pass, layer: int) -> torch.Tensor | None:
    """``attention_forward`` of a CPU decode step over tiled weights (model/cpu_kernels.py: the norm, q/k/v and the
    rotation one compiled graph, the output projection and residual another, the cache's attention between them);
    None where that does not apply (other weights, a padded batch, a tree or a continuous batch's queries, Qwen's
    biases or q/k norms, a tensor-parallel rank)."""
    args, qs = p.args, p.queries
    if not cpu_kernels.decode_rows(h) or p.reduce is not None or args.qkv_bias or args.qk_norm \
            or qs.pad is not None or qs.tree is not None or qs.rows is not None or qs.start + 1 > p.rope.max_len:
        return None
    ws = (w["attention.wq.weight"], w["attention.wk.weight"], w["attention.wv.weight"])
    got = cpu_kernels.attention_in(h, w["attention_norm.weight"], args.norm_eps, ws, (args.n_heads, args.n_kv_heads),
                                   *p.rope.at(qs.start))
    if got is None:
        return None
    lib = getattr(w["attention.wo.weight"], "lib", None)  # model/cpu_simd.c's, where it multiplies the weights
    out = p.cache.attend(layer, *got, qs, simd=lib)  # (B, 1, n_heads * hd)
    y = cpu_kernels.residual(h, out, w["attention.wo.weight"])
    return y if y is not None else p.out(h, linear(out, w["attention.wo.weight"]))


def ffn_forward(h: torch.Tensor, w: Weights, p: Pass, layer: int) -> torch.Tensor:
    """h (B, S, dim) -> h + W2(silu(W1 x) * W3 x), x = RMSNorm(h)."""
    if p.reduce is None and cpu_kernels.decode_rows(h):  # over tiled weights: one graph (model/cpu_kernels.py)
        y = cpu_kernels.ffn(h, w["ffn_norm.weight"], p.args.norm_eps, w["feed_forward.w1.weight"],
                            w["feed_forward.w3.weight"], w["feed_forward.w2.weight"])
        if y is not None:
            return y
    x = rms_norm(h, w["ffn_norm.weight"], p.args.norm_eps)
    gate, up = linears(x, (w["feed_forward.w1.weight"], w["feed_forward.w3.weight"]))
    ops = _fused(gate)
    act = ops.silu_mul(gate, up) if ops is not None else F.silu(gate) * up
    return p.out(h, linear(act, w["feed_forward.w2.weight"]))


def final_norm(h: torch.Tensor, head: Weights, args: ModelArgs) -> torch.Tensor:
    """The head group's norm of h (B, S, dim), which the output matrix multiplies."""
    return rms_norm(h, head["norm.weight"], args.norm_eps)


def output_matrix(args: ModelArgs) -> tuple[str, str]:
    """(group, local name) of the output matrix: the head's own, or a tied model's embedding (fetched after the
    head: ``forward_groups``)."""
    return (EMBED, "tok_embeddings.weight") if args.tie_embeddings else (HEAD, "output.weight")


def head_forward(h: torch.Tensor, w: Weights, args: ModelArgs) -> torch.Tensor:
    """h (B, S, dim) -> logits (B, S, vocab) fp32 from a head group that holds its own output matrix (the
    probe's random head, tied or not); ``forward_groups`` does the same with a tied model's embedding."""
    return linear(rms_norm(h, w["norm.weight"], args.norm_eps), w["output.weight"]).float()


def state_dict_groups(args: ModelArgs, sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group name -> {local name: tensor} of a full state dict under Meta's names, checked strictly: every key of
    the model's schema present in its shape, no other key."""
    want = {group_prefix(g) + local: (g, local, shape) for g in group_names(args)
            for local, shape in group_tensor_shapes(args, g).items()}
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing or unexpected:
        raise ConfigError(f"state dict of a {args.arch} model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    out: dict[str, dict[str, torch.Tensor]] = {g: {} for g in group_names(args)}
    for key, (g, local, shape) in want.items():
        if tuple(sd[key].shape) != tuple(shape):
            raise ConfigError(f"state dict: {key} has shape {tuple(sd[key].shape)}, expected {tuple(shape)}")
        out[g][local] = sd[key]
    return out


