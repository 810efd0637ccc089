"""Synced many-to-many and one-to-many: a character-level LSTM language model of Python's own source code.

The corpus ships with every machine: the standard library's ``.py`` files (read from
``sysconfig.get_paths()["stdlib"]``). Files are split into train and validation by a hash of their path, so
validation text comes from files the model never trains on. The model embeds each character, runs an LSTM and
reads out the next character's logits at every step (synced many-to-many); it trains on ``B`` contiguous
tracks of the training stream with the carry passed from one window to the next and the gradient truncated
at window boundaries (truncated BPTT, as in char-rnn). Validation bits per character are measured on held-out
tracks with the carry running through the whole track; samples are drawn with `rj.decode.sample` at a given
temperature after priming the carry on a prompt (one-to-many).

    python -m examples.char_lm                # full run: validation < 2.0 bits/char within 30 min on 2 cores
    python -m examples.char_lm --minutes 3    # what `make demo` runs
    python -m examples.char_lm --quick        # a smoke run in seconds
    python -m examples.char_lm --resume       # on from the newest checkpoint in runs/char_lm/checkpoints

Training survives being killed: every ``--checkpoint-every`` steps the whole training state (parameters,
optimizer state, the carry handed between windows, the data position and the run's PRNG key, one pytree:
`TrainState`) is written with `rj.save_training_state`, and ``--resume`` continues from the newest one. The
run is a function of its seed and step alone (each step's dropout and sampling keys are folded from the
saved key with the step), so a run killed and resumed ends with the same parameters, bit for bit, as one
that was never stopped.

Data parallelism: ``--data-parallel`` splits the ``B`` tracks over all devices through JAX's own sharding
(a `jax.make_mesh` of the devices under `jax.set_mesh`; each window and the carry placed as ``P("data")``,
the parameters and optimizer state replicated). The training step is the same function. On a CPU, ask for
one device per core before JAX starts; each device then runs its own tracks' small GEMMs on its core:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m examples.char_lm --data-parallel

The same flag runs the example as several processes (one per host or per GPU on a cluster; here, on one
machine, under the launcher). Every process reads the same corpus and gives JAX only its own tracks of each
window (`jax.make_array_from_process_local_data`); every process takes part in each step, evaluation and
checkpoint (each writes its own shards), and process 0 alone prints, plots and writes the samples:

    python -m rnnjax.launch -n 2 -- python -m examples.char_lm --quick --data-parallel
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import glob
import math
import os
import shutil
import sys
import sysconfig
import time
import zlib
from typing import Any, NamedTuple

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

# A fixed vocabulary, so that a model trained on one Python's source reads another's: printable ASCII,
# newline and tab, and one symbol for everything else.
CHARS = "\n\t" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = len(CHARS)
VOCAB_SIZE = len(CHARS) + 1
_LOOKUP = np.full(256, UNKNOWN, np.int32)
_LOOKUP[[ord(c) for c in CHARS]] = np.arange(len(CHARS))


@dataclasses.dataclass(frozen=True)
class Config:
    hidden_size: int = 256
    embed_size: int = 64
    batch_size: int = 32
    window: int = 128  # truncated-BPTT window T
    max_minutes: float = 30.0  # training stops at this wall time or after `steps`, whichever comes first
    steps: int = 100_000
    learning_rate: float = 2e-3
    clip_norm: float = 1.0
    eval_every: int = 250
    val_tracks: int = 32
    val_track_len: int = 2048
    max_train_chars: int = 12_000_000
    validation_fraction: float = 0.1
    prompt: str = "def "
    sample_len: int = 200
    temperature: float = 0.7
    dropout: float = 0.0  # on the embedded characters (the LSTM's input), during training
    # inside the recurrence (`rj.Regularizer`), during training; zoneout's expectation at evaluation
    dropout_state: float = 0.0  # variational dropout on h entering h w_hh, one mask per track and window
    zoneout: float = 0.0  # each unit of h and c keeps its previous value with this probability, per step
    weight_drop: float = 0.0  # DropConnect on w_hh, one mask per batch
    seed: int = 0
    out_dir: str = "runs/char_lm"
    checkpoint_every: int = 500  # steps between training checkpoints; 0 saves none
    checkpoint_dir: str = "runs/char_lm/checkpoints"


QUICK = Config(
    hidden_size=64,
    embed_size=16,
    batch_size=16,
    window=32,
    steps=150,
    eval_every=50,
    val_tracks=8,
    val_track_len=256,
    max_train_chars=300_000,
    sample_len=60,
    checkpoint_every=0,
)


class TrainState(NamedTuple):
    """Everything a training step reads and writes: what a checkpoint holds (with the step)."""

    params: Any  # {"embed": [V, E], "cell": LSTMParams, "head": DenseParams}
    opt_state: Any  # optax's state for `params`
    carry: rj.LSTMCarry  # [B, H] each: handed from one window to the next (truncated BPTT)
    window: jax.Array  # int32 []: which window of the tracks the next step trains on (the data position)
    key: jax.Array  # the run's PRNG key; each step's dropout and sample keys are folded from it with the step


def encode(text: str) -> np.ndarray:
    data = np.frombuffer(text.encode("latin-1", errors="replace"), np.uint8)
    return _LOOKUP[data]


def decode_text(tokens: np.ndarray) -> str:
    return "".join(CHARS[t] if t < UNKNOWN else "?" for t in tokens)


def load_corpus(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """The standard library's source as two token streams, train and validation, split file by file."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    skip = ("site-packages", "dist-packages", f"{os.sep}test{os.sep}", f"{os.sep}tests{os.sep}", "idlelib")
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    n_train = 0
    for path in paths:
        rel = os.path.relpath(path, root)
        if any(s in path for s in skip):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            tokens = encode(f.read())
        # the split depends on the file's path alone, not on which other files this Python has
        if zlib.crc32(rel.encode()) % 1000 < 1000 * cfg.validation_fraction:
            val.append(tokens)
        elif n_train < cfg.max_train_chars:
            train.append(tokens)
            n_train += len(tokens)
    if not train or not val:
        raise RuntimeError(f"found no Python source under {root}")
    return np.concatenate(train)[: cfg.max_train_chars], np.concatenate(val)


