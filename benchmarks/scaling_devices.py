"""Training-step time over devices and processes: data parallelism on 1 device, on 2 host devices in one
process, and on 2 processes of 1 device each (`python -m rnnjax.launch`, gloo's collectives).

One training step = forward + backward of ``mean ys²`` over all outputs of an LSTM or GRU (the rnn_step
configs), the gradients summed over every device (one all-reduce of the parameters' size), and an SGD
update; float32, parameters replicated, the batch split by rows. Two kinds of scaling:

- **strong**: the global batch ``B`` fixed, split over D devices (ideal: the time falls as 1/D);
- **weak**: ``B`` rows per device, ``D·B`` in all (ideal: the time stays the same).

Each topology also trains ``examples/char_lm.py --quick --data-parallel`` (its 16 tracks split over the
devices: strong scaling) for ``--char-lm-steps`` steps, and reports its training steps per second: the
median of its steps' wall times after the first (which compiles), evaluation and sampling left out.

Each topology runs in a fresh process (or two), which times every config after a warm-up; process 0
writes its times, and this driver gathers them into
``benchmarks/results/scaling_devices_<platform>.{json,md}``, with the machine named.

    python -m benchmarks.scaling_devices            # the rnn_step LSTM and GRU configs, char_lm 30 steps
    python -m benchmarks.scaling_devices --quick    # a smoke run: tiny shapes, 2 rounds, char_lm 3 steps
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.rnn_step import CONFIGS, QUICK_CONFIGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, processes, devices per process)
TOPOLOGIES = [
    ("1 process x 1 device", 1, 1),
    ("1 process x 2 devices", 1, 2),
    ("2 processes x 1 device", 2, 1),
]


def _configs(quick: bool) -> list[tuple]:
    """The LSTM and GRU configs of rnn_step (quick: its tiny LSTM)."""
    return [c for c in (QUICK_CONFIGS if quick else CONFIGS) if c[0] in ("lstm", "gru")][: 1 if quick else 2]


def _train_step(cell: Any, params: Any, xs: Any) -> tuple[Any, Any]:
    """One SGD step on ``mean ys²`` of ``xs [B, T, I]``: the new parameters and the loss."""
    import jax
    import jax.numpy as jnp

    import rnnjax as rj

    def loss(p: Any) -> jax.Array:
        _, ys = rj.unroll(cell, p, xs)
        return jnp.mean(ys**2)

    value, grads = jax.value_and_grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, params, grads), value


def char_lm_steps(steps: int) -> dict[str, Any]:
    """``examples.char_lm --quick --data-parallel`` trained for ``steps`` steps over every device of every
    process (the working directory takes its plot): its steps per second after the first step."""
    from examples import char_lm

    argv = ["--quick", "--no-progress", "--data-parallel", "--steps", str(steps), "--checkpoint-every", "0"]
    result = char_lm.main(argv)
    first, *timed = result["step_seconds"]
    median = statistics.median(timed)
    cfg = char_lm.QUICK
    return {
        "steps": steps,
        "tracks": cfg.batch_size,
        "window": cfg.window,
        "hidden_size": cfg.hidden_size,
        "rows_per_device": result["rows_per_device"],
        "median_step_ms": 1e3 * median,
        "steps_per_s": 1 / median,
        "first_step_s": first,
    }


def worker(configs: list[tuple], rounds: int, out: str, char_lm: int = 0) -> None:
    """Times every config's training step, strong and weak, on every device of every process, and
    ``char_lm`` steps of the char_lm example (0: none); process 0 writes
    ``{configs: {config: {scaling: {median_ms, ...}}}, char_lm: {...}}`` to ``out``."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import rnnjax as rj
    from rnnjax.launch import initialize, process_rows

    initialize()
    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("data",))
    rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    results: dict[str, Any] = {}
    with jax.set_mesh(mesh):
        for name, B, T, I, H in configs:
            cell = {"lstm": rj.lstm, "gru": rj.gru}[name](H)
            init = functools.partial(cell.init, jax.random.key(0), I)
            params = jax.jit(init, out_shardings=replicated)()
            step = jax.jit(functools.partial(_train_step, cell))

            entry: dict[str, Any] = {}
            for scaling, global_b in (("strong", B), ("weak", B * devices)):
                batch = np.random.default_rng(1).standard_normal((global_b, T, I)).astype(np.float32)
                xs = jax.make_array_from_process_local_data(rows, batch[process_rows(rows, global_b)])
                t0 = time.perf_counter()
                p, _ = jax.block_until_ready(step(params, xs))
                first = time.perf_counter() - t0
                jax.block_until_ready(step(p, xs))
                times = []
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    p, _ = jax.block_until_ready(step(p, xs))
                    times.append(1e3 * (time.perf_counter() - t0))
                entry[scaling] = {
                    "global_B": global_b,
                    "rows_per_device": global_b // devices,
                    "median_ms": statistics.median(times),
                    "times_ms": times,
                    "first_call_s": first,
                }
            grad_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
            entry["gradient_mib"] = grad_bytes / 2**20
            results[f"{name} B={B} T={T} I={I} H={H}"] = entry
    record = {"processes": jax.process_count(), "devices": devices, "configs": results}
    if char_lm:
        record["char_lm"] = char_lm_steps(char_lm)
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(record, f)


