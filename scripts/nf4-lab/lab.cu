// NF4 dequantization lab (see lab.py): the shipped kernels of crates/qtrain-device/src/ops/nf4/nf4.cu plus the
// candidates and access-pattern ceilings measured for docs/perf.md (v5). The `t*`
// kernels use the Hopper bulk copy: compile with -arch=sm_90.
#include "../../crates/qtrain-device/src/ops/nf4/nf4.cu"

// Pattern ceilings.
extern "C" __global__ void fill16(uint4 *out, uint64_t n16) {
  uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n16) out[i] = make_uint4(i, 1, 2, 3);
}
// Load 8 bytes, store 32 (the dequantization's access pattern without decoding).
extern "C" __global__ void stream8to32(const uint2 *in, uint4 *out, uint64_t n8) {
  uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n8) {
    uint2 v = in[i];
    out[2 * i] = make_uint4(v.x, v.y, v.x, v.y);
    out[2 * i + 1] = make_uint4(v.y, v.x, v.y, v.x);
  }
}
// Same, stores coalesced: thread writes 16 bytes at lane stride.
extern "C" __global__ void stream8to32c(const uint2 *in, uint4 *out, uint64_t n8) {
  uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  uint64_t base = (uint64_t)blockIdx.x * blockDim.x * 2;
  if (i < n8) {
    uint2 v = in[i];
    out[base + threadIdx.x] = make_uint4(v.x, v.y, v.x, v.y);
    out[base + blockDim.x + threadIdx.x] = make_uint4(v.y, v.x, v.y, v.x);
  }
}

__device__ __forceinline__ uint32_t pack_bf16(float a, float b) {
  __nv_bfloat16 x = __float2bfloat16_rn(a), y = __float2bfloat16_rn(b);
  return (uint32_t)__bfloat16_as_ushort(x) | ((uint32_t)__bfloat16_as_ushort(y) << 16);
}

// Candidate S: the CTA's absmax values computed once into shared memory (64 threads,
// read straight from global: no 256-entry table copy), the code load issued before
// the barrier. CHUNKS 8-byte chunks per thread at block stride. Stores with
// optional streaming hint. Needs numel a multiple of 16*256*CHUNKS (lab only).
template <int CHUNKS, bool CS, int NT>
__device__ __forceinline__ void cand_s(const uint8_t *__restrict__ codes, const float *__restrict__ stats,
                                       __nv_bfloat16 *__restrict__ out, uint64_t numel, uint32_t blocksize,
                                       uint32_t nested_blocksize) {
  constexpr int WPB = NT * 16 * CHUNKS;  // weights per CTA
  __shared__ float code[16];
  __shared__ float absmax_s[WPB / 16];   // upper bound (blocksize >= 16)
  const uint64_t n_bytes = numel / 2;
  const uint64_t cta_byte0 = (uint64_t)blockIdx.x * (WPB / 2);
  uint2 packed[CHUNKS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c)
    packed[c] = __ldcs(reinterpret_cast<const uint2 *>(codes + cta_byte0 + ((uint64_t)c * NT + threadIdx.x) * 8));
  if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
  const uint32_t nblk = WPB / blocksize;
  const uint64_t blk0 = cta_byte0 * 2 / blocksize;
  for (uint32_t t = threadIdx.x; t < nblk; t += NT) {
    const uint64_t b = blk0 + t;
    absmax_s[t] = __fadd_rn(__fmul_rn(__ldg(stats + 1 + codes[n_bytes + b]), __ldg(stats + 257 + b / nested_blocksize)), stats[0]);
  }
  __syncthreads();
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const uint32_t local_byte = (c * NT + threadIdx.x) * 8;
    const float a = absmax_s[local_byte * 2 / blocksize];
    uint32_t w[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t word = k < 4 ? packed[c].x : packed[c].y;
      const uint32_t byte = (word >> (8 * (k & 3))) & 0xff;
      w[k] = pack_bf16(__fmul_rn(code[byte >> 4], a), __fmul_rn(code[byte & 15], a));
    }
    uint4 *dst = reinterpret_cast<uint4 *>(out + (cta_byte0 + local_byte) * 2);
    if (CS) {
      __stcs(dst, make_uint4(w[0], w[1], w[2], w[3]));
      __stcs(dst + 1, make_uint4(w[4], w[5], w[6], w[7]));
    } else {
      dst[0] = make_uint4(w[0], w[1], w[2], w[3]);
      dst[1] = make_uint4(w[4], w[5], w[6], w[7]);
    }
  }
}
#define CAND_S(NAME, CH, CS, NT) \
  extern "C" __global__ void __launch_bounds__(NT) NAME(const uint8_t *codes, const float *stats, __nv_bfloat16 *out, uint64_t numel, uint32_t bs, uint32_t nbs, uint32_t dq) { cand_s<CH, CS, NT>(codes, stats, out, numel, bs, nbs); }
CAND_S(s1, 1, false, 256)
CAND_S(s1cs, 1, true, 256)
CAND_S(s2, 2, false, 256)
CAND_S(s2cs, 2, true, 256)
CAND_S(s4, 4, false, 256)
CAND_S(s1_512, 1, false, 512)
CAND_S(s2_512, 2, false, 512)
CAND_S(s1_128, 1, false, 128)
CAND_S(s2_128, 2, false, 128)

