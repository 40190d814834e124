# v20, call 1 (docs/perf.md v20): the stored-dS attention backward (`--attn-bwd stored-ds`:
# the dK/dV kernel writes each tile pair's dS^T, the dQ kernel reads it instead of
# recomputing S and dP). First `qtrain doctor --only attention` (every mode against the CPU
# reference on the hardware, bit-identical twice, and the kernels' times), then the step,
# q,k,v,o, split against stored-ds (the row `qtrain`: at the time a first `auto` that
# picked it) at the attention-bound cases, and the memory-saving set-up with each. qtrain only (PEERS=none): the peers' figures come in call 2.
# Environment: CASES (4x2048,1x8192,1x32768), V20_VARIANTS (bench-compare's QTRAIN_VARIANTS).
source "$(dirname "$0")/common.sh"
timeout 150 /tmp/qtrain doctor --only attention > /tmp/R/doctor.txt 2>&1
echo "doctor rc $? $(( $(date +%s) - T0 )) s"
grep -i "bwd\|fail\|error" /tmp/R/doctor.txt | head -40
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"; pack
MEMSAVE='--keep-residuals on --keep-mlp off --keep-base off --offload on --mlp-chunk 2048 --loss-chunk 512'
QTRAIN_VARIANTS="${V20_VARIANTS:-split=--attn-bwd split;=--attn-bwd stored-ds;memsave=$MEMSAVE --attn-bwd split;memsave-ds=$MEMSAVE --attn-bwd stored-ds}" \
  PEERS=none timeout $(( 585 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/A \
  --cases "${CASES:-4x2048,1x8192,1x32768}" --targets qkvo --warmup 1 --steps 3 > /tmp/R/A.out 2>&1
cat /tmp/R/A/compare.txt
cat /tmp/R/A/durations.tsv
finish
