#!/usr/bin/env bash
# One GPU-machine call for the architecture registry (issue 26): the CUDA tests (the architectures against
# transformers on CUDA, and the streaming, bench, trace, quantized and speculative files' GPU tests), then
# benchmarks/suite.py's DRAM-resident decode (regime a, with the uncapped full-mode step it is bounded by) of
# synthetic Qwen2.5-72B- and Qwen3-32B-shaped images of 8 layers under the emulated 24 GB cap, bf16 and int4, and
# of the Llama-3.1-70B shape beside them as the baseline of the same machine. A table per suite run last.
# Usage (repo root, GPU machine, .whl carried): bash benchmarks/gpu_arch.sh
# env: SHAPES (qwen2.5-72b,qwen3-32b), SCHEMES ("bf16 int4"), BASELINE (1: the llama3.1-70b x8 bf16 row too),
#      TEST_FILES (the CUDA tests' files), BASELINE_SCHEMES ("bf16": the baseline's schemes), WITH_TESTS (1), TESTS_S (240: the tests' limit),
#      NEW_TOKENS (8), SUITE_S (420: each suite run's limit), DEPTHS (""): each quantized image's decode again with
#      --group-prefetch-depth D for each D, and traced (benchmarks/trace_summary.py's last passes) when TRACE=1
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/arch; mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; df -h /tmp | tail -1
if [ "${WITH_TESTS:-1}" = 1 ]; then
  # one line a test (-v), so that a run cut short by its limit still shows what passed; the quantized kernels last
  timeout "${TESTS_S:-240}" python3 -m pytest -v -p no:cacheprovider -n 0 --tb=short ${TEST_FILES:-tests/test_graphs.py \
    tests/test_architectures.py tests/test_streaming.py tests/test_bench.py tests/test_trace.py tests/test_speculative.py \
    tests/test_quant_image.py tests/test_quant.py} -k "gpu or cuda" > "$OUT/tests.txt" 2>&1
  echo "tests: $(grep -c ' PASSED' "$OUT/tests.txt") passed, $(grep -c ' SKIPPED' "$OUT/tests.txt") skipped"
  grep -E " (FAILED|ERROR)|^E |^(FAILED|ERROR) |passed|failed" "$OUT/tests.txt" | cut -c1-300 | tail -14
fi
again() {  # $1 label: the suite's quantized decodes again, with each of DEPTHS and traced
  python3 - "$OUT/suite-$1/suite.json" "$OUT/suite-$1" > "$W/again-$1.txt" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    print(r["shape"], r["layers"], r["run_gpu_cap_gb"], f'{sys.argv[2]}/{r["shape"]}-short.txt')
PY
  while read -r shape layers cap prompts; do
    img=$(ls "$W/$shape-${layers}l"-*.img | head -1)
    for d in ${DEPTHS:-}; do
      timeout 120 python3 launch.py bench --image "$img" --prompts "$prompts" --max-new-tokens "${NEW_TOKENS:-8}" \
        --warmup-rounds 1 --mode preload --workers 4 --gpu-mem-gb "$cap" --group-prefetch-depth "$d" \
        --out-json "$OUT/$1-$shape-depth$d.json" > "$W/depth.log" 2>&1 || tail -3 "$W/depth.log"
      python3 -c "import json,sys; b=json.load(open(sys.argv[1]))['bound']; print(sys.argv[2], 'depth', sys.argv[3], \
        'step %.1f ms, H2D bound %.1f ms' % (b['decode_step_ms'], b['step_ms'] or 0))" \
        "$OUT/$1-$shape-depth$d.json" "$shape $1" "$d" 2>/dev/null
    done
    if [ "${TRACE:-0}" = 1 ]; then
      timeout 120 python3 launch.py bench --image "$img" --prompts "$prompts" --max-new-tokens "${NEW_TOKENS:-8}" \
        --warmup-rounds 1 --mode preload --workers 4 --gpu-mem-gb "$cap" --trace "$OUT/$1-$shape.trace.json" \
        --out-json "$OUT/$1-$shape-traced.json" > "$W/traced.log" 2>&1 || tail -3 "$W/traced.log"
      echo "== trace $shape $1"; python3 benchmarks/trace_summary.py "$OUT/$1-$shape.trace.json" --last 3 2>&1 | tail -5
    fi
  done < "$W/again-$1.txt"
}
run_suite() {  # $1 label, $2 shapes, $3 scale, $4 extra flags
  timeout "${SUITE_S:-420}" python3 benchmarks/suite.py --scale "$3" --shapes "$2" --regimes a $4 --skip-peer \
    --new-tokens "${NEW_TOKENS:-8}" --workdir "$W" --out "$OUT/suite-$1" > "$W/suite-$1.log" 2>&1 \
    || { echo "suite $1 failed:"; tail -20 "$W/suite-$1.log"; }
  [ -n "$4" ] && again "$1"
  rm -f "$W"/*.img "$W"/*.manifest.json; rm -rf "$W"/*.tokenizer  # the 64 GiB disk holds one shape's images
}
for s in ${SCHEMES:-bf16 int4}; do
  q=$([ "$s" = bf16 ] && echo "" || echo "--quantize $s --group-size 64 --quantize-output")
  run_suite "$s" "${SHAPES:-qwen2.5-72b,qwen3-32b}" arch "$q"
done
if [ "${BASELINE:-1}" = 1 ]; then
  for s in ${BASELINE_SCHEMES:-bf16}; do
    q=$([ "$s" = bf16 ] && echo "" || echo "--quantize $s --group-size 64 --quantize-output")
    run_suite "llama-$s" llama3.1-70b full "$q"
  done
fi
ls /dev/shm | grep llms || echo "no leftover shared memory"
for f in "$W"/suite-*.log; do
  echo "== $(basename "$f" .log)"; grep -A12 "^| shape" "$f" | grep "^|"
done
