"""The commands of launch.py, one function each, taking the parsed argparse namespace.

Each returns an exit code (None for 0) and raises ``UserError`` for bad input. Runs in the launch.py process.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from model.errors import ConfigError, UserError

if TYPE_CHECKING:
    import torch


def pack(a) -> None:
    from runtime.pack import pack as do_pack

    if a.synthetic:
        from model.synthetic import SyntheticCheckpoint

        ck = SyntheticCheckpoint(a.synthetic, a.layers, seed=a.seed)
    else:
        if a.layers is not None:
            raise ConfigError("--layers applies only with --synthetic")
        from model.checkpoint import open_checkpoint

        ck = open_checkpoint(a.checkpoint)
    from runtime.daemon import pools_serving

    serving = pools_serving(a.out)
    if serving:
        raise UserError(f"--out {a.out}: {', '.join(serving)} serves this image; stop it first (launch.py pool "
                        f"stop NAME) or write the image elsewhere")
    manifest = do_pack(ck, a.out, a.manifest, a.dtype, a.force, quiet=a.quiet, verify=not a.no_verify)
    print(f"wrote {a.out} ({ck.args.n_layers} layers, {a.dtype}) and {manifest}")


def verify(a) -> None:
    from runtime.image import Image
    from runtime.progress import Progress

    image = Image.open(a.image, a.manifest)
    progress = Progress(f"verifying {image.path}", image.image_size)
    image.verify(lambda i, n, size: progress.update(size))
    progress.done()
    print(f"{image.path}: header, manifest and {len(image.groups)} group checksums OK")


def _open_image(a):
    from runtime.image import Image

    if a.image is None and getattr(a, "attach", None):  # the image the pool serves
        from runtime.daemon import read_record

        rec = read_record(a.attach)
        return Image.open(rec["image"]["path"], rec["image"]["manifest"])
    if a.image is None:
        if a.manifest:
            raise ConfigError("--manifest needs --image")
        from runtime.embedded import embedded_image

        return Image.open(embedded_image())
    return Image.open(a.image, a.manifest)


def _device(name: str | None) -> torch.device:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available to this process")
    return torch.device(name)


def _tokenizer(image, required: bool):
    name = image.manifest.get("tokenizer")
    if not name:
        if required:
            raise UserError(f"{image.manifest_path}: the image has no tokenizer; give --prompt-ids")
        return None
    from model.tokenizer import Tokenizer
    from runtime.pack import tokenizer_dir_for

    return Tokenizer.load(tokenizer_dir_for(image.manifest_path).with_name(name))


def generator_for(a, source, max_len: int, **kw):
    """A Generator with the KV-cache flags of ``a`` (--kv-block-tokens, --topk-blk) and the offload decision
    ``runtime.engine`` made for the source (--kv-offload)."""
    from runtime.generate import Generator

    if source.device.type == "cpu" or getattr(a, "host_attention", None):  # computes on the CPU's cores
        from runtime.threads import ComputeThreads

        kw.setdefault("threads", ComputeThreads(getattr(a, "threads", None), quiet=getattr(a, "quiet", True)))
    return Generator(source, max_len, kv_block_tokens=getattr(a, "kv_block_tokens", 64),
                     topk_blk=getattr(a, "topk_blk", None), kv_offload=getattr(source, "kv_offload", False),
                     host_attention=getattr(a, "host_attention", False),
                     prefill_chunk=getattr(a, "prefill_chunk", 2048),
                     prefill_by_sequence=getattr(a, "prefill_by_sequence", None), **kw)


def _prompt_ids(a, tok, default_chat: bool, vocab_size: int) -> list[int]:
    if a.prompt_ids is not None:
        try:
            ids = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids must be comma-separated integers, found {a.prompt_ids!r}") from None
        bad = [(i, t) for i, t in enumerate(ids) if not 0 <= t < vocab_size]
        if bad:
            raise ConfigError(f"--prompt-ids: token {bad[0][0] + 1} is {bad[0][1]}, outside the model's vocabulary "
                              f"(0..{vocab_size - 1})")
        if not ids:
            raise ConfigError("--prompt-ids is empty: give at least one token id")
        return ids
    from runtime.embedded import DEFAULT_PROMPT

    text = a.prompt if a.prompt is not None else DEFAULT_PROMPT
    if a.chat or default_chat:
        return tok.encode_chat([{"role": "user", "content": text}])
    return tok.encode(text)


class TokenPrinter:
    """Prints generated text as tokens arrive, decoding the whole output so multi-byte characters stay whole.
    ``line_open``: some printer left stdout in the middle of a line (launch.py ends it before a message)."""

    line_open = False

    def __init__(self, tok) -> None:
        self.tok, self.ids, self.shown = tok, [], ""

    def __call__(self, token: int) -> None:
        if self.tok is not None and token in self.tok.eos_ids:
            return  # the end-of-turn marker ends the answer; it is not part of it
        self.ids.append(token)
        if self.tok is None:
            print(token, end=" ", flush=True)
            TokenPrinter.line_open = True
            return
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        sys.stdout.write(text[len(self.shown):])
        sys.stdout.flush()
        TokenPrinter.line_open = bool(text) and not text.endswith("\n")
        self.shown = text


def run(a) -> None:
    from runtime.engine import RuntimeConfig, SamplingConfig, start_early

    rcfg = RuntimeConfig.from_args(a)  # flags first: a bad combination is reported before anything is opened
    sampling = SamplingConfig(a.max_new_tokens, a.temperature, a.top_p, a.seed)
    if a.max_seq_len is not None and a.max_seq_len < 1:
        raise ConfigError(f"--max-seq-len must be at least 1, found {a.max_seq_len}")
    if a.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, found {a.batch_size}")
    if a.batch_size > 1 and not a.prompts:
        raise ConfigError("--batch-size applies to --prompts FILE")
    image = _open_image(a)
    rcfg.check_for(image)
    from runtime.server import check_run_flags, server_for

    srv = server_for(a)
    if srv is not None:
        check_run_flags(a, srv)
    if a.prompts:
        _run_prompts(a, image, rcfg, sampling, srv)
        return
    ids_given = a.prompt_ids is not None
    tok = _tokenizer(image, required=not ids_given)
    prompt = _prompt_ids(a, tok, a.image is None and a.prompt is None and not ids_given, image.args.vocab_size)
    if srv is not None:
        _run_via_server(a, image, tok, prompt, srv)
        return
    max_len = a.max_seq_len or len(prompt) + a.max_new_tokens
    if len(prompt) + a.max_new_tokens > max_len:
        raise ConfigError(f"prompt ({len(prompt)} tokens) + --max-new-tokens ({a.max_new_tokens}) exceeds "
                          f"--max-seq-len {max_len}")
    if max_len > image.args.max_seq_len:
        raise ConfigError(f"--max-seq-len {max_len} exceeds the model's context {image.args.max_seq_len}")
    early = start_early(image, rcfg, a.device, max_len=max_len)  # the DRAM tier fills while torch starts
    try:
        _run(a, image, tok, prompt, rcfg, sampling, max_len, early)
    finally:
        if early is not None:
            early.stop()


def _run(a, image, tok, prompt, rcfg, cfg, max_len, early) -> None:
    from runtime.engine import open_source

    device = _device(a.device)
    t0 = time.perf_counter()
    with open_source(image, rcfg, device, max_len=max_len, early=early) as (source, plan, _):
        load_ms = (time.perf_counter() - t0) * 1e3
        printer = TokenPrinter(tok)
        res = generator_for(a, source, max_len).generate(prompt, cfg, tok.eos_ids if tok else frozenset(), printer)
    print()
    TokenPrinter.line_open = False
    t = res.timings()
    if not a.quiet:
        tps = f"{t['decode_tok_s']:.2f} tok/s" if t["decode_tok_s"] else "n/a"
        print(f"[{len(prompt)} prompt tokens, {len(res.output_token_ids)} generated; mode {a.mode}; load "
              f"{load_ms:.0f} ms, prefill {t['prefill_ms']:.1f} ms, decode {tps}; stop: {res.stop_reason}]",
              file=sys.stderr)
    if a.out_json:
        out = {"prompt_token_ids": res.prompt_token_ids, "output_token_ids": res.output_token_ids,
               "text": tok.decode(res.output_token_ids) if tok else None, "stop_reason": res.stop_reason,
               "mode": a.mode, "device": str(device), "image": str(image.path), "load_ms": load_ms, **t,
               "plan": plan.to_dict() if plan else None}
        Path(a.out_json).write_text(json.dumps(out, indent=1))


def _request(a, tok) -> dict:
    """The sampling part of a request to a pool's server (runtime/server.py)."""
    return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p, "seed": a.seed,
            "stop_ids": sorted(tok.eos_ids) if tok else []}


