#!/usr/bin/env bash
# One GPU-machine call for --host-attention (issue 6): the CPU's attention rate alone and with the H2D link
# busy (benchmarks/host_attention_probe.py), then the 8B-shaped batch sweep with host attention, traced, at each
# --group-prefetch-depth in DEPTHS, with the per-pass trace summary of its decode steps.
# Usage (repo root, GPU machine, .whl carried): bash benchmarks/gpu_host_attention.sh; env: BATCHES (32),
# DEPTHS ("2 4"), NEW_TOKENS (8). Results in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 benchmarks/host_attention_probe.py --shape llama3.1-8b --batch 32 --length 2064
for depth in ${DEPTHS:-2 4}; do
  timeout "${SWEEP_S:-200}" python3 benchmarks/batch_sweep.py --shape llama3.1-8b --layers 32 --cap 6.442 \
    --batches "${BATCHES:-32}" --new-tokens "${NEW_TOKENS:-8}" --host-attention --workdir /tmp/bs \
    --out "/tmp/ha-$depth" --bench-args "--group-prefetch-depth $depth --trace TRACE ${BENCH_ARGS:-}" 2>&1 | tail -2
  for t in /tmp/ha-$depth/b*.trace.json; do
    echo "depth $depth, $t"; python3 benchmarks/trace_summary.py "$t" --last 3
  done
  cp "/tmp/ha-$depth/batch.json" "$OUT/batch-depth$depth.json" 2>/dev/null
done
ls /dev/shm | grep llms || echo "no leftover shared memory"
