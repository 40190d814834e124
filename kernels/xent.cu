// Cross-entropy of a chunk of f32 logit rows with its gradient, one block per row.
//   lse = m + log(sum exp(l - m)),  loss = lse - l[t],
//   dlogits = (exp(l - lse) - onehot(t)) * scale   (in the compute type)
// A negative target means no loss: loss 0 and a zero gradient row.
// Pass 1 keeps a running (max, sum) per thread (online softmax), merged over the
// block; pass 2 writes the gradient. A 32768-entry f32 row is 128 KB: it stays in
// L2 between the two passes.
// CPU reference and semantics: crates/qtrain-device/src/xent.rs.
#include "common.cuh"

template <typename T>
__device__ void xent_impl(const float *__restrict__ logits, uint64_t ldl, const int32_t *__restrict__ targets,
                          float scale, float *__restrict__ loss, T *__restrict__ dlogits, uint64_t ldd,
                          uint32_t vocab, uint32_t want_grad) {
  __shared__ float scratch[32];
  const uint64_t r = blockIdx.x;
  const int32_t t = targets[r];
  const float *l = logits + r * ldl;
  T *d = want_grad ? dlogits + r * ldd : nullptr;
  if (t < 0) {
    if (threadIdx.x == 0) loss[r] = 0.0f;
    if (want_grad)
      for (uint32_t j = threadIdx.x; j < vocab; j += blockDim.x) d[j] = from_f<T>(0.0f);
    return;
  }
  float m = -INFINITY, s = 0.0f;
  for (uint32_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float v = l[j];
    if (v > m) {
      s = s * expf(m - v) + 1.0f;
      m = v;
    } else {
      s += expf(v - m);
    }
  }
  const float gm = block_max(m, scratch);
  const float part = (m == -INFINITY) ? 0.0f : s * expf(m - gm);
  const float total = block_sum(part, scratch);
  const float lse = gm + logf(total);
  if (threadIdx.x == 0) loss[r] = lse - l[t];
  if (!want_grad) return;
  for (uint32_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float p = expf(l[j] - lse);
    d[j] = from_f<T>((p - (j == (uint32_t)t ? 1.0f : 0.0f)) * scale);
  }
}

#define QT_XENT(T, S)                                                                          \
  extern "C" __global__ void xent_##S(const float *logits, uint64_t ldl, const int32_t *tg,   \
                                      float scale, float *loss, T *d, uint64_t ldd,            \
                                      uint32_t vocab, uint32_t want_grad) {                    \
    xent_impl<T>(logits, ldl, tg, scale, loss, d, ldd, vocab, want_grad);                      \
  }
QT_FOR_FLOATS(QT_XENT)
