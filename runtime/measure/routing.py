"""``probe --experts FILE``: how often each expert of a mixture is routed on real text, kept beside the image
(``IMAGE.expert-counts.json``, where the placement looks for it: runtime/engine/source.py ``expert_counts_file``),
so that the tiers take the most used experts first (issue 29 item 2), and the plan that follows from them.

    python launch.py probe --image mixtral.img --experts wiki.txt --gpu-mem-gb 24

FILE is text, tokenized with the image's tokenizer (an image without one: lines of comma-separated token ids, as
bench's prompts); its first ``--experts-tokens`` tokens run through the model in windows of ``--experts-window``
tokens, each window a fresh context of prefill passes (every token routed on its own, as in a batch of decode
steps), with whichever weight source the probe's budgets plan (``--gpu-mem-gb``, ``--dram-gb``: the model need
not fit; its experts are fetched as a run fetches them). Each pass's layer routings are counted per expert: the
pass calls the source's ``tally`` with the layer's ``Routing.bounds`` (model/passes.py ``forward_groups``), the
counts of the tokens that chose each expert. The file written holds ``{"counts": [per layer, per expert],
"tokens", "text", "window"}`` (``read_expert_counts`` reads the counts and ignores the rest).

Printed: the tokens counted, how concentrated the routing is (the share of routings the most used quarter of each
layer's experts took, against a quarter when uniform), and the plan for the budgets given with the expected bytes
per token by tier from those counts, beside the plan from uniform routing (runtime/engine/placement.py
``Plan.describe``). Runs in the launch.py process; owns the weight source it opens (and its pool), closed before
it returns.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from model.errors import ConfigError, UserError
from runtime.engine.config import EngineConfig
from runtime.engine.placement import Plan, expert_counts_path
from runtime.format.image import Image


class RoutingCounter:
    """A weight source (any: it delegates everything) that counts, per layer and expert, the tokens each pass routed
    to the expert: ``forward_groups`` calls ``tally`` once a layer has routed."""

    def __init__(self, source, n_layers: int, n_experts: int) -> None:
        self.source = source
        self.counts = [[0] * n_experts for _ in range(n_layers)]

    def __getattr__(self, name: str):
        return getattr(self.source, name)

    def tally(self, layer: int, bounds) -> None:
        row = self.counts[layer]
        for e in range(len(row)):
            row[e] += bounds[e + 1] - bounds[e]


def text_tokens(image: Image, path: str) -> list[int]:
    """FILE's tokens: the text tokenized with the image's tokenizer, or (an image without one) its lines of
    comma-separated token ids, joined."""
    from runtime.format.tokens import image_tokenizer

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"--experts {path}: cannot read it ({e})") from None
    tok = image_tokenizer(image, required=False)
    if tok is not None:
        return tok.encode(text)
    try:
        ids = [int(x) for line in text.splitlines() if line.strip() for x in line.split(",")]
    except ValueError:
        raise UserError(f"--experts {path}: {image.path} has no tokenizer, so the file must hold lines of "
                        f"comma-separated token ids") from None
    bad = [t for t in ids if not 0 <= t < image.args.vocab_size]
    if bad:
        raise UserError(f"--experts {path}: token id {bad[0]} outside the vocabulary (0..{image.args.vocab_size - 1})")
    return ids


def count_routings(image: Image, tokens: list[int], cfg: EngineConfig, device: torch.device,
                   window: int) -> list[list[int]]:
    """Per layer and expert, the tokens of ``tokens`` routed to it, run in windows of ``window`` tokens through the
    weight source ``cfg`` plans on ``device``."""
    from runtime.engine.generate import Generator
    from runtime.engine.source import open_source

    a = image.args
    with open_source(image, cfg, device, batch=1, max_len=window) as (source, _, _):
        counter = RoutingCounter(source, a.n_layers, a.n_experts)
        gen = Generator(counter, window)
        for start in range(0, len(tokens), window):
            chunk = torch.tensor([tokens[start:start + window]], device=device)
            gen.forward(chunk, 0, gen.new_cache(1), last_only=True)
    return counter.counts


def concentration(counts: list[list[int]]) -> float:
    """The mean over layers of the share of routings the most used quarter of the layer's experts took."""
    shares = []
    for row in counts:
        top = sorted(row, reverse=True)[:max(1, len(row) // 4)]
        shares.append(sum(top) / sum(row) if sum(row) else 0.0)
    return sum(shares) / len(shares)


def plan_of(image: Image, cfg: EngineConfig, device: torch.device) -> tuple[Plan | None, str | None]:
    """The plan of a batch-1 run of ``cfg``'s budgets (its experts ranked by IMAGE.expert-counts.json where that
    exists), or None and why not."""
    from runtime.engine.source import planned

    try:
        return planned(image, cfg, device, 1, 2048, cfg.prefill.chunk, False)[0], None
    except ConfigError as e:
        return None, str(e)


def measure_experts(image: Image, text: str, cfg: EngineConfig, device: torch.device, max_tokens: int,
                    window: int) -> dict[str, Any]:
    """Count the routings on ``text`` (at most ``max_tokens`` tokens), write them to IMAGE.expert-counts.json and
    return what was written, with where and how concentrated."""
    a = image.args
    if not a.n_experts:
        raise ConfigError(f"probe --experts: {image.path} is a {a.arch} model, which has no experts")
    tokens = text_tokens(image, text)[:max_tokens]
    if not tokens:
        raise UserError(f"--experts {text}: no tokens")
    counts = count_routings(image, tokens, cfg, device, window)
    path = expert_counts_path(str(image.path))
    rec = {"counts": counts, "tokens": len(tokens), "text": str(text), "window": window}
    Path(path).write_text(json.dumps(rec))
    return {**rec, "path": path, "concentration": concentration(counts)}


def run_expert_probe(cfg) -> int:
    """``probe --image IMG --experts FILE`` (``cfg``: runtime/measure/probe.py ProbeConfig): count, keep, print the
    plan before and after; the JSON with --out-json."""
    from runtime.engine.generate import pick_device

    image = Image.open(cfg.image, cfg.manifest)
    device = pick_device(cfg.device)
    ecfg = EngineConfig.of(quiet=True, gpu_mem_gb=cfg.gpu_mem_gb, dram_gb=cfg.dram_gb)
    before, _ = plan_of(image, ecfg, device)
    rec = measure_experts(image, cfg.experts, ecfg, device, cfg.experts_tokens, cfg.experts_window)
    after, why = plan_of(image, ecfg, device)
    a = image.args
    print(f"experts: {rec['tokens']} tokens of {cfg.experts} routed through {a.n_layers} layers x {a.n_experts} "
          f"experts (top {a.n_experts_used}) on {device}, in windows of {cfg.experts_window}; the most used quarter "
          f"of a layer's experts took {rec['concentration']:.0%} of its routings (uniform: 25%)")
    print(f"written to {rec['path']}: the placement ranks the experts by it (--expert-counts overrides it)")
    if before is not None:
        print(f"before ({before.routing_from}): " + _expected_line(before))
    if after is not None:
        print(after.describe())
    else:
        print(f"no plan for these budgets: {why}")
    if cfg.out_json:
        Path(cfg.out_json).write_text(json.dumps({
            "experts": {k: v for k, v in rec.items() if k != "counts"}, "counts": rec["counts"],
            "plan_before": None if before is None else before.to_dict(),
            "plan": None if after is None else {**after.to_dict(), "describe": after.describe()},
            "plan_error": why, "flags": dataclasses.asdict(cfg)}, indent=1))
        print(f"JSON written to {cfg.out_json}")
    return 0


def _expected_line(plan: Plan) -> str:
    t = plan.expert_tiers()
    return ", ".join(f"{n} {t[n]['expected_per_pass']:.2f} experts ({t[n]['expected_bytes_per_pass'] / 1e6:.1f} MB)"
                     for n in ("gpu", "dram", "disk")) + " a token"
