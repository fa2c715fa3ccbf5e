"""The benchmark suite: one run on the GPU machine, a table last, and pass/fail for each target.

    python benchmarks/suite.py --workdir /tmp/suite --out $OUT                 # GPU machine
    python benchmarks/suite.py --scale cpu-smoke --workdir /tmp/s --out /tmp/s  # CPU check of the plumbing

For each model shape (synthetic Llama-3.1-8B and -70B shapes; ``--scale arch``: Qwen2.5-72B and Qwen3-32B), as many
layers as --scale gives, at batch
1 with the GPU capped (``--gpu-mem-gb``, a hard cap on PyTorch's allocator: 6 GiB for the 8B shape as an
8 GB card, 24 GB for the 70B shape as a 24 GB card):

    (a) DRAM-resident decode    --mode preload
    (b) disk-bound decode       --mode mixed, DRAM for the host embedding, the window and half the layers
                                (the page cache dropped first)
    (c) prefill of 2048 tokens  --mode preload, one new token; compute time from --mode full uncapped
    (d) cold start              --mode preload with the page cache dropped: the process's start to its first
                                token, against (tier bytes / disk bandwidth + one pass's bound)

An image with fewer layers than the real model runs under an *emulated* cap: the cap minus the layer bytes
the whole model's plan keeps on the GPU, so the truncated model streams its layers as the whole model streams
most of its own (a 70B x8 image would otherwise sit wholly in 24 GB). Its (a) step is extrapolated to the
whole model by H2D bytes per pass, labelled as such.

Each regime is one ``launch.py bench`` subprocess whose JSON carries the run's own byte counts, the links
measured in the same run, the bound and achieved/bound. A decode regime's bound is the longer of that transfer
bound and the decode step of the same image with every weight on the GPU (``--mode full``, uncapped): the
pass's compute, which sets the pace once most of a quantized model is resident. ``--quantize`` packs the images
quantized (``launch.py pack --quantize``); ``--regimes`` runs a subset.

For the 8B shape the suite also runs the peer users pick today, transformers + accelerate
(``device_map="auto"``, ``max_memory`` at the same GPU budget), on the same weights written as a Hugging Face
checkpoint, and reports ours / peer. Everything lands in OUT/suite.json (rewritten after each shape); the last
line is the verdict for each target.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCALES = {  # shape -> (layers, GPU cap GB) per scale
    "full": {"llama3.1-8b": (32, 6 * 1.073741824), "llama3.1-70b": (8, 24.0)},
    "arch": {"qwen2.5-72b": (8, 24.0), "qwen3-32b": (8, 24.0)},  # the other architectures' 70B-class shapes
    "small": {"llama3.1-8b": (8, 6 * 1.073741824), "llama3.1-70b": (4, 24.0)},
    "cpu-smoke": {"tiny": (4, None)},
}
# the real models, for truncated images' extrapolation
FULL_LAYERS = {"llama3.1-8b": 32, "llama3.1-70b": 80, "qwen2.5-72b": 80, "qwen3-32b": 64}
TARGETS = {"decode_dram": 1.10, "decode_disk": 1.10, "prefill": 1.15, "ttft_cold": 1.2, "peer_speedup": 6.0}
WORKERS = 4  # I/O workers per pool (the GPU machine has 16 cores)
KV_TOKENS = 2049  # the prefill regime's context: the KV cache the emulated cap must leave room for


class Layout:
    """What the plan's estimates read of an image (runtime.engine.batching), for a model not packed: its
    arguments, dtype, and the quantized tensors' formats (``--quantize``)."""

    def __init__(self, args, dtype: str, quantize: str | None = None, group: int = 64, output: bool = False):
        from model.synthetic import SyntheticCheckpoint
        from runtime.format.image import WeightFormat, plan_layout
        from runtime.format.pack import weight_formats

        self.args, self.dtype = args, dtype
        self.formats = weight_formats(SyntheticCheckpoint(args), WeightFormat(dtype, quantize, group, output))[0] \
            if quantize else {}
        self.group_bytes = {g.name: g.size for g in plan_layout(args, dtype, self.formats)}

    def largest_quantized(self) -> int:
        from runtime.format.image import largest_quantized

        return largest_quantized(self.args, self.formats)


