#!/usr/bin/env python3
"""llama.cpp runs qtrain's GGUF: greedy tokens and the stop at end of turn.

Usage: check_gguf_llamacpp.py GGUF QTRAIN_IDS_JSON [--expect-same]

GGUF is a file written by `qtrain export --gguf`; QTRAIN_IDS_JSON the JSON line
`qtrain generate --print-ids --quantization none` printed for the same prompt on
the merged export of the same checkpoint, with "prompt" added (the user message).
The script renders the GGUF's own chat template (tokenizer.chat_template, with
jinja2 as transformers does), tokenizes the text with llama.cpp's tokenizer from
the GGUF, and checks:
  * the prompt token ids equal qtrain's (the tokenizer metadata is right);
  * greedy decoding in llama.cpp stops at an end-of-generation token where qtrain
    stopped at EOS (or runs to qtrain's token limit where qtrain did) and, with
    --expect-same, gives exactly qtrain's tokens (f16 / q8_0: same weights up to
    8-bit rounding); without it the tokens are reported (q4_k_m);
  * with Go installed, the Modelfile's TEMPLATE rendered by Go's text/template as
    Ollama renders it (scripts/ollama_template.go) equals the Jinja template's
    output (without the BOS llama.cpp adds) for single-turn, multi-turn and
    system-message conversations.
Needs llama-cpp-python (scripts/check_gguf_llamacpp.sh builds it) and jinja2.
"""

import json
import os
import shutil
import subprocess
import sys

import jinja2
import llama_cpp
import numpy as np


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    expect_same = "--expect-same" in sys.argv
    if len(args) != 2:
        sys.exit(__doc__)
    gguf, ids_json = args
    want = json.loads(open(ids_json).read())

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=512, n_threads=2, n_batch=512,
                          verbose=False, seed=0)
    meta = llm.metadata
    template = meta["tokenizer.chat_template"]
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    eos = llm.detokenize([llm.token_eos()], special=True).decode()

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    text = env.from_string(template).render(
        messages=[{"role": "user", "content": want["prompt"]}],
        add_generation_prompt=True, bos_token=bos, eos_token=eos)
    # The template writes BOS itself: tokenize without adding another, with special
    # tokens parsed (as transformers' apply_chat_template(tokenize=True)).
    prompt = llm.tokenize(text.encode(), add_bos=False, special=True)
    print(f"prompt text: {text!r}")
    print(f"llama.cpp prompt ids: {prompt}")
    print(f"qtrain    prompt ids: {want['prompt_ids']}")
    if prompt != want["prompt_ids"]:
        print("FAIL: llama.cpp tokenizes the prompt differently from qtrain")
        sys.exit(1)

    check_modelfile(template, os.path.join(os.path.dirname(gguf), "Modelfile"), env, bos, eos,
                    meta.get("tokenizer.ggml.add_bos_token") == "true", want["prompt"])

    llm.reset()
    llm.eval(prompt)
    # qtrain stopped at EOS, or generated its limit (then so many tokens compare).
    qtrain_stopped = want.get("stopped_at_eos") is True
    out, stopped = [], False
    for _ in range(len(want["ids"]) + (16 if qtrain_stopped else 0)):
        # The last position's logits (Llama.eval keeps none without logits_all).
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))
        tok = int(np.argmax(logits))
        if llama_cpp.llama_vocab_is_eog(vocab, tok):
            stopped = True
            eog = llm.detokenize([tok], special=True).decode()
            break
        out.append(tok)
        llm.eval([tok])
    answer = llm.detokenize(out).decode(errors="replace")
    print(f"llama.cpp ids: {out}")
    print(f"qtrain    ids: {want['ids']}")
    print(f"llama.cpp answer: {answer!r}" + (f", stopped at {eog!r}" if stopped else ", did not stop"))
    if stopped != qtrain_stopped:
        print(f"FAIL: llama.cpp {'stopped' if stopped else 'did not stop'}, qtrain "
              f"{'stopped at EOS' if qtrain_stopped else 'ran to its token limit'}")
        sys.exit(1)
    if out != want["ids"]:
        msg = "greedy tokens differ from qtrain's"
        if expect_same:
            print("FAIL:", msg)
            sys.exit(1)
        print("note:", msg, "(expected to be possible at this quantization)")
    else:
        print("ok: same greedy tokens as qtrain" + (", and the same stop" if stopped else
                                                    f" ({len(out)} tokens, qtrain's limit)"))


def check_modelfile(template, modelfile, env, bos, eos, add_bos, prompt):
    if shutil.which("go") is None:
        print("skipped: the Modelfile TEMPLATE check needs Go (text/template)")
        return
    text = open(modelfile).read()
    if 'TEMPLATE """' not in text:
        print(f"FAIL: {modelfile} has no TEMPLATE")
        sys.exit(1)
    go_tmpl = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    go_src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ollama_template.go")
    convs = [
        [("user", prompt)],
        [("system", "Answer briefly."), ("user", prompt)],
        [("user", "Uppercase: sun"), ("assistant", "SUN"), ("user", prompt)],
        [("system", "Answer briefly."), ("user", "Uppercase: sun"), ("assistant", "SUN"),
         ("user", prompt)],
    ]
    for conv in convs:
        msgs = [{"role": r, "content": c} for r, c in conv]
        want = env.from_string(template).render(
            messages=msgs, add_generation_prompt=True, bos_token=bos, eos_token=eos)
        if add_bos and want.startswith(bos):
            want = want[len(bos):]
        got = subprocess.run(["go", "run", go_src], input=json.dumps({"template": go_tmpl, "messages": msgs}),
                             capture_output=True, text=True)
        if got.returncode != 0:
            print(f"FAIL: Go cannot render the Modelfile TEMPLATE: {got.stderr}")
            sys.exit(1)
        if got.stdout != want:
            print(f"FAIL: Modelfile TEMPLATE renders {got.stdout!r}, the Jinja template {want!r}")
            sys.exit(1)
    print(f"ok: the Modelfile TEMPLATE (Go) renders {len(convs)} conversations as the Jinja template does")


if __name__ == "__main__":
    main()
