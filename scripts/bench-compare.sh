#!/usr/bin/env bash
# qtrain against every peer (transformers+PEFT+bitsandbytes recipes, Unsloth), same GPU, same run.
#
#   scripts/bench-compare.sh QTRAIN_BINARY OUT_DIR [--cases 8x512,4x2048,1x8192]
#       [--targets qkvo,all] [--warmup 2] [--steps 5] [--model /tmp/m7b]
#       [--peers autocast,liger,unsloth[,plain]]
#
# 1. generates the Mistral-7B-shaped random model with `qtrain init-random` if absent;
# 2. runs `qtrain bench` once per target set (qkvo = q/k/v/o_proj, all = the seven),
#    for every variant in QTRAIN_VARIANTS;
# 3. runs scripts/peer_qlora.py once for its recipes among --peers (autocast = TRL's
#    bf16=True set-up, liger = the same with liger-kernel, plain = no autocast; one
#    process, as few model loads as the libraries allow), then scripts/peer_unsloth.py
#    if --peers names unsloth, each on every case and target set;
# 4. prints one table (scripts/bench_compare_table.py): every tool's tokens/s and peak
#    memory per case and target set, and qtrain's ratios against the FASTEST peer and
#    the LOWEST-memory peer of each case (nvidia-smi is sampled every 100 ms meanwhile:
#    memory, and the SM clock, power and power-limit share each tool ran at).
# qtrain runs first (it is the quickest), Unsloth last (the slowest to start). A peer
# that fails to import, errors or runs out of memory is recorded as such (its JSON
# lines say so) and the others go on. Killed by SIGTERM/SIGINT (wrap it in
# `timeout 570` under a 600 s device limit), the script still prints the table of what
# finished; PEER_TIMEOUT=S (default 0 = none) bounds each peer process on its own.
# Results of two commands merge: `python3 scripts/bench_compare_table.py DIR1 DIR2`.
#
# Environment: SKIP_QTRAIN=1 / SKIP_PEER=1 skip a side; PEERS is --peers' default
# (autocast,liger,unsloth; `none` runs no peer); QTRAIN_ARGS add arguments to every
# qtrain bench (e.g. "--peak-tflops 790"); QTRAIN_VARIANTS, `;`-separated NAME=ARGS,
# runs qtrain bench once per variant, labelled qtrain-NAME (an empty NAME is plain
# `qtrain`), e.g. QTRAIN_VARIANTS='=;lowmem=--keep-residuals off --keep-mlp off'; ARGS
# may start with NAME=VALUE words, set in that run's environment only, e.g.
# 'wgmma=QTRAIN_ATTN_FWD=wgmma8 QTRAIN_ATTN_SPLIT=wgmma' (the Hopper attention kernels);
# PEER_ARGS / UNSLOTH_ARGS add arguments to peer_qlora.py / peer_unsloth.py;
# ARCHIVE=FILE.tgz packs OUT_DIR into it at the end (also when stopped by a signal):
# the device tool brings back at most 8 files of $OUT, and OUT_DIR holds about 20.
# The peers need wheels the GPU machine lacks (bitsandbytes, liger-kernel, trl, unsloth,
# ...): `scripts/peer-wheels.sh .whl` fetches and slims them where pip reaches PyPI;
# carry .whl and install them there first (pip install --no-index --no-deps --target
# /tmp/site .whl/*.whl, PYTHONPATH=/tmp/site; the script's header has the line).
#
# Files in OUT_DIR: gpu.txt, init.log, QTOOL-T.{jsonl,stamped,start,log} per qtrain
# variant and target set, peer-hf.{jsonl,log}, peer-unsloth.{jsonl,log}, smi-*.csv,
# durations.tsv (seconds per phase), compare.txt, compare.json, compare.md.
#
# Expected wall time on one H200 for --cases 8x512,4x2048,1x8192 --targets qkvo
# --warmup 1 --steps 3, plus ~15 s to pip-install the carried wheels (estimates from
# the v3-v6 runs in docs/perf.md and the libraries' start-up; durations.tsv records
# the real ones, the table prints them): init-random ~25 s; qtrain ~45 s (load ~15 s);
# peer-hf autocast+liger ~3.5 min (imports ~20 s, two loads of ~50 s since Liger's
# classes need their own, Triton compilation ~30 s, steps ~20 s), plain adds ~1 min
# (no extra load; its 1 x 8192 steps take ~6 s each); unsloth ~3-4 min (import ~45 s,
# load ~50 s, Triton and torch.compile warm-up ~60-90 s, steps ~15 s). In all about
# 8 min without plain, 9 min with it: too close to a 10-minute command to rely on, so
# split it:
#   A: PEERS=autocast,liger,plain                (qtrain + HF peers, ~6 min)
#   B: SKIP_QTRAIN=1 PEERS=unsloth                (~4.5 min, init-random included)
# and merge the two OUT_DIRs: python3 scripts/bench_compare_table.py DIR_A DIR_B.
# --targets qkvo,all doubles every peer's steps and adds one Unsloth load (~1 min).
set -uo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,57p' "$0" >&2
  exit 2