def _run_via_server(a, image, tok, prompt, srv) -> None:
    """``run --attach NAME`` through the pool's server: the prompt goes to it, the tokens print as they come."""
    from runtime.generate import GenerationResult
    from runtime.server import request

    printer = TokenPrinter(tok)
    t0, first = time.perf_counter(), []

    def on_message(m: dict) -> None:
        if "token" in m:
            if not first:
                first.append(time.perf_counter())
            printer(m["token"])

    done = request(srv, {"prompt_ids": prompt, **_request(a, tok)}, on_message)
    print()
    TokenPrinter.line_open = False
    res = GenerationResult(**done["results"][0])
    t = res.timings()
    first_ms = ((first[0] if first else time.perf_counter()) - t0) * 1e3
    if not a.quiet:
        tps = f"{t['decode_tok_s']:.2f} tok/s" if t["decode_tok_s"] else "n/a"
        print(f"[{len(prompt)} prompt tokens, {len(res.output_token_ids)} generated; through pool {srv['name']}'s "
              f"server (pid {srv['pid']}, {srv['device']}); first token {first_ms:.0f} ms (prefill "
              f"{t['prefill_ms']:.1f} ms), decode {tps}; stop: {res.stop_reason}]", file=sys.stderr)
    if a.out_json:
        out = {"prompt_token_ids": res.prompt_token_ids, "output_token_ids": res.output_token_ids,
               "text": tok.decode(res.output_token_ids) if tok else None, "stop_reason": res.stop_reason,
               "mode": "server", "device": srv["device"], "image": str(image.path), "load_ms": 0.0,
               "first_token_ms": first_ms, **t, "plan": srv.get("plan"), "server_pid": srv["pid"],
               "served_in_batch_of": done.get("batched", 1)}
        Path(a.out_json).write_text(json.dumps(out, indent=1))


