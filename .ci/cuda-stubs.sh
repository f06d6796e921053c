#!/usr/bin/env bash
# Link-time stand-ins for the CUDA libraries, for building test, bench and example binaries with
# `--features cuda` on a machine without a GPU driver (nothing here is ever run).
#
# cudarc (candle's CUDA binding) links libcuda, libnvrtc, libcublas, libcublasLt, libcurand and
# libcudart by name. Only libcudart comes with the PyPI toolkit (linked here as it is); libcuda
# is the driver and the others are large wheels. This script compiles one small shared library
# defining every CUDA symbol cudarc's already-built rlib references, under each of those names,
# into target/cuda-stubs; point the linker there with LIBRARY_PATH (which does not change cargo's
# fingerprints, so nothing is rebuilt). Prints the directory.
set -euo pipefail
deps="${CARGO_TARGET_DIR:-target}/debug/deps"
out="${CARGO_TARGET_DIR:-target}/cuda-stubs"
mkdir -p "$out"
shopt -s nullglob
rlibs=("$deps"/libcudarc-*.rlib)
if [ ${#rlibs[@]} -eq 0 ]; then
  echo "no cudarc rlib under $deps: build the libraries with --features cuda first" >&2
  exit 1
fi
nm --undefined-only "${rlibs[@]}" 2>/dev/null |
  awk '$1 == "U" { print $2 }' |
  grep -E '^(cu|nvrtc|cublas|curand)[A-Za-z0-9_]*$' |
  sort -u |
  sed 's/.*/void &(void) {}/' >"$out/stubs.c"
cc -shared -fPIC -o "$out/libcudastub.so" "$out/stubs.c"
for lib in cuda nvrtc cublas cublasLt curand; do
  cp "$out/libcudastub.so" "$out/lib$lib.so"
done
# The runtime is real (the toolkit's wheel has it, versioned only): candle's static kernels
# library calls into it.
runtime=$(ls "${CUDA_ROOT:?source .ci/cuda-env.sh first}"/lib/libcudart.so.* | head -n 1)
ln -sf "$runtime" "$out/libcudart.so"
echo "$(wc -l <"$out/stubs.c") stub symbols in $out" >&2
echo "$out"
