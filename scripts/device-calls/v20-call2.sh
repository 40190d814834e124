# v20, call 2 (docs/perf.md v20): where the stored-dS backward's time goes. `qtrain doctor
# --only attention` (every mode against the CPU reference on the hardware, and the
# backward's time per mode at 1 x 8192, Mistral heads), then one profiled step at
# 1 x 8192 (q,k,v,o, defaults) with the split and the stored-dS backward.
source "$(dirname "$0")/common.sh"
timeout 200 /tmp/qtrain doctor --only attention > /tmp/R/doctor.txt 2>&1
echo "doctor rc $? $(( $(date +%s) - T0 )) s"
grep -i "speed\|stored\|fail\|error" /tmp/R/doctor.txt | head -30
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"; pack
for M in split stored-ds; do
  timeout 120 /tmp/qtrain bench --model /tmp/m7b --targets qkvo --warmup 1 --steps 2 \
    --profile --cases 1x8192 --attn-bwd $M > /tmp/R/prof-$M.txt 2>&1
  echo "== $M rc $? $(( $(date +%s) - T0 )) s"
  grep -o '"tokens_per_s":[0-9.]*' /tmp/R/prof-$M.txt
  grep -i "attn\|attention\|total" /tmp/R/prof-$M.txt | head -20
done
finish
