"""Exact speculative decoding: a draft proposes a tree of continuations, one weight pass of the target
verifies every node of it (issue 19; SpecInfer's token-tree verification, SpecExec's best-first trees).

A streamed decode step costs one pass over the weights whether it computes one token or hundreds, so each
pass here verifies ``n`` tokens: the draft (a small resident model, ``ModelDraft``, or the text so far,
``NgramDraft``) builds a tree rooted at the last token, the target runs all its nodes in one pass with a
tree attention mask over its KV cache (``model.transformer.TreeQueries``), and the walk from the root keeps
going while the token the target picks at a node is one of that node's children.

Exactness. At every node of the walk the target's token is drawn exactly as plain decoding draws it: the
same ``generate.sample`` on the target's logits for the same prefix, from the same seeded generator, one
draw per emitted token. So greedy output is plain greedy output, and sampled output is the target's
distribution (with the same seed, the same tokens as the plain run, up to float rounding of the batched
pass). The draft only decides which tokens get their logits computed in the same pass; with a deterministic
tree this is SpecInfer's multi-candidate verification with point-mass proposals, whose acceptance is the
target's probability mass on a node's children, the most any set of children can get.

The accepted path's KV entries move to consecutive slots (``KVCache.keep``); the rest are overwritten by
the next pass. Batch 1 only. Runs in the client process.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from model.errors import ConfigError
from model.transformer import TreeQueries
from runtime.engine.config import EngineConfig, SamplingConfig
from runtime.engine.drafts import open_draft_image
from runtime.engine.generate import GenerationResult, Generator, generator_for, greedy, sample
from runtime.engine.graphs import TREE_ROWS
from runtime.engine.kv import KVCache
from runtime.engine.treecosts import PassCosts, interpolate, load_costs, pow2_sizes
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image


@dataclass
class Tree:
    """A token tree in insertion order (a parent before its children); node 0 is the root, the last token
    of the sequence so far. ``score``: the draft's log-probability of the path to the node."""

    tokens: list[int]
    parent: list[int] = field(default_factory=lambda: [-1])
    depth: list[int] = field(default_factory=lambda: [0])
    score: list[float] = field(default_factory=lambda: [0.0])
    at_ms: list[float] = field(default_factory=lambda: [0.0])  # the draft's time until the node was added
    t0: float = field(default_factory=time.perf_counter)

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, score: float = 0.0) -> int:
        self.tokens.append(token)
        self.parent.append(parent)
        self.depth.append(self.depth[parent] + 1)
        self.score.append(score)
        self.at_ms.append((time.perf_counter() - self.t0) * 1e3)
        return len(self.tokens) - 1

    def child(self, node: int, token: int) -> int | None:
        return next((i for i in range(node + 1, len(self)) if self.parent[i] == node and self.tokens[i] == token),
                    None)

    def visible(self, rows: range, device: torch.device) -> torch.Tensor:
        """(len(rows), rows.stop) bool: node r sees node j when j is r or one of its ancestors."""
        out = torch.zeros(len(rows), rows.stop, dtype=torch.bool)
        for i, r in enumerate(rows):
            j = r
            while j >= 0:
                out[i, j] = True
                j = self.parent[j]
        return out.to(device)

    def queries(self, rows: range, root: int, device: torch.device, root_cached: bool = False) -> TreeQueries:
        """The attention of nodes ``rows`` at cache slots root + node, the root at slot ``root`` (already in the
        cache with ``root_cached``: then every query sees it as part of the prefix)."""
        pos = torch.tensor([root + self.depth[r] for r in rows], dtype=torch.long, device=device)
        vis = self.visible(rows, device)
        return TreeQueries(root + 1, pos, vis[:, 1:]) if root_cached else TreeQueries(root, pos, vis)


def walk(tree: Tree, logits: torch.Tensor, choose: Callable[[torch.Tensor], int], stop_ids: frozenset[int],
         left: int, picks: Sequence[int] | None = None) -> tuple[list[int], list[int], bool]:
    """The walk from the root of a verified tree: at each node the target's token is drawn from that node's logits
    (``choose`` on logits (1, vocab): exactly plain decoding's draw), and the walk descends while that token is
    one of the node's children. logits (n, vocab): every node's. At most ``left`` tokens. -> (the tokens, the
    tree nodes accepted in order (the root excluded: their KV entries are kept), whether a stop token ended it).
    ``picks``: every node's token drawn already (greedy: the argmax of every row, read from the device at once
    rather than a node at a time), ``choose`` then unused."""
    node, toks, nodes = 0, [], []
    while True:
        tok = picks[node] if picks is not None else choose(logits[node:node + 1])
        toks.append(tok)
        if tok in stop_ids:
            return toks, nodes, True
        if len(toks) >= left:
            return toks, nodes, False
        nxt = tree.child(node, tok)
        if nxt is None:
            return toks, nodes, False
        node = nxt
        nodes.append(node)


