// Host emulation of the CUDA primitives used by attention.cu (compiled with
// -DQT_EMU by emu/attention_emu.cpp; never part of the PTX build).
//
// Every CUDA thread runs as one host thread; a CTA's threads share a heap "shared memory"
// (poisoned with 0xFF = NaN for 16-bit floats) and a barrier; each warp has a barrier and
// a slot table through which lanes exchange register values for the warp-collective ops.
// The layouts below are transcribed from the PTX ISA tables ("Matrix Fragments for
// mma.m16n8k16 with floating point type", "ldmatrix"), independently of the kernel's own
// index arithmetic, so running the kernels here checks that arithmetic (and the masking,
// pipelining, bounds) against the CPU reference:
//   A (16x16): reg r of lane holds (row g + 8*(r&1), k 2t + 8*(r>>1) + {0,1})
//   B (16x8):  reg r holds (k 2t + 8r + {0,1}, n g)
//   C (16x8):  elem e holds (row g + 8*(e>>1), n 2t + (e&1))
//   ldmatrix x4: reg i = matrix i (addresses from lanes 8i..8i+7), (row g, cols 2t, 2t+1);
//   .trans: (rows 2t, 2t+1; col g) of the stored matrix.
// wgmma.m64nNk16 (PTX ISA "Register Fragments and Shared Memory Matrix Layouts"): warp w of
// the warpgroup holds rows 16w..16w+15 of A and D, each in the mma.m16n8k16 layout above
// (A: 4 regs; D: N/2 floats, element i at row g + 8*((i>>1)&1), n 8*(i>>2) + 2t + (i&1)).
// B comes from shared memory through a matrix descriptor, decoded here from the ISA's
// canonical layouts (128-byte swizzle only: K-major ((8,m),(T,2k)):((8T,SBO),(1,T)),
// MN-major ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)), T = 8 16-bit elements, then byte address
// bits 4-6 ^= bits 7-9). The products run at wgmma.wait_group, reading shared memory then,
// so a missing wait leaves the accumulators stale and an early overwrite of an operand
// tile shows; a wgmma issued with no wgmma.fence since the last wait, an accumulator
// touched while its product is in flight, and cp.async data read without
// fence.proxy.async all fail.
// cp.async copies are deferred until the cp.async.wait_group that must complete them, so a
// missing wait shows up as stale (poisoned) data.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define QT_DEV inline
#ifndef INFINITY
#define INFINITY (__builtin_inff())
#endif

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct uint4 {
  uint32_t x, y, z, w;
};
struct float2 {
  float x, y;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 gridDim, blockDim;

namespace emu {

[[noreturn]] inline void fail(const char *what) {
  std::fprintf(stderr, "emu: %s (block %u,%u,%u thread %u)\n", what, blockIdx.x, blockIdx.y,
               blockIdx.z, threadIdx.x);
  std::abort();
}

struct Warp {
  std::barrier<> bar{32};
  uint32_t slot[32][12];
};

// A warpgroup: 4 consecutive warps, the unit of wgmma.
struct WarpGroup {
  std::barrier<> bar{128};
  uint32_t slot[128][4];
};

struct Cta {
  explicit Cta(size_t smem_bytes, int warps)
      : smem(smem_bytes, 0xFF), bar(warps * 32), warps(warps), groups((warps + 3) / 4) {}
  std::vector<uint8_t> smem;
  std::barrier<> bar;
  std::vector<Warp> warps;
  std::vector<WarpGroup> groups;
};

// One thread's share of an issued wgmma: its accumulator registers, the A rows it needs
// (captured at issue, as the hardware reads the registers then), the B descriptor.
struct Wgmma {
  float *d;
  int n;           // N: the thread holds n / 2 accumulators
  bool accumulate; // scale-d
  bool trans_b;    // B MN-major
  bool bf16;
  float a[2][16];  // A rows g and g + 8 of the thread's warp, k = 0..15 (from registers)
  uint64_t desc_a;  // or A by descriptor, read when the product runs; 0 = registers
  bool trans_a;     // A by descriptor stored MN-major (M contiguous)
  int row0;        // the thread's first A/D row in the warpgroup's 64 (16 * warp + g)
  uint64_t desc;
  std::vector<float> before;  // the accumulators at issue, to catch a touch in flight
};

struct Copy {
  uint32_t dst;
  const void *src;
  int n;
  bool ok;
};

// An issued cp.reduce.async.bulk .add.f32: the source is read when a wait_group.read (or
// wait_group) completes it, so a source overwritten too early shows.
struct BulkAdd {
  float *dst;
  uint32_t src;
  uint32_t bytes;
};

struct Thread {
  Cta *cta = nullptr;
  std::vector<std::vector<BulkAdd>> bulk_groups;
  std::vector<BulkAdd> bulk_open;
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
  std::vector<std::vector<Wgmma>> wg_groups;
  std::vector<Wgmma> wg_open;
  bool wg_fenced = false;  // a wgmma.fence since the last wgmma.wait_group
  bool smem_unfenced = false;  // cp.async data landed since the last fence.proxy.async
};
inline thread_local Thread ts;

// Registered global buffers: every emulated global access must fall inside one.
struct Range {
  const uint8_t *lo, *hi;
};
inline std::vector<Range> &ranges() {
  static std::vector<Range> r;
  return r;
}
inline void register_buffer(const void *p, size_t bytes) {
  ranges().push_back({static_cast<const uint8_t *>(p), static_cast<const uint8_t *>(p) + bytes});
}
inline void clear_buffers() { ranges().clear(); }
inline void check_global(const void *p, size_t n) {
  const uint8_t *a = static_cast<const uint8_t *>(p);
  for (const Range &r : ranges())
    if (a >= r.lo && a + n <= r.hi) return;
  fail("global access outside every buffer");
}

inline uint8_t *smem_at(uint32_t addr, size_t n) {
  if (static_cast<size_t>(addr) + n > ts.cta->smem.size()) fail("shared access out of bounds");
  return ts.cta->smem.data() + addr;
}
inline int lane() { return threadIdx.x & 31; }
inline Warp &warp() { return ts.cta->warps[threadIdx.x >> 5]; }
inline WarpGroup &warpgroup() { return ts.cta->groups[threadIdx.x >> 7]; }

inline float bits_f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t f_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Runs `body` as a grid of CTAs with `threads` threads each, one CTA at a time.
inline void launch(Dim3 grid, unsigned threads, size_t smem, const std::function<void()> &body) {
  gridDim = grid;
  blockDim = {threads, 1, 1};
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        auto cta = std::make_unique<Cta>(smem, threads / 32);
        std::vector<std::thread> th;
        th.reserve(threads);
        for (unsigned i = 0; i < threads; ++i)
          th.emplace_back([&, i] {
            threadIdx = {i, 0, 0};
            blockIdx = {x, y, z};
            ts = Thread{};
            ts.cta = cta.get();
            body();
            if (!ts.open.empty() || !ts.groups.empty()) fail("cp.async still pending at exit");
            if (!ts.wg_open.empty() || !ts.wg_groups.empty()) fail("wgmma still pending at exit");
            if (!ts.bulk_open.empty() || !ts.bulk_groups.empty())
              fail("bulk reduction still pending at exit");
          });
        for (auto &t : th) t.join();
      }
}

}  // namespace emu

