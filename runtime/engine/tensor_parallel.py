"""One tensor-parallel rank's weights and collectives (issue 21; model/shards.py is the split).

``RankShard`` says which bytes of each group rank r of N uses and binds them as that rank's tensors:
  - a format-3 image packed for N (``pack --tensor-parallel N``): shard r's extent, contiguous, so the
    rank copies only its 1/N of every group over its own link;
  - a plain image: the whole group's extent, sliced on the host (views: row shards are contiguous, column
    shards strided), so on CUDA every rank copies whole groups: N times the bytes of a packed image (the
    plan says so). On the CPU nothing is copied either way.
``Collectives`` is the model's ``Parallel`` seam (model/passes.py ``forward_groups``) over torch.distributed:
the input tokens broadcast from rank 0 (rank 0 samples; every rank samples the same all-gathered logits with
the same seeded generator, so each rank's control flow stays that of rank 0), an all-reduce after the
embedding, attention and the FFN, and an all-gather of the logits' vocabulary rows.
``rank_image`` is the image as one rank's plan sees it: its own model arguments (H/N, KV/N heads: the KV
cache is the rank's shard) and the bytes it moves per group. Runs in each rank process (the planning
helpers also in the launching process).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F

from model.arch import EMBED
from model.errors import ConfigError
from model.shards import COLS, ROWS, rank_args, shard_range, vocab_rows
from model.transformer import Weights, embed_forward
from runtime.format.image import TORCH_DTYPES, Image, tensor_views


def check_image(image: Image, n: int) -> None:
    """What a run of ``n`` ranks refuses of ``image``, one line each, before anything starts."""
    rank_args(image.args, n)  # KV heads and FFN hidden size divide
    tp = image.tensor_parallel
    if tp > 1 and tp != n:
        raise ConfigError(f"{image.path} is packed for --tensor-parallel {tp} (format 3): run it with "
                          f"--tensor-parallel {tp}, or pack it again")
    if n > 1 and image.quantized:
        raise ConfigError(f"--tensor-parallel {n}: {image.path} holds quantized tensors, which are not split "
                          f"into shards yet; use an image of plain weights")


class RankShard:
    """Rank ``rank`` of ``n``'s part of every group of ``image`` (see the module docstring)."""

    def __init__(self, image: Image, rank: int, n: int) -> None:
        check_image(image, n)
        self.image, self.rank, self.n = image, rank, n
        self.args = rank_args(image.args, n)
        self.packed = image.tensor_parallel == n > 1
        self.specs = {g: s.shard(rank) if self.packed else s for g, s in image.groups.items()}
        self.vocab = vocab_rows(image.args.vocab_size, n, rank)

    def extent(self, group: str) -> tuple[int, int]:
        """(offset within the group's extent, bytes) this rank reads and copies."""
        s = self.specs[group]
        return (s.offset, s.size) if self.packed else (0, s.size)

    def views(self, group: str, buf: torch.Tensor) -> Weights:
        """This rank's tensors of ``group`` over ``buf``, the bytes of its extent."""
        views = tensor_views(self.specs[group], buf)
        if self.packed or self.n == 1:
            return views
        out = {}
        for name, t in views.items():
            split, lo, hi = shard_range(self.image.args, name, self.n, self.rank)
            out[name] = t[lo:hi] if split == ROWS else t[:, lo:hi] if split == COLS else t
        return out

    def embed(self, tokens: torch.Tensor, w: Weights, dtype: torch.dtype | None = None) -> torch.Tensor:
        """tokens (B, S) -> (B, S, dim): the rows of this rank's vocabulary, zero for the others' tokens (the
        forward all-reduces them: model.passes.forward_groups)."""
        return embed_forward(tokens, w, dtype, rows=self.vocab)

    def bytes_moved(self) -> int:
        """Bytes of one pass's groups this rank uses (its extents, all groups)."""
        return sum(self.extent(g)[1] for g in self.image.groups)


def rank_image(image: Image, n: int) -> Image:
    """``image`` as a rank's plan sees it: its arguments (``rank_args``) and, as each group's size, the largest
    extent a rank moves of it. For planning only: its tensors are not a rank's."""
    view = copy.copy(image)
    view.args = rank_args(image.args, n)
    shards = [RankShard(image, r, n) for r in range(n)]
    view.groups = {g: dataclasses.replace(s, size=max(sh.extent(g)[1] for sh in shards))
                   for g, s in image.groups.items()}
    return view


class RankWeights:
    """``--mode full`` for a rank: its shard of every group read once (verified) and held on its device."""

    def __init__(self, image: Image, shard: RankShard, device: torch.device) -> None:
        self.image, self.args, self.shard, self.device = image, shard.args, shard, torch.device(device)
        self.dtype, self.kv_offload, self.client, self.load_ms = TORCH_DTYPES[image.dtype], False, None, {}
        self.groups: dict[str, Weights] = {}
        for g in image.groups:
            off, n = shard.extent(g)
            buf = torch.frombuffer(image.read_group(g), dtype=torch.uint8)[off:off + n]
            self.groups[g] = {k: v.to(self.device).contiguous() for k, v in shard.views(g, buf).items()}

    @property
    def pinned_bytes(self) -> int:
        return 0

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.shard.embed(tokens, self.groups[EMBED], self.dtype)

    def get(self, group: str) -> Weights:
        return self.groups[group]

    def close(self) -> None:
        pass


class Collectives:
    """model.passes.Parallel over the default torch.distributed process group (gloo on the CPU, NCCL on CUDA)."""

    def __init__(self, rank: int, n: int, vocab: int) -> None:
        self.rank, self.n, self.vocab = rank, n, vocab
        self.per = -(-vocab // n)  # vocabulary rows a rank holds at most (model.shards.vocab_rows)
        self.reduced_bytes = 0  # what the all-reduces carried (each rank's contribution), for the report

    def tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        tokens = tokens.contiguous()
        dist.broadcast(tokens, src=0)
        return tokens

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        x = x.contiguous()
        dist.all_reduce(x)
        self.reduced_bytes += x.nbytes
        return x

    def gather_logits(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        rows = x.shape[-1]
        if rows < self.per:  # the last rank's shard may be short: pad to the common size, cut after
            x = F.pad(x, (0, self.per - rows))
        parts = [torch.empty_like(x) for _ in range(self.n)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)[..., :self.vocab]
