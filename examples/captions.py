"""One-to-many: caption an 8×8 digit image with its spelled-out name ("seven").

The image's pixels go through a dense layer into the decoder's initial hidden state (as in image-captioning
models: Vinyals et al., "Show and tell", CVPR 2015, §3); the decoder, a GRU over character embeddings, is
trained with teacher forcing and generates the caption one character at a time with `rj.decode.greedy` or
`rj.decode.beam_search`, stopping at an end token. Measured: exact-match accuracy of the whole caption on
held-out images.

    python -m examples.captions            # full run: exact match >= 90%
    python -m examples.captions --quick    # a smoke run
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

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
START, END = 0, 1
CHARS = sorted(set("".join(NAMES)))
VOCAB = ["<s>", "</s>", *CHARS]
MAX_LEN = max(map(len, NAMES)) + 1  # the longest name and its end token


@dataclasses.dataclass(frozen=True)
class Config:
    hidden_size: int = 64
    embed_size: int = 16
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3
    clip_norm: float = 1.0
    beam_size: int = 3
    seed: int = 0
    out_dir: str = "runs/captions"


QUICK = Config(steps=120, hidden_size=32)


def encode(name: str) -> list[int]:
    return [VOCAB.index(c) for c in name] + [END]


def decode_tokens(tokens: np.ndarray) -> str:
    out = []
    for t in tokens:
        if t == END:
            break
        out.append(VOCAB[t] if t > END else "?")
    return "".join(out)


def load_data(cfg: Config) -> tuple:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.data / 16.0).astype(np.float32)  # [N, 64]
    captions = np.full((len(images), MAX_LEN), END, np.int32)
    lengths = np.zeros(len(images), np.int32)
    for i, y in enumerate(digits.target):
        tokens = encode(NAMES[y])
        captions[i, : len(tokens)] = tokens
        lengths[i] = len(tokens)
    return train_test_split(
        images,
        captions,
        lengths,
        digits.target,
        test_size=0.25,
        random_state=cfg.seed,
        stratify=digits.target,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    x_tr, x_te, c_tr, c_te, l_tr, l_te, _, y_te = load_data(cfg)

    cell, bridge, head = rj.gru(cfg.hidden_size), rj.dense(cfg.hidden_size), rj.dense(len(VOCAB))
    keys = jax.random.split(jax.random.key(cfg.seed), 5)
    params = {
        "bridge": bridge.init(keys[0], 64),
        "embed": 0.1 * jax.random.normal(keys[1], (len(VOCAB), cfg.embed_size)),
        "cell": cell.init(keys[2], cfg.embed_size),
        "head": head.init(keys[3], cfg.hidden_size),
    }
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.learning_rate))
    opt_state = optimizer.init(params)

    def initial_state(params: Any, images: jax.Array) -> rj.HCarry:
        return rj.HCarry(jnp.tanh(bridge.apply(params["bridge"], images)))  # one input, the initial state

    def loss_fn(params: Any, images: jax.Array, captions: jax.Array, lengths: jax.Array) -> jax.Array:
        inputs = rj.embed(params["embed"], rj.seq2seq.shift_right(captions, START))  # teacher forcing
        _, hs = rj.unroll(cell, params["cell"], inputs, initial_state(params, images), lengths=lengths)
        return rj.losses.sequence_cross_entropy(head.apply(params["head"], hs), captions, lengths)

    @jax.jit
    def train_step(params: Any, opt_state: Any, batch: tuple) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def generate(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        step = rj.seq2seq.decoder_step(cell, params["cell"], params["embed"], params["head"])
        start = jnp.full((images.shape[0],), START, jnp.int32)
        state = initial_state(params, images)
        greedy = rj.decode.greedy(step, state, start, MAX_LEN, end_token=END)
        beams = rj.decode.beam_search(step, state, start, MAX_LEN, beam_size=cfg.beam_size, end_token=END)
        return greedy.tokens, beams.tokens[:, 0]

    rng = np.random.default_rng(cfg.seed)
    losses = []
    for _ in tqdm(range(cfg.steps), desc="captions", disable=args.no_progress, leave=False):
        idx = rng.integers(0, len(x_tr), cfg.batch_size)
        params, opt_state, loss = train_step(params, opt_state, (x_tr[idx], c_tr[idx], l_tr[idx]))
        losses.append(float(loss))

    greedy, beam = (np.asarray(t) for t in generate(params, x_te))
    results = {"losses": losses, "test_loss": float(jax.jit(loss_fn)(params, x_te, c_te, l_te))}
    for name, tokens in (("greedy", greedy), ("beam", beam)):
        texts = [decode_tokens(t) for t in tokens]
        results[f"{name}_exact_match"] = float(
            np.mean([t == NAMES[y] for t, y in zip(texts, y_te, strict=True)])
        )
        results[f"{name}_examples"] = texts[:8]
    print(
        f"\nheld-out exact match: greedy {results['greedy_exact_match']:.3f}, "
        f"beam (K={cfg.beam_size}) {results['beam_exact_match']:.3f}   ({cfg.steps} steps)"
    )
    print(
        "examples:",
        ", ".join(f"{NAMES[y]} -> {t}" for y, t in zip(y_te[:8], results["greedy_examples"], strict=True)),
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 8, figsize=(12, 2))
    for ax, img, text in zip(axes, x_te[:8], results["greedy_examples"], strict=True):
        ax.imshow(img.reshape(8, 8), cmap="gray_r")
        ax.set_title(text)
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, "captions.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")
    return results


if __name__ == "__main__":
    main()
