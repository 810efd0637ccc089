"""Draws the site's figures into docs/figures/: ``python -m docs.figures`` from the repository root.

The figures are committed; CI does not redraw them. The benchmark plots are drawn from the recorded JSON in
``benchmarks/results/`` by the benchmark scripts' own plot functions; the gradient-norm plot computes
‖∂L/∂h_t‖ with `rnnjax.diagnostics` (a few seconds on a CPU). Needs matplotlib (the ``plot`` extra).
"""

from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt

import rnnjax as rj
from benchmarks import rnn_step, scaling

HERE = pathlib.Path(__file__).parent
RESULTS = HERE.parents[1] / "benchmarks" / "results"


def grad_norms(path: pathlib.Path, T: int = 50, H: int = 32) -> None:
    """‖∂L/∂h_t‖ over T steps for a loss on the last output, tanh Elman against LSTMs, at initialisation."""
    B, I = 16, 8
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    curves = {}
    for label, cell in (
        ("elman (tanh)", rj.elman(H)),
        ("gru", rj.gru(H)),
        ("lstm", rj.lstm(H)),
        ("lstm, forget_bias=1", rj.lstm(H, forget_bias=1.0)),
    ):
        params = cell.init(jax.random.key(0), I, jnp.float32)

        def loss(params, probe, cell=cell):
            _, hs = rj.unroll(cell, params, xs, probe=probe)
            return jnp.sum(hs[:, -1] ** 2)

        _, d_hs = jax.grad(loss, argnums=(0, 1))(params, jnp.zeros((B, T, H), jnp.float32))
        curves[label] = rj.diagnostics.hidden_grad_norms(d_hs)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    rj.diagnostics.plot(curves, ax)
    ax.set_title(f"‖∂L/∂h_t‖ for a loss on step {T - 1}, at initialisation (B={B}, I={I}, H={H})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    rnn_step.plot(json.loads((RESULTS / "rnn_step_cpu.json").read_text()), str(HERE / "rnn_step_cpu.png"))
    scaling.plot(json.loads((RESULTS / "scaling_cpu.json").read_text()), str(HERE / "scaling_cpu.png"))
    grad_norms(HERE / "grad_norms.png")
    for png in sorted(HERE.glob("*.png")):
        print(f"{png}: {png.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
