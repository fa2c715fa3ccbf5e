#!/usr/bin/env bash
# One GPU-machine call for the warm pool (issue 5): the CUDA tests (streaming, attach), then
# benchmarks/attach_bench.py on the 8B-shaped image (32 layers, bf16) under a 6 GiB cap with a 2048-token prompt.
# Usage (repo root, GPU machine, .whl carried): bash benchmarks/gpu_attach.sh; results in $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; free -g | head -2
if [ "${WITH_TESTS:-1}" = 1 ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_streaming.py -k "gpu or cuda" 2>&1 | tail -6
fi
timeout "${ATTACH_S:-300}" python3 benchmarks/attach_bench.py --synthetic llama3.1-8b --layers 32 --device cuda \
  --gpu-mem-gb 6.442 --prompt-tokens "${PROMPT_TOKENS:-2048}" --rounds 3 --workdir /tmp/ab --out /tmp/ab-out \
  ${ATTACH_ARGS:-} 2>&1 | grep -vE "^\\$|WARNING" | tail -14
cp /tmp/ab-out/attach.json "$OUT"/ 2>/dev/null
tar czf "$OUT/attach-logs.tgz" -C /tmp/ab-out --exclude pools . 2>/dev/null
python3 - <<'PY'
import json
d = json.load(open("/tmp/ab-out/attach.json"))
for j in d["rounds"] + [d.get("private") or {}]:
    if j:
        print({k: round(v) for k, v in (j.get("load_breakdown_ms") or {}).items()}, "prefill %.0f" % j["prefill_ms"],
              "peak %.2f" % j["gpu_mem_GB"]["peak_allocated_GB"], j["host_mem_GB"])
print(d.get("pool_status_text", ""))
PY
ls /dev/shm | grep llms || echo "no leftover shared memory"
