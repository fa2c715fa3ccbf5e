"""The command line: one argparse parser per command, every default taken from the config class the flag
belongs to (``CONFIGS`` names them per command), so that a default is defined once, in that class.

``arg(parser, "--flag", Config, ...)`` adds a flag whose default is ``Config.flag_default(dest)``; help texts
say ``%(default)s``. ``build_parser()`` is launch.py's parser; ``configs(ns)`` turns a parsed namespace into
the command's configs (runtime/cli/commands.py). This package is the only code that reads a namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from model.qformats import GROUP_SIZES
from runtime.cli.configs import (
    DTYPES,
    SHAPES,
    ImageRef,
    PackConfig,
    PerplexityConfig,
    PoolCleanupConfig,
    PoolListConfig,
    PoolStatusConfig,
    PoolStopConfig,
    RunConfig,
)
from runtime.engine.config import MODES, EngineConfig, SamplingConfig
from runtime.format.image import QUANTIZERS
from runtime.measure.bench import BenchConfig
from runtime.measure.probe import ProbeConfig
from runtime.services.pools import PoolStartConfig
from runtime.services.server import ServeConfig

DESCRIPTION = "The one entry point: pack images, run, measure perplexity, verify, benchmark, probe, pools."
# The config classes each command's flags come from, by command path ("run", "pool start", ...).
CONFIGS: dict[str, tuple[type, ...]] = {
    "pack": (PackConfig,), "run": (EngineConfig, SamplingConfig, RunConfig),
    "perplexity": (EngineConfig, PerplexityConfig), "bench": (EngineConfig, BenchConfig), "probe": (ProbeConfig,),
    "verify": (ImageRef,), "pool start": (PoolStartConfig,), "pool serve": (ServeConfig, EngineConfig),
    "pool stop": (PoolStopConfig,), "pool list": (PoolListConfig,), "pool status": (PoolStatusConfig,),
    "pool cleanup": (PoolCleanupConfig,), "serve": (ServeConfig, EngineConfig, PoolStartConfig),
}


def arg(p, flag: str, cls: type, *names: str, **kw) -> argparse.Action:
    """``p.add_argument(flag, *names, default=cls's default for the flag, **kw)``."""
    dest = kw.get("dest") or flag.lstrip("-").replace("-", "_")
    default = cls.flag_default(dest)
    if default is not dataclasses.MISSING and "default" not in kw:
        kw["default"] = default
    return p.add_argument(flag, *names, **kw)


def _host_layers(text: str) -> int | str:
    if text == "all":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of layers (1 or more) or all, found {text!r}")
    return n


def _image_args(p, cls: type, required: bool = False) -> None:
    arg(p, "--image", cls, required=required,
        help="packed image: a file or a block device" +
        ("" if required else " (default: the embedded SmolLM2-135M-Instruct, packed once into the cache)"))
    arg(p, "--manifest", cls, help="the image's manifest (default: IMAGE.manifest.json; required for block devices)")


def _device_arg(p, cls: type) -> None:
    arg(p, "--device", cls, choices=["cpu", "cuda"],
        help="where the model computes (default: cuda if available, else cpu)")


def _tensor_parallel_args(p, cls: type) -> None:
    arg(p, "--tensor-parallel", cls, type=int, metavar="N",
        help="split every group across N ranks, one process per device (gloo on the CPU, NCCL on CUDA), each "
             "streaming its 1/N of every group over its own link from one pool; the model's KV heads must divide "
             "by N (default %(default)s: this process alone)")
    arg(p, "--devices", cls, metavar="I,J,...",
        help="with --tensor-parallel N --device cuda: the N GPUs, one per rank (default 0..N-1)")


def _runtime_args(p) -> None:
    E = EngineConfig
    g = p.add_argument_group("placement and streaming (docs/DESIGN.md, placement)")
    arg(g, "--mode", E, choices=list(MODES),
        help="full: every group loaded onto the device (the in-memory reference); preload: every group not on the "
             "GPU pinned in the DRAM tier; stream: no DRAM tier, everything not on the GPU read from disk every "
             "pass; mixed (default): GPU tier, then DRAM tier, then stream, from the budgets below")
    arg(g, "--gpu-mem-gb", E, type=float, help="GPU budget in GB (1e9 bytes) for resident groups, KV cache, "
                                               "activations and staging (default: the GPU's free memory)")
    arg(g, "--dram-gb", E, type=float, help="DRAM budget in GB for the shared ring: DRAM tier + window "
                                            "(default: 80%% of available memory)")
    arg(g, "--gpu-cached-layers", E, type=int, help="keep exactly layers 0..N-1 on the GPU (overrides the GPU "
                                                    "budget's choice)")
    arg(g, "--cpu-cache-layers", E, type=int, help="keep exactly the next M layers in the DRAM tier")
    arg(g, "--prefetch-distance", E, type=int,
        help="window slots: how many streamed groups are read ahead of use (default 2 x depth)")
    arg(g, "--group-prefetch-depth", E, type=int,
        help="GPU staging buffers: copies run up to this many groups ahead of compute (default %(default)s)")
    arg(g, "--cpu-compute", E, metavar="off|auto|N",
        help="on CUDA, DRAM-tier groups of a stateless kind (a dense model's FFN) that the CPU computes in place "
             "from the ring in passes of a few tokens, instead of copying them over the link: N such groups, or "
             "auto: as many as make the link and the CPU finish together, from their rates measured at the start; "
             "spread over the pass; passes of many tokens copy them as before (default %(default)s)")
    arg(g, "--expert-counts", E, metavar="FILE",
        help="a mixture of experts: how often each expert was routed on some text, JSON {\"counts\": [per layer, "
             "per expert]}; the tiers take the most used experts first (default: IMAGE.expert-counts.json beside "
             "the image when present, else every expert alike)")
    arg(g, "--expert-prefetch", E, type=int, metavar="N",
        help="a mixture of experts: while a layer computes, read up to N of the next layer's disk-tier experts that "
             "its router, applied a layer early, guesses (the chosen ones are used, the others dropped); bounded by "
             "the pool's demand slots less one, no memory of its own; 0: none (default %(default)s)")
    arg(g, "--workers", E, type=int, help="I/O worker processes (default %(default)s; at most 2 per core and what "
                                          "the disk's request queue holds at 16 reads each)")
    arg(g, "--staging-mb", E, type=int,
        help="each group read is split into chunks of this many MiB, read in parallel (default %(default)s)")
    arg(g, "--threads", E, type=int, metavar="N",
        help="CPU compute threads of this run (default: the cores shared evenly by the runs computing on this "
             "machine's CPU at the time, recounted as they come and go)")
    arg(g, "--cuda-graphs", E, choices=["on", "off"],
        help="on (default): on CUDA, where the KV cache is the device's own (not offloaded, no --topk-blk), each "
             "decode step replays a CUDA graph instead of launching its kernels from Python (--mode full: one "
             "per step; streamed modes: one per group, replayed once its copy has landed), captured on first use "
             "per batch size and KV length, in buckets of powers of two from 256 slots; one host sync per token; "
             "off: every step launched eagerly")
    arg(g, "--attach", E, metavar="NAME",
        help="use the running daemon pool NAME (launch.py pool start) instead of starting a private pool: nothing "
             "is read from disk that the pool holds; the image defaults to the pool's, the GPU tier comes from "
             "--gpu-mem-gb; --mode, --dram-gb, --cpu-cache-layers, --prefetch-distance and --trace do not apply")
    arg(g, "--trace", E, metavar="FILE",
        help="write a Chrome trace-event JSON of the run to FILE (open it in ui.perfetto.dev or chrome://tracing; "
             "benchmarks/render_trace.py draws it): each I/O worker's disk reads, each H2D copy and each group's "
             "compute, on one clock")


def _no_server_arg(p, cls: type) -> None:
    arg(p, "--no-server", cls, action="store_true",
        help="with --attach: run the model in this process even when the pool has a server (launch.py pool "
             "serve); by default a run attached to a serving pool hands its prompt to the server")


def _kv_args(p) -> None:
    E = EngineConfig
    g = p.add_argument_group("KV cache")
    arg(g, "--kv-block-tokens", E, type=int,
        help="KV cache block size in tokens: the unit of KV moves and of --topk-blk (default %(default)s)")
    arg(g, "--kv-offload", E, choices=["auto", "on", "off"],
        help="on: keep the KV cache in (pinned) DRAM and bring each layer's blocks to the GPU before its "
             "attention, overlapped with compute; auto (default): when the GPU budget cannot hold the whole KV "
             "cache, or when keeping it there would push more weight bytes over the link per step than offloading "
             "moves; off: never")
    arg(g, "--host-attention", E, nargs="?", const="all", type=_host_layers, metavar="N|all",
        help="with the KV cache offloaded: decode attention of N layers (spread evenly; all when no N is given) "
             "runs on the CPU over the DRAM cache (as FlexGen), so their cache never crosses the H2D link while "
             "decoding: each such layer sends its new query, key and value to the host and gets the attention "
             "output back. The other layers' cache is read back over the link as without the flag, so N balances "
             "the CPU's share of the step's KV bytes against the link's (--kv-offload auto counts only theirs). "
             "Prefill attention stays on the GPU. Not with --topk-blk")
    arg(g, "--prefill-chunk", E, type=int,
        help="prompt tokens per weight pass, shared by the sequences of a batch (default %(default)s; at least 16 "
             "per sequence): the plan keeps GPU room for one chunk's activations. A larger chunk means fewer "
             "passes to prefill a big batch, and less room for the GPU tier")
    arg(g, "--prefill-by-sequence", E, action=argparse.BooleanOptionalAction,
        help="with the KV cache offloaded: prefill a batch whole prompts at a time, as many sequences per weight "
             "pass as --prefill-chunk tokens hold, instead of a slice of every sequence per pass, so nothing is "
             "read back between passes (chunked across the batch, each pass reads the batch's written KV back "
             "over the link: 560 GB for 70B-shaped batch 128 x 2048); with --host-attention all the GPU then "
             "keeps KV buffers for one pass's prompts instead of the batch's. Default: whole prompts when that "
             "takes no more weight passes, and always with --host-attention all; --no-prefill-by-sequence: always "
             "chunked across the batch")
    arg(g, "--topk-blk", E, type=int,
        help="approximate decode attention: per KV head only the K best blocks (scored from per-block key "
             "min/max, as in Quest) plus the first block and the 2 most recent; off by default (exact attention)")


def _draft_args(p, server: bool = False) -> None:
    E = EngineConfig
    batch = ("a server decodes from trees while its batch holds one sequence, and plainly, sharing passes, while "
             "it holds more" if server else "One sequence at a time (no --batch-size above 1)")
    g = p.add_argument_group("speculative decoding (runtime/engine/speculative.py)")
    arg(g, "--draft", E, metavar="IMAGE|ngram",
        help="speculative decoding, exact: a draft proposes a tree of continuations and one weight pass of the "
             "model verifies all of it, keeping the longest path the model's own choice agrees with (greedy: the "
             "same tokens as without a draft; sampled: the same distribution). IMAGE: a small packed model with "
             "the same tokenizer, held wholly on the device and reserved first in the GPU budget (the plan shows "
             "it); ngram: continuations of where the text's last tokens occurred before (no model). " + batch +
             "; not with --topk-blk")
    arg(g, "--draft-tokens", E, type=int, metavar="N",
        help="tree nodes verified per weight pass, the last accepted token included, at most --prefill-chunk "
             "(default: chosen during the run: every 8 passes half and twice the size are tried against it and the "
             "one that has given the most tokens a second is kept, starting at 8 for ngram and on the CPU, 32 for a "
             "model draft on CUDA; the run prints its choices)")


def _sampling_args(p, cls: type) -> None:
    arg(p, "--temperature", cls, type=float, help="sampling temperature; 0 is greedy (default)")
    arg(p, "--top-p", cls, type=float, help="nucleus sampling mass (default %(default)s)")
    arg(p, "--seed", cls, type=int, help="sampling seed (default %(default)s)")


def _pack_parser(sub) -> None:
    C = PackConfig
    p = sub.add_parser("pack", help="pack a checkpoint (or synthetic weights) into a runtime image",
                       description="Pack a Meta directory, a Hugging Face directory or a .gguf file into one image: "
                                   "a 4 KiB header, then every group as one aligned, checksummed extent. Written "
                                   "beside the target and renamed into place once verified: a failed or killed "
                                   "pack leaves an existing image as it was.")
    src = p.add_mutually_exclusive_group(required=True)
    arg(src, "--checkpoint", C, help="Meta dir (params.json + consolidated.*.pth), HF dir (config.json + "
                                     "*.safetensors) or a .gguf file")
    arg(src, "--synthetic", C, choices=list(SHAPES), help="random weights (never zeros) in a published shape, for "
                                                          "benchmarks")
    arg(p, "--layers", C, type=int, help="with --synthetic: number of layers (default: the shape's own)")
    arg(p, "--seed", C, type=int, help="with --synthetic: random seed (default %(default)s)")
    arg(p, "--tensor-parallel", C, type=int, metavar="N",
        help="store each group as N contiguous shards, one per rank of run --tensor-parallel N (image format 3; "
             "plain dtypes only; default %(default)s: one piece)")
    arg(p, "--out", C, required=True, help="image to write: a regular file or a block device")
    arg(p, "--manifest", C, help="manifest path (default OUT.manifest.json; required for a block device)")
    arg(p, "--dtype", C, choices=list(DTYPES),
        help="dtype of every tensor not quantized, and of the compute (default bf16); given alone, a GGUF's "
             "quantized tensors are dequantized to it")
    arg(p, "--keep-blocks", C, action="store_true",
        help="keep a GGUF's quantized tensors in their ggml blocks (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, "
             "q6_k; the default unless --dtype is given); other types are dequantized and the pack says which")
    arg(p, "--quantize", C, choices=list(QUANTIZERS),
        help="quantize every attention and FFN matrix not kept in blocks: int8 (symmetric) or int4 (scale and "
             "minimum) per group of --group-size values of a row, or gguf's q8_0 / q4_0 / q4_1; norms and the "
             "embedding stay in --dtype")
    arg(p, "--group-size", C, type=int, choices=list(GROUP_SIZES),
        help="with --quantize int8|int4: values per scale along a row (default %(default)s)")
    arg(p, "--quantize-output", C, action="store_true", help="with --quantize: the output matrix too")
    arg(p, "--device", C, choices=["cpu", "cuda"],
        help="where --quantize int8|int4 runs its clipping search (default: cuda when there is one)")
    arg(p, "--force", C, action="store_true",
        help="write to a block device that holds a partition table (never overrides 'mounted' or 'too small')")
    arg(p, "--no-verify", C, action="store_true",
        help="skip reading the new image back to check every group's crc32 before it replaces the old one (the "
             "header and layout are still checked)")
    arg(p, "--quiet", C, action="store_true", help="no progress lines")


def _run_parser(sub) -> None:
    C = RunConfig
    p = sub.add_parser("run", help="generate text", description="Generate from a packed image.")
    _image_args(p, C)
    prompt = p.add_mutually_exclusive_group()
    arg(prompt, "--prompt", C, help="prompt text (default with no image: a chat question)")
    arg(prompt, "--prompt-ids", C, help="prompt as comma-separated token ids, e.g. 1,2,3")
    arg(prompt, "--prompts", C, metavar="FILE",
        help="many prompts, one per non-empty line (text, or comma-separated token ids for an image without a "
             "tokenizer), run --batch-size at a time; --out-json gets a list 'results' in input order")
    arg(p, "--batch-size", C, type=int, help="with --prompts: sequences that share every weight pass (default "
                                             "%(default)s)")
    arg(p, "--chat", C, action="store_true", help="wrap the prompt in the model's chat template")
    arg(p, "--max-new-tokens", SamplingConfig, type=int, help="tokens to generate at most (default %(default)s)")
    arg(p, "--max-seq-len", C, type=int, help="context length to allocate the KV cache for (default: prompt + new "
                                              "tokens)")
    _sampling_args(p, SamplingConfig)
    _device_arg(p, C)
    _tensor_parallel_args(p, C)
    arg(p, "--out-json", C, help="write prompt/output token ids, text and timings to this JSON file")
    arg(p, "--verbose", C, action="store_true", help="also print, for a mixture of experts, where the experts the "
                                                     "run fetched came from (the GPU, DRAM and disk tiers' hit "
                                                     "rates) and how often the prefetch guess was right")
    arg(p, "--quiet", EngineConfig, action="store_true", help="print only the generated text")
    _runtime_args(p)
    _no_server_arg(p, C)
    _kv_args(p)
    _draft_args(p)


def _perplexity_parser(sub) -> None:
    C = PerplexityConfig
    p = sub.add_parser("perplexity", help="perplexity of a text file",
                       description="Perplexity over consecutive non-overlapping windows of N tokens.")
    _image_args(p, C)
    arg(p, "--text-file", C, required=True, help="UTF-8 text to score")
    arg(p, "--context", C, type=int, help="window length in tokens (default %(default)s)")
    _device_arg(p, C)
    arg(p, "--out-json", C, help="write perplexity and token count to this JSON file")
    _runtime_args(p)


def _bench_parser(sub) -> None:
    C = BenchConfig
    p = sub.add_parser("bench", help="time a generation against the transfer bound (docs/DESIGN.md, the cost model)",
                       description="Time prefill and decode, print the summary block plus the plan, bytes per "
                                   "token, achieved GB/s per link and achieved / bound; accepts the original bench "
                                   "specification's command line verbatim (runtime/measure/bench.py).")
    _image_args(p, C)
    arg(p, "--raw-device", C, help="the image on a raw block device (or file); give its --manifest")
    arg(p, "--checkpoints", C, help="the checkpoint the image was packed from: its model arguments must match the "
                                    "image's; its tokenizer is used when the image has none")
    arg(p, "--prompts", C, help="prompts file, one per line; the first --batch-size non-empty lines (token ids "
                                "separated by commas for an image without a tokenizer; default: a short question)")
    arg(p, "--batch-size", C, type=int, help="sequences per pass: the first B prompts of --prompts share every "
                                             "weight pass (default %(default)s)")
    arg(p, "--max-new-tokens", C, type=int, help="tokens generated per round (default %(default)s)")
    arg(p, "--max-seq-len", C, type=int, help="KV length; prompts keep their last max-seq-len - max-new-tokens "
                                              "tokens (default: prompt + new tokens)")
    _sampling_args(p, C)
    arg(p, "--warmup-rounds", C, type=int, help="whole generations run before the measured one (default "
                                                "%(default)s)")
    arg(p, "--warmup-layers", C, type=int, help="accepted for the original command line; unused (the tiers are "
                                                "filled before the first token)")
    arg(p, "--h2d-gbps", C, type=float, help="H2D link in GB/s for the bound (default: measured at start)")
    arg(p, "--disk-gbps", C, type=float, help="disk bandwidth in GB/s for the bound (default: measured at start "
                                              "with O_DIRECT reads of the image)")
    arg(p, "--out-json", C, help="write the JSON report (the original keys plus plan, bytes, links and bound); a "
                                 "mixture of experts also gets its per-layer expert-usage heatmap beside it, "
                                 "STEM.experts.png (needs matplotlib)")
    arg(p, "--verbose", C, action="store_true", help="also print the placement table, link measurements and "
                                                     "per-step times")
    _device_arg(p, C)
    _runtime_args(p)
    _no_server_arg(p, C)
    _kv_args(p)
    _draft_args(p)


def _server_compute_args(q, C) -> None:
    """Where a server computes, its GPU budget and its longest request (pool serve, serve)."""
    E = EngineConfig
    arg(q, "--device", C, choices=["cpu", "cuda"], help="where the server computes (default: cuda if available, "
                                                        "else cpu)")
    arg(q, "--gpu-mem-gb", E, type=float, help="the server's GPU budget in GB (default: the GPU's free memory)")
    arg(q, "--max-seq-len", C, type=int, help="longest prompt + new tokens a request may have: the KV cache the "
                                              "plan makes room for (default %(default)s)")


def _probe_parser(sub) -> None:
    C = ProbeConfig
    p = sub.add_parser("probe", help="measure links, disk and per-group compute; recommend prefetch distances",
                       description="The single-layer timing study, automated: host -> GPU bandwidth (pinned and "
                                   "cudaHostRegister'ed shm), O_DIRECT read bandwidth over reader processes x read "
                                   "sizes, compute per group (attention, FFN, head; prefill and decode) with random "
                                   "weights in the model's shapes; then what hides what, the pass bound per tier "
                                   "choice, the recommended --prefetch-distance / --group-prefetch-depth and the "
                                   "tier plan for the budgets given (runtime/measure/probe.py). On a CPU-only "
                                   "machine the host -> GPU links are skipped, with the reason.")
    arg(p, "--image", C, help="packed image (file or block device): its model's shapes and dtype, and the disk "
                              "read (default: no image: --shape, and a temp file of --probe-gb in $TMPDIR)")
    arg(p, "--manifest", C, help="the image's manifest (default: IMAGE.manifest.json; required for block devices)")
    arg(p, "--shape", C, help=f"without --image: a published shape, one of {', '.join(SHAPES)} (default "
                              f"llama3.1-8b)")
    arg(p, "--dtype", C, choices=list(DTYPES), help="without --image: the weights' dtype (default bf16)")
    _device_arg(p, C)
    arg(p, "--workers-list", C, help="reader process counts of the disk table, comma-separated (default "
                                     "%(default)s)")
    arg(p, "--read-mb-list", C, help="read sizes of the disk table in MiB, comma-separated (default %(default)s)")
    arg(p, "--probe-gb", C, type=float,
        help="GB (1e9 bytes) read per disk measurement (at most the image), size of the temp file without --image, "
             "and of the host -> GPU copies (default %(default)s)")
    arg(p, "--prefill-tokens", C, type=int, help="tokens of the timed prefill chunk (default 2048 on cuda, 128 on "
                                                 "the cpu)")
    arg(p, "--decode-context", C, type=int, help="cached tokens before the timed decode token (default %(default)s)")
    arg(p, "--devices", C, metavar="I,J,...",
        help="also measure these GPUs' host -> GPU links each alone and all at once (tensor parallelism: GPUs "
             "behind one PCIe switch share it; a --tensor-parallel step is bound by the aggregate)")
    arg(p, "--gpu-mem-gb", C, type=float, help="GPU budget in GB for the tier plan (a plan for cuda, also from a "
                                               "CPU probe)")
    arg(p, "--dram-gb", C, type=float, help="DRAM budget in GB for the tier plan's ring (default with --gpu-mem-gb: "
                                            "80%% of available memory)")
    arg(p, "--draft", C, help="with --image: also time a pass against the tokens it verifies (--tree-tokens-list) "
                              "and this draft (an image, or ngram) building trees of those sizes; the costs are "
                              "kept for runs of the image with --draft and no --draft-tokens, whose tree size "
                              "starts from them")
    arg(p, "--tree-tokens-list", C, help="with --draft: pass sizes to time, comma-separated, at most 1024 (default "
                                         "%(default)s)")
    arg(p, "--experts", C, metavar="FILE",
        help="with --image of a mixture of experts: instead of the timing study, run FILE's text (tokenized with the "
             "image's tokenizer; without one, lines of comma-separated token ids) through the model and count how "
             "often each expert is routed, kept as IMAGE.expert-counts.json (the placement ranks experts by it); "
             "prints the plan for the budgets given with the expected bytes per token from those counts")
    arg(p, "--experts-tokens", C, type=int, help="with --experts: at most this many of the text's tokens (default "
                                                 "%(default)s)")
    arg(p, "--experts-window", C, type=int, help="with --experts: tokens per window, each a fresh context (default "
                                                 "%(default)s)")
    arg(p, "--out-json", C, help="write every measurement, the analysis, the recommendation and the plan here")


def _pool_parser(sub) -> None:
    p = sub.add_parser("pool", help="daemon pools that keep the DRAM tier warm for runs that --attach",
                       description="A pool is a coordinator and its I/O workers holding an image's DRAM tier in "
                                   "POSIX shared memory; it runs detached until stopped, and runs attach to it "
                                   "(run/bench/perplexity --attach NAME) without reading anything it holds. Pool "
                                   "records, logs and locks live in the user's pool dir ($LLMS_POOL_DIR, else "
                                   "$XDG_RUNTIME_DIR/llmstream, else /tmp/llmstream-UID).")
    ps = p.add_subparsers(dest="pool_command", required=True, metavar="ACTION")
    C = PoolStartConfig
    q = ps.add_parser("start", help="start a pool detached, fill its DRAM tier (progress shown), return",
                      description="Start a daemon pool: own session, log file, record in the pool dir.")
    arg(q, "--image", C, required=True, help="packed image: a file or a block device")
    arg(q, "--manifest", C, help="the image's manifest (default IMAGE.manifest.json; required for a device)")
    arg(q, "--name", C, required=True, help="pool name: 1-64 letters, digits, '-' or '_'")
    arg(q, "--dram-gb", C, type=float, help="DRAM for the pool's ring (DRAM tier + window slots), GB; refused above "
                                            "the available memory (default: the whole model if it fits in 80%% of "
                                            "the available memory, else that much)")
    arg(q, "--workers", C, type=int, help="I/O worker processes (default %(default)s)")
    arg(q, "--clients", C, type=int, help="runs that may attach at once (default %(default)s, at most 64)")
    arg(q, "--window-slots", C, type=int, help="window slots per client for the groups the pool does not hold "
                                               "(default 4 when it does not hold the whole model, else 0)")
    arg(q, "--staging-mb", C, type=int, help="each group read is split into chunks of this many MiB (default "
                                             "%(default)s)")
    arg(q, "--no-direct", C, action="store_true", help="buffered reads instead of O_DIRECT")
    arg(q, "--no-wait", C, action="store_true", help="return once the pool is up, before its DRAM tier is filled "
                                                     "(attached runs wait for the fill)")
    arg(q, "--start-timeout", C, type=float, help="seconds to wait for the coordinator to come up (default "
                                                  "%(default)s)")
    arg(q, "--quiet", C, action="store_true", help="no progress lines")
    _serve_parser(ps)
    q = ps.add_parser("stop", help="stop a pool: SIGTERM, then SIGKILL after --timeout; leftovers removed")
    arg(q, "name", PoolStopConfig, help="pool name")
    arg(q, "--timeout", PoolStopConfig, type=float, help="seconds before SIGTERM escalates to SIGKILL (default "
                                                         "%(default)s)")
    q = ps.add_parser("list", help="this user's pools: state, pid, DRAM tier, clients, uptime, image")
    arg(q, "--json", PoolListConfig, action="store_true", help="print JSON instead of a table")
    C = PoolStatusConfig
    q = ps.add_parser("status", help="processes (psutil), slot table and clients of one pool",
                      description="Per process (coordinator, each I/O worker, each attached client): pid, role, CPU "
                                  "%%, RSS, locked/pinned memory, disk read bytes and rate; the slot table; the "
                                  "clients. The JSON schema is documented in docs/POOL.md.")
    arg(q, "name", C, help="pool name")
    arg(q, "--watch", C, action="store_true", help="refresh in place like top until Ctrl-C")
    arg(q, "--interval", C, type=float, help="seconds between samples (default %(default)s)")
    arg(q, "--json", C, action="store_true", help="print one JSON snapshot (with --watch: one per line)")
    q = ps.add_parser("cleanup", help="remove what dead pools left: records, shared memory, semaphores, logs, locks",
                      description="Remove the leftovers of pools whose coordinator is gone (and names in /dev/shm of "
                                  "this user that no live pool accounts for); live pools are never touched.")
    arg(q, "name", PoolCleanupConfig, nargs="?", help="only this pool (default: every dead pool of this user)")


def _serve_parser(ps) -> None:
    C, E = ServeConfig, EngineConfig
    q = ps.add_parser("serve", help="start a server on the pool: one process with the model ready on its device "
                                    "that generates for every run --attach NAME",
                      description="Start the pool's server (runtime/services/server.py): a detached process that "
                                  "attaches to the pool once (plan, ring registered with CUDA, GPU tier copied, CUDA "
                                  "warmed up) and then generates for the runs and benches that attach to the pool "
                                  "(and with --http for OpenAI-compatible clients), all in one continuously batched "
                                  "scheduler, so their first token costs the prefill only. Its limits (device, GPU "
                                  "budget, sequence length, batch, KV flags) are fixed "
                                  "here; a run that needs others passes --no-server. Log: the pool dir's "
                                  "NAME.server.log.")
    arg(q, "name", C, help="pool name (a running pool: launch.py pool start)")
    arg(q, "--stop", C, action="store_true", help="stop the pool's server instead (SIGTERM, then SIGKILL after "
                                                  "--timeout); the pool keeps running")
    arg(q, "--timeout", C, type=float, help="with --stop: seconds before SIGKILL (default %(default)s)")
    _server_compute_args(q, C)
    arg(q, "--batch-size", C, type=int,
        help="most sequences per weight pass without --http (default %(default)s; with --http the larger of it "
             "and --max-batch): requests join and leave the running batch at every pass (continuous batching), "
             "and a request may ask for that many of its prompts at once (run/bench --prompts --batch-size)")
    arg(q, "--group-prefetch-depth", E, type=int, help="GPU staging buffers (default %(default)s)")
    arg(q, "--h2d-gbps", C, type=float, help="H2D link in GB/s for the bound its bench reports give (default: "
                                             "measured when it starts)")
    arg(q, "--disk-gbps", C, type=float, help="disk bandwidth in GB/s for the bound (default: measured when it "
                                              "starts, if the server streams from disk)")
    arg(q, "--start-timeout", C, type=float, help="seconds to wait for it to serve (default %(default)s)")
    arg(q, "--quiet", C, action="store_true", help="print only the last line")
    _http_args(q, required=False)
    _kv_args(q)
    _draft_args(q, server=True)


def _http_args(p, required: bool) -> None:
    C = ServeConfig
    g = p.add_argument_group("OpenAI-compatible HTTP with continuous batching (runtime/services/http.py)")
    arg(g, "--http", C, metavar="[HOST:]PORT", required=required,
        help="also serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics over HTTP on "
             "PORT (0: any free port) of HOST (default 127.0.0.1; 0.0.0.0 only if given); requests join and leave "
             "the running batch at every weight pass" + ("" if required else "; the Unix socket keeps serving "
                                                          "run --attach"))
    arg(g, "--api-key", C, metavar="KEY",
        help="demand Authorization: Bearer KEY on /v1 (default: $LLMS_API_KEY if set, else no key)")
    arg(g, "--model-name", C, metavar="ID", help="the model id /v1/models lists and requests name (default: the "
                                                 "image's file name without .img)")
    arg(g, "--max-batch", C, type=int, help="most sequences sharing one weight pass (default %(default)s)")
    arg(g, "--max-queue", C, type=int, help="most requests waiting for a free sequence slot; more get 429 "
                                            "(default %(default)s)")
    arg(g, "--batching", C, choices=["continuous", "static"],
        help="continuous (default): requests join the running batch between weight passes; static: only an "
             "empty batch takes new requests (for comparison, benchmarks/serve_load.py)")
    arg(g, "--request-timeout", C, type=float, help="seconds a request may take, waiting included (default "
                                                    "%(default)s; then 504)")
    arg(g, "--send-timeout", C, type=float, help="seconds a streamed answer waits for a client that stopped reading "
                                                 "before it drops the request (default %(default)s)")
    arg(g, "--chat-template", C, metavar="FILE",
        help="render chats with the Jinja chat template in FILE instead of the image's own (e.g. one that renders "
             "tools when the image's does not; tool calls are parsed in the format it teaches: <tool_call> "
             "blocks, Llama-3.1 JSON or [TOOL_CALLS])")
    arg(g, "--no-prefix-cache", C, action="store_true",
        help="do not reuse the KV entries of earlier prompts (by default a request whose prompt begins with one "
             "that a sequence slot still holds, e.g. a shared system prompt, prefills only the rest)")


def _serve_foreground_parser(sub) -> None:
    C, P = ServeConfig, PoolStartConfig
    q = sub.add_parser("serve", help="start a pool and its HTTP server in the foreground; Ctrl-C stops both",
                       description="One command for the common case (as llama-server -m FILE): start a daemon "
                                   "pool of IMAGE (pool start), serve it over OpenAI-compatible HTTP with continuous "
                                   "batching in this process (pool serve --http), and stop both on Ctrl-C or "
                                   "SIGTERM. run --attach NAME goes through it too.")
    _image_args(q, P)
    arg(q, "--name", P, help="the pool's name (default: serve-PID)")
    arg(q, "--dram-gb", P, type=float, help="DRAM for the pool's ring, GB (default: the whole model if it fits in "
                                            "80%% of the available memory)")
    arg(q, "--workers", P, type=int, help="the pool's I/O worker processes (default %(default)s)")
    _server_compute_args(q, C)
    arg(q, "--quiet", C, action="store_true", help="fewer progress lines")
    _http_args(q, required=True)
    _kv_args(q)
    _draft_args(q, server=True)


def build_parser() -> argparse.ArgumentParser:
    from runtime.cli import USAGE

    parser = argparse.ArgumentParser(prog="launch.py", description=DESCRIPTION, epilog=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _pack_parser(sub)
    _run_parser(sub)
    _perplexity_parser(sub)
    _bench_parser(sub)
    _probe_parser(sub)
    p = sub.add_parser("verify", help="check an image's header, manifest and every group checksum")
    _image_args(p, ImageRef, required=True)
    _pool_parser(sub)
    _serve_foreground_parser(sub)
    return parser


def command_of(ns: argparse.Namespace) -> str:
    """The command path of a parsed namespace: "run", "pool start", ..."""
    return ns.command + (f" {ns.pool_command}" if ns.command == "pool" else "")


def configs(ns: argparse.Namespace) -> dict[type, Any]:
    """The command's configs, built (and so checked) from its flags: {class: instance}."""
    values = vars(ns)
    return {cls: cls.from_flags(values) for cls in CONFIGS[command_of(ns)]}
