// Causal grouped-query flash attention, forward and backward, with sliding window and
// packed-document (segment) masking. Contract and CPU reference:
// crates/qtrain-device/src/attention.rs; launchers: crates/qtrain-device/src/launch/attention.rs.
//
// Kernels (D = head dim in {16, 32, 64, 128}, S = bf16 | f16; sm_80+, empty below):
//   attn_fwd_dD_S        grid (heads, q tiles, batch): O and lse = m + log l (scores include scale)
//   attn_bwd_prep_dD_S   1-D grid over (token, head) rows: Dsum = rowsum(dO * O) into scratch
//   attn_bwd_dkdv_dD_S   grid (kv heads, key tiles, batch): dK, dV of one 64-key tile, looping
//                        over every query head of its group and every query tile that sees it
//   attn_bwd_dq_dD_S     grid (heads, q tiles, batch): dQ of one 64-query tile
//   attn_bwd_fused_dD_S  grid (heads, batch, key tiles): one head's dK, dV shares as bwd_dkdv
//                        plus each key tile's share of dQ, summed in key-tile order in an f32
//                        buffer (5 products per tile pair instead of 7; see bwd_fused)
//   attn_bwd_fusedu_dD_S the same with atomic adds, then attn_bwd_dq_store_dD_S
// and, compiled a second time for sm_90a (-DQTRAIN_SM90A_VARIANT; attention_sm90a.ptx, loaded
// on compute capability 9.0 only), the same templates with Hopper's wgmma for the products
// (WG = true; D = 64, 128): attn_fwdwg_dD_S / attn_fwdwg8_dD_S (1 / 2 warpgroups),
// attn_bwd_dkdvwg_dD_S, attn_bwd_dqwg_dD_S (the split backward), attn_bwd_fusedwg_d128_S
// (fused-atomic), attn_bwd_dkdvds_d128_S + attn_bwd_dqds_d128_S (the stored-dS backward:
// dS^T written as blobs by the first, dQ = dS K from them in the second). See WgSw and fwd.
// Except in fusedu, every output element is written by exactly one thread after a
// fixed-order reduction: results are bit-reproducible run to run. Memory is O(seq):
// nothing of size seq^2 is ever stored, the backward recomputes P from lse.
//
// 128 threads = 4 warps per CTA, each warp owns 16 rows of the CTA's 64-row tile (queries in
// fwd / dQ, keys in dK/dV) and loops over 64-row tiles of the other side. Tiles are moved
// with cp.async (16 B per thread and instruction, zero-filled past the sequence end) into
// swizzled shared memory, double-buffered so the next tile loads while this one computes.
//
// ---------------------------------------------------------------------------------------
// Fragment layouts this file relies on (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
// floating point type" and "ldmatrix"). lane = %laneid, g = lane >> 2, t = lane & 3.
// A register holding two 16-bit elements keeps the lower column/k index in bits 0..15.
//
//  mma.m16n8k16 A (16x16, row-major), 4 regs:
//     a0: (row g,   k 2t..2t+1)      a1: (row g+8, k 2t..2t+1)
//     a2: (row g,   k 2t+8..2t+9)    a3: (row g+8, k 2t+8..2t+9)
//  mma.m16n8k16 B (16x8, "col" = k-major per column n), 2 regs:
//     b0: (k 2t..2t+1, n g)          b1: (k 2t+8..2t+9, n g)
//  mma.m16n8k16 C/D (16x8 f32), 4 regs:
//     c0,c1: (row g, n 2t, 2t+1)     c2,c3: (row g+8, n 2t, 2t+1)
//  ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the 8 row addresses (16 B each) of matrix i;
//     destination reg i of lane holds matrix i's (row g, cols 2t, 2t+1).
//  ldmatrix.m8n8.x4.trans.b16: same addresses; reg i holds matrix i's (rows 2t, 2t+1; col g),
//     i.e. the non-trans fragment of the transposed 8x8 matrix.
//
// How the operands are built from row-major [rows][D] shared-memory tiles:
//  * A from a tile X (Q in fwd/dQ, K or V in dK/dV, dO in dQ): x4 with lane -> row
//    (lane & 7) + 8 * ((lane >> 3) & 1), 16-B chunk 2kk + (lane >> 4) gives a0..a3 of k-step kk
//    (matrix 0 = rows 0-7/k 0-7, 1 = rows 8-15/k 0-7, 2 = rows 0-7/k 8-15, 3 = rows 8-15/k 8-15).
//  * B = Y^T for S = X Y^T (Y = K, or Q/dO in dK/dV, or V for dP = dO V^T): Y's rows are the
//    n index, its columns the k index, so non-trans ldmatrix of 8 Y rows at chunk c gives
//    (k = 8c + 2t.., n = g): b0 for chunk 2kk, b1 for chunk 2kk+1. One x4 loads the n-tiles
//    nt, nt+1: lane -> row 8 * (nt + (lane >> 4)) + (lane & 7), chunk 2kk + ((lane >> 3) & 1);
//    regs 0,1 = (b0, b1) of n-tile nt, regs 2,3 of n-tile nt+1.
//  * B = Y for O = P Y (Y = V, or dO / Q in dK/dV, or K in dQ): k = Y row, n = Y column, so
//    .trans ldmatrix of 8 Y rows at chunk c gives (k = 2t.., n = 8c + g). x4: lane -> row
//    16 kk + 8 * ((lane >> 3) & 1) + (lane & 7), chunk nt + (lane >> 4); regs 0,1 = (b0, b1) of
//    n-tile nt, regs 2,3 of n-tile nt+1.
//  * A = P (or dS) straight from the S accumulators: for the 16-wide k-step kk of P
//    (columns 16kk..16kk+15 of S = n-tiles 2kk, 2kk+1):
//       a0 = pack(S[2kk].c0, c1)  a1 = pack(S[2kk].c2, c3)
//       a2 = pack(S[2kk+1].c0, c1)  a3 = pack(S[2kk+1].c2, c3)
//  * Row statistics (max, sum) of an S row live in the 4 lanes of a quad (same g): reduced
//    with shfl.xor 1 and 2.
//
// Shared-memory swizzle: a [rows][D] 16-bit tile stores row r, 16-byte chunk c at byte
// r * 2D + 16 * (c ^ ((r / rpl) & m)), rpl = max(1, 8 / (D/8)) rows per 128-byte line and
// m = min(8, D/8) - 1, so the 8 rows of one ldmatrix matrix hit 8 distinct 16-byte bank
// groups (no bank conflicts) for every D.
// ---------------------------------------------------------------------------------------
//
// Masking: key j is visible from query i of the same batch row when j <= i, j > i - window
// (window 0 = none), both < seq, and seg[i] == seg[j] (when segment ids are given). Key
// tiles entirely outside the causal/window range are skipped, and with segment ids (which
// must be non-decreasing along each row) so are the tiles of other documents; the element
// mask runs only on tiles that straddle a boundary (or always when segment ids are
// given). A row with no visible key inside one tile keeps its running max at -inf; the
// exponent base then falls back to 0 so exp(-inf - base) = 0 instead of NaN.
//
// Tuning variant: attn_fwd8_d128_S runs the forward with 8 warps (BQ = 128, 256 threads, one
// CTA per SM) so each K/V tile in shared memory feeds twice the queries; the launcher
// defaults to 4 warps and the GPU self-test times both.
//
// Testing without a GPU: crates/qtrain-device/src/ops/attention/emu/run.sh compiles this file for the host (-DQT_EMU) with
// an emulation of every primitive below (emu/emu.h, layouts transcribed from the PTX
// ISA tables above, wgmma's shared-memory descriptors decoded from the ISA's canonical
// layouts) and checks all kernels, the wgmma ones included, against a reference. If the GPU check fails but
// the emulation passes, suspect what the emulator cannot see: the hardware's fragment
// layouts themselves (the table above), cp.async / shared-memory ordering (the emulator
// runs cp.async copies at the wait), and launch configuration (grid, block, dynamic smem).
//
// Numerics: scores, softmax and all accumulators are f32; P and dS are rounded to the
// storage type only as mma operands (as FlashAttention-2 does); exp uses ex2.approx on
// scores pre-multiplied by scale * log2(e).

#include <stdint.h>

#ifdef QT_EMU
#include "emu/emu.h"  // host emulation of the warp primitives below (emu/)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if defined(QT_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define QT_ATTN_ON 1
#else
#define QT_ATTN_ON 0
#endif

namespace qt_attn {

struct Bf16 {};
struct F16 {};

// ---------------------------------------------------------------------------------------
// Device primitives (the emulator provides the same names on the host).
#ifndef QT_EMU
#define QT_DEV __device__ __forceinline__

QT_DEV void bar_sync() { __syncthreads(); }
QT_DEV void warp_sync() { __syncwarp(); }
QT_DEV float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
QT_DEV float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
QT_DEV char *smem_ptr() {
  extern __shared__ __align__(128) char qt_attn_smem[];
  return qt_attn_smem;
}
QT_DEV uint32_t smem_addr(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
template <class T> QT_DEV T gld(const T *p) { return *p; }
QT_DEV void gst16(void *p, uint4 v) { *reinterpret_cast<uint4 *>(p) = v; }
QT_DEV void gstf(float *p, float v) { *p = v; }
QT_DEV void gst4(void *p, uint32_t v) { *reinterpret_cast<uint32_t *>(p) = v; }
// The fused backward's dQ accumulator: read and written at L2 (.cg), never through an
// SM's L1, which another CTA's earlier add on the same SM could have left stale.
QT_DEV float2 ldcg2(const float *p) { return __ldcg(reinterpret_cast<const float2 *>(p)); }
QT_DEV void stcg2(float *p, float2 v) { __stcg(reinterpret_cast<float2 *>(p), v); }
QT_DEV void red_add(float *p, float v) { atomicAdd(p, v); }  // result unused: red.global.add
QT_DEV void fence_gpu() { __threadfence(); }
#if QT_ATTN_ON
// Turn counters of the ordered dQ accumulation (one thread per CTA spins / hands on).
// A turn comes within a few tile steps (microseconds); one that has not come after ~2^34
// cycles (several seconds) never will (blocks did not launch in index order, see
// bwd_fused): trap, so the launch fails with an error instead of hanging the run.
QT_DEV void wait_turn(const uint32_t *p, uint32_t want) {
  uint32_t v;
  const long long t0 = clock64();
  for (;;) {
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    if (v == want) return;
    if (clock64() - t0 > (1ll << 34)) asm volatile("trap;");
    __nanosleep(64);
  }
}
QT_DEV void give_turn(uint32_t *p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

QT_DEV void ldsm4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
QT_DEV void ldsm4t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
template <class E>
QT_DEV void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
QT_DEV void mma<Bf16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
QT_DEV void mma<F16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 16 bytes global -> shared, bypassing L1; zero-filled when !ok (src is not read then).
QT_DEV void cp16(uint32_t dst, const void *src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(ok ? 16 : 0));
}
QT_DEV void cp4(uint32_t dst, const void *src, bool ok) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(ok ? 4 : 0));
}
QT_DEV void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> QT_DEV void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
template <class E> QT_DEV uint32_t pack2(float lo, float hi);
template <> QT_DEV uint32_t pack2<Bf16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo = bits 0..15
  return *reinterpret_cast<uint32_t *>(&v);
}
template <> QT_DEV uint32_t pack2<F16>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t *>(&v);
}
template <class E> QT_DEV float2 unpack2(uint32_t u);
template <> QT_DEV float2 unpack2<Bf16>(uint32_t u) {
  return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
template <> QT_DEV float2 unpack2<F16>(uint32_t u) {
  return __half22float2(*reinterpret_cast<__half2 *>(&u));
}
// wgmma (sm_90a only: the attention_sm90a.ptx build defines __CUDA_ARCH_FEAT_SM90_ALL;
// elsewhere these trap, and no kernel that reaches them is built there).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QT_SM90A(...) asm volatile(__VA_ARGS__)
#else
#define QT_SM90A(...) __trap()
#endif
QT_DEV void wg_fence() { QT_SM90A("wgmma.fence.sync.aligned;\n" ::: "memory"); }
QT_DEV void wg_commit() { QT_SM90A("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> QT_DEV void wg_wait() {
  QT_SM90A("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes shared memory through the generic proxy, wgmma reads it through the
// async proxy: each writer fences before the barrier that precedes the reads.
QT_DEV void fence_proxy_async() { QT_SM90A("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Bulk reduction shared -> global (the fused wgmma backward's dQ shares): the copy
// engine adds `bytes` f32 from shared memory into global memory, asynchronously. The
// threads that wrote the shared source fence.proxy.async before the barrier that
// precedes the issue; the source may be overwritten once wait_group.read says so.
QT_DEV void bulk_add_f32(float *dst, uint32_t src, uint32_t bytes) {
  QT_SM90A("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst),
           "r"(src), "r"(bytes)
           : "memory");
}
QT_DEV void bulk_commit() { QT_SM90A("cp.async.bulk.commit_group;\n" ::: "memory"); }
template <int N> QT_DEV void bulk_wait_read() {
  QT_SM90A("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
template <int N> QT_DEV void bulk_wait() {
  QT_SM90A("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}
QT_DEV void sts4f(float *p, float a, float b, float c, float d) {
  *reinterpret_cast<float4 *>(p) = make_float4(a, b, c, d);
}
// Keeps the compiler from moving reads or writes of wgmma accumulators across the
// asynchronous instructions (CUTLASS's warpgroup_fence_operand).
template <int A, int B> QT_DEV void wg_fence_operands(float (&r)[A][B]) {
#pragma unroll
  for (int i = 0; i < A; ++i)
#pragma unroll
    for (int j = 0; j < B; ++j) asm volatile("" : "+f"(r[i][j])::"memory");
}
// Keeps registers that an asynchronous wgmma reads as its A operand alive (and unchanged)
// up to this point: after the wait for that product, so that the compiler does not give
// them to other values while the tensor cores still read them.
template <int A, int B> QT_DEV void wg_keep_operands(uint32_t (&r)[A][B]) {
#pragma unroll
  for (int i = 0; i < A; ++i)
#pragma unroll
    for (int j = 0; j < B; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}
template <int N, class E> struct Wg;
template <int N, class E> struct WgSs;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// D[64 x N] (+)= A[64 x 16] B[16 x N], A from registers, B by shared-memory descriptor
// (TB = 1: B stored MN-major); `accumulate` 0 overwrites D.
#define QT_WGMMA_RS64(E, T)                                                               \
  template <> struct Wg<64, E> {                                                             \
    template <int TB>                                                                       \
    static QT_DEV void rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc,       \
                          int accumulate) {                                                 \
      asm volatile(                                                                         \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                     \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32." T "." T " "                         \
          "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "  \
          "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"                                       \
          :       "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),\
      "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),\
      "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),\
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),\
      "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),\
      "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),\
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),\
      "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]) \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate),        \
            "n"(TB));                                                                       \
    }                                                                                       \
  };
#define QT_WGMMA_RS128(E, T)                                                               \
  template <> struct Wg<128, E> {                                                             \
    template <int TB>                                                                       \
    static QT_DEV void rs(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc,       \
                          int accumulate) {                                                 \
      asm volatile(                                                                         \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                     \
          "wgmma.mma_async.sync.aligned.m64n128k16.f32." T "." T " "                         \
          "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "  \
          "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"                                       \
          :       "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]),\
      "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]),\
      "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),\
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]),\
      "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),\
      "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),\
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),\
      "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]),\
      "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),\
      "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),\
      "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]),\
      "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]),\
      "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]),\
      "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]),\
      "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),\
      "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]) \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate),        \
            "n"(TB));                                                                       \
    }                                                                                       \
  };