class NgramDraft:
    """Prompt lookup: the continuations of the earlier places where the sequence's last ``max_ngram`` (down
    to 1) tokens occurred, most recent first, merged into a tree. No model, no device memory."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, max_matches: int = 8) -> None:
        self.max_ngram, self.max_matches = max_ngram, max_matches

    def reset(self) -> None:
        pass

    def propose(self, seq: Sequence[int], n: int) -> Tree:
        tree, seq = Tree([seq[-1]]), list(seq)
        for k in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            suffix, found = seq[-k:], 0
            for i in range(len(seq) - k - 1, -1, -1):  # match seq[i:i+k]; its continuation starts at i+k
                if seq[i:i + k] != suffix:
                    continue
                node = 0
                for tok in seq[i + k:i + k + n - 1]:
                    nxt = tree.child(node, tok)
                    if nxt is None:
                        if len(tree) >= n:
                            break
                        nxt = tree.add(node, tok)
                    node = nxt
                found += 1
                if found >= self.max_matches or len(tree) >= n:
                    break
            if len(tree) >= n:
                break
        return tree

    def close(self) -> None:
        pass


SPREAD = math.log(0.1)  # an expansion step's leaves: at least a tenth as likely as its best


class ModelDraft:
    """A small model held wholly on the target's device (``Generator`` over an in-memory source), with its
    own KV cache: slots [0, ``committed``) hold the sequence's tokens; a tree's nodes go after them. The
    tree grows best-first (SpecExec): each expansion step runs the draft once on the ``width`` most likely
    leaves not yet expanded and adds their ``branch`` most likely children as candidates, until ``n``
    nodes."""

    def __init__(self, gen: Generator, width: int = 8, branch: int = 4) -> None:
        self.gen, self.width, self.branch = gen, width, branch
        self.name = str(gen.source.image.path)
        self.cache: KVCache | None = None
        self.committed = 0

    def reset(self) -> None:
        """A new sequence: nothing of it in the draft's cache yet (the static decode's, where the draft's passes
        replay CUDA graphs)."""
        static = self.gen.static
        self.cache, self.committed = static.begin(1, None) if static is not None else self.gen.new_cache(1), 0

    def _logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().log_softmax(-1)

    def propose(self, seq: Sequence[int], n: int) -> Tree:
        tree = Tree([seq[-1]])  # its clock starts here: the root's forward is part of every node's draft time
        dev, base = self.gen.source.device, len(seq) - 1  # the root's slot; its children from slot base + 1
        pending = torch.tensor([list(seq[self.committed:])], dtype=torch.long, device=dev)
        if pending.shape[1] <= TREE_ROWS:  # the accepted tokens since the last tree: a short causal chunk
            logits = self.gen.forward_tree(pending, self.committed, self.cache, None)[0]
        else:  # the prompt
            logits = self.gen.forward(pending, self.committed, self.cache, last_only=True)[0]  # the root's
        self.committed = len(seq)
        cand: list[tuple[float, int, int]] = []  # (-score, parent, token)

        def push(nodes: range, lp: torch.Tensor) -> None:  # lp (len(nodes), vocab): one read of every node's top
            top = lp.topk(min(self.branch, lp.shape[-1]), dim=-1)
            for node, vs, ts in zip(nodes, top.values.tolist(), top.indices.tolist()):
                for v, t in zip(vs, ts):
                    heapq.heappush(cand, (-(tree.score[node] + v), node, t))

        push(range(1), self._logprobs(logits[-1:]))
        while len(tree) < n and cand:
            new, best = [], -cand[0][0]
            # the step's most likely leaves: at most ``width``, and none far less likely than the best (a
            # confident draft grows a chain, one node a step, rather than the root's unlikely siblings)
            while cand and len(new) < min(self.width, n - len(tree)) and -cand[0][0] >= best + SPREAD:
                neg, parent, tok = heapq.heappop(cand)
                new.append(tree.add(parent, tok, -neg))
            if len(tree) >= n:
                break
            rows = range(new[0], new[-1] + 1)  # added consecutively: slots base + rows
            toks = torch.tensor([[tree.tokens[r] for r in rows]], dtype=torch.long, device=dev)
            out = self.gen.forward_tree(toks, base + rows.start, self.cache,
                                        tree.queries(rows, base, dev, root_cached=True))[0]
            push(rows, self._logprobs(out))
        return tree

    def close(self) -> None:
        self.gen.source.close()


@dataclass
class SpecStats:
    """What a speculative generation did: its passes, the tokens each pass gave (the histogram), the draft's
    and the verification's time, and per depth how often the walk got there and went on."""

    passes: int = 0
    tokens: int = 0
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    tree_tokens: int = 0
    per_pass: dict[int, int] = field(default_factory=dict)
    reached: list[int] = field(default_factory=list)  # by depth d >= 1: passes whose walk reached depth d
    offered: list[int] = field(default_factory=list)  # passes whose tree had a node at depth d

    def record(self, tree: Tree, accepted: int, emitted: int) -> None:
        self.passes += 1
        self.tokens += emitted
        self.tree_tokens += len(tree)
        self.per_pass[emitted] = self.per_pass.get(emitted, 0) + 1
        deepest = max(tree.depth)
        for d in range(1, deepest + 1):
            while len(self.offered) < d:
                self.offered.append(0)
                self.reached.append(0)
            self.offered[d - 1] += 1
            self.reached[d - 1] += accepted >= d

    def to_dict(self) -> dict:
        return {"passes": self.passes, "tokens": self.tokens,
                "tokens_per_pass": self.tokens / self.passes if self.passes else None,
                "tokens_per_pass_histogram": {str(k): v for k, v in sorted(self.per_pass.items())},
                "tree_tokens_per_pass": self.tree_tokens / self.passes if self.passes else None,
                "draft_ms": self.draft_ms, "verify_ms": self.verify_ms,
                "acceptance_by_depth": [r / o if o else None for r, o in zip(self.reached, self.offered)]}


