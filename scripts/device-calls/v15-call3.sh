# v15, call 3 (docs/perf.md v15): the pipelined wgmma forwards, one warpgroup per CTA
# (`wgmma4p`: two CTAs per SM, Q kept in the third stage's K slot) and two (`wgmma8p`),
# checked against the CPU reference (and bit for bit against their unpipelined kernels)
# and timed by `qtrain doctor --only attention`, then the training step with the default
# forward (wgmma8) and with wgmma4p, then wgmma8p and the unpipelined one-warpgroup
# kernel (wgmma), q/k/v/o, the most telling lengths first.
source "$(dirname "$0")/common.sh"
/tmp/qtrain doctor --only attention > /tmp/R/doctor.txt 2>&1; grep -i "wgmma\|speed\|fail\|passed" /tmp/R/doctor.txt
echo "doctor $(( $(date +%s) - T0 )) s"; pack
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"
QTRAIN_VARIANTS='=;p4=QTRAIN_ATTN_FWD=wgmma4p' PEERS=none \
  timeout $(( 400 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/A \
  --cases 1x8192,1x32768,4x2048 --targets qkvo --warmup 1 --steps 3 > /tmp/R/A.out 2>&1
grep -A10 "against the fastest" /tmp/R/A.out | grep qkvo
echo "bench A $(( $(date +%s) - T0 )) s"; pack
QTRAIN_VARIANTS='p8=QTRAIN_ATTN_FWD=wgmma8p;w4=QTRAIN_ATTN_FWD=wgmma' PEERS=none \
  timeout $(( 400 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/B \
  --cases 1x8192,1x32768,4x2048 --targets qkvo --warmup 1 --steps 3 > /tmp/R/B.out 2>&1
grep -A10 "against the fastest" /tmp/R/B.out | grep qkvo
finish
