"""Synced many-to-many: label every frame of a signal whose labels depend on the future.

A sequence is a run of segments of random length. Every frame is noise, except that the first frame of a
segment carries a boundary marker and its *last* frame carries the segment's class (+1 or −1). Each frame's
label is its segment's class, so a frame can only be labelled by looking ahead to the end of its segment:
a unidirectional RNN must guess until then, a bidirectional one reads the future (Schuster and Paliwal,
"Bidirectional recurrent neural networks", 1997; Graves and Schmidhuber, "Framewise phoneme classification
with bidirectional LSTM", 2005). Sequences have varied lengths; padding is masked in the RNN and the loss.

    python -m examples.frame_labels            # bidirectional beats unidirectional, measured
    python -m examples.frame_labels --quick    # a smoke run
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
    max_length: int = 60
    min_length: int = 30
    segment: tuple[int, int] = (3, 10)
    hidden_size: int = 32
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 5e-3
    clip_norm: float = 1.0
    noise: float = 0.3
    eval_size: int = 500
    seed: int = 0
    out_dir: str = "runs/frame_labels"


QUICK = Config(steps=60, hidden_size=16, eval_size=128)


def make_batch(rng: np.random.Generator, cfg: Config, B: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``xs [B, T, 3]`` (boundary, class marker, noise), ``labels [B, T]`` in {0, 1}, ``lengths [B]``."""
    T = cfg.max_length
    xs = np.zeros((B, T, 3), np.float32)
    labels = np.zeros((B, T), np.int32)
    lengths = rng.integers(cfg.min_length, T + 1, size=B).astype(np.int32)
    xs[..., 2] = cfg.noise * rng.standard_normal((B, T))
    for b in range(B):
        t = 0
        while t < lengths[b]:
            end = min(t + int(rng.integers(cfg.segment[0], cfg.segment[1] + 1)), int(lengths[b]))
            cls = int(rng.integers(0, 2))
            xs[b, t, 0] = 1.0
            xs[b, end - 1, 1] = 1.0 if cls else -1.0
            labels[b, t:end] = cls
            t = end
    xs[np.arange(T)[None, :] >= lengths[:, None]] = 0.0
    return xs, labels, lengths


def train(bidirectional: bool, cfg: Config, progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    H = cfg.hidden_size
    # the same number of hidden units either way: two directions of H, or one of 2H
    layer = rj.bidirectional(rj.gru(H)) if bidirectional else rj.rnn(rj.gru(2 * H))
    head = rj.dense(2)
    k_layer, k_head = jax.random.split(jax.random.key(cfg.seed))
    params = {"rnn": layer.init(k_layer, 3), "head": head.init(k_head, layer.output_size)}
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.learning_rate))
    opt_state = optimizer.init(params)

    def logits_fn(params: Any, xs: jax.Array, lengths: jax.Array) -> jax.Array:
        _, ys = layer.apply(params["rnn"], xs, lengths=lengths)
        return head.apply(params["head"], ys)  # a label per frame

    def loss_fn(params: Any, xs: jax.Array, labels: jax.Array, lengths: jax.Array) -> jax.Array:
        return rj.losses.sequence_cross_entropy(logits_fn(params, xs, lengths), labels, lengths)

    @jax.jit
    def train_step(
        params: Any, opt_state: Any, xs: jax.Array, labels: jax.Array, lengths: jax.Array
    ) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(params, xs, labels, lengths)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def frame_accuracy(params: Any, xs: jax.Array, labels: jax.Array, lengths: jax.Array) -> jax.Array:
        correct = jnp.argmax(logits_fn(params, xs, lengths), -1) == labels
        valid = rj.losses.valid_mask(lengths, *labels.shape)
        return jnp.sum(correct & valid) / jnp.sum(valid)

    rng = np.random.default_rng(cfg.seed)
    eval_batch = make_batch(np.random.default_rng(cfg.seed + 1), cfg, cfg.eval_size)
    losses = []
    name = "bidirectional" if bidirectional else "unidirectional"
    for _ in tqdm(range(cfg.steps), desc=name, disable=not progress, leave=False):
        params, opt_state, loss = train_step(params, opt_state, *make_batch(rng, cfg, cfg.batch_size))
        losses.append(float(loss))
    return {"losses": losses, "accuracy": float(frame_accuracy(params, *eval_batch))}


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    results = {
        "unidirectional": train(False, cfg, not args.no_progress),
        "bidirectional": train(True, cfg, not args.no_progress),
    }
    print(f"\n{'model':<15} {'frame accuracy':>14}   (held-out, {cfg.steps} training steps)")
    for name, r in results.items():
        print(f"{name:<15} {r['accuracy']:>14.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.plot(r["losses"], label=f"{name} (frame accuracy {r['accuracy']:.3f})")
    ax.set(
        xlabel="training step", ylabel="cross-entropy per valid frame", yscale="log", title="frame labelling"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, "frame_labels.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")
    return results


if __name__ == "__main__":
    main()
