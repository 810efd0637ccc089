"""Draws the site's figures into docs/figures/: ``python -m docs.figures`` from the repository root.

The figures are committed; CI does not redraw them. The benchmark plots are drawn from the recorded JSON in
``benchmarks/results/`` by the benchmark scripts' own plot functions (the character-LM runs' training
curves by `training_curves`); the gradient-norm plot computes
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
from benchmarks import parallel_time, rnn_step, scaling, scaling_devices

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


def training_curves(record: dict, path: pathlib.Path) -> None:
    """Validation bits per character against wall-clock time, one curve per recorded character-LM run."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, run in record["runs"].items():
        ax.plot(run["val_time"], run["val_bits"], marker="o", label=name)
    ax.set_xlabel("wall-clock time (s)")
    ax.set_ylabel("validation bits/char")
    ax.set_title(f"examples.char_lm on {record['machine']}", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    def record(name: str) -> dict:
        return json.loads((RESULTS / name).read_text())

    rnn_step.plot(record("rnn_step_cpu.json"), str(HERE / "rnn_step_cpu.png"))
    scaling.plot(record("scaling_cpu.json"), str(HERE / "scaling_cpu.png"))
    parallel_time.plot(record("parallel_time_cpu.json"), str(HERE / "parallel_time_cpu.png"))
    scaling_devices.plot(record("scaling_devices_cpu.json"), str(HERE / "scaling_devices_cpu.png"))
    training_curves(record("char_lm_regularizers_cpu.json"), HERE / "char_lm_regularizers.png")
    grad_norms(HERE / "grad_norms.png")
    for png in sorted(HERE.glob("*.png")):
        print(f"{png}: {png.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
