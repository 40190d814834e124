# v19, call 1 (docs/perf.md v19): the dequantized base kept (`train.keep_dequantized_base
# = "auto"`: every layer's frozen weights stay dequantized after the first step, no NF4
# dequantization after it) against the same build with `--keep-base off`, and the
# memory-saving set-up (now with `--keep-base off`, which it needs from v19 on), beside
# TRL + Liger and Unsloth, q,k,v,o, all four cases, one machine. All seven: run it again
# with TARGETS=all (the call's time does not hold both target sets with Unsloth), or
# v19-call2.sh. The peers get two warm-up steps to qtrain's one (PEER_WARMUP): TRL +
# Liger's first case after a model load ran at half its usual rate in v17 and v18 with
# one, and a second step spent on their start-up can only favour them. Environment:
# TARGETS (qkvo), V19_VARIANTS (qtrain's variants, bench-compare.sh's QTRAIN_VARIANTS),
# CAP24=1 (with the time left, `auto` under a 24 GiB cap at 4 x 2048 and 1 x 8192).
source "$(dirname "$0")/common.sh"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"; pack
MEMSAVE='memsave=--keep-residuals on --keep-mlp off --keep-base off --offload on --mlp-chunk 2048 --loss-chunk 512'
QTRAIN_VARIANTS="${V19_VARIANTS:-=;nobase=--keep-base off;$MEMSAVE}" \
  PEERS=liger,unsloth PEER_TIMEOUT=250 PEER_ARGS="--warmup ${PEER_WARMUP:-2}" UNSLOTH_ARGS="--warmup ${PEER_WARMUP:-2}" \
  timeout $(( 585 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/A \
  --cases 8x512,4x2048,1x8192,1x32768 --targets "${TARGETS:-qkvo}" --warmup 1 --steps 3 > /tmp/R/A.out 2>&1
grep -A40 "against the fastest" /tmp/R/A.out | head -40
cat /tmp/R/A/durations.tsv
LEFT=$(( 585 - ($(date +%s) - T0) ))
if [ "${CAP24:-0}" = 1 ] && [ "$LEFT" -gt 90 ]; then
  timeout "$LEFT" /tmp/qtrain bench --model /tmp/m7b --targets qkvo --warmup 1 --steps 3 \
    --cases 4x2048,1x8192 --memory-limit 24GiB > /tmp/R/cap24-auto.txt 2>&1
  echo "cap24 auto $(( $(date +%s) - T0 )) s"
  grep -o '"case":"[^"]*"\|"tokens_per_s":[0-9.]*\|"capped_peak_mib":[0-9.]*\|"predicted_peak_mib":[0-9.]*\|"mlp_layers_kept":[0-9]*\|"offload_checkpoints":[a-z]*\|"pinned_host_mib":[0-9.]*\|"loss_falls":[a-z]*' /tmp/R/cap24-auto.txt | tr '\n' ' '; echo
fi
finish
