# v13 A/B (docs/perf.md v13): the v12 build (.carry/qtrain-v12.xz) against v13
# (.carry/qtrain.xz: stacked q/k/v and gate/up adapter products), same machine,
# alternating order over two rounds, q/k/v/o and all seven; one profiled v13 step.
source "$(dirname "$0")/common.sh"
unpack .carry/qtrain-v12.xz /tmp/qtrain-v12
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
bench() {  # $1 build, $2 targets, $3 cases, $4 tag
  local bin=/tmp/qtrain; [ "$1" = v12 ] && bin=/tmp/qtrain-v12
  "$bin" bench --model /tmp/m7b --cases "$3" --targets "$2" --warmup 1 --steps 3 \
    > "/tmp/R/$4-$1-$2.jsonl" 2> "/tmp/R/$4-$1-$2.log"
  echo "$4 $1 $2: $(python3 -c 'import json,sys; print(" ".join("%s=%.0f" % (j["case"], j["tokens_per_s"]) for j in map(json.loads, open(sys.argv[1]))))' "/tmp/R/$4-$1-$2.jsonl") ($(( $(date +%s) - T0 )) s)"
}
for T in qkvo all; do bench v12 $T 8x512,4x2048,1x8192,1x32768 r1; bench v13 $T 8x512,4x2048,1x8192,1x32768 r1; done
for T in qkvo all; do bench v13 $T 8x512,4x2048,1x8192 r2; bench v12 $T 8x512,4x2048,1x8192 r2; done
/tmp/qtrain bench --model /tmp/m7b --cases 4x2048 --targets qkvo --warmup 1 --steps 3 --profile > /tmp/R/profile-v13.txt 2>&1
grep -E "LoRA|\[step\]" /tmp/R/profile-v13.txt
finish
