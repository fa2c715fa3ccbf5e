#!/usr/bin/env python3
"""The one entry point: pack images, run, measure perplexity, verify.

    python launch.py run                                   # embedded SmolLM2-135M-Instruct, default chat prompt
    python launch.py pack --checkpoint DIR_OR_GGUF --out model.img [--dtype bf16]
    python launch.py pack --synthetic llama3.1-8b --layers 4 --out synth.img
    python launch.py run --image model.img --prompt "Hello" --chat --max-new-tokens 64
    python launch.py perplexity --image model.img --text-file wiki.txt --context 512
    python launch.py verify --image model.img
    python launch.py bench --image model.img --prompts prompts.txt --max-new-tokens 32 --out-json bench.json
    python launch.py probe --image model.img --gpu-mem-gb 24 --dram-gb 64 --out-json probe.json
    python launch.py run --image model.img --prompt "Hello" --trace run.trace.json   # then ui.perfetto.dev
    python launch.py pool start --image model.img --name m; python launch.py run --attach m; pool stop m
    python launch.py pool serve m --device cuda --gpu-mem-gb 20   # runs --attach m then go through its server

Every user error (bad file, bad flag value) prints one line to stderr and exits with code 2; ``--help`` on
any command explains its flags. This file parses and dispatches; the work is in runtime/ and model/.
"""

from __future__ import annotations

import argparse
import sys

from model.errors import UserError


def _add_image_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--image", required=required,
                   help="packed image: a file or a block device" +
                   ("" if required else " (default: the embedded SmolLM2-135M-Instruct, packed once into the cache)"))
    p.add_argument("--manifest", help="the image's manifest (default: IMAGE.manifest.json; required for block devices)")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="where the model computes (default: cuda if available, else cpu)")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("placement and streaming (DESIGN.md sections 2-4)")
    g.add_argument("--mode", default="mixed", choices=["full", "preload", "stream", "mixed"],
                   help="full: every group loaded onto the device (the in-memory reference); preload: every group "
                        "not on the GPU pinned in the DRAM tier; stream: no DRAM tier, everything not on the GPU "
                        "read from disk every pass; mixed (default): GPU tier, then DRAM tier, then stream, from the "
                        "budgets below")
    g.add_argument("--gpu-mem-gb", type=float, help="GPU budget in GB (1e9 bytes) for resident groups, KV cache, "
                                                   "activations and staging (default: the GPU's free memory)")
    g.add_argument("--dram-gb", type=float, help="DRAM budget in GB for the shared ring: DRAM tier + window "
                                                "(default: 80%% of available memory)")
    g.add_argument("--gpu-cached-layers", type=int, help="keep exactly layers 0..N-1 on the GPU (overrides the "
                                                         "GPU budget's choice)")
    g.add_argument("--cpu-cache-layers", type=int, help="keep exactly the next M layers in the DRAM tier")
    g.add_argument("--prefetch-distance", type=int,
                   help="window slots: how many streamed groups are read ahead of use (default 2 x depth)")
    g.add_argument("--group-prefetch-depth", type=int, default=2,
                   help="GPU staging buffers: copies run up to this many groups ahead of compute (default 2)")
    g.add_argument("--workers", type=int, default=2, help="I/O worker processes (default 2)")
    g.add_argument("--staging-mb", type=int, default=16,
                   help="each group read is split into chunks of this many MiB, read in parallel (default 16)")
    g.add_argument("--threads", type=int, metavar="N",
                   help="CPU compute threads of this run (default: the cores shared evenly by the runs computing "
                        "on this machine's CPU at the time, recounted as they come and go)")
    g.add_argument("--attach", metavar="NAME",
                   help="use the running daemon pool NAME (launch.py pool start) instead of starting a private "
                        "pool: nothing is read from disk that the pool holds; the image defaults to the pool's, "
                        "the GPU tier comes from --gpu-mem-gb; --mode, --dram-gb, --cpu-cache-layers, "
                        "--prefetch-distance and --trace do not apply")
    g.add_argument("--no-server", action="store_true",
                   help="with --attach: run the model in this process even when the pool has a server (launch.py "
                        "pool serve); by default a run attached to a serving pool hands its prompt to the server")
    g.add_argument("--trace", metavar="FILE",
                   help="write a Chrome trace-event JSON of the run to FILE (open it in ui.perfetto.dev or "
                        "chrome://tracing; benchmarks/render_trace.py draws it): each I/O worker's disk reads, "
                        "each H2D copy and each group's compute, on one clock")


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


