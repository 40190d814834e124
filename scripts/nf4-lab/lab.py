"""NF4 dequantization lab: times the shipped kernels (crates/qtrain-device/src/ops/nf4/nf4.cu) and candidate
kernels (lab.cu) with CUDA events, and checks each bit for bit against a torch reference.

Build the PTX where nvcc is (here: `eval "$(scripts/cuda-toolchain.sh)"`), then run it
on the GPU machine, which needs only torch:

    nvcc -arch=sm_90 -O3 -ptx scripts/nf4-lab/lab.cu -o lab.ptx
    python3 scripts/nf4-lab/lab.py lab.ptx

The figures of docs/perf.md (v5) come from this script on an H200.
"""
import ctypes, sys, json
import torch

cu = ctypes.CDLL("libcuda.so.1")
def ck(r, what):
    if r != 0:
        raise RuntimeError(f"{what}: CUDA error {r}")

torch.cuda.init()
dev = torch.device("cuda")
torch.empty(1, device=dev)
ptx = open(sys.argv[1], "rb").read() + b"\0"
mod = ctypes.c_void_p()
ck(cu.cuModuleLoadData(ctypes.byref(mod), ptx), "cuModuleLoadData")
stream = torch.cuda.current_stream().cuda_stream

def func(name):
    f = ctypes.c_void_p()
    ck(cu.cuModuleGetFunction(ctypes.byref(f), mod, name.encode()), name)
    return f

def launch(f, grid, block, args, smem=0):
    arr = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p) for a in args])
    ck(cu.cuLaunchKernel(f, grid, 1, 1, block, 1, 1, smem, ctypes.c_void_p(stream), arr, None), "launch")

def timeit(fn, iters=50):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = []
    for rep in range(3):
        s.record()
        for _ in range(iters):
            fn()
        e.record(); torch.cuda.synchronize()
        best.append(s.elapsed_time(e) / iters * 1e-3)
    return min(best)

res = {}
# Ceiling: 1 GiB device copy (read + write counted), as `qtrain doctor` measures.
a = torch.empty(1 << 28, dtype=torch.float32, device=dev); b = torch.empty_like(a)
t = timeit(lambda: b.copy_(a), 10)
copy = 2 * a.numel() * 4 / t / 1e9
res["copy_1GiB_GBs"] = copy
del a, b

rows, cols = 4096, 14336
numel = rows * cols
nb = numel // 64
nn = (nb + 255) // 256
g = torch.Generator(device="cpu").manual_seed(1)
codes = torch.randint(0, 256, (numel // 2 + nb,), dtype=torch.uint8, generator=g).to(dev)
nested_code = torch.sort(torch.rand(256, generator=g) * 2 - 1).values
nested_abs = torch.rand(nn, generator=g) * 0.05 + 0.01
stats = torch.cat([torch.tensor([0.03]), nested_code, nested_abs]).float().to(dev)
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], device=dev)
# Reference (same f32 operations, then round to bf16).
q = codes[numel // 2:].long()
absmax = (stats[1:257][q] * stats[257:][torch.arange(nb, device=dev) // 256]) + stats[0]
packed = codes[: numel // 2].long()
nib = torch.stack([packed >> 4, packed & 15], dim=1).flatten()
want = (NF4[nib].view(nb, 64) * absmax[:, None]).flatten().to(torch.bfloat16)
bytes_moved = codes.numel() + stats.numel() * 4 + numel * 2
res["bytes"] = bytes_moved
out = torch.empty(numel, dtype=torch.bfloat16, device=dev)
# Pattern ceilings.
n16 = numel * 2 // 16
f = func("fill16")
t = timeit(lambda: launch(f, (n16 + 255) // 256, 256, [ctypes.c_uint64(out.data_ptr()), ctypes.c_uint64(n16)]))
res["fill_117MB"] = {"us": t * 1e6, "pct_copy": 100 * numel * 2 / t / 1e9 / copy}
for name in ["stream8to32", "stream8to32c"]:
    f = func(name)
    n8 = numel // 16
    t = timeit(lambda: launch(f, (n8 + 255) // 256, 256, [ctypes.c_uint64(codes.data_ptr()), ctypes.c_uint64(out.data_ptr()), ctypes.c_uint64(n8)]))
    res[name] = {"us": t * 1e6, "pct_copy": 100 * (numel // 2 + numel * 2) / t / 1e9 / copy}

cands = {  # name: (weights per CTA-thread-unit, threads)
    "nf4_dequant_bf16": (16, 256), "nf4_dequant_bf16_tile": (32, 128),
    "s1": (16, 256), "s1cs": (16, 256), "s2": (32, 256), "s2cs": (32, 256), "s4": (64, 256),
    "s1_512": (16, 512), "s2_512": (32, 512), "s1_128": (16, 128), "s2_128": (32, 128),
    "t1": (16, 256), "t2": (32, 256), "t4": (64, 256), "t2_128": (32, 128), "t4_128": (64, 128), "t8_128": (128, 128),
    "u256": (32, 256), "u128": (32, 128),
}
for name, (wpt, nt) in cands.items():
    try:
        f = func(name)
        grid = (numel + wpt * nt - 1) // (wpt * nt)
        args = [ctypes.c_uint64(codes.data_ptr()), ctypes.c_uint64(stats.data_ptr()), ctypes.c_uint64(out.data_ptr()),
                ctypes.c_uint64(numel), ctypes.c_uint32(64), ctypes.c_uint32(256), ctypes.c_uint32(1)]
        out.fill_(0)
        launch(f, grid, nt, args); torch.cuda.synchronize()
        exact = bool(torch.equal(out.view(torch.int16), want.view(torch.int16)))
        t = timeit(lambda: launch(f, grid, nt, args))
        res[name] = {"us": round(t * 1e6, 2), "GBs": round(bytes_moved / t / 1e9), "pct_copy": round(100 * bytes_moved / t / 1e9 / copy, 1), "exact": exact}
    except Exception as e:
        res[name] = {"error": str(e)}
    print(name, res[name], flush=True)
print(json.dumps(res, indent=1))