// The same with A by descriptor too (TA = 1: A stored MN-major, i.e. M contiguous).
#define QT_WGMMA_SS64(E, T)                                                               \
  template <> struct WgSs<64, E> {                                                           \
    template <int TB, int TA = 0>                                                           \
    static QT_DEV void ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b,            \
                          int accumulate) {                                                 \
      asm volatile(                                                                         \
          "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                     \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32." T "." T " "                         \
          "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "  \
          "%32, %33, p, 1, 1, %36, %35;\n}\n"                                    \
          :       "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), \
      "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), \
      "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), \
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), \
      "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), \
      "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), \
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), \
      "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]) \
          : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(TB), "n"(TA));                 \
    }                                                                                       \
  };
QT_WGMMA_SS64(Bf16, "bf16")
QT_WGMMA_SS64(F16, "f16")
QT_WGMMA_RS64(Bf16, "bf16")
QT_WGMMA_RS64(F16, "f16")
QT_WGMMA_RS128(Bf16, "bf16")
QT_WGMMA_RS128(F16, "f16")
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
#endif  // QT_ATTN_ON
#endif  // !QT_EMU

#if QT_ATTN_ON

constexpr int kThreads = 128;  // 4 warps
constexpr int kBQ = 64;        // query rows per tile (16 per warp)
constexpr int kBK = 64;        // key rows per tile
constexpr float kLog2e = 1.4426950408889634f;

QT_DEV int imin(int a, int b) { return a < b ? a : b; }
QT_DEV int imax(int a, int b) { return a > b ? a : b; }

// Byte offset of (row r, 16-byte chunk c) in a swizzled [rows][D] 16-bit tile.
template <int D> struct Sw {
  static constexpr int kCpr = D / 8;  // chunks per row
  static constexpr int kRpl = kCpr >= 8 ? 1 : 8 / kCpr;
  static constexpr int kMask = (kCpr >= 8 ? 8 : kCpr) - 1;
  static QT_DEV uint32_t off(int r, int c) {
    return static_cast<uint32_t>(r * (D * 2) + ((c ^ ((r / kRpl) & kMask)) << 4));
  }
};

// The same [kBK][D] tile (D = 64 or 128) in wgmma's canonical 128-byte-swizzle layout
// (PTX ISA "Shared Memory Matrix Layout"): 64-column blocks of kBK rows x 128 bytes, one
// after the other; within a block, row r, chunk c at r * 128 + 16 * (c ^ (r & 7)). The tile
// must start on a 1024-byte boundary (the hardware swizzles address bits 4-6 with 7-9).
// As B of S = Q K^T it is K-major (keys = n, head dim = k); as B of O = P V it is MN-major
// (head dim = n, keys = k): one layout serves both.
template <int D> struct WgSw {
  static_assert(D == 64 || D == 128, "wgmma tiles are 64-column blocks");
  static constexpr uint32_t kBlock = kBK * 128;  // bytes of one 64-column block
  static QT_DEV uint32_t off(int r, int c) {
    return static_cast<uint32_t>((c >> 3) * kBlock + r * 128 + (((c & 7) ^ (r & 7)) << 4));
  }
  // Where k-step kk (head-dim columns 16kk..16kk+15) starts when the tile is read
  // K-major: block kk / 4, 32 bytes into the (swizzled) rows per step.
  static QT_DEV uint32_t kstep(int kk) {
    return static_cast<uint32_t>((kk >> 2) * kBlock + (kk & 3) * 32);
  }
};

// What a wgmma kernel's shared memory has beyond its layout, and where the layout then
// starts: the next 1024-byte boundary (the 128-byte swizzle's period) of the dynamic
// shared memory, whose own base the launch does not align that far.
constexpr int kWgPad = 1024;
QT_DEV void wg_align(char *&sm, uint32_t &sb) {
  const uint32_t pad = (1024u - (sb & 1023u)) & 1023u;
  sm += pad;
  sb += pad;
}

template <bool B, class T, class F> struct Pick {
  using type = T;
};
template <class T, class F> struct Pick<false, T, F> {
  using type = F;
};

// wgmma shared-memory matrix descriptor with the 128-byte swizzle (PTX ISA "Matrix
// Descriptor Format"): start address, leading and stride byte offsets in 16-byte units.
QT_DEV uint64_t wg_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// Rows [0, ROWS) of a global [rows][D] tile (row r at g + r * ld) into the swizzled tile at
// shared address s (layout Lay: Sw<D>, or WgSw<D> for wgmma operands); rows >= valid are
// zero-filled (never NaN garbage: P = 0 times a zero V).
template <int D, int ROWS, int THREADS = kThreads, class Lay = Sw<D>>
QT_DEV void load_tile(uint32_t s, const uint16_t *g, uint64_t ld, int valid) {
  constexpr int kCpr = D / 8, kTotal = ROWS * kCpr;
  static_assert(kTotal % THREADS == 0, "tile must split evenly over the CTA");
#pragma unroll
  for (int it = 0; it < kTotal / THREADS; ++it) {
    const int idx = it * THREADS + static_cast<int>(threadIdx.x);
    const int r = idx / kCpr, c = idx % kCpr;
    const bool ok = r < valid;
    cp16(s + Lay::off(r, c), g + (ok ? static_cast<uint64_t>(r) * ld : 0) + c * 8, ok);
  }
}

// ROWS 32-bit words (lse, Dsum, segment ids) into shared memory, zero past `valid`.
template <int ROWS> QT_DEV void load_words(uint32_t s, const void *g, int valid) {
  const int i = static_cast<int>(threadIdx.x);
  if (i < ROWS) {
    const bool ok = i < valid;
    cp4(s + 4 * i, static_cast<const uint32_t *>(g) + (ok ? i : 0), ok);
  }
}

// Branch-free (bitwise, not short-circuit): it runs per score element on boundary tiles.
QT_DEV bool visible(int i, int j, int seq, int window, bool has_seg, uint32_t si, uint32_t sj) {
  return (j <= i) & (i < seq) & ((window == 0) | (j + window > i)) & (!has_seg | (si == sj));
}

// Packed rows: segment ids are non-decreasing along each row (every document one run, as
// the data pipeline packs them; the engine checks it), so the documents a tile can see
// form one range of tiles, found by binary search over the tiles' boundary ids. Work on
// the tiles outside it would be all masked (P = 0): skipping them changes no result.

// The first key tile in [lo, hi] holding a key of the segment of query q0 (the query
// tile's first): earlier tiles hold only earlier documents, invisible to every query of
// the tile. Tile hi reaches q0, so it always qualifies.
QT_DEV int first_key_tile(const uint32_t *sg, int q0, int lo, int hi, int seq) {
  const uint32_t s0 = gld(sg + q0);
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (gld(sg + imin(mid * kBK + kBK - 1, seq - 1)) < s0) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The key tiles that queries [q0, q_end) of one batch row can see: up to the one holding
// q_end - 1 (causal), from the window's first key (window 0 = none) and, with packed
// documents, from the first tile of q0's document. Also exactly the key tiles whose
// bwd_dkdv query range includes the query tile (the same inequalities from either side).
struct KeyTiles {
  int lo, hi;
};
QT_DEV KeyTiles key_tiles(const uint32_t *sg, int q0, int q_end, int seq, int window) {
  const int j_lo = window ? imax(0, q0 - window + 1) : 0;
  const int hi = (q_end - 1) / kBK;
  return {sg ? first_key_tile(sg, q0, j_lo / kBK, hi, seq) : j_lo / kBK, hi};
}

// The last query tile in [lo, hi] whose first query is in a segment no later than the
// key tile's last key (at k_last): later tiles hold only later documents. Tile lo starts
// at or before the key tile, so it always qualifies.
QT_DEV int last_query_tile(const uint32_t *sg, int k_last, int lo, int hi) {
  const uint32_t s1 = gld(sg + k_last);
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (gld(sg + mid * kBQ) <= s1) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// S[16 x 8*NT] += A(16 x D, fragments `a` per k-step) * Y^T, Y = rows [0, 8*NT) of the
// swizzled tile at `y`.
template <int D, int NT, class E>
QT_DEV void mm_abt_regs(float (&s)[NT][4], const uint32_t (&a)[D / 16][4], uint32_t y, int lane) {
  const int mi = lane >> 3, lr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b[4];
      ldsm4(b, y + Sw<D>::off((nt + (mi >> 1)) * 8 + lr, 2 * kk + (mi & 1)));
      mma<E>(s[nt], a[kk], b[0], b[1]);
      mma<E>(s[nt + 1], a[kk], b[2], b[3]);
    }
  }
}

