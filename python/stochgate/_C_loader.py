"""Loads the compiled module ``stochgate._C`` and checks it matches the installed torch."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

_REBUILD = (
    "Rebuild stochgate against the torch you have: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` in the stochgate "
    "source tree (or `make build`)."
)


def check_torch_version(built: str, installed: str | None = None) -> None:
    """Raise ImportError unless the extension was built for the installed torch."""
    installed = torch.__version__ if installed is None else installed
    if built != installed:
        raise ImportError(
            f"stochgate was built for PyTorch {built}, but PyTorch {installed} is "
            f"installed. {_REBUILD}"
        )


def load() -> object:
    # The build writes the torch version it compiled against beside _C; read it before
    # loading the binary, whose symbols may not even resolve against another torch.
    spec = importlib.util.find_spec("stochgate._C")
    if spec is None or spec.origin is None:
        raise ImportError(f"stochgate: the compiled kernels (stochgate._C) are not installed. {_REBUILD}")
    stamp = Path(spec.origin).with_name("_built_with_torch.txt")
    if stamp.exists():
        check_torch_version(stamp.read_text().strip())
    try:
        module = importlib.import_module("stochgate._C")
    except ImportError as exc:  # undefined symbols: built against another torch
        raise ImportError(
            f"stochgate: cannot load its compiled kernels (stochgate._C) with torch "
            f"{torch.__version__}: {exc}. {_REBUILD}"
        ) from exc
    check_torch_version(module.build_info()["torch_version"])
    return module