def _run_topology(
    processes: int, per_process: int, configs: list[tuple], rounds: int, char_lm: int
) -> dict[str, Any]:
    """One topology's times, from a fresh process (or the launcher's processes), run in a scratch folder
    (char_lm writes its plot and samples there)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        command = [
            sys.executable,
            "-m",
            "benchmarks.scaling_devices",
            "--worker",
            out,
            "--rounds",
            str(rounds),
        ]
        command += ["--configs", json.dumps(configs), "--char-lm-steps", str(char_lm)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, *sys.path]))
        if processes > 1:
            launcher = [sys.executable, "-m", "rnnjax.launch", "-n", str(processes)]
            command = [*launcher, "--devices-per-process", str(per_process), "--", *command]
        else:
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
            env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={per_process}"])
        run = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            raise RuntimeError(f"{command} failed with {run.returncode}:\n{run.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def markdown(record: dict[str, Any]) -> str:
    from benchmarks.rnn_step import device_label

    names = [t["name"] for t in record["topologies"]]
    base = record["topologies"][0]["configs"]
    lines = [
        f"Data-parallel training step on {device_label(record['device'])}, {record['date']}, float32, "
        f"median of {record['rounds']} rounds; the machine's load average "
        f"{record['load_before']:.1f} before, {record['load_after']:.1f} after.",
        "",
        "Strong scaling: the global batch fixed; weak scaling: the rows per device fixed. Speed-up (strong) "
        "is the one-device time over this time (ideal: the device count); efficiency (weak) is the "
        "one-device time over this time (ideal: 1.0).",
        "",
        "| config | scaling | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for config in base:
        for scaling, word in (("strong", "speed-up"), ("weak", "efficiency")):
            t1 = base[config][scaling]["median_ms"]
            cells = []
            for t in record["topologies"]:
                r = t["configs"][config][scaling]
                cells.append(f"{r['median_ms']:.1f} ms (B={r['global_B']}, {word} {t1 / r['median_ms']:.2f})")
            lines.append(f"| {config} | {scaling} | " + " | ".join(cells) + " |")
    if all("char_lm" in t for t in record["topologies"]):
        first = record["topologies"][0]["char_lm"]
        cells = []
        for t in record["topologies"]:
            r = t["char_lm"]
            cells.append(
                f"{r['steps_per_s']:.1f} steps/s ({r['median_step_ms']:.1f} ms, "
                f"speed-up {r['steps_per_s'] / first['steps_per_s']:.2f})"
            )
        name = f"char_lm --quick B={first['tracks']} T={first['window']} H={first['hidden_size']}"
        lines.append(f"| {name} | strong | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"char_lm: the example's training steps per second, its {first['tracks']} tracks split over the "
            f"devices; the median of {first['steps'] - 1} steps after the first (which compiles), its "
            "evaluation and sampling left out.",
        ]
    lines += [
        "",
        "Gradient all-reduced per step: "
        + ", ".join(f"{c}: {base[c]['gradient_mib']:.2f} MiB" for c in base)
        + ".",
        "",
        record["note"],
        "",
    ]
    return "\n".join(lines)


NOTE = (
    "What a 2-core machine can show: that the split works and what it costs, not how it scales. Every "
    "topology has the same 2 cores in all (shared, on a busy machine, with other work), and one CPU "
    "device's GEMMs may already use both. A speed-up above 1 means the split kept the cores busier than "
    "one device did (one program per core); below 1, that the split's costs (smaller GEMMs per device, "
    "the all-reduce, gloo's TCP transfers between processes, two processes' threads competing) outweigh "
    "that. On a busy machine two processes also get a larger share of the cores than one, which can "
    "show as a speed-up above the device count; read the load average above before the ratios. Times "
    "vary by tens of percent from run to run here. Where each added device brings its own "
    "compute (GPUs, hosts), a training step costs its rows' compute plus one all-reduce of the gradients "
    "(the size above): adding a host helps while a step's compute per host is well above that "
    "all-reduce's time (the gradients' size over the network's bandwidth, plus a latency per step), and "
    "weak scaling then stays near 1.0. char_lm --quick is the small end of that model: its step's compute "
    "is short, so a split step's fixed costs (the all-reduce; between processes, gloo's round trips over "
    "TCP) weigh more in it than in the rnn_step configs, as they would for any small model over hosts."
)


def plot(record: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.rnn_step import device_label, grouped_bars

    topologies = record["topologies"]
    configs = list(topologies[0]["configs"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, scaling in zip(axes, ("strong", "weak"), strict=True):
        series = {t["name"]: [t["configs"][c][scaling]["median_ms"] for c in configs] for t in topologies}
        grouped_bars(ax, series, [c.replace(" B=", "\nB=") for c in configs], fontsize=8)
        ax.set(ylabel="training step (ms, median)", title=f"{scaling} scaling")
    axes[0].legend(fontsize=8)
    fig.suptitle(device_label(record["device"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--char-lm-steps",
        type=int,
        help="char_lm training steps per topology (the first compiles; 0: none; default 30, --quick 3)",
    )
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON record and table")
    parser.add_argument("--plot-dir", default="runs/benchmarks", help="folder for the plot (git-ignored)")
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--configs", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.char_lm_steps is None:
        args.char_lm_steps = 3 if args.quick else 30
    if args.char_lm_steps == 1 or args.char_lm_steps < 0:
        parser.error(f"--char-lm-steps must be 0 or >= 2 (the first compiles), got {args.char_lm_steps}")
    if args.worker:
        worker([tuple(c) for c in json.loads(args.configs)], args.rounds, args.worker, args.char_lm_steps)
        return 0

    configs = _configs(args.quick)
    rounds = 2 if args.quick else args.rounds
    # the machine's load (runnable processes, 1-minute mean) before and after: on a shared machine, others'
    # work takes cores from every topology
    record: dict[str, Any] = {"rounds": rounds, "dtype": "float32", "load_before": os.getloadavg()[0]}
    record["char_lm_steps"] = args.char_lm_steps
    record["topologies"] = []
    for name, processes, per_process in TOPOLOGIES:
        print(f"{name} ...", flush=True)
        times = _run_topology(processes, per_process, configs, rounds, args.char_lm_steps)
        assert times["devices"] == processes * per_process and times["processes"] == processes, times
        record["topologies"].append({"name": name, **times})
    # JAX starts in this process only now: a process forked from one where JAX runs may deadlock
    from benchmarks.rnn_step import device_info, save_results

    record["load_after"] = os.getloadavg()[0]
    record["device"] = device_info()
    record["date"] = time.strftime("%Y-%m-%d", time.gmtime())
    record["note"] = NOTE
    save_results("scaling_devices", args.quick, record, markdown(record), plot, args.out, args.plot_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
