"""Pure-PyTorch versions of every stochgate op, with the same signatures: the oracle of the
tests and a readable statement of what each kernel computes.

Nothing in the package calls these on a user's behalf. The sampling functions draw their key
from the generator exactly as the compiled ops do and run the same Philox4x32-10 stream in
PyTorch integer arithmetic, so given the same generator state they draw the same samples as
the kernels (up to float rounding of ``p`` against ``u``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ._ops import draw_key
from .baselines import Baseline, resolve_baseline

__all__ = [
    "philox_groups",
    "philox_words",
    "uniform",
    "standard_noise",
    "straight_through",
    "stochastic_times_smooth",
    "noisy_rectifier",
    "binary_sample",
    "reinforce",
    "gated_linear",
    "gated_input_linear",
]

_MASK = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_TWO_POW_MINUS_24 = 2.0**-24


def philox_groups(key: torch.Tensor, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The Philox4x32-10 words of the groups whose blocks cover ``numel`` elements, as an int64
    tensor (holding uint32) of shape ``(blocks, 16, 4)``: ``[b, j, l]`` is lane ``l`` of group
    ``16 b + j``, whose counter is ``(group, offset)`` for ``key = (seed, offset)``
    (csrc/common/philox.h)."""
    seed, offset = (int(v) for v in key.tolist())
    blocks = (numel + 63) // 64
    g = torch.arange(blocks * 16, dtype=torch.int64, device=device)
    c0, c1 = g & _MASK, g >> 32
    c2 = torch.full_like(g, offset & _MASK)
    c3 = torch.full_like(g, (offset >> 32) & _MASK)
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    for _ in range(10):
        # uint32 x uint32 products fit in 64 bits; int64 wraps but keeps the same bits.
        p0, p1 = c0 * _M0, c2 * _M1
        hi0, lo0 = (p0 >> 32) & _MASK, p0 & _MASK
        hi1, lo1 = (p1 >> 32) & _MASK, p1 & _MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return torch.stack((c0, c1, c2, c3), dim=1).reshape(blocks, 16, 4)


def _to_elements(per_group: torch.Tensor, numel: int) -> torch.Tensor:
    """(blocks, 16, 4) per-(group, lane) values -> flat elements: element ``64 b + 16 l + j``
    takes lane ``l`` of group ``16 b + j``."""
    return per_group.transpose(1, 2).reshape(-1)[:numel]