def emulated_cap(shape: str, layers: int, cap: float | None, dtype: str, quant: tuple = ()) \
        -> tuple[float | None, dict | None]:
    """The GPU cap for an image truncated to ``layers`` that puts it where the whole model would be.

    The whole model under ``cap`` keeps some layers resident and streams the rest; a truncated image under
    the same cap might fit entirely and stream nothing. So the truncated run gets the cap minus the layer
    bytes the whole model's plan keeps resident: the GPU then holds what it would hold besides those layers
    (head, staging buffers, KV, activations) and streams its layers as the whole model streams most of its
    own. Returns (cap, the whole model's plan as a dict) or (cap, None) when the image is the whole model."""
    from model.args import preset
    from runtime.engine.placement import Budgets, plan_placement

    full = FULL_LAYERS.get(shape)
    if cap is None or full is None or layers >= full:
        return cap, None
    from runtime.engine.batching import activation_bytes, kv_cache_bytes

    a = preset(shape, full)
    whole = Layout(a, dtype, *quant)
    kv, act = kv_cache_bytes(whole, 1, KV_TOKENS), activation_bytes(whole, 1, KV_TOKENS - 1)
    plan = plan_placement(whole.group_bytes, a, "preload", Budgets(int(cap * 1e9), 1 << 50, kv, act))
    sizes = plan.group_bytes
    resident_layers = sum(sizes[g] for g in plan.gpu if g.startswith("layers."))
    return (cap * 1e9 - resident_layers) / 1e9, {"layers": full, "gpu_groups": len(plan.gpu),
                                                 "gpu_tier_bytes": plan.gpu_tier_bytes,
                                                 "h2d_bytes_per_pass": plan.h2d_bytes_per_pass,
                                                 "resident_layer_bytes": resident_layers}


