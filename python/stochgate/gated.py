"""Gated matmuls: linear layers that skip the work of gated-off chunks (conditional
computation, the point of Bengio, Leonard & Courville 2013).

A layer's units are split into ``C`` equal chunks of ``chunk = units // C`` units; per example
``b``, ``gates[b, c] == 0`` switches chunk ``c`` off. The kernels never compute (or read) the
switched-off part, so forward and backward cost falls with the fraction of active gates.
A pair of layers ``gated_input_linear(gated_linear(x, W1, b1, g), W2, b2, g)`` computes
``W2 (g * (W1 x + b1)) + b2`` at a cost proportional to the density of ``g``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

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


def _check_threshold(op: str, density_threshold: float | None) -> None:
    if density_threshold is None:
        return
    ok = isinstance(density_threshold, (int, float)) and not isinstance(density_threshold, bool)
    if not ok or math.isnan(density_threshold) or not 0.0 <= density_threshold <= 1.0:
        raise ValueError(
            f"{op}: density_threshold must be None or a number in [0, 1], got {density_threshold!r}"
        )


def _dense_mask(gates: torch.Tensor, density_threshold: float | None) -> torch.Tensor | None:
    """``gates != 0`` when more than ``density_threshold`` of the gates are nonzero, else None
    (the count is read on the host: on CUDA, one synchronisation)."""
    if density_threshold is None or gates.numel() == 0:
        return None
    on = gates != 0
    return on if int(on.sum()) > density_threshold * gates.numel() else None


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _by_chunk(t: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, C, chunk) view, or t itself at chunk 1 (broadcasting against a (B, C, 1)
    operand runs element by element there)."""
    b, c = gates.shape
    return t if t.shape[1] == c else t.reshape(b, c, -1)


def _per_chunk(v: torch.Tensor, t3: torch.Tensor) -> torch.Tensor:
    """(B, C) -> a shape that broadcasts against _by_chunk's result."""
    return v if t3.dim() == 2 else v.unsqueeze(-1)