def philox_words(key: torch.Tensor, numel: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The Philox word (int64 holding uint32) that each of ``numel`` elements draws."""
    return _to_elements(philox_groups(key, numel, device), numel)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def uniform(words: torch.Tensor, dtype: torch.dtype = torch.float32, *, open_interval: bool = False) -> torch.Tensor:
    """24-bit uniforms from Philox words: ``[0, 1)``, or odd multiples of 2^-24 in ``(0, 1)``
    with ``open_interval`` (exact in float32 either way)."""
    u = ((words >> 9) * 2 + 1) if open_interval else (words >> 8)
    return u.to(dtype) * _TWO_POW_MINUS_24


def standard_noise(key: torch.Tensor, shape: torch.Size, device, dtype: torch.dtype, logistic: bool) -> torch.Tensor:
    """The noise ``z`` of :func:`noisy_rectifier`: Box-Muller Gaussians over lane pairs
    (0, 1), (2, 3) of each Philox block, or logistic quantiles."""
    n = 1
    for s in shape:
        n *= s
    if logistic:
        u = uniform(philox_words(key, n, device), dtype, open_interval=True)
        return (torch.log(u) - torch.log(1 - u)).reshape(shape)
    # Box-Muller within each group: lanes (0, 1) and (2, 3) make two Gaussians each.
    w = philox_groups(key, n, device).reshape(-1, 16, 2, 2)
    u1 = uniform(w[..., 0], dtype, open_interval=True)
    u2 = uniform(w[..., 1], dtype)
    radius = torch.sqrt(-2 * torch.log(u1))
    theta = 6.283185307179586 * u2
    z = torch.stack((radius * torch.cos(theta), radius * torch.sin(theta)), dim=-1)
    return _to_elements(z.reshape(-1, 16, 4), n).reshape(shape)


def _sample_uniform(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    key = draw_key(generator, logits.device)
    words = philox_words(key, logits.numel(), logits.device)
    return uniform(words, _acc(logits.dtype)).reshape(logits.shape)


def binary_sample(logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``1[u < sigmoid(logits)]`` (NaN where logits is NaN), no gradient."""
    with torch.no_grad():
        u = _sample_uniform(logits, generator)
        p = torch.sigmoid(logits.to(u.dtype))
        h = torch.where(torch.isnan(p), p, (u < p).to(u.dtype))
        return h.to(logits.dtype)


def straight_through(
    logits: torch.Tensor,
    *,
    variant: Literal["identity", "sigmoid"] = "identity",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Binary sample forward; gradient ``dL/dh`` (identity) or ``dL/dh * p (1 - p)``."""
    h = binary_sample(logits, generator=generator)
    smooth = logits if variant == "identity" else torch.sigmoid(logits)
    return h + (smooth - smooth.detach())


def stochastic_times_smooth(logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``h = b * sqrt(p)``, ``b ~ Bernoulli(sqrt(p))``; gradient through ``sqrt(p)`` only."""
    u = _sample_uniform(logits, generator)
    s = torch.sqrt(torch.sigmoid(logits.to(u.dtype)))
    b = torch.where(torch.isnan(s), s, (u < s).to(u.dtype)).detach()
    return (b * s).to(logits.dtype)


def noisy_rectifier(
    x: torch.Tensor,
    *,
    sigma: float = 1.0,
    noise: Literal["gaussian", "logistic"] = "gaussian",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``max(0, x + sigma z)``; gradient ``dL/dh * 1[x + sigma z > 0]``."""
    key = draw_key(generator, x.device)
    acc = _acc(x.dtype)
    v = x.to(acc)
    if sigma != 0:
        v = v + sigma * standard_noise(key, x.shape, x.device, acc, noise == "logistic")
    return F.relu(v).to(x.dtype)


def reinforce(
    logits: torch.Tensor,
    h: torch.Tensor,
    loss: torch.Tensor,
    *,
    baseline: None | float | Baseline = None,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """0-valued surrogate with gradient ``(h - sigmoid(logits)) * (loss[b] - c_i)`` (/ B)."""
    batch = logits.shape[0]
    c = resolve_baseline(baseline, logits, h, loss)
    p = torch.sigmoid(logits.detach().to(c.dtype)).reshape(batch, -1)
    weight = (h.detach().to(c.dtype).reshape(batch, -1) - p) * (loss.detach().to(c.dtype)[:, None] - c)
    if reduction == "mean" and batch > 0:
        weight = weight / batch
    s = (logits.reshape(batch, -1) * weight.to(logits.dtype)).sum()
    return s - s.detach()


# ---------------------------------------------------------------------------------------
# Gated matmuls: the dense masked formulas.


def _chunk_mask(gates: torch.Tensor, features: int) -> torch.Tensor:
    """(B, C) gates -> (B, features) boolean mask of the units in active chunks."""
    chunk = features // gates.shape[1]
    return (gates != 0).repeat_interleave(chunk, dim=1)


class _GatedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, gates, full):
        pre = F.linear(x, weight, bias)
        mask = _chunk_mask(gates, weight.shape[0])
        g = gates.to(pre.dtype).repeat_interleave(weight.shape[0] // gates.shape[1], dim=1)
        ctx.save_for_backward(x, weight, bias, gates)
        ctx.full = full
        return torch.where(mask, g * pre, torch.zeros_like(pre))

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, gates = ctx.saved_tensors
        n, c = weight.shape[0], gates.shape[1]
        mask = _chunk_mask(gates, n)
        g = gates.to(dy.dtype).repeat_interleave(n // c, dim=1)
        dpre = torch.where(mask, g * dy, torch.zeros_like(dy))
        dx = dpre @ weight if ctx.needs_input_grad[0] else None
        dw = dpre.t() @ x if ctx.needs_input_grad[1] else None
        db = dpre.sum(0) if (bias is not None and ctx.needs_input_grad[2]) else None
        dgates = None
        if ctx.needs_input_grad[3]:
            pre = F.linear(x, weight, bias)
            if not ctx.full:
                pre = torch.where(mask, pre, torch.zeros_like(pre))
            dgates = (dy * pre).reshape(dy.shape[0], c, n // c).sum(-1).to(gates.dtype)
        return dx, dw, db, dgates, None


def gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gates: torch.Tensor,
    *,
    gate_grad: Literal["full", "active"] | None = None,
) -> torch.Tensor:
    """``y[b, chunk c] = gates[b, c] * (x[b] @ weight[chunk c].T + bias[chunk c])`` where
    ``gates[b, c] != 0``, exactly 0 elsewhere. ``dgates[b, c] = <dy[b, chunk c], x[b] @
    weight[chunk c].T + bias[chunk c]>`` for every pair (``"full"``) or active pairs only
    (``"active"``)."""
    full = (gate_grad or "full") == "full"
    return _GatedLinear.apply(x, weight, bias, gates, full)


def gated_input_linear(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gates: torch.Tensor
) -> torch.Tensor:
    """``y[b] = sum over active chunks c of h[b, chunk c] @ weight[:, chunk c].T + bias``;
    entries of ``h`` in gated-off chunks do not contribute (not even a NaN)."""
    mask = _chunk_mask(gates, weight.shape[1])
    return F.linear(torch.where(mask, h, torch.zeros_like(h)), weight, bias)
