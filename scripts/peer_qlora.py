#!/usr/bin/env python3
"""The Hugging Face stack's QLoRA benchmark: transformers + PEFT + bitsandbytes, in
the recipes users run for speed.

    python3 scripts/peer_qlora.py --model DIR [--cases 8x512,4x2048,1x8192]
        [--targets qkvo all] [--recipes autocast,liger,plain] [--warmup 2] [--steps 5]
        [--json-out FILE]

Runs the cases of `qtrain bench` (crates/qtrain-cli/src/bench.rs) on the same GPU,
timed as scripts/peer_common.py describes. Every recipe loads the model directory
(e.g. `qtrain init-random --preset mistral-7b-v0.3 --out DIR`) NF4 with double
quantization and bf16 compute through BitsAndBytesConfig, bf16 weights, sdpa
attention; puts PEFT LoRA r16, alpha 32, dropout 0 on each target set (`qkvo` =
q/k/v/o_proj, `all` = the seven projections, or a comma list); checkpoints every
decoder layer (use_reentrant=False) and steps bitsandbytes' PagedAdamW8bit (lr 1e-3,
betas 0.9/0.999, eps 1e-8, weight decay 1e-2, 8-bit state from 4096 elements).

Recipes (`--recipe NAME`, or several with `--recipes a,b,c`):

- `autocast` (the default): what TRL 1.15's `SFTTrainer(bf16=True,
  optim="paged_adamw_8bit")` does to a quantized model, replayed step by step: no
  `prepare_model_for_kbit_training` (TRL does not call it, so norms, embeddings and
  lm_head stay bf16), gradient checkpointing as transformers 5 enables it,
  `enable_input_require_grads`, the LoRA weights cast to bf16, TRL's fused LM head
  (`trl.trainer.utils.add_fused_lm_head` with SFTTrainer's outputs; the loss comes
  from chunked log-probabilities, no (batch, seq, vocab) logits), the forward under
  bf16 autocast as accelerate runs it. `--autocast-loss logits` takes transformers'
  own loss over full logits instead (TRL before its fused head).
- `liger`: the same set-up with liger-kernel's `apply_liger_kernel_to_mistral(rope=True,
  rms_norm=True, swiglu=True, fused_linear_cross_entropy=True, cross_entropy=False)`
  applied before the model is loaded; labels go to the model so Liger's fused linear
  cross-entropy computes the loss (checked: no logits come back).
- `plain`: the reference of issue 8, `peft.prepare_model_for_kbit_training` (norms,
  embeddings and lm_head upcast to fp32), fp32 LoRA weights, no autocast,
  transformers' loss over full logits (what `--autocast none` ran before).

One process serves every recipe and target set with as few loads as the libraries
allow: after a target set, PEFT's `unload()` strips the LoRA layers and the next set
is injected into the same quantized model (checked: exactly the expected LoRA
modules). Recipes run in the order autocast, plain, liger whatever order they are
given in, because `plain` upcasts the loaded model in place and Liger patches
transformers' Mistral classes for the rest of the process: the model is loaded
again after `apply_liger_kernel_to_mistral`. Each JSON line says which happened
(`model_load`: "fresh", "reused" or "reloaded", and why in `model_load_note`);
--reload loads it again for every recipe and target set.

JSON fields beyond peer_common's: `tool` "hf", `recipe`, `peer` ("hf-" + recipe,
the table's column), `autocast` ("bf16" or "none"), `loss_impl`, `lora_dtype`,
`kbit_prepared`, and the versions of every library involved.

`--device cpu` runs the same code on the CPU (bitsandbytes >= 0.48 quantizes NF4
there) for scripts/test_peer_cpu.py's tiny model: times and memory mean nothing, and
the Triton kernels of TRL's fused head and of Liger need a GPU.

Not counted by torch's allocator: the CUDA context and the paged optimizer state
(managed memory, a few tens of MB for LoRA r16); scripts/bench-compare.sh samples
nvidia-smi for the whole-device figure.
"""
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

