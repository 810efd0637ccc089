"""What the selects that make padding unreachable cost: training steps and losses with and without them.

`rj.unroll` selects the padded steps of ``xs`` to zero before any arithmetic (``rnnjax.driver._zero_padding``,
the "double where"), and the losses select their padded logits and labels (``rnnjax.losses._padding_to``), so
that NaN or inf in the padding reaches no gradient. This benchmark measures those selects in one process:

- an LSTM and a GRU training step (``jit(value_and_grad)`` of ``Σ ys²`` to the parameters, ``grad="manual"``)
  with ``lengths=None``, with ``lengths`` all full, and with a mixed set of lengths, each of the latter two
  also with the select replaced by the identity (the module attribute patched while that program is traced);
- `rj.losses.sequence_cross_entropy` and `rj.losses.ctc` (value and gradient to the logits) the same way.

Every program is compiled ahead of time (its compiled temporary memory read), then all of a config's
programs are timed interleaved A B C ... A B C ... for ``--rounds`` rounds. Reported: the median of each,
its quartiles, and the median and quartiles of the per-round ratio to the same program without the select
(> 1: the select costs time). Clean (finite) padding, so both programs compute the same values; the largest
difference between them is recorded too. float32.

    python -m benchmarks.padding            # writes benchmarks/results/padding_<platform>.{json,md}
    python -m benchmarks.padding --quick    # a smoke run (tiny shapes, 3 rounds)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj
import rnnjax.driver
import rnnjax.losses
from benchmarks.rnn_step import (
    device_info,
    device_label,
    grouped_bars,
    interleaved_times,
    save_bar_plot,
    save_results,
)

# (kind, B, T, I, H) for the cells; (kind, B, T, classes) for the losses
CONFIGS = [
    ("lstm", 32, 128, 256, 256),
    ("gru", 32, 128, 256, 256),
    ("lstm", 8, 64, 64, 64),
    ("gru", 8, 64, 64, 64),
    ("cross_entropy", 32, 128, 256),
    ("ctc", 32, 128, 32),
    ("cross_entropy", 8, 64, 32),
    ("ctc", 8, 64, 16),
]
QUICK_CONFIGS = [("lstm", 4, 16, 8, 8), ("gru", 4, 16, 8, 8), ("cross_entropy", 4, 16, 8), ("ctc", 4, 16, 6)]

# variant -> (which lengths, whether the select runs); a variant without the select is compared with the
# variant of the same lengths with it
VARIANTS = {
    "no lengths": (None, True),
    "full lengths": ("full", True),
    "full lengths, no select": ("full", False),
    "mixed lengths": ("mixed", True),
    "mixed lengths, no select": ("mixed", False),
}
PAIRS = {"full lengths": "full lengths, no select", "mixed lengths": "mixed lengths, no select"}


@contextlib.contextmanager
def selects(enabled: bool) -> Iterator[None]:
    """With ``enabled`` False, the padding selects of `rj.unroll` and of the losses are the identity while
    the block runs. JAX's caches are cleared on entry and exit, so that a program traced inside the block
    (and only such a program) is traced without them."""
    saved = rnnjax.driver._zero_padding, rnnjax.losses._padding_to
    jax.clear_caches()
    if not enabled:
        rnnjax.driver._zero_padding = lambda xs, mask: xs
        rnnjax.losses._padding_to = lambda values, mask, safe=0: values
    try:
        yield
    finally:
        rnnjax.driver._zero_padding, rnnjax.losses._padding_to = saved
        jax.clear_caches()


def mixed_lengths(B: int, T: int) -> np.ndarray:
    """``B`` lengths spread evenly over ``[T / 4, T]`` (a quarter to all of the steps valid), shuffled."""
    return np.random.default_rng(2).permutation(np.linspace(T // 4, T, B).astype(np.int32))


def lengths_of(which: str | None, B: int, T: int) -> jax.Array | None:
    """The ``[B]`` lengths a variant names: None, ``"full"`` (every step valid) or ``"mixed"``."""
    if which is None:
        return None
    return jnp.asarray(np.full(B, T, np.int32) if which == "full" else mixed_lengths(B, T))


def program(config: tuple, which: str | None) -> tuple[Callable, tuple]:
    """One config's function (value and gradient) and its arguments, with the lengths ``which`` names."""
    kind, B, T = config[:3]
    lengths = lengths_of(which, B, T)
    keys = jax.random.split(jax.random.key(0), 3)
    if kind in ("lstm", "gru"):
        _, _, _, I, H = config
        cell = {"lstm": rj.lstm, "gru": rj.gru}[kind](H)
        params = cell.init(keys[0], I, jnp.float32)
        xs = jax.random.normal(keys[1], (B, T, I), jnp.float32)

        def step(p: Any, x: jax.Array, n: jax.Array | None) -> jax.Array:
            return jnp.sum(rj.unroll(cell, p, x, lengths=n, grad="manual")[1] ** 2)

        return jax.value_and_grad(step), (params, xs, lengths)
    K = config[3]
    logits = jax.random.normal(keys[0], (B, T, K), jnp.float32)
    if kind == "cross_entropy":
        targets = jax.random.randint(keys[1], (B, T), 0, K)
        return jax.value_and_grad(rj.losses.sequence_cross_entropy), (logits, targets, lengths)
    N = T // 4  # labels of up to a quarter of the frames, never the blank (class 0)
    labels = jax.random.randint(keys[1], (B, N), 1, K)
    label_lengths = jnp.asarray(np.random.default_rng(3).integers(1, N + 1, B).astype(np.int32))
    if lengths is not None:  # at most half the valid frames: every label sequence fits its frames
        label_lengths = jnp.minimum(label_lengths, jnp.maximum(lengths // 2, 1))

    def loss(z: jax.Array, n: jax.Array | None, y: jax.Array, m: jax.Array) -> jax.Array:
        return jnp.mean(rj.losses.ctc(z, n, y, m))

    return jax.value_and_grad(loss), (logits, lengths, labels, label_lengths)


def quartiles(values: list[float]) -> list[float]:
    """The first quartile, the median and the third quartile."""
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q2, q3]


def run_config(config: tuple, rounds: int) -> dict[str, Any]:
    """Every variant of one config, compiled ahead of time, timed interleaved; see the module's docstring."""
    runs, result, outputs = {}, {}, {}
    for name, (which, enabled) in VARIANTS.items():
        fn, args = program(config, which)
        with selects(enabled):
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile()
            outputs[name] = jax.block_until_ready(compiled(*args))
            first = time.perf_counter() - t0
        result[name] = {
            "first_call_s": first,
            "temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20,
        }
        runs[name] = lambda c=compiled, a=args: jax.block_until_ready(c(*a))
    times = interleaved_times(runs, rounds, warm_ups=2)
    base = times["no lengths"]
    for name, ts in times.items():
        r = result[name]
        r["times_ms"], r["median_ms"] = ts, statistics.median(ts)
        r["quartiles_ms"] = quartiles(ts)
        r["ratio_to_no_lengths"] = quartiles([t / b for t, b in zip(ts, base, strict=True)])
    for with_select, without in PAIRS.items():
        ratios = [a / b for a, b in zip(times[with_select], times[without], strict=True)]
        diff = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(
                jax.tree.leaves(outputs[with_select]), jax.tree.leaves(outputs[without]), strict=True
            )
        )
        result[with_select]["select_ratio"] = quartiles(ratios)
        result[with_select]["select_temp_mib_delta"] = (
            result[with_select]["temp_mib"] - result[without]["temp_mib"]
        )
        result[with_select]["max_abs_diff_to_no_select"] = diff
    return {"kind": config[0], "shape": list(config[1:]), "results": result}


