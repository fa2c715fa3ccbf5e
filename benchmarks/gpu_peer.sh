#!/usr/bin/env bash
# Ours against llama.cpp on the same GGUF files, one GPU-machine call (issues 27 and 28, their Acceptance): synthetic
# Llama-shaped GGUFs (benchmarks/synth_gguf.py) of 32 layers: the 8B shape in bf16 and in Q4_K_M, the 70B shape in
# Q4_K_M (~17 GB); and ours alone, the 8B bf16 file packed as our int4 (group 64, the output matrix too; against
# the HBM bound). Ours: each packed with `launch.py pack` (blocks kept), `launch.py bench --mode full` (CUDA graphs
# on), and for the 70B shape also `--mode preload --gpu-cached-layers 17` (issue 28's split: a 24 GB card's share
# of an 80-layer 70B). llama.cpp: built from its source package in the background at the start
# (benchmarks/gpu_llamacpp_build.sh), `llama-bench -ngl 99` and `-ngl 17 -t 16`, `-p 512 -n 64 -r 3`, with
# `-fa 0` (and `-fa 1` when built with flash attention). Both take the same 512-token prompt length and 64 decode
# tokens. Last, one table (benchmarks/peer_compare.py): tokens/s of decode and prefill of both, their ratio, and
# the HBM bound of a decode step (its bytes / a device-to-device copy bandwidth measured in this call).
#
# Usage (repo root, GPU machine; carry .whl and .llamacpp):
#   bash benchmarks/gpu_peer.sh
# Results (JSON, logs) go to RESULTS (/tmp/peer-results), kept while the machine is warm, and are copied to $OUT
# (/tmp/out) at the end. A file and setting whose result is there already is not run again: the same command run
# a second time on the warm machine does what the first call's budget left out (the build found done), and its
# table holds both calls' rows. FRESH=1 empties RESULTS first (a new start, or other settings).
# env: SKIP_BF16 SKIP_INT4 SKIP_8B SKIP_70B (a file), SKIP_SPLIT (the -ngl 17 / preload runs), SKIP_CPU (ours with
#      --cpu-compute CPU_COMPUTE, auto, beside the split: issue 28), ONLY (settings to run, e.g. "split cpu"),
#      SKIP_OURS, SKIP_LLAMACPP
#      (a side), LAYERS (32), GPU_LAYERS (17), THREADS (16, llama.cpp's -t in the split), PROMPT_TOKENS (512),
#      NEW_TOKENS (64), REPS (3, llama-bench -r), LLAMACPP_FA (0: see gpu_llamacpp_build.sh), BUILD_WAIT (300 s at
#      most for the build), BUDGET (540 s for the whole call), LLAMA_BENCH (a llama-bench binary to use instead of
#      building one; LLAMACPP_FA_RUN its -fa list, 0), LCPP_ARGS (more llama-bench flags), DEVICE (cuda; cpu for
#      a dry run of the flow on a machine without a GPU), PRESET8 / PRESET70 (the shapes: llama3.1-8b,
#      llama3.1-70b), W (work folder for the GGUFs and images, /tmp/peer)
#
# Order, for the 64 GiB disk (at most one GGUF and one image at a time, 34 GB for the 70B shape) and for the
# build's time: first ours for each file (write the GGUF, pack it, delete the GGUF, bench, delete the image) while
# llama.cpp compiles (at nice 19, so our runs keep the cores they ask for; the compile still takes memory
# bandwidth and page cache: rerun with SKIP_LLAMACPP=1 on the warm machine to check ours alone); then llama.cpp's
# for each file, the GGUF written again from the same seed (the same bytes: synth_gguf.py is deterministic).
# Estimates on one H100 (16 cores), not measured yet: writing a GGUF at 1-2 GB/s (8B bf16 16 GB, 8B Q4_K_M 4.9 GB,
# 70B 17 GB); packing: gguf's reader parses the 128k-token vocabulary twice (~10-30 s; 14 s a read on the dev
# machine) and a BF16 GGUF goes through fp32 (the 8B bf16 pack ~1 min); each of our bench runs 20-45 s (link
# probes, load, a warmup round, the measured one); llama-bench 15-40 s a file and setting. Ours ~4.5 min, the
# build 4-7 min beside it (gpu_llamacpp_build.sh), then llama.cpp ~2 min (+1 min with -fa 1): 7-10 min. BUDGET
# (540 s) bounds the call: a step that would not fit in what is left is skipped, and the table printed with what
# ran; the same command again on the warm machine does the rest (see RESULTS above).
set -uo pipefail
OUT=${OUT:-/tmp/out}; W=${W:-/tmp/peer}; R=${RESULTS:-/tmp/peer-results}
[ "${FRESH:-0}" = 1 ] && rm -rf "$R"
mkdir -p "$OUT" "$W" "$R"
DEVICE=${DEVICE:-cuda}; LAYERS=${LAYERS:-32}; NGL=${GPU_LAYERS:-17}; PT=${PROMPT_TOKENS:-512}; NT=${NEW_TOKENS:-64}
# rough seconds per file on the H100 machine (write, pack, bench; llama.cpp: write again, llama-bench), for left()
declare -A EST=([ours-8b-bf16]=120 [ours-8b-int4]=100 [ours-8b-q4km]=60 [ours-70b-q4km]=150 [ours-split]=60 [ours-cpu]=60
                [lcpp-8b-bf16]=45 [lcpp-8b-q4km]=30 [lcpp-70b-q4km]=45 [lcpp-split]=60)
