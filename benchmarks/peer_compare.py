"""The small steps of benchmarks/gpu_peer.sh (ours and llama.cpp side by side on the same GGUF files, issues 27 and
28) that are not a tool's own run, each a subcommand writing or reading JSON under the run's output folder:

    python benchmarks/peer_compare.py hbm --out OUT/hbm.json              # device-to-device copy bandwidth (CUDA)
    python benchmarks/peer_compare.py prompt --tokenizer T --tokens 512 --out P.txt   # a prompt of 512 tokens
    python benchmarks/peer_compare.py table --dir OUT                     # the comparison, as a markdown table
    python benchmarks/peer_compare.py cpu-table --dir OUT                 # benchmarks/cpu_peer.sh's table

The table joins, per file NAME and setting ("gpu": every layer on the GPU; "split": the first layers on the GPU,
the rest computed by llama.cpp's CPU / streamed by ours from the DRAM tier), our bench's JSON
(ours-NAME-SETTING.json, ``launch.py bench --out-json``) and llama-bench's (lcpp-NAME-SETTING.json,
``llama-bench -o json``: one row per test, pp512 and tg64, per -fa value). The HBM bound of a decode step is the
bytes it reads (every matrix but token_embd, of which a step reads one row: weights-NAME.json, written by
``synth_gguf.py --info-json``) over the measured copy bandwidth
(bytes read plus bytes written per second, as a copy moves both); for the split setting the bound is our bench's
own (its link term), llama.cpp's CPU part having none measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NAMES = {"8b-bf16": ("8B-shaped", "bf16"), "8b-int4": ("8B-shaped", "our int4 g64 (no llama.cpp run)"),
         "8b-q4km": ("8B-shaped", "Q4_K_M"), "70b-q4km": ("70B-shaped", "Q4_K_M")}
SETTINGS = {"gpu": "all layers on the GPU: -ngl 99 / --mode full",
            "split": "first layers on the GPU: -ngl N -t T / --mode preload --gpu-cached-layers N",
            "cpu": "ours, the split with --cpu-compute (auto unless CPU_COMPUTE said otherwise): the CPU computes "
                   "DRAM-tier groups in place while the link streams the rest; llama.cpp's row: the split's"}


def measure_hbm(nbytes: int = 2 << 30, reps: int = 20) -> dict:
    """Device-to-device copy bandwidth, counting the bytes read and the bytes written."""
    import torch

    src, dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda"), torch.empty(nbytes, dtype=torch.uint8,
                                                                                   device="cuda")
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    return {"gbps": 2 * nbytes * reps / seconds / 1e9, "bytes": nbytes, "reps": reps,
            "device": torch.cuda.get_device_name()}


def make_prompt(tokenizer, n_tokens: int, seed: int = 0) -> tuple[str, int]:
    """A one-line text prompt that ``tokenizer`` (a packed image's tokenizer folder, or a GGUF: reading a
    GGUF's vocabulary takes seconds; or a tokenizer already loaded) encodes as ``n_tokens`` tokens, BOS included,
    where the vocabulary allows: one letter, then " x" words (one token each in a synthetic vocabulary of
    benchmarks/synth_gguf.py with all two-character merges; two in a small one), drawn with ``seed``. Returns the
    text and its actual token count."""
    import random

    from model.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    rnd = random.Random(seed)
    words, n = ["a"], len(tok.encode("a"))
    per_word = len(tok.encode("a b")) - n
    while n + per_word <= n_tokens:
        words.append(" " + rnd.choice("abcdefghijklmnopqrstuvwxyz"))
        n += per_word
    text = "".join(words)
    return text, len(tok.encode(text))


# ---- the table ----------------------------------------------------------------------------------------------

def ours_rates(rep: dict) -> dict:
    """Decode and 512-token prefill tokens/s, the decode step in ms and the bench's own bound, from our JSON."""
    steps = rep["decode_tokens_total"] / rep["batch_size"]
    b = rep.get("bound") or {}
    return {"tg": rep["decode_tokens_total"] / rep["decode_ms"] * 1e3 if rep["decode_ms"] else None,
            "pp": rep["prefill_tokens_total"] / rep["prefill_ms"] * 1e3 if rep["prefill_ms"] else None,
            "step_ms": rep["decode_ms"] / steps if steps else None, "bound_ms": b.get("step_ms"),
            "bound_by": b.get("limited_by")}


def lcpp_rates(rows: list[dict]) -> dict[int, dict]:
    """{flash_attn: {"tg": tok/s, "pp": tok/s, "n_prompt", "n_gen"}} from llama-bench's JSON rows."""
    out: dict[int, dict] = {}
    for r in rows:
        d = out.setdefault(int(r.get("flash_attn", 0)), {})
        if r["n_gen"] > 0 and r["n_prompt"] == 0:
            d.update(tg=r["avg_ts"], n_gen=r["n_gen"])
        elif r["n_prompt"] > 0 and r["n_gen"] == 0:
            d.update(pp=r["avg_ts"], n_prompt=r["n_prompt"])
    return out


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _label(name: str, w: dict) -> str:
    """"70B-shaped x32 Q4_K_M": the shape, the layer count of the file (its weights JSON) and the type."""
    if name not in NAMES:
        return name
    shape, kind = NAMES[name]
    return f"{shape} x{w['n_layers']} {kind}" if "n_layers" in w else f"{shape} {kind}"


def _order(name: str) -> tuple[int, str]:
    return (list(NAMES).index(name) if name in NAMES else len(NAMES), name)


def image_weights(image: str) -> dict:
    """An image's weights as synth_gguf.py's --info-json gives a GGUF's ("bytes", "n_layers", "step_bytes": every
    tensor but the token embedding table, which a step reads one row of): for a file we quantize at pack."""
    from runtime.format.image import Image

    img = Image.open(image)
    sizes = [(t.name, t.nbytes) for g in img.groups.values() for t in g.tensors]
    return {"bytes": sum(n for _, n in sizes), "n_layers": img.args.n_layers,
            "step_bytes": sum(n for name, n in sizes if name != "tok_embeddings.weight" or img.args.tie_embeddings)}


def table_rows(d: Path) -> list[list[str]]:
    """One row per file, setting and llama.cpp -fa value (ours repeated), for every file with any result."""
    hbm = (_load(d / "hbm.json") or {}).get("gbps")
    rows = []
    for name in sorted({p.name.split("-", 1)[1].rsplit("-", 1)[0] for p in d.glob("*-*-*.json")
                        if p.name.startswith(("ours-", "lcpp-"))}, key=_order):
        w = _load(d / f"weights-{name}.json") or {}
        for setting in SETTINGS:
            rep = _load(d / f"ours-{name}-{setting}.json")
            lrows = _load(d / f"lcpp-{name}-{'split' if setting == 'cpu' else setting}.json")
            if setting == "cpu" and rep is None:
                continue
            if rep is None and lrows is None:
                continue
            o = ours_rates(rep) if rep else {}
            hbm_ms = w["step_bytes"] / (hbm * 1e9) * 1e3 if hbm and w and setting == "gpu" else None
            bound_ms = hbm_ms if setting == "gpu" else o.get("bound_ms")
            for fa, lc in sorted((lcpp_rates(lrows) if lrows else {None: {}}).items(), key=lambda x: x[0] or 0):
                lc_step = 1e3 / lc["tg"] if lc.get("tg") else None
                rows.append([_label(name, w), _f(w.get("bytes", 0) / 1e9 or None, ".2f"), setting,
                             "-" if fa is None else str(fa), _f(o.get("tg")), _f(o.get("pp")), _f(lc.get("tg")),
                             _f(lc.get("pp")), _f(_ratio(o.get("tg"), lc.get("tg")), ".2f"),
                             _f(_ratio(o.get("pp"), lc.get("pp")), ".2f"),
                             _f(bound_ms, ".2f") + (f" ({o['bound_by']})" if setting != "gpu" and o.get("bound_by")
                                                    else ""),
                             _f(_ratio(o.get("step_ms"), bound_ms), ".2f"), _f(_ratio(lc_step, bound_ms), ".2f")])
    return rows


HEADER = ["file", "GB", "setting", "lcpp -fa", "ours tg tok/s", "ours pp tok/s", "llama.cpp tg tok/s",
          "llama.cpp pp tok/s", "tg ours/llama.cpp", "pp ours/llama.cpp", "bound ms", "ours step/bound",
          "llama.cpp step/bound"]


def table(d: Path) -> str:
    hbm = _load(d / "hbm.json")
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(d)]
    notes = [f"HBM: {hbm['gbps']:.0f} GB/s device-to-device copy (read + written) on {hbm['device']}"
             if hbm else "HBM: not measured (no CUDA)",
             "tg: decode tokens/s at batch 1; pp: prefill tokens/s of the prompt; bound: gpu rows, the bytes of a "
             "decode step (all matrices but token_embd) / HBM; split rows, our bench's own bound (its limiting link)"]
    for s, what in SETTINGS.items():
        notes.append(f"{s}: {what}")
    return "\n".join(lines + [""] + notes)


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x)
    return None if not xs else xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def cpu_rates(d: Path) -> dict[str, dict[str, list[float]]]:
    """benchmarks/cpu_peer.sh's rounds: {side: {"tg": [tok/s per round], "pp": [...]}}, sides "llama.cpp" (its
    lcpp-ROUND.json, each the average of its -r repetitions) and "ours NAME" (ours-NAME-ROUND.json), in round
    order."""
    sides: dict[str, dict[str, list[float]]] = {}

    def add(side: str, rates: dict) -> None:
        for k in ("tg", "pp"):
            if rates.get(k):
                sides.setdefault(side, {"tg": [], "pp": []})[k].append(rates[k])

    def round_of(p: Path) -> int:
        return int(p.stem.rsplit("-", 1)[1])

    for p in sorted(d.glob("lcpp-*.json"), key=round_of):
        rates = lcpp_rates(_load(p) or [])  # by -fa: one value (-1, auto, in recent llama-bench; 0 before)
        if rates:
            add("llama.cpp", rates[min(rates)])
    for p in sorted(d.glob("ours-*-*.json"), key=round_of):
        rep = _load(p)
        if rep:
            add("ours " + p.stem.split("-", 1)[1].rsplit("-", 1)[0], ours_rates(rep))
    return sides


