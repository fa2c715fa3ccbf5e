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

Where groups stream (``StreamedWeights``: --mode preload, stream, mixed), a step is captured per group instead
(``grouped``): the pass's queries (a small graph per (batch, bucket) whose outputs it keeps), then each streamed
group's forward over staging buffer b, whose address is fixed for the run (the streamed source gives a group the
same views in the same buffer every time), and each run of resident groups (the GPU tier, between two streamed
ones) as one graph; a group of the CPU compute set (``--cpu-compute``: its weights in host memory) breaks the runs
and is computed eagerly by the CPU (model/passes.py ``on_weights``); keyed by the steps (a group's place in the
pass), their weights' addresses, the pass's shape and the bucket. The source's ``get`` runs between the replays as
it runs between eager groups: the compute stream waits for a streamed group's copy, and the buffer the previous one
frees takes the next copy. Each graph reads the hidden state from one buffer and
writes it back there; the final norm and the output matrix (the head's, or a tied model's embedding, fetched
after it) write two more. Intermediates live in the shared pool only while a graph runs; the hidden state, the
normed state and the logits are buffers made outside it.

Two more pass shapes run the same way. A continuous batch's pass in which every row feeds one token
(runtime/engine/scheduler.py: ``adopt`` its cache, ``step_rows``): each row at its own slot and length
(``DecodeStep.of_rows``), the batch padded to a power of two with free rows. A speculative pass over one sequence
(``step_tree``: the target's verify pass over a token tree, the model draft's expansions and catch-ups,
runtime/engine/speculative.py): at most TREE_ROWS tokens padded to a power of two, the padding writing the
cache's scratch slot, the tree's visibility a (TREE_ROWS, TREE_ROWS) buffer (``DecodeStep.of_tree``).

``StaticDecode(gen, capture=False)`` runs the same static passes without graphs, on any device: the CPU tests
check them against the eager path. Used by runtime/engine/generate.py (``Generator.generate``,
``generate_batch``, ``forward_tree``; ``--cuda-graphs``), scheduler.py and speculative.py; runs in the client
process.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from model.arch import HEAD, architecture
from model.passes import forward_groups, layer_passes, on_weights, weights_device
from model.quant import QuantWeight
from model.transformer import Pass, Queries, TreeQueries, Weights, final_norm, linear, output_matrix
from runtime.engine.kv import DecodeStep, KVCache
from runtime.engine.streamed import StreamedWeights
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
    """Whether ``gen``'s decode steps can be captured: the weights on a CUDA device at fixed addresses, every one
    resident (an in-memory source) or streamed through fixed staging buffers (a streamed source of one process,
    not a tensor-parallel rank's), neither wrapped (--trace times each group); the KV cache the plain device one
    with exact attention, no attention profiling (it synchronises inside the step), and no mixture of experts (its
    router's choice is read on the host every layer: the step's work is not the same from one step to the next)."""
    src = gen.source
    return (src.device.type == "cuda" and (type(src) is InMemoryWeights or
                                           (type(src) is StreamedWeights and src.shard is None))
            and not gen.kv_offload and gen.kv.topk_blk is None and not gen.profile_attention
            and not architecture(gen.args).routed)


def _address(w: Weights | torch.Tensor | QuantWeight) -> int:
    """Where a group's weights (or one matrix) lie: the first tensor's address (the group's views are cut from
    one buffer, so it names the buffer; a CPU run's tiled matrix, model/cpu_kernels.py, by its tiles, and one it reads
    in place by its stored bytes)."""
    v = next(iter(w.values())) if isinstance(w, Mapping) else w
    return (v if isinstance(v, torch.Tensor) else v.raw if hasattr(v, "raw") else v.q).data_ptr()


def batch_bucket(rows: int, most: int) -> int:
    """The batch size a continuous batch's step of ``rows`` rows runs at: the next power of two, at most ``most``
    (the cache's rows), so that a batch that grows and shrinks replays a few graphs."""
    return min(1 << max(rows - 1, 0).bit_length(), most)


TREE_ROWS = 64  # the most queries (and tree columns) a speculative pass runs at static shapes; a larger one is eager


