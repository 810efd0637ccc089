"""The adding problem: why BPTT through a tanh Elman net fails on long lags, and LSTM/GRU do not.

Each input step is a pair (u_t, m_t): a random number u_t ~ U[0, 1] and a marker m_t that is 1 at exactly two
steps (one in each half of the sequence). The target is the sum of the two marked numbers (Hochreiter and
Schmidhuber, "Long short-term memory", Neural Computation 1997, §5.4). Predicting the mean (1.0) scores
MSE ≈ 0.167; solving it needs the gradient to carry information across ~T/2 steps.

For each cell and T the example trains a many-to-one model and measures ‖∂L/∂h_t‖ for every t at every
training step, from the same backward pass that computes the weights' gradient (`rj.unroll`'s zero
``probe``, see `rj.diagnostics`). The plot shows the Elman net's gradient decaying geometrically with the
distance from the output, and the gated cells' not.

    python -m examples.adding_problem            # T = 50, 100, 200 for Elman, LSTM and GRU (several minutes)
    python -m examples.adding_problem --quick    # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

if not __package__:  # run as a file (python examples/x.py): import rnnjax and examples from this clone
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rnnjax as rj


@dataclasses.dataclass(frozen=True)
class Config:
    lengths: tuple[int, ...] = (50, 100, 200)
    cells: tuple[str, ...] = ("elman", "lstm", "gru")
    hidden_size: int = 64
    # training steps per length: at T=200 the LSTM sits on the mean predictor's plateau for ~4000 steps
    steps: tuple[int, ...] = (3000, 3000, 6000)
    batch_size: int = 64
    learning_rate: float = 2e-3
    clip_norm: float = 1.0
    eval_size: int = 1000
    seed: int = 0
    out_dir: str = "runs/adding_problem"


QUICK = Config(lengths=(20,), steps=(150,), hidden_size=16, eval_size=256)


def batch(key: jax.Array, B: int, T: int) -> tuple[jax.Array, jax.Array]:
    """``xs [B, T, 2]`` (number, marker) and ``targets [B]``: the sum of the two marked numbers."""
    k_u, k_a, k_b = jax.random.split(key, 3)
    u = jax.random.uniform(k_u, (B, T))
    first = jax.random.randint(k_a, (B,), 0, T // 2)
    second = jax.random.randint(k_b, (B,), T // 2, T)
    t = jnp.arange(T)[None, :]
    marks = ((t == first[:, None]) | (t == second[:, None])).astype(u.dtype)
    return jnp.stack([u, marks], axis=-1), jnp.sum(u * marks, axis=1)


def make_cell(name: str, H: int) -> rj.Cell:
    return {
        "elman": lambda H: rj.elman(H, "tanh"),
        "lstm": lambda H: rj.lstm(H, forget_bias=1.0),
        "gru": rj.gru,
    }[name](H)


def run(name: str, T: int, cfg: Config, progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    cell, head = make_cell(name, cfg.hidden_size), rj.dense(1)
    key = jax.random.key(cfg.seed)
    k_cell, k_head, k_data, k_eval = jax.random.split(key, 4)
    params = {"cell": cell.init(k_cell, 2), "head": head.init(k_head, cfg.hidden_size)}
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.learning_rate))
    opt_state = optimizer.init(params)

    def predict(params: Any, xs: jax.Array, probe: jax.Array | None = None) -> jax.Array:
        carry, _ = rj.unroll(cell, params["cell"], xs, probe=probe)
        return head.apply(params["head"], carry.h)[:, 0]

    def loss_fn(params: Any, xs: jax.Array, targets: jax.Array, probe: jax.Array | None = None) -> jax.Array:
        return jnp.mean((predict(params, xs, probe) - targets) ** 2)

    @jax.jit
    def train_step(params: Any, opt_state: Any, key: jax.Array) -> tuple:
        xs, targets = batch(key, cfg.batch_size, T)
        # the zero probe's gradient is ∂L/∂h_t, handed out by the same backward pass as the weights'
        probe = jnp.zeros((cfg.batch_size, T, cfg.hidden_size), xs.dtype)
        loss, (grads, d_hs) = jax.value_and_grad(loss_fn, argnums=(0, 3))(params, xs, targets, probe)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, rj.diagnostics.hidden_grad_norms(d_hs)

    losses = []
    steps = cfg.steps[cfg.lengths.index(T)]
    bar = tqdm(range(steps), desc=f"{name:>5} T={T}", disable=not progress, leave=False)
    for i in bar:
        params, opt_state, loss, grad_norms = train_step(params, opt_state, jax.random.fold_in(k_data, i))
        losses.append(float(loss))
        if i == 0:
            first_norms = grad_norms
        if i % 50 == 0:
            bar.set_postfix(mse=f"{np.mean(losses[-50:]):.4f}")
    xs, targets = batch(k_eval, cfg.eval_size, T)
    test_mse = float(jax.jit(loss_fn)(params, xs, targets))
    return {
        "losses": losses,
        "test_mse": test_mse,
        "grad_norms_first": np.asarray(first_norms).tolist(),  # at the first training step
        "grad_norms": np.asarray(grad_norms).tolist(),  # at the last
    }


def plot(results: dict[tuple[str, int], dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({T for _, T in results})
    fig, axes = plt.subplots(2, len(lengths), figsize=(4.5 * len(lengths), 7), squeeze=False)
    for j, T in enumerate(lengths):
        for (name, t_len), r in results.items():
            if t_len != T:
                continue
            smooth = (
                np.convolve(r["losses"], np.ones(50) / 50, mode="valid")
                if len(r["losses"]) > 50
                else r["losses"]
            )
            axes[0, j].plot(smooth, label=f"{name} (test MSE {r['test_mse']:.3f})")
            (line,) = axes[1, j].plot(range(T), np.maximum(r["grad_norms"], 1e-30), label=name)
            axes[1, j].plot(range(T), np.maximum(r["grad_norms_first"], 1e-30), ":", color=line.get_color())
        axes[0, j].axhline(1 / 6, color="grey", ls="--", label="predict the mean (1/6)")
        axes[0, j].set(title=f"T = {T}", xlabel="training step", ylabel="training MSE", yscale="log")
        axes[1, j].set(
            xlabel="t",
            ylabel="mean ‖∂L/∂h_t‖",
            yscale="log",
            title="‖∂L/∂h_t‖: last step (solid), first (dotted)",
        )
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[tuple[str, int], dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    results = {(n, T): run(n, T, cfg, progress=not args.no_progress) for T in cfg.lengths for n in cfg.cells}
    print(f"\n{'cell':<6} {'T':>4} {'test MSE':>9} {'‖dL/dh_0‖ / ‖dL/dh_T-1‖':>24}   (mean predictor: 0.167)")
    for (name, T), r in results.items():
        g = r["grad_norms"]
        print(f"{name:<6} {T:>4} {r['test_mse']:>9.4f} {g[0] / max(g[-1], 1e-30):>24.2e}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, "adding_problem.png")
    plot(results, path)
    print(f"plot: {path}")
    return results


if __name__ == "__main__":
    main()