def _keep_on(t: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """t (B, N) with the entries of gated-off chunks set to exact zeros: NaN/Inf there do not
    survive. At chunk 1 by a bitwise AND with an all-ones / all-zeros mask: ``torch.where``
    with a random mask takes a branch per element (7 ms against 3 for 1024 x 2048 here)."""
    t3 = _by_chunk(t, on)
    if t3.dim() == 2:
        it = _SAME_SIZE_INT[t.element_size()]
        return (t.contiguous().view(it) & on.to(it).neg_()).view(t.dtype)
    return torch.where(on.unsqueeze(-1), t3, 0).view(t.shape)


def _gated(t: torch.Tensor, gates: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """gates[b, c] * t[b, chunk c], exact zeros in the gated-off chunks."""
    t3 = _by_chunk(t, gates)
    return _keep_on((_per_chunk(gates.to(t.dtype), t3) * t3).view(t.shape), on)


class _DenseGatedLinear(torch.autograd.Function):
    """:func:`gated_linear` through one dense product (``density_threshold``): every output
    computed, the gated-off ones set to exact zeros; the same gradients as the sparse op,
    ``gate_grad`` included."""

    @staticmethod
    def forward(ctx, x, weight, bias, gates, on, full):
        pre = F.linear(x, weight, bias)
        ctx.full = full
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, gates, on, pre if ctx.needs_input_grad[3] else None)
        return _gated(pre, gates, on)

    @staticmethod
    def backward(ctx, dy):
        x, weight, gates, on, pre = ctx.saved_tensors
        dpre = _gated(dy.contiguous(), gates, on)
        dx = dpre @ weight if ctx.needs_input_grad[0] else None
        dweight = dpre.t() @ x if ctx.needs_input_grad[1] else None
        dbias = dpre.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dgates = None
        if ctx.needs_input_grad[3]:
            prod = dy * pre if ctx.full else _keep_on(dy * pre, on)
            dgates = prod.reshape(gates.shape[0], gates.shape[1], -1).sum(-1).to(gates.dtype)
        return dx, dweight, dbias, dgates, None, None


class _DenseGatedInputLinear(torch.autograd.Function):
    """:func:`gated_input_linear` through one dense product (``density_threshold``): ``h`` with
    its gated-off entries set to zeros (so they still cannot leak), the same gradients
    (``full``: ``h_grad="full"``, dh on every chunk)."""

    @staticmethod
    def forward(ctx, h, weight, bias, on, full):
        h_on = _keep_on(h, on)
        ctx.has_bias = bias is not None
        ctx.full = full
        ctx.save_for_backward(h_on, weight, on)
        return F.linear(h_on, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        h_on, weight, on = ctx.saved_tensors
        dh = None
        if ctx.needs_input_grad[0]:
            dh = dy @ weight if ctx.full else _keep_on(dy @ weight, on)
        dweight = dy.t() @ h_on if ctx.needs_input_grad[1] else None
        dbias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dh, dweight, dbias, None, None


class _FullInputGrad(torch.autograd.Function):
    """:func:`gated_input_linear` with ``h_grad="full"``: the sparse op's value and its weight
    and bias gradients, and ``dh = dy @ weight`` on every chunk (one dense product)."""

    @staticmethod
    def forward(ctx, h, weight, bias, gates):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(h, weight, gates)
        return ops.gated_input_linear(h, weight, bias, gates)

    @staticmethod
    def backward(ctx, dy):
        h, weight, gates = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [False, need[1], ctx.has_bias and need[2]]
        dweight = dbias = None
        if mask[1] or mask[2]:
            _, dweight, dbias = ops.gated_input_linear_backward(dy.contiguous(), h, weight, gates, mask)
        dh = dy @ weight if need[0] else None
        return dh, dweight if mask[1] else None, dbias if mask[2] else None, None


def gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gates: torch.Tensor,
    *,
    gate_grad: GateGrad | None = None,
    density_threshold: float | None = None,
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
      backward then computes the dense product once (dense cost). A gated-off pair's gradient
      is ``<dy, pre>`` with the ``dy`` this op receives there: followed by
      :func:`gated_input_linear`, pass it ``h_grad="full"``, or that ``dy`` is 0.
    - ``"active"``: gated-off pairs get gradient 0 and the backward stays sparse. This is a
      *biased* approximation of the gradient (it ignores what switching a chunk on would do).

    With REINFORCE (:func:`stochgate.reinforce`) the gates need no gradient through this op at
    all: pass gates that do not require grad and the whole training step stays sparse.

    ``density_threshold`` (off by default): when more than this fraction of ``gates`` is
    nonzero, compute the layer densely instead (one ``F.linear`` over every unit, gated-off
    outputs set to exact zeros; the same values and gradients up to rounding). Above the
    break-even density, where skipping costs more than it saves, that is faster: on the CPU
    ``stochgate bench`` measured it near 0.2-0.3 for per-unit gates (chunk 1) and near 1 for
    chunks of 64 in float32, 0.5-0.7 for chunks of 64 in bfloat16 on AMX (see the README).
    Deciding reads the number of nonzero gates on the host, so
    on CUDA it synchronises once per call and cannot be captured in a CUDA graph or compiled
    with ``fullgraph=True``; the dense path also reads every weight row, so a NaN in the
    weights of a gated-off chunk reaches ``dx`` (not ``y``).

    Reproducibility on CUDA: ``dx`` sums each row's chunks with fp32 atomic additions, whose
    order varies, so its last bits can differ from run to run (as for ``index_add_`` in
    PyTorch); under ``torch.use_deterministic_algorithms(True)`` it sums per-chunk partials in
    chunk order instead: bit for bit reproducible, slower. Everything else, and every CPU
    result, is deterministic either way.
    """
    op = "stochgate.gated_linear"
    for name, t in (("x", x), ("weight", weight), ("gates", gates)):
        _check_float(name, t)
    if gate_grad not in (None, "full", "active"):
        raise ValueError(f"{op}: gate_grad must be None, 'full' or 'active', got {gate_grad!r}")
    _check_threshold(op, density_threshold)
    x, weight, bias = _autocast(x, weight, bias)
    _check(op, "x", x, weight, bias, gates, weight.shape[0] if weight.dim() == 2 else 0, "output")
    full = gate_grad != "active"
    on = _dense_mask(gates, density_threshold)
    if on is not None:
        return _DenseGatedLinear.apply(x, weight, bias, gates, on, full)
    return ops.gated_linear(x, weight, bias, gates, full)


def gated_input_linear(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gates: torch.Tensor,
    *,
    h_grad: Literal["active", "full"] = "active",
    density_threshold: float | None = None,
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

    Gradients: ``dh[b, chunk c] = dy[b] @ weight[:, chunk c]`` for active pairs and, with the
    default ``h_grad="active"``, 0 elsewhere (the op never reads those entries);
    ``dweight[:, chunk c] = sum over active b of dy[b].T h[b, chunk c]``; ``dbias = dy.sum(0)``.
    ``gates`` gets no gradient (the output is piecewise constant in them).

    ``h_grad="full"``: ``dh = dy @ weight`` on every chunk (one dense product in backward), the
    gradient of ``h @ weight.T + bias``, which equals this op whenever ``h`` is zero in the
    gated-off chunks -- as the output of :func:`gated_linear` with the same gates is. Use it
    after ``gated_linear(..., gate_grad="full")`` so that gates that sampled 0 get their
    straight-through gradient ``<weight[:, chunk c].T dy[b], pre[b, chunk c]>``: with the
    default, the block gives them 0 (their ``dh`` is 0), and the exact gate gradient's dense
    product in ``gated_linear`` is spent for nothing. The pair then gives the same gradients as
    the dense block ``(g ⊙ (x @ W1.T + b1)) @ W2.T + b2``.

    ``density_threshold`` as for :func:`gated_linear`: above it, one dense ``F.linear`` over
    ``h`` with its gated-off entries replaced by zeros (so they still cannot leak).

    Reproducibility on CUDA: ``y`` sums each row's chunks with fp32 atomic additions (last bits
    can vary from run to run); ``torch.use_deterministic_algorithms(True)`` selects the
    deterministic, slower, sum in chunk order, as for ``dx`` of :func:`gated_linear`.
    """
    op = "stochgate.gated_input_linear"
    for name, t in (("h", h), ("weight", weight), ("gates", gates)):
        _check_float(name, t)
    if h_grad not in ("active", "full"):
        raise ValueError(f"{op}: h_grad must be 'active' or 'full', got {h_grad!r}")
    _check_threshold(op, density_threshold)
    h, weight, bias = _autocast(h, weight, bias)
    _check(op, "h", h, weight, bias, gates, weight.shape[1] if weight.dim() == 2 else 0, "input")
    on = _dense_mask(gates, density_threshold)
    if on is not None:
        return _DenseGatedInputLinear.apply(h, weight, bias, on, h_grad == "full")
    if h_grad == "full" and h.requires_grad and torch.is_grad_enabled():
        return _FullInputGrad.apply(h, weight, bias, gates)
    return ops.gated_input_linear(h, weight, bias, gates)
