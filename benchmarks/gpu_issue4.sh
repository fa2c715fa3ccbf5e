#!/usr/bin/env bash
# One GPU-machine call for issue 4 at reduced scale (the lease allows ~10 minutes): the suite at --scale
# small with the accelerate peer, a traced bench rendered as PNG, the probe of the 70B shape, CUDA tests.
# Usage (repo root, GPU machine, .whl carried): bash benchmarks/gpu_issue4.sh ; results under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 300 python3 benchmarks/suite.py --scale small --workdir /tmp/suite --out /tmp/suite-out --new-tokens 4 \
  2>&1 | grep -vE "^\[pool|^\\$|WARNING" | tail -14
cp /tmp/suite-out/suite.json /tmp/suite-out/peer.json "$OUT"/ 2>/dev/null
img=/tmp/suite/llama3.1-8b-8l.img
timeout 60 python3 launch.py bench --image $img --mode mixed --gpu-cached-layers 2 --cpu-cache-layers 3 \
  --prefetch-distance 6 --gpu-mem-gb 8 --prompts /tmp/suite-out/llama3.1-8b-short.txt --max-new-tokens 4 --warmup-rounds 0 --trace /tmp/trace.json \
  --out-json "$OUT/traced-bench.json" 2>&1 | grep -E "bound:|error" ; \
  python3 benchmarks/render_trace.py /tmp/trace.json "$OUT/trace.png" 2>&1 | tail -1
if [ "${WITH_PROBE:-1}" = 1 ]; then
timeout 90 python3 launch.py probe --shape llama3.1-70b --device cuda --probe-gb 0.5 --workers-list 1,4,8 \
  --read-mb-list 16,64 --gpu-mem-gb 24 --dram-gb 64 --out-json "$OUT/probe-70b.json" 2>&1 | \
  grep -E "GB/s|ms|use:|W =|K =" | head -30
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_trace.py tests/test_probe.py -k "cuda or gpu" 2>&1 | tail -3
fi
ls /dev/shm | grep llms || echo "no leftover shared memory"
