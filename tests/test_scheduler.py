"""The continuous-batching scheduler's engine (runtime/engine/scheduler.py), in this process on the CPU with a tiny
random model (fast) and the logits as the references:

  test_prefix_reuse_equals_solo        prompts sharing a 150-token system prompt: the second, sent with the first,
      waits for its prefill and reuses it; a later one reuses it in place; a conversation's next turn reuses its
      earlier turns (prompt and answer); each equals its solo greedy run; the counters add up (prompt tokens
      computed = all prompt tokens - reused ones), and with the cache off nothing is reused.
  test_logprobs_equal_the_logits        tokens' and prompt tokens' log-probabilities (and their top-k) are the
      log-softmax of the logits of one in-process forward over the prompt and the output.
  test_processing_as_defined           logit bias, repetition / frequency / presence penalties, top-k, top-p and
      min-p change the distribution as their definitions say, checked on the logits and probabilities.
  test_speculative_rows                with a draft (the model itself, and prompt lookup) a lone row decodes from
      token trees (fewer passes than tokens) and two rows share plain passes; greedy and sampled tokens equal the
      plain solo runs; the draft's cache follows the row it serves.
  test_prompt_lookup_trees_in_a_batch  prompt lookup with pass costs flat in the tokens: every row of a batch
      verifies its own tree, with its plain greedy tokens; with costs that grow with the tokens, plain passes.
  test_job_waits_for_the_batch         an exclusive job runs once the running rows are done; requests that came
      meanwhile run after it; the batch's cache and its reuse come back.
Each with the batch's cache on the device and offloaded (TieredKVCache). One to two minutes on 2 cores.
"""

from __future__ import annotations

import random

import pytest
import torch

from model.synthetic import SyntheticCheckpoint
from runtime.engine.config import PrefillConfig, SamplingConfig
from runtime.engine.generate import Generator, filtered
from runtime.engine.sampling import TokenChooser, apply_bitmask
from runtime.engine.scheduler import Scheduler, SchedulerConfig, SeqRequest
from runtime.engine.speculative import ModelDraft, NgramDraft, SpeculativeGenerator
from runtime.engine.weights import InMemoryWeights
from runtime.format.image import Image
from runtime.format.pack import pack

MAX_LEN = 320


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("sched")
    pack(SyntheticCheckpoint("tiny", n_layers=3), d / "t.img", dtype="fp32", quiet=True)
    return Image.open(d / "t.img")


@pytest.fixture(scope="module", params=["device", "offloaded"])
def gen(image, request):
    """The batch's cache on the device, or offloaded (TieredKVCache: prefix copies and a tree's kept path in
    its host store)."""
    return Generator(InMemoryWeights(image, "cpu", quiet=True), MAX_LEN, prefill=PrefillConfig(chunk=64),
                     offload=request.param == "offloaded")


def solo(gen: Generator, prompt: list[int], cfg: SamplingConfig) -> list[int]:
    return Generator(gen.source, MAX_LEN).generate(prompt, cfg).output_token_ids  # on the device


class Events:
    """Each request's events, in order."""

    def __init__(self) -> None:
        self.by: dict[int, list] = {}

    def request(self, prompt: list[int], cfg: SamplingConfig, **kw) -> SeqRequest:
        i = len(self.by)
        self.by[i] = []
        r = SeqRequest(prompt, cfg, lambda k, x: self.by[i].append((k, x)), **kw)
        r.n = i
        return r

    def done(self, r: SeqRequest):
        return next(x for k, x in self.by[r.n] if k == "done")

    def of(self, r: SeqRequest, kind: str) -> list:
        return [x for k, x in self.by[r.n] if k == kind]


def drain(sched: Scheduler, limit: int = 2000) -> int:
    for n in range(limit):
        if not sched.tick():
            return n
    raise AssertionError(f"the scheduler still had work after {limit} steps")


