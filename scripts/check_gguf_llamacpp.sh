#!/usr/bin/env bash
# qtrain's GGUF export run by llama.cpp itself (not part of CI).
#
# Trains the built-in tiny CPU demo, exports the checkpoint as a merged model and as
# f16, q8_0 and q4_k_m GGUF files, answers a chat prompt greedily with
# `qtrain generate` on the merged weights (no NF4), and checks with llama.cpp
# (through llama-cpp-python) that each GGUF loads, tokenizes the chat prompt into
# the same ids, stops at the end-of-turn token, and — for f16 and q8_0 — gives the
# same greedy tokens. q4_k_m's tokens are reported. With Go installed it also renders
# the Modelfile's TEMPLATE with Go's text/template as Ollama does and compares it
# with the Jinja chat template's output.
#
# The first run builds llama.cpp from PyPI's llama-cpp-python source package into
# $QTRAIN_LLAMACPP_VENV (default ~/.cache/qtrain-llamacpp/venv): about 20 minutes
# on two cores. Later runs reuse it.
#
# Usage: scripts/check_gguf_llamacpp.sh [WORK_DIR]   (default target/gguf-llamacpp-check)
#        MINUTES=3 sets the training budget; QTRAIN_BIN=path uses that qtrain binary
#        instead of building the release one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QTRAIN_LLAMACPP_VENV:-$HOME/.cache/qtrain-llamacpp/venv}
WORK=${1:-target/gguf-llamacpp-check}
PY="$VENV/bin/python"

if ! "$PY" -c "import llama_cpp, jinja2, numpy" 2>/dev/null; then
  echo "== building llama-cpp-python into $VENV (once; ~20 min on 2 cores)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # Only the library: no server, examples, tests, curl or multimodal tools.
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" \
    "$VENV/bin/pip" install llama-cpp-python numpy jinja2
fi
echo "== llama-cpp-python $("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)')"

if [ -n "${QTRAIN_BIN:-}" ]; then
  Q=$QTRAIN_BIN
else
  cargo build --release -p qtrain-cli
  Q=target/release/qtrain
fi
rm -rf "$WORK"
mkdir -p "$WORK"

echo "== training the tiny demo"
"$Q" run --minutes "${MINUTES:-3}" --set "checkpoint.output_dir=$WORK/run" | tail -20
CKPT=$(ls -d "$WORK"/run/checkpoints/step-* | sort -t- -k2 -n | tail -1)
echo "== checkpoint $CKPT"

"$Q" export --checkpoint "$CKPT" --out "$WORK/merged" --merged
for t in f16 q8_0 q4_k_m; do
  "$Q" export --checkpoint "$CKPT" --out "$WORK/gguf-$t" --gguf "$t"
done

status=0
for PROMPT in "Reverse the word: river" "Uppercase: garden" "What is 23 + 45?"; do
  echo
  echo "== prompt: $PROMPT"
  "$Q" generate --model "$WORK/merged" --quantization none --dtype f32 --device cpu \
    --prompt "$PROMPT" --max-new-tokens 48 --print-ids > "$WORK/qtrain.out"
  echo "qtrain answer: $(head -n -1 "$WORK/qtrain.out")"
  tail -n 1 "$WORK/qtrain.out" | "$PY" -c '
import json, sys
d = json.loads(sys.stdin.read()); d["prompt"] = sys.argv[1]; print(json.dumps(d))' "$PROMPT" > "$WORK/qtrain.json"
  for t in f16 q8_0 q4_k_m; do
    echo "-- $t"
    same=--expect-same
    [ "$t" = q4_k_m ] && same=
    "$PY" scripts/check_gguf_llamacpp.py "$WORK/gguf-$t/model-$t.gguf" "$WORK/qtrain.json" $same || status=1
  done
done
echo
[ $status = 0 ] && echo "== all llama.cpp checks passed" || echo "== some llama.cpp checks FAILED"
exit $status
