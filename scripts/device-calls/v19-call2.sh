# v19, call 2 (docs/perf.md v19): call 1 with all seven projections, the target set whose
# Unsloth figures no call has yet held beside qtrain's: qtrain's defaults (the base kept
# dequantized) and the memory-saving set-up, beside TRL + Liger and Unsloth, all four
# cases, one machine. Peers get two warm-up steps to qtrain's one, as in call 1. With
# the call's time left over, v18-call3's first half: this build's `auto` under a 24 GiB
# cap at 4 x 2048 and 1 x 8192 (q,k,v,o), which offloads to keep every gate/up output.
TARGETS=all CAP24=1 \
  V19_VARIANTS='=;memsave=--keep-residuals on --keep-mlp off --keep-base off --offload on --mlp-chunk 2048 --loss-chunk 512' \
  exec bash "$(dirname "$0")/v19-call1.sh"
