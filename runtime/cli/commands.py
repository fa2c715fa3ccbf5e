"""The commands of launch.py, one function each, taking the parsed namespace: each builds its typed configs
once (runtime/cli/parser.py ``configs``: every flag checked there, before any file is opened or process
started), checks what needs the image, and hands configs to the layers below.

Each returns an exit code (None for 0) and raises ``UserError`` for bad input. Runs in the launch.py process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from model.errors import ConfigError, UserError
from runtime.cli.configs import (
    ImageRef,
    PackConfig,
    PerplexityConfig,
    PoolCleanupConfig,
    PoolListConfig,
    PoolStatusConfig,
    PoolStopConfig,
    RunConfig,
)
from runtime.cli.parser import configs
from runtime.cli.prompts import prompt_ids, read_prompts
from runtime.engine.config import EngineConfig, SamplingConfig
from runtime.engine.source import check_for_image, device_kind, open_source, start_early
from runtime.format.embedded import embedded_image
from runtime.format.image import Image
from runtime.format.tokens import image_tokenizer
from runtime.ipc.records import read_record
from runtime.measure import bench as benchmod
from runtime.measure.links import process_age_s
from runtime.measure.probe import ProbeConfig, run_probe
from runtime.services import monitor, pools
from runtime.services.pools import PoolStartConfig, pools_serving
from runtime.services.server import ServeConfig, check_run_config, request, serve, serve_foreground, server_for


def open_image(image: str | None, manifest: str | None, attach: str | None = None) -> Image:
    """--image (and --manifest); with --attach and no --image the pool's image; else the embedded model."""
    if image is None and attach:
        rec = read_record(attach)
        return Image.open(rec["image"]["path"], rec["image"]["manifest"])
    if image is None:
        if manifest:
            raise ConfigError("--manifest needs --image")
        return Image.open(embedded_image())
    return Image.open(image, manifest)


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

    @staticmethod
    def end() -> None:
        print()
        TokenPrinter.line_open = False


def _check_len(prompt_len: int, new: int, max_len: int, image: Image) -> None:
    if prompt_len + new > max_len:
        raise ConfigError(f"prompt ({prompt_len} tokens) + --max-new-tokens ({new}) exceeds --max-seq-len {max_len}")
    image.args.check_context(max_len)


# ---- pack, verify --------------------------------------------------------------------------------------------

def pack(ns: argparse.Namespace) -> None:
    cfg = configs(ns)[PackConfig]
    from runtime.format.pack import pack as do_pack  # torch: packing converts tensors

    if cfg.synthetic:
        from model.synthetic import SyntheticCheckpoint

        ck = SyntheticCheckpoint(cfg.synthetic, cfg.layers, seed=cfg.seed)
    else:
        from model.checkpoint import open_checkpoint

        ck = open_checkpoint(cfg.checkpoint)
    serving = pools_serving(cfg.out)
    if serving:
        raise UserError(f"--out {cfg.out}: {', '.join(serving)} serves this image; stop it first (launch.py pool "
                        f"stop NAME) or write the image elsewhere")
    manifest = do_pack(ck, cfg.out, cfg.manifest, cfg.weight_format(), cfg.force, quiet=cfg.quiet,
                       verify=not cfg.no_verify, device=cfg.device, tensor_parallel=cfg.tensor_parallel)
    print(f"wrote {cfg.out} ({ck.args.n_layers} layers, {Image.open(cfg.out, manifest).format_summary()}) and "
          f"{manifest}")


def verify(ns: argparse.Namespace) -> None:
    from runtime.progress import Progress

    ref = configs(ns)[ImageRef]
    image = Image.open(ref.image, ref.manifest)
    progress = Progress(f"verifying {image.path}", image.image_size)
    image.verify(lambda i, n, size: progress.update(size))
    progress.done()
    print(f"{image.path}: header, manifest and {len(image.groups)} group checksums OK")


# ---- run -----------------------------------------------------------------------------------------------------

