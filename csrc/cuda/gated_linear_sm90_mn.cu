// The Hopper kernel (gated_linear_sm90.cuh) for the products with an M/N-major operand:
// B N-major (gated_linear's dx, gated_input_linear's dh) and both (the two dweights).
#include "gated_linear_sm90.cuh"

namespace stochgate {
namespace gated {
STOCHGATE_SM90_INSTANTIATE(true, false)
STOCHGATE_SM90_INSTANTIATE(false, false)
}  // namespace gated
}  // namespace stochgate