// Same with A = rows [row0, row0 + 16) of the swizzled tile at `x`, loaded per k-step.
template <int D, int NT, class E>
QT_DEV void mm_abt_smem(float (&s)[NT][4], uint32_t x, int row0, uint32_t y, int lane) {
  const int mi = lane >> 3, lr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldsm4(a, x + Sw<D>::off(row0 + lr + (mi & 1) * 8, 2 * kk + (mi >> 1)));
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b[4];
      ldsm4(b, y + Sw<D>::off((nt + (mi >> 1)) * 8 + lr, 2 * kk + (mi & 1)));
      mma<E>(s[nt], a, b[0], b[1]);
      mma<E>(s[nt + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x D] += P(16 x 16*KS, packed pairs p[n-tile][row half]) * Y, Y = rows [0, 16*KS)
// of the swizzled tile at `y`.
template <int D, int KS, class E>
QT_DEV void mm_pb(float (&acc)[D / 8][4], const uint32_t (&p)[2 * KS][2], uint32_t y,
                  int lane) {
  const int mi = lane >> 3, lr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    const uint32_t a[4] = {p[2 * kk][0], p[2 * kk][1], p[2 * kk + 1][0], p[2 * kk + 1][1]};
#pragma unroll
    for (int nt = 0; nt < D / 8; nt += 2) {
      uint32_t b[4];
      ldsm4t(b, y + Sw<D>::off(kk * 16 + (mi & 1) * 8 + lr, nt + (mi >> 1)));
      mma<E>(acc[nt], a, b[0], b[1]);
      mma<E>(acc[nt + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x 8*NTD] += X(16 x 64) * Y[:, n0 .. n0 + 8*NTD), X = rows [row0, row0 + 16) of the
// transpose of the swizzled [64][W] tile at `xt` (which stores X^T: dS^T, keys x queries),
// Y = the swizzled [64][D] tile at `y` (K). Both operands via .trans ldmatrix.
template <int D, int W, int NTD, class E>
QT_DEV void mm_atb_smem(float (&acc)[NTD][4], uint32_t xt, int row0, uint32_t y, int n0,
                        int lane) {
  const int mi = lane >> 3, lr = lane & 7;
#pragma unroll
  for (int kk = 0; kk < kBK / 16; ++kk) {
    uint32_t a[4];
    ldsm4t(a, xt + Sw<W>::off(16 * kk + 8 * (mi >> 1) + lr, row0 / 8 + (mi & 1)));
#pragma unroll
    for (int nt = 0; nt < NTD; nt += 2) {
      uint32_t bb[4];
      ldsm4t(bb, y + Sw<D>::off(kk * 16 + (mi & 1) * 8 + lr, n0 / 8 + nt + (mi >> 1)));
      mma<E>(acc[nt], a, bb[0], bb[1]);
      mma<E>(acc[nt + 1], a, bb[2], bb[3]);
    }
  }
}

// The warpgroup's versions (WG kernels; tiles in the WgSw layout, 1024-byte aligned).
// S[64 x N] = X Y^T: X = the 64-row tile at `x` (A, K-major), Y = rows [0, N) of the tile
// at `y` (B, K-major); k-step kk at WgSw::kstep, 8-row groups 1024 bytes apart.
// `_issue`: the instructions only, inside the caller's wg_fence ... wg_commit, so several
// products can share one wait.
template <int D, int N, class E>
QT_DEV void wg_abt_issue(float (&s)[N / 8][4], uint32_t x, uint32_t y) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t step = WgSw<D>::kstep(kk);
    WgSs<N, E>::template ss<0>(s, wg_desc(x + step, 16, 1024), wg_desc(y + step, 16, 1024), kk);
  }
}
template <int D, int N, class E>
QT_DEV void wg_abt(float (&s)[N / 8][4], uint32_t x, uint32_t y) {
  wg_fence_operands(s);
  wg_fence();
  wg_abt_issue<D, N, E>(s, x, y);
  wg_commit();
  wg_wait<0>();
  wg_fence_operands(s);
}

// acc[64 x D] += P(64 x KR, packed pairs p[n-tile][row half]: the accumulator layout of
// S) * Y, Y = rows [0, KR) of the tile at `y` read MN-major: k-step kk is rows 16kk..
// (2048 bytes on), the next 64 columns one block (LBO) on, the next 8 rows 1024 (SBO).
template <int D, int KR, class E>
QT_DEV void wg_pb_issue(float (&acc)[D / 8][4], const uint32_t (&p)[KR / 8][2], uint32_t y) {
#pragma unroll
  for (int kk = 0; kk < KR / 16; ++kk) {
    const uint32_t a[4] = {p[2 * kk][0], p[2 * kk][1], p[2 * kk + 1][0], p[2 * kk + 1][1]};
    Wg<D, E>::template rs<1>(acc, a, wg_desc(y + kk * 2048, WgSw<D>::kBlock, 1024), 1);
  }
}
template <int D, int KR, class E>
QT_DEV void wg_pb(float (&acc)[D / 8][4], const uint32_t (&p)[KR / 8][2], uint32_t y) {
  wg_fence_operands(acc);
  wg_fence();
  wg_pb_issue<D, KR, E>(acc, p, y);
  wg_commit();
  wg_wait<0>();
  wg_fence_operands(acc);
}

// Writes a warp's 16 x D f32 accumulator (times `mul`) as 16-bit rows: staged through the
// warp's own 16 rows of the swizzled tile `stage` (generic pointer; nobody else reads those
// rows any more), then copied out 16 bytes per lane, rows < `valid` only.
template <int D, class E>
QT_DEV void store_rows(const float (&acc)[D / 8][4], float mul0, float mul1, char *stage,
                       int row0, uint16_t *dst, uint64_t ld, int valid, int lane) {
  const int g = lane >> 2, t = lane & 3;
  warp_sync();  // this warp's last ldmatrix reads of `stage` are behind us
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    *reinterpret_cast<uint32_t *>(stage + Sw<D>::off(row0 + g, nt) + 4 * t) =
        pack2<E>(acc[nt][0] * mul0, acc[nt][1] * mul0);
    *reinterpret_cast<uint32_t *>(stage + Sw<D>::off(row0 + g + 8, nt) + 4 * t) =
        pack2<E>(acc[nt][2] * mul1, acc[nt][3] * mul1);
  }
  warp_sync();
  constexpr int kCpr = D / 8;
#pragma unroll
  for (int idx = lane; idx < 16 * kCpr; idx += 32) {
    const int r = idx / kCpr, c = idx % kCpr;
    if (row0 + r < valid) {
      gst16(dst + static_cast<uint64_t>(row0 + r) * ld + c * 8,
            *reinterpret_cast<const uint4 *>(stage + Sw<D>::off(row0 + r, c)));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward. W warps of 16 query rows each: BQ = 16 W queries per CTA (W = 4 everywhere by
// default; W = 8 is a tuning variant at D = 128 where one K/V tile then feeds twice the
// queries, halving the L2 -> shared traffic, at one CTA per SM).
//
// WG (Hopper, sm_90a, D = 64 or 128): the two products run as wgmma instead of mma.sync,
// each warpgroup (4 warps, 64 query rows) issuing m64nNk16 with A from registers (Q, then
// P: the mma A layout per warp, so the softmax code is shared) and B = the K or V tile
// read by the tensor cores straight from shared memory (WgSw layout, no ldmatrix). The
// accumulators have the mma.sync layout too (element i of a warp's m64nN share = n-tile
// i / 4, entry i % 4). The dynamic shared memory is 1 KiB larger: the K/V tiles start on
// a 1024-byte boundary, as the swizzle needs.
//
// PIPE (WG only): the pipelined wgmma forward (FlashAttention-3's intra-warpgroup
// overlap). Each key tile's S = Q K^T goes out together with the previous tile's
// O += P V (O rescaled between the two issues), and the softmax of this tile runs while
// that product is in flight. The same operations on O in the same order as without PIPE
// (bit-identical results), three K/V stages instead of two (the tile whose V a product
// in flight reads stays put while the next one loads).
template <int D, int W = 4, bool WG = false, int ST = 2> struct FwdSmem {
  static constexpr int kTile = kBK * D * 2, kQBytes = 16 * W * D * 2;
  // With three stages and one warpgroup (its Q tile the size of a K tile), Q lives in
  // stage 2's K slot: it is read into registers before any tile loads there, and the
  // output is staged there after the last product. Two such CTAs fit an SM.
  static constexpr bool kQInStage = ST == 3 && kQBytes == kTile;
  static constexpr int kK = kQInStage ? 0 : kQBytes, kV = kK + ST * kTile, kSeg = kV + ST * kTile;
  static constexpr int kQ = kQInStage ? kK + 2 * kTile : 0;
  static constexpr int kBytes = kSeg + ST * kBK * 4 + (WG ? kWgPad : 0);
  static_assert(!WG || (kK % 1024 == 0 && kTile % 1024 == 0), "wgmma tiles on 1 KiB");
};

template <int D, int W, class E, bool WG = false, bool PIPE = false>
QT_DEV void fwd(const uint16_t *__restrict__ q, uint64_t ldq, const uint16_t *__restrict__ k,
                uint64_t ldk, const uint16_t *__restrict__ v, uint64_t ldv,
                const uint32_t *__restrict__ seg, uint16_t *__restrict__ o, uint64_t ldo,
                float *__restrict__ lse, int seq, int heads, int kv_heads, int window,
                float scale) {
  constexpr int ST = PIPE ? 3 : 2;  // K/V stages
  using L = FwdSmem<D, W, WG, ST>;
  using KvLay = typename Pick<WG, WgSw<D>, Sw<D>>::type;
  constexpr int NT = kBK / 8, BQ = 16 * W, THREADS = 32 * W;
  static_assert(!WG || W % 4 == 0, "wgmma needs whole warpgroups");
  static_assert(!PIPE || WG, "the pipelined forward is the wgmma one");
  // Q fragments stay in registers for small D; at D = 128 they would take 32 of the 255
  // registers and starve the ldmatrix -> mma pipelining, so they are re-read from shared
  // memory per key tile (8 extra ldmatrix per 64 of K and V), as FlashAttention-2 does.
  // wgmma takes A from registers (no ldmatrix of B to pipeline): Q stays there.
  constexpr bool kQRegs = D <= 64 || WG;
  const int h = blockIdx.x, qt = gridDim.y - 1 - blockIdx.y, b = blockIdx.z;
  const int kvh = h / (heads / kv_heads);
  const int q0 = qt * BQ;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int mi = lane >> 3, lr = lane & 7;
  const uint64_t tok0 = static_cast<uint64_t>(b) * seq;
  char *sm = smem_ptr();
  uint32_t sb = smem_addr(sm);
  if constexpr (WG) wg_align(sm, sb);  // tiles on 1 KiB (L::kBytes has the room)

  const int q_end = imin(q0 + BQ, seq);
  const uint32_t *sg = seg ? seg + tok0 : nullptr;
  const KeyTiles kts = key_tiles(sg, q0, q_end, seq, window);
  const int kt_lo = kts.lo, kt_hi = kts.hi;
  const uint16_t *kb = k + tok0 * ldk + static_cast<uint64_t>(kvh) * D;
  const uint16_t *vb = v + tok0 * ldv + static_cast<uint64_t>(kvh) * D;

  load_tile<D, BQ, THREADS>(sb + L::kQ, q + (tok0 + q0) * ldq + static_cast<uint64_t>(h) * D, ldq,
                            q_end - q0);
  cp_commit();
  auto load_kv = [&](int kt, int st) {
    const int j0 = kt * kBK, valid = imin(kBK, seq - j0);
    load_tile<D, kBK, THREADS, KvLay>(sb + L::kK + st * L::kTile,
                                      kb + static_cast<uint64_t>(j0) * ldk, ldk, valid);
    load_tile<D, kBK, THREADS, KvLay>(sb + L::kV + st * L::kTile,
                                      vb + static_cast<uint64_t>(j0) * ldv, ldv, valid);
    if (sg) load_words<kBK>(sb + L::kSeg + st * kBK * 4, sg + j0, valid);
    cp_commit();
  };
  load_kv(kt_hi, 0);
  cp_wait<1>();
  bar_sync();

  uint32_t qf[kQRegs ? D / 16 : 1][4];
  if constexpr (kQRegs) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      ldsm4(qf[kk], sb + L::kQ + Sw<D>::off(warp * 16 + lr + (mi & 1) * 8, 2 * kk + (mi >> 1)));
  }

  const int i0 = q0 + warp * 16 + g, i1 = i0 + 8;
  const uint32_t si0 = sg ? gld(sg + imin(i0, seq - 1)) : 0;
  const uint32_t si1 = sg ? gld(sg + imin(i1, seq - 1)) : 0;
  const float sl2 = scale * kLog2e;
  float acc[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  // Masks tile kt's scores (stage st) and runs the online softmax on them: the new
  // running max and sum, P (f32, in place of the scores); returns the factors by which O
  // must be rescaled before P V is added (running max m in raw score units, sum l a
  // thread partial).
  auto softmax = [&](float (&s)[NT][4], int kt, int st) {
    const int j0 = kt * kBK;
    const bool need = (j0 + kBK - 1 > q0) || (window && q0 + BQ - 1 - j0 >= window) ||
                      (j0 + kBK > seq) || sg;
    if (need) {
      const uint32_t *ss = reinterpret_cast<const uint32_t *>(sm + L::kSeg + st * kBK * 4);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = nt * 8 + 2 * t + (e & 1);
          // ss[] is stale when there are no segment ids; visible() then ignores it.
          if (!visible(e < 2 ? i0 : i1, j0 + c, seq, window, sg, e < 2 ? si0 : si1, ss[c]))
            s[nt][e] = -INFINITY;
        }
    }
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
    mx0 = fmaxf(mx0, shfl_xor(mx0, 1));
    mx0 = fmaxf(mx0, shfl_xor(mx0, 2));
    mx1 = fmaxf(mx1, shfl_xor(mx1, 1));
    mx1 = fmaxf(mx1, shfl_xor(mx1, 2));
    const float base0 = mx0 == -INFINITY ? 0.f : mx0 * sl2;
    const float base1 = mx1 == -INFINITY ? 0.f : mx1 * sl2;
    const float al0 = ex2(m0 * sl2 - base0), al1 = ex2(m1 * sl2 - base1);
    m0 = mx0;
    m1 = mx1;
    l0 *= al0;
    l1 *= al1;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const float p0 = ex2(fmaf(s[nt][0], sl2, -base0)), p1 = ex2(fmaf(s[nt][1], sl2, -base0));
      const float p2 = ex2(fmaf(s[nt][2], sl2, -base1)), p3 = ex2(fmaf(s[nt][3], sl2, -base1));
      l0 += p0 + p1;
      l1 += p2 + p3;
      s[nt][0] = p0;
      s[nt][1] = p1;
      s[nt][2] = p2;
      s[nt][3] = p3;
    }
    return float2{al0, al1};
  };
  // P rounded for the product (the A operand layout).
  auto pack_p = [&](const float (&s)[NT][4], uint32_t (&p)[NT][2]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      p[nt][0] = pack2<E>(s[nt][0], s[nt][1]);
      p[nt][1] = pack2<E>(s[nt][2], s[nt][3]);
    }
  };
  auto rescale = [&](float2 al) {
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      acc[nt][0] *= al.x;
      acc[nt][1] *= al.x;
      acc[nt][2] *= al.y;
      acc[nt][3] *= al.y;
    }
  };
  // S = Q K^T for the K tile at cK, Q from registers: k-step kk of every key row at
  // WgSw::kstep; 8-row groups 1024 bytes apart. `wg_qk_issue` goes inside the caller's
  // fence ... commit; `wg_qk` runs it alone and waits for it.
  auto wg_qk_issue = [&](float (&s)[NT][4], uint32_t cK) {
    if constexpr (WG) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        Wg<kBK, E>::template rs<0>(s, qf[kk], wg_desc(cK + WgSw<D>::kstep(kk), 16, 1024), kk);
    }
  };
  auto zero_s = [&](float (&s)[NT][4]) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
  };
  auto wg_qk = [&](float (&s)[NT][4], uint32_t cK) {
    wg_fence_operands(s);
    wg_fence();
    wg_qk_issue(s, cK);
    wg_commit();
    wg_wait<0>();
    wg_fence_operands(s);
  };
  // The K/V stages form a ring. `next_tile` waits until tile kt (stage st) has landed and
  // every thread sees it and is done with the next stage, then starts tile kt - 1 there.
  auto next_stage = [](int st) { return ST == 2 ? st ^ 1 : st == ST - 1 ? 0 : st + 1; };
  auto prev_stage = [](int st) { return ST == 2 ? st ^ 1 : st == 0 ? ST - 1 : st - 1; };
  auto next_tile = [&](int kt, int st) {
    cp_wait<0>();
    if constexpr (WG) fence_proxy_async();
    bar_sync();
    if (kt > kt_lo) load_kv(kt - 1, next_stage(st));
  };

  if constexpr (PIPE) {
    // Tile kt lives in stage st = (kt_hi - kt) % 3. Iteration kt issues S = Q K_kt^T, then
    // (O rescaled meanwhile) O += P V of tile kt + 1, and runs tile kt's softmax while that
    // product is in flight. The barrier at its top follows every thread's wait for the
    // product of tile kt + 2 (issued in iteration kt + 1), so tile kt - 1 may load into
    // that stage while tile kt + 1's V is being read. Each product has its own wgmma.fence,
    // and the first tile (no product before it) is peeled off the loop: ptxas serializes
    // the products unless every path through the loop body waits for them the same way.
    uint32_t pp[NT][2];  // P of tile kt + 1: the A operand of the product in flight
    float2 al;           // tile kt + 1's rescaling of O
    {
      next_tile(kt_hi, 0);
      float s[NT][4];
      zero_s(s);
      wg_qk(s, sb + L::kK);
      al = softmax(s, kt_hi, 0);
      pack_p(s, pp);
    }
    int st = 1;
    for (int kt = kt_hi - 1; kt >= kt_lo; --kt) {
      next_tile(kt, st);
      float s[NT][4];
      zero_s(s);
      wg_fence_operands(s);
      wg_fence();
      wg_qk_issue(s, sb + L::kK + st * L::kTile);
      wg_commit();
      rescale(al);
      wg_fence_operands(acc);
      wg_fence();
      wg_pb_issue<D, kBK, E>(acc, pp, sb + L::kV + prev_stage(st) * L::kTile);
      wg_commit();
      wg_wait<1>();  // S has landed; P V may still run
      wg_fence_operands(s);
      // P stays f32 in s until the product has landed: writing a wgmma's input
      // registers (pp) while one is in flight makes ptxas serialize them.
      al = softmax(s, kt, st);
      wg_wait<0>();
      wg_fence_operands(acc);
      wg_keep_operands(pp);  // the product read pp until here
      pack_p(s, pp);
      st = next_stage(st);
    }
    // The last tile's P V (tile kt_lo, in the stage before st).
    rescale(al);
    wg_pb<D, kBK, E>(acc, pp, sb + L::kV + prev_stage(st) * L::kTile);
  } else {
    for (int kt = kt_hi, st = 0; kt >= kt_lo; --kt, st = next_stage(st)) {
      next_tile(kt, st);
      const uint32_t cK = sb + L::kK + st * L::kTile, cV = sb + L::kV + st * L::kTile;

      float s[NT][4];
      zero_s(s);
      if constexpr (WG) {
        wg_qk(s, cK);
      } else if constexpr (kQRegs) {
        mm_abt_regs<D, NT, E>(s, qf, cK, lane);
      } else {
        mm_abt_smem<D, NT, E>(s, sb + L::kQ, warp * 16, cK, lane);
      }
      uint32_t p[NT][2];
      rescale(softmax(s, kt, st));
      pack_p(s, p);
      if constexpr (WG)
        wg_pb<D, kBK, E>(acc, p, cV);
      else
        mm_pb<D, kBK / 16, E>(acc, p, cV, lane);
    }
  }

  l0 += shfl_xor(l0, 1);
  l0 += shfl_xor(l0, 2);
  l1 += shfl_xor(l1, 1);
  l1 += shfl_xor(l1, 2);
  if (t == 0) {
    float *lrow = lse + (static_cast<uint64_t>(b) * heads + h) * seq;
    if (i0 < seq) gstf(lrow + i0, m0 * scale + logf(l0));
    if (i1 < seq) gstf(lrow + i1, m1 * scale + logf(l1));
  }
  // The diagonal is always visible, so l > 0 on every stored row.
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  store_rows<D, E>(acc, inv0, inv1, sm + L::kQ, warp * 16,
                   o + (tok0 + q0) * ldo + static_cast<uint64_t>(h) * D, ldo, q_end - q0, lane);
}

