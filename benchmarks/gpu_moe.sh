#!/usr/bin/env bash
# Mixtures of experts, ours against llama.cpp on the same GGUF files under a 24 GB card, one GPU-machine call
# (issue 29, its Acceptance). Synthetic GGUFs (benchmarks/synth_gguf.py, llama.cpp's stacked expert tensors, its
# Q4_K_M mix): the Mixtral-8x7B shape with its 32 layers (28.5 GB; a llama GGUF with llama.expert_count) and the
# Qwen3-235B-A22B shape cut to QWEN_LAYERS (8: 12.9 GB of the real 142 GB; qwen3moe). Ours: each packed with
# `launch.py pack` (blocks kept, each expert its own group), `launch.py bench --mode preload` at batch 1, 8 and 32
# under --gpu-mem-gb 24 (a hard cap on PyTorch's allocator; for the cut Qwen3 file the cap less the share of the
# missing layers, benchmarks/moe_compare.py plan), reporting the decode step against the bound from the bytes it
# moved (bench's experts.bound_moved). llama.cpp: built from its source package in the background at the start
# (benchmarks/gpu_llamacpp_build.sh), `llama-bench -ngl 99 --n-cpu-moe M -p 8,32 -n NEW_TOKENS -t 16` on the same
# file, M chosen so that its GPU part is at most 22 GB (moe_compare.py plan: the real model's fewest layers of
# experts left on the CPU, the same share for a cut file). Last, one table (moe_compare.py table): both sides per
# batch, the whole models' tokens/s extrapolated from the cut file and labelled so.
#
# Usage (repo root, GPU machine; carry .whl and .llamacpp):
#   bash benchmarks/gpu_moe.sh
#   DEVICE=cpu bash benchmarks/gpu_moe.sh   # a dry run of the flow on tiny shapes (synth_gguf.py --tiny), no GPU,
#                                           # no llama.cpp: ~2 min on a 2-core machine
# Results (JSON, logs) go to RESULTS (/tmp/moe-results), kept while the machine is warm, and are copied to $OUT
# (/tmp/out) at the end. A file and batch whose result is there already is not run again: the same command a second
# time on the warm machine does what the first call's budget left out. FRESH=1 empties RESULTS first.
# env: DEVICE (cuda; cpu: the dry run), CAP_GB (24: the card), LCPP_GPU_GB (22: llama.cpp's weights on it),
#      BATCHES ("1 8 32"), PROMPT_TOKENS (64 a prompt), NEW_TOKENS (32), MIXTRAL_LAYERS (32; fewer where the disk
#      does not hold the GGUF and its image together, said so), QWEN_LAYERS (8), SKIP_MIXTRAL, SKIP_QWEN,
#      SKIP_OURS, SKIP_LLAMACPP, REPS (3: llama-bench -r), THREADS (16: llama-bench -t), LLAMACPP_FA (0),
#      LLAMA_BENCH (a llama-bench binary instead of building one), LCPP_ARGS (more llama-bench flags), BUILD_WAIT
#      (300 s at most for the build), BUDGET (540 s for the call), TINY (1 with DEVICE=cpu: --tiny shapes),
#      GGUF_DIR (/dev/shm: where a GGUF goes when the disk does not hold it beside its image),
#      W (work folder, /tmp/moe); with TINY=1 the defaults are 2 layers a file, PROMPT_TOKENS 16, NEW_TOKENS 4
#
# Order, for the 64 GiB disk (the Mixtral GGUF and its image together are ~57 GB: one file at a time, its GGUF
# deleted once packed; the GGUF in /dev/shm where the disk does not hold both) and for the build's time: first ours for each file (write the GGUF, pack it, delete the GGUF,
# bench each batch, delete the image) while llama.cpp compiles at nice 19; then llama.cpp's for each file, the GGUF
# written again from the same seed (the same bytes). Estimates on one H100 (16 cores), not measured yet: writing a
# GGUF at 1-2 GB/s (Mixtral 28.5 GB 15-30 s, Qwen3 x8 12.9 GB 7-15 s); packing ~1 GB/s plus 10-30 s for the
# 152k-token vocabulary (Mixtral ~45 s, Qwen3 ~30 s); a bench run 25-45 s (link probes, the DRAM tier's fill,
# a warm-up round and the measured one: 32 tokens, at batch 32 nearly every expert moves each step); llama-bench
# 30-60 s a file (loading it, pp8, pp32, tg32, 3 repetitions). Ours ~5 min, the build 4-7 min beside it, then
# llama.cpp ~2 min: 7-9 min. BUDGET (540 s) bounds the call: a step that would not fit in what is left is skipped
# and the table printed with what ran; the same command again on the warm machine does the rest.
set -uo pipefail
OUT=${OUT:-/tmp/out}; W=${W:-/tmp/moe}; R=${RESULTS:-/tmp/moe-results}
[ "${FRESH:-0}" = 1 ] && rm -rf "$R"
mkdir -p "$OUT" "$W" "$R"
DEVICE=${DEVICE:-cuda}; CAP=${CAP_GB:-24}; LCPP_GB=${LCPP_GPU_GB:-22}; BATCHES=${BATCHES:-1 8 32}
TINY=${TINY:-$([ "$DEVICE" = cpu ] && echo 1 || echo 0)}
if [ "$TINY" = 1 ]; then  # the dry run: few layers, short prompts (a CPU holds each quantized expert at first use)
  PT=${PROMPT_TOKENS:-16}; NT=${NEW_TOKENS:-4}; MIXTRAL_LAYERS=${MIXTRAL_LAYERS:-2}; QWEN_LAYERS=${QWEN_LAYERS:-2}
