#!/usr/bin/env python3
"""Generate the bitsandbytes bit-compatibility fixture for qtrain-quant.

Runs bitsandbytes' own quantization on deterministic inputs and stores inputs and
outputs in one safetensors file, which `crates/qtrain-quant/tests/bnb_fixture.rs`
compares against qtrain's implementation bit for bit.

Needs torch, safetensors and bitsandbytes (made with bitsandbytes 0.50.2 on an
H100, CUDA 13.0). Run once; the output is committed:

    python3 scripts/bnb_fixture.py crates/qtrain-quant/tests/fixtures/bnb_nf4.safetensors
"""
import json
import sys

import torch
from safetensors.torch import save_file

import bitsandbytes as bnb
import bitsandbytes.functional as F


def main(out_path: str) -> None:
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    tensors = {}
    meta = {"bitsandbytes": bnb.__version__, "torch": torch.__version__}

    def weight(shape, scale=0.02):
        # bf16 like a real checkpoint, then widened: the Rust side reads f32.
        return (torch.randn(shape, generator=g) * scale).to(torch.bfloat16).to(torch.float32)

    cases = {
        # 640 blocks of 64 -> 3 nested blocks of 256 (the last partial).
        "w1": (weight((128, 320)), True),
        # 2310 values: a partial last block (6 values) and one all-zero block.
        # (An odd element count is covered by the unit tests, from the kernel source.)
        "w2": (weight((33, 70)), True),
        # Plain absmax (no double quantization).
        "w3": (weight((16, 96), 0.5), False),
    }
    cases["w2"][0].view(-1)[128:192] = 0.0
    for name, (w, dq) in cases.items():
        packed, state = F.quantize_4bit(
            w.to(dev), blocksize=64, compress_statistics=dq, quant_type="nf4"
        )
        tensors[f"{name}.input"] = w.contiguous()
        tensors[f"{name}.packed"] = packed.cpu().view(-1).contiguous()
        packed_state = state.as_dict(packed=True)
        for k, v in packed_state.items():
            tensors[f"{name}.{k}"] = v.cpu().contiguous()
        deq = F.dequantize_4bit(packed, state).float().cpu()
        tensors[f"{name}.dequantized"] = deq.contiguous()
        if dq:
            tensors[f"{name}.offset"] = state.offset.reshape(1).float().cpu()
        print(name, tuple(w.shape), "double_quant" if dq else "plain",
              "state:", bytes(packed_state[[k for k in packed_state if k.startswith("quant_state")][0]].tolist()).decode())

    x = torch.randn(1000, generator=g) * 3.0
    q, st = F.quantize_blockwise(x.to(dev), blocksize=256)
    tensors["bw.input"] = x
    tensors["bw.q"] = q.cpu()
    tensors["bw.absmax"] = st.absmax.float().cpu()
    tensors["map.signed"] = F.create_dynamic_map(signed=True).float()
    tensors["map.unsigned"] = F.create_dynamic_map(signed=False).float()

    # The double-quantization stage alone on larger tensors, whose offset
    # (`absmax.mean()` on the GPU) is where a CPU reimplementation can drift: keep
    # bitsandbytes' f32 absmax (from the plain run) and what compress_statistics
    # made of it, not the weights (that would bloat the fixture).
    g2 = torch.Generator().manual_seed(1)
    for n_blocks in (2560, 16384, 65536):
        w = (torch.randn(n_blocks, 64, generator=g2) * 0.02).to(torch.bfloat16).to(dev)
        _, plain = F.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
        _, dq = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        tensors[f"dq{n_blocks}.absmax_f32"] = plain.absmax.float().cpu()
        tensors[f"dq{n_blocks}.offset"] = dq.offset.reshape(1).float().cpu()
        tensors[f"dq{n_blocks}.absmax"] = dq.absmax.cpu()
        tensors[f"dq{n_blocks}.nested_absmax"] = dq.state2.absmax.float().cpu()
        print(f"dq{n_blocks}", "offset", dq.offset.item())

    save_file(tensors, out_path, metadata=meta)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    print("wrote", out_path, "with", len(tensors), "tensors,", total, "bytes;", json.dumps(meta))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
