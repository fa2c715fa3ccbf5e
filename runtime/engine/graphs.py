"""CUDA graphs for the decode steps of a model held wholly on its GPU (issue 27 item 1: no Python per kernel on
the hot path).

An eager decode step is hundreds of kernel launches from Python (the 8B-shaped int4 image in ``--mode full``:
48 ms a step on the H200, against about 1.5 ms of its weights over HBM). Where every weight is resident on the
CUDA device at fixed addresses (``InMemoryWeights``) and the KV cache is the plain device one (not offloaded,
exact attention), the step of B sequences x 1 token is run at static shapes instead
(``runtime.engine.kv.DecodeStep``): the token ids, the slot and the padding are device buffers kept for the run;
k and v go to the slot by index_copy_; attention reads the cache's first L slots, L the step's KV-length bucket
(powers of two from MIN_KEYS, then the cache's slots), under a mask built on the device from the slot tensor;
no Python number that changes between steps enters the pass. Such a step is captured in a CUDA graph once per
(batch size, bucket), when first needed, after WARMUP eager runs on a side stream (as torch.cuda.graphs
requires: Triton compiles, cuBLAS sets up), and replayed: per step three small buffer writes, one replay, the
caller's sampling on the device (greedy: an argmax) and one host sync for the tokens. The graphs share one
memory pool (they never run concurrently); each keeps its logits as its static output.

The graphs hold the cache's addresses, so the cache is kept for the run: ``begin`` gives every request the same
one, made anew (and the graphs dropped) only for a batch larger than it holds. A batch decodes at its own size
(``Generator.generate_batch`` keeps a batch whole until every sequence stops), so the graphs are per batch size,
with no padding rows and no KV memory beyond the batch's.

``StaticDecode(gen, capture=False)`` runs the same static step without graphs, on any device: the CPU tests
check it against the eager path. Used by runtime/engine/generate.py (``Generator.generate``, ``generate_batch``,
``--cuda-graphs``); runs in the client process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from model.arch import architecture
from model.transformer import Queries, forward_groups
from runtime.engine.kv import DecodeStep, KVCache
from runtime.engine.weights import InMemoryWeights

if TYPE_CHECKING:
    from runtime.engine.generate import Generator

MIN_KEYS = 256  # the smallest KV-length bucket: a step attends to at least this many slots
WARMUP = 2  # eager runs of a step on a side stream before its capture


def kv_buckets(slots: int) -> list[int]:
    """The KV lengths a step may attend over in a cache of ``slots`` slots: the powers of two from MIN_KEYS below
    ``slots``, then ``slots``."""
    out, n = [], MIN_KEYS
    while n < slots:
        out.append(n)
        n *= 2
    return out + [slots]


def kv_bucket(keys: int, slots: int) -> int:
    """The smallest bucket of a cache of ``slots`` slots that holds ``keys`` slots."""
    if not 1 <= keys <= slots:
        raise ValueError(f"a decode step over {keys} slots: expected 1..{slots}, the cache's slots")
    return next(n for n in kv_buckets(slots) if n >= keys)


def applies(gen: Generator) -> bool:
    """Whether ``gen``'s decode steps can be captured: every weight resident on a CUDA device at fixed addresses
    (an in-memory source, not wrapped: --trace times each group), the KV cache the plain device one with exact
    attention, no attention profiling (it synchronises inside the step), and no mixture of experts (its router's
    choice is read on the host every layer: the step's work is not the same from one step to the next)."""
    return (gen.source.device.type == "cuda" and type(gen.source) is InMemoryWeights and not gen.kv_offload
            and gen.kv.topk_blk is None and not gen.profile_attention and not architecture(gen.args).routed)


class StaticDecode:
    """Decode steps of ``gen``'s requests at static shapes, replayed from CUDA graphs with ``capture`` (module
    docstring), else run as they are (the same computation, for the CPU tests). ``begin`` sets up a request (its
    cache, its padding), ``step`` runs each of its decode steps."""

    def __init__(self, gen: Generator, capture: bool = True) -> None:
        self.gen, self.capture = gen, capture
        self.cache: KVCache | None = None
        self.ids = self.slot = self.pad = None  # the steps' inputs (begin): (rows, 1), (1,), (rows,) int64
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # (B, L) -> graph, logits
        self.pool = None  # the graphs' memory pool, shared

    def begin(self, batch: int, pad: torch.Tensor | None) -> KVCache:
        """A request of ``batch`` sequences, left-padded by ``pad`` (B,) on the device or None: the cache to
        prefill (eagerly) and then decode it in; the same cache as the previous request's unless that one holds
        fewer sequences. Its slots are not cleared: every slot a step sees is written by the request first."""
        g = self.gen
        if self.cache is None or self.cache.shape[0] < batch:
            self.graphs.clear()  # they hold the old cache's addresses
            self.cache = self.pool = None  # freed before the larger cache is made
            dev = g.source.device
            self.cache = KVCache(g.args, batch, g.max_seq_len, g.source.dtype, dev, block_tokens=g.kv.block_tokens)
            self.ids = torch.zeros((batch, 1), dtype=torch.long, device=dev)
            self.slot = torch.zeros(1, dtype=torch.long, device=dev)
            self.pad = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pad.zero_()
        if pad is not None:
            self.pad[:batch].copy_(pad)
        return self.cache

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor | Sequence[int], pos: int) -> torch.Tensor:
        """One decode step of the request ``begin`` set up: ``tokens`` (B,) (as sampled, on the device; or ints)
        at slot ``pos`` of every sequence -> logits (B, vocab) fp32, valid until the next step."""
        b = len(tokens)
        if not 0 <= pos < self.gen.max_seq_len:
            raise ValueError(f"decode slot {pos}: expected 0..{self.gen.max_seq_len - 1} (--max-seq-len)")
        self.ids[:b, 0].copy_(tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens))
        self.slot.fill_(pos)  # a kernel argument, not a copy: no wait
        keys = kv_bucket(pos + 1, self.cache.shape[1])
        if not self.capture:
            return self._run(b, keys)
        if (b, keys) not in self.graphs:
            self.graphs[b, keys] = self._capture(b, keys)
        graph, logits = self.graphs[b, keys]
        graph.replay()
        return logits

    def _run(self, b: int, keys: int) -> torch.Tensor:
        """The step of the first ``b`` sequences over the cache's first ``keys`` slots, from the input buffers ->
        logits (b, vocab) fp32."""
        g = self.gen
        queries = Queries(rows=DecodeStep.at(self.slot, self.pad[:b], keys))
        return forward_groups(self.ids[:b], queries, g.args, g.source, g.rope, self.cache, last_only=True)[:, -1]

    def _capture(self, b: int, keys: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph of ``_run(b, keys)`` and its output. The warm-up runs compute the step the replay will (its
        inputs are set), so the slot they write holds what the replay writes again."""
        dev = self.cache.device
        with torch.cuda.device(dev):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP):
                    self._run(b, keys)
            torch.cuda.current_stream().wait_stream(side)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._run(b, keys)
        return graph, logits
