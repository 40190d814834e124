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

// Instantiates `name##_bf16`, `name##_f16`, `name##_f32` extern "C" wrappers around
// a template kernel body `name##_impl<T>` with the given parameter list.
#define QT_FOR_FLOATS(MACRO) MACRO(__nv_bfloat16, bf16) MACRO(__half, f16) MACRO(float, f32)