def test_prefix_reuse_equals_solo(gen):
    rnd = random.Random(30)
    print("seed 30")
    vocab = gen.args.vocab_size
    system = [rnd.randrange(1, vocab) for _ in range(150)]
    qs = [[rnd.randrange(1, vocab) for _ in range(n)] for n in (12, 20, 7)]
    cfg = SamplingConfig(6)
    ev = Events()
    sched = Scheduler(gen, SchedulerConfig(max_batch=2, max_queue=8))
    a, b = ev.request(system + qs[0], cfg), ev.request(system + qs[1], cfg)
    sched.submit(a)
    sched.submit(b)
    drain(sched)
    c = ev.request(system + qs[2], cfg)
    sched.submit(c)
    drain(sched)
    ra, rb, rc = ev.done(a), ev.done(b), ev.done(c)
    for r, res in ((a, ra), (b, rb), (c, rc)):
        assert res.output_token_ids == solo(gen, r.prompt, cfg), r.n
    assert ra.cached_tokens == 0 and rb.cached_tokens >= len(system) and rc.cached_tokens >= len(system)
    assert rb.batched == 2  # it joined while a decoded: after a's prefill, not beside it
    # the next turn of b's conversation: its prompt and answer are in the cache (but the answer's last token); c
    # took a's row, the least recently used
    d = ev.request(b.prompt + rb.output_token_ids + qs[0], cfg)
    sched.submit(d)
    drain(sched)
    assert ev.done(d).cached_tokens == len(b.prompt) + len(rb.output_token_ids) - 1
    assert ev.done(d).output_token_ids == solo(gen, d.prompt, cfg)
    reqs = (a, b, c, d)
    total = sum(len(r.prompt) for r in reqs)
    cached = sum(ev.done(r).cached_tokens for r in reqs)
    assert (sched.prefilled_tokens, sched.cached_tokens) == (total - cached, cached)
    off = Scheduler(gen, SchedulerConfig(max_batch=2, prefix_cache=False))
    e = ev.request(list(c.prompt), cfg)
    off.submit(e)
    drain(off)
    assert ev.done(e).cached_tokens == 0 and ev.done(e).output_token_ids == rc.output_token_ids
    assert off.prefilled_tokens == len(c.prompt)


def test_logprobs_equal_the_logits(gen):
    rnd = random.Random(31)
    print("seed 31")
    prompt = [rnd.randrange(1, gen.args.vocab_size) for _ in range(90)]  # two prefill passes of 64
    ev = Events()
    sched = Scheduler(gen, SchedulerConfig(max_batch=2))
    r = ev.request(prompt, SamplingConfig(5, temperature=0.9, seed=4), logprobs=3, prompt_logprobs=2)
    sched.submit(r)
    drain(sched)
    out = ev.done(r).output_token_ids
    toks = ev.of(r, "token")
    assert [t.token for t in toks] == out
    ref = Generator(gen.source, MAX_LEN)
    seq = torch.tensor([prompt + out])
    lp = ref.forward(seq, 0, ref.new_cache(1))[0].log_softmax(-1)  # (len, vocab): position i predicts i + 1
    for j, t in enumerate(toks):
        row = lp[len(prompt) - 1 + j]
        assert t.logprob == pytest.approx(float(row[t.token]), abs=1e-4)
        want = row.topk(3)
        assert [i for i, _ in t.top] == want.indices.tolist()
        assert [v for _, v in t.top] == pytest.approx(want.values.tolist(), abs=1e-4)
    (plp,) = ev.of(r, "prompt_logprobs")
    assert plp[0] is None and len(plp) == len(prompt)
    for q in range(1, len(prompt)):
        assert plp[q].token == prompt[q]
        assert plp[q].logprob == pytest.approx(float(lp[q - 1, prompt[q]]), abs=1e-4)
        assert [i for i, _ in plp[q].top] == lp[q - 1].topk(2).indices.tolist()
    # the same request without log-probabilities draws the same tokens (they do not touch the sampling)
    s = ev.request(prompt, SamplingConfig(5, temperature=0.9, seed=4))
    sched.submit(s)
    drain(sched)
    assert ev.done(s).output_token_ids == out


