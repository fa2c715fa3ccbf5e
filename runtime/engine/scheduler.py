"""Continuous batching: a scheduler that lets requests join and leave the running batch at every weight pass. The
pool's server (runtime/services/server.py) has one, for every request it serves: HTTP's and the Unix socket's.

A streamed model's step costs a full weight pass whatever the batch, so throughput comes from sharing each
pass between as many sequences as possible. Static batching (``Generator.generate_batch``) makes a request
that arrives mid-batch wait for the whole batch; here the batch is a set of ``max_batch`` *rows* (sequence
slots), each with its own KV rows and its own length in one ``KVCache`` of ``max_batch`` x (max_len + 1)
slots, and every step runs ONE forward over rows [0, hi) (hi: one past the highest row in use):

    decode row     feeds its latest token at slot = its length (or a token tree rooted there: below)
    joining row    feeds the next chunk of its prompt (at most ``chunk_per_sequence(prefill.chunk, hi)``
                   tokens, so a long prompt is spread over several steps and cannot stall the others)
    free row       feeds one dummy token at the scratch slot (its output is dropped)

The pass is (hi, S) tokens, S the longest feed, each row's feed right-aligned (so the last column is every
row's latest token and ``last_only`` logits serve all rows); its positions, slots and per-row causal mask go to
the cache as ``model.transformer.RowQueries`` (KVCache.mask_for builds the mask, as for token trees). Padding columns
and free rows write to the scratch slot (the last), which no real query sees. A row whose prompt is complete
chooses a token with its own ``TokenChooser`` (runtime/engine/sampling.py: its seeded generator, as
``Generator.generate``, so each request's greedy tokens are its solo run's, up to float rounding of batched
kernels, and a sampled one's draws follow its own seed; penalties, logit bias, top-k / min-p, log-probabilities
and a grammar where asked). A request leaves when it stops (a stop token, its max_new_tokens, its deadline) or
is cancelled (its client went away): its row is freed before the next step (``cancel`` is seen at the top of
every step).

Prompt reuse (runtime/engine/prefix.py). A freed row keeps its KV entries; a new request is given the row
holding the longest prefix of its prompt (or that prefix is copied into its row) and prefills only the rest:
``cached_tokens`` in its result. A request whose prompt's next block is being prefilled by another row waits
for that prefill (so a shared new system prompt, or the ``n`` choices of one request, are prefilled once).

Speculative decoding (runtime/engine/speculative.py). Given a SpeculativeGenerator, a pass whose only row is
decoding feeds that row a token tree from the draft instead of its one token (``RowTree``: the tree's mask in
the row's, its nodes' logits selected), walks it exactly as plain decoding samples (``speculative.walk``), and
moves the kept path's KV entries into place (``KVCache.keep`` of that row). With more rows in the pass, each
decodes one token (a second sequence fills a pass that a tree would otherwise fill with guesses), unless the
draft is prompt lookup (no state per sequence) and the measured pass costs say that every row's tree pays at
this batch (``_trees_pay``).

Exclusive jobs. ``submit_job(fn)`` runs ``fn(generator)`` in the model thread once no row is in use (requests
that arrive meanwhile wait for it): ``bench --attach``'s timed rounds, which measure the engine's own batch.
The cache is given up for the job and made again after it.

Threads. ``run`` is the model thread's loop (torch; the only thread that touches the model). ``submit``,
``cancel`` and ``submit_job`` are called from any thread (the HTTP event loop, the socket's connection
threads): requests wait in a queue bounded by ``max_queue`` (``QueueFull`` beyond it). Each request's
``on_event`` is called in the model thread with ``("token", Sampled)`` per token (``("prompt_logprobs", [...])``
first when asked), then ``("done", GenerationResult)`` or ``("error", message)``; it must not block (the HTTP
layer hands events to its event loop with ``call_soon_threadsafe``, the socket's to its connection thread).
``static=True`` admits requests only when the batch is empty: the static batching the benchmark compares
against, on the same code path.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.errors import ConfigError
from model.transformer import RowQueries
from runtime.engine.batching import chunk_per_sequence
from runtime.engine.config import SamplingConfig
from runtime.engine.generate import GenerationResult, Generator
from runtime.engine.generate import greedy as greedy_ids
from runtime.engine.graphs import StaticDecode, applies
from runtime.engine.kv import RowTree, TreeRowQueries
from runtime.engine.prefix import PrefixIndex, block_hashes
from runtime.engine.sampling import MAX_LOGPROBS, Constraint, Sampled, TokenChooser, logprobs_of
from runtime.engine.speculative import NgramDraft, SpecStats, Tree, walk
from runtime.engine.treecosts import interpolate
from runtime.pool.client import PoolDied

PROMPT_LOGPROBS_CHUNK = 256  # prompt tokens a pass feeds a row whose every token's logits are kept (N x vocab fp32)


class QueueFull(Exception):
    """The scheduler's queue holds ``max_queue`` requests already."""


