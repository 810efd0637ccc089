"""How training-step time and compiled memory scale with T and with H: manual BPTT, autodiff, and manual with
``checkpoint="sqrt"``, plus one LSTM training step at T = 100,000 in checkpoint mode.

    python -m benchmarks.scaling            # benchmarks/results/scaling_<platform>.{json,md}; plot in runs/
    python -m benchmarks.scaling --quick    # a smoke run
    python -m benchmarks.scaling --budget-only   # re-measure the memory-budgeted BPTT rows, keep the rest
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

import rnnjax as rj
from benchmarks.rnn_step import device_info, device_label, save_results

MODES = {
    "manual": {"grad": "manual"},
    "autodiff": {"grad": "autodiff"},
    "manual + sqrt checkpoints": {"grad": "manual", "checkpoint": "sqrt"},
}


def measure(B: int, T: int, I: int, H: int, rounds: int, many_to_one: bool = False) -> dict[str, Any]:
    """Median time and compiled temporary memory of an LSTM training step, for every mode."""
    cell = rj.lstm(H)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    out = {}
    for name, kw in MODES.items():

        def loss(p: Any, x: Any, kw: dict = kw) -> Any:
            carry, ys = rj.unroll(cell, p, x, **kw)
            return jnp.sum(carry.h**2) if many_to_one else jnp.sum(ys**2)

        step = jax.jit(jax.value_and_grad(loss))
        temp = step.lower(params, xs).compile().memory_analysis().temp_size_in_bytes / 2**20
        times = []
        if rounds:
            jax.block_until_ready(step(params, xs))
            for _ in range(rounds):
                t0 = time.perf_counter()
                jax.block_until_ready(step(params, xs))
                times.append(1e3 * (time.perf_counter() - t0))
        out[name] = {"temp_mib": temp, "median_ms": statistics.median(times) if times else None}
    return out


def long_sequence(B: int, T: int, I: int, H: int) -> dict[str, Any]:
    """One many-to-one LSTM training step at a long T with √T checkpoints (plain BPTT: compiled only)."""
    cell = rj.lstm(H)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    result = {"B": B, "T": T, "I": I, "H": H}
    for name, ck in (("plain", None), ("sqrt", "sqrt")):
        step = jax.jit(
            jax.value_and_grad(lambda p, x, ck=ck: jnp.sum(rj.unroll(cell, p, x, checkpoint=ck)[0].h ** 2))
        )
        result[f"{name}_temp_mib"] = (
            step.lower(params, xs).compile().memory_analysis().temp_size_in_bytes / 2**20
        )
        if ck is not None:
            t0 = time.perf_counter()
            value, grads = jax.block_until_ready(step(params, xs))
            result["sqrt_first_step_s"] = time.perf_counter() - t0
            result["finite"] = bool(jnp.isfinite(value)) and all(
                bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)
            )
    return result


BUDGET_MODES = ("sqrt", "budget", "nested")  # compared with plain BPTT


def budget(B: int, T: int, I: int, H: int, rounds: int, budget_bytes: int) -> dict[str, Any]:
    """Issue 6's acceptance for memory-budgeted BPTT: plain BPTT, √T checkpoints and ``budget=`` on the
    binomial schedule (the default) and on the nested one, timed.

    Many-to-one (the loss reads the final state), as the long-sequence case; the compiled memory of a loss on
    every output is recorded too (its outputs and their gradients are O(T) whatever the backward keeps).
    """
    cell = rj.lstm(H)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    result: dict[str, Any] = {"B": B, "T": T, "I": I, "H": H, "budget_bytes": budget_bytes}
    sizes = rj.remat.step_sizes(cell, params, cell.initial_carry(params, (B,)), xs)
    result["budget_schedule"] = list(rj.remat.budget_schedule(T, budget_bytes, sizes))
    K, snapshots = rj.binomial.binomial_schedule(T, budget_bytes, sizes)
    plan = rj.binomial.binomial_plan(T, K, snapshots)
    result["binomial_plan"] = {"K": K, "snapshots": plan.snapshots, "recomputed_steps": plan.advances * K}
    grads = {}
    modes = (
        ("plain", {}),
        ("sqrt", {"checkpoint": "sqrt"}),
        ("budget", {"budget": budget_bytes}),
        ("nested", {"budget": budget_bytes, "schedule": "nested"}),
    )
    for name, kw in modes:
        for loss_name, read in (
            ("last", lambda c, ys: jnp.sum(c.h**2)),
            ("all", lambda c, ys: jnp.sum(ys**2)),
        ):
            step = jax.jit(
                jax.value_and_grad(lambda p, x, kw=kw, read=read: read(*rj.unroll(cell, p, x, **kw)))
            )
            mem = step.lower(params, xs).compile().memory_analysis().temp_size_in_bytes / 2**20
            result[f"{name}_{loss_name}_temp_mib"] = mem
            if loss_name == "last":
                grads[name] = jax.block_until_ready(step(params, xs))[1]
                times = []
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    jax.block_until_ready(step(params, xs))
                    times.append(time.perf_counter() - t0)
                result[f"{name}_s"] = statistics.median(times)
    result["grad_rel_diff"] = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
        for mode in BUDGET_MODES
        for a, b in zip(jax.tree.leaves(grads[mode]), jax.tree.leaves(grads["plain"]), strict=True)
    )
    return result


def markdown(record: dict[str, Any]) -> str:
    modes = list(MODES)
    lines = [
        f"LSTM training step on {device_label(record['device'])}, float32.",
        "",
    ]
    for title, key in (("against T", "by_T"), ("against H", "by_H")):
        cfg = record[key]["config"]
        lines += [
            f"**Time and compiled temporary memory {title}** ({cfg}; loss Σ ys² over all outputs):",
            "",
            "| " + (" T " if key == "by_T" else " H ") + " | " + " | ".join(modes) + " |",
            "|---|" + "---|" * len(modes),
        ]
        for row in record[key]["rows"]:
            cells = []
            for m in modes:
                r = row["results"][m]
                t = f"{r['median_ms']:.1f} ms, " if r["median_ms"] is not None else ""
                cells.append(f"{t}{r['temp_mib']:.1f} MiB")
            lines.append(f"| {row['x']} | " + " | ".join(cells) + " |")
        lines.append("")
    L = record["long"]
    lines += [
        f"**T = {L['T']:,}** (many-to-one, B={L['B']}, I={L['I']}, H={L['H']}): with √T checkpoints the "
        f"training step compiles to {L['sqrt_temp_mib']:.1f} MiB of temporary memory and ran in "
        f"{L['sqrt_first_step_s']:.1f} s (first call, compile included; gradients finite: {L['finite']}); "
        f"plain BPTT would need {L['plain_temp_mib']:.0f} MiB.",
        "",
    ]
    if "budget" in record:
        b = record["budget"]
        plan = b["binomial_plan"]
        lines += [
            f"**Memory-budgeted BPTT** (LSTM B={b['B']}, T={b['T']:,}, I={b['I']}, H={b['H']}, many-to-one):",
            "",
            f"| | plain manual BPTT | √T checkpoints | ratio | `budget={b['budget_bytes'] / 2**20:.3g} MiB`, "
            f"binomial (leaves of {plan['K']} steps, {plan['snapshots']} snapshots) | ratio "
            f'| same budget, `schedule="nested"` (segments {b["budget_schedule"]}) | ratio |',
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, key, unit in (
            ("compiled temp memory", "last_temp_mib", "MiB"),
            ("training step (median)", "s", "s"),
            ("same, loss on every output", "all_temp_mib", "MiB"),
        ):
            cells = [f"{b['plain_' + key]:.2f} {unit}"]
            for mode in BUDGET_MODES:
                cells += [
                    f"{b[mode + '_' + key]:.2f} {unit}",
                    f"{b[mode + '_' + key] / b['plain_' + key]:.3f}",
                ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"The binomial schedule recomputes {plan['recomputed_steps']:,} steps on top of one more forward "
            f"of every leaf; the nested one, {len(b['budget_schedule'])} more forward passes "
            f"({len(b['budget_schedule']) * b['T']:,} steps). "
            "Largest relative difference between the checkpointed modes' gradients and plain BPTT's "
            f"(float32): {b['grad_rel_diff']:.1e}.",
            "",
        ]
    return "\n".join(lines)


def plot(record: dict[str, Any], path: str) -> None:
    """Time and memory against T and against H (log-log), one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, key in enumerate(("by_T", "by_H")):
        rows = record[key]["rows"]
        xs = [row["x"] for row in rows]
        for mode in MODES:
            times = [row["results"][mode]["median_ms"] for row in rows]
            mems = [max(row["results"][mode]["temp_mib"], 1e-3) for row in rows]
            if all(t is not None for t in times):
                axes[0, col].plot(xs, times, marker="o", label=mode)
            axes[1, col].plot(xs, mems, marker="o", label=mode)
        for row, ylabel in ((0, "training step (ms)"), (1, "compiled temp memory (MiB)")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(("T" if key == "by_T" else "H") + f"   ({record[key]['config']})")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"LSTM training step on {device_label(record['device'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--plot-dir", default="runs/benchmarks", help="folder for the plot (git-ignored)")
    parser.add_argument(
        "--budget-only",
        action="store_true",
        help="re-measure only the budgeted-BPTT rows of the saved record",
    )
    args = parser.parse_args(argv)
    budget_args = (2, 100, 4, 8, 1, 2**14) if args.quick else (32, 10_000, 256, 256, 3, 24 * 2**20)
    if args.budget_only:
        tag = "quick" if args.quick else jax.devices()[0].platform
        with open(os.path.join(args.out, f"scaling_{tag}.json")) as f:
            record = json.load(f)
        record["budget"] = budget(*budget_args)
        save_results("scaling", args.quick, record, markdown(record), plot, args.out, args.plot_dir)
        return 0
    rounds = 1 if args.quick else args.rounds
    Ts = [16, 64] if args.quick else [64, 256, 1024, 4096, 16384]
    Hs = [8] if args.quick else [64, 128, 256, 512, 1024]
    B, I, H = (2, 4, 8) if args.quick else (8, 32, 128)
    record: dict[str, Any] = {"device": device_info(), "dtype": "float32"}
    record["by_T"] = {"config": f"B={B}, I={I}, H={H}", "rows": []}
    for T in Ts:
        print(f"T={T} ...", flush=True)
        record["by_T"]["rows"].append({"x": T, "results": measure(B, T, I, H, rounds)})
    Bh, Th = (2, 8) if args.quick else (16, 128)
    record["by_H"] = {"config": f"B={Bh}, T={Th}, I=H", "rows": []}
    for h in Hs:
        print(f"H={h} ...", flush=True)
        record["by_H"]["rows"].append({"x": h, "results": measure(Bh, Th, h, h, rounds)})
    print("long sequence ...", flush=True)
    record["long"] = long_sequence(*((2, 200, 4, 8) if args.quick else (8, 100_000, 32, 128)))
    print("memory-budgeted BPTT ...", flush=True)
    record["budget"] = budget(*budget_args)
    save_results("scaling", args.quick, record, markdown(record), plot, args.out, args.plot_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
