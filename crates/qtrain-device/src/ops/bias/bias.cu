// y[r, c] += b[c]: the frozen bias of a projection added to its GEMM output (Qwen 2's
// q/k/v, Llama's attention_bias/mlp_bias), in place. y is row-major with leading
// dimension ldy (a column block of a fused output is fine). One thread per 8
// consecutive elements of a row when alignment allows, else one per element; the sum
// is computed in f32 and rounded once.
// CPU reference and semantics: crates/qtrain-device/src/ops/bias/mod.rs.
#include "common.cuh"

template <typename T>
__device__ void add_bias_impl(T *y, uint64_t ldy, const T *__restrict__ b, uint32_t rows,
                              uint32_t cols, uint32_t vec) {
  const uint32_t w = vec ? 8 : 1;
  const uint32_t per_row = cols / w;
  const uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (uint64_t)rows * per_row) return;
  const uint64_t r = idx / per_row;
  const uint32_t c = (idx % per_row) * w;
  T *yp = y + r * ldy + c;
  if (vec) {
    float yv[8], bv[8];
    load8(yp, yv);
    load8(b + c, bv);
#pragma unroll
    for (int i = 0; i < 8; ++i) yv[i] += bv[i];
    store8(yp, yv);
  } else {
    yp[0] = from_f<T>(to_f(yp[0]) + to_f(b[c]));
  }
}

#define QT_BIAS(T, S)                                                                          \
  extern "C" __global__ void add_bias_##S(T *y, uint64_t ldy, const T *b, uint32_t rows,       \
                                          uint32_t cols, uint32_t vec) {                       \
    add_bias_impl<T>(y, ldy, b, rows, cols, vec);                                              \
  }
QT_FOR_FLOATS(QT_BIAS)
