// The grouped, gathered GEMM behind the CUDA gated matmuls (csrc/cuda/gated_linear.cu).
//
// Routing (built on the device, see gated_linear.cu) sorts the active (row, chunk) pairs by
// chunk: group c = chunk c owns the pairs group_off[c] .. group_off[c+1]-1 ("seg" below),
// and rows[seg + i] is the i-th active row of chunk c in increasing row order. Every GEMM of
// the forward and backward passes is, per group c,
//
//     C_c[m, n] = sum_k A_c[m, k] * B_c[k, n],   m < M_c, n < N_c, k < K_c
//
// where each of M_c, N_c, K_c is either a fixed size or the group's pair count, and each
// operand is a strided 2-D view of a row-major tensor:
//
//   * "lines" are its strided dimension (stride ld) and may be gathered through the row list
//     (line i -> tensor row rows[seg + i]);
//   * "positions" are its contiguous dimension;
//   * group c starts c * group_stride elements after ptr.
//
//   A K-major (AK = true):  A[m, k] = ptr[line(m) * ld + k]   lines = m, positions = k
//   A M-major (AK = false): A[m, k] = ptr[line(k) * ld + m]   lines = k, positions = m
//   B K-major (BK = true):  B[k, n] = ptr[line(n) * ld + k]   lines = n, positions = k
//   B N-major (BK = false): B[k, n] = ptr[line(k) * ld + n]   lines = k, positions = n
//
// Shared-memory tiles keep the operand's global layout (positions contiguous), so the copy
// from global memory is a straight 16-byte cp.async per vector; tensor-core fragments are
// then read with ldmatrix (K-major) or ldmatrix.trans (M/N-major). The SIMT path (float,
// double) instead transposes K-major operands while copying (detail::Tile::TRANSPOSE), so
// that its fragments are always vectors of adjacent M or N.
//
// The output element (m, n) of group c goes to
//     out[c * out_group_stride + row(m) * ldo + n]
// with row(m) = m (kPlain), seg + m (kPair: one row per pair, a partial-sum buffer) or
// rows[seg + m] (kGathered: scatter back to the tensor row; kGatheredAdd: the same row, the
// value added to what is there by the L2 (fp32 vector atomics or bulk reductions: RedMode),
// so that the groups of a row reduction sum there instead of through a partial buffer --
// OutT float only), after adding
// bias[c * bias_group_stride + n] and multiplying by pair_gate[seg + m] when asked.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#ifdef STOCHGATE_GATED_GEMM_IMPL
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>

#include "../common/checks.h"
#endif

