"""Training as several processes (`python -m rnnjax.launch`, `jax.distributed` over gloo on the CPU) follows
the one-process, one-device run; the launcher stops every process when one fails, and reaps them all.

Each launch runs in its own process group under a timeout; on the timeout the whole group is killed, so a
hung launch fails its test instead of the suite, and leaves no process behind.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from rnnjax import launch

ROOT = pathlib.Path(__file__).parents[1]
SCRIPT = ROOT / "tests" / "multiprocess_run.py"


def _env() -> dict[str, str]:
    """This environment (conftest's XLA_FLAGS among it), with the worktree importable as ``rnnjax``, and
    XLA:CPU's elemental emitters in place of its fusion emitters: every process compiles its programs
    itself, and these compile the tests' programs several times faster. Every run a test compares uses the
    same flags."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_use_fusion_emitters" not in flags:
        flags = f"{flags} --xla_cpu_use_fusion_emitters=false".strip()
    return dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))


def _start(
    command: list[str], cwd: pathlib.Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``command`` started in a new process group (so that a timeout can kill it and all it started), its
    stdout and stderr captured as text; ``env`` defaults to `_env`."""
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=_env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _communicate(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """The stdout and stderr of ``proc``, a process group leader, once it exits; past ``timeout`` seconds its
    group is killed and the test fails, naming its command, with the ends of both streams."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} ran past {timeout} s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")


