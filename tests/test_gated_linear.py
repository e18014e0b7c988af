"""stochgate.gated_linear / gated_input_linear against the dense masked formulas of
stochgate.reference: forward, every gradient, dtypes, edge cases, opcheck, compile."""

from __future__ import annotations

import contextlib

import pytest
import torch

import stochgate
from stochgate import _C
from stochgate import reference as R

CUDA = pytest.mark.cuda
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[CUDA, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (B, K, N, C): odd K and N, chunk = 1, chunk = N, chunks on both kernel routes (< 16, >= 16).
# (6, 128, 40, 20): chunk 2 with K a multiple of 128, the row kernels' block-major path in every dtype.
SHAPES = [(7, 13, 15, 15), (5, 9, 21, 1), (33, 31, 48, 16), (17, 40, 96, 3), (9, 70, 38, 2), (6, 128, 40, 20)]


def _gates(B, C, density, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(B, C, generator=g) < density
    return ((0.5 + torch.rand(B, C, generator=g)) * on).to(device=device, dtype=dtype)


def _data(B, K, N, C, device, dtype, density=0.4, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None
    return x, w, b, _gates(B, C, density, device, seed=seed + 1)


def _run(fn, args, dy, grads=(True, True, True, True), **kw):
    args = [
        None if a is None else a.detach().clone().requires_grad_(bool(r) and a.is_floating_point())
        for a, r in zip(args, grads)
    ]
    y = fn(*args, **kw)
    y.backward(dy)
    return [y.detach()] + [None if a is None else a.grad for a in args]


def _check_close(out, ref64, ref_lowp, dtype, what):
    """The op's error against float64 must be at most a small multiple of PyTorch's own error
    in that dtype (the reference run in `dtype`), plus eps."""
    eps = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for name, o, r, l in zip(what, out, ref64, ref_lowp):
        if r is None:
            assert o is None or not o.abs().any(), name
            continue
        assert o.dtype == l.dtype, name
        err = (o.double() - r.double()).abs().max().item() if r.numel() else 0.0
        ref_err = (l.double() - r.double()).abs().max().item() if r.numel() else 0.0
        scale = r.double().abs().max().item() if r.numel() else 0.0
        assert err <= 4 * ref_err + eps * (1 + scale), f"{name}: err {err} vs PyTorch's {ref_err}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gate_grad", ["full", "active"])
def test_gated_linear_matches_reference(device, dtype, shape, gate_grad):
    B, K, N, C = shape
    x, w, b, g = _data(B, K, N, C, device, torch.float64)
    dy = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).to(device)
    low = [t.to(dtype) for t in (x, w, b)] + [g]
    out = _run(stochgate.gated_linear, low, dy.to(dtype), gate_grad=gate_grad)
    ref64 = _run(R.gated_linear, [x, w, b, g], dy, gate_grad=gate_grad)
    ref_low = _run(R.gated_linear, low, dy.to(dtype), gate_grad=gate_grad)
    _check_close(out, ref64, ref_low, dtype, ["y", "dx", "dweight", "dbias", "dgates"])
    assert out[0].is_contiguous() and out[0].dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gated_input_linear_matches_reference(device, dtype, shape):
    B, M, N, C = shape  # weight (M, N): gated input units N
    h, wt, _, g = _data(B, M, N, C, device, torch.float64)
    w = wt.t().contiguous()
    b = torch.randn(M, dtype=torch.float64).to(device)
    dy = torch.randn(B, M, dtype=torch.float64).to(device)
    h = h.new_empty(B, N).normal_()
    low = [t.to(dtype) for t in (h, w, b)]
    out = _run(stochgate.gated_input_linear, low + [g], dy.to(dtype), grads=(1, 1, 1, 0))
    ref64 = _run(R.gated_input_linear, [h, w, b, g], dy, grads=(1, 1, 1, 0))
    ref_low = _run(R.gated_input_linear, low + [g], dy.to(dtype), grads=(1, 1, 1, 0))
    _check_close(out[:4], ref64[:4], ref_low[:4], dtype, ["y", "dh", "dweight", "dbias"])


# float32 CPU tiled kernels (csrc/cpu/gated_gemm.h): every ISA variant, the routes kept
# behind STOCHGATE_CPU_TILED=all, and shapes that reach their K blocks (K > 1024), row blocks
# (> 128 active rows), M blocks (M > 384), unit/row/column tails and odd chunks.
TILED_SHAPES = [(150, 1601, 128, 2), (37, 83, 160, 2), (29, 50, 57, 3), (40, 33, 96, 2), (23, 300, 256, 2)]


@pytest.mark.parametrize("isa", ["", "avx2", "base"])
@pytest.mark.parametrize("tiled", ["", "all"])
@pytest.mark.parametrize("shape", TILED_SHAPES)
@pytest.mark.parametrize("threads", [1, 2])  # the gather + MKL routes run single-threaded only
@pytest.mark.parametrize("fwd", ["", "dot"])  # gated_linear forward: outer-product / dot form
def test_cpu_tiled_kernels_float32(monkeypatch, isa, tiled, shape, threads, fwd):
    monkeypatch.setenv("STOCHGATE_CPU_ISA", isa)
    monkeypatch.setenv("STOCHGATE_CPU_TILED", tiled)
    monkeypatch.setenv("STOCHGATE_GL_FWD", fwd)
    with _num_threads(threads):
        _check_float32_kernels(shape)


@contextlib.contextmanager
def _num_threads(n):
    """torch's intra-op thread count set to n inside the block, restored after it."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _check_float32_kernels(shape, density=0.9, empty_row=False):
    """Both ops in float32 on the CPU, forward and every gradient, against float64."""
    B, K, N, C = shape
    x, w, b, g = _data(B, K, N, C, "cpu", torch.float64, density=density)
    if empty_row:
        g[0] = 0  # a row without any active chunk
    dy = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    low = [t.float() for t in (x, w, b)] + [g]
    out = _run(stochgate.gated_linear, low, dy.float(), grads=(1, 1, 1, 0))
    ref64 = _run(R.gated_linear, [x, w, b, g], dy, grads=(1, 1, 1, 0))
    ref_low = _run(R.gated_linear, low, dy.float(), grads=(1, 1, 1, 0))
    _check_close(out[:4], ref64[:4], ref_low[:4], torch.float32, ["y", "dx", "dweight", "dbias"])
    # gated_input_linear with weight (M, N) = (K, N): the N gated input units
    h = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    w2 = torch.randn(K, N, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) / N**0.5
    b2 = torch.randn(K, dtype=torch.float64)
    dy2 = torch.randn(B, K, dtype=torch.float64)
    low = [t.float() for t in (h, w2, b2)] + [g]
    out = _run(stochgate.gated_input_linear, low, dy2.float(), grads=(1, 1, 1, 0))
    ref64 = _run(R.gated_input_linear, [h, w2, b2, g], dy2, grads=(1, 1, 1, 0))
    ref_low = _run(R.gated_input_linear, low, dy2.float(), grads=(1, 1, 1, 0))
    _check_close(out[:4], ref64[:4], ref_low[:4], torch.float32, ["y", "dh", "dweight", "dbias"])


# Per-unit gating (chunk = 1), float32 forward through the row kernels: K not a multiple of
# 16, unit blocks with tails, rows without any active unit, one and two threads (rows split),
# each ISA's kernels (AVX-512 / AVX2 / baseline; the ones the CPU lacks fall back a level).
@pytest.mark.parametrize("shape", [(150, 1601, 200, 0.1), (37, 83, 57, 0.5), (64, 256, 128, 1.0), (9, 7, 300, 0.02)])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["", "avx2", "base"])
def test_cpu_unit_gating_forward_float32(monkeypatch, shape, threads, isa):
    monkeypatch.setenv("STOCHGATE_CPU_ISA", isa)
    B, K, N, density = shape
    x, w, b, g = _data(B, K, N, N, "cpu", torch.float64, density=density)
    with _num_threads(threads):
        y = stochgate.gated_linear(x.float(), w.float(), b.float(), g.float())
    ref64 = R.gated_linear(x, w, b, g)
    ref_low = R.gated_linear(x.float(), w.float(), b.float(), g.float())
    _check_close([y], [ref64], [ref_low], torch.float32, ["y"])
    assert (y[g == 0] == 0).all()


# Row kernels (chunk < 16), float32. AVX-512: where the K-wide operand's width is a multiple of
# 128 they walk K blocks of a block-major copy; with STOCHGATE_ROW_BLOCKS=0 in place. AVX2: dx,
# dW and gated_input_linear's forward and dW2 stream whole rows in blocks of rows (4 MiB, or
# 4 KiB here: a few rows per block, so that rows and chunk lists continue across blocks).
# Every product of both ops against the float64 reference, each way: unit counts that are and
# are not multiples of 16 (the transposes' tails), several K blocks, rows without any active
# unit, widths that are not multiples of 128 or of 8 (vector tails), one and two threads, each
# ISA's kernels.
@pytest.mark.parametrize("shape", [(37, 256, 200, 1, 0.2), (64, 384, 96, 4, 0.5), (5, 128, 48, 2, 0.05),
                                   (20, 200, 64, 1, 0.3), (30, 77, 45, 3, 0.4)])
@pytest.mark.parametrize("blocks", ["", "0"])
@pytest.mark.parametrize("stream_bytes", ["", "4096"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["", "avx2", "base"])
def test_cpu_row_kernels_block_major(monkeypatch, shape, blocks, stream_bytes, threads, isa):
    monkeypatch.setenv("STOCHGATE_ROW_BLOCKS", blocks)
    monkeypatch.setenv("STOCHGATE_ROW_STREAM_BYTES", stream_bytes)
    monkeypatch.setenv("STOCHGATE_CPU_ISA", isa)
    B, K, N, chunk, density = shape
    with _num_threads(threads):
        _check_float32_kernels((B, K, N, N // chunk), density=density, empty_row=True)


# bfloat16 on CPUs with AMX (csrc/cpu/gated_amx.cpp): chunks >= 16 run oneDNN's brgemm on
# tiles of up to 32 active rows. Shapes (B, K, N, C) that reach its tails: more than 32 active
# rows in a chunk and odd counts, odd K and odd chunks (the packed pairs' zero column), chunks
# wider than a unit block (256: chunk 300 and 512), output widths past a 256-column block with a
# tail (K, M = 300 / 600), one chunk, one row, and a large batch; chunks with most rows active go to one dense
# oneDNN product over all rows (mixed with tiled ones at 45%). Both ops, every gradient, both gate gradients,
# against float64 within a multiple of PyTorch's own bfloat16 error; also with
# STOCHGATE_CPU_AMX=0 (the float32 route), and the number of calls that took the AMX kernels.
AMX = pytest.mark.skipif(not _C.cpu_amx_available(), reason="needs a CPU with AMX (bfloat16 brgemm)")
AMX_SHAPES = [(70, 37, 96, 2), (1, 64, 16, 1), (45, 130, 600, 2), (33, 300, 38, 2), (9, 19, 512, 1), (64, 600, 272, 16),
              (20000, 300, 32, 2)]  # large B: the row reduce's accumulator blocks shrink to 48 columns


@AMX
@pytest.mark.parametrize("shape", AMX_SHAPES)
@pytest.mark.parametrize("density", [0.4, 1.0])
@pytest.mark.parametrize("amx", ["", "0"])
@pytest.mark.parametrize("dense_frac", ["", "0.45"])  # chunks with >= 70% (45%) active rows: one dense product
def test_cpu_amx_bfloat16(monkeypatch, shape, density, amx, dense_frac):
    monkeypatch.setenv("STOCHGATE_CPU_AMX", amx)
    monkeypatch.setenv("STOCHGATE_GL_MM_FRAC", dense_frac or "0.7")
    B, K, N, C = shape
    x, w, b, _ = _data(B, K, N, C, "cpu", torch.float64)
    g = _gates(B, C, density, "cpu", seed=5)
    dy = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    low = [t.to(torch.bfloat16) for t in (x, w, b)] + [g]
    calls = _C.cpu_amx_calls()
    for gate_grad in ("full", "active"):
        out = _run(stochgate.gated_linear, low, dy.bfloat16(), gate_grad=gate_grad)
        ref64 = _run(R.gated_linear, [x, w, b, g], dy, gate_grad=gate_grad)
        ref_low = _run(R.gated_linear, low, dy.bfloat16(), gate_grad=gate_grad)
        _check_close(out, ref64, ref_low, torch.bfloat16, ["y", "dx", "dweight", "dbias", "dgates"])
    # gated_input_linear: h (B, N) gated by chunks of N, weight (M = K, N).
    gen = torch.Generator().manual_seed(7)
    h, w2 = torch.randn(B, N, generator=gen, dtype=torch.float64), w.t().contiguous()
    b2 = torch.randn(K, generator=gen, dtype=torch.float64)
    dy2 = torch.randn(B, K, generator=gen, dtype=torch.float64)
    low2 = [t.bfloat16() for t in (h, w2, b2)] + [g]
    out = _run(stochgate.gated_input_linear, low2, dy2.bfloat16(), grads=(1, 1, 1, 0))
    ref64 = _run(R.gated_input_linear, [h, w2, b2, g], dy2, grads=(1, 1, 1, 0))
    ref_low = _run(R.gated_input_linear, low2, dy2.bfloat16(), grads=(1, 1, 1, 0))
    _check_close(out[:4], ref64[:4], ref_low[:4], torch.bfloat16, ["y", "dh", "dweight", "dbias"])
    assert _C.cpu_amx_calls() - calls == (6 if amx == "" else 0)


@AMX
def test_cpu_amx_nan_and_layouts():
    """NaN in an active row reaches exactly that row's active outputs; inf in skipped chunks
    of h and in weight rows of chunks that are off everywhere reaches nothing; non-contiguous
    and misaligned (odd storage offset) inputs give the contiguous inputs' values."""
    B, K, N, C = 40, 70, 96, 3
    x, w, b, _ = _data(B, K, N, C, "cpu", torch.bfloat16)
    g = _gates(B, C, 0.5, "cpu", seed=2)
    g[:, 2] = 0
    on = (g != 0).repeat_interleave(N // C, dim=1)
    calls = _C.cpu_amx_calls()
    x_nan = x.clone()
    x_nan[3] = float("nan")
    w_inf = w.clone()
    w_inf[2 * N // C :] = float("inf")
    y = stochgate.gated_linear(x_nan, w_inf, b, g)
    assert torch.isnan(y[3][on[3]]).all() and (y[3][~on[3]] == 0).all()
    rest = torch.arange(B) != 3
    assert torch.isfinite(y[rest]).all() and (y[rest][~on[rest]] == 0).all()
    h = torch.randn(B, N).bfloat16().masked_fill(~on, float("inf"))
    assert torch.isfinite(stochgate.gated_input_linear(h, w.t().contiguous(), None, g)).all()
    # Layouts: transposed views, and a contiguous view whose data starts 2 bytes into its buffer.
    base = torch.randn(B * K + 1).bfloat16()
    x_odd = base[1:].view(B, K)
    ref = stochgate.gated_linear(x_odd.contiguous(), w, b, g)
    assert torch.equal(stochgate.gated_linear(x_odd, w, b, g), ref)
    assert torch.equal(stochgate.gated_linear(x_odd.t().contiguous().t(), w.t().contiguous().t(), b, g), ref)
    assert _C.cpu_amx_calls() - calls == 5


@AMX
def test_cpu_amx_same_bits_on_any_thread_count():
    """Each output's sum runs in a fixed order whichever thread computes it: one and two
    threads give the same bits, forward and backward of both ops."""
    B, K, N, C = 100, 300, 128, 2
    x, w, b, _ = _data(B, K, N, C, "cpu", torch.bfloat16)
    g = _gates(B, C, 0.5, "cpu", seed=6)
    dy = torch.randn(B, N).bfloat16()
    h, w2, dy2 = torch.randn(B, N).bfloat16(), w.t().contiguous(), torch.randn(B, K).bfloat16()
    outs = []
    for n in (1, 2):
        with _num_threads(n):
            outs.append(
                [stochgate.gated_linear(x, w, b, g), stochgate.gated_input_linear(h, w2, b[:0].new_zeros(K), g)]
                + list(torch.ops.stochgate.gated_linear_backward(dy, x, w, b, g, [True, True, True, False], False))
                + list(torch.ops.stochgate.gated_input_linear_backward(dy2, h, w2, g, [True, True, True]))
            )
    for a, c in zip(*outs):
        assert torch.equal(a, c)


@AMX
def test_cpu_amx_modules_under_autocast():
    """float32 modules under CPU autocast to bfloat16 (the usual way to train in bfloat16):
    both layers' forward and backward take the AMX kernels, and the float32 parameters get
    the gradients of the bfloat16 computation."""
    torch.manual_seed(0)
    l1 = stochgate.nn.GatedLinear(48, 64, num_chunks=2)
    l2 = stochgate.nn.GatedInputLinear(64, 10, num_chunks=2)
    x = torch.randn(40, 48)
    g = _gates(40, 2, 0.6, "cpu", seed=4)
    calls = _C.cpu_amx_calls()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = l2(l1(x, g), g)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert _C.cpu_amx_calls() - calls == 4
    # The same computation by the reference on float64 copies of the bfloat16-cast operands.
    p64 = [p.detach().bfloat16().double().requires_grad_() for p in (l1.weight, l1.bias, l2.weight, l2.bias)]
    h = R.gated_linear(x.bfloat16().double(), p64[0], p64[1], g.double())
    y64 = R.gated_input_linear(h.bfloat16().double(), p64[2], p64[3], g.double())
    y64.square().sum().backward()
    for p, r in zip((l1.weight, l1.bias, l2.weight, l2.bias), p64):
        assert p.grad is not None and p.grad.dtype == torch.float32
        scale = r.grad.abs().max().item()
        assert (p.grad.double() - r.grad).abs().max().item() <= 0.05 * scale + 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 3, 16])
def test_gradcheck_float64(device, C):
    B, K, N = 6, 5, 16 if C != 3 else 12
    x, w, b, g = _data(B, K, N, C, device, torch.float64, density=0.6)
    g = g.double()
    args = [t.requires_grad_() for t in (x, w, b, g)]
    assert torch.autograd.gradcheck(lambda *a: stochgate.gated_linear(*a), args)
    assert torch.autograd.gradcheck(
        lambda *a: stochgate.gated_linear(*a, gate_grad="active"), args[:3] + [g.detach()]
    )
    h = torch.randn(B, N, dtype=torch.float64, device=device, requires_grad=True)
    w2 = torch.randn(7, N, dtype=torch.float64, device=device, requires_grad=True)
    b2 = torch.randn(7, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda h, w, b: stochgate.gated_input_linear(h, w, b, g.detach()), (h, w2, b2)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_active_gate_grad_is_zero_off(device):
    x, w, b, g = _data(9, 12, 32, 2, device, torch.float32, density=0.5)
    g.requires_grad_()
    stochgate.gated_linear(x, w, b, g, gate_grad="active").sum().backward()
    assert (g.grad[g.detach() == 0] == 0).all()
    g.grad = None
    stochgate.gated_linear(x, w, b, g, gate_grad="full").sum().backward()
    assert (g.grad[g.detach() == 0] != 0).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16, chunk 16: the AMX kernels on CPU
def test_opcheck(device, C, dtype):
    x, w, b, g = _data(6, 10, 32, C, device, dtype)
    ops = torch.ops.stochgate
    for rg in (False, True):
        xs, ws, bs, gs = (t.clone().requires_grad_(rg) for t in (x, w, b, g))
        torch.library.opcheck(ops.gated_linear.default, (xs, ws, bs, gs, True))
        torch.library.opcheck(ops.gated_linear.default, (xs, ws, None, gs, False))
        h = torch.randn(6, 32, device=device, requires_grad=rg, dtype=dtype)
        w2 = torch.randn(5, 32, device=device, requires_grad=rg, dtype=dtype)
        torch.library.opcheck(ops.gated_input_linear.default, (h, w2, None, g))
    dy = torch.randn(6, 32, device=device, dtype=dtype)
    for mask in ([True, True, True, True], [False, True, False, True], [True, False, False, False]):
        torch.library.opcheck(ops.gated_linear_backward.default, (dy, x, w, b, g, mask, False))
    torch.library.opcheck(
        ops.gated_input_linear_backward.default,
        (torch.randn(6, 5, device=device, dtype=dtype), torch.randn(6, 32, device=device, dtype=dtype),
         torch.randn(5, 32, device=device, dtype=dtype), g, [True, False, True]),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    x, w, b, g = _data(8, 12, 32, 4, device, torch.float32)
    w2 = torch.randn(6, 32, device=device)

    def block(x, w, b, g, w2):
        return stochgate.gated_input_linear(stochgate.gated_linear(x, w, b, g).relu(), w2, None, g)

    args = [t.clone().requires_grad_() for t in (x, w, b)] + [g, w2.clone().requires_grad_()]
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(*args)
    out.sum().backward()
    ref_args = [t.detach().clone().requires_grad_() for t in (x, w, b)] + [g, w2.clone().requires_grad_()]
    ref = block(*ref_args)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for a, r in zip(args, ref_args):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, r.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor(device):
    """The default backend (inductor; Triton on CUDA) fuses around the op, forward and backward."""
    x, w, b, g = _data(8, 12, 32, 4, device, torch.float32)
    fn = torch.compile(lambda x, w, b, g: stochgate.gated_linear(x, w, b, g) * 2, fullgraph=True)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    out = fn(*args, g)
    torch.testing.assert_close(out, 2 * R.gated_linear(x, w, b, g))
    out.sum().backward()
    ref_args = [t.clone().requires_grad_() for t in (x, w, b)]
    (2 * R.gated_linear(*ref_args, g)).sum().backward()
    for a, r in zip(args, ref_args):
        torch.testing.assert_close(a.grad, r.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 2, 32])
@pytest.mark.parametrize("fill", ["zero", "one", "empty_batch"])
def test_edge_gates(device, C, fill):
    B = 0 if fill == "empty_batch" else 5
    x, w, b, _ = _data(B, 11, 32, C, device, torch.float32)
    g = (torch.zeros if fill == "zero" else torch.ones)(B, C, device=device)
    out = _run(stochgate.gated_linear, [x, w, b, g], torch.ones(B, 32, device=device))
    ref = _run(R.gated_linear, [x, w, b, g], torch.ones(B, 32, device=device))
    for o, r in zip(out, ref):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r)
    h = torch.randn(B, 32, device=device)
    torch.testing.assert_close(
        stochgate.gated_input_linear(h, w.t().contiguous(), None, g),
        R.gated_input_linear(h, w.t().contiguous(), None, g),
    )


# Zero-sized dimensions other than B: K = 0 (empty dot products: the output is the gated bias)
# and N = 0, on the row kernels (chunk 1 and 3) and the per-chunk GEMMs (chunk 32), forward and
# every gradient against the reference. K = 0 divided by zero in the row kernels' unit blocking.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 0, 96, 96), (5, 0, 96, 32), (5, 0, 96, 3), (4, 7, 0, 2), (0, 0, 96, 3)])
def test_empty_feature_dims(device, shape):
    B, K, N, C = shape
    x, w, b, g = _data(B, K, N, C, device, torch.float32)
    h = torch.randn(B, N, device=device)
    cases = [
        (stochgate.gated_linear, R.gated_linear, [x, w, b, g], N, True),
        # h (B, N) gated by g into weight (K, N): K = 0 outputs, or N = 0 inputs.
        (stochgate.gated_input_linear, R.gated_input_linear,
         [h, w.t().contiguous(), torch.ones(K, device=device), g], K, False),
    ]
    for fn, ref, args, width, gate_grad in cases:
        dy = torch.randn(B, width, device=device)
        out = _run(fn, args, dy, (True, True, True, gate_grad))
        exp = _run(ref, args, dy, (True, True, True, gate_grad))
        for o, r in zip(out, exp):
            assert (o is None) == (r is None)
            if o is not None:
                assert o.shape == r.shape
                torch.testing.assert_close(o, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [2, 32])
def test_non_contiguous(device, C):
    x, w, b, g = _data(10, 12, 32, C, device, torch.float32)
    xn = torch.randn(12, 10, device=device).t()
    wn = torch.randn(12, 32, device=device).t()
    gn = g.t().contiguous().t()
    torch.testing.assert_close(stochgate.gated_linear(xn, wn, b, gn), R.gated_linear(xn, wn, b, gn))
    hn = torch.randn(32, 10, device=device).t()
    w2 = torch.randn(32, 7, device=device).t()
    torch.testing.assert_close(
        stochgate.gated_input_linear(hn, w2, None, gn), R.gated_input_linear(hn, w2, None, gn)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 2, 32])
