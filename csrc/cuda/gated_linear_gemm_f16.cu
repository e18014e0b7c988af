// Grouped gathered GEMM of the CUDA gated matmuls, instantiated for c10::Half (one dtype per file
// so the builds run in parallel). The kernel is in gated_linear.cuh.
#define STOCHGATE_GATED_GEMM_IMPL
#include "gated_linear.cuh"

namespace stochgate {
namespace gated {
STOCHGATE_GATED_GEMM_LAYOUTS(, c10::Half, c10::Half)
STOCHGATE_GATED_GEMM_LAYOUTS(, c10::Half, float)
}  // namespace gated
}  // namespace stochgate
