// bfloat16 gated matmuls on CPUs with AMX: tiles of active rows through oneDNN's batch-reduce
// GEMM micro-kernel (at::native::cpublas::brgemm, the one PyTorch's CPU flash attention uses),
// bfloat16 products accumulated in float32 -- the arithmetic of PyTorch's own bfloat16 matmuls
// on these CPUs. Before, bfloat16 calls were converted to float32 (x and W whole) and ran the
// float32 kernels, slower than dense bfloat16 F.linear (oneDNN on AMX) at every density
// (measured, B = 1024, K = N = 2048, chunk 64, 2 threads: forward 0.67x dense at d = 0.1,
// training step 0.77x).
//
// Three forms, each product of both ops one of them (brgemm's B operand is packed by pairs of
// its reduction rows, "VNNI": word [k / 2, j] holds B[k, j] and B[k + 1, j]):
// - gathered rows (gated_linear forward and its active gate gradient, gated_input_linear dh):
//   per chunk, tiles of kMT active rows gathered, times the chunk's weight block;
// - row reduce (gated_linear dx, gated_input_linear forward): per block of output columns, a
//   float32 accumulator (B, block) that each chunk's tiles of packed pairs add into;
// - weights (gated_linear dW, gated_input_linear dW2): per chunk, the packed pairs transposed
//   times the tile's rows, summed over the chunk's tiles.
// Chunks with most rows active (Pairs::dense) skip the tiles: one oneDNN product over all rows
// per run of them. Every output's sum runs in a fixed order: deterministic on any thread count.
#include "gated_amx.h"

// GCC 12 flags the undefined-vector idiom inside its own AVX-512 intrinsics (the
// zero-extensions below) as "may be used uninitialized": not our variables.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "chunk_runs.h"
#include "gated_gemm.h"

#if SG_GG_MULTI
#include <immintrin.h>
#endif

// The AMX kernels need AVX-512 code generation (gated_gemm.h's multi-ISA build) and a torch
// whose CPUBlas.h has the bfloat16 brgemm with its VNNI flag, pack and could_pack (it
// announces them with this macro); otherwise applies() is false and nothing here runs.
#if SG_GG_MULTI && defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define SG_AMX 1
#else
#define SG_AMX 0
#endif

namespace stochgate {
namespace amx {
namespace {

using u16 = uint16_t;
using u32 = uint32_t;
using bf16 = at::BFloat16;

constexpr int64_t kMT = 32;   // active rows per tile (measured: 16 / 32 / 64 alike, 32 a little ahead)
constexpr int64_t kUB = 256;  // gathered rows: units per block
constexpr int64_t kPB = 256;  // row reduce: output columns per block (at most; see row_reduce)
constexpr int64_t kWB = 256;  // weights: output columns per block

int64_t even(int64_t k) { return (k + 1) & ~int64_t(1); }
int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

const u16* cu(const at::Tensor& t) { return reinterpret_cast<const u16*>(t.const_data_ptr<bf16>()); }
u16* mu(at::Tensor& t) { return reinterpret_cast<u16*>(t.mutable_data_ptr<bf16>()); }

#if SG_AMX
// C (m, n) float32 (+)= A (m, k) bfloat16 (row stride lda) @ B, B packed as (k / 2, n) words.
void mm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldc, bool add, const u16* a, const u32* b, float* c) {
  at::native::cpublas::brgemm(m, n, k, lda, n, ldc, add, reinterpret_cast<const bf16*>(a),
                              reinterpret_cast<const bf16*>(b), c, /*is_vnni=*/true);
}

#define SG_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

inline __mmask16 head(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

SG_AMX_TARGET inline __m512 load_bf16(const u16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// float32 -> bfloat16 as c10::BFloat16 rounds: to nearest even, NaN stays NaN (0x7fc0).
SG_AMX_TARGET inline void store_bf16(u16* p, __m512 v, __mmask16 m) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

// dst[j] = bf16(g * (src[j] + add[j])), j < n (add may be null).
SG_AMX_TARGET void finish_row(u16* dst, const float* src, const u16* add, float g, int64_t n) {
  const __m512 gv = _mm512_set1_ps(g);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = head(n - j);
    __m512 v = _mm512_maskz_loadu_ps(m, src + j);
    if (add) v = _mm512_add_ps(v, load_bf16(add + j, m));
    store_bf16(dst + j, _mm512_mul_ps(v, gv), m);
  }
}

// acc[j] += src[j], j < n.
SG_AMX_TARGET void add_row(float* acc, const float* src, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = head(n - j);
    _mm512_mask_storeu_ps(acc + j, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + j), _mm512_maskz_loadu_ps(m, src + j)));
  }
}

