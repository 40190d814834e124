// SwiGLU forward m = silu(g) * u and its in-place backward (g <- dg, u <- du).
// g, u, m (or dm) are row-major matrices with their own leading dimensions (g and
// u are usually the two column blocks of the fused gate/up product). One thread per
// 8 consecutive elements of a row when alignment allows, else one per element.
// CPU reference and semantics: crates/qtrain-device/src/swiglu.rs.
#include "common.cuh"

// The hardware's approximate exp and divide (MUFU.EX2 and MUFU.RCP, a few ulp in
// f32) in place of the IEEE expf and division, ~20 FP32 instructions per element
// for a kernel that moves only 6 bytes per element (the v10 profile had the forward
// at about half of HBM's rate in the step); the lost bits vanish in the bf16
// output. For x < -88, __expf(-x) is inf and the quotient 0, as the exact sigmoid
// rounds to.
__device__ __forceinline__ float sigmoidf_(float x) {
  return __fdividef(1.0f, 1.0f + __expf(-x));
}

template <typename T>
__device__ void swiglu_fwd_impl(const T *g, uint64_t ldg, const T *u, uint64_t ldu, T *m,
                                uint64_t ldm, uint32_t rows, uint32_t cols, uint32_t vec) {
  const uint32_t w = vec ? 8 : 1;
  const uint32_t per_row = cols / w;
  const uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (uint64_t)rows * per_row) return;
  const uint64_t r = idx / per_row;
  const uint32_t c = (idx % per_row) * w;
  const T *gp = g + r * ldg + c;
  const T *up = u + r * ldu + c;
  T *mp = m + r * ldm + c;
  if (vec) {
    float gv[8], uv[8], out[8];
    load8(gp, gv);
    load8(up, uv);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = gv[i] * sigmoidf_(gv[i]) * uv[i];
    store8(mp, out);
  } else {
    const float gv = to_f(gp[0]);
    mp[0] = from_f<T>(gv * sigmoidf_(gv) * to_f(up[0]));
  }
}

template <typename T>
__device__ void swiglu_bwd_impl(T *g, uint64_t ldg, T *u, uint64_t ldu, const T *dm,
                                uint64_t lddm, uint32_t rows, uint32_t cols, uint32_t vec) {
  const uint32_t w = vec ? 8 : 1;
  const uint32_t per_row = cols / w;
  const uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (uint64_t)rows * per_row) return;
  const uint64_t r = idx / per_row;
  const uint32_t c = (idx % per_row) * w;
  T *gp = g + r * ldg + c;
  T *up = u + r * ldu + c;
  const T *dp = dm + r * lddm + c;
  float gv[8], uv[8], dv[8], dg[8], du[8];
  if (vec) {
    load8(gp, gv);
    load8(up, uv);
    load8(dp, dv);
  } else {
    gv[0] = to_f(gp[0]);
    uv[0] = to_f(up[0]);
    dv[0] = to_f(dp[0]);
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i >= (int)w) break;
    const float s = sigmoidf_(gv[i]);
    const float silu = gv[i] * s;
    const float dsilu = s * (1.0f + gv[i] * (1.0f - s));
    du[i] = dv[i] * silu;
    dg[i] = dv[i] * uv[i] * dsilu;
  }
  if (vec) {
    store8(gp, dg);
    store8(up, du);
  } else {
    gp[0] = from_f<T>(dg[0]);
    up[0] = from_f<T>(du[0]);
  }
}

#define QT_SWIGLU(T, S)                                                                        \
  extern "C" __global__ void swiglu_fwd_##S(const T *g, uint64_t ldg, const T *u,              \
                                            uint64_t ldu, T *m, uint64_t ldm, uint32_t rows,   \
                                            uint32_t cols, uint32_t vec) {                     \
    swiglu_fwd_impl<T>(g, ldg, u, ldu, m, ldm, rows, cols, vec);                               \
  }                                                                                            \
  extern "C" __global__ void swiglu_bwd_##S(T *g, uint64_t ldg, T *u, uint64_t ldu,            \
                                            const T *dm, uint64_t lddm, uint32_t rows,         \
                                            uint32_t cols, uint32_t vec) {                     \
    swiglu_bwd_impl<T>(g, ldg, u, ldu, dm, lddm, rows, cols, vec);                             \
  }
QT_FOR_FLOATS(QT_SWIGLU)
