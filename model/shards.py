"""Tensor-parallel shards of a model's groups (Megatron's split), torch-free: what rank r of N holds. Each
tensor's split is declared by its architecture (model/arch/schema.py ``TensorDef.split``); the dense decoder's:

    attention.wq / wk / wv      rows (output features), by head (their biases too): rank r has query heads
                                [r H/N, (r+1) H/N) and KV heads [r KV/N, (r+1) KV/N), the KV heads
                                its query heads attend with (grouped-query attention stays rank-local)
    feed_forward.w1 / w3        rows: hidden features [r F/N, (r+1) F/N)
    attention.wo, feed_forward.w2   columns (input features), the same ranges: each rank's product is a
                                partial sum of the full one, so attention and the FFN each end in an
                                all-reduce (sum) of (B, S, dim)
    tok_embeddings, output      rows (vocabulary): the lookup masks the ids outside the rank's rows and
                                all-reduces; the head's logits are gathered (a tied model's output matrix
                                is the embedding's shard)
    norms                       whole on every rank (Qwen3's per-head q/k norms too: one head's weights)
    experts                     each expert (and a shared expert) as the FFN; the router and the shared
                                expert's gate whole: every rank routes every token alike

A rank's own model arguments (``rank_args``) have H/N query heads, KV/N KV heads and F/N hidden features,
so model/transformer.py's group functions compute a rank's shard unchanged (runtime/engine/tensor_parallel.py adds
the all-reduces). Used by packing (runtime/format/image.py ``plan_layout``), the ranks and their plans.
"""

from __future__ import annotations

import dataclasses

from model.arch.schema import COLS, ROWS, VOCAB, WHOLE
from model.args import ModelArgs
from model.errors import ConfigError
from model.groups import tensor_def

__all__ = ["COLS", "ROWS", "WHOLE", "check_tensor_parallel", "rank_args", "shard_range", "shard_shape", "vocab_rows"]


def check_tensor_parallel(args: ModelArgs, n: int) -> None:
    """Refuse ``n`` ranks for a model whose KV heads or FFN hidden size ``n`` does not divide (one line)."""
    if n < 1:
        raise ConfigError(f"--tensor-parallel must be at least 1, found {n}")
    if args.n_kv_heads % n:
        div = [d for d in range(2, args.n_kv_heads + 1) if args.n_kv_heads % d == 0]
        raise ConfigError(f"--tensor-parallel {n}: the model's {args.n_kv_heads} KV heads ({args.n_heads} query "
                          f"heads) do not divide into {n} ranks; give one of {div or [1]}")
    if args.ffn_hidden % n:
        raise ConfigError(f"--tensor-parallel {n}: the model's FFN hidden size {args.ffn_hidden} does not divide "
                          f"into {n} ranks")
    if args.shared_ffn_hidden % n:
        raise ConfigError(f"--tensor-parallel {n}: the model's shared expert hidden size {args.shared_ffn_hidden} "
                          f"does not divide into {n} ranks")
    if args.vocab_size < n:
        raise ConfigError(f"--tensor-parallel {n}: more ranks than the vocabulary's {args.vocab_size} rows")


def rank_args(args: ModelArgs, n: int) -> ModelArgs:
    """One rank's arguments: H/N query heads, KV/N KV heads, F/N hidden features (head_dim kept; a mixture's
    every expert and its shared expert split alike, its router whole on every rank)."""
    check_tensor_parallel(args, n)
    return dataclasses.replace(args, n_heads=args.n_heads // n, n_kv_heads=args.n_kv_heads // n,
                               head_dim=args.head_dim, ffn_hidden=args.ffn_hidden // n,
                               shared_ffn_hidden=args.shared_ffn_hidden // n)


def vocab_rows(vocab: int, n: int, r: int) -> tuple[int, int]:
    """Rank r's vocabulary rows [lo, hi): ceil(vocab / n) each, the last rank the rest."""
    per = -(-vocab // n)
    return min(r * per, vocab), min((r + 1) * per, vocab)


def shard_range(args: ModelArgs, local: str, n: int, r: int) -> tuple[str, int, int]:
    """(split, lo, hi) of tensor ``local`` on rank r: rows (ROWS, also a vocabulary's) or columns (COLS)
    [lo, hi), or whole (WHOLE, 0, 0)."""
    t = tensor_def(args, local)
    if t.split == WHOLE or n == 1:
        return WHOLE, 0, 0
    if t.split == VOCAB:
        return (ROWS, *vocab_rows(args.vocab_size, n, r))
    full = t.shape(args)[0 if t.split == ROWS else 1]
    per = full // n  # heads and hidden features divide (check_tensor_parallel)
    return t.split, r * per, (r + 1) * per


def shard_shape(args: ModelArgs, local: str, shape: tuple[int, ...], n: int, r: int) -> tuple[int, ...]:
    split, lo, hi = shard_range(args, local, n, r)
    if split == ROWS:
        return (hi - lo, *shape[1:])
    if split == COLS:
        return (shape[0], hi - lo)
    return tuple(shape)
