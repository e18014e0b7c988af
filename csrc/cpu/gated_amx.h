// bfloat16 gated matmuls on CPUs with AMX (gated_amx.cpp). The entry points of
// gated_linear.cpp hand their bfloat16 calls here when `applies` says so; inputs are checked
// there, and the active pairs come from its routing.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <tuple>

namespace stochgate {
namespace amx {

// The active (row, chunk) pairs of a gates matrix (B, C), in both orders.
struct Pairs {
  int64_t B = 0, C = 0;
  const int64_t* chunk_off = nullptr;  // (C + 1): chunk c's pairs are q in [chunk_off[c], chunk_off[c + 1])
  const int64_t* rows = nullptr;       // pair q's row, ascending within a chunk
  const double* gate = nullptr;        // pair q's gate
  const int64_t* row_off = nullptr;    // (B + 1): row b's pairs are p in [row_off[b], row_off[b + 1])
  const int64_t* chunks = nullptr;     // pair p's chunk, ascending within a row
  // Chunks with so many active rows that one dense product over all rows is cheaper
  // (dense[c] != 0; null: none): they go to oneDNN as runs of consecutive chunks.
  const char* dense = nullptr;
};

// Whether a call whose tensors are `a`, `w` (and `bias`, `grad`) goes through the AMX kernels:
// all of them bfloat16, chunk >= 16, AMX usable (oneDNN's micro-kernels, as PyTorch's own
// bfloat16 matmuls on this CPU), and not turned off with STOCHGATE_CPU_AMX=0.
bool applies(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
             int64_t chunk, const at::Tensor* grad = nullptr);

// Whether this CPU and build can run the AMX kernels (whatever STOCHGATE_CPU_AMX says), and how
// many op calls have gone through them in this process (for tests and `stochgate info`).
bool available();
int64_t calls();

at::Tensor gated_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                        int64_t chunk, const Pairs& pr);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
    const at::Tensor& gates, int64_t chunk, const Pairs& pr, std::array<bool, 4> output_mask,
    bool full_gate_grad);

at::Tensor gated_input_linear(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                              int64_t chunk, const Pairs& pr);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_input_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& w, int64_t chunk, const Pairs& pr,
    std::array<bool, 3> output_mask);

}  // namespace amx
}  // namespace stochgate
