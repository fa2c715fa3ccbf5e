#!/usr/bin/env bash
# Build llama.cpp's llama-bench with CUDA (sm_90) on the GPU machine, from the trimmed source tarball that
# benchmarks/llamacpp_prepare.sh writes under .llamacpp/ (name .llamacpp in the call's carry). Meant to start in the
# background at the top of a call, so the rest of the call (writing and packing GGUFs) overlaps the compile:
#
#   bash benchmarks/gpu_llamacpp_build.sh > /tmp/llamacpp-build.log 2>&1 &
#   ... ; bash benchmarks/gpu_llamacpp_build.sh --wait 420   # returns once built (0) or failed / 420 s passed (1)
#
# Leaves /tmp/llamacpp/b/bin/llama-bench and the marker /tmp/llamacpp/done: one line, "ok SECONDS fa=0|1" or
# "failed SECONDS fa=0|1 (see LOG)". /tmp lives as long as the machine is warm: a later call finds the marker and
# the build is not repeated (unless LLAMACPP_FA differs or the marker says failed).
#
# env: LLAMACPP_FA (0, the default: no flash-attention CUDA kernels, GGML_CUDA_FA=OFF: their 37 files then
#      compile empty; 1: with them, only the default quant pairs (GGML_CUDA_FA_ALL_QUANTS=OFF), for llama-bench
#      -fa 1: minutes longer (not timed), best built in an earlier call on the warm machine), JOBS (16), LLAMACPP_TARBALL (the newest .llamacpp/llama.cpp-*.tar.gz), LIBCUDA (the
#      driver's libcuda.so.1 where ldconfig does not list it)
# Not yet timed on the GPU machine (the first run records the seconds in the marker). On the 2-core dev machine,
# whose nvcc is the same 13.0, this configure passed and every object compiled for sm_90 without FA (290 objects,
# 144 of them .cu; only the final link failed, against a stand-in libcuda.so without symbols): ~7000 s of one
# core (-j2 at nice 19 beside other work; an mmq instance 60-120 s), so an estimated 4-7 min at -j16.
D=/tmp/llamacpp
MARK=$D/done

wait_llamacpp() {  # $1: seconds to wait at most; 0 once built, 1 otherwise
  local t0=$SECONDS
  while [ ! -f "$MARK" ] && [ $((SECONDS - t0)) -lt "${1:-420}" ]; do sleep 5; done
  [ -f "$MARK" ] && echo "llama.cpp build: $(cat "$MARK")" || echo "llama.cpp build: not done after ${1:-420} s"
  grep -q '^ok' "$MARK" 2>/dev/null
}

if [ "${1:-}" = --wait ]; then
  wait_llamacpp "${2:-420}"
  exit $?
fi

set -uo pipefail
exec 9> /tmp/llamacpp.lock  # one build at a time: a second start while one runs leaves it to finish
flock -n 9 || { echo "a llama.cpp build is already running here: wait for it with --wait"; exit 0; }
FA=${LLAMACPP_FA:-0}
if grep -q "^ok .* fa=$FA\$" "$MARK" 2>/dev/null && [ -x "$D/b/bin/llama-bench" ]; then
  echo "llama.cpp already built here: $(cat "$MARK")"; exit 0
fi
fail() { mkdir -p "$D"; echo "failed 0 fa=$FA ($1)" > "$MARK"; echo "$1" >&2; exit 1; }
TARBALL=${LLAMACPP_TARBALL:-$(ls -t .llamacpp/llama.cpp-*.tar.gz 2>/dev/null | head -1)}
[ -n "$TARBALL" ] && [ -f "$TARBALL" ] \
  || fail "no .llamacpp/llama.cpp-*.tar.gz: run benchmarks/llamacpp_prepare.sh on the dev machine, carry .llamacpp"
NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null | head -1)
[ -n "$NVCC" ] || fail "no nvcc on PATH or in /usr/local/cuda/bin"
rm -rf "$D" && mkdir -p "$D" && tar -xzf "$TARBALL" -C "$D"

