#!/usr/bin/env bash
# One GPU-machine call for the streaming runtime: GPU tests, the mixed-mode debug check, then bench on a
# synthetic Llama-3.1-8B-shaped image (8 layers) in preload (DRAM-resident) and mixed (disk-bound), with
# the original bench's quick-start flags. Usage (repo root, GPU machine, .whl carried): bash benchmarks/gpu_issue3.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_streaming.py tests/test_bench.py -k "gpu or cuda" 2>&1 | tail -25
python3 benchmarks/gpu_debug_mixed.py 2>&1 | grep -v "^\[pool"
img=/tmp/s8.img
python3 launch.py pack --synthetic llama3.1-8b --layers 8 --out $img --quiet
seq 1 4 | sed 's/.*/128000,9906,11,856,836,374,26655,323,358,1093/' > /tmp/prompts.txt
common="--image $img --prompts /tmp/prompts.txt --batch-size 1 --max-new-tokens 16 --max-seq-len 2048 --temperature 0.6 --top-p 0.9 --warmup-rounds 1 --group-prefetch-depth 4 --warmup-layers 4 --staging-mb 64 --topk-blk 8"
python3 launch.py bench $common --mode preload --gpu-cached-layers 0 --gpu-mem-gb 8 --out-json $OUT/preload.json 2>&1 | grep -v "^\[pool" | tail -22
echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
python3 launch.py bench $common --mode mixed --gpu-cached-layers 2 --cpu-cache-layers 3 --prefetch-distance 6 --gpu-mem-gb 8 --out-json $OUT/mixed.json 2>&1 | grep -v "^\[pool" | tail -22
ls /dev/shm | grep llms || echo "no leftover shared memory"
