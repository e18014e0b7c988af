// CUDA kernels of the sampling estimators: one fused pass per op. Each thread owns Philox
// groups (the stream layout of philox.h, shared with the CPU kernels, so the same key gives
// the same samples) and walks the tensor grid-stride. A CUDA key is read by the kernel
// itself: no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <utility>

#include "../common/checks.h"
#include "../common/estimators.h"

namespace stochgate {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};
template <typename T>
using Vec4 = Vec<T, 4>;

// Whether p may be read and written as Vec<T, N>.
template <int N, typename T>
bool aligned_vec(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0;
}

int blocks_for(int64_t work_items) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = (work_items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, sms * 16)));
}

// Where the kernel finds its (seed, offset): device memory, or values passed by the host.
struct KeyArg {
  const int64_t* ptr;
  uint64_t seed, offset;
  __device__ std::pair<uint64_t, uint64_t> values() const {
    if (ptr == nullptr) return {seed, offset};
    return {static_cast<uint64_t>(ptr[0]), static_cast<uint64_t>(ptr[1])};
  }
};

KeyArg key_arg(const at::Tensor& logits, const at::Tensor& key, const char* op) {
  check_key(key, op);
  if (key.is_cuda()) {
    STOCHGATE_CHECK(key.device() == logits.device(), op, ": key is on ", key.device(),
                    " but the input is on ", logits.device());
    STOCHGATE_CHECK(key.is_contiguous(), op, ": a CUDA key must be contiguous");
    return KeyArg{key.const_data_ptr<int64_t>(), 0, 0};
  }
  const auto [seed, offset] = cpu_key_values(key);
  return KeyArg{nullptr, seed, offset};
}

// The four elements of Philox group g, each stored alone (bounds-checked).
template <typename scalar_t, typename F>
__device__ __forceinline__ void sample_group(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                             int64_t n, uint64_t seed, uint64_t offset, int64_t g,
                                             const F& f) {
  using acc_t = at::opmath_type<scalar_t>;
  const U32x4 r = philox_group(seed, offset, static_cast<uint64_t>(g));
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    const int64_t i = element_of(g, l);
    if (i < n) y[i] = static_cast<scalar_t>(f(static_cast<acc_t>(x[i]), r, l));
  }
}

// One thread per Philox group; lane l of group g is element element_of(g, l) (philox.h), so
// 16 neighbouring threads store 16 neighbouring elements for each lane. The path for inputs
// that are not aligned to sample_blocks_kernel's vectors; that kernel takes the rest.
template <typename scalar_t, typename F>
__global__ void sample_map_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                  int64_t n, KeyArg key, F f) {
  const auto [seed, offset] = key.values();
  const int64_t groups = groups_for(n);
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    sample_group(x, y, n, seed, offset, g, f);
  }
}

// Groups per thread in sample_blocks_kernel: lane l of kVecGroups consecutive groups of one
// 64-element block is kVecGroups consecutive elements = one vector.
// Four for float, half and bfloat16 (8-byte vectors for the 2-byte types: run 6's 16-byte
// version, eight groups per thread, held 80 registers and gave small tensors few threads),
// two for double.
template <typename scalar_t>
constexpr int kVecGroups = sizeof(scalar_t) <= 4 ? 4 : 2;

// The aligned path. Thread item t owns groups 16 b + G q .. 16 b + G q + G - 1 of block
// b = t / (16 / G) (q = t % (16 / G)): four vector loads (one per lane), G Philox groups with
// the round keys worked out once per thread, four vector stores, so each thread keeps 4 G
// elements in flight and does its index arithmetic once per 4 G elements (run 5: the
// one-group-per-thread kernel reached 28-57% of copy bandwidth). The last, partial block
// (n % 64 elements) is done by block 0's first 16 threads, one group each, as in
// sample_map_kernel.
template <typename scalar_t, typename F>
__global__ void sample_blocks_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                     int64_t n, KeyArg key, F f) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int G = kVecGroups<scalar_t>;
  constexpr int kSlots = kBlockGroups / G;
  using V = Vec<scalar_t, G>;
  const auto [seed, offset] = key.values();
  const PhiloxKeys keys(seed);
  const int64_t full_blocks = n / kBlockElems;
  const int64_t items = full_blocks * kSlots;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < items;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = t / kSlots;
    const int q = static_cast<int>(t % kSlots);
    const int64_t base = b * kBlockElems + q * G;
    V in[4];
#pragma unroll
    for (int l = 0; l < 4; ++l) in[l] = *reinterpret_cast<const V*>(x + base + l * kBlockGroups);
    V out[4];
