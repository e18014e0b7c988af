"""Diagnosis of a crash seen on the first GPU run (2026-11-27, H100): a pytest-xdist worker
died with a segmentation fault when a CUDA gated op raised its bad-input RuntimeError.
Each case runs in its own process, so one crash does not hide the others; the exit status
says which raise works: 0 = the error was raised and caught, -11 = segmentation fault.

    python benchmarks/gpu_exceptions.py
"""

from __future__ import annotations

import subprocess
import sys

PRELUDE = """
import torch, stochgate
ops = torch.ops.stochgate
def bad(dev):
    x = torch.randn(8, 16, device=dev); w = torch.randn(32, 16, device=dev); b = torch.randn(32, device=dev)
    g = torch.ones(8, 4, device=dev)
    try:
        ops.gated_linear(x, w, b, g[:, :3])
    except RuntimeError as e:
        print("caught:", str(e).splitlines()[0][:100])
    else:
        raise SystemExit("no error raised")
"""

CASES = {
    "torch's own CUDA error": "try:\n    torch.mm(torch.ones(2, 3, device='cuda'), torch.ones(2, 3, device='cuda'))\n"
                              "except RuntimeError as e:\n    print('caught:', str(e)[:80])",
    "stochgate CPU op raises": "bad('cpu')",
    "stochgate CUDA op raises": "bad('cuda')",
    "CUDA op raises after a CUDA op ran": "g = torch.ones(8, 4, device='cuda')\n"
                                          "ops.gated_linear(torch.randn(8, 16, device='cuda'), torch.randn(32, 16, device='cuda'), None, g)\n"
                                          "torch.cuda.synchronize()\nbad('cuda')",
    "CUDA op raises after torch.compile (inductor, CUDA)": "f = torch.compile(lambda x: (x * 2).sin(), fullgraph=True)\n"
                                                           "f(torch.randn(8, device='cuda'))\nbad('cuda')",
    "CUDA op raises via the Python wrapper": "try:\n    stochgate.gated_linear(torch.randn(8, 16, device='cuda'), torch.randn(32, 16, device='cuda'), None, torch.ones(8, 3, device='cuda'))\n"
                                            "except (RuntimeError, ValueError) as e:\n    print('caught:', type(e).__name__, str(e)[:80])",
}


def main() -> int:
    procs = {name: subprocess.Popen([sys.executable, "-X", "faulthandler", "-c", PRELUDE + body],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, body in CASES.items()}
    crashed = []
    for name, p in procs.items():
        out, _ = p.communicate(timeout=240)
        print(f"[{p.returncode:>4}] {name}: {out.strip().splitlines()[-1][:150] if out.strip() else ''}")
        if p.returncode != 0:
            crashed.append(name)
            print("      " + "\n      ".join(out.strip().splitlines()[-25:]))
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
