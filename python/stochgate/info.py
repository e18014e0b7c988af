"""`stochgate info`: versions and what the compiled extension contains."""

from __future__ import annotations

import json
import platform

import torch


def main(argv: list[str] | None = None) -> int:
    import stochgate
    from stochgate.bench import cpu_info

    info = {
        "stochgate": stochgate.__version__,
        "build": stochgate.build_info(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine(),
        **cpu_info(),
    }
    print(json.dumps(info, indent=2))
    return 0