#pragma unroll
    for (int k = 0; k < G; ++k) {
      const U32x4 r = philox_group(keys, offset, static_cast<uint64_t>(b * kBlockGroups + q * G + k));
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        out[l].v[k] = static_cast<scalar_t>(f(static_cast<acc_t>(in[l].v[k]), r, l));
      }
    }
#pragma unroll
    for (int l = 0; l < 4; ++l) *reinterpret_cast<V*>(y + base + l * kBlockGroups) = out[l];
  }
  if (blockIdx.x == 0 && threadIdx.x < kBlockGroups && full_blocks * kBlockElems < n) {
    sample_group(x, y, n, seed, offset, full_blocks * kBlockGroups + threadIdx.x, f);
  }
}

// out[i] = f(a[i], b[i], c[i]) over contiguous tensors (c may alias b for two-input maps).
template <typename scalar_t, typename F>
__global__ void map3_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                            const scalar_t* __restrict__ c, scalar_t* __restrict__ out, int64_t n,
                            bool vectorised, F f) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = 4 * g;
    if (vectorised && base + 4 <= n) {
      const Vec4<scalar_t> va = reinterpret_cast<const Vec4<scalar_t>*>(a)[g];
      const Vec4<scalar_t> vb = reinterpret_cast<const Vec4<scalar_t>*>(b)[g];
      const Vec4<scalar_t> vc = reinterpret_cast<const Vec4<scalar_t>*>(c)[g];
      Vec4<scalar_t> vo;
#pragma unroll
      for (int l = 0; l < 4; ++l) {
        vo.v[l] = static_cast<scalar_t>(f(static_cast<acc_t>(va.v[l]), static_cast<acc_t>(vb.v[l]),
                                          static_cast<acc_t>(vc.v[l])));
      }
      reinterpret_cast<Vec4<scalar_t>*>(out)[g] = vo;
    } else {
      for (int64_t i = base; i < base + 4 && i < n; ++i) {
        out[i] = static_cast<scalar_t>(
            f(static_cast<acc_t>(a[i]), static_cast<acc_t>(b[i]), static_cast<acc_t>(c[i])));
      }
    }
  }
}

struct BinarySampleF {
  template <typename acc_t>
  __device__ acc_t operator()(acc_t x, const U32x4& r, int l) const {
    return binary_sample_elem(x, lane(r, l));
  }
};

struct StsF {
  template <typename acc_t>
  __device__ acc_t operator()(acc_t x, const U32x4& r, int l) const {
    return sts_elem(x, lane(r, l));
  }
};

template <typename acc_t>
struct NoisyRectifierF {
  acc_t sigma;
  bool logistic;
  __device__ acc_t operator()(acc_t x, const U32x4& r, int l) const {
    return noisy_rectifier_elem(x, sigma, r, l, logistic);
  }
};

struct SigmoidBackwardF {  // (grad, logits, unused)
  template <typename acc_t>
  __device__ acc_t operator()(acc_t g, acc_t x, acc_t) const {
    return sigmoid_backward_elem(g, x);
  }
};

struct StsBackwardF {  // (grad, logits, h)
  template <typename acc_t>
  __device__ acc_t operator()(acc_t g, acc_t x, acc_t h) const {
    return sts_backward_elem(g, x, h);
  }
};

struct NoisyBackwardF {  // (grad, h, unused)
  template <typename acc_t>
  __device__ acc_t operator()(acc_t g, acc_t h, acc_t) const {
    return noisy_rectifier_backward_elem(g, h);
  }
};

