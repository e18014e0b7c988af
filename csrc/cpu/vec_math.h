// Explicitly vectorised float32 math and Philox for the CPU estimator kernels, written with
// GCC vector extensions: the code says "16 floats at a time" once, and each ISA clone
// (SG_CPU_CLONES: AVX-512, AVX2, baseline SSE2) lowers it to its own registers. libm's scalar
// expf/logf/sinf would cost more than the whole rest of a fused kernel.
//
// Polynomials are the Cephes single-precision ones (about 1-2 ulp on the ranges used). The
// file is compiled with -ffp-contract=off and every element (tails included) goes through the
// same vector code, so a key gives the same samples on every x86 machine.
#pragma once

#include <cstdint>
#include <cstring>

#include "../common/philox.h"

#define SG_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SG_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SG_CPU_CLONES
#endif

namespace stochgate {
namespace vm {

constexpr int kLanes = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint64_t vq8 __attribute__((vector_size(64)));

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
SG_INLINE vi isnan(vf x) { return x != x; }

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
SG_INLINE vf sigmoid(vf x) {
  vf t = select(x < -87.0f, splat(-87.0f), x);
  t = select(t > 87.0f, splat(87.0f), t);
  const vf p = 1.0f / (1.0f + exp_core(-t));
  const vf sat = select(x < -88.0f, splat(0.0f), p);
  return select(isnan(x), x, sat);
}

// log(x) for positive normal x (the uniforms of philox.h are >= 2^-24).
SG_INLINE vf log_pos(vf x) {
  const vu b = as_uint(x);
  vf e = __builtin_convertvector((vi)((b >> 23) & 0xffu) - 126, vf);
  vf m = as_float((b & 0x7fffffu) | 0x3f000000u);  // mantissa in [0.5, 1)
  const vi small = m < 0.707106781186547524f;
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
SG_INLINE void cossin_2pi(vf u, vf& c, vf& s) {
  const vf t = 4.0f * u;
  const vf q = round_nearest(t);
  const vf a = (t - q) * 1.57079632679489662f;
  const vf z = a * a;
  const vf sa = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * a + a;
  const vf ca = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                0.5f * z + 1.0f;
  const vi quadrant = __builtin_convertvector(q, vi) & 3;
  c = select(quadrant == 0, ca, select(quadrant == 1, -sa, select(quadrant == 2, -ca, sa)));
  s = select(quadrant == 0, sa, select(quadrant == 1, ca, select(quadrant == 2, -sa, -ca)));
}

// 24-bit uniforms of philox.h, 16 at a time.
SG_INLINE vf uniform_co(vu r) { return __builtin_convertvector(r >> 8, vf) * kTwoPowMinus24; }
SG_INLINE vf uniform_oo(vu r) {
  return __builtin_convertvector(((r >> 9) << 1) | 1u, vf) * kTwoPowMinus24;
}

// Philox4x32-10 of the 16 groups g0 .. g0 + 15 (one block of philox.h's layout): w[l] holds
// lane l of each group, i.e. elements 16 l .. 16 l + 15 of the block. The same rounds as
// philox4x32_10; the 32x32 -> 64-bit products are done on the even and odd 32-bit lanes as
// 64-bit lanes (one vpmuludq each), so nothing is shuffled.
SG_INLINE vu mul_hi_lo(vu c, uint64_t m, vu& lo) {
  vq8 q;
  std::memcpy(&q, &c, sizeof(q));
  const vq8 even = (q & 0xffffffffull) * m;  // products of lanes 0, 2, 4, ...
  const vq8 odd = (q >> 32) * m;              // products of lanes 1, 3, 5, ...
  const vq8 hi_q = (even >> 32) | (odd & 0xffffffff00000000ull);
  const vq8 lo_q = (even & 0xffffffffull) | (odd << 32);
  vu hi;
  std::memcpy(&hi, &hi_q, sizeof(hi));
  std::memcpy(&lo, &lo_q, sizeof(lo));
  return hi;
}

SG_INLINE void philox16(uint64_t seed, uint64_t offset, uint64_t g0, vu w[4]) {
  vu c0, c1;
  for (int j = 0; j < kLanes; ++j) {
    const uint64_t g = g0 + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(g);
    c1[j] = static_cast<uint32_t>(g >> 32);
  }
  vu c2 = vu{} + static_cast<uint32_t>(offset);
  vu c3 = vu{} + static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    vu lo0, lo1;
    const vu hi0 = mul_hi_lo(c0, 0xD2511F53u, lo0);
    const vu hi1 = mul_hi_lo(c2, 0xCD9E8D57u, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c2 = hi0 ^ c3 ^ k1;
    c1 = lo1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  w[0] = c0;
  w[1] = c1;
  w[2] = c2;
  w[3] = c3;
}

}  // namespace vm
}  // namespace stochgate
