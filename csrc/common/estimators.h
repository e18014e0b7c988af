// Per-element math of the paper's estimators, shared by the CPU and CUDA kernels so that
// both compute the same thing by construction. `acc_t` is float for half, bfloat16 and
// float tensors and double for double tensors.
//
// NaN handling: a NaN input yields a NaN output (never a plausible 0/1 sample), and a NaN
// saved output yields a NaN gradient.
#pragma once

#include <cmath>

#include "philox.h"

namespace stochgate {

SG_HD float sg_exp(float x) { return expf(x); }
SG_HD double sg_exp(double x) { return exp(x); }
SG_HD float sg_log(float x) { return logf(x); }
SG_HD double sg_log(double x) { return log(x); }
SG_HD float sg_sqrt(float x) { return sqrtf(x); }
SG_HD double sg_sqrt(double x) { return sqrt(x); }
SG_HD float sg_cos(float x) { return cosf(x); }
SG_HD double sg_cos(double x) { return cos(x); }
SG_HD float sg_sin(float x) { return sinf(x); }
SG_HD double sg_sin(double x) { return sin(x); }

template <typename acc_t>
SG_HD bool sg_isnan(acc_t x) {
  return x != x;
}

template <typename acc_t>
SG_HD acc_t sg_sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + sg_exp(-x));
}

// h = 1[u < sigmoid(x)]; NaN in, NaN out.
template <typename acc_t>
SG_HD acc_t binary_sample_elem(acc_t x, uint32_t r) {
  const acc_t p = sg_sigmoid(x);
  if (sg_isnan(p)) return p;
  return static_cast<acc_t>(uniform_co(r)) < p ? acc_t(1) : acc_t(0);
}

// Paper eq. 2: b ~ Bernoulli(sqrt(p)), h = b * sqrt(p).
template <typename acc_t>
SG_HD acc_t sts_elem(acc_t x, uint32_t r) {
  const acc_t s = sg_sqrt(sg_sigmoid(x));
  if (sg_isnan(s)) return s;
  return static_cast<acc_t>(uniform_co(r)) < s ? s : acc_t(0);
}

// dL/dx = dL/dh * b * d sqrt(p)/dx = dL/dh * b * 0.5 * sqrt(p) * (1 - p). b is recovered
// from the saved output: h != 0 exactly when b = 1 (sqrt(p) > 0 whenever u < sqrt(p)).
template <typename acc_t>
SG_HD acc_t sts_backward_elem(acc_t g, acc_t x, acc_t h) {
  if (h == acc_t(0)) return acc_t(0) * g;  // keeps a NaN upstream gradient NaN
  const acc_t p = sg_sigmoid(x);
  return g * acc_t(0.5) * sg_sqrt(p) * (acc_t(1) - p);
}

// Straight-through, sigmoid variant: dL/dx = dL/dh * p * (1 - p).
template <typename acc_t>
SG_HD acc_t sigmoid_backward_elem(acc_t g, acc_t x) {
  const acc_t p = sg_sigmoid(x);
  return g * p * (acc_t(1) - p);
}

// Noise of lane l of a Philox group: standard Gaussian by Box-Muller over the lane pairs
// (0, 1) and (2, 3), or standard logistic by its quantile function.
template <typename acc_t>
SG_HD acc_t noise_elem(const U32x4& r, int l, bool logistic) {
  if (logistic) {
    const acc_t u = static_cast<acc_t>(uniform_oo(lane(r, l)));
    return sg_log(u) - sg_log(acc_t(1) - u);
  }
  const int pair = l & ~1;
  const acc_t u1 = static_cast<acc_t>(uniform_oo(lane(r, pair)));
  const acc_t u2 = static_cast<acc_t>(uniform_co(lane(r, pair + 1)));
  const acc_t radius = sg_sqrt(acc_t(-2) * sg_log(u1));
  const acc_t theta = acc_t(6.283185307179586) * u2;
  return radius * ((l & 1) ? sg_sin(theta) : sg_cos(theta));
}

// h = max(0, x + sigma * z), NaN-preserving.
template <typename acc_t>
SG_HD acc_t noisy_rectifier_elem(acc_t x, acc_t sigma, const U32x4& r, int l, bool logistic) {
  const acc_t v = sigma == acc_t(0) ? x : x + sigma * noise_elem<acc_t>(r, l, logistic);
  return (v > acc_t(0) || sg_isnan(v)) ? v : acc_t(0);
}

// dL/dx = dL/dh * 1[x + sigma z > 0] = dL/dh * 1[h > 0]; NaN where h is NaN.
template <typename acc_t>
SG_HD acc_t noisy_rectifier_backward_elem(acc_t g, acc_t h) {
  if (sg_isnan(h)) return h;
  return h > acc_t(0) ? g : acc_t(0);
}

// REINFORCE (paper eq. 3 and Theorem 1): d surrogate / d x[b, i]
//   = grad_out * scale * (h[b, i] - sigmoid(x[b, i])) * (loss[b] - c[i]).
template <typename acc_t>
SG_HD acc_t reinforce_backward_elem(acc_t go_scaled, acc_t x, acc_t h, acc_t loss, acc_t c) {
  return go_scaled * (h - sg_sigmoid(x)) * (loss - c);
}

}  // namespace stochgate
