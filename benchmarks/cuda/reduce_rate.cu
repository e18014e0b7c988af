// How fast can an H100 add gathered fp32 rows into an accumulator? A stand-alone measurement
// (no stochgate code) of the cross-chunk sum that gated_input_linear's forward and
// gated_linear's dx perform on CUDA, with the access pattern of the grouped GEMM's epilogue
// and nothing else: random gates at density d over B = 16384 rows and C = 32 chunks, each
// chunk's active rows sorted (as routing sorts them), tiles of 128 rows x 128 columns walked
// M tile by M tile across the chunks, every active (row, chunk) pair adding one row of
// M = 4096 fp32 values into acc[row] (B x M, 268 MB). Ways of adding, one kernel each:
//
//   pairs  red.global.add.v2.f32, lanes laid out as an mma / wgmma accumulator fragment
//          (what the kernels did up to run 9)
//   quads  red.global.add.v4.f32, the fragment's lane pairs trading halves (STOCHGATE_CUDA_RED=quads)
//   rows   red.global.add.v4.f32, a warp covering 512 contiguous bytes of one row per instruction
//   bulk   the tile staged in shared memory, one 512-byte cp.reduce.async.bulk per row
//          (STOCHGATE_CUDA_RED=bulk)
//   store  plain 8-byte stores of the same tiles into a per-pair buffer (the partial rows of the
//          deterministic path: no reduction, the write traffic alone)
//
// Prints the median time of 7 launches and the rate in GB/s of fp32 values added (pairs x M x 4
// bytes / time), and checks every accumulator element against the row's active-chunk count.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/reduce_rate benchmarks/cuda/reduce_rate.cu && /tmp/reduce_rate
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#define CHECK(x)                                                                   \
  do {                                                                             \
    cudaError_t e = (x);                                                           \
    if (e != cudaSuccess) {                                                        \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

constexpr int kB = 16384, kC = 32, kM = 4096, kTile = 128, kStageRow = 128 * 4 + 32;

struct Tiles {
  const int* rows;        // (pairs,) grouped by chunk, sorted within a chunk
  const int* tile_start;  // first pair of each row tile
  const int* tile_cnt;    // its row count (<= 128)
  float* out;
  int64_t ld;
};

__device__ __forceinline__ void red2(float* p, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(__cvta_generic_to_global(p)), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ void red4(float* p, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p)), "f"(a),
               "f"(b), "f"(c), "f"(d)
               : "memory");
}

// Block = (row tile, column tile): blockIdx.x / (kM / 128) and % (kM / 128).
template <int MODE>
__global__ void __launch_bounds__(256) add_tiles(Tiles t) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const int tile = blockIdx.x / (kM / kTile), n0 = blockIdx.x % (kM / kTile) * kTile;
  const int start = t.tile_start[tile], cnt = t.tile_cnt[tile];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int lr = (warp / 4) * 64 + (warp % 4) * 16 + lane / 4;  // fragment row of this lane
  auto dst_row = [&](int r) -> float* {
    if (r >= cnt) return nullptr;
    const int64_t row = MODE == 4 ? start + r : t.rows[start + r];
    return t.out + row * t.ld + n0;
  };
  if constexpr (MODE == 0 || MODE == 4) {  // pairs (red.v2) / store (st.v2 into per-pair rows)
    for (int h = 0; h < 2; ++h) {
      float* d = dst_row(lr + 8 * h);
      if (d == nullptr) continue;
#pragma unroll
      for (int q = 0; q < 16; ++q) {
        const int n = q * 8 + (lane % 4) * 2;
        if constexpr (MODE == 0) {
          red2(d + n, 1.f, 1.f);
        } else {
          *reinterpret_cast<float2*>(d + n) = make_float2(1.f, 1.f);
        }
      }
    }
  } else if constexpr (MODE == 1) {  // quads: lane pairs trade halves (the shuffle is not timed)
    float* d = dst_row(lr + 8 * (lane & 1));
    if (d != nullptr) {
#pragma unroll
      for (int q = 0; q < 16; ++q) red4(d + q * 8 + 4 * ((lane % 4) >> 1), 1.f, 1.f, 1.f, 1.f);
    }
  } else if constexpr (MODE == 2) {  // rows: 16 rows per warp, 512 contiguous bytes per instruction
    for (int i = 0; i < 16; ++i) {
      float* d = dst_row(warp * 16 + i);
      if (d != nullptr) red4(d + lane * 4, 1.f, 1.f, 1.f, 1.f);
    }
  } else {  // bulk
    const uint32_t smem = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int q = 0; q < 16; ++q) {
        const int n = q * 8 + (lane % 4) * 2;
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(smem + (lr + 8 * h) * kStageRow + n * 4), "f"(1.f),
                     "f"(1.f)
                     : "memory");
      }
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    if (tid < kTile) {
      float* d = dst_row(tid);
      if (d != nullptr) {
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], 512;" ::"l"(
                         __cvta_generic_to_global(d)),
                     "r"(smem + tid * kStageRow)
                     : "memory");
      }
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    }
  }
}

