"""Loads the compiled module ``stochgate._C`` and checks it matches the installed torch."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

_REBUILD = (
    "Rebuild stochgate against the torch you have: "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` in the stochgate "
    "source tree (or `make build`)."
)


def _mismatch(built: str) -> ImportError:
    return ImportError(
        f"stochgate was built for PyTorch {built}, but PyTorch {torch.__version__} is "
        f"installed. {_REBUILD}"
    )


def load() -> object:
    stamp = Path(__file__).with_name("_built_with_torch.txt")
    if stamp.exists():
        built = stamp.read_text().strip()
        if built != torch.__version__:
            raise _mismatch(built)
    try:
        module = importlib.import_module("stochgate._C")
    except ImportError as exc:  # undefined symbols: built against another torch
        raise ImportError(
            f"stochgate: cannot load its compiled kernels (stochgate._C) with torch "
            f"{torch.__version__}: {exc}. {_REBUILD}"
        ) from exc
    built = module.build_info()["torch_version"]
    if built != torch.__version__:
        raise _mismatch(built)
    return module
