#!/usr/bin/env bash
# Fetch the Python wheels the peers of scripts/bench-compare.sh need on a GPU machine that
# has torch, transformers, PEFT and accelerate but no network (the lent GPU machines), and
# slim the two large ones so that they travel with the xz-compressed qtrain binary.
#
# usage:  scripts/peer-wheels.sh [DIR]        # default DIR: .whl (git-ignored)
# then on the GPU machine (run from the repository root):
#         python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#             --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#
# What each peer needs beyond that machine's packages (pins as issue 22 measured them):
#   liger    bitsandbytes 0.50.2, liger-kernel 0.8.5
#   autocast, plain: bitsandbytes
#   unsloth  bitsandbytes, unsloth 2026.10.9, unsloth_zoo 2026.10.9 and what they import
#            at load: trl, datasets (+ dill, multiprocess), tyro (+ docstring_parser,
#            shtab, typeguard), torchao, cut_cross_entropy, hf_transfer, msgspec
# Every wheel is fetched with --no-deps, so the list below is the whole install: one
# version of each, nothing resolved on the GPU machine.
#
# Slimmed (scripts/slim_wheel.py): bitsandbytes keeps only its CPU and CUDA 13 libraries
# (43 -> 7 MB), unsloth drops Unsloth Studio, a web UI the trainer never imports (29 -> 2 MB).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-.whl}"
PY="${PYTHON:-python3}"

WHEELS=(
  bitsandbytes==0.50.2
  liger-kernel==0.8.5
  unsloth==2026.10.9
  unsloth_zoo==2026.10.9
  trl==1.15.0
  datasets==4.8.4
  dill==0.4.0
  multiprocess==0.70.18
  tyro==0.9.35
  docstring_parser==0.17.0
  shtab==1.7.2
  typeguard==4.4.4
  torchao==0.18.0
  cut_cross_entropy==25.1.1
  hf_transfer==0.1.9
  msgspec==0.19.0
)

RAW="$(mktemp -d)"
trap 'rm -rf "$RAW"' EXIT
# The GPU machine: CPython 3.12 on x86-64 Linux (glibc 2.39); pip matches each manylinux
# tag exactly, so name the ones these wheels are published under.
PLATFORMS=()
for t in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 \
  manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${t}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$RAW" "${WHEELS[@]}" >&2

mkdir -p "$OUT"
for w in "$RAW"/*.whl; do
  case "$(basename "$w")" in
    bitsandbytes-*)
      "$PY" "$HERE/slim_wheel.py" "$w" "$OUT" \
        --drop '^bitsandbytes/libbitsandbytes_(cuda1[12][0-9]|rocm[0-9]+|xpu[0-9]+)\.so$' >/dev/null ;;
    unsloth-*)
      "$PY" "$HERE/slim_wheel.py" "$w" "$OUT" --drop '^studio/' >/dev/null ;;
    *) cp "$w" "$OUT/" ;;
  esac
done
du -ch "$OUT"/*.whl | tail -1 >&2
ls "$OUT" >&2
