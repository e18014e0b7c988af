"""Writes the README's "Measured results" section from the committed result files:

    python benchmarks/readme_results.py

Reads benchmarks/results/cpu_*.json (from benchmarks/run_cpu.sh), the GPU file named in
GPU_RESULTS (from benchmarks/gpu_check.sh → benchmarks/gpu_bench.py, the latest run on the
current code) and mnist_*.json (from `stochgate reproduce`), and replaces the text between
the results markers in README.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
# The GPU run the README shows: run 12 of benchmarks/GPU_NOTES.md (an H200; its bf16 code is
# the code as committed), with the float32 rows of run 13 (the same kind of card, the current
# float32 kernel; GPU_FP32_RESULTS) and run 13's float32 kernel comparison (GPU_SIMT). The
# Hopper-kernel variants table is run 11's (an H100; GPU_SM90). Earlier runs' files stay for
# the notes.
GPU_RESULTS = "gpu_h200_run12.json"
GPU_FP32_RESULTS = "gpu_h200_run13.json"
GPU_SIMT = "gpu_h200_run13_simt.json"
GPU_SM90 = "gpu_h100_run11_sm90.json"


def _machine(r: dict) -> str:
    m = r["machine"]
    cpu = m.get("cpu_model") or f"{m['processor']} CPU"
    isa = f", {m['cpu_kernel_isa']} kernels" if m.get("cpu_kernel_isa") else ""
    where = m.get("gpu") or f"{cpu}{isa}, {m['cpu_threads']} threads"
    return f"{where}, torch {m['torch']}"


# The CPU tables, one section per machine: file prefix, title, and the machine as described
# where the JSON files do not say it (files written before `cpu_model` was recorded).
CPU_GROUPS = (
    ("cpu_avx2", "CPU without AVX-512 (AMD EPYC, AVX2)", None),
    ("cpu", "CPU with AVX-512 and AMX (Intel Xeon)",
     "Machine: the 2-vCPU Intel Xeon VM (AVX-512, AMX) this project was developed on until "
     "2026-11-27, idle apart from the benchmark, 2 torch threads. The float32 tables are an earlier "
     "quiet run (before the chunk-1 and bfloat16 work of later sessions); the bfloat16 ones were "
     "measured on 2026-11-27. Every ratio compares timings taken in the same run, interleaved."),
)


def _matmul_table(r: dict) -> list[str]:
    a = r["args"]
    methods = [m for m in ("stochgate", "dense", "gather", "sparse", "grouped_mm") if any(x["method"] == m for x in r["matmul"])]
    out = [
        f"`{a['op']}`, {a['mode']}, {a['dtype']}, B={a['batch']}, in={a['in_features']}, out={a['out_features']} "
        f"({_machine(r)}; median of {a['repeats']}):",
        "",
        "| chunk | density | " + " | ".join(f"{m} ms" for m in methods) + " | stochgate vs dense | vs best alternative |",
        "| ---: | ---: | " + " | ".join("---:" for _ in methods) + " | ---: | ---: |",
    ]
    cfgs: dict = {}
    for row in r["matmul"]:
        cfgs.setdefault((row["chunk"], row["density"]), {})[row["method"]] = row
    for (chunk, density), rows in cfgs.items():
        ours = rows["stochgate"]["median_s"]
        cells = [f"{rows[m]['median_s'] * 1e3:.2f}" if rows.get(m) and rows[m]["median_s"] else "–" for m in methods]
        alts = [rows[m]["median_s"] for m in methods if m not in ("stochgate", "dense") and rows.get(m) and rows[m]["median_s"]]
        best = f"{min(alts) / ours:.2f}x" if alts else "–"
        out.append(f"| {chunk} | {density:g} | " + " | ".join(cells) + f" | **{rows['stochgate']['speedup_vs_dense']:.2f}x** | {best} |")
    out.append("")
    out.append("Break-even density (stochgate as fast as dense): " + "; ".join(f"chunk {c}: {v}" for c, v in r["break_even"].items()) + ".")
    notes = sorted({f"{row['method']}: {row['error']}" for row in r["matmul"] if row.get("error")})
    if notes:
        out.append("Not timed: " + "; ".join(notes) + ".")
    return out


def _estimator_table(r: dict) -> list[str]:
    a = r["args"]
    rows: dict = {}
    for row in r["estimators"]:
        rows.setdefault((row["estimator"], row["mode"]), {})[row["method"]] = row
    copy = rows.pop(("copy", "forward"))["clone"]["median_s"]
    out = [
        f"Fused estimator kernels, {a['estimator_size']}×{a['estimator_size']} {a['dtype']} ({_machine(r)}); "
        f"`pytorch` is the plain-PyTorch formula a user writes (torch.rand/randn + sigmoid), `reference` is "
        f"`stochgate.reference` (the same Philox stream in PyTorch integer ops). A tensor copy takes {copy * 1e3:.1f} ms.",
        "",
        "| estimator | pass | stochgate ms | pytorch ms | reference ms | stochgate vs pytorch | vs reference |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (name, mode), m in rows.items():
        s, p, ref = (m[k]["median_s"] for k in ("stochgate", "pytorch", "reference"))
        out.append(f"| {name} | {'fwd+bwd' if mode == 'train' else 'fwd'} | {s * 1e3:.1f} | {p * 1e3:.1f} | {ref * 1e3:.1f} | "
                   f"**{p / s:.1f}x** | {ref / s:.1f}x |")
    return out


def _train_table(r: dict) -> list[str]:
    a = r["args"]
    t = r["train_step"]
    out = [
        f"One SGD step of gater → estimator → `GatedLinear` → `GatedInputLinear` ({a['in_features']}→{a['out_features']}→10, "
        f"B={a['batch']}, chunk {t[0]['chunk']}, gate density ≈ {t[0]['target_density']}) against the same model run dense:",
        "",
        "| estimator | gate gradient | stochgate ms | dense ms | speedup | |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in t:
        out.append(f"| {row['estimator']} | {row['gate_grad'] or 'none'} | {row['stochgate_s'] * 1e3:.1f} | {row['dense_s'] * 1e3:.1f} | "
                   f"**{row['speedup_vs_dense']:.2f}x** | {row['note']} |")
    return out


def _mnist(path: Path) -> list[str]:
    """The table `stochgate reproduce` wrote beside its JSON, with the command and machine."""
    r = json.loads(path.read_text())
    table = path.with_name(path.stem + "_table.md")
    if not table.exists():
        return []
    m = r.get("machine", {})
    # A run split across processes and merged with --from-json lists one command per part.
    commands = r["command"] if isinstance(r["command"], list) else [r["command"]]
    merged = " + ".join(f"`{c}`" for c in commands)
    if len(commands) > 1:
        merged += f", merged by `stochgate reproduce --from-json {' '.join(r.get('merged_from', []))}`"
    # Runs made before Config.main_lr existed used the paper-literal settings (one learning
    # rate, output layer max-normed, KL weight from 1.0): say so beside their table.
    legacy = "main_lr" not in r.get("config", {})
    note = (" — **paper-literal settings** (one constant learning rate 0.1, output layer max-normed, KL weight from 1.0, "
            "KL at the minibatch mean; see the notes)") if legacy else ""
    out = [f"{merged} ({m.get('cpu_model', '')}, {m.get('cpu_count', '?')} cores, "
           f"{m.get('torch_threads', '?')} torch thread(s) per process, torch {m.get('torch', '')}, {m.get('device', 'cpu')}){note}:", "",
           table.read_text().strip(), ""]
    curves = path.with_name(path.stem + "_curves.png")
    if curves.exists():
        out.append(f"![{path.stem} learning curves]({curves.relative_to(ROOT)})")
    return out


def _gpu(path: Path, fp32_path: Path) -> list[str]:
    """The GPU benchmark (benchmarks/gpu_bench.py): one table of every op, pass and dtype over
    the densities, the estimator kernels against copy bandwidth, the training step; the float32
    rows from a later run (fp32_path) where it exists."""
    r = json.loads(path.read_text())
    info, c = r["info"], r["info"]["ceilings"]
    later = json.loads(fp32_path.read_text()) if fp32_path.exists() else {}
    replaced = [k for k, v in later.items() if k in r and k.startswith("fp32_") and "matmul" in v]
    for k in replaced:
        r[k] = later[k]
    runs = {k: v for k, v in r.items() if k not in ("info", "kernels") and "matmul" in v}
    first = next(iter(runs.values()))["args"]
    simt = fp32_path.with_name(GPU_SIMT)
    shape = f"B={first['batch']}, K=N={first['in_features']}, chunk {first['chunk'][0]}"
    gemm = f"{first['batch']}x{first['in_features']}x{first['out_features']}"
    bf16 = c[f"gemm_bfloat16_{gemm}_TFLOPs"]
    fp32 = c[f"gemm_float32_{gemm}_TFLOPs"]
    out = [
        f"Machine: {info['gpu']}, torch {info['torch']}, CUDA {info['cuda']}, kernels built for sm_{info['build']['cuda_archs']}. "
        f"Ceilings measured in the same run: device-to-device copy {c['copy_GBps']:.0f} GB/s (bytes read + written), "
        f"cuBLAS {bf16:.0f} TFLOP/s in bf16 and {fp32:.0f} TFLOP/s in fp32 (TF32 off) at {first['batch']}×{first['in_features']}×{first['out_features']}. "
        f"{shape}, random gates at each density; medians of {first['repeats']} (CUDA events). Each cell: stochgate ms, "
        f"speedup over dense (cuBLAS + mask), and over the best alternative (pure-PyTorch gather loop, `torch._grouped_mm` "
        f"on rows gathered per chunk) in parentheses. Kernel history, predictions and Nsight Compute readings: "
        f"`benchmarks/GPU_NOTES.md`.",
        "",
    ]
    if replaced:
        lc = later["info"]["ceilings"]
        out[0] += (f" The float32 rows come from a later run on the current float32 kernel (`{fp32_path.relative_to(ROOT)}`, "
                   f"{later['info']['gpu']}; its ceilings: copy {lc['copy_GBps']:.0f} GB/s, cuBLAS "
                   f"{lc[f'gemm_float32_{gemm}_TFLOPs']:.0f} TFLOP/s in fp32); the other rows' code is unchanged since this run.")
    densities = [row["density"] for row in next(iter(runs.values()))["matmul"] if row["method"] == "stochgate"]
    out.append("| op | pass | dtype | " + " | ".join(f"d = {d:g}" for d in densities) + " |")
    out.append("| --- | --- | --- | " + " | ".join("---:" for _ in densities) + " |")
    for run in runs.values():
        a = run["args"]
        cells = []
        for d in densities:
            rows = {row["method"]: row for row in run["matmul"] if row["density"] == d}
            ours = rows["stochgate"]["median_s"]
            alts = [x["median_s"] for m, x in rows.items() if m not in ("stochgate", "dense") and x.get("median_s")]
            alt = f" ({min(alts) / ours:.2f}x)" if alts else ""
            cells.append(f"{ours * 1e3:.2f} ms, **{rows['stochgate']['speedup_vs_dense']:.2f}x**{alt}")
        op = "block (both ops)" if a["op"] == "block" else f"`{a['op']}`"
        out.append(f"| {op} | {'fwd+bwd' if a['mode'] == 'train' else 'fwd'} | {a['dtype']} | " + " | ".join(cells) + " |")
    out.append("")
    est = info.get("estimator_kernels", {})
    if est and "error" not in est:
        out.append("Fused estimator kernels alone (the op, no autograd), 64M elements; GB/s counts each input read once "
                   "and the output written once, against the copy above:")
        out.append("")
        out.append("| kernel | float32 ms | GB/s | % of copy | bfloat16 ms | GB/s | % of copy |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        names = dict.fromkeys(k.rsplit("_", 1)[0] for k in est)
        for name in names:
            cells = []
            for dt in ("float32", "bfloat16"):
                e = est[f"{name}_{dt}"]
                cells.append(f"{e['ms']:.3f} | {e['GBps']:.0f} | {100 * e['GBps'] / c['copy_GBps']:.0f}%")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    routes = info.get("sample_and_route", [])
    if routes:
        out.append("Sample then route, unfused (`straight_through(logits)` drawing the gates, then `gated_linear`, "
                   "which routes on the device), against `gated_linear` given the same drawn gates, forward, "
                   "ms eager / replayed from a CUDA graph:")
        out.append("")
        out.append("| density | gates given | sample then route | added |")
        out.append("| ---: | ---: | ---: | ---: |")
        for row in routes:
            out.append(f"| {row['density']:g} | {row['given_drawn_gates_eager_ms']:.3f} / {row['given_drawn_gates_graph_ms']:.3f} | "
                       f"{row['sample_then_route_eager_ms']:.3f} / {row['sample_then_route_graph_ms']:.3f} | "
                       f"+{100 * row['overhead_vs_drawn_eager']:.1f}% / +{100 * row['overhead_vs_drawn_graph']:.1f}% |")
        out.append("")
    block = r.get("bf16_block_train", {})
    if block.get("train_step"):
        out.extend(_train_table(block))
        out.append("")
    out.append(f"Command: `bash benchmarks/gpu_check.sh \"$OUT\"` (its benchmark step is `python benchmarks/gpu_bench.py DIR`) → "
               f"`{path.relative_to(ROOT)}`" + (f", float32 rows `{fp32_path.relative_to(ROOT)}`" if replaced else ""))
    if simt.exists():
        out.append("")
        out.extend(_simt(simt))
    sm90 = path.with_name(GPU_SM90)
    if sm90.exists():
        out.append("")
        out.extend(_sm90(sm90))
    return out


# Variant names of benchmarks/gpu_sm90.py; run 5 called the four-stage ring "sm90". Runs 5-6
# had no lag-0 variants: their "sm90_s3" / "sm90_s4" were the lag-1 rings, as in run 7.
_SM90_LABELS = {"sm90_s3_lag0": "wgmma, 3 stages, lag 0 (default)", "sm90_s3": "wgmma, 3 stages, lag 1",
                "sm90_s4": "wgmma, 4 stages, lag 1", "sm90": "wgmma, 4 stages",
                "sm90_s4_lag0": "wgmma, 4 stages, lag 0",
                "sm90_s4_group": "wgmma, 4 stages, chunk order", "sm90_group": "wgmma, 4 stages, chunk order",
                "mma": "mma.sync",
                # Run 8 on: how the row reductions (gated_input_linear, dx) sum across chunks.
                "atomic": "default",
                "atomic_all": "fp32 atomics, one accumulator",
                "atomic16M": "fp32 atomics, 16 MiB slices", "atomic64M": "fp32 atomics, 64 MiB slices",
                "mma_atomic": "mma.sync, fp32 atomics",
                # Run 10 on: the epilogue's reductions (STOCHGATE_CUDA_RED) other than the default.
                "atomic_pairs": "fp32 atomics, 2-column reductions",
                "atomic_quads": "fp32 atomics, 4-column reductions",
                "atomic_bulk": "fp32 atomics, bulk row reductions",
                "zero_serial": "zero-fill before the GEMM",
                "mn_mma": "dx, dh, dweight on mma.sync",
                "partials": "partials in chunk order (deterministic mode)"}


def _variant_table(by: dict, variants: list[str], labels: dict[str, str]) -> list[str]:
    """Rows of (op, density) -> {variant: eager/graph ms}: each cell ms eager / graph and the
    speedups over dense in the same mode."""
    out = ["| op | d | dense | " + " | ".join(labels[v] for v in variants) + " |",
           "| --- | ---: | ---: | " + " | ".join("---:" for _ in variants) + " |"]
    for (op, d), vs in by.items():
        dn = vs["dense"]
        cells = [f"{vs[v]['eager_ms']:.3f} / {vs[v]['graph_ms']:.3f} "
                 f"(**{dn['eager_ms'] / vs[v]['eager_ms']:.2f}x** / {dn['graph_ms'] / vs[v]['graph_ms']:.2f}x)" for v in variants]
        out.append(f"| `{op}` | {d:g} | {dn['eager_ms']:.3f} / {dn['graph_ms']:.3f} | " + " | ".join(cells) + " |")
    return out


_SIMT_LABELS = {"simt128": "128 × 128 tile, operands transposed into shared memory (default)",
                "simt128k": "128 × 128 tile, K-major in shared memory (`STOCHGATE_CUDA_SIMT=128k`)",
                "simt64": "64 × 64 tile (`STOCHGATE_CUDA_SIMT=64`)"}


def _simt(path: Path) -> list[str]:
    """The float32 (SIMT) GEMM kernel's configurations against dense (benchmarks/gpu_simt.py)."""
    r = json.loads(path.read_text())
    sh = r["shape"]
    by: dict = {}
    for row in r["timings"]:
        by.setdefault((row["op"], row["density"]), {})[row["variant"]] = row
    variants = [v for v in _SIMT_LABELS if v in next(iter(by.values()))]
    out = [f"The float32 GEMM kernel's configurations side by side ({r['gpu']}; {sh['dtype']}, TF32 off, B={sh['B']}, "
           f"K=N={sh['K']}, chunk {sh['chunk']}; medians of 10, interleaved with dense in one process; the backward op "
           "computes dx, dweight and dbias, against cuBLAS doing the same three products). Each cell: ms eager / ms "
           "replayed from a captured CUDA graph, and the speedups over dense in the same mode.", ""]
    out += _variant_table(by, variants, _SIMT_LABELS)
    out += ["", f"Command: the `simt` step of `bash benchmarks/gpu_check.sh \"$OUT\"` "
                f"(`python benchmarks/gpu_simt.py DIR`) → `{path.relative_to(ROOT)}`"]
    return out


