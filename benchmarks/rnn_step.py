"""Training-step time of rnnjax against Flax (linen, NNX), Equinox, Haiku and PyTorch, side by side.

One training step = forward + backward of ``Σ ys²`` over all outputs, gradients to the parameters, float32,
zero initial state. All libraries run in one process: each is built and warmed up (the first call, compile
included, is timed separately), then the steps are interleaved A B C ... A B C ... for ``--rounds`` rounds,
and the median of each is reported with its ratio to rnnjax's hand-derived BPTT (ratio > 1: rnnjax is
faster). For JAX libraries the compiled temporary memory is reported too.

    python -m benchmarks.rnn_step                 # the configs of issue 5; writes benchmarks/results/
    python -m benchmarks.rnn_step --quick         # a smoke run (small shapes, 3 rounds)
    python -m benchmarks.rnn_step --host-devices 2  # also each JAX step with the batch split over 2 CPUs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from importlib import metadata
from typing import Any

import jax

from benchmarks.peers import LIBRARIES, on_all_devices

CONFIGS = [
    ("lstm", 32, 128, 256, 256),
    ("gru", 32, 128, 256, 256),
    ("elman", 32, 128, 256, 256),
    ("lstm", 16, 512, 64, 128),
]
# on a GPU, also the larger shapes GPUs are used for
GPU_CONFIGS = [*CONFIGS, ("lstm", 64, 256, 512, 512), ("gru", 64, 256, 512, 512)]
QUICK_CONFIGS = [("lstm", 4, 16, 8, 8), ("gru", 4, 16, 8, 8), ("elman", 4, 16, 8, 8)]


ENV_PREFIXES = ("GLIBC_TUNABLES", "MALLOC_", "XLA_FLAGS", "OMP_", "MKL_", "LD_PRELOAD")


def minor_faults() -> int:
    """Minor page faults of this process so far (``getrusage``).

    On Linux with glibc, an allocation above the mmap threshold (at most 32 MiB) is a fresh ``mmap`` on
    every call and is unmapped when freed. XLA:CPU allocates each call's temporaries as one block (the
    compiled temp size), so a JAX training step of a few tens of MiB touches, and faults in, every 4 KiB
    page of it on every call; PyTorch's allocations fault the same way. The count per step is reported
    beside the times, because it moves them: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35,
    transparent huge pages in ``madvise`` mode) makes those blocks 2 MiB pages.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def device_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(),  # the docs' benchmark tables name it
        "jax_device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        # process-wide settings that move every library's times (see `minor_faults`)
        "environment": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)},
        "versions": {
            p: _version(p) for p in ("jax", "jaxlib", "flax", "equinox", "dm-haiku", "torch", "rnnjax")
        },
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def save_results(
    name: str, quick: bool, record: dict[str, Any], table: str, plot_fn: Any, out: str, plot_dir: str
) -> None:
    """Prints the table; writes ``<out>/<name>_<tag>.json`` and ``.md`` and ``<plot_dir>/<name>_<tag>.png``.

    ``tag`` is ``quick`` for smoke runs, else the JAX platform (``cpu``, ``gpu``), so results from different
    devices sit side by side.
    """
    print(table)
    tag = "quick" if quick else jax.devices()[0].platform
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}_{tag}.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(out, f"{name}_{tag}.md"), "w") as f:
        f.write(table)
    os.makedirs(plot_dir, exist_ok=True)
    plot_fn(record, os.path.join(plot_dir, f"{name}_{tag}.png"))
    print(f"wrote {out}/{name}_{tag}.json, .md and {plot_dir}/{name}_{tag}.png")


def split_name(name: str, devices: int) -> str:
    """The result's name of library ``name``'s step with the batch split over ``devices`` devices."""
    return f"{name} on {devices} devices"


