#!/usr/bin/env python3
"""Checks a GGUF written by `qtrain export --gguf` with gguf-py, llama.cpp's own
Python reader (the `gguf` package on PyPI), against the merged model qtrain exports
as safetensors (its values are what the GGUF must hold).

Usage: gguf_check.py GGUF MERGED_DIR FILE_TYPE

Checked, independently of qtrain's Rust code:
  * the header parses; general.* and llama.* keys equal config.json's values;
  * the tokenizer keys follow tokenizer.json / tokenizer_config.json (tokens in id
    order, types, scores order, special ids, add_bos/add_eos, chat template);
  * every tensor has llama.cpp's name, the expected ggml type (the converter's rule
    for f16/bf16/q8_0; llama-quantize's Q4_K_M mix, written here again from
    llama.cpp's src/llama-quant.cpp) and shape;
  * the values: F32/F16/BF16 tensors equal the merged weights (q/k rows permuted as
    convert_hf_to_gguf.py does) exactly; Q8_0 and Q5_0 bytes equal gguf-py's own
    quantizers' bytes; Q4_K/Q6_K (which gguf-py cannot quantize) dequantize with
    gguf-py to within the format's error bound of the merged weights.
Prints one line per check group and exits non-zero on the first failure.
"""

import json
import struct
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_k_m": 15, "bf16": 32}


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def read_safetensors(d: Path) -> dict:
    out = {}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        fail(f"{d}: no safetensors")
    for f in files:
        raw = f.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            buf = raw[base + a:base + b]
            if info["dtype"] == "BF16":
                v = (np.frombuffer(buf, np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif info["dtype"] == "F32":
                v = np.frombuffer(buf, np.float32)
            else:
                fail(f"{name}: dtype {info['dtype']}")
            out[name] = v.reshape(info["shape"])
    return out


def permute(w, n_head, n_head_kv):
    # convert_hf_to_gguf.py's LlamaModel.permute
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def field(r, key):
    f = r.fields.get(key)
    if f is None:
        fail(f"metadata key {key} missing")
    return f.contents()


def use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def expected_type(ft, name, shape, n_layer, has_output):
    """The ggml type llama.cpp gives tensor `name` (numpy shape)."""
    row = shape[-1]
    if len(shape) < 2 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    if ft == "f16":
        return Q.F16
    if ft == "bf16":
        return Q.BF16
    if ft == "q8_0":
        return Q.Q8_0 if row % 32 == 0 else Q.F16

    def fallback(t):
        bs = {Q.Q4_K: 256, Q.Q6_K: 256, Q.Q5_0: 32, Q.Q8_0: 32}
        if row % bs[t] == 0:
            return t
        t = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}.get(t, t)
        return t if row % 32 == 0 else Q.F16

    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        return fallback(Q.Q6_K if row % 256 == 0 else Q.Q8_0)
    layer = int(name.split(".")[1]) if name.startswith("blk.") else None
    if name.endswith("attn_v.weight") or name.endswith("ffn_down.weight"):
        return fallback(Q.Q6_K if use_more_bits(layer, n_layer) else Q.Q4_K)
    return fallback(Q.Q4_K)


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    gguf_path, merged_dir, ft = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    cfg = json.loads((merged_dir / "config.json").read_text())
    tj = json.loads((merged_dir / "tokenizer.json").read_text())
    tc = json.loads((merged_dir / "tokenizer_config.json").read_text())
    r = GGUFReader(gguf_path)
    arch = field(r, "general.architecture")
    want_arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[cfg["model_type"]]
    if arch != want_arch:
        fail(f"architecture {arch}, want {want_arch}")

    # --- metadata
    n_layer = cfg["num_hidden_layers"]
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    want = {
        "general.file_type": FILE_TYPES[ft],
        "general.quantization_version": 2,
        f"{arch}.block_count": n_layer,
        f"{arch}.context_length": cfg["max_position_embeddings"],
        f"{arch}.embedding_length": cfg["hidden_size"],
        f"{arch}.feed_forward_length": cfg["intermediate_size"],
        f"{arch}.attention.head_count": n_head,
        f"{arch}.attention.head_count_kv": n_kv,
    }
    if arch == "llama":
        want["llama.rope.dimension_count"] = head_dim
        want["llama.vocab_size"] = cfg["vocab_size"]
    if cfg.get("head_dim"):
        want[f"{arch}.attention.key_length"] = cfg["head_dim"]
    for k, v in want.items():
        if field(r, k) != v:
            fail(f"{k} = {field(r, k)}, want {v}")
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    for k, v in [(f"{arch}.rope.freq_base", theta),
                 (f"{arch}.attention.layer_norm_rms_epsilon", cfg["rms_norm_eps"])]:
        if field(r, k) != np.float32(v):
            fail(f"{k} = {field(r, k)}, want {v}")
    print(f"ok: general/{arch} metadata ({len(want) + 2} keys)")

    # --- tokenizer
    vocab = tj["model"]["vocab"]
    tokens = field(r, "tokenizer.ggml.tokens")
    model = field(r, "tokenizer.ggml.model")
    byte_level = "ByteLevel" in json.dumps(tj.get("pre_tokenizer"))
    if model != ("gpt2" if byte_level else "llama") or len(tokens) != cfg["vocab_size"]:
        fail(f"tokenizer model / size: {model} {len(tokens)}")
    for t, i in vocab.items():
        if tokens[i] != t:
            fail(f"token {i}: {tokens[i]!r} vs tokenizer.json {t!r}")
    types = field(r, "tokenizer.ggml.token_type")
    added = {a["content"]: a for a in tj["added_tokens"]}
    unk = tj["model"].get("unk_token")
    known = set(vocab) | set(added)
    for i, t in enumerate(tokens):
        if t not in known:
            want_ty = 5  # UNUSED padding up to vocab_size
        elif t == unk and not byte_level:
            want_ty = 2
        elif t in added:
            want_ty = 3 if added[t]["special"] or (t.startswith("<|") and t.endswith("|>")) else 4
        elif not byte_level and t.startswith("<0x") and len(t) == 6:
            want_ty = 6
        else:
            want_ty = 1
        if types[i] != want_ty:
            fail(f"token {i} {t!r}: type {types[i]}, want {want_ty}")
    merges = [m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m)
              for m in tj["model"]["merges"]]
    if byte_level:
        if field(r, "tokenizer.ggml.merges") != merges:
            fail("merges differ from tokenizer.json's")
        pre = field(r, "tokenizer.ggml.pre")
        if pre not in ("llama-bpe", "qwen2", "gpt-2"):
            fail(f"pre-tokenizer {pre!r}")
    else:
        # SentencePiece merges pick the highest score: a merge-rank order.
        scores = field(r, "tokenizer.ggml.scores")
        ranked = list(dict.fromkeys(vocab[m.replace(" ", "")] for m in merges))
        if any(scores[a] <= scores[b] for a, b in zip(ranked, ranked[1:])):
            fail("scores do not fall with the merge rank")
        # Metaspace's `first` scheme marks only the start of the input: no space
        # after special tokens, which llama.cpp's add_space_prefix would add.
        scheme = (tj.get("pre_tokenizer") or {}).get("prepend_scheme")
        if scheme and field(r, "tokenizer.ggml.add_space_prefix") != (scheme == "always"):
            fail(f"add_space_prefix with Metaspace prepend_scheme {scheme!r}")
    ids = {}
    for k, key in [("bos", "bos"), ("eos", "eos"), ("unk", "unknown")]:
        text = tc.get(f"{k}_token")
        text = text.get("content") if isinstance(text, dict) else text
        if text:
            ids[k] = field(r, f"tokenizer.ggml.{key}_token_id")
            if tokens[ids[k]] != text:
                fail(f"{k} id {ids[k]} is {tokens[ids[k]]!r}, tokenizer_config says {text!r}")
    post = json.dumps(tj.get("post_processor"))
    want_bos = "TemplateProcessing" in post
    if field(r, "tokenizer.ggml.add_bos_token") is not want_bos:
        fail(f"add_bos_token: want {want_bos}")
    if field(r, "tokenizer.ggml.add_eos_token") is not False:
        fail("add_eos_token")
    if field(r, "tokenizer.chat_template") != tc["chat_template"]:
        fail("chat template differs from tokenizer_config.json's")
    print(f"ok: tokenizer ({model}, {len(tokens)} tokens, ids {ids}, chat template)")

    # --- tensors
    merged = read_safetensors(merged_dir)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    hf_of = {v: k for k, v in names.items()}
    for i in range(n_layer):
        for hf, g in [("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"),
                      ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                      ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
                      ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
                      ("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm")]:
            for suffix in ("weight", "bias"):
                hf_of[f"blk.{i}.{g}.{suffix}"] = f"model.layers.{i}.{hf}.{suffix}"
    got_names = [t.name for t in r.tensors]
    expect_names = [n for n, h in hf_of.items() if h in merged]
    if sorted(got_names) != sorted(expect_names):
        fail(f"tensor names: extra {set(got_names) - set(expect_names)}, missing {set(expect_names) - set(got_names)}")
    has_output = "output.weight" in got_names
    counts = {}
    for t in r.tensors:
        w = merged[hf_of[t.name]].astype(np.float32)
        if arch == "llama" and (t.name.endswith("attn_q.weight") or t.name.endswith("attn_q.bias")):
            w = permute(w, n_head, n_head)
        elif arch == "llama" and (t.name.endswith("attn_k.weight") or t.name.endswith("attn_k.bias")):
            w = permute(w, n_head, n_kv)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if shape != w.shape:
            fail(f"{t.name}: shape {shape} vs merged {w.shape}")
        ty = expected_type(ft, t.name, w.shape, n_layer, has_output)
        if t.tensor_type != ty:
            fail(f"{t.name}: type {t.tensor_type.name}, llama.cpp gives {ty.name}")
        counts[ty.name] = counts.get(ty.name, 0) + 1
        q = np.asarray(t.data)
        if ty == Q.F32:
            ok = np.array_equal(q.reshape(w.shape), w)
        elif ty == Q.F16:
            ok = np.array_equal(q.reshape(w.shape).astype(np.float32), w.astype(np.float16).astype(np.float32))
        elif ty == Q.BF16:
            ok = np.array_equal(q.view(np.uint8).reshape(-1),
                                (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(-1))
        elif ty in (Q.Q8_0, Q.Q5_0):
            ok = np.array_equal(q.reshape(-1), quantize(w, ty).reshape(-1))
        else:
            back = dequantize(q, ty).reshape(w.shape)
            group = 16 if ty == Q.Q6_K else 32
            g = w.reshape(-1, group)
            b = back.reshape(-1, group)
            if ty == Q.Q6_K:
                tol = np.abs(g).max(axis=1) / 32 * 2
            else:
                rng = g.max(axis=1) - np.minimum(g.min(axis=1), 0)
                tol = rng / 15 * 2
            err = np.abs(g - b).max(axis=1)
            ok = bool(np.all(err <= tol + 1e-9))
            rel = float(np.sqrt(((g - b) ** 2).mean() / (g ** 2).mean()))
            if not ok or rel > (0.02 if ty == Q.Q6_K else 0.08):
                fail(f"{t.name}: {ty.name} error {err.max()} over the bound, rms rel {rel:.4f}")
        if not ok:
            fail(f"{t.name}: {ty.name} values differ from the merged weights")
    print(f"ok: {len(got_names)} tensors, names, types {counts}, shapes, values")


if __name__ == "__main__":
    main()
