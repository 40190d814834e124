// NF4 dequantization (bitsandbytes layout) into a reused bf16 or f32 buffer.
//
// CPU reference: crates/qtrain-kernels/src/nf4.rs (`dequantize_cpu`), itself checked
// against qtrain-quant's Nf4Tensor::dequantize_into. Layout of the inputs:
//   codes : packed 4-bit codes, first element of a pair in the high nibble (numel/2
//           bytes, rounded up), immediately followed by one 8-bit absmax code per
//           quantization block when double quantization is on.
//   stats : double quant: [offset, nested_code[256], nested_absmax[n_nested]]
//           plain        : [absmax[n_blocks]]
// The op is memory-bound (0.5 byte read + 2 bytes written per bf16 weight), so each
// thread moves 8 code bytes (16 weights) with one 8-byte load and 16-byte stores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__constant__ float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

template <typename T> __device__ __forceinline__ T cast_out(float v);
template <> __device__ __forceinline__ float cast_out<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 cast_out<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half cast_out<__half>(float v) { return __float2half_rn(v); }

// Fills the CTA's shared tables: the 16 NF4 values and (double quant) the 256-entry
// code of the 8-bit absmax quantization. Ends with a barrier.
__device__ __forceinline__ void nf4_load_tables(const float *__restrict__ stats, float *code,
                                                float *nested_code, uint32_t double_quant) {
  if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
  if (double_quant) {
    for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x) nested_code[i] = stats[1 + i];
  }
  __syncthreads();
}

// The absmax of quantization block `b`.
__device__ __forceinline__ float nf4_absmax(const uint8_t *__restrict__ codes,
                                            const float *__restrict__ stats,
                                            const float *nested_code, uint64_t n_bytes, uint64_t b,
                                            uint32_t nested_blocksize, uint32_t double_quant) {
  if (!double_quant) return stats[b];
  const uint8_t *qabsmax = codes + n_bytes;
  // _rn intrinsics: no fused multiply-add, so the result is bit-identical to the
  // CPU reference's separate multiply and add.
  return __fadd_rn(__fmul_rn(nested_code[qabsmax[b]], stats[257 + b / nested_blocksize]), stats[0]);
}

// The weights of code bytes byte0 .. n_bytes one by one (the last partial chunk, and an
// odd final element).
template <typename T>
__device__ __forceinline__ void nf4_tail(const uint8_t *__restrict__ codes, const float *code,
                                         T *__restrict__ out, uint64_t numel, uint64_t n_bytes,
                                         uint64_t byte0, float absmax) {
  for (uint64_t i = byte0; i < n_bytes; ++i) {
    const uint8_t byte = codes[i];
    const uint64_t e = i * 2;
    out[e] = cast_out<T>(__fmul_rn(code[byte >> 4], absmax));
    if (e + 1 < numel) out[e + 1] = cast_out<T>(__fmul_rn(code[byte & 15], absmax));
  }
}

// One 8-byte chunk of codes (16 weights) at byte offset `byte0`. blocksize is a
// multiple of 16, so the chunk's weights share one absmax.
template <typename T>
__device__ __forceinline__ void nf4_chunk(const uint8_t *__restrict__ codes, const float *__restrict__ stats,
                                          const float *code, const float *nested_code, T *__restrict__ out,
                                          uint64_t numel, uint64_t n_bytes, uint64_t byte0, uint32_t blocksize,
                                          uint32_t nested_blocksize, uint32_t double_quant, uint2 packed) {
  const uint64_t elem0 = byte0 * 2;
  const float absmax = nf4_absmax(codes, stats, nested_code, n_bytes, elem0 / blocksize,
                                  nested_blocksize, double_quant);
  if (byte0 + 8 <= n_bytes && elem0 + 16 <= numel) {
    T vals[16];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t word = k < 4 ? packed.x : packed.y;
      const uint32_t byte = (word >> (8 * (k & 3))) & 0xff;
      vals[2 * k] = cast_out<T>(__fmul_rn(code[byte >> 4], absmax));
      vals[2 * k + 1] = cast_out<T>(__fmul_rn(code[byte & 15], absmax));
    }
    uint4 *dst = reinterpret_cast<uint4 *>(out + elem0);
    const uint4 *src = reinterpret_cast<const uint4 *>(vals);
#pragma unroll
    for (int k = 0; k < (int)(16 * sizeof(T) / 16); ++k) dst[k] = src[k];
  } else {
    nf4_tail<T>(codes, code, out, numel, n_bytes, byte0, absmax);
  }
}

// UNROLL chunks per thread, strided by the block width so every load stays
// coalesced; all code loads are issued before the first is used, which keeps more
// bytes in flight per thread (UNROLL = 1 is the plain one-chunk kernel).
template <typename T, int UNROLL>
__device__ __forceinline__ void nf4_dequant_impl(const uint8_t *__restrict__ codes,
                                                 const float *__restrict__ stats,
                                                 T *__restrict__ out, uint64_t numel,
                                                 uint32_t blocksize, uint32_t nested_blocksize,
                                                 uint32_t double_quant) {
  __shared__ float code[16];
  __shared__ float nested_code[256];
  nf4_load_tables(stats, code, nested_code, double_quant);
  const uint64_t n_bytes = (numel + 1) / 2;
  const uint64_t first = ((uint64_t)blockIdx.x * blockDim.x * UNROLL + threadIdx.x) * 8;
  uint2 packed[UNROLL];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const uint64_t byte0 = first + (uint64_t)u * blockDim.x * 8;
    packed[u] = byte0 + 8 <= n_bytes ? *reinterpret_cast<const uint2 *>(codes + byte0) : make_uint2(0, 0);
  }
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const uint64_t byte0 = first + (uint64_t)u * blockDim.x * 8;
    if (byte0 < n_bytes)
      nf4_chunk<T>(codes, stats, code, nested_code, out, numel, n_bytes, byte0, blocksize,
                   nested_blocksize, double_quant, packed[u]);
  }
}

