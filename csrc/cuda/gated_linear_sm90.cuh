// The Hopper (sm_90a) kernel of the grouped gathered GEMM, for half and bfloat16, in every
// operand layout of gated_linear.cuh: A K-major (A[m, k] = a[line(m) * lda + k]) or M-major
// (A[m, k] = a[line(k) * lda + m]), B K-major or N-major. K-major both: gated_linear's forward
// (x rows gathered per chunk times W[chunk c]) and gated_input_linear's per-chunk products;
// B N-major: gated_linear's dx and gated_input_linear's dh; both M/N-major: the two dweights,
// whose K runs over a chunk's gathered rows. The parameters and output rules are those of
// gated_linear.cuh; only the machinery differs from its mma.sync kernel:
//
//   * tiles of 128 x 128 outputs, K in steps of 64;
//   * two warpgroups, each computing 64 x 128 with wgmma.m64n128k16 (fp32 accumulators in
//     registers, both operands read by the tensor cores from shared memory; an M/N-major
//     operand with the instruction's transpose flag);
//   * every thread copies 16-byte vectors with cp.async (rows gathered through the row list --
//     the bulk tensor copy engine cannot gather rows on sm_90) into shared memory laid out as
//     the 128-byte swizzle that the wgmma descriptors name. A K-major tile: 128 lines (M or N)
//     of 64 K values (128 bytes), vector j of line r at r * 128 + 16 * (j ^ (r % 8)). An
//     M/N-major tile: two 8 KB halves (M or N 0-63 and 64-127), each 64 K lines of 64 values,
//     vector j of line k at half * 8192 + k * 128 + 16 * (j ^ (k % 8)) -- the canonical
//     layout whose descriptor has the 8-line group stride 1024 and the half stride 8192;
//   * a STAGES-deep ring of shared-memory stages (3 stages and two blocks per SM by default,
//     4 stages and one block on request, K-major products only). By default (LAG = 0) each
//     step's wgmma is waited for before the next barrier and the loads of the next STAGES - 1
//     steps are in flight while the tensor cores work; with LAG = 1 the wgmma of step k-1 may
//     still be reading its stage while step k's is queued, and loads run STAGES - 2 steps ahead;
//   * a persistent grid: each block walks tiles t = blockIdx.x, + gridDim.x, ..., mapping t to
//     (chunk, M tile, N tile) from the pair counts on the device (no host synchronisation),
//     M tile by M tile across the chunks (find_tile_by_level) so that concurrent tiles share
//     their gathered rows in L2.
//
// Included by gated_linear_sm90.cu (the K-major products) and gated_linear_sm90_mn.cu (the
// others), which instantiate it. Compiled for every architecture in the build; the body exists
// only in the sm_90a pass (__CUDA_ARCH_FEAT_SM90_ALL), and the host launches it only on a
// compute-capability-9.0 GPU of a build that has sm_90a code (STOCHGATE_HAS_SM90A).
#pragma once
#define STOCHGATE_GATED_GEMM_IMPL
#include "gated_linear.cuh"

#include <ATen/cuda/CUDAContext.h>

#include <cstdlib>
#include <cstring>