class TreeSize:
    """The tree's nodes per pass: fixed (``--draft-tokens``), or chosen to maximise the tokens a second,

        rate(m) = tokens(m) / (draft_ms(m) + pass_ms(m))   for m in 2, 4, 8, ... up to ``limit``,

    every ``EVERY`` passes from what the run has seen so far. tokens(m) and draft_ms(m) are measured, and
    exactly, for every m up to the size asked for: the draft adds nodes best-first and stops at its size, so a
    tree's first m nodes are the tree it builds for m; a pass tells what that prefix would have given (its walk
    goes on while its next node is below m) and when the draft had built it (``Tree.at_ms``). pass_ms(m) is
    the probe's time for a pass of that prefix's tokens (``PassCosts``) where the probe measured this image on
    this device, else this run's own: exact where the whole tree fits in m, else what the smallest larger size
    measured (a pass costs no more with fewer tokens). When the best is the largest size tried, the next size up
    is tried: the choice only grows into sizes it can measure."""

    EVERY = 8

    def __init__(self, start: int, limit: int, fixed: bool, costs: PassCosts | None = None) -> None:
        self.limit, self.fixed, self.costs = limit, fixed, costs
        self.n = start if fixed else min(limit, costs.start(limit) if costs is not None else start)
        self.passes = 0
        self.history: list[int] = [self.n]
        self.sizes = pow2_sizes(limit)
        zero = dict.fromkeys(self.sizes, 0.0)
        self.count = dict.fromkeys(self.sizes, 0)  # m -> passes that tell what m nodes would have done
        self.tokens, self.draft = dict(zero), dict(zero)  # m -> sums over them: tokens given, draft ms
        self.verify, self.verified = dict(zero), dict.fromkeys(self.sizes, 0)  # m -> pass ms summed, over passes
        self.rates: dict[int, float] = {}  # the last choice's tokens a second, by size

    def record(self, tree: Tree, path: Sequence[int], emitted: int, verify_ms: float) -> None:
        """One pass: its tree, the nodes its walk accepted (root excluded, in order), the tokens it emitted
        and its verification's time."""
        self.passes += 1
        n = len(tree)
        for m in self.sizes:
            if m > max(n, self.n):  # a tree smaller than asked for is the tree of every larger size too
                break
            k = min(m, n)
            self.count[m] += 1
            self.tokens[m] += min(emitted, 1 + sum(1 for node in path if node < k))
            self.draft[m] += tree.at_ms[k - 1] if k > 1 else 0.0
            if self.costs is not None or k == n:
                self.verify[m] += interpolate(self.costs.pass_ms, k) if self.costs is not None else verify_ms
                self.verified[m] += 1
        if not self.fixed and self.passes % self.EVERY == 0:
            self._choose()

    def pass_ms(self, m: int) -> float | None:
        larger = [x for x in self.sizes if x >= m and self.verified[x]]
        return self.verify[larger[0]] / self.verified[larger[0]] if larger else None

    def _choose(self) -> None:
        rates = {}
        for m in self.sizes:
            c, p = self.count[m], self.pass_ms(m)
            if c and p is not None:
                rates[m] = (self.tokens[m] / c) / (self.draft[m] / c + p) * 1e3
        if not rates:
            return
        self.rates = rates
        best = max(rates, key=lambda m: (rates[m], m))  # a tie (the same trees): the larger size
        bigger = [m for m in self.sizes if m > best]
        if best == max(rates) and bigger and self.count[bigger[0]] == 0:
            best = bigger[0]  # the best is the largest seen: try the next size up
        if best != self.n:
            self.n = best
            self.history.append(best)

    def describe(self) -> str:
        """The choice and what it rests on (printed by bench and run)."""
        if self.fixed:
            return f"{self.n} tree tokens a pass (--draft-tokens)"
        src = f"pass costs from the probe ({self.costs.source})" if self.costs is not None else \
            "pass costs measured in this run (launch.py probe --draft measures them for every size)"
        if not self.rates:
            return f"{self.n} tree tokens a pass (where the choice starts; {src})"
        rates = ", ".join(f"{k}: {v:.1f}" for k, v in self.rates.items())
        now = (f"expected {self.tokens[self.n] / self.count[self.n]:.2f} tokens a pass" if self.count[self.n]
               else "the best so far is the largest tried: trying the next size up")
        return f"{self.n} tree tokens a pass (tokens/s by size: {rates}; {now}; {src})"


