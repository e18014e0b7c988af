"""Gated matmuls: linear layers that skip the work of gated-off chunks (conditional
computation, the point of Bengio, Leonard & Courville 2013).

A layer's units are split into ``C`` equal chunks of ``chunk = units // C`` units; per example
``b``, ``gates[b, c] == 0`` switches chunk ``c`` off. The kernels never compute (or read) the
switched-off part, so forward and backward cost falls with the fraction of active gates.
A pair of layers ``gated_input_linear(gated_linear(x, W1, b1, g), W2, b2, g)`` computes
``W2 (g * (W1 x + b1)) + b2`` at a cost proportional to the density of ``g``.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._ops import ops
from .estimators import _check_float

__all__ = ["gated_linear", "gated_input_linear"]

GateGrad = Literal["full", "active"]


def _check(
    op: str,
    a_name: str,
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gates: torch.Tensor,
    gated_units: int,
    gated_what: str,
) -> None:
    """Shape, dtype and device checks with messages naming the argument and shapes."""
    if a.dim() != 2:
        raise ValueError(f"{op}: {a_name} must be 2-D (B, features), got shape {tuple(a.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D, got shape {tuple(weight.shape)}")
    if gates.dim() != 2:
        raise ValueError(f"{op}: gates must be 2-D (B, C), got shape {tuple(gates.shape)}")
    if weight.shape[1] != a.shape[1]:
        raise ValueError(
            f"{op}: weight {tuple(weight.shape)} does not match {a_name} {tuple(a.shape)}: "
            f"weight.shape[1] must equal {a_name}.shape[1]"
        )
    if gates.shape[0] != a.shape[0]:
        raise ValueError(
            f"{op}: gates {tuple(gates.shape)} must have {a.shape[0]} rows to match "
            f"{a_name} {tuple(a.shape)}"
        )
    num_chunks = gates.shape[1]
    if num_chunks == 0 or gated_units % num_chunks != 0:
        raise ValueError(
            f"{op}: the {gated_units} gated {gated_what} units (weight {tuple(weight.shape)}) "
            f"must split into gates.shape[1] = {num_chunks} equal chunks"
        )
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{op}: bias must have shape ({weight.shape[0]},) to match weight "
                f"{tuple(weight.shape)}, got {tuple(bias.shape)}"
            )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != a.dtype:
            raise ValueError(f"{op}: {a_name} and {name} must have one dtype, got {a.dtype} and {t.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("gates", gates)):
        if t is not None and t.device != a.device:
            raise ValueError(
                f"{op}: {a_name} and {name} must be on one device, got {a.device} and {t.device}"
            )


def _autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast to the autocast dtype of the first tensor's device, as F.linear does."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gates: torch.Tensor,
    *,
    gate_grad: GateGrad | None = None,
) -> torch.Tensor:
    """Linear layer whose output chunks are switched on and off per example.

    ``y[b, chunk c] = gates[b, c] * (x[b] @ weight[chunk c].T + bias[chunk c])`` where
    ``gates[b, c] != 0``, and exactly ``0`` elsewhere: gated-off chunks are never computed, so
    no NaN/Inf from them reaches ``y`` and the cost is proportional to the active fraction.
    Chunk ``c`` is output units ``[c * N // C, (c + 1) * N // C)``.

    Shapes: ``x (B, K)``, ``weight (N, K)`` (the ``nn.Linear`` layout), ``bias (N,)`` or
    ``None``, ``gates (B, C)`` with ``N % C == 0``; returns ``(B, N)``, contiguous, in ``x``'s
    dtype. Dtypes: float16, bfloat16, float32, float64 (``x``, ``weight``, ``bias`` of one
    dtype; ``gates`` any floating dtype). Under ``torch.autocast`` ``x``, ``weight`` and
    ``bias`` are cast to the autocast dtype, as for ``F.linear``.

    Gradients (active pairs only: their cost also scales with the density):
    ``dx[b] = sum_c gates[b, c] * dy[b, chunk c] @ weight[chunk c]``,
    ``dweight[chunk c] = sum_b gates[b, c] * dy[b, chunk c].T x[b]``, ``dbias`` likewise, and
    ``dgates[b, c] = <dy[b, chunk c], x[b] @ weight[chunk c].T + bias[chunk c]>``.

    ``gate_grad`` chooses how ``dgates`` treats gated-off pairs, whose product was skipped:

    - ``"full"`` (the default when ``gates`` requires grad): exact for every pair; the
      backward then computes the dense product once (dense cost).
    - ``"active"``: gated-off pairs get gradient 0 and the backward stays sparse. This is a
      *biased* approximation of the gradient (it ignores what switching a chunk on would do).

    With REINFORCE (:func:`stochgate.reinforce`) the gates need no gradient through this op at
    all: pass gates that do not require grad and the whole training step stays sparse.
    """
    op = "stochgate.gated_linear"
    for name, t in (("x", x), ("weight", weight), ("gates", gates)):
        _check_float(name, t)
    if gate_grad not in (None, "full", "active"):
        raise ValueError(f"{op}: gate_grad must be None, 'full' or 'active', got {gate_grad!r}")
    x, weight, bias = _autocast(x, weight, bias)
    _check(op, "x", x, weight, bias, gates, weight.shape[0] if weight.dim() == 2 else 0, "output")
    full = gate_grad != "active"
    return ops.gated_linear(x, weight, bias, gates, full)


def gated_input_linear(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gates: torch.Tensor
) -> torch.Tensor:
    """Linear layer whose input chunks are switched on and off per example: the layer after
    :func:`gated_linear` in a gated block.

    ``y[b] = sum over c with gates[b, c] != 0 of h[b, chunk c] @ weight[:, chunk c].T + bias``.
    The gate only selects (its value does not multiply: :func:`gated_linear` already applied
    it), and entries of ``h`` in gated-off chunks are never read, so a NaN there cannot leak.
    Chunk ``c`` is input units ``[c * N // C, (c + 1) * N // C)``.

    Shapes: ``h (B, N)``, ``weight (M, N)``, ``bias (M,)`` or ``None``, ``gates (B, C)`` with
    ``N % C == 0``; returns ``(B, M)``, contiguous, in ``h``'s dtype. Dtypes and autocast as
    for :func:`gated_linear`.

    Gradients: ``dh[b, chunk c] = dy[b] @ weight[:, chunk c]`` for active pairs and 0
    elsewhere; ``dweight[:, chunk c] = sum over active b of dy[b].T h[b, chunk c]``;
    ``dbias = dy.sum(0)``. ``gates`` gets no gradient (the output is piecewise constant in
    them).
    """
    op = "stochgate.gated_input_linear"
    for name, t in (("h", h), ("weight", weight), ("gates", gates)):
        _check_float(name, t)
    h, weight, bias = _autocast(h, weight, bias)
    _check(op, "h", h, weight, bias, gates, weight.shape[1] if weight.dim() == 2 else 0, "input")
    return ops.gated_input_linear(h, weight, bias, gates)
