// CPU kernels of the gated matmuls (conditional computation): work proportional to the number
// of active (row, chunk) pairs.
//
// Two routes, chosen by the chunk width (measured with `stochgate bench`):
// - chunk >= kGemmMinChunk: per chunk, gather the rows whose gate is on and run one dense GEMM
//   with the chunk's weight block through ATen's BLAS; parallel over chunks (or over output
//   column slices where chunks add into the same rows), single-threaded GEMMs inside.
// - narrower chunks (chunk = 1 is the paper's per-unit gating): row-wise sparse kernels over
//   per-row lists of active units, vectorised dot products / axpys over cache-resident blocks.
// float16/bfloat16 are computed in float32 (PyTorch's CPU GEMMs accumulate in float32 too)
// and rounded once at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../common/checks.h"
#include "chunk_runs.h"
#include "gated_amx.h"
#include "gated_gemm.h"
#include "gated_linear.h"

// Vector values pass only between always-inline functions inside target-attributed callers
// (gated_gemm.h), so the ABI of passing them by value never matters here.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace stochgate {
namespace {

// Chunks at least this wide go through per-chunk GEMMs; narrower ones through the row-wise
// sparse kernels (measured with `stochgate bench --chunk ...`).
constexpr int64_t kGemmMinChunk = 16;
// Row-kernel cache blocking: a block of weight rows (units) of about this many bytes stays
// in L2 while the rows of a thread stream past it; K blocks of kKBlock elements keep an
// output row segment in registers.
constexpr int64_t kL2Bytes = 1 << 20;
constexpr int64_t kKBlock = 128;
// The row kernels' K blocks of an operand whose rows are a power-of-two number of bytes apart
// land in a few L2 sets: a (rows, 128) column block of a row-major (rows, 2048) float32 matrix
// is 1 MB but maps to 1/16 of the sets of a 2 MB L2, so it does not stay there while the rows
// stream past. The float32 AVX-512 kernels therefore read such operands from a block-major
// copy (see block_major; measured at chunk 1, density 0.1, 2 threads: gated_linear dx 44 ->
// 18 ms, dW 29 -> 15 ms, gated_input_linear forward 52 -> 16 ms).
// STOCHGATE_ROW_BLOCKS=0 keeps the row-major reads (for measuring and the tests).
// On AVX2 the row kernels that add weighted rows (gated_linear's dx and dW, gated_input_linear's
// forward and dW2) stream whole rows instead (spmm_rows_stream / spmm_units_stream): rows of
// the summed operand are blocked to about this many bytes, which stay in L2/L3 while the
// outputs stream past (measured on a Zen 3 VM, chunk 1, d = 0.1 / 0.25, 2 threads: 1-8 MiB
// alike, 256 KiB worse).
constexpr int64_t kStreamBytes = 4 << 20;

// ---------------------------------------------------------------------------------------
// Routing: which (row, chunk) pairs are active, and their gate values.

struct RowRouting {  // CSR by rows: row b's active chunks, ascending
  std::vector<int64_t> offsets;  // B + 1
  std::vector<int64_t> chunks;
  std::vector<double> gate;
};

struct ChunkRouting {  // CSR by chunks: chunk c's active rows, ascending
  std::vector<int64_t> offsets;  // C + 1
  std::vector<int64_t> rows;
  std::vector<double> gate;
  std::vector<int64_t> qof;  // pair p of the RowRouting -> its index q here
  int64_t max_rows = 0;
};

#if SG_GG_MULTI
// route_rows for float32 gates, 16 per compare and no branch per gate (at chunk 1, B = 1024,
// C = 2048, density 0.1 the scalar loops took about 2 ms of a 14 ms forward, 2 threads).
// "Active" is `g != 0` exactly as in the scalar loops (NaN counts as active, -0 does not).
SG_GG_TARGET_AVX512 int64_t count_active_avx512(const float* g, int64_t C) {
  const __m512 z = _mm512_setzero_ps();
  int64_t n = 0, c = 0;
  for (; c + 16 <= C; c += 16) {
    n += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(g + c), z, _CMP_NEQ_UQ));
  }
  for (; c < C; ++c) n += g[c] != 0.f;
  return n;
}
SG_GG_TARGET_AVX512 void list_active_avx512(const float* g, int64_t C, int64_t* chunks,
                                            double* gate) {
  const __m512 z = _mm512_setzero_ps();
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t p = 0, c = 0;
  for (; c + 16 <= C; c += 16, idx = _mm512_add_epi32(idx, step)) {
    const __m512 v = _mm512_loadu_ps(g + c);
    const __mmask16 m = _mm512_cmp_ps_mask(v, z, _CMP_NEQ_UQ);
    const int k = __builtin_popcount(m);
    const __m512i ci = _mm512_maskz_compress_epi32(m, idx);
    const __m512d cv = _mm512_castps_pd(_mm512_maskz_compress_ps(m, v));
    const __mmask8 lo = k >= 8 ? 0xFF : static_cast<__mmask8>((1u << k) - 1);
    const __mmask8 hi = k > 8 ? static_cast<__mmask8>((1u << (k - 8)) - 1) : 0;
    // Masked stores: nothing is written past the k active entries.
    _mm512_mask_storeu_epi64(chunks + p, lo, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(ci)));
    _mm512_mask_storeu_epi64(chunks + p + 8, hi,
                             _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(ci, 1)));
    _mm512_mask_storeu_pd(gate + p, lo, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_castpd512_pd256(cv))));
    _mm512_mask_storeu_pd(gate + p + 8, hi,
                          _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(cv, 1))));
    p += k;
  }
  for (; c < C; ++c) {
    if (g[c] != 0.f) {
      chunks[p] = c;
      gate[p] = static_cast<double>(g[c]);
      ++p;
    }
  }
}

// The same with AVX2: 8 gates per compare, the active ones listed from the compare's bit mask
// (no compress instruction; at the densities worth gating few bits are set).
SG_GG_TARGET_AVX2 int64_t count_active_avx2(const float* g, int64_t C) {
  const __m256 z = _mm256_setzero_ps();
  int64_t n = 0, c = 0;
  for (; c + 8 <= C; c += 8) {
    n += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(g + c), z, _CMP_NEQ_UQ)));
  }
  for (; c < C; ++c) n += g[c] != 0.f;
  return n;
}
SG_GG_TARGET_AVX2 void list_active_avx2(const float* g, int64_t C, int64_t* chunks, double* gate) {
  const __m256 z = _mm256_setzero_ps();
  int64_t p = 0, c = 0;
  for (; c + 8 <= C; c += 8) {
    for (unsigned m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(g + c), z, _CMP_NEQ_UQ)); m; m &= m - 1) {
      const int64_t i = c + __builtin_ctz(m);
      chunks[p] = i;
      gate[p] = static_cast<double>(g[i]);
      ++p;
    }
  }
  for (; c < C; ++c) {
    if (g[c] != 0.f) {
      chunks[p] = c;
      gate[p] = static_cast<double>(g[c]);
      ++p;
    }
  }
}
#endif

template <typename g_t>
RowRouting route_rows_impl(const at::Tensor& gates) {
  const int64_t B = gates.size(0), C = gates.size(1);
  const g_t* g = gates.const_data_ptr<g_t>();
  RowRouting r;
  r.offsets.assign(B + 1, 0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
#if SG_GG_MULTI
  if constexpr (std::is_same_v<g_t, float>) {
    const int isa = gg_isa();
    if (isa > 0 && C < (int64_t(1) << 31)) {
      const auto count = isa == 2 ? count_active_avx512 : count_active_avx2;
      const auto list = isa == 2 ? list_active_avx512 : list_active_avx2;
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) r.offsets[b + 1] = count(g + b * C, C);
      });
      for (int64_t b = 0; b < B; ++b) r.offsets[b + 1] += r.offsets[b];
      r.chunks.resize(r.offsets[B]);
      r.gate.resize(r.offsets[B]);
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          list(g + b * C, C, r.chunks.data() + r.offsets[b], r.gate.data() + r.offsets[b]);
        }
      });
      return r;
    }
  }
#endif
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t n = 0;
      for (int64_t c = 0; c < C; ++c) n += g[b * C + c] != g_t(0);
      r.offsets[b + 1] = n;
    }
  });
  for (int64_t b = 0; b < B; ++b) r.offsets[b + 1] += r.offsets[b];
  r.chunks.resize(r.offsets[B]);
  r.gate.resize(r.offsets[B]);
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t p = r.offsets[b];
      for (int64_t c = 0; c < C; ++c) {
        const g_t v = g[b * C + c];
        if (v != g_t(0)) {
          r.chunks[p] = c;
          r.gate[p] = static_cast<double>(v);
          ++p;
        }
      }
    }
  });
  return r;
}

RowRouting route_rows(const at::Tensor& gates) {
  auto g = gates.contiguous();
  // float16/bfloat16 gates route as float32 (exact: the same zero test, the same values).
  if (g.scalar_type() == at::kHalf || g.scalar_type() == at::kBFloat16) g = g.to(at::kFloat);
  RowRouting r;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "route_rows", [&] {
    r = route_rows_impl<scalar_t>(g);
  });
  return r;
}

// Counting sort of the row lists into chunk lists (rows stay ascending within a chunk),
// parallel over row ranges: per-range chunk counts, then each range fills its slots (ranges in
// row order, so rows stay ascending). Serial, this took ~1 ms at chunk 1 (B = 1024, C = 2048,
// density 0.1: 210k pairs) with the other thread idle.
ChunkRouting route_chunks(const RowRouting& rr, int64_t C) {
  const int64_t B = static_cast<int64_t>(rr.offsets.size()) - 1;
  const int64_t P = static_cast<int64_t>(rr.chunks.size());
  ChunkRouting cr;
  cr.offsets.assign(C + 1, 0);
  cr.rows.resize(P);
  cr.gate.resize(P);
  cr.qof.resize(P);
  // Row ranges: one per thread where there are at least 4 pairs per chunk for each of them
  // (the per-range counts cost C each).
  const int64_t nt = std::max<int64_t>(
      1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), B, P / std::max<int64_t>(4 * C, 1)}));
  const auto row0 = [&](int64_t t) { return B * t / nt; };
  std::vector<int64_t> start(nt * C, 0);  // counts, then each range's first slot per chunk
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* cnt = start.data() + t * C;
      for (int64_t p = rr.offsets[row0(t)]; p < rr.offsets[row0(t + 1)]; ++p) ++cnt[rr.chunks[p]];
    }
  });
  for (int64_t c = 0, q = 0; c < C; ++c) {
    cr.offsets[c] = q;
    for (int64_t t = 0; t < nt; ++t) {
      const int64_t n = start[t * C + c];
      start[t * C + c] = q;
      q += n;
    }
    cr.offsets[c + 1] = q;
    cr.max_rows = std::max(cr.max_rows, q - cr.offsets[c]);
  }
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t* fill = start.data() + t * C;
      for (int64_t b = row0(t); b < row0(t + 1); ++b) {
        for (int64_t p = rr.offsets[b]; p < rr.offsets[b + 1]; ++p) {
          const int64_t q = fill[rr.chunks[p]]++;
          cr.rows[q] = b;
          cr.gate[q] = rr.gate[p];
          cr.qof[p] = q;
        }
      }
    }
  });
  return cr;
}

// ---------------------------------------------------------------------------------------
// Small vector kernels. Written lane-wise so that the compiler vectorises them without
// reassociating a single accumulator (the baseline and double versions); float32 has explicit
// vector versions for AVX-512 and AVX2 (below). Each driver is compiled per ISA and picked at
// run time (gg_isa).

#define SG_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int kLanes = 16;

// A block-major copy (K / 128 blocks, each (rows, 128) contiguous) of the operand whose K
// blocks a row kernel streams, or none (row-major reads). See kKBlock's comment.
struct Blocked {
  const float* p = nullptr;
  int64_t rows = 0;
  int64_t out_t = 0;  // spmm_units: > 0 writes its (units, K) result transposed, ld out_t
};

// Whether the row kernels read a K-wide float32 operand from a block-major copy: only the
// AVX-512 ones walk K blocks (AVX2 streams whole rows of the row-major operand, the baseline
// code reads it in place).
template <typename T>
bool use_row_blocks(int64_t K) {
  if (!std::is_same_v<T, float> || gg_isa() != 2 || K == 0 || K % kKBlock != 0) return false;
  const char* env = std::getenv("STOCHGATE_ROW_BLOCKS");
  return !(env && std::strcmp(env, "0") == 0);
}

// Rows of a (rows, K) operand of elem-byte elements that fit in about `bytes` (at least one).
int64_t rows_in_bytes(int64_t bytes, int64_t K, int64_t elem) {
  return std::max<int64_t>(1, bytes / (std::max<int64_t>(K, 1) * elem));
}

// A block of about `rows` units rounded down to whole chunks (at least one chunk).
int64_t whole_chunks(int64_t rows, int64_t chunk) { return std::max(chunk, rows / chunk * chunk); }

// Rows of a (rows, K) float32 operand per stream block (STOCHGATE_ROW_STREAM_BYTES: a smaller
// block, for the tests).
int64_t stream_rows(int64_t K) {
  const char* env = std::getenv("STOCHGATE_ROW_STREAM_BYTES");
  const int64_t bytes = env && std::atoll(env) > 0 ? std::atoll(env) : kStreamBytes;
  return rows_in_bytes(bytes, K, sizeof(float));
}

// t (rows, K) row-major -> (K / 128, rows, 128): [kb, r, j] = t[r, kb * 128 + j].
at::Tensor block_major(const at::Tensor& t) {
  return t.view({t.size(0), t.size(1) / kKBlock, kKBlock}).permute({1, 0, 2}).contiguous();
}

// Four dot products sharing `a`: out[u] = <a, w[u]> over K elements.
template <typename T>
SG_ALWAYS_INLINE void dot4(const T* a, const T* w0, const T* w1, const T* w2, const T* w3,
                           int64_t K, T* out) {
  T s0[kLanes] = {}, s1[kLanes] = {}, s2[kLanes] = {}, s3[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T av = a[k + l];
      s0[l] += av * w0[k + l];
      s1[l] += av * w1[k + l];
      s2[l] += av * w2[k + l];
      s3[l] += av * w3[k + l];
    }
  }
  T r0 = 0, r1 = 0, r2 = 0, r3 = 0;
  for (int l = 0; l < kLanes; ++l) {
    r0 += s0[l];
    r1 += s1[l];
    r2 += s2[l];
    r3 += s3[l];
  }
  for (; k < K; ++k) {
    r0 += a[k] * w0[k];
    r1 += a[k] * w1[k];
    r2 += a[k] * w2[k];
    r3 += a[k] * w3[k];
  }
  out[0] = r0;
  out[1] = r1;
  out[2] = r2;
  out[3] = r3;
}

template <typename T>
SG_ALWAYS_INLINE T dot1(const T* a, const T* w, int64_t K) {
  T s[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) s[l] += a[k + l] * w[k + l];
  }
  T r = 0;
  for (int l = 0; l < kLanes; ++l) r += s[l];
  for (; k < K; ++k) r += a[k] * w[k];
  return r;
}