RECIPES = ("autocast", "plain", "liger")  # also the order they run in
INSTALL_HINT = (
    "install the carried wheels first:\n"
    "  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
    "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site"
)
# What SFTTrainer 1.15 asks TRL's fused LM head for (its `mean_token_accuracy` and
# entropy metrics come from them).
TRL_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")


def args_parser():
    p = pc.parser(__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=None, choices=RECIPES, help="one recipe (default autocast)")
    p.add_argument("--recipes", default=None, help="several, comma separated: autocast,liger,plain")
    p.add_argument(
        "--autocast",
        choices=["bf16", "none"],
        default=None,
        help="old spelling: bf16 = --recipe autocast, none = --recipe plain",
    )
    p.add_argument(
        "--autocast-loss",
        choices=["trl", "logits"],
        default="trl",
        help="the autocast recipe's loss: TRL 1.15's fused LM head (default) or transformers' over full logits",
    )
    p.add_argument("--no-checkpointing", action="store_true", help="keep activations (no gradient checkpointing)")
    p.add_argument("--reload", action="store_true", help="load the model again for every recipe and target set")
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cuda (the benchmark) or cpu (a smoke test of the same code on a tiny model: scripts/test_peer_cpu.py)",
    )
    return p


def parse_recipes(a):
    """The recipes to run, in run order, and a note when that differs from the order given."""
    given = [x for x in ((a.recipes or "").split(",")) if x.strip()]
    given = [x.strip() for x in given]
    if a.recipe:
        given.append(a.recipe)
    if a.autocast is not None:
        given.append("autocast" if a.autocast == "bf16" else "plain")
    if not given:
        given = ["autocast"]
    bad = [x for x in given if x not in RECIPES]
    if bad:
        raise SystemExit(f"--recipes: unknown recipe `{bad[0]}` (known: {', '.join(RECIPES)})")
    run = [r for r in RECIPES if r in given]
    seen = []
    for x in given:
        if x not in seen:
            seen.append(x)
    note = None if seen == run else f"recipes run in the order {','.join(run)} (given {','.join(seen)})"
    return run, note