def run_config(config: tuple, rounds: int, libraries: list[str]) -> dict[str, Any]:
    """Every library's training step at ``config``, interleaved; with several devices, also each JAX
    library's step with the batch split over all of them (`benchmarks.peers.on_all_devices`)."""
    cell, B, T, I, H = config
    devices = len(jax.devices())
    if devices > 1 and B in (I, H):
        raise ValueError(f"B={B} equals I or H: the parameters could not be told from the batch")
    built, result = {}, {}

    def warm_up(name: str, b: Any) -> None:
        t0 = time.perf_counter()
        b.step()
        first = time.perf_counter() - t0
        temp = None
        if b.jitted is not None:
            temp = b.jitted.lower(*b.args).compile().memory_analysis().temp_size_in_bytes / 2**20
        b.step()  # a second warm-up call
        built[name] = b
        result[name] = {"first_call_s": first, "temp_mib": temp, "times_ms": [], "faults": []}

    for name in libraries:
        try:
            b = LIBRARIES[name](cell, B, T, I, H)
            warm_up(name, b)
        except (ImportError, NotImplementedError) as e:
            result[name] = {"unavailable": f"{type(e).__name__}: {e}"}
            continue
        if devices > 1 and b.jitted is not None and name != "jax cudnn":
            warm_up(split_name(name, devices), on_all_devices(b, B))
    for _ in range(rounds):
        for name, b in built.items():
            f0, t0 = minor_faults(), time.perf_counter()
            b.step()
            result[name]["times_ms"].append(1e3 * (time.perf_counter() - t0))
            result[name]["faults"].append(minor_faults() - f0)
    base = statistics.median(result["rnnjax manual"]["times_ms"]) if "rnnjax manual" in built else None
    for name in built:
        r = result[name]
        r["median_ms"] = statistics.median(r["times_ms"])
        r["median_faults"] = statistics.median(r["faults"])
        r["ratio_to_rnnjax"] = r["median_ms"] / base if base else None
    return {"cell": cell, "B": B, "T": T, "I": I, "H": H, "devices": devices, "results": result}


def interleaved_times(runs: dict[Any, Any], rounds: int, warm_ups: int = 0) -> dict[Any, list[float]]:
    """Wall times in ms of each of ``runs`` (callables that block until done), after ``warm_ups`` calls
    each, timed in turn A B C ... A B C ... for ``rounds`` rounds: round ``r`` of every run is entry ``r``
    of its list, so runs can be compared round by round."""
    for f in runs.values():
        for _ in range(warm_ups):
            f()
    times: dict[Any, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(1e3 * (time.perf_counter() - t0))
    return times


def interleaved(runs: dict[Any, Any], rounds: int) -> dict[Any, float]:
    """Median wall time in ms of each of ``runs`` (callables that block until done), after two warm-up
    calls each, timed in turn A B C ... for ``rounds`` rounds (`interleaved_times`)."""
    return {k: statistics.median(v) for k, v in interleaved_times(runs, rounds, warm_ups=2).items()}


def own_gemms(B: int, T: int, I: int, H: int, G: int) -> tuple[Any, Any, tuple]:
    """The GEMMs of one forward pass and of one training step of a cell with ``G`` gate blocks, alone, at
    their own shapes, each as one jitted program: ``(forward, train, args)``.

    Forward: the input projection ``[B T, I] x [I, G H]`` and T recurrent ``[B, H] x [H, G H]`` in a loop.
    Training (the benchmark's step: gradients to the parameters, not to ``xs``) adds T backward recurrent
    ``[B, G H] x [G H, H]`` and the weight gradients ``[I, B T] x [B T, G H]`` and ``[H, B T] x [B T, G H]``.
    Each loop step feeds the next through a scaled add, so that nothing leaves the loop. What no
    implementation of the cell can beat on this device's GEMMs.
    """
    import jax.numpy as jnp

    def forward(x: Any, w_ih: Any, w_hh: Any) -> Any:
        zx = x.reshape(B * T, I) @ w_ih
        h, _ = jax.lax.scan(lambda h, _: ((h @ w_hh)[:, :H] * 1e-3 + h, None), jnp.zeros((B, H)), None, T)
        return zx, h

    def train(x: Any, w_ih: Any, w_hh: Any, dz: Any, hs: Any) -> Any:
        zx, h = forward(x, w_ih, w_hh)
        dh, _ = jax.lax.scan(lambda d, dz_t: ((dz_t @ w_hh.T) * 1e-3 + d, None), jnp.zeros((B, H)), dz)
        dz_rows = dz.reshape(B * T, G * H)
        d_w_ih = x.reshape(B * T, I).T @ dz_rows
        d_w_hh = hs.reshape(B * T, H).T @ dz_rows
        return zx, h, dh, d_w_ih, d_w_hh

    keys = jax.random.split(jax.random.key(0), 5)
    shapes = [(B, T, I), (I, G * H), (H, G * H), (T, B, G * H), (T, B, H)]
    args = tuple(jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes, strict=True))
    return jax.jit(forward), jax.jit(train), args