class StaticDecode:
    """Passes at static shapes, replayed from CUDA graphs with ``capture`` (module docstring), else run as they
    are (the same computation, for the CPU tests). For ``gen``'s requests: ``begin`` sets up a request (its
    cache, its padding), ``step`` runs each of its decode steps, ``step_tree`` a speculative pass over one
    sequence's token tree (or a short causal chunk) of at most TREE_ROWS tokens. For a continuous batch
    (runtime/engine/scheduler.py): ``adopt`` takes its cache, ``step_rows`` runs its passes in which every row
    decodes one token. A pass's shape keys its graphs: ("step", B), ("rows", B) or ("tree", S) (S a power of two:
    the tree's nodes, the rest padding that writes the cache's scratch slot, its last)."""

    def __init__(self, gen: Generator, capture: bool = True) -> None:
        self.gen, self.capture = gen, capture
        self.grouped = type(gen.source) is not InMemoryWeights  # a graph per group (module docstring)
        self.rows = False  # a continuous batch's (adopt): every row at its own slot
        self.cache: KVCache | None = None
        self.slot = self.pad = None  # a request's decode slot (1,) and padding (B,)
        self.inputs = None  # a continuous batch's (4, B): ids, the slot each row writes, the last it sees, position
        self.tree_in = self.base = self.visible = None  # a tree's (2, T) slots, positions; (1,) base; (T, T) bool
        self.tokens = None  # the ids of a request's steps and trees (flat)
        self.h = self.x = self.logits = None  # grouped: the hidden and normed states, the logits (flat: rows, ...)
        # whole passes: (shape, L) -> graph, logits; grouped: (piece, address, shape, L) -> graph, its output
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, object]] = {}
        self.pool = None  # the graphs' memory pool, shared

    def begin(self, batch: int, pad: torch.Tensor | None) -> KVCache:
        """A request of ``batch`` sequences, left-padded by ``pad`` (B,) on the device or None: the cache to
        prefill (eagerly) and then decode it in; the same cache as the previous request's unless that one holds
        fewer sequences. Its slots are not cleared: every slot a step sees is written by the request first. One
        slot past --max-seq-len is the trees' scratch."""
        g = self.gen
        if self.cache is None or self.cache.shape[0] < batch:
            self._reset(None, batch)
            self.cache = KVCache(g.args, batch, g.max_seq_len + 1, g.source.dtype, g.source.device,
                                 block_tokens=g.kv.block_tokens)
        self.pad.zero_()
        if pad is not None:
            self.pad[:batch].copy_(pad)
        return self.cache

    def adopt(self, cache: KVCache) -> None:
        """Decode a continuous batch's passes in ``cache`` (its rows and slots; the scheduler owns it)."""
        self.rows = True
        self._reset(cache, cache.shape[0])

    def _reset(self, cache: KVCache | None, batch: int) -> None:
        """The inputs' buffers for ``batch`` rows, the graphs dropped (they hold the old cache's and buffers'
        addresses), and the old cache freed before a new one is made."""
        dev = self.gen.source.device
        self.graphs.clear()
        self.cache = self.pool = self.tokens = None
        self.cache = cache
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.pad = torch.zeros(batch, dtype=torch.long, device=dev)
        self.inputs = torch.zeros((4, batch), dtype=torch.long, device=dev) if self.rows else None
        self._room(batch)

    def _room(self, rows: int) -> None:
        """Token and state buffers of at least ``rows`` rows (made anew, and the graphs dropped, when they hold
        fewer: a request's first tree)."""
        if self.tokens is not None and self.tokens.shape[0] >= rows:
            return
        g, dev = self.gen, self.gen.source.device
        self.graphs.clear()
        self.tokens = torch.zeros(rows, dtype=torch.long, device=dev)
        if self.grouped:
            self.h = torch.zeros((rows, g.args.dim), dtype=g.source.dtype, device=dev)
            self.x = torch.zeros_like(self.h)
            self.logits = torch.zeros((rows, g.args.vocab_size), dtype=torch.float32, device=dev)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor | Sequence[int], pos: int) -> torch.Tensor:
        """One decode step of the request ``begin`` set up: ``tokens`` (B,) (as sampled, on the device; or ints)
        at slot ``pos`` of every sequence -> logits (B, vocab) fp32, valid until the next step."""
        b = len(tokens)
        if not 0 <= pos < self.gen.max_seq_len:
            raise ValueError(f"decode slot {pos}: expected 0..{self.gen.max_seq_len - 1} (--max-seq-len)")
        self.tokens[:b].copy_(tokens if isinstance(tokens, torch.Tensor) else torch.tensor(tokens))
        self.slot.fill_(pos)  # a kernel argument, not a copy: no wait
        return self._step(("step", b), kv_bucket(pos + 1, self.cache.shape[1]))

    @torch.inference_mode()
    def step_rows(self, tokens: Sequence[int], slots: Sequence[int], seen: Sequence[int],
                  positions: Sequence[int]) -> torch.Tensor:
        """One pass of the adopted continuous batch in which row i feeds ``tokens[i]``, writes its key and value
        at slot ``slots[i]`` and sees slots [0, seen[i]], at rotary position ``positions[i]`` (a free row: the
        scratch slot, 0, 0) -> logits (rows, vocab) fp32, valid until the next pass. Run at the batch's bucket
        (``batch_bucket``), the rows beyond it free ones."""
        n, scratch = len(tokens), self.cache.shape[1] - 1
        b = batch_bucket(n, self.cache.shape[0])
        if not 1 <= n <= self.cache.shape[0]:
            raise ValueError(f"a pass of {n} rows: expected 1..{self.cache.shape[0]}, the cache's rows")
        free = b - n
        host = torch.tensor([list(tokens) + [0] * free, list(slots) + [scratch] * free, list(seen) + [0] * free,
                             list(positions) + [0] * free], dtype=torch.long)
        self.inputs[:, :b].copy_(host)  # one copy
        return self._step(("rows", b), kv_bucket(max(seen) + 1, self.cache.shape[1]))[:n]

    def fits_tree(self, cache: KVCache, s: int, start: int, tree: TreeQueries | None) -> bool:
        """Whether a pass of ``s`` tokens from slot ``start`` (``tree``: their tree, or None: causal) in ``cache``
        runs here (``step_tree``): the request's cache, at most TREE_ROWS tokens and tree columns."""
        width = s if tree is None else tree.visible.shape[1]
        return cache is self.cache and not self.rows and 1 <= s <= TREE_ROWS and width <= TREE_ROWS \
            and (tree is None or start + s - tree.base == width)

    @torch.inference_mode()
    def step_tree(self, tokens: torch.Tensor, start: int, tree: TreeQueries | None) -> torch.Tensor:
        """A speculative pass (runtime/engine/speculative.py) of the request ``begin`` set up, one sequence:
        ``tokens`` (S,) on the device at slots [start, start+S), the nodes of ``tree`` (None: a causal chunk)
        -> logits (S, vocab) fp32, every node's, valid until the next pass (``fits_tree`` holds)."""
        s, dev, scratch = tokens.shape[0], tokens.device, self.cache.shape[1] - 1
        sb = 1 << (s - 1).bit_length()
        self._room(max(self.cache.shape[0], sb))
        if self.tree_in is None:
            self.tree_in = torch.zeros((2, TREE_ROWS), dtype=torch.long, device=dev)
            self.base = torch.zeros(1, dtype=torch.long, device=dev)
            self.visible = torch.zeros((TREE_ROWS, TREE_ROWS), dtype=torch.bool, device=dev)
        here = torch.arange(start, start + s, device=dev)
        self.tokens[:s].copy_(tokens)
        self.tree_in[0, :s].copy_(here)
        self.tree_in[0, s:sb].fill_(scratch)
        self.tree_in[1, :s].copy_(here if tree is None else tree.positions)
        self.visible.zero_()
        if tree is None:
            self.base.fill_(start)
            self.visible[:s, :s] = torch.ones((s, s), dtype=torch.bool, device=dev).tril()
        else:
            self.base.fill_(tree.base)
            self.visible[:s, :tree.visible.shape[1]] = tree.visible
        return self._step(("tree", sb), kv_bucket(start + s, self.cache.shape[1]))[:s]

    def _shape(self, shape: tuple) -> tuple[int, int]:
        """(B, S) of a pass's shape."""
        return (1, shape[1]) if shape[0] == "tree" else (shape[1], 1)

    def _ids(self, shape: tuple) -> torch.Tensor:
        b, s = self._shape(shape)
        return (self.inputs[0] if shape[0] == "rows" else self.tokens)[:b * s].view(b, s)

    def _queries(self, shape: tuple, keys: int) -> Queries:
        """The pass's attention layout over the input buffers (in a captured graph, built at every replay), its mask
        made SDPA's additive one once here rather than by every layer's attention."""
        kind, n = shape
        if kind == "rows":
            step = DecodeStep.of_rows(self.inputs[1, :n], self.inputs[2, :n], self.inputs[3, :n], keys)
        elif kind == "tree":
            step = DecodeStep.of_tree(self.tree_in[0, :n], self.tree_in[1, :n], self.base, self.visible[:n], keys)
        else:
            step = DecodeStep.at(self.slot, self.pad[:n], keys)
        return Queries(rows=step.additive(self.cache.dtype))

    def _step(self, shape: tuple, keys: int) -> torch.Tensor:
        """The pass of ``shape`` over the cache's first ``keys`` slots -> logits (B x S, vocab) fp32."""
        if self.grouped:
            return self._grouped(shape, keys)
        g = self.gen
        return self._piece((shape, keys), lambda: forward_groups(
            self._ids(shape), self._queries(shape, keys), g.args, g.source, g.rope, self.cache,
            last_only=self._shape(shape)[1] == 1).flatten(0, 1))

    def _grouped(self, shape: tuple, keys: int) -> torch.Tensor:
        """The pass group by group from the source as it streams: each streamed group's graph replayed once
        ``get`` has made its weights ready, each run of resident groups (the GPU tier) one graph -> logits (B x S,
        vocab) fp32. A group's step writes the state it reads (h; the head's norm x, the logits)."""
        g, src, a = self.gen, self.gen.source, self.gen.args
        b, s = self._shape(shape)
        p = Pass(a, g.rope, self.cache, self._piece(("queries", shape, keys), lambda: self._queries(shape, keys)))
        h, x, logits = self.h[:b * s].view(b, s, -1), self.x[:b * s].view(b, s, -1), self.logits[:b * s]
        h.copy_(src.embed(self._ids(shape)))  # the host lookup (a pinned DRAM table) stays out of the graphs
        steps = [(group, lambda w, f=fwd, i=layer: h.copy_(on_weights(f, h, w, p, i)))
                 for group, fwd, layer in layer_passes(a)]
        steps.append((HEAD, lambda w: x.copy_(final_norm(h, w, a))))
        out, name = output_matrix(a)  # as forward_groups: a tied model's embedding is fetched after the head
        steps.append((out, lambda w: logits.copy_(linear(x, w[name]).float().flatten(0, 1))))
        resident = getattr(src, "resident", None)  # the GPU tier's groups (None: an in-memory source, all)
        run: list[tuple[int, Weights, Callable]] = []  # resident groups' steps not replayed yet: (step, weights, fn)

        def flush() -> None:
            if run:  # keyed by the steps (an untied head's two read one group) and where their weights lie
                key = tuple((i, _address(w)) for i, w, _ in run) + (shape, keys)
                self._piece(key, lambda r=tuple(run): [fn(w) for _, w, fn in r], keep=h)
                run.clear()

        got: tuple[str, Weights] | None = None  # the untied head's weights serve its two steps: one get
        for i, (group, fn) in enumerate(steps):
            streamed = resident is not None and group not in resident
            if streamed:
                flush()  # before get: the compute stream waits there for the group's copy
            w = got[1] if got is not None and got[0] == group else src.get(group)
            got = (group, w)
            if streamed and weights_device(w).type != h.device.type:
                fn(w)  # the CPU compute set: computed by the CPU in place, eagerly, between two replays
                continue
            run.append((i, w, fn))
            if streamed:
                flush()
        flush()
        return logits

    def _piece(self, key: tuple, fn: Callable, keep: torch.Tensor | None = None):
        """Run ``fn`` (no arguments: what it reads are the step's buffers and fixed weights) and return its result;
        with ``capture``, by replaying its graph, captured at the first use of ``key`` (its result kept as the
        graph's output). ``keep``: a state ``fn`` overwrites, restored after each warm-up run."""
        if not self.capture:
            return fn()
        if key not in self.graphs:
            self.graphs[key] = self._capture(fn, keep)
        graph, result = self.graphs[key]
        graph.replay()
        return result

    def _capture(self, fn: Callable, keep: torch.Tensor | None) -> tuple[torch.cuda.CUDAGraph, object]:
        """The graph of ``fn`` and its result. The warm-up runs compute what the replay will (the inputs are set,
        ``keep`` restored after each), so a slot they write holds what the replay writes again. thread_local: the
        pool's threads may call CUDA meanwhile."""
        with torch.cuda.device(self.cache.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())  # the inputs, and a group's copy (waited for by get)
            with torch.cuda.stream(side):
                saved = keep.clone() if keep is not None else None
                for _ in range(WARMUP):
                    fn()
                    if keep is not None:
                        keep.copy_(saved)
            torch.cuda.current_stream().wait_stream(side)  # before the next get frees a group's buffer
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                result = fn()
        return graph, result
