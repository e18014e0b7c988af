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
        assert "90" in info["cuda_archs"].split(","), info
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


def test_console_command():
    out = subprocess.run([sys.executable, "-m", "stochgate.cli", "info"], capture_output=True, text=True, check=True)
    assert '"torch_version"' in out.stdout
    bad = subprocess.run([sys.executable, "-m", "stochgate.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command" in bad.stderr and "Traceback" not in bad.stderr
