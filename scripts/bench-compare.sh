#!/usr/bin/env bash
# qtrain against the reference stack (transformers + PEFT + bitsandbytes), same GPU, same run.
#
#   scripts/bench-compare.sh QTRAIN_BINARY OUT_DIR [--cases 8x512,4x2048,1x8192]
#       [--targets qkvo,all] [--warmup 2] [--steps 5] [--model /tmp/m7b]
#
# 1. generates the Mistral-7B-shaped random model with `qtrain init-random` if absent;
# 2. runs scripts/peer_qlora.py on the cases for every target set (one model load);
# 3. runs `qtrain bench` once per target set (qkvo = q/k/v/o_proj, all = the seven);
# 4. prints the comparison (scripts/bench_compare_table.py): tokens/s of both, the
#    ratio, and peak memory (each tool's own figure and nvidia-smi's whole-device peak
#    inside each case's time window; nvidia-smi is sampled every 100 ms meanwhile).
# The reference runs first so that its numbers exist even if qtrain's long cases run
# out of time; killed by SIGTERM (e.g. `timeout`), the script still prints the table
# of what finished. bitsandbytes must be importable (the carried wheel, see
# peer_qlora.py). Environment: SKIP_QTRAIN=1 / SKIP_PEER=1 skip a side; QTRAIN_ARGS /
# PEER_ARGS add arguments (e.g. QTRAIN_ARGS="--peak-tflops 790", PEER_ARGS="--autocast none").
# Files in OUT_DIR: gpu.txt, init.log, peer.{jsonl,log}, qtrain-T.{jsonl,stamped,start,log},
# smi-*.csv, compare.txt, compare.json.
set -uo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,20p' "$0" >&2
  exit 2
fi
BIN="$1"; OUT="$2"; shift 2
CASES="8x512,4x2048,1x8192"; TARGETS="qkvo,all"; WARMUP=2; STEPS=5; MODEL=/tmp/m7b
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || { echo "bench-compare.sh: \`$1\` needs a value" >&2; exit 2; }
  case "$1" in
    --cases) CASES="$2" ;;
    --targets) TARGETS="$2" ;;
    --warmup) WARMUP="$2" ;;
    --steps) STEPS="$2" ;;
    --model) MODEL="$2" ;;
    *) echo "bench-compare.sh: unknown argument \`$1\` (known: --cases, --targets, --warmup, --steps, --model)" >&2; exit 2 ;;
  esac
  shift 2
done
TSETS=()
for T in ${TARGETS//,/ }; do
  case "$T" in
    qkvo|all) TSETS+=("$T") ;;
    *) echo "bench-compare.sh: --targets takes qkvo and/or all, comma separated (got \`$T\`)" >&2; exit 2 ;;
  esac
done
[ ${#TSETS[@]} -gt 0 ] || { echo "bench-compare.sh: --targets is empty" >&2; exit 2; }
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="/usr/local/cuda/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
RC=0

if [ "${SKIP_PEER:-0}" != 1 ] && ! python3 -c 'import bitsandbytes' 2>/dev/null; then
  echo "bench-compare.sh: bitsandbytes is not importable; first run" >&2
  echo "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$OUT/gpu.txt"

SMI=""
smi_start() {  # $1: tag
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/smi-$1.csv" &
  SMI=$!
}
smi_stop() {
  if [ -n "$SMI" ]; then kill "$SMI" 2>/dev/null; wait "$SMI" 2>/dev/null; SMI=""; fi
}
compare() {
  echo "== comparison"
  python3 "$HERE/bench_compare_table.py" "$OUT" | tee "$OUT/compare.txt"
  echo "peak GPU memory used per run (MiB, whole device):"
  for f in "$OUT"/smi-*.csv; do
    [ -f "$f" ] && echo "  $(basename "$f" .csv): $(cut -d, -f2 "$f" | sort -n | tail -1)"
  done
}
trap smi_stop EXIT
trap 'smi_stop; echo "bench-compare.sh: stopped by a signal; the table has what finished" >&2; compare; exit 124' TERM INT
# Each stdout line of a tool, prefixed by when it arrived (the end of that case).
stamp() {
  while IFS= read -r line; do printf '%s\t%s\n' "$(date +%s.%N)" "$line"; done
}

if [ ! -f "$MODEL/config.json" ]; then
  echo "== generating $MODEL"
  "$BIN" init-random --preset mistral-7b-v0.3 --out "$MODEL" 2>&1 | tee "$OUT/init.log"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "qtrain init-random failed" >&2; exit 1; }
fi

if [ "${SKIP_PEER:-0}" != 1 ]; then
  echo "== transformers + PEFT + bitsandbytes, targets ${TSETS[*]}"
  smi_start peer
  # shellcheck disable=SC2086
  python3 "$HERE/peer_qlora.py" --model "$MODEL" --cases "$CASES" --targets "${TSETS[@]}" \
    --rank 16 --warmup "$WARMUP" --steps "$STEPS" --json-out "$OUT/peer.jsonl" ${PEER_ARGS:-} \
    > /dev/null 2> "$OUT/peer.log"
  R=$?
  smi_stop
  sed -n '/^transformers .* + peft .* + bitsandbytes /,$p' "$OUT/peer.log"
  if [ "$R" != 0 ]; then echo "peer_qlora.py exited $R; log tail:"; tail -15 "$OUT/peer.log"; RC=1; fi
fi

if [ "${SKIP_QTRAIN:-0}" != 1 ]; then
  for T in "${TSETS[@]}"; do
    if [ "$T" = qkvo ]; then TL=q_proj,k_proj,v_proj,o_proj
    else TL=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; fi
    echo "== qtrain bench, targets $T"
    smi_start "qtrain-$T"
    date +%s.%N > "$OUT/qtrain-$T.start"
    # shellcheck disable=SC2086
    "$BIN" bench --model "$MODEL" --preset mistral-7b-v0.3 --cases "$CASES" --targets "$TL" \
      --rank 16 --warmup "$WARMUP" --steps "$STEPS" ${QTRAIN_ARGS:-} 2> "$OUT/qtrain-$T.log" \
      | tee "$OUT/qtrain-$T.jsonl" | stamp > "$OUT/qtrain-$T.stamped"
    R=${PIPESTATUS[0]}
    smi_stop
    cat "$OUT/qtrain-$T.jsonl"
    if [ "$R" != 0 ]; then echo "qtrain bench ($T) exited $R; log tail:"; tail -5 "$OUT/qtrain-$T.log"; RC=1; fi
  done
fi

compare
exit $RC