// sum over j < n of dy[j] * (src[j] + add[j]) (add may be null), in float32.
SG_AMX_TARGET float dot_row(const u16* dy, const float* src, const u16* add, int64_t n) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = head(n - j);
    __m512 v = _mm512_maskz_loadu_ps(m, src + j);
    if (add) v = _mm512_add_ps(v, load_bf16(add + j, m));
    s = _mm512_fmadd_ps(load_bf16(dy + j, m), v, s);
  }
  return _mm512_reduce_add_ps(s);
}

// dst[j] = bf16(g * src[j]), j < n.
SG_AMX_TARGET void scale_row(u16* dst, const u16* src, float g, int64_t n) {
  const __m512 gv = _mm512_set1_ps(g);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = head(n - j);
    store_bf16(dst + j, _mm512_mul_ps(load_bf16(src + j, m), gv), m);
  }
}

// dst[p * ldd + u] = src[u * ld + p], u < nu (a multiple of 16), p < kw.
SG_AMX_TARGET void transpose_f32(const float* src, int64_t ld, int64_t nu, int64_t kw, float* dst, int64_t ldd) {
  gg::pack_transposed<gg::v16>(src, ld, static_cast<int>(nu), kw, dst, ldd);
}

// B packed from k rows of n values (row(i) points at row i's first column): word [kp, j] =
// row(2 kp)[j] | row(2 kp + 1)[j] << 16, a missing last row read as zero.
template <class Row>
SG_AMX_TARGET void pack_rows(const Row& row, int64_t k, int64_t n, u32* dst) {
  for (int64_t kp = 0; kp < (k + 1) / 2; ++kp) {
    const u16* a = row(2 * kp);
    const u16* b = 2 * kp + 1 < k ? row(2 * kp + 1) : nullptr;
    u32* d = dst + kp * n;
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = head(n - j);
      __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a + j));
      if (b) w = _mm512_or_si512(w, _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b + j)), 16));
      _mm512_mask_storeu_epi32(d + j, m, w);
    }
  }
}

// B packed from the transpose of n rows of k values, rows ld apart from `base`: word [kp, j] =
// row j's values 2 kp and 2 kp + 1 (value k read as zero when k is odd). The whole words of 16
// rows at a time are 32-bit transposes in registers (gated_gemm.h), where the rows are whole
// words apart.
SG_AMX_TARGET void pack_transposed(const u16* base, int64_t ld, int64_t n, int64_t k, u32* dst) {
  const int64_t kw = k / 2, kp_n = (k + 1) / 2;
  const int64_t n16 = ld % 2 == 0 ? n / 16 * 16 : 0;
  if (n16 > 0 && kw > 0) {
    gg::pack_transposed<gg::v16>(reinterpret_cast<const float*>(base), ld / 2, static_cast<int>(n16), kw,
                                 reinterpret_cast<float*>(dst), n);
  }
  for (int64_t j = 0; j < n; ++j) {
    const u16* r = base + j * ld;
    for (int64_t kp = j < n16 ? kw : 0; kp < kp_n; ++kp) {
      const u32 hi = 2 * kp + 1 < k ? r[2 * kp + 1] : 0;
      dst[kp * n + j] = r[2 * kp] | (hi << 16);
    }
  }
}
// Per-thread scratch, 64-byte aligned (PyTorch's CPU allocator) and kept between calls: the
// AMX tile loads run at a third of their speed from rows that straddle cache lines (measured,
// brgemm 32 x 64 x 2048 bfloat16: 5.9 us aligned, 19.7 us 16 bytes off), and fresh megabytes
// each call cost their page faults (~8% of dx). Slots 0-2 are a task's, slot 3 the caller's.
template <class T>
T* scratch(int slot, int64_t n) {
  thread_local at::Tensor bufs[4];
  at::Tensor& b = bufs[slot];
  const int64_t bytes = std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T));
  if (!b.defined() || b.numel() < bytes) b = at::empty({bytes}, at::kByte);
  return reinterpret_cast<T*>(b.mutable_data_ptr<uint8_t>());
}

// The active pairs' chunk slices of s (B, ld) in chunk order, kc = even(chunk) values a row
// (the last one zero when chunk is odd), each chunk's rows padded with zero rows to a multiple
// of kMT (so that every tile has kMT rows: one brgemm kernel, no switch per tail): row
// start[c] + i holds pair q0 + i, out[., j] = g * s[row, c * chunk + j], g the gate if `scale`
// (else 1), rounded to bfloat16.
struct Packed {
  at::Tensor t;
  std::vector<int64_t> start;  // (C + 1)
  const u16* row(int64_t c, int64_t i, int64_t kc) const { return cu(t) + (start[c] + i) * kc; }
};

