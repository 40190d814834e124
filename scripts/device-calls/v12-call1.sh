# v12, call 1 (docs/perf.md v12): qtrain default and memory-saving with TRL + Liger,
# q/k/v/o and all seven; cuBLAS alone (doctor); one profiled step at 4 x 2048.
source "$(dirname "$0")/common.sh"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
/tmp/qtrain doctor --only kernels > /tmp/R/doctor.txt 2>&1; echo "doctor $(( $(date +%s) - T0 )) s"
/tmp/qtrain bench --model /tmp/m7b --cases 4x2048 --targets qkvo --warmup 1 --steps 3 --profile > /tmp/R/profile.txt 2>&1
echo "profile $(( $(date +%s) - T0 )) s"
QTRAIN_VARIANTS='=;lowmem=--keep-residuals off --keep-mlp off --offload on --mlp-chunk 2048' PEERS=liger PEER_TIMEOUT=300 \
  timeout $(( 575 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/A \
  --cases 8x512,4x2048,1x8192,1x32768 --targets qkvo,all --warmup 1 --steps 3 > /tmp/R/A.out 2>&1
tail -40 /tmp/R/A.out
finish
