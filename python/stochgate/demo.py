"""`stochgate demo` (run by `make demo` before the MNIST reproduction): trains a small
conditionally-computed network with each of the paper's estimators on a synthetic
classification task and prints loss, accuracy and gate density.

The network is the paper's layout in miniature: a gater (input -> tanh -> gate logits ->
StochasticGate), a main path (GatedLinear: only chunks whose gate is on are computed) and an
output layer (GatedInputLinear: only active chunks are read). A KL penalty (sigmoid gaters) or
an L1 penalty (rectifier gater) pulls the gate density toward 25%.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import stochgate
from stochgate.nn import GatedInputLinear, GatedLinear, StochasticGate

ESTIMATORS = ("st", "st_sigmoid", "sts", "noisy_rectifier", "reinforce")


def make_task(n: int, dim: int, classes: int, gen: torch.Generator):
    """Gaussian clusters: each class is a mixture of 3 random centres (not linearly separable
    as a whole, so a conditional hidden layer helps)."""
    centres = torch.randn(classes, 3, dim, generator=gen) * 2.0
    labels = torch.randint(0, classes, (n,), generator=gen)
    which = torch.randint(0, 3, (n,), generator=gen)
    x = centres[labels, which] + 1.8 * torch.randn(n, dim, generator=gen)
    return x, labels


class GatedNet(nn.Module):
    def __init__(self, estimator: str, dim: int, hidden: int, chunk: int, classes: int, gen: torch.Generator):
        super().__init__()
        chunks = hidden // chunk
        self.gater = nn.Sequential(nn.Linear(dim, 64), nn.Tanh(), nn.Linear(64, chunks))
        self.gate = StochasticGate(estimator, num_units=chunks, generator=gen)
        self.main = GatedLinear(dim, hidden, chunks)
        self.out = GatedInputLinear(hidden, classes, chunks)

    def forward(self, x):
        a = self.gater(x)
        g = self.gate(a)
        return self.out(self.main(x, g), g), a, g


def train(estimator: str, x, y, steps: int, target: float, gen: torch.Generator) -> dict:
    torch.manual_seed(0)
    net = GatedNet(estimator, x.shape[1], hidden=512, chunk=16, classes=int(y.max()) + 1, gen=gen)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    lam = 0.1
    densities = []
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        logits, a, g = net(x[idx])
        per_example = F.cross_entropy(logits, y[idx], reduction="none")
        loss = per_example.mean()
        if estimator == "noisy_rectifier":
            penalty = g.abs().mean()  # L1 toward sparse rectifier gates
        else:
            p = torch.sigmoid(a).mean(0).clamp(1e-6, 1 - 1e-6)  # KL(target || mean p) per gate
            penalty = (target * torch.log(target / p) + (1 - target) * torch.log((1 - target) / (1 - p))).mean()
        total = loss + lam * penalty
        if estimator == "reinforce":
            total = total + net.gate.reinforce_loss(per_example.detach())
        opt.zero_grad()
        total.backward()
        opt.step()
        density = (g != 0).float().mean().item()
        densities.append(density)
        lam *= 1.01 if density > target + 0.02 else (0.99 if density < target - 0.02 else 1.0)
    train_s = time.perf_counter() - start
    net.eval()
    with torch.no_grad():
        logits, _, g = net(x)
        acc = (logits.argmax(1) == y).float().mean().item()
        final = F.cross_entropy(logits, y).item()
    recent = densities[-max(1, steps // 10):]
    return {"estimator": estimator, "loss": final, "accuracy": acc, "train_density": sum(recent) / len(recent),
            "eval_density": (g != 0).float().mean().item(), "seconds": train_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stochgate demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = make_task(4096, 32, 8, gen)
    print(f"stochgate {stochgate.__version__} | build {stochgate.build_info()}")
    print(f"{'estimator':<16}{'loss':>8}{'accuracy':>10}{'train density':>15}{'eval density':>14}{'train s':>9}")
    for estimator in ESTIMATORS:
        r = train(estimator, x, y, args.steps, 0.25, gen)
        print(f"{r['estimator']:<16}{r['loss']:>8.3f}{r['accuracy']:>10.3f}{r['train_density']:>15.3f}"
              f"{r['eval_density']:>14.3f}{r['seconds']:>9.1f}")
    print("density = fraction of (example, chunk) gates that are on: while training (last 10% of steps; target 0.25)\n"
          "and in eval mode, where gates are deterministic (1[p > 0.5]; the expectation for sts and the rectifier,\n"
          "so an sts gate is never exactly 0 there)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