def _run_prompts(a, image, rcfg, cfg, srv=None) -> None:
    """``run --prompts FILE``: every prompt, --batch-size at a time, each batch sharing its weight passes (in
    this process, or in the pool's server ``srv``)."""
    from runtime.engine import open_source, start_early
    from runtime.generate import GenerationResult

    tok = _tokenizer(image, required=False)
    from runtime.bench import read_prompts

    prompts = read_prompts(a.prompts, None, tok, image.args.vocab_size, chat=a.chat)
    b = min(a.batch_size, len(prompts))
    max_len = a.max_seq_len or max(len(p) for p in prompts) + a.max_new_tokens
    if srv is not None:
        from runtime.server import request

        t0 = time.perf_counter()
        done = request(srv, {"prompts": prompts, "batch_size": b, **_request(a, tok)})
        results = [GenerationResult(**r) for r in done["results"]]
        _print_prompts(a, tok, prompts, b, results, 0.0, t0, image, None)
        return
    if max_len > image.args.max_seq_len:
        raise ConfigError(f"--max-seq-len {max_len} exceeds the model's context {image.args.max_seq_len}")
    early = start_early(image, rcfg, a.device, batch=b, max_len=max_len)
    results, t0 = [], time.perf_counter()
    try:
        device = _device(a.device)
        with open_source(image, rcfg, device, batch=b, max_len=max_len, early=early) as (source, plan, _):
            load_ms = (time.perf_counter() - t0) * 1e3
            gen = generator_for(a, source, max_len)
            stop = tok.eos_ids if tok else frozenset()
            for i in range(0, len(prompts), b):
                results += gen.generate_batch(prompts[i:i + b], cfg, stop)
                if not a.quiet:
                    print(f"[{min(i + b, len(prompts))}/{len(prompts)} prompts done]", file=sys.stderr)
    finally:
        if early is not None:
            early.stop()
    _print_prompts(a, tok, prompts, b, results, load_ms, t0, image, plan)


