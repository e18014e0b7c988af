// CPU kernels of the sampling estimators: one fused pass per op (read the input once, draw
// Philox noise in registers, write the output once), parallel over Philox groups.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/estimators.h"

namespace stochgate {
namespace {

// Groups of 4 elements per Philox call; a task covers at least this many groups.
constexpr int64_t kGrain = 4096;

// out[i] = f(in[i], philox words of i's group, i % 4) for a contiguous tensor.
template <typename scalar_t, typename F>
void sample_map(const at::Tensor& in, at::Tensor& out, uint64_t seed, uint64_t offset, F f) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = in.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const int64_t n = in.numel();
  const int64_t groups = (n + 3) / 4;
  at::parallel_for(0, groups, kGrain, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const U32x4 r = philox_group(seed, offset, static_cast<uint64_t>(g));
      const int64_t base = 4 * g;
      const int lanes = static_cast<int>(std::min<int64_t>(4, n - base));
      for (int l = 0; l < lanes; ++l) {
        y[base + l] = static_cast<scalar_t>(f(static_cast<acc_t>(x[base + l]), r, l));
      }
    }
  });
}

// out[i] = f(a[i], b[i]) (and c[i]) for contiguous tensors of one dtype.
template <typename scalar_t, typename F>
void binary_map(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, F f) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* pa = a.const_data_ptr<scalar_t>();
  const scalar_t* pb = b.const_data_ptr<scalar_t>();
  scalar_t* po = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, a.numel(), 4 * kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      po[i] = static_cast<scalar_t>(f(static_cast<acc_t>(pa[i]), static_cast<acc_t>(pb[i])));
    }
  });
}

template <typename scalar_t, typename F>
void ternary_map(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, at::Tensor& out,
                 F f) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* pa = a.const_data_ptr<scalar_t>();
  const scalar_t* pb = b.const_data_ptr<scalar_t>();
  const scalar_t* pc = c.const_data_ptr<scalar_t>();
  scalar_t* po = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, a.numel(), 4 * kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      po[i] = static_cast<scalar_t>(f(static_cast<acc_t>(pa[i]), static_cast<acc_t>(pb[i]),
                                      static_cast<acc_t>(pc[i])));
    }
  });
}

at::Tensor binary_sample_cpu(const at::Tensor& logits, const at::Tensor& key) {
  check_floating(logits, "stochgate::binary_sample", "logits");
  check_key(key, "stochgate::binary_sample");
  const auto [seed, offset] = cpu_key_values(key);
  auto in = logits.contiguous();
  auto out = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "binary_sample_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sample_map<scalar_t>(in, out, seed, offset,
                         [](acc_t x, const U32x4& r, int l) { return binary_sample_elem(x, lane(r, l)); });
  });
  return out;
}

at::Tensor straight_through_cpu(const at::Tensor& logits, const at::Tensor& key, bool) {
  return binary_sample_cpu(logits, key);
}

at::Tensor straight_through_backward_cpu(const at::Tensor& grad, const at::Tensor& logits) {
  const char* op = "stochgate::straight_through_backward";
  check_same_shape(grad, logits, op, "grad", "logits");
  check_same_dtype(grad, logits, op, "grad", "logits");
  auto g = grad.contiguous();
  auto x = logits.contiguous();
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "straight_through_backward_cpu", [&] {
    binary_map<scalar_t>(g, x, out, [](auto gv, auto xv) { return sigmoid_backward_elem(gv, xv); });
  });
  return out;
}

at::Tensor stochastic_times_smooth_cpu(const at::Tensor& logits, const at::Tensor& key) {
  check_floating(logits, "stochgate::stochastic_times_smooth", "logits");
  check_key(key, "stochgate::stochastic_times_smooth");
  const auto [seed, offset] = cpu_key_values(key);
  auto in = logits.contiguous();
  auto out = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "stochastic_times_smooth_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sample_map<scalar_t>(in, out, seed, offset,
                         [](acc_t x, const U32x4& r, int l) { return sts_elem(x, lane(r, l)); });
  });
  return out;
}

