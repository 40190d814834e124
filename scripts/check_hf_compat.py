#!/usr/bin/env python3
"""Check that what qtrain writes loads in the Hugging Face stack.

Two modes.

Per family, on the CPU (no GPU, no bitsandbytes):

    python3 scripts/check_hf_compat.py --families QTRAIN_BIN WORK_DIR [PRESET ...]

For each tiny preset of a family (default: tiny, tiny-window, tiny-llama3,
tiny-llama2, tiny-qwen2, tiny-qwen3, and `PRESET+yarn|dynamic|linear` with that RoPE
block laid over the config), `QTRAIN_BIN init-random` writes the model with
the family's built-in tokenizer, `run` trains a few steps, `export` writes the PEFT
adapter and the merged model, and `eval --tokens` writes qtrain's f32 logits. Then:
a. transformers loads the model as that architecture (Llama/Mistral/Qwen2/Qwen3
   ForCausalLM) and its f32 logits equal qtrain's (base) within 1e-4;
b. PEFT loads the adapter onto it with every LoRA tensor and nothing else, and the
   logits equal qtrain's base + adapter within 1e-4 (f32);
c. transformers loads the merged export as that architecture, its logits equal
   qtrain's on the same directory within 1e-4, and its weights equal PEFT's
   merge_and_unload() within bf16 rounding;
d. the tokenizer's chat template (transformers' jinja2) renders a conversation to
   the ids qtrain's data pipeline trains on.

Against a bitsandbytes cache, on a CUDA GPU:

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
import json
import os
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


ARCH = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

RUN_TOML = """
[model]
path = "{orig}"
device = "cpu"
dtype = "f32"
[lora]
rank = 8
alpha = 16.0
dropout = 0.0
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[data]
seq_len = 64
batch_size = 4
eval_samples = 8
[optimizer]
lr = 1e-2
warmup_steps = 1
[budget]
steps = 8
[checkpoint]
output_dir = "{out}"
every_steps = 0
every_minutes = 0.0
[eval]
every_steps = 0
max_batches = 1
samples = 0
[log]
progress_bar = false
tensorboard = false
"""


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def qtrain_logits(qtrain, model, tokens_file, out, adapter=None):
    cmd = [qtrain, "eval", "--model", model, "--device", "cpu", "--dtype", "f32",
           "--quantization", "none", "--tokens", tokens_file, "--logits-out", out]
    if adapter:
        cmd += ["--adapter", adapter]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    j = json.load(open(out))
    return torch.tensor(j["logits"], dtype=torch.float32).reshape(j["shape"])


# RoPE blocks laid over a preset's config ("tiny-qwen2+yarn"), sized so that 512
# positions reach the scaled frequencies of a tiny model.
ROPE_VARIANTS = {
    "yarn": {"max_position_embeddings": 512,
             "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}},
    "dynamic": {"max_position_embeddings": 256, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    "linear": {"rope_scaling": {"type": "linear", "factor": 4.0}},
}


def family_case(qtrain, work, spec):
    print(f"== {spec}")
    preset, _, variant = spec.partition("+")
    root = os.path.join(work, spec)
    orig, run_dir, merged = (os.path.join(root, d) for d in ("orig", "run", "merged"))
    os.makedirs(root, exist_ok=True)
    env = dict(os.environ, RUST_LOG="warn")
    subprocess.run([qtrain, "init-random", "--preset", preset, "--out", orig, "--seed", "1"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    if variant:
        path = os.path.join(orig, "config.json")
        cfg = json.load(open(path))
        cfg.update(ROPE_VARIANTS[variant])
        json.dump(cfg, open(path, "w"), indent=2)
    toml = os.path.join(root, "run.toml")
    open(toml, "w").write(RUN_TOML.format(orig=orig, out=run_dir))
    subprocess.run([qtrain, "run", "--config", toml], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    adapter = os.path.join(run_dir, "adapter")
    subprocess.run([qtrain, "export", "--checkpoint", adapter, "--out", merged, "--merged",
                    "--model", orig], check=True, env=env, stdout=subprocess.DEVNULL)
    cfg = json.load(open(os.path.join(orig, "config.json")))
    arch = ARCH[cfg["model_type"]]
    torch.manual_seed(0)
    # Long enough for Llama 3's and YaRN's scaled low frequencies to turn visibly.
    tokens = torch.randint(0, min(cfg["vocab_size"], 280), (2, 512))
    tokens_file = os.path.join(root, "tokens.json")
    json.dump(tokens.tolist(), open(tokens_file, "w"))

    # a. the base model
    base = AutoModelForCausalLM.from_pretrained(orig, dtype=torch.float32).eval()
    check(type(base).__name__ == arch, f"{spec}: transformers loads {type(base).__name__} ({arch})")
    with torch.no_grad():
        hf_base = base(tokens).logits
    ours = qtrain_logits(qtrain, orig, tokens_file, os.path.join(root, "base.json"))
    r = rel_diff(ours, hf_base)
    check(r < 1e-4, f"{spec}: base logits equal transformers' in f32 (max rel diff {r:.1e})")

    # b. the adapter
    n_adapter = len(__import__("safetensors.torch", fromlist=["load_file"]).load_file(
        os.path.join(adapter, "adapter_model.safetensors")))
    pm = PeftModel.from_pretrained(base, adapter).eval()
    lora = [n for n, _ in pm.named_parameters() if "lora_" in n]
    check(len(lora) == n_adapter, f"{spec}: PEFT loads all {n_adapter} adapter tensors ({len(lora)})")
    with torch.no_grad():
        hf_peft = pm(tokens).logits
    ours = qtrain_logits(qtrain, orig, tokens_file, os.path.join(root, "peft.json"), adapter)
    r = rel_diff(ours, hf_peft)
    moved = rel_diff(hf_peft, hf_base)
    check(moved > 1e-3, f"{spec}: the adapter changes the logits ({moved:.1e})")
    check(r < 1e-4, f"{spec}: base + adapter logits equal PEFT's in f32 (max rel diff {r:.1e})")

    # c. the merged export
    mm = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    check(type(mm).__name__ == arch, f"{spec}: transformers loads the merged export as {type(mm).__name__}")
    with torch.no_grad():
        hf_merged = mm(tokens).logits
    ours = qtrain_logits(qtrain, merged, tokens_file, os.path.join(root, "merged.json"))
    r = rel_diff(ours, hf_merged)
    check(r < 1e-4, f"{spec}: merged logits equal transformers' in f32 (max rel diff {r:.1e})")
    ref = pm.merge_and_unload()
    worst = 0.0
    for name, p in ref.named_parameters():
        mine = mm.get_parameter(name)
        tol = (p.abs() * 2 ** -7).clamp_min(1e-6)
        worst = max(worst, ((mine - p).abs() / tol).max().item())
    check(worst <= 1.0, f"{spec}: merged weights equal PEFT's merge_and_unload within bf16 rounding ({worst:.2f})")

    # d. the chat template through transformers' jinja2, against qtrain's encoding
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(orig)
    conv = [{"role": "user", "content": "Reverse the word: cat"},
            {"role": "assistant", "content": "tac"},
            {"role": "user", "content": "Add 2 and 3"},
            {"role": "assistant", "content": "5"}]
    if cfg["model_type"] == "qwen3":
        conv[-1]["content"] = "<think>\n2 + 3\n</think>\n\n5"
    text = tok.apply_chat_template(conv, tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    render = os.path.join(root, "chat.json")
    json.dump([conv], open(render, "w"))
    out = subprocess.run([qtrain, "eval", "--model", orig, "--render-chat", render],
                         check=True, capture_output=True, text=True).stdout
    q = json.loads(out)[0]
    check(q["text"] == text, f"{spec}: qtrain renders the chat template like transformers")
    check(q["input_ids"] == ids, f"{spec}: and tokenizes it to the same {len(ids)} ids")


if len(sys.argv) >= 3 and sys.argv[1] == "--families":
    qtrain, work = sys.argv[2], sys.argv[3]
    presets = sys.argv[4:] or ["tiny", "tiny-window", "tiny-llama3", "tiny-llama2",
                               "tiny-qwen2", "tiny-qwen3", "tiny-qwen2+yarn",
                               "tiny-llama2+dynamic", "tiny-llama2+linear"]
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    for p in presets:
        family_case(qtrain, work, p)
    print("versions: torch", torch.__version__, "transformers",
          __import__("transformers").__version__, "peft", __import__("peft").__version__)
    sys.exit(1 if failures else 0)

import bitsandbytes as bnb  # noqa: E402  (the GPU mode only)
import bitsandbytes.functional as F  # noqa: E402

orig_dir, bnb_dir, adapter_dir, merged_dir = sys.argv[1:5]
dev = "cuda"


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
