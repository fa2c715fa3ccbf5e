"""Per-token cost of a grammar's token mask, for the grammar libraries constrained decoding could use (issue 30):
llguidance, xgrammar and outlines-core, on one tokenizer, for the grammars the HTTP server builds: any JSON
object (response_format json_object), a JSON schema (json_schema), and a forced tool call in the Hermes / Qwen
format (``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the arguments by their schema).

    python benchmarks/grammar_masks.py                                   # the embedded SmolLM2's tokenizer
    python benchmarks/grammar_masks.py --image 8b.img --out-json OUT/grammar_masks.json

For each library and grammar: its import time and the tokenizer's preparation (once per server), the grammar's
compile time, then a
walk through a valid document's tokens (the model's own tokenization of it): at each token the mask is computed
into a (vocab / 32) int32 bitmask on the host (what the server copies to the device), the token is checked
allowed, and consumed. Prints the mean, p50 and p99 per token of mask + consume, and which libraries are
missing (pip install llguidance xgrammar outlines-core). Single-threaded masks (the server computes one row's at
a time, overlapped with the device's pass). Only what imports is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
    "email": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
    "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                 "country": {"type": "string", "enum": ["FR", "DE", "US"]}},
                "required": ["city", "country"], "additionalProperties": False},
    "active": {"type": "boolean"}},
    "required": ["name", "age", "email", "tags", "address", "active"], "additionalProperties": False}
DOC = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines", "poetry"],
       "address": {"city": "London", "country": "US"}, "active": True}
TOOL_ARGS = {"type": "object", "properties": {"city": {"type": "string"},
                                              "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
             "required": ["city", "unit"], "additionalProperties": False}
TOOL_SCHEMA = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": TOOL_ARGS},
               "required": ["name", "arguments"], "additionalProperties": False}
TOOL_DOC = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}


def cases() -> dict[str, tuple[str, dict | None, str]]:
    """name -> (kind, schema, the valid document's text)."""
    tool = "<tool_call>\n" + json.dumps(TOOL_DOC) + "\n</tool_call>"
    return {"json_object": ("json", {"type": "object"}, json.dumps(DOC)),
            "json_schema": ("json", SCHEMA, json.dumps(DOC)),
            "tool_call": ("tool", TOOL_SCHEMA, tool)}


# ---- the libraries: prepare(vocab) -> compile(case) -> matcher with mask(bitmask), accept(token) -------------

class Xgrammar:
    name = "xgrammar"

    @staticmethod
    def load() -> None:
        import xgrammar  # noqa: F401

    def __init__(self, vocab: list[bytes], eos: list[int], tok) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=eos)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, kind: str, schema: dict):
        if kind == "json":
            return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)
        body = self.xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=True)
        g = self.xgr.Grammar.concat(self.xgr.Grammar.from_ebnf('root ::= "<tool_call>\\n"'), body,
                                    self.xgr.Grammar.from_ebnf('root ::= "\\n</tool_call>"'))
        return self.compiler.compile_grammar(g)

    def matcher(self, compiled):
        m = self.xgr.GrammarMatcher(compiled)
        return lambda mask: m.fill_next_token_bitmask(mask), m.accept_token


class Llguidance:
    name = "llguidance"

    @staticmethod
    def load() -> None:
        import llguidance  # noqa: F401

    def __init__(self, vocab: list[bytes], eos: list[int], tok) -> None:
        import llguidance

        from runtime.engine.constrained import llguidance_tokenizer

        self.llg = llguidance
        self.tok = llguidance_tokenizer(tok)  # the server's: llguidance reads the tokenizer's own files

    def compile(self, kind: str, schema: dict):
        g = self.llg.LLMatcher.grammar_from_json_schema(schema)  # as the server: json.dumps's separators
        if kind == "tool":
            js = json.dumps(schema)
            g = self.llg.grammar_from("lark", f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {js}')
        err = self.llg.LLMatcher.validate_grammar(g, self.tok)
        if err:
            raise ValueError(err)
        return g

    def matcher(self, grammar):
        m = self.llg.LLMatcher(self.tok, grammar)
        return lambda mask: m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4), m.consume_token


