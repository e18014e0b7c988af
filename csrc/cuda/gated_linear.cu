// CUDA kernels of the gated matmuls (issue 3): gated_linear, gated_input_linear and their
// backward ops. Nothing here synchronises with the host, so the ops can be captured in a CUDA
// graph: every buffer is sized by host-known worst cases (B * C pairs), and every kernel
// reads the pair counts it needs from device memory.
//
// Route (route() below), from gates (B, C):
//   1. transpose gates to chunk-major gate_t / mask_t (C, B) so that every later pass over one
//      chunk's rows reads contiguous memory;
//   2. count active rows per (chunk c, row tile t) of kRouteTile rows;
//   3. one exclusive scan over those counts in (c, t) order: pair index = position in the
//      chunk-major list of active pairs, and group_off[c] = first pair of chunk c;
//   4. scatter: rows[pair] = b, pair_gate[pair] = gates[b, c], pair_of[b, c] = pair or -1,
//      in increasing b inside each chunk (a stable counting sort: deterministic).
// gated_input_linear and dx also need per-row lists of active chunks (build_row_lists()).
//
// Compute: the grouped gathered GEMM of gated_linear.cuh, one group per chunk.
//   gated_linear        y[rows_c, chunk c] = g * (x[rows_c] @ W[chunk c].T + b[chunk c]),
//                       off chunks written as zeros by zero_inactive_kernel (beside the
//                       GEMM, on the current stream while the GEMM runs on a forked one).
//   gated_input_linear  per chunk the product h[rows_c, chunk c] @ W[:, c].T, added at the L2
//                       (bulk reductions of whole tile rows; fp32 atomics on GPUs older than
//                       sm_90) into an fp32 accumulator (B, M) (or slices of M), then
//                       y = bias + accumulator (row_reduce(); the order of the additions
//                       varies). Deterministic mode (torch.use_deterministic_algorithms):
//                       per chunk a (pairs, M) fp32 partial, then y[b] = bias + the partials
//                       of b's active chunks summed in chunk order. Both bound their buffers
//                       by slicing the M outputs; for small chunks (or when even one slice
//                       would be too big) a per-row kernel loops over the row's active chunks.
//   backward            dpre = g * dy on active pairs; dx like gated_input_linear with W;
//                       dW[chunk c] = dpre[rows_c, c].T @ x[rows_c] (K of the GEMM = the
//                       chunk's rows, gathered); dbias per unit in row order; dgates by a
//                       reduction of dy * pre (pre dense via cuBLAS for full_gate_grad, else
//                       recomputed on active pairs only).
//
// Status: tested on an H100 (benchmarks/GPU_NOTES.md, run 11: correct, racecheck clean). On
// Hopper every half/bfloat16 product runs the wgmma kernel of gated_linear_sm90.cuh (the
// forward GEMM at 45-50% of cuBLAS, the dweights ~30%), other GPUs the mma.sync kernel (~23% on
// an H100); the row reductions are bound by the L2's rate of adding gathered rows (~2 TB/s).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <initializer_list>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "../common/checks.h"
#include "gated_linear.cuh"

namespace stochgate {

namespace gated {
// The GEMM instantiations live in gated_linear_gemm_<dtype>.cu.
STOCHGATE_GATED_GEMM_LAYOUTS(extern, c10::BFloat16, c10::BFloat16)
STOCHGATE_GATED_GEMM_LAYOUTS(extern, c10::BFloat16, float)
STOCHGATE_GATED_GEMM_LAYOUTS(extern, c10::Half, c10::Half)
STOCHGATE_GATED_GEMM_LAYOUTS(extern, c10::Half, float)
STOCHGATE_GATED_GEMM_LAYOUTS(extern, float, float)
STOCHGATE_GATED_GEMM_LAYOUTS(extern, double, double)

int simt_config_from_env() {
  const char* v = std::getenv("STOCHGATE_CUDA_SIMT");
  if (v != nullptr && std::strcmp(v, "128k") == 0) return kSimt128K;
  if (v != nullptr && std::strcmp(v, "64") == 0) return kSimt64;
  return kSimtDefault;
}

int red_mode_from_env() {
  const char* v = std::getenv("STOCHGATE_CUDA_RED");
  if (v != nullptr && std::strcmp(v, "pairs") == 0) return kRedPairs;
  if (v != nullptr && std::strcmp(v, "quads") == 0) return kRedQuads;
  // Bulk reductions need sm_90; elsewhere the kernels would only stage the tile for nothing
  // (and the mma.sync kernel would ask for shared memory it does not use).
  return at::cuda::getCurrentDeviceProperties()->major >= 9 ? kRedBulk : kRedQuads;
}
}  // namespace gated

namespace {

using gated::acc_of;
using gated::GemmOperand;
using gated::GroupedGemmParams;
using gated::kFromCount;
using gated::OutRows;

constexpr int kThreads = 256;
constexpr int kRouteTile = 1024;  // rows per (chunk, tile) count: 4 per thread
constexpr int kScanThreads = 1024;
// Chunks narrower than this take the per-row path in the row reductions (gated_input_linear
// forward, dx): a 128-wide tensor-core tile would be mostly padding.
constexpr int64_t kMinGroupedChunk = 16;
// Upper bound of the fp32 buffer of the row reductions (partials, or the atomic accumulator).
constexpr int64_t kPartialBudgetBytes = int64_t{512} << 20;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned grid_1d(int64_t work, int64_t per_block = kThreads) {
  const int64_t blocks = ceil_div(work, per_block);
  STOCHGATE_CHECK(blocks <= 0x7fffffff, "stochgate gated matmul: tensor too large for the grid");
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

// ---------------------------------------------------------------------------------------
// Block-wide exclusive scan of one int per thread; *total gets the block's sum. Contains
// barriers: call from every thread of the block.
template <int THREADS>
__device__ int block_exclusive_scan(int v, int* total) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block size");
  constexpr int WARPS = THREADS / 32;
  __shared__ int warp_sums[WARPS];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inc = v;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int o = __shfl_up_sync(0xffffffffu, inc, d);
    if (lane >= d) inc += o;
  }
  if (lane == 31) warp_sums[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    int s = lane < WARPS ? warp_sums[lane] : 0;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int o = __shfl_up_sync(0xffffffffu, s, d);
      if (lane >= d) s += o;
    }
    if (lane < WARPS) warp_sums[lane] = s;  // inclusive prefix of warp sums
  }
  __syncthreads();
  const int before = warp > 0 ? warp_sums[warp - 1] : 0;
  *total = warp_sums[WARPS - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before + inc - v;
}

// ---------------------------------------------------------------------------------------
// Routing kernels.

// gates (B, C) -> gate_t (C, B) in the accumulation type and mask_t (C, B) = gates != 0
// (tested in the gates' own precision: a tiny float64 gate is on even if it rounds to 0).
// 32 x 32 tiles through shared memory so that both sides are coalesced.
template <typename G, typename AccT>
__global__ void transpose_gates_kernel(const G* __restrict__ gates, int64_t B, int64_t C,
                                       AccT* __restrict__ gate_t, uint8_t* __restrict__ mask_t) {
  using GAcc = at::opmath_type<G>;
  __shared__ AccT val[32][33];
  __shared__ uint8_t on[32][33];
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * 32;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * 32;
  const int tx = threadIdx.x, ty = threadIdx.y;  // 32 x 8
  for (int i = ty; i < 32; i += 8) {
    const int64_t b = b0 + i, c = c0 + tx;
    if (b < B && c < C) {
      const GAcc g = static_cast<GAcc>(gates[b * C + c]);
      val[i][tx] = static_cast<AccT>(g);
      on[i][tx] = g != GAcc(0);  // NaN counts as on, like the reference's gates != 0
    }
  }
  __syncthreads();
  for (int i = ty; i < 32; i += 8) {
    const int64_t c = c0 + i, b = b0 + tx;
    if (b < B && c < C) {
      gate_t[c * B + b] = val[tx][i];
      mask_t[c * B + b] = on[tx][i];
    }
  }
}

// tile_cnt[c * T + t] = number of active rows of chunk c among rows t*kRouteTile .. +kRouteTile.
__global__ void count_kernel(const uint8_t* __restrict__ mask_t, int64_t B, int64_t T,
                             int* __restrict__ tile_cnt) {
  const int64_t c = blockIdx.x, t = blockIdx.y;
  const int64_t r0 = t * kRouteTile + threadIdx.x * 4;
  int n = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) n += (r0 + i < B) ? (mask_t[c * B + r0 + i] != 0) : 0;
  int total;
  block_exclusive_scan<kThreads>(n, &total);
  if (threadIdx.x == 0) tile_cnt[c * T + t] = total;
}