namespace qt_attn {

inline void bar_sync() { emu::ts.cta->bar.arrive_and_wait(); }
inline void warp_sync() { emu::warp().bar.arrive_and_wait(); }
inline float shfl_xor(float v, int m) {
  emu::Warp &w = emu::warp();
  const int l = emu::lane();
  w.slot[l][0] = emu::f_bits(v);
  w.bar.arrive_and_wait();
  const float r = emu::bits_f(w.slot[l ^ m][0]);
  w.bar.arrive_and_wait();
  return r;
}
inline float ex2(float x) { return std::exp2(x); }
inline char *smem_ptr() { return reinterpret_cast<char *>(emu::ts.cta->smem.data()); }
inline uint32_t smem_addr(const void *p) {
  return static_cast<uint32_t>(static_cast<const char *>(p) - smem_ptr());
}
template <class T> inline T gld(const T *p) {
  emu::check_global(p, sizeof(T));
  return *p;
}
inline void gst16(void *p, uint4 v) {
  emu::check_global(p, 16);
  std::memcpy(p, &v, 16);
}
inline void gstf(float *p, float v) {
  emu::check_global(p, 4);
  *p = v;
}
inline void gst4(void *p, uint32_t v) {
  emu::check_global(p, 4);
  std::memcpy(p, &v, 4);
}
inline float2 ldcg2(const float *p) {
  emu::check_global(p, 8);
  return {p[0], p[1]};
}
inline void stcg2(float *p, float2 v) {
  emu::check_global(p, 8);
  p[0] = v.x;
  p[1] = v.y;
}
// CTAs run one at a time and a CTA's threads own disjoint elements: a plain add is the
// atomic's result.
inline void red_add(float *p, float v) {
  emu::check_global(p, 4);
  *p += v;
}
inline void fence_gpu() {}
// CTAs run one at a time in launch order, so a turn that has not come yet never will:
// waiting for a later-launched CTA would hang on the GPU too.
inline void wait_turn(const uint32_t *p, uint32_t want) {
  emu::check_global(p, 4);
  if (*p != want) emu::fail("ordered dQ: waiting for a turn no earlier CTA hands on");
}
inline void give_turn(uint32_t *p, uint32_t v) {
  emu::check_global(p, 4);
  *p = v;
}

inline void ldsm_impl(uint32_t (&r)[4], uint32_t addr, bool trans) {
  emu::Warp &w = emu::warp();
  const int l = emu::lane(), g = l >> 2, t = l & 3;
  w.slot[l][0] = addr;
  w.bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) {
    uint16_t e[2];
    for (int h = 0; h < 2; ++h) {
      // Stored matrix i: row address from lane 8i + row; element (row, col) at +2*col.
      const int row = trans ? 2 * t + h : g, col = trans ? g : 2 * t + h;
      const uint32_t a = w.slot[8 * i + row][0];
      if (a % 16) emu::fail("ldmatrix row address not 16-byte aligned");
      std::memcpy(&e[h], emu::smem_at(a + 2 * col, 2), 2);
    }
    r[i] = static_cast<uint32_t>(e[0]) | (static_cast<uint32_t>(e[1]) << 16);
  }
  w.bar.arrive_and_wait();
}
inline void ldsm4(uint32_t (&r)[4], uint32_t addr) { ldsm_impl(r, addr, false); }
inline void ldsm4t(uint32_t (&r)[4], uint32_t addr) { ldsm_impl(r, addr, true); }