def run(ns: argparse.Namespace) -> None:
    c = configs(ns)  # flags first: a bad one is reported before anything is opened or started
    engine, sampling, cfg = c[EngineConfig], c[SamplingConfig], c[RunConfig]
    image = open_image(cfg.image, cfg.manifest, engine.attach)
    check_for_image(engine, image)
    if cfg.tensor_parallel > 1 or image.tensor_parallel > 1:
        _run_tensor_parallel(cfg, engine, sampling, image)
        return
    srv = server_for(engine.attach, cfg.no_server)
    if srv is not None:
        check_run_config(engine, cfg.device, srv)
    if cfg.prompts:
        _run_prompts(cfg, engine, sampling, image, srv)
        return
    ids_given = cfg.prompt_ids is not None
    tok = image_tokenizer(image, required=not ids_given)
    chat = cfg.chat or (cfg.image is None and cfg.prompt is None and not ids_given)
    prompt = prompt_ids(cfg.prompt_ids, cfg.prompt, tok, chat, image.args.vocab_size)
    if srv is not None:
        _run_via_server(cfg, engine, sampling, image, tok, prompt, srv)
        return
    room = engine.speculative.tree_room(device_kind(cfg.device), engine.prefill.chunk)  # the last tree's
    max_len = cfg.max_seq_len or len(prompt) + sampling.max_new_tokens + room
    _check_len(len(prompt), sampling.max_new_tokens, max_len, image)
    early = start_early(image, engine, cfg.device, max_len=max_len)  # the DRAM tier fills while torch starts
    try:
        _run(cfg, engine, sampling, image, tok, prompt, max_len, early)
    finally:
        if early is not None:
            early.stop()


def _run(cfg: RunConfig, engine: EngineConfig, sampling: SamplingConfig, image: Image, tok, prompt: list[int],
         max_len: int, early) -> None:
    from runtime.engine.generate import pick_device  # torch: after the early pool started
    from runtime.engine.speculative import run_generator

    device = pick_device(cfg.device)
    t0 = time.perf_counter()
    with open_source(image, engine, device, max_len=max_len, early=early) as (source, plan, _):
        load_ms = (time.perf_counter() - t0) * 1e3
        printer = TokenPrinter(tok)
        gen = run_generator(source, engine, image, max_len)
        res = gen.generate(prompt, sampling, tok.eos_ids if tok else frozenset(), printer)
        experts = dict(getattr(source, "expert_stats", None) or {})
    TokenPrinter.end()
    if cfg.verbose and experts.get("routings"):
        from runtime.measure.bench import experts_line

        print(f"[{experts_line(experts)}]", file=sys.stderr)
    t = res.timings()
    spec = gen.report() if hasattr(gen, "report") else None
    if not engine.quiet:
        tps = f"{t['decode_tok_s']:.2f} tok/s" if t["decode_tok_s"] else "n/a"
        print(f"[{len(prompt)} prompt tokens, {len(res.output_token_ids)} generated; mode {engine.placement.mode}; "
              f"load {load_ms:.0f} ms, prefill {t['prefill_ms']:.1f} ms, decode {tps}; stop: {res.stop_reason}]",
              file=sys.stderr)
        if spec:
            print(f"[{spec_line(gen)}]", file=sys.stderr)
    if cfg.out_json:
        out = {"prompt_token_ids": res.prompt_token_ids, "output_token_ids": res.output_token_ids,
               "text": tok.answer_text(res.output_token_ids) if tok else None, "stop_reason": res.stop_reason,
               "mode": engine.placement.mode, "device": str(device), "image": str(image.path), "load_ms": load_ms,
               **t, "plan": plan.to_dict() if plan else None, "speculative": spec}
        Path(cfg.out_json).write_text(json.dumps(out, indent=1))


