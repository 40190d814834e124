# v12, call 3: qtrain defaults with TRL + Liger and Unsloth in one call, q/k/v/o and all
# seven (fits one 600 s call on an H100/H200 without the memory-saving variant).
source "$(dirname "$0")/common.sh"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"
PEERS=liger,unsloth PEER_TIMEOUT=330 \
  timeout $(( 580 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/C \
  --cases 8x512,4x2048,1x8192,1x32768 --targets qkvo,all --warmup 1 --steps 3 > /tmp/R/C.out 2>&1
tail -25 /tmp/R/C.out
finish