at::Tensor stochastic_times_smooth_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                                const at::Tensor& h) {
  const char* op = "stochgate::stochastic_times_smooth_backward";
  check_same_shape(grad, logits, op, "grad", "logits");
  check_same_shape(h, logits, op, "h", "logits");
  check_same_dtype(grad, logits, op, "grad", "logits");
  check_same_dtype(h, logits, op, "h", "logits");
  auto g = grad.contiguous();
  auto x = logits.contiguous();
  auto hc = h.contiguous();
  auto out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stochastic_times_smooth_backward_cpu", [&] {
    ternary_map<scalar_t>(g, x, hc, out,
                          [](auto gv, auto xv, auto hv) { return sts_backward_elem(gv, xv, hv); });
  });
  return out;
}

at::Tensor noisy_rectifier_cpu(const at::Tensor& x, const at::Tensor& key, double sigma,
                               bool logistic) {
  check_floating(x, "stochgate::noisy_rectifier", "x");
  check_key(key, "stochgate::noisy_rectifier");
  TORCH_CHECK(sigma >= 0, "stochgate::noisy_rectifier: sigma must be >= 0, got ", sigma);
  const auto [seed, offset] = cpu_key_values(key);
  auto in = x.contiguous();
  auto out = at::empty_like(in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "noisy_rectifier_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t s = static_cast<acc_t>(sigma);
    sample_map<scalar_t>(in, out, seed, offset, [s, logistic](acc_t v, const U32x4& r, int l) {
      return noisy_rectifier_elem(v, s, r, l, logistic);
    });
  });
  return out;
}

at::Tensor noisy_rectifier_backward_cpu(const at::Tensor& grad, const at::Tensor& h) {
  const char* op = "stochgate::noisy_rectifier_backward";
  check_same_shape(grad, h, op, "grad", "h");
  check_same_dtype(grad, h, op, "grad", "h");
  auto g = grad.contiguous();
  auto hc = h.contiguous();
  auto out = at::empty_like(hc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hc.scalar_type(), "noisy_rectifier_backward_cpu", [&] {
    binary_map<scalar_t>(g, hc, out,
                         [](auto gv, auto hv) { return noisy_rectifier_backward_elem(gv, hv); });
  });
  return out;
}

at::Tensor reinforce_cpu(const at::Tensor& logits, const at::Tensor& h, const at::Tensor& loss,
                         const at::Tensor& baseline, double) {
  check_reinforce_inputs(logits, h, loss, baseline);
  return at::zeros({}, logits.options());
}

at::Tensor reinforce_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                  const at::Tensor& h, const at::Tensor& loss,
                                  const at::Tensor& baseline, double scale) {
  check_reinforce_inputs(logits, h, loss, baseline);
  TORCH_CHECK(grad.numel() == 1, "stochgate::reinforce_backward: grad must be a scalar, got ",
              grad.sizes());
  auto x = logits.contiguous();
  auto hc = h.to(x.scalar_type()).contiguous();
  auto out = at::empty_like(x);
  const int64_t B = x.size(0);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const int64_t U = n / B;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reinforce_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    auto lc = loss.to(acc_dtype).contiguous();
    auto cc = baseline.to(acc_dtype).contiguous();
    const acc_t go = grad.to(acc_dtype).item<acc_t>() * static_cast<acc_t>(scale);
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* ph = hc.const_data_ptr<scalar_t>();
    const acc_t* pl = lc.const_data_ptr<acc_t>();
    const acc_t* pc = cc.const_data_ptr<acc_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 4 * kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        po[i] = static_cast<scalar_t>(reinforce_backward_elem<acc_t>(
            go, static_cast<acc_t>(px[i]), static_cast<acc_t>(ph[i]), pl[i / U], pc[i % U]));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stochgate, CPU, m) {
  m.impl("binary_sample", &binary_sample_cpu);
  m.impl("straight_through", &straight_through_cpu);
  m.impl("straight_through_backward", &straight_through_backward_cpu);
  m.impl("stochastic_times_smooth", &stochastic_times_smooth_cpu);
  m.impl("stochastic_times_smooth_backward", &stochastic_times_smooth_backward_cpu);
  m.impl("noisy_rectifier", &noisy_rectifier_cpu);
  m.impl("noisy_rectifier_backward", &noisy_rectifier_backward_cpu);
  m.impl("reinforce", &reinforce_cpu);
  m.impl("reinforce_backward", &reinforce_backward_cpu);
}

}  // namespace stochgate