namespace stochgate {
namespace gated {
namespace sm90 {

constexpr int BM = 128, BN = 128, BK = 64, THREADS = 256;
constexpr int kTileBytes = BM * BK * 2;           // one operand tile of one stage (16 KB)
constexpr int kStageBytes = 2 * kTileBytes;       // A and B
template <int STAGES>
constexpr int kSmemBytes = STAGES * kStageBytes + 1024;  // + room to align to 1024 bytes

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define STOCHGATE_SM90_BODY 1
#else
#define STOCHGATE_SM90_BODY 0
#endif

using detail::cp_async16;

// Shared-memory matrix descriptor of a K-major tile with the 128-byte swizzle: start address,
// leading-dimension offset (unused by this layout; 16 bytes by convention), stride between
// 8-row groups (8 rows x 128 bytes), swizzle mode 1 = 128 bytes. Fields hold byte values >> 4.
// An M/N-major tile (two 64-wide halves): leading-dimension offset = the stride between the
// halves (8192 bytes), stride offset = between 8-line groups along K (1024 bytes).
template <bool KMAJ>
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  constexpr uint64_t lbo = KMAJ ? 16 : 8192;
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (uint64_t{1} << 62);
}

// Byte offset, within one stage's operand tile, of the k16 step kk of the wgmma reading rows or
// columns half * 64 .. + 63: K-major, 32 bytes along each 128-byte line; M/N-major, 16 lines.
template <bool KMAJ>
__device__ __forceinline__ uint32_t tile_offset(int half, int kk) {
  return static_cast<uint32_t>(half * 8192 + (KMAJ ? kk * 32 : kk * 2048));
}

// One thread's share of the copies of one operand tile of a stage (128 M or N x 64 K, 16 KB:
// 1024 vectors of 16 bytes, 4 per thread). K-major: vector tid % 8 of lines tid / 8 + 32 i;
// M/N-major: vector tid % 16 (of 16 across the 128 positions) of K lines tid / 16 + 16 i.
template <typename T, bool KMAJ>
struct TileCopy {
  uint32_t dst[4];
  const T* src[4];  // K-major: this thread's vector of each line (add k); M/N-major: src[0] = its column
  bool ok[4];       // K-major: the line exists; M/N-major: ok[0] = the column does

  __device__ __forceinline__ explicit TileCopy(int tid) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (KMAJ) {
        const int r = tid / 8 + 32 * i, j = tid % 8;
        dst[i] = r * 128 + ((j ^ (r % 8)) << 4);
      } else {
        const int k = tid / 16 + 16 * i, v = tid % 16;
        dst[i] = (v / 8) * 8192 + k * 128 + (((v % 8) ^ (k % 8)) << 4);
      }
    }
  }

  // A new tile: positions (K-major: lines) mn0 .. of extent MN.
  __device__ __forceinline__ void start(const GemmOperand<T>& op, const T* base, const int* grows,
                                        int64_t mn0, int64_t MN, int tid) {
    if constexpr (KMAJ) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t r = mn0 + tid / 8 + 32 * i;
        ok[i] = r < MN;
        const int64_t line = ok[i] ? (op.gather ? grows[r] : r) : 0;
        src[i] = base + line * op.ld + (tid % 8) * 8;
      }
    } else {
      const int64_t col = mn0 + (tid % 16) * 8;
      ok[0] = col < MN;
      src[0] = base + col;
    }
  }

  // The copies of K step k0 .. k0 + 63 (K: the group's extent) into the tile at sdst.
  __device__ __forceinline__ void copy(uint32_t sdst, const GemmOperand<T>& op, const T* base,
                                       const int* grows, int64_t k0, int64_t K, int tid) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (KMAJ) {
        const bool on = ok[i] && k0 + (tid % 8) * 8 < K;
        cp_async16(sdst + dst[i], on ? src[i] + k0 : base, on);
      } else {
        const int64_t k = k0 + tid / 16 + 16 * i;
        const bool on = ok[0] && k < K;
        const int64_t line = on ? (op.gather ? grows[k] : k) : 0;
        cp_async16(sdst + dst[i], on ? src[0] + line * op.ld : base, on);
      }
    }
  }
};

__device__ __forceinline__ void wgmma_fence() {
#if STOCHGATE_SM90_BODY
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if STOCHGATE_SM90_BODY
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if STOCHGATE_SM90_BODY
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
using detail::fence_proxy_async;
// Tells the compiler that the accumulators may have changed here (after wgmma_wait): their
// reads must not move above it.
__device__ __forceinline__ void fence_acc(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D (64 x 128, fp32, this warpgroup's registers) += A (64 x 16) * B (16 x 128), both from
// shared memory through their descriptors. TY: the PTX name of the operand type.
#define STOCHGATE_WGMMA_M64N128K16(TY)                                                             \
  asm volatile(                                                                                    \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                   \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"                                \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17,"            \
      "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33,"            \
      "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49,"            \
      "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"                       \
      "}, %64, %65, p, 1, 1, %66, %67;\n}\n"                                                       \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),        \
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),    \
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),              \
        "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),              \
        "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),              \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),              \
        "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),              \
        "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),              \
        "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),              \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),              \
        "+f"(d[62]), "+f"(d[63])                                                                   \
      : "l"(da), "l"(db), "n"(TA), "n"(TB))

