// Grouped gathered GEMM of the CUDA gated matmuls, instantiated for c10::BFloat16 (one dtype per file
// so the builds run in parallel). The kernel is in gated_linear.cuh.
#define STOCHGATE_GATED_GEMM_IMPL
#include "gated_linear.cuh"

namespace stochgate {
namespace gated {
STOCHGATE_GATED_GEMM_LAYOUTS(, c10::BFloat16, c10::BFloat16)
STOCHGATE_GATED_GEMM_LAYOUTS(, c10::BFloat16, float)
}  // namespace gated
}  // namespace stochgate