namespace stochgate {
namespace gated {

// Accumulation type: fp32 for half, bfloat16 and float; fp64 for double.
template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A GEMM extent that is the pair count of the group rather than a fixed size.
constexpr int64_t kFromCount = -1;

enum class OutRows : int { kPlain = 0, kPair = 1, kGathered = 2, kGatheredAdd = 3 };

template <typename T>
struct GemmOperand {
  const T* ptr = nullptr;
  int64_t ld = 0;
  int64_t group_stride = 0;
  bool gather = false;  // lines index the group's row list
  bool vec = false;     // 16-byte cp.async is legal: see vec_ok() in gated_linear.cu
};

template <typename T, typename OutT, typename AccT>
struct GroupedGemmParams {
  GemmOperand<T> a, b;
  int64_t m = 0, n = 0, k = 0;  // fixed extents, or kFromCount
  int64_t max_m = 0, max_n = 0;  // host-side upper bounds of M_c, N_c (size the grid)
  int num_groups = 0;
  const int* group_off = nullptr;  // (num_groups + 1,) exclusive prefix of pair counts
  const int* rows = nullptr;       // (pairs,) row of each pair, grouped by chunk
  const AccT* pair_gate = nullptr;  // (pairs,) gate value of each pair
  OutT* out = nullptr;
  int64_t ldo = 0;
  int64_t out_group_stride = 0;
  OutRows out_rows = OutRows::kPlain;
  const T* bias = nullptr;  // nullable
  int64_t bias_group_stride = 0;
  bool scale_by_gate = false;
  bool out_pair = false;  // set by launch_grouped_gemm: (n, n + 1) outputs stored as one vector
  // kGatheredAdd only, set by launch_grouped_gemm: how a tile's fp32 sums reach the
  // accumulator (see RedMode); kRedPairs where out, ldo or out_group_stride are not 4-aligned.
  int red_mode = 0;
};

// How the kGatheredAdd epilogues add into the accumulator. kRedPairs: one red.global.add.v2.f32
// per mma fragment pair (2 columns of one row); kRedQuads: lanes l and l ^ 1 swap halves of
// their fragments with a shuffle, so that each issues one red.global.add.v4.f32 (4 columns of
// one row, 16-byte aligned); kRedBulk (default; on GPUs older than sm_90 it runs as kRedQuads):
// the tile is staged in shared memory and each row's 128 columns go out as one bulk reduction
// (cp.reduce.async.bulk .add.f32, 512 bytes) issued by one thread. STOCHGATE_CUDA_RED picks
// one (pairs | quads | bulk). On an H100 (benchmarks/GPU_NOTES.md, run 10) quads were no faster
// than pairs -- a warp's reductions still touch 8 rows -- and bulk was 15-20% faster for
// gated_input_linear's forward: the L2 adds whole rows at a time.
enum RedMode : int { kRedPairs = 0, kRedQuads = 1, kRedBulk = 2 };


// Layouts used by the ops: (AK, BK) = (true, true), (true, false), (false, false), each
// writing T; the row reductions also write acc_of<T> partials (a distinct type only for half
// and bfloat16).
#define STOCHGATE_GATED_GEMM_LAYOUTS(PREFIX, T, OutT)                                       \
  PREFIX template void launch_grouped_gemm<T, OutT, true, true>(                           \
      const GroupedGemmParams<T, OutT, acc_of<T>>&, cudaStream_t);                         \
  PREFIX template void launch_grouped_gemm<T, OutT, true, false>(                          \
      const GroupedGemmParams<T, OutT, acc_of<T>>&, cudaStream_t);                         \
  PREFIX template void launch_grouped_gemm<T, OutT, false, false>(                         \
      const GroupedGemmParams<T, OutT, acc_of<T>>&, cudaStream_t);

// The Hopper path of every layout for half and bfloat16: wgmma tensor cores fed by a cp.async
// pipeline over a persistent grid (gated_linear_sm90.cuh). Returns false, having done nothing,
// where it does not apply -- a GPU other than compute capability 9.0, a build without sm_90a
// code, operands that are not whole 16-byte vectors, an N extent taken from the pair counts,
// STOCHGATE_CUDA_GEMM=mma in the environment (which keeps the mma.sync kernel below, for
// comparisons) or, for the layouts with an M/N-major operand, STOCHGATE_SM90_MN=0 -- and
// launch_grouped_gemm then runs the mma.sync kernel.
template <typename T, typename OutT, bool AK, bool BK>
bool launch_grouped_gemm_sm90(const GroupedGemmParams<T, OutT, float>& p, cudaStream_t stream);

// Launches the grouped GEMM on `stream` (grid: x = group, y = M tile, z = N tile; tiles past
// the group's extent exit at once, so the grid is sized by max_m / max_n, known on the host,
// never by the counts, which live on the device). Explicitly instantiated, one dtype per
// file, in gated_linear_gemm_<dtype>.cu for the layouts the ops use.
template <typename T, typename OutT, bool AK, bool BK>
void launch_grouped_gemm(const GroupedGemmParams<T, OutT, acc_of<T>>& p, cudaStream_t stream);

// SIMT GEMM configurations (float and double products; see detail::Tile).
enum SimtConfig : int { kSimtDefault = 0, kSimt128K = 1, kSimt64 = 2 };

// The SIMT configuration of float products named by STOCHGATE_CUDA_SIMT (for comparisons; see
// detail::Tile): 128k -> kSimt128K, 64 -> kSimt64, anything else (unset) -> kSimtDefault.
int simt_config_from_env();

// The RedMode named by STOCHGATE_CUDA_RED (pairs | quads | bulk); unset: kRedBulk on sm_90
// and later, kRedQuads on older GPUs.
int red_mode_from_env();

// ---------------------------------------------------------------------------------------
// Implementation (compiled only where STOCHGATE_GATED_GEMM_IMPL is defined: the per-dtype
// files). Tensor cores (mma.sync m16n8k16, fp32 accumulation) for half and bfloat16; exact
// SIMT FMA for float and double.
#ifdef STOCHGATE_GATED_GEMM_IMPL

namespace detail {

template <typename T>
constexpr bool kTensorCores = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// Tile shapes. Tensor cores: 128x128 output tile, 8 warps as 2 (M) x 4 (N), each warp
// 64x32 = 4 x 4 mma tiles of 16x8; K step 32, 3-stage cp.async pipeline. SIMT (float,
// double): 16 x 16 threads, each owning TM x TM outputs of a (16 TM)-square tile, 2 stages,
// both operand tiles M/N-major in shared memory (TRANSPOSE: K-major operands are transposed
// by the copy). SimtConfig (STOCHGATE_CUDA_SIMT, see simt_config_from_env):
//   kSimtDefault  float: TM = 8 (128 x 128 tile, K step 32, two blocks per SM); double: TM = 4
//                 (64 x 64, K step 16);
//   kSimt128K     float, TM = 8 with K-major operands kept K-major in shared memory and read
//                 two K steps per vector (run 12 of benchmarks/GPU_NOTES.md), for comparisons;
//   kSimt64       float, TM = 4 (64 x 64, K step 16: the tile size of runs 1-11), for comparisons.
template <typename T, bool TC = kTensorCores<T>, int SIMT = kSimtDefault>
struct Tile;

template <typename T, int SIMT>
struct Tile<T, true, SIMT> {
  static constexpr int BM = 128, BN = 128, BK = 32, THREADS = 256, STAGES = 3, MIN_BLOCKS = 1;
  static constexpr int PAD = 8;  // elements (16 bytes) per smem line: conflict-free ldmatrix
  static constexpr bool TRANSPOSE = false;
};

template <typename T, int SIMT>
struct Tile<T, false, SIMT> {
  static constexpr int TM = SIMT == kSimt64 || (SIMT == kSimtDefault && sizeof(T) == 8) ? 4 : 8;
  static constexpr int BM = 16 * TM, BN = 16 * TM, BK = TM == 8 ? 32 : 16, THREADS = 256,
                       STAGES = 2, MIN_BLOCKS = TM == 8 ? 2 : 1;
  static constexpr int PAD = 16 / sizeof(T);  // keeps every line 16-byte aligned
  static constexpr bool TRANSPOSE = SIMT != kSimt128K;
};

// Shared-memory layout of one operand tile: LINES lines of LEN positions, line stride LDS.
template <typename T, bool KMAJOR, int MN, int BK, int PAD>
struct SmemTile {
  static constexpr int LINES = KMAJOR ? MN : BK;
  static constexpr int LEN = KMAJOR ? BK : MN;
  static constexpr int LDS = LEN + PAD;
  static constexpr int ELEMS = LINES * LDS;
};

// The shared-memory operand tiles of a tile configuration and layout: the global layouts,
// except where Cfg::TRANSPOSE makes K-major operands M/N-major; BYTES for all stages.
template <typename T, typename Cfg, bool AK, bool BK>
struct Operands {
  static constexpr bool A_SK = AK && !Cfg::TRANSPOSE, B_SK = BK && !Cfg::TRANSPOSE;
  using SA = SmemTile<T, A_SK, Cfg::BM, Cfg::BK, Cfg::PAD>;
  using SB = SmemTile<T, B_SK, Cfg::BN, Cfg::BK, Cfg::PAD>;
  static constexpr int BYTES = Cfg::STAGES * (SA::ELEMS + SB::ELEMS) * static_cast<int>(sizeof(T));
};

// smem: a shared-memory address (as cvta gives it), or a generic pointer into shared memory.
__device__ __forceinline__ void cp_async16(unsigned smem, const void* gmem, bool pred) {
  const int src_bytes = pred ? 16 : 0;  // 0: no global read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  cp_async16(static_cast<unsigned>(__cvta_generic_to_shared(smem)), gmem, pred);
}
// One element (4 or 8 bytes: any float or double address is aligned for it); pred false:
// zero-filled, nothing read.
template <typename T>
__device__ __forceinline__ void cp_async_elem(T* smem, const T* gmem, bool pred) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "4- or 8-byte elements");
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = pred ? static_cast<int>(sizeof(T)) : 0;
  if constexpr (sizeof(T) == 4) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Copies one operand tile (lines line0.., positions pos0..) into shared memory; out-of-range
// elements become zeros (and are never read from global memory).
template <typename T, typename S, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, const GemmOperand<T>& op, const T* base,
                                          const int* gather_rows, int64_t line0,
                                          int64_t line_ext, int64_t pos0, int64_t pos_ext) {
  constexpr int VEC = 16 / sizeof(T);
  static_assert(S::LEN % VEC == 0, "tile line must be a whole number of 16-byte vectors");
  constexpr int VPL = S::LEN / VEC;
  constexpr int TOTAL = S::LINES * VPL;
#pragma unroll
  for (int v = threadIdx.x; v < TOTAL; v += THREADS) {
    const int s = v / VPL;
    const int p = (v % VPL) * VEC;
    const int64_t gl = line0 + s;
    const int64_t gp = pos0 + p;
    T* dst = smem + s * S::LDS + p;
    const bool line_ok = gl < line_ext;
    int64_t line = 0;
    if (line_ok) line = op.gather ? gather_rows[gl] : gl;
    if (op.vec) {
      // vec: pos_ext is a multiple of VEC, so a vector is either wholly in range or not.
      const bool ok = line_ok && gp < pos_ext;
      const T* src = ok ? base + line * op.ld + gp : base;
      cp_async16(dst, src, ok);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const bool ok = line_ok && gp + e < pos_ext;
        dst[e] = ok ? base[line * op.ld + gp + e] : T(0);
      }
    }
  }
}