// TA / TB: 1 where A / B is M/N-major (the instruction's transpose flags).
template <typename T, int TA, int TB>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t da, uint64_t db) {
#if STOCHGATE_SM90_BODY
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    STOCHGATE_WGMMA_M64N128K16("bf16");
  } else {
    STOCHGATE_WGMMA_M64N128K16("f16");
  }
#else
  (void)d;
  (void)da;
  (void)db;
#endif
}
#undef STOCHGATE_WGMMA_M64N128K16

// Maps tile t of the whole problem to (group c, tile lt within it), counting each group's
// tiles as ceil(M_c / BM) * nt from the pair counts; false when t is past the last tile.
// Called by whole warps (each warp works it out alone; the answer is the same in all).
template <typename T, typename OutT>
__device__ __forceinline__ bool find_tile(const GroupedGemmParams<T, OutT, float>& p, int64_t t,
                                          int64_t nt, int& c, int64_t& lt) {
  const int lane = threadIdx.x % 32;
  int64_t before = 0;
  for (int base = 0; base < p.num_groups; base += 32) {
    const int g = base + lane;
    int64_t tiles = 0;
    if (g < p.num_groups) {
      const int64_t mg = p.m == kFromCount ? p.group_off[g + 1] - p.group_off[g] : p.m;
      tiles = (mg + BM - 1) / BM * nt;
    }
    int64_t incl = tiles;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const int64_t v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    const int64_t total = __shfl_sync(0xffffffffu, incl, 31);
    if (t < before + total) {
      const unsigned hit = __ballot_sync(0xffffffffu, t < before + incl);
      const int l = __ffs(hit) - 1;
      const int64_t excl = __shfl_sync(0xffffffffu, incl - tiles, l);
      c = base + l;
      lt = t - before - excl;
      return true;
    }
    before += total;
  }
  return false;
}

// Level-major order, for up to 64 groups: all groups' first M tiles (each with its N tiles),
// then all groups' second M tiles, and so on. Row lists are sorted by row, so M tile i of
// every group covers about the same span of rows; tiles running at the same time then share
// their gathered rows in L2 (in group-major order each row would be fetched from DRAM once
// per active chunk). `tiles0` / `tiles1`: M-tile count of group lane / lane + 32 (0 past the
// last group). `level` and `start` (tiles before `level`) carry over between the calls of a
// block, whose t only grows, so a block walks the levels once in all.
__device__ __forceinline__ bool find_tile_by_level(int64_t t, int64_t nt, int tiles0, int tiles1,
                                                   int& level, int64_t& start, int& c,
                                                   int64_t& lt) {
  const int lane = threadIdx.x % 32;
  for (;; ++level) {
    const unsigned b0 = __ballot_sync(0xffffffffu, tiles0 > level);
    const unsigned b1 = __ballot_sync(0xffffffffu, tiles1 > level);
    const int groups = __popc(b0) + __popc(b1);
    if (groups == 0) return false;
    const int64_t count = groups * nt;
    if (t < start + count) {
      const int64_t q = t - start;
      const int ord = static_cast<int>(q / nt);  // the ord-th group (0-based) with this level
      const bool first = ord < __popc(b0);
      const unsigned mask = first ? b0 : b1;
      const int k = first ? ord : ord - __popc(b0);
      const unsigned upto = mask & (0xffffffffu >> (31 - lane));  // bits 0..lane
      const unsigned hit = __ballot_sync(0xffffffffu, ((mask >> lane) & 1u) && __popc(upto) == k + 1);
      c = (first ? 0 : 32) + __ffs(hit) - 1;
      lt = level * nt + q % nt;
      return true;
    }
    start += count;
  }
}

// kRedBulk epilogue (see bulk_stage2 in gated_linear.cuh): the 128 x 128 tile is staged in the
// shared-memory ring -- free once both warpgroups' wgmma are over -- each warpgroup its own 64
// rows, and one thread per row adds it into the accumulator. The issuing threads wait until
// their bulk copies have read shared memory before the block's next barrier, after which the
// ring is refilled.
static_assert(2 * 64 * detail::kBulkRow <= 3 * kStageBytes, "the staged tile fits the smallest ring");

