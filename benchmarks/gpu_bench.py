"""The GPU benchmark of issue 6 in one process (one CUDA context, one torch import): the
ceilings (device-to-device copy bandwidth, cuBLAS GEMM rate), then `stochgate bench` for each
op, mode and dtype at B=16384, K=N=4096, chunk 128, then a per-kernel breakdown of the gated
ops from torch.profiler. Writes JSON files into the directory given as the first argument.

    python benchmarks/gpu_bench.py OUTDIR [--quick]
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import stochgate
from stochgate import bench

B, K, N, CHUNK = 16384, 4096, 4096, 128
DENSITIES = ["0.1", "0.25", "0.5", "1.0"]


def _median_ms(fn, repeats=20, warmup=3) -> float:
    """Median milliseconds per call: stochgate bench's timer (CUDA events around each call)."""
    return statistics.median(bench.time_interleaved({"fn": fn}, repeats, "cuda", warmup=warmup)["fn"]) * 1e3


def ceilings() -> dict:
    """Copy bandwidth (bytes read + written) on a 1 GiB tensor and the cuBLAS rate of the dense
    product at the benchmark's shape and at 8192^3, on random data."""
    out = {}
    src = torch.randn(256 * 1024 * 1024, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    out["copy_GBps"] = 2 * src.numel() * 4 / ms / 1e6
    del src, dst
    for dtype in (torch.bfloat16, torch.float32):
        for m, k, n in ((B, K, N), (8192, 8192, 8192)):
            a = torch.randn(m, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype)
            ms = _median_ms(lambda: torch.nn.functional.linear(a, w))
            out[f"gemm_{str(dtype)[6:]}_{m}x{k}x{n}_TFLOPs"] = 2 * m * k * n / ms / 1e9
    out["tf32_matmul_allowed"] = torch.backends.cuda.matmul.allow_tf32
    return out


def estimator_kernels(numel: int = 64 * 1024 * 1024) -> dict:
    """Each fused estimator kernel alone (the op, no autograd) on a 64M-element tensor, in
    GB/s of the bytes it must move (each input read once, the output written once)."""
    from stochgate._ops import draw_key, ops

    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(numel, device="cuda", dtype=dtype)
        g = torch.randn_like(x)
        key = draw_key(None, x.device)
        h = ops.stochastic_times_smooth(x, key)
        loss = torch.randn(1024, device="cuda")
        base = torch.randn(numel // 1024, device="cuda")
        cases = {
            "straight_through": (lambda: ops.straight_through(x, key, False), 2),
            "straight_through_backward": (lambda: ops.straight_through_backward(g, x), 3),
            "stochastic_times_smooth": (lambda: ops.stochastic_times_smooth(x, key), 2),
            "stochastic_times_smooth_backward": (lambda: ops.stochastic_times_smooth_backward(g, x, h), 4),
            "noisy_rectifier": (lambda: ops.noisy_rectifier(x, key, 1.0, False), 2),
            "noisy_rectifier_backward": (lambda: ops.noisy_rectifier_backward(g, h), 3),
            "reinforce_backward": (lambda: ops.reinforce_backward(g[:1].float().squeeze(), x.view(1024, -1),
                                                                  h.view(1024, -1), loss, base, 1.0), 3),
            "copy (clone)": (lambda: x.clone(), 2),
        }
        for name, (fn, passes) in cases.items():
            ms = _median_ms(fn)
            res[f"{name}_{str(dtype)[6:]}"] = {"ms": ms, "GBps": passes * numel * x.element_size() / ms / 1e6}
        del x, g, h
        torch.cuda.empty_cache()
    return res


def sample_and_route(repeats: int = 25) -> list[dict]:
    """Issue 6's sample-and-route item, measured on the unfused path (no fused kernel exists):
    gater logits -> stochgate.straight_through (key draw + sampling kernel) -> gated_linear
    (which routes on the device), against gated_linear given precomputed gates of the same
    density (and, to tell the sampling's cost from the gates' statistics, given gates drawn by
    straight_through beforehand), and the sampling alone; bf16, the benchmark's shape,
    forward, eager and replayed from a CUDA graph, interleaved."""
    from gpu_sm90 import graph_of  # benchmarks/ is on sys.path when this file runs as a script

    rows = []
    for density in (0.1, 0.25):
        inputs, _ = bench.make_inputs("gated_linear", B, K, N, CHUNK, density, torch.bfloat16, "cuda")
        x, w, bias, gates = inputs
        logits = torch.full(gates.shape, math.log(density / (1 - density)), device="cuda", dtype=torch.bfloat16)
        drawn = stochgate.straight_through(logits)
        with torch.no_grad():
            runs = {"given_gates": lambda: stochgate.gated_linear(x, w, bias, gates),
                    "given_drawn_gates": lambda: stochgate.gated_linear(x, w, bias, drawn),
                    "sample_only": lambda: stochgate.straight_through(logits),
                    "sample_then_route": lambda: stochgate.gated_linear(x, w, bias, stochgate.straight_through(logits))}
            graphs = {k: graph_of(f) for k, f in runs.items()}
            eager = bench.time_interleaved(runs, repeats, "cuda", warmup=3)
            replay = bench.time_interleaved(graphs, repeats, "cuda", warmup=3)
        row = {"density": density, "drawn_density": drawn.float().mean().item(),
               "given_density": gates.float().mean().item()}
        for name in runs:
            row[f"{name}_eager_ms"] = statistics.median(eager[name]) * 1e3
            row[f"{name}_graph_ms"] = statistics.median(replay[name]) * 1e3
        for mode in ("eager", "graph"):
            row[f"overhead_{mode}"] = row[f"sample_then_route_{mode}_ms"] / row[f"given_gates_{mode}_ms"] - 1
            row[f"overhead_vs_drawn_{mode}"] = row[f"sample_then_route_{mode}_ms"] / row[f"given_drawn_gates_{mode}_ms"] - 1
        rows.append(row)
        del inputs, x, w, bias, gates, graphs
        torch.cuda.empty_cache()
    return rows


def kernel_breakdown() -> dict:
    """CUDA time per kernel name of one call of each gated op (bf16, the benchmark's shape)."""
    from torch.profiler import ProfilerActivity, profile

    res = {}
    for density in (0.1, 0.25):
        for op in ("gated_linear", "gated_input_linear"):
            inputs, grad_args = bench.make_inputs(op, B, K, N, CHUNK, density, torch.bfloat16, "cuda")
            for mode in ("forward", "train"):
                run = bench._closure(bench.METHODS[op]["stochgate"], inputs, mode, grad_args)
                for _ in range(3):
                    run()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        run()
                    torch.cuda.synchronize()
                rows = []
                for ev in prof.key_averages():
                    t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                    if t > 0 and ev.count > 0:
                        rows.append((ev.key[:90], t / 5 / 1e3, ev.count // 5))
                rows.sort(key=lambda r: -r[1])
                res[f"{op}_{mode}_d{density}"] = [
                    {"kernel": k, "ms_per_call": round(t, 4), "launches_per_call": c} for k, t, c in rows[:12]
                ]
    return res


def summary(results: dict) -> None:
    """The short table printed last: speedups over dense and over the best alternative."""
    c = results["info"]["ceilings"]
    print(f"\n{results['info']['gpu']} | torch {results['info']['torch']} CUDA {results['info']['cuda']} | "
          f"copy {c['copy_GBps']:.0f} GB/s | cuBLAS bf16 {c[f'gemm_bfloat16_{B}x{K}x{N}_TFLOPs']:.0f} TFLOP/s, "
          f"fp32 {c[f'gemm_float32_{B}x{K}x{N}_TFLOPs']:.0f} TFLOP/s at {B}x{K}x{N}")
    for name, r in results["info"].get("estimator_kernels", {}).items():
        print(f"    {name:<40} {r}" if not isinstance(r, dict) else
              f"    {name:<40} {r['ms']:7.3f} ms {r['GBps']:6.0f} GB/s = {100 * r['GBps'] / c['copy_GBps']:3.0f}% of copy")
    for r in results["info"].get("sample_and_route", []):
        print(f"    straight_through + gated_linear over gated_linear given gates, d={r['density']}: "
              f"+{100 * r['overhead_eager']:.1f}% eager, +{100 * r['overhead_graph']:.1f}% graph "
              f"(over the same drawn gates given: +{100 * r['overhead_vs_drawn_eager']:.1f}% / "
              f"+{100 * r['overhead_vs_drawn_graph']:.1f}%)")
    for name, r in results.items():
        if name in ("info", "kernels"):
            continue
        if "error" in r:
            print(f"{name}: {r['error'][:150]}")
            continue
        cells = []
        by_d: dict = {}
        for row in r["matmul"]:
            by_d.setdefault(row["density"], {})[row["method"]] = row
        for d, rs in by_d.items():
            st = rs["stochgate"]
            alts = [x["median_s"] for m, x in rs.items() if m not in ("stochgate", "dense") and x.get("median_s")]
            alt = f"/{min(alts) / st['median_s']:.2f}x" if alts else ""
            cells.append(f"d={d}: {st['median_s'] * 1e3:.3f}ms {st['speedup_vs_dense']:.2f}x{alt}")
        print(f"{name:<32} " + " | ".join(cells))
        for row in r.get("estimators", []):
            if row["method"] in ("stochgate", "clone"):
                print(f"    bench {row['estimator']:<24} {row['mode']:<8} {row['median_s'] * 1e3:7.3f} ms (through autograd)")
        for row in r.get("train_step", []):
            print(f"    train step {row['estimator']:<16} gate grad {str(row['gate_grad']):<7} "
                  f"{row['stochgate_s'] * 1e3:7.2f} ms vs dense {row['dense_s'] * 1e3:7.2f} ms: {row['speedup_vs_dense']:.2f}x")
    print("(speedup vs dense / vs the best alternative: gather loop or torch._grouped_mm)")


def main() -> int:
    outdir = Path(sys.argv[1])
    quick = "--quick" in sys.argv
    # --only PREFIX: only the runs whose name starts with PREFIX (say fp32), without the
    # sample-and-route and per-kernel sections (bf16).
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "build": stochgate.build_info()}
    info["ceilings"] = ceilings()
    print(json.dumps(info, indent=1), flush=True)
    try:
        info["estimator_kernels"] = estimator_kernels()
    except Exception as exc:  # noqa: BLE001
        info["estimator_kernels"] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(info["estimator_kernels"], indent=1), flush=True)
    repeats = "5" if quick else "15"
    common = ["--device", "cuda", "--batch", str(B), "--in-features", str(K), "--out-features", str(N),
              "--chunk", str(CHUNK), "--density", *DENSITIES, "--repeats", repeats,
              "--methods", "gather", "grouped_mm"]
    runs = [
        ("bf16_gated_linear_forward", ["--dtype", "bfloat16", "--op", "gated_linear", "--mode", "forward",
                                       "--no-estimators", "--no-train-step"]),
        ("bf16_gated_linear_train", ["--dtype", "bfloat16", "--op", "gated_linear", "--mode", "train",
                                     "--no-estimators", "--no-train-step"]),
        ("bf16_gated_input_linear_forward", ["--dtype", "bfloat16", "--op", "gated_input_linear", "--mode", "forward",
                                             "--no-estimators", "--no-train-step"]),
        ("bf16_gated_input_linear_train", ["--dtype", "bfloat16", "--op", "gated_input_linear", "--mode", "train",
                                           "--no-estimators", "--no-train-step"]),
        ("fp32_gated_linear_forward", ["--dtype", "float32", "--op", "gated_linear", "--mode", "forward",
                                       "--estimator-size", "8192", "--no-train-step"]),
        ("fp32_gated_linear_train", ["--dtype", "float32", "--op", "gated_linear", "--mode", "train",
                                     "--no-estimators", "--no-train-step"]),
        ("bf16_block_train", ["--dtype", "bfloat16", "--op", "block", "--mode", "train", "--no-estimators"]),
    ]
    results = {"info": info}
    for name, extra in runs:
        if not name.startswith(only):
            continue
        print(f"\n##### {name}  ({time.time() - t0:.0f} s)", flush=True)
        try:
            args = bench.parse_args(common + extra)
            r = bench.run(args)
            bench.print_tables(r)
            results[name] = r
        except Exception as exc:  # noqa: BLE001  (one failing configuration must not hide the others)
            print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        torch.cuda.empty_cache()
        (outdir / "gpu_bench.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\n##### sample and route ({time.time() - t0:.0f} s)", flush=True)
    if only:
        print(f"skipped (--only {only})")
    else:
        try:
            results["info"]["sample_and_route"] = sample_and_route()
            for r in results["info"]["sample_and_route"]:
                print(f"d={r['density']} (given gates {r['given_density']:.4f}, drawn {r['drawn_density']:.4f}), "
                      "ms eager / graph: " + ", ".join(
                          f"{k} {r[k + '_eager_ms']:.3f} / {r[k + '_graph_ms']:.3f}"
                          for k in ("given_gates", "given_drawn_gates", "sample_only", "sample_then_route")))
                print(f"    sample then route over given gates +{100 * r['overhead_eager']:.1f}% / "
                      f"+{100 * r['overhead_graph']:.1f}%, over the same gates given "
                      f"+{100 * r['overhead_vs_drawn_eager']:.1f}% / +{100 * r['overhead_vs_drawn_graph']:.1f}%")
        except Exception as exc:  # noqa: BLE001
            print(f"sample and route FAILED: {type(exc).__name__}: {exc}")
    print(f"\n##### kernel breakdown ({time.time() - t0:.0f} s)", flush=True)
    if only:
        print(f"skipped (--only {only})")
    else:
        try:
            results["kernels"] = kernel_breakdown()
            for cfg, rows in results["kernels"].items():
                print(cfg)
                for r in rows[:8]:
                    print(f"   {r['ms_per_call']:8.4f} ms  x{r['launches_per_call']:<3} {r['kernel']}")
        except Exception as exc:  # noqa: BLE001
            print(f"kernel breakdown FAILED: {type(exc).__name__}: {exc}")
    (outdir / "gpu_bench.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"done in {time.time() - t0:.0f} s")
    summary(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
