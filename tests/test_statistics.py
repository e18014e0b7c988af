"""Statistical properties of the estimators, with fixed seeds and stated false-failure rates.

Each test names the probability that it fails although the property holds (its false-failure
rate); z thresholds are Bonferroni-corrected over every comparison a test makes. Exact
expectations come from enumerating all 2^n gate configurations where the space is small.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import stats

import stochgate


def _z(alpha: float, comparisons: int) -> float:
    """Two-sided z threshold for an overall false-failure rate `alpha`."""
    return float(stats.norm.isf(alpha / (2 * comparisons)))


# ---------------------------------------------------------------------------------------
# A small stochastic-binary network whose expected loss we can enumerate exactly.

N_UNITS = 5
LOGITS = torch.tensor([-1.5, -0.3, 0.2, 1.0, 2.2], dtype=torch.float64)
W = torch.tensor([2.0, -1.0, 3.0, 0.5, -2.0], dtype=torch.float64)


def _loss(h: torch.Tensor) -> torch.Tensor:
    """Per-example loss of binary gate vectors h (..., N_UNITS): an offset, a target error
    and an interaction, so L depends on h non-linearly and has a large mean."""
    return 4.0 + (h @ W - 1.0).square() + 3.0 * h[..., 0] * h[..., 2]


def _enumerate():
    configs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=N_UNITS)), dtype=torch.float64)
    p = torch.sigmoid(LOGITS)
    prob = (configs * p + (1 - configs) * (1 - p)).prod(-1)
    return configs, prob, _loss(configs), p


def _exact_gradient() -> torch.Tensor:
    """d E[L] / d logits_i = sum_h P(h) L(h) (h_i - p_i) (score function, exact)."""
    configs, prob, loss, p = _enumerate()
    return (prob[:, None] * loss[:, None] * (configs - p)).sum(0)


def _exact_variance(c: torch.Tensor) -> torch.Tensor:
    """Per-unit variance of the single-sample estimator (h_i - p_i)(L - c_i)."""
    configs, prob, loss, p = _enumerate()
    g = (configs - p) * (loss[:, None] - c)
    mean = (prob[:, None] * g).sum(0)
    return (prob[:, None] * g.square()).sum(0) - mean.square()


def _mc_gradients(baseline, batches: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Batch-mean REINFORCE gradients computed by the op, one row per batch."""
    out = torch.empty(batches, N_UNITS, dtype=torch.float64)
    for k in range(batches):
        logits = LOGITS.expand(batch_size, N_UNITS).clone().requires_grad_()
        h = stochgate.binary_sample(logits, generator=gen)
        surrogate = stochgate.reinforce(logits, h, _loss(h), baseline=baseline)
        (grad,) = torch.autograd.grad(surrogate, logits)
        # Mean over the batch of the per-example gradient = batch sum of reduction="mean".
        out[k] = grad.sum(0)
    return out


@pytest.mark.parametrize("kind", ["none", "constant", "moving_average", "min_variance"])
def test_reinforce_is_unbiased_against_exact_enumeration(kind):
    """False-failure rate 1e-3 per baseline kind (z-test over 5 units, Bonferroni)."""
    gen = torch.Generator().manual_seed(2013)
    baseline = {
        "none": None,
        "constant": 3.0,
        "moving_average": stochgate.MovingAverageBaseline(0.9),
        "min_variance": stochgate.MinVarianceBaseline(N_UNITS, 0.9),
    }[kind]
    # Baseline modules stay in training mode: c is read before each batch updates it.
    grads = _mc_gradients(baseline, batches=400, batch_size=500, gen=gen)
    exact = _exact_gradient()
    mean = grads.mean(0)
    se = grads.std(0) / math.sqrt(grads.shape[0])
    z = ((mean - exact) / se).abs()
    assert (z < _z(1e-3, N_UNITS)).all(), (kind, mean, exact, z)