#define QT_NF4(T, S, UNROLL, SUFFIX)                                                            \
  extern "C" __global__ void nf4_dequant_##S##SUFFIX(const uint8_t *codes, const float *stats, \
                                                    T *out, uint64_t numel, uint32_t blocksize, \
                                                    uint32_t nested_blocksize,                \
                                                    uint32_t double_quant) {                  \
    nf4_dequant_impl<T, UNROLL>(codes, stats, out, numel, blocksize, nested_blocksize,          \
                               double_quant);                                                  \
  }
QT_NF4(__nv_bfloat16, bf16, 1, )
QT_NF4(float, f32, 1, )
QT_NF4(__nv_bfloat16, bf16, 4, _x4)
QT_NF4(float, f32, 4, _x4)
// Persistent variant: a grid of a few CTAs per multiprocessor loops over the 8-byte
// chunks (grid stride), so the shared-memory tables are filled once per CTA rather
// than once per 256 chunks, and no CTA is scheduled for a sliver of work.
extern "C" __global__ void nf4_dequant_bf16_p(const uint8_t *codes, const float *stats,
                                              __nv_bfloat16 *out, uint64_t numel,
                                              uint32_t blocksize, uint32_t nested_blocksize,
                                              uint32_t double_quant) {
  __shared__ float code[16];
  __shared__ float nested_code[256];
  nf4_load_tables(stats, code, nested_code, double_quant);
  const uint64_t n_bytes = (numel + 1) / 2;
  const uint64_t n_chunks = (n_bytes + 7) / 8;
  for (uint64_t c = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; c < n_chunks;
       c += (uint64_t)gridDim.x * blockDim.x) {
    const uint64_t byte0 = c * 8;
    const uint2 packed =
        byte0 + 8 <= n_bytes ? *reinterpret_cast<const uint2 *>(codes + byte0) : make_uint2(0, 0);
    nf4_chunk<__nv_bfloat16>(codes, stats, code, nested_code, out, numel, n_bytes, byte0,
                             blocksize, nested_blocksize, double_quant, packed);
  }
}

// fp16 output: the compute type on GPUs without bf16 (compute capability 7.x).
QT_NF4(__half, f16, 1, )

// bf16 with 4 code bytes (8 weights, one 16-byte store) per chunk: consecutive
// threads store consecutive 16 bytes, so every store instruction of a warp writes
// 512 contiguous bytes (the 8-byte chunks above store 2 x 16 bytes per thread at a
// 32-byte stride). UNROLL chunks per thread, strided by the block width, loads first.
// Needs blocksize divisible by 8 (a chunk shares one absmax).
template <int UNROLL>
__device__ __forceinline__ void nf4_dequant_narrow_impl(const uint8_t *__restrict__ codes,
                                                        const float *__restrict__ stats,
                                                        __nv_bfloat16 *__restrict__ out,
                                                        uint64_t numel, uint32_t blocksize,
                                                        uint32_t nested_blocksize,
                                                        uint32_t double_quant) {
  __shared__ float code[16];
  __shared__ float nested_code[256];
  nf4_load_tables(stats, code, nested_code, double_quant);
  const uint64_t n_bytes = (numel + 1) / 2;
  const uint64_t first = ((uint64_t)blockIdx.x * blockDim.x * UNROLL + threadIdx.x) * 4;
  uint32_t packed[UNROLL];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const uint64_t byte0 = first + (uint64_t)u * blockDim.x * 4;
    packed[u] = byte0 + 4 <= n_bytes ? *reinterpret_cast<const uint32_t *>(codes + byte0) : 0u;
  }
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const uint64_t byte0 = first + (uint64_t)u * blockDim.x * 4;
    if (byte0 >= n_bytes) continue;
    const uint64_t elem0 = byte0 * 2;
    const float absmax = nf4_absmax(codes, stats, nested_code, n_bytes, elem0 / blocksize,
                                    nested_blocksize, double_quant);
    if (byte0 + 4 <= n_bytes && elem0 + 8 <= numel) {
      __nv_bfloat16 vals[8];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t byte = (packed[u] >> (8 * k)) & 0xff;
        vals[2 * k] = cast_out<__nv_bfloat16>(__fmul_rn(code[byte >> 4], absmax));
        vals[2 * k + 1] = cast_out<__nv_bfloat16>(__fmul_rn(code[byte & 15], absmax));
      }
      *reinterpret_cast<uint4 *>(out + elem0) = *reinterpret_cast<const uint4 *>(vals);
    } else {
      nf4_tail<__nv_bfloat16>(codes, code, out, numel, n_bytes, byte0, absmax);
    }
  }
}

extern "C" __global__ void nf4_dequant_bf16_n2(const uint8_t *codes, const float *stats,
                                               __nv_bfloat16 *out, uint64_t numel,
                                               uint32_t blocksize, uint32_t nested_blocksize,
                                               uint32_t double_quant) {
  nf4_dequant_narrow_impl<2>(codes, stats, out, numel, blocksize, nested_blocksize, double_quant);
}