def tracks(stream: np.ndarray, n: int, length: int | None = None) -> np.ndarray:
    """``[n, L]``: the stream cut into n contiguous tracks (of ``length`` each, or as long as it allows)."""
    L = len(stream) // n if length is None else length
    if n * L > len(stream):
        raise ValueError(f"a stream of {len(stream)} characters is too short for {n} tracks of {L}")
    return stream[: n * L].reshape(n, L)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--minutes", type=float, help="stop training after this many minutes")
    parser.add_argument("--steps", type=int, help="stop training after this many steps")
    parser.add_argument("--seed", type=int, help="the seed of the initial parameters and of every key")
    parser.add_argument("--dropout", type=float, help="dropout rate on the LSTM's input while training")
    parser.add_argument("--dropout-state", type=float, help="variational dropout on h entering h w_hh")
    parser.add_argument("--zoneout", type=float, help="zoneout probability of the LSTM's h and c")
    parser.add_argument("--weight-drop", type=float, help="DropConnect rate on the recurrent weights w_hh")
    parser.add_argument(
        "--checkpoint-every", type=int, help="save the training state every N steps (0: never)"
    )
    parser.add_argument("--checkpoint-dir", help="where the training checkpoints go")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir"
    )
    parser.add_argument(
        "--data-parallel",
        action="store_true",
        help="split the tracks over all devices of all processes (several under python -m rnnjax.launch)",
    )
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    for flag, name in [
        ("minutes", "max_minutes"),
        ("steps", "steps"),
        ("seed", "seed"),
        ("dropout", "dropout"),
        ("dropout_state", "dropout_state"),
        ("zoneout", "zoneout"),
        ("weight_drop", "weight_drop"),
        ("checkpoint_every", "checkpoint_every"),
        ("checkpoint_dir", "checkpoint_dir"),
    ]:
        if getattr(args, flag) is not None:
            cfg = dataclasses.replace(cfg, **{name: getattr(args, flag)})
    for name in ("dropout", "dropout_state", "zoneout", "weight_drop"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.checkpoint_every < 0:
        raise ValueError(f"--checkpoint-every must be >= 0, got {cfg.checkpoint_every}")
    if args.data_parallel:
        initialize()  # joins the other processes under python -m rnnjax.launch; alone, nothing
    mesh = jax.make_mesh((jax.device_count(),), ("data",)) if args.data_parallel else None
    for name in ("batch_size", "val_tracks"):
        if mesh is not None and getattr(cfg, name) % mesh.size:
            raise ValueError(
                f"--data-parallel: {name} {getattr(cfg, name)} must divide over {mesh.size} devices"
            )
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        return train(cfg, mesh=mesh, no_progress=args.no_progress, resume=args.resume)


def model(cfg: Config) -> tuple[rj.Cell, rj.Dense, optax.GradientTransformation]:
    """The LSTM, its read-out and the optimizer."""
    cell, head = rj.lstm(cfg.hidden_size), rj.dense(VOCAB_SIZE)
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.learning_rate))
    return cell, head, optimizer


