"""Many-to-one: classify scikit-learn's bundled 8×8 digits, read row by row as sequences of 8 steps.

Each image is a sequence of T=8 rows of I=8 pixels; the RNN reads it and its final hidden state goes to a
dense read-out over the 10 classes (the seeds' o = softmax(V s_T)). Elman, GRU and LSTM are trained the same
way (optax Adam with global-norm clipping, everything jitted, the hand-derived BPTT underneath) and
compared on a held-out test split.

    python -m examples.digits            # full run: LSTM and GRU reach >= 95% test accuracy
    python -m examples.digits --quick    # a smoke run in seconds

Data parallelism: ``--data-parallel`` splits every batch over all devices, through JAX's own sharding (a
`jax.make_mesh` of the devices, `jax.set_mesh`, the batch placed as ``P("data")`` and the parameters and
optimizer state replicated). The training step is the same function: each device runs its rows, and JAX
sums the gradients across the devices. On a CPU, ask for host devices before JAX starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m examples.digits --data-parallel
"""

from __future__ import annotations

import argparse
import contextlib
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
from jax.sharding import PartitionSpec as P

import rnnjax as rj


@dataclasses.dataclass(frozen=True)
class Config:
    cells: tuple[str, ...] = ("elman", "gru", "lstm")
    hidden_size: int = 64
    epochs: int = 40
    batch_size: int = 64
    learning_rate: float = 3e-3
    clip_norm: float = 1.0
    test_fraction: float = 0.25
    seed: int = 0
    out_dir: str = "runs/digits"


QUICK = Config(epochs=3, hidden_size=32)


def load_data(cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images as ``[N, T=8, I=8]`` float32 in [0, 1] and labels, split into train and test (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    xs = (digits.images / 16.0).astype(np.float32)
    return train_test_split(
        xs, digits.target, test_size=cfg.test_fraction, random_state=cfg.seed, stratify=digits.target
    )


def make_cell(name: str, hidden_size: int) -> rj.Cell:
    return {"elman": lambda H: rj.elman(H, "tanh"), "gru": rj.gru, "lstm": rj.lstm}[name](hidden_size)


def train_one(
    name: str, cfg: Config, data: tuple, progress: bool = True, mesh: jax.sharding.Mesh | None = None
) -> dict[str, Any]:
    """Trains one cell. With a ``mesh`` (one axis, "data"), under it: every batch is split over its devices
    and everything else is replicated."""
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return _train(name, cfg, data, progress, mesh)


def _train(name: str, cfg: Config, data: tuple, progress: bool, mesh: jax.sharding.Mesh | None) -> dict:
    from tqdm.auto import tqdm

    x_train, x_test, y_train, y_test = data
    batch = jnp.asarray if mesh is None else (lambda a: jax.device_put(a, P("data")))
    cell, head = make_cell(name, cfg.hidden_size), rj.dense(10)
    k_cell, k_head, k_shuffle = jax.random.split(jax.random.key(cfg.seed), 3)
    params = {"cell": cell.init(k_cell, 8), "head": head.init(k_head, cfg.hidden_size)}
    if mesh is not None:
        params = jax.device_put(params, P())  # replicated; the optimizer state follows
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.learning_rate))
    opt_state = optimizer.init(params)

    def logits_fn(params: Any, xs: jax.Array) -> jax.Array:
        carry, _ = rj.unroll(cell, params["cell"], xs)  # many-to-one: only the final state is read out
        return head.apply(params["head"], carry.h)

    def loss_fn(params: Any, xs: jax.Array, ys: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, xs), ys).mean()

    @jax.jit
    def train_step(params: Any, opt_state: Any, xs: jax.Array, ys: jax.Array) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(params, xs, ys)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def accuracy(params: Any, xs: jax.Array, ys: jax.Array) -> jax.Array:
        return jnp.mean(jnp.argmax(logits_fn(params, xs), -1) == ys)

    n = len(x_train)
    steps_per_epoch = n // cfg.batch_size
    history = {
        "loss": [],
        "test_accuracy": [],
        # the rows of a batch that each device holds: batch_size / devices when the batch is split
        "rows_per_device": batch(x_train[: cfg.batch_size]).addressable_shards[0].data.shape[0],
    }
    bar = tqdm(range(cfg.epochs), desc=f"{name:>5}", disable=not progress, leave=False)
    for epoch in bar:
        order = np.asarray(jax.random.permutation(jax.random.fold_in(k_shuffle, epoch), n))
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xs, ys = batch(x_train[idx]), batch(y_train[idx])
            params, opt_state, loss = train_step(params, opt_state, xs, ys)
            losses.append(float(loss))
        history["loss"].append(float(np.mean(losses)))
        history["test_accuracy"].append(float(accuracy(params, x_test, y_test)))
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", test_acc=f"{history['test_accuracy'][-1]:.3f}")
    return history


def plot(histories: dict[str, dict[str, list[float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, h in histories.items():
        epochs = range(1, len(h["loss"]) + 1)
        ax_loss.plot(epochs, h["loss"], label=name)
        ax_acc.plot(epochs, h["test_accuracy"], label=name)
    ax_loss.set(xlabel="epoch", ylabel="training cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="8×8 digits, read row by row")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few epochs, smaller model")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--cells", nargs="+", choices=Config.cells, help="train only these cells")
    parser.add_argument(
        "--data-parallel", action="store_true", help="split every batch over all devices (a device mesh)"
    )
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.cells:
        cfg = dataclasses.replace(cfg, cells=tuple(args.cells))
    data = load_data(cfg)
    mesh = jax.make_mesh((jax.device_count(),), ("data",)) if args.data_parallel else None
    if mesh is not None and cfg.batch_size % mesh.size:
        raise ValueError(f"--data-parallel: batch_size {cfg.batch_size} must divide over {mesh.size} devices")
    histories = {name: train_one(name, cfg, data, not args.no_progress, mesh) for name in cfg.cells}
    run = f"{cfg.epochs} epochs, H={cfg.hidden_size}"
    if mesh is not None:
        run += f", each batch split over {mesh.size} {jax.devices()[0].platform} devices"
    print(f"\n{'cell':<6} {'final loss':>10} {'test accuracy':>14}   ({run})")
    for name, h in histories.items():
        print(f"{name:<6} {h['loss'][-1]:>10.4f} {h['test_accuracy'][-1]:>14.3f}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, "digits.png")
    plot(histories, path)
    print(f"plot: {path}")
    return histories


if __name__ == "__main__":
    main()
    sys.exit(0)