// ---------------------------------------------------------------------------------------
// Backward preprocessing: Dsum[b, h, i] = sum_d dO[i, h, d] * O[i, h, d] (stored O).
template <int D, class E>
QT_DEV void bwd_prep(const uint16_t *__restrict__ o, uint64_t ldo,
                     const uint16_t *__restrict__ dout, uint64_t lddo, float *__restrict__ dsum,
                     int seq, int heads, uint64_t rows) {
  constexpr int kTpr = D / 8;  // threads per (token, head) row, 8 elements each
  const uint64_t row =
      static_cast<uint64_t>(blockIdx.x) * (kThreads / kTpr) + threadIdx.x / kTpr;
  const int part = threadIdx.x % kTpr;
  float acc = 0.f;
  const bool ok = row < rows;
  const uint64_t tok = ok ? row / heads : 0;
  const int h = ok ? static_cast<int>(row % heads) : 0;
  if (ok) {
    const uint4 a = gld(reinterpret_cast<const uint4 *>(o + tok * ldo + h * D + part * 8));
    const uint4 c = gld(reinterpret_cast<const uint4 *>(dout + tok * lddo + h * D + part * 8));
    const uint32_t av[4] = {a.x, a.y, a.z, a.w}, cv[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = unpack2<E>(av[i]), y = unpack2<E>(cv[i]);
      acc = fmaf(x.x, y.x, acc);
      acc = fmaf(x.y, y.y, acc);
    }
  }
#pragma unroll
  for (int m = kTpr / 2; m > 0; m >>= 1) acc += shfl_xor(acc, m);
  if (ok && part == 0) {
    const uint64_t bb = tok / seq, i = tok % seq;
    gstf(dsum + (bb * heads + h) * seq + i, acc);
  }
}

// The stored-dS backward's blobs: one 64-key x 64-query dS^T tile (bf16) per (batch row,
// head of the launch's chunk, query tile qt, key tile kt <= qt), in that order, the causal
// pairs of a (batch row, head) packed as a triangle (qt (qt + 1) / 2 + kt). Mirrors
// AttnShape::ds_blobs_per_head.
struct DsBlob {
  static constexpr int kElems = kBK * kBQ;  // 16-bit elements (8 KiB)
  static QT_DEV uint64_t index(int b, int hrel, int hc, int qt, int kt, int seq) {
    const uint64_t tiles = static_cast<uint64_t>((seq + kBQ - 1) / kBQ);
    const uint64_t per_head = tiles * (tiles + 1) / 2;
    return (static_cast<uint64_t>(b) * hc + hrel) * per_head +
           static_cast<uint64_t>(qt) * (qt + 1) / 2 + kt;
  }
};

// ---------------------------------------------------------------------------------------
// Backward dK, dV: one CTA per (kv head, 64-key tile, batch row).
//
// WG (Hopper, sm_90a, D = 64 or 128): the four products as wgmma of the CTA's one
// warpgroup (64 keys = M): S^T = K Q^T and dP^T = V dO^T with both operands from shared
// memory (K, V as K-major A; Q, dO as K-major B), dV += P^T dO and dK += dS^T Q with A
// from registers (the mma A layout, as the forward's P) and B = dO, Q read MN-major. All
// four tiles use the WgSw layout; the whole 64-query step at once (N = 64), since no
// K/V fragments occupy registers. 1 KiB more shared memory, for the 1024-byte alignment.
//
// DS (WG only, D = 128; the `stored-ds` backward): the CTA also writes each step's dS^T
// (64 keys x 64 queries, bf16, 8 KiB) to `ds`, for bwd_dqds to read instead of recomputing
// S and dP: a blob per (batch row, head of the chunk, query tile, key tile <= query
// tile), laid out as shared memory that wgmma reads MN-major (DsBlob). The launch covers
// the kv heads kv0 .. kv0 + gridDim.x (a chunk: the blobs grow as seq^2, see
// AttnShape::bwd_scratch).
template <int D, bool WG = false> struct DkvSmem {
  static constexpr int kTile = kBQ * D * 2;  // kBQ == kBK
  static constexpr int kK = 0, kV = kTile, kQ = 2 * kTile, kO = 4 * kTile;
  static constexpr int kL = 6 * kTile, kDs = kL + 2 * kBQ * 4, kSq = kDs + 2 * kBQ * 4;
  static constexpr int kBytes = kSq + 2 * kBQ * 4 + (WG ? kWgPad : 0);
};

template <int D, class E, bool WG = false, bool DS = false>
QT_DEV void bwd_dkdv(const uint16_t *__restrict__ q, uint64_t ldq,
                     const uint16_t *__restrict__ k, uint64_t ldk,
                     const uint16_t *__restrict__ v, uint64_t ldv,
                     const uint16_t *__restrict__ dout, uint64_t lddo,
                     const float *__restrict__ lse, const float *__restrict__ dsum,
                     const uint32_t *__restrict__ seg, uint16_t *__restrict__ dk, uint64_t lddk,
                     uint16_t *__restrict__ dv, uint64_t lddv, int seq, int heads, int kv_heads,
                     int window, float scale, uint16_t *__restrict__ ds = nullptr,
                     int kv0 = 0) {
  static_assert(!DS || (WG && D == 128), "stored dS: the wgmma kernels at head dim 128");
  using L = DkvSmem<D, WG>;
  using Lay = typename Pick<WG, WgSw<D>, Sw<D>>::type;
  // Queries per inner step. dK and dV take 2 * D/2 accumulator registers; at D = 128 a
  // 64-query step's S^T and dP^T (64 more) would spill, so the tile is done in two halves
  // (the K/V A-fragments are re-read once more per half: ~11% more ldmatrix). wgmma
  // reads K and V from shared memory, so the whole step fits.
  constexpr int QH = D == 128 && !WG ? 32 : kBQ;
  constexpr int NT = QH / 8;
  const int kvh = kv0 + static_cast<int>(blockIdx.x), kt = blockIdx.y, b = blockIdx.z;
  const int group = heads / kv_heads;
  const int k0 = kt * kBK;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const uint64_t tok0 = static_cast<uint64_t>(b) * seq;
  char *sm = smem_ptr();
  uint32_t sb = smem_addr(sm);
  if constexpr (WG) wg_align(sm, sb);  // tiles on 1 KiB (L::kBytes has the room)
  const uint32_t *sg = seg ? seg + tok0 : nullptr;

  const int k_valid = imin(kBK, seq - k0);
  load_tile<D, kBK, kThreads, Lay>(
      sb + L::kK, k + (tok0 + k0) * ldk + static_cast<uint64_t>(kvh) * D, ldk, k_valid);
  load_tile<D, kBK, kThreads, Lay>(
      sb + L::kV, v + (tok0 + k0) * ldv + static_cast<uint64_t>(kvh) * D, ldv, k_valid);
  cp_commit();

  // Queries that can see this key tile: i >= k0 and i < (last key) + window.
  const int i_hi = window ? imin(seq - 1, k0 + kBK - 1 + window - 1) : seq - 1;
  const int qt_lo = k0 / kBQ;
  const int qt_hi = sg ? last_query_tile(sg, imin(k0 + kBK - 1, seq - 1), qt_lo, i_hi / kBQ)
                       : i_hi / kBQ;
  const int nq = qt_hi - qt_lo + 1;
  const int total = group * nq;
  auto load_q = [&](int it, int st) {
    const int h = kvh * group + it / nq, q0 = (qt_lo + it % nq) * kBQ;
    const int valid = imin(kBQ, seq - q0);
    load_tile<D, kBQ, kThreads, Lay>(sb + L::kQ + st * L::kTile,
                                     q + (tok0 + q0) * ldq + static_cast<uint64_t>(h) * D, ldq,
                                     valid);
    load_tile<D, kBQ, kThreads, Lay>(sb + L::kO + st * L::kTile,
                                     dout + (tok0 + q0) * lddo + static_cast<uint64_t>(h) * D,
                                     lddo, valid);
    const uint64_t srow = (static_cast<uint64_t>(b) * heads + h) * seq + q0;
    load_words<kBQ>(sb + L::kL + st * kBQ * 4, lse + srow, valid);
    load_words<kBQ>(sb + L::kDs + st * kBQ * 4, dsum + srow, valid);
    if (sg) load_words<kBQ>(sb + L::kSq + st * kBQ * 4, sg + q0, valid);
    cp_commit();
  };
  load_q(0, 0);

  const int j0r = k0 + warp * 16 + g, j1r = j0r + 8;
  const uint32_t sj0 = sg ? gld(sg + imin(j0r, seq - 1)) : 0;
  const uint32_t sj1 = sg ? gld(sg + imin(j1r, seq - 1)) : 0;
  const float sl2 = scale * kLog2e;
  float dK[D / 8][4], dV[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dK[nt][e] = dV[nt][e] = 0.f;

  for (int it = 0, st = 0; it < total; ++it, st ^= 1) {
    cp_wait<0>();
    if constexpr (WG) fence_proxy_async();
    bar_sync();
    if (it + 1 < total) load_q(it + 1, st ^ 1);
    const int q0 = (qt_lo + it % nq) * kBQ;
    const uint32_t cQ = sb + L::kQ + st * L::kTile, cO = sb + L::kO + st * L::kTile;
    const float *sL = reinterpret_cast<const float *>(sm + L::kL + st * kBQ * 4);
    const float *sD = reinterpret_cast<const float *>(sm + L::kDs + st * kBQ * 4);
    const uint32_t *sS = reinterpret_cast<const uint32_t *>(sm + L::kSq + st * kBQ * 4);

    const bool need = (k0 + kBK - 1 > q0) || (window && q0 + kBQ - 1 - k0 >= window) ||
                      (q0 + kBQ > seq) || sg;
#pragma unroll 1
    for (int hq = 0; hq < kBQ / QH; ++hq) {
      // This step's QH queries: rows [hq * QH, hq * QH + QH) of the Q and dO tiles.
      const uint32_t hQ = cQ + hq * QH * D * 2, hO = cO + hq * QH * D * 2;
      const int c0 = hq * QH;
      // P^T = exp(S^T * scale - lse), masked, rounded for the products.
      auto make_p = [&](const float (&sc)[NT][4], uint32_t (&pp)[NT][2]) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          float pe[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = c0 + nt * 8 + 2 * t + (e & 1);
            pe[e] = ex2(fmaf(sc[nt][e], sl2, -sL[c] * kLog2e));
          }
          if (need) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int c = c0 + nt * 8 + 2 * t + (e & 1);
              if (!visible(q0 + c, e < 2 ? j0r : j1r, seq, window, sg, sS[c], e < 2 ? sj0 : sj1))
                pe[e] = 0.f;
            }
          }
          pp[nt][0] = pack2<E>(pe[0], pe[1]);
          pp[nt][1] = pack2<E>(pe[2], pe[3]);
        }
      };
      // dS^T = P^T * (dP^T - Dsum), P^T as rounded for the products; `out` may be `pp`.
      auto make_ds = [&](const uint32_t (&pp)[NT][2], const float (&dpp)[NT][4],
                         uint32_t (&out)[NT][2]) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int c = c0 + nt * 8 + 2 * t;
          const float d0 = sD[c], d1 = sD[c + 1];
          const float2 pa = unpack2<E>(pp[nt][0]), pb = unpack2<E>(pp[nt][1]);
          out[nt][0] = pack2<E>(pa.x * (dpp[nt][0] - d0), pa.y * (dpp[nt][1] - d1));
          out[nt][1] = pack2<E>(pb.x * (dpp[nt][2] - d0), pb.y * (dpp[nt][3] - d1));
        }
      };
      float s[NT][4], dp[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
      uint32_t p[NT][2];
      if constexpr (WG) {
        // S^T = K Q^T, then P^T; dV += P^T dO and dP^T = V dO^T in one batch of wgmma
        // (one wait for both: three per query step instead of four); then dS^T and
        // dK += dS^T Q. Batching S^T with dP^T too would save another wait, but keeps
        // both accumulators live beside dK and dV: 144 bytes of spill at head dim 128.
        wg_abt<D, QH, E>(s, sb + L::kK, hQ);
        make_p(s, p);
        wg_fence_operands(dV);
        wg_fence_operands(dp);
        wg_fence();
        wg_pb_issue<D, QH, E>(dV, p, hO);
        wg_abt_issue<D, QH, E>(dp, sb + L::kV, hO);
        wg_commit();
        wg_wait<0>();
        wg_fence_operands(dV);
        wg_fence_operands(dp);
        make_ds(p, dp, p);
        if constexpr (DS) {
          // This warp's 16 keys of the step's dS^T into its blob: row = key, 128 bytes of
          // queries, chunk nt at nt ^ (row & 7) (row & 7 == g for both row halves).
          const int h = kvh * group + it / nq;
          char *blob = reinterpret_cast<char *>(
              ds + DsBlob::index(b, h - kv0 * group, static_cast<int>(gridDim.x) * group,
                                 q0 / kBQ, kt, seq) *
                       DsBlob::kElems);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const int r = warp * 16 + g;
            gst4(blob + r * 128 + ((nt ^ g) << 4) + 4 * t, p[nt][0]);
            gst4(blob + (r + 8) * 128 + ((nt ^ g) << 4) + 4 * t, p[nt][1]);
          }
        }
        wg_pb<D, QH, E>(dK, p, hQ);  // times scale at the end
      } else {
        // S^T = K Q^T (16 keys of this warp x QH queries), then P^T.
        mm_abt_smem<D, NT, E>(s, sb + L::kK, warp * 16, hQ, lane);
        make_p(s, p);
        // dV += P^T dO
        mm_pb<D, QH / 16, E>(dV, p, hO, lane);
        // dP^T = V dO^T, dS^T in place of P^T
        mm_abt_smem<D, NT, E>(dp, sb + L::kV, warp * 16, hO, lane);
        make_ds(p, dp, p);
        // dK += dS^T Q  (times scale at the end)
        mm_pb<D, QH / 16, E>(dK, p, hQ, lane);
      }
    }
  }

  // Each warp read only its own 16 rows of the K and V tiles: stage its results there.
  const int kv_valid = k_valid;
  store_rows<D, E>(dV, 1.f, 1.f, sm + L::kV, warp * 16,
                   dv + (tok0 + k0) * lddv + static_cast<uint64_t>(kvh) * D, lddv, kv_valid,
                   lane);
  store_rows<D, E>(dK, scale, scale, sm + L::kK, warp * 16,
                   dk + (tok0 + k0) * lddk + static_cast<uint64_t>(kvh) * D, lddk, kv_valid,
                   lane);
}

