"""stochgate.experiments.mnist / stochgate.reproduce on a tiny synthetic IDX data set: the
model, its gated and dense paths, the sparsity controls, the command line and its outputs."""

from __future__ import annotations

import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import stochgate
from stochgate.experiments import mnist


def _idx(path: Path, arr: np.ndarray) -> None:
    raw = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw))


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory) -> Path:
    """240 training (200 + 40 validation) and 40 test images whose class is a bright square's
    position: learnable in a few steps."""
    d = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 40, (n, 28, 28))
        for i, c in enumerate(y):
            r, col = divmod(int(c), 5)
            x[i, 4 + 10 * r : 12 + 10 * r, 2 + 5 * col : 6 + 5 * col] = 255
        return x, y

    x, y = make(240)
    _idx(d / "train-images-idx3-ubyte.gz", x)
    _idx(d / "train-labels-idx1-ubyte.gz", y)
    x, y = make(40)
    _idx(d / "t10k-images-idx3-ubyte.gz", x)
    _idx(d / "t10k-labels-idx1-ubyte.gz", y)
    return d


def test_methods_cover_the_paper():
    assert set(mnist.METHODS) == {"noisy_rectifier", "st", "st_sigmoid", "sts", "reinforce", "baseline_rectifier", "baseline_sigmoid"}
    paper = {m.name: m.paper for m in mnist.METHODS.values()}
    assert paper["st"] == 1.39 and paper["reinforce"] == 1.89 and paper["sts"] == 1.96
    assert paper["noisy_rectifier"] == 1.87 and paper["baseline_rectifier"] == 1.60 and paper["baseline_sigmoid"] == 1.92
    assert mnist.METHODS["reinforce"].gater_lr == 0.001
    assert mnist.METHODS["reinforce"].gate_grad is None  # the training step stays sparse
    assert mnist.METHODS["st"].gate_grad == "full" and mnist.METHODS["sts"].gate_grad == "active"


@pytest.mark.parametrize("chunk,units,chunks", [(1, 2000, 2000), (32, 2048, 64)])
def test_model_shapes_use_the_gated_modules(chunk, units, chunks):
    m = mnist.ConditionalNet(mnist.METHODS["st"], chunk)
    assert isinstance(m.main, stochgate.nn.GatedLinear) and isinstance(m.out, stochgate.nn.GatedInputLinear)
    assert (m.units, m.num_chunks) == (units, chunks)
    assert m.main.weight.shape == (units, 784) and m.out.weight.shape == (10, units)
    logits, a, g = m(torch.rand(5, 784))
    assert logits.shape == (5, 10) and a.shape == g.shape == (5, chunks)


@pytest.mark.parametrize("name", ["st", "st_sigmoid", "sts", "noisy_rectifier", "baseline_rectifier", "baseline_sigmoid"])
@pytest.mark.parametrize("chunk", [1, 32])
def test_gated_matches_dense_forward_and_backward(name, chunk):
    """The gated ops (with the method's gate_grad) give the dense model's loss and gradients:
    "active" is exact for STS and the rectifiers because their gates' backward is 0 where
    the gate is 0."""
    torch.manual_seed(0)
    method = mnist.METHODS[name]
    grads, losses = [], []
    x, y = torch.rand(16, 784), torch.randint(0, 10, (16,))
    base = None
    for dense in (False, True):
        m = mnist.ConditionalNet(method, chunk, generator=torch.Generator().manual_seed(3))
        if base is None:
            base = m.state_dict()
        m.load_state_dict(base)
        with torch.no_grad():
            m.gater_out.bias.fill_(0.0)  # about half the gates on
        m.dense = dense
        logits, a, g = m(x)
        loss = torch.nn.functional.cross_entropy(logits, y) + mnist.sparsity_penalty(method, a, g, 0.1)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-5, msg=k)


