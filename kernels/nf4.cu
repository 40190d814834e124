// NF4 dequantization (bitsandbytes layout) into a reused bf16 or f32 buffer.
//
// CPU reference: crates/qtrain-device/src/nf4.rs (`dequantize_cpu`), itself checked
// against qtrain-quant's Nf4Tensor::dequantize_into. Layout of the inputs:
//   codes : packed 4-bit codes, first element of a pair in the high nibble (numel/2
//           bytes, rounded up), immediately followed by one 8-bit absmax code per
//           quantization block when double quantization is on.
//   stats : double quant: [offset, nested_code[256], nested_absmax[n_nested]]
//           plain        : [absmax[n_blocks]]
// The op is memory-bound (0.5 byte read + 2 bytes written per bf16 weight): every
// thread moves 8 code bytes (16 weights) with one 8-byte load and 16-byte stores.
// Two kernels per output type: `nf4_dequant_{bf16,f16,f32}_tile` (the default,
// CTA-tiled with lane-contiguous stores) and `nf4_dequant_{bf16,f16,f32}` (one chunk
// per thread, the simple form).
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

// One chunk per thread: thread i dequantizes code bytes 8i .. 8i+8.
template <typename T>
__device__ __forceinline__ void nf4_dequant_chunk8(const uint8_t *__restrict__ codes,
                                                   const float *__restrict__ stats,
                                                   T *__restrict__ out, uint64_t numel,
                                                   uint32_t blocksize, uint32_t nested_blocksize,
                                                   uint32_t double_quant) {
  __shared__ float code[16];
  __shared__ float nested_code[256];
  nf4_load_tables(stats, code, nested_code, double_quant);
  const uint64_t n_bytes = (numel + 1) / 2;
  const uint64_t byte0 = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (byte0 >= n_bytes) return;
  const uint2 packed =
      byte0 + 8 <= n_bytes ? *reinterpret_cast<const uint2 *>(codes + byte0) : make_uint2(0, 0);
  nf4_chunk<T>(codes, stats, code, nested_code, out, numel, n_bytes, byte0, blocksize,
               nested_blocksize, double_quant, packed);
}

#define QT_NF4(T, S)                                                                              \
  extern "C" __global__ void nf4_dequant_##S(const uint8_t *codes, const float *stats, T *out,   \
                                             uint64_t numel, uint32_t blocksize,                \
                                             uint32_t nested_blocksize, uint32_t double_quant) { \
    nf4_dequant_chunk8<T>(codes, stats, out, numel, blocksize, nested_blocksize, double_quant);  \
  }
QT_NF4(__nv_bfloat16, bf16)
QT_NF4(float, f32)
// fp16 output: the compute type on GPUs without bf16 (compute capability 7.x).
QT_NF4(__half, f16)

// ---- CTA-tiled kernels: the default.
// Measured on an H200 (lab, 4096 x 14336 -> bf16): a plain "load 8 code bytes, store 32
// output bytes" kernel reaches 73% of the copy bandwidth when each thread stores its
// own 32 bytes (a warp's store instruction covers 1 KiB at a 32-byte stride), and 86%
// when the stores are lane-contiguous. So each thread decodes its chunks into shared
// memory and each warp then stores the part of the stage its own threads wrote with
// lane-contiguous 16-byte stores (512 contiguous bytes per instruction). A bulk (TMA)
// store of the whole tile from shared memory measured the same (85.9% vs 87.3%), so the
// portable form is the only one.
// The CTA's absmax values are computed once into shared memory by as many threads as
// the tile has quantization blocks (reading the 256-entry nested code straight from
// global memory, where it stays cached), after the code loads are issued, so the
// single barrier overlaps their latency.
constexpr int NF4_CTA_THREADS = 128;
constexpr int NF4_CTA_CHUNKS = 2;  // 8-byte code chunks per thread
constexpr int NF4_CTA_WEIGHTS = NF4_CTA_THREADS * NF4_CTA_CHUNKS * 16;

