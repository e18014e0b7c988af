// Explicitly vectorised float32 math and Philox for the CPU estimator kernels, written with
// GCC vector extensions: the code says "16 floats at a time" once, and each instruction set's
// build of a kernel (AVX-512, AVX2, baseline SSE2; estimators.cpp) lowers it to its own
// registers. libm's scalar expf/logf/sinf would cost more than the whole rest of a fused kernel.
//
// Comparisons are the exception (see cmp): the functions that compare take W, the number of
// lanes the instruction set compares at once.
//
// Polynomials are the Cephes single-precision ones (about 1-2 ulp on the ranges used). The
// file is compiled with -ffp-contract=off and every element (tails included) goes through the
// same vector code, so a key gives the same samples on every x86 machine.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common/philox.h"

#define SG_INLINE inline __attribute__((always_inline))

namespace stochgate {
namespace vm {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));

SG_INLINE vf splat(float v) { return vf{} + v; }
SG_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
SG_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
SG_INLINE vf as_float(vu v) {
  vf f;
  std::memcpy(&f, &v, sizeof(f));
  return f;
}
SG_INLINE vu as_uint(vf v) {
  vu u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}
// mask lanes are all-ones or zero (a vector comparison's result). Bitwise, so GCC never falls
// back to per-lane branches (it does for `mask ? a : b` when mask is not a bare comparison).
SG_INLINE vf select(vi mask, vf a, vf b) {
  const vu m = (vu)mask;
  return as_float((m & as_uint(a)) | (~m & as_uint(b)));
}

// Lane-wise comparison Op of two 16-lane vectors (float or int32 lanes), done in pieces of W
// lanes: W = 16 on AVX-512, 8 on AVX2, 4 on SSE2, the widest each compares in one instruction.
// GCC lowers a comparison wider than the target's vectors lane by lane (a scalar compare, a
// setcc and an insert per lane; it splits arithmetic, not comparisons): with 16-lane
// comparisons the AVX2 build of the straight-through sampler ran ~100 such instructions per 16
// elements and took 194 ms for 16M elements on 2 cores (a Zen 3 VM), about 4x the rest of it.
template <class E, int Bytes> struct Piece { typedef E type __attribute__((vector_size(Bytes))); };

template <int W, class Op, class V>
SG_INLINE vi cmp(V a, V b) {
  static_assert(W == 4 || W == 8 || W == kLanes, "W: 4, 8 or 16 lanes");
  if constexpr (W == kLanes) {
    return Op::op(a, b);
  } else {
    using E = std::remove_cv_t<std::remove_reference_t<decltype(a[0])>>;
    using P = typename Piece<E, 4 * W>::type;
    using PI = typename Piece<int32_t, 4 * W>::type;
    vi r;
#pragma GCC unroll 4
    for (int q = 0; q < kLanes / W; ++q) {
      P x, y;
      std::memcpy(&x, reinterpret_cast<const char*>(&a) + sizeof(P) * q, sizeof(P));
      std::memcpy(&y, reinterpret_cast<const char*>(&b) + sizeof(P) * q, sizeof(P));
      const PI m = Op::op(x, y);
      std::memcpy(reinterpret_cast<char*>(&r) + sizeof(P) * q, &m, sizeof(P));
    }
    return r;
  }
}
struct OpLt { template <class P> static SG_INLINE auto op(P a, P b) { return a < b; } };
struct OpLe { template <class P> static SG_INLINE auto op(P a, P b) { return a <= b; } };
struct OpEq { template <class P> static SG_INLINE auto op(P a, P b) { return a == b; } };
struct OpNe { template <class P> static SG_INLINE auto op(P a, P b) { return a != b; } };
template <int W> SG_INLINE vi lt(vf a, vf b) { return cmp<W, OpLt>(a, b); }
template <int W> SG_INLINE vi le(vf a, vf b) { return cmp<W, OpLe>(a, b); }
template <int W> SG_INLINE vi eq(vf a, vf b) { return cmp<W, OpEq>(a, b); }
template <int W> SG_INLINE vi eq(vi a, vi b) { return cmp<W, OpEq>(a, b); }
template <int W> SG_INLINE vi isnan(vf x) { return cmp<W, OpNe>(x, x); }

