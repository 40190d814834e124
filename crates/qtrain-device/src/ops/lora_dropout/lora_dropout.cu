// The LoRA A-side products with the dropout mask generated on the fly (the mask of
// rows.cu's `dropout`, drawn through common.cuh's helpers: element (row, col) of an
// [n, h] input is element (row0 + row) * h + col of the mask with hash base `base`):
//
//   lora_a_fwd_dropout   z[n, r]    = D(x) Aᵀ                  x [n, h], A [r, h]
//   lora_a_grad_dropout  gA[r, h]  += dzᵀ D(x)                 dz [n, r], gA f32
//   lora_dx_dropout      dx[n, h]  += (dz A) ∘ mask             in place, one pass
//
// D(x) = round_T(x * mask), the dropped input exactly as the `dropout` kernel stores
// it (it is a 16-bit operand of a tensor-core product here). Products accumulate in
// f32 and are rounded once at the store; dx's increment is added in f32 and rounded
// once (no T-rounded intermediate as in the unfused gemm + dropout + add). Nothing is
// materialized: each kernel reads x (or reads and writes dx) once. CPU references and
// semantics: crates/qtrain-device/src/ops/lora_dropout/mod.rs.
//
// Two implementations of each, with one launch geometry (the launcher does not know
// which one the PTX holds):
// - 16-bit types on compute capability 8.0+: warp-level tensor-core MMAs
//   (mma.sync m16n8k16, f32 accumulators) on fragments built in registers straight
//   from 16-byte (8-byte in the gradient) global loads, the mask applied to each
//   element between the load and the packing. The order of the K index inside an MMA
//   is free as long as both operands agree, and the order of the N index is free as
//   long as the output mapping agrees; both are chosen so that each lane loads
//   contiguous elements (see each kernel). A (r x h, tiny) is read from L1/L2.
// - f32, and 16-bit types below 8.0 (T4/V100 fp16): plain f32 FMAs over tiles staged
//   in shared memory.
// All reductions are in a fixed order (no atomics): results are repeatable bit for
// bit, which the doctor's offload/kept-activation checks rely on.
//
// Cost: every four elements hash one splitmix64 (two 64-bit multiplies, ~30 integer
// instruction slots on sm_90). With one hash per element (the first version of the
// mask) the kernels were bound by the hash, at 220-450 G elements/s on an H200; the
// MMAs take the rank's r FMAs per element off the FMA pipe.
//
// Geometry (RP: the rank r <= RP, rounded up to 16, 32 or 64; padded ranks are zero):
// - fwd:  grid ceil(n/32), 256 threads. A block owns 32 rows of x; its 8 warps take
//         interleaved 32-column chunks of them; the warps' partial z are summed in
//         warp order through shared memory and the last warp stores z.
// - grad: grid ceil(h/32), grad_threads(RP) threads (512 at rank 16, else 256; the
//         FMA path works with the first 256). A block owns 32 columns of gA over all n
//         tokens; its warps take interleaved 32-token steps; partials are summed in
//         warp order and the last warp adds them into gA (one writer per element).
// - dx:   grid (ceil(h/64), ceil(n/512)), 128 threads. A block owns 64 columns x 512
//         tokens of dx; each warp loads its B fragments (A's 64 columns) once and
//         runs over every 4th 16-token tile; each lane owns 16 contiguous columns of
//         two rows, read, updated and written once.
#include "common.cuh"
#include <type_traits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define QT_LORA_MMA 1
#else
#define QT_LORA_MMA 0
#endif

constexpr int FWD_ROWS = 32, FWD_THREADS = 256;
constexpr int GRAD_COLS = 32, GRAD_FMA_THREADS = 256;
// The gradient's block: one block per 32 columns is only h / 32 blocks (128 for a
// 4096-wide input, fewer than an H100's SMs), so at rank 16 a block runs 16 warps to
// keep the SM busy; larger ranks hold more accumulators per lane and keep 8.
__host__ __device__ constexpr int grad_threads(int rp) { return rp == 16 ? 512 : 256; }
constexpr int DX_COLS = 64, DX_TOKENS = 512, DX_THREADS = 128;