// Copies a K-major operand tile (lines line0.., positions pos0..) transposed, into the M/N-major
// shared-memory layout of S (S::LINES = the tile's positions, S::LEN = its lines): element
// (line s, position q) to smem[q * S::LDS + s]; out-of-range elements become zeros. One cp.async
// per element: a warp copies 8 positions of 4 lines per instruction (8 consecutive elements of
// each line from global memory; with a line stride of 4 mod 32 words, 32 distinct banks).
template <typename T, typename S, int THREADS>
__device__ __forceinline__ void load_tile_transposed(T* smem, const GemmOperand<T>& op, const T* base,
                                                     const int* gather_rows, int64_t line0,
                                                     int64_t line_ext, int64_t pos0, int64_t pos_ext) {
  constexpr int WARPS = THREADS / 32, LINE_GROUPS = S::LEN / 4, POS_GROUPS = S::LINES / 8;
  static_assert(S::LEN % 4 == 0 && S::LINES % 8 == 0 && LINE_GROUPS % WARPS == 0, "tile mapping");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // Whole tile inside K (all but the last K tile): only the line decides.
  const bool all_pos = pos0 + S::LINES <= pos_ext;
  T* dst = smem + (lane % 8) * S::LDS + lane / 8;
#pragma unroll
  for (int g = 0; g < LINE_GROUPS / WARPS; ++g) {
    const int s = (warp + WARPS * g) * 4;  // + lane / 8, in dst
    const int64_t gl = line0 + s + lane / 8;
    const bool line_ok = gl < line_ext;
    int64_t line = 0;
    if (line_ok) line = op.gather ? gather_rows[gl] : gl;
    // Elements not copied (pred false) read nothing; their address is at most the operand's start
    // plus a tile's positions.
    const T* src = line_ok ? base + line * op.ld + pos0 + lane % 8 : base;
    if (all_pos) {
#pragma unroll
      for (int pg = 0; pg < POS_GROUPS; ++pg) cp_async_elem(dst + pg * 8 * S::LDS + s, src + pg * 8, line_ok);
    } else {
#pragma unroll
      for (int pg = 0; pg < POS_GROUPS; ++pg) {
        const bool ok = line_ok && pos0 + pg * 8 + lane % 8 < pos_ext;
        cp_async_elem(dst + pg * 8 * S::LDS + s, ok ? src + pg * 8 : base, ok);
      }
    }
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Global fp32 reductions (no value returned). Written in PTX because the out pointer reaches
// the kernels inside the parameter struct, where atomicAdd cannot tell that it is global and
// falls back to generic atomics (a compare-and-swap loop for the float2 form). On the device
// the result is flushed to zero below 2^-126, as every fp32 global atomic add is.
__device__ __forceinline__ void red_add(float* ptr, float v) {
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(__cvta_generic_to_global(ptr)), "f"(v) : "memory");
}

// ptr 8-byte aligned.
__device__ __forceinline__ void red_add2(float* ptr, float v0, float v1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(__cvta_generic_to_global(ptr)), "f"(v0),
               "f"(v1)
               : "memory");
#else
  red_add(ptr, v0);
  red_add(ptr + 1, v1);
#endif
}

