"""Several private runs of one image at once on this machine, against one run alone (issue 16's criterion:
each at most 2.5x the solo run's wall time on a 2-core machine).

Each run is a whole ``launch.py run`` process (private pool, workers, model load, prefill, decode), started
at the same moment; the solo run is timed first, then the concurrent ones, ``--repeat`` times each (the
medians are compared). The compute threads each run took (runtime/engine/threads.py) are read from its stderr.

    python benchmarks/concurrent_runs.py                       # the embedded SmolLM2, 2 runs, 400 tokens
    python benchmarks/concurrent_runs.py --image smol.img --runs 3 --new-tokens 200 --repeat 3
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(a) -> list[str]:
    cmd = [sys.executable, str(ROOT / "launch.py"), "run", "--prompt-ids", "1,2,3,4,5,6,7,8", "--max-new-tokens",
           str(a.new_tokens), "--mode", a.mode]
    return cmd + (["--image", a.image] if a.image else []) + a.extra


def timed(n: int, a) -> list[tuple[float, str]]:
    """Start ``n`` runs together; (wall seconds, compute threads reported) of each."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(command(a), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for _ in range(n)]
    out = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a run failed with exit code {p.returncode}:\n{err[-2000:]}")
        m = re.search(r"compute threads: (\d+)", err)
        out.append((time.perf_counter() - t0, m.group(1) if m else "?"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", help="packed image (default: the embedded SmolLM2)")
    p.add_argument("--runs", type=int, default=2, help="runs started together (default 2)")
    p.add_argument("--new-tokens", type=int, default=400, help="tokens each run decodes (default 400)")
    p.add_argument("--mode", default="mixed", help="--mode of the runs (default mixed: a private pool each)")
    p.add_argument("--repeat", type=int, default=1, help="measurements of each case (default 1)")
    p.add_argument("--limit", type=float, default=2.5, help="the criterion: concurrent / solo at most this")
    p.add_argument("extra", nargs="*", help="more flags for launch.py run (after --)")
    a = p.parse_args()
    timed(1, a)  # packs the embedded image on first use and warms the page cache: not measured
    solo = [timed(1, a)[0][0] for _ in range(a.repeat)]
    many = [timed(a.runs, a) for _ in range(a.repeat)]
    s = statistics.median(solo)
    each = [statistics.median(r[i][0] for r in many) for i in range(a.runs)]
    threads = [r[1] for r in many[-1]]
    print(f"cores: {len(__import__('os').sched_getaffinity(0))}; {a.new_tokens} tokens per run, mode {a.mode}; "
          f"median of {a.repeat}")
    print("| case | wall s | / solo | compute threads |")
    print("|---|---|---|---|")
    print(f"| solo | {s:.2f} | 1.00 | |")
    for i, t in enumerate(each):
        print(f"| {a.runs} at once, run {i + 1} | {t:.2f} | {t / s:.2f} | {threads[i]} |")
    worst = max(each) / s
    print(f"worst concurrent / solo: {worst:.2f} (limit {a.limit}): {'PASS' if worst <= a.limit else 'FAIL'}")
    return 0 if worst <= a.limit else 1


if __name__ == "__main__":
    sys.exit(main())
