#!/usr/bin/env bash
# GPU benchmark driver for a machine with a qtrain CUDA binary but no Rust toolchain.
#
#   scripts/bench-gpu.sh QTRAIN_BINARY OUT_DIR [bench args...]
#
# Runs `qtrain doctor` (every kernel and a training step against the CPU reference),
# then `qtrain bench` on the Mistral-7B-shaped random model (generated on first use),
# sampling GPU memory with nvidia-smi every 100 ms so the report carries the peak.
# Results: OUT_DIR/doctor.txt (GPU and checks), OUT_DIR/bench.jsonl, OUT_DIR/bench.log
# (ends with the peak memory); the raw memory samples stay in $TMPDIR.
set -uo pipefail
BIN="$1"; OUT="$2"; shift 2
mkdir -p "$OUT"
export LD_LIBRARY_PATH="/usr/local/cuda/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
MEM="${TMPDIR:-/tmp}/qtrain-memory.$$.csv"
# DOCTOR=0 skips the checks (when several cases run one after another).
if [ "${DOCTOR:-1}" != 0 ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv; "$BIN" doctor 2>&1; } | tee "$OUT/doctor.txt"
fi
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 100 > "$MEM" &
SMI=$!
"$BIN" bench "$@" 2> "$OUT/bench.log" | tee "$OUT/bench.jsonl"
RC=${PIPESTATUS[0]}
kill $SMI 2>/dev/null
echo "peak GPU memory used (MiB, whole device): $(cut -d, -f2 "$MEM" | sort -n | tail -1)" | tee -a "$OUT/bench.log"
tail -5 "$OUT/bench.log"
exit $RC
