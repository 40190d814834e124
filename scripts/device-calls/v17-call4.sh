# v17, call 4 (docs/perf.md v17): `auto` keeps the gate/up outputs of as many layers
# as fit instead of all or none. q,k,v,o defaults under a 24 GiB cap (an RTX 4090 /
# A10 emulated: `--memory-limit 24GiB`) at 4 x 2048 and 1 x 8192, and on the whole
# 80 GB card at 1 x 32768, each against the same build told to keep no gate/up output
# (`--keep-mlp off`, what `auto` picked before), one machine.
source "$(dirname "$0")/common.sh"
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"; pack
B=(/tmp/qtrain bench --model /tmp/m7b --targets qkvo --warmup 1 --steps 3)
"${B[@]}" --cases 4x2048,1x8192 --memory-limit 24GiB > /tmp/R/cap24-auto.txt 2>&1
echo "cap24 auto $(( $(date +%s) - T0 )) s"; pack
"${B[@]}" --cases 4x2048,1x8192 --memory-limit 24GiB --keep-mlp off > /tmp/R/cap24-off.txt 2>&1
echo "cap24 off $(( $(date +%s) - T0 )) s"; pack
"${B[@]}" --cases 1x32768 > /tmp/R/full-auto.txt 2>&1
echo "full auto $(( $(date +%s) - T0 )) s"; pack
"${B[@]}" --cases 1x32768 --keep-mlp off > /tmp/R/full-off.txt 2>&1
echo "full off $(( $(date +%s) - T0 )) s"
for f in /tmp/R/*.txt; do echo "== $f"; grep -o '"case":"[^"]*"\|"tokens_per_s":[0-9.]*\|"peak_device_mem_used_mib":[0-9.]*\|"capped_peak_mib":[0-9.]*\|"predicted_peak_mib":[0-9.]*\|"mlp_layers_kept":[0-9]*\|"attention_residuals_kept":[a-z]*\|"loss_falls":[a-z]*' "$f" | tr '\n' ' '; echo; done
finish