def _run(command: list[str], timeout: float, cwd: pathlib.Path = ROOT) -> tuple[int, str, str, float]:
    """``command`` in a new process group; returns its exit code, stdout, stderr and wall time. On the
    timeout the group (the launcher and the processes it started) is killed and the test fails."""
    start = time.monotonic()
    proc = _start(command, cwd)
    try:
        out, err = _communicate(proc, timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, err, time.monotonic() - start


def _launch(*args: str, timeout: float = 300) -> tuple[int, str, str, float]:
    return _run([sys.executable, "-m", "rnnjax.launch", *args], timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_two_processes_train_as_one_device(tmp_path):
    """One launch of 2 processes x 2 host devices trains on each process's first device alone, on 2 processes x
    1 device (each process's first device) and on 2 x 2: every step's batch split over all of the mesh's
    devices (each process its own rows), the final parameters and losses those of one device to 1e-12."""
    code, out, err, _ = _launch(
        "-n", "2", "--devices-per-process", "2", "--", sys.executable, str(SCRIPT), str(tmp_path)
    )
    assert code == 0, err[-3000:]
    assert "[p0] 2 processes, 1 devices: wrote" in out
    one_device = dict(np.load(tmp_path / "1.npz"))
    for devices in (2, 4):
        assert f"[p0] 2 processes, {devices} devices: wrote" in out
        assert out.count(f"[p0] 2 processes, {devices} devices, step ") == len(one_device["losses"])
        got = dict(np.load(tmp_path / f"{devices}.npz"))
        assert got.keys() == one_device.keys()
        for name, want in one_device.items():
            np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-12, err_msg=f"{devices}: {name}")
    assert "[p1] 2 processes" not in out  # metrics printed by process 0 only


def test_launcher_fails_fast(tmp_path):
    """Process 1 exits with 3 while process 0 sleeps and ignores SIGTERM: the launcher names p1 and its
    code, kills p0 after the grace period, and exits with 3."""
    script = tmp_path / "fail.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, pathlib, signal, sys, time
        i = os.environ["{launch.PROCESS_ID_ENV}"]
        pathlib.Path(r"{tmp_path}", f"pid{{i}}").write_text(str(os.getpid()))
        print(f"process {{i}} of {{os.environ['{launch.NUM_PROCESSES_ENV}']}}")
        if i == "1":
            time.sleep(0.5)
            sys.exit(3)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(600)
        """)
    )
    code, out, err, seconds = _launch(
        "-n", "2", "--grace-period", "1", "--", sys.executable, str(script), timeout=60
    )
    assert code == 3
    assert "[launch] p1 exited with code 3; stopping p0" in err
    assert "[p0] process 0 of 2" in out and "[p1] process 1 of 2" in out
    assert seconds < 45
    assert not _alive(int((tmp_path / "pid0").read_text()))


def test_launcher_fails_fast_when_a_jax_process_raises(tmp_path):
    """Under `jax.distributed`, after a first collective, process 1 raises while process 0 computes on
    (sleeps) before the next. The exception ends process 1 at once, not at JAX's shutdown barrier (which
    waits for process 0), so the launcher sees it, stops process 0 and names process 1 with code 1."""
    script = tmp_path / "raise.py"
    script.write_text(
        textwrap.dedent("""
        import time
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from rnnjax.launch import initialize

        assert initialize()
        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.ones((1, 2)))
        total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
        print("sum", float(total(x)))
        if jax.process_index() == 1:
            raise RuntimeError("process 1 fails")
        time.sleep(600)
        total(x).block_until_ready()
        """)
    )
    code, out, err, seconds = _launch(
        "-n", "2", "--grace-period", "1", "--", sys.executable, str(script), timeout=60
    )
    assert code == 1, err[-3000:]
    assert "[p0] sum 4.0" in out and "[p1] sum 4.0" in out  # the ones of both processes
    assert "[p1] RuntimeError: process 1 fails" in err
    assert "[launch] p1 exited with code 1; stopping p0" in err
    assert seconds < 45


def test_launcher_reaps_every_process_on_sigterm(tmp_path):
    """SIGTERM (or Ctrl-C) to the launcher: it stops every process it started, waits for them, and exits
    with 143 (130)."""
    script = tmp_path / "sleep.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, pathlib, time
        pathlib.Path(r"{tmp_path}", "pid" + os.environ["{launch.PROCESS_ID_ENV}"]).write_text(str(os.getpid()))
        time.sleep(600)
        """)
    )
    proc = _start([sys.executable, "-m", "rnnjax.launch", "-n", "2", "--", sys.executable, str(script)])
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"pid{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and proc.poll() is None, "the processes did not start"
            time.sleep(0.1)
        pids = [int((tmp_path / f"pid{i}").read_text()) for i in range(2)]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143
    assert "[launch] got SIGTERM; stopping every process" in err
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-n", "0", "--", "python"], "argument -n/--num-processes: expected int >= 1, got '0'"),
        (["-n", "two", "--", "python"], "argument -n/--num-processes: expected int >= 1, got 'two'"),
        (["--", "python"], "the following arguments are required: -n/--num-processes"),
        (["-n", "2"], "no command to run: give it after --"),
        (["-n", "2", "--"], "no command to run: give it after --"),
        (
            ["-n", "2", "--devices-per-process", "0", "--", "python"],
            "--devices-per-process: expected int >= 1",
        ),
        (
            ["-n", "2", "--grace-period", "-1", "--", "python"],
            "--grace-period: expected float >= 0, got '-1'",
        ),
        (["-n", "2", "--port", "70000", "--", "python"], "--port: expected a port <= 65535, got 70000"),
        (
            ["-n", "2", "--heartbeat-timeout", "0", "--", "python"],
            "--heartbeat-timeout: expected int >= 1, got '0'",
        ),
    ],
)
def test_launcher_command_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch.main(args)
    assert exit_info.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())  # argparse wraps long lines


def test_launcher_cannot_start_the_command():
    # in a process of its own: forking from this one, where JAX's threads run, warns of deadlocks
    out = subprocess.run(
        [sys.executable, "-m", "rnnjax.launch", "-n", "2", "--", "/nonexistent/program"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 127
    assert "[launch] cannot start '/nonexistent/program'" in out.stderr


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(command=[], num_processes=2), r"command: expected a program to run, got an empty command"),
        (dict(command=["x"], num_processes=0), r"num_processes: expected >= 1, got 0"),
        (dict(command=["x"], num_processes=1, devices_per_process=0), r"devices_per_process: expected >= 1"),
        (dict(command=["x"], num_processes=1, grace_period=-1.0), r"grace_period: expected >= 0 seconds"),
        (
            dict(command=["x"], num_processes=1, heartbeat_timeout=0),
            r"heartbeat_timeout: expected >= 1 second or None, got 0",
        ),
    ],
)
def test_run_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        launch.run(**kwargs)


