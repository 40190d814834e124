# v13, call 2 (same warm machine as call 1): v13 and v12 again in the other order (the
# A/B's second round), v13's memory-saving variant over the four cases (its peers are
# call 1's), and one profiled v13 step at 4 x 2048 q,k,v,o.
source "$(dirname "$0")/common.sh"
unpack .carry/qtrain-v12.xz /tmp/qtrain-v12
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
bench() {  # $1 build, $2 targets, $3 cases, $4 tag
  local bin=/tmp/qtrain; [ "$1" = v12 ] && bin=/tmp/qtrain-v12
  "$bin" bench --model /tmp/m7b --cases "$3" --targets "$2" --warmup 1 --steps 3 \
    > "/tmp/R/$4-$1-$2.jsonl" 2> "/tmp/R/$4-$1-$2.log"
  echo "$4 $1 $2: $(python3 -c 'import json,sys; print(" ".join("%s=%.0f" % (j["case"], j["tokens_per_s"]) for j in map(json.loads, open(sys.argv[1]))))' "/tmp/R/$4-$1-$2.jsonl") ($(( $(date +%s) - T0 )) s)"
}
for T in qkvo all; do bench v13 $T 8x512,4x2048,1x8192 r2; bench v12 $T 8x512,4x2048,1x8192 r2; done
/tmp/qtrain bench --model /tmp/m7b --cases 4x2048 --targets qkvo --warmup 1 --steps 3 --profile > /tmp/R/profile-v13.txt 2>&1
grep -E "LoRA|\[step\]" /tmp/R/profile-v13.txt
QTRAIN_VARIANTS='lowmem=--keep-residuals off --keep-mlp off --offload on --mlp-chunk 2048' PEERS=none \
  timeout $(( 585 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/L \
  --cases 8x512,4x2048,1x8192,1x32768 --targets qkvo,all --warmup 1 --steps 3 > /tmp/R/L.out 2>&1
tail -12 /tmp/R/L.out
finish