def _add_kv_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV cache")
    g.add_argument("--kv-block-tokens", type=int, default=64,
                   help="KV cache block size in tokens: the unit of KV moves and of --topk-blk (default 64)")
    g.add_argument("--kv-offload", default="auto", choices=["auto", "on", "off"],
                   help="on: keep the KV cache in (pinned) DRAM and bring each layer's blocks to the GPU before "
                        "its attention, overlapped with compute; auto (default): when the GPU budget cannot hold "
                        "the whole KV cache, or when keeping it there would push more weight bytes over the link "
                        "per step than offloading moves; off: never")
    g.add_argument("--host-attention", nargs="?", const="all", type=_host_layers, metavar="N|all",
                   help="with the KV cache offloaded: decode attention of N layers (spread evenly; all when no N "
                        "is given) runs on the CPU over the DRAM cache (as FlexGen), so their cache never crosses "
                        "the H2D link while decoding: each such layer sends its new query, key and value to the "
                        "host and gets the attention output back. The other layers' cache is read back over the "
                        "link as without the flag, so N balances the CPU's share of the step's KV bytes against "
                        "the link's (--kv-offload auto counts only theirs). Prefill attention stays on the GPU. "
                        "Not with --topk-blk")
    g.add_argument("--prefill-chunk", type=int, default=2048,
                   help="prompt tokens per weight pass, shared by the sequences of a batch (default 2048; at "
                        "least 16 per sequence): the plan keeps GPU room for one chunk's activations. A larger "
                        "chunk means fewer passes to prefill a big batch, and less room for the GPU tier")
    g.add_argument("--prefill-by-sequence", action=argparse.BooleanOptionalAction, default=None,
                   help="with the KV cache offloaded: prefill a batch whole prompts at a time, as many sequences "
                        "per weight pass as --prefill-chunk tokens hold, instead of a slice of every sequence per "
                        "pass, so nothing is read back between passes (chunked across the batch, each pass reads "
                        "the batch's written KV back over the link: 560 GB for 70B-shaped batch 128 x 2048); "
                        "with --host-attention all the GPU then keeps KV buffers for one pass's prompts instead "
                        "of the batch's. Default: whole prompts when that takes no more weight passes, and "
                        "always with --host-attention all; --no-prefill-by-sequence: always chunked across the "
                        "batch")
    g.add_argument("--topk-blk", type=int,
                   help="approximate decode attention: per KV head only the K best blocks (scored from per-block "
                        "key min/max, as in Quest) plus the first block and the 2 most recent; off by default "
                        "(exact attention)")


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time a generation against the transfer bound (DESIGN.md section 1)",
                       description="Time prefill and decode, print the seeds' summary block plus the plan, bytes "
                                   "per token, achieved GB/s per link and achieved / bound; accepts the seeds' "
                                   "quick-start command line verbatim (runtime/bench.py).")
    _add_image_args(p)
    p.add_argument("--raw-device", help="the image on a raw block device (or file); give its --manifest")
    p.add_argument("--checkpoints", help="the checkpoint the image was packed from: its model arguments must match "
                                         "the image's; its tokenizer is used when the image has none")
    p.add_argument("--prompts", help="prompts file, one per line; the first --batch-size non-empty lines (token ids "
                                     "separated by commas for an image without a tokenizer; default: a short "
                                     "question)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per pass: the first B prompts of --prompts "
                                                             "share every weight pass (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per round (default 32)")
    p.add_argument("--max-seq-len", type=int, help="KV length; prompts keep their last max-seq-len - max-new-tokens "
                                                   "tokens (default: prompt + new tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--warmup-rounds", type=int, default=1, help="whole generations run before the measured one "
                                                                "(default 1)")
    p.add_argument("--warmup-layers", type=int, help="accepted for the seeds' command line; unused (the tiers are "
                                                     "filled before the first token)")
    p.add_argument("--h2d-gbps", type=float, help="H2D link in GB/s for the bound (default: measured at start)")
    p.add_argument("--disk-gbps", type=float, help="disk bandwidth in GB/s for the bound (default: measured at "
                                                   "start with O_DIRECT reads of the image)")
    p.add_argument("--out-json", help="write the seeds' JSON keys plus plan, bytes, links and bound to this file")
    p.add_argument("--verbose", action="store_true", help="also print the placement table, link measurements "
                                                          "and per-step times")
    _add_device_args(p)
    _add_runtime_args(p)
    _add_kv_args(p)


