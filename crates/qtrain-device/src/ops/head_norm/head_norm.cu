// RMSNorm over each head of a row (Qwen 3's q/k norms before RoPE), forward and its
// in-place backward. x: [rows, heads * d] (a column block of the fused q/k/v product),
// one warp per (row, head) segment of d elements, four segments per block.
//   fwd: inv = 1/sqrt(mean(x^2) + eps);  y = round(round(x*inv) * w), inv saved per segment
//   bwd: g = dy*w; xh = x*inv; dx = inv*(g - xh*mean(g*xh)), written over dy
// The backward is in place: each lane reads its own elements of dy in the first pass
// and overwrites exactly those in the second, so dy and dx may (must) alias.
// CPU reference and semantics: crates/qtrain-device/src/ops/head_norm/mod.rs.
#include "common.cuh"

template <typename T>
__device__ void head_rmsnorm_fwd_impl(const T *__restrict__ x, uint64_t ldx, const T *__restrict__ w,
                                      T *__restrict__ y, uint64_t ldy, float *__restrict__ inv_out,
                                      uint32_t rows, uint32_t heads, uint32_t d, float eps) {
  const uint64_t seg = (uint64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  // A whole warp leaves together: the reductions below are warp-wide only.
  if (seg >= (uint64_t)rows * heads) return;
  const uint32_t lane = threadIdx.x & 31;
  const uint64_t r = seg / heads, h = seg % heads;
  const T *xr = x + r * ldx + h * d;
  T *yr = y + r * ldy + h * d;
  const bool vec = vec8_ok(xr, d, ldx) && vec8_ok(yr, d, ldy) && vec8_ok(w, d, d);
  float ss = 0.0f;
  if (vec) {
    for (uint32_t c = lane * 8; c < d; c += 32 * 8) {
      float v[8];
      load8(xr + c, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
    }
  } else {
    for (uint32_t c = lane; c < d; c += 32) {
      const float v = to_f(xr[c]);
      ss += v * v;
    }
  }
  ss = warp_sum(ss);
  const float inv = 1.0f / sqrtf(ss / (float)d + eps);
  if (lane == 0) inv_out[seg] = inv;
  if (vec) {
    for (uint32_t c = lane * 8; c < d; c += 32 * 8) {
      float v[8], wv[8];
      load8(xr + c, v);
      load8(w + c, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = round_to<T>(v[i] * inv) * wv[i];
      store8(yr + c, v);
    }
  } else {
    for (uint32_t c = lane; c < d; c += 32) {
      yr[c] = from_f<T>(round_to<T>(to_f(xr[c]) * inv) * to_f(w[c]));
    }
  }
}

// `g` holds dy on entry and dx on return (no __restrict__: it is read and written).
template <typename T>
__device__ void head_rmsnorm_bwd_impl(const T *__restrict__ x, uint64_t ldx,
                                      const float *__restrict__ inv_rms, const T *__restrict__ w,
                                      T *g, uint64_t ldg, uint32_t rows, uint32_t heads,
                                      uint32_t d) {
  const uint64_t seg = (uint64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (seg >= (uint64_t)rows * heads) return;
  const uint32_t lane = threadIdx.x & 31;
  const uint64_t r = seg / heads, h = seg % heads;
  const T *xr = x + r * ldx + h * d;
  T *gr = g + r * ldg + h * d;
  const float inv = inv_rms[seg];
  const bool vec = vec8_ok(xr, d, ldx) && vec8_ok(gr, d, ldg) && vec8_ok(w, d, d);
  float dot = 0.0f;
  if (vec) {
    for (uint32_t c = lane * 8; c < d; c += 32 * 8) {
      float xv[8], gv[8], wv[8];
      load8(xr + c, xv);
      load8(gr + c, gv);
      load8(w + c, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) dot += gv[i] * wv[i] * (xv[i] * inv);
    }
  } else {
    for (uint32_t c = lane; c < d; c += 32) {
      dot += to_f(gr[c]) * to_f(w[c]) * (to_f(xr[c]) * inv);
    }
  }
  dot = warp_sum(dot);
  const float mean = dot / (float)d;
  if (vec) {
    for (uint32_t c = lane * 8; c < d; c += 32 * 8) {
      float xv[8], gv[8], wv[8], out[8];
      load8(xr + c, xv);
      load8(gr + c, gv);
      load8(w + c, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) out[i] = inv * (gv[i] * wv[i] - xv[i] * inv * mean);
      store8(gr + c, out);
    }
  } else {
    for (uint32_t c = lane; c < d; c += 32) {
      const float dv = inv * (to_f(gr[c]) * to_f(w[c]) - to_f(xr[c]) * inv * mean);
      gr[c] = from_f<T>(dv);
    }
  }
}

#define QT_HEAD_NORM(T, S)                                                                     \
  extern "C" __global__ void head_rmsnorm_fwd_##S(const T *x, uint64_t ldx, const T *w, T *y,  \
                                                  uint64_t ldy, float *inv, uint32_t rows,     \
                                                  uint32_t heads, uint32_t d, float eps) {     \
    head_rmsnorm_fwd_impl<T>(x, ldx, w, y, ldy, inv, rows, heads, d, eps);                     \
  }                                                                                            \
  extern "C" __global__ void head_rmsnorm_bwd_##S(const T *x, uint64_t ldx, const float *inv,  \
                                                  const T *w, T *g, uint64_t ldg,              \
                                                  uint32_t rows, uint32_t heads, uint32_t d) { \
    head_rmsnorm_bwd_impl<T>(x, ldx, inv, w, g, ldg, rows, heads, d);                          \
  }
QT_FOR_FLOATS(QT_HEAD_NORM)
