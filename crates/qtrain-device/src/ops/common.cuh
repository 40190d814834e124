// Shared helpers of qtrain's kernels: element conversions, 8-wide vector loads and
// stores, warp and block reductions. Every kernel computes in f32 and rounds once
// when it stores (round-to-nearest-even, like the CPU references' `from_f32`).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

// `v` rounded to T and back (what a stored intermediate looks like).
template <typename T> __device__ __forceinline__ float round_to(float v) {
  return to_f<T>(from_f<T>(v));
}

// 8 consecutive elements as floats; `p` must be aligned to 8 elements.
template <typename T> __device__ __forceinline__ void load8(const T *p, float out[8]) {
  if constexpr (sizeof(T) == 2) {
    const uint4 raw = *reinterpret_cast<const uint4 *>(p);
    const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = to_f<T>(e[i]);
  } else {
    const float4 a = *reinterpret_cast<const float4 *>(p);
    const float4 b = *reinterpret_cast<const float4 *>(p + 4);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
  }
}

template <typename T> __device__ __forceinline__ void store8(T *p, const float in[8]) {
  if constexpr (sizeof(T) == 2) {
    uint4 raw;
    T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = from_f<T>(in[i]);
    *reinterpret_cast<uint4 *>(p) = raw;
  } else {
    *reinterpret_cast<float4 *>(p) = make_float4(in[0], in[1], in[2], in[3]);
    *reinterpret_cast<float4 *>(p + 4) = make_float4(in[4], in[5], in[6], in[7]);
  }
}

// Whether rows of `cols` elements with leading dimension `ld` starting at `p` can be
// read 8 elements at a time.
template <typename T>
__device__ __forceinline__ bool vec8_ok(const T *p, uint64_t cols, uint64_t ld) {
  return (cols % 8 == 0) && (ld % 8 == 0) && ((reinterpret_cast<uintptr_t>(p) % 16) == 0);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets
// the result. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  float r = lane < nw ? scratch[lane] : 0.0f;
  r = warp_sum(r);
  return r;
}

__device__ __forceinline__ float block_max(float v, float *scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  float r = lane < nw ? scratch[lane] : -INFINITY;
  r = warp_max(r);
  return r;
}

// The index of the entry of the sorted 256-entry `code` nearest to x, for the 8-bit
// blockwise quantization of AdamW's state and of the NF4 absmax (double quantization):
// qtrain_quant::quantize_one, a line-by-line port of bitsandbytes' dQuantize<0>: a 7-step
// binary search from pivot 127, then the midpoint to the neighbour on x's side decides
// (the asymmetric ties follow the CPU). NaN compares false everywhere and ends at index
// 0, as on the CPU.
__device__ __forceinline__ uint32_t quantize_one(const float *code, float x) {
  uint32_t pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
#pragma unroll
  for (uint32_t i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float mid = __fmul_rn(__fadd_rn(upper, val), 0.5f);
    return x > mid ? upper_pivot : pivot;
  } else {
    const float mid = __fmul_rn(__fadd_rn(lower, val), 0.5f);
    return x < mid ? lower_pivot : pivot;
  }
}

// The LoRA dropout mask (qtrain_step::dropout_mask; CPU reference
// crates/qtrain-device/src/ops/rows/mod.rs `dropout_ref`): element `i` of a mask with
// hash base `base` is the 16-bit lane `i % 4` (bits 16 (i % 4) ..) of
// splitmix64(base + i / 4), and is dropped when that lane is below threshold =
// ceil(p * 2^16); kept elements are scaled by keep = 1/(1-p) (rounded to f32). One
// hash serves four elements: the hash is what the fused LoRA kernels spend their time
// on, and 16 bits resolve p to 1/65536. Every kernel that applies the mask (rows.cu's
// `dropout`, lora_dropout.cu's fused LoRA products) draws it through these helpers.
// Host-callable too, so the helpers can be checked against each other without a GPU.
#define QT_SPLITMIX_GAMMA 0x9e3779b97f4a7c15ull

__host__ __device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + QT_SPLITMIX_GAMMA;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Whether the 16-bit lane `lane` (0..3) of the hash `w` keeps its element.
__host__ __device__ __forceinline__ bool dropout_lane_kept(uint64_t w, int lane,
                                                           uint32_t threshold) {
  return ((uint32_t)(w >> (16 * lane)) & 0xffffu) >= threshold;
}

// Whether element `i` of the mask is kept.
__host__ __device__ __forceinline__ bool dropout_kept(uint64_t base, uint64_t i,
                                                      uint32_t threshold) {
  return dropout_lane_kept(splitmix64(base + (i >> 2)), (int)(i & 3), threshold);
}

// `v` after dropout: 0 where the mask drops element `i` (whatever v is), else v * keep.
__host__ __device__ __forceinline__ float dropout_apply(float v, uint64_t base, uint64_t i,
                                                        uint32_t threshold, float keep) {
  return dropout_kept(base, i, threshold) ? v * keep : 0.0f;
}

// Calls f(j, kept) for the N consecutive mask elements i .. i + N - 1: the same flags as
// dropout_kept, with one hash per four elements when the run starts on a multiple of
// four (N a multiple of 4; the kernels' runs do whenever the row length is one).
template <int N, typename F>
__host__ __device__ __forceinline__ void dropout_kept_run(uint64_t base, uint64_t i,
                                                          uint32_t threshold, F &&f) {
  static_assert(N % 4 == 0, "runs of whole hashes");
  if ((i & 3) == 0) {
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const uint64_t w = splitmix64(base + (i >> 2) + (uint64_t)q);
#pragma unroll
      for (int e = 0; e < 4; ++e) f(4 * q + e, dropout_lane_kept(w, e, threshold));
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) f(j, dropout_kept(base, i + (uint64_t)j, threshold));
  }
}

// Instantiates `name##_bf16`, `name##_f16`, `name##_f32` extern "C" wrappers around
// a template kernel body `name##_impl<T>` with the given parameter list.
#define QT_FOR_FLOATS(MACRO) MACRO(__nv_bfloat16, bf16) MACRO(__half, f16) MACRO(float, f32)
