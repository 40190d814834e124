# v18, call 2 (docs/perf.md v18): qtrain's defaults and the memory-saving set-up
# (`memsave`: the attention half kept and offloaded with the checkpoints, the MLP in
# chunks of 2048 tokens, the loss in chunks of 512 rows) beside TRL + Liger and Unsloth
# in one bench-compare, all four cases, both target sets, on one machine (v17-call1.sh
# with the v17/v18 build: partial gate/up keep, offload to keep more).
source "$(dirname "$0")/common.sh"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"; pack
QTRAIN_VARIANTS='=;memsave=--keep-residuals on --keep-mlp off --offload on --mlp-chunk 2048 --loss-chunk 512' \
  PEERS=liger,unsloth PEER_TIMEOUT=330 \
  timeout $(( 585 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/A \
  --cases 8x512,4x2048,1x8192,1x32768 --targets qkvo,all --warmup 1 --steps 3 > /tmp/R/A.out 2>&1
grep -A40 "against the fastest" /tmp/R/A.out | head -40
cat /tmp/R/A/durations.tsv
finish
