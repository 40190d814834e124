#!/usr/bin/env bash
# Builds and runs the CPU emulation of crates/qtrain-device/src/ops/attention/attention.cu (see attention_emu.cpp).
# usage: crates/qtrain-device/src/ops/attention/emu/run.sh [quick]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${TMPDIR:-/tmp}/qtrain-attention-emu"
"${CXX:-g++}" -std=c++20 -O2 -pthread -DQT_EMU -Wall -Wno-unknown-pragmas \
  -I "$HERE/.." "$HERE/attention_emu.cpp" -o "$OUT"
exec "$OUT" "$@"
