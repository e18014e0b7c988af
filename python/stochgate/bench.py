"""`stochgate bench`: conditional-computation speedups, side by side with the alternatives.

For every (chunk size, density) it times, interleaved in one run, stochgate's op and what a
user could write instead, all computing the same result:

- ``dense``: ``F.linear`` then masking (what most people do today);
- ``gather``: pure PyTorch, per chunk ``index_select`` of the active rows, ``addmm``,
  ``index_copy`` / ``index_add`` (the best one can do without a kernel);
- ``sparse``: ``torch.sparse`` (``sampled_addmm`` with a CSR mask on the output side, a CSR
  matrix times dense on the input side), where PyTorch supports the dtype and device;
- ``grouped_mm``: on CUDA, ``torch._grouped_mm`` over rows gathered per chunk, when the
  installed torch has it.

Times are medians over repeats after warm-up (CUDA: events, synchronised), reported with the
ratio to dense. It also times the fused estimator kernels against pure PyTorch, and a full
conditional-computation training step per estimator against its dense twin.

    stochgate bench --quick --json bench.json --plot bench.png
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from typing import Callable

import warnings

import torch
import torch.nn.functional as F

import stochgate

# torch.sparse's CSR support announces itself as beta on every call.
warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")

# ---------------------------------------------------------------------------------------
# The alternatives. Each takes (x, weight, bias, gates) like stochgate's op.


def _expand(gates: torch.Tensor, features: int, dtype: torch.dtype) -> torch.Tensor:
    return gates.to(dtype).repeat_interleave(features // gates.shape[1], dim=1)


def _active_chunks(gates: torch.Tensor, features: int):
    """(chunk index, rows whose gate is on, the chunk's feature slice) for every chunk with at
    least one active row: the loop both gather alternatives run."""
    chunks = gates.shape[1]
    chunk = features // chunks
    active = (gates != 0).t()
    for c in range(chunks):
        rows = active[c].nonzero().squeeze(1)
        if rows.numel():
            yield c, rows, slice(c * chunk, (c + 1) * chunk)


def dense_gated_linear(x, weight, bias, gates):
    """``F.linear`` for every unit, then the gate multiplies (zero gates zero the chunk)."""
    return F.linear(x, weight, bias) * _expand(gates, weight.shape[0], x.dtype)


def gather_gated_linear(x, weight, bias, gates):
    """Per chunk: the rows whose gate is on, one addmm with the chunk's weight block, scale,
    copy back. Pure PyTorch; no gate gradient (gates are data here)."""
    y = x.new_zeros(x.shape[0], weight.shape[0])
    for c, rows, sl in _active_chunks(gates, weight.shape[0]):
        b = bias[sl] if bias is not None else x.new_zeros(sl.stop - sl.start)
        out = torch.addmm(b, x.index_select(0, rows), weight[sl].t())
        out = out * gates[rows, c, None].to(out.dtype)
        y[:, sl] = y[:, sl].index_copy(0, rows, out)
    return y


def sparse_gated_linear(x, weight, bias, gates):
    """``torch.sparse.sampled_addmm`` over the CSR pattern of the (unit-level) gates: computes
    only the active outputs, then densifies."""
    g = _expand(gates, weight.shape[0], x.dtype)
    mask = g.to_sparse_csr()
    pre = torch.sparse.sampled_addmm(mask, x, weight.t(), beta=0.0)
    vals = pre.values()
    if bias is not None:
        vals = vals + bias[pre.col_indices()]
    vals = vals * mask.values()
    return torch.sparse_csr_tensor(pre.crow_indices(), pre.col_indices(), vals, pre.shape).to_dense()


def _route(gates: torch.Tensor):
    """Rows of the active (row, chunk) pairs sorted by chunk, and cumulative counts (int32)."""
    active = (gates != 0).t()  # (C, B)
    chunk_idx, rows = active.nonzero(as_tuple=True)
    counts = active.sum(1)
    return rows, chunk_idx, torch.cumsum(counts, 0).to(torch.int32)


def grouped_mm_gated_linear(x, weight, bias, gates):
    """CUDA: gather the active rows sorted by chunk, one ``torch._grouped_mm`` over the chunks'
    weight blocks, scale, scatter."""
    chunks = gates.shape[1]
    n, k = weight.shape
    rows, chunk_idx, offs = _route(gates)
    xg = x.index_select(0, rows)
    w = weight.view(chunks, n // chunks, k).transpose(1, 2)  # (C, K, chunk)
    out = torch._grouped_mm(xg, w, offs=offs)
    if bias is not None:
        out = out + bias.view(chunks, -1)[chunk_idx]
    out = out * gates[rows, chunk_idx, None].to(out.dtype)
    y = x.new_zeros(x.shape[0], chunks, n // chunks)
    y[rows, chunk_idx] = out
    return y.view(x.shape[0], n)


def dense_gated_input_linear(h, weight, bias, gates):
    return F.linear(h * (_expand(gates, weight.shape[1], h.dtype) != 0), weight, bias)


def gather_gated_input_linear(h, weight, bias, gates):
    """Per chunk: the active rows' slice of h times the weight's column block, index_add."""
    batch = h.shape[0]
    y = h.new_zeros(batch, weight.shape[0]) if bias is None else bias.expand(batch, -1).clone()
    for _, rows, sl in _active_chunks(gates, weight.shape[1]):
        y = y.index_add(0, rows, h.index_select(0, rows)[:, sl] @ weight[:, sl].t())
    return y


def sparse_gated_input_linear(h, weight, bias, gates):
    """The masked activations as a CSR matrix (built from the mask, so only active entries are
    read), times the dense weight."""
    mask = _expand(gates, weight.shape[1], h.dtype) != 0
    crow = torch.cat([mask.new_zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
    rows, cols = mask.nonzero(as_tuple=True)
    csr = torch.sparse_csr_tensor(crow, cols, h[rows, cols], h.shape)
    y = csr @ weight.t()
    return y if bias is None else y + bias


def grouped_mm_gated_input_linear(h, weight, bias, gates):
    chunks = gates.shape[1]
    m, n = weight.shape
    rows, chunk_idx, offs = _route(gates)
    hg = h.view(h.shape[0], chunks, n // chunks)[rows, chunk_idx]  # (pairs, chunk)
    w = weight.view(m, chunks, n // chunks).permute(1, 2, 0)  # (C, chunk, M)
    out = torch._grouped_mm(hg, w, offs=offs)
    y = h.new_zeros(h.shape[0], m) if bias is None else bias.expand(h.shape[0], -1).clone()
    return y.index_add(0, rows, out)


METHODS = {
    "gated_linear": {
        "stochgate": stochgate.gated_linear,
        "dense": dense_gated_linear,
        "gather": gather_gated_linear,
        "sparse": sparse_gated_linear,
        "grouped_mm": grouped_mm_gated_linear,
    },
    "gated_input_linear": {
        "stochgate": stochgate.gated_input_linear,
        "dense": dense_gated_input_linear,
        "gather": gather_gated_input_linear,
        "sparse": sparse_gated_input_linear,
        "grouped_mm": grouped_mm_gated_input_linear,
    },
}


def _block(first: Callable, second: Callable) -> Callable:
    def run(x, w1, b1, w2, b2, gates):
        return second(first(x, w1, b1, gates), w2, b2, gates)

    return run


BLOCK_METHODS = {name: _block(METHODS["gated_linear"][name], METHODS["gated_input_linear"][name]) for name in METHODS["gated_linear"]}


# The gather loop runs one Python iteration per chunk: at chunk = 1 it takes seconds and
# measures the interpreter, not the idea.
MAX_GATHER_CHUNKS = 256


def available_methods(device: str, wanted: list[str] | None = None) -> list[str]:
    names = ["stochgate", "dense", "gather", "sparse"]
    if device == "cuda" and hasattr(torch, "_grouped_mm"):
        names.append("grouped_mm")
    if wanted is not None:
        names = [n for n in names if n in ("stochgate", "dense") or n in wanted]
    return names


# ---------------------------------------------------------------------------------------
# Timing.


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(runs: dict[str, Callable[[], object]], repeats: int, device: str, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each closure, interleaved within every repeat so that a noisy
    machine slows all of them alike. CUDA: events around each call, synchronised."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    _sync(device)
    samples: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - t0)
    return samples


def _closure(fn: Callable, args: tuple, mode: str, grad_args: tuple[int, ...]) -> Callable[[], object]:
    """Forward only (no autograd), or forward + backward w.r.t. the arguments in grad_args."""
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(*args)
        return run
    leaves = [a.detach().clone().requires_grad_(i in grad_args) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
    out = fn(*leaves)
    dy = torch.randn_like(out)

    def run():
        y = fn(*leaves)
        y.backward(dy)
        for i in grad_args:
            leaves[i].grad = None
    return run


def make_inputs(op: str, batch: int, k: int, n: int, chunk: int, density: float, dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    chunks = n // chunk

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    gates = (torch.rand(batch, chunks, generator=gen) < density).to(device=device, dtype=dtype)
    if op == "gated_linear":
        return (rnd(batch, k), rnd(n, k, scale=k**-0.5), rnd(n), gates), (0, 1, 2)
    if op == "gated_input_linear":
        # here the gates split the n input units; k is the output width
        return (rnd(batch, n), rnd(k, n, scale=n**-0.5), rnd(k), gates), (0, 1, 2)
    # block: x (B, k) -> n gated units -> k outputs
    return (rnd(batch, k), rnd(n, k, scale=k**-0.5), rnd(n), rnd(k, n, scale=n**-0.5), rnd(k), gates), (0, 1, 2, 3, 4)


def _check_same(results: dict[str, torch.Tensor], dtype) -> dict[str, str]:
    """Every alternative must compute stochgate's result (else the timing compares apples
    with pears): the max abs difference relative to the output's scale."""
    ref = results["stochgate"].float()
    scale = ref.abs().max().clamp_min(1e-6)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)
    problems = {}
    for name, out in results.items():
        err = ((out.float() - ref).abs().max() / scale).item()
        if not err <= tol:
            problems[name] = f"differs from stochgate by {err:.2e} (relative)"
    return problems


