"""One long sequence split by its time axis over host devices, against the same step on one device.

A B = 1 sequence of T steps (minGRU, float32, I = H = 64 by default): the training step (gradients of
``Σ ys²`` to params and xs) and the forward, with ``xs`` on one device (``method="sequential"``,
``"associative"`` and chunked) and with ``xs`` split by its time axis over every host device
(``jax.device_put(xs, NamedSharding(mesh, P(None, "time")))``, `rnnjax.parallel.sequence`). Every program
is compiled first, then all are timed interleaved, A B C ... A B C ..., for ``--rounds`` rounds; the median
of each is reported with its ratio to the fastest one-device method (ratio < 1: the split is faster).

    python -m benchmarks.sequence_split          # 2 host devices, T = 65,536; writes benchmarks/results/
    python -m benchmarks.sequence_split --quick  # a smoke run (T = 256, 2 rounds)

It splits the host into ``--host-devices`` XLA devices before JAX starts, so it must run in a fresh process.
On a CPU the devices share the machine's cores (and whatever else runs on them): a split can gain at most the
number of cores that are free.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rnnjax as rj
from benchmarks.parallel_time import method_tables, programs
from benchmarks.rnn_step import device_info, interleaved_times, save_results

# name -> (split the time axis over the devices, the keywords given to rj.unroll)
METHODS: dict[str, tuple[bool, dict[str, Any]]] = {
    "sequential": (False, {}),
    "associative": (False, {"method": "associative"}),
    "chunked 64": (False, {"method": "associative", "chunk_size": 64}),
    "split associative": (True, {"method": "associative"}),
    "split chunked 64": (True, {"method": "associative", "chunk_size": 64}),
}
CELLS = {"mingru": rj.mingru, "lru": lambda H: rj.lru(H // 2)}


def run_config(name: str, B: int, T: int, I: int, H: int, rounds: int) -> dict[str, Any]:
    """Every method's forward and training step at one shape: compiled temporary memory, first call and
    median time, and the ratio of each median to the fastest one-device method's."""
    cell = CELLS[name](H)
    params = cell.init(jax.random.key(0), I, jnp.float32)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    mesh = jax.make_mesh((len(jax.devices()),), ("time",))
    split_xs = jax.device_put(xs, NamedSharding(mesh, P(None, "time")))
    runs, result = {}, {}
    # how far the D devices run side by side on this machine now: each D-th of the sequence as a row of its
    # own, one part on one device, and one part on each device (no exchange), by the sequential training step
    D = len(jax.devices())
    parts = xs.reshape(D * B, T // D, I)
    by_rows = jax.device_put(parts, NamedSharding(mesh, P("time")))  # the mesh's one axis splits the rows
    train = programs(cell, {})[1]
    for label, x in (("part_on_one_device", parts[:B]), ("parts_on_all_devices", by_rows)):
        compiled = train.lower(params, x).compile()
        jax.block_until_ready(compiled(params, x))
        runs[("capacity", label)] = lambda c=compiled, x=x: jax.block_until_ready(c(params, x))
    for method, (split, options) in METHODS.items():
        r = result[method] = {"devices": len(jax.devices()) if split else 1}
        x = split_xs if split else xs
        for kind, fn in zip(("forward", "train"), programs(cell, options), strict=True):
            t0 = time.perf_counter()
            compiled = fn.lower(params, x).compile()
            jax.block_until_ready(compiled(params, x))
            r[f"{kind}_first_call_s"] = time.perf_counter() - t0
            r[f"{kind}_temp_mib"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
            runs[(method, kind)] = lambda c=compiled, x=x: jax.block_until_ready(c(params, x))
    times = interleaved_times(runs, rounds)
    capacity = {
        label: statistics.median(times.pop(("capacity", label)))
        for _, label in list(times)
        if _ == "capacity"
    }
    for (method, kind), ts in times.items():
        result[method][f"{kind}_ms"] = statistics.median(ts)
        result[method][f"{kind}_all_ms"] = ts
    for kind in ("forward", "train"):
        one = {m: result[m][f"{kind}_ms"] for m, (split, _) in METHODS.items() if not split}
        best = min(one, key=one.__getitem__)
        for method in METHODS:
            result[method][f"{kind}_ratio"] = result[method][f"{kind}_ms"] / one[best]
        result[f"{kind}_fastest_one_device"] = best
    # 1: the devices ran side by side as fast as one alone; D: one after the other (no core to spare)
    capacity["slowdown"] = capacity["parts_on_all_devices"] / capacity["part_on_one_device"]
    return {"cell": name, "B": B, "T": T, "I": I, "H": H, "results": result, "side_by_side": capacity}


def markdown(record: dict[str, Any]) -> str:
    d = record["device"]
    lines = [
        f"# One sequence split by time over {record['devices']} devices against one device "
        f"({d['jax_device']}, {d['cpu']}, {d['cores']} cores)",
        "",
        f"Median of {record['rounds']} interleaved rounds; ratio to the fastest one-device method "
        "(< 1: faster); compiled temp MiB.",
        "",
    ]
    lines += method_tables(record["configs"], METHODS, "ratio")
    lines += [
        "## the devices side by side",
        "",
        f"Each of the {record['devices']} parts of the sequence as a row of its own (sequential training "
        "step): one part on one device, and one part on each device with nothing exchanged. Their ratio says "
        f"how far the devices could run at once during the measurement (1: fully, {record['devices']}: one "
        "after the other).",
        "",
        "| config | one part, one device ms | a part on each device ms | ratio |",
        "|---|---|---|---|",
    ]
    for c in record["configs"]:
        cap = c["side_by_side"]
        lines.append(
            f"| {c['cell']} B={c['B']} T={c['T']} | {cap['part_on_one_device']:.2f} | "
            f"{cap['parts_on_all_devices']:.2f} | {cap['slowdown']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def plot(record: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind in zip(axes, ("forward", "train"), strict=True):
        labels, values = [], []
        for c in record["configs"]:
            for m in METHODS:
                labels.append(f"{c['cell']} T={c['T']}\n{m}")
                values.append(c["results"][m][f"{kind}_ms"])
        ax.barh(range(len(values)), values)
        ax.set_yticks(range(len(values)), labels, fontsize=6)
        ax.set_xlabel("ms (median)")
        ax.set_title(kind)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 256, 2 rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="I = H")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--cells", nargs="*", default=["mingru"], choices=list(CELLS))
    parser.add_argument("--host-devices", type=int, default=2, help="split the host into N XLA devices")
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON record and table")
    parser.add_argument("--plot-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.host_devices < 2:
        parser.error(f"--host-devices must be >= 2, got {args.host_devices}")
    flag = f"--xla_force_host_platform_device_count={args.host_devices}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    if len(jax.devices()) != args.host_devices:
        raise SystemExit(
            f"--host-devices {args.host_devices}: JAX had started already with {len(jax.devices())} "
            f"device(s); run python -m benchmarks.sequence_split in a fresh process"
        )
    lengths = args.lengths or ([256] if args.quick else [65536])
    rounds = 2 if args.quick else args.rounds
    size = 8 if args.quick else args.size
    record: dict[str, Any] = {
        "device": device_info(),
        "devices": args.host_devices,
        "rounds": rounds,
        "dtype": "float32",
        "methods": {m: {"split": s, **o} for m, (s, o) in METHODS.items()},
        "configs": [],
    }
    for cell in args.cells:
        for T in lengths:
            record["configs"].append(run_config(cell, args.batch, T, size, size, rounds))
            print(
                cell,
                T,
                {
                    m: round(r["train_ms"], 2)
                    for m, r in record["configs"][-1]["results"].items()
                    if m in METHODS
                },
                flush=True,
            )
    save_results("sequence_split", args.quick, record, markdown(record), plot, args.out, args.plot_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
