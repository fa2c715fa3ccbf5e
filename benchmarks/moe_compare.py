"""The small steps of benchmarks/gpu_moe.sh (ours and llama.cpp on the same mixture-of-experts GGUF files under a
24 GB card's memory, issue 29's Acceptance) that are not a tool's own run, each a subcommand writing or reading JSON
under the run's output folder:

    python benchmarks/moe_compare.py layers --preset mixtral-8x7b --layers 32 --type q4_k_m --dir W   # what fits
    python benchmarks/moe_compare.py prompts --tokenizer IMG.tokenizer --tokens 64 --count 32 --out P.txt
    python benchmarks/moe_compare.py plan --info weights-NAME.json --image IMG --out plan-NAME.json
    python benchmarks/moe_compare.py table --dir OUT                                  # the comparison, markdown

``plan`` says how each side emulates a 24 GB card (``--cap-gb``) with a file of N of the real model's L layers:

  - llama.cpp: ``-ngl 99 --n-cpu-moe M`` keeps the experts of layers 0..M-1 in host memory (computed by the CPU)
    and everything else on the GPU but token_embd. M for the real model is the fewest layers whose experts must
    stay behind for the rest of its matrices (synth_gguf.py ``file_sizes`` of the real model: the same Q4_K_M mix
    at L layers) to fit ``--lcpp-gpu-gb`` (22 GB: the other ~2 GB of the card for its KV cache, compute buffers
    and the CUDA context); a file of N layers keeps the same share of its layers' experts on the CPU,
    M_N = N - round((L - M) N / L). llama.cpp runs on the whole GPU (nothing caps it); M is what puts it in 24 GB.
  - ours: ``--gpu-mem-gb`` (a hard cap on PyTorch's allocator; the plan fills it: runtime/engine/placement.py).
    A file of N < L layers would fit wholly, so it gets the cap minus the (L - N) / L share of what the real
    model's plan keeps resident in its layers and its KV cache (benchmarks/suite.py's ``emulated_cap``, by the
    share: every layer of a mixture is alike): the real model's group sizes are the packed file's, layer i
    taking those of a layer of the file with the same Q4_K_M mix (``use_more_bits``), its plan
    ``--mode preload`` at that batch. The file's run then holds on the GPU what the real model holds of each
    layer, and moves what it moves.

The table: per file and batch (1, 8, 32), our decode step, tokens/s, the bound from the bytes it moved (bench's
``experts.bound_moved``: H2D and disk bytes per step over the links measured in the run) and step / bound, the
experts' hit rates by tier; llama-bench's tokens/s beside (batch 1: tg; batch B > 1: ppB, a pass of B tokens of
one sequence, the nearest llama-bench has to B sequences decoding: every token routed on its own as in a batch;
its attention differs, a few per cent of a mixture's bytes); and for a file of fewer layers than the model, both
extrapolated to the whole model (x N / L on tokens/s: every layer alike, the head's share counted L / N times,
so slightly pessimistic), labelled so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.peer_compare import _f, _load, make_prompt  # noqa: E402

GB = 1e9
LABELS = {"mixtral-8x7b": "Mixtral-8x7B", "qwen3-235b-a22b": "Qwen3-235B-A22B"}
KINDS = {"q4_k_m": "Q4_K_M", "q8_0": "Q8_0", "bf16": "bf16"}


# ---- what fits the disk ---------------------------------------------------------------------------------------

def file_bytes(preset_name: str, layers: int, kind: str = "q4_k_m") -> int:
    """The matrices' bytes of a synth_gguf.py file (its GGUF, and about its packed image: blocks kept)."""
    from benchmarks.synth_gguf import file_sizes
    from model.args import preset

    s = file_sizes(preset(preset_name, layers), kind)
    return sum(s["layer_bytes"]) + sum(s["expert_bytes"]) + s["token_embd_bytes"] + s.get("output_bytes", 0)


def fitting_layers(preset_name: str, layers: int, kind: str, free: int, gguf_free: int | None = None,
                   margin: float = 3 * GB) -> int:
    """The most layers, at most ``layers``, whose GGUF and packed image fit with ``margin`` to spare: both in
    ``free`` bytes, or (``gguf_free``: the GGUF in a filesystem of its own, /dev/shm) the image in ``free`` and
    the GGUF in ``gguf_free``; 0 if not even one does."""
    n = layers
    while n > 0:
        size = file_bytes(preset_name, n, kind)
        if (2 * size + margin <= free) if gguf_free is None else (size + margin <= min(free, gguf_free)):
            break
        n -= 1
    return n


# ---- how each side emulates the card --------------------------------------------------------------------------