#if SG_GG_MULTI
// Float32 versions with explicit vectors, gg::v16 in AVX-512 code and gg::v8 in AVX2 code:
// the lane-wise loops above leave their accumulators on the stack (measured:
// store-forwarding bound), these keep them in registers.

// out[u] = <a, w[u]> over K elements for NU units sharing the loads of a; two accumulators per
// unit (two K halves of each 2L step) so that even one unit has independent FMA chains.
template <class V, int NU>
SG_ALWAYS_INLINE void dotn_vec(const float* a, const float* const* w, int64_t K, float* out) {
  constexpr int L = gg::VecInfo<V>::L;
  V s[2 * NU] = {};
  const float* wp[NU];
#pragma GCC unroll 4
  for (int u = 0; u < NU; ++u) wp[u] = w[u];
  int64_t k = 0;
  for (; k + 2 * L <= K; k += 2 * L) {
    const V a0 = gg::vload<V>(a + k), a1 = gg::vload<V>(a + k + L);
#pragma GCC unroll 4
    for (int u = 0; u < NU; ++u) {
      s[u] += a0 * gg::vload<V>(wp[u] + k);
      s[NU + u] += a1 * gg::vload<V>(wp[u] + k + L);
    }
  }
  if (k + L <= K) {
    const V a0 = gg::vload<V>(a + k);
#pragma GCC unroll 4
    for (int u = 0; u < NU; ++u) s[u] += a0 * gg::vload<V>(wp[u] + k);
    k += L;
  }
#pragma GCC unroll 4
  for (int u = 0; u < NU; ++u) s[u] += s[NU + u];
  gg::hsum_all<V, NU>(s, out);
  for (; k < K; ++k) {
#pragma GCC unroll 4
    for (int u = 0; u < NU; ++u) out[u] += a[k] * wp[u][k];
  }
}

template <class V>
SG_ALWAYS_INLINE void dotn_pick(const float* a, const float* const* w, int nu, int64_t K, float* out) {
  switch (nu) {
    case 4: return dotn_vec<V, 4>(a, w, K, out);
    case 3: return dotn_vec<V, 3>(a, w, K, out);
    case 2: return dotn_vec<V, 2>(a, w, K, out);
    default: return dotn_vec<V, 1>(a, w, K, out);
  }
}

// o[k] += c[0] * w[0][k] + ... + c[NU-1] * w[NU-1][k] over K elements: one FMA per unit, in
// unit order (the rounding of adding the units one at a time, as the K-block kernels do).
template <class V, int NU>
SG_ALWAYS_INLINE void axpyn_vec(float* o, const float* const* w, const float* c, int64_t K) {
  constexpr int L = gg::VecInfo<V>::L;
  V cv[NU];
  const float* wp[NU];
#pragma GCC unroll 4
  for (int u = 0; u < NU; ++u) {
    cv[u] = gg::vsplat<V>(c[u]);
    wp[u] = w[u];
  }
  int64_t k = 0;
  for (; k + 2 * L <= K; k += 2 * L) {
    V a0 = gg::vload<V>(o + k), a1 = gg::vload<V>(o + k + L);
#pragma GCC unroll 4
    for (int u = 0; u < NU; ++u) {
      a0 += cv[u] * gg::vload<V>(wp[u] + k);
      a1 += cv[u] * gg::vload<V>(wp[u] + k + L);
    }
    gg::vstore(o + k, a0);
    gg::vstore(o + k + L, a1);
  }
  for (; k < K; ++k) {
    float a = o[k];
#pragma GCC unroll 4
    for (int u = 0; u < NU; ++u) a += c[u] * wp[u][k];
    o[k] = a;
  }
}

template <class V>
SG_ALWAYS_INLINE void axpyn_pick(float* o, const float* const* w, const float* c, int nu, int64_t K) {
  switch (nu) {
    case 4: return axpyn_vec<V, 4>(o, w, c, K);
    case 3: return axpyn_vec<V, 3>(o, w, c, K);
    case 2: return axpyn_vec<V, 2>(o, w, c, K);
    default: return axpyn_vec<V, 1>(o, w, c, K);
  }
}

// Adds weighted rows four at a time: o += sum of c[i] * rows[i], collected by add().
template <class V>
struct RowAdder {
  float* o;
  int64_t K;
  const float* rows[4];
  float c[4];
  int n = 0;
  SG_ALWAYS_INLINE void add(const float* row, float coef) {
    rows[n] = row;
    c[n] = coef;
    if (++n == 4) {
      axpyn_vec<V, 4>(o, rows, c, K);
      n = 0;
    }
  }
  SG_ALWAYS_INLINE void flush() {
    if (n) axpyn_pick<V>(o, rows, c, n, K);
    n = 0;
  }
};

// Out of line, so that callers inside lambdas (which do not inherit a target attribute) get
// the vector code.
SG_GG_TARGET_AVX512 void dotn_avx512(const float* a, const float* const* w, int nu, int64_t K, float* out) {
  dotn_pick<gg::v16>(a, w, nu, K, out);
}
SG_GG_TARGET_AVX2 void dotn_avx2(const float* a, const float* const* w, int nu, int64_t K, float* out) {
  dotn_pick<gg::v8>(a, w, nu, K, out);
}

// spmm_rows for float32 with each K block's output segment in registers: 8 accumulators of
// L lanes, a 128-wide block in one pass with AVX-512's 16 (AVX2 streams whole rows instead).
// Unit n's K block at k0 is w + n * ld + k0 * kstride: row-major (ld = K, kstride = 1) or
// block-major (ld = 128, kstride = number of units; K a multiple of 128).
template <class V, typename Coef>
SG_ALWAYS_INLINE void spmm_rows_vec(const float* w, int64_t K, int64_t chunk, const RowRouting& rr,
                                    int64_t b0, int64_t b1, const float* init, float* out,
                                    const Coef& coef, int64_t ld, int64_t kstride) {
  constexpr int L = gg::VecInfo<V>::L, NA = 8, SEG = NA * L;
  static_assert(kKBlock % SEG == 0, "whole segments per K block");
  int64_t k0 = 0;
  for (; k0 + kKBlock <= K; k0 += kKBlock) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t h = 0; h < kKBlock; h += SEG) {
        V acc[NA];
#pragma GCC unroll 8
        for (int i = 0; i < NA; ++i) acc[i] = init ? gg::vload<V>(init + k0 + h + i * L) : V{};
        for (int64_t p = rr.offsets[b]; p < rr.offsets[b + 1]; ++p) {
          const int64_t c = rr.chunks[p];
          for (int64_t n = c * chunk; n < (c + 1) * chunk; ++n) {
            const V sv = gg::vsplat<V>(coef(b, p, n));
            const float* wn = w + n * ld + k0 * kstride + h;
#pragma GCC unroll 8
            for (int i = 0; i < NA; ++i) acc[i] += sv * gg::vload<V>(wn + i * L);
          }
        }
        float* o = out + b * K + k0 + h;
#pragma GCC unroll 8
        for (int i = 0; i < NA; ++i) gg::vstore(o + i * L, acc[i]);
      }
    }
  }
  if (k0 < K) spmm_rows(w, K, chunk, rr, b0, b1, init, out, coef, k0);
}

// spmm_units for float32, likewise; row q's K block at k0 is a + rows[q] * ld + k0 * kstride
// (as in spmm_rows_vec). ldt > 0: out is written transposed, (K, ldt) row-major.
template <class V, typename Coef>
SG_ALWAYS_INLINE void spmm_units_vec(const float* a, int64_t K, int64_t chunk, const ChunkRouting& cr,
                                     int64_t c0, int64_t c1, float* out, const Coef& coef, int64_t ld,
                                     int64_t kstride, int64_t ldt) {
  constexpr int L = gg::VecInfo<V>::L, NA = 8, SEG = NA * L;
  static_assert(kKBlock % SEG == 0, "whole segments per K block");
  int64_t k0 = 0;
  for (; k0 + kKBlock <= K; k0 += kKBlock) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t n = c * chunk; n < (c + 1) * chunk; ++n) {
        for (int64_t h = 0; h < kKBlock; h += SEG) {
          V acc[NA];
#pragma GCC unroll 8
          for (int i = 0; i < NA; ++i) acc[i] = V{};
          for (int64_t q = cr.offsets[c]; q < cr.offsets[c + 1]; ++q) {
            const V sv = gg::vsplat<V>(coef(q, n));
            const float* ab = a + cr.rows[q] * ld + k0 * kstride + h;
#pragma GCC unroll 8
            for (int i = 0; i < NA; ++i) acc[i] += sv * gg::vload<V>(ab + i * L);
          }
          if (ldt > 0) {
            alignas(64) float t[SEG];
#pragma GCC unroll 8
            for (int i = 0; i < NA; ++i) gg::vstore(t + i * L, acc[i]);
            for (int k = 0; k < SEG; ++k) out[(k0 + h + k) * ldt + n] = t[k];
            continue;
          }
          float* o = out + n * K + k0 + h;
#pragma GCC unroll 8
          for (int i = 0; i < NA; ++i) gg::vstore(o + i * L, acc[i]);
        }
      }
    }
  }
  if (k0 < K) spmm_units(a, K, chunk, cr, c0, c1, out, coef, k0);  // (ldt > 0 only for K % 128 == 0)
}
#endif  // SG_GG_MULTI

// Sampled dense-dense product over the active units of rows [b0, b1) and units [n0, n1):
// out(b, n, <a[b], w[n]>) for each active unit n of row b. `cursor[b]` walks row b's
// ascending active chunk list across unit blocks. ISA: 2 AVX-512, 1 AVX2, 0 baseline code.
template <int ISA, typename T, typename Out>
SG_ALWAYS_INLINE void sddmm_block(const T* a, const T* w, int64_t K, int64_t chunk,
                                  const RowRouting& rr, std::vector<int64_t>& cursor, int64_t b0,
                                  int64_t b1, int64_t n0, int64_t n1, const Out& out) {
  int64_t units[4];
  int64_t pairs[4];
  for (int64_t b = b0; b < b1; ++b) {
    const T* ab = a + b * K;
    int64_t& p = cursor[b - b0];
    const int64_t pend = rr.offsets[b + 1];
    int q = 0;
    auto flush = [&](int cnt) {
      T d[4];
#if SG_GG_MULTI
      if constexpr (std::is_same_v<T, float> && ISA > 0) {
        const float* wu[4];
        for (int i = 0; i < cnt; ++i) wu[i] = w + units[i] * K;
        if constexpr (ISA == 2) dotn_avx512(ab, wu, cnt, K, d);
        else dotn_avx2(ab, wu, cnt, K, d);
        for (int i = 0; i < cnt; ++i) out(b, units[i], pairs[i], d[i]);
        return;
      }
#endif
      if (cnt == 4) {
        dot4(ab, w + units[0] * K, w + units[1] * K, w + units[2] * K, w + units[3] * K, K, d);
      } else {
        for (int i = 0; i < cnt; ++i) d[i] = dot1(ab, w + units[i] * K, K);
      }
      for (int i = 0; i < cnt; ++i) out(b, units[i], pairs[i], d[i]);
    };
    for (; p < pend; ++p) {
      const int64_t c = rr.chunks[p];
      const int64_t u0 = std::max(c * chunk, n0), u1 = std::min((c + 1) * chunk, n1);
      if (c * chunk >= n1) break;
      for (int64_t n = u0; n < u1; ++n) {
        units[q] = n;
        pairs[q] = p;
        if (++q == 4) {
          flush(4);
          q = 0;
        }
      }
      if ((c + 1) * chunk > n1) break;  // the chunk continues in the next unit block
    }
    if (q) flush(q);
  }
}

// out[b, k-block] = init + sum over active units n of row b of coef(p, n) * w[n, k-block],
// rows [b0, b1), the whole of K.
template <typename T, typename Coef>
SG_ALWAYS_INLINE void spmm_rows(const T* w, int64_t K, int64_t chunk, const RowRouting& rr,
                                int64_t b0, int64_t b1, const T* init, T* out, const Coef& coef,
                                int64_t k_begin = 0) {
  for (int64_t k0 = k_begin; k0 < K; k0 += kKBlock) {
    const int64_t kb = std::min(kKBlock, K - k0);
    for (int64_t b = b0; b < b1; ++b) {
      T acc[kKBlock];
      if (init) {
        for (int64_t k = 0; k < kb; ++k) acc[k] = init[k0 + k];
      } else {
        for (int64_t k = 0; k < kb; ++k) acc[k] = 0;
      }
      for (int64_t p = rr.offsets[b]; p < rr.offsets[b + 1]; ++p) {
        const int64_t c = rr.chunks[p];
        for (int64_t n = c * chunk; n < (c + 1) * chunk; ++n) {
          const T s = coef(b, p, n);
          const T* wn = w + n * K + k0;
          if (kb == kKBlock) {
            for (int64_t k = 0; k < kKBlock; ++k) acc[k] += s * wn[k];
          } else {
            for (int64_t k = 0; k < kb; ++k) acc[k] += s * wn[k];
          }
        }
      }
      std::memcpy(out + b * K + k0, acc, kb * sizeof(T));
    }
  }
}

