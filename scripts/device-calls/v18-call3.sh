# v18, call 3 (docs/perf.md v18): the build whose `auto` offloads the checkpoints when
# that keeps more (over each GPU's own host link rate: 50 GB/s assumed on an H100/H200)
# under a 24 GiB cap at 4 x 2048 and 1 x 8192, q,k,v,o; then Unsloth with all seven
# projections, the part of call 2's table its time limit cut (merge with call 2's
# directory: python3 scripts/bench_compare_table.py A B).
source "$(dirname "$0")/common.sh"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"; pack
/tmp/qtrain bench --model /tmp/m7b --targets qkvo --warmup 1 --steps 3 --cases 4x2048,1x8192 \
  --memory-limit 24GiB > /tmp/R/cap24-auto.txt 2>&1
echo "cap24 auto $(( $(date +%s) - T0 )) s"; pack
grep -o '"case":"[^"]*"\|"tokens_per_s":[0-9.]*\|"capped_peak_mib":[0-9.]*\|"predicted_peak_mib":[0-9.]*\|"mlp_layers_kept":[0-9]*\|"offload_checkpoints":[a-z]*\|"pinned_host_mib":[0-9.]*\|"loss_falls":[a-z]*' /tmp/R/cap24-auto.txt | tr '\n' ' '; echo
SKIP_QTRAIN=1 PEERS=unsloth PEER_TIMEOUT=330 \
  timeout $(( 440 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/B \
  --cases 8x512,4x2048,1x8192,1x32768 --targets all --warmup 1 --steps 3 > /tmp/R/B.out 2>&1
tail -12 /tmp/R/B.out
finish
