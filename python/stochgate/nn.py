"""Modules: :class:`StochasticGate` (each estimator as a layer), :class:`GatedLinear` and
:class:`GatedInputLinear` (gated matmuls that skip gated-off chunks)."""

from __future__ import annotations

import math
import operator
from typing import Literal

import torch
from torch import nn

from . import estimators
from .baselines import MinVarianceBaseline
from .gated import _check_threshold, gated_input_linear, gated_linear

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


class _GatedBase(nn.Module):
    """Parameters and nn.Linear initialisation shared by the gated layers."""

    def __init__(self, in_features: int, out_features: int, num_chunks: int, gated_units: int,
                 bias: bool, device, dtype) -> None:
        super().__init__()
        try:  # ints and integer scalars such as numpy's, not floats or bools
            count = None if isinstance(num_chunks, bool) else operator.index(num_chunks)
        except TypeError:
            count = None
        if count is None or count < 1 or gated_units % count != 0:
            raise ValueError(
                f"num_chunks must be a positive int dividing the {gated_units} gated units, "
                f"got num_chunks={num_chunks!r}"
            )
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.num_chunks = count
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The initialisation of nn.Linear.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_chunks={self.num_chunks}, bias={self.bias is not None}"
        )


class GatedLinear(_GatedBase):
    """``nn.Linear`` whose ``out_features`` are split into ``num_chunks`` chunks switched on and
    off per example by ``gates (B, num_chunks)``: :func:`stochgate.gated_linear`. Gated-off
    chunks output exactly 0 and cost nothing. ``gate_grad`` (``None``, ``"full"``, ``"active"``)
    and ``density_threshold`` (``None``: off) are passed on: see :func:`stochgate.gated_linear`.

    >>> layer = GatedLinear(784, 2000, num_chunks=2000)
    >>> y = layer(x, gates)          # x (B, 784), gates (B, 2000)
    """

    def __init__(self, in_features: int, out_features: int, num_chunks: int, bias: bool = True,
                 *, gate_grad: Literal["full", "active"] | None = None,
                 density_threshold: float | None = None, device=None, dtype=None) -> None:
        if gate_grad not in (None, "full", "active"):
            raise ValueError(f"gate_grad must be None, 'full' or 'active', got {gate_grad!r}")
        _check_threshold("GatedLinear", density_threshold)
        super().__init__(in_features, out_features, num_chunks, out_features, bias, device, dtype)
        self.gate_grad = gate_grad
        self.density_threshold = density_threshold

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return gated_linear(x, self.weight, self.bias, gates, gate_grad=self.gate_grad,
                            density_threshold=self.density_threshold)


class GatedInputLinear(_GatedBase):
    """``nn.Linear`` whose ``in_features`` are split into ``num_chunks`` chunks; per example only
    the chunks with a nonzero gate are read: :func:`stochgate.gated_input_linear`. The layer
    after a :class:`GatedLinear` with the same gates. ``h_grad`` (``"active"`` or ``"full"``:
    use ``"full"`` after a ``GatedLinear(..., gate_grad="full")``) and ``density_threshold``
    (``None``: off) are passed on: see :func:`stochgate.gated_input_linear`.
    """

    def __init__(self, in_features: int, out_features: int, num_chunks: int, bias: bool = True,
                 *, h_grad: Literal["active", "full"] = "active", density_threshold: float | None = None,
                 device=None, dtype=None) -> None:
        if h_grad not in ("active", "full"):
            raise ValueError(f"h_grad must be 'active' or 'full', got {h_grad!r}")
        _check_threshold("GatedInputLinear", density_threshold)
        super().__init__(in_features, out_features, num_chunks, in_features, bias, device, dtype)
        self.h_grad = h_grad
        self.density_threshold = density_threshold

    def forward(self, h: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return gated_input_linear(h, self.weight, self.bias, gates, h_grad=self.h_grad,
                                  density_threshold=self.density_threshold)
