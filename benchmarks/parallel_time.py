"""Parallel-in-time methods of `rj.unroll` against the sequential scan, side by side, over sequence lengths.

For each cell and T, every method's forward (``ys``) and training step (gradients of ``Σ ys²`` to params
and xs) is compiled, its compiled temporary memory read, and the methods are timed interleaved A B C ...
A B C ... for ``--rounds`` rounds; the median of each is reported with its ratio to the sequential scan
(ratio > 1: slower than sequential). float32, zero initial state.

    python -m benchmarks.parallel_time            # T = 256 ... 65,536; writes benchmarks/results/
    python -m benchmarks.parallel_time --quick    # a smoke run (small T, 2 rounds)

A method is one entry of `METHODS`: a name and the keywords it adds to `rj.unroll`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

import rnnjax as rj
from benchmarks.rnn_step import device_info, interleaved_times, save_results

# name -> the keywords given to rj.unroll; a new method is one more entry
METHODS: dict[str, dict[str, Any]] = {
    "sequential": {},
    "associative": {"method": "associative"},
    "chunked 64": {"method": "associative", "chunk_size": 64},
}
CELLS = {"mingru": rj.mingru, "lru": lambda H: rj.lru(H // 2)}
LENGTHS = [256, 1024, 4096, 16384, 65536]
QUICK_LENGTHS = [16, 128]


def programs(cell: rj.Cell, options: dict[str, Any]) -> tuple[Any, Any]:
    """The jitted forward ``xs -> ys`` and training step ``(params, xs) -> grads`` of one method."""

    def forward(params: Any, xs: jax.Array) -> jax.Array:
        return rj.unroll(cell, params, xs, **options)[1]

    def loss(params: Any, xs: jax.Array) -> jax.Array:
        return jnp.sum(forward(params, xs) ** 2)

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1)))


def run_config(name: str, B: int, T: int, I: int, H: int, rounds: int) -> dict[str, Any]:
    cell = CELLS[name](H)
    params = cell.init(jax.random.key(0), I, jnp.float32)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    runs, result = {}, {}
    for method, options in METHODS.items():
        r = result[method] = {}
        for kind, fn in zip(("forward", "train"), programs(cell, options), strict=True):
            t0 = time.perf_counter()
            compiled = fn.lower(params, xs).compile()
            jax.block_until_ready(compiled(params, xs))
            r[f"{kind}_first_call_s"] = time.perf_counter() - t0
            r[f"{kind}_temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
            runs[(method, kind)] = lambda c=compiled: jax.block_until_ready(c(params, xs))
    for (method, kind), ts in interleaved_times(runs, rounds).items():
        result[method][f"{kind}_ms"] = statistics.median(ts)
    for method in METHODS:
        for kind in ("forward", "train"):
            base = result["sequential"][f"{kind}_ms"]
            result[method][f"{kind}_ratio"] = result[method][f"{kind}_ms"] / base
    return {"cell": name, "B": B, "T": T, "I": I, "H": H, "results": result}


def method_tables(configs: list[dict[str, Any]], methods: Any, ratio: str) -> list[str]:
    """Markdown lines: for the forward and the training step, a table of every config (a row) and method
    (a column): median ms, the ``ratio`` in parentheses, compiled temporary MiB."""
    lines: list[str] = []
    for kind in ("forward", "train"):
        lines += [f"## {kind}: median ms ({ratio}) / compiled temp MiB", ""]
        lines += ["| config | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for c in configs:
            r = c["results"]
            cells = [
                f"{r[m][f'{kind}_ms']:.2f} ({r[m][f'{kind}_ratio']:.2f}x) / {r[m][f'{kind}_temp_mib']:.1f}"
                for m in methods
            ]
            lines.append(
                f"| {c['cell']} B={c['B']} T={c['T']} I={c['I']} H={c['H']} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    return lines


def markdown(record: dict[str, Any]) -> str:
    d = record["device"]
    lines = [
        f"# rj.unroll's methods against the sequential scan ({d['jax_device']}, {d['cpu']})",
        "",
    ]
    lines += method_tables(record["configs"], METHODS, "ratio to sequential")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("forward", "train"), strict=True):
        for cell in dict.fromkeys(c["cell"] for c in record["configs"]):
            configs = [c for c in record["configs"] if c["cell"] == cell]
            for m in METHODS:
                ax.loglog(
                    [c["T"] for c in configs],
                    [c["results"][m][f"{kind}_ms"] for c in configs],
                    "o-",
                    label=f"{cell} {m}",
                )
        ax.set_xlabel("T")
        ax.set_ylabel("ms")
        ax.set_title(kind)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small T, 2 rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="I = H")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--cells", nargs="*", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON record and table")
    parser.add_argument("--plot-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS)
    rounds = 2 if args.quick else args.rounds
    size = 8 if args.quick else args.size
    record: dict[str, Any] = {"device": device_info(), "rounds": rounds, "methods": METHODS, "configs": []}
    for cell in args.cells:
        for T in lengths:
            record["configs"].append(run_config(cell, args.batch, T, size, size, rounds))
            print(
                record["configs"][-1]["cell"],
                T,
                {m: round(r["train_ms"], 2) for m, r in record["configs"][-1]["results"].items()},
                flush=True,
            )
    save_results("parallel_time", args.quick, record, markdown(record), plot, args.out, args.plot_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