// Round to nearest (even) for |x| < 2^22: the float-add trick, no libm call.
SG_INLINE vf round_nearest(vf x) {
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23
  return (x + magic) - magic;
}

// exp(x) for x in [-87, 87]; callers clamp and handle saturated ends themselves.
SG_INLINE vf exp_core(vf x) {
  const vf n = round_nearest(x * 1.44269504088896341f);
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi e = __builtin_convertvector(n, vi) + 127;
  return p * as_float((vu)e << 23);
}

// sigmoid(x) = 1 / (1 + exp(-x)): exactly 0 below x = -88 (float sigmoid is denormal or 0
// there), 1 above 87 (1 + exp(-x) rounds to 1 anyway), NaN for NaN.
template <int W>
SG_INLINE vf sigmoid(vf x) {
  vf t = select(lt<W>(x, splat(-87.0f)), splat(-87.0f), x);
  t = select(lt<W>(splat(87.0f), t), splat(87.0f), t);
  const vf p = 1.0f / (1.0f + exp_core(-t));
  const vf sat = select(lt<W>(x, splat(-88.0f)), splat(0.0f), p);
  return select(isnan<W>(x), x, sat);
}

// log(x) for positive normal x (the uniforms of philox.h are >= 2^-24).
template <int W>
SG_INLINE vf log_pos(vf x) {
  const vu b = as_uint(x);
  vf e = __builtin_convertvector((vi)((b >> 23) & 0xffu) - 126, vf);
  vf m = as_float((b & 0x7fffffu) | 0x3f000000u);  // mantissa in [0.5, 1)
  const vi small = lt<W>(m, splat(0.707106781186547524f));
  e = select(small, e - 1.0f, e);
  m = select(small, m + m - 1.0f, m - 1.0f);
  const vf z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return (m + y) + e * 0.693359375f;
}

// (cos, sin) of 2 pi u for u in [0, 1): quadrant from round(4u), then the Cephes kernels on
// [-pi/4, pi/4]. 4u is exact for 24-bit uniforms.
template <int W>
SG_INLINE void cossin_2pi(vf u, vf& c, vf& s) {
  const vf t = 4.0f * u;
  const vf q = round_nearest(t);
  const vf a = (t - q) * 1.57079632679489662f;
  const vf z = a * a;
  const vf sa = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * a + a;
  const vf ca = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                0.5f * z + 1.0f;
  const vi quadrant = __builtin_convertvector(q, vi) & 3;
  const vi q0 = eq<W>(quadrant, vi{}), q1 = eq<W>(quadrant, vi{} + 1), q2 = eq<W>(quadrant, vi{} + 2);
  c = select(q0, ca, select(q1, -sa, select(q2, -ca, sa)));
  s = select(q0, sa, select(q1, ca, select(q2, -sa, -ca)));
}

// 24-bit uniforms of philox.h, 16 at a time.
SG_INLINE vf uniform_co(vu r) { return __builtin_convertvector(r >> 8, vf) * kTwoPowMinus24; }
SG_INLINE vf uniform_oo(vu r) {
  return __builtin_convertvector(((r >> 9) << 1) | 1u, vf) * kTwoPowMinus24;
}

