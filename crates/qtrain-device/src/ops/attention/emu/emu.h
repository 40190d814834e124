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
// cp.async copies are deferred until the cp.async.wait_group that must complete them, so a
// missing wait shows up as stale (poisoned) data.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
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

struct Cta {
  explicit Cta(size_t smem_bytes, int warps)
      : smem(smem_bytes, 0xFF), bar(warps * 32), warps(warps) {}
  std::vector<uint8_t> smem;
  std::barrier<> bar;
  std::vector<Warp> warps;
};

struct Copy {
  uint32_t dst;
  const void *src;
  int n;
  bool ok;
};

struct Thread {
  Cta *cta = nullptr;
  std::vector<std::vector<Copy>> groups;
  std::vector<Copy> open;
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
  }
}

template <class E> inline uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(f_to_half<E>(lo)) | (static_cast<uint32_t>(f_to_half<E>(hi)) << 16);
}
template <class E> inline float2 unpack2(uint32_t u) {
  return {half_to_f<E>(static_cast<uint16_t>(u & 0xffff)), half_to_f<E>(static_cast<uint16_t>(u >> 16))};
}

}  // namespace qt_attn
