// Runs of consecutive chunks, shared by the CPU kernels of gated_linear.cpp (float32/float64)
// and gated_amx.cpp (bfloat16 on AMX).
#pragma once

#include <cstdint>

namespace stochgate {

// Calls run(c, ce) for each maximal run [c, ce) of chunks c < C with dense[c] != 0.
template <typename F>
void for_dense_runs(const char* dense, int64_t C, const F& run) {
  for (int64_t c = 0; c < C;) {
    if (!dense[c]) {
      ++c;
      continue;
    }
    int64_t ce = c + 1;
    while (ce < C && dense[ce]) ++ce;
    run(c, ce);
    c = ce;
  }
}

// Calls fill(c, ce) for each maximal run [c, ce) of the C chunks that a row's ascending list of
// active chunks, chunks[p .. pe), leaves out: one fill per run of a row's gated-off chunks.
template <typename F>
void for_inactive_runs(const int64_t* chunks, int64_t p, int64_t pe, int64_t C, const F& fill) {
  int64_t c = 0;
  for (; p <= pe; ++p) {
    const int64_t ce = p < pe ? chunks[p] : C;
    if (ce > c) fill(c, ce);
    c = ce + 1;
  }
}

}  // namespace stochgate