// Launches the fused sampling kernel of `op` with functor `make_f<scalar_t>()`.
template <typename MakeF>
at::Tensor launch_sample(const at::Tensor& input, const at::Tensor& key, const char* op,
                         const char* name, MakeF make_f) {
  check_floating(input, op, name);
  c10::cuda::CUDAGuard guard(input.device());
  const KeyArg k = key_arg(input, key, op);
  auto in = input.contiguous();
  auto out = at::empty_like(in);
  const int64_t n = in.numel();
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "stochgate_sample_cuda", [&] {
    const scalar_t* px = in.const_data_ptr<scalar_t>();
    scalar_t* py = out.mutable_data_ptr<scalar_t>();
    const auto f = make_f.template operator()<scalar_t>();
    if (aligned_vec<kVecGroups<scalar_t>>(px) && aligned_vec<kVecGroups<scalar_t>>(py)) {
      const int64_t items = n / kBlockElems * (kBlockGroups / kVecGroups<scalar_t>);
      sample_blocks_kernel<<<blocks_for(std::max<int64_t>(items, 1)), kThreads, 0, stream>>>(
          px, py, n, k, f);
    } else {
      sample_map_kernel<<<blocks_for(groups_for(n)), kThreads, 0, stream>>>(px, py, n, k, f);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// out = f(a, b, c) elementwise; all inputs already checked to share shape and dtype.
template <typename F>
at::Tensor launch_map3(const at::Tensor& a_, const at::Tensor& b_, const at::Tensor& c_,
                       const char* op, F f) {
  c10::cuda::CUDAGuard guard(a_.device());
  auto a = a_.contiguous();
  auto b = b_.contiguous();
  auto c = c_.contiguous();
  auto out = at::empty_like(b);
  const int64_t n = out.numel();
  if (n == 0) return out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "stochgate_map3_cuda", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const scalar_t* pc = c.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const bool vec = aligned_vec<4>(pa) && aligned_vec<4>(pb) && aligned_vec<4>(pc) &&
                     aligned_vec<4>(static_cast<const scalar_t*>(po));
    map3_kernel<<<blocks_for((n + 3) / 4), kThreads, 0, stream>>>(pa, pb, pc, po, n, vec, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

template <typename F>
struct Const {
  F f;
  template <typename scalar_t>
  F operator()() const {
    return f;
  }
};

at::Tensor binary_sample_cuda(const at::Tensor& logits, const at::Tensor& key) {
  return launch_sample(logits, key, "stochgate::binary_sample", "logits",
                       Const<BinarySampleF>{BinarySampleF{}});
}

at::Tensor straight_through_cuda(const at::Tensor& logits, const at::Tensor& key, bool) {
  return launch_sample(logits, key, "stochgate::straight_through", "logits",
                       Const<BinarySampleF>{BinarySampleF{}});
}

at::Tensor stochastic_times_smooth_cuda(const at::Tensor& logits, const at::Tensor& key) {
  return launch_sample(logits, key, "stochgate::stochastic_times_smooth", "logits",
                       Const<StsF>{StsF{}});
}

struct MakeNoisy {
  double sigma;
  bool logistic;
  template <typename scalar_t>
  NoisyRectifierF<at::opmath_type<scalar_t>> operator()() const {
    using acc_t = at::opmath_type<scalar_t>;
    return NoisyRectifierF<acc_t>{static_cast<acc_t>(sigma), logistic};
  }
};

at::Tensor noisy_rectifier_cuda(const at::Tensor& x, const at::Tensor& key, double sigma,
                                bool logistic) {
  STOCHGATE_CHECK(sigma >= 0, "stochgate::noisy_rectifier: sigma must be >= 0, got ", sigma);
  return launch_sample(x, key, "stochgate::noisy_rectifier", "x", MakeNoisy{sigma, logistic});
}

at::Tensor straight_through_backward_cuda(const at::Tensor& grad, const at::Tensor& logits) {
  const char* op = "stochgate::straight_through_backward";
  check_same_shape(grad, logits, op, "grad", "logits");
  check_same_dtype(grad, logits, op, "grad", "logits");
  check_same_device(grad, logits, op, "grad", "logits");
  return launch_map3(grad, logits, logits, op, SigmoidBackwardF{});
}

at::Tensor stochastic_times_smooth_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                                 const at::Tensor& h) {
  const char* op = "stochgate::stochastic_times_smooth_backward";
  check_same_shape(grad, logits, op, "grad", "logits");
  check_same_shape(h, logits, op, "h", "logits");
  check_same_dtype(grad, logits, op, "grad", "logits");
  check_same_dtype(h, logits, op, "h", "logits");
  check_same_device(grad, logits, op, "grad", "logits");
  check_same_device(h, logits, op, "h", "logits");
  return launch_map3(grad, logits, h, op, StsBackwardF{});
}

at::Tensor noisy_rectifier_backward_cuda(const at::Tensor& grad, const at::Tensor& h) {
  const char* op = "stochgate::noisy_rectifier_backward";
  check_same_shape(grad, h, op, "grad", "h");
  check_same_dtype(grad, h, op, "grad", "h");
  check_same_device(grad, h, op, "grad", "h");
  return launch_map3(grad, h, h, op, NoisyBackwardF{});
}

at::Tensor reinforce_cuda(const at::Tensor& logits, const at::Tensor& h, const at::Tensor& loss,
                          const at::Tensor& baseline, double) {
  check_reinforce_inputs(logits, h, loss, baseline);
  return at::zeros({}, logits.options());
}

// Four consecutive elements per thread item (vector loads of x and h where aligned), their
// (row, unit) found by one fast division per item (index_t = uint32_t while n fits) and
// stepped from there: run 5's one-element-per-thread kernel, with a 64-bit division and a
// 64-bit modulo per element, moved 53-71% of copy bandwidth.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void reinforce_backward_kernel(const scalar_t* __restrict__ grad,
                                          const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ h,
                                          const acc_t* __restrict__ loss,
                                          const acc_t* __restrict__ c, scalar_t* __restrict__ out,
                                          index_t n, at::cuda::detail::IntDivider<index_t> units,
                                          acc_t scale, bool vectorised) {
  const acc_t go = static_cast<acc_t>(grad[0]) * scale;
  const index_t items = n / 4 + (n % 4 != 0);
  for (index_t t = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; t < items;
       t += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t base = 4 * t;
    const auto rc = units.divmod(base);
    index_t row = rc.div, col = rc.mod;
    Vec4<scalar_t> vx, vh, vo;
    const bool full = vectorised && base + 4 <= n;
    if (full) {
      vx = reinterpret_cast<const Vec4<scalar_t>*>(x)[t];
      vh = reinterpret_cast<const Vec4<scalar_t>*>(h)[t];
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        vx.v[k] = base + k < n ? x[base + k] : scalar_t(0);
        vh.v[k] = base + k < n ? h[base + k] : scalar_t(0);
      }
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (base + k < n) {
        vo.v[k] = static_cast<scalar_t>(reinforce_backward_elem<acc_t>(
            go, static_cast<acc_t>(vx.v[k]), static_cast<acc_t>(vh.v[k]), loss[row], c[col]));
      }
      if (++col == units.divisor) {
        col = 0;
        ++row;
      }
    }
    if (full) {
      reinterpret_cast<Vec4<scalar_t>*>(out)[t] = vo;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (base + k < n) out[base + k] = vo.v[k];
      }
    }
  }
}

at::Tensor reinforce_backward_cuda(const at::Tensor& grad, const at::Tensor& logits,
                                   const at::Tensor& h, const at::Tensor& loss,
                                   const at::Tensor& baseline, double scale) {
  check_reinforce_inputs(logits, h, loss, baseline);
  STOCHGATE_CHECK(grad.numel() == 1, "stochgate::reinforce_backward: grad must be a scalar, got ",
                  grad.sizes());
  check_same_device(grad, logits, "stochgate::reinforce_backward", "grad", "logits");
  c10::cuda::CUDAGuard guard(logits.device());
  auto x = logits.contiguous();
  auto hc = h.to(x.scalar_type()).contiguous();
  auto g = grad.to(x.scalar_type()).contiguous();
  auto out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const int64_t units = n / x.size(0);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "reinforce_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    auto lc = loss.to(acc_dtype).contiguous();
    auto cc = baseline.to(acc_dtype).contiguous();
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* ph = hc.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const bool vec = aligned_vec<4>(px) && aligned_vec<4>(ph) && aligned_vec<4>(static_cast<const scalar_t*>(po));
    // 32-bit indices (a multiply-high per division) while n fits, else 64-bit division.
    auto launch = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      reinforce_backward_kernel<scalar_t, acc_t, index_t><<<blocks_for((n + 3) / 4), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), px, ph, lc.const_data_ptr<acc_t>(),
          cc.const_data_ptr<acc_t>(), po, static_cast<index_t>(n),
          at::cuda::detail::IntDivider<index_t>(static_cast<index_t>(units)),
          static_cast<acc_t>(scale), vec);
    };
    if (n <= std::numeric_limits<int32_t>::max()) {
      launch(uint32_t{0});
    } else {
      launch(uint64_t{0});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(stochgate, CUDA, m) {
  m.impl("binary_sample", &binary_sample_cuda);
  m.impl("straight_through", &straight_through_cuda);
  m.impl("straight_through_backward", &straight_through_backward_cuda);
  m.impl("stochastic_times_smooth", &stochastic_times_smooth_cuda);
  m.impl("stochastic_times_smooth_backward", &stochastic_times_smooth_backward_cuda);
  m.impl("noisy_rectifier", &noisy_rectifier_cuda);
  m.impl("noisy_rectifier_backward", &noisy_rectifier_backward_cuda);
  m.impl("reinforce", &reinforce_cuda);
  m.impl("reinforce_backward", &reinforce_backward_cuda);
}

}  // namespace stochgate
