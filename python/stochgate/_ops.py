"""torch.library registrations of the compiled ops: fake (meta) kernels for tracing and
autograd formulas that call the fused backward ops.

Data flows one way: a public wrapper (estimators.py, gated.py) calls
``torch.ops.stochgate.<op>``, the dispatcher picks the CPU or CUDA kernel, and autograd
calls ``torch.ops.stochgate.<op>_backward`` the same way. Nothing here falls back to
``stochgate.reference``.
"""

from __future__ import annotations

import torch

from . import _C_loader

_C = _C_loader.load()
ops = torch.ops.stochgate

_KEY_HIGH = 2**62


def draw_key(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The (seed, offset) key of one sampling call, drawn from ``generator`` (or the default
    generator of ``device``): an int64 tensor of 2 elements. A CUDA key stays on the GPU and is
    read by the kernel, so drawing it never synchronises with the host."""
    if generator is None:
        return torch.randint(0, _KEY_HIGH, (2,), dtype=torch.int64, device=device)
    key = torch.randint(
        0, _KEY_HIGH, (2,), dtype=torch.int64, device=generator.device, generator=generator
    )
    if device.type == "cpu" and key.device.type != "cpu":
        # A CPU op must not be dispatched to CUDA because its key lives there.
        key = key.cpu()
    return key


# ---------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and devices only. The kernels return contiguous tensors.


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _like(name: str) -> None:
    @torch.library.register_fake(f"stochgate::{name}")
    def _fake(t, *args):  # noqa: ANN001
        return _contiguous_like(t)


for _name in (
    "binary_sample",
    "straight_through",
    "stochastic_times_smooth",
    "noisy_rectifier",
    "noisy_rectifier_backward",
):
    _like(_name)


@torch.library.register_fake("stochgate::straight_through_backward")
def _(grad, logits):
    return _contiguous_like(logits)


@torch.library.register_fake("stochgate::stochastic_times_smooth_backward")
def _(grad, logits, h):
    return _contiguous_like(logits)


@torch.library.register_fake("stochgate::reinforce")
def _(logits, h, loss, baseline, scale):
    return logits.new_empty(())


@torch.library.register_fake("stochgate::reinforce_backward")
def _(grad, logits, h, loss, baseline, scale):
    return _contiguous_like(logits)


# ---------------------------------------------------------------------------------------
# Autograd: each estimator's gradient (DESIGN.md, the paper's equations).


def _st_setup(ctx, inputs, output):
    logits, _key, sigmoid_variant = inputs
    ctx.sigmoid_variant = sigmoid_variant
    ctx.save_for_backward(logits if sigmoid_variant else None)


def _st_backward(ctx, grad):
    if not ctx.sigmoid_variant:
        return grad, None, None  # eq. 13: dL/da = dL/dh
    (logits,) = ctx.saved_tensors
    return ops.straight_through_backward(grad.contiguous(), logits), None, None


torch.library.register_autograd(
    "stochgate::straight_through", _st_backward, setup_context=_st_setup
)


def _sts_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output)


def _sts_backward(ctx, grad):
    logits, h = ctx.saved_tensors
    return ops.stochastic_times_smooth_backward(grad.contiguous(), logits, h), None


torch.library.register_autograd(
    "stochgate::stochastic_times_smooth", _sts_backward, setup_context=_sts_setup
)


def _noisy_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _noisy_backward(ctx, grad):
    (h,) = ctx.saved_tensors
    return ops.noisy_rectifier_backward(grad.contiguous(), h), None, None, None


torch.library.register_autograd(
    "stochgate::noisy_rectifier", _noisy_backward, setup_context=_noisy_setup
)


def _reinforce_setup(ctx, inputs, output):
    logits, h, loss, baseline, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(logits, h, loss, baseline)


def _reinforce_backward(ctx, grad):
    logits, h, loss, baseline = ctx.saved_tensors
    dlogits = ops.reinforce_backward(grad, logits, h, loss, baseline, ctx.scale)
    return dlogits, None, None, None, None


torch.library.register_autograd(
    "stochgate::reinforce", _reinforce_backward, setup_context=_reinforce_setup
)


# ---------------------------------------------------------------------------------------
# Gated matmuls: fake kernels and autograd. Backward outputs that output_mask does not ask
# for come back from the kernels as empty (0,) tensors.


def _empty0(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((0,))


@torch.library.register_fake("stochgate::gated_linear")
def _(x, weight, bias, gates, full_gate_grad=True):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("stochgate::gated_linear_backward")
def _(grad_y, x, weight, bias, gates, output_mask, full_gate_grad):
    dx = x.new_empty(x.shape) if output_mask[0] else _empty0(x)
    dw = x.new_empty(weight.shape) if output_mask[1] else _empty0(x)
    db = x.new_empty((weight.shape[0],)) if (output_mask[2] and bias is not None) else _empty0(x)
    dg = gates.new_empty(gates.shape) if output_mask[3] else _empty0(gates)
    return dx, dw, db, dg


@torch.library.register_fake("stochgate::gated_input_linear")
def _(h, weight, bias, gates):
    return h.new_empty((h.shape[0], weight.shape[0]))


@torch.library.register_fake("stochgate::gated_input_linear_backward")
def _(grad_y, h, weight, gates, output_mask):
    dh = h.new_empty(h.shape) if output_mask[0] else _empty0(h)
    dw = h.new_empty(weight.shape) if output_mask[1] else _empty0(h)
    db = h.new_empty((weight.shape[0],)) if output_mask[2] else _empty0(h)
    return dh, dw, db


def _gated_linear_setup(ctx, inputs, output):
    x, weight, bias, gates, full_gate_grad = inputs
    ctx.full_gate_grad = full_gate_grad
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, gates)


def _gated_linear_backward(ctx, grad):
    x, weight, bias, gates = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], ctx.has_bias and need[2], need[3]]
    if not any(mask):
        return None, None, None, None, None
    dx, dw, db, dg = ops.gated_linear_backward(
        grad.contiguous(), x, weight, bias, gates, mask, ctx.full_gate_grad
    )
    return (
        dx if mask[0] else None,
        dw if mask[1] else None,
        db if mask[2] else None,
        dg if mask[3] else None,
        None,
    )


torch.library.register_autograd(
    "stochgate::gated_linear", _gated_linear_backward, setup_context=_gated_linear_setup
)


def _gated_input_linear_setup(ctx, inputs, output):
    h, weight, bias, gates = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(h, weight, gates)


def _gated_input_linear_backward(ctx, grad):
    h, weight, gates = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], ctx.has_bias and need[2]]
    if not any(mask):
        return None, None, None, None
    dh, dw, db = ops.gated_input_linear_backward(grad.contiguous(), h, weight, gates, mask)
    # gates only select which units are read: their gradient is zero almost everywhere.
    return (dh if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None)


torch.library.register_autograd(
    "stochgate::gated_input_linear",
    _gated_input_linear_backward,
    setup_context=_gated_input_linear_setup,
)