// ptr 16-byte aligned.
__device__ __forceinline__ void red_add4(float* ptr, const float (&v)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(__cvta_generic_to_global(ptr)),
               "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3])
               : "memory");
#else
  red_add2(ptr, v[0], v[1]);
  red_add2(ptr + 2, v[2], v[3]);
#endif
}

// Where one output row of a tile goes, worked out once per row: its address (nullptr when
// m is past the group's extent M) and the gate it is scaled by (1 when not scaling).
template <typename OutT, typename AccT>
struct OutRow {
  OutT* ptr = nullptr;
  AccT gate = AccT(1);
};

// The gate tile row m is scaled by: its pair's gate when scaling, else 1 (also past M).
template <typename T, typename OutT, typename AccT>
__device__ __forceinline__ AccT row_gate(const GroupedGemmParams<T, OutT, AccT>& p, int64_t seg,
                                         int64_t m, int64_t M) {
  return p.scale_by_gate && m < M ? p.pair_gate[seg + m] : AccT(1);
}

template <typename T, typename OutT, typename AccT>
__device__ __forceinline__ OutRow<OutT, AccT> out_row(const GroupedGemmParams<T, OutT, AccT>& p,
                                                      int c, int64_t seg, const int* grows,
                                                      int64_t m, int64_t M) {
  OutRow<OutT, AccT> r;
  if (m >= M) return r;
  int64_t row = m;
  if (p.out_rows == OutRows::kPair) row = seg + m;
  if (p.out_rows == OutRows::kGathered || p.out_rows == OutRows::kGatheredAdd) row = grows[m];
  r.ptr = p.out + c * p.out_group_stride + row * p.ldo;
  r.gate = row_gate(p, seg, m, M);
  return r;
}

// Output n of a row (n < N): (acc + bias[n]) * gate.
template <typename T, typename OutT, typename AccT>
__device__ __forceinline__ void put1(const GroupedGemmParams<T, OutT, AccT>& p,
                                     const OutRow<OutT, AccT>& r, int c, int64_t n, int64_t N,
                                     AccT v) {
  if (r.ptr == nullptr || n >= N) return;
  if (p.bias != nullptr) v += static_cast<AccT>(p.bias[c * p.bias_group_stride + n]);
  if constexpr (std::is_same_v<OutT, float>) {
    if (p.out_rows == OutRows::kGatheredAdd) {
      red_add(r.ptr + n, v * r.gate);
      return;
    }
  }
  r.ptr[n] = static_cast<OutT>(v * r.gate);
}

// Outputs n and n + 1 of a row (n even): one 2-element store when both are in range and
// out_pair says the address is aligned for it.
template <typename T, typename OutT, typename AccT>
__device__ __forceinline__ void put2(const GroupedGemmParams<T, OutT, AccT>& p,
                                     const OutRow<OutT, AccT>& r, int c, int64_t n, int64_t N,
                                     AccT v0, AccT v1) {
  if (r.ptr == nullptr || n >= N) return;
  if (!p.out_pair || n + 1 >= N) {
    put1(p, r, c, n, N, v0);
    put1(p, r, c, n + 1, N, v1);
    return;
  }
  if (p.bias != nullptr) {
    v0 += static_cast<AccT>(p.bias[c * p.bias_group_stride + n]);
    v1 += static_cast<AccT>(p.bias[c * p.bias_group_stride + n + 1]);
  }
  if constexpr (std::is_same_v<OutT, float>) {
    if (p.out_rows == OutRows::kGatheredAdd) {
      red_add2(r.ptr + n, v0 * r.gate, v1 * r.gate);
      return;
    }
  }
  struct alignas(2 * sizeof(OutT)) Two {
    OutT v[2];
  } two;
  two.v[0] = static_cast<OutT>(v0 * r.gate);
  two.v[1] = static_cast<OutT>(v1 * r.gate);
  *reinterpret_cast<Two*>(r.ptr + n) = two;
}