def cpu_table(d: Path, threads: int | None = None) -> str:
    """The CPU comparison: each side's median decode (tg) and prompt (pp) tokens/s over the rounds, the rounds'
    own figures, and ours / llama.cpp's medians."""
    sides = cpu_rates(d)
    ref = sides.get("llama.cpp", {})
    ref_tg, ref_pp = _median(ref.get("tg", [])), _median(ref.get("pp", []))
    head = ["side", "tg tok/s (median)", "pp tok/s (median)", "tg rounds", "pp rounds", "tg / llama.cpp",
            "pp / llama.cpp"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for side, r in sorted(sides.items(), key=lambda kv: (kv[0] != "llama.cpp", kv[0])):
        tg, pp = _median(r["tg"]), _median(r["pp"])
        lines.append("| " + " | ".join([side, _f(tg), _f(pp), " ".join(_f(x) for x in r["tg"]),
                                        " ".join(_f(x) for x in r["pp"]), _f(_ratio(tg, ref_tg), ".2f"),
                                        _f(_ratio(pp, ref_pp), ".2f")]) + " |")
    notes = [f"{threads or '?'} threads each side; tg: decode tokens/s at batch 1 (llama-bench's tg decodes from an "
             "empty cache, ours after the prompt); pp: the prompt's tokens/s. Target (issue 28): tg / llama.cpp >= "
             "1, pp / llama.cpp >= 0.5."]
    return "\n".join(lines + [""] + notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hbm", help="device-to-device copy bandwidth (CUDA)")
    h.add_argument("--out", required=True)
    q = sub.add_parser("prompt", help="a text prompt of --tokens tokens for the file's tokenizer")
    q.add_argument("--tokenizer", required=True, help="a packed image's tokenizer folder (IMAGE.tokenizer) or a GGUF")
    q.add_argument("--tokens", type=int, default=512)
    q.add_argument("--out", required=True)
    w = sub.add_parser("image-weights", help="a packed image's bytes as synth_gguf.py --info-json writes a GGUF's")
    w.add_argument("--image", required=True)
    w.add_argument("--out", required=True)
    t = sub.add_parser("table", help="the comparison table of a run's JSON files")
    t.add_argument("--dir", required=True)
    c = sub.add_parser("cpu-table", help="benchmarks/cpu_peer.sh's table: medians over its rounds")
    c.add_argument("--dir", required=True)
    c.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.cmd == "hbm":
        r = measure_hbm()
        Path(a.out).write_text(json.dumps(r))
        print(f"HBM: {r['gbps']:.0f} GB/s device-to-device copy on {r['device']}")
    elif a.cmd == "prompt":
        if a.tokens < 2:
            p.error(f"--tokens must be at least 2, found {a.tokens}")
        text, n = make_prompt(a.tokenizer, a.tokens)
        Path(a.out).write_text(text + "\n")
        off = "" if n == a.tokens else f" (asked {a.tokens}: this vocabulary allows no closer count with these words)"
        print(f"prompt: {n} tokens{off}")
    elif a.cmd == "image-weights":
        Path(a.out).write_text(json.dumps(image_weights(a.image)))
    elif a.cmd == "cpu-table":
        print(cpu_table(Path(a.dir), a.threads))
    else:
        print(table(Path(a.dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