struct Bf16;
struct F16;
template <class E> float half_to_f(uint16_t h);
template <> inline float half_to_f<Bf16>(uint16_t h) {
  return emu::bits_f(static_cast<uint32_t>(h) << 16);
}
template <> inline float half_to_f<F16>(uint16_t h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
}
template <class E> uint16_t f_to_half(float f);
template <> inline uint16_t f_to_half<Bf16>(float f) {
  uint32_t u = emu::f_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);                        // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
template <> inline uint16_t f_to_half<F16>(float f) {
  const _Float16 x = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &x, 2);
  return h;
}

template <class E>
inline void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::Warp &w = emu::warp();
  const int l = emu::lane(), g = l >> 2, t = l & 3;
  uint32_t *s = w.slot[l];
  for (int i = 0; i < 4; ++i) s[i] = a[i];
  s[4] = b0;
  s[5] = b1;
  w.bar.arrive_and_wait();
  auto elem = [&](int lane, int reg, int half) {
    const uint32_t v = w.slot[lane][reg];
    return half_to_f<E>(static_cast<uint16_t>(half ? v >> 16 : v & 0xffff));
  };
  auto A = [&](int row, int k) {  // (row g + 8*(r&1), k 2t + 8*(r>>1) + h)
    return elem((row % 8) * 4 + (k % 8) / 2, (row / 8) + 2 * (k / 8), k % 2);
  };
  auto B = [&](int k, int n) {  // (k 2t + 8r + h, n g)
    return elem(n * 4 + (k % 8) / 2, 4 + k / 8, k % 2);
  };
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), n = 2 * t + (e & 1);
    float acc = c[e];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, n);
    d[e] = acc;
  }
  w.bar.arrive_and_wait();
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

inline void cp16(uint32_t dst, const void *src, bool ok) {
  if (dst % 16) emu::fail("cp.async 16 destination misaligned");
  if (ok && reinterpret_cast<uintptr_t>(src) % 16) emu::fail("cp.async 16 source misaligned");
  emu::ts.open.push_back({dst, src, 16, ok});
}
inline void cp4(uint32_t dst, const void *src, bool ok) {
  emu::ts.open.push_back({dst, src, 4, ok});
}
inline void cp_commit() {
  emu::ts.groups.push_back(std::move(emu::ts.open));
  emu::ts.open.clear();
}
template <int N> inline void cp_wait() {
  while (emu::ts.groups.size() > static_cast<size_t>(N)) {
    for (const emu::Copy &c : emu::ts.groups.front()) {
      uint8_t *d = emu::smem_at(c.dst, c.n);
      if (c.ok) {
        emu::check_global(c.src, c.n);
        std::memcpy(d, c.src, c.n);
      } else {
        std::memset(d, 0, c.n);
      }
    }
    emu::ts.groups.erase(emu::ts.groups.begin());
    emu::ts.smem_unfenced = true;
  }
}

