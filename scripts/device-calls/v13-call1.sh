# v13, call 1 (docs/perf.md v13 and the same-call table): the v12 build
# (.carry/qtrain-v12.xz) over the four cases, then v13 (.carry/qtrain.xz) with
# TRL + Liger and Unsloth in one bench-compare, q/k/v/o and all seven, on one machine;
# between them, which attention kernels the peers' torch runs (sdpa_probe.py).
source "$(dirname "$0")/common.sh"
unpack .carry/qtrain-v12.xz /tmp/qtrain-v12
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"
ARGS=(--cases 8x512,4x2048,1x8192,1x32768 --targets qkvo,all --warmup 1 --steps 3)
PEERS=none scripts/bench-compare.sh /tmp/qtrain-v12 /tmp/R/V12 "${ARGS[@]}" > /tmp/R/V12.out 2>&1
echo "v12 $(( $(date +%s) - T0 )) s"
timeout 60 python3 "$(dirname "$0")/sdpa_probe.py" > /tmp/R/sdpa.txt 2>&1; cat /tmp/R/sdpa.txt
PEERS=liger,unsloth PEER_TIMEOUT=330 \
  timeout $(( 585 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/C "${ARGS[@]}" > /tmp/R/C.out 2>&1
tail -25 /tmp/R/C.out
finish
