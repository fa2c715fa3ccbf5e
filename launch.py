#!/usr/bin/env python3
"""The one entry point: pack images, run, measure perplexity, verify, benchmark, probe, and daemon pools.

    python launch.py run                                   # embedded SmolLM2-135M-Instruct, default chat prompt
    python launch.py COMMAND --help                        # every flag of a command

This file parses and dispatches (runtime/cli); the work is in runtime/ and model/. Every user error (bad
file, bad flag value) prints one line to stderr and exits with code 2; out of GPU memory exits with 3.
"""

from __future__ import annotations

import sys

from model.errors import UserError


def main(argv: list[str] | None = None) -> int:
    from runtime.env import allocator_defaults

    allocator_defaults()  # before torch starts CUDA
    from runtime.cli import commands
    from runtime.cli.parser import build_parser
    from runtime.engine.gpumem import oom_report, start_history

    args = build_parser().parse_args(argv)
    start_history()  # only with LLMS_CUDA_MEMORY_HISTORY
    try:
        return getattr(commands, {"serve": "serve_cmd"}.get(args.command, args.command))(args) or 0
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
