"""Continuous batching: a scheduler that lets requests join and leave the running batch at every weight pass.

A streamed model's step costs a full weight pass whatever the batch, so throughput comes from sharing each
pass between as many sequences as possible. Static batching (``Generator.generate_batch``) makes a request
that arrives mid-batch wait for the whole batch; here the batch is a set of ``max_batch`` *rows* (sequence
slots), each with its own KV rows and its own length in one ``KVCache`` of ``max_batch`` x (max_len + 1)
slots, and every step runs ONE forward over rows [0, hi) (hi: one past the highest row in use):

    decode row     feeds its latest token at slot = its length
    joining row    feeds the next chunk of its prompt (at most ``chunk_per_sequence(prefill.chunk, hi)``
                   tokens, so a long prompt is spread over several steps and cannot stall the others)
    free row       feeds one dummy token at slot 0 (its output is dropped)

The pass is (hi, S) tokens, S the longest feed, each row's feed right-aligned (so the last column is every
row's latest token and ``last_only`` logits serve all rows); its positions, slots and per-row causal mask go to
the cache as ``model.transformer.RowQueries`` (KVCache.mask_for builds the mask, as for token trees). Padding columns
write to the scratch slot max_len, which no real query sees. A row whose prompt is complete samples a token
from its own seeded generator (as ``Generator.generate``: each request's greedy tokens are its solo run's, up
to float rounding of batched kernels, and a sampled one's draws follow its own seed). A request leaves when it
stops (a stop token, its max_new_tokens, its deadline) or is cancelled (its client went away): its row is
freed before the next step (``cancel`` is seen at the top of every step) and reused with its length reset.

Threads. ``run`` is the model thread's loop (torch; the only thread that touches the model, under
``model_lock``, which another user of the same Generator, the pool server's socket path, takes too).
``submit`` and ``cancel`` are called from any thread (the HTTP event loop): requests wait in a queue bounded
by ``max_queue`` (``QueueFull`` beyond it). Each request's ``on_event`` is called in the model thread with
``("token", id)``, then ``("done", GenerationResult)`` or ``("error", message)``; it must not block (the HTTP
layer hands events to its event loop with ``call_soon_threadsafe``). ``static=True`` admits requests only when
the batch is empty: the static batching the benchmark compares against, on the same code path.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.errors import ConfigError
from model.transformer import RowQueries
from runtime.engine.batching import chunk_per_sequence
from runtime.engine.config import SamplingConfig
from runtime.engine.generate import GenerationResult, Generator, sample
from runtime.pool.client import PoolDied


class QueueFull(Exception):
    """The scheduler's queue holds ``max_queue`` requests already."""


@dataclass(frozen=True)
class SchedulerConfig:
    """``max_batch`` rows share each pass; at most ``max_queue`` requests wait; ``static``: admit only into an
    empty batch."""

    max_batch: int = 8
    max_queue: int = 64
    static: bool = False

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be at least 1, found {self.max_batch}")
        if self.max_queue < 0:
            raise ConfigError(f"--max-queue must be at least 0, found {self.max_queue}")


@dataclass(eq=False)
class SeqRequest:
    """One sequence to generate. ``deadline``: time.monotonic() after which it ends with an error."""

    prompt: list[int]
    sampling: SamplingConfig
    on_event: Callable[[str, object], None]
    stop_ids: frozenset[int] = frozenset()
    deadline: float | None = None
    id: int = field(default_factory=itertools.count().__next__)


@dataclass
class _Row:
    req: SeqRequest
    gen: torch.Generator
    result: GenerationResult
    t_join: float
    fed: int = 0  # prompt tokens in the cache
    length: int = 0  # slots of this row that hold tokens
    last: int | None = None  # the latest sampled token, fed at the next step
    t_last: float = 0.0


@dataclass
class StepStats:
    """What one step did (``Scheduler.observer`` gets it)."""

    rows: int  # sequences in the pass (decoding and joining)
    joining: int  # of them prefilling
    tokens: int  # real tokens fed
    emitted: int  # tokens sampled
    seconds: float