// kRedBulk epilogues (sm_90 and later; both GEMM kernels): a tile's fp32 sums, scaled (and
// biased) as put_frag would, are staged in shared memory at kBulkRow bytes per row (512 + 32:
// the v2 stores of a half-warp's 4 rows then fall in distinct banks), then each row of the
// tile is added into its gathered accumulator row by one bulk reduction (cp.reduce.async.bulk:
// the copy engine reads shared memory and the L2 adds whole lines) issued by one thread. Needs
// N % 4 == 0 and 16-byte-aligned rows (launch_grouped_gemm falls back to kRedQuads).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define STOCHGATE_BULK_RED 1
#else
#define STOCHGATE_BULK_RED 0
#endif
constexpr int kBulkRow = 128 * 4 + 32;

// Stages outputs n0 + n and n0 + n + 1 of a row (n even, n0 + n < N) at shared address row_at.
template <typename T, typename OutT, typename AccT>
__device__ __forceinline__ void bulk_stage2(const GroupedGemmParams<T, OutT, AccT>& p, uint32_t row_at,
                                            int c, int64_t n0, int n, int64_t N, float v0, float v1,
                                            float gate) {
  if (p.bias != nullptr) {
    const T* bias = p.bias + c * p.bias_group_stride + n0 + n;
    if (n0 + n < N) v0 += static_cast<float>(bias[0]);
    if (n0 + n + 1 < N) v1 += static_cast<float>(bias[1]);
  }
#if STOCHGATE_BULK_RED
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(row_at + static_cast<uint32_t>(n * 4)),
               "f"(v0 * gate), "f"(v1 * gate)
               : "memory");
#else
  (void)row_at, (void)v0, (void)v1, (void)gate;
#endif
}

// Makes this thread's ordinary (generic-proxy) shared-memory writes, cp.async's included,
// visible to the async-proxy reads that follow the next barrier: the wgmma tensor cores'
// (gated_linear_sm90.cuh) and the bulk copies'.
__device__ __forceinline__ void fence_proxy_async() {
#if STOCHGATE_BULK_RED
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// One thread: adds the staged row at shared address src into dst (nullptr: nothing to add):
// its first min(cols, 128) values (cols = the output columns left from the tile's first, a
// multiple of 4). Then waits until the copy engine has read the row (the staging area may
// then be reused; the additions themselves complete asynchronously: see bulk_wait_all).
__device__ __forceinline__ void bulk_add_row(float* dst, uint32_t src, int64_t cols) {
#if STOCHGATE_BULK_RED
  if (dst != nullptr) {
    const uint32_t bytes = static_cast<uint32_t>((cols < 128 ? cols : 128) * 4);
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(
                     __cvta_generic_to_global(dst)),
                 "r"(src), "r"(bytes)
                 : "memory");
  }
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
#else
  (void)dst, (void)src, (void)cols;
#endif
}

// Before a thread that issued bulk reductions exits: they have completed.
__device__ __forceinline__ void bulk_wait_all() {
#if STOCHGATE_BULK_RED
  asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
#endif
}

// One tensor-core accumulator fragment (mma.m16n8k16 and wgmma m64nNk16 share the layout):
// this lane's (a0, a1) at row r0, columns n8 + 2 (lane % 4) + 0, 1 and (b0, b1) at row r1
// (8 rows below), same columns; n8 is the fragment's first column. Called by whole warps
// (the kQuads exchange is a shuffle): in kQuads mode lane pairs (l, l ^ 1) trade halves so
// that the even lane adds 4 columns of r0 and the odd lane 4 columns of r1 with one vector
// reduction each.
template <typename T, typename OutT, typename AccT>
__device__ __forceinline__ void put_frag(const GroupedGemmParams<T, OutT, AccT>& p,
                                         const OutRow<OutT, AccT>& r0, const OutRow<OutT, AccT>& r1,
                                         int c, int64_t n8, int64_t N, AccT a0, AccT a1, AccT b0,
                                         AccT b1) {
  const int lane = threadIdx.x % 32;
  if constexpr (std::is_same_v<OutT, float> && std::is_same_v<AccT, float>) {
    if (p.out_rows == OutRows::kGatheredAdd && p.red_mode != kRedPairs) {
      const bool odd = lane & 1;
      const float s0 = odd ? a0 : b0, s1 = odd ? a1 : b1;
      const float t0 = __shfl_xor_sync(0xffffffffu, s0, 1);
      const float t1 = __shfl_xor_sync(0xffffffffu, s1, 1);
      const OutRow<OutT, AccT> r = odd ? r1 : r0;  // a copy: a reference would put both in memory
      const int64_t n = n8 + 2 * ((lane % 4) & ~1);
      if (r.ptr == nullptr || n >= N) return;
      float v[4] = {odd ? t0 : a0, odd ? t1 : a1, odd ? b0 : t0, odd ? b1 : t1};
      if (n + 4 > N) {
#pragma unroll
        for (int e = 0; e < 4; ++e) put1(p, r, c, n + e, N, v[e]);  // put1 skips n + e >= N
        return;
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (p.bias != nullptr) v[e] += static_cast<float>(p.bias[c * p.bias_group_stride + n + e]);
        v[e] *= r.gate;
      }
      red_add4(r.ptr + n, v);
      return;
    }
  }
  const int64_t n = n8 + (lane % 4) * 2;
  put2(p, r0, c, n, N, a0, a1);
  put2(p, r1, c, n, N, b0, b1);
}

