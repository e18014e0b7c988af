"""Reproductions of the paper's experiments: :mod:`stochgate.experiments.mnist` (section 5)."""
