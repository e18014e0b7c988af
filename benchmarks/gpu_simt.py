"""The float32 (SIMT) GEMM kernel of csrc/cuda/gated_linear.cuh in its configurations, in one
process on a CUDA GPU (benchmarks/GPU_NOTES.md, runs 12-13): the default 128 x 128 tile (8 x 8
outputs per thread, K step 32, two blocks per SM, K-major operands transposed into shared
memory: run 13), the same tile with K-major operands kept K-major and read two K steps per
vector (STOCHGATE_CUDA_SIMT=128k: run 12's default) and the 64 x 64 tile (4 x 4 per thread, K
step 16; STOCHGATE_CUDA_SIMT=64, the tile size of runs 1-11). First the worst relative error of
each against float64 on awkward shapes, then timings at the issue's shape
(float32, TF32 off, B=16384, K=N=4096, chunk 128), interleaved with dense cuBLAS: gated_linear's
forward and its backward op (dx, dweight, dbias; gates without gradient), eager and replayed from
a CUDA graph. Writes gpu_simt.json into the directory given as the first argument.

    python benchmarks/gpu_simt.py OUTDIR
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import stochgate
from stochgate import bench, reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_sm90 import print_timings, rel_err, time_variants  # noqa: E402

B, K, N, CHUNK = 16384, 4096, 4096, 128
VARIANTS = {"simt128": "128", "simt128k": "128k", "simt64": "64"}


def use(variant: str) -> None:
    os.environ["STOCHGATE_CUDA_SIMT"] = VARIANTS[variant]


def correctness() -> list[dict]:
    shapes = [(1000, 4096, 4096, 128, 0.3), (333, 200, 384, 128, 0.5), (257, 72, 256, 64, 0.7),
              (50, 4104, 384, 128, 0.9), (64, 256, 512, 512, 0.5), (1, 64, 128, 128, 1.0), (300, 130, 256, 32, 0.4)]
    gen = torch.Generator().manual_seed(2)
    rows = []
    for b, k, n, chunk, d in shapes:
        x = torch.randn(b, k + 8, generator=gen)[:, 3:3 + k]
        w = torch.randn(n, k, generator=gen) * k**-0.5
        bias = torch.randn(n, generator=gen)
        gates = (torch.rand(b, n // chunk, generator=gen) < d) * (0.5 + torch.rand(b, n // chunk, generator=gen))
        dy = torch.randn(b, n, generator=gen)
        xd, wd, bd, gd, dyd = (t.double() for t in (x, w, bias, gates, dy))
        xr, wr = xd.clone().requires_grad_(), wd.clone().requires_grad_()
        ref = reference.gated_linear(xr, wr, bd, gd)
        ref.backward(dyd)
        for variant in VARIANTS:
            use(variant)
            xc = torch.empty(b, k + 8, device="cuda")[:, 3:3 + k].copy_(x).requires_grad_()
            wc = w.cuda().requires_grad_()
            y = stochgate.gated_linear(xc, wc, bias.cuda(), gates.cuda())
            y.backward(dy.cuda())
            torch.cuda.synchronize()
            rows.append({"shape": [b, k, n, chunk, d], "variant": variant, "y": rel_err(y, ref.detach()),
                         "dx": rel_err(xc.grad, xr.grad), "dweight": rel_err(wc.grad, wr.grad),
                         "exact_zeros": bool((y.view(b, n // chunk, chunk)[gates.cuda() == 0] == 0).all().item())})
    return rows


def timings(repeats: int = 10) -> list[dict]:
    rows = []
    for op, densities in (("gated_linear", (0.1, 0.25, 1.0)), ("gated_linear_backward", (0.1, 0.25))):
        for density in densities:
            inputs, _ = bench.make_inputs("gated_linear", B, K, N, CHUNK, density, torch.float32, "cuda")
            x, w, bias, gates = inputs
            if op == "gated_linear_backward":
                dy = torch.randn(B, N, device="cuda")

                def fn(dy=dy):
                    return torch.ops.stochgate.gated_linear_backward(dy, x, w, bias, gates, [True, True, True, False],
                                                                     False)

                def dense(dy=dy):
                    return dy @ w, dy.t() @ x, dy.sum(0)
            else:
                def fn():
                    return stochgate.gated_linear(x, w, bias, gates)

                def dense():
                    return F.linear(x, w, bias)
            rows += time_variants(op, density, dense, fn, VARIANTS, use, repeats, 2)
            del inputs, x, w, bias, gates, dense, fn
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    outdir = Path(sys.argv[1])
    outdir.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "build": stochgate.build_info(),
           "shape": {"B": B, "K": K, "N": N, "chunk": CHUNK, "dtype": "float32"}}
    res["correctness"] = correctness()
    worst: dict = {}
    for r in res["correctness"]:
        for key in ("y", "dx", "dweight"):
            worst[(r["variant"], key)] = max(worst.get((r["variant"], key), 0.0), r[key])
        if not r["exact_zeros"]:
            print("NOT EXACT ZEROS in gated-off chunks:", r)
    print(f"correctness ({time.time() - t0:.0f} s): worst relative error vs float64")
    for (v, key), e in sorted(worst.items()):
        print(f"  {v:<8} {key:<8} {e:.2e}")
    bad = [r for r in res["correctness"] if max(r["y"], r["dx"], r["dweight"]) > 1e-4 or not r["exact_zeros"]]
    for r in bad:
        print("  TOO LARGE:", r)
    (outdir / "gpu_simt.json").write_text(json.dumps(res, indent=1))
    res["timings"] = timings()
    (outdir / "gpu_simt.json").write_text(json.dumps(res, indent=1))
    print(f"\ntimings ({time.time() - t0:.0f} s), float32 B={B} K=N={K} chunk {CHUNK}: median ms eager / graph "
          "replay, speedup over dense (same mode)")
    print_timings(res["timings"], VARIANTS)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
