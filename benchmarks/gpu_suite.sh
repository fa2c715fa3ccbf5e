#!/usr/bin/env bash
# One GPU-machine call: the CUDA tests, then the full benchmark suite (8B x32 under 6 GiB, 70B-shaped under an
# emulated 24 GB cap, the accelerate peer); JSON and a tarball of the logs land in $OUT, the table last.
# Usage (repo root, GPU machine, .whl carried): SUITE_S=420 bash benchmarks/gpu_suite.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; df -h /tmp | tail -1; nproc; free -g | head -2
if [ "${WITH_TESTS:-1}" = 1 ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_streaming.py tests/test_bench.py \
    tests/test_trace.py -k "gpu or cuda" 2>&1 | tail -6
fi
if [ "${WITH_REGISTER:-0}" = 1 ]; then
  timeout 90 python3 benchmarks/register_bench.py --gib 8 2>&1 | grep -v "^\[" | tee "$OUT/register.txt" | head -4
fi
timeout "${SUITE_S:-420}" python3 benchmarks/suite.py --scale "${SCALE:-full}" --workdir /tmp/suite --out /tmp/suite-out \
  ${SUITE_ARGS:-} 2>&1 | grep -vE "^\[pool|^\\$|WARNING" | tail -30
cp /tmp/suite-out/suite.json "$OUT"/ 2>/dev/null
tar czf "$OUT/suite-logs.tgz" -C /tmp/suite-out . 2>/dev/null
python3 - <<'PY'
import json
d = json.load(open("/tmp/suite-out/suite.json"))
for r in d["results"]:
    for k in ("decode_dram", "decode_disk", "cold_start", "prefill"):
        j = r.get(k)
        if j:
            print(r["shape"], k, "load_ms %.0f" % j["load_ms"], {a: round(b) for a, b in (j.get("load_breakdown_ms") or {}).items()},
                  "to_first %.0f" % j["process_start_to_first_token_ms"], "disk %.2f" % j["links"]["disk"]["gbps"],
                  "peak %.2f" % j["gpu_mem_GB"]["peak_allocated_GB"])
print(d["verdicts"])
PY
ls /dev/shm | grep llms || echo "no leftover shared memory"