template <typename T, typename OutT>
__device__ __forceinline__ void bulk_reduce_tile(const GroupedGemmParams<T, OutT, float>& p,
                                                 const float (&acc)[64], uint32_t smem, int c,
                                                 int64_t seg, const int* grows, int64_t m0,
                                                 int64_t M, int64_t n0, int64_t N, int lr) {
  const int tid = threadIdx.x, lane = tid % 32, wg = tid / 128;
  __syncthreads();  // both warpgroups' wgmma reads of the ring are over
  const uint32_t stage = smem + wg * 64 * detail::kBulkRow;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = lr + 8 * h;
    const float gate = detail::row_gate(p, seg, m0 + wg * 64 + r, M);
#pragma unroll
    for (int q = 0; q < 16; ++q) {
      detail::bulk_stage2(p, stage + r * detail::kBulkRow, c, n0, q * 8 + (lane % 4) * 2, N,
                          acc[4 * q + 2 * h], acc[4 * q + 2 * h + 1], gate);
    }
  }
  fence_proxy_async();
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");  // this warpgroup's rows staged
  const int r = tid % 128;
  if (r < 64) {
    const auto row = detail::out_row(p, c, seg, grows, m0 + wg * 64 + r, M);
    detail::bulk_add_row(row.ptr != nullptr ? row.ptr + n0 : nullptr, stage + r * detail::kBulkRow, N - n0);
  }
}