// ---------------------------------------------------------------------------------------
// Backward dQ: one CTA per (head, 64-query tile, batch row).
//
// WG (Hopper, sm_90a, D = 64 or 128): S = Q K^T and dP = dO V^T with both operands from
// shared memory, dQ += dS K with dS from registers and K read MN-major (as bwd_dkdv).
template <int D, bool WG = false> struct DqSmem {
  static constexpr int kTile = kBK * D * 2;
  static constexpr int kQ = 0, kO = kTile, kK = 2 * kTile, kV = 4 * kTile, kSeg = 6 * kTile;
  static constexpr int kBytes = kSeg + 2 * kBK * 4 + (WG ? kWgPad : 0);
};

template <int D, class E, bool WG = false>
QT_DEV void bwd_dq(const uint16_t *__restrict__ q, uint64_t ldq, const uint16_t *__restrict__ k,
                   uint64_t ldk, const uint16_t *__restrict__ v, uint64_t ldv,
                   const uint16_t *__restrict__ dout, uint64_t lddo,
                   const float *__restrict__ lse, const float *__restrict__ dsum,
                   const uint32_t *__restrict__ seg, uint16_t *__restrict__ dq, uint64_t lddq,
                   int seq, int heads, int kv_heads, int window, float scale) {
  using L = DqSmem<D, WG>;
  using Lay = typename Pick<WG, WgSw<D>, Sw<D>>::type;
  constexpr int NT = kBK / 8;
  constexpr bool kQRegs = D <= 64 && !WG;  // as in the forward; wgmma reads Q from smem
  const int h = blockIdx.x, qt = gridDim.y - 1 - blockIdx.y, b = blockIdx.z;
  const int kvh = h / (heads / kv_heads);
  const int q0 = qt * kBQ;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int mi = lane >> 3, lr = lane & 7;
  const uint64_t tok0 = static_cast<uint64_t>(b) * seq;
  char *sm = smem_ptr();
  uint32_t sb = smem_addr(sm);
  if constexpr (WG) wg_align(sm, sb);  // tiles on 1 KiB (L::kBytes has the room)

  const int q_end = imin(q0 + kBQ, seq);
  const uint32_t *sg = seg ? seg + tok0 : nullptr;
  const KeyTiles kts = key_tiles(sg, q0, q_end, seq, window);
  const int kt_lo = kts.lo, kt_hi = kts.hi;
  const uint16_t *kb = k + tok0 * ldk + static_cast<uint64_t>(kvh) * D;
  const uint16_t *vb = v + tok0 * ldv + static_cast<uint64_t>(kvh) * D;

  load_tile<D, kBQ, kThreads, Lay>(
      sb + L::kQ, q + (tok0 + q0) * ldq + static_cast<uint64_t>(h) * D, ldq, q_end - q0);
  load_tile<D, kBQ, kThreads, Lay>(
      sb + L::kO, dout + (tok0 + q0) * lddo + static_cast<uint64_t>(h) * D, lddo, q_end - q0);
  cp_commit();
  auto load_kv = [&](int kt, int st) {
    const int j0 = kt * kBK, valid = imin(kBK, seq - j0);
    load_tile<D, kBK, kThreads, Lay>(sb + L::kK + st * L::kTile,
                                     kb + static_cast<uint64_t>(j0) * ldk, ldk, valid);
    load_tile<D, kBK, kThreads, Lay>(sb + L::kV + st * L::kTile,
                                     vb + static_cast<uint64_t>(j0) * ldv, ldv, valid);
    if (sg) load_words<kBK>(sb + L::kSeg + st * kBK * 4, sg + j0, valid);
    cp_commit();
  };
  load_kv(kt_hi, 0);
  cp_wait<1>();
  bar_sync();

  uint32_t qf[kQRegs ? D / 16 : 1][4];
  if constexpr (kQRegs) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      ldsm4(qf[kk],
            sb + L::kQ + Sw<D>::off(warp * 16 + lr + (mi & 1) * 8, 2 * kk + (mi >> 1)));
  }

  const int i0 = q0 + warp * 16 + g, i1 = i0 + 8;
  const uint64_t srow = (static_cast<uint64_t>(b) * heads + h) * seq;
  const float ls0 = i0 < seq ? gld(lse + srow + i0) * kLog2e : 0.f;
  const float ls1 = i1 < seq ? gld(lse + srow + i1) * kLog2e : 0.f;
  const float ds0 = i0 < seq ? gld(dsum + srow + i0) : 0.f;
  const float ds1 = i1 < seq ? gld(dsum + srow + i1) : 0.f;
  const uint32_t si0 = sg ? gld(sg + imin(i0, seq - 1)) : 0;
  const uint32_t si1 = sg ? gld(sg + imin(i1, seq - 1)) : 0;
  const float sl2 = scale * kLog2e;
  float acc[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

  for (int kt = kt_hi, st = 0; kt >= kt_lo; --kt, st ^= 1) {
    cp_wait<0>();
    if constexpr (WG) fence_proxy_async();
    bar_sync();
    if (kt > kt_lo) load_kv(kt - 1, st ^ 1);
    const uint32_t cK = sb + L::kK + st * L::kTile, cV = sb + L::kV + st * L::kTile;
    const int j0 = kt * kBK;

    float s[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    if constexpr (WG)
      wg_abt<D, kBK, E>(s, sb + L::kQ, cK);
    else if constexpr (kQRegs)
      mm_abt_regs<D, NT, E>(s, qf, cK, lane);
    else
      mm_abt_smem<D, NT, E>(s, sb + L::kQ, warp * 16, cK, lane);
    const bool need = (j0 + kBK - 1 > q0) || (window && q0 + kBQ - 1 - j0 >= window) ||
                      (j0 + kBK > seq) || sg;
    const uint32_t *ss = reinterpret_cast<const uint32_t *>(sm + L::kSeg + st * kBK * 4);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = ex2(fmaf(s[nt][e], sl2, -(e < 2 ? ls0 : ls1)));
    if (need) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = nt * 8 + 2 * t + (e & 1);
          if (!visible(e < 2 ? i0 : i1, j0 + c, seq, window, sg, e < 2 ? si0 : si1, ss[c]))
            s[nt][e] = 0.f;
        }
    }
    float dp[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
    if constexpr (WG)
      wg_abt<D, kBK, E>(dp, sb + L::kO, cV);
    else
      mm_abt_smem<D, NT, E>(dp, sb + L::kO, warp * 16, cV, lane);
    uint32_t ds[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      ds[nt][0] = pack2<E>(s[nt][0] * (dp[nt][0] - ds0), s[nt][1] * (dp[nt][1] - ds0));
      ds[nt][1] = pack2<E>(s[nt][2] * (dp[nt][2] - ds1), s[nt][3] * (dp[nt][3] - ds1));
    }
    if constexpr (WG)
      wg_pb<D, kBK, E>(acc, ds, cK);
    else
      mm_pb<D, kBK / 16, E>(acc, ds, cK, lane);
  }
  store_rows<D, E>(acc, scale, scale, sm + L::kQ, warp * 16,
                   dq + (tok0 + q0) * lddq + static_cast<uint64_t>(h) * D, lddq, q_end - q0,
                   lane);
}

// ---------------------------------------------------------------------------------------
// Backward dQ from stored dS (the `stored-ds` backward, sm_90a, D = 128): one CTA (one
// warpgroup) per (head of the chunk, 64-query tile, batch row) sums dQ = dS K over the key
// tiles that see its queries, reading each tile's dS^T blob (written by bwd_dkdv<DS>)
// instead of recomputing S and dP: one product per tile pair where bwd_dq runs three.
// The blob is copied into shared memory byte for byte (it is already in the layout that
// wgmma reads as A, MN-major: queries contiguous), K into the WgSw layout read MN-major
// (as bwd_fusedwg's dQ product); 64 head-dim columns per product, two per k-step. Key
// tiles in ascending order, three stages in flight: the result is bit-reproducible.
template <int D> struct DqDsSmem {
  static constexpr int kTile = kBK * D * 2;
  static constexpr int kBlob = DsBlob::kElems * 2;
  static constexpr int kStage = kTile + kBlob;  // a multiple of 1 KiB: both stay aligned
  static constexpr int kStages = 3;
  static constexpr int kBytes = kStages * kStage + kWgPad;
};

template <int D, class E>
QT_DEV void bwd_dqds(const uint16_t *__restrict__ k, uint64_t ldk,
                     const uint16_t *__restrict__ ds, const uint32_t *__restrict__ seg,
                     uint16_t *__restrict__ dq, uint64_t lddq, int seq, int heads, int kv_heads,
                     int window, float scale, int h0) {
  static_assert(D == 128, "two 64-column products per k-step");
  using L = DqDsSmem<D>;
  using Lay = WgSw<D>;
  const int hrel = blockIdx.x, h = h0 + hrel, qt = gridDim.y - 1 - blockIdx.y, b = blockIdx.z;
  const int kvh = h / (heads / kv_heads);
  const int q0 = qt * kBQ;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint64_t tok0 = static_cast<uint64_t>(b) * seq;
  char *sm = smem_ptr();
  uint32_t sb = smem_addr(sm);
  wg_align(sm, sb);  // tiles on 1 KiB (L::kBytes has the room)

  // The key tiles that see this query tile (key_tiles): exactly those whose bwd_dkdv
  // query range, and so whose blob, includes it.
  const int q_end = imin(q0 + kBQ, seq);
  const uint32_t *sg = seg ? seg + tok0 : nullptr;
  const KeyTiles kts = key_tiles(sg, q0, q_end, seq, window);
  const int kt_lo = kts.lo, kt_hi = kts.hi;
  const int n = kt_hi - kt_lo + 1;
  const uint16_t *kb = k + tok0 * ldk + static_cast<uint64_t>(kvh) * D;
  const uint16_t *blobs =
      ds + DsBlob::index(b, hrel, static_cast<int>(gridDim.x), qt, 0, seq) * DsBlob::kElems;

  // Tile i (key tile kt_lo + i) into stage i % 3: K, then the blob as it is.
  auto load = [&](int i) {
    const uint32_t st = sb + (i % L::kStages) * L::kStage;
    const int j0 = (kt_lo + i) * kBK;
    load_tile<D, kBK, kThreads, Lay>(st, kb + static_cast<uint64_t>(j0) * ldk, ldk,
                                     imin(kBK, seq - j0));
    const uint16_t *src = blobs + static_cast<uint64_t>(kt_lo + i) * DsBlob::kElems;
#pragma unroll
    for (int c = static_cast<int>(threadIdx.x); c < L::kBlob / 16; c += kThreads)
      cp16(st + L::kTile + 16 * c, src + 8 * c, true);
  };
  load(0);
  cp_commit();
  if (n > 1) load(1);
  cp_commit();  // possibly empty: every iteration then waits for all but one group

  float acc[2][8][4];
#pragma unroll
  for (int c = 0; c < 2; ++c)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[c][nt][e] = 0.f;

  for (int i = 0; i < n; ++i) {
    cp_wait<1>();  // tile i landed (tile i + 1 may still be on its way)
    fence_proxy_async();
    bar_sync();  // every thread's copies of tile i are in; the product of i - 1 is done
    if (i + 2 < n) load(i + 2);  // into the stage that product read
    cp_commit();
    const uint32_t st = sb + (i % L::kStages) * L::kStage;
    wg_fence_operands(acc[0]);
    wg_fence_operands(acc[1]);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      // k-step kk = keys 16kk..16kk+15: rows 16kk.. of the blob (A: dS, queries = M
      // contiguous) and of K (B: head dim = N contiguous), 64 columns per product.
      const uint64_t a = wg_desc(st + L::kTile + kk * 2048, L::kBlob, 1024);
#pragma unroll
      for (int c = 0; c < 2; ++c)
        WgSs<64, E>::template ss<1, 1>(
            acc[c], a, wg_desc(st + c * Lay::kBlock + kk * 2048, Lay::kBlock, 1024), 1);
    }
    wg_commit();
    wg_wait<0>();
    wg_fence_operands(acc[0]);
    wg_fence_operands(acc[1]);
  }
  cp_wait<0>();  // the trailing empty groups
  bar_sync();    // no product reads stage 0 any more: it stages the result
  float out[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) out[nt][e] = acc[nt / 8][nt % 8][e];
  store_rows<D, E>(out, scale, scale, sm, warp * 16,
                   dq + (tok0 + q0) * lddq + static_cast<uint64_t>(h) * D, lddq, q_end - q0,
                   lane);
}