def bench_matmul(args, progress) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    table = BLOCK_METHODS if args.op == "block" else METHODS[args.op]
    rows = []
    for chunk in args.chunk:
        for density in args.density:
            inputs, grad_args = make_inputs(args.op, args.batch, args.in_features, args.out_features, chunk, density, dtype, device)
            runs, failed, outputs = {}, {}, {}
            for name in available_methods(device, args.methods):
                fn = table[name]
                if name == "gather" and args.out_features // chunk > MAX_GATHER_CHUNKS:
                    failed[name] = f"skipped: {args.out_features // chunk} chunks is too many Python iterations"
                    continue
                try:
                    with torch.no_grad():
                        outputs[name] = fn(*inputs)
                    runs[name] = _closure(fn, inputs, args.mode, grad_args)
                    runs[name]()  # a backward PyTorch lacks fails here, not mid-timing
                except (RuntimeError, NotImplementedError, TypeError) as exc:
                    failed[name] = f"unsupported: {str(exc).splitlines()[0][:120]}"
            for name, why in _check_same(outputs, dtype).items():
                runs.pop(name, None)
                failed[name] = why
            samples = time_interleaved(runs, args.repeats, device)
            dense = statistics.median(samples["dense"]) if "dense" in samples else float("nan")
            for name in available_methods(device, args.methods):
                row = {"op": args.op, "mode": args.mode, "chunk": chunk, "density": density, "method": name}
                if name in samples:
                    med = statistics.median(samples[name])
                    row.update(median_s=med, speedup_vs_dense=dense / med, samples_s=samples[name])
                else:
                    row.update(median_s=None, speedup_vs_dense=None, error=failed.get(name, "not run"))
                rows.append(row)
            progress.update(1)
    return rows


