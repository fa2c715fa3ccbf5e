#!/usr/bin/env bash
# One GPU-machine call for quantized images (issue 18): the CUDA tests of the quantized formats, the
# dequantization kernels against the GPU's memory rate, then benchmarks/suite.py's DRAM-resident decode (and
# the uncapped full-mode compute it is bounded by) of the synthetic images quantized with --quantize, and a
# probe of the last image (dequantization against its copy). A table per suite run last.
# Usage (repo root, GPU machine, .whl carried): bash benchmarks/gpu_quant.sh
# env: SHAPES (llama3.1-70b,llama3.1-8b), SCHEMES (int4 int8), GROUP (64), WITH_TESTS (1), WITH_KERNELS (1),
#      NEW_TOKENS (8), OUTPUT (1: --quantize-output too), WITH_PROBE (1: probe the 70B int4 image),
#      WITH_TRACE (0: 1 reruns the 70B int4 decode with --trace and prints benchmarks/trace_summary.py's last passes)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/quant; mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; df -h /tmp | tail -1
if [ "${WITH_TESTS:-1}" = 1 ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_quant.py tests/test_quant_image.py \
    -k "gpu or cuda" 2>&1 | grep -E "^E |passed|failed|FAILED|rror" | cut -c1-300 | tail -12
fi
if [ "${WITH_KERNELS:-1}" = 1 ]; then
  timeout 120 python3 benchmarks/quant_kernels.py 2>&1 | tee "$OUT/kernels.txt" | tail -14
fi
out_flag=$([ "${OUTPUT:-1}" = 1 ] && echo --quantize-output)
for q in ${SCHEMES:-int4 int8}; do
  timeout 420 python3 benchmarks/suite.py --scale full --shapes "${SHAPES:-llama3.1-70b,llama3.1-8b}" --regimes a \
    --quantize "$q" --group-size "${GROUP:-64}" $out_flag --skip-peer --new-tokens "${NEW_TOKENS:-8}" \
    --workdir "$W" --out "$OUT/suite-$q" > "$W/suite-$q.log" 2>&1 || { echo "suite $q failed:"; tail -20 "$W/suite-$q.log"; }
done
last=$(ls "$W"/llama3.1-70b-*int4*.img 2>/dev/null | head -1)
if [ -n "$last" ] && [ "${WITH_PROBE:-1}" = 1 ]; then
  timeout 120 python3 launch.py probe --image "$last" --probe-gb 1 --workers-list 4 --read-mb-list 16 \
    --out-json "$OUT/probe.json" 2>/dev/null | grep -E "^model|^  (attention|feed_forward|head) " | cut -c1-220
fi
if [ -n "$last" ] && [ "${WITH_TRACE:-0}" = 1 ]; then
  cap=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['results'][0]['run_gpu_cap_gb'])" \
        "$OUT/suite-int4/suite.json")
  timeout 120 python3 launch.py bench --image "$last" --prompts "$OUT/suite-int4/llama3.1-70b-short.txt" \
    --max-new-tokens 8 --warmup-rounds 1 --mode preload --workers 4 --gpu-mem-gb "$cap" \
    --trace "$OUT/int4.trace.json" --out-json "$OUT/int4-traced.json" > "$W/traced.log" 2>&1 || tail -5 "$W/traced.log"
  python3 benchmarks/trace_summary.py "$OUT/int4.trace.json" --last 4 2>&1 | tail -8
fi
ls /dev/shm | grep llms || echo "no leftover shared memory"
for q in ${SCHEMES:-int4 int8}; do
  grep -A12 "^| shape" "$W/suite-$q.log" | grep "^|"
done
