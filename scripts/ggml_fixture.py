#!/usr/bin/env python3
"""Writes the ggml quantization fixture of qtrain-gguf's tests.

Usage: python3 scripts/ggml_fixture.py crates/qtrain-gguf/tests/fixtures/ggml_quants.safetensors

Needs numpy and llama-cpp-python (whose wheel is built from PyPI's sdist and
carries ggml's shared libraries; scripts/check_gguf_llamacpp.sh builds one into
~/.cache/qtrain-llamacpp/venv). The inputs are fixed pseudo-random rows shaped like
the cases the quantizers branch on (bf16-rounded weights, heavy tails, outliers,
all-positive and all-negative sub-blocks, tiny and large magnitudes, zero and
constant sub-blocks); the outputs are what ggml's own `ggml_quantize_chunk` (the
reference quantizers `llama-quantize` runs without an importance matrix) makes of
them. The Rust tests read this file and must produce the same bytes.
"""

import ctypes
import json
import pathlib
import struct
import sys

import numpy as np

# ggml's enum ggml_type
TYPES = {"f16": 1, "q5_0": 6, "q8_0": 8, "q4_K": 12, "q5_K": 13, "q6_K": 14, "bf16": 30}
ROW = 256


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20240519)

    def bf16(x):
        # round to nearest even on the upper 16 bits, as stored weights are
        u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return u.astype(np.uint32).view(np.float32)

    cases = {}
    cases["normal_bf16"] = bf16(rng.normal(0, 0.02, (16, ROW)))
    cases["heavy_tail"] = (rng.standard_t(2, (8, ROW)) * 0.01).astype(np.float32)
    out = rng.normal(0, 0.02, (8, ROW))
    idx = rng.integers(0, ROW, (8, 3))
    for r in range(8):
        out[r, idx[r]] *= 60
    cases["outliers"] = out.astype(np.float32)
    cases["positive"] = rng.uniform(0.1, 1.0, (4, ROW)).astype(np.float32)
    cases["negative"] = rng.uniform(-1.0, -0.1, (4, ROW)).astype(np.float32)
    cases["tiny"] = (rng.normal(0, 1, (4, ROW)) * 1e-6).astype(np.float32)
    cases["large"] = (rng.normal(0, 1, (4, ROW)) * 100).astype(np.float32)
    sp = rng.normal(0, 0.05, (4, ROW)).astype(np.float32)
    sp[0, :32] = 0.0            # a zero Q4_K sub-block / Q8_0 block
    sp[1, 32:64] = 0.25         # a constant sub-block
    sp[2, 16:32] = 0.0          # a zero Q6_K sub-block
    sp[3, rng.random(ROW) < 0.5] = 0.0
    cases["sparse"] = sp
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in cases.items()}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    import llama_cpp

    libdir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    ggml = ctypes.CDLL(str(libdir / "libggml-base.so"))
    q = ggml.ggml_quantize_chunk
    q.restype = ctypes.c_size_t
    q.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                  ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    row_size = ggml.ggml_row_size
    row_size.restype = ctypes.c_size_t
    row_size.argtypes = [ctypes.c_int, ctypes.c_int64]

    class Traits(ctypes.Structure):
        # struct ggml_type_traits in ggml.h
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                    ("from_float_ref", ctypes.c_void_p)]

    traits = ggml.ggml_get_type_traits
    traits.restype = ctypes.POINTER(Traits)
    traits.argtypes = [ctypes.c_int]
    to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)

    tensors = {}
    for case, x in inputs().items():
        tensors[f"{case}.input"] = ("F32", list(x.shape), x.tobytes())
        for name, t in TYPES.items():
            nbytes = row_size(t, ROW) * x.shape[0]
            dst = (ctypes.c_uint8 * nbytes)()
            n = q(t, x.ctypes.data, ctypes.addressof(dst), 0, x.shape[0], ROW, None)
            assert n == nbytes, (case, name, n, nbytes)
            tensors[f"{case}.{name}"] = ("U8", [nbytes], bytes(dst))
            # ggml's dequantization of those bytes (its to_float)
            back = np.zeros(x.size, np.float32)
            to_float_t(traits(t).contents.to_float)(
                ctypes.addressof(dst), back.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), x.size)
            tensors[f"{case}.{name}.dequantized"] = ("F32", list(x.shape), back.tobytes())

    header = {"__metadata__": {"llama_cpp_python": llama_cpp.__version__}}
    blobs, off = [], 0
    for k, (dt, shape, data) in tensors.items():
        header[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(sys.argv[1], "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    print(f"wrote {sys.argv[1]}: {len(tensors)} tensors, {off} bytes of data")


if __name__ == "__main__":
    main()
