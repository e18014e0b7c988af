"""``python -m stochgate.reproduce`` / ``stochgate reproduce``: the paper's MNIST
conditional-computation experiment (see :mod:`stochgate.experiments.mnist`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .experiments import mnist

    return mnist.main(argv)


if __name__ == "__main__":
    sys.exit(main())
