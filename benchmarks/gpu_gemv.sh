#!/usr/bin/env bash
# One GPU-machine call for the GGUF formats' fused matmul (issue 27 item 2, model/quant_gemv.py): the CUDA tests
# of the quantized formats (the fused path: exact values, bounds), then benchmarks/quant_kernels.py --gemv (every
# format, 8B- and 70B-shaped matrices, 1/4/16 rows of bf16 x: GB/s of the blocks against the device copy and
# against dequantize + matmul), then optionally its --sweep of other launches (a second call on the warm machine:
# Triton's cache then holds most of the kernels).
# Usage (repo root, GPU machine, .whl carried): bash benchmarks/gpu_gemv.sh
#        then, optionally: WITH_TESTS=0 WITH_TABLE=0 WITH_SWEEP=1 bash benchmarks/gpu_gemv.sh
# env: WITH_TESTS (1), WITH_TABLE (1), WITH_SWEEP (0), SCHEMES (every kept GGUF format, comma-separated)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
schemes=${SCHEMES:-q8_0,q4_0,q4_1,q5_0,q5_1,q4_k,q5_k,q6_k}
if [ "${WITH_TESTS:-1}" = 1 ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_quant.py -k "gpu or cuda" 2>&1 \
    | grep -E "^E |passed|failed|FAILED|rror" | cut -c1-300 | tail -12
fi
if [ "${WITH_TABLE:-1}" = 1 ]; then
  timeout 330 python3 benchmarks/quant_kernels.py --gemv --schemes "$schemes" 2>&1 | tee "$OUT/gemv.txt" | cut -c1-160
fi
if [ "${WITH_SWEEP:-0}" = 1 ]; then
  timeout 540 python3 benchmarks/quant_kernels.py --gemv --schemes "" --sweep 2>&1 | tee "$OUT/gemv-sweep.txt"
fi
