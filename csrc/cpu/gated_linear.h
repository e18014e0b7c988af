// What the CPU gated matmuls (gated_linear.cpp) run on here, for `stochgate info` and the
// benchmarks' machine record.
#pragma once

namespace stochgate {

// The float32 kernels' instruction set on this CPU: "avx512", "avx2" or "baseline" (lowered
// by STOCHGATE_CPU_ISA=avx2|base, as the tests do).
const char* cpu_kernel_isa();

}  // namespace stochgate
