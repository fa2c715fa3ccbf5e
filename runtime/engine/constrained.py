"""Constrained decoding: grammars an answer must follow (the HTTP server's ``response_format`` json_object and
json_schema, and a forced tool call's format), by llguidance (benchmarks/grammar_masks.py: its masks cost
0.01-0.03 ms a token on this CPU against xgrammar's 0.01 and outlines-core's 0.04-0.55, its grammars compile in
under a millisecond against 10 ms and 0.1-11 s, and it needs no other package).

``Grammars`` holds llguidance's view of one tokenizer (``llguidance_tokenizer``; made once, 0.3-0.6 s for SmolLM2's
49K tokens) and turns a request's format into a grammar, checked (ValueError naming what is
wrong). ``matcher(grammar)`` is one sequence's state: the scheduler's TokenChooser (runtime/engine/sampling.py)
asks it for the next token's bitmask (computed on the host into a (vocab / 32) int32 tensor, copied to the
device and applied there), and advances it by the chosen token. A grammar that is complete stops its sequence
(``done``); its end tokens are the tokenizer's. Runs in the model thread (matchers) and the HTTP server's
threads (grammars).
"""

from __future__ import annotations

import json

import torch

from model.tokenizer import Tokenizer


class Grammars:
    """llguidance grammars over ``tok``'s vocabulary (module docstring)."""

    def __init__(self, tok: Tokenizer) -> None:
        import llguidance

        self.llg = llguidance
        self.vocab = tok.vocab_size
        self.tok = llguidance_tokenizer(tok)

    def check(self, grammar: str) -> str:
        """``grammar`` if llguidance accepts it, else ValueError with its message."""
        err = self.llg.LLMatcher.validate_grammar(grammar, self.tok)
        if err:
            raise ValueError(err.splitlines()[0][:300])
        return grammar

    def json_schema(self, schema: dict) -> str:
        """The grammar of JSON documents that validate against ``schema``, written as ``json.dumps`` writes them
        (", " and ": " between items: no room for a weak model to wander in whitespace)."""
        try:
            g = self.llg.LLMatcher.grammar_from_json_schema(schema)
        except ValueError as e:
            raise ValueError(f"not a JSON schema: {e}") from None
        return self.check(g)

    def json_object(self) -> str:
        """Any JSON object (response_format json_object)."""
        return self.json_schema({"type": "object"})

    def lark(self, text: str) -> str:
        """A Lark grammar (llguidance's syntax: ``%json {schema}`` embeds a JSON schema)."""
        return self.check(self.llg.grammar_from("lark", text))

    def matcher(self, grammar: str) -> Matcher:
        return Matcher(self.llg.LLMatcher(self.tok, grammar, log_level=0), self.vocab)


def llguidance_tokenizer(tok: Tokenizer):
    """llguidance's view of ``tok``: its own reading of the tokenizers JSON or the tiktoken ranks, so that control
    tokens (chat markers, end tokens) are special there: a grammar allows one only where it names it, and an end
    token where it is complete."""
    import llguidance

    b, eos = tok.backend, sorted(tok.eos_ids)

    def make(eos_token):
        if hasattr(b, "ranks"):  # tiktoken
            return llguidance.LLTokenizer.from_tiktoken(encoder=b.ranks, special_tokens=b.specials, pattern=b.pattern,
                                                        eos_token=eos_token, n_vocab=tok.vocab_size)
        return llguidance.LLTokenizer(b.special.to_str(), eos_token=eos_token, n_vocab=tok.vocab_size)

    try:
        return make(eos)
    except TypeError:  # older llguidance (1.6) takes one end token: grammars end on that one (the others still stop)
        return make(eos[0])


def lark_string(text: str) -> str:
    """``text`` as a Lark string literal."""
    return json.dumps(text)


class Matcher:
    """One sequence's place in its grammar: the runtime.engine.sampling.Constraint of a request."""

    def __init__(self, m, vocab: int) -> None:
        self.m = m
        self.mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def bitmask(self) -> torch.Tensor:
        """The tokens allowed next (a host tensor, rewritten at every call)."""
        self.m.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * 4)
        self._check()
        return self.mask

    def accept(self, token: int) -> None:
        self.m.consume_token(token)
        self._check()

    def done(self) -> bool:
        """Nothing but an end token may follow."""
        return self.m.is_stopped()

    def _check(self) -> None:
        if self.m.is_error():
            raise RuntimeError(f"the grammar failed: {self.m.get_error()[:300]}")