// out[n, k-block] = sum over the active rows b of n's chunk of coef(q, n) * a[b, k-block],
// units [n0, n1) (whole chunks), for K blocks [k0, k1).
template <typename T, typename Coef>
SG_ALWAYS_INLINE void spmm_units(const T* a, int64_t K, int64_t chunk, const ChunkRouting& cr,
                                 int64_t c0, int64_t c1, T* out, const Coef& coef,
                                 int64_t k_begin = 0) {
  for (int64_t k0 = k_begin; k0 < K; k0 += kKBlock) {
    const int64_t kb = std::min(kKBlock, K - k0);
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t n = c * chunk; n < (c + 1) * chunk; ++n) {
        T acc[kKBlock];
        for (int64_t k = 0; k < kb; ++k) acc[k] = 0;
        for (int64_t q = cr.offsets[c]; q < cr.offsets[c + 1]; ++q) {
          const T s = coef(q, n);
          const T* ab = a + cr.rows[q] * K + k0;
          if (kb == kKBlock) {
            for (int64_t k = 0; k < kKBlock; ++k) acc[k] += s * ab[k];
          } else {
            for (int64_t k = 0; k < kb; ++k) acc[k] += s * ab[k];
          }
        }
        std::memcpy(out + n * K + k0, acc, kb * sizeof(T));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Row-kernel drivers (chunk < kGemmMinChunk). T is float or double.

// Calls out(b, n, pair, <a[b], w[n]>) for every active unit of rows [b0, b1); unit blocks
// sized for L2. (Lambdas do not inherit a target attribute, so the per-thread bodies are
// target functions of their own, called from the parallel_for lambdas.)
template <int ISA, typename T, typename Out>
SG_ALWAYS_INLINE void sddmm_range(const T* a, const T* w, int64_t N, int64_t K, int64_t chunk,
                                  const RowRouting& rr, int64_t b0, int64_t b1, const Out& out) {
  // K = 0 (empty dot products) is a valid input: one unit block then.
  const int64_t nb = whole_chunks(rows_in_bytes(kL2Bytes, K, sizeof(T)), chunk);
  std::vector<int64_t> cursor(b1 - b0);
  for (int64_t b = b0; b < b1; ++b) cursor[b - b0] = rr.offsets[b];
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    sddmm_block<ISA>(a, w, K, chunk, rr, cursor, b0, b1, n0, std::min(N, n0 + nb), out);
  }
}

template <typename T, typename Out>
SG_GG_TARGET_AVX512 void sddmm_range_avx512(const T* a, const T* w, int64_t N, int64_t K, int64_t chunk,
                                  const RowRouting& rr, int64_t b0, int64_t b1, const Out& out) {
  sddmm_range<2>(a, w, N, K, chunk, rr, b0, b1, out);
}

template <typename T, typename Out>
SG_GG_TARGET_AVX2 void sddmm_range_avx2(const T* a, const T* w, int64_t N, int64_t K, int64_t chunk,
                                        const RowRouting& rr, int64_t b0, int64_t b1, const Out& out) {
  sddmm_range<1>(a, w, N, K, chunk, rr, b0, b1, out);
}

template <typename T, typename Out>
void sddmm_range_base(const T* a, const T* w, int64_t N, int64_t K, int64_t chunk,
                      const RowRouting& rr, int64_t b0, int64_t b1, const Out& out) {
  sddmm_range<0>(a, w, N, K, chunk, rr, b0, b1, out);
}

// Sampled dense-dense product: out(b, n, pair, <a[b], w[n]>) for every active unit n of every
// row b; a (B, K), w (N, K). Rows are split across threads.
template <typename T, typename Out>
void sddmm(const T* a, const T* w, int64_t B, int64_t N, int64_t K, int64_t chunk,
           const RowRouting& rr, const Out& out) {
  const int isa = gg_isa();
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    if (isa == 2) sddmm_range_avx512(a, w, N, K, chunk, rr, b0, b1, out);
    else if (isa == 1) sddmm_range_avx2(a, w, N, K, chunk, rr, b0, b1, out);
    else sddmm_range_base(a, w, N, K, chunk, rr, b0, b1, out);
  });
}

// out (B, N) from the sampled products: out[b, n] = f(p, n, <a[b], w[n]>) for the active units
// of each row (pair p), exact zeros elsewhere. The products go to a packed per-pair buffer
// first, then each row is zeroed and filled in one pass while it sits in L1: written in place
// by the sampled product, out's rows were fetched again (long evicted after the zero fill) for
// scattered single-float stores.
template <typename T, typename F>
void sddmm_rows_out(const T* a, const T* w, int64_t B, int64_t N, int64_t K, int64_t chunk,
                    const RowRouting& rr, T* out, const F& f) {
  std::vector<T> d(rr.chunks.size() * chunk);
  sddmm(a, w, B, N, K, chunk, rr, [&](int64_t, int64_t n, int64_t p, T v) {
    d[p * chunk + n - rr.chunks[p] * chunk] = v;
  });
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* o = out + b * N;
      std::fill(o, o + N, T(0));
      for (int64_t p = rr.offsets[b]; p < rr.offsets[b + 1]; ++p) {
        const int64_t n0 = rr.chunks[p] * chunk;
        for (int64_t j = 0; j < chunk; ++j) o[n0 + j] = f(p, n0 + j, d[p * chunk + j]);
      }
    }
  });
}

#if SG_GG_MULTI
// spmm_rows over whole rows (AVX2): out[b] = init + sum over the active units n of row
// b of coef(b, p, n) * w[n], w (N, K) row-major, rows [b0, b1). Per block of units (stream_rows)
// each row adds its active units of the block, streaming their weight rows (as the sampled
// product streams them for its dot products); out's row stays in L1 meanwhile.
template <class V, typename Coef>
SG_ALWAYS_INLINE void spmm_rows_stream(const float* w, int64_t N, int64_t K, int64_t chunk,
                                       const RowRouting& rr, int64_t b0, int64_t b1, const float* init,
                                       float* out, const Coef& coef) {
  const int64_t nb = whole_chunks(stream_rows(K), chunk);
  std::vector<int64_t> cursor(b1 - b0);
  for (int64_t b = b0; b < b1; ++b) {
    cursor[b - b0] = rr.offsets[b];
    float* o = out + b * K;
    if (init) std::copy(init, init + K, o);
    else std::fill(o, o + K, 0.0f);
  }
  for (int64_t n0 = 0; n0 < N; n0 += nb) {
    const int64_t n1 = std::min(N, n0 + nb);
    for (int64_t b = b0; b < b1; ++b) {
      RowAdder<V> add{out + b * K, K};
      int64_t& p = cursor[b - b0];
      for (; p < rr.offsets[b + 1] && rr.chunks[p] * chunk < n1; ++p) {
        const int64_t c = rr.chunks[p];
        for (int64_t n = c * chunk; n < (c + 1) * chunk; ++n) add.add(w + n * K, coef(b, p, n));
      }
      add.flush();
    }
  }
}

// spmm_units over whole rows (AVX2): out[n] = sum over the active rows b of n's chunk
// of coef(q, n) * a[b], a (B, K) row-major, chunks [c0, c1). Per block of a's rows (stream_rows)
// each unit adds its chunk's active rows of the block.
template <class V, typename Coef>
SG_ALWAYS_INLINE void spmm_units_stream(const float* a, int64_t B, int64_t K, int64_t chunk,
                                        const ChunkRouting& cr, int64_t c0, int64_t c1, float* out,
                                        const Coef& coef) {
  const int64_t rb = stream_rows(K);
  std::vector<int64_t> cursor(cr.offsets.begin() + c0, cr.offsets.begin() + c1);
  std::fill(out + c0 * chunk * K, out + c1 * chunk * K, 0.0f);
  for (int64_t r0 = 0; r0 < B; r0 += rb) {
    const int64_t r1 = std::min(B, r0 + rb);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t qb = cursor[c - c0];
      int64_t qe = qb;
      while (qe < cr.offsets[c + 1] && cr.rows[qe] < r1) ++qe;
      cursor[c - c0] = qe;
      if (qe == qb) continue;
      for (int64_t n = c * chunk; n < (c + 1) * chunk; ++n) {
        RowAdder<V> add{out + n * K, K};
        for (int64_t q = qb; q < qe; ++q) add.add(a + cr.rows[q] * K, coef(q, n));
        add.flush();
      }
    }
  }
}
#endif  // SG_GG_MULTI

template <int ISA, typename T, typename Coef>
SG_ALWAYS_INLINE void spmm_rows_isa(const T* w, int64_t N, int64_t K, int64_t chunk, const RowRouting& rr,
                                    int64_t b0, int64_t b1, const T* init, T* out, const Coef& coef,
                                    const Blocked& bl) {
#if SG_GG_MULTI
  if constexpr (std::is_same_v<T, float> && ISA == 1) {  // streams (no copy: use_row_blocks)
    TORCH_INTERNAL_ASSERT(!bl.p);
    return spmm_rows_stream<gg::v8>(w, N, K, chunk, rr, b0, b1, init, out, coef);
  }
  if constexpr (std::is_same_v<T, float> && ISA == 2) {
    if (bl.p) spmm_rows_vec<gg::v16>(bl.p, K, chunk, rr, b0, b1, init, out, coef, kKBlock, bl.rows);
    else spmm_rows_vec<gg::v16>(w, K, chunk, rr, b0, b1, init, out, coef, K, 1);
    return;
  }
#endif
  spmm_rows(w, K, chunk, rr, b0, b1, init, out, coef);
}

template <typename T, typename Coef>
SG_GG_TARGET_AVX512 void spmm_rows_avx512(const T* w, int64_t N, int64_t K, int64_t chunk,
                                          const RowRouting& rr, int64_t b0, int64_t b1, const T* init,
                                          T* out, const Coef& coef, const Blocked& bl) {
  spmm_rows_isa<2>(w, N, K, chunk, rr, b0, b1, init, out, coef, bl);
}

template <typename T, typename Coef>
SG_GG_TARGET_AVX2 void spmm_rows_avx2(const T* w, int64_t N, int64_t K, int64_t chunk, const RowRouting& rr,
                                      int64_t b0, int64_t b1, const T* init, T* out, const Coef& coef,
                                      const Blocked& bl) {
  spmm_rows_isa<1>(w, N, K, chunk, rr, b0, b1, init, out, coef, bl);
}

template <typename T, typename Coef>
void spmm_rows_base(const T* w, int64_t K, int64_t chunk, const RowRouting& rr, int64_t b0,
                    int64_t b1, const T* init, T* out, const Coef& coef) {
  spmm_rows(w, K, chunk, rr, b0, b1, init, out, coef);
}

// out (B, K) = init + sum over active units n of coef * w[n] (w is (N, K) row-major; bl: its
// block-major copy, only where use_row_blocks).
template <typename T, typename Coef>
void spmm_rows_all(const T* w, int64_t B, int64_t N, int64_t K, int64_t chunk, const RowRouting& rr,
                   const T* init, T* out, const Coef& coef, const Blocked& bl = {}) {
  const int isa = gg_isa();
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    if (isa == 2) spmm_rows_avx512(w, N, K, chunk, rr, b0, b1, init, out, coef, bl);
    else if (isa == 1) spmm_rows_avx2(w, N, K, chunk, rr, b0, b1, init, out, coef, bl);
    else spmm_rows_base(w, K, chunk, rr, b0, b1, init, out, coef);
  });
}

template <int ISA, typename T, typename Coef>
SG_ALWAYS_INLINE void spmm_units_isa(const T* a, int64_t B, int64_t K, int64_t chunk, const ChunkRouting& cr,
                                     int64_t c0, int64_t c1, T* out, const Coef& coef, const Blocked& bl) {
#if SG_GG_MULTI
  if constexpr (std::is_same_v<T, float> && ISA == 1) {  // streams (no copy: use_row_blocks)
    TORCH_INTERNAL_ASSERT(!bl.p);
    return spmm_units_stream<gg::v8>(a, B, K, chunk, cr, c0, c1, out, coef);
  }
  if constexpr (std::is_same_v<T, float> && ISA == 2) {
    if (bl.p) spmm_units_vec<gg::v16>(bl.p, K, chunk, cr, c0, c1, out, coef, kKBlock, bl.rows, bl.out_t);
    else spmm_units_vec<gg::v16>(a, K, chunk, cr, c0, c1, out, coef, K, 1, 0);
    return;
  }
#endif
  spmm_units(a, K, chunk, cr, c0, c1, out, coef);
}

template <typename T, typename Coef>
SG_GG_TARGET_AVX512 void spmm_units_avx512(const T* a, int64_t B, int64_t K, int64_t chunk,
                                           const ChunkRouting& cr, int64_t c0, int64_t c1, T* out,
                                           const Coef& coef, const Blocked& bl) {
  spmm_units_isa<2>(a, B, K, chunk, cr, c0, c1, out, coef, bl);
}

template <typename T, typename Coef>
SG_GG_TARGET_AVX2 void spmm_units_avx2(const T* a, int64_t B, int64_t K, int64_t chunk,
                                       const ChunkRouting& cr, int64_t c0, int64_t c1, T* out,
                                       const Coef& coef, const Blocked& bl) {
  spmm_units_isa<1>(a, B, K, chunk, cr, c0, c1, out, coef, bl);
}

template <typename T, typename Coef>
void spmm_units_base(const T* a, int64_t K, int64_t chunk, const ChunkRouting& cr, int64_t c0,
                     int64_t c1, T* out, const Coef& coef) {
  spmm_units(a, K, chunk, cr, c0, c1, out, coef);
}

// out (N, K): out[n] = sum over the active rows of n's chunk of coef * a[b] (a is (B, K)
// row-major; bl: its block-major copy, only where use_row_blocks).
template <typename T, typename Coef>
void spmm_units_all(const T* a, int64_t B, int64_t C, int64_t K, int64_t chunk, const ChunkRouting& cr,
                    T* out, const Coef& coef, const Blocked& bl = {}) {
  const int isa = gg_isa();
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    if (isa == 2) spmm_units_avx512(a, B, K, chunk, cr, c0, c1, out, coef, bl);
    else if (isa == 1) spmm_units_avx2(a, B, K, chunk, cr, c0, c1, out, coef, bl);
    else spmm_units_base(a, K, chunk, cr, c0, c1, out, coef);
  });
}

// ---------------------------------------------------------------------------------------
// GEMM-route helpers (chunk >= kGemmMinChunk). T is float or double; tensors are contiguous.

// Copies rows `rows[0..n)` of src (R, K) into dst (n, K).
template <typename T>
void gather_rows(const T* src, int64_t K, const int64_t* rows, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * K, src + rows[i] * K, K * sizeof(T));
}

// dst[0..n) = g * src[0..n): one pair's chunk slice, packed (row_pairs, pack_pairs).
template <typename T>
inline void scaled_slice(T* dst, const T* src, int64_t n, T g) {
  for (int64_t j = 0; j < n; ++j) dst[j] = g * src[j];
}

// The active pairs' chunk slices of s (B, N), in row order: out[p, j] = g * s[b, c*chunk + j]
// for pair p = (b, c) of rr, g its gate if `scale`, else 1. s is read row by row, front to
// back. The row kernels take their per-unit coefficients from here: read in place, s[b, n]
// was fetched again for every K block (16 times over all of s at K = 2048, chunk 1).
template <typename T>
at::Tensor row_pairs(const at::Tensor& s, const RowRouting& rr, int64_t chunk, bool scale) {
  const int64_t B = s.size(0), N = s.size(1);
  auto out = at::empty({static_cast<int64_t>(rr.chunks.size()), chunk}, s.options());
  const T* ps = s.const_data_ptr<T>();
  T* po = out.mutable_data_ptr<T>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t p = rr.offsets[b]; p < rr.offsets[b + 1]; ++p) {
        scaled_slice(po + p * chunk, ps + b * N + rr.chunks[p] * chunk, chunk,
                     scale ? static_cast<T>(rr.gate[p]) : T(1));
      }
    }
  });
  return out;
}

// The row kernels' coefficient of pair p = (b, c) of rr at unit n of chunk c, read from
// row_pairs' output: by_row[p, n - c*chunk].
template <typename T>
auto row_pair_coef(const T* by_row, const RowRouting& rr, int64_t chunk) {
  return [by_row, &rr, chunk](int64_t, int64_t p, int64_t n) {
    return by_row[(p - rr.chunks[p]) * chunk + n];
  };
}

// The same slices in chunk order (pair q of cr), from the row-order ones (out[q] = rows[p] for
// q = cr.qof[p]): the chunk-order gather from s itself walks its columns, a new line per row.
template <typename T>
at::Tensor chunk_order(const at::Tensor& by_row, const ChunkRouting& cr, int64_t chunk) {
  auto out = at::empty_like(by_row);
  const T* src = by_row.const_data_ptr<T>();
  T* dst = out.mutable_data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(cr.qof.size()), 4096, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      T* d = dst + cr.qof[p] * chunk;
      const T* r = src + p * chunk;
      for (int64_t j = 0; j < chunk; ++j) d[j] = r[j];  // (a memcpy call per 4-byte pair was 7%)
    }
  });
  return out;
}