def test_reinforce_gates_carry_no_gradient():
    m = mnist.ConditionalNet(mnist.METHODS["reinforce"], 1)
    logits, a, g = m(torch.rand(4, 784))
    assert not g.requires_grad and a.requires_grad
    assert m.gate.baseline is not None and m.gate.baseline.num_units == 2000


@pytest.mark.parametrize("name", ["st", "sts", "noisy_rectifier", "baseline_rectifier"])
def test_threshold_gives_target_density(name):
    torch.manual_seed(0)
    m = mnist.ConditionalNet(mnist.METHODS[name], 1).eval()
    x = torch.rand(300, 784)
    t = mnist.choose_threshold(m, x, 0.1, batch=128)
    assert t is not None and m.threshold == t
    _, density = mnist.evaluate(m, x, torch.zeros(300, dtype=torch.int64), batch=128)
    assert abs(density - 0.1) < 0.002


def test_eval_without_threshold_raises():
    m = mnist.ConditionalNet(mnist.METHODS["st"], 1).eval()
    with pytest.raises(RuntimeError, match="threshold"):
        m(torch.rand(2, 784))


def test_adaptive_lambda():
    lam = mnist.AdaptiveLambda(1.0, target=0.1, tol=0.01, factor=2.0, momentum=0.0)
    lam.update(0.2)
    assert lam.value == 2.0
    lam.update(0.105)
    assert lam.value == 2.0
    lam.update(0.01)
    assert lam.value == 1.0


def test_max_norm():
    m = mnist.ConditionalNet(mnist.METHODS["st"], 32)
    with torch.no_grad():
        m.main.weight.mul_(100)
    mnist.max_norm_(m, 2.0)
    assert m.main.weight.norm(dim=1).max() <= 2.0 + 1e-5
    assert m.gater_hidden.weight.norm(dim=1).max() <= 2.0 + 1e-5
    # The softmax output layer is left alone unless asked for (Config.max_norm_output).
    with torch.no_grad():
        m.out.weight.mul_(100)
    big = m.out.weight.norm(dim=1).min().item()
    mnist.max_norm_(m, 2.0)
    assert m.out.weight.norm(dim=1).min().item() == big > 2.0
    mnist.max_norm_(m, 2.0, output=True)
    assert m.out.weight.norm(dim=1).max() <= 2.0 + 1e-5


@pytest.mark.parametrize("name", ["st", "sts"])
def test_running_kl_has_the_kl_gradient_at_the_running_average(name):
    """With ``running``, the penalty's gradient w.r.t. the gate pre-activations is that of
    ``sum_i KL(s || q_i)`` evaluated at q = the running average: ``KL'(running) dq/da`` (chain
    rule, dq/da by autograd), and equal to the minibatch KL's gradient when the running average
    is the batch mean."""
    method = mnist.METHODS[name]
    torch.manual_seed(1)
    a = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    running = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    pen = mnist.sparsity_penalty(method, a, None, 0.1, running)
    (grad,) = torch.autograd.grad(pen, a)
    # Reference: d/da sum_i KL(s || q_i(a)) = KL'(q_i) dq_i/da, with KL' taken at `running`.
    q = mnist.firing_probability(method, a).mean(0)
    (dq,) = torch.autograd.grad(q, a, grad_outputs=torch.ones_like(q), retain_graph=True)
    kl_prime = -0.1 / running + 0.9 / (1 - running)
    torch.testing.assert_close(grad, dq * kl_prime)
    # At running == batch mean it is exactly the minibatch KL's gradient.
    qb = q.detach()
    (g_run,) = torch.autograd.grad(mnist.sparsity_penalty(method, a, None, 0.1, qb), a)
    (g_kl,) = torch.autograd.grad(mnist.sparsity_penalty(method, a, None, 0.1), a)
    torch.testing.assert_close(g_run, g_kl)