// ---------------------------------------------------------------------------------------
// Backward, fused: one pass over K/V. Each CTA takes one query head and one 64-key tile:
// its share of dK, dV as bwd_dkdv computes them and, per query step, its share of
// dQ = dS K from the same dS, added into an f32 accumulator in global memory: five
// products per (key tile, query tile) pair where bwd_dkdv + bwd_dq run seven (bwd_dq
// recomputes S and dP). Grid (heads, batch rows, key tiles): the columns (head, batch
// row) interleave in launch order and the long low key tiles start first. With GQA the
// heads of a group sum their dK, dV shares in head order at the end (see below), so each
// column is one head's, not one group's: four times the columns, a quarter of the turn
// lag below (a scheduling model of 132 SMs x 2 CTAs: the ordered backward at 1.02x /
// 1.05x / 1.01x its unhindered time at 4 x 2048 / 1 x 8192 / 1 x 32768, against 1.22x /
// 1.26x / 1.06x with a group per CTA).
//
// ORDERED (bit-reproducible): the key tiles add into a query step's accumulator one after
// the other in ascending order. A counter per (batch row, head, query step) holds kt + 1
// once key tile kt has added (zeroed before the launch): the first key tile that sees the
// step stores its share, each later one waits for its predecessor's count, adds, and hands
// on, and the last (the diagonal, kt == qt) writes dq = scale * sum in the storage type.
// A key tile only ever waits for a lower one, which launched earlier (lower blockIdx.z),
// so every wait ends (blocks launch in index order in practice, as FlashAttention-3's
// deterministic backward and CUTLASS's semaphores also assume; CUDA does not promise it,
// so a wait that never ends traps instead of hanging). Query tiles are walked from the
// last down, so the key tiles of one column reach each step in their order, one step
// apart.
// Otherwise (FlashAttention-2's way): red.global.add into a zeroed accumulator, whose sum
// order and hence rounding vary run to run; bwd_dq_store converts it afterwards.
//
// The key tiles that see a query tile are exactly those whose query range (bwd_dkdv's
// qt_lo..qt_hi) contains it, and they are contiguous: [bwd_dq's kt_lo, qt] (the window and
// segment bounds are the same inequalities read from either side).
template <int D> constexpr int kStepRows = D == 128 ? 32 : kBQ;  // bwd_dkdv's QH
template <int D> struct FusedSmem {
  static constexpr int kTile = kBQ * D * 2;
  static constexpr int kK = 0, kV = kTile, kQ = 2 * kTile, kO = 4 * kTile;
  static constexpr int kL = 6 * kTile, kDs = kL + 2 * kBQ * 4, kSq = kDs + 2 * kBQ * 4;
  // dS^T of one query step, [64 keys][QH queries]: the dQ product needs every key.
  static constexpr int kDst = kSq + 2 * kBQ * 4;
  static constexpr int kBytes = kDst + kBK * kStepRows<D> * 2;
};
template <int D, class E, bool ORDERED>
QT_DEV void bwd_fused(const uint16_t *__restrict__ q, uint64_t ldq,
                      const uint16_t *__restrict__ k, uint64_t ldk,
                      const uint16_t *__restrict__ v, uint64_t ldv,
                      const uint16_t *__restrict__ dout, uint64_t lddo,
                      const float *__restrict__ lse, const float *__restrict__ dsum,
                      const uint32_t *__restrict__ seg, uint16_t *__restrict__ dk,
                      uint64_t lddk, uint16_t *__restrict__ dv, uint64_t lddv,
                      float *__restrict__ dq_acc, uint32_t *__restrict__ turns,
                      uint16_t *__restrict__ dq, uint64_t lddq, float *__restrict__ dkv_acc,
                      uint32_t *__restrict__ kv_turns, int seq, int heads, int kv_heads,
                      int window, float scale) {
  using L = FusedSmem<D>;
  constexpr int QH = kStepRows<D>, NT = QH / 8;
  // The dQ product of a step (QH queries x D) over the 4 warps: RB row blocks of 16
  // queries, WPR warps per block, each taking DW of the D columns.
  constexpr int RB = QH / 16, WPR = 4 / RB, DW = D / WPR, NTD = DW / 8;
  static_assert(RB * WPR == 4 && NTD % 2 == 0, "dQ split over 4 warps");
  const int h = blockIdx.x, b = blockIdx.y, kt = blockIdx.z;
  const int group = heads / kv_heads, kvh = h / group;
  const int k0 = kt * kBK;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const uint64_t tok0 = static_cast<uint64_t>(b) * seq;
  const uint64_t hd = static_cast<uint64_t>(heads) * D;  // dq_acc row length
  // Turn counters per (batch row, head): every step of every query tile, including a
  // ragged last tile's steps past the end.
  const int steps = (seq + kBQ - 1) / kBQ * (kBQ / QH);
  char *sm = smem_ptr();
  const uint32_t sb = smem_addr(sm);
  const uint32_t *sg = seg ? seg + tok0 : nullptr;
  const int k_valid = imin(kBK, seq - k0);
  load_tile<D, kBK>(sb + L::kK, k + (tok0 + k0) * ldk + static_cast<uint64_t>(kvh) * D, ldk,
                    k_valid);
  load_tile<D, kBK>(sb + L::kV, v + (tok0 + k0) * ldv + static_cast<uint64_t>(kvh) * D, ldv,
                    k_valid);
  cp_commit();
  const int i_hi = window ? imin(seq - 1, k0 + kBK - 1 + window - 1) : seq - 1;
  const int qt_lo = k0 / kBQ;
  const int qt_hi = sg ? last_query_tile(sg, imin(k0 + kBK - 1, seq - 1), qt_lo, i_hi / kBQ)
                       : i_hi / kBQ;
  const int nq = qt_hi - qt_lo + 1;
  auto load_q = [&](int it, int st) {
    const int q0 = (qt_hi - it) * kBQ;
    const int valid = imin(kBQ, seq - q0);
    load_tile<D, kBQ>(sb + L::kQ + st * L::kTile,
                      q + (tok0 + q0) * ldq + static_cast<uint64_t>(h) * D, ldq, valid);
    load_tile<D, kBQ>(sb + L::kO + st * L::kTile,
                      dout + (tok0 + q0) * lddo + static_cast<uint64_t>(h) * D, lddo, valid);
    const uint64_t srow = (static_cast<uint64_t>(b) * heads + h) * seq + q0;
    load_words<kBQ>(sb + L::kL + st * kBQ * 4, lse + srow, valid);
    load_words<kBQ>(sb + L::kDs + st * kBQ * 4, dsum + srow, valid);
    if (sg) load_words<kBQ>(sb + L::kSq + st * kBQ * 4, sg + q0, valid);
    cp_commit();
  };
  load_q(0, 0);
  const int j0r = k0 + warp * 16 + g, j1r = j0r + 8;
  const uint32_t sj0 = sg ? gld(sg + imin(j0r, seq - 1)) : 0;
  const uint32_t sj1 = sg ? gld(sg + imin(j1r, seq - 1)) : 0;
  const float sl2 = scale * kLog2e;
  // This warp's block of each step's dQ share: queries rq.., columns n0..
  const int rq = 16 * (warp % RB), n0 = DW * (warp / RB);
  float dK[D / 8][4], dV[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dK[nt][e] = dV[nt][e] = 0.f;
  for (int it = 0, st = 0; it < nq; ++it, st ^= 1) {
    cp_wait<0>();
    bar_sync();
    if (it + 1 < nq) load_q(it + 1, st ^ 1);
    const int qt = qt_hi - it, q0 = qt * kBQ;
    const uint32_t cQ = sb + L::kQ + st * L::kTile, cO = sb + L::kO + st * L::kTile;
    const float *sL = reinterpret_cast<const float *>(sm + L::kL + st * kBQ * 4);
    const float *sD = reinterpret_cast<const float *>(sm + L::kDs + st * kBQ * 4);
    const uint32_t *sS = reinterpret_cast<const uint32_t *>(sm + L::kSq + st * kBQ * 4);
    const bool need = (k0 + kBK - 1 > q0) || (window && q0 + kBQ - 1 - k0 >= window) ||
                      (q0 + kBQ > seq) || sg;
    // Where this key tile stands among those adding into the query tile (ORDERED).
    bool first = true;
    const bool last = kt == qt;
    if constexpr (ORDERED) {
      const int j_lo = window ? imax(0, q0 - window + 1) : 0;
      const int kt_first = sg ? first_key_tile(sg, q0, j_lo / kBK, qt, seq) : j_lo / kBK;
      first = kt == kt_first;
    }
#pragma unroll 1
    for (int hq = 0; hq < kBQ / QH; ++hq) {
      const uint32_t hQ = cQ + hq * QH * D * 2, hO = cO + hq * QH * D * 2;
      const int c0 = hq * QH;
      // S^T, P^T, dV, dP^T, dS^T, dK exactly as bwd_dkdv.
      float s[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
      mm_abt_smem<D, NT, E>(s, sb + L::kK, warp * 16, hQ, lane);
      uint32_t p[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float pe[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = c0 + nt * 8 + 2 * t + (e & 1);
          pe[e] = ex2(fmaf(s[nt][e], sl2, -sL[c] * kLog2e));
        }
        if (need) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = c0 + nt * 8 + 2 * t + (e & 1);
            if (!visible(q0 + c, e < 2 ? j0r : j1r, seq, window, sg, sS[c], e < 2 ? sj0 : sj1))
              pe[e] = 0.f;
          }
        }
        p[nt][0] = pack2<E>(pe[0], pe[1]);
        p[nt][1] = pack2<E>(pe[2], pe[3]);
      }
      mm_pb<D, QH / 16, E>(dV, p, hO, lane);
      float dp[NT][4];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) dp[nt][0] = dp[nt][1] = dp[nt][2] = dp[nt][3] = 0.f;
      mm_abt_smem<D, NT, E>(dp, sb + L::kV, warp * 16, hO, lane);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int c = c0 + nt * 8 + 2 * t;
        const float d0 = sD[c], d1 = sD[c + 1];
        const float2 pa = unpack2<E>(p[nt][0]), pb = unpack2<E>(p[nt][1]);
        p[nt][0] = pack2<E>(pa.x * (dp[nt][0] - d0), pa.y * (dp[nt][1] - d1));
        p[nt][1] = pack2<E>(pb.x * (dp[nt][2] - d0), pb.y * (dp[nt][3] - d1));
      }
      mm_pb<D, QH / 16, E>(dK, p, hQ, lane);
      // dS^T rows of this warp (its 16 keys) into shared memory for the dQ product.
      char *dst = sm + L::kDst;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        *reinterpret_cast<uint32_t *>(dst + Sw<QH>::off(warp * 16 + g, nt) + 4 * t) = p[nt][0];
        *reinterpret_cast<uint32_t *>(dst + Sw<QH>::off(warp * 16 + g + 8, nt) + 4 * t) =
            p[nt][1];
      }
      bar_sync();  // all 64 keys' dS^T rows are in place
      // dQ share: dS (QH queries x 64 keys) K (64 keys x D), this warp's 16 x DW block.
      float acc[NTD][4];
#pragma unroll
      for (int nt = 0; nt < NTD; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
      mm_atb_smem<D, QH, NTD, E>(acc, sb + L::kDst, rq, sb + L::kK, n0, lane);
      bar_sync();  // everyone is done with dS^T (and, after the last step, with all of K)
      const int i0 = q0 + c0 + rq + g, i1 = i0 + 8;
      float *a0 = dq_acc + (tok0 + imin(i0, seq - 1)) * hd + static_cast<uint64_t>(h) * D + n0;
      float *a1 = dq_acc + (tok0 + imin(i1, seq - 1)) * hd + static_cast<uint64_t>(h) * D + n0;
      if constexpr (ORDERED) {
        uint32_t *turn = turns + (static_cast<uint64_t>(b) * heads + h) * steps + (q0 + c0) / QH;
        if (!first) {
          if (threadIdx.x == 0) wait_turn(turn, static_cast<uint32_t>(kt));
          bar_sync();
        }
        uint16_t *o0 = dq + (tok0 + imin(i0, seq - 1)) * lddq + static_cast<uint64_t>(h) * D + n0;
        uint16_t *o1 = dq + (tok0 + imin(i1, seq - 1)) * lddq + static_cast<uint64_t>(h) * D + n0;
#pragma unroll
        for (int nt = 0; nt < NTD; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            if ((r ? i1 : i0) >= seq) continue;
            const int col = nt * 8 + 2 * t;
            float *pa = (r ? a1 : a0) + col;
            float2 x{acc[nt][2 * r], acc[nt][2 * r + 1]};
            if (!first) {
              const float2 old = ldcg2(pa);
              x.x = old.x + x.x;
              x.y = old.y + x.y;
            }
            if (last)
              gst4((r ? o1 : o0) + col, pack2<E>(x.x * scale, x.y * scale));
            else
              stcg2(pa, x);
          }
        if (!last) {
          fence_gpu();  // this thread's adds are visible GPU-wide ...
          bar_sync();   // ... for every thread, before the turn passes on
          if (threadIdx.x == 0) give_turn(turn, static_cast<uint32_t>(kt + 1));
        }
      } else {
#pragma unroll
        for (int nt = 0; nt < NTD; ++nt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            if ((r ? i1 : i0) >= seq) continue;
            float *pa = (r ? a1 : a0) + nt * 8 + 2 * t;
            red_add(pa, acc[nt][2 * r]);
            red_add(pa + 1, acc[nt][2 * r + 1]);
          }
      }
    }
  }
  if (group == 1) {
    // Every warp read all of K (the dQ products; a barrier followed the last) but only
    // its own 16 rows of V: stage the results in those rows.
    store_rows<D, E>(dV, 1.f, 1.f, sm + L::kV, warp * 16,
                     dv + (tok0 + k0) * lddv + static_cast<uint64_t>(kvh) * D, lddv, k_valid,
                     lane);
    store_rows<D, E>(dK, scale, scale, sm + L::kK, warp * 16,
                     dk + (tok0 + k0) * lddk + static_cast<uint64_t>(kvh) * D, lddk, k_valid,
                     lane);
    return;
  }
  // The query heads of a group add their dK, dV into f32 rows [tokens][kv heads][dK | dV]
  // in head order (turn counter per batch row, kv head and key tile; the heads of a group
  // are neighbours in blockIdx.x, so the one waited for launched just before and has the
  // same work); the last writes dk = scale * sum and dv in the storage type.
  const int hg = h - kvh * group;  // this head's place in its group
  uint32_t *turn = kv_turns + (static_cast<uint64_t>(b) * kv_heads + kvh) * gridDim.z + kt;
  if (hg > 0) {
    if (threadIdx.x == 0) wait_turn(turn, static_cast<uint32_t>(hg));
    bar_sync();
  }
  const bool last_head = hg == group - 1;
  const int j0 = warp * 16 + g;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = j0 + 8 * r;
    if (j >= k_valid) continue;
    const uint64_t tok = tok0 + k0 + j;
    float *arow = dkv_acc + (tok * kv_heads + kvh) * (2 * D);
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      const int col = nt * 8 + 2 * t;
      float2 xk{dK[nt][2 * r], dK[nt][2 * r + 1]}, xv{dV[nt][2 * r], dV[nt][2 * r + 1]};
      if (hg > 0) {
        const float2 ok = ldcg2(arow + col), ov = ldcg2(arow + D + col);
        xk.x = ok.x + xk.x;
        xk.y = ok.y + xk.y;
        xv.x = ov.x + xv.x;
        xv.y = ov.y + xv.y;
      }
      if (last_head) {
        gst4(dk + tok * lddk + static_cast<uint64_t>(kvh) * D + col,
             pack2<E>(xk.x * scale, xk.y * scale));
        gst4(dv + tok * lddv + static_cast<uint64_t>(kvh) * D + col, pack2<E>(xv.x, xv.y));
      } else {
        stcg2(arow + col, xk);
        stcg2(arow + D + col, xv);
      }
    }
  }
  if (!last_head) {
    fence_gpu();
    bar_sync();
    if (threadIdx.x == 0) give_turn(turn, static_cast<uint32_t>(hg + 1));
  }
}
// dq = scale * dq_acc in the storage type (the unordered fused backward's last step);
// one (token, head) row per D/8 threads, 8 elements each.
template <int D, class E>
QT_DEV void bwd_dq_store(const float *__restrict__ acc, uint16_t *__restrict__ dq,
                         uint64_t lddq, int heads, uint64_t rows, float scale) {
  constexpr int kTpr = D / 8;
  const uint64_t row =
      static_cast<uint64_t>(blockIdx.x) * (kThreads / kTpr) + threadIdx.x / kTpr;
  const int part = threadIdx.x % kTpr;
  if (row >= rows) return;
  const uint64_t tok = row / heads;
  const int h = static_cast<int>(row % heads);
  const float *src = acc + row * D + part * 8;
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = pack2<E>(gld(src + 2 * i) * scale, gld(src + 2 * i + 1) * scale);
  gst16(dq + tok * lddq + static_cast<uint64_t>(h) * D + part * 8, uint4{w[0], w[1], w[2], w[3]});
}

