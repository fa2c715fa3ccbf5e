"""Load benchmark of the pool server's OpenAI-compatible HTTP (issues 20, 30): tokens/s and p50/p99 time to first
token against concurrent clients, continuous against static batching, with and without prompt reuse and a
draft, in the same run; loopback only.

    python benchmarks/serve_load.py                                      # CPU, the embedded SmolLM2 (fp32)
    python benchmarks/serve_load.py --image 8b.img --device cuda --gpu-mem-gb 6 --clients 1,4,16,64 \
        --max-tokens 64 --out-json OUT/serve_load.json                   # GPU machine
    python benchmarks/serve_load.py --image 8b.img --device cuda --gpu-mem-gb 6 --modes continuous \
        --system-tokens 2000 --max-seq-len 2400 --prefix-cache both --clients 1,4,16 --requests 4 \
        --out-json OUT/serve_load_prefix.json                            # a shared system prompt, reused or not
    python benchmarks/serve_load.py --image 8b.img --device cuda --gpu-mem-gb 6 --modes continuous \
        --draft 1b.img --text tests/data/pride_and_prejudice_1-15.txt --clients 1,4 --max-tokens 128 \
        --out-json OUT/serve_load_draft.json                             # with and without the draft

Steps (each ``launch.py`` a subprocess, in a private pool dir): ``pool start`` of the image; then for each
variant (each ``--modes`` entry; with ``--prefix-cache both`` with and without ``--no-prefix-cache``; with
``--draft`` without and with it) ``pool serve --http 127.0.0.1:0 --batching MODE --max-batch B ...``, and for
each count C of ``--clients``: C asyncio clients (httpx) each send ``--requests`` streamed completions one after
the other (prompts of the ``--prompt-tokens`` lengths in turn: random token ids, seeded, or windows of ``--text``
tokenized by the image's tokenizer; after ``--system-tokens`` tokens every request shares; ``ignore_eos`` so
every answer has ``--max-tokens`` tokens), timing each request's first token; then ``pool serve --stop``. ``pool
stop`` at the end, also on failure or Ctrl-C. Bounded: C x --requests requests a level, and no level starts after
``--time-limit`` seconds. Prints one table (variant, clients, requests, tokens/s, TTFT p50/p99, the level's
weight passes and mean sequences per pass, prompt tokens computed and reused, passes that verified a draft's
tree, from the server's /metrics) and writes it with the settings as JSON (``--out-json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(*args: str, timeout: float = 600) -> str:
    p = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"launch.py {' '.join(args)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p.stdout


async def scrape(http, url: str) -> dict[str, float]:
    text = (await http.get(f"{url}/metrics")).text
    return {k: float(v) for k, v in (ln.split() for ln in text.splitlines() if ln and not ln.startswith("#")
                                     and "{" not in ln)}


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


async def one_level(url: str, clients: int, requests: int, prompts: list[list[int]], max_tokens: int,
                    timeout_s: float) -> dict:
    import httpx

    ttft, tokens, errors = [], [0], []

    async def client(i: int, http: httpx.AsyncClient) -> None:
        for k in range(requests):
            prompt = prompts[(i * requests + k) % len(prompts)]
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            t0 = time.perf_counter()
            first = None
            try:
                async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {(await r.aread())[:200]!r}")
                        continue
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            if first is None:
                                first = time.perf_counter() - t0
                            tokens[0] += 1
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if first is not None:
                ttft.append(first)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        before = await scrape(http, url)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - t0
        after = await scrape(http, url)
    delta = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    steps, emitted = delta("llmstream_steps_total"), delta("llmstream_generation_tokens_total")
    return {"clients": clients, "requests": clients * requests, "tokens": tokens[0], "wall_s": wall,
            "tok_s": tokens[0] / wall if wall > 0 else None, "ttft_p50_s": quantile(ttft, 0.5),
            "ttft_p99_s": quantile(ttft, 0.99), "steps": steps,
            "mean_batch": emitted / steps if steps else None, "prefill_tokens": delta("llmstream_prefill_tokens"),
            "cached_tokens": delta("llmstream_prefix_cached_tokens"),
            "speculative_passes": delta("llmstream_speculative_passes"),
            "speculative_tokens": delta("llmstream_speculative_tokens"), "errors": errors[:5],
            "n_errors": len(errors)}


def make_prompts(a, lengths: list[int], rnd: random.Random) -> list[list[int]]:
    """One prompt per length, each after the shared ``--system-tokens`` prefix: random token ids, or windows of
    ``--text`` in order."""
    if a.text:
        from runtime.format.image import Image
        from runtime.format.tokens import image_tokenizer

        ids = image_tokenizer(Image.open(a.image), required=True).encode(Path(a.text).read_text(), bos=False)
        need = a.system_tokens + sum(lengths)
        if len(ids) < need:
            raise SystemExit(f"error: --text {a.text} has {len(ids)} tokens; the prompts need {need}")
        system, at, out = ids[:a.system_tokens], a.system_tokens, []
        for n in lengths:
            out.append(system + ids[at:at + n])
            at += n
        return out
    system = [rnd.randrange(10, 30000) for _ in range(a.system_tokens)]
    return [system + [rnd.randrange(10, 30000) for _ in range(n)] for n in lengths]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", help="packed image (default: the embedded SmolLM2, fp32)")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="where the server computes (default: cuda if any)")
    ap.add_argument("--gpu-mem-gb", type=float, help="the server's GPU budget in GB")
    ap.add_argument("--dram-gb", type=float, help="the pool's DRAM budget in GB (default: the pool's default)")
    ap.add_argument("--clients", default="1,4,16,64", help="concurrent clients per level (default %(default)s)")
    ap.add_argument("--requests", type=int, default=2, help="requests each client sends in turn (default "
                                                            "%(default)s)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per answer (default %(default)s)")
    ap.add_argument("--prompt-tokens", default="8,64,24,128", help="prompt lengths, used in turn (default "
                                                                   "%(default)s)")
    ap.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch (default %(default)s)")
    ap.add_argument("--max-seq-len", type=int, default=512, help="the server's --max-seq-len (default %(default)s)")
    ap.add_argument("--modes", default="continuous,static", help="batching modes to compare (default %(default)s)")
    ap.add_argument("--time-limit", type=float, default=900, help="no level starts after this many seconds "
                                                                  "(default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="prompt seed (default %(default)s)")
    ap.add_argument("--system-tokens", type=int, default=0,
                    help="a shared prefix of this many tokens before every prompt (a system prompt; default 0)")
    ap.add_argument("--prefix-cache", choices=["on", "off", "both"], default="on",
                    help="the server's prompt reuse: on (default), off (--no-prefix-cache), or both, one after the "
                         "other")
    ap.add_argument("--draft", help="also serve with this draft (an image, or ngram): each variant without and with it")
    ap.add_argument("--draft-tokens", type=int, help="the draft's tree size (default: chosen by the server)")
    ap.add_argument("--text", help="prompts from this text file (windows of its tokens, by the image's tokenizer) "
                                   "instead of random token ids: a draft's acceptance needs real text")
    ap.add_argument("--out-json", help="write the table and the settings here")
    a = ap.parse_args()
    levels = [int(x) for x in a.clients.split(",")]
    lengths = [int(x) for x in a.prompt_tokens.split(",")]
    modes = a.modes.split(",")
    bad = [x for x in levels + lengths if x < 1] + [m for m in modes if m not in ("continuous", "static")]
    longest = a.system_tokens + max(lengths) + a.max_tokens
    if bad or a.requests < 1 or a.max_tokens < 1 or a.system_tokens < 0 or longest > a.max_seq_len:
        raise SystemExit(f"error: check --clients/--prompt-tokens (>= 1), --modes (continuous,static), and that "
                         f"--system-tokens + the longest prompt + --max-tokens ({longest}) fits --max-seq-len "
                         f"{a.max_seq_len}; found {bad}")
    sys.path.insert(0, str(ROOT))
    if a.image is None:
        from runtime.format.embedded import embedded_image

        a.image = str(embedded_image("fp32"))
    rnd = random.Random(a.seed)
    print(f"seed {a.seed}", file=sys.stderr)
    prompts = make_prompts(a, lengths * 4, rnd)
    variants = [(m, pc, d) for m in modes for pc in (("on", "off") if a.prefix_cache == "both" else (a.prefix_cache,))
                for d in ((None, a.draft) if a.draft else (None,))]
    os.environ["LLMS_POOL_DIR"] = tempfile.mkdtemp(prefix="serve-load-")
    name = f"load{os.getpid()}"
    dev = ["--device", a.device] if a.device else []
    rows, t_start = [], time.monotonic()
    launch("pool", "start", "--image", a.image, "--name", name, "--quiet",
           *(["--dram-gb", str(a.dram_gb)] if a.dram_gb else []))
    try:
        for mode, cache, draft in variants:
            label = mode + ("" if cache == "on" else " no-reuse") + (f" draft {Path(draft).name}" if draft else "")
            launch("pool", "serve", name, *dev, *(["--gpu-mem-gb", str(a.gpu_mem_gb)] if a.gpu_mem_gb else []),
                   "--max-seq-len", str(a.max_seq_len), "--http", "127.0.0.1:0", "--batching", mode,
                   "--max-batch", str(a.max_batch), "--max-queue", str(max(levels) * 2), "--quiet",
                   *(["--no-prefix-cache"] if cache == "off" else []), *(["--draft", draft] if draft else []),
                   *(["--draft-tokens", str(a.draft_tokens)] if draft and a.draft_tokens else []))
            try:
                rec = json.loads((Path(os.environ["LLMS_POOL_DIR"]) / f"{name}.server").read_text())
                for c in levels:
                    if time.monotonic() - t_start > a.time_limit:
                        print(f"time limit: level {c} of {label} not run", file=sys.stderr)
                        continue
                    r = asyncio.run(one_level(rec["http"], c, a.requests, prompts, a.max_tokens, a.time_limit))
                    r.update(mode=mode, prefix_cache=cache, draft=draft, variant=label)
                    rows.append(r)
                    print(f"{label:24s} {c:4d} clients: {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_s']:.3f} s",
                          file=sys.stderr)
            finally:
                launch("pool", "serve", name, "--stop")
    finally:
        launch("pool", "stop", name)
    head = f"{'variant':24s} {'clients':>7s} {'requests':>8s} {'tok/s':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s} " \
           f"{'steps':>6s} {'mean batch':>10s} {'prefilled':>9s} {'reused':>7s} {'trees':>6s} {'errors':>6s}"
    print(head)
    for r in rows:
        f = lambda x: f"{x:9.3f}" if x is not None else f"{'-':>9s}"  # noqa: E731
        print(f"{r['variant']:24s} {r['clients']:7d} {r['requests']:8d} {r['tok_s'] or 0:8.1f} {f(r['ttft_p50_s'])} "
              f"{f(r['ttft_p99_s'])} {r['steps']:6.0f} {r['mean_batch'] or 0:10.1f} {r['prefill_tokens']:9.0f} "
              f"{r['cached_tokens']:7.0f} {r['speculative_passes']:6.0f} {r['n_errors']:6d}")
    if a.out_json:
        out = {"rows": rows, "settings": vars(a), "machine": {"platform": platform.platform(),
                                                              "cpus": os.cpu_count()}}
        Path(a.out_json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