def inference_vs_floor(config: tuple, rounds: int) -> dict[str, Any]:
    """rnnjax's forward pass (inference) and training step against two GEMM floors.

    The forward of a cell with G gate blocks does ``2 B T (I + H) G H`` multiply-add FLOPs in its two
    GEMMs (input projection and recurrence); the floor of issue 5 is ``[B T, I + H] @ [I + H, G H]`` as one
    GEMM, which no recurrent implementation can beat. The other floor is the cell's own GEMMs at their own
    shapes (`own_gemms`), for the forward and for the training step: T small recurrent GEMMs run slower per
    FLOP than one large one. Interleaved, medians.
    """
    import jax.numpy as jnp

    import rnnjax as rj
    from benchmarks.peers import rnnjax_step

    cell_name, B, T, I, H = config
    cell = {"lstm": rj.lstm, "gru": rj.gru, "elman": rj.elman}[cell_name](H)
    G = {"lstm": 4, "gru": 3, "elman": 1}[cell_name]
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    forward = jax.jit(lambda p, x: rj.unroll(cell, p, x)[1])
    train = rnnjax_step(cell_name, B, T, I, H)
    a = jax.random.normal(jax.random.key(2), (B * T, I + H), jnp.float32)
    w = jax.random.normal(jax.random.key(3), (I + H, G * H), jnp.float32)
    gemm = jax.jit(jnp.dot)
    fwd_gemms, train_gemms, args = own_gemms(B, T, I, H, G)
    ms = interleaved(
        {
            "forward": lambda: jax.block_until_ready(forward(params, xs)),
            "gemm": lambda: jax.block_until_ready(gemm(a, w)),
            "forward_gemms": lambda: jax.block_until_ready(fwd_gemms(*args[:3])),
            "train": train.step,
            "train_gemms": lambda: jax.block_until_ready(train_gemms(*args)),
        },
        rounds,
    )
    flops = 2 * B * T * (I + H) * G * H
    return {
        "forward_ms": ms["forward"],
        "gemm_floor_ms": ms["gemm"],
        "ratio": ms["forward"] / ms["gemm"],
        "gflops": flops / 1e9,
        "forward_gemms_ms": ms["forward_gemms"],
        "train_ms": ms["train"],
        "train_gemms_ms": ms["train_gemms"],
        "train_gflops": 2 * B * T * (2 * I + 3 * H) * G * H / 1e9,
    }


def recurrent_gemms(config: tuple, rounds: int) -> dict[str, Any]:
    """The T per-step recurrent GEMMs of one training step alone, in XLA and in PyTorch, interleaved.

    Forward: T GEMMs ``[B, H] x [H, G H]``; backward: T GEMMs ``[B, G H] x [G H, H]`` (``dz_t w_hhᵀ``), each
    step fed by the one before through a scaled add so that nothing leaves the loop. XLA runs each chain as
    one jitted ``lax.scan``; PyTorch as a Python loop of ``torch.mm`` (its per-op overhead counts against
    it). The two chains have the same FLOPs; where a library runs one slower, its fused RNN cannot hide
    it. Float32, on the device PyTorch's step runs on.
    """
    import jax.numpy as jnp
    import numpy as np
    import torch

    cell_name, B, T, _, H = config
    GH = {"lstm": 4, "gru": 3, "elman": 1}[cell_name] * H
    rng = np.random.default_rng(0)
    w, dz = rng.standard_normal((H, GH), np.float32), rng.standard_normal((T, B, GH), np.float32)

    def xla_forward(w: Any) -> Any:
        return jax.lax.scan(lambda h, _: ((h @ w)[:, :H] * 1e-3 + h, None), jnp.ones((B, H)), None, T)[0]

    def xla_backward(w: Any, dz: Any) -> Any:
        return jax.lax.scan(lambda d, dz_t: ((dz_t @ w.T) * 1e-3 + d, None), jnp.zeros((B, H)), dz)[0]

    on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    tw, tdz = torch.from_numpy(w).to(device), torch.from_numpy(dz).to(device)

    def torch_forward() -> None:
        h = torch.ones((B, H), device=device)
        for _ in range(T):
            h = h.add(torch.mm(h, tw)[:, :H], alpha=1e-3)
        float(h[0, 0])  # waits for the GPU, if any

    def torch_backward() -> None:
        d = torch.zeros((B, H), device=device)
        for t in range(T):
            d = d.add(torch.mm(tdz[t], tw.t()), alpha=1e-3)
        float(d[0, 0])

    fwd, bwd = jax.jit(xla_forward), jax.jit(xla_backward)
    jw, jdz = jnp.asarray(w), jnp.asarray(dz)
    with torch.no_grad():
        ms = interleaved(
            {
                "xla_forward": lambda: jax.block_until_ready(fwd(jw)),
                "xla_backward": lambda: jax.block_until_ready(bwd(jw, jdz)),
                "torch_forward": torch_forward,
                "torch_backward": torch_backward,
            },
            rounds,
        )
    return {f"{k}_ms": v for k, v in ms.items()} | {"gflops": 2 * B * H * GH * T / 1e9}


