# v12, call 2 (docs/perf.md v12): qtrain default and memory-saving with Unsloth, q/k/v/o
# and all seven. Merge with call 1: python3 scripts/bench_compare_table.py --out AB B A
source "$(dirname "$0")/common.sh"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
QTRAIN_VARIANTS='=;lowmem=--keep-residuals off --keep-mlp off --offload on --mlp-chunk 2048' PEERS=unsloth \
  timeout $(( 575 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/B \
  --cases 8x512,4x2048,1x8192,1x32768 --targets qkvo,all --warmup 1 --steps 3 > /tmp/R/B.out 2>&1
tail -40 /tmp/R/B.out
finish