est() { echo "${EST[$1]:-30}"; }
source benchmarks/peer_lib.sh
start_llamacpp
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$DEVICE" = cuda ]; then python3 benchmarks/peer_compare.py hbm --out "$R/hbm.json"; else rm -f "$R/hbm.json"; fi

# name preset type: the files, in the table's order
FILES=()
[ "${SKIP_8B:-0}" = 1 ] || { [ "${SKIP_BF16:-0}" = 1 ] || FILES+=("8b-bf16 ${PRESET8:-llama3.1-8b} bf16")
                             [ "${SKIP_INT4:-0}" = 1 ] || FILES+=("8b-int4 ${PRESET8:-llama3.1-8b} bf16")
                             FILES+=("8b-q4km ${PRESET8:-llama3.1-8b} q4_k_m"); }
[ "${SKIP_70B:-0}" = 1 ] || FILES+=("70b-q4km ${PRESET70:-llama3.1-70b} q4_k_m")
synth() {  # name preset type: writes $W/name.gguf (seed 0) and its sizes to $R/weights-name.json, or fails
  timeout 180 python3 benchmarks/synth_gguf.py --preset "$2" --layers "$LAYERS" --type "$3" --seed 0 \
    --out "$W/$1.gguf" --info-json "$R/weights-$1.json" || { say "$1: writing the GGUF failed"; rm -f "$W/$1.gguf"
                                                               return 1; }
}
splits() {  # side name: the settings this file runs: every layer on the GPU; for the 70B shape the split, and
            # (ours) the split with the CPU computing DRAM-tier groups in place (--cpu-compute)
  echo gpu; [ "${SKIP_SPLIT:-0}" = 1 ] || [[ $2 != 70b* ]] || echo split
  [ "${SKIP_SPLIT:-0}" = 1 ] || [ "${SKIP_CPU:-0}" = 1 ] || [ "$1" != ours ] || [[ $2 != 70b* ]] || echo cpu
}
todo() {  # side name: the settings of file name with no result of side (ours, lcpp) in RESULTS yet (and in ONLY)
  local s; for s in $(splits "$1" "$2"); do
    [ -s "$R/$1-$2-$s.json" ] || [[ -n ${ONLY:-} && " $ONLY " != *" $s "* ]] || echo "$s"
  done
}

