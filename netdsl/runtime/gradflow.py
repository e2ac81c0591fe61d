"""`netdsl run --grad-flow`: how the gradient travels back through time.

For every recurrent state (a scan's carry), the norm of the gradient that reaches the
state leaving step t from the steps after it, |dL/dh_t|, averaged over an epoch's
batches. Backpropagation from h_t to h_{t-1} multiplies by W_hh^T (times the
nonlinearity's slope): over many steps the norm shrinks geometrically (vanishing) or
grows (exploding) in a vanilla RNN, while an LSTM's cell path, elementwise only, keeps
it (the notes' gradient-flow argument). Written to grad_flow.json (one record per
epoch) and drawn in grad_flow.png (log scale, first and last epoch).
"""
from __future__ import annotations

import json
import os

import numpy as np

from .checkpoint import atomic_write


class GradFlow:
    def __init__(self, out_dir: str):
        self.json = os.path.join(out_dir, "grad_flow.json")
        self.png = os.path.join(out_dir, "grad_flow.png")
        self.epochs: list[dict] = []
        self._sum: dict[str, np.ndarray] = {}
        self._count = 0

    def add(self, flow: dict) -> None:
        """One training step's norms (carry path -> list over t)."""
        for name, norms in flow.items():
            a = np.asarray(norms, np.float64)
            s = self._sum.get(name)
            self._sum[name] = a if s is None or s.shape != a.shape else s + a
        self._count += 1

    def end_epoch(self, epoch: int) -> None:
        if not self._count:
            return
        self.epochs.append({"epoch": epoch, "norms": {k: (v / self._count).tolist() for k, v in self._sum.items()}})
        self._sum, self._count = {}, 0
        atomic_write(self.json, lambda f: f.write(json.dumps({"epochs": self.epochs}).encode()))
        self.plot()

    def plot(self) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        shown = [self.epochs[0], self.epochs[-1]] if len(self.epochs) > 1 else self.epochs
        for rec, style in zip(shown, ("--", "-")):
            for name, norms in sorted(rec["norms"].items()):
                ys = np.maximum(np.asarray(norms), 1e-30)
                ax.plot(range(len(ys)), ys, style, label=f"{name} (epoch {rec['epoch']})")
        ax.set_yscale("log")
        ax.set_xlabel("time step t")
        ax.set_ylabel("|dL/dh_t| from the steps after t")
        ax.legend(fontsize=7)
        fig.tight_layout()
        atomic_write(self.png, lambda f: fig.savefig(f, format="png", dpi=100))
        plt.close(fig)