UNROLL_FACTORS = (1, 2, 4, 8)


def unroll_sweep(config: tuple, rounds: int) -> dict[str, Any]:
    """rnnjax's training step and inference at each of `UNROLL_FACTORS`, interleaved, medians in ms.

    The measurement behind ``unroll_steps=None``, which runs every loop at 1.
    """
    import jax.numpy as jnp

    import rnnjax as rj
    from benchmarks.peers import rnnjax_step

    cell_name, B, T, I, H = config
    cell = {"lstm": rj.lstm, "gru": rj.gru, "elman": rj.elman}[cell_name](H)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    runs = {}
    for u in UNROLL_FACTORS:
        train = rnnjax_step(cell_name, B, T, I, H, unroll_steps=u)
        forward = jax.jit(lambda p, x, u=u: rj.unroll(cell, p, x, unroll_steps=u)[1])
        runs[("train", u)] = train.step
        runs[("forward", u)] = lambda f=forward: jax.block_until_ready(f(params, xs))
    ms = interleaved(runs, rounds)
    return {kind: {str(u): ms[(kind, u)] for u in UNROLL_FACTORS} for kind in ("train", "forward")}


def device_label(device: dict[str, Any]) -> str:
    if device["jax_device"].startswith("gpu"):
        return f"{device['jax_device']} (host: {device['cpu']})"
    return f"{device['cpu']} ({device['cores']} cores, {device['jax_device']})"


def environment_label(device: dict[str, Any]) -> str:
    env = device.get("environment") or {}
    return ", ".join(f"`{k}={v}`" for k, v in sorted(env.items())) or "defaults"


def config_label(c: dict[str, Any]) -> str:
    return f"{c['cell']} B={c['B']} T={c['T']} I={c['I']} H={c['H']}"