def test_process_env():
    """Each process learns its place; a device count replaces the one in XLA_FLAGS and keeps the rest."""
    base = {"XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8"}
    env = launch.process_env(base, port=1234, num_processes=3, process_id=2, devices=2)
    assert env[launch.COORDINATOR_ENV] == "127.0.0.1:1234"
    assert (env[launch.NUM_PROCESSES_ENV], env[launch.PROCESS_ID_ENV]) == ("3", "2")
    assert env["XLA_FLAGS"] == "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2"
    assert (
        launch.process_env(base, port=1, num_processes=1, process_id=0, devices=None)["XLA_FLAGS"]
        == (base["XLA_FLAGS"])
    )
    assert launch.HEARTBEAT_TIMEOUT_ENV not in env
    env = launch.process_env(base, port=1, num_processes=1, process_id=0, devices=None, heartbeat_timeout=7)
    assert env[launch.HEARTBEAT_TIMEOUT_ENV] == "7"


def test_initialize_passes_the_heartbeat_timeout(monkeypatch):
    """The launcher's heartbeat timeout (or the argument, which wins) reaches `jax.distributed.initialize`."""
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # initialize replaces it; restored after
    monkeypatch.setenv(launch.COORDINATOR_ENV, "127.0.0.1:1")
    monkeypatch.setenv(launch.NUM_PROCESSES_ENV, "2")
    monkeypatch.setenv(launch.PROCESS_ID_ENV, "1")
    monkeypatch.setenv(launch.HEARTBEAT_TIMEOUT_ENV, "7")
    assert launch.initialize() is True
    assert launch.initialize(heartbeat_timeout_seconds=9) is True
    monkeypatch.delenv(launch.HEARTBEAT_TIMEOUT_ENV)
    assert launch.initialize() is True
    common = dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=1)
    assert calls == [
        {**common, "heartbeat_timeout_seconds": 7},
        {**common, "heartbeat_timeout_seconds": 9},
        common,
    ]
    for value, message in [
        ("0", r"heartbeat_timeout_seconds: expected >= 1, got 0"),
        ("x", r"environment variable RNNJAX_HEARTBEAT_TIMEOUT: expected an integer, got 'x'"),
    ]:
        monkeypatch.setenv(launch.HEARTBEAT_TIMEOUT_ENV, value)
        with pytest.raises(ValueError, match=message):
            launch.initialize()


def test_initialize_alone_does_nothing(monkeypatch):
    for name in (launch.COORDINATOR_ENV, launch.NUM_PROCESSES_ENV, launch.PROCESS_ID_ENV):
        monkeypatch.delenv(name, raising=False)
    assert launch.initialize() is False


@pytest.mark.parametrize(
    "num, pid, message",
    [
        ("two", "0", r"environment variable RNNJAX_NUM_PROCESSES: expected an integer, got 'two'"),
        ("2", None, r"environment variable RNNJAX_PROCESS_ID: expected an integer, got None"),
        (
            "2",
            "2",
            r"environment variable RNNJAX_PROCESS_ID: expected 0 <= id < RNNJAX_NUM_PROCESSES \(2\), got 2",
        ),
    ],
)
def test_initialize_rejects_bad_variables(monkeypatch, num, pid, message):
    monkeypatch.setenv(launch.COORDINATOR_ENV, "127.0.0.1:1")
    monkeypatch.setenv(launch.NUM_PROCESSES_ENV, num)
    if pid is None:
        monkeypatch.delenv(launch.PROCESS_ID_ENV, raising=False)
    else:
        monkeypatch.setenv(launch.PROCESS_ID_ENV, pid)
    with pytest.raises(ValueError, match=message):
        launch.initialize()


