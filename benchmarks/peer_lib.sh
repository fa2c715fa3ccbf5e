# Sourced by benchmarks/gpu_peer.sh and benchmarks/gpu_moe.sh (ours against llama.cpp on the same GGUF files, one
# GPU-machine call each), after they set R (their results folder): the call's clock and BUDGET, the carried wheels,
# llama.cpp's llama-bench built in the background and waited for (benchmarks/gpu_llamacpp_build.sh), and a
# llama-bench run.
T0=$SECONDS; BUDGET=${BUDGET:-540}
say() { echo "[$((SECONDS - T0)) s] $*"; }
left() {  # seconds what: false (and says so) when less than that is left of the call's BUDGET
  [ $((BUDGET - (SECONDS - T0))) -ge "$1" ] && return 0
  say "skipping $2: it takes ~$1 s, less is left of the ${BUDGET} s budget"; return 1
}
if [ -d .whl ] && ! python3 -c "import gguf, posix_ipc" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
LB=${LLAMA_BENCH:-/tmp/llamacpp/b/bin/llama-bench}

start_llamacpp() {  # the build in the background at nice 19, unless SKIP_LLAMACPP=1 or LLAMA_BENCH names a binary
  if [ "${SKIP_LLAMACPP:-0}" != 1 ] && [ -z "${LLAMA_BENCH:-}" ]; then
    nice -n 19 bash benchmarks/gpu_llamacpp_build.sh > "$R/llamacpp-build.log" 2>&1 &
    say "llama.cpp build started in the background (log $R/llamacpp-build.log)"
  fi
}

wait_llamacpp() {  # 0 once llama-bench can run (built within BUILD_WAIT and the budget, or LLAMA_BENCH); sets FA,
                   # the -fa values it takes (0, and 1 where the build has flash attention's kernels)
  if [ -z "${LLAMA_BENCH:-}" ]; then
    say "waiting for the llama.cpp build"
    local wait_s=$((BUDGET - (SECONDS - T0) - 60))
    [ "$wait_s" -lt "${BUILD_WAIT:-300}" ] || wait_s=${BUILD_WAIT:-300}
    bash benchmarks/gpu_llamacpp_build.sh --wait "$((wait_s > 0 ? wait_s : 0))" \
      || { tail -20 "$R/llamacpp-build.log"; return 1; }
    FA=0; grep -q "^ok .* fa=1$" /tmp/llamacpp/done 2>/dev/null && FA=0,1
    [ -d /tmp/llamacpp/shim/lib ] && export LD_LIBRARY_PATH=/tmp/llamacpp/shim/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  else
    FA=${LLAMACPP_FA_RUN:-0}
  fi
  [ -x "$LB" ] && return 0
  say "no llama-bench (not built, or not at $LB): llama.cpp's runs are skipped"; return 1
}

llama_bench() {  # json log args...: llama-bench args... -o json into json (stderr to log); its exit status
  timeout 300 "$LB" "${@:3}" -o json > "$1" 2> "$2"; local rc=$?
  if [ "$rc" = 132 ] || [ "$rc" = 139 ]; then  # SIGILL/SIGSEGV: AMX listed by a CPU, not enabled by its VM
    say "llama-bench: signal $((rc - 128)); again with --repack 0 (no AMX, no repacked CPU weights)"
    timeout 300 "$LB" "${@:3}" --repack 0 -o json > "$1" 2>> "$2"; rc=$?
  fi
  return "$rc"
}