class SpeculativeGenerator:
    """Speculative decoding of one sequence at a time: ``gen`` is the target's Generator (any weight source,
    any KV cache), ``draft`` an ``NgramDraft`` or a ``ModelDraft``, ``n`` the tree's nodes per pass (the
    root included): fixed, or with ``choose`` only where the choice starts (``TreeSize``)."""

    def __init__(self, gen: Generator, draft, n: int, choose: bool = False, limit: int | None = None,
                 costs: PassCosts | None = None) -> None:
        if n < 1:
            raise ConfigError(f"--draft-tokens must be at least 1, found {n}")
        if n > gen.prefill.chunk:
            raise ConfigError(f"--draft-tokens {n} exceeds --prefill-chunk {gen.prefill.chunk}: a pass verifies "
                              f"at most one prefill chunk")
        self.gen, self.draft = gen, draft
        self.size = TreeSize(n, min(gen.prefill.chunk, limit or n), fixed=not choose, costs=costs)
        self.stats = SpecStats()
        self.trace = getattr(gen.source, "trace", None)  # --trace: the draft's and the verification's spans

    @property
    def n(self) -> int:
        return self.size.n

    def __getattr__(self, name: str):
        return getattr(self.gen, name)  # the target's counters and cache (the bench reads them)

    def reset_counters(self) -> None:
        self.gen.reset_counters()
        self.stats = SpecStats()

    def report(self) -> dict:
        """The stats since reset_counters, the draft, and the tree's size (and how it was chosen)."""
        return {**self.stats.to_dict(), "draft": self.draft.name, "tree_tokens": self.n,
                "tree_tokens_fixed": self.size.fixed, "tree_tokens_history": list(self.size.history),
                "tree_tokens_choice": self.size.describe()}

    def generate_batch(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
                       stop_ids: frozenset[int] = frozenset(),
                       on_step: Callable[[list[int | None]], None] | None = None,
                       limits: Sequence[int] | None = None) -> list[GenerationResult]:
        """``Generator.generate_batch`` for a batch of one: a draft decodes one sequence at a time."""
        if len(prompts) != 1:
            raise ConfigError(f"--draft decodes one sequence at a time, found a batch of {len(prompts)}")
        one = cfg if limits is None else dataclasses.replace(cfg, max_new_tokens=limits[0])
        return [self.generate(prompts[0], one, stop_ids, (lambda t: on_step([t])) if on_step else None)]

    def generate(self, prompt: Sequence[int], cfg: SamplingConfig, stop_ids: frozenset[int] = frozenset(),
                 on_token: Callable[[int], None] | None = None) -> GenerationResult:
        gen = self.gen
        first = gen.prefill_one(prompt, cfg, gen._static())  # the static decode's cache: the passes replay graphs
        if first is None:
            return GenerationResult(list(prompt), [])
        res, rng, cache, tok = first
        self.draft.reset()
        dev = gen.source.device
        seq = list(prompt) + [tok]
        res.output_token_ids.append(tok)
        if on_token:
            on_token(tok)
        done = tok in stop_ids or cfg.max_new_tokens <= 1
        if tok in stop_ids:
            res.stop_reason = "stop_token"
        while not done:
            t1 = time.perf_counter()
            start = len(seq) - 1  # the root's slot: the last token, not yet in the cache
            n = min(self.n, gen.max_seq_len - start)
            tree = self.draft.propose(seq, n)
            t2 = time.perf_counter()
            logits = gen.forward_tree(torch.tensor([tree.tokens], dtype=torch.long, device=dev), start, cache,
                                      tree.queries(range(len(tree)), start, dev) if len(tree) > 1 else None)[0]
            picks = greedy(logits).tolist() if cfg.temperature == 0 else None  # sample's greedy draw, one read
            toks, nodes, stopped = walk(tree, logits, lambda x: int(sample(x, cfg, rng).item()), stop_ids,
                                        cfg.max_new_tokens - len(res.output_token_ids), picks)
            path, emitted = [start] + [start + n for n in nodes], len(toks)
            for tok in toks:
                seq.append(tok)
                res.output_token_ids.append(tok)
                if on_token:
                    on_token(tok)
            if stopped:
                res.stop_reason = "stop_token"
            done = stopped or len(res.output_token_ids) >= cfg.max_new_tokens
            if not done:
                cache.keep(path, start)
            t3 = time.perf_counter()
            if self.trace is not None:
                ns = [time.monotonic_ns() - round((t3 - t) * 1e9) for t in (t1, t2)] + [time.monotonic_ns()]
                args = {"pass": self.stats.passes, "tree_tokens": len(tree), "accepted": len(path) - 1}
                self.trace.span("draft", "speculative", "speculative", ns[0], ns[1], args)
                self.trace.span("verify", "speculative", "speculative", ns[1], ns[2], args)
            self.stats.draft_ms += (t2 - t1) * 1e3
            self.stats.verify_ms += (t3 - t2) * 1e3
            self.stats.record(tree, len(path) - 1, emitted)
            self.size.record(tree, [p - start for p in path[1:]], emitted, (t3 - t2) * 1e3)
            res.token_ms.append((t3 - t1) * 1e3)  # one entry per pass here
        res.decode_ms = sum(res.token_ms)
        return res


