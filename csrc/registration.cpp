// The one schema block of every stochgate op, and the pybind11 module `stochgate._C`.
//
// Kernels register themselves beside their code: csrc/cpu/<family>.cpp with
// TORCH_LIBRARY_IMPL(stochgate, CPU, ...) and csrc/cuda/<family>.cu with
// TORCH_LIBRARY_IMPL(stochgate, CUDA, ...). Fake (meta) kernels and autograd are registered
// in python/stochgate/_ops.py.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "cpu/gated_amx.h"
#include "cpu/gated_linear.h"

TORCH_LIBRARY(stochgate, m) {
  // Sampling estimators. `key` is an int64 tensor (seed, offset) drawn from a
  // torch.Generator; element i uses Philox group i / 4 (csrc/common/philox.h).
  m.def("binary_sample(Tensor logits, Tensor key) -> Tensor");
  m.def("straight_through(Tensor logits, Tensor key, bool sigmoid_variant) -> Tensor");
  m.def("straight_through_backward(Tensor grad, Tensor logits) -> Tensor");
  m.def("stochastic_times_smooth(Tensor logits, Tensor key) -> Tensor");
  m.def("stochastic_times_smooth_backward(Tensor grad, Tensor logits, Tensor h) -> Tensor");
  m.def("noisy_rectifier(Tensor x, Tensor key, float sigma, bool logistic) -> Tensor");
  m.def("noisy_rectifier_backward(Tensor grad, Tensor h) -> Tensor");
  m.def("reinforce(Tensor logits, Tensor h, Tensor loss, Tensor baseline, float scale) -> Tensor");
  m.def(
      "reinforce_backward(Tensor grad, Tensor logits, Tensor h, Tensor loss, Tensor baseline, "
      "float scale) -> Tensor");

  // Gated matmuls (conditional computation). gates (B, C) split the N output units
  // (gated_linear) or the N input units (gated_input_linear) into C chunks; a zero gate skips
  // its chunk. Backward outputs not asked for by output_mask come back as empty tensors.
  // full_gate_grad only steers autograd (the gradient of gates for gated-off pairs, which
  // needs the skipped product); the forward kernels ignore it.
  m.def(
      "gated_linear(Tensor x, Tensor weight, Tensor? bias, Tensor gates, "
      "bool full_gate_grad=True) -> Tensor");
  m.def(
      "gated_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor? bias, Tensor gates, "
      "bool[4] output_mask, bool full_gate_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gated_input_linear(Tensor h, Tensor weight, Tensor? bias, Tensor gates) -> Tensor");
  m.def(
      "gated_input_linear_backward(Tensor grad_y, Tensor h, Tensor weight, Tensor gates, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "stochgate compiled kernels; the ops are under torch.ops.stochgate";
  m.def("build_info", []() {
    py::dict info;
    info["torch_version"] = STOCHGATE_TORCH_VERSION;
#ifdef STOCHGATE_WITH_CUDA
    info["cuda_compiled"] = true;
    info["cuda_version"] = STOCHGATE_CUDA_VERSION;
    info["cuda_archs"] = STOCHGATE_CUDA_ARCHS;
#else
    info["cuda_compiled"] = false;
    info["cuda_version"] = py::none();
    info["cuda_archs"] = "";
#endif
    return info;
  });
  m.def("cpu_amx_available", &stochgate::amx::available,
        "whether bfloat16 gated matmuls with chunk >= 16 can run on AMX here (oneDNN's brgemm)");
  m.def("cpu_amx_calls", &stochgate::amx::calls, "op calls that have run the AMX kernels in this process");
  m.def("cpu_isa", &stochgate::cpu_kernel_isa,
        "instruction set of the float32 CPU gated-matmul kernels here: avx512, avx2 or baseline");
}
