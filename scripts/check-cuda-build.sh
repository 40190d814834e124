#!/usr/bin/env bash
# The CUDA half of CI, on a machine without a GPU: every kernels/*.cu compiles to PTX for
# each compute capability qtrain supports with CUDA 13 (7.5 T4, 8.0 A100, 8.6 A10/RTX 30,
# 8.9 L4/RTX 40, 9.0 H100/H200; CUDA 13 has no 7.0 target, a V100 build needs CUDA 12),
# with the flags of crates/qtrain-device/build.rs, and the `cuda` feature build of the
# whole binary is clippy clean. Needs ../shared/cuda/toolchain.sh (nvcc from PyPI, link
# stubs). The first run compiles candle's own kernels (~14 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(../shared/cuda/toolchain.sh)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for cap in 75 80 86 89 90; do
  for src in kernels/*.cu; do
    nvcc --ptx -O3 -std=c++17 -arch="compute_$cap" -I kernels -o "$tmp/k.ptx" "$src" ||
      { echo "error: $src does not compile for compute capability $cap" >&2; exit 1; }
  done
  echo "kernels/*.cu compile for compute_$cap"
done
CUDA_COMPUTE_CAP=90 cargo clippy --release --workspace --all-targets --features qtrain-cli/cuda -- -D warnings
