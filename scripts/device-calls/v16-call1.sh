# v16, call 1 (docs/perf.md v16): the memory-saving set-up with the attention half kept
# and offloaded beside the layer inputs (`lowkeep`: `--keep-residuals on --offload on`)
# against the v13 memory-saving set-up (`lowmem`: nothing kept, inputs offloaded), all
# four cases, both target sets; first the training-step self-tests (offloaded
# checkpoints, the attention half included, bit-identical to kept ones on the GPU) and
# the host link's pinned copy rate (what the offload needs: ~1.1 MB per token each way
# on Mistral-7B with the half), then the long rows under a 24 GiB cap.
source "$(dirname "$0")/common.sh"
timeout 90 /tmp/qtrain doctor --only step > /tmp/R/doctor.txt 2>&1
grep -i "offload\|fail\|passed" /tmp/R/doctor.txt
python3 - > /tmp/R/link.txt 2>&1 <<'PY'
import torch, time
n = 1 << 30
d = torch.empty(n, dtype=torch.uint8, device="cuda")
h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
for name, f in (("device->host", lambda: h.copy_(d, non_blocking=True)),
                ("host->device", lambda: d.copy_(h, non_blocking=True))):
    f(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5): f()
    torch.cuda.synchronize()
    print(f"{name}: {5 * n / (time.perf_counter() - t) / 1e9:.1f} GB/s (pinned, 1 GiB)")
PY
cat /tmp/R/link.txt
/tmp/qtrain init-random --preset mistral-7b-v0.3 --out /tmp/m7b > /tmp/R/init.log 2>&1
echo "init $(( $(date +%s) - T0 )) s"; pack
QTRAIN_VARIANTS='lowmem=--keep-residuals off --keep-mlp off --offload on --mlp-chunk 2048;lowkeep=--keep-residuals on --keep-mlp off --offload on --mlp-chunk 2048' PEERS=none \
  timeout $(( 400 - ($(date +%s) - T0) )) scripts/bench-compare.sh /tmp/qtrain /tmp/R/A \
  --cases 8x512,4x2048,1x8192,1x32768 --targets qkvo,all --warmup 1 --steps 3 > /tmp/R/A.out 2>&1
grep -A24 "against the fastest" /tmp/R/A.out
echo "bench A $(( $(date +%s) - T0 )) s"; pack
# The long rows under a 24 GiB cap: what auto picks, and the attention half kept offloaded.
for args in "" "--offload on --keep-residuals on --keep-mlp off"; do
  timeout $(( 585 - ($(date +%s) - T0) )) /tmp/qtrain bench --model /tmp/m7b --cases 1x32768,1x65536 --targets qkvo \
    --warmup 1 --steps 2 --memory-limit 24GiB $args >> /tmp/R/cap24.txt 2>&1
done
grep -i "tok\|GiB\|error" /tmp/R/cap24.txt | tail -20
finish
