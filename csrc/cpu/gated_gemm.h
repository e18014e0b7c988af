// Register-tiled float32 micro-kernels of the gated matmuls (csrc/cpu/gated_linear.cpp),
// written once with GCC vector extensions and instantiated per ISA: the drivers are
// templates over an ISA trait (vector width and tile shape) called from functions compiled
// with target("avx512f,...") / target("avx2,fma") / the baseline, picked at run time.
//
// Two forms, both reading rows of the operands through the per-chunk row lists (no gathered
// copies of x or h):
// - dot form (long reduction, short outputs): a tile of DR rows x DU units keeps DR*DU
//   vector accumulators over K, horizontally reduced once at the end (shuffle tree);
// - outer-product form: a tile of MR rows x NV vectors of columns, per reduction step MR
//   broadcasts, NV vector loads, MR*NV FMAs.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>  // std::integer_sequence


#define SG_GG_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SG_GG_MULTI 1
#define SG_GG_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define SG_GG_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define SG_GG_MULTI 0
#define SG_GG_TARGET_AVX512
#define SG_GG_TARGET_AVX2
#endif

namespace stochgate {
// The instruction set the float32 kernels run here: 2 AVX-512F, 1 AVX2+FMA, 0 baseline
// (gated_linear.cpp). STOCHGATE_CPU_ISA=avx2|base lowers it (the tests run every build).
int gg_isa();
}  // namespace stochgate

// NAME##_avx512 / _avx2 / _base: NAME<Isa>(a, i0, i1), a template over the ISA trait below,
// compiled for each instruction set; NAME##_run(isa, a, i0, i1) calls the one gg_isa() picked.
#define SG_GG_VARIANTS(NAME, ARGS)                                                        \
  SG_GG_TARGET_AVX512 void NAME##_avx512(const ARGS& a, int64_t i0, int64_t i1) {         \
    NAME<gg::IsaAvx512>(a, i0, i1);                                                       \
  }                                                                                       \
  SG_GG_TARGET_AVX2 void NAME##_avx2(const ARGS& a, int64_t i0, int64_t i1) {             \
    NAME<gg::IsaAvx2>(a, i0, i1);                                                         \
  }                                                                                       \
  void NAME##_base(const ARGS& a, int64_t i0, int64_t i1) { NAME<gg::IsaBase>(a, i0, i1); } \
  void NAME##_run(int isa, const ARGS& a, int64_t i0, int64_t i1) {                       \
    if (isa == 2) NAME##_avx512(a, i0, i1);                                               \
    else if (isa == 1) NAME##_avx2(a, i0, i1);                                            \
    else NAME##_base(a, i0, i1);                                                          \
  }

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace stochgate {
namespace gg {

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef int32_t i8v __attribute__((vector_size(32)));
typedef int32_t i4v __attribute__((vector_size(16)));

template <class V> struct VecInfo;
template <> struct VecInfo<v16> { using I = i16v; static constexpr int L = 16; };
template <> struct VecInfo<v8> { using I = i8v; static constexpr int L = 8; };
template <> struct VecInfo<v4> { using I = i4v; static constexpr int L = 4; };

// ISA traits: vector type, dot tile (DR rows x DU units), outer tile (MR rows x NV vectors).
struct IsaAvx512 { using V = v16; static constexpr int DR = 4, DU = 6, MR = 6, NV = 4; };
struct IsaAvx2 { using V = v8; static constexpr int DR = 3, DU = 4, MR = 6, NV = 2; };
struct IsaBase { using V = v4; static constexpr int DR = 3, DU = 4, MR = 6, NV = 2; };

template <class V> SG_GG_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <class V> SG_GG_INLINE void vstore(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
// Broadcast of a scalar in memory. GCC 12 lowers the portable spellings (`V{} + s`,
// `V{s, s, ...}`, a zero-mask shuffle) of a 64-byte vector to a scalar add plus a port-5
// shuffle, 16 masked lane inserts, or a trip through the stack. One vbroadcastss from memory
// is a pure load uop; asm carries no target check, and each width is only instantiated in
// drivers compiled for its ISA (AVX-512F for 16 lanes, AVX for 8).
template <class V> SG_GG_INLINE V vbcast(const float* p) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (VecInfo<V>::L == 16) {
    V r;
    asm("vbroadcastss %1, %0" : "=v"(r) : "m"(*p));
    return r;
  } else if constexpr (VecInfo<V>::L == 8) {
    V r;
    asm("vbroadcastss %1, %0" : "=x"(r) : "m"(*p));
    return r;
  }
#endif
  return V{} + *p;
}

// Broadcast of a scalar held in a register (vbroadcastss from xmm: AVX2 for 8 lanes,
// AVX-512F for 16), for the same reasons as vbcast.
template <class V> SG_GG_INLINE V vsplat(float s) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (VecInfo<V>::L == 16) {
    V r;
    asm("vbroadcastss %1, %0" : "=v"(r) : "v"(s));
    return r;
  } else if constexpr (VecInfo<V>::L == 8) {
    V r;
    asm("vbroadcastss %1, %0" : "=x"(r) : "x"(s));
    return r;
  }
#endif
  return V{} + s;
}

// One level of the horizontal-sum tree: lanes of a and b hold partial sums of L/(2S) outputs
// each, in groups of 2S lanes; the result holds twice as many outputs in groups of S lanes
// (a's outputs in the low half, b's in the high half).
template <class V, int S> SG_GG_INLINE V hcombine(V a, V b) {
  constexpr int L = VecInfo<V>::L;
  using I = typename VecInfo<V>::I;
  I m1, m2;
#pragma GCC unroll 16
  for (int l = 0; l < L; ++l) {
    const int t = l < L / 2 ? l : l - L / 2;
    const int idx = (t / S) * 2 * S + t % S + (l < L / 2 ? 0 : L);
    m1[l] = idx;
    m2[l] = idx + S;
  }
  return __builtin_shuffle(a, b, m1) + __builtin_shuffle(a, b, m2);
}

// out[i] = sum of the lanes of acc[i], i < n (n <= L); lanes of missing vectors are zero.
template <class V, int n> SG_GG_INLINE V hsum_group(const V* acc) {
  constexpr int L = VecInfo<V>::L;
  V t[L];
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) t[i] = i < n ? acc[i] : V{};
  int cnt = L;
  if constexpr (L >= 16) {
#pragma GCC unroll 16
    for (int i = 0; i < 8; ++i) t[i] = hcombine<V, 8>(t[2 * i], t[2 * i + 1]);
  }
  if constexpr (L >= 8) {
#pragma GCC unroll 16
    for (int i = 0; i < 4; ++i) t[i] = hcombine<V, 4>(t[2 * i], t[2 * i + 1]);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 2; ++i) t[i] = hcombine<V, 2>(t[2 * i], t[2 * i + 1]);
  (void)cnt;
  return hcombine<V, 1>(t[0], t[1]);
}

