"""Deep bidirectional LSTM + CTC, as in end-to-end speech recognition, on generated tone "utterances".

An utterance is a sequence of symbols, each spoken as a tone of its own pitch lasting a random number of
frames, with random pauses between symbols, background noise, random loudness and a small random detuning.
The waveform goes through a short-time Fourier transform into log-magnitude frames (the front end of a speech
recogniser). A stack of bidirectional LSTMs reads the frames and a dense layer scores the symbols plus a
blank at every frame; the CTC loss (`rj.losses.ctc`) sums over every alignment of the transcription to the
frames, so training needs no frame labels (Graves et al., "Speech recognition with deep recurrent neural
networks", ICASSP 2013). Transcriptions are read off by best-path decoding (argmax per frame, merge repeats,
drop blanks); the score is the label error rate: edit distance over reference length, on held-out utterances.

    python -m examples.speech_ctc            # full run: label error rate <= 10%
    python -m examples.speech_ctc --quick    # a smoke run in seconds

Data parallelism, over processes too: ``--data-parallel`` splits every batch over all devices of all processes
(a `jax.make_mesh` of `jax.devices`, under `jax.set_mesh`). Every process draws the same utterances from the
shared seed and gives JAX only its own rows (`jax.make_array_from_process_local_data`); the parameters and the
optimizer state are replicated, and JAX sums the gradients over the devices, across processes through gloo's
collectives on a CPU. The held-out logits are gathered from every process; process 0 prints and plots:

    python -m rnnjax.launch -n 2 -- python -m examples.speech_ctc --quick --data-parallel
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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rnnjax as rj
from rnnjax.launch import initialize, process_rows

BLANK = 0


@dataclasses.dataclass(frozen=True)
class Config:
    symbols: int = 8  # the alphabet; class 0 is CTC's blank, symbols are 1..symbols
    min_labels: int = 3
    max_labels: int = 8
    min_tone_frames: int = 3
    max_tone_frames: int = 7
    max_pause_frames: int = 3
    frame: int = 64  # samples per STFT frame (hop = frame): 33 frequency bins
    noise: float = 0.5  # noise amplitude against tones of amplitude 0.5..1.5
    hidden_size: int = 64  # per direction
    layers: int = 2
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 3e-3
    clip_norm: float = 1.0
    test_utterances: int = 500
    seed: int = 0
    out_dir: str = "runs/speech_ctc"


QUICK = Config(steps=150, hidden_size=32, test_utterances=100)


def max_frames(cfg: Config) -> int:
    return cfg.max_labels * (cfg.max_tone_frames + cfg.max_pause_frames) + cfg.max_pause_frames


def utterances(rng: np.random.Generator, n: int, cfg: Config) -> tuple[np.ndarray, ...]:
    """``n`` utterances: features ``[n, T, F]``, frame counts ``[n]``, labels ``[n, N]`` and label counts."""
    T, N, F = max_frames(cfg), cfg.max_labels, cfg.frame // 2 + 1
    bins = np.linspace(4, F - 4, cfg.symbols)  # each symbol's pitch, in FFT bins
    feats = np.zeros((n, T, F), np.float32)
    lengths = np.zeros(n, np.int32)
    labels = np.zeros((n, N), np.int32)
    label_lengths = rng.integers(cfg.min_labels, cfg.max_labels + 1, n).astype(np.int32)
    for i in range(n):
        symbols = rng.integers(1, cfg.symbols + 1, label_lengths[i])
        labels[i, : len(symbols)] = symbols
        pieces = [np.zeros(cfg.frame * rng.integers(0, cfg.max_pause_frames + 1))]
        for s in symbols:
            frames = rng.integers(cfg.min_tone_frames, cfg.max_tone_frames + 1)
            pitch = (bins[s - 1] + rng.uniform(-0.3, 0.3)) / cfg.frame  # cycles per sample
            amp = rng.uniform(0.5, 1.5)
            n_samples = frames * cfg.frame
            pieces.append(amp * np.sin(2 * np.pi * pitch * np.arange(n_samples) + rng.uniform(0, 2 * np.pi)))
            # a pause of at least one frame: a repeated symbol is two tones, not one long one
            pieces.append(np.zeros(cfg.frame * rng.integers(1, cfg.max_pause_frames + 1)))
        wave = np.concatenate(pieces)
        wave = wave + cfg.noise * rng.standard_normal(len(wave))
        frames = wave.reshape(-1, cfg.frame) * np.hanning(cfg.frame)[None, :]
        spectrum = np.log1p(np.abs(np.fft.rfft(frames, axis=-1)))
        lengths[i] = len(spectrum)
        feats[i, : len(spectrum)] = spectrum
    return feats, lengths, labels, label_lengths


def best_path(logits: np.ndarray, length: int) -> list[int]:
    """CTC best-path decoding of one utterance: the argmax per frame, repeats merged, blanks dropped."""
    path = np.argmax(logits[:length], axis=-1)
    out, prev = [], BLANK
    for k in path:
        if k != prev and k != BLANK:
            out.append(int(k))
        prev = k
    return out


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance: insertions, deletions and substitutions turning ``a`` into ``b``."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def label_error_rate(logits: np.ndarray, lengths: np.ndarray, labels: np.ndarray, label_lengths: np.ndarray):
    hyps = [best_path(lg, n) for lg, n in zip(logits, lengths, strict=True)]
    refs = [list(lb[:n]) for lb, n in zip(labels, label_lengths, strict=True)]
    errors = sum(edit_distance(h, r) for h, r in zip(hyps, refs, strict=True))
    return errors / sum(map(len, refs)), hyps, refs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--steps", type=int, help="training steps (default: the config's)")
    parser.add_argument(
        "--data-parallel",
        action="store_true",
        help="split every batch over all devices of all processes (run under python -m rnnjax.launch)",
    )
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        cfg = dataclasses.replace(cfg, steps=args.steps)
    mesh = None
    if args.data_parallel:
        initialize()  # joins the other processes under python -m rnnjax.launch; alone, nothing
        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        for name in ("batch_size", "test_utterances"):
            if getattr(cfg, name) % mesh.size:
                raise ValueError(
                    f"--data-parallel: {name} {getattr(cfg, name)} must divide over {mesh.size} devices"
                )
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return _train(cfg, mesh, progress=not args.no_progress)


def _train(cfg: Config, mesh: jax.sharding.Mesh | None, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    lead = jax.process_index() == 0  # prints, plots and shows progress
    rng = np.random.default_rng(cfg.seed)
    test = utterances(rng, cfg.test_utterances, cfg)
    F = test[0].shape[-1]

    def rows(a: np.ndarray) -> jax.Array:
        """A global batch array, split over the mesh: this process gives its own rows."""
        if mesh is None:
            return jnp.asarray(a)
        split = NamedSharding(mesh, P("data"))
        return jax.make_array_from_process_local_data(split, a[process_rows(split, len(a))])

    encoder = rj.stack(*(rj.bidirectional(rj.lstm(cfg.hidden_size)) for _ in range(cfg.layers)))
    head = rj.dense(cfg.symbols + 1)
    k_enc, k_head = jax.random.split(jax.random.key(cfg.seed))
    params = {"encoder": encoder.init(k_enc, F), "head": head.init(k_head, encoder.output_size)}
    if mesh is not None:
        params = jax.device_put(params, NamedSharding(mesh, P()))  # replicated; the optimizer state follows
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.learning_rate))
    opt_state = optimizer.init(params)

    def logits_fn(params: Any, feats: jax.Array, lengths: jax.Array) -> jax.Array:
        # per-utterance feature normalisation, over the valid frames only
        mask = rj.losses.valid_mask(lengths, *feats.shape[:2])[..., None]
        count = lengths[:, None, None].astype(feats.dtype)
        mean = jnp.sum(feats * mask, axis=1, keepdims=True) / count
        std = jnp.sqrt(jnp.sum(jnp.square(feats - mean) * mask, axis=1, keepdims=True) / count) + 1e-5
        _, hs = encoder.apply(params["encoder"], (feats - mean) / std, lengths=lengths)
        return head.apply(params["head"], hs)

    def loss_fn(params: Any, feats, lengths, labels, label_lengths) -> jax.Array:
        logits = logits_fn(params, feats, lengths)
        return jnp.mean(rj.losses.ctc(logits, lengths, labels, label_lengths, blank_id=BLANK) / label_lengths)

    @jax.jit
    def train_step(params: Any, opt_state: Any, batch: tuple) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    predict = jax.jit(logits_fn)
    test_feats, test_lengths = rows(test[0]), rows(test[1])

    def test_logits() -> np.ndarray:
        """``[n, T, K]`` logits of the held-out utterances, gathered from every process."""
        logits = predict(params, test_feats, test_lengths)
        return np.asarray(logits) if mesh is None else multihost_utils.process_allgather(logits, tiled=True)

    losses, curve = [], []
    eval_every = max(1, cfg.steps // 10)
    for step in tqdm(range(cfg.steps), desc="speech_ctc", disable=not (progress and lead), leave=False):
        # fresh utterances every step; every process draws the same ones and keeps its rows
        batch = tuple(rows(a) for a in utterances(rng, cfg.batch_size, cfg))
        params, opt_state, loss = train_step(params, opt_state, batch)
        losses.append(float(loss))
        if (step + 1) % eval_every == 0:
            curve.append((step + 1, label_error_rate(test_logits(), *test[1:])[0]))

    logits = test_logits()
    ler, hyps, refs = label_error_rate(logits, *test[1:])
    exact = float(np.mean([h == r for h, r in zip(hyps, refs, strict=True)]))
    if lead:
        run = f"{cfg.test_utterances} utterances, {cfg.steps} steps"
        if mesh is not None:
            run += f", each batch split over {mesh.size} devices in {jax.process_count()} processes"
        print(f"\nheld-out label error rate {ler:.3f}, whole transcriptions right {exact:.3f} ({run})")
        for h, r in list(zip(hyps, refs, strict=True))[:4]:
            print(f"  reference {' '.join(map(str, r)):<16} heard {' '.join(map(str, h))}")
        os.makedirs(cfg.out_dir, exist_ok=True)
        path = os.path.join(cfg.out_dir, "speech_ctc.png")
        plot(losses, curve, test, logits, path)
        print(f"plot: {path}")
    return {"losses": losses, "ler_curve": curve, "label_error_rate": ler, "exact_match": exact}


def plot(losses: list[float], curve: list, test: tuple, logits: np.ndarray, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    axes[0].plot(losses, lw=0.8)
    axes[0].set(xlabel="step", ylabel="CTC loss per label", yscale="log", title="training")
    if curve:
        steps, lers = zip(*curve, strict=True)
        axes[1].plot(steps, lers, "o-")
    axes[1].set(xlabel="step", ylabel="label error rate", title="held-out utterances")
    n = int(test[1][0])
    axes[2].imshow(test[0][0, :n].T, aspect="auto", origin="lower", cmap="magma")
    probs = jax.nn.softmax(logits[0, :n], axis=-1)
    ax2 = axes[2].twinx()
    ax2.plot(1 - probs[:, BLANK], color="cyan", lw=1)
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("p(not blank)")
    axes[2].set(xlabel="frame", ylabel="frequency bin", title="an utterance and p(symbol) per frame")
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
