#!/usr/bin/env python3
"""Check that what qtrain writes loads in the Hugging Face stack.

    python3 scripts/check_hf_compat.py ORIG_DIR BNB_DIR ADAPTER_DIR MERGED_DIR

ORIG_DIR    a model directory (e.g. `qtrain init-random --preset tiny`)
BNB_DIR     qtrain's quantized cache of it (bitsandbytes pre-quantized format)
ADAPTER_DIR a PEFT adapter exported by qtrain for that model
MERGED_DIR  `qtrain export --merged` of that adapter onto ORIG_DIR

Needs torch, transformers, peft and bitsandbytes with a CUDA GPU. Checks:
1. transformers loads BNB_DIR as a 4-bit model; every projection is a bnb Linear4bit
   whose dequantized weight is within the NF4 codebook bound of the original, and
   its logits equal those of the original model carrying those dequantized weights.
2. PEFT loads ADAPTER_DIR onto ORIG_DIR with no missing or unexpected keys, and
   PEFT's own merge_and_unload() gives the same weights as qtrain's merged export.
3. transformers loads MERGED_DIR and its logits equal the PEFT model's.
Exits non-zero on any failure.
"""
import sys

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM

orig_dir, bnb_dir, adapter_dir, merged_dir = sys.argv[1:5]
dev = "cuda"
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


torch.manual_seed(0)
tokens = torch.randint(3, 300, (2, 24), device=dev)

orig = AutoModelForCausalLM.from_pretrained(orig_dir, torch_dtype=torch.float32).to(dev).eval()
with torch.no_grad():
    ref_logits = orig(tokens).logits

# 1. the bitsandbytes-format cache
q = AutoModelForCausalLM.from_pretrained(bnb_dir, device_map={"": 0}).eval()
n4 = 0
worst = 0.0
# The original model with every projection replaced by bitsandbytes' own
# dequantization of the loaded 4-bit weight: what the 4-bit model computes, in f32.
deq_model = AutoModelForCausalLM.from_pretrained(orig_dir, torch_dtype=torch.float32).to(dev).eval()
for name, mod in q.named_modules():
    if isinstance(mod, bnb.nn.Linear4bit):
        n4 += 1
        deq = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
        w = orig.get_submodule(name).weight.float()
        bound = 0.17 * w.abs().max().item()
        worst = max(worst, (deq - w).abs().max().item() / bound)
        with torch.no_grad():
            deq_model.get_submodule(name).weight.copy_(deq)
n_proj = 7 * q.config.num_hidden_layers
check(n4 == n_proj, f"transformers loads the bnb cache: {n4} Linear4bit modules (expected {n_proj})")
check(worst <= 1.0, f"dequantized NF4 weights within the codebook bound of the originals (worst {worst:.2f} of bound)")
with torch.no_grad():
    ql = q(tokens).logits.float()
    dl = deq_model(tokens).logits
rel = ((ql - dl).abs().max() / dl.abs().max()).item()
check(rel < 2e-2, f"4-bit model logits equal the dequantized-weight model's (max rel diff {rel:.2e}, bf16 compute)")

# 2. the PEFT adapter
base = AutoModelForCausalLM.from_pretrained(orig_dir, torch_dtype=torch.float32).to(dev)
pm = PeftModel.from_pretrained(base, adapter_dir).eval()
lora_params = [n for n, _ in pm.named_parameters() if "lora_" in n]
check(len(lora_params) > 0, f"PEFT loads the adapter: {len(lora_params)} LoRA tensors")
nonzero_b = sum(int(p.abs().sum().item() > 0) for n, p in pm.named_parameters() if "lora_B" in n)
check(nonzero_b == len(lora_params) // 2, f"every lora_B was loaded with trained values ({nonzero_b})")
with torch.no_grad():
    peft_logits = pm(tokens).logits
check((peft_logits - ref_logits).abs().max().item() > 1e-3, "the adapter changes the model's output")
merged_ref = pm.merge_and_unload()
ours = AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).to(dev).eval()
worst = 0.0
for name, p in merged_ref.named_parameters():
    mine = ours.get_parameter(name)
    # qtrain writes bf16: compare within bf16 rounding of the value.
    tol = (p.abs() * 2 ** -7).clamp_min(1e-6)  # one bf16 ulp
    worst = max(worst, ((mine - p).abs() / tol).max().item())
check(worst <= 1.0, f"qtrain's merged export equals PEFT's merge_and_unload within bf16 rounding (worst {worst:.2f})")

# 3. the merged model runs in transformers
with torch.no_grad():
    ml = ours(tokens).logits
rel = ((ml - peft_logits).abs().max() / peft_logits.abs().max()).item()
check(rel < 2e-2, f"merged model logits match the PEFT model's (max rel diff {rel:.2e})")

print("versions: torch", torch.__version__, "bitsandbytes", bnb.__version__)
sys.exit(1 if failures else 0)
