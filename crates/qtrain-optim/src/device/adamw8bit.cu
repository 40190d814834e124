// The fused AdamW update over qtrain's flat LoRA parameter buffer, with bitsandbytes'
// 8-bit blockwise state (and f32 state for small tensors).
//
// CPU reference: `AdamW8bit::step` in crates/qtrain-optim/src/adamw.rs (the oracle);
// the state layout, the tensor table and the paging pipeline are documented in
// crates/qtrain-optim/src/device/mod.rs. This kernel must agree with the oracle BIT
// FOR BIT, so every floating-point operation is written as an explicitly rounded
// intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn): nvcc would otherwise
// contract `a*b + c` into an FMA (one rounding instead of two) where Rust never does.
// The build has no fast-math, so division and square root are IEEE and denormals are
// kept (no flush to zero), like the CPU.
//
// One CUDA block of 256 threads per 256-element state block (bitsandbytes'
// BLOCKSIZE), one element per thread. Blocks never cross tensors: each tensor owns
// ceil(numel / 256) blocks, numbered consecutively over the tensors of the table.
#include "common.cuh"

#define QT_BLOCK 256

// One tensor of the table (64 bytes; written by `device::table_words` in Rust).
// Offsets: `param_off` in f32 elements of the flat buffers, the rest in bytes of the
// state arena.
struct AdamTensor {
  uint64_t param_off;
  uint64_t numel;
  uint64_t block_start;  // global index of the tensor's first state block
  uint64_t format;       // 0 = f32 state, 1 = 8-bit blockwise
  uint64_t m_off;        // f32: m[numel]   8-bit: m codes[numel]
  uint64_t v_off;        // f32: v[numel]   8-bit: v codes[numel]
  uint64_t m_absmax_off; // 8-bit: m absmax[blocks]
  uint64_t v_absmax_off; // 8-bit: v absmax[blocks]
};