def test_baseline_variance_ordering():
    """Min-variance < moving average < no baseline, for the per-unit gradient variance.

    Exact part: enumerate the variance of each estimator with its limiting baseline (c_i of
    Corollary 1 / E[L] / 0) — a deterministic check of the paper's argument on this problem.
    Monte-Carlo part, through the op with the modules' own statistics: a one-sided F-test per
    unit where the exact ratio is at least 1.5, overall false-failure rate 1e-3 (Bonferroni).
    """
    configs, prob, loss, p = _enumerate()
    sq = (configs - p).square()
    c_mv = (prob[:, None] * sq * loss[:, None]).sum(0) / (prob[:, None] * sq).sum(0)
    c_ma = (prob * loss).sum().expand(N_UNITS)
    v_mv, v_ma, v_none = (_exact_variance(c) for c in (c_mv, c_ma, torch.zeros(N_UNITS, dtype=torch.float64)))
    assert (v_mv <= v_ma + 1e-12).all() and (v_ma < v_none).all()
    assert (v_mv < v_ma).any()

    gen = torch.Generator().manual_seed(7)
    modules = {"mv": stochgate.MinVarianceBaseline(N_UNITS, 0.99), "ma": stochgate.MovingAverageBaseline(0.99)}
    for m in modules.values():  # learn the statistics, then freeze them
        _mc_gradients(m, batches=200, batch_size=256, gen=gen)
        m.eval()
    batches, size = 300, 64
    samples = {
        "mv": _mc_gradients(modules["mv"], batches, size, gen),
        "ma": _mc_gradients(modules["ma"], batches, size, gen),
        "none": _mc_gradients(None, batches, size, gen),
    }
    var = {k: v.var(0) for k, v in samples.items()}
    pairs = [("mv", "ma", v_ma / v_mv), ("ma", "none", v_none / v_ma)]
    tests = [(lo, hi, i) for lo, hi, ratio in pairs for i in range(N_UNITS) if ratio[i] >= 1.5]
    assert len(tests) >= 4
    crit = stats.f.isf(1e-3 / len(tests), batches - 1, batches - 1)
    for lo, hi, i in tests:
        assert var[hi][i] / var[lo][i] > crit, (lo, hi, i, var[hi][i], var[lo][i], crit)


def _check_frequency(hits: torch.Tensor, p: torch.Tensor, z: float) -> None:
    n = hits.shape[0]
    phat = hits.double().mean(0)
    se = (p * (1 - p) / n).sqrt()
    assert (((phat - p) / se).abs() < z).all(), (phat, p)


def _check_mean(values: torch.Tensor, mean: torch.Tensor, z: float) -> None:
    n = values.shape[0]
    v = values.double()
    se = v.std(0) / math.sqrt(n)
    assert (((v.mean(0) - mean) / se).abs() < z).all(), (v.mean(0), mean)


X_GRID = torch.tensor([-4.0, -2.0, -0.7, 0.0, 0.4, 1.3, 3.0])
N_SAMPLES = 200_000


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_proposition1_logistic_noisy_rectifier(dtype):
    """P(h > 0) = sigmoid(x), E[h] = softplus(x) for logistic noise, sigma = 1.
    False-failure rate 1e-3 over the 2 x 7 comparisons."""
    gen = torch.Generator().manual_seed(1)
    x = X_GRID.to(dtype).expand(N_SAMPLES, -1)
    h = stochgate.noisy_rectifier(x, sigma=1.0, noise="logistic", generator=gen)
    z = _z(1e-3, 2 * len(X_GRID))
    _check_frequency(h > 0, torch.sigmoid(X_GRID.double()), z)
    _check_mean(h, torch.nn.functional.softplus(X_GRID.double()), z)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_proposition2_stochastic_times_smooth(dtype):
    """E[h] = p and P(h > 0) = sqrt(p). False-failure rate 1e-3 over 2 x 7 comparisons."""
    gen = torch.Generator().manual_seed(2)
    x = X_GRID.to(dtype).expand(N_SAMPLES, -1)
    h = stochgate.stochastic_times_smooth(x, generator=gen)
    p = torch.sigmoid(X_GRID.double())
    z = _z(1e-3, 2 * len(X_GRID))
    _check_frequency(h > 0, p.sqrt(), z)
    _check_mean(h, p, z)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_binary_sample_frequency(dtype):
    """P(h = 1) = sigmoid(logits) (of the logits as stored in `dtype`).
    False-failure rate 1e-3 over 7 comparisons."""
    gen = torch.Generator().manual_seed(3)
    x = X_GRID.to(dtype)
    h = stochgate.binary_sample(x.expand(N_SAMPLES, -1), generator=gen)
    _check_frequency(h == 1, torch.sigmoid(x.double()), _z(1e-3, len(X_GRID)))


def test_gaussian_noise_moments():
    """The Gaussian noise of the noisy rectifier is N(0, 1): with x = 0 and sigma = 1, h > 0
    half the time and E[h] = 1/sqrt(2 pi); a KS test on x + z with a huge offset so nothing
    is clipped. False-failure rate 1e-3 over 3 tests."""
    gen = torch.Generator().manual_seed(4)
    h = stochgate.noisy_rectifier(torch.zeros(N_SAMPLES), sigma=1.0, generator=gen)
    z = _z(1e-3, 3)
    _check_frequency((h > 0)[:, None], torch.tensor([0.5], dtype=torch.float64), z)
    _check_mean(h[:, None], torch.tensor([1 / math.sqrt(2 * math.pi)], dtype=torch.float64), z)
    shifted = stochgate.noisy_rectifier(torch.full((20_000,), 50.0, dtype=torch.float64), generator=gen) - 50.0
    assert stats.kstest(shifted.numpy(), "norm").pvalue > 1e-3 / 3
