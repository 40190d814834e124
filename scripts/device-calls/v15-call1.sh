# v15, call 1 (docs/perf.md v15): the pipelined wgmma forward (`QTRAIN_ATTN_FWD=wgmma8p`)
# checked against the CPU reference and timed by `qtrain doctor --only attention`, then
# the training step with the default forward (wgmma8) and with wgmma8p, q/k/v/o, at the
# lengths where attention counts.
source "$(dirname "$0")/common.sh"
/tmp/qtrain doctor --only attention > /tmp/R/doctor.txt 2>&1; cat /tmp/R/doctor.txt
echo "doctor $(( $(date +%s) - T0 )) s"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"
QTRAIN_VARIANTS='=;p=QTRAIN_ATTN_FWD=wgmma8p' PEERS=none \
  timeout $(( 585 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/A \
  --cases 1x8192,1x32768,4x2048 --targets qkvo --warmup 1 --steps 3 > /tmp/R/A.out 2>&1
tail -20 /tmp/R/A.out
finish
