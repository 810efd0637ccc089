"""The benchmark suite runs end to end in --quick mode (timings are never asserted in tests)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from benchmarks import rnn_step


def _run_module(module: str, *args: str) -> None:
    """``python -m module args`` in a fresh process on the CPU, from the repository's root; it must succeed."""
    run = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=pathlib.Path(__file__).parents[1],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_rnn_step_quick(tmp_path):
    # as the benchmark runs from the command line: float32, and the peers' own (standard) dtype promotion
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        assert rnn_step.main(["--quick", "--out", str(tmp_path), "--plot-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "rnn_step_quick.json").read_text())
    assert record["device"]["versions"]["jax"] != "not installed"
    for config in record["configs"]:
        manual = config["results"]["rnnjax manual"]
        assert manual["median_ms"] > 0 and manual["ratio_to_rnnjax"] == 1.0
        ran = {name for name, r in config["results"].items() if "median_ms" in r}
        assert {"rnnjax autodiff", "flax linen", "flax nnx", "haiku", "pytorch"} <= ran
        if jax.devices()[0].platform == "cpu":  # the cuDNN anchor says why it cannot run here
            assert "GPU" in config["results"]["jax cudnn"]["unavailable"]
        inference = config["inference"]
        assert inference["forward_ms"] > 0 and inference["gemm_floor_ms"] > 0
        assert (
            inference["forward_gemms_ms"] > 0
            and inference["train_gemms_ms"] > 0
            and inference["train_ms"] > 0
        )
        G = {"lstm": 4, "gru": 3, "elman": 1}[config["cell"]]
        assert inference["train_gflops"] == 2 * 4 * 16 * (2 * 8 + 3 * 8) * G * 8 / 1e9  # forward + backward
        assert (
            inference["gflops"]
            == 2 * 4 * 16 * 16 * {"lstm": 4, "gru": 3, "elman": 1}[config["cell"]] * 8 / 1e9
        )
        gemms = config["recurrent_gemms"]  # the per-step GEMMs alone, XLA's and PyTorch's
        assert gemms["gflops"] == 2 * 4 * 8 * G * 8 * 16 / 1e9
        assert all(
            gemms[f"{lib}_{way}_ms"] > 0 for lib in ("xla", "torch") for way in ("forward", "backward")
        )
    sweep = record["configs"][0]["unroll"]  # one unroll sweep in quick mode
    assert set(sweep) == {"train", "forward"} and list(sweep["train"]) == ["1", "2", "4", "8"]
    assert all(ms > 0 for kind in sweep.values() for ms in kind.values())
    assert all("unroll" not in c for c in record["configs"][1:])
    table = (tmp_path / "rnn_step_quick.md").read_text()
    assert "| lstm B=4 T=16 I=8 H=8 | " in table.split("unroll factor")[1]
    assert "| lstm B=4 T=16 I=8 H=8 |" in table
    on_cpu = jax.devices()[0].platform == "cpu"
    assert ("jax cudnn" in table) != on_cpu  # a library that ran nowhere gets no column
    assert "forward / floor" in table and "train / GEMMs" in table
    assert "| lstm B=4 T=16 I=8 H=8 |" in table.split("recurrent GEMMs alone")[1].split("unroll factor")[0]
    assert (tmp_path / "rnn_step_quick.png").stat().st_size > 0


@pytest.mark.slow
def test_rnn_step_split_over_host_devices(tmp_path):
    """`--host-devices 2` in a fresh process: every JAX library's step also runs with the batch split over
    two host devices, and the table says how much faster each got than on one."""
    libraries = ["rnnjax manual", "flax nnx", "pytorch"]
    out = ["--out", str(tmp_path), "--plot-dir", str(tmp_path)]
    _run_module("benchmarks.rnn_step", "--quick", "--host-devices", "2", "--libraries", *libraries, *out)
    record = json.loads((tmp_path / "rnn_step_quick.json").read_text())
    for config in record["configs"]:
        assert config["devices"] == 2
        ran = {name for name, r in config["results"].items() if "median_ms" in r}
        # PyTorch is not a JAX program: it has no split run
        assert ran == {*libraries, "rnnjax manual on 2 devices", "flax nnx on 2 devices"}
    table = (tmp_path / "rnn_step_quick.md").read_text().split("split over 2 devices")[1]
    assert "| rnnjax manual on 2 devices | flax nnx on 2 devices | pytorch / rnnjax split |" in table
    assert "| lstm B=4 T=16 I=8 H=8 | " in table


def test_rnn_step_host_devices_need_a_fresh_process(tmp_path, capsys):
    jax.devices()  # JAX has started in this process
    with pytest.raises(SystemExit, match="fresh process"):
        rnn_step.main(["--quick", "--host-devices", "2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # argparse's usage error, before anything runs
        rnn_step.main(["--quick", "--host-devices", "0", "--out", str(tmp_path)])
    assert "--host-devices must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_scaling_quick(tmp_path):
    from benchmarks import scaling

    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        assert scaling.main(["--quick", "--out", str(tmp_path), "--plot-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "scaling_quick.json").read_text())
    assert [row["x"] for row in record["by_T"]["rows"]] == [16, 64]
    assert record["long"]["finite"] and record["long"]["T"] == 200
    assert "manual + sqrt checkpoints" in (tmp_path / "scaling_quick.md").read_text()
    budget = record["budget"]
    assert budget["T"] == 100 and budget["sqrt_last_temp_mib"] < budget["plain_last_temp_mib"]
    for mode in ("budget", "nested"):
        assert budget[f"{mode}_last_temp_mib"] < budget["plain_last_temp_mib"]
    assert budget["budget_schedule"] and budget["binomial_plan"]["K"] >= 1
    assert budget["grad_rel_diff"] < 1e-5
    assert "Memory-budgeted BPTT" in (tmp_path / "scaling_quick.md").read_text()
    assert (tmp_path / "scaling_quick.png").stat().st_size > 0


def test_profile_step_quick(tmp_path):
    from benchmarks import profile_step

    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        assert profile_step.main(["--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "profile_lstm_manual.json").read_text())
    labels = [p["phase"] for p in record["phases"]]
    if jax.devices()[0].platform != "cpu":
        return  # the phases are read from XLA:CPU's kernel events
    # the forward's loop and the backward's, each kernel in them run once per step of T = 16
    assert labels == [
        "before the first loop",
        "loop 1",
        "between loops 1 and 2",
        "loop 2",
        "after the last loop",
    ]
    for p in record["phases"]:
        assert p["wall_ms"] >= 0 and p["kernels"]
        calls = {k["calls"] for k in p["kernels"]}
        assert calls == {16} if p["phase"].startswith("loop") else max(calls) == 1, (p["phase"], calls)
    assert "| loop 2 |" in (tmp_path / "profile_lstm_manual.md").read_text()


@pytest.mark.parametrize("steps", ["1", "-1"])
def test_scaling_devices_rejects_char_lm_steps(steps, capsys):
    from benchmarks import scaling_devices

    with pytest.raises(SystemExit):
        scaling_devices.main(["--char-lm-steps", steps])
    assert f"--char-lm-steps must be 0 or >= 2 (the first compiles), got {steps}" in capsys.readouterr().err


@pytest.mark.slow
def test_scaling_devices_quick(tmp_path):
    """The device-scaling benchmark in a fresh process (it starts processes of its own): every topology
    ran with the devices and processes it names, strong and weak, char_lm trained over them, and the table
    and plot are written."""
    out = ["--out", str(tmp_path), "--plot-dir", str(tmp_path)]
    _run_module("benchmarks.scaling_devices", "--quick", *out)
    record = json.loads((tmp_path / "scaling_devices_quick.json").read_text())
    shapes = [(t["name"], t["processes"], t["devices"]) for t in record["topologies"]]
    assert shapes == [
        ("1 process x 1 device", 1, 1),
        ("1 process x 2 devices", 1, 2),
        ("2 processes x 1 device", 2, 2),
    ]
    for t in record["topologies"]:
        (config,) = t["configs"].values()
        assert config["strong"]["global_B"] == 4 and config["weak"]["global_B"] == 4 * t["devices"]
        assert config["strong"]["median_ms"] > 0 and config["weak"]["median_ms"] > 0
        # char_lm's 16 tracks split over every device of every process, 3 steps (the first compiles)
        char_lm = t["char_lm"]
        assert char_lm["steps"] == 3 and char_lm["rows_per_device"] == 16 // t["devices"]
        assert char_lm["steps_per_s"] > 0 and char_lm["median_step_ms"] > 0
    assert record["device"]["cores"] == os.cpu_count()
    table = (tmp_path / "scaling_devices_quick.md").read_text()
    assert "| char_lm --quick B=16 T=32 H=64 | strong | " in table
    assert "| lstm B=4 T=16 I=8 H=8 | weak | " in table and "What a 2-core machine can show" in table
    assert (tmp_path / "scaling_devices_quick.png").stat().st_size > 0


@pytest.mark.slow
def test_parallel_time_quick(tmp_path):
    from benchmarks import parallel_time

    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        out = ["--quick", "--out", str(tmp_path), "--plot-dir", str(tmp_path), "--cells", "mingru"]
        assert parallel_time.main(out) == 0
    record = json.loads((tmp_path / "parallel_time_quick.json").read_text())
    assert [c["T"] for c in record["configs"]] == parallel_time.QUICK_LENGTHS
    for config in record["configs"]:
        assert set(config["results"]) == set(parallel_time.METHODS)
        for r in config["results"].values():
            assert r["forward_ms"] > 0 and r["train_ms"] > 0 and r["train_temp_mib"] >= 0
        assert config["results"]["sequential"]["train_ratio"] == 1.0
    assert "| mingru B=4 T=16 I=8 H=8 |" in (tmp_path / "parallel_time_quick.md").read_text()


@pytest.mark.slow
def test_sequence_split_quick(tmp_path):
    """The time-split benchmark in a fresh process of two host devices: every method's forward and training
    step ran, the split ones on both devices, and the side-by-side reference was measured."""
    from benchmarks import sequence_split

    out = ["--out", str(tmp_path), "--plot-dir", str(tmp_path)]
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.sequence_split", "--quick", *out],
        cwd=pathlib.Path(__file__).parents[1],
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "sequence_split_quick.json").read_text())
    (config,) = record["configs"]
    assert (config["B"], config["T"]) == (1, 256) and record["devices"] == 2
    for method, (split, _) in sequence_split.METHODS.items():
        r = config["results"][method]
        assert r["devices"] == (2 if split else 1)
        assert r["forward_ms"] > 0 and r["train_ms"] > 0 and r["train_temp_mib"] >= 0
    assert (
        min(config["results"][m]["train_ratio"] for m in ("sequential", "associative", "chunked 64")) == 1.0
    )
    assert config["side_by_side"]["slowdown"] > 0
    assert "| mingru B=1 T=256 I=8 H=8 |" in (tmp_path / "sequence_split_quick.md").read_text()


@pytest.mark.slow
def test_padding_quick(tmp_path):
    """The padding-select benchmark: every variant of every config timed and its memory read, the programs
    without the selects computing the same values on clean padding, and the tables written."""
    import rnnjax.driver
    import rnnjax.losses
    from benchmarks import padding

    selects = rnnjax.driver._zero_padding, rnnjax.losses._padding_to
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        assert padding.main(["--quick", "--out", str(tmp_path), "--plot-dir", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "padding_quick.json").read_text())
    assert [c["kind"] for c in record["configs"]] == ["lstm", "gru", "cross_entropy", "ctc"]
    for config in record["configs"]:
        results = config["results"]
        assert set(results) == set(padding.VARIANTS)
        for r in results.values():
            assert r["median_ms"] > 0 and r["temp_mib"] >= 0 and len(r["times_ms"]) == 3
        for name in padding.PAIRS:
            assert results[name]["select_ratio"][1] > 0
            # float32 programs compiled with and without the selects: equal up to round-off
            assert results[name]["max_abs_diff_to_no_select"] <= 1e-5
    assert (rnnjax.driver._zero_padding, rnnjax.losses._padding_to) == selects  # restored afterwards
    table = (tmp_path / "padding_quick.md").read_text()
    assert "| lstm step B=4 T=16 I=8 H=8 |" in table and "| ctc B=4 T=16 K=6 |" in table
    assert (tmp_path / "padding_quick.png").stat().st_size > 0
