"""One call of each gated op (bf16, B=16384, K=N=4096, chunk 128, density 0.25) for Nsight
Compute: `ncu ... python benchmarks/gpu_ncu_target.py` (see benchmarks/gpu_check.sh)."""

import torch

import stochgate
from stochgate import bench

for op in ("gated_linear", "gated_input_linear"):
    inputs, _ = bench.make_inputs(op, 16384, 4096, 4096, 128, 0.25, torch.bfloat16, "cuda")
    with torch.no_grad():
        getattr(stochgate, op)(*inputs)
torch.cuda.synchronize()
