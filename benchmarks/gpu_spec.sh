#!/usr/bin/env bash
# One GPU-machine call for speculative decoding (issue 19): its CUDA tests, the pass time against the tree
# tokens it verifies (benchmarks/spec_passes.py) for the 70B-shaped image (8 layers, 24 GB emulated cap) in
# bf16 and int4 and the 8B-shaped one (32 layers, 6 GiB cap), and SmolLM2 end to end on real prompts with each
# draft (benchmarks/spec_e2e.py). Tables last.
# Usage (repo root, GPU machine, .whl carried): bash benchmarks/gpu_spec.sh
# env: WITH_TESTS (1), WITH_E2E (1), PASS_SHAPES ("70b 70b-int4 8b"), TOKENS (1,2,4,...,1024)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/spec; mkdir -p "$W"
T=${TOKENS:-1,2,4,8,16,32,64,128,256,512,1024}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${WITH_TESTS:-1}" = 1 ]; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_speculative.py -k cuda 2>&1 \
    | grep -E "^E |passed|failed|FAILED|rror" | cut -c1-300 | tail -8
fi
for s in ${PASS_SHAPES:-70b 70b-int4 8b}; do
  case $s in
    70b) args="--shape llama3.1-70b --layers 8 --cap 24" ;;
    70b-int4) args="--shape llama3.1-70b --layers 8 --cap 24 --quantize int4" ;;
    8b) args="--shape llama3.1-8b --layers 32 --cap 6.442" ;;
  esac
  timeout 240 python3 benchmarks/spec_passes.py $args --tokens "$T" --workdir "$W" --out-json "$OUT/passes-$s.json" \
    > "$W/passes-$s.log" 2>&1 || { echo "spec_passes $s failed:"; tail -8 "$W/passes-$s.log"; }
  rm -f "$W"/*.img "$W"/*.manifest.json  # the disk holds one big image at a time
done
if [ "${WITH_E2E:-1}" = 1 ]; then
  timeout 300 python3 benchmarks/spec_e2e.py --workdir "$W/e2e" --out-json "$OUT/e2e.json" > "$W/e2e.log" 2>&1 \
    || { echo "spec_e2e failed or differed:"; tail -5 "$W/e2e.log"; }
fi
ls /dev/shm | grep llms || echo "no leftover shared memory"
for s in ${PASS_SHAPES:-70b 70b-int4 8b}; do grep -B1 -A14 "^| tree tokens" "$W/passes-$s.log" | grep -v "^--"; done
grep -A20 "^| prompt" "$W/e2e.log" 2>/dev/null
