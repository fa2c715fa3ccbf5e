"""What one weight pass costs against the tokens it verifies (speculative decoding, issue 19).

    python benchmarks/spec_passes.py --shape llama3.1-70b --layers 8 --cap 24 --workdir /tmp/sp  # GPU machine
    python benchmarks/spec_passes.py --shape tiny --layers 4 --device cpu --tokens 1,4,16          # CPU check

Packs (or reuses) a synthetic image of --shape (optionally --quantize'd), opens it as ``launch.py run`` does
(--mode preload: every group not resident read from the DRAM tier each pass, the GPU capped at --cap, emulated
for a truncated image as benchmarks/suite.py does), prefills --context random tokens, and then times passes
that verify a chain of N tree tokens at that context (``Generator.forward_tree`` with a token tree's mask and
positions; nothing is kept, so every pass sees the same context) for each N of --tokens: the median of
--repeats after one warm-up, the device synchronised. Next to each: the pass's transfer bound from the plan's
H2D bytes per pass and the H2D link measured in the same run, and the time per verified token. The
measurement, not a model: a pass's time is its copies and its compute as they overlap.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama3.1-8b", help="synthetic preset (default %(default)s)")
    ap.add_argument("--layers", type=int, default=32, help="layers of the synthetic image (default %(default)s)")
    ap.add_argument("--cap", type=float, help="GPU budget in GB of the whole model (emulated for fewer layers)")
    ap.add_argument("--quantize", choices=["int8", "int4"], help="pack the layers (and the output) quantized")
    ap.add_argument("--group-size", type=int, default=64, help="with --quantize (default %(default)s)")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512,1024",
                    help="tree tokens per pass to time (default %(default)s)")
    ap.add_argument("--context", type=int, default=512, help="tokens already in the KV cache (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per size (default %(default)s)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    ap.add_argument("--workdir", default="/tmp/spec-passes", help="where the image is packed (default %(default)s)")
    ap.add_argument("--out-json", help="write the rows as JSON here")
    a = ap.parse_args()
    ns = [int(x) for x in a.tokens.split(",")]
    if any(n < 1 for n in ns) or a.repeats < 1 or a.context < 1:
        ap.error("--tokens, --repeats and --context must be positive")

    import torch

    from benchmarks.suite import emulated_cap
    from runtime.engine.config import EngineConfig
    from runtime.engine.generate import Generator, pick_device
    from runtime.engine.source import open_source
    from runtime.engine.speculative import Tree
    from runtime.format.image import Image
    from runtime.measure.links import measure_h2d

    device = pick_device(a.device)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    fmt = f"-{a.quantize}g{a.group_size}" if a.quantize else ""
    image_path = Path(a.workdir) / f"{a.shape}-{a.layers}l{fmt}.img"
    if not image_path.exists():
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
        q = ["--quantize", a.quantize, "--group-size", str(a.group_size), "--quantize-output"] if a.quantize else []
        subprocess.run([sys.executable, str(ROOT / "launch.py"), "pack", "--synthetic", a.shape, "--layers",
                        str(a.layers), "--out", str(image_path), "--dtype", dtype, "--quiet", *q], check=True)
    image = Image.open(image_path)
    quant = (a.quantize, a.group_size, True) if a.quantize else ()
    cap, _ = emulated_cap(a.shape, a.layers, a.cap, dtype, quant) if device.type == "cuda" else (None, None)
    max_len = a.context + max(ns)
    h2d = measure_h2d(device) if device.type == "cuda" else None
    # a draft's config, so that the plan keeps room for every tree node's logits
    cfg = EngineConfig.of(mode="preload", workers=4, quiet=True, prefill_chunk=max(2048, max(ns)), draft="ngram",
                          draft_tokens=max(ns), **({"gpu_mem_gb": cap} if cap else {}))
    rows = []
    with open_source(image, cfg, device, max_len=max_len) as (source, plan, _):
        gen = Generator(source, max_len, prefill=cfg.prefill)
        g = torch.Generator().manual_seed(0)
        vocab = image.args.vocab_size
        cache = gen.new_cache(1)
        gen.forward(torch.randint(0, vocab, (1, a.context), generator=g).to(device), 0, cache, last_only=True)
        bound_ms = plan.h2d_bytes_per_pass / (h2d["gbps"] * 1e9) * 1e3 if h2d and plan else None
        for n in ns:
            tree = Tree([int(t) for t in torch.randint(0, vocab, (1,), generator=g)])
            for t in torch.randint(0, vocab, (n - 1,), generator=g).tolist():
                tree.add(len(tree) - 1, t)  # a chain: every node the child of the one before
            toks = torch.tensor([tree.tokens], device=device)
            q = tree.queries(range(n), a.context, device) if n > 1 else None
            times = []
            for i in range(a.repeats + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                gen.forward_tree(toks, a.context, cache, q)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i:  # the first is the warm-up
                    times.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(times)
            rows.append({"tokens": n, "pass_ms": ms, "ms_per_token": ms / n, "times_ms": times})
            print(f"{n:>5} tokens: pass {ms:9.2f} ms ({ms / n:8.3f} ms a token)", file=sys.stderr, flush=True)
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    one = rows[0]["pass_ms"]
    print(f"\n{a.shape} x{a.layers} {image.format_summary()} on {device}"
          + (f", GPU cap {cap:.2f} GB (emulated for {a.layers} layers of the whole model's {a.cap:g})" if cap else "")
          + f"; context {a.context}; H2D per pass {plan.h2d_bytes_per_pass / 1e9:.2f} GB"
          + (f" at {h2d['gbps']:.1f} GB/s measured = bound {bound_ms:.1f} ms" if bound_ms else "")
          + (f"; GPU peak {peak:.2f} GB" if peak else "") + "\n")
    print("| tree tokens | pass ms | vs 1 token | ms per token | pass / transfer bound |")
    print("|---|---|---|---|---|")
    for r in rows:
        rb = f"{r['pass_ms'] / bound_ms:.2f}" if bound_ms else "-"
        print(f"| {r['tokens']} | {r['pass_ms']:.1f} | {r['pass_ms'] / one:.2f} | {r['ms_per_token']:.3f} | {rb} |")
    if a.out_json:
        Path(a.out_json).write_text(json.dumps({
            "shape": a.shape, "layers": a.layers, "stored_as": image.format_summary(), "device": str(device),
            "cap_gb": cap, "whole_model_cap_gb": a.cap, "context": a.context, "h2d": h2d,
            "h2d_bytes_per_pass": plan.h2d_bytes_per_pass if plan else None, "bound_ms": bound_ms,
            "gpu_peak_gb": peak, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
