"""Many-to-many, unsynced (encoder-decoder): translate dates written in words and varied formats to ISO.

"tuesday, march 5, 2021", "5th of march 2021", "05.03.2021", "mar 5 2021" ... -> "2021-03-05". A
bidirectional GRU encoder reads the characters; a dense bridge turns its two final states into the initial
state of a GRU decoder, which writes the ISO date one character at a time: teacher forcing in training,
`rj.decode.greedy` and `rj.decode.beam_search` at test time (Sutskever et al., "Sequence to sequence learning
with neural networks", 2014; Cho et al. 2014). Data is generated; held-out dates are never seen in training.

    python -m examples.seq2seq            # full run: exact match >= 95%
    python -m examples.seq2seq --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
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

MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december"]  # fmt: skip
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
IN_CHARS = ["<pad>", *sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 ,./-"))]
OUT_CHARS = ["<s>", "</s>", *"0123456789-"]
START, END = 0, 1
IN_LEN, OUT_LEN = 32, 11  # the longest written date; "yyyy-mm-dd" and the end token


@dataclasses.dataclass(frozen=True)
class Config:
    hidden_size: int = 128
    embed_size: int = 16
    steps: int = 3000
    batch_size: int = 64
    learning_rate: float = 3e-3
    clip_norm: float = 1.0
    beam_size: int = 3
    test_size: int = 1000
    seed: int = 0
    out_dir: str = "runs/seq2seq"


QUICK = Config(steps=100, hidden_size=32, test_size=200)


def ordinal(n: int) -> str:
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def write(date: datetime.date, style: int) -> str:
    """One date in one of eight written styles."""
    d, m, y, month = date.day, date.month, date.year, MONTHS[date.month - 1]
    return [
        f"{month} {d}, {y}",
        f"{d} {month} {y}",
        f"{month[:3]} {d} {y}",
        f"{DAYS[date.weekday()]}, {month} {d}, {y}",
        f"{ordinal(d)} of {month} {y}",
        f"{d:02d}.{m:02d}.{y}",
        f"{y}/{m}/{d}",
        f"{month} {ordinal(d)} {y}",
    ][style]


def dataset(rng: np.random.Generator, n: int, exclude: set | None = None) -> tuple[np.ndarray, ...]:
    """``(inputs [n, IN_LEN], input lengths [n], targets [n, OUT_LEN], target lengths [n], dates)``."""
    start = datetime.date(1950, 1, 1).toordinal()
    span = datetime.date(2049, 12, 31).toordinal() - start
    inputs = np.zeros((n, IN_LEN), np.int32)
    targets = np.full((n, OUT_LEN), END, np.int32)
    in_len = np.zeros(n, np.int32)
    dates = []
    i = 0
    while i < n:
        date = datetime.date.fromordinal(start + int(rng.integers(0, span + 1)))
        if exclude is not None and date in exclude:
            continue
        text = write(date, int(rng.integers(0, 8)))
        inputs[i, : len(text)] = [IN_CHARS.index(c) for c in text]
        in_len[i] = len(text)
        targets[i, :10] = [OUT_CHARS.index(c) for c in date.isoformat()]
        dates.append(date)
        i += 1
    return inputs, in_len, targets, np.full(n, OUT_LEN, np.int32), dates


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    rng = np.random.default_rng(cfg.seed)
    test = dataset(rng, cfg.test_size)
    held_out = set(test[4])

    H, E = cfg.hidden_size, cfg.embed_size
    encoder = rj.bidirectional(rj.gru(H))
    bridge, decoder, head = rj.dense(H), rj.gru(H), rj.dense(len(OUT_CHARS))
    keys = jax.random.split(jax.random.key(cfg.seed), 6)
    params = {
        "in_embed": 0.1 * jax.random.normal(keys[0], (len(IN_CHARS), E)),
        "encoder": encoder.init(keys[1], E),
        "bridge": bridge.init(keys[2], 2 * H),
        "out_embed": 0.1 * jax.random.normal(keys[3], (len(OUT_CHARS), E)),
        "decoder": decoder.init(keys[4], E),
        "head": head.init(keys[5], H),
    }
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.learning_rate))
    opt_state = optimizer.init(params)

    def encode(params: Any, inputs: jax.Array, in_len: jax.Array) -> rj.HCarry:
        carry, _ = encoder.apply(params["encoder"], rj.embed(params["in_embed"], inputs), lengths=in_len)
        both = jnp.concatenate(
            [carry.fw.h, carry.bw.h], axis=-1
        )  # the end of the forward pass, the start of the reverse
        return rj.HCarry(jnp.tanh(bridge.apply(params["bridge"], both)))

    def loss_fn(
        params: Any, inputs: jax.Array, in_len: jax.Array, targets: jax.Array, out_len: jax.Array
    ) -> jax.Array:
        dec_in = rj.embed(params["out_embed"], rj.seq2seq.shift_right(targets, START))  # teacher forcing
        _, hs = rj.unroll(decoder, params["decoder"], dec_in, encode(params, inputs, in_len), lengths=out_len)
        return rj.losses.sequence_cross_entropy(head.apply(params["head"], hs), targets, out_len)

    @jax.jit
    def train_step(params: Any, opt_state: Any, batch: tuple) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def translate(params: Any, inputs: jax.Array, in_len: jax.Array) -> tuple[jax.Array, jax.Array]:
        step = rj.seq2seq.decoder_step(decoder, params["decoder"], params["out_embed"], params["head"])
        start = jnp.full((inputs.shape[0],), START, jnp.int32)
        state = encode(params, inputs, in_len)
        greedy = rj.decode.greedy(step, state, start, OUT_LEN, end_token=END)
        beams = rj.decode.beam_search(step, state, start, OUT_LEN, beam_size=cfg.beam_size, end_token=END)
        return greedy.tokens, beams.tokens[:, 0]

    losses = []
    for _ in tqdm(range(cfg.steps), desc="seq2seq", disable=args.no_progress, leave=False):
        inputs, in_len, targets, out_len, _ = dataset(rng, cfg.batch_size, exclude=held_out)
        params, opt_state, loss = train_step(params, opt_state, (inputs, in_len, targets, out_len))
        losses.append(float(loss))

    def text(tokens: np.ndarray) -> str:
        out = []
        for t in tokens:
            if t == END:
                break
            out.append(OUT_CHARS[t] if t > END else "?")
        return "".join(out)

    greedy, beam = (np.asarray(t) for t in translate(params, test[0], test[1]))
    truth = [d.isoformat() for d in test[4]]
    results = {"losses": losses}
    for name, tokens in (("greedy", greedy), ("beam", beam)):
        results[f"{name}_exact_match"] = float(
            np.mean([text(t) == s for t, s in zip(tokens, truth, strict=True)])
        )
    print(
        f"\nheld-out exact match: greedy {results['greedy_exact_match']:.3f}, "
        f"beam (K={cfg.beam_size}) {results['beam_exact_match']:.3f}   ({cfg.steps} steps)"
    )
    for i in range(5):
        written = "".join(IN_CHARS[c] for c in test[0][i, : test[1][i]])
        print(f"  {written!r:<36} -> {text(greedy[i])}   ({truth[i]})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses)
    ax.set(xlabel="training step", ylabel="cross-entropy per output character", yscale="log",
           title=f"dates -> ISO (held-out exact match {results['greedy_exact_match']:.3f})")  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, "seq2seq.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")
    return results


if __name__ == "__main__":
    main()