def break_even(rows: list[dict], chunk: int, method: str = "stochgate") -> str:
    """Density at which `method` is as fast as dense, interpolated between measured densities."""
    pts = sorted((r["density"], r["speedup_vs_dense"]) for r in rows if r["chunk"] == chunk and r["method"] == method and r["speedup_vs_dense"])
    if not pts:
        return "n/a"
    if all(s >= 1 for _, s in pts):
        return f"none up to {pts[-1][0]:g} (never slower than dense)"
    if pts[0][1] < 1:
        return f"below {pts[0][0]:g} (slower than dense at every measured density)"
    for (d0, s0), (d1, s1) in zip(pts, pts[1:]):
        if s0 >= 1 > s1:
            # speedup ~ 1/d: interpolate 1/speedup linearly in density
            t0, t1 = 1 / s0, 1 / s1
            return f"{d0 + (1 - t0) * (d1 - d0) / (t1 - t0):.2f}"
    return "n/a"


# ---------------------------------------------------------------------------------------
# Estimator kernels and full training steps.


def _naive(name: str):
    """What a user writes in plain PyTorch for each estimator (torch.rand / randn based)."""
    def st(x):
        p = torch.sigmoid(x)
        return (torch.rand_like(p) < p).to(x.dtype) + (x - x.detach())

    def sts(x):
        s = torch.sigmoid(x).sqrt()
        return (torch.rand_like(s) < s).to(x.dtype).detach() * s

    def noisy(x):
        return torch.relu(x + torch.randn_like(x))

    return {"straight_through": st, "stochastic_times_smooth": sts, "noisy_rectifier": noisy}[name]


