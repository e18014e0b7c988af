// CPU kernels of the sampling estimators: one fused pass per op (read the input once, draw
// Philox noise in registers, write the output once), parallel over Philox groups.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/estimators.h"
#include "gated_gemm.h"
#include "vec_math.h"

namespace stochgate {
namespace {

// ---------------------------------------------------------------------------------------
// float32 fast path: 16 Philox groups (64 elements) per step, vectorised math (vec_math.h),
// compiled per instruction set (SG_GG_VARIANTS; W = the lanes it compares at once) and picked
// at run time by gg_isa(). Every build computes the same values (comparisons are exact, the
// file is compiled with -ffp-contract=off), so a key draws the same samples on every x86 CPU.

enum class Kind { kBinary, kSts, kGauss, kLogistic };

template <class Isa> constexpr int kCmpLanes = gg::VecInfo<typename Isa::V>::L;

// IEEE square root, 16 lanes (vectorised by the compiler: the file has -fno-math-errno).
SG_INLINE vm::vf vsqrt(vm::vf x) {
  vm::vf r;
  for (int i = 0; i < vm::kLanes; ++i) r[i] = __builtin_sqrtf(x[i]);
  return r;
}

template <Kind K, int W>
SG_INLINE vm::vf sample_vec(vm::vf v, vm::vf u, vm::vf z, float sigma) {
  if constexpr (K == Kind::kBinary) {
    const vm::vf p = vm::sigmoid<W>(v);
    return vm::select(vm::isnan<W>(p), p, vm::select(vm::lt<W>(u, p), vm::splat(1.0f), vm::splat(0.0f)));
  } else if constexpr (K == Kind::kSts) {
    const vm::vf sq = vsqrt(vm::sigmoid<W>(v));
    return vm::select(vm::isnan<W>(sq), sq, vm::select(vm::lt<W>(u, sq), sq, vm::splat(0.0f)));
  } else {
    const vm::vf t = sigma == 0.0f ? v : v + sigma * z;
    return vm::select(vm::le<W>(t, vm::splat(0.0f)), vm::splat(0.0f), t);  // NaN is not <= 0: it passes
  }
}

struct SampleArgs {
  Kind kind;
  const float* x;
  float* y;
  int64_t n;
  uint64_t seed, offset;
  float sigma;
};

// Samples blocks [b_begin, b_end) (64 elements, 16 Philox groups each) of a float tensor of
// n elements.
template <Kind K, class Isa>
SG_INLINE void sample_f32(const SampleArgs& a, int64_t b_begin, int64_t b_end) {
  constexpr int L = vm::kLanes, W = kCmpLanes<Isa>;
  for (int64_t b = b_begin; b < b_end; ++b) {
    vm::vu w[4];
    vm::philox16<W>(a.seed, a.offset, static_cast<uint64_t>(b * kBlockGroups), w);
    vm::vf u[4], z[4];
    if constexpr (K == Kind::kGauss) {  // Box-Muller over lanes (0, 1) and (2, 3)
      const vm::vf r0 = vsqrt(-2.0f * vm::log_pos<W>(vm::uniform_oo(w[0])));
      const vm::vf r1 = vsqrt(-2.0f * vm::log_pos<W>(vm::uniform_oo(w[2])));
      vm::vf c0, s0, c1, s1;
      vm::cossin_2pi<W>(vm::uniform_co(w[1]), c0, s0);
      vm::cossin_2pi<W>(vm::uniform_co(w[3]), c1, s1);
      z[0] = r0 * c0;
      z[1] = r0 * s0;
      z[2] = r1 * c1;
      z[3] = r1 * s1;
    } else {
      for (int l = 0; l < 4; ++l) {
        if constexpr (K == Kind::kLogistic) {
          u[l] = vm::uniform_oo(w[l]);
          z[l] = vm::log_pos<W>(u[l]) - vm::log_pos<W>(1.0f - u[l]);
        } else {
          u[l] = vm::uniform_co(w[l]);
        }
      }
    }
    const int64_t base = b * kBlockElems;
    if (base + kBlockElems <= a.n) {
      for (int l = 0; l < 4; ++l) {
        vm::store(a.y + base + l * L, sample_vec<K, W>(vm::load(a.x + base + l * L), u[l], z[l], a.sigma));
      }
    } else {  // the tail goes through the same vector code via a padded copy
      const size_t bytes = sizeof(float) * static_cast<size_t>(a.n - base);
      alignas(64) float xt[kBlockElems] = {}, yt[kBlockElems];
      std::memcpy(xt, a.x + base, bytes);
      for (int l = 0; l < 4; ++l) {
        vm::store(yt + l * L, sample_vec<K, W>(vm::load(xt + l * L), u[l], z[l], a.sigma));
      }
      std::memcpy(a.y + base, yt, bytes);
    }
  }
}

template <class Isa>
SG_INLINE void sample_blocks(const SampleArgs& a, int64_t b0, int64_t b1) {
  switch (a.kind) {
    case Kind::kBinary: return sample_f32<Kind::kBinary, Isa>(a, b0, b1);
    case Kind::kSts: return sample_f32<Kind::kSts, Isa>(a, b0, b1);
    case Kind::kGauss: return sample_f32<Kind::kGauss, Isa>(a, b0, b1);
    case Kind::kLogistic: return sample_f32<Kind::kLogistic, Isa>(a, b0, b1);
  }
}
SG_GG_VARIANTS(sample_blocks, SampleArgs)

// Elementwise float32 backward: out[i] = f(g[i], x[i], h[i]).
struct MapArgs {
  const float* g;
  const float* x;
  const float* h;  // = x where the formula has no h
  float* out;
};

// Over [i0, i1) in 16-lane vectors, tails through a padded copy.
template <typename F>
SG_INLINE void map_f32(const MapArgs& m, int64_t i0, int64_t i1, F f) {
  int64_t i = i0;
  for (; i + vm::kLanes <= i1; i += vm::kLanes) {
    vm::store(m.out + i, f(vm::load(m.g + i), vm::load(m.x + i), vm::load(m.h + i)));
  }
  if (i < i1) {
    alignas(64) float ta[vm::kLanes] = {}, tb[vm::kLanes] = {}, tc[vm::kLanes] = {}, to[vm::kLanes];
    const size_t bytes = sizeof(float) * static_cast<size_t>(i1 - i);
    std::memcpy(ta, m.g + i, bytes);
    std::memcpy(tb, m.x + i, bytes);
    std::memcpy(tc, m.h + i, bytes);
    vm::store(to, f(vm::load(ta), vm::load(tb), vm::load(tc)));
    std::memcpy(m.out + i, to, bytes);
  }
}

template <class Isa>
SG_INLINE void sigmoid_backward_range(const MapArgs& m, int64_t i0, int64_t i1) {
  map_f32(m, i0, i1, [](vm::vf gv, vm::vf xv, vm::vf) __attribute__((always_inline)) {
    const vm::vf p = vm::sigmoid<kCmpLanes<Isa>>(xv);
    return gv * p * (1.0f - p);
  });
}

template <class Isa>
SG_INLINE void sts_backward_range(const MapArgs& m, int64_t i0, int64_t i1) {
  map_f32(m, i0, i1, [](vm::vf gv, vm::vf xv, vm::vf hv) __attribute__((always_inline)) {
    constexpr int W = kCmpLanes<Isa>;
    const vm::vf p = vm::sigmoid<W>(xv);
    const vm::vf d = gv * 0.5f * vsqrt(p) * (1.0f - p);
    return vm::select(vm::eq<W>(hv, vm::splat(0.0f)), 0.0f * gv, d);
  });
}
SG_GG_VARIANTS(sigmoid_backward_range, MapArgs)
SG_GG_VARIANTS(sts_backward_range, MapArgs)

// A parallel task covers at least this many elements (elementwise maps) or 64-element blocks.
constexpr int64_t kGrain = 4096;
constexpr int64_t kGrainBlocks = 256;

// out[i] = f(in[i], the Philox words of i's group, i's lane) for a contiguous tensor: the
// portable path (float64, float16, bfloat16), same stream layout as the fast path.
template <typename scalar_t, typename F>
void sample_map(const at::Tensor& in, at::Tensor& out, uint64_t seed, uint64_t offset, F f) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = in.const_data_ptr<scalar_t>();
  scalar_t* y = out.mutable_data_ptr<scalar_t>();
  const int64_t n = in.numel();
  const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    for (int64_t g = b0 * kBlockGroups; g < b1 * kBlockGroups; ++g) {
      const U32x4 r = philox_group(seed, offset, static_cast<uint64_t>(g));
      for (int l = 0; l < 4; ++l) {
        const int64_t i = element_of(g, l);
        if (i < n) y[i] = static_cast<scalar_t>(f(static_cast<acc_t>(x[i]), r, l));
      }
    }
  });
}

