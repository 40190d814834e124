#!/usr/bin/env python3
"""Unsloth's QLoRA recipe as its users run it, timed like qtrain bench.

    python3 scripts/peer_unsloth.py --model DIR [--cases 8x512,4x2048,1x8192]
        [--targets qkvo all] [--warmup 2] [--steps 5] [--json-out FILE]

The recipe (Unsloth 2026.10.9, unsloth_zoo 2026.10.9):

- `FastLanguageModel.from_pretrained(DIR, load_in_4bit=True, dtype=torch.bfloat16,
  max_seq_length=the longest case)` on the local model directory (the same one the
  other peers and qtrain read; e.g. `qtrain init-random --preset mistral-7b-v0.3`):
  NF4, double quantization, bf16 compute (Unsloth's own BitsAndBytesConfig), its
  Mistral patches (FastMistralModel: fused RoPE/RMSNorm/SwiGLU Triton kernels, its
  attention path);
- `FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0,
  target_modules=<set>, bias="none", use_gradient_checkpointing="unsloth")`: its fused
  LoRA kernels (they need dropout 0 and no bias) and its offloaded gradient
  checkpointing;
- the forward under bf16 autocast as `SFTTrainer(bf16=True)` runs it, with labels, so
  Unsloth computes its fused cross-entropy (no logits when it can avoid them; the
  JSON says which: `loss_impl`, `logits_shape`);
- bitsandbytes' PagedAdamW8bit with qtrain bench's hyper-parameters, and the cases,
  warm-up, timing and JSON lines of scripts/peer_common.py (`tool` and `peer`
  "unsloth").

Offline: the GPU machine reaches no network. Before Unsloth is imported this sets
(unless already set) HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE and HF_DATASETS_OFFLINE
(unsloth_zoo syncs the three and then leaves hf_transfer off), UNSLOTH_DISABLE_STATISTICS
(unsloth/models/_utils.py get_statistics: otherwise a snapshot_download per load),
HF_HUB_DISABLE_TELEMETRY, and UNSLOTH_COMPILE_LOCATION under /tmp (its generated
code would otherwise land in the working directory). The model is named by its
absolute path with `use_exact_model_name=True` and `tokenizer_name=` the same path,
so no hub name is ever derived from it.

Unsloth must be imported before transformers, PEFT and TRL (it patches them), so
this script imports nothing else of the stack before it. If the import or a load
fails, every case of the affected target sets is recorded as `"status": "error"`
with the message (the traceback goes to stderr), so the comparison table shows it.
Every target set after the first loads the model again (`model_load: "reloaded"`):
Unsloth's get_peft_model on a model it already wrapped keeps the first adapter.
"""
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "UNSLOTH_COMPILE_LOCATION": "/tmp/unsloth_compiled_cache",
    "TOKENIZERS_PARALLELISM": "false",
}


def args_parser():
    p = pc.parser(__doc__.split("\n\n")[0])
    p.add_argument(
        "--gradient-checkpointing",
        default="unsloth",
        choices=["unsloth", "true"],
        help='use_gradient_checkpointing of get_peft_model ("unsloth" offloads, as its docs recommend)',
    )
    return p


def set_offline_env(environ):
    """Sets what keeps Unsloth off the network; returns what was set (for the record)."""
    done = {}
    for k, v in OFFLINE_ENV.items():
        if k not in environ:
            environ[k] = v
        done[k] = environ[k]
    return done