template <typename T>
__device__ __forceinline__ void nf4_dequant_cta(const uint8_t *__restrict__ codes,
                                                const float *__restrict__ stats,
                                                T *__restrict__ out, uint64_t numel,
                                                uint32_t blocksize, uint32_t nested_blocksize,
                                                uint32_t double_quant) {
  constexpr int VEC = 16 * sizeof(T) / 16;  // 16-byte vectors per chunk of 16 weights
  __shared__ float code[16];
  // One absmax per quantization block the tile touches (blocksize >= 16; +1 when the
  // tile does not start on a block boundary).
  __shared__ float absmax_s[NF4_CTA_WEIGHTS / 16 + 1];
  __shared__ alignas(128) uint4 stage[NF4_CTA_WEIGHTS * sizeof(T) / 16];
  const uint64_t n_bytes = (numel + 1) / 2;
  const uint64_t w0 = (uint64_t)blockIdx.x * NF4_CTA_WEIGHTS;
  const uint64_t byte_base = w0 / 2;
  if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
  if (w0 + NF4_CTA_WEIGHTS > numel) {
    // The last, partial tile: chunk by chunk with bounds checks.
    __syncthreads();
    for (int c = 0; c < NF4_CTA_CHUNKS; ++c) {
      const uint64_t byte0 = byte_base + ((uint64_t)c * NF4_CTA_THREADS + threadIdx.x) * 8;
      if (byte0 >= n_bytes) continue;
      const uint2 packed = byte0 + 8 <= n_bytes ? *reinterpret_cast<const uint2 *>(codes + byte0)
                                                : make_uint2(0, 0);
      nf4_chunk<T>(codes, stats, code, stats + 1, out, numel, n_bytes, byte0, blocksize,
                   nested_blocksize, double_quant, packed);
    }
    return;
  }
  uint2 packed[NF4_CTA_CHUNKS];
#pragma unroll
  for (int c = 0; c < NF4_CTA_CHUNKS; ++c)
    packed[c] = __ldcs(reinterpret_cast<const uint2 *>(
        codes + byte_base + ((uint64_t)c * NF4_CTA_THREADS + threadIdx.x) * 8));
  const uint64_t blk0 = w0 / blocksize;
  const uint32_t n_blk = (uint32_t)((w0 + NF4_CTA_WEIGHTS - 1) / blocksize - blk0 + 1);
  for (uint32_t t = threadIdx.x; t < n_blk; t += NF4_CTA_THREADS)
    absmax_s[t] = nf4_absmax(codes, stats, stats + 1, n_bytes, blk0 + t, nested_blocksize, double_quant);
  __syncthreads();
#pragma unroll
  for (int c = 0; c < NF4_CTA_CHUNKS; ++c) {
    const uint32_t chunk = c * NF4_CTA_THREADS + threadIdx.x;  // within the tile
    const float a = absmax_s[(w0 + chunk * 16) / blocksize - blk0];
    alignas(16) T vals[16];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t word = k < 4 ? packed[c].x : packed[c].y;
      const uint32_t byte = (word >> (8 * (k & 3))) & 0xff;
      vals[2 * k] = cast_out<T>(__fmul_rn(code[byte >> 4], a));
      vals[2 * k + 1] = cast_out<T>(__fmul_rn(code[byte & 15], a));
    }
    const uint4 *v = reinterpret_cast<const uint4 *>(vals);
#pragma unroll
    for (int k = 0; k < VEC; ++k) stage[VEC * chunk + k] = v[k];
  }
  uint4 *dst = reinterpret_cast<uint4 *>(out + w0);
  // Each warp stores the part of the stage its own threads wrote, lane-contiguous.
  __syncwarp();
  const uint32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int c = 0; c < NF4_CTA_CHUNKS; ++c) {
    const uint32_t first = VEC * (c * NF4_CTA_THREADS + warp * 32);
#pragma unroll
    for (int k = 0; k < VEC; ++k) __stcs(dst + first + 32 * k + lane, stage[first + 32 * k + lane]);
  }
}

#define QT_NF4_TILE(T, S)                                                                    \
  extern "C" __global__ void __launch_bounds__(NF4_CTA_THREADS)                               \
      nf4_dequant_##S##_tile(const uint8_t *codes, const float *stats, T *out, uint64_t numel, \
                             uint32_t blocksize, uint32_t nested_blocksize,                   \
                             uint32_t double_quant) {                                         \
    nf4_dequant_cta<T>(codes, stats, out, numel, blocksize, nested_blocksize, double_quant);  \
  }
QT_NF4_TILE(__nv_bfloat16, bf16)
QT_NF4_TILE(__half, f16)
QT_NF4_TILE(float, f32)