def _sm90(path: Path) -> list[str]:
    """The Hopper GEMM kernel's variants against dense, eager and replayed from a CUDA graph
    (benchmarks/gpu_sm90.py)."""
    r = json.loads(path.read_text())
    sh = r["shape"]
    by: dict = {}
    for row in r["timings"]:
        by.setdefault((row["op"], row["density"]), {})[row["variant"]] = row
    variants = [v for v in _SM90_LABELS if v in next(iter(by.values()))]
    if "atomic" in variants:
        out = [f"How the row reductions sum a row's chunks (`gated_input_linear`'s forward, the `dx` of "
               f"`gated_linear_backward`), side by side ({r['gpu']}, an earlier run on the same code for these products; {sh['dtype']}, B={sh['B']}, K=N={sh['K']}, chunk {sh['chunk']}; "
               "medians of 25, interleaved with dense in one process; the backward op computes dx, dweight and dbias, "
               "against cuBLAS doing the same three products). Each cell: ms eager / ms replayed from a captured CUDA "
               "graph, and the speedups over dense in the same mode. The default adds each tile row into one fp32 "
               "accumulator by a bulk reduction at the L2, writes `gated_linear`'s zeros beside its GEMM and runs every "
               "product on the wgmma kernel; each other column changes one of these. "
               "`torch.use_deterministic_algorithms(True)` selects the partials summed in chunk order (bit for bit "
               "reproducible). Only the zero-fill column changes `gated_linear`'s forward: its other columns differ "
               "by noise."]
    else:
        out = [f"The GEMM kernels of the K-major products side by side ({r['gpu']}; {sh['dtype']}, B={sh['B']}, K=N={sh['K']}, "
               f"chunk {sh['chunk']}; medians of 25, interleaved with dense in one process). Each cell: ms eager / ms "
               "replayed from a captured CUDA graph, and the speedups over dense in the same mode. The three-stage wgmma "
               "ring with lag 0 (each step's wgmma waited for, loads two steps ahead) is the default on Hopper GPUs; "
               "mma.sync is the kernel of every other GPU."]
    if "sm90" in variants:
        out[0] += (" In this run the table above still used the four-stage ring, the default then; "
                   "the three-stage one became the default after it.")
    out += [""] + _variant_table(by, variants, _SM90_LABELS)
    out += ["", f"Command: the `sm90` step of `bash benchmarks/gpu_check.sh \"$OUT\"` "
                f"(`python benchmarks/gpu_sm90.py DIR`) → `{path.relative_to(ROOT)}`"]
    return out