Packed pack_pairs(const at::Tensor& s, int64_t ld, const Pairs& pr, int64_t chunk, bool scale) {
  const int64_t kc = even(chunk);
  Packed pk;
  pk.start.assign(pr.C + 1, 0);
  for (int64_t c = 0; c < pr.C; ++c) pk.start[c + 1] = pk.start[c] + round_up(pr.chunk_off[c + 1] - pr.chunk_off[c], kMT);
  pk.t = at::empty({std::max<int64_t>(pk.start[pr.C], 1), kc}, s.options());
  const u16* ps = cu(s);
  u16* po = mu(pk.t);
  at::parallel_for(0, pr.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t q0 = pr.chunk_off[c], n = pr.chunk_off[c + 1] - q0;
      for (int64_t i = 0; i < n; ++i) {
        const u16* src = ps + pr.rows[q0 + i] * ld + c * chunk;
        u16* d = po + (pk.start[c] + i) * kc;
        const float g = static_cast<float>(pr.gate[q0 + i]);
        if (scale && g != 1.f) {
          scale_row(d, src, g, chunk);
        } else {
          std::memcpy(d, src, chunk * sizeof(u16));
        }
        if (kc > chunk) d[chunk] = 0;
      }
      std::memset(po + (pk.start[c] + n) * kc, 0, (pk.start[c + 1] - pk.start[c] - n) * kc * sizeof(u16));
    }
  });
  return pk;
}

// The chunks' packed pairs transposed: chunk c's block at off[c], (mp, ld[c]) with mp = chunk
// rounded up to 16 and ld[c] = n_c rounded up to 32 (64-byte rows): [u, i] = pair q0 + i's
// value u, zero for u >= chunk and i >= n_c.
u16* transpose_pairs(const Packed& ap, const Pairs& pr, int64_t chunk, std::vector<int64_t>& off,
                     std::vector<int64_t>& ld) {
  const int64_t kc = even(chunk), mp = round_up(chunk, 16);
  off.assign(pr.C + 1, 0);
  ld.assign(pr.C, 0);
  for (int64_t c = 0; c < pr.C; ++c) {
    ld[c] = round_up(std::max<int64_t>(pr.chunk_off[c + 1] - pr.chunk_off[c], 1), 32);
    off[c + 1] = off[c] + mp * ld[c];
  }
  u16* tr = scratch<u16>(3, off[pr.C]);
  at::parallel_for(0, pr.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t n = pr.chunk_off[c + 1] - pr.chunk_off[c];
      u16* d = tr + off[c];
      std::memset(d, 0, mp * ld[c] * sizeof(u16));
      for (int64_t i = 0; i < n; ++i) {
        const u16* r = ap.row(c, i, kc);
        for (int64_t u = 0; u < chunk; ++u) d[u * ld[c] + i] = r[u];
      }
    }
  });
  return tr;
}

bool is_dense(const Pairs& pr, int64_t c) { return pr.dense && pr.dense[c]; }

// Calls f(c, ce) for each maximal run [c, ce) of dense chunks.
template <class F>
void dense_runs(const Pairs& pr, const F& f) {
  if (pr.dense) for_dense_runs(pr.dense, pr.C, f);
}

// (B, (ce - c) * chunk) block of packed pairs of chunks [c, ce) at their rows, zeros elsewhere:
// a dense run's left operand.
at::Tensor masked_block(const Packed& ap, const Pairs& pr, int64_t chunk, int64_t c, int64_t ce) {
  const int64_t width = (ce - c) * chunk, kc = even(chunk);
  auto blk = at::zeros({pr.B, width}, ap.t.options());
  u16* pb = mu(blk);
  for (int64_t cc = c; cc < ce; ++cc) {
    for (int64_t i = 0; i < pr.chunk_off[cc + 1] - pr.chunk_off[cc]; ++i) {
      std::memcpy(pb + pr.rows[pr.chunk_off[cc] + i] * width + (cc - c) * chunk, ap.row(cc, i, kc), chunk * sizeof(u16));
    }
  }
  return blk;
}

// The dense runs and their left operands (masked_block).
struct Run {
  int64_t c, ce;
  at::Tensor blk;
};