// The active pairs' chunk slices of s (B, N) in chunk order: out[q, j] = g * s[rows[q],
// c*chunk + j] (g the gate if `scale`). Narrow chunks go through the row order (a gather down
// s's columns would touch a new line for every few floats); wide ones are gathered directly,
// each slice a contiguous run of s.
template <typename T>
at::Tensor pack_pairs(const at::Tensor& s, const RowRouting& rr, const ChunkRouting& cr, int64_t chunk,
                      bool scale) {
  if (chunk < kGemmMinChunk) return chunk_order<T>(row_pairs<T>(s, rr, chunk, scale), cr, chunk);
  const int64_t C = static_cast<int64_t>(cr.offsets.size()) - 1;
  const int64_t N = s.size(1);
  auto out = at::empty({static_cast<int64_t>(cr.rows.size()), chunk}, s.options());
  const T* ps = s.const_data_ptr<T>();
  T* po = out.mutable_data_ptr<T>();
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t q = cr.offsets[c]; q < cr.offsets[c + 1]; ++q) {
        scaled_slice(po + q * chunk, ps + cr.rows[q] * N + c * chunk, chunk,
                     scale ? static_cast<T>(cr.gate[q]) : T(1));
      }
    }
  });
  return out;
}

// out (B, P) = init + sum over chunks c of rows_c <- A_c (n_c, chunk) @ bop(c) (chunk, P),
// parallel over column slices of out so that threads never add into the same element and the
// per-element order of the sum is fixed (deterministic).
template <typename T, typename BOp>
void scatter_add_gemm(const at::Tensor& packed, const ChunkRouting& cr, int64_t B, int64_t P,
                      const T* init, at::Tensor& out, const BOp& bop) {
  const int64_t C = static_cast<int64_t>(cr.offsets.size()) - 1;
  T* po = out.mutable_data_ptr<T>();
  const int64_t threads = at::get_num_threads();
  const int64_t grain = std::max<int64_t>(64, (P + threads - 1) / threads);
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    const int64_t ps = p1 - p0;
    for (int64_t b = 0; b < B; ++b) {
      T* row = po + b * P + p0;
      if (init) {
        std::memcpy(row, init + p0, ps * sizeof(T));
      } else {
        std::fill(row, row + ps, T(0));
      }
    }
    auto buf = at::empty({std::max<int64_t>(cr.max_rows, 1), ps}, out.options());
    T* pb = buf.mutable_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      const int64_t off = cr.offsets[c], n = cr.offsets[c + 1] - off;
      if (n == 0) continue;
      auto dst = buf.narrow(0, 0, n);
      at::mm_out(dst, packed.narrow(0, off, n), bop(c).narrow(1, p0, ps));
      for (int64_t i = 0; i < n; ++i) {
        T* row = po + cr.rows[off + i] * P + p0;
        const T* src = pb + i * ps;
        for (int64_t j = 0; j < ps; ++j) row[j] += src[j];
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// float32 register-tiled kernels (gated_gemm.h): no gathered copies, rows read through the
// chunk row lists. Each driver body is a template over the ISA trait, compiled three times
// (AVX-512, AVX2+FMA, baseline) and picked at run time.

// Pointer casts for the float32-only branches inside dtype-dispatched lambdas (dead code for
// double, where `if constexpr` does not discard them).
template <typename T> const float* fp(const T* p) { return reinterpret_cast<const float*>(p); }
template <typename T> float* fpm(T* p) { return reinterpret_cast<float*>(p); }

// Which float32 products take the tiled kernels. Measured single-threaded (B=1024,
// K=N=2048, chunk 64, d=0.1..1, noisy shared machine): the tiled gated_linear forward and
// gated_input_linear dh / dW2 beat the gather + MKL route; the tiled gated_linear dx / dW and
// gated_input_linear forward did not yet (L2-bound), so they stay on the gather + GEMM route
// unless STOCHGATE_CPU_TILED=all (kept for further work and covered by the tests).
bool gg_tiled_all() {
  const char* env = std::getenv("STOCHGATE_CPU_TILED");
  return env && std::strcmp(env, "all") == 0;
}

// With more than one thread the gather + MKL routes (a GEMM per chunk inside at::parallel_for)
// collapse on a loaded machine: measured with 2 threads while another process kept a core
// busy, gated_linear dx 202 ms / dW 206 ms at d=0.1 (8.8 / 7.5 ms single-threaded), the time
// spent spinning in libgomp; the tiled kernels took 11.2 / 9.4 ms in the same run. So they
// take the tiled kernels whenever at::get_num_threads() > 1.
// STOCHGATE_CPU_TILED=none keeps the gather + MKL routes at any thread count (for measuring).
bool gg_tiled_mkl_routes() {
  const char* env = std::getenv("STOCHGATE_CPU_TILED");
  if (env && std::strcmp(env, "none") == 0) return false;
  return gg_tiled_all() || at::get_num_threads() > 1;
}

// gated_linear forward: a chunk with at least this many active rows takes one MKL GEMM over
// all B rows of x (no gather; inactive rows computed and dropped) instead of the dot kernel.
// STOCHGATE_CPU_TILED=all: never (the dot kernel everywhere, for the tests).
int64_t gl_fwd_mm_min_rows(int64_t B) {
  if (gg_tiled_all()) return std::numeric_limits<int64_t>::max();
  const char* env = std::getenv("STOCHGATE_GL_MM_FRAC");
  const double frac = env ? std::atof(env) : 0.7;
  return std::max<int64_t>(1, static_cast<int64_t>(std::ceil(frac * B)));
}

// Zeroes the `width` columns at `col` of the rows of (B, ld) `out` absent from the ascending
// list rows[0..n).
SG_GG_INLINE void zero_inactive(float* out, int64_t B, int64_t ld, int64_t col, int64_t width,
                                const int64_t* rows, int64_t n) {
  int64_t i = 0;
  for (int64_t b = 0; b < B; ++b) {
    if (i < n && rows[i] == b) {
      ++i;
    } else {
      std::memset(out + b * ld + col, 0, width * sizeof(float));
    }
  }
}

// Prefetches the `bytes` at p, one request per 64-byte line (RW 1: for writing; LOC: the
// cache level hint). For rows the kernels reach through row lists: no hardware prefetcher
// follows those. kRowsAhead: how many rows of such a list ahead the copies fetch.
template <int RW = 0, int LOC = 3>
SG_ALWAYS_INLINE void prefetch_lines(const float* p, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, RW, LOC);
}
constexpr int64_t kRowsAhead = 8;

// For a copy walking the row list idx (null: no list, nothing to fetch) at position q of n:
// prefetches the `bytes` at column col of the row it reaches kRowsAhead positions later.
SG_ALWAYS_INLINE void prefetch_row_ahead(const float* src, int64_t ld, const int64_t* idx, int64_t q, int64_t n,
                                         int64_t col, int64_t bytes) {
  if (idx && q + kRowsAhead < n) prefetch_lines(src + idx[q + kRowsAhead] * ld + col, bytes);
}

// Copies the `w` columns at `col` of rows idx[q] (or q) of src (ld) into dst (n, ldd), zero
// padded to ldd. Full-width rows (w == ldd, whole vectors) are copied with vector loads and
// stores: GCC inlines the memcpy of these short rows as `rep movsq`, slow to start for 256 bytes
// (measured: gated_linear dx at d = 0.1, 2 threads, 5.6 -> 4.4 ms).
template <class V>
SG_GG_INLINE void pack_panel(const float* src, int64_t ld, const int64_t* idx, int64_t n,
                             int64_t col, int64_t w, float* dst, int64_t ldd) {
  constexpr int L = gg::VecInfo<V>::L;
  if (w == ldd && w % L == 0) {
    for (int64_t q = 0; q < n; ++q) {
      prefetch_row_ahead(src, ld, idx, q, n, col, w * 4);
      const float* s = src + (idx ? idx[q] : q) * ld + col;
      float* d = dst + q * ldd;
      for (int64_t j = 0; j < w; j += L) gg::vstore(d + j, gg::vload<V>(s + j));
    }
    return;
  }
  for (int64_t q = 0; q < n; ++q) {
    prefetch_row_ahead(src, ld, idx, q, n, col, w * 4);
    const float* s = src + (idx ? idx[q] : q) * ld + col;
    float* d = dst + q * ldd;
    std::memcpy(d, s, w * sizeof(float));
    std::memset(d + w, 0, (ldd - w) * sizeof(float));
  }
}

// The full outer-product tiles (AVX-512: 6 rows x 64 columns; AVX2: 6 x 16) as functions of
// their own: inlined into the forward driver, GCC left three of the AVX-512 tile's 24
// accumulators and the row pointers on the stack (memory-operand FMAs in the inner loop), and
// three of the AVX2 tile's six row pointers, reloaded every reduction step; alone, all stay in
// registers. outer_tile_add: rows-form A, added to c; outer_gather_full: the gather-form tile
// (gated_linear's dW, gated_input_linear's dW2), stored to c.
#if SG_GG_MULTI
template <class Isa>
SG_GG_INLINE void outer_tile_add(int64_t P, const float* const* a, const float* b, int64_t ldb, float* const* c) {
  typename Isa::V acc[Isa::MR][Isa::NV];
  gg::outer_rows<typename Isa::V, Isa::MR, Isa::NV>(P, a, b, ldb, acc);
  gg::tile_out<typename Isa::V, Isa::MR, Isa::NV, true>(acc, c, Isa::NV * gg::VecInfo<typename Isa::V>::L);
}
template <class Isa>
SG_GG_INLINE void outer_gather_full(int64_t P, const float* a, int64_t lda, const float* b, int64_t ldb,
                                    float* const* c) {
  typename Isa::V acc[Isa::MR][Isa::NV];
  gg::outer_gather<typename Isa::V, Isa::MR, Isa::NV>(P, a, lda, nullptr, b, ldb, nullptr, acc);
  gg::tile_out<typename Isa::V, Isa::MR, Isa::NV, false>(acc, c, Isa::NV * gg::VecInfo<typename Isa::V>::L);
}
#define SG_TILE_ARGS int64_t P, const float* const* a, const float* b, int64_t ldb, float* const* c
#define SG_GATHER_ARGS int64_t P, const float* a, int64_t lda, const float* b, int64_t ldb, float* const* c
SG_GG_TARGET_AVX512 __attribute__((noinline)) void outer_tile_6x4_add_avx512(SG_TILE_ARGS) {
  outer_tile_add<gg::IsaAvx512>(P, a, b, ldb, c);
}
SG_GG_TARGET_AVX2 __attribute__((noinline)) void outer_tile_6x2_add_avx2(SG_TILE_ARGS) {
  outer_tile_add<gg::IsaAvx2>(P, a, b, ldb, c);
}
SG_GG_TARGET_AVX512 __attribute__((noinline)) void outer_gather_6x4_avx512(SG_GATHER_ARGS) {
  outer_gather_full<gg::IsaAvx512>(P, a, lda, b, ldb, c);
}
SG_GG_TARGET_AVX2 __attribute__((noinline)) void outer_gather_6x2_avx2(SG_GATHER_ARGS) {
  outer_gather_full<gg::IsaAvx2>(P, a, lda, b, ldb, c);
}
#undef SG_TILE_ARGS
#undef SG_GATHER_ARGS
#endif

// The outer-product tiles as the drivers call them: full AVX-512 tiles out of line (above),
// tails and the other ISAs through the compile-time pickers.
template <class Isa>
SG_GG_INLINE void outer_rows_add(int mr, int nv, int64_t P, const float* const* a, const float* b,
                                 int64_t ldb, float* const* c, int ncols) {
#if SG_GG_MULTI
  if constexpr (std::is_same_v<Isa, gg::IsaAvx512> && Isa::MR == 6 && Isa::NV == 4) {
    if (mr == 6 && ncols == 64) return outer_tile_6x4_add_avx512(P, a, b, ldb, c);
  }
  if constexpr (std::is_same_v<Isa, gg::IsaAvx2> && Isa::MR == 6 && Isa::NV == 2) {
    if (mr == 6 && ncols == 16) return outer_tile_6x2_add_avx2(P, a, b, ldb, c);
  }
#endif
  gg::outer_rows_pick<typename Isa::V, Isa::MR, Isa::NV, true>(mr, nv, P, a, b, ldb, c, ncols);
}
template <class Isa>
SG_GG_INLINE void outer_gather_store(int mr, int nv, int64_t P, const float* a, int64_t lda,
                                     const float* b, int64_t ldb, float* const* c, int ncols) {
#if SG_GG_MULTI
  if constexpr (std::is_same_v<Isa, gg::IsaAvx512> && Isa::MR == 6 && Isa::NV == 4) {
    if (mr == 6 && ncols == 64) return outer_gather_6x4_avx512(P, a, lda, b, ldb, c);
  }
  if constexpr (std::is_same_v<Isa, gg::IsaAvx2> && Isa::MR == 6 && Isa::NV == 2) {
    if (mr == 6 && ncols == 16) return outer_gather_6x2_avx2(P, a, lda, b, ldb, c);
  }
#endif
  gg::outer_gather_pick<typename Isa::V, Isa::MR, Isa::NV>(mr, nv, P, a, lda, nullptr, b, ldb, nullptr, c,
                                                            ncols);
}

// gated_linear forward, dot form, per chunk: y[b, chunk c] = g * (x[b] . W[chunk c] + bias).
struct GlFwdArgs {
  const float* x;
  const float* w;
  const float* bias;
  float* y;
  int64_t B, K, N, chunk;
  const ChunkRouting* cr;
  bool pf;  // prefetch the next row tile in the first unit group's pass
};

// Zeroes n floats at p with streaming (non-temporal) 16-byte stores between scalar head and
// tail: the op never reads these zeros back, so the lines need not be fetched first (a plain
// store reads each line before writing it: twice the memory traffic).
inline void zero_streaming(float* p, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(p + i) & 15) != 0; ++i) p[i] = 0.f;
  const __m128 z = _mm_setzero_ps();
  for (; i + 4 <= n; i += 4) _mm_stream_ps(p + i, z);
  for (; i < n; ++i) p[i] = 0.f;
}

bool zero_use_streaming() {
  const char* env = std::getenv("STOCHGATE_GL_ZERO");
  return !(env && std::strcmp(env, "memset") == 0);
}

// Zeroes y's gated-off chunks, per row one fill per run of consecutive inactive chunks
// (per-chunk 256-byte memsets cost about 10% of the d = 0.1 forward).
void zero_inactive_runs(float* y, int64_t B, int64_t N, int64_t chunk, const RowRouting& rr) {
  const int64_t C = N / chunk;
  const bool stream = zero_use_streaming();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for_inactive_runs(rr.chunks.data(), rr.offsets[b], rr.offsets[b + 1], C, [&](int64_t c, int64_t ce) {
        float* dst = y + b * N + c * chunk;
        const int64_t n = (ce - c) * chunk;
        if (stream) zero_streaming(dst, n);
        else std::memset(dst, 0, n * sizeof(float));
      });
    }
    _mm_sfence();  // streaming stores are weakly ordered: done before the threads join
  });
}