// Candidate T: decode into shared memory, one bulk (TMA) store of the CTA's output.
template <int CHUNKS, int NT>
__device__ __forceinline__ void cand_t(const uint8_t *__restrict__ codes, const float *__restrict__ stats,
                                       __nv_bfloat16 *__restrict__ out, uint64_t numel, uint32_t blocksize,
                                       uint32_t nested_blocksize) {
  constexpr int WPB = NT * 16 * CHUNKS;
  __shared__ float code[16];
  __shared__ float absmax_s[WPB / 16];
  __shared__ alignas(128) uint4 stage[WPB / 8];
  const uint64_t n_bytes = numel / 2;
  const uint64_t cta_byte0 = (uint64_t)blockIdx.x * (WPB / 2);
  uint2 packed[CHUNKS];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c)
    packed[c] = __ldcs(reinterpret_cast<const uint2 *>(codes + cta_byte0 + ((uint64_t)c * NT + threadIdx.x) * 8));
  if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
  const uint32_t nblk = WPB / blocksize;
  const uint64_t blk0 = cta_byte0 * 2 / blocksize;
  for (uint32_t t = threadIdx.x; t < nblk; t += NT) {
    const uint64_t b = blk0 + t;
    absmax_s[t] = __fadd_rn(__fmul_rn(__ldg(stats + 1 + codes[n_bytes + b]), __ldg(stats + 257 + b / nested_blocksize)), stats[0]);
  }
  __syncthreads();
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const uint32_t local_byte = (c * NT + threadIdx.x) * 8;
    const float a = absmax_s[local_byte * 2 / blocksize];
    uint32_t w[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const uint32_t word = k < 4 ? packed[c].x : packed[c].y;
      const uint32_t byte = (word >> (8 * (k & 3))) & 0xff;
      w[k] = pack_bf16(__fmul_rn(code[byte >> 4], a), __fmul_rn(code[byte & 15], a));
    }
    stage[local_byte / 4] = make_uint4(w[0], w[1], w[2], w[3]);
    stage[local_byte / 4 + 1] = make_uint4(w[4], w[5], w[6], w[7]);
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  if (threadIdx.x == 0) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(stage);
    __nv_bfloat16 *dst = out + cta_byte0 * 2;
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(s), "n"(WPB * 2) : "memory");
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
  }
}
#define CAND_T(NAME, CH, NT) \
  extern "C" __global__ void __launch_bounds__(NT) NAME(const uint8_t *codes, const float *stats, __nv_bfloat16 *out, uint64_t numel, uint32_t bs, uint32_t nbs, uint32_t dq) { cand_t<CH, NT>(codes, stats, out, numel, bs, nbs); }
CAND_T(t1, 1, 256)
CAND_T(t2, 2, 256)
CAND_T(t4, 4, 256)
CAND_T(t2_128, 2, 128)
CAND_T(t4_128, 4, 128)
CAND_T(t8_128, 8, 128)

// Candidate U: one 16-byte code load per thread (32 weights), decoded into a
// per-warp shared stage, then stored with lane-contiguous 16-byte stores (every
// store instruction writes 512 contiguous bytes).
template <int NT>
__device__ __forceinline__ void cand_u(const uint8_t *__restrict__ codes, const float *__restrict__ stats,
                                       __nv_bfloat16 *__restrict__ out, uint64_t numel, uint32_t blocksize,
                                       uint32_t nested_blocksize) {
  constexpr int WPB = NT * 32;
  __shared__ float code[16];
  __shared__ float absmax_s[WPB / 16];
  const uint64_t n_bytes = numel / 2;
  const uint64_t cta_byte0 = (uint64_t)blockIdx.x * (WPB / 2);
  const uint4 p = __ldcs(reinterpret_cast<const uint4 *>(codes + cta_byte0 + threadIdx.x * 16));
  if (threadIdx.x < 16) code[threadIdx.x] = NF4_CODE[threadIdx.x];
  const uint32_t nblk = WPB / blocksize;
  const uint64_t blk0 = cta_byte0 * 2 / blocksize;
  for (uint32_t t = threadIdx.x; t < nblk; t += NT) {
    const uint64_t b = blk0 + t;
    absmax_s[t] = __fadd_rn(__fmul_rn(__ldg(stats + 1 + codes[n_bytes + b]), __ldg(stats + 257 + b / nested_blocksize)), stats[0]);
  }
  __syncthreads();
  const float a = absmax_s[threadIdx.x * 32 / blocksize];
  uint32_t w[16];
  const uint32_t words[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    const uint32_t byte = (words[k / 4] >> (8 * (k & 3))) & 0xff;
    w[k] = pack_bf16(__fmul_rn(code[byte >> 4], a), __fmul_rn(code[byte & 15], a));
  }
  uint4 *dst = reinterpret_cast<uint4 *>(out + (cta_byte0 + threadIdx.x * 16) * 2);
#pragma unroll
  for (int k = 0; k < 4; ++k) dst[k] = make_uint4(w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]);
}
extern "C" __global__ void __launch_bounds__(256) u256(const uint8_t *codes, const float *stats, __nv_bfloat16 *out, uint64_t numel, uint32_t bs, uint32_t nbs, uint32_t dq) { cand_u<256>(codes, stats, out, numel, bs, nbs); }
extern "C" __global__ void __launch_bounds__(128) u128(const uint8_t *codes, const float *stats, __nv_bfloat16 *out, uint64_t numel, uint32_t bs, uint32_t nbs, uint32_t dq) { cand_u<128>(codes, stats, out, numel, bs, nbs); }
