// Runs crates/qtrain-device/src/ops/attention/attention.cu on the CPU through the warp-primitive emulator (emu.h) and
// compares forward (O, lse; 4 and 8 warps of mma.sync, 1 and 2 warpgroups of wgmma at head dims 64 and 128) and backward (dQ, dK, dV: the split kernels, with mma.sync or (head dims 64, 128) wgmma, the
// fused one ordered and with atomic adds, the two bit-identical here, and at head dim 128 the
// fused wgmma one with bulk-reduced dQ) with a plain double-precision
// reference of the contract in crates/qtrain-device/src/attention.rs, on random data, for
// several shapes (head dims 16..128, ragged sequence ends, windows, segments, GQA, batch > 1,
// strided q/k/v column blocks of one fused buffer). Also checks that nothing outside the
// outputs' column blocks is written and that every output element is (no NaN poison left).
//
// Build and run: crates/qtrain-device/src/ops/attention/emu/run.sh [quick | shape indices...]   (g++ 12+, C++20; no GPU,
// no CUDA toolkit needed; all shapes take about a minute on 2 cores). `cargo test` runs it
// (crates/qtrain-device/tests/attention_emulation.rs).
#include "../attention.cu"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <random>
#include <string>

using namespace qt_attn;

namespace {

struct Shape {
  int batch, seq, heads, kv, d, window;  // window 0 = none
  bool seg;
  bool f16;
};

template <class E> uint16_t h(float f) { return f_to_half<E>(f); }
template <class E> float f(uint16_t x) { return half_to_f<E>(x); }

struct Result {
  double o, lse, dq, dk, dv;
};

double rel_err(const std::vector<double> &got, const std::vector<double> &ref) {
  double scale = 1e-30, worst = 0;
  for (double r : ref) scale = std::max(scale, std::fabs(r));
  for (size_t i = 0; i < got.size(); ++i) {
    const double dd = std::fabs(got[i] - ref[i]);
    if (!std::isfinite(dd)) return INFINITY;
    worst = std::max(worst, dd);
  }
  return worst / scale;
}

template <class E> Result run(const Shape &s, uint64_t seed) {
  const int n = s.batch * s.seq, H = s.heads, KV = s.kv, D = s.d;
  const int qc = (H + 2 * KV) * D, ldqkv = qc + 8, ldo = H * D + 16, lddo = H * D + 8;
  const int groups = H / KV;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  const float NaN = std::nanf("");
  const uint16_t poison = h<E>(NaN);

  std::vector<uint16_t> qkv(static_cast<size_t>(n) * ldqkv), dout(static_cast<size_t>(n) * lddo);
  for (auto &x : qkv) x = h<E>(2.5f * U(rng));
  for (auto &x : dout) x = h<E>(U(rng));
  std::vector<uint32_t> seg(n, 0);
  if (s.seg)
    for (int b = 0; b < s.batch; ++b) {
      // Documents of uneven lengths, with ids that repeat across batch rows.
      uint32_t id = 7;
      int left = 1 + static_cast<int>(rng() % 40);
      for (int i = 0; i < s.seq; ++i) {
        if (left-- == 0) {
          ++id;
          left = static_cast<int>(rng() % 90);
        }
        seg[b * s.seq + i] = id;
      }
    }
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  auto Q = [&](int tok, int hh, int c) { return f<E>(qkv[static_cast<size_t>(tok) * ldqkv + hh * D + c]); };
  auto K = [&](int tok, int hh, int c) {
    return f<E>(qkv[static_cast<size_t>(tok) * ldqkv + (H + hh) * D + c]);
  };
  auto V = [&](int tok, int hh, int c) {
    return f<E>(qkv[static_cast<size_t>(tok) * ldqkv + (H + KV + hh) * D + c]);
  };
  auto dO = [&](int tok, int hh, int c) { return f<E>(dout[static_cast<size_t>(tok) * lddo + hh * D + c]); };
  auto vis = [&](int b, int i, int j) {
    return j <= i && (s.window == 0 || j + s.window > i) &&
           seg[b * s.seq + i] == seg[b * s.seq + j];
  };

  // Reference forward.
  std::vector<double> o_ref(static_cast<size_t>(n) * H * D), lse_ref(static_cast<size_t>(s.batch) * H * s.seq);
  for (int b = 0; b < s.batch; ++b)
    for (int hh = 0; hh < H; ++hh)
      for (int i = 0; i < s.seq; ++i) {
        const int ti = b * s.seq + i, kh = hh / groups;
        std::vector<double> sc(i + 1, -INFINITY);
        double m = -INFINITY;
        for (int j = 0; j <= i; ++j)
          if (vis(b, i, j)) {
            double dot = 0;
            for (int c = 0; c < D; ++c) dot += static_cast<double>(Q(ti, hh, c)) * K(b * s.seq + j, kh, c);
            sc[j] = dot * scale;
            m = std::max(m, sc[j]);
          }
        double l = 0;
        for (int j = 0; j <= i; ++j)
          if (sc[j] != -INFINITY) {
            const double p = std::exp(sc[j] - m);
            l += p;
            for (int c = 0; c < D; ++c) o_ref[(static_cast<size_t>(ti) * H + hh) * D + c] += p * V(b * s.seq + j, kh, c);
          }
        for (int c = 0; c < D; ++c) o_ref[(static_cast<size_t>(ti) * H + hh) * D + c] /= l;
        lse_ref[(static_cast<size_t>(b) * H + hh) * s.seq + i] = m + std::log(l);
      }

  // Kernel forward.
  std::vector<uint16_t> o(static_cast<size_t>(n) * ldo, poison);
  std::vector<float> lse(static_cast<size_t>(s.batch) * H * s.seq, NaN);
  emu::clear_buffers();
  emu::register_buffer(qkv.data(), qkv.size() * 2);
  emu::register_buffer(dout.data(), dout.size() * 2);
  emu::register_buffer(seg.data(), seg.size() * 4);
  emu::register_buffer(o.data(), o.size() * 2);
  emu::register_buffer(lse.data(), lse.size() * 4);
  const int qtiles = (s.seq + kBQ - 1) / kBQ;
  const uint32_t *segp = s.seg ? seg.data() : nullptr;
  const uint16_t *qp = qkv.data(), *kp = qkv.data() + H * D, *vp = qkv.data() + (H + KV) * D;
  auto fwd_call = [&]() {
    switch (D) {
#define QT_FWD(DIM)                                                                              \
  case DIM:                                                                                      \
    fwd<DIM, 4, E>(qp, ldqkv, kp, ldqkv, vp, ldqkv, segp, o.data(), ldo, lse.data(), s.seq, H,   \
                   KV, s.window, scale);                                                         \
    break;
      QT_FWD(16) QT_FWD(32) QT_FWD(64) QT_FWD(128)
    }
  };
  size_t smem = D == 16 ? FwdSmem<16>::kBytes : D == 32 ? FwdSmem<32>::kBytes : D == 64 ? FwdSmem<64>::kBytes : FwdSmem<128>::kBytes;
  Result res{};
  // The forward's outputs against the reference (and the untouched padding of o).
  auto check_fwd = [&](const char *variant) {
    std::vector<double> og(o_ref.size());
    bool pad_ok = true;
    for (int tok = 0; tok < n; ++tok) {
      for (int c = 0; c < H * D; ++c) og[static_cast<size_t>(tok) * H * D + c] = f<E>(o[static_cast<size_t>(tok) * ldo + c]);
      for (int c = H * D; c < ldo; ++c) pad_ok &= o[static_cast<size_t>(tok) * ldo + c] == poison;
    }
    if (!pad_ok) std::printf("  !! forward (%s) wrote outside o's columns\n", variant);
    const double eo = pad_ok ? rel_err(og, o_ref) : INFINITY;
    res.o = std::max(res.o, eo);
    double lw = 0;
    for (size_t i = 0; i < lse.size(); ++i) lw = std::max(lw, std::isfinite(lse[i]) ? std::fabs(lse[i] - lse_ref[i]) : INFINITY);
    res.lse = std::max(res.lse, lw);  // absolute error of lse (natural log units)
    std::printf("  forward %-22s o %.2e lse(abs) %.2e\n", variant, eo, lw);
  };
  emu::launch({static_cast<unsigned>(H), static_cast<unsigned>(qtiles), static_cast<unsigned>(s.batch)}, kThreads, smem, fwd_call);
  check_fwd("4 warps");
  if (D == 128) {  // the 8-warp tuning variant
    std::fill(o.begin(), o.end(), poison);
    std::fill(lse.begin(), lse.end(), NaN);
    auto fwd8 = [&]() {
      fwd<128, 8, E>(qp, ldqkv, kp, ldqkv, vp, ldqkv, segp, o.data(), ldo, lse.data(), s.seq, H, KV, s.window, scale);
    };
    emu::launch({static_cast<unsigned>(H), static_cast<unsigned>((s.seq + 127) / 128), static_cast<unsigned>(s.batch)}, 256, FwdSmem<128, 8>::kBytes, fwd8);
    check_fwd("8 warps");
  }
  if (D == 64 || D == 128) {  // the wgmma forward (sm_90a), one and two warpgroups
    for (const int W : {4, 8}) {
      std::fill(o.begin(), o.end(), poison);
      std::fill(lse.begin(), lse.end(), NaN);
      auto fwdwg = [&]() {
#define QT_FWDWG(DIM, WARPS)                                                                    \
  fwd<DIM, WARPS, E, true>(qp, ldqkv, kp, ldqkv, vp, ldqkv, segp, o.data(), ldo, lse.data(),    \
                           s.seq, H, KV, s.window, scale)
        if (D == 64) {
          if (W == 4) QT_FWDWG(64, 4); else QT_FWDWG(64, 8);
        } else {
          if (W == 4) QT_FWDWG(128, 4); else QT_FWDWG(128, 8);
        }
      };
      const size_t wsmem = D == 64 ? (W == 4 ? FwdSmem<64, 4, true>::kBytes : FwdSmem<64, 8, true>::kBytes)
                                   : (W == 4 ? FwdSmem<128, 4, true>::kBytes : FwdSmem<128, 8, true>::kBytes);
      emu::launch({static_cast<unsigned>(H), static_cast<unsigned>((s.seq + 16 * W - 1) / (16 * W)), static_cast<unsigned>(s.batch)},
                  32 * W, wsmem, fwdwg);
      check_fwd(W == 4 ? "wgmma, 1 warpgroup" : "wgmma, 2 warpgroups");
    }
  }
  if (D == 128) {  // the pipelined wgmma forwards (S of a tile beside P V of the one before)
    for (const int W : {4, 8}) {
      std::fill(o.begin(), o.end(), poison);
      std::fill(lse.begin(), lse.end(), NaN);
      auto fwdwgp = [&]() {
        if (W == 4)
          fwd<128, 4, E, true, true>(qp, ldqkv, kp, ldqkv, vp, ldqkv, segp, o.data(), ldo, lse.data(),
                                     s.seq, H, KV, s.window, scale);
        else
          fwd<128, 8, E, true, true>(qp, ldqkv, kp, ldqkv, vp, ldqkv, segp, o.data(), ldo, lse.data(),
                                     s.seq, H, KV, s.window, scale);
      };
      emu::launch({static_cast<unsigned>(H), static_cast<unsigned>((s.seq + 16 * W - 1) / (16 * W)), static_cast<unsigned>(s.batch)},
                  32 * W, W == 4 ? FwdSmem<128, 4, true, 3>::kBytes : FwdSmem<128, 8, true, 3>::kBytes, fwdwgp);
      check_fwd(W == 4 ? "wgmma, 1 warpgroup, pipelined" : "wgmma, 2 warpgroups, pipelined");
    }
  }

  // Backward: reference O (rounded) and lse feed both sides.
  std::vector<uint16_t> o_in(static_cast<size_t>(n) * ldo, poison);
  for (int tok = 0; tok < n; ++tok)
    for (int c = 0; c < H * D; ++c) o_in[static_cast<size_t>(tok) * ldo + c] = h<E>(static_cast<float>(o_ref[static_cast<size_t>(tok) * H * D + c]));
  std::vector<float> lse_in(lse_ref.begin(), lse_ref.end());
  std::vector<double> dq_ref(static_cast<size_t>(n) * H * D), dk_ref(static_cast<size_t>(n) * KV * D), dv_ref(static_cast<size_t>(n) * KV * D);
  for (int b = 0; b < s.batch; ++b)
    for (int hh = 0; hh < H; ++hh)
      for (int i = 0; i < s.seq; ++i) {
        const int ti = b * s.seq + i, kh = hh / groups;
        double delta = 0;
        for (int c = 0; c < D; ++c) delta += static_cast<double>(dO(ti, hh, c)) * f<E>(o_in[static_cast<size_t>(ti) * ldo + hh * D + c]);
        const double li = lse_in[(static_cast<size_t>(b) * H + hh) * s.seq + i];
        for (int j = 0; j <= i; ++j) {
          if (!vis(b, i, j)) continue;
          const int tj = b * s.seq + j;
          double dot = 0, dp = 0;
          for (int c = 0; c < D; ++c) {
            dot += static_cast<double>(Q(ti, hh, c)) * K(tj, kh, c);
            dp += static_cast<double>(dO(ti, hh, c)) * V(tj, kh, c);
          }
          const double p = std::exp(dot * scale - li), ds = p * (dp - delta);
          for (int c = 0; c < D; ++c) {
            dv_ref[(static_cast<size_t>(tj) * KV + kh) * D + c] += p * dO(ti, hh, c);
            dq_ref[(static_cast<size_t>(ti) * H + hh) * D + c] += ds * K(tj, kh, c) * scale;
            dk_ref[(static_cast<size_t>(tj) * KV + kh) * D + c] += ds * Q(ti, hh, c) * scale;
          }
        }
      }

  std::vector<uint16_t> dqkv(static_cast<size_t>(n) * ldqkv, poison);
  std::vector<float> dsum(static_cast<size_t>(s.batch) * H * s.seq, NaN);
  emu::clear_buffers();
  emu::register_buffer(qkv.data(), qkv.size() * 2);
  emu::register_buffer(dout.data(), dout.size() * 2);
  emu::register_buffer(seg.data(), seg.size() * 4);
  emu::register_buffer(o_in.data(), o_in.size() * 2);
  emu::register_buffer(lse_in.data(), lse_in.size() * 4);
  emu::register_buffer(dsum.data(), dsum.size() * 4);
  emu::register_buffer(dqkv.data(), dqkv.size() * 2);
  uint16_t *dqp = dqkv.data(), *dkp = dqkv.data() + H * D, *dvp = dqkv.data() + (H + KV) * D;
  const uint64_t rows = static_cast<uint64_t>(n) * H;
  const unsigned rpb = kThreads / (D / 8);
  auto prep_call = [&]() {
    switch (D) {
#define QT_PREP(DIM)                                                                    \
  case DIM:                                                                             \
    bwd_prep<DIM, E>(o_in.data(), ldo, dout.data(), lddo, dsum.data(), s.seq, H, rows); \
    break;
      QT_PREP(16) QT_PREP(32) QT_PREP(64) QT_PREP(128)
    }
  };
  emu::launch({static_cast<unsigned>((rows + rpb - 1) / rpb), 1, 1}, kThreads, 0, prep_call);
  auto dkdv_call = [&]() {
    switch (D) {
#define QT_DKDV(DIM)                                                                           \
  case DIM:                                                                                    \
    bwd_dkdv<DIM, E>(qp, ldqkv, kp, ldqkv, vp, ldqkv, dout.data(), lddo, lse_in.data(),        \
                     dsum.data(), segp, dkp, ldqkv, dvp, ldqkv, s.seq, H, KV, s.window, scale); \
    break;
      QT_DKDV(16) QT_DKDV(32) QT_DKDV(64) QT_DKDV(128)
    }
  };
  smem = D == 16 ? DkvSmem<16>::kBytes : D == 32 ? DkvSmem<32>::kBytes : D == 64 ? DkvSmem<64>::kBytes : DkvSmem<128>::kBytes;
  emu::launch({static_cast<unsigned>(KV), static_cast<unsigned>((s.seq + kBK - 1) / kBK), static_cast<unsigned>(s.batch)}, kThreads, smem, dkdv_call);
  auto dq_call = [&]() {
    switch (D) {
#define QT_DQ(DIM)                                                                             \
  case DIM:                                                                                    \
    bwd_dq<DIM, E>(qp, ldqkv, kp, ldqkv, vp, ldqkv, dout.data(), lddo, lse_in.data(),          \
                   dsum.data(), segp, dqp, ldqkv, s.seq, H, KV, s.window, scale);              \
    break;
      QT_DQ(16) QT_DQ(32) QT_DQ(64) QT_DQ(128)
    }
  };
  smem = D == 16 ? DqSmem<16>::kBytes : D == 32 ? DqSmem<32>::kBytes : D == 64 ? DqSmem<64>::kBytes : DqSmem<128>::kBytes;
  emu::launch({static_cast<unsigned>(H), static_cast<unsigned>(qtiles), static_cast<unsigned>(s.batch)}, kThreads, smem, dq_call);

  // The gradients in dqkv against the reference (and the untouched padding columns).
  auto check_bwd = [&](const char *variant) {
    std::vector<double> dqg(dq_ref.size()), dkg(dk_ref.size()), dvg(dv_ref.size());
    bool pad_ok = true;
    for (int tok = 0; tok < n; ++tok) {
      const uint16_t *r = dqkv.data() + static_cast<size_t>(tok) * ldqkv;
      for (int c = 0; c < H * D; ++c) dqg[static_cast<size_t>(tok) * H * D + c] = f<E>(r[c]);
      for (int c = 0; c < KV * D; ++c) {
        dkg[static_cast<size_t>(tok) * KV * D + c] = f<E>(r[H * D + c]);
        dvg[static_cast<size_t>(tok) * KV * D + c] = f<E>(r[(H + KV) * D + c]);
      }
      for (int c = qc; c < ldqkv; ++c) pad_ok &= r[c] == poison;
    }
    if (!pad_ok) std::printf("  !! backward (%s) wrote outside the dq/dk/dv columns\n", variant);
    const double eq = pad_ok ? rel_err(dqg, dq_ref) : INFINITY, ek = rel_err(dkg, dk_ref),
                 ev = rel_err(dvg, dv_ref);
    res.dq = std::max(res.dq, eq);
    res.dk = std::max(res.dk, ek);
    res.dv = std::max(res.dv, ev);
    std::printf("  backward %-26s dq %.2e dk %.2e dv %.2e\n", variant, eq, ek, ev);
  };
  check_bwd("split");
  if (D == 64 || D == 128) {  // the split backward's wgmma kernels (sm_90a)
    std::fill(dqkv.begin(), dqkv.end(), poison);
    auto dkdvwg_call = [&]() {
#define QT_DKDVWG(DIM)                                                                      \
  bwd_dkdv<DIM, E, true>(qp, ldqkv, kp, ldqkv, vp, ldqkv, dout.data(), lddo, lse_in.data(), \
                         dsum.data(), segp, dkp, ldqkv, dvp, ldqkv, s.seq, H, KV, s.window, \
                         scale)
      if (D == 64) QT_DKDVWG(64); else QT_DKDVWG(128);
    };
    const size_t wsmem = D == 64 ? DkvSmem<64, true>::kBytes : DkvSmem<128, true>::kBytes;
    emu::launch({static_cast<unsigned>(KV), static_cast<unsigned>((s.seq + kBK - 1) / kBK), static_cast<unsigned>(s.batch)}, kThreads, wsmem, dkdvwg_call);
    auto dqwg_call = [&]() {
#define QT_DQWG(DIM)                                                                          \
  bwd_dq<DIM, E, true>(qp, ldqkv, kp, ldqkv, vp, ldqkv, dout.data(), lddo, lse_in.data(),     \
                       dsum.data(), segp, dqp, ldqkv, s.seq, H, KV, s.window, scale)
      if (D == 64) QT_DQWG(64); else QT_DQWG(128);
    };
    smem = D == 64 ? DqSmem<64, true>::kBytes : DqSmem<128, true>::kBytes;
    emu::launch({static_cast<unsigned>(H), static_cast<unsigned>(qtiles), static_cast<unsigned>(s.batch)}, kThreads, smem, dqwg_call);
    check_bwd("split, wgmma dK/dV and dQ");
  }

  // The fused backward, ordered (turn counters) and unordered (adds, then bwd_dq_store).
  const int ktiles = (s.seq + kBK - 1) / kBK;
  const int QH = D == 128 ? 32 : kBQ;
  std::vector<float> dq_acc(static_cast<size_t>(n) * H * D, NaN);
  std::vector<uint32_t> turns(static_cast<size_t>(s.batch) * H * ((s.seq + kBQ - 1) / kBQ) * (kBQ / QH), 0);
  std::vector<float> dkv_acc(static_cast<size_t>(n) * KV * 2 * D, NaN);
  std::vector<uint32_t> kv_turns(static_cast<size_t>(s.batch) * KV * ktiles, 0);
  emu::register_buffer(dq_acc.data(), dq_acc.size() * 4);
  emu::register_buffer(turns.data(), turns.size() * 4);
  emu::register_buffer(dkv_acc.data(), dkv_acc.size() * 4);
  emu::register_buffer(kv_turns.data(), kv_turns.size() * 4);
  smem = D == 16 ? FusedSmem<16>::kBytes : D == 32 ? FusedSmem<32>::kBytes : D == 64 ? FusedSmem<64>::kBytes : FusedSmem<128>::kBytes;
  std::vector<uint16_t> ordered;
  for (const bool ord : {true, false}) {
    std::fill(dqkv.begin(), dqkv.end(), poison);
    std::fill(turns.begin(), turns.end(), 0u);
    std::fill(kv_turns.begin(), kv_turns.end(), 0u);
    // Ordered: the first key tile stores, so poison must not leak through; unordered adds
    // into zeros.
    std::fill(dq_acc.begin(), dq_acc.end(), ord ? NaN : 0.f);
    auto fused_call = [&]() {
      switch (D) {
#define QT_FUSED(DIM)                                                                            \
  case DIM:                                                                                      \
    if (ord)                                                                                     \
      bwd_fused<DIM, E, true>(qp, ldqkv, kp, ldqkv, vp, ldqkv, dout.data(), lddo, lse_in.data(), \
                              dsum.data(), segp, dkp, ldqkv, dvp, ldqkv, dq_acc.data(),          \
                              turns.data(), dqp, ldqkv, dkv_acc.data(), kv_turns.data(), s.seq,  \
                              H, KV, s.window, scale);                                           \
    else                                                                                         \
      bwd_fused<DIM, E, false>(qp, ldqkv, kp, ldqkv, vp, ldqkv, dout.data(), lddo,               \
                               lse_in.data(), dsum.data(), segp, dkp, ldqkv, dvp, ldqkv,         \
                               dq_acc.data(), turns.data(), dqp, ldqkv, dkv_acc.data(),          \
                               kv_turns.data(), s.seq, H, KV, s.window, scale);                  \
    break;
        QT_FUSED(16) QT_FUSED(32) QT_FUSED(64) QT_FUSED(128)
      }
    };
    emu::launch({static_cast<unsigned>(H), static_cast<unsigned>(s.batch), static_cast<unsigned>(ktiles)}, kThreads, smem, fused_call);
    if (!ord) {
      auto store_call = [&]() {
        switch (D) {
#define QT_STORE(DIM)                                                           \
  case DIM:                                                                     \
    bwd_dq_store<DIM, E>(dq_acc.data(), dqp, ldqkv, H, rows, scale);           \
    break;
          QT_STORE(16) QT_STORE(32) QT_STORE(64) QT_STORE(128)
        }
      };
      emu::launch({static_cast<unsigned>((rows + rpb - 1) / rpb), 1, 1}, kThreads, 0, store_call);
    }
    check_bwd(ord ? "fused, ordered" : "fused, unordered");
    if (ord) {
      ordered = dqkv;
    } else if (ordered != dqkv) {
      // Emulated CTAs run in launch order, so the unordered adds happen in the ordered
      // variant's order: any difference is a bug in one of them.
      std::printf("  !! fused ordered and unordered differ\n");
      res.dq = INFINITY;
    }
  }
  if (D == 128) {  // the fused wgmma backward (sm_90a): dQ shares by bulk reduction
    std::fill(dqkv.begin(), dqkv.end(), poison);
    const int qt = (s.seq + kBQ - 1) / kBQ;
    const uint64_t tiles = static_cast<uint64_t>(s.batch) * H * qt;
    std::vector<float> acc(tiles * kBQ * D, 0.f);
    emu::register_buffer(acc.data(), acc.size() * 4);
    auto fwg_call = [&]() {
      bwd_fusedwg<128, E>(qp, ldqkv, kp, ldqkv, vp, ldqkv, dout.data(), lddo, lse_in.data(),
                          dsum.data(), segp, dkp, ldqkv, dvp, ldqkv, acc.data(), s.seq, H, KV,
                          s.window, scale);
    };
    emu::launch({static_cast<unsigned>(KV), static_cast<unsigned>((s.seq + 127) / 128), static_cast<unsigned>(s.batch)}, 256,
                FusedWgSmem<128>::kBytes, fwg_call);
    auto store_call = [&]() { bwd_dq_storewg<128, E>(acc.data(), dqp, ldqkv, s.seq, H, tiles, scale); };
    const uint64_t f4 = tiles * kBQ * D / 4;
    emu::launch({static_cast<unsigned>((f4 + kThreads - 1) / kThreads), 1, 1}, kThreads, 0, store_call);
    check_bwd("fused, wgmma, bulk dQ");
  }
  if (D == 128) {  // the stored-dS backward (sm_90a): dS^T blobs, then dQ = dS K
    // One kv head per chunk where there are several (the launcher's chunking), else all.
    const int chunk_kv = KV > 1 ? 1 : KV;
    const int group = H / KV;
    const uint64_t qt = static_cast<uint64_t>((s.seq + kBQ - 1) / kBQ);
    const uint64_t blobs = static_cast<uint64_t>(s.batch) * chunk_kv * group * qt * (qt + 1) / 2;
    // NaN-filled: a blob the dQ kernel reads but dK/dV never wrote poisons the result.
    std::vector<uint16_t> ds(blobs * DsBlob::kElems, 0x7fc0);
    emu::register_buffer(ds.data(), ds.size() * 2);
    std::fill(dqkv.begin(), dqkv.end(), poison);
    for (int kv0 = 0; kv0 < KV; kv0 += chunk_kv) {
      auto dkdvds_call = [&]() {
        bwd_dkdv<128, E, true, true>(qp, ldqkv, kp, ldqkv, vp, ldqkv, dout.data(), lddo,
                                     lse_in.data(), dsum.data(), segp, dkp, ldqkv, dvp, ldqkv,
                                     s.seq, H, KV, s.window, scale, ds.data(), kv0);
      };
      emu::launch({static_cast<unsigned>(chunk_kv), static_cast<unsigned>((s.seq + kBK - 1) / kBK), static_cast<unsigned>(s.batch)}, kThreads,
                  DkvSmem<128, true>::kBytes, dkdvds_call);
      auto dqds_call = [&]() {
        bwd_dqds<128, E>(kp, ldqkv, ds.data(), segp, dqp, ldqkv, s.seq, H, KV, s.window, scale,
                         kv0 * group);
      };
      emu::launch({static_cast<unsigned>(chunk_kv * group), static_cast<unsigned>(qt), static_cast<unsigned>(s.batch)}, kThreads,
                  DqDsSmem<128>::kBytes, dqds_call);
    }
    check_bwd("stored dS, wgmma, chunked");
  }
  return res;
}

}  // namespace