template <class Isa>
SG_GG_INLINE void gl_fwd_chunks(const GlFwdArgs& a, int64_t c0, int64_t c1) {
  using V = typename Isa::V;
  constexpr int DR = Isa::DR, DU = Isa::DU, L = gg::VecInfo<V>::L;
  const int64_t K = a.K, N = a.N, chunk = a.chunk;
  // K blocks: a unit group's weights (DU rows x KB) stay in L1 while the chunk's row tiles
  // stream past (from L2); vector partial sums carried across blocks in `part`.
  constexpr int64_t KB = std::max<int64_t>(L, (24 << 10) / (DU * 4) / L * L);
  const int64_t nkb = std::max<int64_t>(1, (K + KB - 1) / KB);
  std::vector<float> part;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t off = a.cr->offsets[c], n = a.cr->offsets[c + 1] - off;
    const int64_t* rows = a.cr->rows.data() + off;
    const double* gate = a.cr->gate.data() + off;
    if (n == 0) continue;
    // Row blocks: the block's x rows (RB x KB) stay in L2 across the unit groups.
    const int64_t RB = std::max<int64_t>(DR, (int64_t(512) << 10) / (std::min(K, KB) * 4) / DR * DR);
    if (nkb > 1) part.resize(((std::min(n, RB) + DR - 1) / DR) * DR * DU * L);
    for (int64_t rb = 0; rb < n; rb += RB) {
      const int64_t re = std::min(n, rb + RB);
      for (int64_t u0 = 0; u0 < chunk; u0 += DU) {
        const int nu = static_cast<int>(std::min<int64_t>(DU, chunk - u0));
        const float* wr[DU];
        const float* bc = a.bias ? a.bias + c * chunk + u0 : nullptr;
        for (int64_t kb = 0; kb < nkb; ++kb) {
          const int64_t k0 = kb * KB, k1 = std::min(K, k0 + KB), kw = k1 - k0;
          const bool last = kb == nkb - 1;
          for (int u = 0; u < nu; ++u) wr[u] = a.w + (c * chunk + u0 + u) * K + k0;
          for (int64_t i0 = rb; i0 < re; i0 += DR) {
            const int nr = static_cast<int>(std::min<int64_t>(DR, re - i0));
            const float* xr[DR];
            for (int r = 0; r < nr; ++r) xr[r] = a.x + rows[i0 + r] * K + k0;
            // Software prefetch (into L2) of the next row tile at the same K offsets, in the
            // first pass over a row block (x from L3): rows are scattered, so the hardware
            // streamers restart at each one.
            const float* xn[DR];
            const int64_t i1 = i0 + DR < re ? i0 + DR : i0;
            for (int r = 0; r < nr; ++r) xn[r] = a.x + rows[std::min(i1 + r, re - 1)] * K + k0;
            float out[DR * DU];
            float* pt = nkb > 1 ? part.data() + (i0 - rb) * DU * L : nullptr;
            if (a.pf && u0 == 0)
              gg::dot_pick<V, DR, DU, true>(nr, nu, xr, wr, 0, kw, pt, kb > 0, last, out, xn);
            else
              gg::dot_pick<V, DR, DU, false>(nr, nu, xr, wr, 0, kw, pt, kb > 0, last, out, xn);
            if (!last) continue;
            for (int r = 0; r < nr; ++r) {
              const float g = static_cast<float>(gate[i0 + r]);
              float* yr = a.y + rows[i0 + r] * N + c * chunk + u0;
              for (int u = 0; u < nu; ++u) yr[u] = g * (bc ? out[r * nu + u] + bc[u] : out[r * nu + u]);
            }
          }
        }
      }
    }
  }
}
SG_GG_VARIANTS(gl_fwd_chunks, GlFwdArgs)

// gated_linear forward, outer-product form, per chunk (chunk a multiple of the vector width):
// per K block the chunk's weights are transposed into K-major panels of PW columns
// (L1-resident), then every tile of MR active rows accumulates x[row, K block] (broadcasts,
// read in place through the row list) times a panel into the chunk's packed output rows; gate
// and bias at the end. The transpose costs one pass over the weights per forward, shared by
// all of a chunk's rows.
template <class Isa>
SG_GG_INLINE void gl_fwd_outer(const GlFwdArgs& a, int64_t c0, int64_t c1) {
  using V = typename Isa::V;
  constexpr int MR = Isa::MR, NV = Isa::NV, L = gg::VecInfo<V>::L, PW = NV * L;
  // K block: one panel (KB x PW floats, 32 KiB) stays in L1 (measured at 1 thread, d =
  // 0.1..0.5: AVX-512 with KB 64 / 256 / 512 no better than 128; AVX2 on a Zen 3 with 32 KiB
  // L1, 8 / 16 / 32 KiB panels: 8 KiB 5% slower, 16 and 32 alike).
  constexpr int64_t KB = std::max<int64_t>(L, (int64_t(32) << 10) / (PW * 4) / L * L);
  const int64_t K = a.K, N = a.N, chunk = a.chunk;
  const int64_t npan = (chunk + PW - 1) / PW;
  std::vector<float> panel(npan * KB * PW);
  // Row blocks: a block's x rows (RB x KB) stay in L2 while the chunk's panels (chunk > PW:
  // AVX2, or wide chunks) take turns over them, so x is read from memory once per K block.
  constexpr int64_t RB = std::max<int64_t>(MR, (int64_t(192) << 10) / (KB * 4) / MR * MR);
  // The chunk's output rows are accumulated packed, (n, chunk) contiguous, then scaled and
  // scattered into y: in place they are a power-of-two stride apart (measured, AVX-512,
  // 2 threads, d = 0.5: 15.06 -> 14.20 ms; no change at 0.1).
  std::vector<float> yp;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t off = a.cr->offsets[c], n = a.cr->offsets[c + 1] - off;
    if (n == 0) continue;
    const int64_t* rows = a.cr->rows.data() + off;
    const double* gate = a.cr->gate.data() + off;
    const int64_t col0 = c * chunk;
    // Accumulated into yp over the K blocks (one instantiation of the tile: a second one, for
    // the first block's plain store, made GCC spill accumulators of both to the stack).
    yp.assign(n * chunk, 0.f);
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
      const int64_t kw = std::min(KB, K - k0);
      for (int64_t p = 0; p < npan; ++p) {
        const int nu = static_cast<int>(std::min<int64_t>(PW, chunk - p * PW));
        gg::pack_transposed<V>(a.w + (col0 + p * PW) * K + k0, K, nu, kw, panel.data() + p * KB * PW, PW);
      }
      for (int64_t rb = 0; rb < n; rb += RB) {
        const int64_t re = std::min(n, rb + RB);
        for (int64_t p = 0; p < npan; ++p) {
          const int nu = static_cast<int>(std::min<int64_t>(PW, chunk - p * PW));
          const int nv = nu / L;
          for (int64_t i0 = rb; i0 < re; i0 += MR) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, re - i0));
            const float* xr[MR];
            float* yr[MR];
            for (int r = 0; r < mr; ++r) {
              xr[r] = a.x + rows[i0 + r] * K + k0;
              yr[r] = yp.data() + (i0 + r) * chunk + p * PW;
            }
            if (p == 0) {
              // Prefetch the next tile's x rows (scattered, so the hardware streamers restart
              // at each one) in the first panel's pass: about 8% at d = 0.1, 1 thread.
              const int64_t ie = std::min(re, i0 + 2 * MR);
              for (int64_t i = i0 + MR; i < ie; ++i) prefetch_lines<0, 2>(a.x + rows[i] * K + k0, kw * 4);
            }
            outer_rows_add<Isa>(mr, nv, kw, xr, panel.data() + p * KB * PW, PW, yr, nu);
          }
        }
      }
    }
    const float* bc = a.bias ? a.bias + col0 : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      const float g = static_cast<float>(gate[i]);
      float* yb = a.y + rows[i] * N + col0;
      const float* acc = yp.data() + i * chunk;
      if (bc) {
        for (int64_t u = 0; u < chunk; ++u) yb[u] = g * (acc[u] + bc[u]);
      } else {
        for (int64_t u = 0; u < chunk; ++u) yb[u] = g * acc[u];
      }
    }
  }
}
SG_GG_VARIANTS(gl_fwd_outer, GlFwdArgs)

// Float32 transposes for the row kernels' operands, 16 x 16 blocks in registers: ATen's
// transposing copy of a 2048 x 2048 float32 matrix takes 5.9 ms here (2 threads), and this one
// took gated_input_linear's dh at chunk 1, density 0.1 from 26.6 to 21.4 ms.
// dst[p * ldd + u] = src[u * ld + p] for the rows u of blocks [i0, i1) of nu rows, p < cols.
struct TransposeArgs {
  const float* src;
  int64_t ld, cols;
  float* dst;
  int64_t ldd, nu;
};
template <class Isa>
SG_GG_INLINE void transpose_blocks(const TransposeArgs& a, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    gg::pack_transposed<typename Isa::V>(a.src + i * a.nu * a.ld, a.ld, static_cast<int>(a.nu), a.cols,
                                         a.dst + i * a.nu, a.ldd);
  }
}
SG_GG_VARIANTS(transpose_blocks, TransposeArgs)

// t (R, K) -> t^T (K, R) contiguous (ATen's copy for other dtypes and R not a multiple of 16).
at::Tensor transposed(const at::Tensor& t) {
  const int64_t R = t.size(0), K = t.size(1);
  if (t.scalar_type() != at::kFloat || R % 16 != 0) return t.t().contiguous();
  auto out = at::empty({K, R}, t.options());
  const TransposeArgs args{t.const_data_ptr<float>(), K, K, out.mutable_data_ptr<float>(), R, 16};
  const int isa = gg_isa();
  at::parallel_for(0, R / 16, 1, [&](int64_t i0, int64_t i1) { transpose_blocks_run(isa, args, i0, i1); });
  return out;
}

// Block-major copy (see block_major) of the transpose of t (K, R), float32, K a multiple of
// 128: [kb, r, j] = t[kb * 128 + j, r].
at::Tensor block_major_t(const at::Tensor& t) {
  const int64_t K = t.size(0), R = t.size(1);
  auto out = at::empty({K / kKBlock, R, kKBlock}, t.options());
  const float* src = t.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  const int isa = gg_isa();
  at::parallel_for(0, K / kKBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t kb = b0; kb < b1; ++kb) {
      const TransposeArgs args{src + kb * kKBlock * R, R, R, dst + kb * R * kKBlock, kKBlock, kKBlock};
      transpose_blocks_run(isa, args, 0, 1);
    }
  });
  return out;
}

// Which gated_linear forward kernel a float32 chunk takes: the outer-product form where the
// chunk is a multiple of the vector width (STOCHGATE_GL_FWD=dot forces the dot form).
bool gl_fwd_use_outer(int isa, int64_t chunk) {
  const char* env = std::getenv("STOCHGATE_GL_FWD");
  if (env && std::strcmp(env, "dot") == 0) return false;
  const int64_t L = isa == 2 ? 16 : isa == 1 ? 8 : 4;
  return chunk % L == 0;
}

// Column block (a multiple of 64) for drivers that accumulate into (B, block) slabs of an
// output: about 1 MB per slab, and at least one block per thread.
int64_t slab_block(int64_t B, int64_t cols) {
  const int64_t panels = (cols + 63) / 64;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t by_cache = std::max<int64_t>(1, (int64_t(1) << 20) / (std::max<int64_t>(B, 1) * 4 * 64));
  const int64_t by_par = std::max<int64_t>(1, (panels + threads - 1) / threads);
  return 64 * std::min(by_cache, by_par);
}

// out[b, k-block] (+)= sum over the active chunks c of b, in ascending order, of
// A_c[b] (chunk) @ Bm_c (chunk, cols). Used for gated_linear's dx (A = packed g*dy, Bm = W
// block rows, strided) and gated_input_linear's forward (A = h rows, Bm = packed W2^T).
struct ScatterArgs {
  const float* a;   // packed (pairs, chunk) if a_rows_packed, else (B, lda) at column c*chunk
  int64_t lda;
  bool a_packed;
  const float* bm;  // (N-ish, cols) row-major with ldb; rows c*chunk + j
  int64_t ldb;
  bool pack_bt;     // Bm_c is the transpose of bm[:, c*chunk + j] (gated_input_linear)
  const float* init;  // (cols,) initial value of every row, or null (zeros)
  float* out;
  int64_t B, cols, chunk, C, block;
  const ChunkRouting* cr;
  const char* skip = nullptr;  // chunks left to a dense GEMM (skip[c] != 0), or null
};

// Whether every one of the C chunks is left to a dense GEMM (skip as in ScatterArgs).
inline bool all_chunks_dense(const char* skip, int64_t C) {
  if (skip == nullptr) return false;
  for (int64_t c = 0; c < C; ++c) {
    if (!skip[c]) return false;
  }
  return true;
}