def bench_estimators(args, progress) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    size = args.estimator_size
    x = torch.randn(size, size, device=device, dtype=dtype)
    rows = []
    for name in ("straight_through", "stochastic_times_smooth", "noisy_rectifier"):
        for mode in ("forward", "train"):
            fns = {
                "stochgate": getattr(stochgate, name),
                "pytorch": _naive(name),
                "reference": getattr(stochgate.reference, name),
            }
            runs = {k: _closure(f, (x,), mode, (0,)) for k, f in fns.items()}
            samples = time_interleaved(runs, max(3, args.repeats // 2), device, warmup=1)
            base = statistics.median(samples["stochgate"])
            for k, s in samples.items():
                med = statistics.median(s)
                rows.append({"estimator": name, "mode": mode, "method": k, "numel": x.numel(), "median_s": med,
                             "stochgate_speedup": med / base, "samples_s": s})
            progress.update(1)
    copy = time_interleaved({"copy": lambda: x.clone()}, args.repeats, device)["copy"]
    rows.append({"estimator": "copy", "mode": "forward", "method": "clone", "numel": x.numel(), "median_s": statistics.median(copy), "samples_s": copy})
    return rows


class _Block(torch.nn.Module):
    """Gater + estimator + GatedLinear + GatedInputLinear, run sparse (stochgate) or dense."""

    def __init__(self, estimator: str, dim: int, hidden: int, chunk: int, classes: int, sparse: bool, gate_grad: str | None):
        super().__init__()
        chunks = hidden // chunk
        self.gater = torch.nn.Linear(dim, chunks)
        self.gate = stochgate.nn.StochasticGate(estimator, num_units=chunks)
        self.main = stochgate.nn.GatedLinear(dim, hidden, chunks, gate_grad=gate_grad)
        self.out = stochgate.nn.GatedInputLinear(hidden, classes, chunks)
        self.sparse = sparse

    def forward(self, x, y):
        g = self.gate(self.gater(x))
        if self.sparse:
            h = self.main(x, g)
            logits = self.out(h, g)
        else:
            h = dense_gated_linear(x, self.main.weight, self.main.bias, g)
            logits = dense_gated_input_linear(h, self.out.weight, self.out.bias, g)
        per_example = F.cross_entropy(logits, y, reduction="none")
        loss = per_example.mean()
        if self.gate.estimator == "reinforce":
            loss = loss + self.gate.reinforce_loss(per_example.detach())
        return loss


TRAIN_CASES = [
    ("reinforce", None, "REINFORCE: gates need no gradient, the whole step is sparse"),
    ("st", "active", "straight-through, gate gradient on active pairs only (biased, sparse)"),
    ("st", "full", "straight-through, exact gate gradient (dense product in backward)"),
    ("sts", "full", "stochastic times smooth, exact gate gradient"),
    ("noisy_rectifier", "full", "noisy rectifier, exact gate gradient"),
]


def bench_train_step(args, progress) -> list[dict]:
    device, dtype = args.device, getattr(torch, args.dtype)
    dim, hidden, classes = args.in_features, args.out_features, 10
    chunk = args.chunk[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, dim, generator=gen).to(device, dtype)
    y = torch.randint(0, classes, (args.batch,), generator=gen).to(device)
    rows = []
    for estimator, gate_grad, note in TRAIN_CASES:
        runs = {}
        for sparse in (True, False):
            torch.manual_seed(0)
            model = _Block(estimator, dim, hidden, chunk, classes, sparse, gate_grad).to(device, dtype)
            with torch.no_grad():  # start near the target density so the timing means something
                model.gater.bias.fill_(math.log(args.train_density / (1 - args.train_density)) if estimator != "sts" else 2 * math.log(args.train_density))
                model.gater.weight.mul_(0.1)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                model(x, y).backward()
                opt.step()

            runs["stochgate" if sparse else "dense"] = step
        samples = time_interleaved(runs, max(3, args.repeats // 2), device, warmup=1)
        dense = statistics.median(samples["dense"])
        sparse_t = statistics.median(samples["stochgate"])
        rows.append({"estimator": estimator, "gate_grad": gate_grad, "note": note, "chunk": chunk, "target_density": args.train_density,
                     "stochgate_s": sparse_t, "dense_s": dense, "speedup_vs_dense": dense / sparse_t,
                     "samples_s": samples})
        progress.update(1)
    return rows


# ---------------------------------------------------------------------------------------
# Output.


def cpu_model() -> str:
    """The CPU's model name as Linux reports it (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_info() -> dict:
    """What the CPU kernels run on here (`stochgate info` and the benchmarks' machine record)."""
    return {
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        # float32 CPU kernels: AVX-512, AVX2 or baseline builds (picked at run time)
        "cpu_kernel_isa": stochgate._ops._C.cpu_isa(),
        # bfloat16 gated matmuls with chunks of 16 or more run on AMX (oneDNN's brgemm) here
        "cpu_bf16_amx": bool(stochgate._ops._C.cpu_amx_available()),
    }


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            **cpu_info(), "torch": torch.__version__, "build": stochgate.build_info()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def print_tables(result: dict) -> None:
    a = result["args"]
    print(f"\n{a['op']} {a['mode']} | {a['device']} {a['dtype']} | B={a['batch']} in={a['in_features']} out={a['out_features']} | "
          f"median of {a['repeats']} | {result['machine']['processor']}, {result['machine']['cpu_threads']} threads")
    methods = available_methods(a["device"], a.get("methods"))
    print(f"{'chunk':>6} {'density':>8} " + " ".join(f"{m + ' ms':>14}" for m in methods) + "   speedup vs dense (stochgate)")
    by_cfg: dict = {}
    for r in result["matmul"]:
        by_cfg.setdefault((r["chunk"], r["density"]), {})[r["method"]] = r
    for (chunk, density), rs in by_cfg.items():
        cells = []
        for m in methods:
            r = rs.get(m)
            cells.append(f"{r['median_s'] * 1e3:>14.2f}" if r and r["median_s"] else f"{'-':>14}")
        s = rs["stochgate"]["speedup_vs_dense"]
        best_alt = min((rs[m]["median_s"] for m in methods if m not in ("stochgate", "dense") and rs.get(m) and rs[m]["median_s"]), default=None)
        vs_alt = f", {best_alt / rs['stochgate']['median_s']:.2f}x best alternative" if best_alt else ""
        print(f"{chunk:>6} {density:>8.2f} " + " ".join(cells) + (f"   {s:.2f}x{vs_alt}" if s else ""))
    for chunk, be in result["break_even"].items():
        print(f"break-even density (stochgate = dense), chunk {chunk}: {be}")
    skipped = {(r["method"], r.get("error")) for r in result["matmul"] if r.get("error")}
    for m, why in sorted(skipped):
        print(f"  {m}: {why}")
    if result.get("estimators"):
        print(f"\nestimator kernels, {a['estimator_size']}x{a['estimator_size']} {a['dtype']} (ms; x = time / stochgate's)")
        print(f"{'estimator':<26}{'mode':<9}{'stochgate':>10}{'pytorch':>16}{'reference':>18}")
        est = {}
        for r in result["estimators"]:
            est.setdefault((r["estimator"], r["mode"]), {})[r["method"]] = r
        for (name, mode), rs in est.items():
            if name == "copy":
                print(f"{'(tensor copy, bandwidth)':<26}{'':<9}{rs['clone']['median_s'] * 1e3:>10.2f}")
                continue
            print(f"{name:<26}{mode:<9}{rs['stochgate']['median_s'] * 1e3:>10.2f}"
                  f"{rs['pytorch']['median_s'] * 1e3:>9.2f} ({rs['pytorch']['stochgate_speedup']:.1f}x)"
                  f"{rs['reference']['median_s'] * 1e3:>10.2f} ({rs['reference']['stochgate_speedup']:.1f}x)")
    if result.get("train_step"):
        t = result["train_step"][0]
        print(f"\ntraining step (gater -> estimator -> GatedLinear -> GatedInputLinear, B={a['batch']}, "
              f"{a['in_features']}->{a['out_features']}->10, chunk {t['chunk']}, density ~{t['target_density']}): ms")
        print(f"{'estimator':<18}{'gate grad':<10}{'stochgate':>10}{'dense':>10}{'speedup':>9}  note")
        for r in result["train_step"]:
            print(f"{r['estimator']:<18}{str(r['gate_grad']):<10}{r['stochgate_s'] * 1e3:>10.2f}{r['dense_s'] * 1e3:>10.2f}"
                  f"{r['speedup_vs_dense']:>8.2f}x  {r['note']}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks = result["args"]["chunk"]
    fig, axes = plt.subplots(1, len(chunks), figsize=(5 * len(chunks), 4), squeeze=False)
    a = result["args"]
    for ax, chunk in zip(axes[0], chunks):
        rows = [r for r in result["matmul"] if r["chunk"] == chunk]
        ds = sorted({r["density"] for r in rows})
        ax.plot(ds, [1 / d for d in ds], "k--", lw=1, label="ideal 1/density")
        ax.axhline(1.0, color="grey", lw=0.8)
        for i, method in enumerate(METHODS["gated_linear"]):  # one colour per method in every panel
            pts = sorted((r["density"], r["speedup_vs_dense"]) for r in rows if r["method"] == method and r["speedup_vs_dense"])
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{i}", label=method, lw=2 if method == "stochgate" else 1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gate density")
        ax.set_ylabel("speedup over dense F.linear")
        ax.set_title(f"chunk {chunk}")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{a['op']} {a['mode']}, {a['device']} {a['dtype']}, B={a['batch']}, in={a['in_features']}, out={a['out_features']} "
                 f"({result['machine'].get('gpu', result['machine']['processor'])})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Command line.


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump, no traceback
        print(f"stochgate bench: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv):
    p = _Parser(prog="stochgate bench", description=__doc__.split("\n\n")[0],
                epilog="Defaults answer in under a minute on a 2-core CPU.")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--batch", type=int, default=None, help="rows B (default 1024; --quick 512)")
    p.add_argument("--in-features", type=int, default=None, help="K (default 2048; --quick 1024)")
    p.add_argument("--out-features", type=int, default=None,
                   help="N, the gated units split into chunks: gated_linear's outputs, gated_input_linear's "
                        "inputs, the block's hidden layer (default 2048; --quick 1024)")
    p.add_argument("--chunk", type=int, nargs="+", default=None, help="units per gate (default 64 1)")
    p.add_argument("--density", type=float, nargs="+", default=None, help="fractions of active gates (default 0.1 0.25 0.5 1)")
    p.add_argument("--op", default="gated_linear", choices=["gated_linear", "gated_input_linear", "block"])
    p.add_argument("--mode", default="forward", choices=["forward", "train"])
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per configuration (default 7; --quick 3)")
    p.add_argument("--methods", nargs="+", default=None, choices=["stochgate", "dense", "gather", "sparse", "grouped_mm"],
                   help="which implementations to time (default: all available; stochgate and dense always run)")
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats")
    p.add_argument("--no-estimators", action="store_true", help="skip the estimator kernel timings")
    p.add_argument("--no-train-step", action="store_true", help="skip the full training step timings")
    p.add_argument("--estimator-size", type=int, default=None, help="side of the square tensor for estimator timings (default 2048; --quick 1024)")
    p.add_argument("--train-density", type=float, default=0.1)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PATH")
    a = p.parse_args(argv)
    q = a.quick
    defaults = {
        "batch": 512 if q else 1024,
        "in_features": 1024 if q else 2048,
        "out_features": 1024 if q else 2048,
        "chunk": [64, 1],
        "density": [0.1, 0.5, 1.0] if q else [0.1, 0.25, 0.5, 1.0],
        "repeats": 3 if q else 7,
        "estimator_size": 1024 if q else 2048,
    }
    for name, value in defaults.items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    for name in ("batch", "in_features", "out_features", "repeats", "estimator_size"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")
    for d in a.density + [a.train_density]:
        if not 0 < d <= 1:
            p.error(f"densities must lie in (0, 1], got {d}")
    gated = a.out_features  # the features split into chunks
    for c in a.chunk:
        if c < 1 or gated % c:
            p.error(f"--chunk {c} does not divide the {gated} gated features (--out-features)")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is available")
    if a.device == "cuda" and not stochgate.build_info()["cuda_compiled"]:
        p.error("--device cuda but stochgate was built without its CUDA kernels")
    return a


def run(args) -> dict:
    from tqdm import tqdm

    total = len(args.chunk) * len(args.density) + (0 if args.no_estimators else 6) + (0 if args.no_train_step else len(TRAIN_CASES))
    result = {"args": vars(args), "machine": machine_info(args.device)}
    with tqdm(total=total, desc="stochgate bench", unit="config", file=sys.stderr, leave=False) as progress:
        result["matmul"] = bench_matmul(args, progress)
        result["break_even"] = {c: break_even(result["matmul"], c) for c in args.chunk}
        if not args.no_estimators:
            result["estimators"] = bench_estimators(args, progress)
        if not args.no_train_step:
            result["train_step"] = bench_train_step(args, progress)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print_tables(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