@pytest.mark.slow
def test_speech_ctc_under_the_launcher(tmp_path):
    """The speech example's ``--data-parallel`` as 2 processes: it trains, and process 0 alone reports and
    plots. A few steps: that the example learns is `test_examples`' to show, and that a multi-process step
    equals one device's is `test_two_processes_train_as_one_device`'s."""
    example = [sys.executable, "-m", "examples.speech_ctc", "--quick", "--data-parallel", "--no-progress"]
    code, out, err, _ = _run(
        [sys.executable, "-m", "rnnjax.launch", "-n", "2", "--", *example, "--steps", "10"],
        timeout=300,
        cwd=tmp_path,  # the plot goes to runs/ there
    )
    assert code == 0, err[-3000:]
    assert "10 steps, each batch split over 2 devices in 2 processes" in out
    assert "[p1] held-out" not in out
    ler = float(out.split("[p0] held-out label error rate ")[1].split(",")[0])
    assert ler >= 0  # scored on every held-out utterance, gathered from both processes
    assert (tmp_path / "runs/speech_ctc/speech_ctc.png").stat().st_size > 0


def test_process_rows():
    """The rows this process holds: all of them on one device; a split that gives a process rows apart from
    each other is refused (`jax.make_array_from_process_local_data` takes one block)."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("data",))
    assert launch.process_rows(NamedSharding(mesh, P("data")), 4) == slice(0, 4)

    class Interleaved:
        def addressable_devices_indices_map(self, shape):
            return {0: (slice(0, 1),), 1: (slice(2, 3),)}

    with pytest.raises(
        ValueError, match=r"sharding: this process's rows of 4 are not one block: \[\(0, 1\), \(2, 3\)\]"
    ):
        launch.process_rows(Interleaved(), 4)


# -- checkpoints across process counts, and a lost process ------------------------------------------------

CHECKPOINT_SCRIPT = ROOT / "tests" / "multiprocess_checkpoint.py"


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(tmp_path):
    """A training state saved by 1 process restores onto 2 processes of 2 devices each (each reading its
    own shards), which save it again (each writing its own); 1 process restores that. Every leaf comes back
    bit for bit, with the sharding the restoring run asked for."""
    directory = str(tmp_path / "checkpoints")
    script = [sys.executable, str(CHECKPOINT_SCRIPT), directory]
    code, out, err, _ = _run([*script, "--save", "1"], timeout=120)
    assert code == 0, err[-3000:]
    assert "1 processes, 1 devices: saved step 1" in out
    code, out, err, _ = _launch(
        "-n", "2", "--devices-per-process", "2", "--", *script, "--restore", "1", "--save", "2", timeout=120
    )
    assert code == 0, err[-3000:]
    assert "[p0] 2 processes, 4 devices: restored step 1, equal" in out
    assert "[p0] 2 processes, 4 devices: saved step 2" in out
    shards = tmp_path / "checkpoints" / "2" / "state"
    assert (shards / "ocdbt.process_0").is_dir() and (shards / "ocdbt.process_1").is_dir()
    code, out, err, _ = _run([*script, "--restore", "2"], timeout=120)
    assert code == 0, err[-3000:]
    assert "1 processes, 1 devices: restored step 2, equal" in out


def _children(pid: int) -> dict[int, int]:
    """The processes the launcher ``pid`` started, by their index (read from their environment)."""
    found = {}
    for child in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            environ = pathlib.Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for entry in environ:
            if entry.startswith(launch.PROCESS_ID_ENV.encode() + b"="):
                found[int(entry.split(b"=", 1)[1])] = int(child)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the launcher's children in /proc")
def test_char_lm_two_processes_killed_and_resumed_equals_uninterrupted(tmp_path):
    """``examples.char_lm --data-parallel`` as 2 processes, checkpointing every 2 steps:
    - uninterrupted for 8 steps, it trains and process 0 alone reports;
    - a second run, started alongside (the two are independent, and one waits on the other's cores less
      than after it), has process 1 killed (SIGKILL) after the checkpoint of step 4 or later: process 0
      fails by itself with JAX's error (its collective's peer or its heartbeat gone) within seconds, not
      at the launcher's SIGKILL a minute later, and the launcher names process 1;
    - both restarted with ``--resume`` end with the uninterrupted run's state at step 8, bit for bit."""
    import jax

    import rnnjax as rj
    from examples import char_lm

    steps = 8
    # the killed run and its resumption share their compiled programs; the uninterrupted run, which compiles
    # at the same time, has a cache of its own (JAX writes an entry without a lock)

    def command(name: str, *args: str) -> list[str]:
        (tmp_path / name).mkdir(exist_ok=True)
        example = [sys.executable, "-m", "examples.char_lm", "--quick", "--no-progress", "--data-parallel"]
        example += ["--dropout", "0.1", "--steps", str(steps), "--checkpoint-every", "2"]
        example += ["--checkpoint-dir", str(tmp_path / name / "checkpoints"), *args]
        return [sys.executable, "-m", "rnnjax.launch", "-n", "2", *LOST_PROCESS_OPTIONS, "--", *example]

    def start(name: str, *args: str) -> subprocess.Popen:
        env = dict(
            _env(),
            JAX_COMPILATION_CACHE_DIR=str(tmp_path / name / "jax_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
        return _start(command(name, *args), tmp_path / name, env)

    def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
        out, err = _communicate(proc, timeout)
        return proc.returncode, out, err

    runs: list[subprocess.Popen] = []
    try:
        runs.append(whole := start("whole"))
        runs.append(killed := start("killed"))
        checkpoints = tmp_path / "killed" / "checkpoints"
        deadline = time.monotonic() + 180
        while not any(p.name.isdigit() and int(p.name) >= 4 for p in checkpoints.glob("*")):
            assert killed.poll() is None, finish(killed)[2][-3000:]
            assert time.monotonic() < deadline, "no checkpoint of step 4 within 180 s"
            time.sleep(0.02)
        os.kill(_children(killed.pid)[1], signal.SIGKILL)
        killed_at = time.monotonic()
        code, out, err = finish(killed, timeout=120)
        waited = time.monotonic() - killed_at
        # p0 fails by itself, long before the launcher would kill it: at once in a collective (its peer's
        # connection reset), or after the heartbeat timeout at a barrier; the launcher may see both at once
        assert code in (1, 128 + signal.SIGKILL), err[-3000:]
        assert "p1 exited with signal SIGKILL" in err
        assert "p0 still running" not in err, err[-3000:]
        survivor = "\n".join(line for line in err.splitlines() if line.startswith("[p0]"))
        assert any(m in survivor for m in SURVIVOR_ERRORS), survivor[-3000:]
        assert waited < 45, err[-3000:]
        k = rj.latest_training_step(checkpoints)
        assert k is not None and 4 <= k < steps and k % 2 == 0, k

        code, out, err = finish(whole)
        assert code == 0, err[-3000:]
        assert "[p0] validation" in out and "[p1] validation" not in out
        assert "the tracks split over 2 cpu devices in 2 processes" in out
        assert (tmp_path / "whole" / "runs/char_lm/char_lm.png").stat().st_size > 0

        runs.append(resumed := start("killed", "--resume"))
        code, out, err = finish(resumed)
        assert code == 0, err[-3000:]
        assert f"[p0] resumed from the checkpoint of step {k} in" in out
    finally:
        for proc in runs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()

    with jax.enable_x64(False):  # the example trains in float32
        like = jax.eval_shape(lambda: char_lm.initial_state(char_lm.QUICK))
    step_a, a = rj.restore_training_state(checkpoints, like=like)
    step_b, b = rj.restore_training_state(tmp_path / "whole" / "checkpoints", like=like)
    assert step_a == step_b == steps
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))
    assert int(a.window) == steps


# a survivor at a barrier learns of a dead process after the heartbeat timeout; the launcher waits a minute
# before it kills a survivor, so the test sees the survivor fail by itself
LOST_PROCESS_OPTIONS = ["--heartbeat-timeout", "5", "--grace-period", "60"]
# JAX's errors in a process whose peer died: in a gloo collective (reset or closed, by the timing of the
# kill against the collective), and from the coordination service
SURVIVOR_ERRORS = [
    "Connection reset by peer",
    "Connection closed by peer",
    "heartbeat timeout",
    "stopped sending heartbeats",
]