// Philox4x32-10 of the 16 groups g0 .. g0 + 15 (one block of philox.h's layout; g0 a multiple
// of 16, so the groups share the high word of the counter): w[l] holds lane l of each group,
// i.e. elements 16 l .. 16 l + 15 of the block. The same rounds as philox4x32_10, run on W
// groups at a time (the rounds are lane-wise; with 16 at once the AVX2 build kept its state on
// the stack). The 32x32 -> 64-bit products are done on the even and odd 32-bit lanes as 64-bit
// lanes, pmuludq written out (mul_lo32), so nothing is shuffled.
//
// mul_lo32: the 64-bit products of the low 32 bits of each 64-bit lane. GCC does not find
// pmuludq in `(q & 0xffffffff) * m`: it emitted a full 64-bit multiply (three pmuludq and
// shifts) or, for the constant multipliers, a chain of shifts and adds.
template <int W>
SG_INLINE typename Piece<uint64_t, 4 * W>::type mul_lo32(typename Piece<uint64_t, 4 * W>::type a,
                                                          typename Piece<uint64_t, 4 * W>::type b) {
#if defined(__x86_64__) && defined(__GNUC__)
  typename Piece<uint64_t, 4 * W>::type r;
  if constexpr (W == 16) {
    asm("vpmuludq %2, %1, %0" : "=v"(r) : "v"(a), "v"(b));
  } else if constexpr (W == 8) {
    asm("vpmuludq %2, %1, %0" : "=x"(r) : "x"(a), "x"(b));
  } else {
    r = a;
    asm("pmuludq %1, %0" : "+x"(r) : "x"(b));
  }
  return r;
#else
  return (a & 0xffffffffull) * (b & 0xffffffffull);
#endif
}

template <int W>
SG_INLINE typename Piece<uint32_t, 4 * W>::type mul_hi_lo(typename Piece<uint32_t, 4 * W>::type c,
                                                           uint32_t m,
                                                           typename Piece<uint32_t, 4 * W>::type& lo) {
  using U = typename Piece<uint32_t, 4 * W>::type;
  using Q = typename Piece<uint64_t, 4 * W>::type;
  Q q;
  std::memcpy(&q, &c, sizeof(q));
  const Q mq = Q{} + static_cast<uint64_t>(m);
  const Q even = mul_lo32<W>(q, mq);        // products of lanes 0, 2, 4, ...
  const Q odd = mul_lo32<W>(q >> 32, mq);   // products of lanes 1, 3, 5, ...
  const Q hi_q = (even >> 32) | (odd & 0xffffffff00000000ull);
  const Q lo_q = (even & 0xffffffffull) | (odd << 32);
  U hi;
  std::memcpy(&hi, &hi_q, sizeof(hi));
  std::memcpy(&lo, &lo_q, sizeof(lo));
  return hi;
}

template <int W>
SG_INLINE void philox16(uint64_t seed, uint64_t offset, uint64_t g0, vu w[4]) {
  using U = typename Piece<uint32_t, 4 * W>::type;
  U iota;
  for (int j = 0; j < W; ++j) iota[j] = static_cast<uint32_t>(j);
#pragma GCC unroll 4
  for (int piece = 0; piece < kLanes / W; ++piece) {
    U c0 = U{} + static_cast<uint32_t>(g0 + static_cast<uint64_t>(piece * W));
    c0 += iota;
    U c1 = U{} + static_cast<uint32_t>(g0 >> 32);
    U c2 = U{} + static_cast<uint32_t>(offset);
    U c3 = U{} + static_cast<uint32_t>(offset >> 32);
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      U lo0, lo1;
      const U hi0 = mul_hi_lo<W>(c0, 0xD2511F53u, lo0);
      const U hi1 = mul_hi_lo<W>(c2, 0xCD9E8D57u, lo1);
      c0 = hi1 ^ c1 ^ k0;
      c2 = hi0 ^ c3 ^ k1;
      c1 = lo1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const size_t at = sizeof(U) * piece;
    std::memcpy(reinterpret_cast<char*>(&w[0]) + at, &c0, sizeof(U));
    std::memcpy(reinterpret_cast<char*>(&w[1]) + at, &c1, sizeof(U));
    std::memcpy(reinterpret_cast<char*>(&w[2]) + at, &c2, sizeof(U));
    std::memcpy(reinterpret_cast<char*>(&w[3]) + at, &c3, sizeof(U));
  }
}

}  // namespace vm
}  // namespace stochgate