def initial_state(cfg: Config, mesh: jax.sharding.Mesh | None = None) -> TrainState:
    """The state at step 0, a function of ``cfg.seed`` alone: the structure a checkpoint is restored into.

    With a mesh the parameters (and so the optimizer state) are on every device, the carry's tracks split
    over them.
    """
    state = _initial_state(cfg)
    if mesh is not None:
        state = jax.device_put(state, TrainState(P(), P(), P("data"), P(), P()))
    return state


@functools.partial(jax.jit, static_argnums=0)
def _initial_state(cfg: Config) -> TrainState:
    # one compiled program rather than an eager op (and its compilation) per array
    cell, head, optimizer = model(cfg)
    root = jax.random.key(cfg.seed)
    keys = [*jax.random.split(root, 3), jax.random.fold_in(root, 3)]  # embed, cell, head; the run's key
    params = {
        "embed": 0.1 * jax.random.normal(keys[0], (VOCAB_SIZE, cfg.embed_size)),
        "cell": cell.init(keys[1], cfg.embed_size),
        "head": head.init(keys[2], cfg.hidden_size),
    }
    carry = cell.initial_carry(params["cell"], (cfg.batch_size,))
    return TrainState(params, optimizer.init(params), carry, jnp.zeros((), jnp.int32), keys[3])