def test_trainer_updates_the_running_firing_rate():
    cfg = mnist.Config(kl_momentum=0.9)
    tr = mnist._Trainer(mnist.METHODS["st"], 32, cfg, torch.device("cpu"))
    assert torch.equal(tr.model.firing_rate, torch.full((tr.model.num_chunks,), 0.1))
    x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
    with torch.no_grad():
        q = torch.sigmoid(tr.model.scores(x)).mean(0)
    tr.step(x, y)
    torch.testing.assert_close(tr.model.firing_rate, 0.9 * 0.1 + 0.1 * q)
    assert "firing_rate" in tr.model.state_dict()
    # The rectifiers (L1) and the no-sparsity baseline have no running rate; 0 turns it off.
    assert not hasattr(mnist._Trainer(mnist.METHODS["noisy_rectifier"], 32, cfg, torch.device("cpu")).model, "firing_rate")
    tr0 = mnist._Trainer(mnist.METHODS["st"], 32, mnist.Config(kl_momentum=0.0), torch.device("cpu"))
    tr0.step(x, y)
    assert torch.equal(tr0.model.firing_rate, torch.full((tr0.model.num_chunks,), 0.1))


def test_lambda_watches_the_running_firing_rate():
    """Default (lambda_signal="running"): a KL gater's λ moves by lambda_factor_running per step
    on the running firing rate the penalty uses, whatever the sampled density; "batch" (the
    paper's rule) and the rectifiers follow the sampled density with lambda_factor."""
    x, y = torch.rand(32, 784), torch.randint(0, 10, (32,))
    cfg = mnist.Config(kl_momentum=0.999, kl_weight=0.5)
    tr = mnist._Trainer(mnist.METHODS["st"], 32, cfg, torch.device("cpu"))
    assert tr.lam.value == 0.5
    with torch.no_grad():  # running rate far above target: λ grows by exactly 1.001 per step
        tr.model.firing_rate.fill_(0.5)
    tr.step(x, y)
    assert tr.lam.value == pytest.approx(0.5 * cfg.lambda_factor_running)
    with torch.no_grad():  # within tolerance: unchanged, even if the batch density is not
        tr.model.firing_rate.fill_(0.1)
    before = tr.lam.value
    tr.step(x, y)
    assert tr.lam.value == before
    with torch.no_grad():  # below: down, but not under the floor (the initial weight)
        tr.model.firing_rate.fill_(0.01)
    for _ in range(3):
        tr.step(x, y)
    assert tr.lam.value == pytest.approx(0.5)
    # The paper's rule on the sampled density.
    trb = mnist._Trainer(mnist.METHODS["st"], 32, mnist.Config(lambda_signal="batch"), torch.device("cpu"))
    _, d = trb.step(x, y)
    expected = 0.1 * (1.01 if d.item() > 0.11 else 1.0)
    assert trb.lam.value == pytest.approx(max(expected, 0.1))
    assert not mnist._Trainer(mnist.METHODS["noisy_rectifier"], 32, cfg, torch.device("cpu")).lam_on_running


def test_main_path_and_gater_learning_rates_apply_to_sparse_gaters_only():
    cfg = mnist.Config(lr=0.1, main_lr=1.0, gater_lr=0.3)
    for name, main_lr, gater_lr in (("st", 1.0, 0.3), ("sts", 1.0, 0.3), ("reinforce", 1.0, 0.001),
                                    ("noisy_rectifier", 1.0, 0.1), ("baseline_rectifier", 1.0, 0.1),
                                    ("baseline_sigmoid", 0.1, 0.1)):
        tr = mnist._Trainer(mnist.METHODS[name], 32, cfg, torch.device("cpu"))
        lrs = {id(p): g["lr"] for g in tr.opt.param_groups for p in g["params"]}
        assert lrs[id(tr.model.main.weight)] == main_lr and lrs[id(tr.model.main.bias)] == main_lr
        assert lrs[id(tr.model.out.weight)] == 0.1
        assert lrs[id(tr.model.gater_out.weight)] == gater_lr
        assert lrs[id(tr.model.gater_hidden.weight)] == gater_lr