def speculative_for(gen: Generator, cfg: EngineConfig, target: Image) -> SpeculativeGenerator:
    """The speculative generator of a run with ``cfg.speculative.draft`` over the target's ``gen``: a model
    draft is read and put wholly on the target's device (its GPU memory was reserved by the plan). Without
    --draft-tokens the tree's size is chosen (``TreeSize``), from the probe's costs where it has them."""
    s, dev, chunk = cfg.speculative, gen.source.device, gen.prefill.chunk
    if s.draft == "ngram":
        draft = NgramDraft()
    else:
        image = open_draft_image(s.draft, target)
        draft = ModelDraft(Generator(InMemoryWeights(image, dev, quiet=True), gen.max_seq_len, prefill=gen.prefill,
                                     threads=gen.threads, cuda_graphs=cfg.cuda_graphs == "on"))
    plan = getattr(gen.source, "plan", None)
    costs = None if s.tokens is not None else load_costs(target, dev, plan.h2d_bytes_per_pass if plan else 0, s.draft)
    return SpeculativeGenerator(gen, draft, s.tree_tokens(dev.type, chunk), choose=s.tokens is None,
                                limit=s.tree_limit(dev.type, chunk), costs=costs)


def run_generator(source, cfg: EngineConfig, image: Image, max_len: int) -> Generator | SpeculativeGenerator:
    """A run's generator over ``source``: plain, or speculative over it with ``cfg.speculative.draft``."""
    gen = generator_for(source, cfg, max_len)
    return gen if cfg.speculative.draft is None else speculative_for(gen, cfg, image)

