#!/usr/bin/env bash
# qtrain's GGUF export run by llama.cpp itself (not part of CI).
#
# Trains the built-in tiny CPU demo, exports the checkpoint as a merged model and as
# f16, bf16, q8_0 and q4_k_m GGUF files, answers chat prompts greedily with
# `qtrain generate` on the merged weights (no NF4), and checks with llama.cpp
# (through llama-cpp-python) that each GGUF loads, tokenizes the chat prompt into
# the same ids, stops at the end-of-turn token, and, for f16 and q8_0, gives the
# same greedy tokens (bf16's and q4_k_m's are reported). With Go installed it also
# renders the Modelfile's TEMPLATE with Go's text/template as Ollama does and
# compares it with the Jinja chat template's output. With CONVERT_PYTHON set to a
# Python that has torch and transformers, it also runs llama.cpp's own
# convert_hf_to_gguf.py (f16, bf16, q8_0) and llama-quantize's Q4_K_M (from the
# converter's bf16) on the merged model, and requires qtrain's tensors to be
# byte-identical to theirs (scripts/compare_gguf.py).
#
# The first run builds llama.cpp from PyPI's llama-cpp-python source package into
# $QTRAIN_LLAMACPP_VENV (default ~/.cache/qtrain-llamacpp/venv), keeping the source
# (and with it convert_hf_to_gguf.py) under ~/.cache/qtrain-llamacpp/src: about 20
# minutes on two cores. Later runs reuse both.
#
# Usage: scripts/check_gguf_llamacpp.sh [WORK_DIR]   (default target/gguf-llamacpp-check)
#        MINUTES=3 sets the training budget; QTRAIN_BIN=path uses that qtrain binary
#        instead of building the release one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QTRAIN_LLAMACPP_VENV:-$HOME/.cache/qtrain-llamacpp/venv}
SRC=$(dirname "$VENV")/src
WORK=${1:-target/gguf-llamacpp-check}
PY="$VENV/bin/python"

if ! "$PY" -c "import llama_cpp, jinja2, numpy, gguf" 2>/dev/null || ! ls -d "$SRC"/llama_cpp_python-*/vendor/llama.cpp >/dev/null 2>&1; then
  echo "== building llama-cpp-python into $VENV (once; ~20 min on 2 cores)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet scikit-build-core cmake ninja numpy jinja2 gguf
  mkdir -p "$SRC"
  "$VENV/bin/pip" download --quiet --no-deps --no-build-isolation llama-cpp-python -d "$SRC"
  tar xzf "$(ls "$SRC"/llama_cpp_python-*.tar.gz | tail -1)" -C "$SRC"
  # Only the library: no server, examples, tests, curl or multimodal tools.
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" \
    "$VENV/bin/pip" install --no-build-isolation "$(ls -d "$SRC"/llama_cpp_python-*/ | tail -1)"
fi
LLAMA_SRC=$(ls -d "$SRC"/llama_cpp_python-*/vendor/llama.cpp | tail -1)
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
TYPES="f16 bf16 q8_0 q4_k_m"
for t in $TYPES; do
  "$Q" export --checkpoint "$CKPT" --out "$WORK/gguf-$t" --gguf "$t"
done

status=0
if [ -n "${CONVERT_PYTHON:-}" ]; then
  echo
  echo "== llama.cpp's convert_hf_to_gguf.py and llama-quantize on the merged model"
  for t in f16 bf16 q8_0; do
    PYTHONPATH="$LLAMA_SRC/gguf-py" "$CONVERT_PYTHON" "$LLAMA_SRC/convert_hf_to_gguf.py" "$WORK/merged" \
      --outtype "$t" --outfile "$WORK/llamacpp-$t.gguf" > "$WORK/convert-$t.log" 2>&1
  done
  "$PY" - "$WORK/llamacpp-bf16.gguf" "$WORK/llamacpp-q4_k_m.gguf" <<'EOF'
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
if llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)) != 0:
    sys.exit("llama_model_quantize failed")
EOF
  for t in $TYPES; do
    echo "-- $t"
    "$PY" scripts/compare_gguf.py "$WORK/gguf-$t/model-$t.gguf" "$WORK/llamacpp-$t.gguf" || status=1
  done
fi

for PROMPT in "Reverse the word: river" "Uppercase: garden" "What is 23 + 45?"; do
  echo
  echo "== prompt: $PROMPT"
  "$Q" generate --model "$WORK/merged" --quantization none --dtype f32 --device cpu \
    --prompt "$PROMPT" --max-new-tokens 48 --print-ids > "$WORK/qtrain.out"
  echo "qtrain answer: $(head -n -1 "$WORK/qtrain.out")"
  tail -n 1 "$WORK/qtrain.out" | "$PY" -c '
import json, sys
d = json.loads(sys.stdin.read()); d["prompt"] = sys.argv[1]; print(json.dumps(d))' "$PROMPT" > "$WORK/qtrain.json"
  for t in $TYPES; do
    echo "-- $t"
    same=--expect-same
    case $t in bf16 | q4_k_m) same= ;; esac
    "$PY" scripts/check_gguf_llamacpp.py "$WORK/gguf-$t/model-$t.gguf" "$WORK/qtrain.json" $same || status=1
  done
done
echo
[ $status = 0 ] && echo "== all llama.cpp checks passed" || echo "== some llama.cpp checks FAILED"
exit $status
