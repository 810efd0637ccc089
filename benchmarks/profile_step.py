"""Where one training step's time goes: XLA's own per-kernel timings, grouped by phase of the step.

One jitted training step of rnnjax (``grad="manual"`` or ``"autodiff"``) is traced with `jax.profiler`
(a Perfetto trace that XLA:CPU fills with one event per executed kernel, a "thunk"). Each step is split at
its time loops (the compiled ``while`` thunks: the forward's, then the backward's), so the report says
how long the step spends before the first loop (the input projection), in each loop and between and after
them (the weight-gradient GEMMs), and which kernels fill each phase: total milliseconds per step and calls
per step. Kernel names are the compiled HLO's (``jax.jit(f).lower(...).compile().as_text()`` shows what
each computes); a ``ynn_fusion`` or ``dot`` is a GEMM, ``*_fusion`` elementwise work, and a kernel called
T times per step runs inside a loop.

    python -m benchmarks.profile_step                       # LSTM B=32 T=128 I=H=256, grad="manual"
    python -m benchmarks.profile_step --cell gru --grad autodiff --shape 16 512 64 128
    python -m benchmarks.profile_step --quick               # a smoke run (small shapes)

Phase times are wall time on the timeline; kernel times are summed over threads, so a GEMM that several
threads run at once can add up to more than its phase.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

import rnnjax as rj

CELLS = {"lstm": rj.lstm, "gru": rj.gru, "elman": rj.elman}


def trace_step(jitted: Any, args: tuple, directory: str) -> list[dict[str, Any]]:
    """The complete ("X") events of one traced call of ``jitted(*args)``."""
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        jax.block_until_ready(jitted(*args))
    files = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {directory}")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def hlo_names(compiled_text: str) -> set[str]:
    """The instruction names of a compiled HLO module (``%name = ...``), the names its kernels run under."""
    return set(re.findall(r"%([\w.\-]+) = ", compiled_text))


def split_phases(kernels: list[dict[str, Any]], end: float) -> list[tuple[str, float, float]]:
    """``(label, start, end)`` of each phase of one step from its kernel events (times in µs); ``end`` is
    when the call returned (a GEMM's event may end before its worker threads do).

    A kernel that runs more than once in the step runs in a loop; the span from its first to its last run
    lies inside that loop, and overlapping spans are one loop. (XLA:CPU's ``while`` events themselves do not
    cover their bodies, so they are not used.) Between and around the loops lie the phases that run once.
    """
    start = min(e["ts"] for e in kernels)
    end = max([end] + [e["ts"] + e["dur"] for e in kernels])
    runs: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in kernels:
        runs[e["name"]].append(e)
    spans = sorted(
        (min(e["ts"] for e in es), max(e["ts"] + e["dur"] for e in es)) for es in runs.values() if len(es) > 1
    )
    loops: list[list[float]] = []
    for a, b in spans:
        if loops and a <= loops[-1][1]:
            loops[-1][1] = max(loops[-1][1], b)
        else:
            loops.append([a, b])
    if not loops:
        return [("whole step", start, end)]
    phases = [("before the first loop", start, loops[0][0])]
    for i, (a, b) in enumerate(loops):
        phases.append((f"loop {i + 1}", a, b))
        if i + 1 < len(loops):
            phases.append((f"between loops {i + 1} and {i + 2}", b, loops[i + 1][0]))
    phases.append(("after the last loop", loops[-1][1], end))
    return phases


def phases(jitted: Any, args: tuple, steps: int) -> list[dict[str, Any]]:
    """Per phase of the step, averaged over ``steps`` traced calls (after two warm-up calls): wall ms per
    step, and the kernels that ran in it with their ms and calls per step."""
    names = hlo_names(jitted.lower(*args).compile().as_text())
    for _ in range(2):
        jax.block_until_ready(jitted(*args))
    wall: dict[str, float] = collections.defaultdict(float)
    time_in: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    count_in: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    order: list[str] = []
    for _ in range(steps):
        with tempfile.TemporaryDirectory() as directory:
            events = trace_step(jitted, args, directory)
        kernels = [e for e in events if e["name"] in names and not re.fullmatch(r"while(\.\d+)?", e["name"])]
        if not kernels:
            raise RuntimeError("the trace holds no kernel events: is this XLA:CPU?")
        # the step ends when block_until_ready returns (Python's own events in the same trace)
        waits = [e["ts"] + e["dur"] for e in events if "block_until_ready" in e["name"]]
        spans = split_phases(kernels, max(waits, default=0.0))
        for label, a, b in spans:
            if label not in order:
                order.append(label)
            wall[label] += (b - a) / steps
        for e in kernels:
            label = next((lab for lab, a, b in spans if a <= e["ts"] < b), spans[-1][0])
            time_in[label][e["name"]] += e["dur"] / steps
            count_in[label][e["name"]] += 1 / steps
    return [
        {
            "phase": label,
            "wall_ms": wall[label] / 1e3,
            "kernels": [
                {"name": n, "ms": us / 1e3, "calls": round(count_in[label][n], 2)}
                for n, us in time_in[label].most_common()
            ],
        }
        for label in order
    ]


def markdown(record: dict[str, Any], top: int) -> str:
    c = record["config"]
    total = sum(p["wall_ms"] for p in record["phases"])
    lines = [
        f"rnnjax training step, {c['cell']} B={c['B']} T={c['T']} I={c['I']} H={c['H']}, "
        f'`grad="{c["grad"]}"`, float32, {record["steps"]} traced steps: {total:.1f} ms per step. '
        f"Device: {record['device']}.",
        "",
        "| phase | wall ms / step | largest kernels: ms / step (calls / step) |",
        "|---|---|---|",
    ]
    for p in record["phases"]:
        ks = ", ".join(f"`{k['name']}` {k['ms']:.2f} ({k['calls']:g})" for k in p["kernels"][:top])
        lines.append(f"| {p['phase']} | {p['wall_ms']:.1f} | {ks} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", choices=list(CELLS), default="lstm")
    parser.add_argument("--grad", choices=list(rj.GRAD_MODES), default="manual")
    parser.add_argument(
        "--shape", nargs=4, type=int, metavar=("B", "T", "I", "H"), default=[32, 128, 256, 256]
    )
    parser.add_argument("--steps", type=int, default=5, help="traced training steps")
    parser.add_argument("--top", type=int, default=5, help="kernels listed per phase")
    parser.add_argument("--quick", action="store_true", help="small shapes, 2 steps: a smoke run")
    parser.add_argument("--out", default=None, help="also write <out>/profile_<cell>_<grad>.{json,md}")
    args = parser.parse_args(argv)
    B, T, I, H = (4, 16, 8, 8) if args.quick else args.shape
    steps = 2 if args.quick else args.steps
    cell = CELLS[args.cell](H)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    step = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(rj.unroll(cell, p, x, grad=args.grad)[1] ** 2)))
    dev = jax.devices()[0]
    record = {
        "config": {"cell": args.cell, "grad": args.grad, "B": B, "T": T, "I": I, "H": H},
        "steps": steps,
        "date": datetime.date.today().isoformat(),
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}, {os.cpu_count()} CPU cores",
        "phases": phases(step, (params, xs), steps),
    }
    table = markdown(record, args.top)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"profile_{args.cell}_{args.grad}")
        with open(stem + ".json", "w") as f:
            json.dump(record, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