fi
BIN="$1"; OUT="$2"; shift 2
CASES="8x512,4x2048,1x8192"; TARGETS="qkvo,all"; WARMUP=2; STEPS=5; MODEL=/tmp/m7b
PEERS="${PEERS:-autocast,liger,unsloth}"
while [ $# -gt 0 ]; do
  [ $# -ge 2 ] || { echo "bench-compare.sh: \`$1\` needs a value" >&2; exit 2; }
  case "$1" in
    --cases) CASES="$2" ;;
    --targets) TARGETS="$2" ;;
    --warmup) WARMUP="$2" ;;
    --steps) STEPS="$2" ;;
    --model) MODEL="$2" ;;
    --peers) PEERS="$2" ;;
    *) echo "bench-compare.sh: unknown argument \`$1\` (known: --cases, --targets, --warmup, --steps, --model, --peers)" >&2; exit 2 ;;
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
HF_RECIPES=""; RUN_UNSLOTH=0
[ "${SKIP_PEER:-0}" = 1 ] && PEERS=none
for P in ${PEERS//,/ }; do
  case "$P" in
    autocast|liger|plain) HF_RECIPES="${HF_RECIPES:+$HF_RECIPES,}$P" ;;
    unsloth) RUN_UNSLOTH=1 ;;
    none) ;;
    *) echo "bench-compare.sh: --peers takes autocast, liger, plain, unsloth or none, comma separated (got \`$P\`)" >&2; exit 2 ;;
  esac
done
VARIANTS=()
IFS=';' read -ra VARIANTS <<< "${QTRAIN_VARIANTS:-=}"
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=("=")
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="/usr/local/cuda/targets/x86_64-linux/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
export PYTHONUNBUFFERED=1
RC=0
: > "$OUT/durations.tsv"

if { [ -n "$HF_RECIPES" ] || [ "$RUN_UNSLOTH" = 1 ]; } && ! python3 -c 'import bitsandbytes' 2>/dev/null; then
  echo "bench-compare.sh: warning: bitsandbytes is not importable (the peers will record the import error); first run" >&2
  echo "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site" >&2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$OUT/gpu.txt"

SMI=""
smi_start() {  # $1: tag
  # memory for the peaks; utilization, SM clock, power and the clock-limit reasons so
  # the table shows each tool's clock under the power cap (docs/perf.md v12)
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu,clocks.sm,power.draw,clocks_event_reasons.active \
    --format=csv,noheader,nounits -lms 100 > "$OUT/smi-$1.csv" &
  SMI=$!
}
smi_stop() {
  if [ -n "$SMI" ]; then kill "$SMI" 2>/dev/null; wait "$SMI" 2>/dev/null; SMI=""; fi
}
PHASE_T0=0
phase_start() { PHASE_T0=$(date +%s.%N); }
phase_end() {  # $1: phase name, $2: note
  awk -v a="$PHASE_T0" -v b="$(date +%s.%N)" -v p="$1" -v n="${2:-}" \
    'BEGIN { printf "%s\t%.1f\t%s\n", p, b - a, n }' >> "$OUT/durations.tsv"
}
compare() {
  echo "== comparison"
  python3 "$HERE/bench_compare_table.py" "$OUT" | tee "$OUT/compare.txt"
  echo "peak GPU memory used per run (MiB, whole device):"
  for f in "$OUT"/smi-*.csv; do
    [ -f "$f" ] && echo "  $(basename "$f" .csv): $(cut -d, -f2 "$f" | sort -n | tail -1)"
  done
  if [ -n "${ARCHIVE:-}" ]; then
    tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "archived $OUT in $ARCHIVE"
  fi
}
trap smi_stop EXIT
trap 'smi_stop; echo "bench-compare.sh: stopped by a signal; the table has what finished" >&2; compare; exit 124' TERM INT
# Each stdout line of a tool, prefixed by when it arrived (the end of that case).
stamp() {
  while IFS= read -r line; do printf '%s\t%s\n' "$(date +%s.%N)" "$line"; done
}
# A peer process, bounded by PEER_TIMEOUT when set; its exit status.
run_peer() {
  if [ "${PEER_TIMEOUT:-0}" != 0 ]; then timeout "$PEER_TIMEOUT" "$@"; else "$@"; fi
}