def config_table(record: dict[str, Any], title: str, columns: list[str], row: Any) -> list[str]:
    """A titled markdown table, one row per config for which ``row(config)`` gives the cells (a falsy
    value skips the config)."""
    lines = ["", title, "", "| config | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for c in record["configs"]:
        if cells := row(c):
            lines.append(f"| {config_label(c)} | " + " | ".join(cells) + " |")
    return lines


def library_table(record: dict[str, Any], libs: list[str], cell: Any) -> list[str]:
    """A markdown table, one row per config and one column per library: ``cell(result)`` of each library's
    result (a string, or None for "n/a")."""
    lines = ["| config | " + " | ".join(libs) + " |", "|---|" + "---|" * len(libs)]
    for c in record["configs"]:
        cells = [cell(c["results"].get(name, {})) or "n/a" for name in libs]
        lines.append(f"| {config_label(c)} | " + " | ".join(cells) + " |")
    return lines


def markdown(record: dict[str, Any]) -> str:
    libs = [n for n in LIBRARIES if any("median_ms" in c["results"].get(n, {}) for c in record["configs"])]
    lines = [
        f"Training step (forward + backward, float32), median of {record['rounds']} interleaved rounds; "
        f"in brackets: time / rnnjax manual (> 1: rnnjax faster). Device: {device_label(record['device'])}. "
        f"Allocator and XLA settings: {environment_label(record['device'])}.",
        "",
    ]
    lines += library_table(
        record,
        libs,
        lambda r: f"{r['median_ms']:.1f} ms ({r['ratio_to_rnnjax']:.2f}x)" if "median_ms" in r else None,
    )
    lines += ["", "Compiled temporary memory of the training step (JAX libraries):", ""]
    lines += library_table(
        record, libs, lambda r: f"{r['temp_mib']:.1f} MiB" if r.get("temp_mib") is not None else None
    )
    lines += ["", "Minor page faults per training step (median; the whole process, so PyTorch's too):", ""]
    lines += library_table(
        record, libs, lambda r: f"{r['median_faults']:.0f}" if r.get("median_faults") is not None else None
    )
    lines += config_table(
        record,
        "Inference (rnnjax forward only) against the GEMM floor, one GEMM of the forward's FLOPs:",
        ["GFLOP", "forward", "GEMM floor", "forward / floor"],
        lambda c: (
            (f := c.get("inference"))
            and [
                f"{f['gflops']:.2f}",
                f"{f['forward_ms']:.2f} ms",
                f"{f['gemm_floor_ms']:.2f} ms",
                f"{f['ratio']:.2f}x",
            ]
        ),
    )
    lines += config_table(
        record,
        "rnnjax against its own GEMMs: the same GEMMs at their own shapes, alone (the input projection, T "
        "recurrent `[B, H] x [H, G]` GEMMs, and for training the backward's T recurrent GEMMs and "
        "the weight gradients; `benchmarks.rnn_step.own_gemms`). GFLOP/s: the training GEMMs' rate:",
        ["forward", "its GEMMs", "forward / GEMMs", "train", "its GEMMs", "train / GEMMs", "GFLOP/s"],
        lambda c: (
            (f := c.get("inference", {})).get("train_gemms_ms")
            and [
                f"{f['forward_ms']:.2f} ms",
                f"{f['forward_gemms_ms']:.2f} ms",
                f"{f['forward_ms'] / f['forward_gemms_ms']:.2f}x",
                f"{f['train_ms']:.1f} ms",
                f"{f['train_gemms_ms']:.1f} ms",
                f"{f['train_ms'] / f['train_gemms_ms']:.2f}x",
                f"{f['train_gflops'] / f['train_gemms_ms'] * 1e3:.0f}",
            ]
        ),
    )
    devices = max(c.get("devices", 1) for c in record["configs"])
    split = [n for n in libs if any(split_name(n, devices) in c["results"] for c in record["configs"])]
    if split:

        def split_row(c: dict[str, Any]) -> list[str]:
            r = c["results"]
            cells = []
            for n in split:
                one, many = r.get(n, {}), r.get(split_name(n, devices), {})
                ok = "median_ms" in one and "median_ms" in many
                cells.append(
                    f"{many['median_ms']:.1f} ms ({one['median_ms'] / many['median_ms']:.2f}x)"
                    if ok
                    else "n/a"
                )
            manual, torch = r.get(split_name("rnnjax manual", devices), {}), r.get("pytorch", {})
            if "median_ms" in manual and "median_ms" in torch:
                cells.append(f"{torch['median_ms'] / manual['median_ms']:.2f}x")
            return cells

        lines += config_table(
            record,
            f"The same training steps with the batch split over {devices} devices (JAX's own data "
            "parallelism: each device its own rows, the gradients summed by an all-reduce; "
            "`benchmarks.peers.on_all_devices`), median of the same interleaved rounds; in brackets: the "
            "library's speedup over its own one-device step. Last column: PyTorch's step (one process, all "
            "cores) / rnnjax manual's split step:",
            [split_name(n, devices) for n in split]
            + (["pytorch / rnnjax split"] if "pytorch" in libs else []),
            split_row,
        )
    if any(c.get("recurrent_gemms") for c in record["configs"]):
        lines += config_table(
            record,
            "The per-step recurrent GEMMs alone, T of them in a chain, in XLA (one jitted `lax.scan`) and in "
            "PyTorch (a loop of `torch.mm`); the same FLOPs forward and backward "
            "(`benchmarks.rnn_step.recurrent_gemms`), median ms, GFLOP/s in brackets:",
            [
                "forward `[B, H] x [H, G]`: XLA",
                "PyTorch",
                "backward `[B, G] x [G, H]`: XLA",
                "PyTorch",
                "XLA / PyTorch, forward",
                "backward",
            ],
            lambda c: (
                (g := c.get("recurrent_gemms"))
                and [
                    *(
                        f"{g[k]:.2f} ms ({g['gflops'] / g[k] * 1e3:.0f})"
                        for k in (
                            "xla_forward_ms",
                            "torch_forward_ms",
                            "xla_backward_ms",
                            "torch_backward_ms",
                        )
                    ),
                    f"{g['xla_forward_ms'] / g['torch_forward_ms']:.2f}x",
                    f"{g['xla_backward_ms'] / g['torch_backward_ms']:.2f}x",
                ]
            ),
        )
    sweeps = [c for c in record["configs"] if c.get("unroll")]
    if sweeps:
        factors = list(sweeps[0]["unroll"]["train"])
        lines += [
            "",
            "rnnjax manual at each unroll factor (`rj.unroll(..., unroll_steps=k)`), median ms; the default "
            "(`unroll_steps=None`) runs every loop at 1:",
            "",
            "| config | "
            + " | ".join(f"train, {u}" for u in factors)
            + " | "
            + " | ".join(f"inference, {u}" for u in factors)
            + " |",
            "|---|" + "---|" * (2 * len(factors)),
        ]
        for c in sweeps:
            row = [f"{c['unroll']['train'][u]:.1f}" for u in factors]
            row += [f"{c['unroll']['forward'][u]:.1f}" for u in factors]
            lines.append(f"| {config_label(c)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def grouped_bars(
    ax: Any, series: dict[str, list[float]], ticks: list[str], fontsize: int | None = None
) -> None:
    """One group of bars per tick on the matplotlib axes ``ax``, one bar in each group per entry of
    ``series`` (its label and one height per tick), side by side in the order given."""
    width = 0.8 / len(series)
    for j, (label, ys) in enumerate(series.items()):
        ax.bar([i + j * width for i in range(len(ticks))], ys, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ticks))])
    ax.set_xticklabels(ticks, fontsize=fontsize)