def main():
    a = args_parser().parse_args()
    cases, target_sets, alpha = pc.check_common_args(a)
    recipes, order_note = parse_recipes(a)
    if not os.path.isfile(os.path.join(a.model, "config.json")):
        raise SystemExit(f"--model {a.model}: no config.json (generate it with `qtrain init-random --preset mistral-7b-v0.3 --out {a.model}`)")
    if order_note:
        pc.log(order_note)
    checkpointing = not a.no_checkpointing

    def recipe_fields(recipe):
        if recipe == "plain":
            return {
                "stack": "transformers+peft+bitsandbytes",
                "autocast": "none",
                "loss_impl": "transformers ForCausalLMLoss over full logits",
                "kbit_prepared": True,
            }
        if recipe == "liger":
            return {
                "stack": "transformers+peft+bitsandbytes+liger-kernel",
                "autocast": "bf16",
                "loss_impl": "liger fused_linear_cross_entropy (no logits)",
                "kbit_prepared": False,
            }
        trl = a.autocast_loss == "trl"
        return {
            "stack": "transformers+peft+bitsandbytes" + ("+trl" if trl else ""),
            "autocast": "bf16",
            "loss_impl": "trl add_fused_lm_head (chunked log-probs, no logits)" if trl else "transformers ForCausalLMLoss over full logits",
            "kbit_prepared": False,
        }

    sink = pc.Sink(a.json_out)
    common = {
        "tool": "hf",
        "rank": a.rank,
        "alpha": alpha,
        "checkpointing": checkpointing,
        "optimizer": "bitsandbytes.optim.PagedAdamW8bit",
        "lr": a.lr,
        "warmup": a.warmup,
        "steps": a.steps,
    }

    def case_base(recipe, label, names, case, b, s):
        return {
            **common,
            "peer": f"hf-{recipe}",
            "recipe": recipe,
            **recipe_fields(recipe),
            "case": case,
            "batch": b,
            "seq": s,
            "targets": ",".join(names),
            "target_set": label,
        }

    def fail_all(recipe, sets, err):
        for label, names in sets:
            for case, b, s in cases:
                sink.emit(pc.failed_record(case_base(recipe, label, names, case, b, s), "error", err))

    try:
        import bitsandbytes as bnb
        import torch
        import transformers
        import peft
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

        if a.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible to torch")
    except Exception as e:  # noqa: BLE001 - recorded for every case, so the table shows it
        traceback.print_exc()
        hint = f"; {INSTALL_HINT}" if isinstance(e, ImportError) else ""
        pc.log(f"{type(e).__name__}: {e}{hint}")
        for recipe in recipes:
            fail_all(recipe, target_sets, f"import: {type(e).__name__}: {pc.first_line(e)}")
        sink.close()
        return 1
    acc = pc.Accel(torch, a.device)
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": getattr(bnb, "__version__", "?"),
        "python": sys.version.split()[0],
        **acc.describe(),
    }
    from importlib.metadata import PackageNotFoundError, version

    for dist, key in (("trl", "trl"), ("liger-kernel", "liger_kernel"), ("triton", "triton")):
        try:
            env[key] = version(dist)
        except PackageNotFoundError:  # reported where a recipe needs it
            env[key] = None
    common.update(env)
    pc.log("peer stack: " + str(env))

    hf_cfg = AutoConfig.from_pretrained(a.model)
    shape = pc.model_shape(hf_cfg)
    layers = shape["layers"]
    # transformers >= 4.56 names it `dtype` (5.x warns on `torch_dtype`).
    dtype_kw = "dtype" if pc.version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"

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
            device_map=acc.device_map(),
            **{dtype_kw: torch.bfloat16},
        )
        n4 = sum(1 for mod in m.modules() if isinstance(mod, bnb.nn.Linear4bit))
        if n4 != 7 * layers:
            raise RuntimeError(f"expected {7 * layers} bitsandbytes Linear4bit modules, found {n4}")
        m.config.use_cache = False
        acc.sync()
        secs = time.perf_counter() - t
        pc.log(f"loaded {a.model} in {secs:.1f}s: {n4} Linear4bit, {acc.gib_allocated()}")
        return m, secs

    def lora_layers(model):
        from peft.tuners.lora import LoraLayer

        return [n for n, mod in model.named_modules() if isinstance(mod, LoraLayer)]

    # What the process holds: the loaded model, and what has been done to it or to the
    # libraries' classes since (kbit preparation, Liger's patches, TRL's fused head).
    st = {"base": None, "load_s": None, "loads": 0, "kbit": False, "liger_applied": False, "liger_in_model": False}

    def drop_model():
        st["base"] = None
        acc.empty_cache()

    def ensure_loaded(recipe):
        """The base model for `recipe`, loading it when needed; (state, note)."""
        note = None
        need = st["base"] is None
        if st["base"] is not None:
            if a.reload:
                need, note = True, "--reload"
            elif recipe == "liger" and not st["liger_in_model"]:
                need = True
                note = "Liger patches transformers' Mistral classes; loaded again after apply_liger_kernel_to_mistral"
            elif recipe != "plain" and st["kbit"]:
                need = True
                note = "prepare_model_for_kbit_training upcast the loaded model for the plain recipe"
        if need:
            drop_model()
            st["base"], st["load_s"] = load()
            st["loads"] += 1
            st["kbit"] = False
            st["liger_in_model"] = st["liger_applied"]
            return ("fresh" if st["loads"] == 1 else "reloaded"), note
        return "reused", note

    def apply_liger():
        from liger_kernel.transformers import monkey_patch as lmp

        model_type = hf_cfg.model_type
        fn = getattr(lmp, f"apply_liger_kernel_to_{model_type}", None)
        if fn is None or model_type not in ("mistral", "llama"):
            raise RuntimeError(f"the liger recipe is written for Mistral/Llama checkpoints; config.json says model_type {model_type!r}")
        fn(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True, cross_entropy=False)
        st["liger_applied"] = True

    def check_liger(base):
        """Counts the Liger modules in the loaded model; raises if the patch did not take."""
        import importlib

        counts = {"LigerRMSNorm": 0, "LigerSwiGLUMLP": 0}
        for mod in base.modules():
            n = type(mod).__name__
            if n in counts:
                counts[n] += 1
        mm = importlib.import_module(f"transformers.models.{hf_cfg.model_type}.modeling_{hf_cfg.model_type}")
        from liger_kernel.transformers.rope import liger_rotary_pos_emb

        rope = getattr(mm, "apply_rotary_pos_emb", None) is liger_rotary_pos_emb
        lce = "lce_forward" in getattr(type(base).forward, "__name__", "") or "liger" in getattr(type(base).forward, "__module__", "")
        want = {"LigerRMSNorm": 2 * layers + 1, "LigerSwiGLUMLP": layers}
        if counts != want or not rope or not lce:
            raise RuntimeError(f"Liger's patch did not take: modules {counts} (want {want}), rope patched {rope}, fused CE forward {lce}")
        return {**counts, "rope": rope, "fused_linear_cross_entropy": lce}

    def setup_base(recipe, base):
        """What the recipe does to the loaded model before PEFT; returns extra record fields."""
        extra = {}
        if "forward" in base.__dict__ and recipe != "autocast":
            del base.forward  # TRL's fused head belongs to the autocast recipe only
            base.__dict__.pop("_peer_fused_head", None)
        if recipe == "plain":
            if not st["kbit"]:
                prepare_model_for_kbit_training(
                    base,
                    use_gradient_checkpointing=checkpointing,
                    gradient_checkpointing_kwargs={"use_reentrant": False},
                )
                st["kbit"] = True
                if checkpointing and not base.is_gradient_checkpointing:
                    # prepare_model_for_kbit_training enables it only when it recognizes a
                    # k-bit model; make sure the reference really checkpoints.
                    pc.log("note: prepare_model_for_kbit_training left checkpointing off; enabling it directly")
                    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            if checkpointing:
                # transformers 5's Trainer: gradient_checkpointing_enable() with its
                # default {"use_reentrant": False}.
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if recipe == "autocast" and a.autocast_loss == "trl" and not base.__dict__.get("_peer_fused_head"):
                from trl.trainer import utils as trl_utils

                if getattr(trl_utils, "_ChunkedLogProbFunction", None) is None:
                    raise RuntimeError("TRL's chunked log-prob kernel is unavailable (trl.kernels did not import: triton?)")
                trl_utils.add_fused_lm_head(base, outputs=TRL_FUSED_OUTPUTS)
                base.__dict__["_peer_fused_head"] = True
            if recipe == "liger":
                extra["liger_patched"] = check_liger(base)
        if checkpointing and not base.is_gradient_checkpointing:
            raise RuntimeError("gradient checkpointing is off after set-up")
        base.config.use_cache = False
        return extra

    def make_loss_fn(recipe, model):
        if recipe == "plain":

            def plain(ids):
                out = model(input_ids=ids, labels=ids, use_cache=False)
                return out.loss, out

            return plain
        fused_trl = recipe == "autocast" and a.autocast_loss == "trl"

        def fn(ids):
            with acc.autocast():
                if fused_trl:
                    out = model(input_ids=ids, labels=ids, use_cache=False, fused_lm_head=True)
                else:
                    out = model(input_ids=ids, labels=ids, use_cache=False)
            return out.loss, out

        return fn

    def check_output_fn(recipe):
        if recipe == "plain" or (recipe == "autocast" and a.autocast_loss == "logits"):
            return None

        def check(out):
            logits = getattr(out, "logits", None)
            if logits is not None:
                raise RuntimeError(f"{recipe}: the fused loss did not run (the model returned logits of shape {tuple(logits.shape)})")
            if recipe == "autocast" and getattr(out, "log_probs", None) is None:
                raise RuntimeError("autocast: TRL's fused LM head did not run (no log_probs in the output)")

        return check

    for recipe in recipes:
        for ti, (label, names) in enumerate(target_sets):
            model = base = None
            try:
                if recipe == "liger" and not st["liger_applied"]:
                    apply_liger()
                load_state, load_note = ensure_loaded(recipe)
                base = st["base"]
                extra = setup_base(recipe, base)
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
                        raise RuntimeError(f"{label}: PEFT injected {len(found)} LoRA layers, expected {layers * len(names)}")
                    pc.log(f"{label}: the re-wrapped model has {len(found)} LoRA layers (expected {layers * len(names)}); loading again")
                    model = base = None
                    drop_model()
                    load_state, _ = ensure_loaded(recipe)
                    load_note = "the re-wrapped model had leftover LoRA layers"
                    base = st["base"]
                    extra = setup_base(recipe, base)
                    torch.manual_seed(0)
                    model = get_peft_model(base, lcfg)
                    found = lora_layers(model)
                    if len(found) != layers * len(names):
                        raise RuntimeError(f"{label}: PEFT injected {len(found)} LoRA layers, expected {layers * len(names)}")
                if recipe != "plain":
                    if checkpointing:
                        model.enable_input_require_grads()
                    # SFTTrainer on a quantized model: the adapter weights in bf16.
                    for _, p in model.named_parameters():
                        if p.requires_grad:
                            p.data = p.data.to(torch.bfloat16)
                model.train()
                trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
                if not trainable or any("lora_" not in n for n, _ in trainable):
                    raise RuntimeError(f"{label}: trainable parameters are not exactly the LoRA ones: {[n for n, _ in trainable if 'lora_' not in n][:4]}")
            except Exception as e:  # noqa: BLE001 - a recipe that cannot be set up must not stop the others
                traceback.print_exc()
                err = f"set-up of {recipe}: {pc.first_line(e)}"
                pc.log(err)
                fail_all(recipe, target_sets[ti:], err)
                if model is not None:
                    # PEFT had wrapped it: what state it is in is unknown, load afresh.
                    st["base"] = None
                model = base = trainable = None
                acc.empty_cache()
                break
            params = [p for _, p in trainable]
            init = [p.detach().clone() for p in params]
            n_trainable = sum(p.numel() for p in params)
            weights_bytes = acc.allocated()
            pc.log(f"{recipe} {label}: {len(found)} LoRA layers, {n_trainable} trainable parameters ({params[0].dtype}), model {load_state}")
            loss_fn = make_loss_fn(recipe, model)
            check = check_output_fn(recipe)
            for case, b, s in cases:
                rec = case_base(recipe, label, names, case, b, s)
                rec.update(
                    trainable_params=n_trainable,
                    lora_dtype=str(params[0].dtype).replace("torch.", ""),
                    model_load=load_state,
                    model_load_note=load_note,
                    model_load_s=st["load_s"],
                    memory_before_case_bytes=weights_bytes,
                    order_note=order_note,
                    **extra,
                )
                sink.emit(pc.run_timed_case(torch, bnb, rec, params, init, loss_fn, b, s, a, acc, shape, check, checkpointing))
            base = model.unload()
            if hasattr(base, "peft_config"):
                # older PEFT leaves it behind, and the next get_peft_model would merge into it
                del base.peft_config
            if hasattr(base, "disable_input_require_grads"):
                base.disable_input_require_grads()
            st["base"] = base
            del model, trainable, init, params, loss_fn
            acc.empty_cache()

    sink.close()
    pc.print_table(sink.results)
    bad = [r for r in sink.results if r["status"] == "error"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
