// NF4 quantization (bitsandbytes layout, optional double quantization) on the GPU,
// bit-exact with the CPU quantizer.
//
// CPU reference: qtrain_quant::Nf4Tensor::quantize (crates/qtrain-quant/src/nf4.rs) and
// qtrain_quant::quantize_blockwise (blockwise.rs), themselves bit-exact with bitsandbytes;
// crates/qtrain-device/src/nf4_quant.rs drives these kernels and its `selftest` compares
// them byte for byte with the CPU on random data. The outputs are the layout of
// kernels/nf4.cu (what the dequantization kernel reads):
//   codes : packed 4-bit codes, first element of a pair in the high nibble (numel/2
//           bytes, rounded up), followed (double quant) by one 8-bit absmax code per block.
//   stats : double quant: [offset, nested_code[256], nested_absmax[n_nested]]
//           plain        : the f32 absmax of every block (written by nf4_quant_* directly).
//
// Exactness: every rounding is the CPU's. The reciprocal is `__frcp_rn` (IEEE 1/x, as the
// CPU's `1.0 / m`), products and sums use the `_rn` intrinsics, which nvcc never fuses into
// an FMA, and max/compare are exact. Build flags keep denormals (no --use_fast_math).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// The 15 thresholds of bitsandbytes' NF4 decision tree (`dQuantizeNF4`), ascending. The
// tree's leaf is the number of thresholds strictly below x (NaN: none, code 0), which is
// how the CPU computes it too (`nf4_code_by_count`); a Rust test checks these numbers
// against the CPU tree.
__constant__ float NF4_THRESHOLDS[15] = {
    -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f, -0.33967943489551544f,
    -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
    0.1202552504837513f, 0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
    0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f};

__device__ __forceinline__ uint32_t nf4_code(float x) {
  uint32_t c = 0;
#pragma unroll
  for (int k = 0; k < 15; ++k) c += x > NF4_THRESHOLDS[k] ? 1u : 0u;
  return c;
}

// Exact widening of one stored element to f32.
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

// Eight consecutive elements starting at `p` (16-byte aligned) with 16-byte loads.
__device__ __forceinline__ void load8_vec(const __nv_bfloat16 *p, float v[8]) {
  const uint4 u = *reinterpret_cast<const uint4 *>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    // Little endian: the lower half-word is the earlier element. bf16 -> f32 is exact.
    v[2 * k] = __uint_as_float(w[k] << 16);
    v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
  }
}
__device__ __forceinline__ void load8_vec(const __half *p, float v[8]) {
  const uint4 u = *reinterpret_cast<const uint4 *>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    v[2 * k] = __half2float(__ushort_as_half((unsigned short)(w[k] & 0xffffu)));
    v[2 * k + 1] = __half2float(__ushort_as_half((unsigned short)(w[k] >> 16)));
  }
}
__device__ __forceinline__ void load8_vec(const float *p, float v[8]) {
  const float4 a = reinterpret_cast<const float4 *>(p)[0];
  const float4 b = reinterpret_cast<const float4 *>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// Elements e0..e0+8 of x as f32; those at or past `numel` read as 0.0, which is what
// bitsandbytes pads a partial final block with (it matters for the low nibble of an odd
// tensor's last byte: the code of 0 * inv).
template <typename T>
__device__ __forceinline__ void load8(const T *__restrict__ x, uint64_t e0, uint64_t numel,
                                      bool vec, float v[8]) {
  if (vec && e0 + 8 <= numel) {
    load8_vec(x + e0, v);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = e0 + k < numel ? to_f32(x[e0 + k]) : 0.0f;
  }
}

// One quantization block of `blocksize` (a power of two, 32..4096) is owned by `group` =
// min(32, blocksize/8) consecutive lanes of one warp; each lane handles `chunks` =
// blocksize/(8*group) runs of 8 consecutive elements, run c of lane g starting at element
// (c*group + g)*8 of the block, so a warp always reads contiguous memory. Pass 1: absmax
// (a max over |x|: exact in any order) reduced with shuffles inside the group; pass 2:
// codes, 4 bytes per run written with one 4-byte store. A grid-stride loop over blocks
// covers tensors of any size with a bounded grid; every lane of a group runs the same
// iterations, so the group-masked shuffles are always complete.
template <typename T>
__device__ __forceinline__ void nf4_quant_impl(const T *__restrict__ x, uint8_t *__restrict__ packed,
                                               float *__restrict__ absmax,
                                               unsigned long long *__restrict__ first_bad,
                                               uint64_t numel, uint32_t blocksize) {
  const uint32_t group = blocksize >= 256 ? 32u : blocksize / 8;
  const uint32_t chunks = blocksize / (8 * group);
  const uint32_t lane = threadIdx.x & 31;
  const uint32_t glane = lane & (group - 1);
  const uint32_t mask = group == 32 ? 0xffffffffu : ((1u << group) - 1u) << (lane & ~(group - 1));
  const uint32_t groups_per_cta = blockDim.x / group;
  const uint64_t n_blocks = (numel + blocksize - 1) / blocksize;
  const uint64_t n_bytes = (numel + 1) / 2;
  const bool vec_in = (reinterpret_cast<uintptr_t>(x) & 15) == 0;
  const bool vec_out = (reinterpret_cast<uintptr_t>(packed) & 3) == 0;

  for (uint64_t b = (uint64_t)blockIdx.x * groups_per_cta + threadIdx.x / group; b < n_blocks;
       b += (uint64_t)gridDim.x * groups_per_cta) {
    const uint64_t start = b * blocksize;
    float first[8];
    float m = 0.0f;
    bool finite = true;
    for (uint32_t c = 0; c < chunks; ++c) {
      float v[8];
      load8(x, start + (uint64_t)(c * group + glane) * 8, numel, vec_in, v);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        finite = finite && isfinite(v[k]);
        m = fmaxf(m, fabsf(v[k]));
        if (c == 0) first[k] = v[k];
      }
    }
    if (!finite) {
      // The CPU refuses NaN/Inf weights, naming the first one: report the smallest index.
      for (uint32_t c = 0; c < chunks; ++c) {
        const uint64_t e0 = start + (uint64_t)(c * group + glane) * 8;
        for (uint64_t e = e0; e < e0 + 8 && e < numel; ++e)
          if (!isfinite(to_f32(x[e]))) atomicMin(first_bad, (unsigned long long)e);
      }
    }
    for (uint32_t off = group >> 1; off > 0; off >>= 1)
      m = fmaxf(m, __shfl_xor_sync(mask, m, off));
    if (glane == 0) absmax[b] = m;
    // 1/m as the CPU computes it; an all-zero block gives inf and 0 * inf = NaN, which
    // every `>` rejects: code 0, as in bitsandbytes (and 0 for the odd tail's pad, too).
    const float inv = __frcp_rn(m);
    for (uint32_t c = 0; c < chunks; ++c) {
      const uint64_t e0 = start + (uint64_t)(c * group + glane) * 8;
      float v[8];
      if (c == 0) {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = first[k];
      } else {
        load8(x, e0, numel, vec_in, v);
      }
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t hi = nf4_code(__fmul_rn(v[2 * j], inv));
        const uint32_t lo = nf4_code(__fmul_rn(v[2 * j + 1], inv));
        word |= ((hi << 4) | lo) << (8 * j);
      }
      // e0 is a multiple of 8, so byte0 is a multiple of 4.
      const uint64_t byte0 = e0 / 2;
      if (vec_out && byte0 + 4 <= n_bytes) {
        *reinterpret_cast<uint32_t *>(packed + byte0) = word;
      } else {
        for (uint32_t j = 0; j < 4; ++j)
          if (byte0 + j < n_bytes) packed[byte0 + j] = (uint8_t)(word >> (8 * j));
      }
    }
  }
}