class OutlinesCore:
    name = "outlines-core"

    @staticmethod
    def load() -> None:
        import outlines_core  # noqa: F401

    def __init__(self, vocab: list[bytes], eos: list[int], tok) -> None:
        import outlines_core

        self.oc = outlines_core
        by = {}
        for i, t in enumerate(vocab):
            if i not in eos and t:
                by.setdefault(t, []).append(i)
        self.vocab = outlines_core.Vocabulary(eos[0], by)

    def compile(self, kind: str, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        if kind == "tool":
            regex = "<tool_call>\\n" + regex + "\\n</tool_call>"
        return self.oc.Index(regex, self.vocab)

    def matcher(self, index):
        g = self.oc.Guide(index)
        return lambda mask: g.write_mask_into(mask.data_ptr(), mask.numel(), 4), g.advance


LIBRARIES = (Llguidance, Xgrammar, OutlinesCore)


def measure(lib, kind: str, schema: dict, ids: list[int], vocab_size: int) -> dict:
    import torch

    t0 = time.perf_counter()
    compiled = lib.compile(kind, schema)
    compile_ms = (time.perf_counter() - t0) * 1e3
    mask, accept = lib.matcher(compiled)
    bitmask = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)
    times, refused = [], 0
    for tok in ids:
        t = time.perf_counter()
        mask(bitmask if lib.name != "outlines-core" else bitmask[0])
        allowed = bool(int(bitmask[0, tok // 32]) >> (tok % 32) & 1)
        accept(tok)
        times.append((time.perf_counter() - t) * 1e3)
        refused += not allowed
    s = sorted(times)
    return {"compile_ms": compile_ms, "tokens": len(ids), "mean_ms": statistics.fmean(times),
            "p50_ms": s[len(s) // 2], "p99_ms": s[min(len(s) - 1, round(0.99 * (len(s) - 1)))],
            "refused_tokens": refused}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", help="a packed image whose tokenizer to use (default: the embedded SmolLM2)")
    ap.add_argument("--repeat", type=int, default=3, help="walks per grammar; the fastest is kept (default 3)")
    ap.add_argument("--out-json", help="write the rows here")
    a = ap.parse_args()
    import torch

    from runtime.format.embedded import embedded_image
    from runtime.format.image import Image
    from runtime.format.tokens import image_tokenizer, token_bytes

    torch.set_num_threads(1)
    tok = image_tokenizer(Image.open(a.image or embedded_image("fp32")), required=True)
    vocab, eos = token_bytes(tok), sorted(tok.eos_ids)
    print(f"tokenizer {tok.source}: {len(vocab)} tokens, end tokens {eos}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", file=sys.stderr)
    rows = []
    for cls in LIBRARIES:
        try:
            t0 = time.perf_counter()
            cls.load()
            t1 = time.perf_counter()
            lib = cls(vocab, eos, tok)
            import_ms, prep_ms = (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3
        except ImportError as e:
            print(f"{cls.name}: not installed ({e})", file=sys.stderr)
            continue
        for case, (kind, schema, text) in cases().items():
            ids = tok.encode(text, bos=False)
            try:
                runs = [measure(lib, kind, schema, ids, len(vocab)) for _ in range(a.repeat)]
            except Exception as e:  # noqa: BLE001 (a library that cannot do a grammar: its row says so)
                rows.append({"library": cls.name, "grammar": case, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            best = min(runs, key=lambda r: r["mean_ms"])
            rows.append({"library": cls.name, "grammar": case, "import_ms": import_ms, "prepare_ms": prep_ms, **best})
    print(f"{'library':14s} {'grammar':12s} {'import ms':>9s} {'prepare ms':>10s} {'compile ms':>10s} {'tokens':>6s} "
          f"{'mean ms':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'refused':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['library']:14s} {r['grammar']:12s} error: {r['error']}")
            continue
        print(f"{r['library']:14s} {r['grammar']:12s} {r['import_ms']:9.0f} {r['prepare_ms']:10.1f} "
              f"{r['compile_ms']:10.1f} {r['tokens']:6d} "
              f"{r['mean_ms']:8.3f} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['refused_tokens']:7d}")
    if a.out_json:
        Path(a.out_json).write_text(json.dumps({"rows": rows, "vocab": len(vocab), "machine": platform.platform(),
                                                "cpus": os.cpu_count()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
