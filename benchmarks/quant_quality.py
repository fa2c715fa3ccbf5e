"""What quantization costs in quality: the embedded SmolLM2's perplexity on a real English text (by default
tests/data/pride_and_prejudice_1-15.txt, chapters 1-15 of Jane Austen's novel, 31.8k tokens) with its
weights as fp32 and quantized from that fp32 by our int8 and int4 and by the gguf package's Q8_0, Q4_0 and
Q4_1 quantizers (issue 18's criteria: int8 within 0.5% of fp32, int4 g32 no worse than Q4_1, int4 g64 no
worse than Q4_0).

The fp32 weights are the embedded Q4_1 file dequantized: the only full-precision copy of SmolLM2 we have, so
"fp32" is the reference every other row is quantized from, not the original bf16 model. The image the
runtime uses by default, the file's own Q4_1 blocks with its Q8_0 embedding, is measured too ("as stored").
Every image is packed with ``launch.py pack`` and scored with ``launch.py perplexity --mode full`` (the same
windows for all). On 2 CPU cores each row takes about two minutes.

    python benchmarks/quant_quality.py                          # every row, a markdown table last
    python benchmarks/quant_quality.py --rows fp32,int8-g64 --context 1024 --out-json q.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "data" / "pride_and_prejudice_1-15.txt"
# row name -> pack flags (on the embedded GGUF); "as stored" keeps its blocks, every other row starts from fp32.
# No group of 128: SmolLM2's rows are 576 wide (9 x 64), and pack refuses a group that does not divide a row.
ROWS = {
    "fp32": ["--dtype", "fp32"],
    "as stored (q4_1 + q8_0 embedding)": ["--dtype", "fp32", "--keep-blocks"],
    "int8 g32": ["--dtype", "fp32", "--quantize", "int8", "--group-size", "32"],
    "int8 g64": ["--dtype", "fp32", "--quantize", "int8", "--group-size", "64"],
    "int4 g32": ["--dtype", "fp32", "--quantize", "int4", "--group-size", "32"],
    "int4 g64": ["--dtype", "fp32", "--quantize", "int4", "--group-size", "64"],
    "gguf q8_0": ["--dtype", "fp32", "--quantize", "q8_0"],
    "gguf q4_1": ["--dtype", "fp32", "--quantize", "q4_1"],
    "gguf q4_0": ["--dtype", "fp32", "--quantize", "q4_0"],
}
CRITERIA = [("int8 g64", "fp32", 1.005), ("int4 g32", "gguf q4_1", 1.0), ("int4 g64", "gguf q4_0", 1.0)]


def launch(*args: str) -> str:
    p = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"launch.py {' '.join(args)} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p.stderr + p.stdout


def embedded_gguf() -> str:
    sys.path.insert(0, str(ROOT))
    from runtime.format.embedded import embedded_gguf as find

    return str(find())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text-file", default=str(TEXT), help="UTF-8 text to score (default: %(default)s)")
    ap.add_argument("--context", type=int, default=2048, help="perplexity window in tokens (default %(default)s)")
    ap.add_argument("--rows", help=f"comma-separated subset of: {', '.join(ROWS)}")
    ap.add_argument("--out-json", help="write the rows as JSON here")
    a = ap.parse_args()
    rows = list(ROWS) if not a.rows else [r.strip() for r in a.rows.split(",")]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: unknown {bad}; one of {list(ROWS)}")
    gguf = embedded_gguf()
    results = []
    with tempfile.TemporaryDirectory(prefix="quant-quality-") as tmp:
        for name in rows:
            img = os.path.join(tmp, "model.img")
            t0 = time.perf_counter()
            out = launch("pack", "--checkpoint", gguf, "--out", img, "--quiet", *ROWS[name])
            pack_s = time.perf_counter() - t0
            stored = out.strip().splitlines()[-1]
            res = os.path.join(tmp, "ppl.json")
            t0 = time.perf_counter()
            launch("perplexity", "--image", img, "--text-file", a.text_file, "--context", str(a.context),
                   "--mode", "full", "--out-json", res)
            j = json.loads(Path(res).read_text())
            size = os.path.getsize(img)
            results.append({"row": name, "perplexity": j["perplexity"], "tokens": j["tokens"], "image_bytes": size,
                            "pack_s": pack_s, "score_s": time.perf_counter() - t0, "packed": stored})
            print(f"{name:<36} perplexity {j['perplexity']:.4f} over {j['tokens']} tokens, image {size / 1e6:.1f} MB "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    by = {r["row"]: r for r in results}
    ref = by.get("fp32")
    print(f"\nSmolLM2-135M-Instruct, {Path(a.text_file).name}, {results[0]['tokens']} predicted tokens, windows of "
          f"{a.context}\n")
    print("| weights | perplexity | vs fp32 | image MB |")
    print("|---|---|---|---|")
    for r in results:
        rel = f"{r['perplexity'] / ref['perplexity'] - 1:+.2%}" if ref else "-"
        print(f"| {r['row']} | {r['perplexity']:.4f} | {rel} | {r['image_bytes'] / 1e6:.1f} |")
    ok = True
    for row, against, limit in CRITERIA:
        if row in by and against in by:
            ratio = by[row]["perplexity"] / by[against]["perplexity"]
            verdict = "PASS" if ratio <= limit else "FAIL"
            ok &= ratio <= limit
            print(f"{row} / {against} = {ratio:.4f} (at most {limit}): {verdict}")
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