template <class V, int n> SG_GG_INLINE void hsum_all(const V* acc, float* out) {
  constexpr int L = VecInfo<V>::L;
  if constexpr (n > 0) {
    constexpr int m = n < L ? n : L;
    const V s = hsum_group<V, m>(acc);
    float tmp[L];
    vstore(tmp, s);
#pragma GCC unroll 16
    for (int i = 0; i < m; ++i) out[i] = tmp[i];
    if constexpr (n > L) hsum_all<V, n - L>(acc + L, out + L);
  }
}

// Dot tile over k in [k0, k1) (k1 - k0 a multiple of L unless `last`): accumulators start
// from part (if load) or zero; if last, out[r * NU + u] = <x[r][0:k1), w[u][0:k1)> (horizontal
// sums, scalar K tail), else the vector partial sums are stored to part. PF: prefetch (into
// L2) rows xn[r] at the same k as the loads (the next row tile).
template <class V, int NR, int NU, bool PF>
SG_GG_INLINE void dot_tile(const float* const* xr, const float* const* wr, int64_t k0, int64_t k1,
                           float* part, bool load, bool last, float* out,
                           const float* const* xn) {
  constexpr int L = VecInfo<V>::L;
  V acc[NR * NU];
  if (load) {
#pragma GCC unroll 32
    for (int i = 0; i < NR * NU; ++i) acc[i] = vload<V>(part + i * L);
  } else {
#pragma GCC unroll 32
    for (int i = 0; i < NR * NU; ++i) acc[i] = V{};
  }
  const float* xp[NR];
  const float* wp[NU];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) xp[r] = xr[r];
#pragma GCC unroll 8
  for (int u = 0; u < NU; ++u) wp[u] = wr[u];
  const float* pn[NR];
#pragma GCC unroll 8
  for (int r = 0; r < NR; ++r) pn[r] = xn[r];
  const int64_t kv = k1 - (k1 - k0) % L;
  for (int64_t k = k0; k < kv; k += L) {
    if constexpr (PF) {
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) __builtin_prefetch(pn[r] + k, 0, 2);  // prefetcht1: into L2
    }
    V xv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) xv[r] = vload<V>(xp[r] + k);
