"""`stochgate bench`: argument errors, a tiny end-to-end run, and its helpers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from stochgate import bench


def _run(*args):
    return subprocess.run([sys.executable, "-m", "stochgate.cli", "bench", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--op", "conv"], "invalid choice: 'conv'"),
        (["--density", "0"], "densities must lie in (0, 1]"),
        (["--density", "1.5"], "densities must lie in (0, 1]"),
        (["--chunk", "48", "--out-features", "100"], "--chunk 48 does not divide the 100 gated features"),
        (["--batch", "0"], "--batch must be positive"),
    ]
    + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU is available")]),
)
def test_bad_arguments_exit_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_bad_arguments_from_the_console_command():
    out = _run("--op", "conv")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stochgate bench: error: argument --op: invalid choice: 'conv'")


@pytest.mark.parametrize("op", ["gated_linear", "gated_input_linear", "block"])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_tiny_run_writes_json_and_plot(tmp_path, op, mode, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    code = bench.main(["--batch", "48", "--in-features", "40", "--out-features", "64", "--chunk", "16", "1",
                       "--density", "0.25", "1", "--repeats", "1", "--op", op, "--mode", mode,
                       "--estimator-size", "64", "--json", str(js), "--plot", str(png)])
    assert code == 0
    assert "break-even density" in capsys.readouterr().out
    result = json.loads(js.read_text())
    rows = result["matmul"]
    assert {r["method"] for r in rows} >= {"stochgate", "dense", "gather", "sparse"}
    ours = [r for r in rows if r["method"] == "stochgate"]
    assert len(ours) == 4 and all(r["median_s"] > 0 and len(r["samples_s"]) == 1 for r in ours)
    # every alternative that ran computed stochgate's result (else it carries an error)
    assert all(r["median_s"] or r.get("error") for r in rows)
    assert result["machine"]["torch"] == torch.__version__
    assert {r["estimator"] for r in result["train_step"]} == {"reinforce", "st", "sts", "noisy_rectifier"}
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("name", ["gated_linear", "gated_input_linear"])
def test_alternatives_compute_the_same_result(name):
    inputs, _ = bench.make_inputs(name, 33, 24, 48, 8, 0.3, torch.float64, "cpu")
    ref = bench.METHODS[name]["stochgate"](*inputs)
    for method in ("dense", "gather", "sparse"):
        torch.testing.assert_close(bench.METHODS[name][method](*inputs), ref)
    no_bias = (inputs[0], inputs[1], None, inputs[3])
    ref = bench.METHODS[name]["stochgate"](*no_bias)
    for method in ("dense", "gather", "sparse"):
        torch.testing.assert_close(bench.METHODS[name][method](*no_bias), ref)


def test_break_even_interpolates():
    rows = [{"chunk": 8, "method": "stochgate", "density": d, "speedup_vs_dense": s}
            for d, s in [(0.1, 5.0), (0.5, 1.25), (1.0, 0.8)]]
    # 1/speedup: 0.8 at d=0.5, 1.25 at d=1.0 -> crosses 1 at d = 0.5 + 0.2/0.45*0.5
    assert bench.break_even(rows, 8) == f"{0.5 + 0.2 / 0.45 * 0.5:.2f}"
    assert "never slower" in bench.break_even([dict(r, speedup_vs_dense=2.0) for r in rows], 8)
    assert "slower than dense at every" in bench.break_even([dict(r, speedup_vs_dense=0.5) for r in rows], 8)