def n_cpu_moe(sizes: dict, gpu_bytes: float) -> int:
    """llama.cpp's --n-cpu-moe M for a file of ``sizes`` (synth_gguf.py ``file_sizes``): the fewest first layers
    whose experts stay in host memory for the other matrices (token_embd stays there anyway) to fit ``gpu_bytes``."""
    rest = sizes.get("output_bytes", 0) + sum(sizes["layer_bytes"])
    experts = sizes["expert_bytes"]
    for m in range(len(experts) + 1):
        if rest + sum(experts[m:]) <= gpu_bytes:
            return m
    return len(experts)


def lcpp_gpu_bytes(sizes: dict, m: int) -> int:
    return sizes.get("output_bytes", 0) + sum(sizes["layer_bytes"]) + sum(sizes["expert_bytes"][m:])


def whole_model_sizes(image, full_layers: int) -> dict[str, int]:
    """Group sizes of the real model (``full_layers``) from a packed file of fewer: layer i's groups take the sizes
    of a layer j of the file whose Q4_K_M mix is the same (``use_more_bits``: attn_v and ffn_down's more bits),
    else layer i mod N."""
    from benchmarks.synth_gguf import use_more_bits
    from model.groups import LAYER_PREFIX

    n = image.args.n_layers
    like = {}
    for i in range(full_layers):
        same = [j for j in range(n) if use_more_bits(j, n) == use_more_bits(i, full_layers)]
        like[i] = same[i % len(same)] if same else i % n
    out = {}
    for name, g in image.groups.items():
        if not name.startswith(LAYER_PREFIX):
            out[name] = g.size
    for i in range(full_layers):
        for name, g in image.groups.items():
            if name.startswith(f"{LAYER_PREFIX}{like[i]}."):
                out[f"{LAYER_PREFIX}{i}." + name.split(".", 2)[2]] = g.size
    return out


def emulated_cap(image, full_layers: int, cap_gb: float, batch: int, max_len: int) -> dict:
    """Our --gpu-mem-gb for ``image`` (N layers of a model of ``full_layers``) at ``batch`` x ``max_len``: the cap
    less the (L - N) / L share of what the real model's preload plan under ``cap_gb`` keeps resident in its layers,
    and of its KV cache. The cap itself where the file is the whole model."""
    import dataclasses

    from model.groups import LAYER_PREFIX
    from runtime.engine.batching import activation_bytes, kv_cache_bytes
    from runtime.engine.placement import Budgets, plan_placement

    n = image.args.n_layers
    if n >= full_layers:
        return {"gpu_mem_gb": cap_gb, "emulated": False}
    args = dataclasses.replace(image.args, n_layers=full_layers)
    whole = types.SimpleNamespace(args=args, dtype=image.dtype)
    kv = kv_cache_bytes(whole, batch, max_len)
    act = activation_bytes(image, batch, max_len)
    sizes = whole_model_sizes(image, full_layers)
    plan = plan_placement(sizes, args, "preload", Budgets(int(cap_gb * GB), 1 << 50, kv, act))
    resident = sum(sizes[g] for g in plan.gpu if g.startswith(LAYER_PREFIX))
    cap = cap_gb - (1 - n / full_layers) * (resident + kv) / GB
    return {"gpu_mem_gb": round(cap, 3), "emulated": True, "whole_resident_layer_bytes": resident,
            "whole_kv_bytes": kv, "whole_gpu_experts": sum(g in plan.gpu for g in plan.routed),
            "whole_experts": len(plan.routed)}


def make_plan(info: dict, preset_name: str, kind: str, image_path: str | None, cap_gb: float, lcpp_gb: float,
              batches: list[int], max_len: int) -> dict:
    from benchmarks.synth_gguf import file_sizes
    from model.args import PRESETS, preset

    full = PRESETS[preset_name]["n_layers"]
    n = info["n_layers"]
    whole_args = preset(preset_name, full)
    if info.get("tiny"):  # the dry run's shapes (synth_gguf.py --tiny): the real model's layer count, tiny layers
        from benchmarks.synth_gguf import tiny_shape

        whole_args = tiny_shape(whole_args)
    whole = file_sizes(whole_args, kind)
    m_full = n_cpu_moe(whole, lcpp_gb * GB)
    m = m_full if n >= full else n - round((full - m_full) * n / full)
    m = max(0, min(n, m))
    out = {"preset": preset_name, "type": kind, "layers": n, "full_layers": full, "cap_gb": cap_gb,
           "lcpp_gpu_gb": lcpp_gb, "n_cpu_moe_full": m_full, "n_cpu_moe": m,
           "lcpp_gpu_bytes_full": lcpp_gpu_bytes(whole, m_full), "lcpp_gpu_bytes": lcpp_gpu_bytes(info, m),
           "full_bytes": sum(whole["layer_bytes"]) + sum(whole["expert_bytes"]) + whole["token_embd_bytes"]
           + whole.get("output_bytes", 0), "max_len": max_len, "caps": {}}
    if image_path:
        from runtime.format.image import Image

        image = Image.open(image_path)
        out["caps"] = {str(b): emulated_cap(image, full, cap_gb, b, max_len) for b in batches}
    return out


