#!/usr/bin/env bash
# One GPU-machine call for issue 6: the CUDA tests of batching / KV offload, the batch sweep for the 8B shape
# (32 layers, 6 GiB cap) and the 70B shape (8 layers, emulated 24 GB cap), then the retrieval benchmark.
# Usage (repo root, GPU machine, .whl carried): bash benchmarks/gpu_batch.sh; env: SHAPES, BATCHES, SWEEP_S,
# SWEEP_ARGS (e.g. "--host-attention --compute-bound"), WITH_TESTS, WITH_RETRIEVAL, RETRIEVAL_ARGS, RETRIEVAL_S. Results in $OUT:
# batch-SHAPE.json, retrieval.json and one logs tarball (the machine returns few files).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${WITH_TESTS:-1}" = 1 ]; then
  timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_kv.py tests/test_batch.py \
    tests/test_streaming.py -k "gpu or cuda" -s 2>&1 | grep -E "host attention:|^E |passed|failed|FAILED|^tests/.*(Error|assert)" | cut -c1-400 | tail -12
fi
for spec in ${SHAPES:-llama3.1-8b:32:6.442 llama3.1-70b:8:24}; do
  IFS=: read -r shape layers cap <<< "$spec"
  timeout "${SWEEP_S:-400}" python3 benchmarks/batch_sweep.py --shape "$shape" --layers "$layers" --cap "$cap" \
    --batches "${BATCHES:-1,8,32,64}" --workdir /tmp/bs --out "/tmp/bs-out/$shape" ${SWEEP_ARGS:-} 2>&1 \
    | grep -vE "^\\$" | tail -9
  cp "/tmp/bs-out/$shape/batch.json" "$OUT/batch-$shape.json" 2>/dev/null
  rm -f /tmp/bs/*.img  # the next shape's image needs the disk
done
tar czf "$OUT/batch-logs.tgz" -C /tmp/bs-out --exclude prompts.txt . 2>/dev/null
if [ "${WITH_RETRIEVAL:-1}" = 1 ]; then
  timeout "${RETRIEVAL_S:-300}" python3 benchmarks/retrieval_bench.py --device cuda ${RETRIEVAL_ARGS:-} \
    --out "$OUT/retrieval.json" 2>&1 | tail -14
fi
ls /dev/shm | grep llms || echo "no leftover shared memory"