// Runs the float32 fast-path sampler over all Philox groups in parallel; false if not float32.
bool sample_f32_parallel(Kind kind, const at::Tensor& in, at::Tensor& out, uint64_t seed,
                         uint64_t offset, float sigma = 0.0f) {
  if (in.scalar_type() != at::kFloat) return false;
  const int64_t n = in.numel();
  const SampleArgs a{kind, in.const_data_ptr<float>(), out.mutable_data_ptr<float>(), n, seed, offset, sigma};
  const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;
  const int isa = gg_isa();
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) { sample_blocks_run(isa, a, b0, b1); });
  return true;
}

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
  if (sample_f32_parallel(Kind::kBinary, in, out, seed, offset)) {
    return out;
  }
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
  if (x.scalar_type() == at::kFloat) {
    const float* px = x.const_data_ptr<float>();
    const MapArgs m{g.const_data_ptr<float>(), px, px, out.mutable_data_ptr<float>()};
    const int isa = gg_isa();
    at::parallel_for(0, x.numel(), 4 * kGrain,
                     [&](int64_t i0, int64_t i1) { sigmoid_backward_range_run(isa, m, i0, i1); });
    return out;
  }
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
  if (sample_f32_parallel(Kind::kSts, in, out, seed, offset)) {
    return out;
  }
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
  if (x.scalar_type() == at::kFloat) {
    const MapArgs m{g.const_data_ptr<float>(), x.const_data_ptr<float>(), hc.const_data_ptr<float>(),
                    out.mutable_data_ptr<float>()};
    const int isa = gg_isa();
    at::parallel_for(0, x.numel(), 4 * kGrain,
                     [&](int64_t i0, int64_t i1) { sts_backward_range_run(isa, m, i0, i1); });
    return out;
  }
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
  STOCHGATE_CHECK(sigma >= 0, "stochgate::noisy_rectifier: sigma must be >= 0, got ", sigma);
  const auto [seed, offset] = cpu_key_values(key);
  auto in = x.contiguous();
  auto out = at::empty_like(in);
  const float sigma_f = static_cast<float>(sigma);
  if (sample_f32_parallel(logistic ? Kind::kLogistic : Kind::kGauss, in, out, seed, offset, sigma_f)) {
    return out;
  }
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
  STOCHGATE_CHECK(grad.numel() == 1, "stochgate::reinforce_backward: grad must be a scalar, got ",
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
