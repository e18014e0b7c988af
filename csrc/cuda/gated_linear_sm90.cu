// The Hopper kernel (gated_linear_sm90.cuh) for the products whose operands are both K-major:
// gated_linear's forward and gated_input_linear's per-chunk products, in every ring
// configuration that benchmarks/gpu_sm90.py compares. The other layouts are instantiated in
// gated_linear_sm90_mn.cu, so that the two build in parallel.
#include "gated_linear_sm90.cuh"

namespace stochgate {
namespace gated {
STOCHGATE_SM90_INSTANTIATE(true, true)
}  // namespace gated
}  // namespace stochgate