def _run_tensor_parallel(cfg: RunConfig, engine: EngineConfig, sampling: SamplingConfig, image: Image) -> None:
    """``run --tensor-parallel N``: the prompt (or --prompts, --batch-size at a time) on N rank processes
    (runtime/engine/ranks.py); rank 0's tokens print as they come. Never through a pool's server."""
    from runtime.engine.generate import GenerationResult
    from runtime.engine.ranks import run_ranks
    from runtime.engine.tensor_parallel import check_image

    n = cfg.tensor_parallel
    check_image(image, n)  # before anything starts: the split, the image's own shards
    tok = image_tokenizer(image, required=cfg.prompt_ids is None and not cfg.prompts)
    if cfg.prompts:
        prompts, b = read_prompts(cfg.prompts, None, tok, image.args.vocab_size, chat=cfg.chat), cfg.batch_size
    else:
        chat = cfg.chat or (cfg.image is None and cfg.prompt is None and cfg.prompt_ids is None)
        prompts, b = [prompt_ids(cfg.prompt_ids, cfg.prompt, tok, chat, image.args.vocab_size)], 1
    b = min(b, len(prompts))
    longest = max(len(p) for p in prompts)
    max_len = cfg.max_seq_len or longest + sampling.max_new_tokens
    _check_len(longest, sampling.max_new_tokens, max_len, image)
    printer = TokenPrinter(tok) if len(prompts) == 1 else None
    device = device_kind(cfg.device)
    results, plan, facts = run_ranks(image, engine, sampling, prompts, b, max_len,
                                     tok.eos_ids if tok else frozenset(), n, device, cfg.devices,
                                     on_step=(lambda toks: printer(toks[0])) if printer else None)
    res = [GenerationResult(**r) for r in results]
    if printer:
        TokenPrinter.end()
    else:
        for i, r in enumerate(res):
            ids = [t for t in r.output_token_ids if not (tok and t in tok.eos_ids)]
            print(f"--- {i + 1}: {tok.decode(ids) if tok else ' '.join(map(str, ids))}")
    if not engine.quiet:
        t = res[0].timings()
        tps = f"{t['decode_tok_s']:.2f} tok/s" if t["decode_tok_s"] else "n/a"
        print(f"[{len(prompts)} prompt(s), {sum(len(r.output_token_ids) for r in res)} tokens generated on {n} ranks "
              f"({device}); mode {engine.placement.mode}; rank load {facts['load_ms']:.0f} ms, prefill "
              f"{t['prefill_ms']:.1f} ms, decode {tps}; wall {facts['wall_ms'] / 1e3:.1f} s]", file=sys.stderr)
    if cfg.out_json:
        out = [{"prompt_token_ids": r.prompt_token_ids, "output_token_ids": r.output_token_ids,
                "text": tok.answer_text(r.output_token_ids) if tok else None, "stop_reason": r.stop_reason,
                **r.timings()}
               for r in res]
        Path(cfg.out_json).write_text(json.dumps({**(out[0] if len(out) == 1 else {"results": out}),
                                                  "tensor_parallel": n, "mode": engine.placement.mode,
                                                  "image": str(image.path), "plan": plan.to_dict() if plan else None,
                                                  "ranks": facts}, indent=1))


def spec_line(gen) -> str:
    """One line of what a speculative generation did (runtime/engine/speculative.py SpecStats)."""
    d = gen.stats.to_dict()
    acc = " ".join(f"{a:.2f}" for a in d["acceptance_by_depth"][:8] if a is not None)
    sizes = "" if gen.size.fixed else f"; sizes in turn: {' -> '.join(map(str, gen.size.history))}"
    return (f"speculative, draft {gen.draft.name}: {d['passes']} passes, {d['tokens_per_pass'] or 0:.2f} tokens a "
            f"pass, draft {d['draft_ms']:.0f} ms, verify {d['verify_ms']:.0f} ms; reached depth 1..: {acc}\n"
            f"  tree size: {gen.size.describe()}{sizes}")