// SIMT operand fragments from shared memory (float, double; alignment: see Tile and SmemTile).
// N consecutive elements at s (N * sizeof(T) bytes: 8 or 16, or 32 as two 16-byte loads).
template <int N, typename T>
__device__ __forceinline__ void ld_shared_vec(T (&d)[N], const T* s) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "SIMT types only");
  if constexpr (std::is_same_v<T, float> && N == 2) {
    const float2 v = *reinterpret_cast<const float2*>(s);
    d[0] = v.x, d[1] = v.y;
  } else if constexpr (std::is_same_v<T, float> && N == 4) {
    const float4 v = *reinterpret_cast<const float4*>(s);
    d[0] = v.x, d[1] = v.y, d[2] = v.z, d[3] = v.w;
  } else {
    static_assert(std::is_same_v<T, double> && N % 2 == 0, "unsupported vector");
#pragma unroll
    for (int h = 0; h < N; h += 2) {
      const double2 v = *reinterpret_cast<const double2*>(s + h);
      d[h] = v.x, d[h + 1] = v.y;
    }
  }
}

// The R x KV operand values a SIMT thread multiplies at K steps kk .. kk + KV - 1: f[r][q] =
// operand(index(r), kk + q), where the thread's r-th M (or N) index is
//   t + 16 r                            for a K-major tile (read along k: one KV-vector per r;
//                                       a warp's 4 or 8 adjacent t are adjacent padded lines,
//                                       which fall in distinct banks), or
//   (r / 4) * 64 + 4 t + r % 4          for an M/N-major tile (read along m: one 4-vector per
//                                       4 r and K step; a warp's t are 64 or 128 contiguous
//                                       bytes).
template <bool KMAJOR>
__device__ __forceinline__ int simt_index(int t, int r) {
  return KMAJOR ? t + 16 * r : (r / 4) * 64 + 4 * t + r % 4;
}

template <bool KMAJOR, int R, int KV, typename T>
__device__ __forceinline__ void simt_frag(T (&f)[R][KV], const T* s, int lds, int t, int kk) {
  if constexpr (KMAJOR) {
#pragma unroll
    for (int r = 0; r < R; ++r) ld_shared_vec<KV>(f[r], s + simt_index<true>(t, r) * lds + kk);
  } else {
    static_assert(R % 4 == 0, "M/N-major SIMT fragments come in 4-vectors");
#pragma unroll
    for (int q = 0; q < KV; ++q)
#pragma unroll
      for (int g = 0; g < R / 4; ++g) {
        T v[4];
        ld_shared_vec<4>(v, s + (kk + q) * lds + simt_index<false>(t, 4 * g));
#pragma unroll
        for (int e = 0; e < 4; ++e) f[4 * g + e][q] = v[e];
      }
  }
}