// The mask and its scale, as the launchers pass them.
struct Mask {
  uint64_t base;      // hash base of the mask
  uint64_t row0;      // the first row's index in the mask's row space
  uint64_t cols;      // the mask's row length (x's and dx's columns)
  uint32_t threshold; // ceil(p * 2^16)
  float keep;         // 1/(1-p)
  // Mask index of (row, 0): the row's columns follow it.
  __device__ __forceinline__ uint64_t row_start(uint64_t row) const { return (row0 + row) * cols; }
};

// `v` of element (row, col) after dropout, rounded to T (`row_start`: Mask::row_start(row)).
template <typename T>
__device__ __forceinline__ float dropped(float v, const Mask &m, uint64_t row_start, uint64_t col) {
  return round_to<T>(dropout_apply(v, m.base, row_start + col, m.threshold, m.keep));
}

// v[0..N) = elements col .. col + N - 1 of a row after dropout, in f32 (the MMA paths
// round them to T when they pack them).
template <int N>
__device__ __forceinline__ void drop_run(float (&v)[N], const Mask &m, uint64_t row_start,
                                         uint64_t col) {
  dropout_kept_run<N>(m.base, row_start + col, m.threshold,
                      [&](int j, bool kept) { v[j] = kept ? v[j] * m.keep : 0.0f; });
}

// d[0..8) (dx's elements col .. col + 7 of a row) += inc * keep where the mask keeps
// them, in f32 (no fused multiply-add: the reference rounds the product first).
__device__ __forceinline__ void dx_add_run(float (&d)[8], const float *inc, const Mask &m,
                                           uint64_t row_start, uint64_t col) {
  dropout_kept_run<8>(m.base, row_start + col, m.threshold, [&](int j, bool kept) {
    if (kept) d[j] = d[j] + __fmul_rn(inc[j], m.keep);
  });
}

// Elements c..c+7 of a row of `cols` (zeros past the end, or for a row that does not
// exist); `vec`: the row can be read 8 at a time (vec8_ok), so c < cols means all 8 exist.
template <typename T>
__device__ __forceinline__ void load8_or_zero(const T *row, uint32_t c, uint32_t cols, bool ok,
                                              uint32_t vec, float v[8]) {
  if (ok && vec && c < cols) {
    load8(row + c, v);
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = (ok && c + j < cols) ? to_f(row[c + j]) : 0.0f;
}

// One element or zero.
template <typename T>
__device__ __forceinline__ float load_or_zero(const T *p, bool ok) {
  return ok ? to_f(*p) : 0.0f;
}

#if QT_LORA_MMA
// Two values rounded to T in one 32-bit register (the lower index in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t *>(&v);
}

