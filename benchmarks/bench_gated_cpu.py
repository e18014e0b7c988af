"""CPU timing of stochgate.gated_linear against what a user can already write.

    python benchmarks/bench_gated_cpu.py [--batch 1024 --features 2048 --repeats 7]

Float32, x (B, K), weight (N, K), random per-row gates at density d, gates not requiring
grad. Alternatives (importable, for the `stochgate bench` CLI):

- ``dense``: F.linear then multiply by the expanded gates (the cost the op should beat);
- ``gather``: pure-PyTorch gather loop, per chunk index_select + addmm + index_copy;
- ``sampled``: chunk = 1 only, torch.sparse.sampled_addmm with the CSR gate pattern.

Medians over repeats after warm-up, alternatives interleaved within each repeat.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import stochgate


def make_inputs(B: int, K: int, N: int, chunk: int, density: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g)
    gates = (torch.rand(B, N // chunk, generator=g) < density).float()
    return x, w, b, gates


def dense_gated_linear(x, weight, bias, gates):
    """Dense F.linear, then the gate (as a multiplier; zero gates give zero outputs)."""
    chunk = weight.shape[0] // gates.shape[1]
    return F.linear(x, weight, bias) * gates.repeat_interleave(chunk, dim=1)


def gather_gated_linear(x, weight, bias, gates):
    """Pure-PyTorch gather loop: per chunk, the active rows, one addmm, scatter back."""
    B, C = gates.shape
    chunk = weight.shape[0] // C
    y = x.new_zeros(B, weight.shape[0])
    for c in range(C):
        g = gates[:, c]
        rows = g.nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        sl = slice(c * chunk, (c + 1) * chunk)
        out = torch.addmm(bias[sl], x.index_select(0, rows), weight[sl].t()) * g[rows, None]
        y[:, sl] = y[:, sl].index_copy(0, rows, out)
    return y


def sampled_gated_linear(x, weight, bias, gates):
    """chunk = 1: torch.sparse.sampled_addmm over the CSR pattern of the gates."""
    mask = gates.to_sparse_csr()
    pre = torch.sparse.sampled_addmm(mask, x, weight.t())
    vals = pre.values() * mask.values()
    vals = vals + bias[pre.col_indices()] * mask.values()
    out = torch.sparse_csr_tensor(pre.crow_indices(), pre.col_indices(), vals, pre.shape)
    return out.to_dense()


def stochgate_gated_linear(x, weight, bias, gates):
    return stochgate.gated_linear(x, weight, bias, gates)


ALTERNATIVES: dict[str, Callable] = {
    "stochgate": stochgate_gated_linear,
    "dense": dense_gated_linear,
    "gather": gather_gated_linear,
    "sampled": sampled_gated_linear,
}


def step(fn: Callable, x, w, b, gates, backward: bool) -> Callable[[], None]:
    """A closure running fn forward (and backward of sum-weighted output if asked)."""
    if not backward:
        def run():
            with torch.no_grad():
                fn(x, w, b, gates)
        return run
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    dy = torch.randn(x.shape[0], w.shape[0])

    def run():
        y = fn(xs, ws, bs, gates)
        y.backward(dy)
        xs.grad = ws.grad = bs.grad = None
    return run


def time_interleaved(runs: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each closure, the closures interleaved in every repeat."""
    for _ in range(warmup):
        for r in runs.values():
            r()
    samples = {k: [] for k in runs}
    for _ in range(repeats):
        for k, r in runs.items():
            t0 = time.perf_counter()
            r()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--chunks", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    B, K = args.batch, args.features
    print(f"CPU float32, B={B}, K=N={K}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'chunk':>5} {'d':>5} {'pass':>8} | {'stochgate ms':>12} {'dense ms':>9} {'gather ms':>9} "
          f"{'sampled ms':>10} | {'vs dense':>8} {'vs gather':>9} {'vs sampled':>10}")
    for chunk in args.chunks:
        for d in args.densities:
            x, w, b, gates = make_inputs(B, K, K, chunk, d)
            for backward in (False, True):
                names = ["stochgate", "dense"]
                if chunk >= 16:
                    names.append("gather")
                if chunk == 1 and not backward:
                    names.append("sampled")
                runs = {n: step(ALTERNATIVES[n], x, w, b, gates, backward) for n in names}
                t = time_interleaved(runs, args.repeats)
                ms = {k: v * 1e3 for k, v in t.items()}

                def cell(k, width):
                    return f"{ms[k]:{width}.2f}" if k in ms else f"{'-':>{width}}"

                def ratio(k, width):
                    return f"{ms[k] / ms['stochgate']:{width}.2f}x" if k in ms else f"{'-':>{width + 1}}"

                print(f"{chunk:>5} {d:>5.2f} {'fwd+bwd' if backward else 'fwd':>8} | "
                      f"{cell('stochgate', 12)} {cell('dense', 9)} {cell('gather', 9)} {cell('sampled', 10)} | "
                      f"{ratio('dense', 7)} {ratio('gather', 8)} {ratio('sampled', 9)}", flush=True)


if __name__ == "__main__":
    main()
