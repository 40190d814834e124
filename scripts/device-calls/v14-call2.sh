# v14, call 2 (docs/perf.md v14): qtrain with the v14 kernels beside TRL + Liger and
# Unsloth in one bench-compare, q/k/v/o and all seven, four cases (the qtrain variant's
# arguments in V14_ARGS, e.g. "--attn-bwd fused-atomic"; empty: the defaults).
source "$(dirname "$0")/common.sh"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"
QTRAIN_VARIANTS="v14=${V14_ARGS:-}" PEERS=liger,unsloth PEER_TIMEOUT=330 \
  timeout $(( 585 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/C \
  --cases 8x512,4x2048,1x8192,1x32768 --targets qkvo,all --warmup 1 --steps 3 > /tmp/R/C.out 2>&1
tail -25 /tmp/R/C.out
finish
