#!/usr/bin/env bash
# llama.cpp from its source package, trimmed to what a build of llama-bench needs, as one tarball that travels in a
# GPU-machine call's carry (64 MiB in all, with the ~4 MB .whl): the side-by-side comparison of issues 27 and 28
# (benchmarks/gpu_llamacpp_build.sh builds it there, benchmarks/gpu_peer.sh runs both). Runs on a dev machine with
# network access (the GPU machine has none).
#
# The source is llama-cpp-python's sdist (pinned below), whose vendor/llama.cpp is the llama.cpp it was released
# with: a pinned, repeatable tree (git describe does not apply: the sdist holds no .git, so llama-bench reports
# build "unknown"). Kept: CMake files, ggml (its CPU and CUDA backends), src, include, common, vendor, licenses and
# tools/llama-bench. Cut: tests, examples, pocs, docs, media, models/ (vocab files), benches, gguf-py and the
# Python converters, CI files, every other tool (the server's web assets, mtmd ...), the unified "llama" app (it
# links every tool) and the ggml backends a CUDA build does not compile (vulkan metal sycl opencl cann musa hip
# rpc webgpu hexagon openvino zdnn zendnn et virtgpu). tools/CMakeLists.txt and app/CMakeLists.txt are replaced by
# ones that add llama-bench and nothing.
#
# Measured on the 2-core dev machine (2026-12-07), llama-cpp-python 0.3.36: the sdist is 73 MiB, its
# vendor/llama.cpp 176 MiB; trimmed it is 22 MiB, 3.2 MiB as .tar.gz (3,353,770 bytes). With CHECK_BUILD=1 a
# CPU-only configure and build of llama-bench from the tarball (-DGGML_CUDA=OFF -DLLAMA_CURL=OFF, tests, examples
# and server off, -j2, nice, the 2 cores shared with other work) took 2 s + 798 s, and the binary ran: --help
# here, and llama-bench on the SmolLM2 GGUF and on benchmarks/synth_gguf.py's files (tiny, and the 8B shape cut
# to 2 layers) with --repack 0: this VM's CPU lists AMX, whose tile instructions then fault (SIGILL/SIGSEGV) in
# ggml's AMX kernels of a -march=native build. A CUDA configure of the same tarball with this machine's nvcc 13.0
# (benchmarks/gpu_llamacpp_build.sh, cuBLAS from the nvidia-cublas wheel) passed, and the .cu files tried compiled
# for sm_90 (ggml-cuda.cu, mmvq.cu, mmq-instance-q4_k.cu: 35-50 s of CPU each here).
#
# Usage (repo root): bash benchmarks/llamacpp_prepare.sh   -> .llamacpp/llama.cpp-0.3.36.tar.gz
# env: LLAMACPP_DL (where the sdist is, or is downloaded to; /tmp/lcpp), CHECK_BUILD (1: the CPU build check
#      above, in /tmp/llamacpp-check; 0), JOBS (2, for the check)
set -euo pipefail
VERSION=0.3.36  # llama-cpp-python; pinned: what pip found on 2026-12-07
DL=${LLAMACPP_DL:-/tmp/lcpp}
SDIST=$DL/llama_cpp_python-$VERSION.tar.gz
OUT=.llamacpp/llama.cpp-$VERSION.tar.gz
LIMIT_MIB=55  # leaves room for the .whl in a 64 MiB carry

[ -f pyproject.toml ] && [ -d benchmarks ] || { echo "run from the repository root" >&2; exit 2; }
if [ ! -f "$SDIST" ]; then
  mkdir -p "$DL"
  python3 -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DL"
fi
[ -f "$SDIST" ] || { echo "$SDIST: not there after pip download (a different file name?)" >&2; exit 1; }

W=$(mktemp -d /tmp/llamacpp-prep.XXXXXX)
trap 'rm -rf "$W"' EXIT
tar -xzf "$SDIST" -C "$W" "llama_cpp_python-$VERSION/vendor/llama.cpp"
mv "$W/llama_cpp_python-$VERSION/vendor/llama.cpp" "$W/llama.cpp"
T=$W/llama.cpp
echo "vendor/llama.cpp: $(du -sm "$T" | cut -f1) MiB"

( cd "$T"
  rm -rf .github .devops ci docs examples pocs tests benches media models gguf-py conversion scripts skills \
         requirements grammars build-xcframework.sh flake.nix convert_*.py pyproject.toml poetry.lock \
         requirements.txt mypy.ini pyrightconfig.json ty.toml Makefile AUTHORS CODEOWNERS
  for b in cann et hexagon hip metal musa opencl openvino rpc sycl virtgpu vulkan webgpu zdnn zendnn; do
    rm -rf "ggml/src/ggml-$b"
  done
  find tools -mindepth 1 -maxdepth 1 ! -name llama-bench ! -name CMakeLists.txt -exec rm -rf {} +
  rm -rf app/*.cpp
  # the trimmed tree's tools: llama-bench only (the original adds every tool, each needing its own directory)
  cat > tools/CMakeLists.txt <<'EOF'
# trimmed by benchmarks/llamacpp_prepare.sh: llama-bench only
find_package(Threads REQUIRED)
llama_add_compile_flags()
add_subdirectory(llama-bench)
EOF
  # the unified "llama" binary links every tool; the trimmed tree has none of them
  echo "# trimmed by benchmarks/llamacpp_prepare.sh: the unified app links tools this tree does not hold" \
    > app/CMakeLists.txt
)
echo "trimmed: $(du -sm "$T" | cut -f1) MiB"

mkdir -p .llamacpp
tar -czf "$OUT" -C "$W" llama.cpp
size=$(stat -c %s "$OUT")
echo "$OUT: $((size / 1024 / 1024)) MiB ($size bytes)"
if [ "$size" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "$OUT is over $LIMIT_MIB MiB: it would not travel beside the .whl in one carry" >&2
  exit 1
fi

if [ "${CHECK_BUILD:-0}" = 1 ]; then  # the trim must not cut what llama-bench needs: build it, CPU only
  C=/tmp/llamacpp-check
  rm -rf "$C" && mkdir -p "$C" && tar -xzf "$OUT" -C "$C"
  t0=$(date +%s)
  nice cmake -S "$C/llama.cpp" -B "$C/b" -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > "$C/configure.log" 2>&1 \
    || { tail -30 "$C/configure.log"; exit 1; }
  t1=$(date +%s)
  nice cmake --build "$C/b" --target llama-bench -j "${JOBS:-2}" > "$C/build.log" 2>&1 \
    || { grep -m20 -E "error|Error" "$C/build.log"; tail -20 "$C/build.log"; exit 1; }
  t2=$(date +%s)
  "$C/b/bin/llama-bench" --help > /dev/null
  echo "CPU check: configure $((t1 - t0)) s, build of llama-bench $((t2 - t1)) s: $C/b/bin/llama-bench runs"
fi
