"""Which attention kernels the peers' torch runs, and how fast (docs/perf.md v13).

TRL, Liger and Unsloth all call torch's scaled_dot_product_attention on Mistral-7B
(causal, 32 query / 8 KV heads, head dim 128, bf16). This times its forward and
backward at one row of 8192 and 32768 tokens with CUDA events, names the kernels the
profiler saw, and prints TFLOP/s in FlashAttention's count (causal forward 2·T²·d·H,
backward 2.5x that), the count qtrain's `doctor --only attention` uses.
usage: python3 sdpa_probe.py   (on the GPU machine; prints one block per length)
"""
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

H, KV, D = 32, 8, 128
print("torch", torch.__version__, torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version())
for T in (8192, 32768):
    q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def fwd():
        # What transformers' sdpa attention does with GQA (enable_gqa since torch 2.5).
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    for _ in range(2):
        fwd().backward(torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    s, m, e = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    do = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
    reps = 5
    fw = bw = 0.0
    for _ in range(reps):
        s.record()
        o = fwd()
        m.record()
        o.backward(do)
        e.record()
        torch.cuda.synchronize()
        fw += s.elapsed_time(m)
        bw += m.elapsed_time(e)
    fw, bw = fw / reps, bw / reps
    flop = 2.0 * T * T * D * H  # causal: half of 4·T²·d·H
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd().backward(do)
        torch.cuda.synchronize()
    rows = []
    for a in prof.key_averages():
        t = getattr(a, "self_device_time_total", None)
        if t is None:
            t = getattr(a, "self_cuda_time_total", 0)
        if t > 50:  # µs: the kernels, not the launches' bookkeeping
            rows.append((t, a.key[:110]))
    names = [f"{t / 1000:.2f} ms  {k}" for t, k in sorted(rows, reverse=True)[:6]]
    print(f"T={T}: forward {fw:.2f} ms ({flop / fw / 1e9:.0f} TFLOP/s), backward {bw:.2f} ms "
          f"({2.5 * flop / bw / 1e9:.0f} TFLOP/s)")
    for n in names:
        print("   kernel:", n)