template <class Isa>
SG_GG_INLINE void scatter_blocks(const ScatterArgs& a, int64_t blk0, int64_t blk1) {
  using V = typename Isa::V;
  constexpr int MR = Isa::MR, NV = Isa::NV, L = gg::VecInfo<V>::L, PW = NV * L;
  const int64_t chunk = a.chunk, cols = a.cols;
  std::vector<float> buf(chunk * PW);
  // The (B, block) slab of out is accumulated in a contiguous buffer and copied out at the
  // end: in place its rows are a power-of-two stride apart in the common shapes and the 1 MB
  // slab maps to an eighth of the L2 sets (measured, 2 threads, B = 1024, K = N = 2048,
  // chunk 64: gated_linear dx 4.68 -> 4.37 / 9.52 -> 8.50 / 16.58 -> 14.93 ms at d = 0.1 /
  // 0.25 / 0.5; gated_input_linear forward 9.71 -> 8.86 ms at 0.25).
  // When MKL takes every chunk only the initial value is written, in place.
  const bool in_place = all_chunks_dense(a.skip, a.C);
  std::vector<float> sb(in_place ? 0 : a.B * a.block);
  const int64_t ldo = in_place ? cols : a.block;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t k0 = blk * a.block, k1 = std::min(cols, k0 + a.block), kw = k1 - k0;
    float* const slab = in_place ? a.out + k0 : sb.data();  // column k0 + j of row b: slab[b * ldo + j]
    for (int64_t b = 0; b < a.B; ++b) {
      float* o = slab + b * ldo;
      if (a.init) std::memcpy(o, a.init + k0, kw * sizeof(float));
      else std::memset(o, 0, kw * sizeof(float));
    }
    for (int64_t c = 0; c < a.C; ++c) {
      const int64_t off = a.cr->offsets[c], n = a.cr->offsets[c + 1] - off;
      if (n == 0 || (a.skip && a.skip[c])) continue;
      const int64_t* rows = a.cr->rows.data() + off;
      for (int64_t kp = k0; kp < k1; kp += PW) {
        const int w = static_cast<int>(std::min<int64_t>(PW, k1 - kp));
        const int nv = (w + L - 1) / L;
        // Contiguous (chunk, PW) copy of the B panel: L1-resident for all row tiles (the
        // strided original maps to a few L1 sets).
        if (a.pack_bt && w % L == 0) {  // buf[j, t] = bm[kp + t, c*chunk + j], in-register transposes
          gg::pack_transposed<V>(a.bm + kp * a.ldb + c * chunk, a.ldb, w, chunk, buf.data(), PW);
        } else if (a.pack_bt) {
          if (w < PW) std::fill(buf.begin(), buf.end(), 0.f);
          for (int t = 0; t < w; ++t) {
            const float* src = a.bm + (kp + t) * a.ldb + c * chunk;
            for (int64_t j = 0; j < chunk; ++j) buf[j * PW + t] = src[j];
          }
        } else {
          // The next panel's lines of the chunk's rows (one per row on AVX2, rows 8 KB apart
          // in the common shapes) prefetched while this one is copied (AVX2, interleaved, two
          // rounds: dx 12.0 / 13.2 -> 10.8 / 12.1 ms at d = 0.1, 3-5% at 0.25 and 0.5).
          if (kp + PW < k1) {
            const int64_t wn = std::min<int64_t>(PW, k1 - kp - PW) * 4;
            for (int64_t j = 0; j < chunk; ++j) prefetch_lines(a.bm + (c * chunk + j) * a.ldb + kp + PW, wn);
          }
          pack_panel<V>(a.bm + c * chunk * a.ldb, a.ldb, nullptr, chunk, kp, w, buf.data(), PW);
        }
        for (int64_t i0 = 0; i0 < n; i0 += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, n - i0));
          // The next row tile's output lines, fetched for writing while this tile runs: its
          // rows are random rows of a slab larger than the L2, and the tile's closing
          // read-modify-write of them otherwise waited on memory (AVX2, 2 threads, B = 1024,
          // K = N = 2048, chunk 64, interleaved: dx 14.1 -> 12.1 / 25.2 -> 22.4 / 46.1 -> 41.2
          // ms at d = 0.1 / 0.25 / 0.5).
          for (int64_t i = i0 + MR; i < std::min<int64_t>(n, i0 + 2 * MR); ++i) {
            prefetch_lines<1>(slab + rows[i] * ldo + (kp - k0), w * 4);
          }
          const float* ar[MR];
          float* cp[MR];
          for (int i = 0; i < mr; ++i) {
            ar[i] = a.a_packed ? a.a + (off + i0 + i) * chunk : a.a + rows[i0 + i] * a.lda + c * chunk;
            cp[i] = slab + rows[i0 + i] * ldo + (kp - k0);
          }
          outer_rows_add<Isa>(mr, nv, chunk, ar, buf.data(), PW, cp, w);
        }
      }
    }
    if (in_place) continue;
    for (int64_t b = 0; b < a.B; ++b) std::memcpy(a.out + b * cols + k0, sb.data() + b * ldo, kw * sizeof(float));
  }
}
SG_GG_VARIANTS(scatter_blocks, ScatterArgs)

// out[u-rows, cols] = sum_q A(q)[u] * Bq[cols], per chunk (outputs of different chunks are
// disjoint): gated_linear's dW (A = packed g*dy, B = x rows) and gated_input_linear's dW2
// (A = dy rows, B = h rows at the chunk's columns).
struct GatherArgs {
  const float* a;
  int64_t lda;
  bool a_by_row;     // A(q) = a + rows[q] * lda + u (dy rows) else a + (off + q) * lda + u
  int64_t a_rows;    // number of output rows per chunk (chunk for dW, M for dW2)
  bool a_chunk_major;  // dW: output rows are c*chunk + u; dW2: output rows u, cols c*chunk + j
  const float* b;
  int64_t ldb;
  int64_t b_cols;    // reduction-free width: K for dW, chunk for dW2
  float* out;
  int64_t ldo;
  int64_t chunk;
  const ChunkRouting* cr;
  const char* skip = nullptr;  // chunks left to a dense GEMM (skip[c] != 0), or null
};

template <class Isa>
SG_GG_INLINE void gather_chunks(const GatherArgs& a, int64_t c0, int64_t c1) {
  using V = typename Isa::V;
  constexpr int MR = Isa::MR, NV = Isa::NV, L = gg::VecInfo<V>::L, PW = NV * L;
  constexpr int64_t MB = 8 * MR;  // A block (rows-form A is packed per block of MB columns)
  const int64_t chunk = a.chunk;
  std::vector<float> bbuf, abuf;
  for (int64_t c = c0; c < c1; ++c) {
    if (a.skip && a.skip[c]) continue;
    const int64_t off = a.cr->offsets[c], n = a.cr->offsets[c + 1] - off;
    const int64_t* rows = a.cr->rows.data() + off;
    // output block: rows [r0, r0 + a_rows), columns [col0, col0 + b_cols)
    const int64_t r0 = a.a_chunk_major ? c * chunk : 0;
    const int64_t col0 = a.a_chunk_major ? 0 : c * chunk;
    const int64_t bcol0 = a.a_chunk_major ? 0 : c * chunk;  // column of B's rows
    if (n == 0) {
      for (int64_t r = r0; r < r0 + a.a_rows; ++r)
        std::memset(a.out + r * a.ldo + col0, 0, a.b_cols * sizeof(float));
      continue;
    }
    // B panels packed SP at a time, so that each gathered row is read in 1 KB pieces (SP * PW
    // = 256 floats) instead of one panel's 64 (AVX2) or 256 bytes (AVX-512), with the piece
    // kRowsAhead rows ahead prefetched.
    // Measured, gated_linear dW, 2 threads, B = 1024, K = N = 2048, chunk 64: AVX-512, 1 KB
    // pieces (SP 4 instead of 1) 5.19 -> 4.47 ms at d = 0.1, no change at 0.25 and 0.5; AVX2,
    // 1 KB pieces and the prefetch (SP 16 instead of 4), interleaved: 8.9 -> 7.8 / 31.7 ->
    // 21.3-25.6 / 45.9 -> 42.3 ms at d = 0.1 / 0.25 / 0.5 (the prefetch not timed on AVX-512).
    constexpr int64_t SP = 256 / PW;
    bbuf.resize(std::min<int64_t>(SP, (a.b_cols + PW - 1) / PW) * n * PW);
    if (a.a_by_row) abuf.resize(n * MB);
    for (int64_t ks = 0; ks < a.b_cols; ks += SP * PW) {
      const int64_t nsp = std::min<int64_t>(SP, (a.b_cols - ks + PW - 1) / PW);
      if (a.b_cols - ks >= nsp * PW) {  // whole panels
        for (int64_t q = 0; q < n; ++q) {
          const float* src = a.b + rows[q] * a.ldb + bcol0 + ks;
          prefetch_row_ahead(a.b, a.ldb, rows, q, n, bcol0 + ks, nsp * PW * 4);
          for (int64_t sp = 0; sp < nsp; ++sp) {
            float* d = bbuf.data() + (sp * n + q) * PW;
            for (int j = 0; j < PW; j += L) gg::vstore(d + j, gg::vload<V>(src + sp * PW + j));
          }
        }
      } else {
        for (int64_t sp = 0; sp < nsp; ++sp) {
          const int64_t kp = ks + sp * PW;
          pack_panel<V>(a.b, a.ldb, rows, n, bcol0 + kp, std::min<int64_t>(PW, a.b_cols - kp),
                        bbuf.data() + sp * n * PW, PW);
        }
      }
      // Every (B panel, A unit block) pair. Packed A (dW): panels outermost, so each panel
      // stays in L1 for all the unit blocks. Rows-form A (dW2: dy rows): unit blocks
      // outermost, each block's n random rows gathered once for all the panels (gathered per
      // panel and block, they were fetched nsp times). Measured, gated_input_linear dW2, AVX2,
      // 2 threads, chunk 64, interleaved: 13.0 -> 10.7 / 26.3 -> 19.8 / 63.5 -> 49.8 ms at
      // d = 0.1 / 0.25 / 0.5; pack_panel's prefetch of the rows ahead then 11.7 -> 10.6 /
      // 23.6 -> 22.3 / 50.5 -> 45.6 ms.
      const int64_t nub = (a.a_rows + MB - 1) / MB;
      for (int64_t t = 0; t < nsp * nub; ++t) {
        const int64_t sp = a.a_by_row ? t % nsp : t / nub;
        const int64_t ub = (a.a_by_row ? t / nsp : t % nub) * MB;
        const int64_t ube = std::min(a.a_rows, ub + MB);
        const int64_t kp = ks + sp * PW;
        const float* panel = bbuf.data() + sp * n * PW;
        const int w = static_cast<int>(std::min<int64_t>(PW, a.b_cols - kp));
        const int nv = (w + L - 1) / L;
        const float* abase = a.a + off * a.lda;
        int64_t lda = a.lda;
        if (a.a_by_row) {
          if (sp == 0) pack_panel<V>(a.a, a.lda, rows, n, ub, ube - ub, abuf.data(), MB);
          abase = abuf.data() - ub;
          lda = MB;
        }
        for (int64_t u0 = ub; u0 < ube; u0 += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, ube - u0));
          float* cp[MR];
          for (int i = 0; i < mr; ++i) cp[i] = a.out + (r0 + u0 + i) * a.ldo + col0 + kp;
          outer_gather_store<Isa>(mr, nv, n, abase + u0, lda, panel, PW, cp, w);
        }
      }
    }
  }
}
SG_GG_VARIANTS(gather_chunks, GatherArgs)

// gated_input_linear's dh: dh[b, chunk c] = dy[b] @ W2[:, chunk c] on active pairs, zero
// elsewhere.
struct DhArgs {
  const float* dy;
  const float* w2;
  float* dh;
  int64_t B, N, M, chunk;
  const ChunkRouting* cr;
  const char* skip = nullptr;  // chunks left to a dense GEMM (skip[c] != 0), or null
};

template <class Isa>
SG_GG_INLINE void dh_chunks(const DhArgs& a, int64_t c0, int64_t c1) {
  using V = typename Isa::V;
  constexpr int MR = Isa::MR, NV = Isa::NV, L = gg::VecInfo<V>::L, PW = NV * L;
  constexpr int64_t MB = (24 << 10) / (PW * 4);  // packed W2 block rows kept in L1
  const int64_t chunk = a.chunk, N = a.N, M = a.M;
  std::vector<float> buf(M * PW);
  for (int64_t c = c0; c < c1; ++c) {
    if (a.skip && a.skip[c]) continue;
    const int64_t off = a.cr->offsets[c], n = a.cr->offsets[c + 1] - off;
    const int64_t* rows = a.cr->rows.data() + off;
    zero_inactive(a.dh, a.B, N, c * chunk, chunk, rows, n);
    if (n == 0) continue;
    for (int64_t i = 0; i < n; ++i) std::memset(a.dh + rows[i] * N + c * chunk, 0, chunk * sizeof(float));
    for (int64_t jp = 0; jp < chunk; jp += PW) {
      const int w = static_cast<int>(std::min<int64_t>(PW, chunk - jp));
      const int nv = (w + L - 1) / L;
      pack_panel<V>(a.w2, N, nullptr, M, c * chunk + jp, w, buf.data(), PW);
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mb = std::min(MB, M - m0);
        for (int64_t i0 = 0; i0 < n; i0 += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, n - i0));
          const float* ar[MR];
          float* cp[MR];
          for (int i = 0; i < mr; ++i) {
            ar[i] = a.dy + rows[i0 + i] * M + m0;
            cp[i] = a.dh + rows[i0 + i] * N + c * chunk + jp;
          }
          outer_rows_add<Isa>(mr, nv, mb, ar, buf.data() + m0 * PW, PW, cp, w);
        }
      }
    }
  }
}
SG_GG_VARIANTS(dh_chunks, DhArgs)

// Kernels run in float32 for float16/bfloat16 inputs, else in the input's dtype.
at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// Detached: ATen calls made inside at::parallel_for run on OpenMP worker threads, which do not
// inherit the dispatcher's below-autograd state, so an input that requires grad would make
// at::mm_out refuse to run there.
at::Tensor to_compute(const at::Tensor& t) {
  return t.detach().to(compute_type(t.scalar_type())).contiguous();
}

at::Tensor empty0(const at::Tensor& like) { return at::empty({0}, like.options()); }

#define SG_DISPATCH_COMPUTE(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__))

// ---------------------------------------------------------------------------------------
// gated_linear

// Chunks with at least gl_fwd_mm_min_rows(B) active rows: the float32 tiled kernels leave them
// to MKL and the bfloat16 AMX kernels to oneDNN, as runs of consecutive chunks (empty if none).
std::vector<char> dense_chunks(const ChunkRouting& cr, int64_t B, int64_t C) {
  const int64_t mm_min = gl_fwd_mm_min_rows(B);
  std::vector<char> dense(C, 0);
  bool any = false;
  for (int64_t c = 0; c < C; ++c) any |= (dense[c] = cr.offsets[c + 1] - cr.offsets[c] >= mm_min);
  if (!any) dense.clear();
  return dense;
}

// The routing of `gates` (B, C) as the bfloat16 AMX kernels (gated_amx.h) take it, with the
// dense chunks (dense_chunks); pairs() points into this object.
struct AmxRouting {
  RowRouting rr;
  ChunkRouting cr;
  std::vector<char> dense;
  AmxRouting(const at::Tensor& gates, int64_t B, int64_t C)
      : rr(route_rows(gates)), cr(route_chunks(rr, C)), dense(dense_chunks(cr, B, C)) {}
  amx::Pairs pairs() const {
    amx::Pairs p;
    p.B = static_cast<int64_t>(rr.offsets.size()) - 1;
    p.C = static_cast<int64_t>(cr.offsets.size()) - 1;
    p.chunk_off = cr.offsets.data();
    p.rows = cr.rows.data();
    p.gate = cr.gate.data();
    p.row_off = rr.offsets.data();
    p.chunks = rr.chunks.data();
    p.dense = dense.empty() ? nullptr : dense.data();
    return p;
  }
};

// Calls run(c, ce) for each maximal run [c, ce) of dense chunks (chunk_runs.h).
template <typename F>
void for_dense_runs(const std::vector<char>& dense, const F& run) {
  stochgate::for_dense_runs(dense.data(), static_cast<int64_t>(dense.size()), run);
}