// ---------------------------------------------------------------------------------------
// Fused backward for Hopper (sm_90a, D = 128; `fused-atomic` mode there): five products per
// (key tile, query tile) pair instead of the split kernels' seven, with dQ summed by the
// copy engine instead of by the warps (docs/perf.md v14; v8 measured what scalar atomics
// in the warps' loop cost).
//
// One CTA of two warpgroups per (kv head, 128-key tile, batch row); warpgroup w owns keys
// 64w..64w+63 of the tile and, as bwd_dkdv's WG path, accumulates their dK, dV in
// registers over every query head of the group and every 64-query tile that sees them:
// S^T = K_w Q^T, P^T; dV += P^T dO with dP^T = V_w dO^T; dS^T; dK += dS^T Q. Each
// warpgroup also stores its dS^T into shared memory ([128 keys][64 queries], the
// 128-byte swizzle), and after a barrier computes its half of the head-dim columns of
// this step's dQ share, dS (64 queries x 128 keys, A read MN-major) times K (128 keys x
// its 64 columns, read MN-major). The share goes to shared memory in register order
// (conflict-free 16-byte stores; the global accumulator tile uses the same order,
// bwd_dq_storewg undoes it) and one thread hands the 32 KiB to
// cp.reduce.async.bulk .add.f32 at the next step's barrier: the add leaves the warps'
// critical path. Two staging buffers, so a step writes one while the copy engine reads
// the other. The order of the adds of a dQ element varies run to run (as with atomics).
template <int D> struct FusedWgSmem {
  static constexpr int kTile = kBK * D * 2;  // one 64-row 16-bit tile
  // K and V: two 64-key tiles each (warpgroup w's keys in tile w); Q and dO: two stages.
  static constexpr int kK = 0, kV = 2 * kTile, kQ = 4 * kTile, kO = 6 * kTile;
  static constexpr int kDsHalf = kBK * kBQ * 2;  // dS^T of one warpgroup's 64 keys
  static constexpr int kDs = 8 * kTile;
  static constexpr int kAccBytes = kBQ * D * 4;  // one step's f32 dQ share
  static constexpr int kAcc = kDs + 2 * kDsHalf;
  static constexpr int kL = kAcc + 2 * kAccBytes, kDsum = kL + 2 * kBQ * 4;
  static constexpr int kSq = kDsum + 2 * kBQ * 4;
  static constexpr int kBytes = kSq + 2 * kBQ * 4 + kWgPad;
};

template <int D, class E>
QT_DEV void bwd_fusedwg(const uint16_t *__restrict__ q, uint64_t ldq,
                        const uint16_t *__restrict__ k, uint64_t ldk,
                        const uint16_t *__restrict__ v, uint64_t ldv,
                        const uint16_t *__restrict__ dout, uint64_t lddo,
                        const float *__restrict__ lse, const float *__restrict__ dsum,
                        const uint32_t *__restrict__ seg, uint16_t *__restrict__ dk,
                        uint64_t lddk, uint16_t *__restrict__ dv, uint64_t lddv,
                        float *__restrict__ dq_acc, int seq, int heads, int kv_heads,
                        int window, float scale) {
  static_assert(D == 128, "each warpgroup's dQ share is one 64-column block");
  using L = FusedWgSmem<D>;
  using Lay = WgSw<D>;
  constexpr int NT = kBQ / 8;
  constexpr int kT = 2 * kThreads;  // two warpgroups
  constexpr int kKeys = 2 * kBK;
  const int kvh = blockIdx.x, kt = blockIdx.y, b = blockIdx.z;
  const int group = heads / kv_heads;
  const int k0 = kt * kKeys;
  const int tid = static_cast<int>(threadIdx.x), wg = tid >> 7, wl = tid & 127;
  const int lane = tid & 31, warp = wl >> 5, g = lane >> 2, t = lane & 3;
  const uint64_t tok0 = static_cast<uint64_t>(b) * seq;
  const int qtiles = (seq + kBQ - 1) / kBQ;
  char *sm = smem_ptr();
  uint32_t sb = smem_addr(sm);
  wg_align(sm, sb);  // tiles on 1 KiB (L::kBytes has the room)
  const uint32_t *sg = seg ? seg + tok0 : nullptr;

#pragma unroll
  for (int w = 0; w < 2; ++w) {
    const int r0 = k0 + w * kBK, valid = imin(kBK, seq - r0);
    const uint64_t row = tok0 + (valid > 0 ? r0 : 0);
    load_tile<D, kBK, kT, Lay>(sb + L::kK + w * L::kTile,
                               k + row * ldk + static_cast<uint64_t>(kvh) * D, ldk, valid);
    load_tile<D, kBK, kT, Lay>(sb + L::kV + w * L::kTile,
                               v + row * ldv + static_cast<uint64_t>(kvh) * D, ldv, valid);
  }
  cp_commit();

  // Queries that can see this key tile (as bwd_dkdv, for 128 keys).
  const int i_hi = window ? imin(seq - 1, k0 + kKeys - 1 + window - 1) : seq - 1;
  const int qt_lo = k0 / kBQ;
  const int qt_hi = sg ? last_query_tile(sg, imin(k0 + kKeys - 1, seq - 1), qt_lo, i_hi / kBQ)
                       : i_hi / kBQ;
  const int nq = qt_hi - qt_lo + 1;
  const int total = group * nq;
  auto head_of = [&](int it) { return kvh * group + it / nq; };
  auto q0_of = [&](int it) { return (qt_lo + it % nq) * kBQ; };
  auto load_q = [&](int it, int st) {
    const int h = head_of(it), q0 = q0_of(it);
    const int valid = imin(kBQ, seq - q0);
    load_tile<D, kBQ, kT, Lay>(sb + L::kQ + st * L::kTile,
                               q + (tok0 + q0) * ldq + static_cast<uint64_t>(h) * D, ldq, valid);
    load_tile<D, kBQ, kT, Lay>(sb + L::kO + st * L::kTile,
                               dout + (tok0 + q0) * lddo + static_cast<uint64_t>(h) * D, lddo,
                               valid);
    const uint64_t srow = (static_cast<uint64_t>(b) * heads + h) * seq + q0;
    load_words<kBQ>(sb + L::kL + st * kBQ * 4, lse + srow, valid);
    load_words<kBQ>(sb + L::kDsum + st * kBQ * 4, dsum + srow, valid);
    if (sg) load_words<kBQ>(sb + L::kSq + st * kBQ * 4, sg + q0, valid);
    cp_commit();
  };
  // Step it's dQ share goes to its (batch row, head, query tile) tile of the accumulator.
  auto reduce_step = [&](int it) {
    const uint64_t tile =
        (static_cast<uint64_t>(b) * heads + head_of(it)) * qtiles + q0_of(it) / kBQ;
    bulk_add_f32(dq_acc + tile * (kBQ * D), sb + L::kAcc + (it & 1) * L::kAccBytes,
                 L::kAccBytes);
    bulk_commit();
  };
  load_q(0, 0);

  const int kw = k0 + wg * kBK;  // this warpgroup's first key
  const int j0r = kw + warp * 16 + g, j1r = j0r + 8;
  const uint32_t sj0 = sg ? gld(sg + imin(j0r, seq - 1)) : 0;
  const uint32_t sj1 = sg ? gld(sg + imin(j1r, seq - 1)) : 0;
  const float sl2 = scale * kLog2e;
  const uint32_t kTileW = sb + L::kK + wg * L::kTile, vTileW = sb + L::kV + wg * L::kTile;
  char *ds_w = sm + L::kDs + wg * L::kDsHalf;  // this warpgroup's dS^T rows
  float dK[D / 8][4], dV[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dK[nt][e] = dV[nt][e] = 0.f;

  for (int it = 0, st = 0; it < total; ++it, st ^= 1) {
    cp_wait<0>();
    fence_proxy_async();
    // Q/dO of this step landed; every product of the last step is done (so the other
    // stage, the dS^T tile and the last step's staged dQ share are complete).
    bar_sync();
    if (tid == 0) {
      if (it > 0) reduce_step(it - 1);
      // The share staged two steps ago (this step's buffer) has been read.
      bulk_wait_read<1>();
    }
    if (it + 1 < total) load_q(it + 1, st ^ 1);
    const int q0 = q0_of(it);
    const uint32_t cQ = sb + L::kQ + st * L::kTile, cO = sb + L::kO + st * L::kTile;
    const float *sL = reinterpret_cast<const float *>(sm + L::kL + st * kBQ * 4);
    const float *sD = reinterpret_cast<const float *>(sm + L::kDsum + st * kBQ * 4);
    const uint32_t *sS = reinterpret_cast<const uint32_t *>(sm + L::kSq + st * kBQ * 4);
    const bool need = (kw + kBK - 1 > q0) || (window && q0 + kBQ - 1 - kw >= window) ||
                      (q0 + kBQ > seq) || sg;

    float s[NT][4], dp[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    uint32_t p[NT][2];
    // S^T = K_w Q^T, then P^T = exp(S^T * scale - lse), masked, rounded for the products.
    wg_abt<D, kBQ, E>(s, kTileW, cQ);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      float pe[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = nt * 8 + 2 * t + (e & 1);
        pe[e] = ex2(fmaf(s[nt][e], sl2, -sL[c] * kLog2e));
        if (need &&
            !visible(q0 + c, e < 2 ? j0r : j1r, seq, window, sg, sS[c], e < 2 ? sj0 : sj1))
          pe[e] = 0.f;
      }
      p[nt][0] = pack2<E>(pe[0], pe[1]);
      p[nt][1] = pack2<E>(pe[2], pe[3]);
    }
    // dV += P^T dO and dP^T = V_w dO^T, one wait for both.
    wg_fence_operands(dV);
    wg_fence_operands(dp);
    wg_fence();
    wg_pb_issue<D, kBQ, E>(dV, p, cO);
    wg_abt_issue<D, kBQ, E>(dp, vTileW, cO);
    wg_commit();
    wg_wait<0>();
    wg_fence_operands(dV);
    wg_fence_operands(dp);
    // dS^T = P^T (dP^T - Dsum), in place of P^T; into shared memory for the dQ product:
    // row = key (this warp's 16), 128 bytes of queries, chunk nt swizzled by row & 7.
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int c = nt * 8 + 2 * t;
      const float d0 = sD[c], d1 = sD[c + 1];
      const float2 pa = unpack2<E>(p[nt][0]), pb = unpack2<E>(p[nt][1]);
      p[nt][0] = pack2<E>(pa.x * (dp[nt][0] - d0), pa.y * (dp[nt][1] - d1));
      p[nt][1] = pack2<E>(pb.x * (dp[nt][2] - d0), pb.y * (dp[nt][3] - d1));
      const int r = warp * 16 + g;  // r & 7 == g
      *reinterpret_cast<uint32_t *>(ds_w + r * 128 + ((nt ^ g) << 4) + 4 * t) = p[nt][0];
      *reinterpret_cast<uint32_t *>(ds_w + (r + 8) * 128 + ((nt ^ g) << 4) + 4 * t) = p[nt][1];
    }
    // dK += dS^T Q (times scale at the end), in flight across the barrier.
    wg_fence_operands(dK);
    wg_fence();
    wg_pb_issue<D, kBQ, E>(dK, p, cQ);
    wg_commit();
    fence_proxy_async();  // dS^T written by st.shared, read by wgmma
    bar_sync();           // both warpgroups' dS^T are in place
    // This warpgroup's 64 columns of dQ = dS K over all 128 keys: k-step kk = keys
    // 16kk..16kk+15, in warpgroup kk / 4's dS^T rows and K tile.
    float dq[D / 16][4];
#pragma unroll
    for (int nt = 0; nt < D / 16; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dq[nt][e] = 0.f;
    wg_fence_operands(dq);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      const uint32_t a = sb + L::kDs + (kk >> 2) * L::kDsHalf + (kk & 3) * 2048;
      const uint32_t bk = sb + L::kK + (kk >> 2) * L::kTile + wg * Lay::kBlock + (kk & 3) * 2048;
      WgSs<D / 2, E>::template ss<1, 1>(dq, wg_desc(a, L::kDsHalf, 1024),
                                        wg_desc(bk, Lay::kBlock, 1024), kk);
    }
    wg_commit();
    wg_wait<0>();  // dK and dQ
    wg_fence_operands(dK);
    wg_fence_operands(dq);
    // Stage the share in register order: float4 (wg * 8 + nt) * 128 + wl.
    float *stage = reinterpret_cast<float *>(sm + L::kAcc + st * L::kAccBytes);
#pragma unroll
    for (int nt = 0; nt < D / 16; ++nt)
      sts4f(stage + ((wg * (D / 16) + nt) * 128 + wl) * 4, dq[nt][0], dq[nt][1], dq[nt][2],
            dq[nt][3]);
    fence_proxy_async();  // read by the bulk reduction after the next barrier
  }
  bar_sync();  // the last share is staged; no warpgroup reads K any more
  if (tid == 0) {
    reduce_step(total - 1);
    bulk_wait<0>();
  }
  // Each warpgroup's warps stage their 16 rows in the warpgroup's own K / V tile.
  const int valid = imin(kBK, seq - kw);
  if (valid > 0) {
    store_rows<D, E>(dV, 1.f, 1.f, sm + L::kV + wg * L::kTile, warp * 16,
                     dv + (tok0 + kw) * lddv + static_cast<uint64_t>(kvh) * D, lddv, valid,
                     lane);
    store_rows<D, E>(dK, scale, scale, sm + L::kK + wg * L::kTile, warp * 16,
                     dk + (tok0 + kw) * lddk + static_cast<uint64_t>(kvh) * D, lddk, valid,
                     lane);
  }
}