template <class E> inline uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(f_to_half<E>(lo)) | (static_cast<uint32_t>(f_to_half<E>(hi)) << 16);
}
template <class E> inline float2 unpack2(uint32_t u) {
  return {half_to_f<E>(static_cast<uint16_t>(u & 0xffff)), half_to_f<E>(static_cast<uint16_t>(u >> 16))};
}

// ---- wgmma (sm_90a) ----------------------------------------------------------------------
inline void fence_proxy_async() { emu::ts.smem_unfenced = false; }
inline void wg_fence() { emu::ts.wg_fenced = true; }
template <class T> inline void wg_fence_operands(T &) {}
template <class T> inline void wg_keep_operands(T &) {}  // A registers: copied at issue here
inline void wg_commit() {
  emu::ts.wg_groups.push_back(std::move(emu::ts.wg_open));
  emu::ts.wg_open.clear();
}

namespace wg_detail {
// Byte offset in shared memory of B's element (k, n) under descriptor `desc`.
inline uint32_t b_addr(uint64_t desc, bool trans_b, int k, int n) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  if ((desc >> 62) != 1) emu::fail("wgmma: only the 128-byte swizzle is emulated");
  if ((desc >> 49) & 7) emu::fail("wgmma: non-zero matrix base offset");
  uint32_t off;
  if (!trans_b) {  // K-major: ((8,m),(T,2k)):((8T,SBO),(1,T)), in 16-bit elements
    off = (n % 8) * 128 + (n / 8) * sbo + (k % 8) * 2 + (k / 8) * 16;
  } else {  // MN-major: ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))
    if (lbo == 0) emu::fail("wgmma: MN-major B needs a leading byte offset");
    off = (n % 64) * 2 + (n / 64) * lbo + (k % 8) * 128 + (k / 8) * sbo;
  }
  const uint32_t a = start + off;
  return a ^ (((a >> 7) & 7) << 4);  // Swizzle<3,4,3> on the byte address
}

template <class E> float smem_half(uint32_t addr) {
  uint16_t e;
  std::memcpy(&e, emu::smem_at(addr, 2), 2);
  return half_to_f<E>(e);
}

// What every wgmma issue needs of the issuing thread.
inline void check_issue() {
  if (!emu::ts.wg_fenced) emu::fail("wgmma issued without wgmma.fence since the last wait");
  if (emu::ts.smem_unfenced) emu::fail("wgmma reads cp.async data without fence.proxy.async");
}

inline void run(emu::Wgmma &w) {
  const int l = emu::lane(), g = l >> 2, t = l & 3;
  if (w.desc_a)  // A(m, k) is B's layout (K- or MN-major) with m for n
    for (int r = 0; r < 2; ++r)
      for (int k = 0; k < 16; ++k) {
        const uint32_t at = b_addr(w.desc_a, w.trans_a, k, w.row0 + 8 * r);
        w.a[r][k] = w.bf16 ? smem_half<Bf16>(at) : smem_half<F16>(at);
      }
  for (int i = 0; i < w.n / 2; ++i) {
    const int r = (i >> 1) & 1, col = 8 * (i >> 2) + 2 * t + (i & 1);
    float acc = w.accumulate ? w.d[i] : 0.f;
    for (int k = 0; k < 16; ++k) {
      const uint32_t at = b_addr(w.desc, w.trans_b, k, col);
      acc += w.a[r][k] * (w.bf16 ? smem_half<Bf16>(at) : smem_half<F16>(at));
    }
    w.d[i] = acc;
  }
  (void)g;
}
}  // namespace wg_detail