def save_bar_plot(fig: Any, ax: Any, ylabel: str, title: str, path: str) -> None:
    """Labels the one axes ``ax`` of the matplotlib figure ``fig`` (its legend to the right, outside the
    bars), writes the figure to ``path`` as a PNG and closes it."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(record: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = record["configs"]
    libs = [n for n in LIBRARIES if any("median_ms" in c["results"].get(n, {}) for c in configs)]
    fig, ax = plt.subplots(figsize=(10, 4))
    grouped_bars(
        ax,
        {name: [c["results"].get(name, {}).get("median_ms", 0.0) for c in configs] for name in libs},
        [f"{c['cell']}\nB={c['B']} T={c['T']}\nI={c['I']} H={c['H']}" for c in configs],
    )
    save_bar_plot(
        fig, ax, "training step (ms, median)", f"RNN training step on {device_label(record['device'])}", path
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds: a smoke run")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--libraries", nargs="*", default=list(LIBRARIES), choices=list(LIBRARIES))
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON record and table")
    parser.add_argument("--plot-dir", default="runs/benchmarks", help="folder for the plot (git-ignored)")
    parser.add_argument(
        "--host-devices",
        type=int,
        default=None,
        help="on a CPU, split the host into N XLA devices (before JAX starts) and also time every JAX "
        "library's step with the batch split over them",
    )
    args = parser.parse_args(argv)
    if args.host_devices is not None and args.host_devices < 1:
        parser.error(f"--host-devices must be >= 1, got {args.host_devices}")
    if args.host_devices:
        flag = f"--xla_force_host_platform_device_count={args.host_devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        if len(jax.devices()) != args.host_devices:
            raise SystemExit(
                f"--host-devices {args.host_devices}: JAX had started already "
                f"with {len(jax.devices())} device(s); pass it to a fresh process"
            )
    on_gpu = jax.devices()[0].platform == "gpu"
    configs = QUICK_CONFIGS if args.quick else GPU_CONFIGS if on_gpu else CONFIGS
    rounds = 3 if args.quick else args.rounds
    record = {"device": device_info(), "rounds": rounds, "dtype": "float32", "configs": []}
    for config in configs:
        print(f"{config[0]} B={config[1]} T={config[2]} I={config[3]} H={config[4]} ...", flush=True)
        result = run_config(config, rounds, args.libraries)
        if "rnnjax manual" in args.libraries:
            result["inference"] = inference_vs_floor(config, rounds)
        if "median_ms" in result["results"].get("pytorch", {}):  # PyTorch ran: compare its GEMMs
            result["recurrent_gemms"] = recurrent_gemms(config, rounds)
            if not args.quick or config == configs[0]:  # quick: one sweep, as a smoke test
                result["unroll"] = unroll_sweep(config, rounds)
        record["configs"].append(result)
    save_results("rnn_step", args.quick, record, markdown(record), plot, args.out, args.plot_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
