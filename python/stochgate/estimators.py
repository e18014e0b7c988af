"""The paper's gradient estimators for stochastic neurons (Bengio, Leonard & Courville 2013).

Every function here takes a floating tensor of any shape (float16, bfloat16, float32,
float64) on CPU or CUDA, returns a tensor of the same shape, dtype and device, and samples
with a counter-based Philox generator keyed from ``generator`` (or the default generator),
so the same generator state gives the same output on every run. Sampling and the estimator's
backward are each one fused kernel; NaN inputs give NaN outputs.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._ops import draw_key, ops
from .baselines import Baseline, resolve_baseline


def _check_float(name: str, t: object) -> None:
    """TypeError unless a tensor, ValueError unless floating point (shared with gated.py)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32, float64), "
            f"got {t.dtype} of shape {tuple(t.shape)}"
        )


def _check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def straight_through(
    logits: torch.Tensor,
    *,
    variant: Literal["identity", "sigmoid"] = "identity",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stochastic binary neuron with the straight-through gradient (paper eq. 13, §4).

    Forward: ``h = 1[u < sigmoid(logits)]``, ``u ~ U[0, 1)``.
    Backward: ``variant="identity"`` gives ``dL/dlogits = dL/dh`` (the paper found it best);
    ``variant="sigmoid"`` gives ``dL/dh * p * (1 - p)`` with ``p = sigmoid(logits)``.

    >>> h = stochgate.straight_through(torch.randn(32, 100, requires_grad=True))
    """
    _check_float("logits", logits)
    _check_generator(generator)
    if variant not in ("identity", "sigmoid"):
        raise ValueError(f"variant must be 'identity' or 'sigmoid', got {variant!r}")
    key = draw_key(generator, logits.device)
    return ops.straight_through(logits, key, variant == "sigmoid")


def stochastic_times_smooth(
    logits: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Stochastic times smooth unit (paper eq. 2, Proposition 2).

    ``p = sigmoid(logits)``, ``b ~ Bernoulli(sqrt(p))``, ``h = b * sqrt(p)``, so that
    ``E[h] = p`` and ``P(h > 0) = sqrt(p)``. The gradient flows through the smooth factor
    only (``b`` held constant): ``dL/dlogits = dL/dh * b * 0.5 * sqrt(p) * (1 - p)``.
    """
    _check_float("logits", logits)
    _check_generator(generator)
    return ops.stochastic_times_smooth(logits, draw_key(generator, logits.device))


def noisy_rectifier(
    x: torch.Tensor,
    *,
    sigma: float = 1.0,
    noise: Literal["gaussian", "logistic"] = "gaussian",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noisy rectifier (paper §2.1, Proposition 1): ``h = max(0, x + sigma * z)``.

    ``z ~ N(0, 1)`` (``noise="gaussian"``, sigma = 1 worked best in the paper) or
    ``z ~ Logistic(0, 1)`` (``noise="logistic"``: then with sigma = 1, ``P(h > 0) =
    sigmoid(x)`` and ``E[h] = softplus(x)``). Backward: ``dL/dx = dL/dh * 1[x + sigma z > 0]``.
    ``sigma = 0`` is a plain ReLU.
    """
    _check_float("x", x)
    _check_generator(generator)
    if noise not in ("gaussian", "logistic"):
        raise ValueError(f"noise must be 'gaussian' or 'logistic', got {noise!r}")
    sigma = float(sigma)
    if not sigma >= 0.0:
        raise ValueError(f"sigma must be a non-negative number, got {sigma}")
    return ops.noisy_rectifier(x, draw_key(generator, x.device), sigma, noise == "logistic")


def binary_sample(logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """The stochastic binary neuron's sample ``h = 1[u < sigmoid(logits)]``, with no gradient
    (pair it with :func:`reinforce`)."""
    _check_float("logits", logits)
    _check_generator(generator)
    with torch.no_grad():
        return ops.binary_sample(logits.detach(), draw_key(generator, logits.device))


def reinforce(
    logits: torch.Tensor,
    h: torch.Tensor,
    loss: torch.Tensor,
    *,
    baseline: None | float | Baseline = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """REINFORCE surrogate for stochastic binary neurons (paper eq. 3, Theorem 1).

    Returns a scalar that is 0 in value and whose gradient w.r.t. ``logits[b, i]`` is
    ``(h[b, i] - sigmoid(logits[b, i])) * (loss[b] - c_i)``, divided by the batch size ``B``
    for ``reduction="mean"``: add it to the loss you backpropagate. Unbiased for any
    baseline ``c`` that does not depend on the current sample.

    ``logits`` and ``h`` have shape ``(B, ...)``; ``loss`` has shape ``(B,)`` (per-example
    losses; it receives no gradient). ``baseline`` is ``None`` (c = 0), a float, or a
    :class:`MovingAverageBaseline` / :class:`MinVarianceBaseline`. A baseline module in
    training mode is updated from this batch *after* ``c`` is read from the earlier
    statistics, so the estimator stays unbiased.
    """
    _check_float("logits", logits)
    if not isinstance(h, torch.Tensor) or h.shape != logits.shape:
        raise ValueError(
            f"h must be a tensor of the shape of logits {tuple(logits.shape)}, got "
            f"{tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__}"
        )
    if logits.dim() < 1:
        raise ValueError("logits must have a batch dimension, got a 0-d tensor")
    batch = logits.shape[0]
    if not isinstance(loss, torch.Tensor) or loss.shape != (batch,):
        raise ValueError(
            f"loss must be a tensor of shape ({batch},) (one loss per example of logits "
            f"{tuple(logits.shape)}), got "
            f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    for name, t in (("h", h), ("loss", loss)):
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}")
    h = h.detach().to(logits.dtype)
    loss = loss.detach()
    c = resolve_baseline(baseline, logits, h, loss)
    scale = 1.0 / batch if (reduction == "mean" and batch > 0) else 1.0
    return ops.reinforce(logits, h, loss, c, scale)
