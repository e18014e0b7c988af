"""CUDA kernels of the gated matmuls (csrc/cuda/gated_linear*.cu), called through
torch.ops.stochgate directly: forward and backward against stochgate.reference in every dtype,
shapes that hit each code path (unaligned chunks, chunk = 1, chunk = N, several row tiles and
routing tiles, the per-row and the grouped row reductions, the latter both by fp32 atomics
(the default) and deterministically), edge gates, CPU-vs-CUDA agreement, determinism under
torch.use_deterministic_algorithms, and capture in a CUDA graph (no host synchronisation).

Run on a GPU machine with ``pytest -m cuda tests/test_gated_linear_cuda.py``; everything here
is skipped without a GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import stochgate  # noqa: F401  (loads the extension and registers the ops)
from stochgate import reference as R

HAS_CUDA = torch.cuda.is_available()


def _has_cuda_kernel(name: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"stochgate::{name}", "CUDA")
    except Exception:  # noqa: BLE001
        return False


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        HAS_CUDA and not _has_cuda_kernel("gated_linear"),
        reason="stochgate was built without CUDA kernels",
    ),
]

ops = torch.ops.stochgate
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
# (B, K, N, C) for gated_linear; for gated_input_linear the same tuple reads (B, M, N, C):
# h (B, N), weight (M, N). Comments name the path each shape exercises.
SHAPES = [
    (7, 13, 15, 15),  # chunk = 1 (per-unit gating), odd sizes: scalar loads, per-row reduction
    (5, 9, 21, 1),  # chunk = N, one group
    (37, 53, 60, 5),  # chunk 12 < 16, K odd: unaligned, per-row reduction
    (33, 31, 48, 3),  # chunk 16, K odd: grouped, scalar loads for x
    (64, 64, 128, 4),  # chunk 32, every operand 16-byte aligned: cp.async everywhere
    (130, 96, 256, 2),  # chunk 128 = one full N tile, B > 128: two M tiles per group
    (300, 136, 384, 3),  # chunk 128, K not a multiple of the 32-wide K step, 3 M tiles
    (9, 70, 38, 2),  # chunk 19: unaligned grouped path
]


def _gates(B, C, density, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(B, C, generator=g) < density
    vals = 0.5 + torch.rand(B, C, generator=g)
    return (vals * on).to(device="cuda", dtype=dtype)


def _linear_data(B, K, N, C, dtype, density=0.4, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g).to("cuda", dtype)
    w = (torch.randn(N, K, generator=g) / max(K, 1) ** 0.5).to("cuda", dtype)
    b = torch.randn(N, generator=g).to("cuda", dtype) if bias else None
    return x, w, b, _gates(B, C, density, seed=seed + 1)


def _input_linear_data(B, M, N, C, dtype, density=0.4, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, generator=g).to("cuda", dtype)
    w = (torch.randn(M, N, generator=g) / max(N, 1) ** 0.5).to("cuda", dtype)
    b = torch.randn(M, generator=g).to("cuda", dtype) if bias else None
    return h, w, b, _gates(B, C, density, seed=seed + 1)


@contextlib.contextmanager
def _deterministic():
    """torch.use_deterministic_algorithms(True) for the block: the row reductions
    (gated_input_linear, gated_linear's dx) then sum in chunk order, bit for bit reproducible,
    instead of by fp32 atomics. warn_only: torch's own cuBLAS calls only warn."""
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def _eps(dtype):
    return {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[
        dtype
    ]


def _check(name, out, ref64, ref_lowp, dtype, result_dtype=None):
    """The kernel's error against float64 must stay within a small multiple of PyTorch's own
    error when it runs the reference in `dtype`, plus a few ulps of the result's scale."""
    assert out.dtype == ref_lowp.dtype, f"{name}: dtype {out.dtype} != {ref_lowp.dtype}"
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.is_contiguous(), f"{name} is not contiguous"
    if ref64.numel() == 0:
        return
    o, r, lp = out.double(), ref64.double(), ref_lowp.double()
    assert torch.isfinite(o).all(), f"{name}: non-finite values"
    err = (o - r).abs().max().item()
    torch_err = (lp - r).abs().max().item()
    scale = max(r.abs().max().item(), 1.0)
    # The result cannot be closer than its own dtype's rounding (dgates come back in the
    # gates' dtype, float32 here, also for float64 inputs).
    eps = max(_eps(dtype), _eps(result_dtype or out.dtype))
    bound = 4 * torch_err + 8 * eps * scale
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} (torch's own {torch_err:.3g})"


def _ref_linear(x, w, b, gates, dy, gate_grad, dtype):
    """Output and gradients (x, w, b, gates) of the reference, in `dtype`."""
    args = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    g = gates.detach().to(dtype if dtype == torch.float64 else gates.dtype).requires_grad_()
    y = R.gated_linear(args[0], args[1], args[2], g, gate_grad=gate_grad)
    grads = torch.autograd.grad(y, [a for a in args if a is not None] + [g], dy.to(dtype))
    grads = list(grads)
    dx, dw = grads[0], grads[1]
    db = grads[2] if b is not None else None
    dg = grads[-1]
    return y.detach(), dx, dw, db, dg


def _ref_input_linear(h, w, b, gates, dy, dtype):
    args = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (h, w, b)]
    y = R.gated_input_linear(args[0], args[1], args[2], gates)
    grads = torch.autograd.grad(y, [a for a in args if a is not None], dy.to(dtype))
    db = grads[2] if b is not None else None
    return y.detach(), grads[0], grads[1], db


# ---------------------------------------------------------------------------------------
# gated_linear


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_linear_forward(dtype, shape):
    B, K, N, C = shape
    x, w, b, gates = _linear_data(B, K, N, C, dtype)
    y = ops.gated_linear(x, w, b, gates)
    ref64 = R.gated_linear(x.double(), w.double(), b.double(), gates)
    ref_lp = R.gated_linear(x, w, b, gates)
    _check("y", y, ref64, ref_lp, dtype)
    # Gated-off chunks are exact zeros.
    off = (gates == 0).repeat_interleave(N // C, dim=1)
    assert (y[off] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("full", [True, False], ids=["full", "active"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gated_linear_backward(dtype, shape, full, bias):
    B, K, N, C = shape
    x, w, b, gates = _linear_data(B, K, N, C, dtype, bias=bias)
    dy = torch.randn(B, N, device="cuda").to(dtype)
    dx, dw, db, dg = ops.gated_linear_backward(dy, x, w, b, gates, [True, True, True, True], full)
    gate_grad = "full" if full else "active"
    r64 = _ref_linear(x, w, b, gates, dy, gate_grad, torch.float64)
    rlp = _ref_linear(x, w, b, gates, dy, gate_grad, dtype)
    _check("dx", dx, r64[1], rlp[1], dtype)
    _check("dweight", dw, r64[2], rlp[2], dtype)
    if bias:
        _check("dbias", db, r64[3], rlp[3], dtype)
    else:
        assert db.shape == (0,)
    assert dg.dtype == gates.dtype
    _check("dgates", dg.to(rlp[4].dtype), r64[4].to(torch.float64), rlp[4], dtype, result_dtype=dg.dtype)
    if not full:
        assert (dg[gates == 0] == 0).all()


def test_gated_linear_backward_output_mask():
    x, w, b, gates = _linear_data(40, 32, 64, 4, torch.bfloat16)
    dy = torch.randn(40, 64, device="cuda", dtype=torch.bfloat16)
    with _deterministic():  # dx compared bit for bit
        full = ops.gated_linear_backward(dy, x, w, b, gates, [True, True, True, True], True)
        for i in range(4):
            mask = [j == i for j in range(4)]
            out = ops.gated_linear_backward(dy, x, w, b, gates, mask, True)
            for j in range(4):
                if j == i:
                    torch.testing.assert_close(out[j], full[j], rtol=0, atol=0)
                else:
                    assert out[j].shape == (0,), (i, j, out[j].shape)


# ---------------------------------------------------------------------------------------
# gated_input_linear


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gated_input_linear_forward_backward(dtype, shape, bias):
    B, M, N, C = shape
    h, w, b, gates = _input_linear_data(B, M, N, C, dtype, bias=bias)
    y = ops.gated_input_linear(h, w, b, gates)
    dy = torch.randn(B, M, device="cuda").to(dtype)
    dh, dw, db = ops.gated_input_linear_backward(dy, h, w, gates, [True, True, bias])
    r64 = _ref_input_linear(h, w, b, gates, dy, torch.float64)
    rlp = _ref_input_linear(h, w, b, gates, dy, dtype)
    _check("y", y, r64[0], rlp[0], dtype)
    _check("dh", dh, r64[1], rlp[1], dtype)
    _check("dweight", dw, r64[2], rlp[2], dtype)
    if bias:
        _check("dbias", db, r64[3], rlp[3], dtype)
    off = (gates == 0).repeat_interleave(N // C, dim=1)
    assert (dh[off] == 0).all()


def test_gated_input_linear_backward_output_mask():
    h, w, _, gates = _input_linear_data(40, 48, 64, 4, torch.float16)
    dy = torch.randn(40, 48, device="cuda", dtype=torch.float16)
    full = ops.gated_input_linear_backward(dy, h, w, gates, [True, True, True])
    for i in range(3):
        mask = [j == i for j in range(3)]
        out = ops.gated_input_linear_backward(dy, h, w, gates, mask)
        for j in range(3):
            if j == i:
                torch.testing.assert_close(out[j], full[j], rtol=0, atol=0)
            else:
                assert out[j].shape == (0,)


# ---------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("C", [1, 4, 64])
@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_all_zero_and_all_one_gates(C, fill):
    B, K, N = 50, 40, 128
    x, w, b, _ = _linear_data(B, K, N, C, torch.float32)
    gates = torch.full((B, C), fill, device="cuda")
    y = ops.gated_linear(x, w, b, gates)
    y2 = ops.gated_input_linear(y, torch.randn(24, N, device="cuda"), None, gates)
    if fill == 0:
        assert (y == 0).all() and (y2 == 0).all()
    else:
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
    dy = torch.randn(B, N, device="cuda")
    dx, dw, db, dg = ops.gated_linear_backward(dy, x, w, b, gates, [True] * 4, False)
    if fill == 0:
        for t in (dx, dw, db, dg):
            assert (t == 0).all()
    else:
        torch.testing.assert_close(dx, dy @ w, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(dw, dy.t() @ x, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(db, dy.sum(0), rtol=1e-5, atol=1e-4)


def test_batch_zero():
    x, w, b, gates = _linear_data(0, 16, 32, 4, torch.bfloat16)
    y = ops.gated_linear(x, w, b, gates)
    assert y.shape == (0, 32)
    dy = torch.empty(0, 32, device="cuda", dtype=torch.bfloat16)
    dx, dw, db, dg = ops.gated_linear_backward(dy, x, w, b, gates, [True] * 4, True)
    assert dx.shape == (0, 16) and dg.shape == (0, 4)
    assert dw.shape == (32, 16) and (dw == 0).all() and (db == 0).all()
    h, w2, b2, _ = _input_linear_data(0, 8, 32, 4, torch.bfloat16)
    y2 = ops.gated_input_linear(h, w2, b2, gates)
    assert y2.shape == (0, 8)
    dh, dw2, db2 = ops.gated_input_linear_backward(
        torch.empty(0, 8, device="cuda", dtype=torch.bfloat16), h, w2, gates, [True] * 3
    )
    assert dh.shape == (0, 32) and (dw2 == 0).all() and (db2 == 0).all()


@pytest.mark.parametrize("C", [1, 8, 32])
def test_skipped_chunks_are_never_read(C):
    """NaN/Inf in what a gated-off chunk would touch must not reach the outputs."""
    B, K, N = 64, 32, 128
    x, w, b, gates = _linear_data(B, K, N, C, torch.float16, density=0.5)
    gates[:, 0] = 0  # chunk 0 off for every row: its weight rows are never read
    w[: N // C] = float("nan")
    y = ops.gated_linear(x, w, b, gates)
    assert torch.isfinite(y).all()
    dy = torch.randn(B, N, device="cuda", dtype=torch.float16)
    dx, dw, db, _ = ops.gated_linear_backward(dy, x, w, b, gates, [True, True, True, False], True)
    assert torch.isfinite(dx).all() and torch.isfinite(db).all()
    assert (dw[: N // C] == 0).all()
    # gated_input_linear: h in off chunks is never read.
    h, w2, b2, _ = _input_linear_data(B, 48, N, C, torch.float16)
    off = (gates == 0).repeat_interleave(N // C, dim=1)
    h = h.masked_fill(off, float("nan"))
    y2 = ops.gated_input_linear(h, w2, b2, gates)
    assert torch.isfinite(y2).all()
    dh, dw2, _ = ops.gated_input_linear_backward(
        torch.randn(B, 48, device="cuda", dtype=torch.float16), h, w2, gates, [True, True, False]
    )
    assert torch.isfinite(dh).all() and torch.isfinite(dw2).all()


def test_many_routing_tiles():
    """B spans several 1024-row routing tiles and many 128-row GEMM tiles; rows are sorted
    stably per chunk (the output only depends on the row, not on its rank)."""
    B, K, N, C = 5000, 64, 256, 4
    x, w, b, gates = _linear_data(B, K, N, C, torch.bfloat16, density=0.7)
    y = ops.gated_linear(x, w, b, gates)
    _check("y", y, R.gated_linear(x.double(), w.double(), b.double(), gates),
           R.gated_linear(x, w, b, gates), torch.bfloat16)
    h, w2, b2, _ = _input_linear_data(B, 96, N, C, torch.bfloat16)
    y2 = ops.gated_input_linear(h, w2, b2, gates)
    _check("y2", y2, R.gated_input_linear(h.double(), w2.double(), b2.double(), gates),
           R.gated_input_linear(h, w2, b2, gates), torch.bfloat16)


@pytest.mark.parametrize("gdtype", [torch.float16, torch.float64, torch.bfloat16])
def test_gate_dtypes(gdtype):
    x, w, b, gates = _linear_data(70, 48, 96, 6, torch.float32)
    g = gates.to(gdtype)
    y = ops.gated_linear(x, w, b, g)
    torch.testing.assert_close(y, R.gated_linear(x, w, b, g), rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    *_, dg = ops.gated_linear_backward(dy, x, w, b, g, [False, False, False, True], True)
    assert dg.dtype == gdtype and dg.shape == g.shape


def test_non_contiguous_inputs():
    B, K, N, C = 45, 40, 64, 4
    x, w, b, gates = _linear_data(B, K, N, C, torch.bfloat16)
    xt = x.t().contiguous().t()
    wt = w.t().contiguous().t()
    gt = gates.t().contiguous().t()
    assert not xt.is_contiguous() and not gt.is_contiguous()
    torch.testing.assert_close(ops.gated_linear(xt, wt, b, gt), ops.gated_linear(x, w, b, gates),
                               rtol=0, atol=0)
    hs = torch.randn(B, 2 * N, device="cuda", dtype=torch.bfloat16)[:, ::2]
    w2 = torch.randn(24, N, device="cuda", dtype=torch.bfloat16)
    with _deterministic():  # compared bit for bit
        torch.testing.assert_close(ops.gated_input_linear(hs, w2, None, gt),
                                   ops.gated_input_linear(hs.contiguous(), w2, None, gates),
                                   rtol=0, atol=0)


def test_deterministic():
    """Under torch.use_deterministic_algorithms(True) every output is reproducible bit for bit."""
    x, w, b, gates = _linear_data(600, 96, 256, 8, torch.bfloat16, density=0.6)
    dy = torch.randn(600, 256, device="cuda", dtype=torch.bfloat16)
    h, w2, b2, _ = _input_linear_data(600, 80, 256, 8, torch.bfloat16)
    with _deterministic():
        a = ops.gated_linear_backward(dy, x, w, b, gates, [True] * 4, False)
        c = ops.gated_linear_backward(dy, x, w, b, gates, [True] * 4, False)
        for t, u in zip(a, c):
            assert torch.equal(t, u)
        assert torch.equal(ops.gated_input_linear(h, w2, b2, gates), ops.gated_input_linear(h, w2, b2, gates))


# (B, M, N, C) for the grouped row reductions (chunk >= 16): M not a multiple of 4 or of the
# 128-column slice, rows with no active chunk (bias only), several slices.
REDUCE_SHAPES = [(130, 300, 256, 2), (517, 257, 384, 6), (64, 128, 64, 4), (1, 20, 32, 2)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", REDUCE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("slice_cols", [None, 128], ids=["one_slice", "slices_of_128"])
@pytest.mark.parametrize("red", ["pairs", "quads", "bulk"])
def test_row_reduce_atomic_and_deterministic(monkeypatch, dtype, shape, slice_cols, red):
    """gated_input_linear and gated_linear's dx sum a row's chunks by fp32 atomics into an
    accumulator (default; STOCHGATE_CUDA_REDUCE_BYTES caps it, here to force 128-column
    slices), each GEMM epilogue adding by 2-column or 4-column vector reductions or by bulk
    reductions of whole tile rows (STOCHGATE_CUDA_RED; M = 257 takes the 2-column path in
    every mode), or, in deterministic mode, through per-pair partials in chunk order: all
    against the reference, and against each other to within the order of fp32 additions."""
    monkeypatch.setenv("STOCHGATE_CUDA_RED", red)
    B, M, N, C = shape
    h, w2, b2, gates = _input_linear_data(B, M, N, C, dtype, density=0.5)
    gates[0] = 0  # a row with no active chunk: y = bias, dx = 0
    x, w, b, _ = _linear_data(B, M, N, C, dtype)  # gated_linear: x (B, M), weight (N, M)
    dy = torch.randn(B, N, device="cuda").to(dtype)
    if slice_cols is not None:
        monkeypatch.setenv("STOCHGATE_CUDA_REDUCE_BYTES", str(B * 4 * slice_cols))
    r64 = R.gated_input_linear(h.double(), w2.double(), b2.double(), gates)
    rlp = R.gated_input_linear(h, w2, b2, gates)
    dx64 = _ref_linear(x, w, b, gates, dy, "full", torch.float64)[1]
    dxlp = _ref_linear(x, w, b, gates, dy, "full", dtype)[1]
    outs = {}
    for mode in ("atomic", "deterministic"):
        ctx = _deterministic() if mode == "deterministic" else contextlib.nullcontext()
        with ctx:
            y = ops.gated_input_linear(h, w2, b2, gates)
            dx = ops.gated_linear_backward(dy, x, w, b, gates, [True, False, False, False], False)[0]
        _check(f"y ({mode})", y, r64, rlp, dtype)
        _check(f"dx ({mode})", dx, dx64, dxlp, dtype)
        torch.testing.assert_close(y[0], b2.expand(M).contiguous(), rtol=0, atol=0)
        assert (dx[0] == 0).all()
        outs[mode] = (y, dx)
    for a, d in zip(outs["atomic"], outs["deterministic"]):
        torch.testing.assert_close(a, d, rtol=1.6e-2 if dtype != torch.float32 else 1e-5, atol=1e-4)


def test_bad_inputs_raise():
    x, w, b, gates = _linear_data(8, 16, 32, 4, torch.float32)
    with pytest.raises(RuntimeError, match="gates"):
        ops.gated_linear(x, w, b, gates[:, :3])  # 32 % 3 != 0
    with pytest.raises(RuntimeError, match="weight"):
        ops.gated_linear(x, w[:, :15], b, gates)
    with pytest.raises(RuntimeError, match="bias"):
        ops.gated_linear(x, w, b[:31], gates)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.gated_linear(x, w.half(), b, gates)
    with pytest.raises(RuntimeError, match="device"):
        ops.gated_linear(x, w, b, gates.cpu())


# ---------------------------------------------------------------------------------------
# CPU vs CUDA, CUDA graphs


@pytest.mark.skipif(
    not torch._C._dispatch_has_kernel_for_dispatch_key("stochgate::gated_linear", "CPU"),
    reason="no CPU kernel registered",
)
@pytest.mark.parametrize("shape", [(37, 53, 60, 5), (130, 96, 256, 2), (33, 20, 24, 24)], ids=str)
def test_cpu_and_cuda_agree(shape):
    B, K, N, C = shape
    x, w, b, gates = _linear_data(B, K, N, C, torch.float32)
    dy = torch.randn(B, N, device="cuda")
    cu = [ops.gated_linear(x, w, b, gates)]
    cu += ops.gated_linear_backward(dy, x, w, b, gates, [True] * 4, False)
    cp = [ops.gated_linear(x.cpu(), w.cpu(), b.cpu(), gates.cpu())]
    cp += ops.gated_linear_backward(dy.cpu(), x.cpu(), w.cpu(), b.cpu(), gates.cpu(), [True] * 4, False)
    for name, a, c in zip(["y", "dx", "dw", "db", "dg"], cu, cp):
        torch.testing.assert_close(a.cpu(), c, rtol=1e-4, atol=1e-4, msg=name)
    h, w2, b2, _ = _input_linear_data(B, 40, N, C, torch.float32)
    dy2 = torch.randn(B, 40, device="cuda")
    cu = [ops.gated_input_linear(h, w2, b2, gates)]
    cu += ops.gated_input_linear_backward(dy2, h, w2, gates, [True] * 3)
    cp = [ops.gated_input_linear(h.cpu(), w2.cpu(), b2.cpu(), gates.cpu())]
    cp += ops.gated_input_linear_backward(dy2.cpu(), h.cpu(), w2.cpu(), gates.cpu(), [True] * 3)
    for name, a, c in zip(["y", "dh", "dw", "db"], cu, cp):
        torch.testing.assert_close(a.cpu(), c, rtol=1e-4, atol=1e-4, msg=name)


# (B, K, N, C) on the Hopper kernel's own edges: its 128 x 128 tile and 64-wide K step.
HOPPER_SHAPES = [
    (1, 64, 128, 1),  # one row, one tile, one K step
    (257, 72, 256, 4),  # chunk 64 (half an N tile), K = 64 + 8 (a tail vector)
    (50, 4104, 384, 3),  # long K with a tail, M < one tile
    (64, 256, 512, 1),  # chunk = N = 512: four N tiles per group
    (4096, 512, 2048, 16),  # 16 groups of 4-20 M tiles (skewed gates): more tiles than SMs
    (600, 64, 8192, 128),  # 128 groups of chunk 64: tiles in group order (> 64 groups)
]


def _check_every_product(monkeypatch, dtype, shape, configs):
    """gated_linear (forward, dx, dweight, dbias) and gated_input_linear (forward, dh, dweight,
    dbias) against the reference once per configuration: a dict of environment variables that
    pick the kernels."""
    B, K, N, C = shape
    x, w, b, gates = _linear_data(B, K, N, C, dtype, density=0.6)
    if B >= 1000:  # every other chunk keeps a quarter of its rows: groups of unequal tile counts
        gates[B // 4 :, ::2] = 0
    h, w2, b2, _ = _input_linear_data(B, K, N, C, dtype)
    dy = torch.randn(B, N, device="cuda").to(dtype)
    dy2 = torch.randn(B, K, device="cuda").to(dtype)
    ref64 = _ref_linear(x, w, b, gates, dy, "full", torch.float64)
    ref_lp = _ref_linear(x, w, b, gates, dy, "full", dtype)
    ref2_64 = _ref_input_linear(h, w2, b2, gates, dy2, torch.float64)
    ref2_lp = _ref_input_linear(h, w2, b2, gates, dy2, dtype)
    off = (gates == 0).repeat_interleave(N // C, dim=1)
    for env in configs:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        path = ", ".join(f"{k}={v}" for k, v in env.items())
        y = ops.gated_linear(x, w, b, gates)
        _check(f"y ({path})", y, ref64[0], ref_lp[0], dtype)
        assert (y[off] == 0).all(), path
        dx, dw, db, _ = ops.gated_linear_backward(dy, x, w, b, gates, [True, True, True, False], False)
        for name, got, i in (("dx", dx, 1), ("dweight", dw, 2), ("dbias", db, 3)):
            _check(f"{name} ({path})", got, ref64[i], ref_lp[i], dtype)
        _check(f"gated_input_linear ({path})", ops.gated_input_linear(h, w2, b2, gates), ref2_64[0], ref2_lp[0],
               dtype)
        dh, dw2, db2 = ops.gated_input_linear_backward(dy2, h, w2, gates, [True, True, True])
        for name, got, i in (("dh", dh, 1), ("dweight2", dw2, 2), ("dbias2", db2, 3)):
            _check(f"{name} ({path})", got, ref2_64[i], ref2_lp[i], dtype)
        assert (dh[off] == 0).all(), path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", HOPPER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_hopper_and_mma_kernels(monkeypatch, dtype, shape):
    """Both GEMM kernels of every product against the reference: the wgmma one (the default on
    an H100/H200) in each ring configuration of the K-major products (3 or 4 stages, wgmma lag
    1 or 0; gated_linear's forward, gated_input_linear's per-chunk products), with the products
    that have an M/N-major operand (dx, dh, both dweights) on it or, STOCHGATE_SM90_MN=0, on the
    mma.sync kernel, and the mma.sync one for everything (STOCHGATE_CUDA_GEMM=mma; on other GPUs
    every run takes it)."""
    configs = [{"STOCHGATE_CUDA_GEMM": path, "STOCHGATE_SM90_STAGES": stages, "STOCHGATE_SM90_LAG": lag,
                "STOCHGATE_SM90_MN": mn}
               for path, stages, lag, mn in (("auto", "3", "1", "1"), ("auto", "4", "1", "1"), ("auto", "3", "0", "1"),
                                             ("auto", "4", "0", "1"), ("auto", "3", "0", "0"), ("mma", "3", "1", "1"))]
    _check_every_product(monkeypatch, dtype, shape, configs)


# (B, K, N, C) on the SIMT kernel's edges (float: 128 x 128 tiles, K step 32; double and
# STOCHGATE_CUDA_SIMT=64: 64 x 64, K step 16).
SIMT_SHAPES = [
    (1, 32, 128, 1),  # one row, one tile, one K step
    (257, 72, 256, 4),  # chunk 64: half a 128-wide tile, one 64-wide tile; K tail of 8
    (131, 130, 384, 3),  # K = 130: not whole 16-byte vectors (scalar loads), M tail of 3
    (64, 256, 512, 1),  # chunk = N = 512: four (or eight) N tiles per group
    (2048, 264, 1024, 8),  # 8 groups of unequal row counts (skewed gates), several M tiles each
    (90, 40, 96, 2),  # chunk 48: N tail inside the tile
]


@pytest.mark.parametrize("dtype, config", [(torch.float32, "128"), (torch.float32, "128k"), (torch.float32, "64"),
                                           (torch.float64, "default")], ids=lambda v: str(v))
@pytest.mark.parametrize("shape", SIMT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_simt_kernel_tiles(monkeypatch, dtype, config, shape):
    """The SIMT GEMM kernel (float and double) in each configuration, every product (K-major x
    K-major forward, the dx / dh row reductions, the M/N-major dweights) against the reference:
    float on its default 128 x 128 tile with K-major operands transposed into shared memory, on
    the same tile with them kept K-major (STOCHGATE_CUDA_SIMT=128k) and on the 64 x 64 tile
    (STOCHGATE_CUDA_SIMT=64); double on its 64 x 64 tile."""
    _check_every_product(monkeypatch, dtype, shape, [{"STOCHGATE_CUDA_SIMT": config}])


@pytest.mark.parametrize("zero", ["overlap", "serial"])
def test_zero_fill_beside_the_gemm(monkeypatch, zero):
    """gated_linear writes the off chunks' zeros beside the grouped GEMM, on the current stream
    while the GEMM runs on a forked one (default), or before it (STOCHGATE_CUDA_ZERO=serial):
    the same y bit for bit, exact zeros where the reused memory held NaN, eager on the default
    and on a side stream, and replayed from a CUDA graph with new gates."""
    B, K, N, C = 3000, 256, 1024, 8
    x, w, b, gates = _linear_data(B, K, N, C, torch.bfloat16, density=0.3)
    monkeypatch.setenv("STOCHGATE_CUDA_ZERO", "serial")
    expect = ops.gated_linear(x, w, b, gates)
    _check("y", expect, R.gated_linear(x.double(), w.double(), b.double(), gates),
           R.gated_linear(x, w, b, gates), torch.bfloat16)
    monkeypatch.setenv("STOCHGATE_CUDA_ZERO", zero)
    off = (gates == 0).repeat_interleave(N // C, dim=1)
    for on_side_stream in (False, True):
        torch.cuda.synchronize()
        junk = torch.full((B, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        del junk  # the caching allocator hands y this block: off chunks must be overwritten
        s = torch.cuda.Stream() if on_side_stream else torch.cuda.current_stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            y = ops.gated_linear(x, w, b, gates)
        torch.cuda.current_stream().wait_stream(s)
        assert torch.equal(y, expect), f"side stream: {on_side_stream}"
        assert (y[off] == 0).all()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.gated_linear(x, w, b, gates)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        yg = ops.gated_linear(x, w, b, gates)
    gates.copy_(_gates(B, C, 0.6, seed=3))
    yg.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(yg, ops.gated_linear(x, w, b, gates))


@pytest.mark.parametrize("reduce", ["atomic", "deterministic"])
@pytest.mark.parametrize("C", [1, 4, 32], ids=lambda c: f"C{c}")
def test_cuda_graph_capture(C, reduce):
    """Forward and backward of both ops replay in a CUDA graph with new gate values: the
    routing lives on the device and nothing waits for the host. Replay and eager agree bit for
    bit in deterministic mode, to within the order of fp32 additions with atomics."""
    with _deterministic() if reduce == "deterministic" else contextlib.nullcontext():
        _graph_capture(C, exact=reduce == "deterministic")


def _graph_capture(C, exact):
    B, K, N, M = 96, 64, 128, 80
    x, w, b, gates = _linear_data(B, K, N, C, torch.bfloat16, density=0.5)
    w2 = torch.randn(M, N, device="cuda", dtype=torch.bfloat16) / N**0.5
    dy = torch.randn(B, M, device="cuda", dtype=torch.bfloat16)

    def step():
        y = ops.gated_linear(x, w, b, gates)
        z = ops.gated_input_linear(y, w2, None, gates)
        dh, dw2, _ = ops.gated_input_linear_backward(dy, y, w2, gates, [True, True, False])
        dx, dw, db, dg = ops.gated_linear_backward(dh, x, w, b, gates, [True] * 4, False)
        return z, dw2, dx, dw, db, dg

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    new_gates = _gates(B, C, 0.3, seed=7)
    gates.copy_(new_gates)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for name, a, e in zip(["z", "dw2", "dx", "dw", "db", "dg"], outs, eager):
        if exact:
            assert torch.equal(a, e), name
        else:
            torch.testing.assert_close(a, e, rtol=1.6e-2, atol=1e-4, msg=name)