if [ ! -f "$MODEL/config.json" ]; then
  echo "== generating $MODEL"
  phase_start
  "$BIN" init-random --preset mistral-7b-v0.3 --out "$MODEL" 2>&1 | tee "$OUT/init.log"
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "qtrain init-random failed" >&2; exit 1; }
  phase_end init-random
fi

if [ "${SKIP_QTRAIN:-0}" != 1 ]; then
  for V in "${VARIANTS[@]}"; do
    NAME="${V%%=*}"; VARGS=""
    [[ "$V" == *=* ]] && VARGS="${V#*=}"
    Q="qtrain${NAME:+-$NAME}"
    for T in "${TSETS[@]}"; do
      if [ "$T" = qkvo ]; then TL=q_proj,k_proj,v_proj,o_proj
      else TL=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; fi
      echo "== $Q bench, targets $T${VARGS:+ ($VARGS)}"
      smi_start "$Q-$T"
      phase_start
      date +%s.%N > "$OUT/$Q-$T.start"
      # Leading NAME=VALUE words of a variant are its environment (kernel choices such
      # as QTRAIN_ATTN_FWD), the rest are bench arguments.
      VENV=(); VREST=()
      for W in $VARGS; do
        if [ ${#VREST[@]} = 0 ] && [[ "$W" =~ ^[A-Z_][A-Z0-9_]*= ]]; then VENV+=("$W"); else VREST+=("$W"); fi
      done
      # shellcheck disable=SC2086
      env ${VENV[@]+"${VENV[@]}"} "$BIN" bench --model "$MODEL" --preset mistral-7b-v0.3 --cases "$CASES" --targets "$TL" \
        --rank 16 --warmup "$WARMUP" --steps "$STEPS" ${QTRAIN_ARGS:-} ${VREST[@]+"${VREST[@]}"} 2> "$OUT/$Q-$T.log" \
        | tee "$OUT/$Q-$T.jsonl" | stamp > "$OUT/$Q-$T.stamped"
      R=${PIPESTATUS[0]}
      smi_stop
      phase_end "$Q-$T" "exit $R"
      cat "$OUT/$Q-$T.jsonl"
      if [ "$R" != 0 ]; then echo "$Q bench ($T) exited $R; log tail:"; tail -5 "$OUT/$Q-$T.log"; RC=1; fi
    done
  done
fi

if [ -n "$HF_RECIPES" ]; then
  echo "== transformers + PEFT + bitsandbytes: recipes $HF_RECIPES, targets ${TSETS[*]}"
  smi_start peer-hf
  phase_start
  # shellcheck disable=SC2086
  run_peer python3 "$HERE/peer_qlora.py" --model "$MODEL" --cases "$CASES" --targets "${TSETS[@]}" \
    --recipes "$HF_RECIPES" --rank 16 --warmup "$WARMUP" --steps "$STEPS" --json-out "$OUT/peer-hf.jsonl" \
    ${PEER_ARGS:-} > /dev/null 2> "$OUT/peer-hf.log"
  R=$?
  smi_stop
  phase_end "peer-hf($HF_RECIPES)" "exit $R"
  sed -n '/^transformers+peft+bitsandbytes.*: torch /,$p' "$OUT/peer-hf.log"
  if [ "$R" != 0 ]; then echo "peer_qlora.py exited $R; log tail:"; tail -15 "$OUT/peer-hf.log"; RC=1; fi
fi

if [ "$RUN_UNSLOTH" = 1 ]; then
  echo "== Unsloth, targets ${TSETS[*]}"
  smi_start peer-unsloth
  phase_start
  # shellcheck disable=SC2086
  run_peer python3 "$HERE/peer_unsloth.py" --model "$MODEL" --cases "$CASES" --targets "${TSETS[@]}" \
    --rank 16 --warmup "$WARMUP" --steps "$STEPS" --json-out "$OUT/peer-unsloth.jsonl" \
    ${UNSLOTH_ARGS:-} > "$OUT/peer-unsloth.stdout" 2> "$OUT/peer-unsloth.log"
  R=$?
  smi_stop
  phase_end peer-unsloth "exit $R"
  sed -n '/^unsloth.*: torch /,$p' "$OUT/peer-unsloth.log"
  if [ "$R" != 0 ]; then echo "peer_unsloth.py exited $R; log tail:"; tail -15 "$OUT/peer-unsloth.log"; RC=1; fi
fi

compare
exit $RC
