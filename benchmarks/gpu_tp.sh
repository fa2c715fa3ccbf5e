#!/usr/bin/env bash
# One call on a machine with 2+ GPUs for tensor parallelism (issue 21). NOT YET RUN: no such machine was lent.
# The aggregate H2D link (each GPU alone and all at once: launch.py probe --devices), then 8B-shaped and
# 70B-shaped (8 layers) DRAM-resident decode at 1 and 2 GPUs with the same per-GPU cap, each step against the
# bound from the measured aggregate (acceptance: at most 1.10x), outputs equal to the 1-GPU run.
# Usage (repo root, GPU machine, .whl carried): bash benchmarks/gpu_tp.sh
# env: RANKS (2), SHAPES ("8b 70b")
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/tp; mkdir -p "$W"
N=${RANKS:-2}
nvidia-smi --query-gpu=index,name,memory.total,pci.bus_id --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -12
DEVS=$(seq -s, 0 $((N - 1)))
timeout 200 python3 launch.py probe --shape llama3.1-8b --devices "$DEVS" --workers-list 1 --read-mb-list 16 \
  --out-json "$OUT/probe-tp.json" > "$W/probe.log" 2>&1 || { echo "probe failed:"; tail -8 "$W/probe.log"; }
grep "links alone" "$W/probe.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_tensor_parallel.py 2>&1 | tail -3
for s in ${SHAPES:-8b 70b}; do
  case $s in
    8b) args="--shape llama3.1-8b --layers 32 --cap 6" ;;
    70b) args="--shape llama3.1-70b --layers 8 --cap 8" ;;
  esac
  timeout 400 python3 benchmarks/tp_decode.py $args --ranks "$N" --workdir "$W/$s" --out-json "$OUT/tp-$s.json" \
    || echo "tp_decode $s: failed, differed or above 1.10x the bound"
  rm -rf "$W/$s"  # the disk holds one shape's images at a time
done