else
  PT=${PROMPT_TOKENS:-64}; NT=${NEW_TOKENS:-32}
fi
TYPE=q4_k_m
[ "$DEVICE" = cpu ] && SKIP_LLAMACPP=${SKIP_LLAMACPP:-$([ -n "${LLAMA_BENCH:-}" ] && echo 0 || echo 1)}
# rough seconds (H100 machine) for left(): writing and packing a file, one bench run, llama.cpp on a file
declare -A EST=([pack-mixtral]=90 [pack-qwen]=50 [bench-mixtral]=45 [bench-qwen]=35 [lcpp-mixtral]=75
                [lcpp-qwen]=50)
est() { [ "$TINY" = 1 ] && echo 5 || echo "${EST[$1]:-60}"; }
source benchmarks/peer_lib.sh
start_llamacpp
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
df -h "$W" | tail -1

# name preset layers gguf-folder: the files, in the table's order. Each file's GGUF and its image must fit the disk
# together while it is packed: a file of fewer layers where they do not (the whole model extrapolated), unless the
# GGUF fits /dev/shm (RAM; GGUF_DIR) with the image on the disk.
FILES=()
add_file() {  # name preset layers
  local n=$3 g=$W fit
  if [ "$TINY" != 1 ]; then
    read -r n g <<< "$(python3 benchmarks/moe_compare.py layers --preset "$2" --layers "$3" --dir "$W" \
                         --gguf-dir "${GGUF_DIR:-/dev/shm}")"
    [ "$n" -lt "$3" ] && say "the disk holds the GGUF and the image of $2 for $n layers, not $3: $n (the whole model" \
                             "extrapolated)"
  fi
  [ "$n" -ge 1 ] && FILES+=("$1 $2 $n $g")
}
[ "${SKIP_MIXTRAL:-0}" = 1 ] || add_file mixtral mixtral-8x7b "${MIXTRAL_LAYERS:-32}"
[ "${SKIP_QWEN:-0}" = 1 ] || add_file qwen qwen3-235b-a22b "${QWEN_LAYERS:-8}"
for f in "${FILES[@]}"; do say "file: $f"; done
synth() {  # name preset layers folder: writes folder/name.gguf (seed 0) and its sizes to $R/weights-name.json
  local tiny=(); [ "$TINY" = 1 ] && tiny=(--tiny)
  timeout 300 python3 benchmarks/synth_gguf.py --preset "$2" --layers "$3" --type "$TYPE" --seed 0 "${tiny[@]}" \
    --out "$4/$1.gguf" --info-json "$R/weights-$1.json" || { say "$1: writing the GGUF failed"; rm -f "$4/$1.gguf"
                                                             return 1; }
}
todo() {  # name: the batches with no result of ours in RESULTS yet
  local b; for b in $BATCHES; do [ -s "$R/ours-$1-b$b.json" ] || echo "$b"; done
}
cap() {  # name batch: our --gpu-mem-gb for it (moe_compare.py plan's)
  python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['caps'][sys.argv[2]]['gpu_mem_gb'])" \
    "$R/plan-$1.json" "$2"
}

