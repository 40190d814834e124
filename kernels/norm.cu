// RMSNorm forward and backward, one block per row.
// CPU reference and semantics: crates/qtrain-device/src/norm.rs.
//   fwd: inv = 1/sqrt(mean(x^2) + eps);  y = round(round(x*inv) * w)
//   bwd: g = dy*w; xh = x*inv; dx = inv*(g - xh*mean(g*xh)); optionally dx += old dx
// Rows are short (the hidden size, 4096 for 7B) and read twice from L1/L2; the op
// is memory-bound, so rows are moved 8 elements (16 bytes for bf16) per access when
// alignment allows.
#include "common.cuh"

template <typename T>
__device__ void rmsnorm_fwd_impl(const T *__restrict__ x, uint64_t ldx, const T *__restrict__ w,
                                 T *__restrict__ y, uint64_t ldy, float *__restrict__ inv_out,
                                 uint32_t cols, float eps) {
  __shared__ float scratch[32];
  const uint64_t r = blockIdx.x;
  const T *xr = x + r * ldx;
  T *yr = y + r * ldy;
  const bool vec = vec8_ok(xr, cols, ldx) && vec8_ok(yr, cols, ldy) && vec8_ok(w, cols, cols);
  float ss = 0.0f;
  if (vec) {
    for (uint32_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
      float v[8];
      load8(xr + c, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
    }
  } else {
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float v = to_f(xr[c]);
      ss += v * v;
    }
  }
  ss = block_sum(ss, scratch);
  const float inv = 1.0f / sqrtf(ss / (float)cols + eps);
  if (threadIdx.x == 0) inv_out[r] = inv;
  if (vec) {
    for (uint32_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
      float v[8], wv[8];
      load8(xr + c, v);
      load8(w + c, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = round_to<T>(v[i] * inv) * wv[i];
      store8(yr + c, v);
    }
  } else {
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
      yr[c] = from_f<T>(round_to<T>(to_f(xr[c]) * inv) * to_f(w[c]));
    }
  }
}

template <typename T>
__device__ void rmsnorm_bwd_impl(const T *__restrict__ x, uint64_t ldx, const float *__restrict__ inv_rms,
                                 const T *__restrict__ w, const T *__restrict__ dy, uint64_t lddy,
                                 T *__restrict__ dx, uint64_t lddx, uint32_t cols, uint32_t accumulate) {
  __shared__ float scratch[32];
  const uint64_t r = blockIdx.x;
  const T *xr = x + r * ldx;
  const T *dyr = dy + r * lddy;
  T *dxr = dx + r * lddx;
  const float inv = inv_rms[r];
  const bool vec = vec8_ok(xr, cols, ldx) && vec8_ok(dyr, cols, lddy) && vec8_ok(dxr, cols, lddx) &&
                   vec8_ok(w, cols, cols);
  float dot = 0.0f;
  if (vec) {
    for (uint32_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
      float xv[8], gv[8], wv[8];
      load8(xr + c, xv);
      load8(dyr + c, gv);
      load8(w + c, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) dot += gv[i] * wv[i] * (xv[i] * inv);
    }
  } else {
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
      dot += to_f(dyr[c]) * to_f(w[c]) * (to_f(xr[c]) * inv);
    }
  }
  dot = block_sum(dot, scratch);
  const float mean = dot / (float)cols;
  if (vec) {
    for (uint32_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
      float xv[8], gv[8], wv[8], out[8];
      load8(xr + c, xv);
      load8(dyr + c, gv);
      load8(w + c, wv);
      if (accumulate) load8(dxr + c, out);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float d = inv * (gv[i] * wv[i] - xv[i] * inv * mean);
        out[i] = accumulate ? out[i] + d : d;
      }
      store8(dxr + c, out);
    }
  } else {
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float d = inv * (to_f(dyr[c]) * to_f(w[c]) - to_f(xr[c]) * inv * mean);
      dxr[c] = from_f<T>(accumulate ? to_f(dxr[c]) + d : d);
    }
  }
}

#define QT_NORM(T, S)                                                                          \
  extern "C" __global__ void rmsnorm_fwd_##S(const T *x, uint64_t ldx, const T *w, T *y,       \
                                             uint64_t ldy, float *inv, uint32_t cols,          \
                                             float eps) {                                      \
    rmsnorm_fwd_impl<T>(x, ldx, w, y, ldy, inv, cols, eps);                                    \
  }                                                                                            \
  extern "C" __global__ void rmsnorm_bwd_##S(const T *x, uint64_t ldx, const float *inv,      \
                                             const T *w, const T *dy, uint64_t lddy, T *dx,    \
                                             uint64_t lddx, uint32_t cols, uint32_t acc) {     \
    rmsnorm_bwd_impl<T>(x, ldx, inv, w, dy, lddy, dx, lddx, cols, acc);                        \
  }
QT_FOR_FLOATS(QT_NORM)