std::vector<Run> dense_blocks(const Packed& ap, const Pairs& pr, int64_t chunk) {
  std::vector<Run> runs;
  dense_runs(pr, [&](int64_t c, int64_t ce) { runs.push_back({c, ce, masked_block(ap, pr, chunk, c, ce)}); });
  return runs;
}

// One run over every chunk: the op is a dense product (with zeros at the inactive pairs).
bool covers_all(const std::vector<Run>& runs, const Pairs& pr) {
  return runs.size() == 1 && runs[0].c == 0 && runs[0].ce == pr.C;
}

// The dense runs' share of a row reduce, float32 (B, P): sum over runs of blk @ rhs(c, ce)
// (each product rounded to bfloat16 by oneDNN), or undefined when there is no dense chunk.
template <class Rhs>
at::Tensor dense_share(const std::vector<Run>& runs, const Rhs& rhs) {
  at::Tensor extra;
  for (const Run& r : runs) {
    auto part = at::mm(r.blk, rhs(r.c, r.ce)).to(at::kFloat);
    if (extra.defined()) extra.add_(part); else extra = part;
  }
  return extra;
}

// A dense run's product pre (B, (ce - c) * chunk) written to out (B, ld) at the run's columns
// on the active pairs only, times their gates if `scale` (out's other pairs stay as they are).
void scatter_run(const at::Tensor& pre, const Pairs& pr, int64_t chunk, int64_t c, int64_t ce, u16* out, int64_t ld,
                 bool scale) {
  const int64_t width = (ce - c) * chunk;
  const u16* pp = cu(pre);
  at::parallel_for(c, ce, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t cc = c0; cc < c1; ++cc) {
      for (int64_t q = pr.chunk_off[cc]; q < pr.chunk_off[cc + 1]; ++q) {
        const u16* src = pp + pr.rows[q] * width + (cc - c) * chunk;
        u16* dst = out + pr.rows[q] * ld + cc * chunk;
        const float g = static_cast<float>(pr.gate[q]);
        if (scale && g != 1.f) {
          scale_row(dst, src, g, chunk);
        } else {
          std::memcpy(dst, src, chunk * sizeof(u16));
        }
      }
    }
  });
}