// One block: out = exclusive scan of in[0..n) (chunk-major (c, t) counts), then
// group_off[c] = out[c * T] and group_off[C] = the number of active pairs.
__global__ void scan_kernel(const int* __restrict__ in, int* __restrict__ out, int64_t n,
                            int64_t C, int64_t T, int* __restrict__ group_off) {
  constexpr int ITEMS = 4;
  int carry = 0;
  for (int64_t base = 0; base < n; base += int64_t{kScanThreads} * ITEMS) {
    const int64_t i0 = base + threadIdx.x * ITEMS;
    int v[ITEMS];
    int sum = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      v[i] = i0 + i < n ? in[i0 + i] : 0;
      sum += v[i];
    }
    int total;
    int run = carry + block_exclusive_scan<kScanThreads>(sum, &total);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (i0 + i < n) out[i0 + i] = run;
      run += v[i];
    }
    carry += total;
  }
  __syncthreads();  // out[] written by other threads of this block is visible after this
  for (int64_t c = threadIdx.x; c <= C; c += kScanThreads) {
    group_off[c] = c < C ? (T > 0 ? out[c * T] : 0) : carry;
  }
}

// Stable counting sort of the active pairs: each thread owns 4 consecutive rows of the tile,
// a block scan gives every active row its rank inside (c, t), tile_off its global base.
template <typename AccT>
__global__ void scatter_kernel(const uint8_t* __restrict__ mask_t, const AccT* __restrict__ gate_t,
                               const int* __restrict__ tile_off, int64_t B, int64_t C, int64_t T,
                               int* __restrict__ rows, AccT* __restrict__ pair_gate,
                               int* __restrict__ pair_of) {
  const int64_t c = blockIdx.x, t = blockIdx.y;
  const int64_t r0 = t * kRouteTile + threadIdx.x * 4;
  bool on[4];
  int n = 0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    on[i] = r0 + i < B && mask_t[c * B + r0 + i] != 0;
    n += on[i];
  }
  int total;
  int pos = tile_off[c * T + t] + block_exclusive_scan<kThreads>(n, &total);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t b = r0 + i;
    if (b >= B) break;
    if (on[i]) {
      rows[pos] = static_cast<int>(b);
      pair_gate[pos] = gate_t[c * B + b];
      pair_of[b * C + c] = pos;
      ++pos;
    } else {
      pair_of[b * C + c] = -1;
    }
  }
}

// Per row b, its active chunks in increasing order: row_chunks[b * C + j], j < row_cnt[b].
// One warp per row, ballots over 32 chunks at a time.
__global__ void row_lists_kernel(const int* __restrict__ pair_of, int64_t B, int64_t C,
                                 int* __restrict__ row_cnt, int* __restrict__ row_chunks) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= B) return;  // whole warp
  int cnt = 0;
  for (int64_t c0 = 0; c0 < C; c0 += 32) {
    const int64_t c = c0 + lane;
    const bool on = c < C && pair_of[b * C + c] >= 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, on);
    if (on) row_chunks[b * C + cnt + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int>(c);
    cnt += __popc(ballot);
  }
  if (lane == 0) row_cnt[b] = cnt;
}

// The device-side routing of one call. All sizes are host-known worst cases.
struct Routing {
  int64_t B = 0, C = 0;
  at::Tensor gate_t, mask_t;  // (C, B)
  at::Tensor group_off;       // (C + 1,) int32
  at::Tensor rows;            // (B * C,) int32, first group_off[C] entries valid
  at::Tensor pair_gate;       // (B * C,) accumulation type
  at::Tensor pair_of;         // (B, C) int32, -1 where off
  at::Tensor row_cnt, row_chunks;  // (B,), (B, C): only after build_row_lists()
};

