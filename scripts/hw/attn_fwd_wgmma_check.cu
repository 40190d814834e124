// Hardware check of the wgmma attention forward (attn_fwdwg*_d{64,128}_bf16 of the sm_90a
// module) against a double-precision CPU reference, row by row (docs/perf.md v10).
// Build (any machine with nvcc 13): nvcc -cubin -O3 -arch=sm_90a -DQTRAIN_SM90A_VARIANT
//   crates/qtrain-device/src/ops/attention/attention.cu -o attn.cubin
//   nvcc -O2 -std=c++17 scripts/hw/attn_fwd_wgmma_check.cu -o fwd_check -lcuda
// Run on a 9.0 GPU: ./fwd_check attn.cubin (prints each shape's errors and bad rows per warp).
#include <cuda.h>
#include <cuda_runtime.h>
#include <cstring>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <random>

static uint16_t f2bf(float f) { uint32_t u; memcpy(&u, &f, 4); u += 0x7fff + ((u >> 16) & 1); return u >> 16; }
static float bf2f(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; memcpy(&f, &u, 4); return f; }
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1);} } while (0)
typedef CUfunction Fn;
static CUmodule mod;
static Fn get(const char *n) { CUfunction f; if (cuModuleGetFunction(&f, mod, n) != CUDA_SUCCESS) { printf("no %s\n", n); exit(1);} return f; }

