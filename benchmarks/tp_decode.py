"""Tensor-parallel decode on the GPU machine (issue 21): a DRAM-resident (--mode preload) image decoded on 1 and
on N GPUs with the same per-GPU cap, each step against the bound from the measured aggregate link
(runtime/measure/multilink.py), outputs checked equal to the 1-GPU run. NOT YET RUN: it needs a machine with
several GPUs (docs/BENCHMARKS.md says so); benchmarks/gpu_tp.sh runs it there.

    python benchmarks/tp_decode.py --shape llama3.1-8b --layers 32 --cap 6 --ranks 2 --workdir /data/tp \
        --out-json tp.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def launch(*args: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"launch.py {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--cap", type=float, required=True, help="--gpu-mem-gb of every GPU")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out-json")
    a = ap.parse_args()
    from runtime.measure.multilink import measure_links, tp_bound_ms

    w = Path(a.workdir)
    w.mkdir(parents=True, exist_ok=True)
    layers = ["--layers", str(a.layers)] if a.layers else []
    plain, packed = w / "plain.img", w / f"tp{a.ranks}.img"
    launch("pack", "--synthetic", a.shape, *layers, "--out", str(plain), "--no-verify", "--quiet")
    launch("pack", "--synthetic", a.shape, *layers, "--out", str(packed), "--no-verify", "--quiet",
           "--tensor-parallel", str(a.ranks))
    links = measure_links([f"cuda:{i}" for i in range(a.ranks)])
    common = ["--prompt-ids", "128000,9906,1917,374", "--max-new-tokens", str(a.new), "--device", "cuda",
              "--mode", "preload", "--gpu-mem-gb", str(a.cap), "--quiet"]
    runs = {}
    for name, image, n in (("1gpu", plain, 1), (f"{a.ranks}gpu", packed, a.ranks)):
        out = w / f"{name}.json"
        launch("run", "--image", str(image), *common, "--out-json", str(out),
               *(["--tensor-parallel", str(n)] if n > 1 else []))
        r = json.loads(out.read_text())
        h2d = r["plan"]["h2d_bytes_per_pass"]
        agg = links["each"]["cuda:0"] if n == 1 else links["aggregate_gbps"]
        bound = tp_bound_ms([h2d] * n, agg)
        step = sorted(r["token_ms"])[len(r["token_ms"]) // 2]
        runs[name] = {"step_ms_median": step, "bound_ms": bound, "ratio": step / bound, "h2d_bytes_per_rank": h2d,
                      "output_token_ids": r["output_token_ids"]}
        print(f"{a.shape} x{a.layers or 'all'} {name}: step {step:.2f} ms, bound {bound:.2f} ms "
              f"({h2d / 1e9:.2f} GB a rank over {agg:.1f} GB/s), {step / bound:.2f}x")
    one, many = runs["1gpu"], runs[f"{a.ranks}gpu"]
    same = one["output_token_ids"] == many["output_token_ids"]
    print(f"outputs equal: {same}; links: {json.dumps(links)}")
    if a.out_json:
        Path(a.out_json).write_text(json.dumps({"shape": a.shape, "layers": a.layers, "cap_gb": a.cap, "links": links,
                                                "runs": runs, "outputs_equal": same}, indent=1))
    sys.exit(0 if same and many["ratio"] <= 1.10 else 1)


if __name__ == "__main__":
    main()
