// Host-side input checks shared by the CPU and CUDA entry points. Kernels assume their
// inputs passed these.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

namespace stochgate {

// Error messages are assembled from strings and std::to_string, never through std::ostream
// (c10::str). Seen on the H100 machine (2026-11-27; module built by its GCC 13.3 from /opt/gcc
// with nvcc 13.0): the first failed check crashed with SIGSEGV inside an ostream integer
// inserter that the debugger placed in the module itself, instead of raising. Built this way
// (TORCH_CHECK given one ready string formats nothing itself) every check raised there, and
// the module defines none of libstdc++'s locale internals (tests/test_build.py).
namespace msg_detail {
inline void put(std::string& s, const char* v) { s += v; }
inline void put(std::string& s, const std::string& v) { s += v; }
inline void put(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename I, std::enable_if_t<std::is_integral_v<I> && !std::is_same_v<I, bool>, int> = 0>
void put(std::string& s, I v) {
  s += std::to_string(v);
}
inline void put(std::string& s, double v) { s += std::to_string(v); }
inline void put(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void put(std::string& s, c10::ScalarType t) { s += c10::toString(t); }
inline void put(std::string& s, const c10::Device& d) { s += d.str(); }
}  // namespace msg_detail

template <typename... Args>
std::string msg(const Args&... args) {
  std::string s;
  (msg_detail::put(s, args), ...);
  return s;
}

// TORCH_CHECK with the message built by msg(): same arguments, same RuntimeError.
#define STOCHGATE_CHECK(cond, ...) TORCH_CHECK((cond), ::stochgate::msg(__VA_ARGS__))

// The (seed, offset) key of a sampling op: an int64 tensor of two elements, drawn from a
// torch.Generator by the Python wrapper. On CPU its values are read here; a CUDA kernel
// reads a CUDA key itself so that the op never synchronises with the host.
inline void check_key(const at::Tensor& key, const char* op) {
  STOCHGATE_CHECK(key.scalar_type() == at::kLong && key.numel() == 2, op,
                  ": key must be an int64 tensor of 2 elements (seed, offset), got ",
                  key.scalar_type(), " of shape ", key.sizes());
}

inline std::pair<uint64_t, uint64_t> cpu_key_values(const at::Tensor& key) {
  auto k = key.to(at::kCPU).contiguous();
  const int64_t* p = k.data_ptr<int64_t>();
  return {static_cast<uint64_t>(p[0]), static_cast<uint64_t>(p[1])};
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  STOCHGATE_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
                  " must be a floating-point tensor (float16, bfloat16, float32, float64), got ",
                  t.scalar_type());
}

inline void check_same_shape(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* name_a, const char* name_b) {
  STOCHGATE_CHECK(a.sizes() == b.sizes(), op, ": ", name_a, " and ", name_b,
                  " must have the same shape, got ", a.sizes(), " and ", b.sizes());
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op,
                             const char* name_a, const char* name_b) {
  STOCHGATE_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", name_a, " and ", name_b,
                  " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  STOCHGATE_CHECK(a.device() == b.device(), op, ": ", name_a, " and ", name_b,
                  " must be on the same device, got ", a.device(), " and ", b.device());
}

// Shared checks of REINFORCE's inputs: logits (B, ...), h like logits, loss (B,),
// baseline (U,) with U = logits.numel() / B.
inline void check_reinforce_inputs(const at::Tensor& logits, const at::Tensor& h,
                                   const at::Tensor& loss, const at::Tensor& baseline) {
  const char* op = "stochgate::reinforce";
  check_floating(logits, op, "logits");
  check_same_shape(logits, h, op, "logits", "h");
  STOCHGATE_CHECK(logits.dim() >= 1, op, ": logits must have a batch dimension, got shape ",
                  logits.sizes());
  const int64_t B = logits.size(0);
  STOCHGATE_CHECK(loss.dim() == 1 && loss.size(0) == B, op, ": loss must have shape (", B,
                  ",) to match logits ", logits.sizes(), ", got ", loss.sizes());
  int64_t U = 1;
  for (int64_t d = 1; d < logits.dim(); ++d) U *= logits.size(d);
  STOCHGATE_CHECK(baseline.dim() == 1 && baseline.size(0) == U, op,
                  ": baseline must have shape (", U, ",) (one value per unit of logits ",
                  logits.sizes(), "), got ", baseline.sizes());
  for (const at::Tensor* t : {&h, &loss, &baseline}) {
    STOCHGATE_CHECK(t->device() == logits.device(), op,
                    ": logits, h, loss and baseline must be on one device, got ", logits.device(),
                    " and ", t->device());
  }
}

// Inputs of the gated matmuls, checked once at the op boundary by the CPU and CUDA kernels
// alike: a (B, features), weight 2-D, gates (B, C) splitting the gated units (weight's rows
// for gated_linear, its columns for gated_input_linear) into equal chunks, bias (weight.size(0),).
inline void check_gated_inputs(const char* op, const at::Tensor& a, const char* a_name,
                        const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        const at::Tensor& gates, bool gate_output_units) {
  check_floating(a, op, a_name);
  check_floating(weight, op, "weight");
  check_floating(gates, op, "gates");
  STOCHGATE_CHECK(a.dim() == 2, op, ": ", a_name, " must be 2-D (B, features), got shape ", a.sizes());
  STOCHGATE_CHECK(weight.dim() == 2, op, ": weight must be 2-D, got shape ", weight.sizes());
  STOCHGATE_CHECK(gates.dim() == 2, op, ": gates must be 2-D (B, C), got shape ", gates.sizes());
  STOCHGATE_CHECK(weight.size(1) == a.size(1), op, ": weight ", weight.sizes(), " does not match ",
                  a_name, " ", a.sizes(), " (weight.shape[1] must equal ", a_name, ".shape[1])");
  STOCHGATE_CHECK(gates.size(0) == a.size(0), op, ": gates ", gates.sizes(), " must have ",
                  a.size(0), " rows to match ", a_name, " ", a.sizes());
  const int64_t units = gate_output_units ? weight.size(0) : weight.size(1);
  const int64_t C = gates.size(1);
  STOCHGATE_CHECK(C >= 1 && units % C == 0, op, ": the ", units, " gated ",
                  gate_output_units ? "output" : "input", " units (weight ", weight.sizes(),
                  ") must split into gates.shape[1] = ", C, " equal chunks");
  check_same_dtype(a, weight, op, a_name, "weight");
  check_same_device(a, weight, op, a_name, "weight");
  check_same_device(a, gates, op, a_name, "gates");
  if (bias.has_value() && bias->defined()) {
    STOCHGATE_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (",
                    weight.size(0), ",) to match weight ", weight.sizes(), ", got ", bias->sizes());
    check_same_dtype(a, *bias, op, a_name, "bias");
    check_same_device(a, *bias, op, a_name, "bias");
  }
}

// The upstream gradient of a gated matmul: (B, out_features) like its output, a's dtype/device.
inline void check_gated_grad(const char* op, const at::Tensor& grad_y, const at::Tensor& a,
                             const char* a_name, int64_t out_features) {
  STOCHGATE_CHECK(grad_y.dim() == 2 && grad_y.size(0) == a.size(0) && grad_y.size(1) == out_features,
                  op, ": grad_y must have shape (", a.size(0), ", ", out_features, "), got ",
                  grad_y.sizes());
  check_same_dtype(grad_y, a, op, "grad_y", a_name);
  check_same_device(grad_y, a, op, "grad_y", a_name);
}

}  // namespace stochgate