int run(Fn fn, int W, int D, int B, int S, int H, int KH, int window, bool segs, int ldpad, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  const uint64_t ldq = H * D + ldpad, ldk = KH * D + ldpad, ldo = H * D;
  std::vector<uint16_t> q(B * S * ldq), k(B * S * ldk), v(B * S * ldk), o(B * S * ldo, 0);
  for (auto &x : q) x = f2bf(U(rng));
  for (auto &x : k) x = f2bf(U(rng));
  for (auto &x : v) x = f2bf(U(rng));
  std::vector<uint32_t> seg(B * S);
  for (int b = 0; b < B; ++b) { uint32_t id = 0; int left = 0; for (int i = 0; i < S; ++i) { if (left == 0) { ++id; left = 10 + rng() % 50; } --left; seg[b * S + i] = id; } }
  std::vector<float> lse(B * H * S);
  uint16_t *dq, *dk, *dv, *dout; float *dl; uint32_t *ds;
  CK(cudaMalloc(&dq, q.size() * 2)); CK(cudaMalloc(&dk, k.size() * 2)); CK(cudaMalloc(&dv, v.size() * 2));
  CK(cudaMalloc(&dout, o.size() * 2)); CK(cudaMalloc(&dl, lse.size() * 4)); CK(cudaMalloc(&ds, seg.size() * 4));
  CK(cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dk, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dv, v.data(), v.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(ds, seg.data(), seg.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemset(dout, 0xff, o.size() * 2));
  int smem = 32 * W * D + 512 * D + 512 + 1024;
  if (cuFuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem) != CUDA_SUCCESS) { printf("attr fail\n"); exit(1);}
  const float scale = 1.f / sqrtf(float(D));
  const int BQ = 16 * W;
  dim3 grid(H, (S + BQ - 1) / BQ, B);
  const uint32_t *segp = segs ? ds : nullptr; uint64_t ldv = ldk; int wnd = window;
  void *args[] = {&dq, (void*)&ldq, &dk, (void*)&ldk, &dv, &ldv, &segp, &dout, (void*)&ldo, &dl, &S, &H, &KH, &wnd, (void*)&scale};
  CUresult r = cuLaunchKernel(fn, grid.x, grid.y, grid.z, 32 * W, 1, 1, smem, 0, args, nullptr);
  if (r != CUDA_SUCCESS) { printf("launch fail %d\n", r); exit(1); }
  CK(cudaDeviceSynchronize());
  CK(cudaMemcpy(o.data(), dout, o.size() * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(lse.data(), dl, lse.size() * 4, cudaMemcpyDeviceToHost));
  double maxerr = 0, lerr = 0; int bad = 0, first_bad = -1, bad_mod[8] = {0};
  std::vector<double> p(S), acc(D);
  for (int b = 0; b < B; ++b) for (int h = 0; h < H; ++h) for (int i = 0; i < S; ++i) {
    int kh = h / (H / KH); double m = -1e300;
    for (int j = 0; j < S; ++j) {
      bool vis = j <= i && (window == 0 || j + window > i) && (!segs || seg[b * S + i] == seg[b * S + j]);
      if (!vis) { p[j] = -1e300; continue; }
      double s = 0; for (int d = 0; d < D; ++d) s += double(bf2f(q[(b * S + i) * ldq + h * D + d])) * bf2f(k[(b * S + j) * ldk + kh * D + d]);
      p[j] = s * scale; m = std::max(m, p[j]);
    }
    double l = 0; for (int d = 0; d < D; ++d) acc[d] = 0;
    for (int j = 0; j < S; ++j) { if (p[j] < -1e299) continue; double e = exp(p[j] - m); l += e; for (int d = 0; d < D; ++d) acc[d] += e * bf2f(v[(b * S + j) * ldk + kh * D + d]); }
    double rowerr = 0;
    for (int d = 0; d < D; ++d) rowerr = std::max(rowerr, fabs(acc[d] / l - bf2f(o[(b * S + i) * ldo + h * D + d])));
    double le = fabs(m + log(l) - lse[(b * H + h) * S + i]);
    lerr = std::max(lerr, le); maxerr = std::max(maxerr, rowerr);
    if (rowerr > 2e-2 || !(rowerr == rowerr) || le > 1e-3) { ++bad; if (first_bad < 0) first_bad = (b * H + h) * S + i; bad_mod[(i % BQ) / 16]++; }
  }
  printf("W%d D%d B%d S%d H%d/%d win%d seg%d pad%d: max|o err| %.3e  max|lse err| %.3e  bad rows %d (first b*H*S idx %d; by warp", W, D, B, S, H, KH, window, segs, ldpad, maxerr, lerr, bad, first_bad);
  for (int w = 0; w < W; ++w) printf(" %d", bad_mod[w]);
  printf(")\n");
  cudaFree(dq); cudaFree(dk); cudaFree(dv); cudaFree(dout); cudaFree(dl); cudaFree(ds);
  return bad;
}

int main(int argc, char **argv) {
  CK(cudaFree(0));
  if (cuModuleLoad(&mod, argc > 1 ? argv[1] : "attn.cubin") != CUDA_SUCCESS) { printf("module load failed\n"); return 1; }
  struct K { Fn fn; int W, D; } ks[] = {{get("attn_fwdwg_d64_bf16"), 4, 64}, {get("attn_fwdwg8_d64_bf16"), 8, 64}, {get("attn_fwdwg_d128_bf16"), 4, 128}, {get("attn_fwdwg8_d128_bf16"), 8, 128}};
  int total = 0;
  for (auto &kk : ks) {
    for (int S : {64, 100, 150, 400, 1500}) {
      total += run(kk.fn, kk.W, kk.D, 1, S, 2, 1, 0, false, 0, 1);
      total += run(kk.fn, kk.W, kk.D, 1, S, 2, 1, 40, false, 0, 2);
      total += run(kk.fn, kk.W, kk.D, 2, S, 2, 1, 0, true, 0, 3);
      total += run(kk.fn, kk.W, kk.D, 2, S, 2, 2, 70, true, 0, 4);
    }
    total += run(kk.fn, kk.W, kk.D, 1, 1500, 32, 8, 0, false, 0, 5);
    total += run(kk.fn, kk.W, kk.D, 1, 300, 4, 2, 0, false, 8, 6);
    total += run(kk.fn, kk.W, kk.D, 1, 150, 2, 1, 40, false, 8, 7);
    total += run(kk.fn, kk.W, kk.D, 1, 1500, 32, 8, 100, false, 0, 8);
  }
  printf("total bad rows %d\n", total);
  return total ? 1 : 0;
}