template <typename AccT>
void route_kernels(const at::Tensor& g, Routing& r, at::Tensor& tile_cnt, at::Tensor& tile_off,
                   int64_t T, cudaStream_t stream) {
  const int64_t B = r.B, C = r.C;
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "stochgate_route", [&] {
      const dim3 grid(grid_1d(B, 32), static_cast<unsigned>(ceil_div(C, 32)));
      transpose_gates_kernel<scalar_t, AccT><<<grid, dim3(32, 8), 0, stream>>>(
          g.const_data_ptr<scalar_t>(), B, C, r.gate_t.mutable_data_ptr<AccT>(),
          r.mask_t.mutable_data_ptr<uint8_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    count_kernel<<<dim3(static_cast<unsigned>(C), static_cast<unsigned>(T)), kThreads, 0, stream>>>(
        r.mask_t.const_data_ptr<uint8_t>(), B, T, tile_cnt.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  scan_kernel<<<1, kScanThreads, 0, stream>>>(tile_cnt.const_data_ptr<int>(),
                                              tile_off.mutable_data_ptr<int>(), C * T, C, T,
                                              r.group_off.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (B > 0) {
    scatter_kernel<AccT><<<dim3(static_cast<unsigned>(C), static_cast<unsigned>(T)), kThreads, 0, stream>>>(
        r.mask_t.const_data_ptr<uint8_t>(), r.gate_t.const_data_ptr<AccT>(),
        tile_off.const_data_ptr<int>(), B, C, T, r.rows.mutable_data_ptr<int>(),
        r.pair_gate.mutable_data_ptr<AccT>(), r.pair_of.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

Routing route(const at::Tensor& gates, at::ScalarType acc_type, cudaStream_t stream) {
  Routing r;
  r.B = gates.size(0);
  r.C = gates.size(1);
  const int64_t B = r.B, C = r.C;
  STOCHGATE_CHECK(B * C < (int64_t{1} << 31), "stochgate gated matmul: B * C = ", B * C,
                  " (gates ", gates.sizes(), ") exceeds the int32 pair index of the CUDA kernels");
  auto g = gates.contiguous();
  auto iopt = g.options().dtype(at::kInt);
  r.gate_t = at::empty({C, B}, g.options().dtype(acc_type));
  r.mask_t = at::empty({C, B}, g.options().dtype(at::kByte));
  r.group_off = at::empty({C + 1}, iopt);
  r.rows = at::empty({std::max<int64_t>(B * C, 1)}, iopt);
  r.pair_gate = at::empty({std::max<int64_t>(B * C, 1)}, g.options().dtype(acc_type));
  r.pair_of = at::empty({B, C}, iopt);
  const int64_t T = ceil_div(B, kRouteTile);
  auto tile_cnt = at::empty({std::max<int64_t>(C * T, 1)}, iopt);
  auto tile_off = at::empty({std::max<int64_t>(C * T, 1)}, iopt);
  STOCHGATE_CHECK(T <= 65535 && ceil_div(C, 32) <= 65535,
                  "stochgate gated matmul: gates ", gates.sizes(), " too large for the routing grid");

  if (acc_type == at::kDouble) {
    route_kernels<double>(g, r, tile_cnt, tile_off, T, stream);
  } else {
    route_kernels<float>(g, r, tile_cnt, tile_off, T, stream);
  }
  return r;
}

void build_row_lists(Routing& r, cudaStream_t stream) {
  if (r.row_cnt.defined()) return;
  auto iopt = r.pair_of.options();
  r.row_cnt = at::empty({std::max<int64_t>(r.B, 1)}, iopt);
  r.row_chunks = at::empty({std::max<int64_t>(r.B * r.C, 1)}, iopt);
  if (r.B == 0) return;
  row_lists_kernel<<<grid_1d(r.B, kThreads / 32), kThreads, 0, stream>>>(
      r.pair_of.const_data_ptr<int>(), r.B, r.C, r.row_cnt.mutable_data_ptr<int>(),
      r.row_chunks.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------
// Elementwise kernels over a dense (B, units) tensor whose units split into C chunks.

// Grid of the elementwise kernels over (B, units): x = blocks of kThreads * vec units, y =
// row groups (each thread walks rows y, y + gridDim.y, ...), so that a thread's chunk index is
// computed once, with no 64-bit division per element.
dim3 elementwise_grid(int64_t B, int64_t units, int vec) {
  STOCHGATE_CHECK(units < (int64_t{1} << 31), "stochgate gated matmul: ", units,
                  " units per row exceed the CUDA kernels' 32-bit unit index");
  const int64_t x = ceil_div(units, int64_t{kThreads} * vec);
  const int64_t y = std::max<int64_t>(1, std::min<int64_t>(B, std::max<int64_t>(1, 65536 / x)));
  STOCHGATE_CHECK(x <= 0x7fffffff, "stochgate gated matmul: tensor too large for the grid");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(std::min<int64_t>(y, 65535)));
}

// Elements per thread of the elementwise kernels: a 16-byte vector when every vector lies in
// one chunk of one row and the pointers allow it, else 1.
template <typename T>
int elementwise_vec(int64_t units, int64_t chunk, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(T);
  if (units % V != 0 || chunk % V != 0) return 1;
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return 1;
  }
  return V;
}

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// out[b, u] = 0 where chunk u / chunk of row b is off (the active entries are written by a
// GEMM): the "exact zeros" of gated-off chunks without a full memset. Thread: VEC units.
template <typename T, int VEC>
__global__ void zero_inactive_kernel(T* __restrict__ out, const uint8_t* __restrict__ mask_t,
                                     int64_t B, int64_t units, int64_t chunk) {
  const int64_t u = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (u >= units) return;
  const int64_t c = static_cast<unsigned>(u) / static_cast<unsigned>(chunk);
  const uint8_t* m = mask_t + c * B;
  Pack<T, VEC> zero;
#pragma unroll
  for (int e = 0; e < VEC; ++e) zero.v[e] = T(0);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    if (!m[b]) *reinterpret_cast<Pack<T, VEC>*>(out + b * units + u) = zero;
  }
}

// dpre[b, u] = T(g[b, c] * dy[b, u]) on active pairs only; off entries stay unwritten and are
// never read (every consumer walks the routed pairs).
template <typename T, typename AccT, int VEC>
__global__ void gated_grad_kernel(const T* __restrict__ dy, const uint8_t* __restrict__ mask_t,
                                  const AccT* __restrict__ gate_t, int64_t B, int64_t units,
                                  int64_t chunk, T* __restrict__ dpre) {
  const int64_t u = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (u >= units) return;
  const int64_t c = static_cast<unsigned>(u) / static_cast<unsigned>(chunk);
  const uint8_t* m = mask_t + c * B;
  const AccT* g = gate_t + c * B;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    if (m[b]) {
      const Pack<T, VEC> d = *reinterpret_cast<const Pack<T, VEC>*>(dy + b * units + u);
      Pack<T, VEC> o;
#pragma unroll
      for (int e = 0; e < VEC; ++e) o.v[e] = static_cast<T>(g[b] * static_cast<AccT>(d.v[e]));
      *reinterpret_cast<Pack<T, VEC>*>(dpre + b * units + u) = o;
    }
  }
}

template <typename T>
void zero_inactive(at::Tensor& out, const Routing& r, int64_t chunk, cudaStream_t stream) {
  const int64_t B = out.size(0), units = out.size(1);
  if (B == 0 || units == 0) return;
  T* o = out.mutable_data_ptr<T>();
  const uint8_t* m = r.mask_t.const_data_ptr<uint8_t>();
  constexpr int V = 16 / sizeof(T);
  if (elementwise_vec<T>(units, chunk, {o}) == V) {
    zero_inactive_kernel<T, V><<<elementwise_grid(B, units, V), kThreads, 0, stream>>>(o, m, B, units, chunk);
  } else {
    zero_inactive_kernel<T, 1><<<elementwise_grid(B, units, 1), kThreads, 0, stream>>>(o, m, B, units, chunk);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename AccT>
void gated_grad(const at::Tensor& dy, at::Tensor& dpre, const Routing& r, int64_t chunk, cudaStream_t stream) {
  const int64_t B = dy.size(0), units = dy.size(1);
  if (B == 0 || units == 0) return;
  const T* d = dy.const_data_ptr<T>();
  T* o = dpre.mutable_data_ptr<T>();
  const uint8_t* m = r.mask_t.const_data_ptr<uint8_t>();
  const AccT* g = r.gate_t.const_data_ptr<AccT>();
  constexpr int V = 16 / sizeof(T);
  if (elementwise_vec<T>(units, chunk, {d, o}) == V) {
    gated_grad_kernel<T, AccT, V><<<elementwise_grid(B, units, V), kThreads, 0, stream>>>(d, m, g, B, units, chunk, o);
  } else {
    gated_grad_kernel<T, AccT, 1><<<elementwise_grid(B, units, 1), kThreads, 0, stream>>>(d, m, g, B, units, chunk, o);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dbias[u] = sum over the active rows of u's chunk of dpre[row, u], in two deterministic
// passes: the chunk's pair list is cut into kBiasSegments equal parts (grid y), each summed
// in row order into partial[s, u]; then the parts are added in order.
constexpr int kBiasSegments = 64;

template <typename T, typename AccT>
__global__ void bias_grad_partial_kernel(const T* __restrict__ dpre, const int* __restrict__ group_off,
                                         const int* __restrict__ rows, int64_t units, int64_t chunk,
                                         AccT* __restrict__ partial) {
  const int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t s = blockIdx.y;
  if (u >= units) return;
  const int64_t c = u / chunk;
  const int64_t begin = group_off[c], n = group_off[c + 1] - begin;
  const int64_t lo = begin + n * s / kBiasSegments, hi = begin + n * (s + 1) / kBiasSegments;
  AccT acc = 0;
  for (int64_t i = lo; i < hi; ++i) acc += static_cast<AccT>(dpre[static_cast<int64_t>(rows[i]) * units + u]);
  partial[s * units + u] = acc;
}

template <typename T, typename AccT>
__global__ void bias_grad_finish_kernel(const AccT* __restrict__ partial, int64_t units,
                                        T* __restrict__ dbias) {
  const int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (u >= units) return;
  AccT acc = 0;
#pragma unroll 8
  for (int s = 0; s < kBiasSegments; ++s) acc += partial[s * units + u];
  dbias[u] = static_cast<T>(acc);
}

// ---------------------------------------------------------------------------------------
// Row reductions: out[b, o] = bias[o] + sum over b's active chunks c, in increasing c, of
// sum_{u < chunk} A[b, c*chunk + u] * Bmat_c[u, o]. Used by gated_input_linear (A = h,
// Bmat_c[u, o] = W[o, c*chunk + u]) and by dx of gated_linear (A = dpre, Bmat_c[u, o] =
// W[c*chunk + u, o]).

// Sum of the per-pair partials (pairs, ld) of b's active chunks, in chunk order. Each thread
// owns 4 consecutive columns of one row (one 16-byte load per partial when the row is whole
// vectors); `tpr` threads cover a row's columns, blockDim.x / tpr rows share a block.
template <typename T, typename AccT>
__global__ void segment_sum_kernel(const AccT* __restrict__ partial, int64_t ld, int64_t width,
                                   const int* __restrict__ row_cnt, const int* __restrict__ row_chunks,
                                   const int* __restrict__ pair_of, int64_t B, int64_t C, int tpr,
                                   const T* __restrict__ bias, T* __restrict__ out, int64_t ldo) {
  const int rows_per_block = blockDim.x / tpr;
  if (static_cast<int>(threadIdx.x) / tpr >= rows_per_block) return;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / tpr;
  const int64_t o = (static_cast<int64_t>(blockIdx.y) * tpr + threadIdx.x % tpr) * 4;
  if (b >= B || o >= width) return;
  const bool whole = o + 4 <= width && std::is_same_v<AccT, float> && ld % 4 == 0;
  AccT s[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) s[e] = (bias != nullptr && o + e < width) ? static_cast<AccT>(bias[o + e]) : AccT(0);
  const int n = row_cnt[b];
  for (int j = 0; j < n; ++j) {
    const AccT* src = partial + static_cast<int64_t>(pair_of[b * C + row_chunks[b * C + j]]) * ld + o;
    if constexpr (std::is_same_v<AccT, float>) {
      if (whole) {
        const float4 v = *reinterpret_cast<const float4*>(src);
        s[0] += v.x;
        s[1] += v.y;
        s[2] += v.z;
        s[3] += v.w;
        continue;
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (o + e < width) s[e] += src[e];
    }
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (o + e < width) out[b * ldo + o + e] = static_cast<T>(s[e]);
  }
}

// The per-row path: thread o of row b walks b's active chunks; Bn is N-major (units, ldb).
template <typename T, typename AccT>
__global__ void row_spmm_kernel(const T* __restrict__ A, int64_t lda, const T* __restrict__ Bn,
                                int64_t ldb, int64_t width, int64_t chunk,
                                const int* __restrict__ row_cnt, const int* __restrict__ row_chunks,
                                int64_t C, const T* __restrict__ bias, T* __restrict__ out, int64_t ldo) {
  const int64_t b = blockIdx.x;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (o >= width) return;
  AccT s = bias != nullptr ? static_cast<AccT>(bias[o]) : AccT(0);
  const int n = row_cnt[b];
  for (int j = 0; j < n; ++j) {
    const int64_t u0 = static_cast<int64_t>(row_chunks[b * C + j]) * chunk;
    for (int64_t u = u0; u < u0 + chunk; ++u) {
      s += static_cast<AccT>(A[b * lda + u]) * static_cast<AccT>(Bn[u * ldb + o]);
    }
  }
  out[b * ldo + o] = static_cast<T>(s);
}

// 16-byte vector loads need an aligned base, and every line/group start and the extent of
// the contiguous dimension must be whole vectors.
template <typename T>
bool vec_ok(const T* ptr, int64_t ld, int64_t group_stride, int64_t pos_extent) {
  constexpr int64_t V = 16 / sizeof(T);
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && ld % V == 0 && group_stride % V == 0 &&
         pos_extent % V == 0;
}

template <typename T>
GemmOperand<T> operand(const T* ptr, int64_t ld, int64_t group_stride, bool gather,
                       int64_t pos_extent) {
  GemmOperand<T> op;
  op.ptr = ptr;
  op.ld = ld;
  op.group_stride = group_stride;
  op.gather = gather;
  op.vec = vec_ok(ptr, ld, group_stride, pos_extent);
  return op;
}

template <typename T, typename OutT>
GroupedGemmParams<T, OutT, acc_of<T>> routed_params(const Routing& r) {
  GroupedGemmParams<T, OutT, acc_of<T>> p;
  p.num_groups = static_cast<int>(r.C);
  p.group_off = r.group_off.const_data_ptr<int>();
  p.rows = r.rows.const_data_ptr<int>();
  p.pair_gate = r.pair_gate.const_data_ptr<acc_of<T>>();
  return p;
}

// The atomic row reduction's last step for one slice of columns: out[b, o] = bias[o] +
// acc[b, o], and acc zeroed again when `clear` (the next slice adds into it). Each thread owns
// 4 consecutive columns of one row: one 16-byte load (and store) of acc and one store of the
// 4 outputs when they are whole vectors (`vec_out`: out and ldo aligned to 4 elements).
template <typename T>
__global__ void finish_sum_kernel(float* __restrict__ acc, int64_t lda, int64_t width, int64_t B,
                                  const T* __restrict__ bias, T* __restrict__ out, int64_t ldo,
                                  bool clear, bool vec_out) {
  const int64_t quads = (width + 3) / 4;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * quads) return;
  const int64_t b = i / quads, o = (i % quads) * 4;
  float* src = acc + b * lda + o;
  const bool whole = o + 4 <= width;
  float v[4] = {0.f, 0.f, 0.f, 0.f};
  if (whole && lda % 4 == 0) {
    const float4 q = *reinterpret_cast<const float4*>(src);
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
    if (clear) *reinterpret_cast<float4*>(src) = make_float4(0.f, 0.f, 0.f, 0.f);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (o + e < width) {
        v[e] = src[e];
        if (clear) src[e] = 0.f;
      }
    }
  }
  struct alignas(4 * sizeof(T)) Four {
    T v[4];
  } four;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float bv = (bias != nullptr && o + e < width) ? static_cast<float>(bias[o + e]) : 0.f;
    four.v[e] = static_cast<T>(v[e] + bv);
  }
  T* dst = out + b * ldo + o;
  if (whole && vec_out) {
    *reinterpret_cast<Four*>(dst) = four;
    return;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (o + e < width) dst[e] = four.v[e];
  }
}

// How the row reductions sum a row's chunks. Default: the per-chunk products are added by
// fp32 atomics into an accumulator of (B, slice) columns, then converted once -- the order of
// the additions varies from run to run, so the last bits can. The accumulator holds every
// column when it fits the same 512 MiB budget as the partials (B = 16384, M = 4096: 268 MB):
// on an H100 one slice was faster than slices that stay in L2 (benchmarks/GPU_NOTES.md, run 8).
// Deterministic (torch.use_deterministic_algorithms(True), or STOCHGATE_CUDA_REDUCE=partials
// for comparisons): one fp32 partial row per active pair, summed in chunk order.
bool atomic_row_reduce() {
  if (at::globalContext().deterministicAlgorithms()) return false;
  const char* v = std::getenv("STOCHGATE_CUDA_REDUCE");
  return v == nullptr || std::strcmp(v, "partials") != 0;
}

// Accumulator budget of the atomic path; STOCHGATE_CUDA_REDUCE_BYTES overrides it (for
// measurements and tests: benchmarks/gpu_sm90.py, tests/test_gated_linear_cuda.py).
int64_t atomic_budget_bytes() {
  const char* v = std::getenv("STOCHGATE_CUDA_REDUCE_BYTES");
  if (v != nullptr) {
    const long long n = std::atoll(v);
    if (n > 0) return static_cast<int64_t>(n);
  }
  return kPartialBudgetBytes;
}

// out (B, width), contiguous. A (B, units) contiguous; W is the weight tensor: if
// w_rows_are_outputs, W is (width, units) (gated_input_linear: Bmat_c[u, o] = W[o, c*chunk+u],
// K-major), else W is (units, width) (dx: Bmat_c[u, o] = W[c*chunk + u, o], N-major).
template <typename T>
void row_reduce(const at::Tensor& A, const at::Tensor& W, bool w_rows_are_outputs,
                const T* bias, at::Tensor& out, Routing& r, int64_t chunk, cudaStream_t stream) {
  using AccT = acc_of<T>;
  const int64_t B = r.B, C = r.C, units = A.size(1), width = out.size(1);
  if (B == 0 || width == 0) return;
  constexpr int64_t kTileN = 128;  // slice widths are whole N tiles of either GEMM config
  const T* w = W.const_data_ptr<T>();
  // The grouped GEMM of the columns o0 .. o0 + ns - 1 into `dst` (rows per out_rows, ld ldd).
  auto slice_gemm = [&](AccT* dst, int64_t ldd, OutRows out_rows, int64_t o0, int64_t ns) {
    auto p = routed_params<T, AccT>(r);
    // A[m, k] = A[rows[seg + m], c*chunk + k]
    p.a = operand<T>(A.const_data_ptr<T>(), units, chunk, /*gather=*/true, chunk);
    p.m = kFromCount;
    p.n = ns;
    p.k = chunk;
    p.max_m = B;
    p.max_n = ns;
    p.out = dst;
    p.ldo = ldd;
    p.out_rows = out_rows;
    if (w_rows_are_outputs) {
      // B[k, n] = W[o0 + n, c*chunk + k]: K-major, lines n.
      p.b = operand<T>(w + o0 * units, units, chunk, false, chunk);
      gated::launch_grouped_gemm<T, AccT, true, true>(p, stream);
    } else {
      // B[k, n] = W[c*chunk + k, o0 + n]: N-major, lines k.
      p.b = operand<T>(w + o0, width, chunk * width, false, ns);
      gated::launch_grouped_gemm<T, AccT, true, false>(p, stream);
    }
  };
  if constexpr (std::is_same_v<AccT, float>) {
    const int64_t row_bytes = B * static_cast<int64_t>(sizeof(float));
    if (chunk >= kMinGroupedChunk && atomic_row_reduce() &&
        row_bytes * std::min(kTileN, width) <= kPartialBudgetBytes) {
      const int64_t slice =
          std::min(width, std::max<int64_t>(kTileN, atomic_budget_bytes() / row_bytes / kTileN * kTileN));
      at::Tensor acc = at::zeros({B, slice}, A.options().dtype(at::kFloat));
      for (int64_t o0 = 0; o0 < width; o0 += slice) {
        const int64_t ns = std::min(slice, width - o0);
        slice_gemm(acc.mutable_data_ptr<float>(), slice, OutRows::kGatheredAdd, o0, ns);
        finish_sum_kernel<T><<<grid_1d(B * ceil_div(ns, 4)), kThreads, 0, stream>>>(
            acc.mutable_data_ptr<float>(), slice, ns, B, bias != nullptr ? bias + o0 : nullptr,
            out.mutable_data_ptr<T>() + o0, width, /*clear=*/o0 + slice < width,
            /*vec_out=*/reinterpret_cast<uintptr_t>(out.const_data_ptr<T>() + o0) % (4 * sizeof(T)) == 0 &&
                width % 4 == 0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return;
    }
  }
  build_row_lists(r, stream);
  const int64_t pairs_max = B * C;
  const int64_t col_bytes = pairs_max * static_cast<int64_t>(sizeof(AccT));
  const bool grouped = chunk >= kMinGroupedChunk && col_bytes * std::min(kTileN, width) <= kPartialBudgetBytes;
  const dim3 seg_grid(static_cast<unsigned>(B), static_cast<unsigned>(ceil_div(width, kThreads)));
  STOCHGATE_CHECK(B <= 0x7fffffff && ceil_div(width, kThreads) <= 65535,
                  "stochgate gated matmul: output (", B, ", ", width, ") too large for the grid");
  if (!grouped) {
    at::Tensor Bn = w_rows_are_outputs ? W.t().contiguous() : W;  // (units, width)
    row_spmm_kernel<T, AccT><<<seg_grid, kThreads, 0, stream>>>(
        A.const_data_ptr<T>(), units, Bn.const_data_ptr<T>(), width, width, chunk,
        r.row_cnt.const_data_ptr<int>(), r.row_chunks.const_data_ptr<int>(), C, bias,
        out.mutable_data_ptr<T>(), width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  int64_t slice = std::min(width, std::max<int64_t>(kTileN, kPartialBudgetBytes / col_bytes / kTileN * kTileN));
  at::Tensor partial = at::empty({pairs_max, slice}, A.options().dtype(c10::CppTypeToScalarType<AccT>::value));
  for (int64_t o0 = 0; o0 < width; o0 += slice) {
    const int64_t ns = std::min(slice, width - o0);
    slice_gemm(partial.mutable_data_ptr<AccT>(), slice, OutRows::kPair, o0, ns);
    // 4 columns per thread; a row's threads rounded up to whole warps (at most a block).
    const int64_t quads = ceil_div(ns, 4);
    int tpr = 32;
    while (tpr < kThreads && tpr < quads) tpr *= 2;
    const int64_t rows_per_block = kThreads / tpr;
    const dim3 grid(static_cast<unsigned>(ceil_div(B, rows_per_block)), static_cast<unsigned>(ceil_div(quads, tpr)));
    segment_sum_kernel<T, AccT><<<grid, kThreads, 0, stream>>>(
        partial.const_data_ptr<AccT>(), slice, ns, r.row_cnt.const_data_ptr<int>(),
        r.row_chunks.const_data_ptr<int>(), r.pair_of.const_data_ptr<int>(), B, C, tpr,
        bias != nullptr ? bias + o0 : nullptr, out.mutable_data_ptr<T>() + o0, width);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// y[b, chunk c] = (scale ? g : 1) * (x[b] @ W[chunk c].T + bias[chunk c]) on active pairs and 0
// elsewhere. scale = false gives the masked pre-activation (the "active" gate gradient).
//
// The zeros of the off chunks (zero_inactive: memory-bound) and the grouped GEMM (compute-bound,
// a persistent grid whose last wave leaves SMs idle) touch disjoint parts of y. By default
// (STOCHGATE_CUDA_ZERO=serial for comparisons) they overlap: the GEMM goes to a high-priority
// stream forked from the current one, the zeros stay on the current stream, and the current
// stream then waits for the GEMM. The GEMM's blocks are placed first; the zero-fill's short
// blocks take the SMs its finished blocks leave. Events only, no host synchronisation: CUDA
// graph capture records the fork and the join.
bool overlap_zero_fill() {
  const char* v = std::getenv("STOCHGATE_CUDA_ZERO");
  return v == nullptr || std::strcmp(v, "serial") != 0;
}

template <typename T>
void gated_linear_into(const at::Tensor& x, const at::Tensor& w, const T* bias, at::Tensor& y,
                       const Routing& r, int64_t chunk, bool scale, cudaStream_t stream) {
  const int64_t B = x.size(0), K = x.size(1), N = w.size(0);
  if (B == 0 || N == 0) return;
  const at::cuda::CUDAStream current = at::cuda::getCurrentCUDAStream(x.device().index());
  const bool overlap = overlap_zero_fill() && current.stream() == stream;
  if (!overlap) zero_inactive<T>(y, r, chunk, stream);
  auto p = routed_params<T, T>(r);
  p.a = operand<T>(x.const_data_ptr<T>(), K, 0, /*gather=*/true, K);  // x[rows[seg+m], k]
  p.b = operand<T>(w.const_data_ptr<T>(), K, chunk * K, false, K);    // W[c*chunk + n, k]
  p.m = kFromCount;
  p.n = chunk;
  p.k = K;
  p.max_m = B;
  p.max_n = chunk;
  p.out = y.mutable_data_ptr<T>();
  p.ldo = N;
  p.out_group_stride = chunk;
  p.out_rows = OutRows::kGathered;
  p.bias = bias;
  p.bias_group_stride = chunk;
  p.scale_by_gate = scale;
  if (!overlap) {
    gated::launch_grouped_gemm<T, T, true, true>(p, stream);
    return;
  }
  const at::cuda::CUDAStream gemm_stream = at::cuda::getStreamFromPool(/*isHighPriority=*/true, current.device_index());
  at::cuda::CUDAEvent routed, computed;
  routed.record(current);
  routed.block(gemm_stream);
  gated::launch_grouped_gemm<T, T, true, true>(p, gemm_stream.stream());
  zero_inactive<T>(y, r, chunk, stream);
  computed.record(gemm_stream);
  computed.block(current);
}

at::Tensor empty0(const at::Tensor& like) { return at::empty({0}, like.options()); }

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// dgates[b, c] = sum_u dy[b, c*chunk + u] * pre[b, c*chunk + u], in the accumulation type.
at::Tensor gate_grad_from_pre(const at::Tensor& dy, const at::Tensor& pre, int64_t C,
                              at::ScalarType gates_type) {
  const auto acc = acc_type_of(dy.scalar_type());
  const int64_t B = dy.size(0), N = dy.size(1);
  auto prod = dy.to(acc) * pre.to(acc);
  return prod.view({B, C, N / C}).sum(-1).to(gates_type).contiguous();
}

// ---------------------------------------------------------------------------------------
// The ops.

// full_gate_grad only steers autograd (see the schema); the forward ignores it.
at::Tensor gated_linear_cuda(const at::Tensor& x_in, const at::Tensor& w_in,
                             const c10::optional<at::Tensor>& bias_in, const at::Tensor& gates,
                             bool /*full_gate_grad*/) {
  const char* op = "stochgate::gated_linear";
  check_gated_inputs(op, x_in, "x", w_in, bias_in, gates, /*gate_output_units=*/true);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), N = w_in.size(0), C = gates.size(1);
  const int64_t chunk = N / C;
  auto x = x_in.contiguous();
  auto w = w_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  auto y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  Routing r = route(gates, acc_type_of(x.scalar_type()), stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_linear_cuda", [&] {
    gated_linear_into<scalar_t>(x, w, has_bias ? bias.const_data_ptr<scalar_t>() : nullptr, y, r,
                                chunk, /*scale=*/true, stream);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& w_in,
    const c10::optional<at::Tensor>& bias_in, const at::Tensor& gates,
    std::array<bool, 4> output_mask, bool full_gate_grad) {
  const char* op = "stochgate::gated_linear_backward";
  check_gated_inputs(op, x_in, "x", w_in, bias_in, gates, /*gate_output_units=*/true);
  const int64_t B = x_in.size(0), K = x_in.size(1), N = w_in.size(0), C = gates.size(1);
  const int64_t chunk = N / C;
  check_gated_grad(op, grad_y_in, x_in, "x", N);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const bool need_dx = output_mask[0], need_dw = output_mask[1];
  const bool need_db = output_mask[2] && has_bias, need_dg = output_mask[3];

  auto x = x_in.contiguous();
  auto w = w_in.contiguous();
  auto dy = grad_y_in.contiguous();
  at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();

  at::Tensor dx = need_dx ? at::empty({B, K}, x.options()) : empty0(x_in);
  at::Tensor dw = need_dw ? at::empty({N, K}, x.options()) : empty0(x_in);
  at::Tensor db = need_db ? at::empty({N}, x.options()) : empty0(x_in);
  at::Tensor dg = need_dg ? at::empty({B, C}, gates.options()) : empty0(gates);
  if (B == 0 || N == 0) {
    if (need_dw) dw.zero_();
    if (need_db) db.zero_();
    if (need_dx) dx.zero_();
    if (need_dg) dg.zero_();
    return {dx, dw, db, dg};
  }
  if (!(need_dx || need_dw || need_db || need_dg)) return {dx, dw, db, dg};

  auto stream = at::cuda::getCurrentCUDAStream().stream();
  Routing r = route(gates, acc_type_of(x.scalar_type()), stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_linear_backward_cuda", [&] {
    using T = scalar_t;
    using AccT = acc_of<T>;
    at::Tensor dpre;
    if (need_dx || need_dw || need_db) {
      dpre = at::empty({B, N}, x.options());
      gated_grad<T, AccT>(dy, dpre, r, chunk, stream);
    }
    if (need_dx && K > 0) {
      // dx[b] = sum over active c of dpre[b, chunk c] @ W[chunk c, :]
      row_reduce<T>(dpre, w, /*w_rows_are_outputs=*/false, nullptr, dx, r, chunk, stream);
    }
    if (need_dw && K > 0) {
      // dW[c*chunk + m, n] = sum_i dpre[rows[seg+i], c*chunk + m] * x[rows[seg+i], n]: the
      // GEMM's K runs over the chunk's pairs, both operands gathered along it.
      auto p = routed_params<T, T>(r);
      p.a = operand<T>(dpre.const_data_ptr<T>(), N, chunk, /*gather=*/true, chunk);  // M-major
      p.b = operand<T>(x.const_data_ptr<T>(), K, 0, /*gather=*/true, K);             // N-major
      p.m = chunk;
      p.n = K;
      p.k = kFromCount;
      p.max_m = chunk;
      p.max_n = K;
      p.out = dw.mutable_data_ptr<T>();
      p.ldo = K;
      p.out_group_stride = chunk * K;
      p.out_rows = OutRows::kPlain;
      gated::launch_grouped_gemm<T, T, false, false>(p, stream);
    }
    if (need_db) {
      at::Tensor partial = at::empty({kBiasSegments, N}, x.options().dtype(acc_type_of(x.scalar_type())));
      bias_grad_partial_kernel<T, AccT><<<dim3(grid_1d(N), kBiasSegments), kThreads, 0, stream>>>(
          dpre.const_data_ptr<T>(), r.group_off.const_data_ptr<int>(), r.rows.const_data_ptr<int>(), N,
          chunk, partial.mutable_data_ptr<AccT>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      bias_grad_finish_kernel<T, AccT><<<grid_1d(N), kThreads, 0, stream>>>(
          partial.const_data_ptr<AccT>(), N, db.mutable_data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_dg) {
      at::Tensor pre;
      if (full_gate_grad) {
        // Every pair needs its pre-activation: one dense cuBLAS product.
        pre = has_bias ? at::addmm(bias, x, w.t()) : at::mm(x, w.t());
      } else {
        pre = at::empty({B, N}, x.options());
        gated_linear_into<T>(x, w, has_bias ? bias.const_data_ptr<T>() : nullptr, pre, r, chunk,
                             /*scale=*/false, stream);
      }
      dg.copy_(gate_grad_from_pre(dy, pre, C, gates.scalar_type()));
    }
  });
  if (need_dw && K == 0) dw.zero_();
  return {dx, dw, db, dg};
}

at::Tensor gated_input_linear_cuda(const at::Tensor& h_in, const at::Tensor& w_in,
                                   const c10::optional<at::Tensor>& bias_in,
                                   const at::Tensor& gates) {
  const char* op = "stochgate::gated_input_linear";
  check_gated_inputs(op, h_in, "h", w_in, bias_in, gates, /*gate_output_units=*/false);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const int64_t B = h_in.size(0), N = h_in.size(1), M = w_in.size(0), C = gates.size(1);
  const int64_t chunk = N / C;
  auto h = h_in.contiguous();
  auto w = w_in.contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  auto y = at::empty({B, M}, h.options());
  if (B == 0 || M == 0) return y;
  if (N == 0) {  // no input units: y = bias
    if (has_bias) y.copy_(bias.expand({B, M})); else y.zero_();
    return y;
  }
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  Routing r = route(gates, acc_type_of(h.scalar_type()), stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gated_input_linear_cuda", [&] {
    row_reduce<scalar_t>(h, w, /*w_rows_are_outputs=*/true,
                         has_bias ? bias.const_data_ptr<scalar_t>() : nullptr, y, r, chunk, stream);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_input_linear_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& h_in, const at::Tensor& w_in,
    const at::Tensor& gates, std::array<bool, 3> output_mask) {
  const char* op = "stochgate::gated_input_linear_backward";
  check_gated_inputs(op, h_in, "h", w_in, c10::nullopt, gates, /*gate_output_units=*/false);
  const int64_t B = h_in.size(0), N = h_in.size(1), M = w_in.size(0), C = gates.size(1);
  const int64_t chunk = N / C;
  check_gated_grad(op, grad_y_in, h_in, "h", M);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const bool need_dh = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2];
  auto h = h_in.contiguous();
  auto w = w_in.contiguous();
  auto dy = grad_y_in.contiguous();
  at::Tensor dh = need_dh ? at::empty({B, N}, h.options()) : empty0(h_in);
  at::Tensor dw = need_dw ? at::empty({M, N}, h.options()) : empty0(h_in);
  at::Tensor db = need_db ? dy.sum(0) : empty0(h_in);
  if (B == 0 || N == 0 || M == 0) {
    if (need_dh) dh.zero_();
    if (need_dw) dw.zero_();
    return {dh, dw, db};
  }
  if (!(need_dh || need_dw)) return {dh, dw, db};
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  Routing r = route(gates, acc_type_of(h.scalar_type()), stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "gated_input_linear_backward_cuda", [&] {
    using T = scalar_t;
    if (need_dh) {
      // dh[b, c*chunk + n] = dy[b] @ W[:, c*chunk + n] on active pairs, 0 elsewhere.
      zero_inactive<T>(dh, r, chunk, stream);
      auto p = routed_params<T, T>(r);
      p.a = operand<T>(dy.const_data_ptr<T>(), M, 0, /*gather=*/true, M);  // dy[rows[seg+m], k]
      p.b = operand<T>(w.const_data_ptr<T>(), N, chunk, false, chunk);    // W[k, c*chunk + n]
      p.m = kFromCount;
      p.n = chunk;
      p.k = M;
      p.max_m = B;
      p.max_n = chunk;
      p.out = dh.mutable_data_ptr<T>();
      p.ldo = N;
      p.out_group_stride = chunk;
      p.out_rows = OutRows::kGathered;
      gated::launch_grouped_gemm<T, T, true, false>(p, stream);
    }
    if (need_dw) {
      // dW[m, c*chunk + n] = sum_i dy[rows[seg+i], m] * h[rows[seg+i], c*chunk + n].
      auto p = routed_params<T, T>(r);
      p.a = operand<T>(dy.const_data_ptr<T>(), M, 0, /*gather=*/true, M);         // M-major
      p.b = operand<T>(h.const_data_ptr<T>(), N, chunk, /*gather=*/true, chunk);  // N-major
      p.m = M;
      p.n = chunk;
      p.k = kFromCount;
      p.max_m = M;
      p.max_n = chunk;
      p.out = dw.mutable_data_ptr<T>();
      p.ldo = N;
      p.out_group_stride = chunk;
      p.out_rows = OutRows::kPlain;
      gated::launch_grouped_gemm<T, T, false, false>(p, stream);
    }
  });
  return {dh, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(stochgate, CUDA, m) {
  m.impl("gated_linear", &gated_linear_cuda);
  m.impl("gated_linear_backward", &gated_linear_backward_cuda);
  m.impl("gated_input_linear", &gated_input_linear_cuda);
  m.impl("gated_input_linear_backward", &gated_input_linear_backward_cuda);
}

}  // namespace stochgate
