"""stochgate: stochastic hard-gated neurons with the gradient estimators of Bengio, Leonard &
Courville (2013), fused CPU/CUDA kernels, and conditional computation that skips the work of
gated-off chunks.

Public API: the estimators (:func:`straight_through`, :func:`stochastic_times_smooth`,
:func:`noisy_rectifier`, :func:`binary_sample`, :func:`reinforce`), REINFORCE baselines
(:class:`MovingAverageBaseline`, :class:`MinVarianceBaseline`), the gated matmuls
(:func:`gated_linear`, :func:`gated_input_linear`), modules in :mod:`stochgate.nn`, the
pure-PyTorch oracle :mod:`stochgate.reference`, and :func:`build_info`.
"""

from __future__ import annotations

from . import _ops
from .baselines import MinVarianceBaseline, MovingAverageBaseline
from .estimators import (
    binary_sample,
    noisy_rectifier,
    reinforce,
    stochastic_times_smooth,
    straight_through,
)
from .gated import gated_input_linear, gated_linear

__version__ = "0.1.0"


def build_info() -> dict:
    """What the compiled extension was built with: ``torch_version``, ``cuda_compiled``
    (whether CUDA kernels are in the binary), ``cuda_version`` and ``cuda_archs``."""
    return dict(_ops._C.build_info())


from . import nn, reference  # noqa: E402  (nn uses the functions above)

__all__ = [
    "binary_sample",
    "build_info",
    "gated_input_linear",
    "gated_linear",
    "MinVarianceBaseline",
    "MovingAverageBaseline",
    "nn",
    "noisy_rectifier",
    "reference",
    "reinforce",
    "stochastic_times_smooth",
    "straight_through",
]
