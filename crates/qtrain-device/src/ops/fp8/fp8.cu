// FP8 E4M3 quantization with one f32 scale per row, for the frozen base's products
// in `train.precision = "fp8"` (cuBLASLt's "outer vector" scaled FP8 GEMM consumes
// the codes and the scales). Bit-exact with the CPU reference in
// crates/qtrain-quant/src/fp8.rs: amax over the row (NaN counts as +inf),
// scale = amax / 448 and inv = 448 / amax (correctly rounded divisions; 1 and 1 for a
// zero row), code = e4m3(x * inv) rounded to nearest even, saturating at ±448.
//
// - fp8_quant_rows_*: x [rows, cols] -> q [rows, cols], scale [rows]. One block per
//   row: the amax, then the codes (the row is read twice, the second time from cache).
//   Activations per token, and a weight [out, in] per output channel (forward).
// - fp8_col_amax_* + fp8_quant_cols_t_* + fp8_amax_to_scale: w [rows, cols] ->
//   qt [cols, rows] (the transpose), scale [cols]: a weight per input channel, laid
//   out for the input-gradient product dX = dY W. The amax goes through `scale`
//   (atomicMax on the bits of non-negative floats, which order like integers), the
//   transpose through a 32 x 32 shared tile so both the reads and the writes are
//   coalesced, and the last kernel turns the amax into the scale in place.
// CPU reference and semantics: crates/qtrain-device/src/ops/fp8/mod.rs.
#include "common.cuh"
#include <cuda_fp8.h>

__device__ __forceinline__ uint8_t to_e4m3(float x) {
  return (uint8_t)__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}

// |x| as the amax sees it: NaN counts as +inf (the row's products then come out NaN).
__device__ __forceinline__ float amax_of(float x) {
  const float a = fabsf(x);
  return isnan(a) ? INFINITY : a;
}

__device__ __forceinline__ float inv_of(float amax) {
  return amax == 0.0f ? 1.0f : __fdiv_rn(448.0f, amax);
}

__device__ __forceinline__ float scale_of(float amax) {
  return amax == 0.0f ? 1.0f : __fdiv_rn(amax, 448.0f);
}

template <typename T>
__device__ void quant_rows_impl(const T *__restrict__ x, uint64_t ldx, uint8_t *__restrict__ q,
                                uint64_t ldq, float *__restrict__ scale, uint32_t cols,
                                uint32_t vec) {
  __shared__ float red[32];
  const uint64_t r = blockIdx.x;
  const T *xr = x + r * ldx;
  uint8_t *qr = q + r * ldq;
  float m = 0.0f;
  if (vec) {
    for (uint32_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
      float v[8];
      load8(xr + c, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) m = fmaxf(m, amax_of(v[i]));
    }
  } else {
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, amax_of(to_f(xr[c])));
  }
  m = block_max(m, red);
  const float inv = inv_of(m);
  if (threadIdx.x == 0) scale[r] = scale_of(m);
  if (vec) {
    for (uint32_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
      float v[8];
      load8(xr + c, v);
      uint2 out;
      uint8_t *o = reinterpret_cast<uint8_t *>(&out);
#pragma unroll
      for (int i = 0; i < 8; ++i) o[i] = to_e4m3(__fmul_rn(v[i], inv));
      *reinterpret_cast<uint2 *>(qr + c) = out;
    }
  } else {
    for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x)
      qr[c] = to_e4m3(__fmul_rn(to_f(xr[c]), inv));
  }
}

template <typename T>
__device__ void col_amax_impl(const T *__restrict__ w, uint64_t ldw, float *amax, uint32_t rows,
                              uint32_t cols, uint32_t rows_per_block) {
  const uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const uint32_t r0 = blockIdx.y * rows_per_block;
  const uint32_t r1 = min(rows, r0 + rows_per_block);
  float m = 0.0f;
  for (uint32_t r = r0; r < r1; ++r) m = fmaxf(m, amax_of(to_f(w[(uint64_t)r * ldw + c])));
  atomicMax(reinterpret_cast<int *>(amax + c), __float_as_int(m));
}

template <typename T>
__device__ void quant_cols_t_impl(const T *__restrict__ w, uint64_t ldw,
                                  const float *__restrict__ amax, uint8_t *__restrict__ qt,
                                  uint64_t ldqt, uint32_t rows, uint32_t cols) {
  __shared__ float tile[32][33];
  const uint32_t c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
  const uint32_t tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
  for (uint32_t i = 0; i < 32; i += 8) {
    const uint32_t r = r0 + ty + i, c = c0 + tx;
    tile[ty + i][tx] = (r < rows && c < cols) ? to_f(w[(uint64_t)r * ldw + c]) : 0.0f;
  }
  __syncthreads();
#pragma unroll
  for (uint32_t i = 0; i < 32; i += 8) {
    const uint32_t c = c0 + ty + i, r = r0 + tx;
    if (c < cols && r < rows)
      qt[(uint64_t)c * ldqt + r] = to_e4m3(__fmul_rn(tile[tx][ty + i], inv_of(amax[c])));
  }
}

extern "C" __global__ void fp8_amax_to_scale(float *s, uint32_t n) {
  const uint32_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) s[i] = scale_of(s[i]);
}

#define QT_FP8(T, S)                                                                           \
  extern "C" __global__ void fp8_quant_rows_##S(const T *x, uint64_t ldx, uint8_t *q,          \
                                                uint64_t ldq, float *scale, uint32_t cols,     \
                                                uint32_t vec) {                                \
    quant_rows_impl<T>(x, ldx, q, ldq, scale, cols, vec);                                      \
  }                                                                                            \
  extern "C" __global__ void fp8_col_amax_##S(const T *w, uint64_t ldw, float *amax,           \
                                              uint32_t rows, uint32_t cols, uint32_t rpb) {    \
    col_amax_impl<T>(w, ldw, amax, rows, cols, rpb);                                           \
  }                                                                                            \
  extern "C" __global__ void fp8_quant_cols_t_##S(const T *w, uint64_t ldw, const float *amax, \
                                                  uint8_t *qt, uint64_t ldqt, uint32_t rows,   \
                                                  uint32_t cols) {                             \
    quant_cols_t_impl<T>(w, ldw, amax, qt, ldqt, rows, cols);                                  \
  }
QT_FOR_FLOATS(QT_FP8)