def sh(cmd: list[str], log: Path, timeout: float = 900) -> int:
    """Run cmd with its output in log. Interrupted (its timeout, Ctrl-C, or SIGTERM, say from timeout(1)
    around the benchmark) it stops the command as Ctrl-C would, so that a run stops its pool and leaves no
    shared memory behind (SIGKILL only if it has not exited in 30 s), then re-raises."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            rc = proc.wait(timeout=timeout)
        except BaseException:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if rc:
        print(log.read_text()[-3000:], flush=True)
    return rc


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def prompt_file(path: Path, n_tokens: int, vocab: int) -> Path:
    ids = [(i * 7919 + 13) % (vocab - 1) + 1 for i in range(n_tokens)]  # spread over the vocabulary
    path.write_text(",".join(map(str, ids)) + "\n")
    return path


def bench(image: Path, out: Path, name: str, flags: list[str], device: str) -> dict | None:
    js = out / f"{name}.json"
    rc = sh([sys.executable, "launch.py", "bench", "--image", str(image), "--device", device, "--out-json", str(js),
             *flags], out / f"{name}.log")
    return json.loads(js.read_text()) if rc == 0 and js.exists() else None


def disk_dram_gb(image) -> float:
    """The disk-bound regime's DRAM budget: the host embedding, the window (4 slots of the largest streamed
    group), and half of the layers; the other half streams from disk every pass."""
    groups = image.groups
    layers = [g.size for n, g in groups.items() if n.startswith("layers.")]
    return (groups["tok_embeddings"].size + 4 * max(layers) + sum(layers) / 2) / 1e9


def quant_flags(a) -> list[str]:
    if not a.quantize:
        return []
    return ["--quantize", a.quantize, "--group-size", str(a.group_size)] + (["--quantize-output"]
                                                                          if a.quantize_output else [])


def run_shape(shape: str, layers: int, cap: float | None, a, out: Path) -> dict:
    from model.args import preset
    from runtime.format.image import Image

    args = preset(shape, layers)
    dtype = "bf16" if a.device == "cuda" else "fp32"
    fmt = f"-{a.quantize}g{a.group_size}{'o' if a.quantize_output else ''}" if a.quantize else ""
    image = Path(a.workdir) / f"{shape}-{layers}l{fmt}.img"
    res = {"shape": shape, "layers": layers, "gpu_cap_gb": cap, "quantize": a.quantize and
           {"scheme": a.quantize, "group_size": a.group_size, "output": a.quantize_output}}
    if not image.exists():
        t = time.monotonic()
        sh([sys.executable, "launch.py", "pack", "--synthetic", shape, "--layers", str(layers), "--out", str(image),
            "--dtype", dtype, *quant_flags(a)], out / f"pack-{shape}{fmt}.log")
        res["pack_s"] = time.monotonic() - t
    img = Image.open(image)
    res["image_gb"] = img.image_size / 1e9
    res["stored_as"] = img.format_summary()
    quant = (a.quantize, a.group_size, a.quantize_output) if a.quantize else ()
    run_cap, res["whole_model_plan"] = emulated_cap(shape, layers, cap, dtype, quant)
    res["run_gpu_cap_gb"] = run_cap
    short = prompt_file(out / f"{shape}-short.txt", 16, args.vocab_size)
    long = prompt_file(out / f"{shape}-2048.txt", a.prefill_tokens, args.vocab_size)
    common = ["--workers", str(WORKERS)] + (["--gpu-mem-gb", f"{run_cap:.3f}"] if run_cap else [])
    dec = ["--prompts", str(short), "--max-new-tokens", str(a.new_tokens), "--warmup-rounds", "1"]
    name = f"{shape}{fmt}"
    if "a" in a.regimes:
        res["decode_dram"] = bench(image, out, f"{name}-a-preload", dec + ["--mode", "preload", *common], a.device)
    if "b" in a.regimes:
        res["page_cache_dropped"] = drop_page_cache()
        res["decode_disk"] = bench(image, out, f"{name}-b-disk", ["--prompts", str(short), "--max-new-tokens",
                                   str(max(2, a.new_tokens // 4)), "--warmup-rounds", "0", "--mode", "mixed",
                                   "--dram-gb", f"{disk_dram_gb(img):.3f}", *common], a.device)
    links = [res[k]["links"] for k in ("decode_dram", "decode_disk") if res.get(k)]
    if "d" in a.regimes:
        res["page_cache_dropped_cold"] = drop_page_cache()
        # Cold start: the links measured above are passed in, so the process measures nothing before it loads.
        given = []
        if links and links[-1]["disk"] and links[-1]["disk"].get("gbps"):
            given += ["--disk-gbps", f"{links[-1]['disk']['gbps']:.4f}"]
        if links and links[-1]["h2d"] and links[-1]["h2d"].get("gbps"):
            given += ["--h2d-gbps", f"{links[-1]['h2d']['gbps']:.4f}"]
        res["cold_start"] = bench(image, out, f"{name}-d-cold", ["--prompts", str(short), "--max-new-tokens", "1",
                                  "--warmup-rounds", "0", "--mode", "preload", *given, *common], a.device)
    pre = ["--prompts", str(long), "--max-new-tokens", "1", "--max-seq-len", str(a.prefill_tokens + 1),
           "--warmup-rounds", "1"]
    if "c" in a.regimes:
        res["prefill"] = bench(image, out, f"{name}-c-prefill", pre + ["--mode", "preload", *common], a.device)
    if "a" in a.regimes or "c" in a.regimes:  # the compute of a pass with every weight on the GPU
        res["prefill_compute"] = bench(image, out, f"{name}-c-compute", pre[:2] + [
            "--max-new-tokens", "4", "--max-seq-len", str(a.prefill_tokens + 4), "--warmup-rounds", "1", "--mode",
            "full"], a.device)
    res["extrapolated"] = extrapolate(res)
    return res


def extrapolate(r: dict) -> dict | None:
    """The whole model's decode step from this truncated run, labelled as such: the measured DRAM-resident
    step scaled by H2D bytes per pass (the whole model's plan over this run's), plus the compute of the
    layers the whole model keeps resident (the full-mode decode step per layer)."""
    w, j, c = r.get("whole_model_plan"), r.get("decode_dram"), r.get("prefill_compute")
    if not w or not j or not j["bound"].get("step_ms"):
        return None
    run_h2d = j["plan"]["h2d_bytes_per_pass"]
    scale = w["h2d_bytes_per_pass"] / run_h2d
    per_layer_compute = c["bound"]["decode_step_ms"] / r["layers"] if c and c["bound"].get("decode_step_ms") else 0
    resident_layers = w["resident_layer_bytes"] / (sum(v for k, v in j["plan"]["group_bytes"].items()
                                                       if k.startswith("layers.")) / r["layers"])
    step = j["bound"]["decode_step_ms"] * scale + per_layer_compute * resident_layers
    bound = j["bound"]["step_ms"] * scale
    return {"label": f"extrapolated to {w['layers']} layers from {r['layers']} (not measured)",
            "decode_step_ms": step, "bound_ms": bound, "ratio": step / bound, "tokens_per_s": 1e3 / step,
            "h2d_scale": scale, "resident_layers": resident_layers, "per_layer_compute_ms": per_layer_compute}


def decode_bound(r: dict, key: str) -> tuple[float | None, str | None]:
    """A decode regime's bound and what sets it: the run's transfer bound (bench: bytes over the measured
    links), or the decode step of the same image with every weight on the GPU (--mode full, uncapped: the
    pass's compute, dequantization included) where that is longer, as when most of a quantized model is
    resident."""
    b = r[key]["bound"]
    c = r.get("prefill_compute")
    compute = c and c["bound"].get("decode_step_ms")
    if compute and (b.get("step_ms") is None or compute > b["step_ms"]):
        return compute, "compute"
    return b.get("step_ms"), b.get("limited_by")


def decode_ratio(r: dict, key: str) -> float | None:
    bound = decode_bound(r, key)[0]
    return r[key]["bound"]["decode_step_ms"] / bound if bound else None


def prefill_ratio(r: dict) -> float | None:
    p, c = r.get("prefill"), r.get("prefill_compute")
    if not p or not c:
        return None
    transfer = p["bound"].get("step_ms") or 0.0  # one weight pass over the links
    return p["prefill_ms"] / max(transfer, c["prefill_ms"])


def _verdict(ratios: list[float], target: float) -> str:
    """PASS / FAIL against the target; a ratio under 0.95 means the link figure of the bound was too low
    (the run beat its own bound), so the verdict is INCONCLUSIVE rather than a pass."""
    if not ratios:
        return "NOT RUN"
    lo, hi = min(ratios), max(ratios)
    if lo < 0.95:
        return f"INCONCLUSIVE (min {lo:.2f}: the measured link is below what the run achieved)"
    return f"{'PASS' if hi <= target else 'FAIL'} (max {hi:.2f})"


def cold_ms(r: dict) -> tuple[float, float] | None:
    """(time from the process's start to its first token with an empty page cache, the bound: the tiers
    read once from disk (host embedding, DRAM and GPU tiers) at the measured disk rate + one pass's bound)."""
    j = r.get("cold_start")
    if not j or not j["links"]["disk"].get("gbps") or j.get("process_start_to_first_token_ms") is None:
        return None
    p = j["plan"]
    tier_bytes = p["host_bytes"] + p["dram_tier_bytes"] + p["gpu_tier_bytes"]
    bound_ms = tier_bytes / (j["links"]["disk"]["gbps"] * 1e9) * 1e3 + (j["bound"].get("step_ms") or 0.0)
    return j["process_start_to_first_token_ms"], bound_ms


def cold_ratio(r: dict) -> float | None:
    c = cold_ms(r)
    return c[0] / c[1] if c else None


def verdicts(results: list[dict], peer: dict | None) -> dict[str, str]:
    v = {}
    for key in ("decode_dram", "decode_disk"):
        ratios = [x for x in (decode_ratio(r, key) for r in results if r.get(key)) if x is not None]
        v[key] = _verdict(ratios, TARGETS[key])
    pr = [x for x in (prefill_ratio(r) for r in results) if x]
    v["prefill"] = _verdict(pr, TARGETS["prefill"])
    v["ttft_cold"] = _verdict([x for x in (cold_ratio(r) for r in results) if x], TARGETS["ttft_cold"])
    if peer and peer.get("speedup"):
        v["peer_speedup"] = f"{'PASS' if peer['speedup'] >= TARGETS['peer_speedup'] else 'FAIL'} " \
                            f"({peer['speedup']:.1f}x)"
    else:
        v["peer_speedup"] = "NOT RUN"
    return v


def _f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def table(results: list[dict], peer: dict | None) -> str:
    rows = ["| shape | regime | ms | bound ms | limited by | achieved/bound | GPU peak GB (cap) |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        name = f"{r['shape']} x{r['layers']}" + (f" {r['quantize']['scheme']} g{r['quantize']['group_size']}"
                                                  if r.get("quantize") else "")
        cap = f" ({r['run_gpu_cap_gb']:.2f})" if r.get("run_gpu_cap_gb") else ""
        for key, label in (("decode_dram", "(a) DRAM decode step"), ("decode_disk", "(b) disk decode step"),
                           ("prefill", f"(c) prefill {r.get('prefill') and r['prefill']['prefill_tokens_total']}")):
            if key not in r:
                continue  # not run (--regimes)
            j = r[key]
            if not j:
                rows.append(f"| {name} | {label} | failed | | | | |")
                continue
            b = j["bound"]
            step = j["prefill_ms"] if key == "prefill" else b["decode_step_ms"]
            ratio = prefill_ratio(r) if key == "prefill" else decode_ratio(r, key)
            bound, limited = (b.get("step_ms"), b.get("limited_by")) if key == "prefill" else decode_bound(r, key)
            if key == "prefill" and r.get("prefill_compute"):
                compute = r["prefill_compute"]["prefill_ms"]
                if bound is None or compute > bound:
                    bound, limited = compute, "compute"
            rows.append(f"| {name} | {label} | {step:.1f} | {_f(bound)} | {limited} | {_f(ratio, 2)} | "
                        f"{j['gpu_mem_GB']['peak_allocated_GB']:.2f}{cap} |")
        c = cold_ms(r)
        if "cold_start" in r:
            rows.append(f"| {name} | (d) cold start to first token | {_f(c and c[0], 0)} | {_f(c and c[1], 0)} "
                        f"| disk + pass | {_f(cold_ratio(r), 2)} | |")
        x = r.get("extrapolated")
        if x:
            rows.append(f"| {r['shape']} x{x['label'].split()[2]} | (a) DRAM decode step, {x['label']}, "
                        f"{x['tokens_per_s']:.2f} tok/s | {x['decode_step_ms']:.1f} | {x['bound_ms']:.1f} | h2d | "
                        f"{x['ratio']:.2f} | |")
    if peer:
        rows.append(f"| peer (accelerate) | decode step | {peer.get('s_per_token', 0) * 1e3:.1f} | | | ours/peer "
                    f"speedup {peer.get('speedup', 0):.1f}x | |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="where images are packed (needs disk for all of them)")
    p.add_argument("--out", required=True, help="where JSON and logs go")
    p.add_argument("--scale", default="full", choices=sorted(SCALES), help="model sizes (default full)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"])
    p.add_argument("--new-tokens", type=int, default=16, help="decode tokens per measured round (default 16)")
    p.add_argument("--prefill-tokens", type=int, default=2048, help="prefill length (default 2048)")
    p.add_argument("--skip-peer", action="store_true", help="do not run transformers + accelerate")
    p.add_argument("--peer-tokens", type=int, default=4, help="decode tokens the peer is timed over (default 4)")
    p.add_argument("--shapes", default=None, help="comma-separated subset of the scale's shapes (default all)")
    p.add_argument("--regimes", default="abcd", help="which of the regimes a b c d to run (default abcd)")
    p.add_argument("--quantize", choices=["int8", "int4", "q8_0", "q4_0", "q4_1"],
                   help="pack the images with launch.py pack --quantize (default: plain bf16)")
    p.add_argument("--group-size", type=int, default=64, help="with --quantize int8|int4 (default 64)")
    p.add_argument("--quantize-output", action="store_true", help="with --quantize: the output matrix too")
    a = p.parse_args()
    if set(a.regimes) - set("abcd"):
        p.error(f"--regimes {a.regimes!r}: letters of abcd")
    import torch

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    shapes = SCALES[a.scale]
    if a.shapes:
        unknown = set(a.shapes.split(",")) - set(shapes)
        if unknown:
            p.error(f"--shapes: {sorted(unknown)} not in scale {a.scale} ({sorted(shapes)})")
        shapes = {k: v for k, v in shapes.items() if k in a.shapes.split(",")}
    t0 = time.monotonic()
    results, peer = [], None

    def save() -> dict[str, str]:
        v = verdicts(results, peer)
        (out / "suite.json").write_text(json.dumps({"results": results, "peer": peer, "verdicts": v,
                                                    "targets": TARGETS, "scale": a.scale,
                                                    "wall_s": time.monotonic() - t0}, indent=1))
        return v

    for shape, (layers, cap) in shapes.items():
        r = run_shape(shape, layers, cap, a, out)
        results.append(r)
        save()  # what is done survives a later step running out of time
        print(f"{shape}: done at {time.monotonic() - t0:.0f} s", flush=True)
        if shape == "llama3.1-8b" and not a.skip_peer and a.device == "cuda":
            from benchmarks.peer_accelerate import run_peer

            peer = run_peer(Path(a.workdir) / f"{shape}-{layers}l.img", r["run_gpu_cap_gb"], a.peer_tokens, out)
            ours = r["decode_dram"]["bound"]["decode_step_ms"] / 1e3 if r.get("decode_dram") else None
            if ours and peer.get("s_per_token"):
                peer["ours_s_per_token"], peer["speedup"] = ours, peer["s_per_token"] / ours
            save()
            print(f"peer: done at {time.monotonic() - t0:.0f} s", flush=True)
    v = save()
    print(table(results, peer))
    print("targets: " + "; ".join(f"{k} {s}" for k, s in v.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