def test_nan_in_skipped_chunks_does_not_leak(device, C):
    N = 32
    x, w, b, g = _data(6, 9, N, C, device, torch.float32, density=0.5)
    off = (g == 0).repeat_interleave(N // C, dim=1)
    w_bad = w.clone()
    w_bad[off.any(0)] = float("nan")  # weight rows of chunks that are off somewhere
    y = stochgate.gated_linear(x, w, b, g)
    assert (y[off] == 0).all()
    h = torch.randn(6, N, device=device).masked_fill(off, float("inf"))
    y2 = stochgate.gated_input_linear(h, torch.randn(5, N, device=device), None, g)
    assert torch.isfinite(y2).all()
    # Fully gated-off weight rows never reach the output.
    g_col = g.clone()
    g_col[:, 0] = 0
    w_nan = w.clone()
    w_nan[: N // C] = float("nan")
    assert torch.isfinite(stochgate.gated_linear(x, w_nan, b, g_col)).all()


# Routing (which pairs are active) takes 16 float32 gates per compare on AVX-512 CPUs, 8 on
# AVX2 ones and one at a time otherwise (STOCHGATE_CPU_ISA=base); float16/bfloat16 gates route
# as float32. Every way: -0 is off, NaN and subnormal gates are on (NaN reaches its chunk's
# outputs), at positions inside and past the last whole group of 16 chunks, in rows with 0..C
# active chunks.
@pytest.mark.parametrize("isa", ["", "avx2", "base"])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C", [37, 16, 5])
def test_cpu_routing_special_gate_values(monkeypatch, isa, gdtype, C):
    monkeypatch.setenv("STOCHGATE_CPU_ISA", isa)
    B, K, N = 6, 11, 2 * C
    x, w, b, g = _data(B, K, N, C, "cpu", torch.float32, density=0.5)
    g[0] = 0
    g[1] = 1
    g[2, C - 1] = -0.0
    g[2, 0] = float("nan")
    g[3, C - 1] = float("nan")
    tiny = torch.finfo(gdtype).tiny / 2  # subnormal in the gates' dtype: not zero, so on
    g[4, C // 2] = tiny
    g = g.to(gdtype)
    y = stochgate.gated_linear(x, w, b, g)
    ref = R.gated_linear(x.double(), w.double(), b.double(), g.double())
    torch.testing.assert_close(y.double(), ref, equal_nan=True, rtol=1e-5, atol=1e-6)
    assert y[2, :2].isnan().all() and y[3, -2:].isnan().all() and (y[2, -2:] == 0).all()
    if gdtype != torch.float64:  # (a float64 subnormal gate underflows in the float32 output)
        assert y[4, 2 * (C // 2) : 2 * (C // 2) + 2].ne(0).all()
    h = torch.randn(B, N)
    y2 = stochgate.gated_input_linear(h, w.t().contiguous(), None, g)
    torch.testing.assert_close(
        y2.double(), R.gated_input_linear(h.double(), w.t().double(), None, g.double()), equal_nan=True,
        rtol=1e-5, atol=1e-6,
    )


class _NoSparseOps:
    """Stands in for the compiled ops: fails if a sparse kernel is called."""

    def __getattr__(self, name):
        raise AssertionError(f"sparse op {name} called")


# density_threshold: above it the layers run one dense product (stochgate.gated's own autograd
# function), below or at it the sparse op. The dense path must give the sparse op's values and
# every gradient, gate_grad "full" and "active" included; checked by running the sparse op
# first, then the dense path with the compiled ops replaced by a stand-in that fails if called.
@pytest.mark.parametrize("C", [1, 4, 16])
@pytest.mark.parametrize("gate_grad", ["full", "active"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_density_threshold_dense_path(monkeypatch, C, gate_grad, dtype):
    B, K, N = 9, 13, 32
    x, w, b, g = _data(B, K, N, C, "cpu", dtype, density=0.6)
    count = int((g != 0).sum())
    frac = count / g.numel()
    assert 0.2 < frac < 0.95
    dy = torch.randn(B, N, dtype=dtype, generator=torch.Generator().manual_seed(7))
    sparse = _run(stochgate.gated_linear, [x, w, b, g], dy, gate_grad=gate_grad)
    h = torch.randn(B, N, dtype=dtype)
    w2 = torch.randn(5, N, dtype=dtype)
    b2 = torch.randn(5, dtype=dtype)
    dy2 = torch.randn(B, 5, dtype=dtype)
    sparse2 = _run(stochgate.gated_input_linear, [h, w2, b2, g], dy2, grads=(1, 1, 1, 0))
    monkeypatch.setattr(stochgate.gated, "ops", _NoSparseOps())
    dense = _run(stochgate.gated_linear, [x, w, b, g], dy, gate_grad=gate_grad, density_threshold=frac - 0.1)
    dense2 = _run(
        stochgate.gated_input_linear, [h, w2, b2, g], dy2, grads=(1, 1, 1, 0), density_threshold=frac - 0.1
    )
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for name, d_, s_ in zip(["y", "dx", "dweight", "dbias", "dgates"], dense, sparse):
        torch.testing.assert_close(d_, s_, **tol, msg=name)
    for name, d_, s_ in zip(["y", "dh", "dweight", "dbias"], dense2, sparse2):
        torch.testing.assert_close(d_, s_, **tol, msg=name)
    assert (dense[0][(g == 0).repeat_interleave(N // C, 1)] == 0).all()
    if gate_grad == "active":
        assert (dense[4][g == 0] == 0).all()
    # Below the threshold the sparse op runs: here it fails.
    for fn, args in ((stochgate.gated_linear, (x, w, b, g)), (stochgate.gated_input_linear, (h, w2, b2, g))):
        with pytest.raises(AssertionError, match="sparse op"):
            fn(*args, density_threshold=(count + 0.5) / g.numel())
    # The modules pass it on.
    layer = stochgate.nn.GatedLinear(K, N, C, density_threshold=0.0).to(dtype)
    assert layer(x, g).shape == (B, N)
    layer2 = stochgate.nn.GatedInputLinear(N, 5, C, density_threshold=0.0).to(dtype)
    assert layer2(h, g).shape == (B, 5)


def test_density_threshold_dense_path_no_leak_and_bad_values():
    N, C = 32, 4
    x, w, b, g = _data(6, 9, N, C, "cpu", torch.float32, density=0.7)
    g[:, 0] = 0
    w_nan = w.clone()
    w_nan[: N // C] = float("nan")  # weight rows of a chunk that is off in every row
    y = stochgate.gated_linear(x, w_nan, b, g, density_threshold=0.0)
    assert torch.isfinite(y).all() and (y[:, : N // C] == 0).all()
    h = torch.randn(6, N).masked_fill((g == 0).repeat_interleave(N // C, 1), float("inf"))
    assert torch.isfinite(stochgate.gated_input_linear(h, torch.randn(5, N), None, g, density_threshold=0.0)).all()
    # B = 0: nothing to count; the op's empty result.
    assert stochgate.gated_linear(x[:0], w, b, g[:0], density_threshold=0.0).shape == (0, N)
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="density_threshold"):
            stochgate.gated_linear(x, w, b, g, density_threshold=bad)
        with pytest.raises(ValueError, match="density_threshold"):
            stochgate.gated_input_linear(h, torch.randn(5, N), None, g, density_threshold=bad)
        with pytest.raises(ValueError, match="density_threshold"):
            stochgate.nn.GatedLinear(9, N, C, density_threshold=bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 4, 16])
@pytest.mark.parametrize("threshold", [None, 0.0], ids=["sparse", "dense_path"])
def test_h_grad_full_gives_the_dense_block_gradients(device, C, threshold):
    """gated_linear(gate_grad="full") then gated_input_linear(h_grad="full"): every gradient of
    the pair, gates that sampled 0 included, equals the dense block's (float64). With the
    default h_grad="active" the off gates get 0 (their dh is 0)."""
    B, K, N, M = 23, 17, 32, 5
    x, w1, b1, g = _data(B, K, N, C, device, torch.float64, density=0.5)
    g = g.double()
    gen = torch.Generator().manual_seed(5)
    w2, b2, dy = (torch.randn(*s, generator=gen, dtype=torch.float64).to(device) for s in ((M, N), (M,), (B, M)))

    def block(h_grad):
        def fn(x, w1, b1, g, w2, b2):
            h = stochgate.gated_linear(x, w1, b1, g, gate_grad="full", density_threshold=threshold)
            return stochgate.gated_input_linear(h, w2, b2, g, h_grad=h_grad, density_threshold=threshold)
        return fn

    def dense(x, w1, b1, g, w2, b2):
        return ((x @ w1.t() + b1) * g.repeat_interleave(N // C, 1)) @ w2.t() + b2

    args, grads = (x, w1, b1, g, w2, b2), (True,) * 6
    names = ["y", "dx", "dw1", "db1", "dg", "dw2", "db2"]
    ref = _run(dense, args, dy, grads)
    for name, o, r in zip(names, _run(block("full"), args, dy, grads), ref):
        torch.testing.assert_close(o, r, msg=name)
    active = _run(block("active"), args, dy, grads)
    off = g == 0
    assert off.any() and (ref[4][off] != 0).all() and (active[4][off] == 0).all()
    torch.testing.assert_close(active[4][~off], ref[4][~off])


@pytest.mark.parametrize("device", DEVICES)
def test_h_grad_full_op_compile_and_bad_value(device):
    """h_grad="full": dh = dy @ weight on every chunk (the default: 0 off), weight and bias
    gradients unchanged, under torch.compile(fullgraph=True) too; the module passes it on."""
    B, N, M, C = 9, 24, 7, 6
    g = _gates(B, C, 0.5, device)
    gen = torch.Generator().manual_seed(2)
    h, w, b, dy = (torch.randn(*s, generator=gen).to(device) for s in ((B, N), (M, N), (M,), (B, M)))
    off = (g == 0).repeat_interleave(N // C, 1)
    active = _run(stochgate.gated_input_linear, (h, w, b, g), dy)
    fn = lambda h, w, b, g: stochgate.gated_input_linear(h, w, b, g, h_grad="full")  # noqa: E731
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        y, dh, dw, db, _ = _run(f, (h, w, b, g), dy)
        torch.testing.assert_close(y, active[0])
        torch.testing.assert_close(dh, dy @ w)
        torch.testing.assert_close(dw, active[2])
        torch.testing.assert_close(db, active[3])
    assert off.any() and (active[1][off] == 0).all() and (dy @ w)[off].abs().min() > 0
    layer = stochgate.nn.GatedInputLinear(N, M, C, h_grad="full", device=device)
    hr = h.clone().requires_grad_()
    layer(hr, g).backward(dy)
    torch.testing.assert_close(hr.grad, dy @ layer.weight.detach())
    with pytest.raises(ValueError, match="h_grad"):
        stochgate.gated_input_linear(h, w, b, g, h_grad="dense")
    with pytest.raises(ValueError, match="h_grad"):
        stochgate.nn.GatedInputLinear(N, M, C, h_grad=None)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    dtype = torch.bfloat16
    x, w, b, g = _data(8, 12, 32, 4, device, torch.float32)
    with torch.autocast(device_type=device, dtype=dtype):
        y = stochgate.gated_linear(x, w, b, g)
        y2 = stochgate.gated_input_linear(x.new_ones(8, 32), w.t().contiguous(), None, g)
    assert y.dtype == dtype and y2.dtype == dtype
    torch.testing.assert_close(y.float(), R.gated_linear(x, w, b, g), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_modules(device):
    torch.manual_seed(0)
    lin = stochgate.nn.GatedLinear(12, 32, 4, device=device)
    lin2 = stochgate.nn.GatedInputLinear(32, 6, 4, bias=False, device=device, dtype=torch.float64)
    ref = torch.nn.Linear(12, 32)
    bound = 1 / 12**0.5
    assert lin.weight.abs().max() <= bound and lin.bias.abs().max() <= bound
    assert lin2.bias is None and lin2.weight.dtype == torch.float64
    assert lin.weight.shape == ref.weight.shape
    x = torch.randn(5, 12, device=device)
    g = _gates(5, 4, 0.5, device)
    y = lin(x, g)
    torch.testing.assert_close(y, R.gated_linear(x, lin.weight, lin.bias, g))
    z = lin2(y.double(), g)
    torch.testing.assert_close(z, R.gated_input_linear(y.double(), lin2.weight, None, g))
    y.sum().backward()
    assert lin.weight.grad is not None
    with pytest.raises(ValueError, match="num_chunks"):
        stochgate.nn.GatedLinear(12, 30, 4)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="num_chunks"):
            stochgate.nn.GatedInputLinear(12, 30, bad)


def test_bad_inputs():
    x, w, b, g = _data(4, 6, 8, 2, "cpu", torch.float32)
    gl = stochgate.gated_linear
    with pytest.raises(ValueError, match=r"weight \(8, 5\) does not match x \(4, 6\)"):
        gl(x, w[:, :5], b, g)
    with pytest.raises(ValueError, match="equal chunks"):
        gl(x, w, b, torch.ones(4, 3))
    with pytest.raises(ValueError, match="gates .* must have 4 rows"):
        gl(x, w, b, torch.ones(3, 2))
    with pytest.raises(ValueError, match="bias must have shape"):
        gl(x, w, b[:3], g)
    with pytest.raises(ValueError, match="x must be 2-D"):
        gl(x[0], w, b, g)
    with pytest.raises(ValueError, match="one dtype"):
        gl(x, w.double(), b, g)
    with pytest.raises(ValueError, match="gates must be a floating"):
        gl(x, w, b, torch.ones(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="gate_grad"):
        gl(x, w, b, g, gate_grad="sparse")
    with pytest.raises(ValueError, match="h must be 2-D"):
        stochgate.gated_input_linear(x[0], w.t(), None, g)
    # The op itself checks too (RuntimeError from TORCH_CHECK).
    with pytest.raises(RuntimeError, match="equal chunks"):
        torch.ops.stochgate.gated_linear(x, w, b, torch.ones(4, 3))
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        torch.ops.stochgate.gated_linear_backward(
            torch.ones(4, 7), x, w, b, g, [True, True, True, True], True
        )