@dataclass(frozen=True)
class SchedulerConfig:
    """``max_batch`` rows share each pass; at most ``max_queue`` requests wait; ``static``: admit only into an
    empty batch; ``prefix_cache``: reuse the KV entries of earlier prompts (runtime/engine/prefix.py);
    ``graphs``: runtime/engine/graphs.py (``StaticDecode.step_rows``)."""

    max_batch: int = 8
    max_queue: int = 64
    static: bool = False
    prefix_cache: bool = True
    graphs: bool = False  # passes where every row feeds one token replayed from CUDA graphs, where they apply

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, found {self.max_batch}")
        if self.max_queue < 0:
            raise ConfigError(f"--max-queue must be at least 0, found {self.max_queue}")


@dataclass(eq=False)
class SeqRequest:
    """One sequence to generate. ``deadline``: time.monotonic() after which it ends with an error.
    ``logprobs``: report each token's log-probability and that many alternatives (0..20; None: none);
    ``prompt_logprobs``: the same for every prompt token after the first (its whole prompt is computed then:
    no reuse); ``constraint``: a grammar the output follows (runtime/engine/constrained.py)."""

    prompt: list[int]
    sampling: SamplingConfig
    on_event: Callable[[str, object], None]
    stop_ids: frozenset[int] = frozenset()
    deadline: float | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    constraint: Constraint | None = None
    id: int = field(default_factory=itertools.count().__next__)
    hashes: list[int] | None = field(default=None, init=False, repr=False)  # its prompt's blocks (prefix.py)
    cached: int = field(default=0, init=False)  # prompt tokens it reused, set when admitted

    def __post_init__(self) -> None:
        for key in ("logprobs", "prompt_logprobs"):
            v = getattr(self, key)
            if v is not None and not 0 <= v <= MAX_LOGPROBS:
                raise ConfigError(f"{key} must be in 0..{MAX_LOGPROBS}, found {v}")


@dataclass
class _Row:
    req: SeqRequest
    chooser: TokenChooser
    result: GenerationResult
    t_join: float
    fed: int = 0  # prompt tokens in the cache
    length: int = 0  # slots of this row that hold tokens
    last: int | None = None  # the latest chosen token, fed at the next step
    t_last: float = 0.0
    spec: SpecStats | None = None  # its speculative passes
    prompt_lps: list = field(default_factory=list)

    def seq(self) -> list[int]:
        return self.req.prompt + self.result.output_token_ids


@dataclass
class StepStats:
    """What one step did (``Scheduler.observer`` gets it)."""

    rows: int  # sequences in the pass (decoding and joining)
    joining: int  # of them prefilling
    tokens: int  # real tokens fed
    emitted: int  # tokens chosen
    seconds: float
    prefilled: int = 0  # prompt tokens fed
    tree_tokens: int = 0  # token-tree nodes verified (speculative decoding)


@dataclass
class _Pass:
    tokens: torch.Tensor | None  # (hi, S)
    rows: RowQueries | None
    select: torch.Tensor | None  # flat positions whose logits are kept (None: each row's last column)
    feeds: list[int]  # tokens each row feeds (0: a free row's dummy)
    spans: list[tuple[int, int]]  # each row's (first, count) rows of the pass's logits
    trees: dict[int, Tree]  # row -> its token tree (speculative)
    draft_ms: float = 0.0
    # a pass in which every row feeds one token, for the static step (tokens, slots, seen, positions) per row;
    # then tokens, rows and select are None
    flat: tuple[list[int], list[int], list[int], list[int]] | None = None