def _print_prompts(a, tok, prompts, b: int, results, load_ms: float, t0: float, image, plan) -> None:
    total_s = time.perf_counter() - t0
    out = []
    for i, r in enumerate(results):
        ids = [t for t in r.output_token_ids if not (tok and t in tok.eos_ids)]
        text = tok.decode(ids) if tok else None
        print(f"--- {i + 1}: {text if text is not None else ' '.join(map(str, ids))}")
        out.append({"prompt_token_ids": r.prompt_token_ids, "output_token_ids": r.output_token_ids, "text": text,
                    "stop_reason": r.stop_reason})
    n_tok = sum(len(r.output_token_ids) for r in results)
    if not a.quiet:
        print(f"[{len(prompts)} prompts in batches of {b}; {n_tok} tokens generated; load {load_ms:.0f} ms, "
              f"total {total_s:.1f} s, {n_tok / total_s:.2f} tok/s]", file=sys.stderr)
    if a.out_json:
        Path(a.out_json).write_text(json.dumps({"results": out, "batch_size": b, "mode": a.mode,
                                                "image": str(image.path), "load_ms": load_ms,
                                                "total_s": total_s, "plan": plan.to_dict() if plan else None},
                                               indent=1))


def perplexity(a) -> None:
    from runtime.engine import RuntimeConfig, open_source

    rcfg = RuntimeConfig.from_args(a)
    if a.context < 2:
        raise ConfigError(f"--context must be at least 2, found {a.context}")
    image = _open_image(a)
    rcfg.check_for(image)
    if a.context > image.args.max_seq_len:
        raise ConfigError(f"--context {a.context} exceeds the model's context {image.args.max_seq_len}")
    tok = _tokenizer(image, required=True)
    try:
        text = Path(a.text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{a.text_file}: cannot read the text ({e})") from None
    ids = tok.encode(text)
    with open_source(image, rcfg, _device(a.device), max_len=a.context,
                     all_logits=True) as (source, _, _):
        ppl, count, nll = generator_for(a, source, a.context).perplexity(ids, a.context)
    print(f"perplexity {ppl:.4f} over {count} predicted tokens ({len(ids)} tokens, windows of {a.context})")
    if a.out_json:
        Path(a.out_json).write_text(json.dumps({"perplexity": ppl, "tokens": count, "nll": nll,
                                                "context": a.context, "text_tokens": len(ids)}, indent=1))


def bench(a) -> None:
    from runtime.bench import run_bench

    run_bench(a)


def probe(a) -> int:
    from runtime.probe import run_probe

    return run_probe(a)


def pool(a) -> None:
    from runtime import daemon

    if a.pool_command == "status":
        from runtime.monitor import status

        status(a)
        return
    if a.pool_command == "serve":
        from runtime.server import serve

        serve(a)
        return
    actions = {"start": daemon.start, "stop": daemon.stop, "list": daemon.list_pools, "cleanup": daemon.cleanup}
    actions[a.pool_command](a)