// c += a b for one m16n8k16 tile: a row-major 16x16 (4 registers), b 16x8 column-major
// (2 registers), c 16x8 f32 (4 registers). Fragment layout (g = lane / 4, t = lane % 4):
// a: {a0,a1} (row g, k 2t..2t+1), {a2,a3} (row g+8, k 2t..), {a4,a5} (row g, k 2t+8..),
// {a6,a7} (row g+8, k 2t+8..); b: {b0,b1} (k 2t..2t+1, col g), {b2,b3} (k 2t+8.., col g);
// c: c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, cols 2t, 2t+1).
template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4],
                                                        const uint32_t b[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Elements c..c+3 of a row (16-bit types; `vec` as in load8_or_zero, so c is a
// multiple of 4 and the 8-byte load is aligned).
template <typename T>
__device__ __forceinline__ void load4_or_zero(const T *row, uint32_t c, uint32_t cols, bool ok,
                                              uint32_t vec, float v[4]) {
  if (ok && vec && c < cols) {
    const uint2 raw = *reinterpret_cast<const uint2 *>(row + c);
    const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = to_f<T>(e[j]);
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) v[j] = (ok && c + j < cols) ? to_f(row[c + j]) : 0.0f;
}

// The bits of a 16-bit element, or 0 (the bits of +0.0).
template <typename T> __device__ __forceinline__ uint32_t raw16(const T *p, bool ok) {
  return ok ? (uint32_t)*reinterpret_cast<const unsigned short *>(p) : 0u;
}

// A register of two 16-bit elements' bits (`lo` in the low half).
__device__ __forceinline__ uint32_t pair16(uint32_t lo, uint32_t hi) { return lo | (hi << 16); }

// Elements c..c+7 of a row of a 16-bit matrix as four registers of pairs, unconverted
// (zeros past the end; `vec` as in load8_or_zero).
template <typename T>
__device__ __forceinline__ void load8_pairs(const T *row, uint32_t c, uint32_t cols, bool ok,
                                            uint32_t vec, uint32_t p[4]) {
  if (ok && vec && c < cols) {
    const uint4 raw = *reinterpret_cast<const uint4 *>(row + c);
    p[0] = raw.x;
    p[1] = raw.y;
    p[2] = raw.z;
    p[3] = raw.w;
    return;
  }
#pragma unroll
  for (int q = 0; q < 4; ++q)
    p[q] = pair16(raw16(row + c + 2 * q, ok && c + 2 * q < cols),
                  raw16(row + c + 2 * q + 1, ok && c + 2 * q + 1 < cols));
}
#endif

// Sums `acc` (ACC floats per lane, the same fragment layout in every warp) over the
// block's warps in warp order through `red` (ACC * 32 floats); the last warp ends
// with the sum in `acc`. Every thread of the block must call it.
template <int ACC>
__device__ __forceinline__ void sum_over_warps(float (&acc)[ACC], float *red) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int w = 0; w < warps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int i = 0; i < ACC; ++i) {
        const float v = w == 0 ? acc[i] : red[i * 32 + lane] + acc[i];
        if (w + 1 < warps) {
          red[i * 32 + lane] = v;
        } else {
          acc[i] = v;
        }
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------
// z = D(x) Aᵀ
// ---------------------------------------------------------------------------------

#if QT_LORA_MMA
// MMA (M = rows, N = rank, K = columns). Per 32-column chunk a lane loads columns
// c + 8t .. c + 8t + 7 of rows g, g+8 (of both 16-row tiles) and of A's rows 8j + g;
// K step s (0, 1) of the chunk uses the lane's pairs 2s and 2s+1 as its logical k
// 2t..2t+1 and 2t+8..2t+9 (physical columns 8t + 4s + 0..3), in both operands.
template <typename T, int RP>
__device__ void fwd_mma(const T *__restrict__ x, uint64_t ldx, const T *__restrict__ a, uint64_t lda,
                        T *__restrict__ z, uint64_t ldz, uint32_t n, uint32_t h, uint32_t r,
                        uint32_t vec, Mask m) {
  constexpr int NT = RP / 8;
  __shared__ float red[2 * NT * 4 * 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const uint32_t rb = blockIdx.x * FWD_ROWS;
  float acc[2 * NT * 4];
#pragma unroll
  for (int i = 0; i < 2 * NT * 4; ++i) acc[i] = 0.0f;
  // The lane's rows: rb + 16 mt + g + 8 hh, as [mt][hh].
  const T *xrow[2][2];
  uint64_t mrow[2][2];
  bool rok[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const uint32_t row = rb + 16 * mt + g + 8 * hh;
      rok[mt][hh] = row < n;
      xrow[mt][hh] = x + (uint64_t)(rok[mt][hh] ? row : 0) * ldx;
      mrow[mt][hh] = m.row_start(row);
    }
  for (uint32_t c0 = warp * 32; c0 < h; c0 += (FWD_THREADS / 32) * 32) {
    const uint32_t c = c0 + 8 * t;
    uint32_t pa[2][2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float v[8];
        load8_or_zero(xrow[mt][hh], c, h, rok[mt][hh], vec, v);
        drop_run(v, m, mrow[mt][hh], c);
#pragma unroll
        for (int q = 0; q < 4; ++q) pa[mt][hh][q] = pack2<T>(v[2 * q], v[2 * q + 1]);
      }
    uint32_t pb[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const uint32_t k = 8 * nt + g;
      load8_pairs(a + (uint64_t)(k < r ? k : 0) * lda, c, h, k < r, vec, pb[nt]);
    }
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const uint32_t fa[4] = {pa[mt][0][2 * s], pa[mt][1][2 * s], pa[mt][0][2 * s + 1],
                                pa[mt][1][2 * s + 1]};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const uint32_t fb[2] = {pb[nt][2 * s], pb[nt][2 * s + 1]};
          mma16816<T>(&acc[(mt * NT + nt) * 4], fa, fb);
        }
      }
  }
  sum_over_warps(acc, red);
  if (warp != FWD_THREADS / 32 - 1) return;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t row = rb + 16 * mt + g + 8 * (e >> 1), k = 8 * nt + 2 * t + (e & 1);
        if (row < n && k < r) z[(uint64_t)row * ldz + k] = from_f<T>(acc[(mt * NT + nt) * 4 + e]);
      }
}
#endif

