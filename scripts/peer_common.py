"""What the peer benchmarks (peer_qlora.py, peer_unsloth.py) share.

Each peer runs the cases of `qtrain bench` (crates/qtrain-cli/src/bench.rs) the same
way, so that their numbers and qtrain's compare on one table
(bench_compare_table.py): a fixed random batch per case (seed 1, ids in [3, vocab),
labels = inputs), the same initial LoRA weights for every case of a target set, a
fresh bitsandbytes PagedAdamW8bit per case with qtrain bench's hyper-parameters, and
warm-up steps followed by timed steps, each a whole optimizer step (forward,
backward, optimizer.step, zero_grad) between two torch.cuda.synchronize calls. No
gradient clipping (Trainer's default max_grad_norm=1.0 costs a few ms on LoRA
parameters; qtrain bench does not clip either).

One JSON object per case goes to stdout and to --json-out as it is measured; a case
that runs out of memory is recorded (`"status": "oom"`) and the next one runs; a
recipe or tool that cannot be set up records every one of its cases as
`"status": "error"` with the message, so the table shows it instead of a gap.

This module imports neither torch nor any peer library: argument parsing and the
table can be checked on a machine without them (scripts/test_bench_table.py).
"""
import argparse
import gc
import json
import math
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
    """`8x512,4x2048` -> [("8x512", 8, 512), ("4x2048", 4, 2048)]."""
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


def add_common_args(p):
    """The arguments every peer takes, with qtrain bench's defaults."""
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
    p.add_argument("--json-out", default=None, help="also write the JSON lines to this file")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak for MFU (as qtrain bench)")
    return p


def check_common_args(a):
    """Validated (cases, target_sets, alpha) of parsed common arguments."""
    cases = parse_cases(a.cases)
    target_sets = [parse_target_set(t) for t in a.targets]
    if a.steps < 1 or a.warmup < 0 or a.rank < 1:
        raise SystemExit("--steps must be >= 1, --warmup >= 0, --rank >= 1")
    alpha = a.alpha if a.alpha is not None else 2.0 * a.rank
    return cases, target_sets, alpha


def model_shape(hf_cfg):
    """The shape numbers of a transformers config, and qtrain bench's matmul parameter count."""
    vocab = hf_cfg.vocab_size
    layers = hf_cfg.num_hidden_layers
    hidden = hf_cfg.hidden_size
    heads = hf_cfg.num_attention_heads
    kv_heads = getattr(hf_cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hidden // heads
    inter = hf_cfg.intermediate_size
    proj_params = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
    return {
        "vocab": vocab,
        "layers": layers,
        "hidden": hidden,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "inter": inter,
        "matmul_params": proj_params * layers + vocab * hidden,
    }


def achieved_tflops(shape, tokens, seq, step_s, checkpointing=True):
    """qtrain bench's FLOP convention: every matmul weight P, 2P per pass, 3 passes with
    checkpointing (forward, recomputed forward, backward's dX), causal attention
    2 x 2 x seq/2 x heads x head_dim per layer and pass, plus one more pass of it for
    the backward's second matmul."""
    passes = 3.0 if checkpointing else 2.0
    attn = 2.0 * shape["layers"] * seq * shape["heads"] * shape["head_dim"]
    return (passes * 2.0 * shape["matmul_params"] + (passes + 1.0) * attn) * tokens / step_s / 1e12


def is_oom(torch, exc):
    types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)) if t)
    msg = str(exc)
    return (types and isinstance(exc, types)) or "out of memory" in msg.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in msg


def first_line(exc, limit=300):
    msg = str(exc).strip()
    return msg.splitlines()[0][:limit] if msg else type(exc).__name__