int main(int argc, char **argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  std::vector<Shape> shapes = {
      {2, 77, 4, 2, 32, 0, false, false},   // tiny model: batch 2, ragged end, GQA 2
      {1, 150, 2, 1, 64, 40, true, false},  // window < seq, packed documents
      {1, 70, 2, 2, 16, 0, true, false},    // d = 16, segments, MHA
      {1, 130, 4, 1, 128, 0, false, false}, // Mistral-like head dim, GQA 4, 3 tiles
      {1, 64, 2, 1, 128, 2, false, true},   // window 2, f16, exact tile multiple
      {2, 200, 4, 2, 128, 90, true, false}, // d 128 with window + segments, batch 2
      {2, 100, 2, 2, 64, 70, true, true},   // f16, window + segments, batch 2
      {2, 400, 2, 1, 64, 0, true, false},   // packed short documents: other documents' tiles skipped
  };
  if (quick) shapes.resize(2);
  // Other arguments: indices of the shapes to run (default all).
  std::vector<size_t> pick;
  for (int a = 1; a < argc; ++a)
    if (std::isdigit(static_cast<unsigned char>(argv[a][0]))) pick.push_back(std::stoul(argv[a]));
  bool all_ok = true;
  for (size_t i = 0; i < shapes.size(); ++i) {
    if (!pick.empty() && std::find(pick.begin(), pick.end(), i) == pick.end()) continue;
    const Shape &s = shapes[i];
    const auto t0 = std::chrono::steady_clock::now();
    const Result r = s.f16 ? run<F16>(s, 1000 + i) : run<Bf16>(s, 1000 + i);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // bf16: 2^-8 relative rounding of the operands and outputs; f16 is 8x finer.
    const double tol = s.f16 ? 4e-3 : 2e-2;
    const bool ok = r.o <= tol && r.lse <= 1e-3 && r.dq <= tol && r.dk <= tol && r.dv <= tol;
    all_ok &= ok;
    std::printf(
        "%s b%d s%d h%d kv%d d%d win%d seg%d %s: o %.2e lse(abs) %.2e dq %.2e dk %.2e dv %.2e "
        "(%.1fs)\n",
        ok ? "ok  " : "FAIL", s.batch, s.seq, s.heads, s.kv, s.d, s.window, s.seg,
        s.f16 ? "f16" : "bf16", r.o, r.lse, r.dq, r.dk, r.dv, secs);
  }
  std::printf(all_ok ? "all emulated attention checks passed\n" : "SOME CHECKS FAILED\n");
  return all_ok ? 0 : 1;
}