def _add_probe_parser(sub) -> None:
    p = sub.add_parser("probe", help="measure links, disk and per-group compute; recommend prefetch distances",
                       description="The seeds' single-layer study, automated: host -> GPU bandwidth (pinned and "
                                   "cudaHostRegister'ed shm), O_DIRECT read bandwidth over reader processes x read "
                                   "sizes, compute per group (attention, FFN, head; prefill and decode) with random "
                                   "weights in the model's shapes; then what hides what, the pass bound per tier "
                                   "choice, the recommended --prefetch-distance / --group-prefetch-depth and the "
                                   "tier plan for the budgets given (runtime/probe.py). On a CPU-only machine the "
                                   "host -> GPU links are skipped, with the reason.")
    p.add_argument("--image", help="packed image (file or block device): its model's shapes and dtype, and the disk "
                                   "read (default: no image: --shape, and a temp file of --probe-gb in $TMPDIR)")
    p.add_argument("--manifest", help="the image's manifest (default: IMAGE.manifest.json; required for block devices)")
    p.add_argument("--shape", help="without --image: a published shape, one of llama3.1-70b, llama3.1-8b, "
                                   "llama3.2-1b, tiny (default llama3.1-8b)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="without --image: the weights' dtype "
                                                                       "(default bf16)")
    _add_device_args(p)
    p.add_argument("--workers-list", default="1,2,4,8",
                   help="reader process counts of the disk table, comma-separated (default 1,2,4,8)")
    p.add_argument("--read-mb-list", default="1,4,16,64",
                   help="read sizes of the disk table in MiB, comma-separated (default 1,4,16,64)")
    p.add_argument("--probe-gb", type=float, default=1.0,
                   help="GB (1e9 bytes) read per disk measurement (at most the image), size of the temp file without "
                        "--image, and of the host -> GPU copies (default 1.0)")
    p.add_argument("--prefill-tokens", type=int, help="tokens of the timed prefill chunk (default 2048 on cuda, 128 "
                                                      "on the cpu)")
    p.add_argument("--decode-context", type=int, default=256,
                   help="cached tokens before the timed decode token (default 256)")
    p.add_argument("--gpu-mem-gb", type=float, help="GPU budget in GB for the tier plan (a plan for cuda, also from "
                                                    "a CPU probe)")
    p.add_argument("--dram-gb", type=float, help="DRAM budget in GB for the tier plan's ring (default with "
                                                 "--gpu-mem-gb: 80%% of available memory)")
    p.add_argument("--out-json", help="write every measurement, the analysis, the recommendation and the plan here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("pack", help="pack a checkpoint (or synthetic weights) into a runtime image",
                       description="Pack a Meta directory, a Hugging Face directory or a .gguf file into one "
                                   "image: a 4 KiB header, then every group as one aligned, checksummed extent.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="Meta dir (params.json + consolidated.*.pth), HF dir (config.json + "
                                          "*.safetensors) or a .gguf file")
    src.add_argument("--synthetic", choices=["llama3.1-70b", "llama3.1-8b", "llama3.2-1b", "tiny"],
                     help="random weights (never zeros) in a published shape, for benchmarks")
    p.add_argument("--layers", type=int, help="with --synthetic: number of layers (default: the shape's own)")
    p.add_argument("--seed", type=int, default=0, help="with --synthetic: random seed (default 0)")
    p.add_argument("--out", required=True, help="image to write: a regular file or a block device")
    p.add_argument("--manifest", help="manifest path (default OUT.manifest.json; required for a block device)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="stored dtype (default bf16)")
    p.add_argument("--force", action="store_true",
                   help="write to a block device that holds a partition table (never overrides 'mounted' or "
                        "'too small')")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reading the new image back to check every group's crc32 before it replaces the old "
                        "one (the header and layout are still checked)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")

    p = sub.add_parser("run", help="generate text", description="Generate from a packed image.")
    _add_image_args(p)
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (default with no image: a chat question)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    prompt.add_argument("--prompts", metavar="FILE",
                        help="many prompts, one per non-empty line (text, or comma-separated token ids for an image "
                             "without a tokenizer), run --batch-size at a time; --out-json gets a list 'results' in "
                             "input order")
    p.add_argument("--batch-size", type=int, default=1,
                   help="with --prompts: sequences that share every weight pass (default 1)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context length to allocate the KV cache for (default: prompt + new tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _add_device_args(p)
    p.add_argument("--out-json", help="write prompt/output token ids, text and timings to this JSON file")
    p.add_argument("--quiet", action="store_true", help="print only the generated text")
    _add_runtime_args(p)
    _add_kv_args(p)

    p = sub.add_parser("perplexity", help="perplexity of a text file",
                       description="Perplexity over consecutive non-overlapping windows of N tokens.")
    _add_image_args(p)
    p.add_argument("--text-file", required=True, help="UTF-8 text to score")
    p.add_argument("--context", type=int, default=512, help="window length in tokens (default 512)")
    _add_device_args(p)
    p.add_argument("--out-json", help="write perplexity and token count to this JSON file")
    _add_runtime_args(p)

    _add_bench_parser(sub)
    _add_probe_parser(sub)

    p = sub.add_parser("verify", help="check an image's header, manifest and every group checksum")
    _add_image_args(p, required=True)
    _add_pool_parser(sub)
    return parser


def _add_pool_parser(sub) -> None:
    p = sub.add_parser("pool", help="daemon pools that keep the DRAM tier warm for runs that --attach",
                       description="A pool is a coordinator and its I/O workers holding an image's DRAM tier in "
                                   "POSIX shared memory; it runs detached until stopped, and runs attach to it "
                                   "(run/bench/perplexity --attach NAME) without reading anything it holds. Pool "
                                   "records, logs and locks live in the user's pool dir ($LLMS_POOL_DIR, else "
                                   "$XDG_RUNTIME_DIR/llmstream, else /tmp/llmstream-UID).")
    ps = p.add_subparsers(dest="pool_command", required=True, metavar="ACTION")
    q = ps.add_parser("start", help="start a pool detached, fill its DRAM tier (progress shown), return",
                      description="Start a daemon pool: own session, log file, record in the pool dir.")
    q.add_argument("--image", required=True, help="packed image: a file or a block device")
    q.add_argument("--manifest", help="the image's manifest (default IMAGE.manifest.json; required for a device)")
    q.add_argument("--name", required=True, help="pool name: 1-64 letters, digits, '-' or '_'")
    q.add_argument("--dram-gb", type=float, help="DRAM for the pool's ring (DRAM tier + window slots), GB; "
                                                 "refused above the available memory (default: the whole model if "
                                                 "it fits in 80%% of the available memory, else that much)")
    q.add_argument("--workers", type=int, default=2, help="I/O worker processes (default 2)")
    q.add_argument("--clients", type=int, default=4, help="runs that may attach at once (default 4)")
    q.add_argument("--window-slots", type=int, help="window slots per client for the groups the pool does not "
                                                    "hold (default 4 when it does not hold the whole model, else 0)")
    q.add_argument("--staging-mb", type=int, default=16, help="each group read is split into chunks of this many "
                                                              "MiB (default 16)")
    q.add_argument("--no-direct", action="store_true", help="buffered reads instead of O_DIRECT")
    q.add_argument("--no-wait", action="store_true", help="return once the pool is up, before its DRAM tier is "
                                                          "filled (attached runs wait for the fill)")
    q.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for the coordinator to come "
                                                                     "up (default 60)")
    q.add_argument("--quiet", action="store_true", help="no progress lines")
    q = ps.add_parser("serve", help="start a server on the pool: one process with the model ready on its device "
                                    "that generates for every run --attach NAME",
                      description="Start the pool's server (runtime/server.py): a detached process that attaches to "
                                  "the pool once (plan, ring registered with CUDA, GPU tier copied, CUDA warmed up) "
                                  "and then generates for the runs and benches that attach to the pool, one request "
                                  "at a time in arrival order, so their first token costs the prefill only. Its "
                                  "limits (device, GPU budget, sequence length, batch, KV flags) are fixed here; a "
                                  "run that needs others passes --no-server. Log: the pool dir's NAME.server.log.")
    q.add_argument("name", help="pool name (a running pool: launch.py pool start)")
    q.add_argument("--stop", action="store_true", help="stop the pool's server instead (SIGTERM, then SIGKILL after "
                                                       "--timeout); the pool keeps running")
    q.add_argument("--timeout", type=float, default=10.0, help="with --stop: seconds before SIGKILL (default 10)")
    q.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="where the server computes (default: cuda if available, else cpu)")
    q.add_argument("--gpu-mem-gb", type=float, help="the server's GPU budget in GB (default: the GPU's free memory)")
    q.add_argument("--max-seq-len", type=int, default=4096, help="longest prompt + new tokens a request may have: "
                                                                 "the KV cache the plan makes room for (default 4096)")
    q.add_argument("--batch-size", type=int, default=1,
                   help="most sequences per weight pass (default 1): a request may ask for that many (run/bench "
                        "--prompts --batch-size), and up to that many greedy requests waiting while the server is "
                        "busy are served together, sharing every weight pass")
    q.add_argument("--group-prefetch-depth", type=int, default=2, help="GPU staging buffers (default 2)")
    q.add_argument("--h2d-gbps", type=float, help="H2D link in GB/s for the bound its bench reports give (default: "
                                                  "measured when it starts)")
    q.add_argument("--disk-gbps", type=float, help="disk bandwidth in GB/s for the bound (default: measured when it "
                                                   "starts, if the server streams from disk)")
    q.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for it to serve (default 600)")
    q.add_argument("--quiet", action="store_true", help="print only the last line")
    _add_kv_args(q)
    q = ps.add_parser("stop", help="stop a pool: SIGTERM, then SIGKILL after --timeout; leftovers removed")
    q.add_argument("name", help="pool name")
    q.add_argument("--timeout", type=float, default=10.0, help="seconds before SIGTERM escalates to SIGKILL "
                                                               "(default 10)")
    q = ps.add_parser("list", help="this user's pools: state, pid, DRAM tier, clients, uptime, image")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q = ps.add_parser("status", help="processes (psutil), slot table and clients of one pool",
                      description="Per process (coordinator, each I/O worker, each attached client): pid, role, "
                                  "CPU %%, RSS, locked/pinned memory, disk read bytes and rate; the slot table; the "
                                  "clients. The JSON schema is documented in docs/POOL.md.")
    q.add_argument("name", help="pool name")
    q.add_argument("--watch", action="store_true", help="refresh in place like top until Ctrl-C")
    q.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    q.add_argument("--json", action="store_true", help="print one JSON snapshot (with --watch: one per line)")
    q = ps.add_parser("cleanup", help="remove what dead pools left: records, shared memory, semaphores",
                      description="Remove the leftovers of pools whose coordinator is gone (and names in /dev/shm of "
                                  "this user that no live pool accounts for); live pools are never touched.")
    q.add_argument("name", nargs="?", help="only this pool (default: every dead pool of this user)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from runtime.env import allocator_defaults

    allocator_defaults()  # before torch starts CUDA
    from runtime import commands
    from runtime.gpumem import oom_report, start_history

    start_history()  # only with LLMS_CUDA_MEMORY_HISTORY
    try:
        return getattr(commands, args.command)(args) or 0
    except UserError as e:
        if commands.TokenPrinter.line_open:  # the streamed text stopped mid-line
            print(flush=True)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if type(e).__name__ != "OutOfMemoryError":  # torch's, without importing torch for every command
            raise
        print(f"error: {str(e).splitlines()[0]}\n{oom_report()}\nlower --batch-size, --prefill-chunk or "
              f"--max-seq-len, or give the run more GPU memory (--gpu-mem-gb)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if commands.TokenPrinter.line_open:  # the streamed text stopped mid-line
            print(flush=True)
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