def train(
    cfg: Config, *, mesh: jax.sharding.Mesh | None = None, no_progress: bool = False, resume: bool = False
) -> dict[str, Any]:
    """Trains (from the newest checkpoint in ``cfg.checkpoint_dir`` if ``resume``), plots and samples."""
    from tqdm.auto import tqdm

    lead = jax.process_index() == 0  # prints, plots and writes the samples
    say = print if lead else lambda *args, **kwargs: None
    train_stream, val_stream = load_corpus(cfg)
    train_tracks = tracks(train_stream, cfg.batch_size)  # [B, L]: B parallel streams
    val_tracks = tracks(val_stream, cfg.val_tracks, min(cfg.val_track_len, len(val_stream) // cfg.val_tracks))
    say(
        f"corpus: {len(train_stream):,} training and {len(val_stream):,} validation characters of "
        f"Python {sysconfig.get_python_version()}'s standard library; vocabulary {VOCAB_SIZE}"
    )

    cell, head, optimizer = model(cfg)

    def rows(a: Any) -> jax.Array:
        """A global ``[B, ...]`` array; with a mesh, split over its devices, this process giving its rows."""
        if mesh is None:
            return jnp.asarray(a)
        split = NamedSharding(mesh, P("data"))
        a = np.asarray(a)
        return jax.make_array_from_process_local_data(split, a[process_rows(split, len(a))])

    n_windows = (train_tracks.shape[1] - 1) // cfg.window

    state = initial_state(cfg, mesh)
    step = 0
    saved_step: int | None = None
    if resume:
        restored = rj.restore_training_state(cfg.checkpoint_dir, like=state)
        if restored is None:
            say(f"no checkpoint in {cfg.checkpoint_dir}: training from step 0")
        else:
            step, state = restored
            saved_step = step
            say(f"resumed from the checkpoint of step {step} in {cfg.checkpoint_dir}")
    elif cfg.checkpoint_every and (latest := rj.latest_training_step(cfg.checkpoint_dir)) is not None:
        # a fresh run starts over; the earlier run's checkpoints are kept (one run back), not mixed in
        previous = os.path.normpath(cfg.checkpoint_dir) + ".previous"
        if lead:
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(cfg.checkpoint_dir, previous)
        if jax.process_count() > 1:  # no process saves before the directory is moved
            multihost_utils.sync_global_devices("char_lm: earlier checkpoints moved")
        say(
            f"starting over: the checkpoints of an earlier run (to step {latest}) moved to {previous}; "
            "--resume continues a run instead"
        )

    reg = rj.Regularizer(state_dropout=cfg.dropout_state, zoneout=cfg.zoneout, weight_drop=cfg.weight_drop)

    def regularize(key: jax.Array | None) -> dict[str, Any]:
        """`rj.unroll`'s regularisers: masks from ``key`` in training, the expectation without one."""
        if reg == rj.Regularizer():
            return {}
        return {"regularize": reg, "key": None if key is None else jax.random.fold_in(key, 1)}

    def loss_fn(
        params: Any, carry: rj.LSTMCarry, tokens: jax.Array, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, rj.LSTMCarry]:
        """Mean next-character cross-entropy (nats) over a window ``tokens [B, T+1]``, and the carry after;
        with a ``dropout_key`` (training), dropout on the embedded characters and the regularisers inside
        the recurrence; without one, zoneout's expectation."""
        xs = rj.embed(params["embed"], tokens[:, :-1])
        if cfg.dropout and dropout_key is not None:
            keep = jax.random.bernoulli(dropout_key, 1.0 - cfg.dropout, xs.shape)
            xs = jnp.where(keep, xs / (1.0 - cfg.dropout), 0.0)
        carry, hs = rj.unroll(cell, params["cell"], xs, carry, **regularize(dropout_key))
        logits = head.apply(params["head"], hs)
        return rj.losses.sequence_cross_entropy(logits, tokens[:, 1:]), carry

    @jax.jit
    def train_step(state: TrainState, tokens: jax.Array, step: jax.Array) -> tuple[TrainState, jax.Array]:
        # the carry enters as a constant: the gradient is truncated at the window's start
        dropout_key = jax.random.split(jax.random.fold_in(state.key, step))[0]
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, carry), grads = grad_fn(state.params, state.carry, tokens, dropout_key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, carry, (state.window + 1) % n_windows, state.key), loss

    @jax.jit
    def validation_bits(params: Any, tokens: jax.Array) -> jax.Array:
        carry0 = cell.initial_carry(params["cell"], (tokens.shape[0],))
        return loss_fn(params, carry0, tokens)[0] / math.log(2)

    @jax.jit
    def generate(params: Any, prompt: jax.Array, key: jax.Array) -> jax.Array:
        """Prime the carry on all but the prompt's last character, then sample from there."""
        carry0 = cell.initial_carry(params["cell"], (1,))
        carry, _ = rj.unroll(cell, params["cell"], rj.embed(params["embed"], prompt[None, :-1]), carry0)
        step = rj.seq2seq.decoder_step(cell, params["cell"], params["embed"], params["head"])
        return rj.decode.sample(
            step, carry, prompt[-1:], cfg.sample_len, key, temperature=cfg.temperature
        ).tokens[0]

    def checkpoint(step: int) -> None:
        nonlocal saved_step
        rj.save_training_state(cfg.checkpoint_dir, step, state)
        saved_step = step

    prompt = jnp.asarray(encode(cfg.prompt))
    history: dict[str, list] = {"step": [], "train_bits": [], "val_step": [], "val_bits": [], "val_time": []}
    samples: list[tuple[int, str]] = []
    step_seconds: list[float] = []  # each training step's wall time (the first compiles it), no evaluation
    reached_2: float | None = None
    first_step = step
    start = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="char_lm", disable=no_progress or not lead, leave=False)

    def evaluate(step: int) -> None:
        nonlocal reached_2
        bits = float(validation_bits(state.params, rows(val_tracks)))
        elapsed = time.perf_counter() - start
        history["val_step"].append(step)
        history["val_bits"].append(bits)
        history["val_time"].append(elapsed)
        if bits < 2.0 and reached_2 is None:
            reached_2 = elapsed
        sample_key = jax.random.split(jax.random.fold_in(state.key, step))[1]
        text = decode_text(np.asarray(generate(state.params, prompt, sample_key)))
        samples.append((step, text))
        if not lead:
            return
        tqdm.write(f"\n[step {step}, {elapsed / 60:.1f} min] validation {bits:.3f} bits/char; sample:")
        tqdm.write(cfg.prompt + text)

    while step < cfg.steps and time.perf_counter() - start < 60 * cfg.max_minutes:
        w = int(state.window)
        if w == 0:  # back to the start of every track: a fresh carry
            fresh = jax.tree.map(rows, cell.initial_carry(state.params["cell"], (cfg.batch_size,)))
            state = state._replace(carry=fresh)
        window = train_tracks[:, w * cfg.window : (w + 1) * cfg.window + 1]
        started = time.perf_counter()
        state, loss = train_step(state, rows(window), step)
        bits = float(loss) / math.log(2)  # waits for the step
        step_seconds.append(time.perf_counter() - started)
        if step % cfg.eval_every == 0:
            evaluate(step)
        step += 1
        history["step"].append(step)
        history["train_bits"].append(bits)
        bar.update()
        bar.set_postfix(bits=f"{history['train_bits'][-1]:.2f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint(step)
    bar.close()
    if cfg.checkpoint_every and saved_step != step:
        checkpoint(step)  # where this run stopped, so that --resume continues from there
    evaluate(step)
    minutes = (time.perf_counter() - start) / 60

    platform = jax.devices()[0].platform
    devices = "" if mesh is None else f", the tracks split over {mesh.size} {platform} devices"
    if jax.process_count() > 1:
        devices += f" in {jax.process_count()} processes"
    say(
        f"\nvalidation {history['val_bits'][-1]:.3f} bits/char after {step} steps "
        + (f"({step - first_step} since the checkpoint) " if first_step else "")
        + f"in {minutes:.1f} min "
        f"({step * cfg.batch_size * cfg.window:,} training characters); "
        + (f"below 2.0 after {reached_2 / 60:.1f} min" if reached_2 is not None else "not yet below 2.0")
        + devices
    )
    path = os.path.join(cfg.out_dir, "char_lm.png")
    sample_path = os.path.join(cfg.out_dir, "samples.txt")
    if lead:
        os.makedirs(cfg.out_dir, exist_ok=True)
        plot(history, path)
        with open(sample_path, "w") as f:
            for s, text in samples:
                f.write(f"--- step {s}\n{cfg.prompt}{text}\n")
        print(f"plot: {path}\nsamples: {sample_path}")
    return {
        **history,
        "samples": samples,
        "minutes_to_2_bits": None if reached_2 is None else reached_2 / 60,
        "steps_per_minute": (step - first_step) / minutes,
        "step_seconds": step_seconds,
        # the tracks of a window that each device holds: batch_size / devices when they are split
        "rows_per_device": rows(train_tracks[:, :2]).addressable_shards[0].data.shape[0],
    }


def plot(history: dict[str, list], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    train = np.asarray(history["train_bits"])
    k = max(1, len(train) // 100)  # a running mean over ~1% of the steps
    smooth = np.convolve(train, np.ones(k) / k, mode="valid") if len(train) else train
    if len(train):  # a run resumed at its last step trains none
        ax0.plot(history["step"][k - 1 :], smooth, label="train (running mean)")
    ax0.plot(history["val_step"], history["val_bits"], "o-", label="validation (held-out files)")
    ax0.set(xlabel="step", ylabel="bits / character", title="character LM on Python's stdlib")
    ax1.plot(np.asarray(history["val_time"]) / 60, history["val_bits"], "o-")
    ax1.axhline(2.0, color="gray", ls="--", lw=1)
    ax1.set(xlabel="wall time (min)", ylabel="validation bits / character", title="against time")
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
    ax0.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
