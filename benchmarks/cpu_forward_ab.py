"""gated_linear's forward against dense F.linear, timed as `stochgate bench` times it (each
call right after a dense one, medians of 12 after 3 warm-up calls), for comparing two builds
on one machine when the full tables cannot be rerun.

The numbers in benchmarks/CPU_NOTES.md ("Chunk 1 (per-unit gating)") came from running this
with the old and the new csrc/cpu/gated_linear.cpp built in turn (`make build` after each
swap), alternating, two rounds:

    .venv/bin/python benchmarks/cpu_forward_ab.py [--chunk 1] [--densities 0.1 0.25]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import stochgate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunk", type=int, default=1)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.25])
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args()
    torch.manual_seed(0)
    B, K, N = 1024, 2048, 2048
    x = torch.randn(B, K)
    w = torch.randn(N, K) / K**0.5
    b = torch.randn(N)
    out = []
    for d in a.densities:
        g = (torch.rand(B, N // a.chunk) < d).float()
        ts: dict[str, list[float]] = {"stochgate": [], "dense": []}
        for _ in range(a.repeats):
            for m, v in ts.items():
                F.linear(x, w, b)
                t = time.perf_counter()
                if m == "dense":
                    F.linear(x, w, b)
                else:
                    stochgate.gated_linear(x, w, b, g)
                v.append(time.perf_counter() - t)
        med = {m: statistics.median(v[3:]) * 1e3 for m, v in ts.items()}
        out.append(
            f"d={d}: stochgate {med['stochgate']:.2f} ms, dense {med['dense']:.2f} ms, "
            f"{med['dense'] / med['stochgate']:.2f}x"
        )
    print(f"float32 B={B} K={K} N={N} chunk {a.chunk}, {torch.get_num_threads()} threads: " + " | ".join(out))


if __name__ == "__main__":
    main()