class Scheduler:
    """Continuous batching over one Generator (module docstring)."""

    def __init__(self, gen: Generator, cfg: SchedulerConfig, max_len: int | None = None,
                 model_lock: threading.Lock | None = None,
                 observer: Callable[[StepStats], None] | None = None) -> None:
        self.gen, self.cfg = gen, cfg
        self.max_len = max_len or gen.max_seq_len
        if self.max_len > gen.max_seq_len:
            raise ConfigError(f"max_len {self.max_len} exceeds the generator's {gen.max_seq_len}")
        self.model_lock = model_lock or threading.Lock()
        self.observer = observer
        self.cache = gen.new_cache(cfg.max_batch, slots=self.max_len + 1)  # + the scratch slot
        self.scratch = self.max_len
        self.rows: list[_Row | None] = [None] * cfg.max_batch
        self._queue: collections.deque[SeqRequest] = collections.deque()
        self._cancelled: set[int] = set()
        self._cv = threading.Condition()
        self.steps = 0
        self.max_rows_seen = 0  # the most sequences one pass has served
        self.finished = self.cancelled = self.failed = 0

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
        """One turn of the loop: drop what was cancelled, admit what fits, run one step; False (after waiting up
        to ``idle_s`` for a request) when no row is in use."""
        with self._cv:
            self._drop_cancelled()
            self._admit()
            if not any(self.rows):
                self._cv.wait(idle_s)
                return False
        self.step()
        return True

    def fail_all(self, msg: str) -> None:
        with self._cv:
            queued, self._queue = list(self._queue), collections.deque()
        for r in queued:
            self._emit(r, "error", msg)
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
        for i in range(len(self.rows)):
            if not self._queue:
                return
            if self.rows[i] is None:
                req = self._queue.popleft()
                self.rows[i] = _Row(req, torch.Generator().manual_seed(req.sampling.seed),
                                    GenerationResult(list(req.prompt), []), now)

    def _free(self, i: int) -> None:
        self.rows[i] = None  # its KV rows are reused as they are: a new row's queries see only what it wrote

    def _emit(self, req: SeqRequest, kind: str, payload) -> None:
        try:
            req.on_event(kind, payload)
        except Exception as e:  # a listener's failure is its request's only
            print(f"[scheduler] request {req.id}: its listener failed on {kind}: {type(e).__name__}: {e}",
                  flush=True)

    def _plan(self) -> tuple[torch.Tensor, RowQueries, list[int]]:
        """The pass's tokens (hi, S), its RowQueries, and each row's feed length (0: a free row's dummy)."""
        hi = max(i for i, r in enumerate(self.rows) if r is not None) + 1
        left = [len(r.req.prompt) - r.fed for r in self.rows[:hi] if r is not None and r.last is None]
        s = min(max(left), chunk_per_sequence(self.gen.prefill.chunk, hi)) if left else 1
        toks, pos, slots, vis, feeds = [], [], [], [], []
        lo, end = self.max_len, 1
        for r in self.rows[:hi]:
            if r is None:
                feed, start = [0], 0
            elif r.last is None:
                feed, start = r.req.prompt[r.fed:r.fed + s], r.fed
            else:
                feed, start = [r.last], r.length
            n, pad = len(feed), s - len(feed)
            idx = list(range(start, start + n))
            toks.append([0] * pad + feed)
            pos.append([0] * pad + idx)
            slots.append([self.scratch] * pad + idx)
            vis.append([0] * pad + idx)
            feeds.append(n if r is not None else 0)
            if r is not None:
                lo, end = min(lo, start), max(end, start + n)
        dev = self.gen.source.device
        t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        rows = RowQueries(t(pos), t(slots), t(vis), end, lo, end)
        return t(toks), rows, feeds

    def step(self) -> None:
        """One weight pass over the rows in use; emits each finished prompt's or decoding row's next token."""
        t0 = time.perf_counter()
        tokens, rows, feeds = self._plan()
        joining = sum(1 for r in self.rows if r is not None and r.last is None)
        try:
            with self.model_lock:
                logits = self.gen.forward_rows(tokens, self.cache, rows)  # (hi, vocab)
                greedy = logits.argmax(-1).tolist()  # one wait for the device
        except Exception as e:
            msg = f"the request failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            for i, r in enumerate(self.rows):
                if r is not None:
                    self._free(i)
                    self.failed += 1
                    self._emit(r.req, "error", msg)
            if isinstance(e, PoolDied):
                raise
            print(f"[scheduler] a step failed, its {len(feeds)} rows' requests ended: {msg}", flush=True)
            return
        now, emitted = time.perf_counter(), 0
        n_rows = sum(1 for r in self.rows[:len(feeds)] if r is not None)
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, n_rows)
        for i, r in enumerate(self.rows[:len(feeds)]):
            if r is None:
                continue
            if r.last is None:
                r.fed += feeds[i]
                r.length = r.fed
                if r.fed < len(r.req.prompt):
                    continue
                r.result.prefill_ms = (now - r.t_join) * 1e3  # joined -> first token
            else:
                r.length += 1
                r.result.token_ms.append((now - r.t_last) * 1e3)
            cfg = r.req.sampling
            tok = greedy[i] if cfg.temperature == 0 else int(sample(logits[i:i + 1], cfg, r.gen).item())
            r.last, r.t_last = tok, now
            r.result.output_token_ids.append(tok)
            emitted += 1
            self._emit(r.req, "token", tok)
            self._finish_if_done(i, r, tok)
        if self.observer is not None:
            self.observer(StepStats(n_rows, joining, sum(feeds), emitted, now - t0))

    def _finish_if_done(self, i: int, r: _Row, tok: int) -> None:
        res = r.result
        if tok in r.req.stop_ids:
            res.stop_reason = "stop_token"
        elif len(res.output_token_ids) < r.req.sampling.max_new_tokens:
            if r.req.deadline is not None and time.monotonic() > r.req.deadline:
                self._free(i)
                self.failed += 1
                self._emit(r.req, "error", "the request ran past its timeout")
            return
        res.decode_ms = sum(res.token_ms)
        self._free(i)
        self.finished += 1
        self._emit(r.req, "done", res)
