"""The MNIST experiment under DistributedDataParallel: two CPU processes with gloo train on
their shards of a small synthetic set; afterwards both hold identical parameters, REINFORCE
min-variance baseline buffers and sparsity weight λ, although their gate samples differ."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(n_train=256, n_eval=64):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n_train + 2 * n_eval,), generator=g)
    x = torch.rand(len(y), 784, generator=g) * 0.2
    x[torch.arange(len(y)), y * 70] = 1.0  # a class-dependent pixel
    s = {"train": slice(0, n_train), "valid": slice(n_train, n_train + n_eval), "test": slice(n_train + n_eval, None)}
    return {f"{k}_{name}": t[sl] for name, sl in s.items() for k, t in (("x", x), ("y", y))}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from stochgate.experiments import mnist

    tensors = _data()
    result = {}
    for name, chunk in (("reinforce", 1), ("st", 32)):
        cfg = mnist.Config(epochs=1, seed=3, time_steps=2, time_reps=1, progress=False)
        tr = mnist._Trainer(mnist.METHODS[name], chunk, cfg, torch.device("cpu"))
        batches = mnist._batches(len(tensors["y_train"]), cfg.batch_size, cfg.seed, 0, rank, WORLD)
        first_gates = None
        for idx in batches[:4]:
            i = torch.from_numpy(idx)
            tr.step(tensors["x_train"][i], tensors["y_train"][i])
            if first_gates is None:
                first_gates = tr.model.gates(tr.model.scores(tensors["x_train"][:8])).detach().clone()
        result[name] = {
            "state": {k: v.detach().clone() for k, v in tr.model.state_dict().items()},
            "lambda": tr.lam.value,
            "batch0": torch.from_numpy(batches[0]).clone(),
            "gates": first_gates,
        }
        # The whole per-method path (epochs, thresholds, evaluation, timings) runs in step.
        row = mnist.run_method(mnist.METHODS[name], chunk, tensors, cfg, log=lambda m: None)
        result[name]["row"] = {k: row[k] for k in ("valid_error", "test_error", "test_density", "threshold")}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_ranks_agree(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for name in ("reinforce", "st"):
        a, b = r0[name], r1[name]
        assert not torch.equal(a["batch0"], b["batch0"])  # each rank saw its own shard...
        assert not torch.equal(a["gates"], b["gates"])  # ...and drew its own gates
        assert a["state"].keys() == b["state"].keys()
        for k in a["state"]:
            torch.testing.assert_close(a["state"][k], b["state"][k], rtol=0, atol=0, msg=f"{name}: {k}")
        assert a["lambda"] == b["lambda"]
        assert a["row"] == b["row"]
    buffers = [k for k in r0["reinforce"]["state"] if k.startswith("gate.baseline.")]
    assert {k.rsplit(".", 1)[1] for k in buffers} == {"numerator", "denominator", "count"}
    assert r0["reinforce"]["state"]["gate.baseline.count"].item() == 4
    assert r0["reinforce"]["state"]["gate.baseline.denominator"].abs().sum() > 0
