"""The fused estimator kernels against stochgate.reference (which runs the same Philox stream
in PyTorch): every dtype, odd shapes, non-contiguous and empty inputs, gradients, NaN,
opcheck, torch.compile, generator determinism and bad input."""

from __future__ import annotations

import pytest
import torch

import stochgate
from stochgate import reference
from stochgate._ops import draw_key

from .conftest import DEVICES, FLOAT_DTYPES, HAS_CUDA

SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 7), (64, 33)]


def _sample(name, x, seed, **kw):
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return getattr(stochgate, name)(x, generator=gen, **kw), gen


def _ref(name, x, seed, **kw):
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return getattr(reference, name)(x, generator=gen, **kw)


SAMPLERS = [
    ("straight_through", {}),
    ("straight_through", {"variant": "sigmoid"}),
    ("stochastic_times_smooth", {}),
    ("noisy_rectifier", {}),
    ("noisy_rectifier", {"noise": "logistic", "sigma": 0.5}),
    ("noisy_rectifier", {"sigma": 0.0}),
    ("binary_sample", {}),
]


def _tol(dtype):
    # The kernels and the reference both compute in float32 (float64 for double) and round
    # once to the output dtype; transcendental functions may differ by an ulp or two.
    return {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name,kw", SAMPLERS)
def test_forward_matches_reference(name, kw, shape, dtype, device):
    x = (3 * torch.randn(shape, dtype=torch.float64)).to(dtype).to(device)
    out, _ = _sample(name, x, 1234, **kw)
    ref = _ref(name, x, 1234, **kw)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    if name in ("straight_through", "binary_sample", "stochastic_times_smooth"):
        # Bernoulli decisions may only differ where u is within rounding of p.
        differ = (out != 0) != (ref != 0)
        assert differ.sum().item() == 0 or differ.float().mean().item() < 1e-3
        keep = ~differ
        torch.testing.assert_close(out[keep], ref[keep], atol=_tol(dtype), rtol=_tol(dtype))
    else:
        torch.testing.assert_close(out, ref, atol=10 * _tol(dtype), rtol=10 * _tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name,kw", SAMPLERS[:-1])
def test_backward_matches_reference(name, kw, dtype, device):
    x0 = (2 * torch.randn(17, 13, dtype=torch.float64)).to(dtype).to(device)
    upstream = torch.randn(17, 13, dtype=torch.float64).to(dtype).to(device)
    grads = []
    for fn in (_sample, _ref):
        x = x0.clone().requires_grad_()
        out = fn(name, x, 99, **kw)
        out = out[0] if isinstance(out, tuple) else out
        (out.float() * upstream.float()).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=10 * _tol(dtype), rtol=10 * _tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,kw", SAMPLERS)
def test_non_contiguous_input(name, kw, device):
    base = torch.randn(9, 14, device=device)
    x = base.t()[::2]  # non-contiguous view, shape (7, 9)
    assert not x.is_contiguous()
    out, _ = _sample(name, x, 5, **kw)
    expected, _ = _sample(name, x.contiguous(), 5, **kw)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,kw", SAMPLERS)
def test_empty_input(name, kw, device):
    x = torch.randn(0, 5, device=device, requires_grad=name != "binary_sample")
    out, _ = _sample(name, x, 0, **kw)
    assert out.shape == (0, 5)
    if x.requires_grad:
        out.sum().backward()
        assert x.grad.shape == (0, 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,kw", SAMPLERS)
def test_same_generator_state_same_output(name, kw, device):
    x = torch.randn(1000, device=device)
    a, gen_a = _sample(name, x, 7, **kw)
    b, gen_b = _sample(name, x, 7, **kw)
    assert torch.equal(a, b)
    # The generator advanced: a second draw differs (sigma = 0 draws nothing random).
    c = getattr(stochgate, name)(x, generator=gen_a, **kw)
    assert torch.equal(a, c) == (kw.get("sigma") == 0.0)
    # Seeding the global generator makes generator=None repeatable too.
    torch.manual_seed(3)
    d = getattr(stochgate, name)(x, **kw)
    torch.manual_seed(3)
    e = getattr(stochgate, name)(x, **kw)
    assert torch.equal(d, e)


def test_cpu_builds_draw_identical_samples(monkeypatch):
    """The float32 CPU kernels are compiled per instruction set (AVX-512, AVX2, SSE2; picked at
    run time, lowered by STOCHGATE_CPU_ISA): every build must give the same bits for a key,
    forward and backward, including NaN, infinities, the saturated sigmoid and a tail that is
    not a whole 64-element block. Each build this CPU can run against the SSE2 one."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 1000 + 37, generator=gen) * 12
    x[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), 88.5, -88.5, 0.0])
    upstream = torch.randn(x.shape, generator=gen)
    h_sts = torch.where(torch.rand(x.shape, generator=gen) < 0.5, torch.rand(x.shape, generator=gen), 0.0)
    ops = torch.ops.stochgate
    key = torch.tensor([123456789, (5 << 32) + 987654321], dtype=torch.int64)

    def run():
        return [
            ops.binary_sample(x, key),
            ops.straight_through(x, key, True),
            ops.stochastic_times_smooth(x, key),
            ops.noisy_rectifier(x, key, 0.7, False),
            ops.noisy_rectifier(x, key, 0.7, True),
            ops.straight_through_backward(upstream, x),
            ops.stochastic_times_smooth_backward(upstream, x, h_sts),
        ]

    monkeypatch.setenv("STOCHGATE_CPU_ISA", "base")
    base = run()
    for isa in ("avx2", ""):
        monkeypatch.setenv("STOCHGATE_CPU_ISA", isa)
        for i, (a, b) in enumerate(zip(run(), base)):
            assert torch.equal(a.isnan(), b.isnan()), (isa, i)
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), (isa, i, (a - b).abs().nan_to_num().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,kw", SAMPLERS)
def test_nan_propagates(name, kw, device):
    x = torch.tensor([float("nan"), 0.0, float("nan"), 1.0, -1.0], device=device)
    out, _ = _sample(name, x, 0, **kw)
    assert torch.isnan(out[[0, 2]]).all(), out
    assert not torch.isnan(out[[1, 3, 4]]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_gradient_propagates(device):
    x = torch.tensor([float("nan"), 0.5], device=device, requires_grad=True)
    for fn in (
        lambda t: stochgate.straight_through(t, variant="sigmoid"),
        stochgate.stochastic_times_smooth,
        stochgate.noisy_rectifier,
    ):
        x.grad = None
        torch.manual_seed(0)
        fn(x).sum().backward()
        assert torch.isnan(x.grad[0]), fn


def test_straight_through_gradients_are_the_closed_forms():
    x = torch.randn(50, 40, dtype=torch.float64, requires_grad=True)
    g = torch.randn(50, 40, dtype=torch.float64)
    stochgate.straight_through(x).backward(g)
    assert torch.equal(x.grad, g)  # eq. 13: identity
    x.grad = None
    stochgate.straight_through(x, variant="sigmoid").backward(g)
    p = torch.sigmoid(x.detach())
    torch.testing.assert_close(x.grad, g * p * (1 - p), rtol=1e-14, atol=0)


def test_sts_and_rectifier_gradients_are_the_closed_forms():
    x = torch.randn(64, 64, dtype=torch.float64, requires_grad=True)
    g = torch.randn(64, 64, dtype=torch.float64)
    h = stochgate.stochastic_times_smooth(x)
    h.backward(g)
    p = torch.sigmoid(x.detach())
    b = (h.detach() > 0).double()
    torch.testing.assert_close(x.grad, g * b * 0.5 * p.sqrt() * (1 - p), rtol=1e-14, atol=0)
    x.grad = None
    h = stochgate.noisy_rectifier(x, sigma=1.0)
    h.backward(g)
    assert torch.equal(x.grad, g * (h.detach() > 0).double())


def test_sigma_zero_is_relu():
    x = torch.randn(100, requires_grad=True)
    h = stochgate.noisy_rectifier(x, sigma=0.0)
    assert torch.equal(h, torch.relu(x))


@pytest.mark.parametrize("name,kw", SAMPLERS[:-1])
def test_gradcheck(name, kw):
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    # Keep x away from the kinks of the rectifier so finite differences are meaningful.
    x = (x + 0.3 * x.detach().sign()).detach().requires_grad_()

    def fn(t):
        gen = torch.Generator().manual_seed(11)
        return getattr(stochgate, name)(t, generator=gen, **kw)

    if name == "straight_through":
        # The straight-through gradient is not the derivative of the forward by design;
        # check it against the reference's autograd instead.
        out = fn(x)
        (gx,) = torch.autograd.grad(out.sum(), x)
        ref = reference.straight_through(x, generator=torch.Generator().manual_seed(11), **kw)
        (gr,) = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(gx, gr)
    else:
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5)


def _opcheck_samples(device):
    x = torch.randn(5, 3, device=device)
    key = draw_key(None, torch.device(device))
    ops = torch.ops.stochgate
    loss = torch.randn(5, device=device)
    c = torch.randn(3, device=device)
    h = (torch.rand(5, 3, device=device) < 0.5).float()
    for rg in (False, True):
        xr = x.clone().requires_grad_(rg)
        yield ops.straight_through.default, (xr, key, False)
        yield ops.straight_through.default, (xr, key, True)
        yield ops.stochastic_times_smooth.default, (xr, key)
        yield ops.noisy_rectifier.default, (xr, key, 1.0, False)
        yield ops.noisy_rectifier.default, (xr, key, 0.5, True)
        yield ops.reinforce.default, (xr, h, loss, c, 0.2)
    yield ops.binary_sample.default, (x, key)
    yield ops.straight_through_backward.default, (x, x)
    yield ops.stochastic_times_smooth_backward.default, (x, x, h)
    yield ops.noisy_rectifier_backward.default, (x, h)
    yield ops.reinforce_backward.default, (torch.ones((), device=device), x, h, loss, c, 0.2)
    # Non-contiguous input.
    yield ops.stochastic_times_smooth.default, (torch.randn(3, 5, device=device).t(), key)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    def step(x, loss):
        h = stochgate.straight_through(x)
        s = stochgate.stochastic_times_smooth(x)
        r = stochgate.noisy_rectifier(x, sigma=0.5)
        surrogate = stochgate.reinforce(x, stochgate.binary_sample(x), loss, baseline=0.5)
        return (h * s + r).sum() + surrogate

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 6, requires_grad=True)
    loss = torch.rand(8)
    out = compiled(x, loss)
    out.backward()
    assert torch.isfinite(x.grad).all() and x.grad.shape == x.shape


def test_reinforce_gradient_formula():
    torch.manual_seed(1)
    logits = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    h = stochgate.binary_sample(logits)
    loss = torch.rand(6, dtype=torch.float64)
    for baseline, c in ((None, 0.0), (0.25, 0.25)):
        for reduction, div in (("mean", 6), ("sum", 1)):
            logits.grad = None
            s = stochgate.reinforce(logits, h, loss, baseline=baseline, reduction=reduction)
            assert s.item() == 0.0 and s.dim() == 0
            s.backward()
            p = torch.sigmoid(logits.detach())
            expected = (h - p) * (loss.view(6, 1, 1) - c) / div
            torch.testing.assert_close(logits.grad, expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_reinforce_matches_reference(dtype):
    logits = torch.randn(9, 4).to(dtype)
    h = stochgate.binary_sample(logits)
    loss = torch.rand(9)
    grads = []
    for fn in (stochgate.reinforce, reference.reinforce):
        x = logits.clone().requires_grad_()
        base = stochgate.MinVarianceBaseline(4)
        base.update(x, h, loss + 1)  # some statistics to use
        fn(x, h, loss, baseline=base).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=_tol(dtype), rtol=_tol(dtype))


def test_min_variance_baseline_reads_before_update():
    base = stochgate.MinVarianceBaseline(3)
    logits = torch.zeros(4, 3, requires_grad=True)
    h = torch.ones(4, 3)
    loss = torch.full((4,), 2.0)
    stochgate.reinforce(logits, h, loss, baseline=base).backward()
    # c was 0 (no statistics yet) although this batch's min-variance c would be 2.
    torch.testing.assert_close(logits.grad, (h - 0.5) * 2.0 / 4)
    torch.testing.assert_close(base.value(logits), torch.full((3,), 2.0, dtype=torch.float64))
    assert set(base.state_dict()) == {"numerator", "denominator", "count"}


def test_moving_average_baseline():
    base = stochgate.MovingAverageBaseline(momentum=0.5)
    logits = torch.zeros(2, 3)
    base.update(logits, logits, torch.tensor([1.0, 3.0]))
    assert base.value(logits).tolist() == [2.0] * 3
    base.update(logits, logits, torch.tensor([4.0, 4.0]))
    assert base.value(logits).tolist() == [3.0] * 3
    base.eval()
    x = torch.zeros(2, 3, requires_grad=True)
    stochgate.reinforce(x, torch.ones(2, 3), torch.tensor([5.0, 5.0]), baseline=base).backward()
    assert base.value(logits).tolist() == [3.0] * 3  # eval mode: no update


def test_stochastic_gate_module():
    x = torch.randn(16, 10, requires_grad=True)
    for estimator in ("st", "st_sigmoid", "sts", "noisy_rectifier", "reinforce"):
        gate = stochgate.nn.StochasticGate(estimator, num_units=10)
        h = gate(x)
        assert h.shape == x.shape
        if estimator == "reinforce":
            assert not h.requires_grad
            gate.reinforce_loss(torch.rand(16)).backward()
        else:
            h.sum().backward()
        gate.eval()
        h_eval = gate(x)
        assert torch.equal(h_eval, gate(x))  # deterministic
    gate = stochgate.nn.StochasticGate("st").eval()
    assert torch.equal(gate(x), (x > 0).float())
    assert torch.equal(stochgate.nn.StochasticGate("sts").eval()(x), torch.sigmoid(x))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: stochgate.straight_through(torch.ones(3, dtype=torch.int64)), ValueError, "logits must be a floating"),
        (lambda: stochgate.straight_through(torch.ones(3), variant="tanh"), ValueError, "variant"),
        (lambda: stochgate.straight_through([1.0]), TypeError, "logits must be a torch.Tensor"),
        (lambda: stochgate.noisy_rectifier(torch.ones(3), sigma=-1.0), ValueError, "sigma"),
        (lambda: stochgate.noisy_rectifier(torch.ones(3), sigma=float("nan")), ValueError, "sigma"),
        (lambda: stochgate.noisy_rectifier(torch.ones(3), noise="uniform"), ValueError, "noise"),
        (lambda: stochgate.binary_sample(torch.ones(3), generator=3), TypeError, "generator"),
        (lambda: stochgate.reinforce(torch.ones(4, 3), torch.ones(4, 2), torch.ones(4)), ValueError, r"h must be a tensor of the shape of logits \(4, 3\)"),
        (lambda: stochgate.reinforce(torch.ones(4, 3), torch.ones(4, 3), torch.ones(3)), ValueError, r"loss must be a tensor of shape \(4,\)"),
        (lambda: stochgate.reinforce(torch.ones(4, 3), torch.ones(4, 3), torch.ones(4), reduction="max"), ValueError, "reduction"),
        (lambda: stochgate.reinforce(torch.ones(4, 3), torch.ones(4, 3), torch.ones(4), baseline="x"), TypeError, "baseline"),
        (lambda: stochgate.reinforce(torch.ones(4, 3), torch.ones(4, 3), torch.ones(4), baseline=stochgate.MinVarianceBaseline(5)), ValueError, "num_units=5"),
        (lambda: stochgate.MinVarianceBaseline(0), ValueError, "num_units"),
        (lambda: stochgate.MovingAverageBaseline(1.5), ValueError, "momentum"),
        (lambda: stochgate.nn.StochasticGate("gumbel"), ValueError, "estimator"),
        (lambda: torch.ops.stochgate.binary_sample(torch.ones(3), torch.ones(3, dtype=torch.int64)), RuntimeError, "key must be an int64 tensor of 2"),
        (lambda: torch.ops.stochgate.stochastic_times_smooth_backward(torch.ones(3), torch.ones(3), torch.ones(4)), RuntimeError, r"h and logits must have the same shape"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cpu_and_cuda_draw_the_same_samples_for_the_same_key(dtype):
    x = (2 * torch.randn(301, 7)).to(dtype)
    key = torch.tensor([123456789, 42], dtype=torch.int64)
    ops = torch.ops.stochgate
    for key_dev in ("cpu", "cuda"):
        k = key.to(key_dev)
        for op, args in (
            (ops.binary_sample, ()),
            (ops.stochastic_times_smooth, ()),
            (ops.noisy_rectifier, (1.0, False)),
            (ops.noisy_rectifier, (1.0, True)),
        ):
            a = op(x, key, *args)
            b = op(x.cuda(), k, *args).cpu()
            if op in (ops.binary_sample, ops.stochastic_times_smooth):
                assert ((a != 0) != (b != 0)).float().mean() < 1e-3
            else:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_capture_no_host_sync():
    x = torch.randn(1024, device="cuda", requires_grad=False)
    static = {}
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up
            stochgate.noisy_rectifier(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static["h"] = stochgate.straight_through(x)
        static["r"] = stochgate.noisy_rectifier(x)
    g.replay()
    first = static["r"].clone()
    g.replay()
    torch.cuda.synchronize()
    assert static["h"].shape == x.shape
    assert not torch.equal(first, static["r"])  # fresh randomness per replay


def _offset_copy(x: torch.Tensor, shift: int) -> torch.Tensor:
    """A contiguous copy of x whose data starts `shift` elements into its storage (shift = 1:
    not aligned to any vector of two or more elements)."""
    buf = torch.empty(x.numel() + shift, dtype=x.dtype, device=x.device)
    out = buf[shift:].view(x.shape)
    out.copy_(x)
    return out


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("numel", [5, 64, 64 * 37, 64 * 37 + 1, 64 * 37 + 63, (1 << 16) + 29])
def test_cuda_sampling_vector_and_scalar_paths(dtype, numel):
    """The CUDA sampling kernels have a vector path (aligned input, whole 64-element blocks,
    the partial last block done group by group) and a scalar path (unaligned input):
    both must draw the same samples, bit for bit, and agree with the CPU kernels."""
    x = (2 * torch.randn(numel, dtype=torch.float64)).to(dtype)
    key = torch.tensor([987654321, 7], dtype=torch.int64)
    ops = torch.ops.stochgate
    for op, args in (
        (ops.binary_sample, ()),
        (ops.stochastic_times_smooth, ()),
        (ops.noisy_rectifier, (1.0, False)),
        (ops.noisy_rectifier, (0.5, True)),
    ):
        cpu = op(x, key, *args)
        aligned = op(x.cuda(), key.cuda(), *args)
        unaligned = op(_offset_copy(x.cuda(), 1), key.cuda(), *args)
        assert torch.equal(aligned, unaligned), op
        got = aligned.cpu()
        if op in (ops.binary_sample, ops.stochastic_times_smooth):
            differ = (got != 0) != (cpu != 0)
            assert differ.sum().item() <= max(1, numel // 1000), op
            torch.testing.assert_close(got[~differ], cpu[~differ], atol=_tol(dtype), rtol=_tol(dtype))
        else:
            torch.testing.assert_close(got, cpu, atol=10 * _tol(dtype), rtol=10 * _tol(dtype))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (37, 13), (4, 4), (300, 257)])
def test_cuda_reinforce_backward_matches_cpu(dtype, shape):
    """The CUDA REINFORCE backward (four elements per thread, row and unit stepped across row
    ends) against the CPU kernel, aligned and unaligned."""
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    h = torch.bernoulli(torch.sigmoid(x.double())).to(dtype)
    loss = torch.rand(shape[0])
    base = torch.randn(shape[1])
    grad = torch.tensor(1.5, dtype=dtype)
    ops = torch.ops.stochgate
    cpu = ops.reinforce_backward(grad, x, h, loss, base, 0.25)
    for shift in (0, 1):
        xc, hc = _offset_copy(x.cuda(), shift), _offset_copy(h.cuda(), shift)
        got = ops.reinforce_backward(grad.cuda(), xc, hc, loss.cuda(), base.cuda(), 0.25).cpu()
        torch.testing.assert_close(got, cpu, atol=_tol(dtype), rtol=_tol(dtype))