// FMA: per 32-column chunk the block stages D(x) [32 rows x 32] and A [RP x 32] in
// shared memory; thread (row = tid / 8, k0 = tid % 8) sums ranks k0, k0 + 8, ...
template <typename T, int RP>
__device__ void fwd_fma(const T *__restrict__ x, uint64_t ldx, const T *__restrict__ a, uint64_t lda,
                        T *__restrict__ z, uint64_t ldz, uint32_t n, uint32_t h, uint32_t r, Mask m) {
  __shared__ float xs[FWD_ROWS][33];
  __shared__ float as[RP][33];
  const int tid = threadIdx.x, orow = tid >> 3, k0 = tid & 7;
  const uint32_t rb = blockIdx.x * FWD_ROWS;
  float acc[RP / 8];
#pragma unroll
  for (int i = 0; i < RP / 8; ++i) acc[i] = 0.0f;
  for (uint32_t c0 = 0; c0 < h; c0 += 32) {
    for (int e = tid; e < FWD_ROWS * 32; e += FWD_THREADS) {
      const uint32_t row = rb + (e >> 5), col = c0 + (e & 31);
      float v = 0.0f;
      if (row < n && col < h) v = dropped<T>(to_f(x[(uint64_t)row * ldx + col]), m, m.row_start(row), col);
      xs[e >> 5][e & 31] = v;
    }
    for (int e = tid; e < RP * 32; e += FWD_THREADS) {
      const uint32_t k = e >> 5, col = c0 + (e & 31);
      as[k][e & 31] = load_or_zero(a + (uint64_t)k * lda + col, k < r && col < h);
    }
    __syncthreads();
#pragma unroll 8
    for (int cc = 0; cc < 32; ++cc) {
      const float xv = xs[orow][cc];
#pragma unroll
      for (int i = 0; i < RP / 8; ++i) acc[i] += xv * as[k0 + 8 * i][cc];
    }
    __syncthreads();
  }
  const uint32_t row = rb + orow;
#pragma unroll
  for (int i = 0; i < RP / 8; ++i) {
    const uint32_t k = k0 + 8 * i;
    if (row < n && k < r) z[(uint64_t)row * ldz + k] = from_f<T>(acc[i]);
  }
}

template <typename T, int RP>
__device__ void fwd_impl(const T *x, uint64_t ldx, const T *a, uint64_t lda, T *z, uint64_t ldz,
                         uint32_t n, uint32_t h, uint32_t r, uint32_t vec, Mask m) {
#if QT_LORA_MMA
  if constexpr (sizeof(T) == 2) {
    fwd_mma<T, RP>(x, ldx, a, lda, z, ldz, n, h, r, vec, m);
    return;
  }
#endif
  fwd_fma<T, RP>(x, ldx, a, lda, z, ldz, n, h, r, m);
}

// ---------------------------------------------------------------------------------
// gA += dzᵀ D(x)
// ---------------------------------------------------------------------------------