#pragma GCC unroll 8
    for (int u = 0; u < NU; ++u) {
      const V wv = vload<V>(wp[u] + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[r * NU + u] += xv[r] * wv;
    }
  }
  if (!last) {
#pragma GCC unroll 32
    for (int i = 0; i < NR * NU; ++i) vstore(part + i * L, acc[i]);
    return;
  }
  hsum_all<V, NR * NU>(acc, out);
  if (kv < k1) {
    for (int r = 0; r < NR; ++r) {
      for (int u = 0; u < NU; ++u) {
        float s = 0.f;
        for (int64_t k = kv; k < k1; ++k) s += xp[r][k] * wp[u][k];
        out[r * NU + u] += s;
      }
    }
  }
}

// Outer-product tile, A by rows: acc[i][v] = sum_p a[i][p] * b[p * ldb + v * L].
template <class V, int MR, int NV>
SG_GG_INLINE void outer_rows(int64_t P, const float* const* a, const float* b, int64_t ldb,
                             V (&out)[MR][NV]) {
  V acc[MR][NV];
  constexpr int L = VecInfo<V>::L;
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  }
  const float* ap[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) ap[i] = a[i];
  for (int64_t p = 0; p < P; ++p) {
    V bv[NV];
    const float* bp = b + p * ldb;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = vload<V>(bp + v * L);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const V av = vbcast<V>(ap[i] + p);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) out[i][v] = acc[i][v];
  }
}

// Outer-product tile, A and B by reduction index q through optional row lists:
// acc[i][v] = sum_q A(q)[i] * B(q)[v * L], A(q) = a + (ai ? ai[q] : q) * lda,
// B(q) = b + (bi ? bi[q] : q) * ldb.
template <class V, int MR, int NV>
SG_GG_INLINE void outer_gather(int64_t P, const float* a, int64_t lda, const int64_t* ai,
                               const float* b, int64_t ldb, const int64_t* bi, V (&out)[MR][NV]) {
  V acc[MR][NV];
  constexpr int L = VecInfo<V>::L;
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  }
  for (int64_t q = 0; q < P; ++q) {
    const float* ap = a + (ai ? ai[q] : q) * lda;
    const float* bp = b + (bi ? bi[q] : q) * ldb;
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = vload<V>(bp + v * L);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const V av = vbcast<V>(ap + i);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] += av * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) out[i][v] = acc[i][v];
  }
}

// In-register transpose of an L x L block held in rows r[0..L): log2(L) stages; at block size
// S, rows i and i + S (i mod 2S < S) exchange their off-diagonal S x S blocks through two
// two-source shuffles with constant masks.
template <class I, int L, int S, bool HI, int... j>
constexpr I transpose_mask(std::integer_sequence<int, j...>) {
  return I{(HI ? ((j % (2 * S) < S) ? j + S : L + j) : ((j % (2 * S) < S) ? j : L + j - S))...};
}
template <class V, int S>
SG_GG_INLINE void transpose_stage(V* r) {
  using I = typename VecInfo<V>::I;
  constexpr int L = VecInfo<V>::L;
  constexpr I lo = transpose_mask<I, L, S, false>(std::make_integer_sequence<int, L>{});
  constexpr I hi = transpose_mask<I, L, S, true>(std::make_integer_sequence<int, L>{});
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) {
    if (i % (2 * S) >= S) continue;
    const V a = r[i], b = r[i + S];
    r[i] = __builtin_shuffle(a, b, lo);
    r[i + S] = __builtin_shuffle(a, b, hi);
  }
  if constexpr (S > 1) transpose_stage<V, S / 2>(r);
}

// panel[p * ldp + u] = w[u * ldw + p] for u < nu, p < kw: a (nu, kw) block of row-major
// weights, transposed into a K-major panel. nu is a multiple of L.
template <class V>
SG_GG_INLINE void pack_transposed(const float* w, int64_t ldw, int nu, int64_t kw, float* panel,
                                  int64_t ldp) {
  constexpr int L = VecInfo<V>::L;
  const int64_t kv = kw / L * L;
  for (int u0 = 0; u0 < nu; u0 += L) {
    for (int64_t p0 = 0; p0 < kv; p0 += L) {
      V r[L];
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) r[i] = vload<V>(w + (u0 + i) * ldw + p0);
      transpose_stage<V, L / 2>(r);
#pragma GCC unroll 16
      for (int i = 0; i < L; ++i) vstore(panel + (p0 + i) * ldp + u0, r[i]);
    }
    for (int64_t p = kv; p < kw; ++p) {
      for (int i = 0; i < L; ++i) panel[p * ldp + u0 + i] = w[(u0 + i) * ldw + p];
    }
  }
}