if [ "${SKIP_OURS:-0}" != 1 ]; then
  for f in "${FILES[@]}"; do
    read -r name pre layers gd <<< "$f"
    bs=$(todo "$name"); [ -n "$bs" ] || { say "ours on $name: done by an earlier call ($R)"; continue; }
    left $(($(est "pack-$name") + $(est "bench-$name"))) "ours on $name" || continue
    say "ours: $name ($pre x$layers)"
    synth "$name" "$pre" "$layers" "$gd" || continue
    timeout 400 python3 launch.py pack --checkpoint "$gd/$name.gguf" --out "$W/$name.img" --quiet \
      > "$R/pack-$name.log" 2>&1 || { say "$name: pack failed:"; tail -5 "$R/pack-$name.log"; }
    rm -f "$gd/$name.gguf"
    [ -f "$W/$name.img" ] || continue
    tail -1 "$R/pack-$name.log"
    python3 benchmarks/moe_compare.py prompts --tokenizer "$W/$name.img.tokenizer" --tokens "$PT" \
      --count "$(echo "$BATCHES" | tr ' ' '\n' | sort -n | tail -1)" --out "$W/prompts-$name.txt"
    timeout 120 python3 benchmarks/moe_compare.py plan --info "$R/weights-$name.json" --image "$W/$name.img" \
      --cap-gb "$CAP" --lcpp-gpu-gb "$LCPP_GB" --batches "$(echo $BATCHES | tr ' ' ,)" --max-len $((PT + NT)) \
      --out "$R/plan-$name.json" || { say "$name: plan failed"; continue; }
    for b in $bs; do
      left "$(est "bench-$name")" "ours on $name, batch $b" || continue
      how=(--mode preload --device "$DEVICE"); [ "$DEVICE" = cuda ] && how+=(--gpu-mem-gb "$(cap "$name" "$b")")
      js="$R/ours-$name-b$b.json"
      timeout 300 python3 launch.py bench --image "$W/$name.img" --prompts "$W/prompts-$name.txt" --batch-size "$b" \
        --max-new-tokens "$NT" --warmup-rounds 1 "${how[@]}" --out-json "$js" > "$R/ours-$name-b$b.log" 2>&1 \
        || { say "$name batch $b (ours) failed:"; tail -8 "$R/ours-$name-b$b.log"; rm -f "$js"; continue; }
      python3 -c "import json, sys; r = json.load(open(sys.argv[1])); n = r['decode_tokens_total']
mb = (r.get('experts') or {}).get('bound_moved') or {}
steps = n / r['batch_size']; step = r['decode_ms'] / steps
bound = f'{mb[\"step_ms\"]:.1f} ms ({mb[\"limited_by\"]}), step/bound {step / mb[\"step_ms\"]:.2f}' if mb.get('step_ms') else '-'
print(f'{sys.argv[2]:>8} batch {r[\"batch_size\"]:>2} ours: step {step:7.1f} ms, {n / r[\"decode_ms\"] * 1e3:7.1f} tok/s, '
      f'bound (moved) {bound}')" "$js" "$name"
    done
    rm -f "$W/$name.img" "$W/$name.img.manifest.json"; rm -rf "$W/$name.img.tokenizer"
  done
fi

if [ "${SKIP_LLAMACPP:-0}" != 1 ] && wait_llamacpp; then
    pp=$(for b in $BATCHES; do [ "$b" -gt 1 ] && echo "$b"; done | paste -sd,)
    for f in "${FILES[@]}"; do
      read -r name pre layers gd <<< "$f"
      js="$R/lcpp-$name.json"
      [ -s "$js" ] && { say "llama.cpp on $name: done by an earlier call ($R)"; continue; }
      left "$(est "lcpp-$name")" "llama.cpp on $name" || continue
      say "llama.cpp: $name"
      synth "$name" "$pre" "$layers" "$gd" || continue
      [ -s "$R/plan-$name.json" ] || python3 benchmarks/moe_compare.py plan --info "$R/weights-$name.json" \
        --cap-gb "$CAP" --lcpp-gpu-gb "$LCPP_GB" --out "$R/plan-$name.json"
      m=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['n_cpu_moe'])" "$R/plan-$name.json")
      llama_bench "$js" "$R/lcpp-$name.log" -m "$gd/$name.gguf" -ngl 99 -ncmoe "$m" -n "$NT" -r "${REPS:-3}" \
        -t "${THREADS:-16}" -fa "${LLAMACPP_FA:-0}" -p "${pp:-0}" ${LCPP_ARGS:-}; rc=$?
      rm -f "$gd/$name.gguf"
      [ "$rc" = 0 ] || { say "$name (llama.cpp) failed ($rc):"; tail -8 "$R/lcpp-$name.log"; rm -f "$js"; continue; }
      python3 -c "import json, sys
for r in json.load(open(sys.argv[1])):
    t = f'pp{r[\"n_prompt\"]}' if r['n_prompt'] else f'tg{r[\"n_gen\"]}'
    print(f'{sys.argv[2]:>8} llama.cpp -ncmoe {sys.argv[3]}: {t:>5} {r[\"avg_ts\"]:8.1f} tok/s')" "$js" "$name" "$m"
    done
fi
say "done"
python3 benchmarks/moe_compare.py table --dir "$R"
cp -r "$R"/. "$OUT"/ 2>/dev/null