def _run(idx_dir, out, *extra):
    return mnist.main(["--data-dir", str(idx_dir), "--out", str(out), "--no-progress", "--epochs", "2",
                       "--time-steps", "2", "--valid-size", "40", *extra])


def test_cli_runs_every_method_and_writes_outputs(idx_dir, tmp_path, capsys):
    assert _run(idx_dir, tmp_path, "--quick", "--chunk", "32", "64") == 0
    table = capsys.readouterr().out
    for label in ("straight-through (identity)", "noisy rectifier", "REINFORCE", "baseline sigmoid + noise (not run)"):
        assert label in table
    assert "1.39" in table and "1.87" in table
    result = json.loads((tmp_path / "mnist_quick.json").read_text())
    rows = result["rows"]
    assert len(rows) == 14 and {r["chunk"] for r in rows} == {32, 64}
    for r in rows:
        assert r["status"] == "ok" and r["epochs"] == 2 and len(r["curves"]["valid_error"]) == 2
        assert 0 <= r["test_error"] <= 100 and 0 <= r["test_density"] <= 1
        t = r["timing"]
        assert t["step_ms_gated"] > 0 and t["step_ms_dense"] > 0 and t["test_pass_s_gated"] > 0
    assert result["machine"]["cpu_count"] >= 1 and result["data"]["sizes"] == {"train": 200, "valid": 40, "test": 40}
    assert (tmp_path / "mnist_quick_curves.png").stat().st_size > 1000
    assert (tmp_path / "mnist_quick_table.md").read_text().startswith("| method |")


def test_seed_repeats(idx_dir, tmp_path):
    rows = []
    for i in range(2):
        assert _run(idx_dir, tmp_path / str(i), "--quick", "--methods", "st", "reinforce", "--chunk", "1", "--seed", "7") == 0
        rows.append(json.loads((tmp_path / str(i) / "mnist_quick.json").read_text())["rows"])
    for a, b in zip(*rows):
        assert a["curves"]["train_loss"] == b["curves"]["train_loss"]
        assert a["curves"]["valid_error"] == b["curves"]["valid_error"]
        assert a["test_error"] == b["test_error"] and a["threshold"] == b["threshold"]


def test_cli_errors(idx_dir, tmp_path, capsys):
    assert mnist.main(["--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert mnist.main(["--chunk", "0", "--out", str(tmp_path)]) == 2


def test_cli_data_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stochgate.reproduce", "--data-dir", str(tmp_path / "missing"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"stochgate reproduce: error: {tmp_path / 'missing'}: no such directory"]
    assert "Traceback" not in proc.stderr


def test_from_json_redraws_a_partial_run(idx_dir, tmp_path, capsys):
    assert _run(idx_dir, tmp_path, "--quick", "--methods", "st", "--chunk", "64") == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "mnist_quick.json").read_text())
    row = result["rows"][0]
    partial = {**result, "rows": [{k: row[k] for k in ("method", "label", "chunk", "units", "epochs", "curves", "valid_error")} | {"status": "running"}]}
    (tmp_path / "p.json").write_text(json.dumps(partial))
    assert mnist.main(["--from-json", str(tmp_path / "p.json")]) == 0
    assert "straight-through (identity) | 64 |" in capsys.readouterr().out
    assert (tmp_path / "p_curves.png").is_file() and (tmp_path / "p_table.md").is_file()
    assert mnist.main(["--from-json", str(tmp_path / "nope.json")]) == 1