#if QT_LORA_MMA
// MMA (M = rank, N = the block's 32 columns, K = tokens). Per 16-token K step a lane
// loads columns cb + 4g .. cb + 4g + 3 of tokens 2t, 2t+1, 2t+8, 2t+9; N tile j's
// logical column g is physical column 4g + j, so the lane's four columns feed the
// four N tiles and a B register pairs one column of two tokens.
template <typename T, int RP>
__device__ void grad_mma(const T *__restrict__ dz, uint64_t lddz, const T *__restrict__ x,
                         uint64_t ldx, float *__restrict__ ga, uint64_t ldg, uint32_t n, uint32_t h,
                         uint32_t r, uint32_t vec, Mask m) {
  constexpr int MT = RP / 16;
  __shared__ float red[MT * 4 * 4 * 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const uint32_t cb = blockIdx.x * GRAD_COLS, c = cb + 4 * g;
  float acc[MT * 4 * 4];
#pragma unroll
  for (int i = 0; i < MT * 4 * 4; ++i) acc[i] = 0.0f;
  // One 32-token step: two K steps of four tokens per lane each, [s][q].
  auto load = [&](uint32_t t0, float (&v)[2][4][4]) {
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint32_t tok = t0 + 16 * s + 2 * t + (q & 1) + 8 * (q >> 1);
        load4_or_zero(x + (uint64_t)(tok < n ? tok : 0) * ldx, c, h, tok < n, vec, v[s][q]);
      }
  };
  constexpr uint32_t STEP = (grad_threads(RP) / 32) * 32;
  // One 32-token step from `cur`; FULL: all its tokens exist (no bounds checks).
  auto step = [&](uint32_t t0, const float (&cur)[2][4][4], auto full) {
    constexpr bool FULL = decltype(full)::value;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      const uint32_t tb = t0 + 16 * s;
      uint32_t fb[4][2];
      float xv[4][4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint32_t tok = tb + 2 * t + (q & 1) + 8 * (q >> 1);
#pragma unroll
        for (int j = 0; j < 4; ++j) xv[q][j] = cur[s][q][j];
        drop_run(xv[q], m, m.row_start(tok), c);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        fb[j][0] = pack2<T>(xv[0][j], xv[1][j]);
        fb[j][1] = pack2<T>(xv[2][j], xv[3][j]);
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        // dz[token q][rank 16i + g + 8hh], as bits.
        uint32_t d[4][2];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const uint32_t tok = tb + 2 * t + (q & 1) + 8 * (q >> 1);
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const uint32_t k = 16 * i + g + 8 * hh;
            d[q][hh] = raw16(dz + (uint64_t)tok * lddz + k, (FULL || tok < n) && k < r);
          }
        }
        const uint32_t fa[4] = {pair16(d[0][0], d[1][0]), pair16(d[0][1], d[1][1]),
                                pair16(d[2][0], d[3][0]), pair16(d[2][1], d[3][1])};
#pragma unroll
        for (int j = 0; j < 4; ++j) mma16816<T>(&acc[(i * 4 + j) * 4], fa, fb[j]);
      }
    }
  };
  float cur[2][4][4];
  load(warp * 32, cur);
  for (uint32_t t0 = warp * 32; t0 < n; t0 += STEP) {
    float nxt[2][4][4];
    load(t0 + STEP, nxt);
    if (t0 + 32 <= n) {
      step(t0, cur, std::true_type{});
    } else {
      step(t0, cur, std::false_type{});
    }
#pragma unroll
    for (int s = 0; s < 2; ++s)
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int j = 0; j < 4; ++j) cur[s][q][j] = nxt[s][q][j];
  }
  sum_over_warps(acc, red);
  if (warp != grad_threads(RP) / 32 - 1) return;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t k = 16 * i + g + 8 * (e >> 1), col = cb + 4 * (2 * t + (e & 1)) + j;
        if (k < r && col < h) ga[(uint64_t)k * ldg + col] += acc[(i * 4 + j) * 4 + e];
      }
}
#endif