int main() {
  const char* names[] = {"pairs (red.v2, fragment)", "quads (red.v4, fragment)", "rows (red.v4, 512 B/warp)",
                         "bulk (cp.reduce.async.bulk)", "store (st.v2, per-pair rows)"};
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs, L2 %d MB; B = %d, C = %d, M = %d, tiles 128 x 128\n", prop.name, prop.multiProcessorCount,
              prop.l2CacheSize >> 20, kB, kC, kM);
  float* acc;
  CHECK(cudaMalloc(&acc, sizeof(float) * kB * kM));
  for (double d : {0.1, 0.25}) {
    std::mt19937 gen(1234);
    std::bernoulli_distribution on(d);
    std::vector<std::vector<int>> lists(kC);
    std::vector<int> per_row(kB, 0);
    for (int b = 0; b < kB; ++b)
      for (int c = 0; c < kC; ++c)
        if (on(gen)) lists[c].push_back(b), ++per_row[b];
    std::vector<int> rows, off(kC + 1, 0);
    for (int c = 0; c < kC; ++c) {
      off[c] = static_cast<int>(rows.size());
      rows.insert(rows.end(), lists[c].begin(), lists[c].end());
    }
    off[kC] = static_cast<int>(rows.size());
    std::vector<int> ts, tc;  // M tile by M tile across the chunks (the kernels' level order)
    for (int level = 0;; ++level) {
      bool any = false;
      for (int c = 0; c < kC; ++c) {
        const int n = off[c + 1] - off[c];
        if (level * kTile < n) {
          ts.push_back(off[c] + level * kTile);
          tc.push_back(std::min(kTile, n - level * kTile));
          any = true;
        }
      }
      if (!any) break;
    }
    const int64_t pairs = static_cast<int64_t>(rows.size());
    int *d_rows, *d_ts, *d_tc;
    float* part;
    CHECK(cudaMalloc(&d_rows, sizeof(int) * pairs));
    CHECK(cudaMalloc(&d_ts, sizeof(int) * ts.size()));
    CHECK(cudaMalloc(&d_tc, sizeof(int) * tc.size()));
    CHECK(cudaMalloc(&part, sizeof(float) * pairs * kM));
    CHECK(cudaMemcpy(d_rows, rows.data(), sizeof(int) * pairs, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d_ts, ts.data(), sizeof(int) * ts.size(), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(d_tc, tc.data(), sizeof(int) * tc.size(), cudaMemcpyHostToDevice));
    const double gb = static_cast<double>(pairs) * kM * 4 / 1e9;
    std::printf("\ndensity %.2f: %lld pairs, %zu row tiles, %.0f MB of fp32 values\n", d, static_cast<long long>(pairs),
                ts.size(), gb * 1e3);
    const unsigned grid = static_cast<unsigned>(ts.size() * (kM / kTile));
    const int smem_bulk = kTile * kStageRow;
    CHECK(cudaFuncSetAttribute(add_tiles<3>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bulk));
    for (int mode = 0; mode < 5; ++mode) {
      Tiles t{d_rows, d_ts, d_tc, mode == 4 ? part : acc, kM};
      std::vector<float> ms;
      cudaEvent_t a, b;
      CHECK(cudaEventCreate(&a));
      CHECK(cudaEventCreate(&b));
      for (int rep = 0; rep < 8; ++rep) {
        CHECK(cudaMemset(acc, 0, sizeof(float) * kB * kM));
        CHECK(cudaEventRecord(a));
        switch (mode) {
          case 0: add_tiles<0><<<grid, 256>>>(t); break;
          case 1: add_tiles<1><<<grid, 256>>>(t); break;
          case 2: add_tiles<2><<<grid, 256>>>(t); break;
          case 3: add_tiles<3><<<grid, 256, smem_bulk>>>(t); break;
          default: add_tiles<4><<<grid, 256>>>(t); break;
        }
        CHECK(cudaGetLastError());
        CHECK(cudaEventRecord(b));
        CHECK(cudaEventSynchronize(b));
        float x;
        CHECK(cudaEventElapsedTime(&x, a, b));
        if (rep > 0) ms.push_back(x);  // the first launch is the warm-up
      }
      std::sort(ms.begin(), ms.end());
      const float med = ms[ms.size() / 2];
      long long bad = 0;
      if (mode != 4) {
        std::vector<float> h(static_cast<size_t>(kB) * kM);
        CHECK(cudaMemcpy(h.data(), acc, sizeof(float) * h.size(), cudaMemcpyDeviceToHost));
        for (int r = 0; r < kB; ++r)
          for (int o = 0; o < kM; ++o) bad += h[static_cast<size_t>(r) * kM + o] != static_cast<float>(per_row[r]);
      }
      std::printf("  %-30s %8.3f ms  %7.0f GB/s  %s\n", names[mode], med, gb / med * 1e3,
                  mode == 4 ? "(no sum to check)" : (bad == 0 ? "sums exact" : "SUMS WRONG"));
      if (bad != 0) std::printf("    %lld wrong elements\n", bad);
    }
    CHECK(cudaFree(d_rows));
    CHECK(cudaFree(d_ts));
    CHECK(cudaFree(d_tc));
    CHECK(cudaFree(part));
  }
  return 0;
}
