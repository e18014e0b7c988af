"""The Hopper GEMM path (csrc/cuda/gated_linear_sm90.cuh) against the mma.sync kernel, in one
process on a compute-capability-9.0 GPU: first correctness of both against a float64 reference
on awkward shapes, then timings interleaved with dense cuBLAS at the issue's shape
(bf16, B=16384, K=N=4096, chunk 128), each op eager and replayed from a captured CUDA graph.
The kernel is chosen per call by STOCHGATE_CUDA_GEMM (mma = the mma.sync kernel) and, for the
Hopper kernel, STOCHGATE_SM90_STAGES (default 3 = three-stage ring, two blocks per SM; 4 = four
stages, one block), STOCHGATE_SM90_LAG (default 0 = wait for each step's wgmma, loads one
step further ahead; 1 = leave one step's wgmma running) and STOCHGATE_SM90_ORDER (group =
tiles chunk by chunk; default M tile by M tile across the chunks); the row reductions'
cross-chunk sum by STOCHGATE_CUDA_REDUCE (atomic, default, or partials),
STOCHGATE_CUDA_REDUCE_BYTES (the atomic accumulator's budget) and STOCHGATE_CUDA_RED (how the
epilogue adds: pairs, quads or bulk). Writes gpu_sm90.json into the
directory given as the first argument.

    python benchmarks/gpu_sm90.py OUTDIR
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import stochgate
from stochgate import bench, reference

B, K, N, CHUNK = 16384, 4096, 4096, 128
# Run 5 (benchmarks/GPU_NOTES.md) named the four-stage ring "sm90" and the three-stage one
# "sm90_s3"; the three-stage ring is the default since. Run 6 added the lag-0 rings, the
# default since run 7. Run 8 timed the row reductions' cross-chunk sum (gated_input_linear,
# gated_linear's dx) by fp32 atomics into accumulators of 16 MiB, 64 MiB and all columns, and
# with the mma.sync kernel, against run 7's per-pair partials summed in chunk order (what
# torch.use_deterministic_algorithms selects); all columns at once was the fastest and is the
# default since (STOCHGATE_CUDA_REDUCE_BYTES unset: up to 512 MiB).
# Run 10 times how the atomic path's GEMM epilogues add into the accumulator
# (STOCHGATE_CUDA_RED): "pairs" (red.global.add.v2.f32, runs 8-9), "quads" (v4, lane pairs
# trading halves) and "bulk" (each tile row as one cp.reduce.async.bulk); "atomic" is the
# build's default (RED_DEFAULT below, which the other variants leave out).
# And gated_linear's forward with its zero-fill before the GEMM (STOCHGATE_CUDA_ZERO=serial,
# up to run 9) against beside it on a forked stream (the default since run 10); run 11 the
# products with an M/N-major operand (dx, dh, the dweights) on the wgmma kernel (default) or,
# STOCHGATE_SM90_MN=0, on the mma.sync kernel as up to run 10.
RED_DEFAULT = "bulk"  # since run 11 (run 10: "pairs")
_BASE = {"STOCHGATE_CUDA_GEMM": "auto", "STOCHGATE_SM90_STAGES": "3", "STOCHGATE_SM90_ORDER": "level",
         "STOCHGATE_SM90_LAG": "0", "STOCHGATE_CUDA_REDUCE": "atomic", "STOCHGATE_CUDA_REDUCE_BYTES": "",
         "STOCHGATE_CUDA_RED": "", "STOCHGATE_CUDA_ZERO": "", "STOCHGATE_SM90_MN": ""}
VARIANTS = {"partials": {**_BASE, "STOCHGATE_CUDA_REDUCE": "partials"},
            "atomic": _BASE,
            **{f"atomic_{m}": {**_BASE, "STOCHGATE_CUDA_RED": m} for m in ("pairs", "quads", "bulk") if m != RED_DEFAULT},
            "zero_serial": {**_BASE, "STOCHGATE_CUDA_ZERO": "serial"},
            "mn_mma": {**_BASE, "STOCHGATE_SM90_MN": "0"}}


def use(variant: str) -> None:
    for k, v in VARIANTS[variant].items():
        if v:
            os.environ[k] = v
        else:
            os.environ.pop(k, None)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def correctness() -> list[dict]:
    """Both ops, forward (and gated_linear's backward) through each variant, against the
    float64 reference, on shapes with M, N and K tails, chunk < 128, chunk = N, one active row,
    all gates off, a non-contiguous x and fp16."""
    shapes = [  # (batch, k, n, chunk, density)
        (1000, 4096, 4096, 128, 0.3), (333, 200, 384, 128, 0.5), (257, 72, 256, 64, 0.7),
        (50, 4104, 384, 128, 0.9), (64, 256, 512, 512, 0.5), (1, 64, 128, 128, 1.0),
        (300, 136, 256, 32, 0.0), (4096, 1024, 2048, 256, 0.1)]
    rows = []
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16):
        for b, k, n, chunk, d in shapes:
            x = torch.randn(b, k + 8, generator=gen)[:, 3:3 + k]  # non-contiguous rows
            w = torch.randn(n, k, generator=gen) * k**-0.5
            bias = torch.randn(n, generator=gen)
            gates = (torch.rand(b, n // chunk, generator=gen) < d) * (0.5 + torch.rand(b, n // chunk, generator=gen))
            h = torch.randn(b, n, generator=gen)
            w2 = torch.randn(k, n, generator=gen) * n**-0.5
            bias2 = torch.randn(k, generator=gen)
            dy = torch.randn(b, n, generator=gen)
            cast = [t.to(dtype).double() for t in (x, w, bias, gates, h, w2, bias2, dy)]
            xd, wd, bd, gd, hd, w2d, b2d, dyd = cast
            ref1 = reference.gated_linear(xd, wd, bd, gd)
            ref2 = reference.gated_input_linear(hd, w2d, b2d, gd)
            xr = xd.clone().requires_grad_()
            reference.gated_linear(xr, wd, bd, gd).backward(dyd)
            for variant in VARIANTS:
                use(variant)
                dev = [t.to("cuda", dtype) for t in (x, w, bias, gates, h, w2, bias2, dy)]
                xc, wc, bc, gc, hc, w2c, b2c, dyc = dev
                xc = torch.empty(b, k + 8, device="cuda", dtype=dtype)[:, 3:3 + k].copy_(xc).requires_grad_()
                y1 = stochgate.gated_linear(xc, wc, bc, gc)
                y1.backward(dyc)
                y2 = stochgate.gated_input_linear(hc, w2c, b2c, gc)
                torch.cuda.synchronize()
                rows.append({"dtype": str(dtype)[6:], "shape": [b, k, n, chunk, d], "variant": variant,
                             "gated_linear": rel_err(y1, ref1), "dx": rel_err(xc.grad, xr.grad),
                             "gated_input_linear": rel_err(y2, ref2),
                             "exact_zeros": bool((y1.view(b, n // chunk, chunk)[gc == 0] == 0).all().item())})
    return rows


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def graph_of(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream); returns its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def print_timings(rows: list[dict], variants) -> None:
    """One line per (op, density): dense and each variant, ms eager / graph replay and the
    speedups over dense in the same mode."""
    by: dict = {}
    for r in rows:
        by.setdefault((r["op"], r["density"]), {})[r["variant"]] = r
    for (op, d), vs in by.items():
        dense = vs["dense"]
        cells = [f"dense {dense['eager_ms']:.3f}/{dense['graph_ms']:.3f}"]
        for v in variants:
            cells.append(f"{v} {vs[v]['eager_ms']:.3f}/{vs[v]['graph_ms']:.3f} "
                         f"({dense['eager_ms'] / vs[v]['eager_ms']:.2f}x/{dense['graph_ms'] / vs[v]['graph_ms']:.2f}x)")
        print(f"{op:<21} d={d:<4} " + " | ".join(cells))


def time_variants(op: str, density: float, dense, call, variants, use, repeats: int, warmup: int) -> list[dict]:
    """dense() and call() under each variant (use(v) sets its environment, also before each
    eager call), interleaved, eager and replayed from a CUDA graph: one row per method with the
    median ms of each."""
    runs = {"dense": dense}
    graphs = {"dense": graph_of(dense)}
    for variant in variants:
        use(variant)
        runs[variant] = (lambda v: lambda: (use(v), call()))(variant)
        graphs[variant] = graph_of(call)
    eager = bench.time_interleaved(runs, repeats, "cuda", warmup=warmup)
    replay = bench.time_interleaved(graphs, repeats, "cuda", warmup=warmup)
    return [{"op": op, "density": density, "variant": name, "eager_ms": _median_ms(eager[name]),
             "graph_ms": _median_ms(replay[name])} for name in runs]


def timings(repeats: int = 25) -> list[dict]:
    """Forward of both ops, and gated_linear's backward op (dx, dweight, dbias; gates need no
    gradient: the training step's backward) against cuBLAS doing the same three products."""
    rows = []
    for op in ("gated_linear", "gated_input_linear", "gated_linear_backward"):
        for density in (0.1, 0.25, 0.5, 1.0):
            fwd_op = "gated_input_linear" if op == "gated_input_linear" else "gated_linear"
            inputs, _ = bench.make_inputs(fwd_op, B, K, N, CHUNK, density, torch.bfloat16, "cuda")
            a, w, bias, gates = inputs
            if op == "gated_linear_backward":
                dy = torch.randn(B, N, device="cuda", dtype=torch.bfloat16)
                mask = [True, True, True, False]

                def fn(a, w, bias, gates, dy=dy, mask=mask):
                    return torch.ops.stochgate.gated_linear_backward(dy, a, w, bias, gates, mask, False)

                def dense(dy=dy):
                    return dy @ w, dy.t() @ a, dy.sum(0)
            else:
                fn = stochgate.gated_linear if op == "gated_linear" else stochgate.gated_input_linear

                def dense():
                    return F.linear(a, w, bias)
            rows += time_variants(op, density, dense, lambda: fn(a, w, bias, gates), VARIANTS, use, repeats, 3)
            del inputs, a, w, bias, gates, dense
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    outdir = Path(sys.argv[1])
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "build": stochgate.build_info(),
           "shape": {"B": B, "K": K, "N": N, "chunk": CHUNK, "dtype": "bfloat16"}}
    res["correctness"] = correctness()
    worst = {}
    for r in res["correctness"]:
        for key in ("gated_linear", "dx", "gated_input_linear"):
            worst[(r["variant"], r["dtype"], key)] = max(worst.get((r["variant"], r["dtype"], key), 0.0), r[key])
        if not r["exact_zeros"]:
            print("NOT EXACT ZEROS in gated-off chunks:", r)
    print(f"correctness ({time.time() - t0:.0f} s): worst relative error vs float64 per variant")
    for (v, dt, key), e in sorted(worst.items()):
        print(f"  {v:<10} {dt:<9} {key:<20} {e:.2e}")
    bad = [r for r in res["correctness"] if max(r["gated_linear"], r["dx"], r["gated_input_linear"]) > 2e-2]
    for r in bad:
        print("  TOO LARGE:", r)
    (outdir / "gpu_sm90.json").write_text(json.dumps(res, indent=1))
    use("atomic")
    res["timings"] = timings()
    (outdir / "gpu_sm90.json").write_text(json.dumps(res, indent=1))
    print(f"\ntimings ({time.time() - t0:.0f} s), bf16 B={B} K=N={K} chunk {CHUNK}: median ms eager / graph replay, "
          "speedup over dense (same mode)")
    print_timings(res["timings"], VARIANTS)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