template <int N> inline void wg_wait() {
  while (emu::ts.wg_groups.size() > static_cast<size_t>(N)) {
    std::vector<emu::Wgmma> &grp = emu::ts.wg_groups.front();
    // The first product into each accumulator saw the values of its issue; a later one
    // of the same chain sees its predecessor's result.
    std::vector<const float *> seen;
    for (emu::Wgmma &w : grp) {
      if (std::find(seen.begin(), seen.end(), w.d) == seen.end()) {
        seen.push_back(w.d);
        if (std::memcmp(w.before.data(), w.d, w.before.size() * 4) != 0)
          emu::fail("wgmma: accumulator changed while its product was in flight");
      }
      wg_detail::run(w);
    }
    emu::ts.wg_groups.erase(emu::ts.wg_groups.begin());
  }
  emu::ts.wg_fenced = false;
}

// D[64 x N] (+)= A[64 x 16] * B[16 x N]: A from registers (this warp's 16 rows, the mma
// A layout), B from shared memory (descriptor; TB = 1: MN-major). Warpgroup-collective.
template <int N, class E> struct Wg {
  template <int TB>
  static void rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc, int accumulate) {
    wg_detail::check_issue();
    emu::WarpGroup &grp = emu::warpgroup();
    const int wl = threadIdx.x & 127, l = wl & 31, g = l >> 2, base = wl & ~31;
    for (int i = 0; i < 4; ++i) grp.slot[wl][i] = a[i];
    grp.bar.arrive_and_wait();
    emu::Wgmma w{&d[0][0], N, accumulate != 0, TB != 0, std::is_same_v<E, Bf16>, {}, 0, false, 0, desc, {}};
    for (int r = 0; r < 2; ++r)
      for (int k = 0; k < 16; ++k) {
        // mma A layout: (row g + 8*(reg&1), k 2t + 8*(reg>>1) + h)
        const uint32_t v = grp.slot[base + g * 4 + (k % 8) / 2][r + 2 * (k / 8)];
        w.a[r][k] = half_to_f<E>(static_cast<uint16_t>(k % 2 ? v >> 16 : v & 0xffff));
      }
    w.before.assign(&d[0][0], &d[0][0] + N / 2);
    grp.bar.arrive_and_wait();
    emu::ts.wg_open.push_back(std::move(w));
  }
};

// The same with A from shared memory (by descriptor; TA = 1: MN-major).
template <int N, class E> struct WgSs {
  template <int TB, int TA = 0>
  static void ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, int accumulate) {
    wg_detail::check_issue();
    if (desc_a == 0) emu::fail("wgmma: null A descriptor");
    emu::WarpGroup &grp = emu::warpgroup();
    grp.bar.arrive_and_wait();  // collective: every thread of the warpgroup issues it
    const int wl = threadIdx.x & 127;
    emu::Wgmma w{&d[0][0], N, accumulate != 0, TB != 0, std::is_same_v<E, Bf16>, {}, desc_a,
                 TA != 0, 16 * (wl >> 5) + ((wl & 31) >> 2), desc_b, {}};
    w.before.assign(&d[0][0], &d[0][0] + N / 2);
    emu::ts.wg_open.push_back(std::move(w));
  }
};

// ---- bulk reductions (sm_90) --------------------------------------------------------------
inline void bulk_add_f32(float *dst, uint32_t src, uint32_t bytes) {
  if (bytes % 16 || src % 16 || reinterpret_cast<uintptr_t>(dst) % 16)
    emu::fail("bulk reduction: size and addresses must be multiples of 16 bytes");
  emu::ts.bulk_open.push_back({dst, src, bytes});
}
inline void bulk_commit() {
  emu::ts.bulk_groups.push_back(std::move(emu::ts.bulk_open));
  emu::ts.bulk_open.clear();
}
template <int N> inline void bulk_wait_read() {
  while (emu::ts.bulk_groups.size() > static_cast<size_t>(N)) {
    for (const emu::BulkAdd &a : emu::ts.bulk_groups.front()) {
      const float *s = reinterpret_cast<const float *>(emu::smem_at(a.src, a.bytes));
      emu::check_global(a.dst, a.bytes);
      for (uint32_t i = 0; i < a.bytes / 4; ++i) a.dst[i] += s[i];
    }
    emu::ts.bulk_groups.erase(emu::ts.bulk_groups.begin());
  }
}
template <int N> inline void bulk_wait() { bulk_wait_read<N>(); }
inline void sts4f(float *p, float a, float b, float c, float d) {
  p[0] = a;
  p[1] = b;
  p[2] = c;
  p[3] = d;
}

}  // namespace qt_attn
