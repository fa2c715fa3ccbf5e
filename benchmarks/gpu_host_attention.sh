#!/usr/bin/env bash
# One GPU-machine call for --host-attention (issue 6): the CPU's attention rate alone and with the H2D link
# busy (benchmarks/host_attention_probe.py), then the batch sweep (8B-shaped unless SHAPE) with N layers
# attended on the host for each N in HOSTS (0: every layer read back over the link), and a table of the
# decode steps last.
# Usage (repo root, GPU machine, .whl carried): bash benchmarks/gpu_host_attention.sh; env: BATCHES (32),
# HOSTS ("all"), SHAPE (shape:layers:cap, default llama3.1-8b:32:6.442), NEW_TOKENS (8), THREADS (torch's
# CPU threads, default torch's), WITH_PROBE (1), WITH_TESTS (0), BENCH_ARGS (more bench flags; TRACE: a
# trace per batch). Results in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -n "${THREADS:-}" ] && export OMP_NUM_THREADS=$THREADS
if [ "${WITH_TESTS:-0}" = 1 ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_kv.py tests/test_batch.py \
    tests/test_streaming.py -k "gpu or cuda" 2>&1 | grep -E "^E |passed|failed|FAILED" | cut -c1-400 | tail -8
fi
[ "${WITH_PROBE:-1}" = 1 ] && python3 benchmarks/host_attention_probe.py --shape llama3.1-8b --batch 32 --length 2064
IFS=: read -r shape layers cap <<< "${SHAPE:-llama3.1-8b:32:6.442}"
for n in ${HOSTS:-all}; do
  flag=(--host-attention "$n"); [ "$n" = 0 ] && flag=()
  timeout "${SWEEP_S:-200}" python3 benchmarks/batch_sweep.py --shape "$shape" --layers "$layers" --cap "$cap" \
    --batches "${BATCHES:-32}" --new-tokens "${NEW_TOKENS:-8}" "${flag[@]}" --workdir /tmp/bs \
    --out "/tmp/ha-$n" --bench-args="${BENCH_ARGS:-}" > "/tmp/ha-$n.log" 2>&1 || tail -3 "/tmp/ha-$n.log"
  for t in /tmp/ha-$n/b*.trace.json; do
    [ -e "$t" ] && { echo "host layers $n, $t"; python3 benchmarks/trace_summary.py "$t" --last 3; }
  done
  cp "/tmp/ha-$n/batch.json" "$OUT/batch-host$n.json" 2>/dev/null
done
ls /dev/shm | grep llms || echo "no leftover shared memory"
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
print("| host layers | batch | decode step ms | bound ms | KV H2D GB/step | host KV GB/step | CPU GB/s (in the "
      "run) | CPU attention ms/step (in the run) | its wait for q ms/step | tok/s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for f in sorted(Path(sys.argv[1]).glob("batch-host*.json")):
    for r in json.loads(f.read_text())["rows"]:
        if r.get("failed"):
            print(f"| {f.stem[10:]} | {r['batch']} | failed | | | | | | | |")
            continue
        j = json.loads((Path(f"/tmp/ha-{f.stem[10:]}") / f"b{r['batch']}.json").read_text())
        host = j["links"].get("host_attention") or {}
        print(f"| {r.get('host_layers', 0)} | {r['batch']} | {r['step_ms']:.1f} | {r['bound_ms'] or 0:.1f} | "
              f"{r['kv_h2d_per_step'] / 1e9:.2f} | {j['kv']['host_kv_bytes_per_step'] / 1e9:.2f} | "
              f"{host.get('gbps', 0):.1f} | {j['kv'].get('host_attention_ms_per_step', 0):.1f} | "
              f"{j['kv'].get('host_wait_ms_per_step', 0):.1f} | {r['tok_s']:.1f} |")
EOF
