# v17, call 2 (docs/perf.md v17): where the time goes in the cases just short of the
# targets (4 x 2048 and 1 x 8192), and what the MLP chunk costs the memory-saving
# set-up there. One profiled step each (`--profile`: CUDA events around every kind of
# work) of the defaults and of `memsave`, q,k,v,o; then `memsave` with 8192-token MLP
# chunks (the default) instead of 2048, all seven (the set whose 1 x 8192 is at 1.18x).
source "$(dirname "$0")/common.sh"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"; pack
MEMSAVE=(--keep-residuals on --keep-mlp off --offload on --loss-chunk 512)
B=(/tmp/qtrain bench --model /tmp/m7b --cases 4x2048,1x8192 --warmup 1 --steps 3)
"${B[@]}" --targets qkvo --profile > /tmp/R/default-qkvo.txt 2>&1
echo "default $(( $(date +%s) - T0 )) s"; pack
"${B[@]}" --targets qkvo --profile "${MEMSAVE[@]}" --mlp-chunk 2048 > /tmp/R/memsave-qkvo.txt 2>&1
echo "memsave $(( $(date +%s) - T0 )) s"; pack
for c in 2048 8192; do
  "${B[@]}" --targets all "${MEMSAVE[@]}" --mlp-chunk $c > /tmp/R/memsave-all-c$c.txt 2>&1
  echo "memsave all chunk $c $(( $(date +%s) - T0 )) s"; pack
done
for f in /tmp/R/*.txt; do echo "== $f"; grep -o '"case":"[^"]*"\|"tokens_per_s":[0-9.]*\|"peak_device_mem_used_mib":[0-9.]*\|"mlp_chunk_tokens":[0-9]*' "$f" | tr '\n' ' '; echo; done
finish
