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
  * greedy decoding in llama.cpp stops at an end-of-generation token and, with
    --expect-same, gives exactly qtrain's tokens (f16 / q8_0: same weights up to
    8-bit rounding); without it the tokens are reported (q4_k_m).
Needs llama-cpp-python (scripts/check_gguf_llamacpp.sh builds it) and jinja2.
"""

import json
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

    llm.reset()
    llm.eval(prompt)
    out, stopped = [], False
    for _ in range(len(want["ids"]) + 16):
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
    if not stopped:
        print("FAIL: llama.cpp did not reach an end-of-generation token")
        sys.exit(1)
    if want.get("stopped_at_eos") is not True:
        print("FAIL: qtrain did not stop at EOS within its limit; nothing to compare the stop with")
        sys.exit(1)
    if out != want["ids"]:
        msg = "greedy tokens differ from qtrain's"
        if expect_same:
            print("FAIL:", msg)
            sys.exit(1)
        print("note:", msg, "(expected to be possible at this quantization)")
    else:
        print("ok: same greedy tokens as qtrain, and the same stop")


if __name__ == "__main__":
    main()
