# v17, call 3 (docs/perf.md v17): the backward no longer recomputes the SwiGLU output
# when nothing reads it (down without an adapter). The memory-saving set-up before
# (the build of call 1, .carry/qtrain-v17a.xz) and after, beside TRL + Liger, q,k,v,o,
# all four cases, one machine.
source "$(dirname "$0")/common.sh"
unpack .carry/qtrain-v17a.xz /tmp/qtrain-v17a
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"; pack
MEMSAVE='--keep-residuals on --keep-mlp off --offload on --mlp-chunk 2048 --loss-chunk 512'
ARGS=(--cases 8x512,4x2048,1x8192,1x32768 --targets qkvo --warmup 1 --steps 3)
QTRAIN_VARIANTS="memsave-before=$MEMSAVE" PEERS=none \
  scripts/bench-compare.sh /tmp/qtrain-v17a /tmp/R/B "${ARGS[@]}" > /tmp/R/B.out 2>&1
echo "before $(( $(date +%s) - T0 )) s"; pack
QTRAIN_VARIANTS="memsave=$MEMSAVE" PEERS=liger PEER_TIMEOUT=200 \
  timeout $(( 420 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/C "${ARGS[@]}" > /tmp/R/C.out 2>&1
python3 scripts/bench_compare_table.py /tmp/R/B /tmp/R/C 2>&1 | head -12
cat /tmp/R/C/durations.tsv
finish