if [ "${SKIP_OURS:-0}" != 1 ]; then
  for f in "${FILES[@]}"; do
    read -r name pre ty <<< "$f"
    ss=$(todo ours "$name"); [ -n "$ss" ] || { say "ours on $name: done by an earlier call ($R)"; continue; }
    left "$(est "ours-$name")" "ours on $name" || continue
    say "ours: $name"
    synth "$name" "$pre" "$ty" || continue
    q=(); [[ $name == *-int4 ]] && q=(--quantize int4 --group-size 64 --quantize-output)  # ours: no llama.cpp run
    timeout 300 python3 launch.py pack --checkpoint "$W/$name.gguf" --out "$W/$name.img" --quiet "${q[@]}" \
      > "$R/pack-$name.log" 2>&1 || { say "$name: pack failed:"; tail -5 "$R/pack-$name.log"; }
    [ ${#q[@]} = 0 ] || python3 benchmarks/peer_compare.py image-weights --image "$W/$name.img" \
      --out "$R/weights-$name.json"
    rm -f "$W/$name.gguf"
    [ -f "$W/$name.img" ] || continue
    tail -1 "$R/pack-$name.log"
    # every file has the same vocabulary: one prompt, from the first image's tokenizer (the bench's own)
    [ -f "$W/prompt.txt" ] || python3 benchmarks/peer_compare.py prompt --tokenizer "$W/$name.img.tokenizer" \
      --tokens "$PT" --out "$W/prompt.txt"
    for s in $ss; do
      [ "$s" = gpu ] || left "$(est "ours-$s")" "ours on $name, $s" || continue
      if [ "$s" = gpu ]; then
        how=(--mode full); [ "$DEVICE" = cuda ] && how+=(--cuda-graphs on)
      else
        how=(--mode preload --gpu-cached-layers "$NGL")
        [ "$s" = cpu ] && how+=(--cpu-compute "${CPU_COMPUTE:-auto}")
      fi
      js="$R/ours-$name-$s.json"
      timeout 300 python3 launch.py bench --image "$W/$name.img" --prompts "$W/prompt.txt" --device "$DEVICE" \
        --max-new-tokens "$NT" --warmup-rounds 1 "${how[@]}" --out-json "$js" > "$R/ours-$name-$s.log" 2>&1 \
        || { say "$name $s (ours) failed:"; tail -8 "$R/ours-$name-$s.log"; rm -f "$js"; continue; }
      python3 -c "import json, sys; r = json.load(open(sys.argv[1])); n = r['decode_tokens_total']
print(f'{sys.argv[2]:>9} {sys.argv[3]:>5} ours: decode {n / r[\"decode_ms\"] * 1e3:7.1f} tok/s, prefill '
      f'{r[\"prefill_tokens_total\"]} tokens at {r[\"prefill_tokens_total\"] / r[\"prefill_ms\"] * 1e3:7.0f} tok/s')" \
        "$js" "$name" "$s"
    done
    rm -f "$W/$name.img" "$W/$name.img.manifest.json"; rm -rf "$W/$name.img.tokenizer"
  done
fi

if [ "${SKIP_LLAMACPP:-0}" != 1 ] && wait_llamacpp; then
    for f in "${FILES[@]}"; do
      read -r name pre ty <<< "$f"
      [[ $name == *-int4 ]] && continue  # our format: llama.cpp reads its Q4_K_M file beside it
      ss=$(todo lcpp "$name"); [ -n "$ss" ] || { say "llama.cpp on $name: done by an earlier call ($R)"; continue; }
      left "$(est "lcpp-$name")" "llama.cpp on $name" || continue
      say "llama.cpp: $name"
      synth "$name" "$pre" "$ty" || continue
      for s in $ss; do
        [ "$s" = gpu ] || left "$(est lcpp-split)" "llama.cpp on $name, split" || continue
        ngl=(-ngl 99); [ "$s" = split ] && ngl=(-ngl "$NGL" -t "${THREADS:-16}")
        js="$R/lcpp-$name-$s.json"
        llama_bench "$js" "$R/lcpp-$name-$s.log" -m "$W/$name.gguf" "${ngl[@]}" -p "$PT" -n "$NT" -r "${REPS:-3}" \
          -fa "$FA" ${LCPP_ARGS:-}; rc=$?
        [ "$rc" = 0 ] || { say "$name $s (llama.cpp) failed ($rc):"; tail -8 "$R/lcpp-$name-$s.log"; rm -f "$js"
                           continue; }
        python3 -c "import json, sys
for r in json.load(open(sys.argv[1])):
    print(f'{sys.argv[2]:>9} {sys.argv[3]:>5} llama.cpp -fa {r[\"flash_attn\"]}: pp{r[\"n_prompt\"]} tg{r[\"n_gen\"]} '
          f'{r[\"avg_ts\"]:8.1f} tok/s')" "$js" "$name" "$s"
      done
      rm -f "$W/$name.gguf"
    done
fi
say "done"
python3 benchmarks/peer_compare.py table --dir "$R"
cp -r "$R"/. "$OUT"/ 2>/dev/null