// dq = scale * bwd_fusedwg's accumulator: tile (batch row, head, query tile) of 64 x D
// f32 in the kernel's register order, float4 f = (wg * 8 + nt) * 128 + thread: rows
// 16 warp + g and + 8, columns 64 wg + 8 nt + 2t, +1. One float4 per thread.
template <int D, class E>
QT_DEV void bwd_dq_storewg(const float *__restrict__ acc, uint16_t *__restrict__ dq,
                           uint64_t lddq, int seq, int heads, uint64_t tiles, float scale) {
  constexpr int kPer = kBQ * D / 4;  // float4s per tile
  const uint64_t idx = static_cast<uint64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const uint64_t tile = idx / kPer;
  if (tile >= tiles) return;
  const int f = static_cast<int>(idx % kPer);
  const int qtiles = (seq + kBQ - 1) / kBQ;
  const int qt = static_cast<int>(tile % qtiles);
  const uint64_t bh = tile / qtiles;
  const int h = static_cast<int>(bh % heads);
  const uint64_t b = bh / heads;
  const int wl = f & 127, wn = f >> 7, wg = wn / (D / 16), nt = wn % (D / 16);
  const int lane = wl & 31, warp = wl >> 5, g = lane >> 2, t = lane & 3;
  const int r0 = qt * kBQ + warp * 16 + g, col = wg * (D / 2) + nt * 8 + 2 * t;
  const float *src = acc + idx * 4;
  const float x0 = gld(src), x1 = gld(src + 1), x2 = gld(src + 2), x3 = gld(src + 3);
  uint16_t *dst = dq + static_cast<uint64_t>(h) * D + col;
  if (r0 < seq) gst4(dst + (b * seq + r0) * lddq, pack2<E>(x0 * scale, x1 * scale));
  if (r0 + 8 < seq) gst4(dst + (b * seq + r0 + 8) * lddq, pack2<E>(x2 * scale, x3 * scale));
}
#endif  // QT_ATTN_ON
}  // namespace qt_attn

// ---------------------------------------------------------------------------------------
// extern "C" entry points (argument order = crates/qtrain-device/src/launch/attention.rs).
// 16-bit tensors are passed as uint16_t*; `seg` may be null; `window` 0 means none.
#ifndef QT_EMU
#if QT_ATTN_ON
#define QT_BODY(...) __VA_ARGS__
#else
#define QT_BODY(...)
#endif

// The fused backward: `fused` hands the dQ sums on in key-tile order (bit-reproducible),
// `fusedu` adds with atomics (then attn_bwd_dq_store).
#define QT_ATTN_FUSED(DIM, E, S, NAME, ORDERED)                                             \
  extern "C" __global__ void __launch_bounds__(128) attn_bwd_##NAME##_d##DIM##_##S(          \
      const uint16_t *q, uint64_t ldq, const uint16_t *k, uint64_t ldk, const uint16_t *v,  \
      uint64_t ldv, const uint16_t *dout, uint64_t lddo, const float *lse,                  \
      const float *dsum, const uint32_t *seg, uint16_t *dk, uint64_t lddk, uint16_t *dv,    \
      uint64_t lddv, float *dq_acc, uint32_t *turns, uint16_t *dq, uint64_t lddq,           \
      float *dkv_acc, uint32_t *kv_turns, int seq, int heads, int kv_heads, int window,     \
      float scale) {                                                                        \
    QT_BODY(qt_attn::bwd_fused<DIM, qt_attn::E, ORDERED>(                                   \
        q, ldq, k, ldk, v, ldv, dout, lddo, lse, dsum, seg, dk, lddk, dv, lddv, dq_acc,     \
        turns, dq, lddq, dkv_acc, kv_turns, seq, heads, kv_heads, window, scale);)          \
  }
#define QT_ATTN_KERNELS(DIM, E, S)                                                          \
  extern "C" __global__ void __launch_bounds__(128)                                         \
      attn_fwd_d##DIM##_##S(const uint16_t *q, uint64_t ldq, const uint16_t *k,             \
                            uint64_t ldk, const uint16_t *v, uint64_t ldv,                  \
                            const uint32_t *seg, uint16_t *o, uint64_t ldo, float *lse,     \
                            int seq, int heads, int kv_heads, int window, float scale) {    \
    QT_BODY(qt_attn::fwd<DIM, 4, qt_attn::E>(q, ldq, k, ldk, v, ldv, seg, o, ldo, lse, seq,  \
                                             heads, kv_heads, window, scale);)              \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(128)                                         \
      attn_bwd_prep_d##DIM##_##S(const uint16_t *o, uint64_t ldo, const uint16_t *dout,     \
                                 uint64_t lddo, float *dsum, int seq, int heads,            \
                                 uint64_t rows) {                                           \
    QT_BODY(qt_attn::bwd_prep<DIM, qt_attn::E>(o, ldo, dout, lddo, dsum, seq, heads, rows);) \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(128) attn_bwd_dkdv_d##DIM##_##S(              \
      const uint16_t *q, uint64_t ldq, const uint16_t *k, uint64_t ldk, const uint16_t *v,  \
      uint64_t ldv, const uint16_t *dout, uint64_t lddo, const float *lse,                  \
      const float *dsum, const uint32_t *seg, uint16_t *dk, uint64_t lddk, uint16_t *dv,    \
      uint64_t lddv, int seq, int heads, int kv_heads, int window, float scale) {           \
    QT_BODY(qt_attn::bwd_dkdv<DIM, qt_attn::E>(q, ldq, k, ldk, v, ldv, dout, lddo, lse,      \
                                               dsum, seg, dk, lddk, dv, lddv, seq, heads,   \
                                               kv_heads, window, scale);)                   \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq_d##DIM##_##S(                \
      const uint16_t *q, uint64_t ldq, const uint16_t *k, uint64_t ldk, const uint16_t *v,  \
      uint64_t ldv, const uint16_t *dout, uint64_t lddo, const float *lse,                  \
      const float *dsum, const uint32_t *seg, uint16_t *dq, uint64_t lddq, int seq,         \
      int heads, int kv_heads, int window, float scale) {                                   \
    QT_BODY(qt_attn::bwd_dq<DIM, qt_attn::E>(q, ldq, k, ldk, v, ldv, dout, lddo, lse, dsum,  \
                                             seg, dq, lddq, seq, heads, kv_heads, window,   \
                                             scale);)                                       \
  }                                                                                         \
  QT_ATTN_FUSED(DIM, E, S, fused, true)                                                     \
  QT_ATTN_FUSED(DIM, E, S, fusedu, false)                                                   \
  extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq_store_d##DIM##_##S(          \
      const float *acc, uint16_t *dq, uint64_t lddq, int heads, uint64_t rows,              \
      float scale) {                                                                        \
    QT_BODY(qt_attn::bwd_dq_store<DIM, qt_attn::E>(acc, dq, lddq, heads, rows, scale);)      \
  }

#define QT_ATTN_DIMS(E, S)                                                                  \
  QT_ATTN_KERNELS(16, E, S)                                                                 \
  QT_ATTN_KERNELS(32, E, S) QT_ATTN_KERNELS(64, E, S) QT_ATTN_KERNELS(128, E, S)
#ifndef QTRAIN_SM90A_VARIANT
QT_ATTN_DIMS(Bf16, bf16)
QT_ATTN_DIMS(F16, f16)

// The 8-warp forward (tuning variant, see FwdSmem), head dim 128 only.
#define QT_ATTN_FWD8(E, S)                                                                  \
  extern "C" __global__ void __launch_bounds__(256)                                         \
      attn_fwd8_d128_##S(const uint16_t *q, uint64_t ldq, const uint16_t *k, uint64_t ldk,  \
                         const uint16_t *v, uint64_t ldv, const uint32_t *seg, uint16_t *o, \
                         uint64_t ldo, float *lse, int seq, int heads, int kv_heads,        \
                         int window, float scale) {                                         \
    QT_BODY(qt_attn::fwd<128, 8, qt_attn::E>(q, ldq, k, ldk, v, ldv, seg, o, ldo, lse, seq,  \
                                             heads, kv_heads, window, scale);)              \
  }
QT_ATTN_FWD8(Bf16, bf16)
QT_ATTN_FWD8(F16, f16)
#else
// The sm_90a build (attention_sm90a.ptx, loaded on compute capability 9.0 only): the
// wgmma forward, one (W = 4, 64 queries) or two (W = 8, 128 queries) warpgroups per CTA, and
// the pipelined ones (fwdwgp4, fwdwgp: head dim 128, see FwdSmem).
#define QT_ATTN_FWDWG(NAME, W, DIM, E, S, PIPE)                                             \
  extern "C" __global__ void __launch_bounds__(32 * W)                                      \
      attn_##NAME##_d##DIM##_##S(const uint16_t *q, uint64_t ldq, const uint16_t *k,        \
                                 uint64_t ldk, const uint16_t *v, uint64_t ldv,             \
                                 const uint32_t *seg, uint16_t *o, uint64_t ldo,            \
                                 float *lse, int seq, int heads, int kv_heads, int window,  \
                                 float scale) {                                             \
    QT_BODY(qt_attn::fwd<DIM, W, qt_attn::E, true, PIPE>(q, ldq, k, ldk, v, ldv, seg, o, ldo, \
                                                         lse, seq, heads, kv_heads, window, \
                                                         scale);)                           \
  }
// and the wgmma dK/dV and dQ kernels of the split backward.
#define QT_ATTN_DKDVWG(DIM, E, S)                                                           \
  extern "C" __global__ void __launch_bounds__(128) attn_bwd_dkdvwg_d##DIM##_##S(            \
      const uint16_t *q, uint64_t ldq, const uint16_t *k, uint64_t ldk, const uint16_t *v,  \
      uint64_t ldv, const uint16_t *dout, uint64_t lddo, const float *lse,                  \
      const float *dsum, const uint32_t *seg, uint16_t *dk, uint64_t lddk, uint16_t *dv,    \
      uint64_t lddv, int seq, int heads, int kv_heads, int window, float scale) {           \
    QT_BODY(qt_attn::bwd_dkdv<DIM, qt_attn::E, true>(q, ldq, k, ldk, v, ldv, dout, lddo,     \
                                                     lse, dsum, seg, dk, lddk, dv, lddv,    \
                                                     seq, heads, kv_heads, window, scale);) \
  }
#define QT_ATTN_DQWG(DIM, E, S)                                                             \
  extern "C" __global__ void __launch_bounds__(128) attn_bwd_dqwg_d##DIM##_##S(              \
      const uint16_t *q, uint64_t ldq, const uint16_t *k, uint64_t ldk, const uint16_t *v,  \
      uint64_t ldv, const uint16_t *dout, uint64_t lddo, const float *lse,                  \
      const float *dsum, const uint32_t *seg, uint16_t *dq, uint64_t lddq, int seq,         \
      int heads, int kv_heads, int window, float scale) {                                   \
    QT_BODY(qt_attn::bwd_dq<DIM, qt_attn::E, true>(q, ldq, k, ldk, v, ldv, dout, lddo, lse,  \
                                                   dsum, seg, dq, lddq, seq, heads,         \
                                                   kv_heads, window, scale);)               \
  }
// and the fused backward's (fused-atomic mode) kernel and its dQ conversion.
#define QT_ATTN_FUSEDWG(DIM, E, S)                                                          \
  extern "C" __global__ void __launch_bounds__(256, 1) attn_bwd_fusedwg_d##DIM##_##S(        \
      const uint16_t *q, uint64_t ldq, const uint16_t *k, uint64_t ldk, const uint16_t *v,  \
      uint64_t ldv, const uint16_t *dout, uint64_t lddo, const float *lse,                  \
      const float *dsum, const uint32_t *seg, uint16_t *dk, uint64_t lddk, uint16_t *dv,    \
      uint64_t lddv, float *dq_acc, int seq, int heads, int kv_heads, int window,           \
      float scale) {                                                                        \
    QT_BODY(qt_attn::bwd_fusedwg<DIM, qt_attn::E>(q, ldq, k, ldk, v, ldv, dout, lddo, lse,   \
                                                  dsum, seg, dk, lddk, dv, lddv, dq_acc,    \
                                                  seq, heads, kv_heads, window, scale);)    \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(128) attn_bwd_dq_storewg_d##DIM##_##S(        \
      const float *acc, uint16_t *dq, uint64_t lddq, int seq, int heads, uint64_t tiles,    \
      float scale) {                                                                        \
    QT_BODY(qt_attn::bwd_dq_storewg<DIM, qt_attn::E>(acc, dq, lddq, seq, heads, tiles,       \
                                                     scale);)                               \
  }
// and the stored-dS backward's two kernels (head dim 128).
#define QT_ATTN_DSWG(DIM, E, S)                                                             \
  extern "C" __global__ void __launch_bounds__(128) attn_bwd_dkdvds_d##DIM##_##S(            \
      const uint16_t *q, uint64_t ldq, const uint16_t *k, uint64_t ldk, const uint16_t *v,  \
      uint64_t ldv, const uint16_t *dout, uint64_t lddo, const float *lse,                  \
      const float *dsum, const uint32_t *seg, uint16_t *dk, uint64_t lddk, uint16_t *dv,    \
      uint64_t lddv, int seq, int heads, int kv_heads, int window, float scale,             \
      uint16_t *ds, int kv0) {                                                              \
    QT_BODY(qt_attn::bwd_dkdv<DIM, qt_attn::E, true, true>(                                 \
        q, ldq, k, ldk, v, ldv, dout, lddo, lse, dsum, seg, dk, lddk, dv, lddv, seq, heads, \
        kv_heads, window, scale, ds, kv0);)                                                 \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(128) attn_bwd_dqds_d##DIM##_##S(              \
      const uint16_t *k, uint64_t ldk, const uint16_t *ds, const uint32_t *seg,             \
      uint16_t *dq, uint64_t lddq, int seq, int heads, int kv_heads, int window,            \
      float scale, int h0) {                                                                \
    QT_BODY(qt_attn::bwd_dqds<DIM, qt_attn::E>(k, ldk, ds, seg, dq, lddq, seq, heads,        \
                                               kv_heads, window, scale, h0);)               \
  }
#define QT_ATTN_FWDWG_ALL(E, S)                                                             \
  QT_ATTN_FWDWG(fwdwg, 4, 64, E, S, false)                                                  \
  QT_ATTN_FWDWG(fwdwg, 4, 128, E, S, false)                                                 \
  QT_ATTN_FWDWG(fwdwg8, 8, 64, E, S, false) QT_ATTN_FWDWG(fwdwg8, 8, 128, E, S, false)      \
  QT_ATTN_FWDWG(fwdwgp, 8, 128, E, S, true) QT_ATTN_FWDWG(fwdwgp4, 4, 128, E, S, true)       \
  QT_ATTN_DKDVWG(64, E, S) QT_ATTN_DKDVWG(128, E, S)                                        \
  QT_ATTN_DQWG(64, E, S) QT_ATTN_DQWG(128, E, S) QT_ATTN_FUSEDWG(128, E, S)               \
  QT_ATTN_DSWG(128, E, S)
QT_ATTN_FWDWG_ALL(Bf16, bf16)
QT_ATTN_FWDWG_ALL(F16, f16)
#endif  // QTRAIN_SM90A_VARIANT
#endif  // !QT_EMU