// Writes (ADD: adds) the first `ncols` columns of acc row i to c[i] (all NV*L if ncols is
// full), rows i < MR.
template <class V, int MR, int NV, bool ADD>
SG_GG_INLINE void tile_out(const V (&acc)[MR][NV], float* const* c, int ncols) {
  constexpr int L = VecInfo<V>::L;
  if (ncols == NV * L) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        V r = acc[i][v];
        if (ADD) r += vload<V>(c[i] + v * L);
        vstore(c[i] + v * L, r);
      }
    }
    return;
  }
  for (int i = 0; i < MR; ++i) {
    float tmp[NV * L];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(tmp + v * L, acc[i][v]);
    if (ADD) {
      for (int j = 0; j < ncols; ++j) c[i][j] += tmp[j];
    } else {
      std::memcpy(c[i], tmp, ncols * sizeof(float));
    }
  }
}

}  // namespace gg
}  // namespace stochgate

#pragma GCC diagnostic pop

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace stochgate {
namespace gg {

// Run-time tile shapes -> compile-time kernels (tails of rows/units/columns).
#define SG_GG_DOT_ARGS const float *const *xr, const float *const *wr, int64_t k0, int64_t k1, \
                       float *part, bool load, bool last, float *out, const float *const *xn
#define SG_GG_DOT_PASS xr, wr, k0, k1, part, load, last, out, xn
template <class V, int NR, int NU, bool PF>
SG_GG_INLINE void dot_pick_u(int nu, SG_GG_DOT_ARGS) {
  if constexpr (NU >= 1) {
    if (nu == NU) {
      dot_tile<V, NR, NU, PF>(SG_GG_DOT_PASS);
      return;
    }
    dot_pick_u<V, NR, NU - 1, PF>(nu, SG_GG_DOT_PASS);
  }
}
template <class V, int NR, int NU, bool PF>
SG_GG_INLINE void dot_pick(int nr, int nu, SG_GG_DOT_ARGS) {
  if constexpr (NR >= 1) {
    if (nr == NR) {
      dot_pick_u<V, NR, NU, PF>(nu, SG_GG_DOT_PASS);
      return;
    }
    dot_pick<V, NR - 1, NU, PF>(nr, nu, SG_GG_DOT_PASS);
  }
}

// Outer-product tile with rows-form A, written (ADD: added) to c.
template <class V, int MR, int NV, bool ADD>
SG_GG_INLINE void outer_rows_pick_v(int nv, int64_t P, const float* const* a, const float* b,
                                    int64_t ldb, float* const* c, int ncols) {
  if constexpr (NV >= 1) {
    if (nv == NV) {
      V acc[MR][NV];
      outer_rows<V, MR, NV>(P, a, b, ldb, acc);
      tile_out<V, MR, NV, ADD>(acc, c, ncols);
      return;
    }
    outer_rows_pick_v<V, MR, NV - 1, ADD>(nv, P, a, b, ldb, c, ncols);
  }
}
template <class V, int MR, int NV, bool ADD>
SG_GG_INLINE void outer_rows_pick(int mr, int nv, int64_t P, const float* const* a,
                                  const float* b, int64_t ldb, float* const* c, int ncols) {
  if constexpr (MR >= 1) {
    if (mr == MR) {
      outer_rows_pick_v<V, MR, NV, ADD>(nv, P, a, b, ldb, c, ncols);
      return;
    }
    outer_rows_pick<V, MR - 1, NV, ADD>(mr, nv, P, a, b, ldb, c, ncols);
  }
}

// Outer-product tile with gather-form A and B, stored to c.
template <class V, int MR, int NV>
SG_GG_INLINE void outer_gather_pick_v(int nv, int64_t P, const float* a, int64_t lda,
                                      const int64_t* ai, const float* b, int64_t ldb,
                                      const int64_t* bi, float* const* c, int ncols) {
  if constexpr (NV >= 1) {
    if (nv == NV) {
      V acc[MR][NV];
      outer_gather<V, MR, NV>(P, a, lda, ai, b, ldb, bi, acc);
      tile_out<V, MR, NV, false>(acc, c, ncols);
      return;
    }
    outer_gather_pick_v<V, MR, NV - 1>(nv, P, a, lda, ai, b, ldb, bi, c, ncols);
  }
}
template <class V, int MR, int NV>
SG_GG_INLINE void outer_gather_pick(int mr, int nv, int64_t P, const float* a, int64_t lda,
                                    const int64_t* ai, const float* b, int64_t ldb,
                                    const int64_t* bi, float* const* c, int ncols) {
  if constexpr (MR >= 1) {
    if (mr == MR) {
      outer_gather_pick_v<V, MR, NV>(nv, P, a, lda, ai, b, ldb, bi, c, ncols);
      return;
    }
    outer_gather_pick<V, MR - 1, NV>(mr, nv, P, a, lda, ai, b, ldb, bi, c, ncols);
  }
}

}  // namespace gg
}  // namespace stochgate

#pragma GCC diagnostic pop
