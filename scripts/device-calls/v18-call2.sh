# v18, call 2 (docs/perf.md v18): v17-call1.sh with the v18 build (partial gate/up keep,
# offload to keep more): qtrain's defaults and the memory-saving set-up beside TRL +
# Liger and Unsloth, all four cases, both target sets, one machine.
exec bash "$(dirname "$0")/v17-call1.sh"