def render() -> str:
    parts: list[str] = []
    gpu = RESULTS / GPU_RESULTS
    if gpu.exists():
        card = json.loads(gpu.read_text())["info"]["gpu"].replace("NVIDIA ", "")
        parts.append(f"### Gated matmuls and estimators, GPU ({card})")
        parts.append("")
        parts.extend(_gpu(gpu, RESULTS / GPU_FP32_RESULTS))
        parts.append("")
    for prefix, title, described in CPU_GROUPS:
        base = ["gated_linear_forward", "gated_linear_train", "gated_input_linear_forward", "gated_input_linear_train", "block_train"]
        order = base + ["bf16_" + name for name in base]
        files = sorted((f for f in RESULTS.glob(f"{prefix}_*.json") if f.stem[len(prefix) + 1:] in order),
                       key=lambda f: order.index(f.stem[len(prefix) + 1:]))
        if not files:
            continue
        parts.append(f"### Gated matmuls and estimators, {title}")
        parts.append("")
        if described is None:
            m = json.loads(files[0].read_text())["machine"]
            described = (f"Machine: a 2-vCPU VM, {m.get('cpu_model', m['processor'])} (float32 kernels: "
                         f"{m.get('cpu_kernel_isa', '?')}; AMX: {'yes' if m.get('cpu_bf16_amx') else 'no'}), idle apart "
                         f"from the benchmark, {m['cpu_threads']} torch threads. Every ratio compares timings taken in "
                         "the same run, interleaved.")
        parts.append(described)
        parts.append("")
        bf16_said = False
        for f in files:
            r = json.loads(f.read_text())
            if f.stem.startswith(f"{prefix}_bf16_") and not bf16_said:
                bf16_said = True
                parts.append("bfloat16: dense `F.linear` runs on this CPU's AMX units (oneDNN), and so do the gated "
                             "matmuls for chunks of 16 units or more (oneDNN's brgemm micro-kernel on tiles of active "
                             "rows, `csrc/cpu/gated_amx.cpp`); narrower chunks still compute in float32 (the chunk-1 "
                             "rows below).")
                parts.append("")
            parts.extend(_matmul_table(r))
            png = f.with_suffix(".png")
            if png.exists():
                parts.append(f"![{f.stem}]({png.relative_to(ROOT)})")
            parts.append("")
            if r.get("estimators"):
                parts.extend(_estimator_table(r))
                parts.append("")
            if r.get("train_step"):
                parts.extend(_train_table(r))
                parts.append("")
            parts.append(f"Command: `{_command(r)}` → `{f.relative_to(ROOT)}`")
            parts.append("")
    # The main table first, then its companions; any other file after them, by name.
    first = ["mnist_full", "mnist_full_c32", "mnist_st_seeds", "mnist_c32_previous", "mnist_full_st", "mnist_quick"]
    files = sorted(RESULTS.glob("mnist_*.json"), key=lambda f: (first.index(f.stem) if f.stem in first else len(first), f.stem))
    mnist = [section for f in files if (section := _mnist(f))]
    if mnist:
        parts.append("### MNIST reproduction (paper §5)")
        parts.append("")
        parts.append("Test error % with deterministic test-time gates at 10% density, beside the paper's Figure 2 "
                     "(right); how each file was made and what the numbers show: `benchmarks/results/mnist_NOTES.md`.")
        parts.append("")
        for section in mnist:
            parts.extend(section)
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def _command(r: dict) -> str:
    a = r["args"]
    cmd = f"stochgate bench --device {a['device']} --dtype {a['dtype']} --op {a['op']} --mode {a['mode']}"
    if a.get("chunk") and list(a["chunk"]) != [64, 1]:
        cmd += " --chunk " + " ".join(str(c) for c in a["chunk"])
    if a.get("no_estimators"):
        cmd += " --no-estimators"
    else:
        cmd += f" --estimator-size {a['estimator_size']}"
    if a.get("no_train_step"):
        cmd += " --no-train-step"
    return cmd


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    body = render()
    new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: f"{BEGIN}\n{body}{END}", text, flags=re.S)
    readme.write_text(new)
    print(f"README.md results section: {len(body.splitlines())} lines")


if __name__ == "__main__":
    main()
