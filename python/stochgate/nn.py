"""Modules: :class:`StochasticGate` (each estimator as a layer)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from . import estimators
from .baselines import MinVarianceBaseline

Estimator = Literal["st", "st_sigmoid", "sts", "noisy_rectifier", "reinforce"]
_ESTIMATORS = ("st", "st_sigmoid", "sts", "noisy_rectifier", "reinforce")


class StochasticGate(nn.Module):
    """A layer of stochastic gates over pre-activations ``a`` with one of the paper's
    estimators:

    - ``"st"``: binary ``h = 1[u < sigmoid(a)]``, straight-through identity gradient;
    - ``"st_sigmoid"``: the same sample, gradient ``dL/dh * p (1 - p)``;
    - ``"sts"``: stochastic times smooth ``h = Bernoulli(sqrt(p)) * sqrt(p)``;
    - ``"noisy_rectifier"``: ``h = max(0, a + sigma z)``, Gaussian ``z`` (``sigma``, ``noise``);
    - ``"reinforce"``: binary sample with no gradient through ``h``; call
      :meth:`reinforce_loss` with the per-example loss to get the REINFORCE surrogate (with the
      min-variance baseline when ``num_units`` is given, as in the paper).

    In eval mode the gate is deterministic, as the paper does at test time: ``1[p > 0.5]``
    for the binary estimators, the expectation ``p`` for STS and ``max(0, a)`` for the
    noisy rectifier.
    """

    def __init__(
        self,
        estimator: Estimator = "st",
        *,
        sigma: float = 1.0,
        noise: Literal["gaussian", "logistic"] = "gaussian",
        num_units: int | None = None,
        momentum: float = 0.9,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if estimator not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator
        self.sigma = float(sigma)
        self.noise = noise
        self.generator = generator
        self.baseline = (
            MinVarianceBaseline(num_units, momentum)
            if estimator == "reinforce" and num_units is not None
            else None
        )
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        extra = f", sigma={self.sigma}, noise={self.noise!r}" if self.estimator == "noisy_rectifier" else ""
        return f"estimator={self.estimator!r}{extra}"

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._deterministic(a)
        e, gen = self.estimator, self.generator
        if e == "st":
            return estimators.straight_through(a, generator=gen)
        if e == "st_sigmoid":
            return estimators.straight_through(a, variant="sigmoid", generator=gen)
        if e == "sts":
            return estimators.stochastic_times_smooth(a, generator=gen)
        if e == "noisy_rectifier":
            return estimators.noisy_rectifier(a, sigma=self.sigma, noise=self.noise, generator=gen)
        h = estimators.binary_sample(a, generator=gen)
        self._last = (a, h)
        return h

    def _deterministic(self, a: torch.Tensor) -> torch.Tensor:
        if self.estimator == "sts":
            return torch.sigmoid(a)
        if self.estimator == "noisy_rectifier":
            return torch.relu(a)
        return (a > 0).to(a.dtype)  # p > 0.5

    def reinforce_loss(self, loss: torch.Tensor, reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
        """The REINFORCE surrogate of the last training-mode forward (estimator
        ``"reinforce"`` only), for per-example losses ``loss`` of shape ``(B,)``."""
        if self.estimator != "reinforce":
            raise RuntimeError(f"reinforce_loss needs estimator='reinforce', this gate uses {self.estimator!r}")
        if self._last is None:
            raise RuntimeError("reinforce_loss needs a training-mode forward first")
        a, h = self._last
        self._last = None
        return estimators.reinforce(a, h, loss, baseline=self.baseline, reduction=reduction)