template <typename T, typename OutT, bool A_KM, bool B_KM, int SIMT>
__global__ void __launch_bounds__(Tile<T, kTensorCores<T>, SIMT>::THREADS,
                                  Tile<T, kTensorCores<T>, SIMT>::MIN_BLOCKS)
    grouped_gemm_kernel(const GroupedGemmParams<T, OutT, acc_of<T>> p) {
  using AccT = acc_of<T>;
  using Cfg = Tile<T, kTensorCores<T>, SIMT>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, THREADS = Cfg::THREADS;
  constexpr int STAGES = Cfg::STAGES;
  using Ops = Operands<T, Cfg, A_KM, B_KM>;
  constexpr bool A_SK = Ops::A_SK, B_SK = Ops::B_SK;
  using SA = typename Ops::SA;
  using SB = typename Ops::SB;

  const int c = blockIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.z) * BN;
  const int64_t seg = p.group_off[c];
  const int64_t cnt = p.group_off[c + 1] - seg;
  const int64_t M = p.m == kFromCount ? cnt : p.m;
  const int64_t N = p.n == kFromCount ? cnt : p.n;
  const int64_t K = p.k == kFromCount ? cnt : p.k;
  if (m0 >= M || n0 >= N) return;  // whole block: before any barrier

  const T* a_base = p.a.ptr + c * p.a.group_stride;
  const T* b_base = p.b.ptr + c * p.b.group_stride;
  const int* grows = p.rows + seg;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem_a = reinterpret_cast<T*>(smem_raw);
  T* smem_b = smem_a + STAGES * SA::ELEMS;

  // Stage s <- K tile kt. Lines/positions per layout as in the header comment.
  auto load_stage = [&](int s, int64_t kt) {
    const int64_t k0 = kt * BK;
    if constexpr (A_KM && !A_SK) {
      load_tile_transposed<T, SA, THREADS>(smem_a + s * SA::ELEMS, p.a, a_base, grows, m0, M, k0, K);
    } else if constexpr (A_KM) {
      load_tile<T, SA, THREADS>(smem_a + s * SA::ELEMS, p.a, a_base, grows, m0, M, k0, K);
    } else {
      load_tile<T, SA, THREADS>(smem_a + s * SA::ELEMS, p.a, a_base, grows, k0, K, m0, M);
    }
    if constexpr (B_KM && !B_SK) {
      load_tile_transposed<T, SB, THREADS>(smem_b + s * SB::ELEMS, p.b, b_base, grows, n0, N, k0, K);
    } else if constexpr (B_KM) {
      load_tile<T, SB, THREADS>(smem_b + s * SB::ELEMS, p.b, b_base, grows, n0, N, k0, K);
    } else {
      load_tile<T, SB, THREADS>(smem_b + s * SB::ELEMS, p.b, b_base, grows, k0, K, n0, N);
    }
  };

  const int64_t ktiles = (K + BK - 1) / BK;

  // Pipeline: STAGES-1 tiles in flight; one commit group per iteration (possibly empty) so
  // that wait_group<STAGES-2> always means "tile kt has landed".
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  if constexpr (kTensorCores<T>) {
    constexpr int WARPS_N = 4, WM = 64, WN = 32, MI = WM / 16, NI = WN / 8;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
      for (int j = 0; j < NI; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

    for (int64_t kt = 0; kt < ktiles; ++kt) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // tile kt visible to all; everyone is done with tile kt-1's stage
      if (kt + STAGES - 1 < ktiles) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
      cp_async_commit();

      const T* As = smem_a + (kt % STAGES) * SA::ELEMS;
      const T* Bs = smem_b + (kt % STAGES) * SB::ELEMS;
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        // A fragment of mma.m16n8k16 = four 8x8 matrices: j = 0 (m 0-7, k 0-7),
        // 1 (m 8-15, k 0-7), 2 (m 0-7, k 8-15), 3 (m 8-15, k 8-15); lane l gives the address
        // of row l % 8 of matrix j = l / 8.
        uint32_t af[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          const int mb = wm * WM + mi * 16;
          if constexpr (A_KM) {  // smem [m][k]: row = m, 8 contiguous k
            ldmatrix_x4(af[mi], As + (mb + lane % 16) * SA::LDS + kk + (lane / 16) * 8);
          } else {  // smem [k][m]: row = k, 8 contiguous m; .trans hands out (m, k) pairs
            const int j = lane / 8, r = lane % 8;
            ldmatrix_x4_trans(af[mi], As + (kk + (j / 2) * 8 + r) * SA::LDS + mb + (j % 2) * 8);
          }
        }
        // B fragments for two n8 tiles per ldmatrix.x4: j = 0 (n 0-7, k 0-7) -> b0 of tile
        // 0, 1 (n 0-7, k 8-15) -> b1 of tile 0, 2 and 3 likewise for n 8-15 (tile 1).
        uint32_t bf[NI][2];
#pragma unroll
        for (int nj = 0; nj < NI; nj += 2) {
          const int nb = wn * WN + nj * 8;
          uint32_t r4[4];
          if constexpr (B_KM) {  // smem [n][k]
            ldmatrix_x4(r4, Bs + (nb + (lane / 16) * 8 + lane % 8) * SB::LDS + kk +
                                ((lane / 8) % 2) * 8);
          } else {  // smem [k][n]
            ldmatrix_x4_trans(r4, Bs + (kk + ((lane / 8) % 2) * 8 + lane % 8) * SB::LDS + nb +
                                      (lane / 16) * 8);
          }
          bf[nj][0] = r4[0];
          bf[nj][1] = r4[1];
          bf[nj + 1][0] = r4[2];
          bf[nj + 1][1] = r4[3];
        }
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) mma_16816<T>(acc[mi][ni], af[mi], bf[ni]);
      }
    }
    cp_async_wait<0>();

    // Accumulator layout of mma.m16n8k16: c0, c1 at (row lane/4, cols 2*(lane%4) + 0/1),
    // c2, c3 at row lane/4 + 8.
#if STOCHGATE_BULK_RED
    if constexpr (std::is_same_v<OutT, float>) {
      if (p.out_rows == OutRows::kGatheredAdd && p.red_mode == kRedBulk) {
        // The whole 128 x 128 tile staged from the start of dynamic shared memory (the launch
        // sizes it for BM rows of kBulkRow bytes), once every warp is done with the operands.
        const uint32_t stage = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
        __syncthreads();
#pragma unroll
        for (int mi = 0; mi < MI; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = wm * WM + mi * 16 + lane / 4 + h * 8;
            const float gate = row_gate(p, seg, m0 + r, M);
#pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
              bulk_stage2(p, stage + r * kBulkRow, c, n0, wn * WN + ni * 8 + (lane % 4) * 2, N,
                          acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], gate);
            }
          }
        fence_proxy_async();
        __syncthreads();
        if (threadIdx.x < BM) {
          const auto row = out_row(p, c, seg, grows, m0 + threadIdx.x, M);
          bulk_add_row(row.ptr != nullptr ? row.ptr + n0 : nullptr, stage + threadIdx.x * kBulkRow, N - n0);
          bulk_wait_all();
        }
        return;
      }
    }
