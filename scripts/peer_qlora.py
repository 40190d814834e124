#!/usr/bin/env python3
"""The reference stack's QLoRA benchmark: transformers + PEFT + bitsandbytes.

    python3 scripts/peer_qlora.py --model DIR [--cases 8x512,4x2048,1x8192]
        [--targets qkvo all] [--warmup 2] [--steps 5] [--json-out FILE]

Runs the cases of `qtrain bench` (crates/qtrain-cli/src/bench.rs) with the stack
qtrain is measured against (issue 8), on the same GPU:

- the model directory (e.g. `qtrain init-random --preset mistral-7b-v0.3 --out DIR`)
  loaded NF4 with double quantization and bf16 compute through BitsAndBytesConfig,
  sdpa attention, then `peft.prepare_model_for_kbit_training` with gradient
  checkpointing (use_reentrant=False);
- PEFT LoRA r16, alpha 32, dropout 0 on each target set (`qkvo` = q/k/v/o_proj,
  `all` = the seven projections, or a comma list of projection names);
- bitsandbytes' PagedAdamW8bit with qtrain bench's hyper-parameters (lr 1e-3,
  betas 0.9/0.999, eps 1e-8, weight decay 1e-2, 8-bit state from 4096 elements);
- the forward under bf16 autocast, as `Trainer(bf16=True)` runs it (the usual QLoRA
  recipe); `--autocast none` runs it without.

Per case: a fixed random batch (seed 1, ids in [3, vocab), labels = inputs), fresh
LoRA weights (the same initial values for every case of a target set) and a fresh
optimizer; warm-up steps, then timed steps, each a whole optimizer step (forward,
backward, optimizer.step, zero_grad) between two torch.cuda.synchronize calls.
Prints one JSON object per case on stdout (and to --json-out as it goes): tokens/s,
mean step seconds, the loss of every step (it must fall on a repeated batch),
torch.cuda.max_memory_allocated/max_memory_reserved of that case (reset before it),
the versions and the GPU. An out-of-memory case is reported (`"status": "oom"`) and
the next one runs. A table follows on stderr.

One model load serves every target set: after a set's cases, PEFT's `unload()`
strips the LoRA layers and the next set is injected into the same quantized model.
The script checks that the re-wrapped model has exactly the expected LoRA modules
and no leftovers; if not (or with --reload) it loads the model again. Each JSON
line says which happened (`model_load`: "fresh", "reused" or "reloaded").

Not counted by torch's allocator: the CUDA context and the paged optimizer state
(managed memory, a few tens of MB for LoRA r16); scripts/bench-compare.sh samples
nvidia-smi for the whole-device figure.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
import traceback

PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ALIASES = {"qkvo": PROJS[:4], "all": PROJS}
GIB = float(1 << 30)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def version_tuple(text):
    """(major, minor) of a version string such as `5.17.0` or `4.57.0.dev0`."""
    parts = []
    for x in text.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in x if c.isdigit()) if x[:1].isdigit() else ""
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (2 - len(parts)))


def parse_cases(text):
    cases = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        b, sep, s = item.partition("x")
        try:
            bi, si = int(b), int(s)
        except ValueError:
            bi = si = 0
        if not sep or bi <= 0 or si <= 1:
            raise SystemExit(f"--cases: `{item}` is not BATCHxSEQ (e.g. 8x512; SEQ at least 2)")
        cases.append((item, bi, si))
    if not cases:
        raise SystemExit("--cases: no case given")
    return cases


def parse_target_set(text):
    """`qkvo`, `all`, or a comma list of projection names -> (label, [names])."""
    t = text.strip()
    if t in ALIASES:
        return t, list(ALIASES[t])
    names = []
    for n in (x.strip() for x in t.split(",")):
        if not n:
            continue
        if n not in PROJS:
            raise SystemExit(f"--targets: unknown projection `{n}` in `{text}` (known: qkvo, all, {', '.join(PROJS)})")
        if n not in names:
            names.append(n)
    if not names:
        raise SystemExit(f"--targets: `{text}` names no projection")
    ordered = [p for p in PROJS if p in names]
    for label, members in ALIASES.items():
        if ordered == members:
            return label, ordered
    return ",".join(ordered), ordered


def args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--cases", default="8x512,4x2048", help="BATCHxSEQ, comma separated (as qtrain bench)")
    p.add_argument(
        "--targets",
        nargs="+",
        default=["qkvo"],
        help="one or more target sets: qkvo, all, or a comma list of projections (e.g. --targets qkvo all)",
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank, as qtrain bench)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3, help="qtrain bench steps with lr 1e-3")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--no-checkpointing", action="store_true", help="keep activations (no gradient checkpointing)")
    p.add_argument("--autocast", choices=["bf16", "none"], default="bf16", help="autocast of the forward (Trainer bf16=True)")
    p.add_argument("--reload", action="store_true", help="load the model again for every target set")
    p.add_argument("--json-out", default=None, help="also write the JSON lines to this file")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak for MFU (as qtrain bench)")
    return p


def main():
    a = args_parser().parse_args()
    cases = parse_cases(a.cases)
    target_sets = [parse_target_set(t) for t in a.targets]
    if a.steps < 1 or a.warmup < 0 or a.rank < 1:
        raise SystemExit("--steps must be >= 1, --warmup >= 0, --rank >= 1")
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        raise SystemExit(f"--model {a.model}: no config.json (generate it with `qtrain init-random --preset mistral-7b-v0.3 --out {a.model}`)")
    alpha = a.alpha if a.alpha is not None else 2.0 * a.rank

    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise SystemExit(
            f"bitsandbytes is not importable ({e}); install the carried wheel first:\n"
            "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
            "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site"
        )
    import torch
    import transformers
    import peft
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    env = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": getattr(bnb, "__version__", "?"),
        "python": sys.version.split()[0],
        "gpu": torch.cuda.get_device_name(dev),
        "gpu_memory_bytes": torch.cuda.get_device_properties(dev).total_memory,
    }
    log("peer stack: " + json.dumps(env))

    hf_cfg = AutoConfig.from_pretrained(a.model)
    vocab = hf_cfg.vocab_size
    layers = hf_cfg.num_hidden_layers
    hidden = hf_cfg.hidden_size
    heads = hf_cfg.num_attention_heads
    kv_heads = getattr(hf_cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hidden // heads
    inter = hf_cfg.intermediate_size
    # qtrain bench's FLOP convention: every matmul weight P, 2P per pass, 3 passes
    # with checkpointing (forward, recomputed forward, backward's dX), causal
    # attention 2 x 2 x seq/2 x heads x head_dim per layer and pass, plus one more
    # pass of it for backward's second matmul.
    proj_params = (
        2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
    )
    matmul_params = proj_params * layers + vocab * hidden

    # transformers >= 4.56 names it `dtype` (5.x warns on `torch_dtype`).
    dtype_kw = "dtype" if version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"

    def load():
        t = time.perf_counter()
        qc = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        m = AutoModelForCausalLM.from_pretrained(
            a.model,
            quantization_config=qc,
            attn_implementation="sdpa",
            device_map={"": 0},
            **{dtype_kw: torch.bfloat16},
        )
        n4 = sum(1 for mod in m.modules() if isinstance(mod, bnb.nn.Linear4bit))
        if n4 != 7 * layers:
            raise SystemExit(f"expected {7 * layers} bitsandbytes Linear4bit modules, found {n4}")
        m = prepare_model_for_kbit_training(
            m,
            use_gradient_checkpointing=not a.no_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if not a.no_checkpointing and not m.is_gradient_checkpointing:
            # prepare_model_for_kbit_training enables it only when it recognizes a
            # k-bit model; make sure the reference really checkpoints.
            log("note: prepare_model_for_kbit_training left checkpointing off; enabling it directly")
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.config.use_cache = False
        torch.cuda.synchronize()
        secs = time.perf_counter() - t
        log(
            f"loaded {a.model} in {secs:.1f}s: {n4} Linear4bit, "
            f"{torch.cuda.memory_allocated() / GIB:.2f} GiB allocated, checkpointing {m.is_gradient_checkpointing}"
        )
        return m, secs

    def lora_layers(model):
        from peft.tuners.lora import LoraLayer

        return [n for n, mod in model.named_modules() if isinstance(mod, LoraLayer)]

    out_file = open(a.json_out, "w") if a.json_out else None
    results = []

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if out_file:
            out_file.write(line + "\n")
            out_file.flush()
        results.append(rec)

    base, load_s = load()
    load_state = "fresh"
    for ti, (label, names) in enumerate(target_sets):
        if ti > 0:
            if a.reload:
                load_state = "reloaded"
            else:
                load_state = "reused"
        if load_state == "reloaded":
            del base
            gc.collect()
            torch.cuda.empty_cache()
            base, load_s = load()
        torch.manual_seed(0)
        lcfg = LoraConfig(
            r=a.rank,
            lora_alpha=alpha,
            lora_dropout=0.0,
            target_modules=names,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(base, lcfg)
        found = lora_layers(model)
        if len(found) != layers * len(names) or any(n.rsplit(".", 1)[-1] not in names for n in found):
            if load_state != "reused":
                raise SystemExit(f"{label}: PEFT injected {len(found)} LoRA layers, expected {layers * len(names)}")
            log(f"{label}: the re-wrapped model has {len(found)} LoRA layers (expected {layers * len(names)}); loading again")
            del model, base
            gc.collect()
            torch.cuda.empty_cache()
            base, load_s = load()
            load_state = "reloaded"
            torch.manual_seed(0)
            model = get_peft_model(base, lcfg)
            found = lora_layers(model)
            if len(found) != layers * len(names):
                raise SystemExit(f"{label}: PEFT injected {len(found)} LoRA layers, expected {layers * len(names)}")
        model.train()
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for _, p in trainable)
        if any("lora_" not in n for n, _ in trainable):
            raise SystemExit(f"{label}: non-LoRA parameters are trainable: {[n for n, _ in trainable if 'lora_' not in n][:4]}")
        init = [p.detach().clone() for _, p in trainable]
        weights_bytes = torch.cuda.memory_allocated()
        log(f"{label}: {len(found)} LoRA layers, {n_trainable} trainable parameters ({trainable[0][1].dtype})")

        for case, b, s in cases:
            rec = {
                "stack": "transformers+peft+bitsandbytes",
                "case": case,
                "batch": b,
                "seq": s,
                "targets": ",".join(names),
                "target_set": label,
                "rank": a.rank,
                "alpha": alpha,
                "checkpointing": not a.no_checkpointing,
                "autocast": a.autocast,
                "optimizer": "bitsandbytes.optim.PagedAdamW8bit",
                "lr": a.lr,
                "warmup": a.warmup,
                "steps": a.steps,
                "trainable_params": n_trainable,
                "model_load": load_state,
                "model_load_s": load_s,
                "memory_before_case_bytes": weights_bytes,
                **env,
            }
            t_start = time.time()
            try:
                rec.update(run_case(torch, bnb, model, trainable, init, b, s, a, dev, vocab, layers, heads, head_dim, matmul_params))
            except Exception as e:  # noqa: BLE001 - one bad case must not lose the others
                msg = str(e).strip()
                oom = isinstance(e, oom_types) or "out of memory" in msg.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in msg
                if not oom:
                    traceback.print_exc()
                err = ("oom" if oom else "error", (msg.splitlines()[0][:300] if msg else type(e).__name__))
            else:
                err = None
            if err is not None:
                # run_case's frame (activations, outputs, optimizer) is gone with the exception.
                for _, p_ in trainable:
                    p_.grad = None
                gc.collect()
                torch.cuda.empty_cache()
                rec["peak_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
                rec["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()
                rec.update(status=err[0], error=err[1], step_s=None, tokens_per_s=None, losses=None)
                log(f"  {label} {case}: {err[0].upper()}: {err[1]}")
            rec["t_start"] = t_start
            rec["t_end"] = time.time()
            gc.collect()
            torch.cuda.empty_cache()
            emit(rec)

        base = model.unload()
        if hasattr(base, "peft_config"):
            # older PEFT leaves it behind, and the next get_peft_model would merge into it
            del base.peft_config
        del model, trainable, init
        gc.collect()
        torch.cuda.empty_cache()

    if out_file:
        out_file.close()
    print_table(results)
    bad = [r for r in results if r["status"] == "error"]
    return 1 if bad else 0


def run_case(torch, bnb, model, trainable, init, b, s, a, dev, vocab, layers, heads, head_dim, matmul_params):
    """Times one case; returns the fields of its JSON record. Raises on OOM."""
    label = f"{b}x{s}"
    params = [p for _, p in trainable]
    with torch.no_grad():
        for p, v in zip(params, init):
            p.copy_(v)
            p.grad = None
    opt = bnb.optim.PagedAdamW8bit(
        params,
        lr=a.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=a.weight_decay,
        min_8bit_size=4096,
    )
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (b, s), generator=gen).to(dev)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i in range(a.warmup + a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if a.autocast == "bf16" else contextlib.nullcontext()
        with ctx:
            out = model(input_ids=ids, labels=ids, use_cache=False)
        loss = out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(float(loss.item()))
        del out, loss
        if i >= a.warmup:
            times.append(dt)
        log(f"  {label} step {i}{' (warm-up)' if i < a.warmup else ''}: {dt:.3f}s loss {losses[-1]:.4f}")
    mean = sum(times) / len(times)
    tokens = b * s
    passes = 2.0 if a.no_checkpointing else 3.0
    attn = 2.0 * layers * s * heads * head_dim
    tflops = (passes * 2.0 * matmul_params + (passes + 1.0) * attn) * tokens / mean / 1e12
    falls = all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    if not falls:
        log(f"  WARNING {label}: the loss did not fall on the repeated batch: {losses}")
    return {
        "status": "ok",
        "step_s": mean,
        "tokens_per_s": tokens / mean,
        "step_times_s": times,
        "losses": losses,
        "loss_falls": falls,
        "achieved_tflops": tflops,
        "mfu": (tflops / a.peak_tflops) if a.peak_tflops > 0 else None,
        "peak_memory_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved(),
    }


def print_table(results):
    if not results:
        return
    r0 = results[0]
    log(
        f"\ntransformers {r0['transformers']} + peft {r0['peft']} + bitsandbytes {r0['bitsandbytes']}, "
        f"torch {r0['torch']} (CUDA {r0['torch_cuda']}), {r0['gpu']}; "
        f"r{r0['rank']}, checkpointing {r0['checkpointing']}, autocast {r0['autocast']}, "
        f"{r0['warmup']} warm-up + {r0['steps']} timed steps"
    )
    head = f"{'targets':<8} {'case':<9} {'tokens/s':>9} {'step s':>8} {'alloc GiB':>10} {'resv GiB':>9}  {'loss first -> last':<20} status"
    log(head)
    log("-" * len(head))
    for r in results:
        alloc = r.get("peak_memory_allocated_bytes")
        resv = r.get("peak_memory_reserved_bytes")
        if r["status"] == "ok":
            tps = f"{r['tokens_per_s']:9.0f}"
            st = f"{r['step_s']:8.3f}"
            ls = f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"
            status = "ok" if r["loss_falls"] else "LOSS DID NOT FALL"
        else:
            tps, st, ls, status = f"{'-':>9}", f"{'-':>8}", "", r["status"].upper()
        log(
            f"{r['target_set']:<8} {r['case']:<9} {tps} {st} "
            f"{(alloc or 0) / GIB:10.2f} {(resv or 0) / GIB:9.2f}  {ls:<20} {status}"
        )


if __name__ == "__main__":
    sys.exit(main())