def test_processing_as_defined():
    g = torch.Generator().manual_seed(32)
    print("seed 32")
    vocab = 50
    logits = torch.randn(1, vocab, generator=g) * 3
    prompt, out = [3, 7, 7], [7, 9, 9, 9]

    def processed(**kw) -> torch.Tensor:
        ch = TokenChooser(SamplingConfig(8, **kw), prompt, vocab, torch.device("cpu"), torch.Generator())
        for t in out:
            ch.observe(t)
        return ch.process(logits)[0]

    x = logits[0]
    y = processed(logit_bias=((5, 10.0), (9, -100.0)))
    assert y[5] == x[5] + 10 and y[9] == x[9] - 100 and torch.equal(y[:5], x[:5])
    y = processed(repetition_penalty=1.5)
    for t in range(vocab):  # CTRL: a seen token's positive logit divided, a negative one multiplied
        want = (x[t] / 1.5 if x[t] > 0 else x[t] * 1.5) if t in {3, 7, 9} else x[t]
        assert y[t] == pytest.approx(float(want))
    y = processed(frequency_penalty=0.5, presence_penalty=0.25)  # OpenAI's: the output's counts only
    counts = {7: 1, 9: 3}
    for t in range(vocab):
        c = counts.get(t, 0)
        assert y[t] == pytest.approx(float(x[t] - 0.5 * c - 0.25 * (c > 0)))
    mask = torch.zeros(2, dtype=torch.int32)
    mask[0] = (1 << 4) - (1 << 31)  # tokens 4 and 31 (the sign bit), and 33
    mask[1] = 1 << 1
    y = apply_bitmask(logits.clone(), mask)[0]
    assert (y > float("-inf")).nonzero().view(-1).tolist() == [4, 31, 33]

    p = torch.softmax(logits / 0.7, -1)[0]
    order = p.argsort(descending=True)

    def dist(**kw) -> torch.Tensor:
        sp, idx = filtered(logits, SamplingConfig(8, temperature=0.7, **kw))
        return torch.zeros(vocab).scatter(0, idx[0], sp[0])

    d = dist(top_k=5)  # the 5 most likely, in proportion
    assert set(d.nonzero().view(-1).tolist()) == set(order[:5].tolist())
    assert torch.allclose(d[order[:5]] / d.sum(), p[order[:5]] / p[order[:5]].sum())
    d = dist(min_p=0.2)  # those at least 0.2 times as likely as the most likely
    assert set(d.nonzero().view(-1).tolist()) == set((p >= 0.2 * p.max()).nonzero().view(-1).tolist())
    assert torch.allclose(d[d > 0], p[d > 0])
    d = dist(top_k=10, top_p=0.5)  # the nucleus of what top-k kept, renormalised
    kept = p[order[:10]] / p[order[:10]].sum()
    n = int((kept.cumsum(0) - kept < 0.5).sum())
    assert set(d.nonzero().view(-1).tolist()) == set(order[:n].tolist())


@pytest.mark.parametrize("draft", ["self", "ngram"])
def test_speculative_rows(gen, image, draft):
    if gen.kv_offload and draft == "self":
        pytest.skip("the offloaded cache's trees are checked with ngram's (the model draft doubles the time)")
    repeat = [3, 4, 5, 6, 3, 4, 5, 7, 3, 4, 9, 11, 3, 4, 5]  # prompt lookup finds continuations
    other = [8, 2, 9, 1, 8, 2, 9]
    greedy, sampled = SamplingConfig(24), SamplingConfig(24, temperature=0.8, top_p=0.9, seed=5)
    make = (lambda: ModelDraft(Generator(InMemoryWeights(image, "cpu", quiet=True), MAX_LEN))) if draft == "self" \
        else NgramDraft
    spec = SpeculativeGenerator(Generator(gen.source, MAX_LEN, offload=gen.kv_offload), make(), 8)
    sched = Scheduler(spec, SchedulerConfig(max_batch=2), max_len=MAX_LEN - 8)
    ev = Events()
    alone = ev.request(repeat, greedy)
    sched.submit(alone)
    drain(sched)
    assert ev.done(alone).output_token_ids == solo(gen, repeat, greedy)
    assert 0 < sched.spec_passes < sched.spec_tokens <= 23  # trees: more tokens than passes
    if draft == "self":  # its own draft agrees with it: every tree is walked past its root
        assert sched.spec_tokens >= 2 * sched.spec_passes, (sched.spec_passes, sched.spec_tokens)
    passes = sched.spec_passes
    pair = [ev.request(repeat, greedy), ev.request(other, SamplingConfig(6, temperature=0.8, top_p=0.9, seed=5))]
    for r in pair:
        sched.submit(r)
    drain(sched)
    for r in pair:
        assert ev.done(r).output_token_ids == solo(gen, r.prompt, r.sampling), r.n
    assert ev.done(pair[0]).batched == 2 and sched.spec_passes > passes  # once alone, it decodes from trees
    s = ev.request(other, sampled)  # sampled alone: the plain run's draws with its seed
    sched.submit(s)
    drain(sched)
    assert ev.done(s).output_token_ids == solo(gen, other, sampled)
    assert ev.done(s).output_token_ids[:6] == ev.done(pair[1]).output_token_ids


