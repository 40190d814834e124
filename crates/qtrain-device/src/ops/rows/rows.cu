// Row gathers/scatters, casts, scaling, sum of squares and the LoRA dropout mask.
// CPU references and semantics: crates/qtrain-device/src/rows.rs.
#include "common.cuh"

// out[i] = table[ids[i]] (scatter = 0) or out[ids[i]] = src[i] (scatter = 1); one
// block per listed row, threads along the columns.
template <typename T>
__device__ void gather_impl(const T *__restrict__ src, uint64_t lds, const uint32_t *__restrict__ ids,
                            T *__restrict__ out, uint64_t ldo, uint32_t cols, uint32_t scatter) {
  const uint64_t i = blockIdx.x;
  const uint64_t id = ids[i];
  const T *s = src + (scatter ? i : id) * lds;
  T *o = out + (scatter ? id : i) * ldo;
  for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) o[c] = s[c];
}

#define QT_GATHER(T, S)                                                                        \
  extern "C" __global__ void gather_rows_##S(const T *src, uint64_t lds, const uint32_t *ids, \
                                             T *out, uint64_t ldo, uint32_t cols,              \
                                             uint32_t scatter) {                               \
    gather_impl<T>(src, lds, ids, out, ldo, cols, scatter);                                    \
  }
QT_FOR_FLOATS(QT_GATHER)

template <typename S, typename D>
__device__ void cast_impl(const S *__restrict__ src, D *__restrict__ dst, uint64_t n, float scale) {
  const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) dst[i] = from_f<D>(to_f<S>(src[i]) * scale);
}

#define QT_CAST(SRC, SS, DST, DS)                                                              \
  extern "C" __global__ void cast_##SS##_##DS(const SRC *src, DST *dst, uint64_t n,           \
                                              float scale) {                                   \
    cast_impl<SRC, DST>(src, dst, n, scale);                                                   \
  }
QT_CAST(float, f32, __nv_bfloat16, bf16)
QT_CAST(float, f32, __half, f16)
QT_CAST(float, f32, float, f32)
QT_CAST(__nv_bfloat16, bf16, float, f32)
QT_CAST(__half, f16, float, f32)
QT_CAST(__nv_bfloat16, bf16, __nv_bfloat16, bf16)
QT_CAST(__half, f16, __half, f16)

extern "C" __global__ void scale_f32(float *v, uint64_t n, float s) {
  const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) v[i] = v[i] * s;
}

// Per-block partial sums of v^2 in f64 (a fixed grid-stride order: repeatable).
extern "C" __global__ void sum_squares_f32(const float *__restrict__ v, uint64_t n,
                                           double *__restrict__ partial) {
  __shared__ double sh[1024];
  double acc = 0.0;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)gridDim.x * blockDim.x) {
    const double x = (double)v[i];
    acc += x * x;
  }
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (uint32_t s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = sh[0];
}

// out = x * mask with mask[r][c] element (row_offset + r) * cols + c of the mask with hash
// base `base` and threshold ceil(p * 2^16) (0, or keep = 1/(1-p) rounded to f32); the
// mask and its helpers are in common.cuh.
template <typename T>
__device__ void dropout_impl(const T *__restrict__ x, uint64_t ldx, T *__restrict__ out, uint64_t ldo,
                             uint32_t rows, uint32_t cols, uint64_t base, uint64_t row_offset,
                             uint64_t threshold, float keep) {
  const uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (uint64_t)rows * cols) return;
  const uint64_t r = idx / cols, c = idx % cols;
  const float v = to_f(x[r * ldx + c]);
  out[r * ldo + c] = from_f<T>(
      dropout_apply(v, base, (row_offset + r) * cols + c, (uint32_t)threshold, keep));
}

#define QT_DROPOUT(T, S)                                                                       \
  extern "C" __global__ void dropout_##S(const T *x, uint64_t ldx, T *out, uint64_t ldo,      \
                                         uint32_t rows, uint32_t cols, uint64_t base,          \
                                         uint64_t row_offset, uint64_t threshold,              \
                                         float keep) {                                         \
    dropout_impl<T>(x, ldx, out, ldo, rows, cols, base, row_offset, threshold, keep);          \
  }
QT_FOR_FLOATS(QT_DROPOUT)

// dst += src over matrices with their own leading dimensions.
template <typename T>
__device__ void add_into_impl(const T *__restrict__ src, uint64_t lds, T *__restrict__ dst, uint64_t ldd,
                              uint32_t rows, uint32_t cols) {
  const uint64_t idx = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (uint64_t)rows * cols) return;
  const uint64_t r = idx / cols, c = idx % cols;
  dst[r * ldd + c] = from_f<T>(to_f(dst[r * ldd + c]) + to_f(src[r * lds + c]));
}

#define QT_ADD(T, S)                                                                           \
  extern "C" __global__ void add_into_##S(const T *src, uint64_t lds, T *dst, uint64_t ldd,   \
                                          uint32_t rows, uint32_t cols) {                      \
    add_into_impl<T>(src, lds, dst, ldd, rows, cols);                                          \
  }
QT_FOR_FLOATS(QT_ADD)