// (B, (ce - c) * chunk) block holding chunks [c, ce) of src on their active rows, zeros
// elsewhere; src is (B, ld) with the chunks at their own columns, or packed pairs (q, chunk).
at::Tensor masked_block(const float* src, int64_t ld, bool packed, const ChunkRouting& cr, int64_t B,
                        int64_t chunk, int64_t c, int64_t ce, const at::TensorOptions& opts) {
  const int64_t width = (ce - c) * chunk;
  auto blk = at::zeros({B, width}, opts);
  float* pblk = blk.mutable_data_ptr<float>();
  at::parallel_for(c, ce, 1, [&](int64_t cc0, int64_t cc1) {
    for (int64_t cc = cc0; cc < cc1; ++cc) {
      for (int64_t q = cr.offsets[cc]; q < cr.offsets[cc + 1]; ++q) {
        const float* s = packed ? src + q * chunk : src + cr.rows[q] * ld + cc * chunk;
        std::memcpy(pblk + cr.rows[q] * width + (cc - c) * chunk, s, chunk * sizeof(float));
      }
    }
  });
  return blk;
}

at::Tensor gated_linear_cpu(const at::Tensor& x_in, const at::Tensor& w_in,
                            const c10::optional<at::Tensor>& bias_in, const at::Tensor& gates,
                            bool /*full_gate_grad: autograd only*/) {
  const char* op = "stochgate::gated_linear";
  check_gated_inputs(op, x_in, "x", w_in, bias_in, gates, /*gate_output_units=*/true);
  const int64_t B = x_in.size(0), K = x_in.size(1), N = w_in.size(0), C = gates.size(1);
  const int64_t chunk = N / C;
  if (B > 0 && N > 0 && K > 0 && amx::applies(x_in, w_in, bias_in, chunk)) {
    return amx::gated_linear(x_in, w_in, bias_in, chunk, AmxRouting(gates, B, C).pairs());
  }
  auto x = to_compute(x_in);
  auto w = to_compute(w_in);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = to_compute(*bias_in);
  auto y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y.to(x_in.scalar_type());
  const RowRouting rr = route_rows(gates);

  SG_DISPATCH_COMPUTE(x.scalar_type(), "gated_linear_cpu", [&] {
    using T = scalar_t;
    const T* px = x.const_data_ptr<T>();
    const T* pw = w.const_data_ptr<T>();
    const T* pb = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
    T* py = y.mutable_data_ptr<T>();
    if (chunk < kGemmMinChunk) {
      // Gated-off chunks are never computed: zeros there, the active units filled in.
      sddmm_rows_out(px, pw, B, N, K, chunk, rr, py, [&](int64_t p, int64_t n, T d) {
        return static_cast<T>(rr.gate[p]) * (pb ? d + pb[n] : d);
      });
      return;
    }
    const ChunkRouting cr = route_chunks(rr, C);
    if constexpr (std::is_same_v<T, float>) {
      const GlFwdArgs args{fp(px), fp(pw), fp(pb), fpm(py), B, K, N, chunk, &cr, true};
      const int isa = gg_isa();
      const int64_t mm_min = gl_fwd_mm_min_rows(B);
      const bool outer = gl_fwd_use_outer(isa, chunk);
      zero_inactive_runs(fpm(py), B, N, chunk, rr);
      at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1;) {
          if (cr.offsets[c + 1] - cr.offsets[c] < mm_min) {
            if (outer) gl_fwd_outer_run(isa, args, c, c + 1);
            else gl_fwd_chunks_run(isa, args, c, c + 1);
            ++c;
            continue;
          }
          // A run of dense chunks: one GEMM over every row of x straight into y's columns
          // (inactive rows computed and discarded; MKL needs the width: 64 columns run at
          // about 60% of its wide speed), then gate + bias on the active rows, zeros elsewhere.
          int64_t ce = c + 1;
          while (ce < c1 && cr.offsets[ce + 1] - cr.offsets[ce] >= mm_min) ++ce;
          auto yc = y.narrow(1, c * chunk, (ce - c) * chunk);
          at::mm_out(yc, x, w.narrow(0, c * chunk, (ce - c) * chunk).t());
          for (; c < ce; ++c) {
          const int64_t off = cr.offsets[c], n = cr.offsets[c + 1] - off;
          const int64_t* rows = cr.rows.data() + off;
          const float* bc = pb ? fp(pb) + c * chunk : nullptr;
          float* y0 = fpm(py) + c * chunk;
          int64_t i = 0;
          for (int64_t b = 0; b < B; ++b) {
            float* yb = y0 + b * N;
            if (i < n && rows[i] == b) {
              const float g = static_cast<float>(cr.gate[off + i]);
              if (bc) {
                for (int64_t j = 0; j < chunk; ++j) yb[j] = g * (yb[j] + bc[j]);
              } else {
                for (int64_t j = 0; j < chunk; ++j) yb[j] *= g;
              }
              ++i;
            } else {
              std::memset(yb, 0, chunk * sizeof(float));
            }
          }
          }
        }
      });
      return;
    }
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      auto xg = at::empty({std::max<int64_t>(cr.max_rows, 1), K}, x.options());
      auto pg = at::empty({std::max<int64_t>(cr.max_rows, 1), chunk}, x.options());
      T* pxg = xg.mutable_data_ptr<T>();
      const T* ppg = pg.const_data_ptr<T>();
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t off = cr.offsets[c], n = cr.offsets[c + 1] - off;
        const int64_t* rows = cr.rows.data() + off;
        if (n > 0) {
          auto dst = pg.narrow(0, 0, n);
          auto wc = w.narrow(0, c * chunk, chunk).t();
          if (n == B) {
            at::mm_out(dst, x, wc);  // every row active: no gather
          } else {
            gather_rows(px, K, rows, n, pxg);
            at::mm_out(dst, xg.narrow(0, 0, n), wc);
          }
        }
        const T* bc = pb ? pb + c * chunk : nullptr;
        int64_t i = 0;
        for (int64_t b = 0; b < B; ++b) {
          T* yb = py + b * N + c * chunk;
          if (i < n && rows[i] == b) {
            const T g = static_cast<T>(cr.gate[off + i]);
            const T* src = ppg + i * chunk;
            if (bc) {
              for (int64_t j = 0; j < chunk; ++j) yb[j] = g * (src[j] + bc[j]);
            } else {
              for (int64_t j = 0; j < chunk; ++j) yb[j] = g * src[j];
            }
            ++i;
          } else {
            std::fill(yb, yb + chunk, T(0));
          }
        }
      }
    });
  });
  return y.scalar_type() == x_in.scalar_type() ? y : y.to(x_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& w_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& gates,
    std::array<bool, 4> output_mask, bool full_gate_grad) {
  const char* op = "stochgate::gated_linear_backward";
  check_gated_inputs(op, x_in, "x", w_in, bias_in, gates, /*gate_output_units=*/true);
  const int64_t B = x_in.size(0), K = x_in.size(1), N = w_in.size(0), C = gates.size(1);
  const int64_t chunk = N / C;
  check_gated_grad(op, grad_y_in, x_in, "x", N);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const bool need_dx = output_mask[0], need_dw = output_mask[1];
  const bool need_db = output_mask[2] && has_bias, need_dg = output_mask[3];
  if (B > 0 && N > 0 && K > 0 && amx::applies(x_in, w_in, bias_in, chunk, &grad_y_in)) {
    return amx::gated_linear_backward(grad_y_in, x_in, w_in, bias_in, gates, chunk, AmxRouting(gates, B, C).pairs(),
                                      output_mask, full_gate_grad);
  }

  auto x = to_compute(x_in);
  auto w = to_compute(w_in);
  auto dy = to_compute(grad_y_in);
  at::Tensor bias;
  if (has_bias) bias = to_compute(*bias_in);

  at::Tensor dx = need_dx ? at::empty({B, K}, x.options()) : empty0(x_in);
  at::Tensor dw = need_dw ? at::empty({N, K}, x.options()) : empty0(x_in);
  at::Tensor db = need_db ? at::zeros({N}, x.options()) : empty0(x_in);
  at::Tensor dg = need_dg ? at::zeros({B, C}, gates.options())
                          : empty0(gates);
  if (need_dw && B == 0) dw.zero_();
  if (need_dg && full_gate_grad && B > 0) {
    // Exact gate gradient for every pair: needs the skipped products (one dense GEMM).
    auto pre = bias.defined() ? at::addmm(bias, x, w.t()) : at::mm(x, w.t());
    dg.copy_((dy * pre).view({B, C, chunk}).sum(-1));
  }
  const bool need_active_dg = need_dg && !full_gate_grad;
  if (B == 0 || N == 0 || !(need_dx || need_dw || need_db || need_active_dg)) {
    if (need_dx) dx.zero_();
    if (need_dw) dw.zero_();
    auto cast = [&](const at::Tensor& t) {
      return t.numel() && t.scalar_type() != x_in.scalar_type() ? t.to(x_in.scalar_type()) : t;
    };
    return {cast(dx), cast(dw), cast(db), dg};
  }
  const RowRouting rr = route_rows(gates);
  const ChunkRouting cr = route_chunks(rr, C);
  // Active dgates computed in the compute dtype, copied into gates' dtype at the end.
  std::vector<double> dg_active(need_active_dg ? rr.chunks.size() : 0, 0.0);

  SG_DISPATCH_COMPUTE(x.scalar_type(), "gated_linear_backward_cpu", [&] {
    using T = scalar_t;
    const T* px = x.const_data_ptr<T>();
    const T* pw = w.const_data_ptr<T>();
    const T* pdy = dy.const_data_ptr<T>();
    const T* pbias = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
    // dpre of the active pairs, gate * dy[row, c*chunk + j], packed by chunk (dp[q, j]) and,
    // for the row kernels' coefficients, in row order (dpr[p, j]).
    const at::Tensor dpr = chunk < kGemmMinChunk ? row_pairs<T>(dy, rr, chunk, /*scale=*/true) : at::Tensor();
    const T* pdpr = dpr.defined() ? dpr.const_data_ptr<T>() : nullptr;
    const at::Tensor dp = dpr.defined() ? chunk_order<T>(dpr, cr, chunk) : pack_pairs<T>(dy, rr, cr, chunk, true);
    const T* pdp = dp.const_data_ptr<T>();
    if (need_db) {
      T* pdb = db.mutable_data_ptr<T>();
      at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          T* d = pdb + c * chunk;
          for (int64_t q = cr.offsets[c]; q < cr.offsets[c + 1]; ++q) {
            for (int64_t j = 0; j < chunk; ++j) d[j] += pdp[q * chunk + j];
          }
        }
      });
    }
    if (chunk < kGemmMinChunk) {
      // Row-wise sparse kernels. q-index of pair p (row order) -> chunk order is not needed:
      // dx and active dgates walk rows, dw walks chunks. dx and dw read W and x in place where
      // they stream whole rows (AVX2), from block-major copies where they walk K blocks.
      const bool blocks = use_row_blocks<T>(K);
      if (need_dx) {
        const at::Tensor wb = blocks ? block_major(w) : at::Tensor();
        spmm_rows_all<T>(pw, B, N, K, chunk, rr, nullptr, dx.mutable_data_ptr<T>(),
                         row_pair_coef(pdpr, rr, chunk),
                         blocks ? Blocked{wb.const_data_ptr<float>(), N} : Blocked{});
      }
      if (need_dw) {
        const at::Tensor xb = blocks ? block_major(x) : at::Tensor();
        spmm_units_all<T>(px, B, C, K, chunk, cr, dw.mutable_data_ptr<T>(),
                          [&](int64_t q, int64_t n) { return pdp[q * chunk + n % chunk]; },
                          blocks ? Blocked{xb.const_data_ptr<float>(), B} : Blocked{});
      }
      if (need_active_dg) {
        // dgates[b, c] = sum over the chunk's units of dy * pre; units of one pair may be
        // visited in different unit blocks but always by the same thread (rows are split).
        sddmm(px, pw, B, N, K, chunk, rr, [&](int64_t b, int64_t n, int64_t p, T d) {
          dg_active[p] += static_cast<double>(pdy[b * N + n] * (pbias ? d + pbias[n] : d));
        });
      }
      return;
    }
    bool dw_done = false, dx_done = false;
    if constexpr (std::is_same_v<T, float>) {
      const int isa = gg_isa();
      const bool tiled = gg_tiled_mkl_routes();
      // Chunks with at least the forward's share of active rows (gl_fwd_mm_min_rows) go
      // through MKL as runs of consecutive chunks, like the forward: their g*dy block with
      // zeros in the inactive rows, dx += block @ W[run], dW[run] = block^T @ x (at d = 1.0 the
      // tiled kernels took 98.7 ms for a training step against dense 74.9).
      const std::vector<char> dense = tiled && (need_dx || need_dw) ? dense_chunks(cr, B, C) : std::vector<char>();
      const bool any_dense = !dense.empty();
      const char* skip = any_dense ? dense.data() : nullptr;
      if (need_dx && tiled) {
        dx_done = true;
        const int64_t block = slab_block(B, K);
        ScatterArgs args{fp(pdp), chunk, true, fp(pw), K, false, nullptr, dx.mutable_data_ptr<float>(),
                         B, K, chunk, C, block, &cr};
        args.skip = skip;
        at::parallel_for(0, (K + block - 1) / block, 1, [&](int64_t k0, int64_t k1) {
          scatter_blocks_run(isa, args, k0, k1);
        });
      }
      if (need_dw && tiled) {
        GatherArgs args{fp(pdp), chunk, false, chunk, true, fp(px), K, K,
                        dw.mutable_data_ptr<float>(), K, chunk, &cr};
        args.skip = skip;
        at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) { gather_chunks_run(isa, args, c0, c1); });
        dw_done = true;
      }
      for_dense_runs(dense, [&](int64_t c, int64_t ce) {
        const int64_t width = (ce - c) * chunk;
        auto blk = masked_block(fp(pdp), 0, /*packed=*/true, cr, B, chunk, c, ce, dy.options());
        if (need_dx) dx.addmm_(blk, w.narrow(0, c * chunk, width));
        if (need_dw) {
          auto dwr = dw.narrow(0, c * chunk, width);
          at::mm_out(dwr, blk.t(), x);
        }
      });
    }
    if (need_dx && !dx_done) {
      scatter_add_gemm<T>(dp, cr, B, K, nullptr, dx,
                          [&](int64_t c) { return w.narrow(0, c * chunk, chunk); });
    }
    if ((need_dw && !dw_done) || need_active_dg) {
      // Map chunk-ordered pairs back to row-ordered pair indices for dg_active.
      std::vector<int64_t> pair_of;
      if (need_active_dg) {
        pair_of.resize(cr.rows.size());
        std::vector<int64_t> cursor(rr.offsets.begin(), rr.offsets.end() - 1);
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t q = cr.offsets[c]; q < cr.offsets[c + 1]; ++q) pair_of[q] = cursor[cr.rows[q]]++;
        }
      }
      at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
        auto xg = at::empty({std::max<int64_t>(cr.max_rows, 1), K}, x.options());
        auto pg = at::empty({std::max<int64_t>(cr.max_rows, 1), chunk}, x.options());
        T* pxg = xg.mutable_data_ptr<T>();
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t off = cr.offsets[c], n = cr.offsets[c + 1] - off;
          if (n == 0) {
            if (need_dw && !dw_done) dw.narrow(0, c * chunk, chunk).zero_();
            continue;
          }
          at::Tensor xs;
          if (n == B) {
            xs = x;
          } else {
            gather_rows(px, K, cr.rows.data() + off, n, pxg);
            xs = xg.narrow(0, 0, n);
          }
          if (need_dw && !dw_done) {
            auto dwc = dw.narrow(0, c * chunk, chunk);
            at::mm_out(dwc, dp.narrow(0, off, n).t(), xs);
          }
          if (need_active_dg) {
            auto dst = pg.narrow(0, 0, n);
            at::mm_out(dst, xs, w.narrow(0, c * chunk, chunk).t());
            const T* ppg = pg.const_data_ptr<T>();
            for (int64_t i = 0; i < n; ++i) {
              const T* gy = pdy + cr.rows[off + i] * N + c * chunk;
              T s = 0;
              for (int64_t j = 0; j < chunk; ++j) {
                s += gy[j] * (pbias ? ppg[i * chunk + j] + pbias[c * chunk + j] : ppg[i * chunk + j]);
              }
              dg_active[pair_of[off + i]] = static_cast<double>(s);
            }
          }
        }
      });
    }
  });
  if (need_active_dg) {
    auto vals = at::empty({static_cast<int64_t>(dg_active.size())}, at::kDouble);
    std::memcpy(vals.mutable_data_ptr<double>(), dg_active.data(), dg_active.size() * sizeof(double));
    auto idx = at::empty({static_cast<int64_t>(rr.chunks.size())}, at::kLong);
    int64_t* pi = idx.mutable_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t p = rr.offsets[b]; p < rr.offsets[b + 1]; ++p) pi[p] = b * C + rr.chunks[p];
    }
    dg.view({-1}).index_put_({idx}, vals.to(dg.scalar_type()));
  }
  auto cast = [&](const at::Tensor& t) {
    return t.numel() && t.scalar_type() != x_in.scalar_type() ? t.to(x_in.scalar_type()) : t;
  };
  return {cast(dx), cast(dw), cast(db), dg};
}