// Deterministic block sums (fixed shuffle tree, then warps in order by thread 0).
__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = __dadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ uint32_t warp_sum_u(uint32_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

extern "C" __global__ void __launch_bounds__(QT_BLOCK)
adamw_update(float *__restrict__ params, const float *__restrict__ grads,
             uint8_t *__restrict__ state,  // arena bytes from `state_base` on
             uint64_t state_base,           // arena offset of state[0]
             const AdamTensor *__restrict__ table, uint32_t n_tensors,
             uint64_t block_base,           // global index of this launch's first block
             const float *__restrict__ maps, // signed map [256], then unsigned map [256]
             float b1, float b2, float one_minus_b1, float one_minus_b2, float step_size,
             float eps_hat, float decay, uint32_t has_decay,
             double *__restrict__ part_sq, uint32_t *__restrict__ part_nonfinite) {
  __shared__ float smap[256];
  __shared__ float umap[256];
  __shared__ float scratch[32];
  __shared__ double dsum[QT_BLOCK / 32];
  __shared__ uint32_t usum[QT_BLOCK / 32];
  const uint32_t t = threadIdx.x;
  smap[t] = maps[t];
  umap[t] = maps[256 + t];

  // The tensor of this block: the last one starting at or before it.
  const uint64_t gb = block_base + blockIdx.x;
  uint32_t lo = 0, hi = n_tensors - 1;
  while (lo < hi) {
    const uint32_t mid = (lo + hi + 1) >> 1;
    if (table[mid].block_start <= gb) lo = mid;
    else hi = mid - 1;
  }
  const AdamTensor T = table[lo];
  const uint64_t lb = gb - T.block_start;  // block within the tensor
  const uint64_t e0 = lb * QT_BLOCK;
  const uint64_t rem = T.numel - e0;
  const uint32_t n = rem < QT_BLOCK ? (uint32_t)rem : QT_BLOCK;
  const bool valid = t < n;
  const uint64_t e = e0 + t;
  float *p = params + T.param_off + e;
  const float g = valid ? grads[T.param_off + e] : 0.0f;
  const bool finite = isfinite(g);
  double sq = 0.0;
  uint32_t nonfinite = 0;
  __syncthreads();  // maps in shared memory

  if (T.format == 0) {
    // f32 state: kOptimizer32bit2State's order (m first, (1-b2)*(g*g)).
    float *m_arr = reinterpret_cast<float *>(state + (T.m_off - state_base));
    float *v_arr = reinterpret_cast<float *>(state + (T.v_off - state_base));
    if (valid) {
      if (!finite) {
        m_arr[e] = 0.0f;
        v_arr[e] = 0.0f;
        nonfinite = 1;
      } else {
        const float m = __fadd_rn(__fmul_rn(m_arr[e], b1), __fmul_rn(one_minus_b1, g));
        const float v = __fadd_rn(__fmul_rn(v_arr[e], b2), __fmul_rn(one_minus_b2, __fmul_rn(g, g)));
        m_arr[e] = m;
        v_arr[e] = v;
        const float old = *p;
        float nw = __fadd_rn(old, __fmul_rn(step_size, __fdiv_rn(m, __fadd_rn(__fsqrt_rn(v), eps_hat))));
        if (has_decay) nw = __fmul_rn(nw, decay);
        *p = nw;
        const double d = __dsub_rn((double)nw, (double)old);
        sq = __dmul_rn(d, d);
      }
    }
  } else {
    // 8-bit blockwise: kOptimizer8bit2StateBlockwise's order (v first, (1-b2)*g*g).
    uint8_t *mq = state + (T.m_off - state_base);
    uint8_t *vq = state + (T.v_off - state_base);
    float *mabs = reinterpret_cast<float *>(state + (T.m_absmax_off - state_base));
    float *vabs = reinterpret_cast<float *>(state + (T.v_absmax_off - state_base));
    float m = 0.0f, v = 0.0f;
    if (valid) {
      m = __fmul_rn(smap[mq[e]], mabs[lb]);
      v = __fmul_rn(umap[vq[e]], vabs[lb]);
      if (!finite) {
        m = 0.0f;
        v = 0.0f;
        nonfinite = 1;
      } else {
        v = __fadd_rn(__fmul_rn(v, b2), __fmul_rn(__fmul_rn(one_minus_b2, g), g));
        m = __fadd_rn(__fmul_rn(m, b1), __fmul_rn(one_minus_b1, g));
        const float old = *p;
        float nw = __fadd_rn(old, __fmul_rn(step_size, __fdiv_rn(m, __fadd_rn(__fsqrt_rn(v), eps_hat))));
        if (has_decay) nw = __fmul_rn(nw, decay);
        *p = nw;
        const double d = __dsub_rn((double)nw, (double)old);
        sq = __dmul_rn(d, d);
      }
    }
    // The new absmax over the real elements of the block (fmaxf ignores NaN like
    // Rust's f32::max; all values are >= 0, so the order does not matter).
    const float am = block_max(valid ? fabsf(m) : 0.0f, scratch);
    const float av = block_max(valid ? fabsf(v) : 0.0f, scratch);
    if (valid) {
      // quantize_blockwise scales by the rounded reciprocal (1/0 = inf, then 0*inf =
      // NaN, which quantizes to index 0 exactly as on the CPU).
      const float inv_m = __fdiv_rn(1.0f, am);
      const float inv_v = __fdiv_rn(1.0f, av);
      uint32_t qm = quantize_one(smap, __fmul_rn(m, inv_m));
      // keep_sign: a code whose sign bit differs from the value's moves one step
      // toward the value's sign (u8 wrap-around like the CPU).
      if ((__float_as_uint(smap[qm]) >> 31) != (__float_as_uint(m) >> 31)) qm = m > 0.0f ? ((qm + 1) & 255u) : ((qm - 1) & 255u);
      mq[e] = (uint8_t)qm;
      vq[e] = (uint8_t)quantize_one(umap, __fmul_rn(v, inv_v));
    }
    if (t == 0) {
      mabs[lb] = am;
      vabs[lb] = av;
    }
  }

  // Per-block statistics, summed later in a fixed order by adamw_stats.
  const uint32_t lane = t & 31, warp = t >> 5;
  sq = warp_sum_d(sq);
  nonfinite = warp_sum_u(nonfinite);
  if (lane == 0) {
    dsum[warp] = sq;
    usum[warp] = nonfinite;
  }
  __syncthreads();
  if (t == 0) {
    double s = 0.0;
    uint32_t c = 0;
#pragma unroll
    for (int w = 0; w < QT_BLOCK / 32; ++w) {
      s = __dadd_rn(s, dsum[w]);
      c += usum[w];
    }
    part_sq[gb] = s;
    part_nonfinite[gb] = c;
  }
}

// Sums the per-block statistics of one step: out = [sum of squared updates (f64),
// non-finite gradient count (u64)]. One block of 1024 threads, fixed order.
extern "C" __global__ void __launch_bounds__(1024)
adamw_stats(const double *__restrict__ part_sq, const uint32_t *__restrict__ part_nonfinite,
            uint64_t n, uint64_t *__restrict__ out) {
  __shared__ double ds[32];
  __shared__ unsigned long long us[32];
  double s = 0.0;
  unsigned long long c = 0;
  for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) {
    s = __dadd_rn(s, part_sq[i]);
    c += part_nonfinite[i];
  }
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  s = warp_sum_d(s);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
  if (lane == 0) {
    ds[warp] = s;
    us[warp] = c;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    unsigned long long count = 0;
    for (uint32_t w = 0; w < (blockDim.x >> 5); ++w) {
      total = __dadd_rn(total, ds[w]);
      count += us[w];
    }
    out[0] = (uint64_t)__double_as_longlong(total);
    out[1] = count;
  }
}
