"""`stochgate info`: versions and what the compiled extension contains."""

from __future__ import annotations

import json
import platform

import torch


def main(argv: list[str] | None = None) -> int:
    import stochgate
    from stochgate.bench import cpu_model

    info = {
        "stochgate": stochgate.__version__,
        "build": stochgate.build_info(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        # float32 CPU gated matmuls: AVX-512, AVX2 or baseline kernels (picked at run time)
        "cpu_kernel_isa": stochgate._ops._C.cpu_isa(),
        # bfloat16 gated matmuls with chunks of 16 or more run on AMX (oneDNN's brgemm) here
        "cpu_bf16_amx": bool(stochgate._ops._C.cpu_amx_available()),
    }
    print(json.dumps(info, indent=2))
    return 0