# ---- the table ----------------------------------------------------------------------------------------------

def lcpp_by_batch(rows: list[dict]) -> dict[int, float]:
    """{batch: tokens/s} from llama-bench's JSON rows: tg (n_gen > 0) as batch 1, ppB as batch B."""
    out = {}
    for r in rows:
        if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            out[1] = r["avg_ts"]
        elif r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0:
            out[int(r["n_prompt"])] = r["avg_ts"]
    return out


def ours_row(rep: dict) -> dict:
    steps = rep["decode_tokens_total"] / rep["batch_size"] if rep["batch_size"] else 0
    ex = rep.get("experts") or {}
    mb = ex.get("bound_moved") or {}
    step = rep["decode_ms"] / steps if steps else None
    return {"step_ms": step, "tok_s": rep["decode_tokens_total"] / rep["decode_ms"] * 1e3 if rep["decode_ms"] else None,
            "bound_ms": mb.get("step_ms"), "bound_by": mb.get("limited_by"),
            "ratio": step / mb["step_ms"] if step and mb.get("step_ms") else None,
            "hits": ex.get("hit_rate") or {}}


def _hits(h: dict) -> str:
    return "/".join(_f(h.get(t) * 100 if h.get(t) is not None else None, ".0f") for t in ("gpu", "dram", "disk"))


def table_rows(d: Path) -> list[list[str]]:
    rows = []
    for plan_path in sorted(d.glob("plan-*.json")):
        name = plan_path.stem.removeprefix("plan-")
        plan, w = _load(plan_path) or {}, _load(d / f"weights-{name}.json") or {}
        n, full = plan.get("layers"), plan.get("full_layers")
        scale = n / full if n and full and n < full else None
        lc = lcpp_by_batch(_load(d / f"lcpp-{name}.json") or [])
        label = (f"{LABELS.get(plan.get('preset'), plan.get('preset'))}-shaped x{n}"
                 f"{'/' + str(full) if scale else ''} {KINDS.get(plan.get('type'), plan.get('type'))} "
                 f"{w.get('bytes', 0) / GB:.1f} GB")
        batches = sorted({int(p.stem.rsplit("-b", 1)[1]) for p in d.glob(f"ours-{name}-b*.json")} | set(lc))
        for b in batches:
            rep = _load(d / f"ours-{name}-b{b}.json")
            o = ours_row(rep) if rep else {}
            cap = ((plan.get("caps") or {}).get(str(b)) or {}).get("gpu_mem_gb")
            ltest = "tg" if b == 1 else f"pp{b}"
            lt = lc.get(b)
            rows.append([label, str(b), _f(cap, ".2f"), _f(o.get("step_ms"), ".1f"), _f(o.get("tok_s")),
                         _f(o.get("bound_ms"), ".1f") + (f" ({o['bound_by']})" if o.get("bound_by") else ""),
                         _f(o.get("ratio"), ".2f"), _hits(o.get("hits") or {}),
                         f"{_f(lt)} ({ltest}, -ncmoe {plan.get('n_cpu_moe')})" if lt else "-",
                         _f(o["tok_s"] / lt if lt and o.get("tok_s") else None, ".2f"),
                         _f(o["tok_s"] * scale if scale and o.get("tok_s") else None),
                         _f(lt * scale if scale and lt else None)])
    return rows


HEADER = ["file", "batch", "ours GPU cap GB", "ours step ms", "ours tok/s", "bound ms (moved)", "step/bound",
          "expert hits % gpu/dram/disk", "llama.cpp tok/s", "ours/llama.cpp", "whole model ours tok/s (extrap.)",
          "whole model llama.cpp tok/s (extrap.)"]