// FMA: per 32-token step the block stages D(x) [32 tokens x 32 columns] and dz
// [32 x RP]; thread (col = tid % 32, k0 = tid / 32) of the first GRAD_FMA_THREADS sums
// ranks k0, k0 + 8, ...; threads past them (the rank-16 block is larger, for the MMA
// path) only take part in the barriers.
template <typename T, int RP>
__device__ void grad_fma(const T *__restrict__ dz, uint64_t lddz, const T *__restrict__ x,
                         uint64_t ldx, float *__restrict__ ga, uint64_t ldg, uint32_t n, uint32_t h,
                         uint32_t r, Mask m) {
  __shared__ float xs[32][33];
  __shared__ float ds[32][RP + 1];
  const int tid = threadIdx.x, cl = tid & 31, k0 = tid >> 5;
  const bool active = tid < GRAD_FMA_THREADS;
  const uint32_t cb = blockIdx.x * GRAD_COLS;
  float acc[RP / 8];
#pragma unroll
  for (int i = 0; i < RP / 8; ++i) acc[i] = 0.0f;
  for (uint32_t t0 = 0; t0 < n; t0 += 32) {
    for (int e = active ? tid : 32 * 32; e < 32 * 32; e += GRAD_FMA_THREADS) {
      const uint32_t tok = t0 + (e >> 5), col = cb + (e & 31);
      float v = 0.0f;
      if (tok < n && col < h) v = dropped<T>(to_f(x[(uint64_t)tok * ldx + col]), m, m.row_start(tok), col);
      xs[e >> 5][e & 31] = v;
    }
    for (int e = active ? tid : 32 * RP; e < 32 * RP; e += GRAD_FMA_THREADS) {
      const uint32_t tok = t0 + e / RP, k = e % RP;
      ds[e / RP][k] = load_or_zero(dz + (uint64_t)tok * lddz + k, tok < n && k < r);
    }
    __syncthreads();
    if (active) {
#pragma unroll 8
      for (int tt = 0; tt < 32; ++tt) {
        const float xv = xs[tt][cl];
#pragma unroll
        for (int i = 0; i < RP / 8; ++i) acc[i] += ds[tt][k0 + 8 * i] * xv;
      }
    }
    __syncthreads();
  }
  if (!active) return;
  const uint32_t col = cb + cl;
#pragma unroll
  for (int i = 0; i < RP / 8; ++i) {
    const uint32_t k = k0 + 8 * i;
    if (k < r && col < h) ga[(uint64_t)k * ldg + col] += acc[i];
  }
}

template <typename T, int RP>
__device__ void grad_impl(const T *dz, uint64_t lddz, const T *x, uint64_t ldx, float *ga,
                          uint64_t ldg, uint32_t n, uint32_t h, uint32_t r, uint32_t vec, Mask m) {
#if QT_LORA_MMA
  if constexpr (sizeof(T) == 2) {
    grad_mma<T, RP>(dz, lddz, x, ldx, ga, ldg, n, h, r, vec, m);
    return;
  }
#endif
  grad_fma<T, RP>(dz, lddz, x, ldx, ga, ldg, n, h, r, m);
}

// ---------------------------------------------------------------------------------
// dx += (dz A) ∘ mask
// ---------------------------------------------------------------------------------

// Adds the masked increments `inc` of columns c..c+15 of `row` into dx (in f32, one
// rounding; `vec` as in load8_or_zero).
template <typename T>
__device__ __forceinline__ void dx_update16(T *dxrow, uint32_t c, uint32_t h, uint32_t vec,
                                            const Mask &m, uint64_t ms, const float inc[16]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const uint32_t cc = c + 8 * half;
    float d[8];
    load8_or_zero(dxrow, cc, h, true, vec, d);
    dx_add_run(d, inc + 8 * half, m, ms, cc);
    if (vec && cc < h) {
      store8(dxrow + cc, d);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        if (cc + j < h) dxrow[cc + j] = from_f<T>(d[j]);
    }
  }
}

