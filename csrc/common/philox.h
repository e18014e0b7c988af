// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
// written once for host and device so that CPU and CUDA kernels given the same key draw
// bit-identical integers.
//
// Stream layout used by every sampling op in stochgate. Group g's four 32-bit words come from
//   philox(counter = (g_lo, g_hi, offset_lo, offset_hi), key = (seed_lo, seed_hi)),
// where (seed, offset) is the op's `key` tensor, drawn from a torch.Generator by the Python
// wrapper. Elements are laid out in blocks of 64 = 16 groups x 4 lanes, lane-major: element
// i = 64 b + 16 l + j takes lane l of group 16 b + j (element_of below). So a 16-wide vector
// of one lane over 16 consecutive groups is 16 consecutive elements: the CPU kernels need no
// transpose, and 16 neighbouring GPU threads (one group each) store 16 neighbouring elements.
// A Gaussian is drawn by Box-Muller from lanes (0, 1) or (2, 3) of one group.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SG_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: the CPU kernels call these from ISA-specific clones, which GCC only
// vectorises through when the callee is inlined.
#define SG_HD inline __attribute__((always_inline))
#else
#define SG_HD inline
#endif

namespace stochgate {

struct U32x4 {
  uint32_t x, y, z, w;
};

SG_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// One round with round key (k0, k1).
SG_HD U32x4 philox_round(const U32x4& ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo32(M0, ctr.x, hi0, lo0);
  mulhilo32(M1, ctr.z, hi1, lo1);
  return U32x4{hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
}

SG_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    ctr = philox_round(ctr, k0, k1);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return ctr;
}

// The ten round keys of one seed, for kernels that draw many groups with it: worked out once
// instead of once per group.
struct PhiloxKeys {
  uint32_t k0[10], k1[10];
  SG_HD explicit PhiloxKeys(uint64_t seed) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int r = 0; r < 10; ++r, a += kPhiloxW0, b += kPhiloxW1) {
      k0[r] = a;
      k1[r] = b;
    }
  }
};

// philox_group with the round keys given: the same four words.
SG_HD U32x4 philox_group(const PhiloxKeys& keys, uint64_t offset, uint64_t g) {
  U32x4 ctr{static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32),
            static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)};
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) ctr = philox_round(ctr, keys.k0[r], keys.k1[r]);
  return ctr;
}

// The four random words of group g for the stream (seed, offset).
SG_HD U32x4 philox_group(uint64_t seed, uint64_t offset, uint64_t g) {
  return philox4x32_10(
      U32x4{static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32),
            static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)},
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

constexpr int kBlockGroups = 16;
constexpr int kBlockElems = 4 * kBlockGroups;

// Index of the element that takes lane l of group g.
SG_HD int64_t element_of(int64_t g, int l) {
  return (g / kBlockGroups) * kBlockElems + l * kBlockGroups + (g % kBlockGroups);
}

// Number of groups whose blocks cover n elements.
SG_HD int64_t groups_for(int64_t n) {
  return (n + kBlockElems - 1) / kBlockElems * kBlockGroups;
}

SG_HD uint32_t lane(const U32x4& r, int i) {
  return i == 0 ? r.x : i == 1 ? r.y : i == 2 ? r.z : r.w;
}

// 24-bit uniforms: exact in float, so CPU and CUDA agree bit for bit.
constexpr float kTwoPowMinus24 = 5.9604644775390625e-08f;

// u in [0, 1): the Bernoulli draw is 1[u < p], so P(h = 1) = p for every p representable
// on the 2^-24 grid and within 2^-24 of p otherwise.
SG_HD float uniform_co(uint32_t r) { return static_cast<float>(r >> 8) * kTwoPowMinus24; }
// u in (0, 1): odd multiples of 2^-24, exact in float, for logarithms (Box-Muller radius,
// logistic quantile).
SG_HD float uniform_oo(uint32_t r) {
  return static_cast<float>(((r >> 9) << 1) | 1u) * kTwoPowMinus24;
}

}  // namespace stochgate