def test_prompt_lookup_trees_in_a_batch(gen):
    """With prompt lookup and pass costs by which a pass costs the same whatever its tokens (a streamed model's),
    every row of a batch verifies its own tree; the tokens are each row's plain greedy ones. With costs that grow
    with the tokens (a compute-bound pass), rows share plain passes."""
    from runtime.engine.treecosts import PassCosts

    repeat = [3, 4, 5, 6, 3, 4, 5, 7, 3, 4, 9, 11, 3, 4, 5]
    prompts = [repeat, repeat[3:] + repeat[:3], [8, 2, 9, 1, 8, 2, 9, 1, 8]]
    cfg = SamplingConfig(20)
    for flat, batched_trees in ((True, True), (False, False)):
        # passes of 10 s: the draft's own time (ms, whatever this machine's load) cannot decide
        costs = PassCosts({1: 1e4, 1024: 1e4 if flat else 1e7}, {1: 0.0, 1024: 0.0}, "test")
        spec = SpeculativeGenerator(Generator(gen.source, MAX_LEN, offload=gen.kv_offload), NgramDraft(), 4,
                                    costs=costs)
        shared = []  # passes of several rows that verified trees
        sched = Scheduler(spec, SchedulerConfig(max_batch=3), max_len=MAX_LEN - 4,
                          observer=lambda st, shared=shared: shared.append(st) if st.rows > 1 and
                          st.tree_tokens > st.rows else None)
        ev = Events()
        warm = ev.request(repeat, cfg)  # alone: trees, and what they gave by size
        sched.submit(warm)
        drain(sched)
        reqs = [ev.request(p, cfg) for p in prompts]
        for r in reqs:
            sched.submit(r)
        drain(sched)
        for r in reqs:
            assert ev.done(r).output_token_ids == solo(gen, r.prompt, cfg), (flat, r.n)
        assert bool(shared) == batched_trees, (flat, len(shared))


def test_job_waits_for_the_batch(gen):
    ev = Events()
    sched = Scheduler(gen, SchedulerConfig(max_batch=2))
    first = ev.request([5, 6, 7, 8] * 5, SamplingConfig(8))
    sched.submit(first)
    sched.tick()
    ran = []

    def job(g) -> None:
        ran.append((g, sched.active(), len(ev.of(first, "done"))))

    sched.submit_job(job)
    later = ev.request([5, 6, 7, 8] * 5 + [9], SamplingConfig(4))
    sched.submit(later)
    drain(sched)
    assert ran == [(gen, 0, 1)]  # after the first, with no row in use
    assert ev.done(later).output_token_ids == solo(gen, later.prompt, SamplingConfig(4))
    assert ev.done(later).cached_tokens == 0  # the job's cache replaced the batch's: nothing to reuse
    again = ev.request(list(later.prompt), SamplingConfig(4))
    sched.submit(again)
    drain(sched)
    assert ev.done(again).cached_tokens == len(later.prompt) - 1