#if QT_LORA_MMA
// MMA (M = tokens, N = the block's 64 columns, K = rank). N tile j's logical column
// n is physical column 16 (n / 2) + 2j + n % 2, so a lane's accumulators c0..c3 of the
// eight tiles are columns 16t .. 16t + 15 of its rows g and g+8: one contiguous
// read-modify-write per row.
template <typename T, int RP>
__device__ void dx_mma(const T *__restrict__ dz, uint64_t lddz, const T *__restrict__ a,
                       uint64_t lda, T *__restrict__ dx, uint64_t lddx, uint32_t n, uint32_t h,
                       uint32_t r, uint32_t vec, Mask m) {
  constexpr int KT = RP / 16;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const uint32_t cb = blockIdx.x * DX_COLS;
  // B fragments: A[k][col] with col = cb + 16 (g / 2) + 2j + g % 2.
  uint32_t fb[KT][8][2];
#pragma unroll
  for (int s = 0; s < KT; ++s)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t col = cb + 16 * (g >> 1) + 2 * j + (g & 1);
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const uint32_t k = 16 * s + 2 * t + (e & 1) + 8 * (e >> 1);
        w[e] = raw16(a + (uint64_t)k * lda + col, k < r && col < h);
      }
      fb[s][j][0] = pair16(w[0], w[1]);
      fb[s][j][1] = pair16(w[2], w[3]);
    }
  const uint32_t c = cb + 16 * t;
  const uint32_t tiles = (n + 15) / 16, tile_end = min((blockIdx.y + 1) * (DX_TOKENS / 16), tiles);
  for (uint32_t tile = blockIdx.y * (DX_TOKENS / 16) + warp; tile < tile_end;
       tile += DX_THREADS / 32) {
    const uint32_t tb = tile * 16;
    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
#pragma unroll
    for (int s = 0; s < KT; ++s) {
      uint32_t d[2][4];  // [hh][e]: bits of dz[tb + g + 8hh][16s + 2t + e%2 + 8(e/2)]
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const uint32_t tok = tb + g + 8 * hh;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const uint32_t k = 16 * s + 2 * t + (e & 1) + 8 * (e >> 1);
          d[hh][e] = raw16(dz + (uint64_t)tok * lddz + k, tok < n && k < r);
        }
      }
      const uint32_t fa[4] = {pair16(d[0][0], d[0][1]), pair16(d[1][0], d[1][1]),
                              pair16(d[0][2], d[0][3]), pair16(d[1][2], d[1][3])};
#pragma unroll
      for (int j = 0; j < 8; ++j) mma16816<T>(acc[j], fa, fb[s][j]);
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const uint32_t row = tb + g + 8 * hh;
      if (row >= n) continue;
      float inc[16];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        inc[2 * j] = acc[j][2 * hh];
        inc[2 * j + 1] = acc[j][2 * hh + 1];
      }
      dx_update16(dx + (uint64_t)row * lddx, c, h, vec, m, m.row_start(row), inc);
    }
  }
}
#endif

// FMA: A's 64 columns [RP x 64] staged once; per 16-token tile dz [16 x RP] staged;
// thread (row = tid / 8, columns 8 (tid % 8) ..) computes 8 dot products over the rank.
template <typename T, int RP>
__device__ void dx_fma(const T *__restrict__ dz, uint64_t lddz, const T *__restrict__ a,
                       uint64_t lda, T *__restrict__ dx, uint64_t lddx, uint32_t n, uint32_t h,
                       uint32_t r, uint32_t vec, Mask m) {
  __shared__ float as[RP][DX_COLS + 1];
  __shared__ float ds[16][RP + 1];
  const int tid = threadIdx.x, rr = tid >> 3, cg = 8 * (tid & 7);
  const uint32_t cb = blockIdx.x * DX_COLS;
  for (int e = tid; e < RP * DX_COLS; e += DX_THREADS) {
    const uint32_t k = e / DX_COLS, col = cb + e % DX_COLS;
    as[k][e % DX_COLS] = load_or_zero(a + (uint64_t)k * lda + col, k < r && col < h);
  }
  const uint32_t tb0 = blockIdx.y * DX_TOKENS;
  const uint32_t tend = min(tb0 + DX_TOKENS, n);
  for (uint32_t tb = tb0; tb < tend; tb += 16) {
    for (int e = tid; e < 16 * RP; e += DX_THREADS) {
      const uint32_t tok = tb + e / RP, k = e % RP;
      ds[e / RP][k] = load_or_zero(dz + (uint64_t)tok * lddz + k, tok < n && k < r);
    }
    __syncthreads();
    const uint32_t row = tb + rr;
    if (row < n) {
      float inc[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        float s = 0.0f;
#pragma unroll 16
        for (int k = 0; k < RP; ++k) s += ds[rr][k] * as[k][cg + j];
        inc[j] = s;
      }
      T *dxrow = dx + (uint64_t)row * lddx;
      const uint64_t ms = m.row_start(row);
      const uint32_t c = cb + cg;
      float d[8];
      load8_or_zero(dxrow, c, h, true, vec, d);
      dx_add_run(d, inc, m, ms, c);
      if (vec && c < h) {
        store8(dxrow + c, d);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (c + j < h) dxrow[c + j] = from_f<T>(d[j]);
      }
    }
    __syncthreads();
  }
}