def main():
    a = args_parser().parse_args()
    cases, target_sets, alpha = pc.check_common_args(a)
    model_dir = os.path.abspath(a.model)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise SystemExit(f"--model {a.model}: no config.json (generate it with `qtrain init-random --preset mistral-7b-v0.3 --out {a.model}`)")
    offline = set_offline_env(os.environ)
    max_seq = max(s for _, _, s in cases)
    sink = pc.Sink(a.json_out)
    common = {
        "tool": "unsloth",
        "peer": "unsloth",
        "recipe": "unsloth",
        "stack": "unsloth+transformers+peft+bitsandbytes",
        "rank": a.rank,
        "alpha": alpha,
        "checkpointing": True,
        "gradient_checkpointing": a.gradient_checkpointing,
        "autocast": "bf16",
        "optimizer": "bitsandbytes.optim.PagedAdamW8bit",
        "lr": a.lr,
        "warmup": a.warmup,
        "steps": a.steps,
        "max_seq_length": max_seq,
        "offline_env": offline,
        "python": sys.version.split()[0],
    }

    def case_base(label, names, case, b, s):
        return {**common, "case": case, "batch": b, "seq": s, "targets": ",".join(names), "target_set": label}

    def fail(sets, err):
        for label, names in sets:
            for case, b, s in cases:
                sink.emit(pc.failed_record(case_base(label, names, case, b, s), "error", err))

    t_import = time.perf_counter()
    try:
        import unsloth  # noqa: F401 - first, so that it patches transformers/PEFT/TRL
        from unsloth import FastLanguageModel
    except BaseException as e:  # noqa: BLE001 - SystemExit/ImportError alike: record it, the table shows it
        traceback.print_exc()
        fail(target_sets, f"import unsloth: {type(e).__name__}: {pc.first_line(e)}")
        sink.close()
        pc.print_table(sink.results)
        return 1
    import_s = time.perf_counter() - t_import
    try:
        import bitsandbytes as bnb
        import torch
        import transformers
        import peft
        from importlib.metadata import PackageNotFoundError, version
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc()
        fail(target_sets, f"import: {type(e).__name__}: {pc.first_line(e)}")
        sink.close()
        return 1

    def dist_version(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    acc = pc.Accel(torch, "cuda")
    common.update(
        {
            "unsloth": getattr(unsloth, "__version__", None) or dist_version("unsloth"),
            "unsloth_zoo": dist_version("unsloth_zoo") or dist_version("unsloth-zoo"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "trl": dist_version("trl"),
            "bitsandbytes": getattr(bnb, "__version__", "?"),
            "triton": dist_version("triton"),
            "xformers": dist_version("xformers"),
            "flash_attn": dist_version("flash-attn") or dist_version("flash_attn"),
            **acc.describe(),
            "import_s": import_s,
        }
    )
    try:
        from unsloth.models import _utils as uu

        common["attention_backend"] = {
            "has_flash_attention": bool(getattr(uu, "HAS_FLASH_ATTENTION", False)),
            "xformers": getattr(uu, "xformers_version", None),
        }
    except Exception:  # noqa: BLE001 - informative only
        pass
    pc.log(f"unsloth {common['unsloth']} imported in {import_s:.1f}s; torch {torch.__version__}, transformers {transformers.__version__}")

    from transformers import AutoConfig

    shape = pc.model_shape(AutoConfig.from_pretrained(model_dir))
    layers = shape["layers"]
    torch_dtype = torch.bfloat16

    def load():
        t = time.perf_counter()
        kwargs = dict(
            model_name=model_dir,
            max_seq_length=max_seq,
            dtype=torch_dtype,
            load_in_4bit=True,
            use_exact_model_name=True,
            tokenizer_name=model_dir,
        )
        note = None
        try:
            model, tok = FastLanguageModel.from_pretrained(**kwargs)
        except Exception as e:  # noqa: BLE001
            # The tokenizer fixes are the part that knows least about a local random model.
            traceback.print_exc()
            note = f"from_pretrained failed ({type(e).__name__}: {pc.first_line(e, 200)}); loaded with fix_tokenizer=False"
            pc.log("retrying: " + note)
            acc.empty_cache()
            model, tok = FastLanguageModel.from_pretrained(**kwargs, fix_tokenizer=False)
        acc.sync()
        secs = time.perf_counter() - t
        n4 = sum(1 for mod in model.modules() if isinstance(mod, bnb.nn.Linear4bit))
        if n4 != 7 * layers:
            raise RuntimeError(f"expected {7 * layers} bitsandbytes Linear4bit modules, found {n4}")
        qc = getattr(model.config, "quantization_config", None)
        qd = qc.to_dict() if hasattr(qc, "to_dict") else (dict(qc) if isinstance(qc, dict) else {})
        quant = {k: str(qd.get(k)) for k in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype") if k in qd}
        pc.log(f"unsloth loaded {model_dir} in {secs:.1f}s: {n4} Linear4bit, {acc.gib_allocated()}, {quant}")
        return model, secs, note, quant

    def fast_lora_paths(model):
        """Which of Unsloth's fused LoRA paths layer 0 took (informative)."""
        try:
            layer = model.base_model.model.model.layers[0]
            return {
                "qkv": getattr(getattr(layer.self_attn, "apply_qkv", None), "__name__", None),
                "o": getattr(getattr(layer.self_attn, "apply_o", None), "__name__", None),
                "mlp": getattr(getattr(layer.mlp, "forward", None), "__name__", None),
            }
        except Exception:  # noqa: BLE001
            return None

    loss_info = {}

    def check_output(out):
        logits = getattr(out, "logits", None)
        # Unsloth's fused path returns its EmptyLogits sentinel, which raises on any
        # tensor method (numel included): test the type first.
        if logits is None or not isinstance(logits, torch.Tensor) or logits.numel() == 0:
            kind = "none" if logits is None else type(logits).__name__
            loss_info.update(loss_impl=f"unsloth fused cross-entropy (no logits: {kind})", logits_shape=None)
        else:
            loss_info.update(loss_impl="unsloth cross-entropy over logits", logits_shape=list(logits.shape))

    loads = 0
    for ti, (label, names) in enumerate(target_sets):
        model = None
        try:
            if ti > 0:
                acc.empty_cache()
            model, load_s, load_note, quant = load()
            loads += 1
            load_state = "fresh" if loads == 1 else "reloaded"
            if loads > 1:
                load_note = "; ".join(x for x in ("one load per target set (get_peft_model keeps an existing adapter)", load_note) if x)
            model = FastLanguageModel.get_peft_model(
                model,
                r=a.rank,
                lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                lora_dropout=0,
                target_modules=names,
                bias="none",
                use_gradient_checkpointing=a.gradient_checkpointing if a.gradient_checkpointing == "unsloth" else True,
                random_state=0,
            )
            if hasattr(FastLanguageModel, "for_training"):
                FastLanguageModel.for_training(model)
            model.train()
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            if not trainable or any("lora_" not in n for n, _ in trainable):
                raise RuntimeError(f"{label}: trainable parameters are not exactly the LoRA ones: {[n for n, _ in trainable if 'lora_' not in n][:4]}")
            n_lora = sum(1 for n, _ in trainable if "lora_A" in n)
            if n_lora != layers * len(names):
                raise RuntimeError(f"{label}: {n_lora} LoRA layers, expected {layers * len(names)}")
        except BaseException as e:  # noqa: BLE001 - a failed load must not stop the next target set
            if isinstance(e, KeyboardInterrupt):
                raise
            traceback.print_exc()
            status = "oom" if pc.is_oom(torch, e) else "error"
            err = f"load/get_peft_model: {type(e).__name__}: {pc.first_line(e)}"
            for case, b, s in cases:
                sink.emit(pc.failed_record(case_base(label, names, case, b, s), status, err))
            model = trainable = None
            acc.empty_cache()
            continue
        params = [p for _, p in trainable]
        init = [p.detach().clone() for p in params]
        n_trainable = sum(p.numel() for p in params)
        weights_bytes = acc.allocated()
        paths = fast_lora_paths(model)
        pc.log(f"unsloth {label}: {n_lora} LoRA layers, {n_trainable} trainable parameters ({params[0].dtype}), fast paths {paths}")

        def loss_fn(ids, model=model):
            with acc.autocast():
                out = model(input_ids=ids, labels=ids, use_cache=False)  # as SFTTrainer.compute_loss
            return out.loss, out

        for case, b, s in cases:
            loss_info.clear()
            rec = case_base(label, names, case, b, s)
            rec.update(
                trainable_params=n_trainable,
                lora_dtype=str(params[0].dtype).replace("torch.", ""),
                model_load=load_state,
                model_load_note=load_note,
                model_load_s=load_s,
                quantization=quant,
                fast_lora=paths,
                memory_before_case_bytes=weights_bytes,
            )
            rec = pc.run_timed_case(torch, bnb, rec, params, init, loss_fn, b, s, a, acc, shape, check_output)
            rec.update(loss_info)
            sink.emit(rec)
        del model, trainable, params, init, loss_fn
        acc.empty_cache()

    sink.close()
    pc.print_table(sink.results)
    return 1 if any(r["status"] == "error" for r in sink.results) else 0


if __name__ == "__main__":
    sys.exit(main())
