#!/usr/bin/env bash
# The CUDA half of CI, on a machine without a GPU: every CUDA kernel (the `.cu` files
# under crates/: qtrain-device's ops and qtrain-optim's AdamW update) compiles to PTX for
# each compute capability qtrain supports with CUDA 13 (7.5 T4, 8.0 A100, 8.6 A10/RTX 30,
# 8.9 L4/RTX 40, 9.0 H100/H200; CUDA 13 has no 7.0 target, a V100 build needs CUDA 12),
# with the flags of crates/qtrain-device/build_ptx.rs, and the `cuda` feature build of
# the whole binary is clippy clean. The toolchain comes from scripts/cuda-toolchain.sh
# (nvcc 13.0 from PyPI, link stubs; installed once). The first run compiles candle's own
# kernels (~14 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda-toolchain.sh)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mapfile -t sources < <(find crates -name '*.cu' | sort)
[ "${#sources[@]}" -gt 0 ] || { echo "error: no .cu files under crates/" >&2; exit 1; }
for cap in 75 80 86 89 90; do
  for src in "${sources[@]}"; do
    nvcc --ptx -O3 -std=c++17 -arch="compute_$cap" -I crates/qtrain-device/src/ops -o "$tmp/k.ptx" "$src" ||
      { echo "error: $src does not compile for compute capability $cap" >&2; exit 1; }
  done
  echo "${#sources[@]} kernels compile for compute_$cap"
done
# Files with Hopper-only kernels (wgmma) have a second build for compute_90a (see
# build_ptx.rs, SM90A_MARKER); ptxas assembles it, which checks the wgmma operands, and
# must not serialize the wgmma instructions (its "Potential Performance Loss" warning).
for src in "${sources[@]}"; do
  grep -q QTRAIN_SM90A_VARIANT "$src" || continue
  nvcc --ptx -O3 -std=c++17 -arch=compute_90a -DQTRAIN_SM90A_VARIANT -I crates/qtrain-device/src/ops \
    -o "$tmp/k90a.ptx" "$src" || { echo "error: $src does not compile for compute_90a" >&2; exit 1; }
  ptxas -arch=sm_90a -v "$tmp/k90a.ptx" -o "$tmp/k90a.cubin" 2> "$tmp/ptxas.log" ||
    { cat "$tmp/ptxas.log" >&2; echo "error: ptxas rejects $src's sm_90a build" >&2; exit 1; }
  if grep -qi "serialized" "$tmp/ptxas.log"; then
    cat "$tmp/ptxas.log" >&2; echo "error: ptxas serializes wgmma in $src" >&2; exit 1
  fi
  echo "$src: sm_90a build assembles ($(grep -c 'Compiling entry' "$tmp/ptxas.log") kernels)"
done
CUDA_COMPUTE_CAP=90 cargo clippy --release --workspace --all-targets --features qtrain-cli/cuda -- -D warnings