class Sink:
    """JSON lines to stdout and (as they come) to a file; keeps them for the table."""

    def __init__(self, path):
        self.file = open(path, "w") if path else None
        self.results = []

    def emit(self, rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        self.results.append(rec)

    def close(self):
        if self.file:
            self.file.close()
            self.file = None


def failed_record(base, status, error):
    """A case record that did not run (setup failed) or stopped (OOM, error)."""
    rec = dict(base)
    rec.update(status=status, error=error, step_s=None, tokens_per_s=None, losses=None)
    rec.setdefault("t_start", time.time())
    rec.setdefault("t_end", time.time())
    return rec


class Accel:
    """The device a peer runs on, and the few calls the benchmark makes to it.

    `cuda` is what the benchmark is for. `cpu` runs the same code on a tiny model
    (scripts/test_peer_cpu.py) to catch library-API mistakes without a GPU: its
    times mean nothing and it has no memory figures."""

    def __init__(self, torch, kind="cuda"):
        if kind not in ("cuda", "cpu"):
            raise SystemExit(f"--device: `{kind}` is not cuda or cpu")
        self.torch = torch
        self.cuda = kind == "cuda"
        self.dev = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.dev)

    def device_map(self):
        return {"": 0} if self.cuda else {"": "cpu"}

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def empty_cache(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def allocated(self):
        return self.torch.cuda.memory_allocated() if self.cuda else None

    def peaks(self):
        """{peak_memory_allocated_bytes, peak_memory_reserved_bytes} since reset_peak."""
        if not self.cuda:
            return {"peak_memory_allocated_bytes": None, "peak_memory_reserved_bytes": None}
        return {
            "peak_memory_allocated_bytes": self.torch.cuda.max_memory_allocated(),
            "peak_memory_reserved_bytes": self.torch.cuda.max_memory_reserved(),
        }

    def autocast(self):
        return self.torch.autocast(self.dev.type, dtype=self.torch.bfloat16)

    def describe(self):
        """The env fields naming the device."""
        t = self.torch
        if not self.cuda:
            return {"torch_cuda": t.version.cuda, "gpu": "cpu (smoke test: times and memory mean nothing)", "gpu_memory_bytes": None}
        return {
            "torch_cuda": t.version.cuda,
            "gpu": t.cuda.get_device_name(self.dev),
            "gpu_memory_bytes": t.cuda.get_device_properties(self.dev).total_memory,
        }

    def gib_allocated(self):
        b = self.allocated()
        return f"{b / GIB:.2f} GiB allocated" if b is not None else "cpu"


def time_case(torch, bnb, params, init, loss_fn, b, s, a, acc, shape, check_output=None, checkpointing=True):
    """Times one case; returns the fields of its JSON record. Raises on OOM.

    `loss_fn(ids)` runs the recipe's forward and returns (loss, output); `check_output`
    (optional) is called with the first step's output and raises if the recipe did not
    take the path it claims (e.g. a fused loss that returned logits)."""
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
    ids = torch.randint(3, shape["vocab"], (b, s), generator=gen).to(acc.dev)
    acc.empty_cache()
    acc.sync()
    acc.reset_peak()
    label = f"{b}x{s}"
    losses, times = [], []
    for i in range(a.warmup + a.steps):
        acc.sync()
        t0 = time.perf_counter()
        loss, out = loss_fn(ids)
        if i == 0 and check_output is not None:
            check_output(out)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc.sync()
        dt = time.perf_counter() - t0
        losses.append(float(loss.item()))
        del out, loss
        if i >= a.warmup:
            times.append(dt)
        log(f"  {label} step {i}{' (warm-up)' if i < a.warmup else ''}: {dt:.3f}s loss {losses[-1]:.4f}")
    mean = sum(times) / len(times)
    tokens = b * s
    tflops = achieved_tflops(shape, tokens, s, mean, checkpointing)
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
        **acc.peaks(),
    }


def run_timed_case(torch, bnb, rec, params, init, loss_fn, b, s, a, acc, shape, check_output=None, checkpointing=True):
    """time_case inside the guard every peer needs: an OOM or error becomes the record's
    status, the memory is given back, and the record is returned either way."""
    rec = dict(rec)
    rec["t_start"] = time.time()
    err = None
    try:
        rec.update(time_case(torch, bnb, params, init, loss_fn, b, s, a, acc, shape, check_output, checkpointing))
    except Exception as e:  # noqa: BLE001 - one bad case must not lose the others
        oom = is_oom(torch, e)
        if not oom:
            traceback.print_exc()
        err = ("oom" if oom else "error", first_line(e))
    if err is not None:
        # time_case's frame (activations, outputs, optimizer) is gone with the exception.
        for p in params:
            p.grad = None
        acc.empty_cache()
        rec.update(acc.peaks())
        rec.update(status=err[0], error=err[1], step_s=None, tokens_per_s=None, losses=None)
        log(f"  {rec.get('peer', '?')} {rec.get('target_set', '?')} {rec.get('case', '?')}: {err[0].upper()}: {err[1]}")
    rec["t_end"] = time.time()
    acc.empty_cache()
    return rec


def print_table(results):
    """The peer's own summary, on stderr."""
    if not results:
        return
    r0 = next((r for r in results if r.get("torch")), results[0])
    log(
        f"\n{r0.get('stack', r0.get('tool', '?'))}: torch {r0.get('torch')} (CUDA {r0.get('torch_cuda')}), "
        f"transformers {r0.get('transformers')}, peft {r0.get('peft')}, bitsandbytes {r0.get('bitsandbytes')}, "
        f"{r0.get('gpu')}; r{r0.get('rank')}, {r0.get('warmup')} warm-up + {r0.get('steps')} timed steps"
    )
    head = (
        f"{'peer':<12} {'targets':<8} {'case':<9} {'tokens/s':>9} {'step s':>8} {'alloc GiB':>10} "
        f"{'resv GiB':>9}  {'loss first -> last':<20} status"
    )
    log(head)
    log("-" * len(head))
    for r in results:
        alloc = r.get("peak_memory_allocated_bytes")
        resv = r.get("peak_memory_reserved_bytes")
        if r.get("status") == "ok":
            tps = f"{r['tokens_per_s']:9.0f}"
            st = f"{r['step_s']:8.3f}"
            ls = f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"
            status = "ok" if r.get("loss_falls") else "LOSS DID NOT FALL"
        else:
            tps, st, ls = f"{'-':>9}", f"{'-':>8}", ""
            status = f"{str(r.get('status')).upper()}: {r.get('error', '')}"[:100]
        log(
            f"{r.get('peer', '?'):<12} {r.get('target_set', '?'):<8} {r.get('case', '?'):<9} {tps} {st} "
            f"{(alloc or 0) / GIB:10.2f} {(resv or 0) / GIB:9.2f}  {ls:<20} {status}"
        )


def parser(description):
    return add_common_args(argparse.ArgumentParser(description=description))