# ggml-cuda links CUDA::cublas and CUDA::cuda_driver, which CMake looks for as libcublas.so and libcuda.so in the
# toolkit. A toolkit assembled from NVIDIA's pip wheels (this workplace's images: /usr/local/cuda-13.0 holds nvcc,
# the runtime and CCCL) has neither: cuBLAS is in the nvidia-cublas wheel torch loads, without the unversioned
# .so a linker looks for, and a container's driver brings libcuda.so.1 only. Then a shim folder gives the
# unversioned names (and the build cuBLAS's headers); it is also llama-bench's RPATH.
S=$D/shim/lib; EXTRA=(); INC=
mkdir -p "$S"
if ! ls /usr/local/cuda/include/cublas_v2.h /usr/local/cuda/targets/*/include/cublas_v2.h \
       "${CUDA_HOME:-/nonexistent}/include/cublas_v2.h" > /dev/null 2>&1; then
  HDR=$(python3 -c "import glob, site, sys
for d in site.getsitepackages() + sys.path:
    for h in glob.glob(d + '/nvidia/**/include/cublas_v2.h', recursive=True):
        print(h); raise SystemExit" 2>/dev/null)
  if [ -n "$HDR" ]; then
    INC=$(dirname "$HDR")
    for f in "$(dirname "$INC")"/lib/libcublas*.so*; do
      ln -sf "$f" "$S/$(basename "$f")"; ln -sf "$f" "$S/$(basename "$f" | sed 's/\.so\..*/.so/')"
    done
    EXTRA+=(-DCMAKE_C_FLAGS="-I$INC" -DCMAKE_CXX_FLAGS="-I$INC" -DCMAKE_CUDA_FLAGS="-I$INC")
    echo "cuBLAS: the pip package's, $INC (the CUDA toolkit has none)"
  else
    echo "no cuBLAS in the CUDA toolkit nor in a pip nvidia package: the configure will fail" >&2
  fi
fi
if ! ls /usr/local/cuda/lib64/stubs/libcuda.so /usr/local/cuda/targets/*/lib/stubs/libcuda.so > /dev/null 2>&1 \
   && ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so '; then
  DRV=${LIBCUDA:-$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')}
  DRV=${DRV:-$(ls /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 2>/dev/null | head -1)}
  if [ -n "$DRV" ]; then ln -sf "$DRV" "$S/libcuda.so"; echo "libcuda.so: $DRV"
  else echo "no libcuda.so.1 (no driver?): the configure will fail" >&2; fi
fi
EXTRA+=(-DCMAKE_LIBRARY_PATH="$S")
GEN=$(command -v ninja > /dev/null && echo "-G Ninja")
t0=$SECONDS
echo "building llama-bench from $TARBALL with $NVCC ($("$NVCC" --version | tail -1)), fa=$FA, -j${JOBS:-16}"
FA_FLAGS="-DGGML_CUDA_FA=$([ "$FA" = 1 ] && echo ON || echo OFF) -DGGML_CUDA_FA_ALL_QUANTS=OFF"
# shellcheck disable=SC2086  # GEN and FA_FLAGS are lists of words
if cmake -S "$D/llama.cpp" -B "$D/b" $GEN -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
     -DCMAKE_CUDA_COMPILER="$NVCC" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
     -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF $FA_FLAGS "${EXTRA[@]}" > "$D/configure.log" 2>&1 \
   && cmake --build "$D/b" --target llama-bench -j "${JOBS:-16}" > "$D/build.log" 2>&1 \
   && "$D/b/bin/llama-bench" --help > /dev/null 2>&1; then
  echo "ok $((SECONDS - t0)) fa=$FA" > "$MARK.tmp"
else
  tail -25 "$D/configure.log" "$D/build.log" 2>/dev/null
  echo "failed $((SECONDS - t0)) fa=$FA (see $D/configure.log, $D/build.log)" > "$MARK.tmp"
fi
mv "$MARK.tmp" "$MARK"
cat "$MARK"
grep -q '^ok' "$MARK"
