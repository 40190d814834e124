#!/usr/bin/env python3
"""Compares qtrain's GGUF with the one llama.cpp's own tools make from the same
merged model (convert_hf_to_gguf.py, and llama-quantize for Q4_K_M).

Usage: compare_gguf.py QTRAIN_GGUF LLAMACPP_GGUF

Every tensor must have the same name, type, shape and bytes. Metadata differences
are listed; the ones qtrain makes on purpose are allowed, any other fails:
  * general.name / general.size_label: naming only;
  * tokenizer.ggml.scores: from a tokenizer.json without tokenizer.model the
    converter gives every SentencePiece piece -1000 (its LlamaHfVocab), which leaves
    llama.cpp's merge order to chance; qtrain gives minus the merge rank;
  * tokenizer.ggml.token_type of the unknown token: UNKNOWN (as the converter's
    SentencePiece path marks it) instead of CONTROL; of special added tokens such as
    `[INST]`: CONTROL (as tokenizer_config.json marks them special, and as the
    converter's SentencePiece path types them) where the converter's tokenizer.json
    path leaves them NORMAL, so that llama.cpp would not match them in a prompt;
  * tokenizer.ggml.add_space_prefix: written explicitly (false for Metaspace's
    `first` scheme, so text after special tokens is tokenized as transformers does);
  * tokenizer.ggml.add_sep_token: the converter's guess from a pair template;
  * the token list padded to the model's vocab_size with unused `[PADi]` tokens
    (the converter's tokenizer.json path stops at the tokenizer's own tokens).
"""

import sys

import numpy as np
from gguf import GGUFReader

ALLOWED = {"general.name", "general.size_label", "tokenizer.ggml.scores",
           "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.add_sep_token"}


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = GGUFReader(sys.argv[1]), GGUFReader(sys.argv[2])
    ta = {t.name: t for t in a.tensors}
    tb = {t.name: t for t in b.tensors}
    bad = []
    if sorted(ta) != sorted(tb):
        bad.append(f"tensor names: only qtrain {sorted(set(ta) - set(tb))}, only llama.cpp {sorted(set(tb) - set(ta))}")
    same = 0
    for n in sorted(set(ta) & set(tb)):
        x, y = ta[n], tb[n]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            bad.append(f"{n}: {x.tensor_type.name} {list(x.shape)} vs {y.tensor_type.name} {list(y.shape)}")
        elif np.asarray(x.data).tobytes() != np.asarray(y.data).tobytes():
            bad.append(f"{n}: {x.tensor_type.name} bytes differ")
        else:
            same += 1
    fa = {k: f for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: f for k, f in b.fields.items() if not k.startswith("GGUF.")}
    notes = []
    # From a tokenizer.json alone the converter lists only the tokenizer's tokens;
    # qtrain pads the list to the model's vocab_size with unused `[PADi]` entries,
    # as the converter's SentencePiece and BPE paths do. Compare the common part and
    # check the padding.
    pad_from = None
    ka, kb = fa.get("tokenizer.ggml.tokens"), fb.get("tokenizer.ggml.tokens")
    if ka is not None and kb is not None and len(ka.contents()) > len(kb.contents()):
        pad_from = len(kb.contents())
        toks, types = ka.contents(), fa["tokenizer.ggml.token_type"].contents()
        padded = all(toks[i] == f"[PAD{i}]" and types[i] == 5 for i in range(pad_from, len(toks)))
        msg = f"tokenizer: qtrain pads {len(toks) - pad_from} unused [PADi] tokens up to vocab_size"
        (notes if padded else bad).append(msg)
    for k in sorted(set(fa) | set(fb)):
        va = fa[k].contents() if k in fa else None
        vb = fb[k].contents() if k in fb else None
        if pad_from is not None and k.startswith("tokenizer.ggml.") and isinstance(va, list) and len(va) > pad_from:
            va = va[:pad_from]
        if va == vb:
            continue
        d = []
        if isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb):
            d = [i for i, (p, q) in enumerate(zip(va, vb)) if p != q]
            msg = f"{k}: {len(d)} of {len(va)} entries differ, e.g. [{d[0]}] {va[d[0]]!r} vs {vb[d[0]]!r}"
        else:
            msg = f"{k}: qtrain {va!r:.80} vs llama.cpp {vb!r:.80}"
        allowed = k in ALLOWED
        if k == "tokenizer.ggml.token_type" and d:
            # The unknown token (UNKNOWN here, CONTROL there), and special added
            # tokens the converter's LlamaHfVocab leaves NORMAL (CONTROL here, so
            # llama.cpp matches e.g. `[INST]` in a prompt as the one token).
            allowed = all((va[i], vb[i]) in ((2, 3), (3, 1)) for i in d)
            toks = fa["tokenizer.ggml.tokens"].contents()
            msg += f" ({', '.join(f'{toks[i]!r}: {va[i]} vs {vb[i]}' for i in d[:6])})"
        (notes if allowed else bad).append(msg)
    print(f"{same}/{len(ta)} tensors byte-identical to llama.cpp's")
    for n in notes:
        print("  expected difference:", n)
    for n in bad:
        print("FAIL:", n)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
