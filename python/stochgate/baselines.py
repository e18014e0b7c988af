"""Baselines (control variates) for the REINFORCE estimator.

The estimator ``(h - p) * (L - c)`` is unbiased for any ``c`` that does not depend on the
current sample (paper Theorem 1). A baseline module therefore hands out ``c`` computed from
earlier batches and only then folds the current batch into its statistics.

Under ``torch.distributed`` the per-batch statistics are summed over all ranks before the
moving-average update, so every rank holds the same buffers.
"""

from __future__ import annotations

import torch
from torch import nn


def _all_reduce_sum(*tensors: torch.Tensor) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            flat = torch.cat([t.reshape(-1) for t in tensors])
            torch.distributed.all_reduce(flat)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def _check_momentum(momentum: float) -> float:
    momentum = float(momentum)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
    return momentum


class Baseline(nn.Module):
    """Interface of a REINFORCE baseline module."""

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        """``c`` per unit, shape ``(U,)`` with ``U = logits[0].numel()``, in float32 or
        float64, from the statistics of earlier batches only."""
        raise NotImplementedError

    @torch.no_grad()
    def update(self, logits: torch.Tensor, h: torch.Tensor, loss: torch.Tensor) -> None:
        """Fold one batch into the statistics."""
        raise NotImplementedError


class MovingAverageBaseline(Baseline):
    """``c`` = exponential moving average (``momentum``) of the batch-mean loss, the same for
    every unit. The first update sets it to that batch's mean."""

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = _check_momentum(momentum)
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        return self.mean.to(logits.device).expand(_units(logits))

    @torch.no_grad()
    def update(self, logits: torch.Tensor, h: torch.Tensor, loss: torch.Tensor) -> None:
        total = loss.detach().double().sum().reshape(1)
        n = torch.full((1,), float(loss.numel()), dtype=torch.float64, device=total.device)
        _all_reduce_sum(total, n)
        _ema_update(self.count, n, (self.mean, total), self.momentum)


def _ema_update(count: torch.Tensor, n: torch.Tensor, pairs, momentum: float) -> None:
    """``avg = m * avg + (1 - m) * batch_sum / n`` for each ``(avg, batch_sum)`` in ``pairs``,
    with ``m = 0`` at the first update (no zero-initialisation bias) and no change when the
    batch is empty. Tensor ops only: no host synchronisation on CUDA."""
    if isinstance(pairs[0], torch.Tensor):
        pairs = (pairs,)
    n = n.to(count.device).reshape(())
    nonempty = n > 0
    m = torch.where(count > 0, momentum, 0.0).to(torch.float64)
    for avg, batch_sum in pairs:
        batch_mean = batch_sum.to(avg.device).reshape(avg.shape) / n.clamp_min(1)
        avg.copy_(torch.where(nonempty, m * avg + (1 - m) * batch_mean, avg))
    count.add_(nonempty.to(count.dtype))


def _units(logits: torch.Tensor) -> int:
    units = 1
    for s in logits.shape[1:]:
        units *= s
    return units


class MinVarianceBaseline(Baseline):
    """The paper's minimum-variance baseline (Corollary 1, eq. 10), per unit ``i``:

    ``c_i = E[(h_i - p_i)^2 L] / E[(h_i - p_i)^2]``,

    numerator and denominator kept as exponential moving averages (buffers ``numerator`` and
    ``denominator``, saved in ``state_dict``). ``c_i = 0`` until unit ``i`` has statistics.
    """

    def __init__(self, num_units: int, momentum: float = 0.9) -> None:
        super().__init__()
        if int(num_units) != num_units or num_units < 1:
            raise ValueError(f"num_units must be a positive integer, got {num_units}")
        self.num_units = int(num_units)
        self.momentum = _check_momentum(momentum)
        self.register_buffer("numerator", torch.zeros(self.num_units, dtype=torch.float64))
        self.register_buffer("denominator", torch.zeros(self.num_units, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def _check(self, logits: torch.Tensor) -> None:
        if _units(logits) != self.num_units:
            raise ValueError(
                f"MinVarianceBaseline(num_units={self.num_units}) got logits of shape "
                f"{tuple(logits.shape)} with {_units(logits)} units per example"
            )

    def value(self, logits: torch.Tensor) -> torch.Tensor:
        self._check(logits)
        den = self.denominator
        c = torch.where(den > 0, self.numerator / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)
        return c.to(logits.device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, h: torch.Tensor, loss: torch.Tensor) -> None:
        self._check(logits)
        batch = logits.shape[0]
        p = torch.sigmoid(logits.detach().double()).reshape(batch, -1)
        w = (h.detach().double().reshape(batch, -1) - p).square()
        num = (w * loss.detach().double().reshape(batch, 1)).sum(0)
        den = w.sum(0)
        n = torch.full((1,), float(batch), dtype=torch.float64, device=num.device)
        _all_reduce_sum(num, den, n)
        _ema_update(self.count, n, ((self.numerator, num), (self.denominator, den)), self.momentum)


def resolve_baseline(
    baseline: None | float | Baseline,
    logits: torch.Tensor,
    h: torch.Tensor,
    loss: torch.Tensor,
) -> torch.Tensor:
    """``c`` as a contiguous ``(U,)`` tensor on ``logits.device``; updates a baseline module
    in training mode after reading ``c``."""
    units = _units(logits)
    if baseline is None or isinstance(baseline, (int, float)):
        value = 0.0 if baseline is None else float(baseline)
        return torch.full((units,), value, dtype=torch.float32, device=logits.device)
    if not isinstance(baseline, Baseline):
        raise TypeError(
            "baseline must be None, a float, or a stochgate baseline module, got "
            f"{type(baseline).__name__}"
        )
    c = baseline.value(logits).to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    c = c.contiguous().clone()
    if baseline.training:
        baseline.update(logits, h, loss)
    return c
