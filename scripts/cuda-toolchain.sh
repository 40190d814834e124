#!/usr/bin/env bash
# The CUDA 13.0 build toolchain for a machine without a GPU (or without a CUDA toolkit):
# what the `cuda` feature needs to compile, from the repository alone.
#
# Installs nvcc 13.0 from PyPI (NVIDIA's nvidia-cuda-nvcc wheels) into a private venv, and
# builds link stubs for libcuda / libcublas / libcublasLt / libcurand / libnvrtc /
# libcudart / libnccl from the symbol lists in scripts/cuda-stubs/ (read off the real
# libraries of a CUDA 13.0 / driver 580 / NCCL 2.28 GPU machine). candle's cudarc links
# these libraries dynamically, so a binary built here needs them only at link time; on
# the GPU machine the real libraries are found through LD_LIBRARY_PATH (see
# scripts/cuda-device-env.sh).
#
# usage:  eval "$(scripts/cuda-toolchain.sh)"     # prints the exports; idempotent
#         then: cargo build --release --features cuda
# env:    QTRAIN_CUDA_HOME  install dir (default: $HOME/.cache/qtrain-cuda13)
#         CUDA_COMPUTE_CAP  target SM (default 90 = H100/H200; 86 = A10/A10G/RTX30,
#                           89 = L4/RTX40, 80 = A100, 75 = T4)
# needs:  python3 with venv and pip, gcc, network access to PyPI on the first run.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${QTRAIN_CUDA_HOME:-$HOME/.cache/qtrain-cuda13}"
VENV="$ROOT/venv"
STUBS="$ROOT/stubs"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" >&2
fi
SP="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
CU="$SP/nvidia/cu13"
if [ ! -x "$CU/bin/nvcc" ]; then
  # Pin every piece to 13.0: the target GPU machines run driver 580 (CUDA 13.0); a newer
  # nvcc emits PTX that driver cannot load.
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
fi

mkdir -p "$STUBS"
for f in "$HERE"/cuda-stubs/*.syms; do
  soname="$(basename "$f" .syms)"          # e.g. libcublas.so.13
  base="${soname%%.so*}"                    # e.g. libcublas
  out="$STUBS/$base.so"
  if [ ! -f "$out" ] || [ "$f" -nt "$out" ]; then
    awk '/^[A-Za-z_][A-Za-z0-9_]*$/ {print "void " $1 "(void){}"}' "$f" > "$STUBS/$base.c"
    gcc -shared -fPIC -o "$out" "$STUBS/$base.c" -Wl,-soname,"$soname"
    rm -f "$STUBS/$base.c"
  fi
done

cat <<EXPORTS
export PATH="$CU/bin:\$PATH"
export CUDA_ROOT="$CU" CUDA_PATH="$CU" CUDA_HOME="$CU" CUDA_TOOLKIT_ROOT_DIR="$CU"
export CUDARC_CUDA_VERSION=13000
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$STUBS:$CU/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
EXPORTS
