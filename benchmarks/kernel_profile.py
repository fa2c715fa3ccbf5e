"""Where a pass's GPU time goes, kernel by kernel: an image in memory on CUDA (``--mode full``), one prefill of
``--prompt-tokens`` tokens and ``--steps`` eager decode steps under torch.profiler; per phase the total kernel
time, the number of kernel launches, and the kernels that took the most time (grouped by name).

    python benchmarks/kernel_profile.py --image X.img [--prompt-tokens 512] [--steps 4] [--top 12] [--out-json F]

Eager on purpose: a replayed CUDA graph runs the same kernels, and a kernel's name says which step of a layer it
is. The decode rows tell launches a step (what CUDA graphs pay ~2 us each for), the prefill rows whether the
dequantization, the matmuls or the attention decide.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def kernels(prof, cuda: bool) -> list[tuple[str, float]]:
    """(name, us) of every CUDA kernel the profiler saw (on the CPU, a dry run: every top-level op)."""
    import torch

    if not cuda:
        return [(e.name, e.cpu_time_total) for e in prof.events() if e.cpu_parent is None]
    return [(e.name, e.device_time_total) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def summary(label: str, ks: list[tuple[str, float]], per: int, top: int) -> dict:
    by = collections.defaultdict(lambda: [0, 0.0])
    for name, us in ks:
        by[name][0] += 1
        by[name][1] += us
    total = sum(us for _, us in ks)
    print(f"\n{label}: {len(ks) / per:.0f} kernels, {total / per / 1e3:.3f} ms of kernel time (per pass)")
    rows = sorted(by.items(), key=lambda kv: -kv[1][1])[:top]
    for name, (n, us) in rows:
        print(f"  {us / per / 1e3:8.3f} ms {100 * us / max(total, 1e-9):5.1f}% {n / per:6.0f}x  {name[:110]}")
    return {"kernels_per_pass": len(ks) / per, "kernel_ms_per_pass": total / per / 1e3,
            "top": [{"name": name, "ms": us / per / 1e3, "launches": n / per} for name, (n, us) in rows]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", required=True, help="a packed image (launch.py pack)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="tokens of the prefill (default 512)")
    ap.add_argument("--steps", type=int, default=4, help="decode steps profiled (default 4)")
    ap.add_argument("--top", type=int, default=12, help="kernels listed a phase (default 12)")
    ap.add_argument("--out-json", help="write the summary here")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu: a dry run of the script, ops not kernels")
    args = ap.parse_args()
    import torch

    from runtime.engine.generate import Generator
    from runtime.engine.weights import InMemoryWeights
    from runtime.format.image import Image

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("kernel_profile: no CUDA here (--device cpu: a dry run)", file=sys.stderr)
        return 2
    if args.prompt_tokens < 1 or args.steps < 1:
        print("kernel_profile: --prompt-tokens and --steps must be >= 1", file=sys.stderr)
        return 2
    gen = Generator(InMemoryWeights(Image.open(args.image), args.device, quiet=True),
                    args.prompt_tokens + args.steps + 8)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activity = [torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU]
    vocab = gen.args.vocab_size
    prompt = torch.tensor([[(i * 7919 + 13) % (vocab - 1) + 1 for i in range(args.prompt_tokens)]], device=args.device)
    out = {}
    for _ in range(2):  # the first round compiles Triton's kernels and warms cuBLAS
        cache = gen.new_cache(1)
        with torch.profiler.profile(activities=activity) as prof:
            logits = gen.forward(prompt, 0, cache)
            sync()
        pre = kernels(prof, cuda)
        tok = logits[:, -1:].argmax(-1)
        with torch.profiler.profile(activities=activity) as prof:
            for i in range(args.steps):
                tok = gen.forward(tok, args.prompt_tokens + i, cache)[:, -1:].argmax(-1)
            sync()
        dec = kernels(prof, cuda)
    print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}: {args.image}, {gen.args.n_layers} layers")
    out["prefill"] = summary(f"prefill of {args.prompt_tokens} tokens", pre, 1, args.top)
    out["decode"] = summary("decode step (eager)", dec, args.steps, args.top)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