template <typename T, int RP>
__device__ void dx_impl(const T *dz, uint64_t lddz, const T *a, uint64_t lda, T *dx, uint64_t lddx,
                        uint32_t n, uint32_t h, uint32_t r, uint32_t vec, Mask m) {
#if QT_LORA_MMA
  if constexpr (sizeof(T) == 2) {
    dx_mma<T, RP>(dz, lddz, a, lda, dx, lddx, n, h, r, vec, m);
    return;
  }
#endif
  dx_fma<T, RP>(dz, lddz, a, lda, dx, lddx, n, h, r, vec, m);
}

// ---------------------------------------------------------------------------------
// Entry points: NAME_r{16,32,64}_{bf16,f16,f32}. Mask arguments: hash base, row
// offset, threshold (ceil(p * 2^16)), keep (1/(1-p)); the mask's row length is h.
// `vec`: every matrix the kernel moves 8 at a time passes vec8_ok (fwd: x and A;
// grad: x; dx: dx).
// ---------------------------------------------------------------------------------

#define QT_LORA_KERNELS(T, S, RP)                                                               \
  extern "C" __global__ void __launch_bounds__(FWD_THREADS)                                     \
      lora_a_fwd_dropout_r##RP##_##S(const T *x, uint64_t ldx, const T *a, uint64_t lda, T *z,  \
                                     uint64_t ldz, uint32_t n, uint32_t h, uint32_t r,           \
                                     uint32_t vec, uint64_t base, uint64_t row0,                 \
                                     uint64_t threshold, float keep) {                           \
    fwd_impl<T, RP>(x, ldx, a, lda, z, ldz, n, h, r, vec,                                       \
                    Mask{base, row0, h, (uint32_t)threshold, keep});                        \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(grad_threads(RP))                                  \
      lora_a_grad_dropout_r##RP##_##S(const T *dz, uint64_t lddz, const T *x, uint64_t ldx,     \
                                      float *ga, uint64_t ldg, uint32_t n, uint32_t h,           \
                                      uint32_t r, uint32_t vec, uint64_t base, uint64_t row0,    \
                                      uint64_t threshold, float keep) {                          \
    grad_impl<T, RP>(dz, lddz, x, ldx, ga, ldg, n, h, r, vec,                                   \
                     Mask{base, row0, h, (uint32_t)threshold, keep});                       \
  }                                                                                              \
  extern "C" __global__ void __launch_bounds__(DX_THREADS)                                      \
      lora_dx_dropout_r##RP##_##S(const T *dz, uint64_t lddz, const T *a, uint64_t lda, T *dx,  \
                                  uint64_t lddx, uint32_t n, uint32_t h, uint32_t r,             \
                                  uint32_t vec, uint64_t base, uint64_t row0,                    \
                                  uint64_t threshold, float keep) {                              \
    dx_impl<T, RP>(dz, lddz, a, lda, dx, lddx, n, h, r, vec,                                    \
                   Mask{base, row0, h, (uint32_t)threshold, keep});                         \
  }

#define QT_LORA_RANKS(T, S) QT_LORA_KERNELS(T, S, 16) QT_LORA_KERNELS(T, S, 32) QT_LORA_KERNELS(T, S, 64)
QT_FOR_FLOATS(QT_LORA_RANKS)
