#!/usr/bin/env bash
# One GPU-machine call that compares this tree with another copy of the repository (BEFORE, e.g. the commit
# before a restructure, exported with `git archive REV | tar -x -C .before` and carried): this tree's CUDA
# tests, then `launch.py bench --mode preload` of the 8B-shaped image (32 layers, 6 GiB cap) and of the
# 70B-shaped one (8 layers, the emulated 24 GB cap of 7.59 GB), each tree in turn, REPEAT times, on the same
# images; a table of the decode steps (and their bound) last. The images are packed by this tree.
# Usage (repo root, GPU machine, .whl and BEFORE carried): BEFORE=.before bash benchmarks/gpu_compare.sh
# env: REPEAT (2), NEW_TOKENS (32), WITH_TESTS (1), SHAPES ("llama3.1-8b:32:6.442 llama3.1-70b:8:7.59").
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/cmp; mkdir -p "$W"
BEFORE=${BEFORE:?give BEFORE=DIR, a copy of the other tree}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; df -h /tmp | tail -1
if [ "${WITH_TESTS:-1}" = 1 ]; then
  timeout 400 python3 -m pytest -q -p no:cacheprovider --tb=short tests -k "gpu or cuda" 2>&1 \
    | grep -E "^E |passed|failed|FAILED|error" | cut -c1-300 | tail -12
fi
for spec in ${SHAPES:-llama3.1-8b:32:6.442 llama3.1-70b:8:7.59}; do
  IFS=: read -r shape layers cap <<< "$spec"
  python3 launch.py pack --synthetic "$shape" --layers "$layers" --out "$W/$shape.img" --quiet || exit 1
done
seq 1 2 | sed 's/.*/128000,9906,11,856,836,374,26655,323,358,1093/' > "$W/prompts.txt"  # the images have no tokenizer
for rep in $(seq "${REPEAT:-2}"); do
  for tree in "$BEFORE" .; do
    name=$([ "$tree" = . ] && echo after || echo before)
    for spec in ${SHAPES:-llama3.1-8b:32:6.442 llama3.1-70b:8:7.59}; do
      IFS=: read -r shape layers cap <<< "$spec"
      (cd "$tree" && timeout 300 python3 launch.py bench --image "$W/$shape.img" --mode preload --device cuda \
        --prompts "$W/prompts.txt" --gpu-mem-gb "$cap" --max-new-tokens "${NEW_TOKENS:-32}" --workers 4 \
        --out-json "$OUT/$name-$shape-$rep.json" > "$W/$name-$shape-$rep.log" 2>&1) \
        || { echo "$name $shape $rep failed:"; tail -5 "$W/$name-$shape-$rep.log"; }
    done
  done
done
ls /dev/shm | grep llms || echo "no leftover shared memory"
python3 - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
rows = {}
for f in sorted(Path(sys.argv[1]).glob("*-*-*.json")):
    name, rest = f.stem.split("-", 1)
    shape = rest.rsplit("-", 1)[0]
    j = json.loads(f.read_text())
    steps = sorted(j["step_ms"])
    rows.setdefault((shape, name), []).append((statistics.median(steps), j["bound"]["step_ms"],
                                              j["gpu_mem_GB"]["peak_allocated_GB"]))
print("| shape | tree | decode step ms (median of steps, per run) | bound ms | step / bound | GPU peak GB |")
print("|---|---|---|---|---|---|")
for (shape, name), rs in sorted(rows.items()):
    med = statistics.median(r[0] for r in rs)
    print(f"| {shape} | {name} | {' / '.join(f'{r[0]:.1f}' for r in rs)} | {rs[0][1]:.1f} | "
          f"{med / rs[0][1]:.3f} | {max(r[2] for r in rs):.2f} |")
for shape in sorted({s for s, _ in rows}):
    b, a = (statistics.median(r[0] for r in rows.get((shape, n), [(0,)])) for n in ("before", "after"))
    if a and b:
        print(f"{shape}: after / before = {a / b:.3f}")
EOF