def table(d: Path) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(d)]
    notes = []
    for plan_path in sorted(d.glob("plan-*.json")):
        p = _load(plan_path) or {}
        if not p:
            continue
        caps = ", ".join(f"b{b} {c['gpu_mem_gb']:.2f}" for b, c in (p.get("caps") or {}).items())
        emu = any(c.get("emulated") for c in (p.get("caps") or {}).values())
        notes.append(f"{plan_path.stem.removeprefix('plan-')}: {p['layers']} of {p['full_layers']} layers; ours "
                     f"--mode preload --gpu-mem-gb {caps or '-'}"
                     f"{' (emulated: the card less the share of the missing layers)' if emu else ''}; llama.cpp "
                     f"-ngl 99 --n-cpu-moe {p['n_cpu_moe']} (whole model: {p['n_cpu_moe_full']} of {p['full_layers']}"
                     f", GPU weights {p['lcpp_gpu_bytes_full'] / GB:.1f} GB <= {p['lcpp_gpu_gb']} GB; this file "
                     f"{p['lcpp_gpu_bytes'] / GB:.1f} GB)")
    notes += ["bound (moved): a decode step's bytes as moved in the run (H2D: the DRAM tier's non-expert groups and "
              "the experts chosen; disk: what the pool read) over the links measured in the same run; the target "
              "is step/bound <= 1.15",
              "llama.cpp at batch B > 1: ppB, one sequence's pass of B tokens (llama-bench has no batch of "
              "sequences decoding); every token routed on its own, as in our batch",
              "whole model: a file of fewer layers scaled by N / L on tokens/s (every layer alike), EXTRAPOLATED, "
              "not measured"]
    return "\n".join(lines + [""] + notes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("layers", help="the most layers (at most --layers) whose GGUF and image fit --dir's disk")
    f.add_argument("--preset", required=True)
    f.add_argument("--layers", type=int, required=True)
    f.add_argument("--type", default="q4_k_m")
    f.add_argument("--dir", required=True, help="where the image goes")
    f.add_argument("--gguf-dir", help="where the GGUF goes, when not --dir: prints the layers and the folder, "
                                      "this one where it holds the GGUF, else --dir")
    f.add_argument("--margin-gb", type=float, default=3.0)
    q = sub.add_parser("prompts", help="--count prompts of --tokens tokens each, one a line")
    q.add_argument("--tokenizer", required=True, help="a packed image's tokenizer folder (IMAGE.tokenizer)")
    q.add_argument("--tokens", type=int, default=64)
    q.add_argument("--count", type=int, default=32)
    q.add_argument("--out", required=True)
    a = sub.add_parser("plan", help="llama.cpp's --n-cpu-moe and our --gpu-mem-gb for a file")
    a.add_argument("--info", required=True, help="synth_gguf.py --info-json of the file")
    a.add_argument("--image", help="the file packed (for our emulated cap; without it, llama.cpp's side only)")
    a.add_argument("--cap-gb", type=float, default=24.0)
    a.add_argument("--lcpp-gpu-gb", type=float, default=22.0)
    a.add_argument("--batches", default="1,8,32")
    a.add_argument("--max-len", type=int, default=96, help="a bench's longest prompt + new tokens")
    a.add_argument("--out", required=True)
    t = sub.add_parser("table", help="the comparison table of a run's JSON files")
    t.add_argument("--dir", required=True)
    ns = p.parse_args(argv)
    if ns.cmd == "layers":
        free, margin = shutil.disk_usage(ns.dir).free, ns.margin_gb * GB
        n = fitting_layers(ns.preset, ns.layers, ns.type, free, None, margin)
        if ns.gguf_dir:  # the GGUF elsewhere (RAM) where that holds more layers
            other = fitting_layers(ns.preset, ns.layers, ns.type, free, shutil.disk_usage(ns.gguf_dir).free, margin)
            print(*((other, ns.gguf_dir) if other > n else (n, ns.dir)))
        else:
            print(n)
    elif ns.cmd == "prompts":
        if ns.tokens < 2 or ns.count < 1:
            p.error(f"--tokens must be at least 2 and --count at least 1, found {ns.tokens} and {ns.count}")
        from model.tokenizer import load_tokenizer

        tok = load_tokenizer(ns.tokenizer)
        lines = [make_prompt(tok, ns.tokens, seed=i)[0] for i in range(ns.count)]
        Path(ns.out).write_text("\n".join(lines) + "\n")
        print(f"prompts: {ns.count} of ~{ns.tokens} tokens")
    elif ns.cmd == "plan":
        info = json.loads(Path(ns.info).read_text())
        r = make_plan(info, info["preset"], info["type"], ns.image, ns.cap_gb, ns.lcpp_gpu_gb,
                      [int(b) for b in ns.batches.split(",")], ns.max_len)
        Path(ns.out).write_text(json.dumps(r, indent=1))
        caps = ", ".join(f"batch {b}: {c['gpu_mem_gb']:.2f} GB" for b, c in r["caps"].items())
        print(f"{info['preset']} x{r['layers']} of {r['full_layers']}: llama.cpp -ngl 99 --n-cpu-moe {r['n_cpu_moe']} "
              f"(whole model {r['n_cpu_moe_full']}: GPU weights {r['lcpp_gpu_bytes_full'] / GB:.1f} GB); ours "
              f"--gpu-mem-gb {caps or '(no image)'}")
    else:
        print(table(Path(ns.dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