extern "C" __global__ void nf4_quant_bf16(const __nv_bfloat16 *x, uint8_t *packed, float *absmax,
                                          unsigned long long *first_bad, uint64_t numel,
                                          uint32_t blocksize) {
  nf4_quant_impl<__nv_bfloat16>(x, packed, absmax, first_bad, numel, blocksize);
}

extern "C" __global__ void nf4_quant_f16(const __half *x, uint8_t *packed, float *absmax,
                                         unsigned long long *first_bad, uint64_t numel,
                                         uint32_t blocksize) {
  nf4_quant_impl<__half>(x, packed, absmax, first_bad, numel, blocksize);
}

extern "C" __global__ void nf4_quant_f32(const float *x, uint8_t *packed, float *absmax,
                                         unsigned long long *first_bad, uint64_t numel,
                                         uint32_t blocksize) {
  nf4_quant_impl<float>(x, packed, absmax, first_bad, numel, blocksize);
}

// bitsandbytes' `dQuantize<0>` / qtrain_quant::quantize_one: a 7-step binary search from
// pivot 127 over the sorted 256-entry code, then the midpoint to the neighbour on x's side
// decides. A line-by-line port: the asymmetric ties and the NaN path (every comparison
// false) follow the CPU.
__device__ __forceinline__ uint32_t quantize_one(const float *code, float x) {
  int pivot = 127;
  int upper_pivot = 255;
  int lower_pivot = 0;
  float lower = -1.0f;
  float upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
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
    const float midpoint = __fmul_rn(__fadd_rn(upper, val), 0.5f);
    return x > midpoint ? (uint32_t)upper_pivot : (uint32_t)pivot;
  } else {
    const float midpoint = __fmul_rn(__fadd_rn(lower, val), 0.5f);
    return x < midpoint ? (uint32_t)lower_pivot : (uint32_t)pivot;
  }
}

// Double quantization: `quantize_blockwise(absmax - offset, code, 256)` with the offset
// (the torch-exact mean of absmax) computed by the host. One CTA of 256 threads per nested
// block, thread t owning value t of it. `stats` already holds [offset, code[256]]; this
// writes nested_absmax into stats[257..] and the 8-bit codes into `qabsmax`.
extern "C" __global__ void __launch_bounds__(256)
    nf4_double_quant(const float *__restrict__ absmax, uint64_t n_blocks, float offset,
                     float *__restrict__ stats, uint8_t *__restrict__ qabsmax) {
  __shared__ float code[256];
  __shared__ float warp_max[8];
  code[threadIdx.x] = stats[1 + threadIdx.x];
  __syncthreads();
  const uint64_t n_nested = (n_blocks + 255) / 256;
  for (uint64_t nb = blockIdx.x; nb < n_nested; nb += gridDim.x) {
    const uint64_t i = nb * 256 + threadIdx.x;
    const bool valid = i < n_blocks;
    // The CPU's `a - offset` in f32.
    const float centered = valid ? __fsub_rn(absmax[i], offset) : 0.0f;
    // Missing values of a partial last block count as 0, which never raises a max of |.|.
    float m = fabsf(centered);
    for (uint32_t off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = m;
    __syncthreads();
    m = warp_max[0];
#pragma unroll
    for (int w = 1; w < 8; ++w) m = fmaxf(m, warp_max[w]);
    // Every thread has read warp_max before the next iteration overwrites it.
    __syncthreads();
    if (threadIdx.x == 0) stats[257 + nb] = m;
    const float inv = __frcp_rn(m);
    if (valid) qabsmax[i] = (uint8_t)quantize_one(code, __fmul_rn(centered, inv));
  }
}
