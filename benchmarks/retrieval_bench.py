"""Long-context retrieval with and without top-k KV blocks: a fact hidden in filler text, then a question.

    python benchmarks/retrieval_bench.py --device cuda --lengths 2048,4096,8000 --cases 60 \\
        --topk 8,16,32,64 --kv-block-tokens 64 --timing-steps 64 --out $OUT/retrieval.json     # GPU machine
    python benchmarks/retrieval_bench.py --lengths 1024 --cases 5 --topk 4,8 --timing-steps 8    # CPU check

Each case ("needle in a haystack") is built deterministically from ``--seed``: a fact such as "The secret
code of the blue door is 4817." (colour, object and 4-digit number vary per case) is inserted at a depth of
10%..90% into filler prose assembled from fixed word lists (no numbers, nothing about codes), the prompt
padded to a target token count (``--lengths``; SmolLM2's context is 8192), then the question "What is the
secret code of the blue door?". The prompt goes through the model's chat template; the assistant turn
starts with the answer's framing ("The secret code of the blue door is", ``--no-answer-prefix`` drops it),
so the model has to copy the number from the text. Greedy decoding, ``--new-tokens`` tokens (stopping at
end of turn); a case is a hit when the expected number appears in the decoded output.

Every case runs with exact attention and with each ``--topk K`` (``Generator(..., KVConfig(topk_blk=K,
block_tokens=B))``: each decode step attends, per KV head, to the K blocks of B tokens with the highest
Quest bound, plus the first block and the most recent window). Reported per configuration: accuracy per
length and overall, and the fraction of KV blocks its decode steps attended to; at the longest length,
on the first case of that length, a fixed-length decode (``--timing-steps`` steps, no early stop, after a
warm-up) timed twice: once plain (the decode step time) and once with ``profile_attention`` (the decode
attention time per step, ``Generator.attn_time_ms``, synchronised around every layer's attention; "n/a"
when the runtime cannot time it). A Markdown table is printed last, with each figure's change against
exact attention; ``--out`` writes every case (length, depth, expected answer, output text, hit) and the
summary as JSON. Run on an idle machine: the times are wall times.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "white", "black", "brown",
           "pink")
OBJECTS = ("door", "box", "gate", "chest", "safe", "locker", "vault", "cabinet", "drawer", "suitcase", "trunk",
           "briefcase")

# Filler: sentences assembled from these lists (no digits, nothing about codes, colours or doors).
_SUBJECTS = ("The old fisherman", "A young teacher", "The village baker", "My grandmother", "The tired farmer",
             "A travelling musician", "The shopkeeper", "Our neighbour", "The quiet librarian", "A small boy",
             "The carpenter", "The doctor's wife", "An old sailor", "The mayor", "A curious girl", "The gardener")
_VERBS = ("walked slowly to", "often thought about", "told a long story about", "painted a picture of",
          "wrote a letter about", "sang a song about", "remembered", "went for a walk along", "cleaned",
          "looked out over", "spoke fondly of", "dreamed of", "visited", "drew a map of")
_PLACES = ("the quiet harbour", "the market square", "the river bank", "the wheat fields", "the hills beyond the town",
           "the church on the hill", "the small bakery", "the forest path", "the stone bridge", "the village school",
           "the windmill", "the train station", "the orchard", "the lighthouse", "the town library")
_TIMES = ("in the early morning", "after the long rain", "before supper", "on a windy afternoon",
          "when the bells rang", "late in the evening", "during the summer fair", "at the end of the week",
          "as the sun went down", "while the kettle boiled")
_ADJS = ("warm", "cold", "gentle", "grey", "bright", "calm", "damp", "clear", "heavy", "soft")
_NOUNS = ("air", "wind", "sky", "light", "morning", "evening", "sea", "road")
_SMELLS = ("fresh bread", "wet grass", "pine trees", "salt and seaweed", "apples", "wood smoke", "roses", "hay")
_THOUGHTS = ("Nobody in the town was in a hurry.", "Children played near the fountain.",
             "The days passed quietly, one much like the next.", "Somewhere a dog barked and then fell silent.",
             "The clouds moved slowly across the sky.", "People greeted each other by name.",
             "It was the kind of place where little ever changed.", "A cart rolled past on the cobbled street.")


@dataclass
class Case:
    index: int
    length: int          # target prompt length in tokens
    depth: float         # where the fact sits in the filler (fraction of the filler)
    colour: str
    obj: str
    answer: str
    needle: str
    question: str
    prompt_ids: list[int]

    @property
    def tokens(self) -> int:
        return len(self.prompt_ids)


def filler_sentences(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.6:
            out.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_PLACES)} {rng.choice(_TIMES)}.")
        elif kind < 0.85:
            out.append(f"The {rng.choice(_NOUNS)} was {rng.choice(_ADJS)} and smelled of {rng.choice(_SMELLS)}.")
        else:
            out.append(rng.choice(_THOUGHTS))
    return out


def _text(sentences: list[str], needle_at: int, needle: str) -> str:
    """Sentences in paragraphs of six, the needle sentence inserted before sentence ``needle_at``."""
    parts = sentences[:needle_at] + [needle] + sentences[needle_at:]
    return "\n\n".join(" ".join(parts[i:i + 6]) for i in range(0, len(parts), 6))


def build_prompt(tok, sentences: list[str], depth: float, needle: str, question: str, answer_prefix: str | None,
                 chat: bool = True) -> list[int]:
    body = _text(sentences, round(depth * len(sentences)), needle)
    user = ("Read the following text. One sentence in it gives a secret code; remember it.\n\n"
            f"{body}\n\nQuestion: {question} Answer with the number only.")
    if not chat:
        return tok.encode(user + "\nAnswer:" + (f" {answer_prefix}" if answer_prefix else ""))
    ids = tok.encode_chat([{"role": "user", "content": user}])
    if answer_prefix:
        ids += tok.encode(answer_prefix, bos=False)
    return ids


def make_case(tok, index: int, length: int, depth: float, seed: int, answer_prefix: bool = True,
              chat: bool = True) -> Case:
    """One case of about ``length`` prompt tokens (at most ``length``), deterministic in (seed, length, index)."""
    rng = random.Random(f"{seed}:{length}:{index}")
    colour, obj = rng.choice(COLOURS), rng.choice(OBJECTS)
    answer = str(rng.randint(1000, 9999))
    needle = f"The secret code of the {colour} {obj} is {answer}."
    question = f"What is the secret code of the {colour} {obj}?"
    prefix = f"The secret code of the {colour} {obj} is" if answer_prefix else None
    pool = filler_sentences(rng, max(64, length // 8))  # ~13 tokens a sentence: more than enough
    build = lambda n: build_prompt(tok, pool[:n], depth, needle, question, prefix, chat)
    if len(build(len(pool))) < length:
        raise ValueError(f"filler too short for {length} tokens")
    lo, hi = 0, len(pool)  # largest n with len(build(n)) <= length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(build(mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    return Case(index, length, depth, colour, obj, answer, needle, question, build(lo))


def make_cases(tok, lengths: list[int], n_cases: int, seed: int = 0, depths=DEPTHS, answer_prefix: bool = True,
               chat: bool = True) -> list[Case]:
    """``n_cases`` cases spread evenly over ``lengths`` (the first lengths take the remainder); the depths
    cycle within each length."""
    cases = []
    for li, length in enumerate(lengths):
        per = n_cases // len(lengths) + (1 if li < n_cases % len(lengths) else 0)
        for i in range(per):
            cases.append(make_case(tok, len(cases), length, depths[i % len(depths)], seed, answer_prefix, chat))
    return cases


def make_generator(src, max_len: int, topk: int | None, block: int, prefill_chunk: int = 2048,
                   profile: bool = False):
    """A Generator, exact (``topk`` None) or top-k over blocks of ``block`` tokens; ``profile`` times decode
    attention (``attn_time_ms``)."""
    from runtime.engine.config import KVConfig, PrefillConfig
    from runtime.engine.generate import Generator

    kv = KVConfig(block_tokens=block, topk_blk=topk) if topk is not None else KVConfig()
    return Generator(src, max_len, kv, PrefillConfig(chunk=prefill_chunk), profile_attention=profile)


def config_name(topk: int | None) -> str:
    return "exact" if topk is None else f"topk{topk}"


def _blocks(gen) -> tuple[int, int]:
    """(attended, total) KV blocks of the decode steps since the generator's counters were reset (0, 0 when
    the runtime does not count them)."""
    return gen.block_counts() if hasattr(gen, "block_counts") else (0, 0)


def run_cases(gen, cases: list[Case], tok, new_tokens: int, batch_size: int = 1, log=None) -> list[dict]:
    """Greedy generation for every case (batches of equal target length); one record per case, with the
    fraction of KV blocks its decode steps attended to (None without top-k or without the counters)."""
    from runtime.engine.generate import SamplingConfig

    cfg, stop = SamplingConfig(new_tokens), frozenset(tok.eos_ids)
    records: list[dict] = []
    by_len: dict[int, list[Case]] = {}
    for c in cases:
        by_len.setdefault(c.length, []).append(c)
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            if hasattr(gen, "reset_counters"):
                gen.reset_counters()  # also lets go of the previous batch's KV caches
            t = time.perf_counter()
            results = gen.generate_batch([c.prompt_ids for c in chunk], cfg, stop)
            wall = time.perf_counter() - t
            attended, total = _blocks(gen)
            for c, r in zip(chunk, results):
                text = tok.decode(r.output_token_ids)
                rec = {"index": c.index, "length": c.length, "tokens": c.tokens, "depth": c.depth,
                       "expected": c.answer, "needle": c.needle, "question": c.question, "output": text,
                       "hit": c.answer in text, "prefill_ms": r.prefill_ms, "decode_steps": len(r.token_ms),
                       "attended_fraction": attended / total if total else None}  # of its whole batch
                records.append(rec)
                if log:
                    frac = "" if rec["attended_fraction"] is None else f" blocks {rec['attended_fraction']:.0%}"
                    log(f"  case {c.index:3d} len {c.tokens:5d} depth {c.depth:.1f} expect {c.answer} "
                        f"{'HIT ' if rec['hit'] else 'miss'} {text!r}  ({wall:.1f} s{frac})")
    if hasattr(gen, "reset_counters"):
        gen.reset_counters()
    return records


def accuracy(records: list[dict]) -> dict:
    """{"overall": fraction, "by_length": {length: fraction}, "hits": n, "cases": n}."""
    by: dict[int, list[bool]] = {}
    for r in records:
        by.setdefault(r["length"], []).append(r["hit"])
    hits = sum(r["hit"] for r in records)
    return {"hits": hits, "cases": len(records), "overall": hits / len(records) if records else None,
            "by_length": {str(k): sum(v) / len(v) for k, v in sorted(by.items())}}


def time_decode(src, case: Case, topk: int | None, block: int, steps: int, prefill_chunk: int = 2048,
                warmup_steps: int = 4) -> dict:
    """Decode ``steps`` steps after the case's prompt (no early stop), each timed run after a short warm-up:
    once without profiling (the decode step time: median and mean) and once with ``profile_attention``
    (decode attention time per step, synchronised around every layer's attention; None when the runtime
    cannot time it). Also the fraction of KV blocks attended."""
    from runtime.engine.generate import SamplingConfig

    max_len = case.tokens + max(steps, warmup_steps) + 1
    out: dict = {"context": case.tokens, "steps": steps, "attn_ms_per_step": None, "attn_counter": False,
                 "attended_fraction": None}
    gen = make_generator(src, max_len, topk, block, prefill_chunk)
    gen.generate(case.prompt_ids, SamplingConfig(warmup_steps + 1))
    if hasattr(gen, "reset_counters"):
        gen.reset_counters()
    r = gen.generate(case.prompt_ids, SamplingConfig(steps + 1))
    attended, total = _blocks(gen)
    out.update(steps=len(r.token_ms), step_ms_median=statistics.median(r.token_ms),
               step_ms_mean=statistics.fmean(r.token_ms), prefill_ms=r.prefill_ms,
               attended_fraction=attended / total if total else None)
    del gen, r
    gen = make_generator(src, max_len, topk, block, prefill_chunk, profile=True)
    if getattr(gen, "profile_attention", False) and hasattr(gen, "reset_counters"):
        gen.generate(case.prompt_ids, SamplingConfig(warmup_steps + 1))
        gen.reset_counters()
        r = gen.generate(case.prompt_ids, SamplingConfig(steps + 1))
        out.update(attn_counter=True, attn_ms_per_step=float(gen.attn_time_ms) / max(len(r.token_ms), 1),
                   profiled_step_ms_median=statistics.median(r.token_ms))
        gen.reset_counters()
    return out


def markdown(summary: dict) -> str:
    """The summary as a Markdown table: one row per configuration."""
    lengths, tl = summary["lengths"], summary["timing_length"]
    timing = summary["timing"]
    ex = timing.get("exact") or {}

    def with_saving(name: str, key: str, fmt: str) -> str:
        v = (timing.get(name) or {}).get(key)
        if v is None:
            return "n/a"
        out = format(v, fmt)
        if name != "exact" and ex.get(key):
            out += f" ({v / ex[key] - 1:+.0%})"  # the change against exact attention
        return out

    rows = ["| config | " + " | ".join(f"acc @{n}" for n in lengths) + " | acc overall | blocks attended | "
            f"attn ms/step @{tl} | decode step ms @{tl} |", "|---" * (len(lengths) + 5) + "|"]
    for name in summary["configs"]:
        acc = summary["accuracy"][name]
        cells = [f"{acc['by_length'][str(n)]:.0%}" if str(n) in acc["by_length"] else "n/a" for n in lengths]
        frac = summary.get("attended_fraction", {}).get(name)
        blocks = "100%" if name == "exact" else f"{frac:.0%}" if frac is not None else "n/a"
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {acc['overall']:.0%} ({acc['hits']}/{acc['cases']}) | "
                    f"{blocks} | {with_saving(name, 'attn_ms_per_step', '.3f')} | "
                    f"{with_saving(name, 'step_ms_median', '.2f')} |")
    return "\n".join(rows)


def parse_ints(s: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: {flag} must be comma-separated integers, found {s!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", help="packed image (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="dtype of the embedded image packed when --image is not given (default fp32)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs (default cpu)")
    ap.add_argument("--lengths", default="2048,4096,8000",
                    help="comma-separated prompt lengths in tokens (default 2048,4096,8000; each at most the "
                         "model's context minus --new-tokens and --timing-steps)")
    ap.add_argument("--cases", type=int, default=60,
                    help="number of cases, spread evenly over the lengths, depths 10%%..90%% cycling (default 60)")
    ap.add_argument("--topk", default="8,16,32,64",
                    help="comma-separated top-k block counts to compare with exact attention (default 8,16,32,64; "
                         "'' for exact only)")
    ap.add_argument("--kv-block-tokens", type=int, default=64, help="tokens per KV block for top-k (default 64)")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="cases of the same length generated together with generate_batch (default 1)")
    ap.add_argument("--new-tokens", type=int,
                    help="greedy tokens generated per case; a hit is the answer in them (default 12, or 32 with "
                         "--no-answer-prefix: the model first restates the question's framing)")
    ap.add_argument("--timing-steps", type=int, default=64,
                    help="decode steps timed at the longest length per configuration, on the first case of that "
                         "length (default 64; 0 skips)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the cases (default 0)")
    ap.add_argument("--no-answer-prefix", action="store_true",
                    help="do not start the assistant turn with the question's framing: the model must produce it "
                         "(and needs more --new-tokens)")
    ap.add_argument("--no-chat", action="store_true",
                    help="plain text prompt ending in 'Answer:' instead of the chat template (base models)")
    ap.add_argument("--prefill-chunk", type=int, default=2048, help="prefill chunk in tokens (default 2048)")
    ap.add_argument("--quiet", action="store_true", help="no line per case")
    ap.add_argument("--out", help="write every case and the summary to this JSON file")
    a = ap.parse_args(argv)
    if a.new_tokens is None:
        a.new_tokens = 32 if a.no_answer_prefix else 12
    if a.cases < 1 or a.new_tokens < 1 or a.batch_size < 1 or a.timing_steps < 0 or a.kv_block_tokens < 1:
        raise SystemExit("error: --cases, --new-tokens, --batch-size and --kv-block-tokens must be >= 1, "
                         "--timing-steps >= 0")

    import torch

    from runtime.engine.weights import InMemoryWeights
    from runtime.format.image import Image
    from runtime.format.tokens import image_tokenizer

    lengths = parse_ints(a.lengths, "--lengths")
    topks: list[int | None] = [None] + parse_ints(a.topk, "--topk")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    if a.image:
        path = Path(a.image)
    else:
        from runtime.format.embedded import embedded_image

        path = embedded_image(a.dtype)
    image = Image.open(path)
    tok = image_tokenizer(image, required=True)
    ctx = image.args.max_seq_len
    max_len = max(lengths) + max(a.new_tokens, a.timing_steps + 1)
    if max_len > ctx:
        raise SystemExit(f"error: the longest length {max(lengths)} + {max(a.new_tokens, a.timing_steps + 1)} "
                         f"generated tokens exceeds the model's context {ctx}")
    log = (lambda s: None) if a.quiet else (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    cases = make_cases(tok, lengths, a.cases, a.seed, answer_prefix=not a.no_answer_prefix, chat=not a.no_chat)
    print(f"{len(cases)} cases over lengths {lengths} (built in {time.perf_counter() - t0:.1f} s); "
          f"model {path} ({image.args.n_layers} layers, context {ctx}) on {a.device}", flush=True)
    src = InMemoryWeights(image, a.device, quiet=True)

    records: dict[str, list[dict]] = {}
    timing: dict[str, dict | None] = {}
    longest = [c for c in cases if c.length == max(lengths)][:1]
    for k in topks:
        name = config_name(k)
        gen = make_generator(src, max_len, k, a.kv_block_tokens, a.prefill_chunk)
        print(f"== {name}" + ("" if k is None else f" (K={k} blocks of {a.kv_block_tokens} tokens, plus the first "
                                                   "and the recent window)"), flush=True)
        t = time.perf_counter()
        records[name] = run_cases(gen, cases, tok, a.new_tokens, a.batch_size, log)
        del gen
        acc = accuracy(records[name])
        print(f"   accuracy {acc['overall']:.0%} ({acc['hits']}/{acc['cases']}) by length {acc['by_length']} "
              f"in {time.perf_counter() - t:.1f} s", flush=True)
        timing[name] = None
        if a.timing_steps and longest:
            tm = timing[name] = time_decode(src, longest[0], k, a.kv_block_tokens, a.timing_steps, a.prefill_chunk)
            attn = f"{tm['attn_ms_per_step']:.3f} ms" if tm["attn_ms_per_step"] is not None else \
                "n/a (the runtime cannot time decode attention: decode step time only)"
            print(f"   decode at {tm['context']} tokens: attention {attn}/step, step median {tm['step_ms_median']:.2f}"
                  f" ms", flush=True)

    fractions = {}
    for name, recs in records.items():
        fr = [r["attended_fraction"] for r in recs if r["attended_fraction"] is not None]
        fractions[name] = statistics.fmean(fr) if fr else None
    summary = {"device": a.device, "image": str(path), "dtype": image.dtype, "context": ctx, "lengths": lengths,
               "cases": len(cases), "kv_block_tokens": a.kv_block_tokens, "new_tokens": a.new_tokens,
               "seed": a.seed, "answer_prefix": not a.no_answer_prefix, "chat": not a.no_chat,
               "batch_size": a.batch_size,
               "configs": [config_name(k) for k in topks],
               "accuracy": {n: accuracy(r) for n, r in records.items()}, "attended_fraction": fractions,
               "timing_length": longest[0].tokens if longest else None, "timing": timing,
               "attn_counter": any((t or {}).get("attn_counter") for t in timing.values()),
               "blocks_at_timing_length": (-(-longest[0].tokens // a.kv_block_tokens)) if longest else None}
    ex = timing.get("exact") or {}
    for n, tm in timing.items():
        if n != "exact" and tm:
            if ex.get("attn_ms_per_step") and tm.get("attn_ms_per_step") is not None:
                tm["attn_saving"] = 1 - tm["attn_ms_per_step"] / ex["attn_ms_per_step"]
                tm["attn_ms_saved_per_step"] = ex["attn_ms_per_step"] - tm["attn_ms_per_step"]
            if ex.get("step_ms_median"):
                tm["step_saving"] = 1 - tm["step_ms_median"] / ex["step_ms_median"]
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        cases_js = [{**{k: v for k, v in asdict(c).items() if k != "prompt_ids"}, "tokens": c.tokens} for c in cases]
        Path(a.out).write_text(json.dumps({"summary": summary, "cases": cases_js, "records": records}, indent=1))
        print(f"wrote {a.out}", flush=True)
    if not summary["attn_counter"] and a.timing_steps:
        print("note: decode attention time was not measured (the runtime's Generator has no profile_attention / "
              "attn_time_ms): only the whole decode step time is", flush=True)
    print()
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
