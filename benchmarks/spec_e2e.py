"""Speculative decoding end to end on real prompts: the embedded SmolLM2 streamed (no layer kept on the
GPU: every pass copies every group from the DRAM tier), without a draft, with prompt lookup and with its own
int4 image as the draft (issue 19).

    python benchmarks/spec_e2e.py --workdir /tmp/spec-e2e            # GPU machine
    python benchmarks/spec_e2e.py --device cpu --max-new-tokens 16   # CPU check

The prompts (benchmarks/data/spec_prompts.txt, one per line, each in the chat template) summarise and
rewrite a passage of Pride and Prejudice (chapter 1; public domain), answer questions about it, and write code
from a specification. Each (prompt, draft) is one ``launch.py run`` process, greedy; its JSON gives the
decode tokens/s, the passes and the tokens a pass. Every speculative output is checked against the run
without a draft (greedy: the same tokens in fp32; in bf16 a pass of many tokens rounds differently from a
pass of one, so a near tie may go the other way and the texts part there).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "benchmarks" / "data" / "spec_prompts.txt"
KINDS = ["summarise", "rewrite", "answer", "code"]


def launch(*args: str) -> None:
    p = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"launch.py {' '.join(args[:6])} ... exited {p.returncode}:\n{p.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/spec-e2e", help="images and JSON (default %(default)s)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="per prompt (default %(default)s)")
    ap.add_argument("--draft-tokens", default="8,32", help="tree sizes for the int4 draft (default %(default)s)")
    ap.add_argument("--out-json", help="write the rows as JSON here")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from runtime.format.embedded import embedded_gguf

    w = Path(a.workdir)
    w.mkdir(parents=True, exist_ok=True)
    gguf = str(embedded_gguf())
    target, draft = w / "smol.img", w / "smol.int4.img"
    # the embedded default's formats: its Q4_1 blocks kept, the rest bf16 (fp32 on the CPU, as the embedded run)
    cpu = a.device == "cpu" or (a.device is None and not Path("/dev/nvidiactl").exists())
    if not target.exists():
        launch("pack", "--checkpoint", gguf, "--out", str(target), "--quiet", *(["--dtype", "fp32", "--keep-blocks"]
                                                                                 if cpu else []))
    if not draft.exists():
        launch("pack", "--checkpoint", gguf, "--out", str(draft), "--quiet", "--quantize", "int4", "--group-size", "64",
               *(["--dtype", "fp32"] if cpu else []))
    dev = ["--device", a.device] if a.device else []
    drafts = [("none", [])] + [("ngram", ["--draft", "ngram"])] + \
        [(f"int4 x{n}", ["--draft", str(draft), "--draft-tokens", n]) for n in a.draft_tokens.split(",")]
    prompts = [ln for ln in PROMPTS.read_text().splitlines() if ln.strip()]
    rows = []
    for kind, prompt in zip(KINDS, prompts):
        base = None
        for name, flags in drafts:
            js = w / "run.json"
            launch("run", "--image", str(target), "--prompt", prompt, "--chat", "--max-new-tokens",
                   str(a.max_new_tokens), "--mode", "preload", "--gpu-cached-layers", "0", "--workers", "4",
                   "--quiet", "--out-json", str(js), *dev, *flags)
            j = json.loads(js.read_text())
            sp = j.get("speculative") or {}
            row = {"prompt": kind, "draft": name, "generated": len(j["output_token_ids"]),
                   "decode_tok_s": j["decode_tok_s"], "tokens_per_pass": sp.get("tokens_per_pass", 1.0),
                   "passes": sp.get("passes"), "draft_ms": sp.get("draft_ms"), "verify_ms": sp.get("verify_ms"),
                   "acceptance_by_depth": sp.get("acceptance_by_depth"), "tokens": j["output_token_ids"]}
            if base is None:
                base = row
            row["same_tokens"] = row["tokens"] == base["tokens"]
            row["speedup"] = row["decode_tok_s"] / base["decode_tok_s"] if base["decode_tok_s"] else None
            rows.append(row)
            print(f"{kind:<10} {name:<9} {row['decode_tok_s']:8.1f} tok/s, {row['tokens_per_pass']:.2f} tokens a "
                  f"pass, same tokens: {row['same_tokens']}", file=sys.stderr, flush=True)
    print("\n| prompt | draft | tokens | decode tok/s | vs no draft | tokens a pass | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt']} | {r['draft']} | {r['generated']} | {r['decode_tok_s']:.1f} | {r['speedup']:.2f} | "
              f"{r['tokens_per_pass']:.2f} | {'yes' if r['same_tokens'] else 'NO'} |")
    if a.out_json:
        Path(a.out_json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
