"""From one sequence's logits to its next token, with what the OpenAI API's requests ask for beyond temperature
and top-p: logit bias, repetition / frequency / presence penalties, top-k and min-p, log-probabilities, and a
grammar the output must follow (runtime/engine/constrained.py). The continuous-batching scheduler
(runtime/engine/scheduler.py) keeps one ``TokenChooser`` per sequence. Runs in the model thread, on the
logits' device.

The order, as vLLM's and HF's: the raw logits (B, vocab) fp32; + ``logit_bias``; ``repetition_penalty`` p on
every token of the prompt and the output so far (a positive logit divided by p, a negative one multiplied:
CTRL's, HF's); ``frequency_penalty`` f and ``presence_penalty`` r on the output's tokens (OpenAI's: logit -=
f x count + r x [count > 0]); the grammar's mask (tokens it does not allow: -inf); then ``generate.sample``
(greedy at temperature 0, else temperature, top-k, top-p, min-p: ``generate.filtered``). Log-probabilities are
the model's own: log-softmax of the raw logits, before any of that (vLLM's default, "raw logprobs"), for the
chosen token and the ``logprobs`` most likely ones.

Nothing here waits for the device except what choosing a token needs anyway (its id, on the host); the grammar's
mask is a bitmask (vocab / 32 int32, made on the host by the grammar library) copied to the device and applied
there (``apply_bitmask``).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from runtime.engine.config import SamplingConfig
from runtime.engine.generate import sample

MAX_LOGPROBS = 20  # the most alternatives a token's log-probabilities list (OpenAI's top_logprobs limit)


class Sampled(NamedTuple):
    """A chosen token, with its log-probability and the ``logprobs`` most likely tokens' (id, log-probability)
    when asked for."""

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] | None = None


class Constraint(Protocol):
    """A grammar the output follows (runtime/engine/constrained.py): a matcher advanced token by token."""

    def bitmask(self) -> torch.Tensor:
        """The tokens allowed next: (ceil(vocab / 32),) int32 on the host, bit i of word w for token 32 w + i."""

    def accept(self, token: int) -> None:
        """Advance by ``token`` (one the bitmask allowed)."""

    def done(self) -> bool:
        """The grammar is complete: nothing but an end token may follow."""


def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits (N, vocab) with the tokens whose bit is 0 in ``mask`` ((ceil(vocab / 32),) int32, on the logits'
    device) set to -inf, in place. Bits past the vocabulary are ignored."""
    vocab = logits.shape[-1]
    bits = torch.arange(32, device=mask.device, dtype=torch.int32)
    allowed = ((mask.unsqueeze(-1) >> bits) & 1).view(-1)[:vocab].bool()  # (vocab,)
    return logits.masked_fill_(~allowed, float("-inf"))


def logprobs_of(logits: torch.Tensor, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The raw log-probability of ``token`` under logits (1, vocab), and the k most likely tokens' (waits for the
    device: the caller has the token on the host already)."""
    lp = logits[0].float().log_softmax(-1)
    if k:
        top = lp.topk(k)
        pairs = tuple(zip(top.indices.tolist(), top.values.tolist()))
    else:
        pairs = ()
    return float(lp[token]), pairs


class TokenChooser:
    """One sequence's choice of its tokens (module docstring): ``cfg`` its sampling, ``prompt`` its prompt (the
    repetition penalty's first tokens), ``rng`` its seeded generator (one draw per sampled token, as
    ``Generator.generate``), ``logprobs`` the alternatives to report (None: no log-probabilities),
    ``constraint`` its grammar (None: any token)."""

    def __init__(self, cfg: SamplingConfig, prompt: list[int], vocab: int, device: torch.device,
                 rng: torch.Generator, logprobs: int | None = None, constraint: Constraint | None = None) -> None:
        self.cfg, self.rng, self.logprobs, self.constraint = cfg, rng, logprobs, constraint
        self.device, self.vocab = device, vocab
        self.bias = None
        if cfg.logit_bias:
            self.bias = torch.zeros(vocab, device=device)
            ids = torch.tensor([t for t, _ in cfg.logit_bias], dtype=torch.long, device=device)
            self.bias[ids] = torch.tensor([b for _, b in cfg.logit_bias], device=device)
        self.counts = torch.zeros(vocab, device=device) if cfg.frequency_penalty or cfg.presence_penalty else None
        self.seen = None
        if cfg.repetition_penalty != 1:
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt, dtype=torch.long, device=device)] = True

    @property
    def plain(self) -> bool:
        """Chosen by ``generate.sample`` on the raw logits alone (the batch's argmax serves a greedy one)."""
        return not self.cfg.processed and self.logprobs is None and self.constraint is None

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (1, vocab) fp32 -> the processed logits sampling sees (a new tensor; the module docstring's
        order, the grammar's mask last)."""
        x = logits.float().clone()
        if self.bias is not None:
            x += self.bias
        if self.seen is not None:
            p = self.cfg.repetition_penalty
            x = torch.where(self.seen & (x > 0), x / p, torch.where(self.seen, x * p, x))
        if self.counts is not None:
            x -= self.cfg.frequency_penalty * self.counts + self.cfg.presence_penalty * (self.counts > 0)
        if self.constraint is not None:
            mask = self.constraint.bitmask()
            mask = mask.pin_memory() if self.device.type == "cuda" else mask
            apply_bitmask(x, mask.to(self.device, non_blocking=True))
        return x

    def choose(self, logits: torch.Tensor) -> Sampled:
        """The next token from logits (1, vocab); the sequence's state (counts, grammar) advanced by it."""
        tok = int(sample(self.process(logits), self.cfg, self.rng).item())
        lp, top = logprobs_of(logits, tok, self.logprobs) if self.logprobs is not None else (None, None)
        self.observe(tok)
        return Sampled(tok, lp, top)

    def observe(self, token: int) -> None:
        """``token`` was emitted (chosen here, or by the batch's argmax for a plain sequence)."""
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True
        if self.constraint is not None:
            self.constraint.accept(token)
