# v19, call 2 (docs/perf.md v19): call 1 with all seven projections, the target set whose
# Unsloth figures no call has yet held beside qtrain's: qtrain's defaults (the base kept
# dequantized) and the memory-saving set-up, beside TRL + Liger and Unsloth, all four
# cases, one machine. Peers get two warm-up steps to qtrain's one, as in call 1. With
# the call's time left over, v18-call3's first half: this build's `auto` under a 24 GiB
# cap at 4 x 2048 and 1 x 8192 (q,k,v,o), which offloads to keep every gate/up output.
source "$(dirname "$0")/common.sh"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"; pack
QTRAIN_VARIANTS='=;memsave=--keep-residuals on --keep-mlp off --keep-base off --offload on --mlp-chunk 2048 --loss-chunk 512' \
  PEERS=liger,unsloth PEER_TIMEOUT=260 PEER_ARGS="--warmup ${PEER_WARMUP:-2}" UNSLOTH_ARGS="--warmup ${PEER_WARMUP:-2}" \
  timeout $(( 585 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/A \
  --cases 8x512,4x2048,1x8192,1x32768 --targets all --warmup 1 --steps 3 > /tmp/R/A.out 2>&1
grep -A40 "against the fastest" /tmp/R/A.out | head -40
cat /tmp/R/A/durations.tsv
LEFT=$(( 585 - ($(date +%s) - T0) ))
if [ "$LEFT" -gt 90 ]; then
  timeout "$LEFT" /tmp/qtrain bench --model /tmp/m7b --targets qkvo --warmup 1 --steps 3 \
    --cases 4x2048,1x8192 --memory-limit 24GiB > /tmp/R/cap24-auto.txt 2>&1
  echo "cap24 auto $(( $(date +%s) - T0 )) s"
  grep -o '"case":"[^"]*"\|"tokens_per_s":[0-9.]*\|"capped_peak_mib":[0-9.]*\|"predicted_peak_mib":[0-9.]*\|"mlp_layers_kept":[0-9]*\|"offload_checkpoints":[a-z]*\|"pinned_host_mib":[0-9.]*\|"loss_falls":[a-z]*' /tmp/R/cap24-auto.txt | tr '\n' ' '; echo
fi
finish