// ---------------------------------------------------------------------------------------
// gated_input_linear

at::Tensor gated_input_linear_cpu(const at::Tensor& h_in, const at::Tensor& w_in,
                                  const c10::optional<at::Tensor>& bias_in,
                                  const at::Tensor& gates) {
  const char* op = "stochgate::gated_input_linear";
  check_gated_inputs(op, h_in, "h", w_in, bias_in, gates, /*gate_output_units=*/false);
  const int64_t B = h_in.size(0), N = h_in.size(1), M = w_in.size(0), C = gates.size(1);
  const int64_t chunk = N / C;
  if (B > 0 && M > 0 && N > 0 && amx::applies(h_in, w_in, bias_in, chunk)) {
    return amx::gated_input_linear(h_in, w_in, bias_in, chunk, AmxRouting(gates, B, C).pairs());
  }
  auto h = to_compute(h_in);
  auto w = to_compute(w_in);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = to_compute(*bias_in);
  auto y = at::empty({B, M}, h.options());
  if (B == 0 || M == 0) return y.to(h_in.scalar_type());
  if (N == 0) {
    if (bias.defined()) y.copy_(bias.expand({B, M})); else y.zero_();
    return y.to(h_in.scalar_type());
  }
  const RowRouting rr = route_rows(gates);

  SG_DISPATCH_COMPUTE(h.scalar_type(), "gated_input_linear_cpu", [&] {
    using T = scalar_t;
    const T* ph = h.const_data_ptr<T>();
    const T* pb = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
    if (chunk < kGemmMinChunk) {
      // y[b] = bias + sum over active units n of h[b, n] * weight[:, n]: rows of weight.T
      // (its block-major copy straight from weight where use_row_blocks; a transposed copy
      // where the kernel streams whole rows or reads them in place).
      const at::Tensor hr = row_pairs<T>(h, rr, chunk, /*scale=*/false);
      const T* phr = hr.const_data_ptr<T>();
      const auto coef = row_pair_coef(phr, rr, chunk);
      if (use_row_blocks<T>(M)) {
        const at::Tensor wb = block_major_t(w);
        spmm_rows_all<T>(nullptr, B, N, M, chunk, rr, pb, y.mutable_data_ptr<T>(), coef,
                         Blocked{wb.const_data_ptr<float>(), N});
      } else {
        const at::Tensor wt = transposed(w);
        spmm_rows_all<T>(wt.const_data_ptr<T>(), B, N, M, chunk, rr, pb, y.mutable_data_ptr<T>(), coef);
      }
      return;
    }
    const ChunkRouting cr = route_chunks(rr, C);
    if (std::is_same_v<T, float> && gg_tiled_mkl_routes()) {
      // Dense chunks (see dense_chunks) as runs through MKL: y += h[run, active rows] @ W2[:, run]^T.
      const std::vector<char> dense = dense_chunks(cr, B, C);
      const int64_t block = slab_block(B, M);
      // h of the active pairs packed by chunk (as dx's g*dy): every tile re-reads its rows' chunk
      // of h once per output panel, and in place those rows are a power-of-two stride apart
      // (measured, 2 threads, B = 1024, M = N = 2048, chunk 64: 9.59 -> 8.37 ms at d = 0.25,
      // 18.63 -> 14.88 at 0.5, no change at 0.1). Not needed when MKL takes every chunk.
      const bool all_dense = all_chunks_dense(dense.empty() ? nullptr : dense.data(), C);
      const at::Tensor hp = all_dense ? at::Tensor() : pack_pairs<float>(h, rr, cr, chunk, /*scale=*/false);
      ScatterArgs args{all_dense ? nullptr : hp.const_data_ptr<float>(), chunk, true, w.const_data_ptr<float>(), N,
                       true, fp(pb), y.mutable_data_ptr<float>(), B, M, chunk, C, block, &cr};
      args.skip = dense.empty() ? nullptr : dense.data();
      const int isa = gg_isa();
      at::parallel_for(0, (M + block - 1) / block, 1, [&](int64_t m0, int64_t m1) {
        scatter_blocks_run(isa, args, m0, m1);
      });
      for_dense_runs(dense, [&](int64_t c, int64_t ce) {
        auto blk = masked_block(fp(ph), N, /*packed=*/false, cr, B, chunk, c, ce, h.options());
        y.addmm_(blk, w.narrow(1, c * chunk, (ce - c) * chunk).t());
      });
      return;
    }
    auto hp = pack_pairs<T>(h, rr, cr, chunk, /*scale=*/false);
    scatter_add_gemm<T>(hp, cr, B, M, pb, y,
                        [&](int64_t c) { return w.narrow(1, c * chunk, chunk).t(); });
  });
  return y.scalar_type() == h_in.scalar_type() ? y : y.to(h_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_input_linear_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& h_in, const at::Tensor& w_in,
    const at::Tensor& gates, std::array<bool, 3> output_mask) {
  const char* op = "stochgate::gated_input_linear_backward";
  check_gated_inputs(op, h_in, "h", w_in, c10::nullopt, gates, /*gate_output_units=*/false);
  const int64_t B = h_in.size(0), N = h_in.size(1), M = w_in.size(0), C = gates.size(1);
  const int64_t chunk = N / C;
  check_gated_grad(op, grad_y_in, h_in, "h", M);
  const bool need_dh = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2];
  if (B > 0 && M > 0 && N > 0 && amx::applies(h_in, w_in, c10::nullopt, chunk, &grad_y_in)) {
    return amx::gated_input_linear_backward(grad_y_in, h_in, w_in, chunk, AmxRouting(gates, B, C).pairs(),
                                            output_mask);
  }
  auto h = to_compute(h_in);
  auto w = to_compute(w_in);
  auto dy = to_compute(grad_y_in);
  at::Tensor dh = need_dh ? at::empty({B, N}, h.options()) : empty0(h_in);
  at::Tensor dw = need_dw ? at::empty({M, N}, h.options()) : empty0(h_in);
  // The bias is added to every row whatever the gates: its gradient is dense.
  at::Tensor db = need_db ? dy.sum(0) : empty0(h_in);
  auto cast = [&](const at::Tensor& t) {
    return t.numel() && t.scalar_type() != h_in.scalar_type() ? t.to(h_in.scalar_type()) : t;
  };
  if (B == 0 || N == 0 || M == 0 || !(need_dh || need_dw)) {
    if (need_dh) dh.zero_();
    if (need_dw) dw.zero_();
    return {cast(dh), cast(dw), cast(db)};
  }
  const RowRouting rr = route_rows(gates);
  const ChunkRouting cr = route_chunks(rr, C);

  SG_DISPATCH_COMPUTE(h.scalar_type(), "gated_input_linear_backward_cpu", [&] {
    using T = scalar_t;
    const T* ph = h.const_data_ptr<T>();
    const T* pdy = dy.const_data_ptr<T>();
    if (chunk < kGemmMinChunk) {
      if (need_dh) {
        // (N, M): unit n's weights contiguous
        const at::Tensor wt = transposed(w);
        sddmm_rows_out(pdy, wt.const_data_ptr<T>(), B, N, M, chunk, rr, dh.mutable_data_ptr<T>(),
                       [](int64_t, int64_t, T d) { return d; });
      }
      if (need_dw) {
        // h of the active pairs, packed by chunk: read once per K block and unit (a gather of
        // h[row, n] down a column touches a new line of h for every row).
        const at::Tensor hp = pack_pairs<T>(h, rr, cr, chunk, /*scale=*/false);
        const T* php = hp.const_data_ptr<T>();
        const auto coef = [&](int64_t q, int64_t n) { return php[q * chunk + n % chunk]; };
        // K blocks (AVX-512): block-major dy, written straight into dW2 (M, N) without a
        // transposed copy, and h packed: 57 -> 20 ms at chunk 1, density 0.1, 2 threads.
        // Streaming whole rows (AVX2) or in place: dW2^T (N, M), then transposed (AVX2, chunk 1,
        // d = 0.1 / 0.25: 33.8 / 73.2 -> 27.3 / 68.0 ms against the K-block kernel).
        if (use_row_blocks<T>(M)) {
          const at::Tensor dyb = block_major(dy);
          spmm_units_all<T>(nullptr, B, C, M, chunk, cr, dw.mutable_data_ptr<T>(), coef,
                            Blocked{dyb.const_data_ptr<float>(), B, N});
        } else {
          auto dwt = at::empty({N, M}, h.options());
          spmm_units_all<T>(pdy, B, C, M, chunk, cr, dwt.mutable_data_ptr<T>(), coef);
          dw = transposed(dwt);
        }
      }
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      const int isa = gg_isa();
      const float* pw2 = w.const_data_ptr<float>();
      // Dense chunks (see dense_chunks) as runs through MKL: dh[:, run] = dy @ W2[:, run] on the
      // active rows (zeros elsewhere), dW2[:, run] = dy^T @ h[run, active rows].
      const std::vector<char> dense = dense_chunks(cr, B, C);
      const char* skip = dense.empty() ? nullptr : dense.data();
      if (need_dh) {
        DhArgs args{fp(pdy), pw2, dh.mutable_data_ptr<float>(), B, N, M, chunk, &cr};
        args.skip = skip;
        at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) { dh_chunks_run(isa, args, c0, c1); });
      }
      if (need_dw) {
        GatherArgs args{fp(pdy), M, true, M, false, fp(ph), N, chunk, dw.mutable_data_ptr<float>(),
                        N, chunk, &cr};
        args.skip = skip;
        at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) { gather_chunks_run(isa, args, c0, c1); });
      }
      for_dense_runs(dense, [&](int64_t c, int64_t ce) {
        const int64_t width = (ce - c) * chunk;
        if (need_dw) {
          auto blk = masked_block(fp(ph), N, /*packed=*/false, cr, B, chunk, c, ce, h.options());
          dw.narrow(1, c * chunk, width).copy_(at::mm(dy.t(), blk));
        }
        if (need_dh) {
          auto full = at::mm(dy, w.narrow(1, c * chunk, width));  // then keep the active rows
          float* pf = full.mutable_data_ptr<float>();
          at::parallel_for(c, ce, 1, [&](int64_t cc0, int64_t cc1) {
            for (int64_t cc = cc0; cc < cc1; ++cc) {
              zero_inactive(pf, B, width, (cc - c) * chunk, chunk, cr.rows.data() + cr.offsets[cc],
                            cr.offsets[cc + 1] - cr.offsets[cc]);
            }
          });
          dh.narrow(1, c * chunk, width).copy_(full);
        }
      });
      return;
    }
    auto hp = pack_pairs<T>(h, rr, cr, chunk, /*scale=*/false);
    T* pdh = need_dh ? dh.mutable_data_ptr<T>() : nullptr;
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      auto gg = at::empty({std::max<int64_t>(cr.max_rows, 1), M}, h.options());
      auto pg = at::empty({std::max<int64_t>(cr.max_rows, 1), chunk}, h.options());
      T* pgg = gg.mutable_data_ptr<T>();
      const T* ppg = pg.const_data_ptr<T>();
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t off = cr.offsets[c], n = cr.offsets[c + 1] - off;
        const int64_t* rows = cr.rows.data() + off;
        at::Tensor gs;
        if (n == B) {
          gs = dy;
        } else if (n > 0) {
          gather_rows(pdy, M, rows, n, pgg);
          gs = gg.narrow(0, 0, n);
        }
        if (need_dw) {
          auto dwc = dw.narrow(1, c * chunk, chunk);
          if (n == 0) {
            dwc.zero_();
          } else {
            at::mm_out(dwc, gs.t(), hp.narrow(0, off, n));
          }
        }
        if (need_dh) {
          if (n > 0) {
            auto dst = pg.narrow(0, 0, n);
            at::mm_out(dst, gs, w.narrow(1, c * chunk, chunk));
          }
          int64_t i = 0;
          for (int64_t b = 0; b < B; ++b) {
            T* d = pdh + b * N + c * chunk;
            if (i < n && rows[i] == b) {
              std::memcpy(d, ppg + i * chunk, chunk * sizeof(T));
              ++i;
            } else {
              std::fill(d, d + chunk, T(0));
            }
          }
        }
      }
    });
  });
  return {cast(dh), cast(dw), cast(db)};
}

}  // namespace

TORCH_LIBRARY_IMPL(stochgate, CPU, m) {
  m.impl("gated_linear", &gated_linear_cpu);
  m.impl("gated_linear_backward", &gated_linear_backward_cpu);
  m.impl("gated_input_linear", &gated_input_linear_cpu);
  m.impl("gated_input_linear_backward", &gated_input_linear_backward_cpu);
}

int gg_isa() {
#if SG_GG_MULTI
  static const int hw = __builtin_cpu_supports("avx512f")                                ? 2
                        : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1
                                                                                         : 0;
  const char* env = std::getenv("STOCHGATE_CPU_ISA");
  if (env && std::strcmp(env, "base") == 0) return 0;
  if (env && std::strcmp(env, "avx2") == 0) return std::min(hw, 1);
  return hw;
#else
  return 0;
#endif
}

const char* cpu_kernel_isa() {
  switch (gg_isa()) {
    case 2: return "avx512";
    case 1: return "avx2";
    default: return "baseline";
  }
}

}  // namespace stochgate
