# v18, call 1 (docs/perf.md v18): the partial gate/up keep of v17 (`auto` keeps as many
# layers' gate/up outputs as fit) and what offloading the checkpoints buys it. q,k,v,o
# defaults, one machine:
#   - under a 24 GiB cap (an RTX 4090 / A10 emulated: `--memory-limit 24GiB`) at 4 x 2048
#     and 1 x 8192: `auto` (12 of 32 layers' gate/up kept, checkpoints on the GPU),
#     `--offload on` (the checkpoints and attention halves travel to the host, which
#     leaves room for every layer's gate/up output) and `--keep-mlp off` (what `auto`
#     picked before v17);
#   - at 1 x 32768 under a 72 GiB cap (an H100 80GB's usable memory, so that an H200
#     gives the same decisions): checkpoints on the GPU (`--offload off`: 13-14 of 32
#     layers' gate/up kept), `auto` (this build offloads there when that keeps more),
#     and `--offload off --keep-mlp off` (the attention half only: v17's call 1).
source "$(dirname "$0")/common.sh"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"; pack
B=(/tmp/qtrain bench --model /tmp/m7b --targets qkvo --warmup 1 --steps 3)
run() {  # $1: name, the rest: bench arguments
  local name=$1; shift
  "${B[@]}" "$@" > "/tmp/R/$name.txt" 2>&1
  echo "$name $(( $(date +%s) - T0 )) s"; pack
}
run cap24-auto --cases 4x2048,1x8192 --memory-limit 24GiB
run cap24-offload --cases 4x2048,1x8192 --memory-limit 24GiB --offload on
run cap24-off --cases 4x2048,1x8192 --memory-limit 24GiB --keep-mlp off
run cap72-gpu --cases 1x32768 --memory-limit 72GiB --offload off
run cap72-auto --cases 1x32768 --memory-limit 72GiB
run cap72-off --cases 1x32768 --memory-limit 72GiB --offload off --keep-mlp off
for f in /tmp/R/*.txt; do echo "== $f"; grep -o '"case":"[^"]*"\|"tokens_per_s":[0-9.]*\|"peak_device_mem_used_mib":[0-9.]*\|"capped_peak_mib":[0-9.]*\|"predicted_peak_mib":[0-9.]*\|"mlp_layers_kept":[0-9]*\|"attention_residuals_kept":[a-z]*\|"offload[a-z_]*":[a-z0-9.]*\|"pinned[a-z_]*":[0-9.]*\|"loss_falls":[a-z]*' "$f" | tr '\n' ' '; echo; done
finish