// LAG: how many steps' wgmma a warpgroup leaves running when it goes on to the next step
// (1: the tensor cores always have the next step queued; the ring then keeps one stage for
// the step still being read, and loads run STAGES - 2 steps ahead. 0: each step's wgmma is
// waited for before the next barrier, and loads run STAGES - 1 steps ahead).
// A_KM / B_KM: A / B K-major (else M / N-major).
template <typename T, typename OutT, bool A_KM, bool B_KM, int STAGES, int MIN_BLOCKS, int LAG>
__global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
    gemm_kernel(const GroupedGemmParams<T, OutT, float> p, bool level_order) {
#if STOCHGATE_SM90_BODY
  static_assert(LAG == 0 || LAG == 1, "LAG is 0 or 1");
  static_assert(STAGES >= 2 + LAG, "the ring keeps LAG stages for the wgmma still reading");
  constexpr int AHEAD = STAGES - 1 - LAG;  // steps whose loads are in flight ahead of the one used
  extern __shared__ unsigned char smem_raw[];
  const uint32_t smem = (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, wg = warp / 4;
  const int64_t N = p.n;
  const int64_t nt = (N + BN - 1) / BN;
  TileCopy<T, A_KM> a_copy(tid);
  TileCopy<T, B_KM> b_copy(tid);

  const bool by_level = level_order && p.num_groups <= 64;
  int tiles0 = 0, tiles1 = 0, level = 0;
  int64_t start = 0;
  if (by_level) {
    auto tiles_of = [&](int g) -> int {
      if (g >= p.num_groups) return 0;
      const int64_t mg = p.m == kFromCount ? p.group_off[g + 1] - p.group_off[g] : p.m;
      return static_cast<int>((mg + BM - 1) / BM);
    };
    tiles0 = tiles_of(lane);
    tiles1 = tiles_of(lane + 32);
  }
  for (int64_t t = blockIdx.x;; t += gridDim.x) {
    int c;
    int64_t lt;
    if (by_level ? !find_tile_by_level(t, nt, tiles0, tiles1, level, start, c, lt)
                 : !find_tile(p, t, nt, c, lt)) {
      break;
    }
    const int64_t seg = p.group_off[c];
    const int64_t M = p.m == kFromCount ? p.group_off[c + 1] - seg : p.m;
    const int64_t m0 = lt / nt * BM, n0 = lt % nt * BN;
    const int* grows = p.rows + seg;
    const T* a_base = p.a.ptr + c * p.a.group_stride;
    const T* b_base = p.b.ptr + c * p.b.group_stride;
    const int64_t K = p.k == kFromCount ? p.group_off[c + 1] - seg : p.k;
    const int64_t ktiles = (K + BK - 1) / BK;
    a_copy.start(p.a, a_base, grows, m0, M, tid);
    b_copy.start(p.b, b_base, grows, n0, N, tid);
    auto load = [&](int s, int64_t kt) {
      const uint32_t sa = smem + s * kStageBytes;
      a_copy.copy(sa, p.a, a_base, grows, kt * BK, K, tid);
      b_copy.copy(sa + kTileBytes, p.b, b_base, grows, kt * BK, K, tid);
    };

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;

    __syncthreads();  // the previous tile's wgmma reads of the ring are over in every warp
#pragma unroll
    for (int s = 0; s < AHEAD; ++s) {
      if (s < ktiles) load(s, s);
      asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    for (int64_t kt = 0; kt < ktiles; ++kt) {
      // Step kt is commit group kt: AHEAD - 1 later groups may still be pending.
      asm volatile("cp.async.wait_group %0;\n" ::"n"(AHEAD - 1) : "memory");
      fence_proxy_async();
      // After this barrier step kt is in shared memory for everyone, and step kt - 1 - LAG's
      // wgmma (waited for by every warpgroup at the end of the last iteration) is over, so
      // its stage, the one step kt + AHEAD uses, can be refilled.
      __syncthreads();
      if (kt + AHEAD < ktiles) load(static_cast<int>((kt + AHEAD) % STAGES), kt + AHEAD);
      asm volatile("cp.async.commit_group;\n" ::: "memory");
      const uint32_t sa = smem + static_cast<uint32_t>(kt % STAGES) * kStageBytes;
      const uint32_t sb = sa + kTileBytes;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        wgmma_m64n128k16<T, A_KM ? 0 : 1, B_KM ? 0 : 1>(acc, smem_desc<A_KM>(sa + tile_offset<A_KM>(wg, kk)),
                                                       smem_desc<B_KM>(sb + tile_offset<B_KM>(0, kk)));
      }
      wgmma_commit();
      wgmma_wait<LAG>();
    }
    wgmma_wait<0>();
    fence_acc(acc);
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");

    // Accumulator layout of wgmma m64nNk16: warp w of the warpgroup holds rows 16 w + lane / 4
    // (registers 4 q + 0, 1) and + 8 (4 q + 2, 3), columns 8 q + 2 (lane % 4) + 0, 1.
    const int lr = (warp % 4) * 16 + lane / 4;  // this lane's first row within the warpgroup's 64
    if constexpr (std::is_same_v<OutT, float>) {
      if (p.out_rows == OutRows::kGatheredAdd && p.red_mode == kRedBulk) {
        bulk_reduce_tile(p, acc, smem, c, seg, grows, m0, M, n0, N, lr);
        continue;
      }
    }
    const int64_t m = m0 + wg * 64 + lr;
    const auto row0 = detail::out_row(p, c, seg, grows, m, M);
    const auto row1 = detail::out_row(p, c, seg, grows, m + 8, M);
#pragma unroll
    for (int q = 0; q < 16; ++q) {
      detail::put_frag(p, row0, row1, c, n0 + q * 8, N, acc[4 * q], acc[4 * q + 1], acc[4 * q + 2],
                       acc[4 * q + 3]);
    }
  }
  detail::bulk_wait_all();  // kRedBulk: this thread's additions are complete before it exits
#else
  (void)p;
  (void)level_order;
  __trap();  // launched only where the sm_90a body exists (see launch_grouped_gemm_sm90)
#endif
}

// "auto" (default): this kernel where it applies; "mma": always the mma.sync kernel.
inline bool sm90_allowed() {
  const char* v = std::getenv("STOCHGATE_CUDA_GEMM");
  return v == nullptr || std::strcmp(v, "mma") != 0;
}

// The products with an M/N-major operand take this kernel unless STOCHGATE_SM90_MN=0 (for
// comparisons: they then run the mma.sync kernel, as before run 11).
inline bool sm90_mn_allowed() {
  const char* v = std::getenv("STOCHGATE_SM90_MN");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

template <typename T, typename OutT, bool A_KM, bool B_KM, int STAGES, int MIN_BLOCKS, int LAG>
void launch(const GroupedGemmParams<T, OutT, float>& p, cudaStream_t stream, int sms,
            bool level_order) {
  auto kernel = gemm_kernel<T, OutT, A_KM, B_KM, STAGES, MIN_BLOCKS, LAG>;
  constexpr int smem = kSmemBytes<STAGES>;
  // Not a stream operation: legal during CUDA graph capture.
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int64_t nt = (p.n + BN - 1) / BN;
  const int64_t most_tiles = static_cast<int64_t>(p.num_groups) * ((p.max_m + BM - 1) / BM) * nt;
  const int64_t blocks = std::min<int64_t>(most_tiles, static_cast<int64_t>(sms) * MIN_BLOCKS);
  kernel<<<static_cast<unsigned>(blocks), THREADS, smem, stream>>>(p, level_order);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sm90

template <typename T, typename OutT, bool AK, bool BK>
bool launch_grouped_gemm_sm90(const GroupedGemmParams<T, OutT, float>& p, cudaStream_t stream) {
#ifndef STOCHGATE_HAS_SM90A
  (void)p;
  (void)stream;
  return false;
#else
  if (!sm90::sm90_allowed()) return false;
  if (!(AK && BK) && !sm90::sm90_mn_allowed()) return false;
  // N is a fixed extent; K may be a group's pair count (the dweights).
  if (!p.a.vec || !p.b.vec || p.n == kFromCount || (p.k != kFromCount && p.k <= 0)) return false;
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major != 9 || prop->minor != 0) return false;
  if (p.num_groups <= 0 || p.max_m <= 0 || p.n <= 0) return true;  // nothing to compute
  // Measurement toggles (benchmarks/gpu_sm90.py), K-major products only: ring depth 3
  // (default: two blocks per SM, 97 KB of shared memory each) or 4 (one block per SM), the
  // wgmma lag (0, default, or 1: see gemm_kernel), and tile order by level (default) or by
  // group. The defaults were the fastest (benchmarks/GPU_NOTES.md: stages and order on an H100
  // in run 5, the lag on an H200 in run 6); the other layouts are built with them alone.
  const char* order = std::getenv("STOCHGATE_SM90_ORDER");
  const bool level_order = order == nullptr || std::strcmp(order, "group") != 0;
  const int sms = prop->multiProcessorCount;
  if constexpr (AK && BK) {
    const char* stages = std::getenv("STOCHGATE_SM90_STAGES");
    const char* lag = std::getenv("STOCHGATE_SM90_LAG");
    const bool lag0 = lag == nullptr || std::strcmp(lag, "1") != 0;
    if (stages != nullptr && std::strcmp(stages, "4") == 0) {
      if (lag0) {
        sm90::launch<T, OutT, AK, BK, 4, 1, 0>(p, stream, sms, level_order);
      } else {
        sm90::launch<T, OutT, AK, BK, 4, 1, 1>(p, stream, sms, level_order);
      }
      return true;
    }
    if (!lag0) {
      sm90::launch<T, OutT, AK, BK, 3, 2, 1>(p, stream, sms, level_order);
      return true;
    }
  }
  sm90::launch<T, OutT, AK, BK, 3, 2, 0>(p, stream, sms, level_order);
  return true;
#endif
}

// Explicit instantiations of one operand layout for the types the ops use.
#define STOCHGATE_SM90_INSTANTIATE(AK, BK)                                                       \
  template bool launch_grouped_gemm_sm90<c10::BFloat16, c10::BFloat16, AK, BK>(                  \
      const GroupedGemmParams<c10::BFloat16, c10::BFloat16, float>&, cudaStream_t);              \
  template bool launch_grouped_gemm_sm90<c10::BFloat16, float, AK, BK>(                          \
      const GroupedGemmParams<c10::BFloat16, float, float>&, cudaStream_t);                      \
  template bool launch_grouped_gemm_sm90<c10::Half, c10::Half, AK, BK>(                          \
      const GroupedGemmParams<c10::Half, c10::Half, float>&, cudaStream_t);                      \
  template bool launch_grouped_gemm_sm90<c10::Half, float, AK, BK>(                              \
      const GroupedGemmParams<c10::Half, float, float>&, cudaStream_t);

}  // namespace gated
}  // namespace stochgate
