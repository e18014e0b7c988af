"""The package, its build information and its console command."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

import stochgate
from stochgate import _C_loader


def test_build_info_matches_installed_torch():
    info = stochgate.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_compiled"], bool)
    if torch.version.cuda and shutil.which("nvcc"):
        # CI compiles the CUDA kernels whenever torch is a CUDA build and nvcc exists.
        assert info["cuda_compiled"], info
        # sm_90 is built as sm_90a machine code (the wgmma kernel) plus compute_90 PTX.
        assert {"90a-real", "90-virtual"} <= set(info["cuda_archs"].split(",")), info
        assert info["cuda_version"] == torch.version.cuda


def test_cuda_kernels_registered_when_compiled():
    if not stochgate.build_info()["cuda_compiled"]:
        pytest.skip("CUDA kernels not compiled in")
    for op in ("straight_through", "noisy_rectifier", "gated_linear", "gated_input_linear"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stochgate::{op}", "CUDA"), op


def test_cpu_kernels_registered():
    for op in (
        "binary_sample", "straight_through", "straight_through_backward", "stochastic_times_smooth",
        "stochastic_times_smooth_backward", "noisy_rectifier", "noisy_rectifier_backward",
        "reinforce", "reinforce_backward", "gated_linear", "gated_linear_backward",
        "gated_input_linear", "gated_input_linear_backward",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stochgate::{op}", "CPU"), op


def test_version_mismatch_is_a_clear_import_error():
    with pytest.raises(ImportError, match=r"built for PyTorch 2\.0\.0, but PyTorch 2\.9\.9 is installed.*Rebuild"):
        _C_loader.check_torch_version("2.0.0", "2.9.9")
    _C_loader.check_torch_version(torch.__version__)  # no error


def test_cpu_kernel_isa_reported_and_lowered(monkeypatch):
    """`_C.cpu_isa()` names the float32 CPU kernels' instruction set (recorded by the benchmarks);
    STOCHGATE_CPU_ISA lowers it as it lowers the kernels."""
    from stochgate._ops import _C

    isa = _C.cpu_isa()
    assert isa in ("avx512", "avx2", "baseline")
    monkeypatch.setenv("STOCHGATE_CPU_ISA", "base")
    assert _C.cpu_isa() == "baseline"
    monkeypatch.setenv("STOCHGATE_CPU_ISA", "avx2")
    assert _C.cpu_isa() == ("baseline" if isa == "baseline" else "avx2")


def test_console_command():
    out = subprocess.run([sys.executable, "-m", "stochgate.cli", "info"], capture_output=True, text=True, check=True)
    assert '"torch_version"' in out.stdout and '"cpu_kernel_isa"' in out.stdout
    bad = subprocess.run([sys.executable, "-m", "stochgate.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr and "Traceback" not in bad.stderr


def test_module_links_the_shared_libstdcxx():
    """The module must not carry its own copy of libstdc++'s stream and locale code: on the
    H100 machine (2026-11-27) a build whose error formatting ran in such a copy crashed with
    SIGSEGV instead of raising (see csrc/common/checks.h). Its internals defined in the
    module would give that away."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not installed")
    import stochgate._C as C

    out = subprocess.run([nm, "-C", "--defined-only", C.__file__], capture_output=True, text=True, check=True).stdout
    own = [line for line in out.splitlines() if "std::locale::" in line or "std::codecvt<" in line or "std::ios_base::" in line]
    assert not own, f"{C.__file__} defines {len(own)} libstdc++ symbols, e.g. {own[:3]}"


def test_check_failure_raises_runtime_error_with_shapes():
    """A failed input check in the C++ op raises (no crash) and names shapes and sizes, which
    the module formats without std::ostream (csrc/common/checks.h)."""
    x, w, g = torch.randn(8, 16), torch.randn(32, 16), torch.ones(8, 3)
    with pytest.raises(RuntimeError, match=r"the 32 gated output units \(weight \[32, 16\]\) must split into gates.shape\[1\] = 3"):
        torch.ops.stochgate.gated_linear(x, w, None, g, False)
    with pytest.raises(RuntimeError, match=r"key must be an int64 tensor of 2 elements \(seed, offset\), got Float of shape \[3\]"):
        torch.ops.stochgate.binary_sample(torch.ones(3), torch.ones(3))
