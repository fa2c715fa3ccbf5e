"""Tokens/s against batch size (issue 6): a streaming pass costs the same whatever the batch, until compute or
the KV cache's traffic takes over. One ``launch.py bench`` per batch size, a table last.

    python benchmarks/batch_sweep.py --shape llama3.1-8b --layers 32 --cap 6.442 --workdir /tmp/bs --out $OUT
    python benchmarks/batch_sweep.py --shape llama3.1-70b --layers 8 --cap 24 --workdir /tmp/bs --out $OUT
    python benchmarks/batch_sweep.py --shape tiny --layers 4 --device cpu --batches 1,4 --prompt-tokens 64 \
        --new-tokens 4 --workdir /tmp/bs --out /tmp/bs                                # CPU check of the plumbing

As in the original bench: prompts of ``--prompt-tokens`` tokens (distinct per sequence), ``--new-tokens`` new
tokens, ``--mode preload`` under the GPU cap (an image with fewer layers than the model gets the suite's
emulated cap, benchmarks/suite.py). The KV cache is offloaded to DRAM when the cap cannot hold it
(``--kv-offload auto``); ``--host-attention`` then runs its decode attention on the CPU. Per batch size:
prefill time, the decode step, its ratio to batch 1's, tokens/s, weight and KV bytes per step and the
transfer bound max over the H2D link of (weights + KV moved per step), and with host attention the KV bytes
it reads per step over the CPU's measured attention rate. Prefill: its weight passes (a pass's
--prefill-chunk tokens are shared by the batch), their transfer bound (passes x the weights one moves, plus
the KV cache read back between chunks when it is offloaded) and the KV cache's allocation (inside prefill).
With ``--compute-bound`` each batch size also runs with every weight resident (``--mode full``, no cap):
that decode step is the compute floor. The table marks the first batch size whose step exceeds 1.2 x batch
1's: from there the step is no longer the weight pass's (compute, which the compute column shows, or the KV
cache's traffic or host attention, which the bound column shows).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.suite import emulated_cap, sh  # noqa: E402
from runtime.engine.batching import prefill_passes  # noqa: E402

RATIO = 1.2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3.1-8b", help="synthetic shape (default llama3.1-8b)")
    ap.add_argument("--layers", type=int, default=32, help="layers of the image (default 32)")
    ap.add_argument("--cap", type=float, help="GPU cap in GB for the whole model (emulated for a truncated image)")
    ap.add_argument("--batches", default="1,8,32,64,128", help="batch sizes (default 1,8,32,64,128)")
    ap.add_argument("--prompt-tokens", type=int, default=2048, help="tokens per prompt (default 2048)")
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens per sequence (default 32)")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--workers", type=int, default=4, help="I/O workers (default 4)")
    ap.add_argument("--prefill-chunk", type=int,
                    help="pass --prefill-chunk: prompt tokens per weight pass, shared by the batch (bench's default: "
                         "2048)")
    ap.add_argument("--compute-bound", action="store_true",
                    help="also run each batch size with every weight resident (bench --mode full, no cap, KV on "
                         "the device): its decode step is the compute the streamed step cannot go below")
    ap.add_argument("--host-attention", nargs="?", const="all", metavar="N|all",
                    help="pass --host-attention [N]: the decode attention of N layers (all without N) of an "
                         "offloaded KV cache runs on the CPU")
    ap.add_argument("--bench-args", default="",
                    help="more flags for every streamed bench run, one string (e.g. \"--group-prefetch-depth 4\"); "
                         "TRACE in it becomes the batch's trace file in --out (e.g. \"--trace TRACE\")")
    ap.add_argument("--workdir", required=True, help="where the image is packed")
    ap.add_argument("--out", required=True, help="logs, per-batch JSON and batch.json")
    a = ap.parse_args()
    from model.args import preset

    out, work = Path(a.out), Path(a.workdir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    dtype = "bf16" if a.device == "cuda" else "fp32"
    image = work / f"{a.shape}-{a.layers}l.img"
    if not image.exists() and sh([sys.executable, "launch.py", "pack", "--synthetic", a.shape, "--layers",
                                  str(a.layers), "--out", str(image), "--dtype", dtype, "--quiet"], out / "pack.log"):
        return 1
    cap, _ = emulated_cap(a.shape, a.layers, a.cap, dtype)
    vocab = preset(a.shape, a.layers).vocab_size
    batches = [int(x) for x in a.batches.split(",")]
    prompts = out / "prompts.txt"
    prompts.write_text("".join(",".join(str((i * 7919 + j * 104729 + 13) % (vocab - 1) + 1)
                                        for i in range(a.prompt_tokens)) + "\n" for j in range(max(batches))))
    rows, given = [], []
    for b in batches:
        js = out / f"b{b}.json"
        cmd = [sys.executable, "launch.py", "bench", "--image", str(image), "--device", a.device, "--prompts",
               str(prompts), "--batch-size", str(b), "--max-new-tokens", str(a.new_tokens), "--max-seq-len",
               str(a.prompt_tokens + a.new_tokens), "--warmup-rounds", "0", "--mode", "preload", "--workers",
               str(a.workers), "--out-json", str(js), *given]
        cmd += (["--gpu-mem-gb", f"{cap:.3f}"] if cap else []) + (["--host-attention", a.host_attention]
                                                                if a.host_attention else [])
        cmd += ["--prefill-chunk", str(a.prefill_chunk)] if a.prefill_chunk else []
        cmd += [str(out / f"b{b}.trace.json") if x == "TRACE" else x for x in shlex.split(a.bench_args)]
        if sh(cmd, out / f"b{b}.log") or not js.exists():
            rows.append({"batch": b, "failed": True, "log": (out / f"b{b}.log").read_text()[-1500:]})
            save(out, rows, a, cap)
            continue
        j = json.loads(js.read_text())
        if not given:  # later runs take the first run's links: nothing measured before each load
            lk = j["links"]
            given = [f for k in ("h2d", "disk") if (lk.get(k) or {}).get("gbps")
                     for f in (f"--{k}-gbps", f"{lk[k]['gbps']:.4f}")]
        steps = max(j["decode_tokens_total"] // b, 1)
        h2d = (j["links"].get("h2d") or {}).get("gbps")
        kv_step = j["kv"]["decode_h2d_bytes"] / steps
        w_step = j["bytes_per_token"]["h2d"]
        # chunked across the batch, or whole prompts a pass (runtime.engine.generate.Generator._prefill chose)
        passes = prefill_passes(a.prefill_chunk or 2048, b, a.prompt_tokens)[bool(j["kv"].get("prefill_by_sequence"))]
        rows.append({"batch": b, "prefill_s": j["prefill_ms"] / 1e3, "prefill_passes": passes,
                     # the weight passes and the KV read back between chunks (later chunks attend to earlier)
                     "prefill_bound_s": (passes * w_step + j["kv"]["prefill_h2d_bytes"]) / (h2d * 1e9) if h2d else None,
                     "prefill_kv_h2d": j["kv"]["prefill_h2d_bytes"], "kv_alloc_s": j["kv"].get("alloc_ms", 0) / 1e3,
                     "step_ms": j["bound"]["decode_step_ms"],
                     "tok_s": j["throughput_tok_s"], "kv_offload": j["kv"]["offload"],
                     "host_attention": j["kv"]["host_attention"], "kv_h2d_per_step": kv_step,
                     "host_layers": j["kv"].get("host_attention_layers", 0), "layers": a.layers,
                     "kv_d2h_per_step": j["kv"]["decode_d2h_bytes"] / steps, "weight_h2d_per_step": w_step,
                     "bound_ms": bound_ms(j, w_step + kv_step, h2d),
                     "gpu_peak_GB": j["gpu_mem_GB"]["peak_allocated_GB"], "pinned_GB": j["host_mem_GB"]["pinned_GB"]})
        if a.compute_bound:
            rows[-1]["compute_ms"] = compute_step_ms(a, image, prompts, b, out)
        save(out, rows, a, cap)
    report(rows, a, cap)
    return 0


def compute_step_ms(a, image: Path, prompts: Path, b: int, out: Path) -> float | None:
    """The decode step with the whole model resident and nothing moving (``--mode full``, no GPU cap, the KV
    cache on the device): the compute floor of the streamed step at this batch size. None if it failed."""
    js = out / f"b{b}-full.json"
    cmd = [sys.executable, "launch.py", "bench", "--image", str(image), "--device", a.device, "--prompts",
           str(prompts), "--batch-size", str(b), "--max-new-tokens", str(a.new_tokens), "--max-seq-len",
           str(a.prompt_tokens + a.new_tokens), "--warmup-rounds", "0", "--mode", "full", "--kv-offload", "off",
           "--disk-gbps", "1", "--h2d-gbps", "1", "--out-json", str(js)]
    cmd += ["--prefill-chunk", str(a.prefill_chunk)] if a.prefill_chunk else []
    if sh(cmd, out / f"b{b}-full.log") or not js.exists():
        return None
    return json.loads(js.read_text())["bound"]["decode_step_ms"]


def bound_ms(j: dict, h2d_bytes: float, h2d_gbps: float | None) -> float | None:
    """max(H2D bytes per step over the link, host-attended KV bytes per step over the CPU's attention rate)."""
    terms = [h2d_bytes / (h2d_gbps * 1e9) * 1e3] if h2d_gbps else []
    host = j["links"].get("host_attention")
    if host and j["kv"].get("host_kv_bytes_per_step"):
        terms.append(j["kv"]["host_kv_bytes_per_step"] / (host["gbps"] * 1e9) * 1e3)
    return max(terms) if terms else None


def save(out: Path, rows: list[dict], a, cap) -> None:
    """batch.json after every batch size: a run cut short keeps the rows it finished."""
    (out / "batch.json").write_text(json.dumps({"shape": a.shape, "layers": a.layers, "cap_gb": cap, "rows": rows,
                                                "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens},
                                               indent=1))


def kv_where(r: dict) -> str:
    if not r["kv_offload"]:
        return "no"
    if not r.get("host_attention"):
        return "yes"
    return f"yes, {r.get('host_layers', '?')} of {r.get('layers', '?')} layers attended on the host"


def report(rows: list[dict], a, cap) -> None:
    ok = [r for r in rows if not r.get("failed")]
    base = ok[0]["step_ms"] if ok and ok[0]["batch"] == 1 else None
    print(f"{a.shape} x{a.layers}, cap {cap} GB, prompts {a.prompt_tokens} tokens, {a.new_tokens} new tokens")
    print("| batch | prefill s (weight passes, bound s, KV allocation s) | decode step ms | step / batch-1 step | "
          "tokens/s | KV offloaded | KV H2D GB/step | weights H2D GB/step | bound ms | compute ms | GPU peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    marked = False
    for r in rows:
        if r.get("failed"):
            print(f"| {r['batch']} | failed (see b{r['batch']}.log) | | | | | | | | | |")
            continue
        ratio = r["step_ms"] / base if base else None
        note = ""
        if ratio is not None and ratio > RATIO and not marked:
            marked, note = True, " (first step over 1.2x batch 1's)"
        bound = f"{r['bound_ms']:.1f}" if r["bound_ms"] else "-"
        pb = f"{r['prefill_bound_s']:.2f}" if r.get("prefill_bound_s") else "-"
        compute = f"{r['compute_ms']:.1f}" if r.get("compute_ms") else "-"
        print(f"| {r['batch']} | {r['prefill_s']:.2f} ({r['prefill_passes']}, {pb}, {r.get('kv_alloc_s', 0):.2f}) | "
              f"{r['step_ms']:.1f} | "
              f"{f'{ratio:.2f}' if ratio else '-'}{note} | {r['tok_s']:.1f} | {kv_where(r)} | "
              f"{r['kv_h2d_per_step'] / 1e9:.2f} | {r['weight_h2d_per_step'] / 1e9:.2f} | {bound} | {compute} | "
              f"{r['gpu_peak_GB']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