def test_from_json_merges_runs_split_across_processes(idx_dir, tmp_path, capsys):
    assert _run(idx_dir, tmp_path / "a", "--quick", "--methods", "st", "--chunk", "64") == 0
    assert _run(idx_dir, tmp_path / "b", "--quick", "--methods", "sts", "--chunk", "64") == 0
    capsys.readouterr()
    files = [str(tmp_path / d / "mnist_quick.json") for d in "ab"]
    assert mnist.main(["--from-json", *files, "--out", str(tmp_path / "m"), "--name", "both"]) == 0
    table = capsys.readouterr().out
    assert "straight-through (identity) | 64 |" in table and "stochastic times smooth | 64 |" in table
    merged = json.loads((tmp_path / "m" / "both.json").read_text())
    assert [r["method"] for r in merged["rows"]] == ["st", "sts"]
    assert merged["merged_from"] == files
    assert all("--methods" in r["command"] for r in merged["rows"])
    assert (tmp_path / "m" / "both_table.md").is_file() and (tmp_path / "m" / "both_curves.png").is_file()

    # A rerun of one row (same method and chunk, another seed here) replaces it in place.
    assert _run(idx_dir, tmp_path / "c", "--quick", "--methods", "st", "--chunk", "64", "--seed", "1") == 0
    capsys.readouterr()
    rerun = str(tmp_path / "c" / "mnist_quick.json")
    assert mnist.main(["--from-json", *files, rerun, "--out", str(tmp_path / "m"), "--name", "rerun"]) == 0
    assert f"st chunk=64: the row from {rerun} replaces the earlier one" in capsys.readouterr().err
    rows = json.loads((tmp_path / "m" / "rerun.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["st", "sts"]
    assert "--seed 1" in rows[0]["command"] and "--seed" not in rows[1]["command"]
    assert rows[0] == json.loads(Path(rerun).read_text())["rows"][0] | {"command": rows[0]["command"]}


def test_lr_final_factor_and_gate_slope_are_checked(capsys):
    assert mnist.main(["--lr-final-factor", "0"]) == 2
    assert "--lr-final-factor must lie in (0, 1]" in capsys.readouterr().err
    assert mnist.main(["--gate-slope", "0"]) == 2
    assert "--gate-slope must be positive, got 0.0" in capsys.readouterr().err


def test_slope_annealing_scales_the_annealed_gaters_scores_per_epoch(monkeypatch):
    """At chunk 1, the straight-through and STS gaters' scores are the gater's output times a
    slope that rises linearly per epoch from 1 to Config.gate_slope (set before each epoch's
    training); REINFORCE, the rectifiers and straight-through at chunk 32 keep slope 1. The
    slope is a buffer, so a saved state keeps the slope of its threshold."""
    net = mnist.ConditionalNet(mnist.METHODS["st"], 1)
    x = torch.rand(5, 784)
    raw = net.gater_out(torch.tanh(net.gater_hidden(x)))
    assert torch.equal(net.scores(x), raw)
    net.slope.fill_(2.5)
    torch.testing.assert_close(net.scores(x), 2.5 * raw, rtol=0, atol=0)
    assert "slope" in net.state_dict()

    xt, yt = torch.rand(64, 784), torch.randint(0, 10, (64,))
    tensors = {"x_train": xt, "y_train": yt, "x_valid": xt[:32], "y_valid": yt[:32], "x_test": xt[:32], "y_test": yt[:32]}
    cfg = mnist.Config(epochs=4, gate_slope=4.0, time_steps=1, time_reps=1, progress=False)
    slopes = []
    orig_step = mnist._Trainer.step

    def step(self, xb, yb, adapt=True):
        slopes.append(float(self.model.slope))
        return orig_step(self, xb, yb, adapt)

    monkeypatch.setattr(mnist._Trainer, "step", step)
    for name, chunk in (("st", 1), ("st", 32), ("st_sigmoid", 1), ("sts", 1), ("reinforce", 1), ("noisy_rectifier", 1)):
        slopes.clear()
        row = mnist.run_method(mnist.METHODS[name], chunk, tensors, cfg, log=lambda *_: None)
        assert row["status"] == "ok" and row["epochs"] == 4
        if chunk == 1 and name in ("st", "st_sigmoid", "sts"):  # 2 training steps per epoch, then timing
            assert slopes[:8] == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]
        else:
            assert set(slopes) == {1.0}