def _request(sampling: SamplingConfig, tok) -> dict:
    """The sampling part of a request to a pool's server (runtime/services/server.py)."""
    return {"max_new_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "seed": sampling.seed, "stop_ids": sorted(tok.eos_ids) if tok else []}


def _run_via_server(cfg: RunConfig, engine: EngineConfig, sampling: SamplingConfig, image: Image, tok,
                    prompt: list[int], srv: dict) -> None:
    """``run --attach NAME`` through the pool's server: the prompt goes to it, the tokens print as they come."""
    from runtime.engine.generate import GenerationResult

    printer = TokenPrinter(tok)
    t0, first = time.perf_counter(), []

    def on_message(m: dict) -> None:
        if "token" in m:
            if not first:
                first.append(time.perf_counter())
            printer(m["token"])

    done = request(srv, {"prompt_ids": prompt, **_request(sampling, tok)}, on_message)
    TokenPrinter.end()
    res = GenerationResult(**done["results"][0])
    t = res.timings()
    first_ms = ((first[0] if first else time.perf_counter()) - t0) * 1e3
    if not engine.quiet:
        tps = f"{t['decode_tok_s']:.2f} tok/s" if t["decode_tok_s"] else "n/a"
        print(f"[{len(prompt)} prompt tokens, {len(res.output_token_ids)} generated; through pool {srv['name']}'s "
              f"server (pid {srv['pid']}, {srv['device']}); first token {first_ms:.0f} ms (prefill "
              f"{t['prefill_ms']:.1f} ms), decode {tps}; stop: {res.stop_reason}]", file=sys.stderr)
    if cfg.out_json:
        out = {"prompt_token_ids": res.prompt_token_ids, "output_token_ids": res.output_token_ids,
               "text": tok.answer_text(res.output_token_ids) if tok else None, "stop_reason": res.stop_reason,
               "mode": "server", "device": srv["device"], "image": str(image.path), "load_ms": 0.0,
               "first_token_ms": first_ms, **t, "plan": srv.get("plan"), "server_pid": srv["pid"],
               "served_in_batch_of": done.get("batched", 1), "speculative": done.get("speculative")}
        Path(cfg.out_json).write_text(json.dumps(out, indent=1))


def _run_prompts(cfg: RunConfig, engine: EngineConfig, sampling: SamplingConfig, image: Image, srv=None) -> None:
    """``run --prompts FILE``: every prompt, --batch-size at a time, each batch sharing its weight passes (in
    this process, or in the pool's server ``srv``)."""
    from runtime.engine.generate import GenerationResult

    tok = image_tokenizer(image, required=False)
    prompts = read_prompts(cfg.prompts, None, tok, image.args.vocab_size, chat=cfg.chat)
    b = min(cfg.batch_size, len(prompts))
    if engine.speculative.draft is not None and b > 1:
        raise ConfigError(f"--draft decodes one sequence at a time: give --batch-size 1, found {b}")
    max_len = cfg.max_seq_len or max(len(p) for p in prompts) + sampling.max_new_tokens + \
        engine.speculative.tree_room(device_kind(cfg.device), engine.prefill.chunk)
    if srv is not None:
        t0 = time.perf_counter()
        done = request(srv, {"prompts": prompts, "batch_size": b, **_request(sampling, tok)})
        results = [GenerationResult(**r) for r in done["results"]]
        _print_prompts(cfg, engine, tok, prompts, b, results, 0.0, t0, image, None)
        return
    _check_len(max(len(p) for p in prompts), sampling.max_new_tokens, max_len, image)
    early = start_early(image, engine, cfg.device, batch=b, max_len=max_len)
    results, t0 = [], time.perf_counter()
    try:
        from runtime.engine.generate import pick_device  # torch: after the early pool started
        from runtime.engine.speculative import run_generator

        device = pick_device(cfg.device)
        with open_source(image, engine, device, batch=b, max_len=max_len, early=early) as (source, plan, _):
            load_ms = (time.perf_counter() - t0) * 1e3
            gen = run_generator(source, engine, image, max_len)
            stop = tok.eos_ids if tok else frozenset()
            for i in range(0, len(prompts), b):
                results += gen.generate_batch(prompts[i:i + b], sampling, stop)
                if not engine.quiet:
                    print(f"[{min(i + b, len(prompts))}/{len(prompts)} prompts done]", file=sys.stderr)
    finally:
        if early is not None:
            early.stop()
    _print_prompts(cfg, engine, tok, prompts, b, results, load_ms, t0, image, plan, gen)


def _print_prompts(cfg: RunConfig, engine: EngineConfig, tok, prompts, b: int, results, load_ms: float, t0: float,
                   image: Image, plan, gen=None) -> None:
    total_s = time.perf_counter() - t0
    out = []
    for i, r in enumerate(results):
        ids = [t for t in r.output_token_ids if not (tok and t in tok.eos_ids)]
        text = tok.decode(ids) if tok else None
        print(f"--- {i + 1}: {text if text is not None else ' '.join(map(str, ids))}")
        out.append({"prompt_token_ids": r.prompt_token_ids, "output_token_ids": r.output_token_ids, "text": text,
                    "stop_reason": r.stop_reason})
    n_tok = sum(len(r.output_token_ids) for r in results)
    if not engine.quiet:
        print(f"[{len(prompts)} prompts in batches of {b}; {n_tok} tokens generated; load {load_ms:.0f} ms, "
              f"total {total_s:.1f} s, {n_tok / total_s:.2f} tok/s]", file=sys.stderr)
        if hasattr(gen, "report"):
            print(f"[{spec_line(gen)}]", file=sys.stderr)
    if cfg.out_json:
        Path(cfg.out_json).write_text(json.dumps({"results": out, "batch_size": b, "mode": engine.placement.mode,
                                                  "image": str(image.path), "load_ms": load_ms,
                                                  "total_s": total_s, "plan": plan.to_dict() if plan else None,
                                                  "speculative": gen.report() if hasattr(gen, "report") else None},
                                                 indent=1))


# ---- perplexity ----------------------------------------------------------------------------------------------

def perplexity(ns: argparse.Namespace) -> None:
    c = configs(ns)
    engine, cfg = c[EngineConfig], c[PerplexityConfig]
    image = open_image(cfg.image, cfg.manifest, engine.attach)
    check_for_image(engine, image)
    image.args.check_context(cfg.context, "--context")
    tok = image_tokenizer(image, required=True)
    try:
        text = Path(cfg.text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{cfg.text_file}: cannot read the text ({e})") from None
    ids = tok.encode(text)
    from runtime.engine.generate import generator_for, pick_device  # torch: the run computes

    with open_source(image, engine, pick_device(cfg.device), max_len=cfg.context, all_logits=True) as (source, _, _):
        ppl, count, nll = generator_for(source, engine, cfg.context).perplexity(ids, cfg.context)
    print(f"perplexity {ppl:.4f} over {count} predicted tokens ({len(ids)} tokens, windows of {cfg.context})")
    if cfg.out_json:
        Path(cfg.out_json).write_text(json.dumps({"perplexity": ppl, "tokens": count, "nll": nll,
                                                  "context": cfg.context, "text_tokens": len(ids)}, indent=1))


# ---- bench, probe --------------------------------------------------------------------------------------------

def bench(ns: argparse.Namespace) -> None:
    c = configs(ns)
    cfg, engine = c[benchmod.BenchConfig], c[EngineConfig].replace(quiet=True)
    for u in cfg.unused_flags():
        print(f"warning: {u['flag']} {u['value']} is accepted but unused: {u['reason']}", file=sys.stderr)
    image = (Image.open(cfg.raw_device, cfg.manifest) if cfg.raw_device
             else open_image(cfg.image, cfg.manifest, engine.attach))
    check_for_image(engine, image)
    ck = benchmod.check_checkpoint(cfg.checkpoints, image) if cfg.checkpoints else None
    tok = image_tokenizer(image, required=False)
    if tok is None and ck is not None and (src := ck.tokenizer_source()) is not None:
        from model.tokenizer import load_tokenizer

        tok = load_tokenizer(src)
    prompts = read_prompts(cfg.prompts, cfg.batch_size, tok, image.args.vocab_size)
    prompts, max_len, cut = benchmod.fit_prompts(prompts, cfg, image.args)
    if engine.speculative.draft is not None:
        if cfg.batch_size > 1:
            raise ConfigError(f"--draft decodes one sequence at a time: give --batch-size 1, found {cfg.batch_size}")
        if not cfg.max_seq_len:  # room for the last tree
            room = engine.speculative.tree_room(device_kind(cfg.device), engine.prefill.chunk)
            max_len = min(max_len + room, image.args.context)
    for x in cut:
        print(f"warning: prompt {x['prompt']} has {x['tokens']} tokens; kept its last {x['kept']} (--max-seq-len "
              f"- --max-new-tokens)", file=sys.stderr)
    srv = server_for(engine.attach, cfg.no_server)
    if srv is not None:
        _bench_via_server(cfg, engine, srv, prompts, cut, tok)
        return
    # With both links given nothing is measured before the pool, so it may start before torch does.
    early = (start_early(image, engine, cfg.device, cfg.batch_size, max_len)
             if cfg.disk_gbps and (cfg.h2d_gbps or cfg.device == "cpu") else None)
    try:
        benchmod.run_local(cfg, engine, image, prompts, max_len, cut, tok, early)
    finally:
        if early is not None:
            early.stop()


def _bench_via_server(cfg: benchmod.BenchConfig, engine: EngineConfig, srv: dict, prompts, cut: list, tok) -> None:
    """``bench --attach NAME`` when the pool has a server (runtime/services/server.py): the server runs the
    rounds on the model it holds and builds the report; this process adds what it saw: the time from connecting
    to the first token (``open_to_first_token_ms``) and from its own start."""
    check_run_config(engine, cfg.device, srv)
    s = cfg.sampling
    req = {"prompts": prompts, "batch_size": cfg.batch_size, "max_new_tokens": s.max_new_tokens,
           "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed, "bench": True}
    to_open_ms = process_age_s() * 1e3
    t0 = time.perf_counter()
    first = None
    for i in range(cfg.warmup_rounds + 1):
        stamps: list[float] = []
        done = request(srv, req, lambda m, stamps=stamps: stamps.append(time.perf_counter()))
        first = first or (stamps[0] if stamps else time.perf_counter())
        if i < cfg.warmup_rounds:
            print(f"warm-up round {i + 1}/{cfg.warmup_rounds} done", file=sys.stderr)
    to_first_ms = (process_age_s() - (time.perf_counter() - first)) * 1e3
    rep = done["report"]
    for res in rep["results"]:
        res["text"] = tok.answer_text(res["output_token_ids"]) if tok else None
    rep.update({"mode": "server", "load_ms": 0.0, "load_breakdown_ms": {"process_start_to_load": to_open_ms},
                "open_to_first_token_ms": (first - t0) * 1e3, "process_start_to_first_token_ms": to_first_ms,
                "warmup_rounds": cfg.warmup_rounds, "prompts_file": cfg.prompts, "prompt_truncation": cut,
                "unused_flags": cfg.unused_flags(), "checkpoints": cfg.checkpoints,
                "server": {k: srv.get(k) for k in ("name", "pid", "device", "ready_s", "load_breakdown_ms",
                                                   "gpu_mem_gb", "max_seq_len", "batch_size")},
                "flags": {"bench": dataclasses.asdict(cfg), "engine": engine.to_dict()}})
    benchmod.emit(cfg, rep, f"the server's (pid {srv['pid']}): {done['plan_line']}",
                  f"placement: the server's (launch.py pool status {srv['name']})")


def probe(ns: argparse.Namespace) -> int:
    return run_probe(configs(ns)[ProbeConfig])


# ---- pools ---------------------------------------------------------------------------------------------------

def pool(ns: argparse.Namespace) -> int | None:
    c = configs(ns)
    action = ns.pool_command
    if action == "start":
        pools.start(c[PoolStartConfig])
    elif action == "serve":
        serve(c[ServeConfig], c[EngineConfig])
    elif action == "stop":
        pools.stop(c[PoolStopConfig].name, c[PoolStopConfig].timeout)
    elif action == "list":
        pools.list_pools(c[PoolListConfig].json)
    elif action == "status":
        s = c[PoolStatusConfig]
        return monitor.status(s.name, s.watch, s.interval, s.json)
    elif action == "cleanup":
        pools.cleanup(c[PoolCleanupConfig].name)
    return None


def serve_cmd(ns: argparse.Namespace) -> int | None:
    """``launch.py serve --image IMAGE --http PORT``: a pool and its HTTP server in the foreground."""
    import os

    if ns.image is None:
        if ns.manifest:
            raise ConfigError("--manifest needs --image")
        ns.image = str(embedded_image())
    if ns.name is None:
        ns.name = f"serve-{os.getpid()}"
    c = configs(ns)
    return serve_foreground(c[PoolStartConfig], c[ServeConfig], c[EngineConfig])
