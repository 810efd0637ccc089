"""DEER and quasi-DEER (`rnnjax.parallel.deer`) against the sequential scan: time, memory, Newton iterations.

A GRU (default initialisation, float32, tol 1e-6, zero initial guess), for each T: the forward (outputs and
final carry) and a training step (gradients of ``Σ ys²`` to the params, by the implicit function theorem
for DEER), each jitted; the three methods are timed side by side in one process, interleaved, and reported
as medians with their ratio to the sequential scan (ratio > 1: slower than sequential), with the compiled
temporary memory of each program and the iterations Newton took.

    python -m benchmarks.deer_time          # T = 256 ... 4096: benchmarks/results/deer_time_<platform>.json
    python -m benchmarks.deer_time --quick  # a smoke run (small shapes, 2 rounds)

`measure` is the function another benchmark may call for one shape.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp

import rnnjax as rj
from benchmarks.rnn_step import device_info, interleaved
from rnnjax.parallel.deer import deer_unroll

METHODS = ("sequential", "deer", "quasi_deer")


def _runner(method: str, cell: rj.Cell, tol: float) -> Any:
    """``(params, xs) -> (final, ys, iterations)`` by ``method``."""

    def run(params: Any, xs: jax.Array) -> tuple[Any, Any, jax.Array]:
        if method == "sequential":
            final, ys = rj.unroll(cell, params, xs)
            return final, ys, jnp.zeros((), jnp.int32)
        final, ys, info = deer_unroll(cell, params, xs, quasi=method == "quasi_deer", tol=tol)
        # a benchmark must not time the fallback silently: report it as iterations = -1
        return final, ys, jnp.where(info.converged, info.iterations, -1)

    return run


def measure(
    T: int,
    B: int = 4,
    I: int = 64,
    H: int = 64,
    rounds: int = 5,
    methods: tuple[str, ...] = METHODS,
    tol: float = 1e-6,
) -> dict[str, Any]:
    """Forward and training-step medians (ms), compiled temp memory (MiB) and iterations of a float32 GRU at
    one shape, by each of ``methods`` ("sequential", "deer", "quasi_deer"), timed interleaved."""
    cell = rj.gru(H)
    params = cell.init(jax.random.key(0), input_size=I, dtype=jnp.float32)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    fwd, train, out = {}, {}, {"T": T, "B": B, "I": I, "H": H, "tol": tol, "methods": {}}
    for m in methods:
        run = _runner(m, cell, tol)
        f = jax.jit(run)
        g = jax.jit(jax.value_and_grad(lambda p, x, run=run: jnp.sum(run(p, x)[1] ** 2)))
        t0 = time.perf_counter()
        iterations = int(jax.block_until_ready(f(params, xs))[2])
        first = time.perf_counter() - t0
        mem = {
            "forward_temp_mib": f.lower(params, xs).compile().memory_analysis().temp_size_in_bytes / 2**20,
            "train_temp_mib": g.lower(params, xs).compile().memory_analysis().temp_size_in_bytes / 2**20,
        }
        fwd[m] = lambda f=f: jax.block_until_ready(f(params, xs))
        train[m] = lambda g=g: jax.block_until_ready(g(params, xs))
        out["methods"][m] = {"iterations": iterations, "first_call_s": first, **mem}
    for name, runs in (("forward", fwd), ("train", train)):
        medians = interleaved(runs, rounds)
        base = medians.get("sequential")
        for m, ms in medians.items():
            out["methods"][m][f"{name}_ms"] = ms
            out["methods"][m][f"{name}_ratio"] = ms / base if base else None
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| T | method | iterations | forward ms | x seq | train ms | x seq | fwd MiB | train MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for m, v in r["methods"].items():
            lines.append(
                f"| {r['T']} | {m} | {v['iterations']} | {v['forward_ms']:.1f} | {v['forward_ratio']:.1f} | "
                f"{v['train_ms']:.1f} | {v['train_ratio']:.1f} | {v['forward_temp_mib']:.1f} | "
                f"{v['train_temp_mib']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: T = 16, 32, H = 8, 2 rounds")
    ap.add_argument("--lengths", type=int, nargs="*", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.quick:
        lengths, B, H, rounds = [16, 32], 2, 8, 2
    else:
        lengths, B, H, rounds = args.lengths, args.batch, args.hidden, args.rounds
    results = []
    for T in lengths:
        results.append(measure(T, B=B, I=H, H=H, rounds=rounds))
        print(table(results[-1:]), flush=True)
    text = table(results)
    tag = "quick" if args.quick else jax.devices()[0].platform
    record = {
        "benchmark": "deer_time",
        "date": time.strftime("%Y-%m-%d"),
        "device": device_info(),
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"deer_time_{tag}.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.out, f"deer_time_{tag}.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.out}/deer_time_{tag}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
