"""The KV cache and where attention runs: the engine's side of model.transformer's one seam,
``cache.attend(layer, q, k, v, queries)``.

``KVCache`` keeps each layer's keys and values on the compute device, in blocks of ``block_tokens`` slots,
and chooses the attention path for each call: the plainly causal flash kernel for a first prefill chunk, a
masked one (folded over grouped KV heads) for later chunks and left-padded batches, and with ``topk_blk``
decode attention over the best-scoring blocks only (Quest); a decode step at static shapes (``DecodeStep``,
which runtime/engine/graphs.py replays from CUDA graphs) writes and attends by device tensors only.
``TieredKVCache`` keeps the cache in DRAM (registered with CUDA) and copies each layer's blocks to one of two
device buffers around its attention (runtime/engine/copy2d.py: one 2-D DMA per copy); with host attention some
layers' decode attention runs on the CPU where the cache lives (FlexGen). docs/DESIGN.md, "The KV cache", has
the costs. Runs in the client.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from model import cpu_simd
from model.args import ModelArgs
from model.groups import host_layer_count, spread_layers
from model.transformer import Queries, RowQueries
from runtime.engine.copy2d import copy_2d


@dataclasses.dataclass(frozen=True)
class RowTree:
    """A token tree inside a continuous batch's pass (runtime/engine/scheduler.py: speculative decoding of that
    row): row ``row``'s columns [col, col + n) are the tree's n nodes, at slots [base, base + n) (the root, the
    row's latest token, at ``base``). Their RowQueries ``visible`` is base - 1 (the row's slots before the tree);
    ``visible`` here (n, n) bool, on the cache's device, adds the tree slots each node sees (its ancestors and
    itself)."""

    row: int
    col: int
    base: int
    visible: torch.Tensor


@dataclasses.dataclass(frozen=True)
class TreeRowQueries(RowQueries):
    """RowQueries with token trees in some rows (``RowTree``)."""

    trees: tuple[RowTree, ...] = ()


@dataclasses.dataclass(frozen=True)
class DecodeStep(RowQueries):
    """A decode step at static shapes, as a CUDA graph replays it (runtime/engine/graphs.py): the RowQueries of one
    query per sequence, every one at the cache slot the device tensor ``slot`` (1,) int64 holds (``slots`` and
    ``visible`` are it, expanded; a continuous batch's step, ``of_rows``: each row at its own, ``slot`` (B,); a
    token tree's, ``of_tree``: one sequence's S queries at ``slot`` (S,)), so that no Python number of the pass
    changes from step to step. It attends to
    the cache's first ``end`` slots (the step's KV-length bucket; ``lo``, ``hi``: 0 and ``end``), of which
    ``mask`` (B, 1, 1, end) bool marks [pad[b], slot]: a left-padded batch's padding is masked, its rotary
    positions are slot - pad[b] (``additive``: the mask as attention's float bias). ``KVCache.attend_step`` attends
    it."""

    slot: torch.Tensor
    mask: torch.Tensor
    per_row: bool = False  # ``slot`` (B,): row b's (a continuous batch's); else (S,): every sequence's S queries'

    @classmethod
    def at(cls, slot: torch.Tensor, pad: torch.Tensor, keys: int) -> DecodeStep:
        """The step at ``slot`` (1,) of the sequences left-padded by ``pad`` (B,) over ``keys`` slots: built on the
        device from the two tensors (in a captured graph, at every replay)."""
        k = torch.arange(keys, device=slot.device)
        mask = ((k <= slot) & (k >= pad.view(-1, 1))).view(-1, 1, 1, keys)  # (B, 1, 1, L)
        at = slot.expand(pad.shape[0], 1)  # (B, 1)
        return cls((slot - pad).view(-1, 1), at, at, keys, 0, keys, slot, mask)

    @classmethod
    def of_rows(cls, slots: torch.Tensor, seen: torch.Tensor, positions: torch.Tensor, keys: int) -> DecodeStep:
        """A continuous batch's step (runtime/engine/scheduler.py) over ``keys`` slots: row b writes at slot
        ``slots[b]``, sees slots [0, seen[b]] and sits at rotary position ``positions[b]`` (all (B,) int64 on the
        device; a free row writes the scratch slot and sees slot 0)."""
        k = torch.arange(keys, device=slots.device)
        mask = (k <= seen.view(-1, 1)).view(-1, 1, 1, keys)
        at = slots.view(-1, 1)
        return cls(positions.view(-1, 1), at, seen.view(-1, 1), keys, 0, keys, slots, mask, per_row=True)

    @classmethod
    def of_tree(cls, slots: torch.Tensor, positions: torch.Tensor, base: torch.Tensor, visible: torch.Tensor,
                keys: int) -> DecodeStep:
        """One sequence's S queries over ``keys`` slots, a token tree's nodes or a causal chunk (speculative
        decoding's passes, runtime/engine/speculative.py): query i writes at slot ``slots[i]``, sits at rotary
        position ``positions[i]``, sees every slot before ``base`` (1,) and slot base + j where ``visible[i, j]``
        ((S, W) bool). All on the device: the mask is built at every replay."""
        k = torch.arange(keys, device=slots.device)
        rel = k - base  # (L,)
        width = visible.shape[1]
        inside = (rel >= 0) & (rel < width)
        mask = (rel < 0) | (visible[:, rel.clamp(0, width - 1)] & inside)  # (S, L)
        at = slots.view(1, -1)
        return cls(positions.view(1, -1), at, at, keys, 0, keys, slots, mask.view(1, 1, -1, keys))

    def additive(self, dtype: torch.dtype) -> DecodeStep:
        """This step with its mask as attention's additive one (0 where a key is seen, -inf elsewhere) of the
        queries' ``dtype``: SDPA converts a bool mask so at every call, i.e. every layer."""
        bias = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
        return dataclasses.replace(self, mask=bias.masked_fill_(~self.mask, float("-inf")))


class KVCache:
    """Per-layer key/value tensors (B, max_len, n_kv_heads, head_dim) on one device.

    ``attend`` takes a layer's tensors with ``acquire(layer)`` and hands them back with
    ``release(layer, start, s, pad)`` once it has written slots [start, start+s): a subclass keeps them elsewhere
    between uses (``TieredKVCache``). Where a pass's queries sit and what they see is the pass's own
    (``model.transformer.Queries``, the argument of ``attend``), not the cache's. The cache is cut into blocks
    of ``block_tokens`` slots; with ``topk_blk`` set, a decode step attends only to the best-scoring blocks
    (``topk_blocks``), scored from per-block per-channel key minima and maxima kept here (Quest); ``topk_blk``
    None is exact attention. ``attn_ms`` accumulates decode-step attention time when ``profile`` is set
    (synchronising the device)."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, block_tokens: int = 64, topk_blk: int | None = None,
                 window_blocks: int = 2, alloc: bool = True) -> None:
        if block_tokens < 1:
            raise ValueError(f"--kv-block-tokens must be at least 1, found {block_tokens}")
        if topk_blk is not None and topk_blk < 1:
            raise ValueError(f"--topk-blk must be at least 1, found {topk_blk}")
        # slots rounded up to whole blocks, so blocks are views (top-k gathers only the blocks it reads)
        shape = (batch, -(-max_len // block_tokens) * block_tokens, args.n_kv_heads, args.head_dim)
        self.shape, self.dtype, self.device, self.n_layers = shape, dtype, torch.device(device), args.n_layers
        self.n_rep = args.n_rep
        if alloc:
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.max_len, self.block_tokens = max_len, block_tokens
        self.topk_blk, self.window_blocks = topk_blk, window_blocks
        n_blocks = -(-max_len // block_tokens)
        if topk_blk is not None:  # per block and channel: min and max of the keys written so far
            sshape = (batch, n_blocks, args.n_kv_heads, args.head_dim)
            self.kmin = [torch.full(sshape, float("inf"), device=device) for _ in range(args.n_layers)]
            self.kmax = [torch.full(sshape, float("-inf"), device=device) for _ in range(args.n_layers)]
        self._mask: tuple[Queries, tuple[int, int], torch.Tensor | None] | None = None  # mask_for's latest
        self.profile, self.attn_ms, self.attended_blocks, self.total_blocks = False, 0.0, 0, 0
        self.h2d_bytes = self.d2h_bytes = 0  # KV bytes moved each way (TieredKVCache; none here)
        self.host_ms = self.host_wait_ms = 0.0  # host attention: the CPU's attention, its wait for q, k, v

    @property
    def host_bytes(self) -> int:
        """Bytes of the cache held in host memory (TieredKVCache's store)."""
        return 0

    def attends_on_host(self, layer: int) -> bool:
        """Whether this layer's decode attention runs where the cache lives (TieredKVCache.attend_on_host)."""
        return False

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, queries: Queries,
               simd=None) -> torch.Tensor:
        """The seam model.transformer's attention meets the cache through. q (B, S, n_heads, hd), k and v (B, S, n_kv,
        hd) of the queries laid out as ``queries`` says (plain: at slots [start, start+S)), rotated: writes k and v
        into the cache and returns the attention output (B, S, n_heads x hd), by the path this cache and call
        choose (module docstring). ``simd``: model/cpu_simd.c's library, which the caller's weights use (a CPU
        decode step over tiled weights): a plain float32 decode step's exact attention by it."""
        if isinstance(queries.rows, DecodeStep):
            return self.attend_step(layer, q, k, v, queries.rows)
        b, s = q.shape[:2]
        start, pad, rows = queries.start, queries.pad, queries.rows
        if simd is not None and s == 1 and pad is None and rows is None and queries.tree is None \
                and self.topk_blk is None and not self.profile and q.device.type == "cpu" and q.dtype == torch.float32 \
                and not self.attends_on_host(layer):  # a plain CPU decode step: model/cpu_simd.c writes and attends
            ck, cv = self.acquire(layer)
            if ck.dtype == torch.float32 and ck.is_contiguous() and cv.is_contiguous():
                out = cpu_simd.decode_attention(simd, q, k, v, ck, cv, start)
                self.release(layer, start, s, pad)
                return out
        on_host = s == 1 and queries.tree is None and rows is None and self.attends_on_host(layer)  # CPU attention
        if rows is not None:  # a continuous batch: every row's keys and values to its own slots
            ck, cv = self.acquire(layer)
            r = torch.arange(b, device=ck.device).view(b, 1).expand(b, s)
            ck[r, rows.slots] = k
            cv[r, rows.slots] = v
            self.release(layer, rows.lo, rows.hi - rows.lo)
        elif not on_host:
            ck, cv = self.acquire(layer)
            ck[:b, start:start + s] = k
            cv[:b, start:start + s] = v
            self.release(layer, start, s, pad)
        end = start + s if rows is None else rows.end
        qt = q.transpose(1, 2)  # (B, n_heads, S, hd)
        timed = self.profile and s == 1
        if timed:
            _sync(q.device)
            t0 = time.perf_counter()
        blocks = self.topk_blocks(layer, qt, end) if s == 1 and self.topk_blk is not None and rows is None else None
        if on_host:
            out = self.attend_on_host(layer, qt, k, v, start, pad)
        elif blocks is not None:
            out = _block_attention(qt, ck, cv, blocks, end, pad, self)
        else:
            if s == 1 and self.topk_blk is not None:
                n = b * k.shape[2] * -(-end // self.block_tokens)
                self.attended_blocks, self.total_blocks = self.attended_blocks + n, self.total_blocks + n
            keys = ck[:b, :end].transpose(1, 2)  # (B, n_kv, end, hd)
            values = cv[:b, :end].transpose(1, 2)
            mask = self.mask_for(queries, s, self.n_rep)  # None: no padding and a plainly causal chunk or decode
            if mask is not None and self.n_rep > 1:
                out = _folded_gqa_attention(qt, keys, values, mask[:b])
            else:  # a first chunk without padding is plainly causal: flash kernels, no S x S mask
                out = F.scaled_dot_product_attention(qt, keys, values, attn_mask=None if mask is None else mask[:b],
                                                     is_causal=mask is None and s > 1, enable_gqa=self.n_rep > 1)
        if timed:
            _sync(q.device)
            self.attn_ms += (time.perf_counter() - t0) * 1e3
        return out.transpose(1, 2).reshape(b, s, -1)  # (B, S, n_heads x hd)

    def attend_step(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    step: DecodeStep) -> torch.Tensor:
        """``attend`` for a decode step at static shapes (``DecodeStep``, runtime/engine/graphs.py), where a CUDA
        graph may replay it: k and v written at the slot the device tensor holds (index_copy_), then attention
        over the step's first ``end`` slots under its mask. Nothing here synchronises, takes a Python number from
        the device or keeps state between calls (no mask_for memo); so exact attention on the device cache only
        (no top-k blocks)."""
        if self.topk_blk is not None:
            raise ValueError("a static decode step attends exactly: not with --topk-blk")
        b, s, n = q.shape[0], q.shape[1], step.end
        ck, cv = self.acquire(layer)
        if step.per_row:  # a continuous batch: each row at its own slot
            r = torch.arange(b, device=ck.device)
            ck[r, step.slot] = k[:, 0].to(ck.dtype)
            cv[r, step.slot] = v[:, 0].to(cv.dtype)
        else:  # every sequence's queries at the same slots
            ck[:b].index_copy_(1, step.slot, k.to(ck.dtype))
            cv[:b].index_copy_(1, step.slot, v.to(cv.dtype))
        keys, values = ck[:b, :n].transpose(1, 2), cv[:b, :n].transpose(1, 2)  # (B, n_kv, L, hd)
        mask = step.mask if step.mask.dtype in (torch.bool, q.dtype) else step.mask.to(q.dtype)
        mask = mask if s == 1 or self.n_rep == 1 else mask.repeat(1, 1, self.n_rep, 1)  # folded rows
        out = _folded_gqa_attention(q.transpose(1, 2), keys, values, mask)
        return out.transpose(1, 2).reshape(b, s, -1)  # (B, S, n_heads x hd)

    def nbytes(self) -> int:
        return 2 * self.n_layers * math.prod(self.shape) * self.dtype.itemsize

    def acquire(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]

    def release(self, layer: int, start: int, s: int, pad: torch.Tensor | None = None) -> None:
        if self.topk_blk is not None:
            self._summarise(layer, start, s, pad)

    def _summarise(self, layer: int, start: int, s: int, pad: torch.Tensor | None) -> None:
        """Refresh the min/max summaries of the blocks that slots [start, start+s) touch (the padding slots of a
        left-padded batch, ``pad``, left out)."""
        bt = self.block_tokens
        first, last = start // bt, (start + s - 1) // bt
        lo, hi = first * bt, (last + 1) * bt  # the cache holds whole blocks
        k = self.k_for_summary(layer)[:, lo:hi].float()  # (B, span, n_kv, hd)
        slot = torch.arange(lo, hi, device=k.device).view(1, -1)
        valid = slot < start + s  # slots not written yet are left out
        if pad is not None:
            valid = valid & (slot >= pad.view(-1, 1))
        k = k.view(k.shape[0], -1, bt, *k.shape[2:])  # (B, blocks, bt, n_kv, hd)
        v = valid.view(valid.shape[0], -1, bt, 1, 1)
        self.kmin[layer][:, first:last + 1] = torch.where(v, k, float("inf")).amin(2)
        self.kmax[layer][:, first:last + 1] = torch.where(v, k, float("-inf")).amax(2)

    def k_for_summary(self, layer: int) -> torch.Tensor:
        return self.k[layer]

    def mask_for(self, queries: Queries, s: int, rep: int = 1) -> torch.Tensor | None:
        """Bool mask (B or 1, 1, rep x S, start+S) of the pass's S queries (plain: at slots [start, start+S)),
        each KV head's ``rep`` query heads folded into rows (``_folded_gqa_attention``); None where none is
        needed (no padding, and a first chunk, which is plainly causal, or a decode query). Cached: the layers
        of one pass build it once. In a left-padded batch query i of sequence b sees key slots [pad[b],
        start+i], and a padding query sees itself only (so its row stays finite; no real token ever sees it).
        A token tree's node sees the slots before the tree and its row of ``tree.visible``; a continuous
        batch's (``rows``, RowQueries) query j of row b that row's slots [0, rows.visible[b, j]]."""
        if self._mask is not None and self._mask[0] is queries and self._mask[1] == (s, rep):
            return self._mask[2]
        start, pad, tree, rows = queries.start, queries.pad, queries.tree, queries.rows
        end = start + s if rows is None else rows.end
        q = torch.arange(start, start + s, device=self.device).view(1, s, 1)
        k = torch.arange(end, device=self.device).view(1, 1, end)
        if rows is not None:
            mask = k <= rows.visible.unsqueeze(-1)  # (B, S, end)
            for t in getattr(rows, "trees", ()):
                n = t.visible.shape[0]
                mask[t.row, t.col:t.col + n, t.base:t.base + n] = t.visible
        elif tree is not None:  # a token tree: the prefix before its base, then its row of visible
            if pad is not None:
                raise ValueError("a token tree is verified for one sequence, not a padded batch")
            mask = torch.cat((torch.ones(s, tree.base, dtype=torch.bool, device=self.device), tree.visible), 1)[None]
        elif pad is not None:
            mask = ((k >= pad.view(-1, 1, 1)) & (k <= q)) | (k == q)
        elif s > 1 and start > 0:  # a later chunk: query i sits at slot start+i and sees keys [0, start+i]
            mask = k <= q
        else:
            mask = None
        if mask is not None:
            mask = mask.unsqueeze(1).repeat(1, 1, rep, 1) if rep > 1 else mask.unsqueeze(1)
        self._mask = (queries, (s, rep), mask)
        return mask

    def keep(self, slots: list[int], at: int, row: int | None = None) -> None:
        """Speculative decoding's accepted path: move the KV entries of ``slots`` (increasing, each >= its
        destination) to consecutive slots from ``at``, in every layer, of every sequence or of sequence ``row``
        only (a continuous batch's); slots after them are free again."""
        if self.topk_blk is not None:
            raise ValueError("--topk-blk's block summaries are not kept through a token tree")
        src = torch.tensor(slots, dtype=torch.long, device=self.device)
        rows = slice(None) if row is None else row
        for t in (*self.k, *self.v):
            t[rows, at:at + len(slots)] = t[rows, src]

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Prompt reuse (runtime/engine/prefix.py): sequence ``dst``'s slots [0, n) become a copy of sequence
        ``src``'s, in every layer (on the device: 2 x layers copies)."""
        if self.topk_blk is not None:
            raise ValueError("--topk-blk's block summaries are not copied between sequences")
        for t in (*self.k, *self.v):
            t[dst, :n] = t[src, :n]

    def topk_blocks(self, layer: int, q: torch.Tensor, end: int) -> torch.Tensor | None:
        """Block ids (B, n_kv, M) a decode query q (B, n_heads, 1, hd) at slot end-1 attends to: the first
        block, the ``window_blocks`` most recent and the ``topk_blk`` best of the others by the upper bound
        sum_c max(q_c min_c, q_c max_c) (the largest over the query heads of a KV head); None when that
        would be every block (then attention is exact)."""
        bt, k = self.block_tokens, self.topk_blk
        n = -(-end // bt)  # blocks holding slots [0, end)
        if n <= 1 + self.window_blocks + k:
            return None
        b, n_heads, _, hd = q.shape
        n_kv = self.kmin[layer].shape[2]
        qg = q.float().view(b, n_kv, n_heads // n_kv, hd)  # (B, n_kv, rep, hd)
        lo = self.kmin[layer][:, 1:n - self.window_blocks].permute(0, 2, 1, 3)  # (B, n_kv, cand, hd)
        hi = self.kmax[layer][:, 1:n - self.window_blocks].permute(0, 2, 1, 3)
        ub = torch.maximum(qg.unsqueeze(3) * lo.unsqueeze(2), qg.unsqueeze(3) * hi.unsqueeze(2)).sum(-1)
        best = ub.amax(2).topk(k, dim=-1).indices + 1  # (B, n_kv, k): candidate blocks start at block 1
        # block 0 and the recent window, made on the device: torch.tensor(list, device=cuda) is a pageable copy
        # that waits for the GPU to catch up, in every layer of every step
        fixed = torch.arange(n - self.window_blocks - 1, n, device=q.device)
        fixed[0] = 0
        return torch.cat([fixed.view(1, 1, -1).expand(b, n_kv, -1), best], dim=-1)


class HostStore:
    """A zeroed host tensor of exactly its size, registered with CUDA (page-locked) when ``pin``: PyTorch's
    pinned allocator (``pin_memory=True``) rounds every allocation up to a power of two, so an offloaded
    batch-32 cache's 136 MB layers took 256 MB each (16.4 GB pinned for 8.7 GB), and pins under the driver's
    global lock. Here the pages are allocated and zeroed by PyTorch's CPU allocator (in parallel), then
    registered in one call; the registration is given back (after the device's pending work) when the store
    is collected, before its memory is freed."""

    PAGE = 4096

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> None:
        self.nbytes = math.prod(shape) * dtype.itemsize
        self.pinned = 0
        if not (pin and self.nbytes):
            self.tensor = torch.zeros(shape, dtype=dtype)
            return
        import weakref

        # whole pages registered: the tensor starts on a page boundary of a buffer a page longer than needed
        size = -(-self.nbytes // self.PAGE) * self.PAGE
        raw = torch.zeros(size + self.PAGE, dtype=torch.uint8)
        off = -raw.data_ptr() % self.PAGE
        self.tensor = raw[off:off + self.nbytes].view(dtype).view(shape)
        ptr = raw.data_ptr() + off
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 0))
        if err:  # PyTorch's pinned allocator instead: rounded up, but pinned
            import sys

            print(f"note: cudaHostRegister of the offloaded KV cache ({size} bytes) failed with CUDA error {err}; "
                  f"pinned by PyTorch's allocator instead", file=sys.stderr)
            del raw, self.tensor
            self.tensor = torch.zeros(shape, dtype=dtype, pin_memory=True)
            self.pinned = self.nbytes
            return
        self.pinned = size
        fin = weakref.finalize(self, HostStore._unregister, ptr, raw, torch.cuda.current_device())
        fin.atexit = False  # at exit the process's pages go anyway; CUDA may be torn down by then

    @staticmethod
    def _unregister(ptr: int, _tensor: torch.Tensor, device: int) -> None:  # the tensor is held until unpinned
        torch.cuda.synchronize(device)  # no copy may still read or write the pages
        torch.cuda.cudart().cudaHostUnregister(ptr)


class TieredKVCache(KVCache):
    """The KV cache in DRAM (pinned on CUDA), each layer's blocks copied to one of two device buffers before
    the layer's attention and its new slots copied back after it, on a copy stream: the next layer's blocks
    are fetched into the other buffer while this layer's attention and FFN run (consecutive layers always
    use different buffers, also across passes with an odd layer count). Only the blocks holding written
    slots move. Counts the bytes moved each way (``h2d_bytes``, ``d2h_bytes``). On the CPU the same moves
    are plain copies.

    ``host_layers`` of the layers (spread evenly, ``spread_layers``) are attended on the host when decoding
    (``attend_on_host``): their cache never crosses the link after prefill, the others' is read back each
    step, so the CPU's and the link's shares of the step's KV bytes can be balanced.

    Stored head-major, (B, n_kv, slots, hd) per layer, host and device buffers alike, and seen through (B,
    slots, n_kv, hd) views: each sequence's and KV head's keys are contiguous, the layout the CPU's
    attention reads fastest (2x slot-major's rate with the weight stream's DMA busy,
    benchmarks/host_attention_probe.py), and a range of slots of every sequence and head is B x n_kv rows at
    one pitch, so each copy is one 2-D DMA (runtime.engine.copy2d; PyTorch would stage a strided copy through
    pageable memory, 3 GB/s)."""

    def __init__(self, args: ModelArgs, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str,
                 host_attention: bool | int | str | None = None, device_rows: int | None = None, **kw) -> None:
        super().__init__(args, batch, max_len, dtype, device, alloc=False, **kw)
        n_host = host_layer_count(host_attention, args.n_layers)
        if n_host and self.topk_blk is not None:
            raise ValueError("host attention and top-k blocks do not go together")
        self.host_layers = spread_layers(n_host, args.n_layers)
        # attend_on_host's latest mask: for (B, end) and a padding (its host copy made with it)
        self._host_mask: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None
        self.out_done: list[torch.cuda.Event | None] = [None] * args.n_layers  # copies into the host cache
        self.qkv_host: torch.Tensor | None = None  # pinned staging of a decode step's q, k, v (host attention)
        self.out_host: torch.Tensor | None = None  # pinned staging of its attention output, copied back async
        self.cuda = self.device.type == "cuda"
        b, slots, n_kv, hd = self.shape
        store = (b, n_kv, slots, hd)
        # device_rows < batch: only sub_batch prefills of that many sequences use the buffers (every layer
        # attended on the host; runtime.engine.batching.kv_device_rows)
        self.device_rows = b if device_rows is None else device_rows
        if not 1 <= self.device_rows <= b or (self.device_rows < b and len(self.host_layers) < args.n_layers):
            raise ValueError(f"device rows {self.device_rows} for a batch of {b}: fewer than the batch only when "
                             f"every layer is attended on the host")
        buf = (self.device_rows, n_kv, slots, hd)
        self.host_store = HostStore((2, args.n_layers, *store), dtype, pin=self.cuda)
        self.store_k = list(self.host_store.tensor[0].unbind(0))
        self.store_v = list(self.host_store.tensor[1].unbind(0))
        self.buf_store_k = [torch.zeros(buf, dtype=dtype, device=device) for _ in range(2)]
        self.buf_store_v = [torch.zeros(buf, dtype=dtype, device=device) for _ in range(2)]
        self.host_k = [t.transpose(1, 2) for t in self.store_k]  # (B, slots, n_kv, hd) views
        self.host_v = [t.transpose(1, 2) for t in self.store_v]
        self.buf_k = [t.transpose(1, 2) for t in self.buf_store_k]
        self.buf_v = [t.transpose(1, 2) for t in self.buf_store_v]
        self.loaded: list[int | None] = [None, None]  # the layer each buffer holds
        self.current = 1  # the buffer of the layer last acquired (the first layer goes to buffer 0)
        self.ready: list[torch.cuda.Event | None] = [None, None]  # copy finished (CUDA)
        self.written = [0] * args.n_layers  # slots [0, written) of each layer hold tokens
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.h2d_bytes = self.d2h_bytes = 0
        self.host_ms = self.host_wait_ms = 0.0  # attend_on_host: the CPU's attention, and its wait for q, k, v
        self.length: int | None = None  # a sub_batch's prompt slots: once written, it prefetches nothing
        self.row_bytes = math.prod(self.shape[2:]) * self.host_k[0].element_size()

    def attends_on_host(self, layer: int) -> bool:
        return layer in self.host_layers

    def attend_step(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    step: DecodeStep) -> torch.Tensor:
        raise ValueError("a static decode step needs the whole KV cache on the device, not offloaded")

    @property
    def host_bytes(self) -> int:
        return self.host_store.nbytes

    def _buffer_of(self, layer: int) -> int | None:
        return next((b for b in (0, 1) if self.loaded[b] == layer), None)

    def _fetch(self, layer: int, b: int) -> None:
        """Copy layer's written blocks into buffer b (on the copy stream, after the compute that used that
        buffer last)."""
        bt = self.block_tokens
        rows = min(-(-self.written[layer] // bt) * bt, self.max_len)
        if self.cuda:
            used = torch.cuda.Event()
            used.record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(used)
                self._copy_in(layer, b, rows)
                ev = torch.cuda.Event()
                ev.record(self.copy_stream)
            self.ready[b] = ev
        else:
            self._copy_in(layer, b, rows)
        self.loaded[b] = layer

    def _copy_in(self, layer: int, b: int, rows: int) -> None:
        if rows:
            copy_2d(self.buf_store_k[b][:, :, :rows], self.store_k[layer][:, :, :rows], self.copy_stream)
            copy_2d(self.buf_store_v[b][:, :, :rows], self.store_v[layer][:, :, :rows], self.copy_stream)
            self.h2d_bytes += 2 * rows * self.row_bytes * self.shape[0]

    def acquire(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = self._buffer_of(layer)
        if b is None:  # not prefetched (the first use): the buffer the previous layer did not use
            b = 1 - self.current
            self._fetch(layer, b)
        self.current = b
        if self.cuda and self.ready[b] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[b])
        return self.buf_k[b], self.buf_v[b]

    def k_for_summary(self, layer: int) -> torch.Tensor:
        return self.buf_k[self._buffer_of(layer)]

    def release(self, layer: int, start: int, s: int, pad: torch.Tensor | None = None) -> None:
        super().release(layer, start, s, pad)
        b, end = self._buffer_of(layer), start + s
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(done)
                self._copy_out(layer, b, start, end)
        else:
            self._copy_out(layer, b, start, end)
        self.written[layer] = max(self.written[layer], end)
        nxt = (layer + 1) % self.n_layers
        while s == 1 and nxt in self.host_layers and nxt != layer:  # decoding: the next layer read back
            nxt = (nxt + 1) % self.n_layers
        if self.length is not None and end >= self.length:  # a sub-batch's prefill is done: no pass follows
            return
        if self._buffer_of(nxt) is None:
            self._fetch(nxt, 1 - b)  # into the other buffer, while this layer's attention and FFN run

    def keep(self, slots: list[int], at: int, row: int | None = None) -> None:
        """As KVCache.keep, in the host store and in the device buffers of the layers they hold (once the copies
        into the host store have finished)."""
        if self.cuda:
            self.copy_stream.synchronize()
        src, n = torch.tensor(slots, dtype=torch.long), len(slots)
        rows = slice(None) if row is None else row
        for t in (*self.store_k, *self.store_v):
            t[rows, :, at:at + n] = t[rows, :, src]
        src = src.to(self.device)
        for b in (0, 1):
            if self.loaded[b] is not None:
                for t in (self.buf_store_k[b], self.buf_store_v[b]):
                    t[rows, :, at:at + n] = t[rows, :, src]
        if row is None:
            self.written = [min(w, at + n) for w in self.written]

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """As KVCache.copy_prefix, in the host store (once its copies in have finished); the device buffers
        are fetched again before their next use."""
        if self.cuda:
            self.copy_stream.synchronize()
        for t in (*self.store_k, *self.store_v):
            t[dst, :, :n] = t[src, :, :n]
        self.loaded, self.ready = [None, None], [None, None]

    def _copy_out(self, layer: int, b: int, start: int, end: int) -> None:
        copy_2d(self.store_k[layer][:, :, start:end], self.buf_store_k[b][:, :, start:end], self.copy_stream)
        copy_2d(self.store_v[layer][:, :, start:end], self.buf_store_v[b][:, :, start:end], self.copy_stream)
        self.d2h_bytes += 2 * (end - start) * self.row_bytes * self.shape[0]
        if self.cuda and layer in self.host_layers:  # the host reads these slots when it attends this layer
            self.out_done[layer] = torch.cuda.Event()
            self.out_done[layer].record(self.copy_stream)

    def sub_batch(self, b0: int, b1: int, length: int) -> TieredKVCache:
        """A cache of sequences [b0, b1) of this one, for a prefill that gives each weight pass whole prompts
        of a few sequences (``Generator.forward_by_sequence``): its host store is rows [b0, b1) of this
        store, its device buffers the first b1 - b0 rows of this cache's (no new device memory), or, when it
        has more sequences than those rows but its ``length`` slots each fit their memory, that memory packed
        as (b1 - b0, n_kv, length, hd) (short prompts; the pass must then write every slot it reads, as one
        pass over whole prompts does). Its copy stream is this one's (so its copies keep their order with this
        cache's). Nothing it attends to is read back: its slots start unwritten, and a pass over whole prompts
        writes every slot it reads. ``length``: their slots (padding included), after which no later pass needs a
        layer fetched. Give it back with ``absorb``."""
        import copy

        n, (_, n_kv, slots, hd) = b1 - b0, self.buf_store_k[0].shape
        packed = n > self.device_rows
        if n < 1 or not 0 <= b0 < b1 <= self.shape[0] or (packed and n * length > self.device_rows * slots):
            raise ValueError(f"sub_batch [{b0}, {b1}) of {length} slots, of a batch of {self.shape[0]} with "
                             f"{self.device_rows} device rows of {slots} slots")
        sub = copy.copy(self)
        sub.device_rows = n
        sub.shape = (n, *self.shape[1:])
        sub.store_k = [t[b0:b1] for t in self.store_k]
        sub.store_v = [t[b0:b1] for t in self.store_v]
        if packed:  # same memory, slots of this sub-batch's prompts only
            sub.buf_store_k = [t.view(-1)[:n * n_kv * length * hd].view(n, n_kv, length, hd) for t in self.buf_store_k]
            sub.buf_store_v = [t.view(-1)[:n * n_kv * length * hd].view(n, n_kv, length, hd) for t in self.buf_store_v]
        else:
            sub.buf_store_k = [t[:n] for t in self.buf_store_k]
            sub.buf_store_v = [t[:n] for t in self.buf_store_v]
        sub.host_k = [t.transpose(1, 2) for t in sub.store_k]
        sub.host_v = [t.transpose(1, 2) for t in sub.store_v]
        sub.buf_k = [t.transpose(1, 2) for t in sub.buf_store_k]
        sub.buf_v = [t.transpose(1, 2) for t in sub.buf_store_v]
        if self.topk_blk is not None:
            sub.kmin = [t[b0:b1] for t in self.kmin]
            sub.kmax = [t[b0:b1] for t in self.kmax]
        sub.loaded, sub.current, sub.ready = [None, None], self.current, [None, None]
        sub.written, sub.out_done = [0] * self.n_layers, [None] * self.n_layers
        sub.h2d_bytes = sub.d2h_bytes = 0  # its own copies, added back by absorb
        sub.length = length
        return sub

    def absorb(self, sub: TieredKVCache) -> None:
        """Take back a ``sub_batch`` after its prefill: its slots are written, its copies (on the shared copy
        stream) are this cache's, and this cache's device buffers no longer hold any layer."""
        self.written = [max(a, b) for a, b in zip(self.written, sub.written)]
        self.out_done = [b if b is not None else a for a, b in zip(self.out_done, sub.out_done)]
        self.h2d_bytes += sub.h2d_bytes
        self.d2h_bytes += sub.d2h_bytes
        self.loaded, self.current = [None, None], sub.current  # the next acquire fetches (and waits) anew

    def attend_on_host(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                       pad: torch.Tensor | None) -> torch.Tensor:
        """A decode step's attention where the cache lives (FlexGen's CPU attention): q (B, n_heads, 1, hd),
        the new k and v (B, 1, n_kv, hd) go to the host (one small copy), are written into the host cache at
        slot ``start``, attention runs there over slots [0, start] (each KV head's query heads folded into
        rows, the padding ``pad`` of a left-padded batch masked), and the output (B, n_heads, 1, hd) comes
        back: per layer and step 2 x B x (n_heads + 2 n_kv) x hd elements move instead of the layer's whole
        cache. The caller's device work up to here is waited for (the copy of q, k, v)."""
        b, n_heads, _, hd = q.shape
        n_kv = k.shape[2]
        flat = torch.cat([q.reshape(b, -1), k.reshape(b, -1), v.reshape(b, -1)], dim=1)
        t0 = time.perf_counter()
        if self.cuda:
            if self.out_done[layer] is not None:  # the prefill's slots of this layer must be in the host cache
                self.out_done[layer].synchronize()
                self.out_done[layer] = None
            if self.qkv_host is None or self.qkv_host.shape != flat.shape:
                self.qkv_host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.qkv_host.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            done.synchronize()
            flat = self.qkv_host
            self.d2h_bytes += flat.numel() * flat.element_size()
        t1 = time.perf_counter()
        nq, nk = n_heads * hd, n_kv * hd
        self.host_k[layer][:b, start] = flat[:, nq:nq + nk].view(b, n_kv, hd)
        self.host_v[layer][:b, start] = flat[:, nq + nk:].view(b, n_kv, hd)
        end = start + 1
        self.written[layer] = max(self.written[layer], end)
        keys = self.host_k[layer][:b, :end].transpose(1, 2)  # (B, n_kv, end, hd), a view
        values = self.host_v[layer][:b, :end].transpose(1, 2)
        mask = None
        if pad is not None:  # the same for every layer of a step: built once a step
            if self._host_mask is None or self._host_mask[0] != (b, end) or self._host_mask[1] is not pad:
                host = pad.cpu()  # the device's work up to here is done (above): no wait
                self._host_mask = (b, end), pad, torch.arange(end).view(1, 1, 1, end) >= host[:b].view(-1, 1, 1, 1)
            mask = self._host_mask[2]
        out = _folded_gqa_attention(flat[:, :nq].view(b, n_heads, 1, hd), keys, values, mask)
        self.host_wait_ms += (t1 - t0) * 1e3
        self.host_ms += (time.perf_counter() - t1) * 1e3
        if not self.cuda:
            return out
        # Pinned, so the copy back is a plain DMA on the compute stream (a pageable one is staged by the driver
        # and holds this thread); reused safely: the next layer's call first waits for the stream past it.
        if self.out_host is None or self.out_host.shape != out.shape:
            self.out_host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        self.out_host.copy_(out)
        self.h2d_bytes += out.numel() * out.element_size()
        return self.out_host.to(self.device, non_blocking=True)


def _folded_gqa_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor:
    """Masked attention with grouped KV heads: each KV head's n_rep query heads become n_rep x S query rows
    against that head's keys, under a mask folded the same way (``KVCache.mask_for``) or broadcast over the
    rows (a decode step's, per sequence or per KV head: top-k blocks, host attention). SDPA's
    enable_gqa with a mask takes the math kernel, which expands the keys and values n_rep times and
    materialises the scores (a batch of 64 at 2K tokens: 2 GB a layer); folded, the memory-efficient kernel
    runs with the keys as they are in the cache.
    q (B, n_heads, S, hd); keys, values (B, n_kv, L, hd); mask (B or 1, 1 or n_kv, n_rep x S or 1, L) or None
    -> (B, n_heads, S, hd)."""
    b, n_heads, s, hd = q.shape
    qf = q.reshape(b, keys.shape[1], -1, hd)  # head h = kv * n_rep + j: rows (j, s) of KV head kv
    # reshape, not view: CUDA's memory-efficient kernel returns a (B, rows, heads, hd)-strided tensor
    return F.scaled_dot_product_attention(qf, keys, values, attn_mask=mask).reshape(b, n_heads, s, hd)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _block_attention(q: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor, blocks: torch.Tensor, end: int,
                     pad: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """Decode attention over the chosen blocks only: q (B, n_heads, 1, hd), cache (B, max_len, n_kv, hd),
    blocks (B, n_kv, M) -> (B, n_heads, 1, hd). Slots past ``end`` and padding slots (``pad``) are masked."""
    b, n_kv, m = blocks.shape
    bt, hd = cache.block_tokens, q.shape[-1]
    n_blocks = -(-cache.max_len // bt)
    cache.attended_blocks += blocks.numel()
    cache.total_blocks += b * n_kv * -(-end // bt)

    def gather(t: torch.Tensor) -> torch.Tensor:  # t: the cache's (B, n_blocks * bt, n_kv, hd), no copy
        t = t.view(b, n_blocks, bt, n_kv, hd).permute(0, 3, 1, 2, 4)  # (B, n_kv, blocks, bt, hd)
        idx = blocks.view(b, n_kv, m, 1, 1).expand(b, n_kv, m, bt, hd)
        return t.gather(2, idx).reshape(b, n_kv, m * bt, hd)

    keys, values = gather(ck[:b]), gather(cv[:b])
    slots = (blocks.unsqueeze(-1) * bt + torch.arange(bt, device=q.device)).view(b, n_kv, m * bt)
    valid = slots < end
    if pad is not None:
        valid &= slots >= pad.view(b, 1, 1)
    return _folded_gqa_attention(q, keys, values, valid.unsqueeze(2))  # mask (B, n_kv, 1, m*bt)