def config_label(c: dict[str, Any]) -> str:
    if c["kind"] in ("lstm", "gru"):
        B, T, I, H = c["shape"]
        return f"{c['kind']} step B={B} T={T} I={I} H={H}"
    B, T, K = c["shape"]
    return f"{c['kind']} B={B} T={T} K={K}"


def markdown(record: dict[str, Any]) -> str:
    names = list(VARIANTS)
    lines = [
        f'Value and gradient (cells: a training step, `grad="manual"`; losses: to the logits), float32, '
        f"median of {record['rounds']} interleaved rounds (first to third quartile in brackets). "
        f"Device: {device_label(record['device'])}.",
        "",
        "| config | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for c in record["configs"]:
        r = c["results"]
        cells = [
            f"{r[n]['median_ms']:.2f} ms ({r[n]['quartiles_ms'][0]:.2f}–{r[n]['quartiles_ms'][2]:.2f})"
            for n in names
        ]
        lines.append(f"| {config_label(c)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The selects' cost: time with the select / time without it, per round, median (quartiles), and the "
        "compiled temporary memory with and without it; largest difference of the values and gradients "
        "between the two (clean padding):",
        "",
        "| config | full lengths: time ratio | memory (MiB) | mixed lengths: time ratio | memory (MiB) "
        "| difference | no lengths → mixed lengths |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in record["configs"]:
        r = c["results"]
        cells = []
        for n, without in PAIRS.items():
            q = r[n]["select_ratio"]
            cells += [
                f"{q[1]:.3f}x ({q[0]:.3f}–{q[2]:.3f})",
                f"{r[n]['temp_mib']:.2f} / {r[without]['temp_mib']:.2f}",
            ]
        diff = max(r[n]["max_abs_diff_to_no_select"] for n in PAIRS)
        q = r["mixed lengths"]["ratio_to_no_lengths"]
        cells += [f"{diff:.1e}", f"{q[1]:.3f}x ({q[0]:.3f}–{q[2]:.3f})"]
        lines.append(f"| {config_label(c)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = record["configs"]
    fig, ax = plt.subplots(figsize=(11, 4))
    series = {n: [c["results"][n]["ratio_to_no_lengths"][1] for c in configs] for n in VARIANTS}
    grouped_bars(ax, series, [config_label(c).replace(" B=", "\nB=") for c in configs], fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.5)
    title = f"Padding selects on {device_label(record['device'])}"
    save_bar_plot(fig, ax, "time / no lengths (median per round)", title, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON record and table")
    parser.add_argument("--plot-dir", default="runs/benchmarks", help="folder for the plot (git-ignored)")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error(f"--rounds must be >= 3, got {args.rounds}")
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    rounds = 3 if args.quick else args.rounds
    record: dict[str, Any] = {"device": device_info(), "rounds": rounds, "dtype": "float32", "configs": []}
    for config in configs:
        print(" ".join(map(str, config)), "...", flush=True)
        record["configs"].append(run_config(config, rounds))
    save_results("padding", args.quick, record, markdown(record), plot, args.out, args.plot_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
