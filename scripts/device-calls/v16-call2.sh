# v16, call 2 (docs/perf.md v16): first what `auto` now picks for 1 x 32768 under a
# 24 GiB cap (the checkpoints offloaded so that the attention half can be kept), then
# the memory-saving set-up with the attention half kept and offloaded (`lowkeep`)
# beside TRL + Liger and Unsloth in one bench-compare, all four cases, q/k/v/o (the
# target set with the smaller lead; both sets with both peers do not fit what was left
# of the session's device time), on one machine. qtrain's defaults are unchanged by
# v16: their same-call ratios are the v13 table's.
source "$(dirname "$0")/common.sh"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"; pack
timeout 60 /tmp/qtrain bench --model /tmp/m7b --cases 1x32768 --targets qkvo \
  --warmup 1 --steps 2 --memory-limit 24GiB > /tmp/R/cap24-auto.txt 2>&1
grep -o '"attention_residuals_kept":[a-z]*\|"offload_checkpoints":[a-z]*\|"tokens_per_s":[0-9]*\|"capped_peak_mib":[0-9]*\|"pinned_host_mib":[0-9]*' /tmp/R/cap24-auto.txt | tr '\n' ' '; echo
echo "cap24 $(( $(date +%s) - T0 )) s"; pack
QTRAIN_VARIANTS='lowkeep=--keep-residuals on --keep-mlp off --offload on --mlp-chunk 2048' \
  PEERS=liger,unsloth PEER_TIMEOUT=230 \
  timeout $(( 540 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/B \
  --cases 8x512,4x2048,1x8192,1x32768 --targets qkvo --warmup 1 --steps 3 > /tmp/R/B.out 2>&1
grep -A40 "against the fastest" /tmp/R/B.out | head -40
cat /tmp/R/B/durations.tsv
finish