#endif
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
      const int64_t m = m0 + wm * WM + mi * 16 + lane / 4;
      const auto row0 = out_row(p, c, seg, grows, m, M);
      const auto row1 = out_row(p, c, seg, grows, m + 8, M);
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const float* f = acc[mi][ni];
        put_frag(p, row0, row1, c, n0 + wn * WN + ni * 8, N, f[0], f[1], f[2], f[3]);
      }
    }
  } else {
    // SIMT: 8 warps of 4 (m) x 8 (n) threads; thread (tm, tn) owns rows simt_index<A_SK>(tm, i)
    // and columns simt_index<B_SK>(tn, j), i, j < TM, and reads KV K steps of its operands at a
    // time: M/N-major tiles one K step (TM / 4 4-vectors per operand for TM^2 FMAs), K-major
    // ones (kSimt128K only) two K steps per vector.
    constexpr int TM = Cfg::TM, KV = A_SK || B_SK ? 2 : 1;
    static_assert(BM == 16 * TM && BN == 16 * TM && THREADS == 256 && BK % KV == 0, "SIMT tile mapping");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int tm = (warp / 2) * 4 + lane / 8, tn = (warp % 2) * 8 + lane % 8;
    AccT acc[TM][TM];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TM; ++j) acc[i][j] = AccT(0);

    for (int64_t kt = 0; kt < ktiles; ++kt) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();
      if (kt + STAGES - 1 < ktiles) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
      cp_async_commit();

      const T* As = smem_a + (kt % STAGES) * SA::ELEMS;
      const T* Bs = smem_b + (kt % STAGES) * SB::ELEMS;
#pragma unroll
      for (int kk = 0; kk < BK; kk += KV) {
        AccT av[TM][KV], bv[TM][KV];
        simt_frag<A_SK>(av, As, SA::LDS, tm, kk);
        simt_frag<B_SK>(bv, Bs, SB::LDS, tn, kk);
#pragma unroll
        for (int q = 0; q < KV; ++q)
#pragma unroll
          for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TM; ++j) acc[i][j] = fma(av[i][q], bv[j][q], acc[i][j]);
      }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const auto row = out_row(p, c, seg, grows, m0 + simt_index<A_SK>(tm, i), M);
      if constexpr (B_SK) {
#pragma unroll
        for (int j = 0; j < TM; ++j) put1(p, row, c, n0 + simt_index<true>(tn, j), N, acc[i][j]);
      } else {  // columns in runs of 4: two 2-element stores (or vector reductions) per run
#pragma unroll
        for (int j = 0; j < TM; j += 2)
          put2(p, row, c, n0 + simt_index<false>(tn, j), N, acc[i][j], acc[i][j + 1]);
      }
    }
  }
}

// The launch with one tile configuration (grid sized by its tile).
template <typename T, typename OutT, bool AK, bool BK, int SIMT>
void launch_tiles(const GroupedGemmParams<T, OutT, acc_of<T>>& q, cudaStream_t stream) {
  using Cfg = Tile<T, kTensorCores<T>, SIMT>;
  const int64_t mt = (q.max_m + Cfg::BM - 1) / Cfg::BM;
  const int64_t nt = (q.max_n + Cfg::BN - 1) / Cfg::BN;
  STOCHGATE_CHECK(mt <= 65535 && nt <= 65535,
                  "stochgate gated matmul: problem too large for the CUDA grid (", q.max_m, " x ",
                  q.max_n, " outputs per chunk)");
  constexpr int operand_smem = Operands<T, Cfg, AK, BK>::BYTES;
  // kRedBulk stages the output tile where the operands were (tensor-core kernels only).
  const int smem = q.red_mode == kRedBulk && kTensorCores<T>
                       ? std::max(operand_smem, Cfg::BM * kBulkRow)
                       : operand_smem;
  auto kernel = grouped_gemm_kernel<T, OutT, AK, BK, SIMT>;
  if (smem > 48 * 1024) {
    // Not a stream operation: legal during CUDA graph capture.
    C10_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  const dim3 grid(static_cast<unsigned>(q.num_groups), static_cast<unsigned>(mt),
                  static_cast<unsigned>(nt));
  kernel<<<grid, Cfg::THREADS, smem, stream>>>(q);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
}  // namespace detail

template <typename T, typename OutT, bool AK, bool BK>
void launch_grouped_gemm(const GroupedGemmParams<T, OutT, acc_of<T>>& p, cudaStream_t stream) {
  if (p.num_groups <= 0 || p.max_m <= 0 || p.max_n <= 0) return;
  GroupedGemmParams<T, OutT, acc_of<T>> q = p;
  q.out_pair = reinterpret_cast<uintptr_t>(p.out) % (2 * sizeof(OutT)) == 0 && p.ldo % 2 == 0 &&
               p.out_group_stride % 2 == 0;
  q.red_mode = p.out_rows == OutRows::kGatheredAdd &&
                       reinterpret_cast<uintptr_t>(p.out) % 16 == 0 && p.ldo % 4 == 0 &&
                       p.out_group_stride % 4 == 0
                   ? red_mode_from_env()
                   : kRedPairs;
  // Bulk reductions move whole 16-byte vectors of a row: a fixed N that is a multiple of 4.
  if (q.red_mode == kRedBulk && (p.n == kFromCount || p.n % 4 != 0)) q.red_mode = kRedQuads;
  if constexpr (detail::kTensorCores<T>) {
    if (launch_grouped_gemm_sm90<T, OutT, AK, BK>(q, stream)) return;
  } else if constexpr (std::is_same_v<T, float>) {
    const int simt = simt_config_from_env();
    if (simt == kSimt128K) return detail::launch_tiles<T, OutT, AK, BK, kSimt128K>(q, stream);
    if (simt == kSimt64) return detail::launch_tiles<T, OutT, AK, BK, kSimt64>(q, stream);
  }
  detail::launch_tiles<T, OutT, AK, BK, kSimtDefault>(q, stream);
}

#endif  // STOCHGATE_GATED_GEMM_IMPL

}  // namespace gated
}  // namespace stochgate
