// Rotary position embedding in place, forward (inverse = 0) and backward
// (inverse = 1, the transposed rotation). One thread per rotated pair
// (x[i], x[i + d/2]) of one head of one token; consecutive threads take consecutive
// i, so each half-row is read and written coalesced.
// CPU reference and semantics: crates/qtrain-device/src/rope.rs.
#include "common.cuh"

template <typename T>
__device__ void rope_impl(T *x, uint64_t ld, uint32_t rows, uint32_t heads, uint32_t head_dim,
                          const float *__restrict__ cos_t, const float *__restrict__ sin_t,
                          uint32_t inverse) {
  const uint32_t half = head_dim / 2;
  const uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const uint64_t total = (uint64_t)rows * heads * half;
  if (idx >= total) return;
  const uint32_t i = idx % half;
  const uint64_t th = idx / half;
  const uint32_t h = th % heads;
  const uint64_t t = th / heads;
  const float c = cos_t[t * half + i];
  float s = sin_t[t * half + i];
  if (inverse) s = -s;
  T *p = x + t * ld + (uint64_t)h * head_dim + i;
  const float x1 = to_f(p[0]), x2 = to_f(p[half]);
  // Separate roundings (no FMA contraction) like the CPU reference.
  p[0] = from_f<T>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
  p[half] = from_f<T>(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
}

// Four consecutive pairs per thread (i = 4j .. 4j+3 of one head of one token): the
// two half-rows move in 4-element vectors, and the index arithmetic is done once per
// four pairs. Needs head_dim/2, ld and the base address divisible by 4 elements
// (the launcher checks; otherwise it runs rope_impl). Same roundings as rope_impl.
template <typename T> struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};
template <typename T>
__device__ void rope4_impl(T *x, uint32_t ld, uint32_t rows, uint32_t heads, uint32_t head_dim,
                           const float *__restrict__ cos_t, const float *__restrict__ sin_t,
                           uint32_t inverse) {
  const uint32_t half = head_dim / 2;
  const uint32_t quads = half / 4;
  const uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x;
  const uint32_t total = rows * heads * quads;
  if (idx >= total) return;
  const uint32_t i = (idx % quads) * 4;
  const uint32_t th = idx / quads;
  const uint32_t h = th % heads;
  const uint32_t t = th / heads;
  const float4 c = *reinterpret_cast<const float4 *>(cos_t + (uint64_t)t * half + i);
  float4 s = *reinterpret_cast<const float4 *>(sin_t + (uint64_t)t * half + i);
  if (inverse) s = make_float4(-s.x, -s.y, -s.z, -s.w);
  T *p = x + (uint64_t)t * ld + (uint64_t)h * head_dim + i;
  Vec4<T> a = *reinterpret_cast<const Vec4<T> *>(p);
  Vec4<T> b = *reinterpret_cast<const Vec4<T> *>(p + half);
  const float cs[4] = {c.x, c.y, c.z, c.w}, ss[4] = {s.x, s.y, s.z, s.w};
  Vec4<T> ya, yb;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float x1 = to_f(a.v[k]), x2 = to_f(b.v[k]);
    ya.v[k] = from_f<T>(__fsub_rn(__fmul_rn(x1, cs[k]), __fmul_rn(x2, ss[k])));
    yb.v[k] = from_f<T>(__fadd_rn(__fmul_rn(x2, cs[k]), __fmul_rn(x1, ss[k])));
  }
  *reinterpret_cast<Vec4<T> *>(p) = ya;
  *reinterpret_cast<Vec4<T> *>(p + half) = yb;
}

#define QT_ROPE(T, S)                                                                          \
  extern "C" __global__ void rope_##S(T *x, uint64_t ld, uint32_t rows, uint32_t heads,       \
                                      uint32_t head_dim, const float *c, const float *s,      \
                                      uint32_t inverse) {                                      \
    rope_impl<T>(x, ld, rows, heads, head_dim, c, s, inverse);                                 \
  }                                                                                            \
  extern "C" __global__ void rope4_##S(T *x, uint32_t ld, uint32_t rows, uint32_t heads,      \
                                       uint32_t head_dim, const float *c, const float *s,     \
                                       uint32_t inverse) {                                     \
    rope4_impl<T>(x, ld, rows, heads, head_dim, c, s, inverse);                                \
  }
QT_FOR_FLOATS(QT_ROPE)