class Scheduler:
    """Continuous batching over one Generator, or a SpeculativeGenerator (module docstring)."""

    def __init__(self, gen, cfg: SchedulerConfig, max_len: int | None = None,
                 observer: Callable[[StepStats], None] | None = None) -> None:
        self.spec = gen if hasattr(gen, "draft") else None  # a SpeculativeGenerator
        self.gen: Generator = gen.gen if self.spec is not None else gen
        self.cfg = cfg
        self.max_len = max_len or self.gen.max_seq_len
        if self.max_len > self.gen.max_seq_len:
            raise ConfigError(f"max_len {self.max_len} exceeds the generator's {self.gen.max_seq_len}")
        self.observer = observer
        # + the scratch slot; with a draft the generator's room past max_len for a last tree too
        self.slots = (self.gen.max_seq_len if self.spec is not None else self.max_len) + 1
        self.scratch = self.slots - 1
        self.cache = self.gen.new_cache(cfg.max_batch, slots=self.slots)
        self.static = None  # one-token passes replayed from CUDA graphs over the cache (runtime/engine/graphs.py)
        if cfg.graphs and applies(self.gen):
            self.static = StaticDecode(self.gen)
            self.static.adopt(self.cache)
        self.index = PrefixIndex(cfg.max_batch) if cfg.prefix_cache else None
        self.rows: list[_Row | None] = [None] * cfg.max_batch
        self._queue: collections.deque[SeqRequest] = collections.deque()
        self._jobs: collections.deque[Callable] = collections.deque()
        self._cancelled: set[int] = set()
        self._cv = threading.Condition()
        self._draft_for: int | None = None  # the request whose sequence the draft's cache holds
        self.steps = 0
        self.max_rows_seen = 0  # the most sequences one pass has served
        self.last_rows = 0  # sequences of the latest pass
        self.finished = self.cancelled = self.failed = 0
        self.prefilled_tokens = self.cached_tokens = 0  # prompt tokens computed / reused
        self.spec_passes = self.spec_tokens = 0

    # ---- any thread ---------------------------------------------------------------------------------------

    def check(self, prompt: list[int], max_new_tokens: int) -> None:
        """ConfigError naming the numbers for a request this scheduler cannot serve."""
        if not prompt:
            raise ConfigError("the prompt is empty")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, found {max_new_tokens}")
        if len(prompt) + max_new_tokens > self.max_len:
            raise ConfigError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                              f"context of {self.max_len} tokens")
        vocab = self.gen.args.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")

    def submit(self, req: SeqRequest) -> None:
        """Queue ``req`` (checked first: ConfigError); QueueFull when ``max_queue`` requests wait already."""
        self.check(req.prompt, req.sampling.max_new_tokens)
        with self._cv:
            if len(self._queue) >= self.cfg.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are waiting (--max-queue {self.cfg.max_queue})")
            self._queue.append(req)
            self._cv.notify()

    def submit_job(self, fn: Callable) -> None:
        """Run ``fn(generator)`` in the model thread once no row is in use (module docstring); it reports its
        own result and errors."""
        with self._cv:
            self._jobs.append(fn)
            self._cv.notify()

    def cancel(self, req: SeqRequest) -> None:
        """Drop ``req`` (queued or running) before the next step; its on_event gets nothing more."""
        with self._cv:
            if req in self._queue:  # still waiting: its place in the queue is free at once
                self._queue.remove(req)
                self.cancelled += 1
                return
            self._cancelled.add(req.id)
            self._cv.notify()

    def queue_depth(self) -> int:
        return len(self._queue)

    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def batch_size(self) -> int:
        """Sequences of the latest pass, 0 while no row is in use (the /metrics gauge)."""
        return self.last_rows if self.active() else 0

    # ---- the model thread ---------------------------------------------------------------------------------

    def run(self, stop: threading.Event, idle_s: float = 0.1, on_idle: Callable[[], None] | None = None) -> None:
        """Serve until ``stop`` is set: admit, step, repeat; ``on_idle`` runs every ``idle_s`` without work (the
        pool server checks its coordinator there). Requests still running or queued at the stop get an error."""
        try:
            while not stop.is_set():
                if not self.tick(idle_s) and on_idle is not None:
                    on_idle()
        finally:
            self.fail_all("the server is stopping: request ended")

    def tick(self, idle_s: float = 0.0) -> bool:
        """One turn of the loop: drop what was cancelled, admit what fits (or run a job once the batch is empty),
        run one step; False (after waiting up to ``idle_s`` for a request) when no row is in use."""
        job = None
        with self._cv:
            self._drop_cancelled()
            if self._jobs and not any(self.rows):
                job = self._jobs.popleft()
            elif not self._jobs:
                self._admit()
            if job is None and not any(self.rows):
                self._cv.wait(idle_s)
                return False
        if job is not None:
            self._run_job(job)
        else:
            self.step()
        return True

    def fail_all(self, msg: str) -> None:
        with self._cv:
            queued, self._queue = list(self._queue), collections.deque()
            jobs, self._jobs = list(self._jobs), collections.deque()
        for r in queued:
            self._emit(r, "error", msg)
        for job in jobs:
            job(None)  # a job given no generator reports that it was not run
        for i, row in enumerate(self.rows):
            if row is not None:
                self._free(i)
                self._emit(row.req, "error", msg)

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        for i, row in enumerate(self.rows):
            if row is not None and row.req.id in self._cancelled:
                self._free(i)
                self.cancelled += 1
        kept = [r for r in self._queue if r.id not in self._cancelled]
        self.cancelled += len(self._queue) - len(kept)
        self._queue = collections.deque(kept)
        self._cancelled.clear()

    def _run_job(self, job: Callable) -> None:
        self.cache = None  # the job's own cache takes its place
        self._draft_for = None  # and the draft's, if it runs one
        if self.index is not None:
            self.index = PrefixIndex(self.cfg.max_batch)
        try:
            job(self.spec or self.gen)
        except PoolDied:
            raise
        except Exception:  # noqa: BLE001 (a job reports its own errors; this is a bug in one)
            traceback.print_exc()
        finally:
            self.cache = self.gen.new_cache(self.cfg.max_batch, slots=self.slots)

    def _admit(self) -> None:
        if self.cfg.static and any(self.rows):
            return
        now = time.monotonic()
        late = [r for r in self._queue if r.deadline is not None and now > r.deadline]
        if late:
            self._queue = collections.deque(r for r in self._queue if r not in late)
            for r in late:
                self.failed += 1
                self._emit(r, "error", "the request ran past its timeout while it waited")
        free = [i for i, r in enumerate(self.rows) if r is None]
        for req in list(self._queue):
            if not free:
                return
            row, cached = self._place(req, free)
            if row is None:  # its prompt's next block is being prefilled: it waits for that
                continue
            self._queue.remove(req)
            free.remove(row)
            self._start(req, row, cached, now)

    def _place(self, req: SeqRequest, free: list[int]) -> tuple[int | None, int]:
        """The free row for ``req`` and the prompt tokens it reuses there (copied in from another row if need
        be); (None, 0): it waits for a prefill under way."""
        if self.index is None:
            return free[0], 0
        if req.prompt_logprobs is not None:  # every prompt token's logits are needed: nothing reused
            return self.index.lru(free), 0
        if req.hashes is None:
            req.hashes = block_hashes(req.prompt, self.index.block)
        hashes = req.hashes
        src, n = self.index.match(req.prompt, hashes, free)
        n = min(n, len(req.prompt) - 1)  # its last prompt token is fed: its logits give the first token
        if self.index.waits(hashes, n):
            return None, 0
        row = src if src in free else self.index.lru(free)
        if n and src != row:
            self.cache.copy_prefix(src, row, n)
        return row, n

    def _start(self, req: SeqRequest, row: int, cached: int, now: float) -> None:
        dev = self.gen.source.device
        chooser = TokenChooser(req.sampling, req.prompt, self.gen.args.vocab_size, dev,
                               torch.Generator().manual_seed(req.sampling.seed), req.logprobs, req.constraint)
        res = GenerationResult(list(req.prompt), [], cached_tokens=cached)
        self.rows[row] = _Row(req, chooser, res, now, fed=cached, length=cached,
                              spec=SpecStats() if self.spec is not None else None)
        self.cached_tokens += cached
        req.cached = cached
        if self.index is not None:
            self.index.set(row, req.prompt[:cached])
            self.index.pend(row, req.hashes if req.hashes is not None else block_hashes(req.prompt, self.index.block))

    def _free(self, i: int) -> None:
        self.rows[i] = None  # its KV rows stay as they are: a later request may reuse their prefix
        if self.index is not None:
            self.index.release(i)

    def _emit(self, req: SeqRequest, kind: str, payload) -> None:
        try:
            req.on_event(kind, payload)
        except Exception as e:  # a listener's failure is its request's only
            print(f"[scheduler] request {req.id}: its listener failed on {kind}: {type(e).__name__}: {e}",
                  flush=True)

    # ---- a step -------------------------------------------------------------------------------------------

    def _trees(self, hi: int) -> tuple[dict[int, Tree], float]:
        """The token trees of this pass, and the draft's time: the draft's tree for the only row in use when it
        is decoding; with a draft that keeps no state per sequence (prompt lookup) one for every row when all
        are decoding and the measured costs say that trees pay at this batch (``_trees_pay``)."""
        busy = [i for i, r in enumerate(self.rows[:hi]) if r is not None]
        if self.spec is None or any(self.rows[i].last is None for i in busy):
            return {}, 0.0
        if len(busy) > 1 and (not isinstance(self.spec.draft, NgramDraft) or not self._trees_pay(len(busy))):
            return {}, 0.0
        t0, trees = time.perf_counter(), {}
        for i in busy:
            r = self.rows[i]
            left = r.req.sampling.max_new_tokens - len(r.result.output_token_ids)
            n = min(self.spec.n, self.scratch - r.length, left)  # n nodes give at most n tokens
            if n < 2:
                continue
            if self._draft_for != r.req.id:  # a model draft's cache holds another sequence
                self.spec.draft.reset()
                self._draft_for = r.req.id
            tree = self.spec.draft.propose(r.seq(), n)
            if len(tree) > 1:
                trees[i] = tree
        return trees, (time.perf_counter() - t0) * 1e3

    def _trees_pay(self, rows: int) -> bool:
        """Whether ``rows`` sequences each verifying a tree of the current size give more tokens a second than a
        plain pass of the same rows: rows x tokens(m) / (rows x draft(m) + pass(rows x m)) against rows /
        pass(rows), from what the trees seen so far gave (TreeSize: tokens and draft time by size) and the pass
        times the probe measured for this image (or this run's own passes). Without those: no."""
        size, m = self.spec.size, self.spec.n
        if not size.count.get(m):
            return False
        if size.costs is not None:  # measured up to its largest pass: no guess beyond it
            if rows * m > max(size.costs.pass_ms):
                return False
            tree_pass, plain = interpolate(size.costs.pass_ms, rows * m), interpolate(size.costs.pass_ms, rows)
        else:
            tree_pass, plain = size.pass_ms(rows * m), size.pass_ms(rows)
        if tree_pass is None or plain is None:
            return False
        tokens, draft = size.tokens[m] / size.count[m], size.draft[m] / size.count[m]
        return rows * tokens / (rows * draft + tree_pass) > rows / plain

    def _plan(self) -> _Pass:
        """The pass's tokens (hi, S), its queries, and which logits each row needs."""
        hi = max(i for i, r in enumerate(self.rows) if r is not None) + 1
        trees, draft_ms = self._trees(hi)
        left = [len(r.req.prompt) - r.fed for r in self.rows[:hi] if r is not None and r.last is None]
        share = chunk_per_sequence(self.gen.prefill.chunk, hi)
        feeds_of: list[tuple[list[int], list[int], int]] = []  # (tokens, positions, first slot) per row
        for i, r in enumerate(self.rows[:hi]):
            if r is None:
                feeds_of.append(([0], [0], self.scratch))
            elif r.last is None:
                cap = share if r.req.prompt_logprobs is None else min(share, PROMPT_LOGPROBS_CHUNK)
                feed = r.req.prompt[r.fed:r.fed + min(max(left), cap)]
                feeds_of.append((feed, list(range(r.fed, r.fed + len(feed))), r.fed))
            elif i in trees:
                t = trees[i]
                feeds_of.append((t.tokens, [r.length + d for d in t.depth], r.length))
            else:
                feeds_of.append(([r.last], [r.length], r.length))
        s = max(len(f[0]) for f in feeds_of)
        toks, pos, slots, vis, feeds, spans, select, row_trees = [], [], [], [], [], [], [], []
        lo, end = self.scratch, 1
        keep_all = bool(trees) or any(r is not None and r.last is None and r.req.prompt_logprobs is not None
                                      for r in self.rows[:hi])
        dev = self.gen.source.device
        for i, (r, (feed, p, first)) in enumerate(zip(self.rows[:hi], feeds_of)):
            n, pad = len(feed), s - len(feed)
            if r is None:
                idx, seen = [self.scratch], [0]
            else:
                idx = list(range(first, first + n))
                seen = [first - 1] * n if i in trees else idx
                lo, end = min(lo, first), max(end, first + n)
            toks.append([0] * pad + feed)
            pos.append([0] * pad + p)
            slots.append([self.scratch] * pad + idx)
            vis.append([0] * pad + seen)
            feeds.append(n if r is not None else 0)
            wanted = n if r is not None and (i in trees or (r.last is None and r.req.prompt_logprobs is not None)) \
                else 1
            spans.append((len(select) if keep_all else i, wanted))
            select.extend(range(i * s + s - wanted, i * s + s))
            if i in trees:
                row_trees.append(RowTree(i, pad, first, trees[i].visible(range(n), dev)))
        if s == 1 and self.static is not None and not row_trees and not keep_all:
            flat = tuple([x[0] for x in col] for col in (toks, slots, vis, pos))
            return _Pass(None, None, None, feeds, spans, trees, draft_ms, flat)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        if row_trees:
            rows = TreeRowQueries(t(pos), t(slots), t(vis), end, lo, end, tuple(row_trees))
        else:
            rows = RowQueries(t(pos), t(slots), t(vis), end, lo, end)
        return _Pass(t(toks), rows, t(select) if keep_all else None, feeds, spans, trees, draft_ms)

    def step(self) -> None:
        """One weight pass over the rows in use; emits each finished prompt's or decoding row's next tokens."""
        t0 = time.perf_counter()
        p = self._plan()
        t1 = time.perf_counter()  # the pass, the draft's trees made
        joining = sum(1 for r in self.rows if r is not None and r.last is None)
        try:
            if p.flat is not None:
                logits = self.static.step_rows(*p.flat)  # (hi, vocab)
            else:
                logits = self.gen.forward_rows(p.tokens, self.cache, p.rows, p.select)  # (hi or N, vocab)
            greedy = greedy_ids(logits).tolist()  # one wait for the device
        except Exception as e:
            msg = f"the request failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            for i, r in enumerate(self.rows):
                if r is not None:
                    self._free(i)
                    if self.index is not None:
                        self.index.forget(i)
                    self.failed += 1
                    self._emit(r.req, "error", msg)
            if isinstance(e, PoolDied):
                raise
            print(f"[scheduler] a step failed, its {len(p.feeds)} rows' requests ended: {msg}", flush=True)
            return
        now, emitted, prefilled = time.perf_counter(), 0, 0
        n_rows = sum(1 for r in self.rows[:len(p.feeds)] if r is not None)
        self.steps += 1
        self.last_rows = n_rows
        self.max_rows_seen = max(self.max_rows_seen, n_rows)
        for i, r in enumerate(self.rows[:len(p.feeds)]):
            if r is None:
                continue
            r.result.batched = max(r.result.batched, n_rows)
            if r.last is None:
                prefilled += p.feeds[i]
            try:
                toks = self._row_tokens(i, r, p, logits, greedy, now, t1)
            except Exception as e:  # its grammar failed, or a bug: this request's only
                self._free(i)
                self.failed += 1
                self._emit(r.req, "error", f"the request failed: {type(e).__name__}: {e}")
                continue
            r.t_last = now
            for k, tok in enumerate(toks):
                r.last = tok.token
                r.result.output_token_ids.append(tok.token)
                emitted += 1
                self._emit(r.req, "token", tok)
                if self._finish_if_done(i, r, tok.token, k == len(toks) - 1):
                    break
        self.prefilled_tokens += prefilled
        if self.observer is not None:
            self.observer(StepStats(n_rows, joining, sum(p.feeds), emitted, now - t0, prefilled,
                                    sum(len(t) for t in p.trees.values())))

    def _row_tokens(self, i: int, r: _Row, p: _Pass, logits: torch.Tensor, greedy: list[int], now: float,
                    t1: float) -> list[Sampled]:
        """Row i's tokens from this pass (none while its prompt is not complete)."""
        first, count = p.spans[i]
        if r.last is None:
            if r.req.prompt_logprobs is not None:
                self._prompt_logprobs(r, logits[first:first + count])
            r.fed += p.feeds[i]
            r.length = r.fed
            self._sync_index(i, r)
            if r.fed < len(r.req.prompt):
                return []
            r.result.prefill_ms = (now - r.t_join) * 1e3  # joined -> first token
            if r.req.prompt_logprobs is not None:
                self._emit(r.req, "prompt_logprobs", [None] + r.prompt_lps)
            return [self._choose(r, logits[first + count - 1:first + count], greedy[first + count - 1])]
        if i in p.trees:
            return self._verify(i, r, p.trees[i], logits[first:first + count], (now - t1) * 1e3, p.draft_ms)
        r.length += 1
        r.result.token_ms.append((now - r.t_last) * 1e3)
        toks = [self._choose(r, logits[first:first + 1], greedy[first])]
        self._sync_index(i, r)
        if r.spec is not None:  # a plain pass of a row with a draft: one token
            r.spec.record(Tree([r.last]), 0, 1)
            r.spec.verify_ms += (now - t1) * 1e3
        return toks

    def _choose(self, r: _Row, logits: torch.Tensor, greedy: int) -> Sampled:
        """Row r's next token from its logits (1, vocab); ``greedy``: their argmax, already on the host."""
        ch = r.chooser
        if ch.plain and r.req.sampling.temperature == 0:
            return Sampled(greedy)
        return ch.choose(logits)

    def _verify(self, i: int, r: _Row, tree: Tree, logits: torch.Tensor, pass_ms: float,
                draft_ms: float) -> list[Sampled]:
        """Row i's token tree verified (logits (n, vocab), every node's): the walk's tokens; the kept path's KV
        entries moved into place."""
        chosen: list[Sampled] = []

        def choose(x: torch.Tensor) -> int:
            chosen.append(r.chooser.choose(x))
            return chosen[-1].token

        left = r.req.sampling.max_new_tokens - len(r.result.output_token_ids)
        toks, nodes, _ = walk(tree, logits, choose, r.req.stop_ids, left)
        base = r.length
        path = [base] + [base + n for n in nodes]
        if path != list(range(base, base + len(path))):
            self.cache.keep(path, base, row=i)
        r.length = base + len(path)
        r.result.token_ms.append(pass_ms + draft_ms)  # one entry per pass here
        r.spec.record(tree, len(nodes), len(toks))
        r.spec.draft_ms += draft_ms
        r.spec.verify_ms += pass_ms
        self.spec.stats.record(tree, len(nodes), len(toks))
        self.spec.size.record(tree, nodes, len(toks), pass_ms)
        self.spec_passes += 1
        self.spec_tokens += len(toks)
        self._sync_index(i, r, toks[:-1])  # the root and the kept nodes' tokens are in the cache now
        return chosen

    def _prompt_logprobs(self, r: _Row, logits: torch.Tensor) -> None:
        """The log-probabilities of the prompt tokens this pass's logits (one a fed token) predict."""
        prompt, k = r.req.prompt, r.req.prompt_logprobs
        for j in range(logits.shape[0]):
            q = r.fed + j + 1  # logits at position fed + j predict prompt token fed + j + 1
            if q < len(prompt):
                lp, top = logprobs_of(logits[j:j + 1], prompt[q], k)
                r.prompt_lps.append(Sampled(prompt[q], lp, top))

    def _sync_index(self, i: int, r: _Row, extra: list[int] | None = None) -> None:
        """The prefix index learns what row i's slots hold now: its prompt and output (and ``extra`` tokens not
        yet in its output), up to its length."""
        if self.index is not None:
            self.index.sync(i, r.seq() + (extra or []), r.length)
            if r.fed >= len(r.req.prompt):
                self.index.unpend(i)

    def _finish_if_done(self, i: int, r: _Row, tok: int, last: bool) -> bool:
        """Whether row i's request ended with ``tok`` (its row then freed, its result or error emitted)."""
        res = r.result
        if tok in r.req.stop_ids:
            res.stop_reason = "stop_token"
        elif last and r.req.constraint is not None and r.req.constraint.done():  # (a walk's tokens were all
            res.stop_reason = "grammar"  # consumed by then) complete: nothing but an end token could follow
        elif len(res.output_token_ids) < r.req.sampling.max_new_tokens:
            if last and r.req.deadline is not None and time.monotonic() > r.req.deadline:
                self._free(i)
                self.failed += 1
                self._emit(r.req, "error", "the request ran past its timeout")
                return True
            return False
        res.decode_ms = sum(res.token_ms)
        if r.spec is not None:
            sp = self.spec.report()
            res.speculative = {**r.spec.to_dict(), **{k: sp[k] for k in ("draft", "tree_tokens", "tree_tokens_fixed",
                                                                         "tree_tokens_history", "tree_tokens_choice")}}
        self._free(i)
        self.finished += 1
        self._emit(r.req, "done", res)
        return True
