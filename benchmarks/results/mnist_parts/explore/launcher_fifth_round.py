"""Launcher of the fifth round's exploratory runs (mnist_NOTES.md): runs `stochgate reproduce`
from a private copy of the package in /tmp/sgrun (the commit's Python files and compiled _C)
with one of two patches chosen by environment variables:

  WD=c      after every step, every weight matrix (gater, main path, output) is multiplied by
            1 - c * lr/lr0 (a weight shrink of c per step at the initial learning rate);
  SLOPE=S   the gate pre-activations are the gater's output times a slope rising linearly per
            epoch from 1 to S (what `Config.gate_slope` now does for straight-through).

e.g. SLOPE=3 OMP_NUM_THREADS=1 python launcher_fifth_round.py --methods st --chunk 1 --epochs 30 --seed 1
"""
import os, sys
# drop the editable install's finder so that the private copy is imported
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower() and "skbc" not in repr(f).lower()]
sys.path.insert(0, "/tmp/sgrun")
import stochgate
assert stochgate.__file__.startswith("/tmp/sgrun"), stochgate.__file__
from stochgate.experiments import mnist
C = float(os.environ.get("WD", "0"))          # weight shrink per step at the initial lr
WHICH = os.environ.get("WD_WHICH", "all")     # all | nogater
if C > 0:
    orig_init, orig_step = mnist._Trainer.__init__, mnist._Trainer.step
    def init(self, *a, **k):
        orig_init(self, *a, **k)
        m = self.model
        self._lr0 = [g["lr"] for g in self.opt.param_groups]
        ws = [(0, m.gater_hidden.weight), (0, m.gater_out.weight), (1, m.main.weight), (2, m.out.weight)]
        self._wd = [(i, w) for i, w in ws if WHICH == "all" or i != 0]
    def step(self, *a, **k):
        r = orig_step(self, *a, **k)
        import torch
        with torch.no_grad():
            for i, w in self._wd:
                w.mul_(1 - C * self.opt.param_groups[i]["lr"] / self._lr0[i])
        return r
    mnist._Trainer.__init__, mnist._Trainer.step = init, step
    print(f"[launcher] weight shrink {C} per step ({WHICH})", flush=True)
SLOPE = float(os.environ.get("SLOPE", "1"))
if SLOPE != 1:
    orig_scores = mnist.ConditionalNet.scores
    def scores(self, x):
        return orig_scores(self, x) * getattr(self, "slope", 1.0)
    mnist.ConditionalNet.scores = scores
    orig_run = mnist.run_method
    def run_method(method, chunk, tensors, cfg, log=print, on_epoch=None):
        # slope grows linearly per epoch from 1 to SLOPE; set through the per-epoch hook of the
        # trainer: patch _batches (called once per epoch with the epoch number)
        orig_batches = mnist._batches
        def batches(n, batch, seed, epoch, rank, world):
            for m in _models:
                m.slope = 1 + (SLOPE - 1) * epoch / max(1, cfg.epochs - 1)
            return orig_batches(n, batch, seed, epoch, rank, world)
        mnist._batches = batches
        try:
            return orig_run(method, chunk, tensors, cfg, log, on_epoch)
        finally:
            mnist._batches = orig_batches
    _models = []
    orig_tinit = mnist._Trainer.__init__
    def tinit(self, *a, **k):
        orig_tinit(self, *a, **k)
        _models.append(self.model)
    mnist._Trainer.__init__ = tinit
    mnist.run_method = run_method
    print(f"[launcher] slope annealed 1 -> {SLOPE}", flush=True)
sys.exit(mnist.main(sys.argv[1:]))
