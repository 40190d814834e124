# v14, call 1 (docs/perf.md v14): the fused wgmma backward (`--attn-bwd fused-atomic` on
# Hopper) checked against the CPU reference and timed by `qtrain doctor --only attention`,
# then the training step with the defaults and with the fused backward, q/k/v/o, four
# cases. (As run at commit 8eae88d it also had the 128-key-tile forward, since removed as
# wrong on the hardware: a third variant 'faw=QTRAIN_ATTN_FWD=wgmma8w --attn-bwd fused-atomic'.)
source "$(dirname "$0")/common.sh"
/tmp/qtrain doctor --only attention > /tmp/R/doctor.txt 2>&1; cat /tmp/R/doctor.txt
echo "doctor $(( $(date +%s) - T0 )) s"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"
QTRAIN_VARIANTS='=;fa=--attn-bwd fused-atomic' PEERS=none \
  timeout $(( 585 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/A \
  --cases 8x512,4x2048,1x8192,1x32768 --targets qkvo --warmup 1 --steps 3 > /tmp/R/A.out 2>&1
tail -20 /tmp/R/A.out
finish