// Gathered rows: for each chunk c and block [u0, u0 + nb) of its units, every tile of kMT
// active rows computes C (m, nb) = A (the rows row_a(q), kr values each) @ pack_b(c, u0, nb)
// (kr, nb), then out(q, c, u0, nb, C row) for each of the tile's pairs q. (A chunk's last tile
// has its own row count: padding it would cost more than the kernel switch here, kr ~ K.)
template <class PackB, class RowA, class Out>
void gathered_rows(const Pairs& pr, int64_t chunk, int64_t kr, const PackB& pack_b, const RowA& row_a,
                   const Out& out) {
  const int64_t ke = even(kr), ub = std::min(chunk, kUB), nub = (chunk + ub - 1) / ub;
  at::parallel_for(0, pr.C * nub, 1, [&](int64_t t0, int64_t t1) {
    u32* bp = scratch<u32>(0, ke / 2 * ub);
    u16* a = scratch<u16>(1, kMT * ke);
    float* cbuf = scratch<float>(2, kMT * ub);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t / nub, u0 = t % nub * ub, nb = std::min(ub, chunk - u0);
      const int64_t q0 = pr.chunk_off[c], q1 = pr.chunk_off[c + 1];
      if (q0 == q1 || is_dense(pr, c)) continue;
      pack_b(c, u0, nb, bp);
      for (int64_t qt = q0; qt < q1; qt += kMT) {
        const int64_t m = std::min(kMT, q1 - qt);
        for (int64_t i = 0; i < m; ++i) {
          u16* d = a + i * ke;
          std::memcpy(d, row_a(qt + i), kr * sizeof(u16));
          if (ke > kr) d[kr] = 0;
        }
        mm(m, nb, ke, ke, nb, false, a, bp, cbuf);
        for (int64_t i = 0; i < m; ++i) out(qt + i, c, u0, nb, cbuf + i * nb);
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// Row reduce: out (B, P) = sum over chunks c of the chunk's packed pairs (ap) @ pack_b(c, p0,
// pb) (chunk, pb), added at the pairs' rows; per block [p0, p0 + pb) of up to kPB columns (fewer
// for large B, so that the accumulator stays within 4 MB down to 16 columns) a float32
// accumulator (B, pb), handed to fin(p0, pb, acc) (every row; zeros where no chunk is active).
template <class PackB, class Fin>
void row_reduce(const Pairs& pr, int64_t chunk, const Packed& ap, int64_t P, const PackB& pack_b, const Fin& fin) {
  const int64_t kc = even(chunk);
  const int64_t cols = std::clamp<int64_t>((int64_t(4) << 20) / (4 * std::max<int64_t>(pr.B, 1)) / 16 * 16, 16, kPB);
  at::parallel_for(0, (P + cols - 1) / cols, 1, [&](int64_t j0, int64_t j1) {
    u32* bp = scratch<u32>(0, kc / 2 * cols);
    float* acc = scratch<float>(1, pr.B * cols);
    float* cbuf = scratch<float>(2, kMT * cols);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t p0 = j * cols, pb = std::min(cols, P - p0);
      std::fill(acc, acc + pr.B * pb, 0.f);
      for (int64_t c = 0; c < pr.C; ++c) {
        const int64_t q0 = pr.chunk_off[c], q1 = pr.chunk_off[c + 1];
        if (q0 == q1 || is_dense(pr, c)) continue;
        pack_b(c, p0, pb, bp);
        for (int64_t qt = q0; qt < q1; qt += kMT) {
          const int64_t m = std::min(kMT, q1 - qt);
          mm(kMT, pb, kc, kc, pb, false, ap.row(c, qt - q0, kc), bp, cbuf);
          for (int64_t i = 0; i < m; ++i) add_row(acc + pr.rows[qt + i] * pb, cbuf + i * pb, pb);
        }
      }
      fin(p0, pb, acc);
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// Weights: per chunk c and block [p0, p0 + pb) of P columns, C (mp, pb) = sum over the chunk's
// tiles of its transposed packed pairs (transpose_pairs) @ the tile's rows of src (B, ld) at
// columns p0.. (packed per tile); out(c, p0, pb, C) (C null: no active row).
template <class Out>
void weights(const Pairs& pr, int64_t chunk, const Packed& ap, const u16* src, int64_t ld, int64_t P, const Out& out) {
  std::vector<int64_t> off, lda;
  const u16* tr = transpose_pairs(ap, pr, chunk, off, lda);
  const int64_t mp = round_up(chunk, 16), nblk = (P + kWB - 1) / kWB;
  at::parallel_for(0, pr.C * nblk, 1, [&](int64_t t0, int64_t t1) {
    u32* bp = scratch<u32>(0, kMT / 2 * kWB);
    float* cbuf = scratch<float>(2, mp * kWB);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c = t / nblk, p0 = t % nblk * kWB, pb = std::min(kWB, P - p0);
      const int64_t q0 = pr.chunk_off[c], q1 = pr.chunk_off[c + 1];
      if (is_dense(pr, c)) continue;
      if (q0 == q1) {
        out(c, p0, pb, static_cast<const float*>(nullptr));
        continue;
      }
      for (int64_t qt = q0; qt < q1; qt += kMT) {
        const int64_t m = std::min(kMT, q1 - qt);
        pack_rows([&](int64_t i) { return src + pr.rows[qt + i] * ld + p0; }, m, pb, bp);
        mm(mp, pb, even(m), lda[c], pb, qt > q0, tr + off[c] + (qt - q0), bp, cbuf);
      }
      out(c, p0, pb, static_cast<const float*>(cbuf));
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// y's gated-off chunks (B, N) zeroed, one fill per run of consecutive inactive chunks of a row.
void zero_inactive(u16* y, int64_t N, int64_t chunk, const Pairs& pr) {
  at::parallel_for(0, pr.B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for_inactive_runs(pr.chunks, pr.row_off[b], pr.row_off[b + 1], pr.C, [&](int64_t c, int64_t ce) {
        std::memset(y + b * N + c * chunk, 0, (ce - c) * chunk * sizeof(u16));
      });
    }
  });
}

// W's units [c * chunk + u0, + nb) as gathered_rows' B: (K, nb), the transpose of W's rows.
auto pack_w_t(const u16* w, int64_t K, int64_t chunk) {
  return [=](int64_t c, int64_t u0, int64_t nb, u32* dst) { pack_transposed(w + (c * chunk + u0) * K, K, nb, K, dst); };
}

at::Tensor empty0(const at::Tensor& like) { return at::empty({0}, like.options()); }

// The kernels read contiguous operands (detached: ATen calls on OpenMP workers run outside the
// dispatcher's below-autograd state); an absent bias is an undefined tensor.
at::Tensor input(const at::Tensor& t) { return t.detach().contiguous(); }
at::Tensor input(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? input(*t) : at::Tensor(); }

#endif  // SG_AMX

}  // namespace

std::atomic<int64_t> n_calls{0};

bool available() {
#if SG_AMX
  static const bool isa = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq");
  return isa && at::native::cpublas::could_pack(at::kBFloat16);
#else
  return false;
#endif
}

int64_t calls() { return n_calls.load(); }

bool applies(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t chunk,
             const at::Tensor* grad) {
  const auto is_bf16 = [](const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; };
  if (chunk < 16 || !is_bf16(a) || !is_bf16(w)) return false;
  if (bias.has_value() && bias->defined() && !is_bf16(*bias)) return false;
  if (grad && !is_bf16(*grad)) return false;
  const char* env = std::getenv("STOCHGATE_CPU_AMX");
  if (env && std::strcmp(env, "0") == 0) return false;
  if (!available()) return false;
  ++n_calls;
  return true;
}

#if SG_AMX

at::Tensor gated_linear(const at::Tensor& x_in, const at::Tensor& w_in, const c10::optional<at::Tensor>& bias_in,
                        int64_t chunk, const Pairs& pr) {
  const auto x = input(x_in), w = input(w_in);
  const at::Tensor bias = input(bias_in);
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({B, N}, x.options());
  u16* py = mu(y);
  const u16* px = cu(x);
  const u16* pb = bias.defined() ? cu(bias) : nullptr;
  zero_inactive(py, N, chunk, pr);
  dense_runs(pr, [&](int64_t c, int64_t ce) {
    // Every row through oneDNN (F.linear's arithmetic), then the gates on the active rows.
    const int64_t width = (ce - c) * chunk;
    const auto wr = w.narrow(0, c * chunk, width).t();
    const auto pre = bias.defined() ? at::addmm(bias.narrow(0, c * chunk, width), x, wr) : at::mm(x, wr);
    scatter_run(pre, pr, chunk, c, ce, py, N, /*scale=*/true);
  });
  gathered_rows(
      pr, chunk, K, pack_w_t(cu(w), K, chunk), [&](int64_t q) { return px + pr.rows[q] * K; },
      [&](int64_t q, int64_t c, int64_t u0, int64_t nb, const float* acc) {
        const int64_t col = c * chunk + u0;
        finish_row(py + pr.rows[q] * N + col, acc, pb ? pb + col : nullptr, static_cast<float>(pr.gate[q]), nb);
      });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& w_in, const c10::optional<at::Tensor>& bias_in,
    const at::Tensor& gates, int64_t chunk, const Pairs& pr, std::array<bool, 4> output_mask, bool full_gate_grad) {
  const auto x = input(x_in), w = input(w_in), dy = input(dy_in);
  const at::Tensor bias = input(bias_in);
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0), C = pr.C;
  const bool need_dx = output_mask[0], need_dw = output_mask[1];
  const bool need_db = output_mask[2] && bias.defined(), need_dg = output_mask[3];
  const u16* px = cu(x);
  const u16* pw = cu(w);
  const u16* pdy = cu(dy);
  const u16* pbias = bias.defined() ? cu(bias) : nullptr;

  at::Tensor dg = need_dg ? at::zeros({B, C}, gates.options()) : empty0(gates);
  if (need_dg && full_gate_grad) {
    // Exact gate gradient for every pair: needs the skipped products (one dense GEMM).
    const auto pre = bias.defined() ? at::addmm(bias, x, w.t()) : at::mm(x, w.t());
    dg.copy_((dy.to(at::kFloat) * pre.to(at::kFloat)).view({B, C, chunk}).sum(-1));
  } else if (need_dg) {
    // Active pairs only: the forward's product again, dotted with dy.
    const int64_t ub = std::min(chunk, kUB), nub = (chunk + ub - 1) / ub;  // gathered_rows' unit blocks
    std::vector<float> part(pr.chunk_off[C] * nub, 0.f);
    Pairs every = pr;  // the tiles for every chunk: the pre-activations of active pairs only
    every.dense = nullptr;
    gathered_rows(
        every, chunk, K, pack_w_t(pw, K, chunk), [&](int64_t q) { return px + pr.rows[q] * K; },
        [&](int64_t q, int64_t c, int64_t u0, int64_t nb, const float* acc) {
          const int64_t col = c * chunk + u0;
          part[q * nub + u0 / ub] =
              dot_row(pdy + pr.rows[q] * N + col, acc, pbias ? pbias + col : nullptr, nb);
        });
    auto dgf = at::zeros({B * C}, gates.options().dtype(at::kFloat));
    float* pd = dgf.mutable_data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t q = pr.chunk_off[c]; q < pr.chunk_off[c + 1]; ++q) {
        float s = 0.f;
        for (int64_t i = 0; i < nub; ++i) s += part[q * nub + i];
        pd[pr.rows[q] * C + c] = s;
      }
    }
    dg.view({-1}).copy_(dgf);
  }

  at::Tensor dx = need_dx ? at::empty({B, K}, x.options()) : empty0(x);
  at::Tensor dw = need_dw ? at::empty({N, K}, x.options()) : empty0(x);
  at::Tensor db = need_db ? at::empty({N}, x.options()) : empty0(x);
  if (!(need_dx || need_dw || need_db)) return {dx, dw, db, dg};
  // gate * dy of the active pairs, packed by chunk: dx's and dW's left operand.
  const Packed gdy = pack_pairs(dy, N, pr, chunk, /*scale=*/true);
  const int64_t kc = even(chunk);
  if (need_db) {
    u16* pdb = mu(db);
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      std::vector<float> s(chunk);
      for (int64_t c = c0; c < c1; ++c) {
        std::fill(s.begin(), s.end(), 0.f);
        for (int64_t i = 0; i < pr.chunk_off[c + 1] - pr.chunk_off[c]; ++i) {
          const u16* r = gdy.row(c, i, kc);
          for (int64_t j = 0; j < chunk; ++j) s[j] += static_cast<float>(bf16(r[j], bf16::from_bits()));
        }
        finish_row(pdb + c * chunk, s.data(), nullptr, 1.f, chunk);
      }
    });
  }
  const std::vector<Run> runs = need_dx || need_dw ? dense_blocks(gdy, pr, chunk) : std::vector<Run>();
  if (need_dx && covers_all(runs, pr)) {
    at::mm_out(dx, runs[0].blk, w);
  } else if (need_dx) {
    u16* pdx = mu(dx);
    const at::Tensor extra = dense_share(runs, [&](int64_t c, int64_t ce) { return w.narrow(0, c * chunk, (ce - c) * chunk); });
    const float* pe = extra.defined() ? extra.const_data_ptr<float>() : nullptr;
    row_reduce(
        pr, chunk, gdy, K,
        [&](int64_t c, int64_t p0, int64_t pb, u32* dst) {
          pack_rows([&](int64_t u) { return pw + (c * chunk + u) * K + p0; }, chunk, pb, dst);
        },
        [&](int64_t p0, int64_t pb, float* acc) {
          for (int64_t b = 0; b < B; ++b) {
            if (pe) add_row(acc + b * pb, pe + b * K + p0, pb);
            finish_row(pdx + b * K + p0, acc + b * pb, nullptr, 1.f, pb);
          }
        });
  }
  if (need_dw) {
    u16* pdw = mu(dw);
    for (const Run& r : runs) {
      auto dwr = dw.narrow(0, r.c * chunk, (r.ce - r.c) * chunk);
      at::mm_out(dwr, r.blk.t(), x);
    }
    weights(pr, chunk, gdy, px, K, K, [&](int64_t c, int64_t p0, int64_t pb, const float* acc) {
      for (int64_t u = 0; u < chunk; ++u) {
        u16* d = pdw + (c * chunk + u) * K + p0;
        if (acc) {
          finish_row(d, acc + u * pb, nullptr, 1.f, pb);
        } else {
          std::memset(d, 0, pb * sizeof(u16));
        }
      }
    });
  }
  return {dx, dw, db, dg};
}

at::Tensor gated_input_linear(const at::Tensor& h_in, const at::Tensor& w_in, const c10::optional<at::Tensor>& bias_in,
                              int64_t chunk, const Pairs& pr) {
  const auto h = input(h_in), w = input(w_in);
  const at::Tensor bias = input(bias_in);
  const int64_t B = h.size(0), N = h.size(1), M = w.size(0);
  auto y = at::empty({B, M}, h.options());
  u16* py = mu(y);
  const u16* pw = cu(w);
  const u16* pb = bias.defined() ? cu(bias) : nullptr;
  const Packed hp = pack_pairs(h, N, pr, chunk, /*scale=*/false);
  const std::vector<Run> runs = dense_blocks(hp, pr, chunk);
  if (covers_all(runs, pr)) return bias.defined() ? at::addmm(bias, runs[0].blk, w.t()) : at::mm(runs[0].blk, w.t());
  const at::Tensor extra = dense_share(runs, [&](int64_t c, int64_t ce) { return w.narrow(1, c * chunk, (ce - c) * chunk).t(); });
  const float* pe = extra.defined() ? extra.const_data_ptr<float>() : nullptr;
  row_reduce(
      pr, chunk, hp, M,
      [&](int64_t c, int64_t p0, int64_t pb_, u32* dst) { pack_transposed(pw + p0 * N + c * chunk, N, pb_, chunk, dst); },
      [&](int64_t p0, int64_t pb_, float* acc) {
        for (int64_t b = 0; b < B; ++b) {
          if (pe) add_row(acc + b * pb_, pe + b * M + p0, pb_);
          finish_row(py + b * M + p0, acc + b * pb_, pb ? pb + p0 : nullptr, 1.f, pb_);
        }
      });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_input_linear_backward(
    const at::Tensor& dy_in, const at::Tensor& h_in, const at::Tensor& w_in, int64_t chunk, const Pairs& pr,
    std::array<bool, 3> output_mask) {
  const auto h = input(h_in), w = input(w_in), dy = input(dy_in);
  const int64_t B = h.size(0), N = h.size(1), M = w.size(0);
  const bool need_dh = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2];
  const u16* pw = cu(w);
  const u16* pdy = cu(dy);
  // The bias is added to every row whatever the gates: its gradient is dense.
  at::Tensor db = need_db ? dy.sum(0, /*keepdim=*/false, at::kFloat).to(at::kBFloat16) : empty0(h);
  at::Tensor dh = need_dh ? at::empty({B, N}, h.options()) : empty0(h);
  at::Tensor dw = need_dw ? at::empty({M, N}, h.options()) : empty0(h);
  if (need_dh) {
    u16* pdh = mu(dh);
    zero_inactive(pdh, N, chunk, pr);
    dense_runs(pr, [&](int64_t c, int64_t ce) {
      scatter_run(at::mm(dy, w.narrow(1, c * chunk, (ce - c) * chunk)), pr, chunk, c, ce, pdh, N, /*scale=*/false);
    });
    gathered_rows(
        pr, chunk, M,
        [&](int64_t c, int64_t u0, int64_t nb, u32* dst) {
          pack_rows([&](int64_t m) { return pw + m * N + c * chunk + u0; }, M, nb, dst);
        },
        [&](int64_t q) { return pdy + pr.rows[q] * M; },
        [&](int64_t q, int64_t c, int64_t u0, int64_t nb, const float* acc) {
          finish_row(pdh + pr.rows[q] * N + c * chunk + u0, acc, nullptr, 1.f, nb);
        });
  }
  if (need_dw) {
    u16* pdw = mu(dw);
    const Packed hp = pack_pairs(h, N, pr, chunk, /*scale=*/false);
    const int64_t mp = round_up(chunk, 16);
    for (const Run& r : dense_blocks(hp, pr, chunk)) {
      auto dwr = dw.narrow(1, r.c * chunk, (r.ce - r.c) * chunk);
      at::mm_out(dwr, dy.t(), r.blk);
    }
    // dW2[:, chunk c]^T (chunk, M) comes out of `weights`; written back transposed.
    weights(pr, chunk, hp, pdy, M, M, [&](int64_t c, int64_t p0, int64_t pb, const float* acc) {
      if (!acc) {
        for (int64_t m = 0; m < pb; ++m) std::memset(pdw + (p0 + m) * N + c * chunk, 0, chunk * sizeof(u16));
        return;
      }
      float* t = scratch<float>(1, pb * mp);  // slot 1: free inside `weights`' tasks
      transpose_f32(acc, pb, mp, pb, t, mp);
      for (int64_t m = 0; m < pb; ++m) finish_row(pdw + (p0 + m) * N + c * chunk, t + m * mp, nullptr, 1.f, chunk);
    });
  }
  return {dh, dw, db};
}

#else  // !SG_AMX: applies() is false, these are never called.

at::Tensor gated_linear(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, const Pairs&) {
  TORCH_CHECK(false, "stochgate: the AMX kernels are not compiled in");
}
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&,
    int64_t, const Pairs&, std::array<bool, 4>, bool) {
  TORCH_CHECK(false, "stochgate: the AMX kernels are not compiled in");
}
at::Tensor gated_input_linear(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, int64_t,
                              const Pairs&) {
  TORCH_CHECK(false, "stochgate: the AMX kernels are not compiled in");
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_input_linear_backward(const at::Tensor&, const at::Tensor&,
                                                                           const at::Tensor&, int64_t, const Pairs&,
                                                                           std::array<bool, 3>) {
  TORCH_CHECK(false, "stochgate: the AMX kernels are not compiled in");
}

#endif  // SG_AMX

}  // namespace amx
}  // namespace stochgate
