"""Run one JAX program as several processes on this machine, as `jax.distributed` runs it on many.

    python -m rnnjax.launch -n 2 -- python -m examples.speech_ctc --quick --data-parallel
    python -m rnnjax.launch -n 2 --devices-per-process 2 -- python train.py

The launcher picks a free local port for JAX's coordinator, starts ``N`` copies of the command, and tells
each its place through environment variables that `initialize` reads. On JAX's CPU backend the processes
exchange data through gloo collectives, so a multi-process program (each process its own rows of the
batch, `jax.make_array_from_process_local_data`) is tested on one machine before it runs on a cluster.
``--devices-per-process K`` splits each process's CPU into ``K`` XLA devices
(``--xla_force_host_platform_device_count``).

Each process's output comes back line by line, prefixed with its index (``[p0] ``, ``[p1] ``). The launcher
fails fast: when a process exits with a non-zero code, it stops the others (SIGTERM, then SIGKILL after
``--grace-period`` seconds: JAX takes SIGTERM as a preemption notice and keeps running), names the process
and its code, and exits with that code. It waits for every child it started, on Ctrl-C too, and asks Linux
to kill them if the launcher itself is killed. ``--heartbeat-timeout S`` sets how long JAX's coordination
service waits for a silent process before it fails the others (see `initialize`).

The program itself calls `initialize` once, before anything else touches JAX's devices::

    from rnnjax.launch import initialize

    initialize()  # under the launcher: jax.distributed.initialize(...); alone: nothing
    mesh = jax.make_mesh((jax.device_count(),), ("data",))  # every process's devices
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType, TracebackType
from typing import IO, Any, TextIO

COORDINATOR_ENV = "RNNJAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "RNNJAX_NUM_PROCESSES"
PROCESS_ID_ENV = "RNNJAX_PROCESS_ID"
HEARTBEAT_TIMEOUT_ENV = "RNNJAX_HEARTBEAT_TIMEOUT"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}: expected an integer, got {value!r}") from None


def initialize(*, cluster: bool = False, heartbeat_timeout_seconds: int | None = None) -> bool:
    """Joins this process to a multi-process JAX program, when it is one.

    Under `python -m rnnjax.launch` (the variables ``RNNJAX_COORDINATOR_ADDRESS``, ``RNNJAX_NUM_PROCESSES``
    and ``RNNJAX_PROCESS_ID`` are set), calls `jax.distributed.initialize` with them. Else, with
    ``cluster=True``, calls `jax.distributed.initialize()` with no arguments, which reads the job from a
    cluster manager (SLURM, Open MPI, Kubernetes, TPU pods). Else does nothing: the program runs as one
    process. Call it before anything asks JAX for its devices; calling it again does nothing.

    A process that joined also ends at once on an uncaught exception (after printing it, with code 1):
    JAX's own shutdown waits at a barrier for every process, while the others may wait inside a collective
    for this one, so a failing process would otherwise hang until the coordinator's timeouts (minutes)
    instead of exiting where the launcher or the cluster manager sees it. (A ``sys.exit(n)`` still goes
    through that barrier: raise an exception to fail.)

    When another process dies, a process waiting for it inside a collective fails at once (its connection
    is reset); one waiting at a barrier of JAX's coordination service (a checkpoint's, the shutdown's) fails
    once the dead process has missed its heartbeats for ``heartbeat_timeout_seconds``.

    Args:
        cluster: with no launcher variables set, let JAX detect a cluster manager's job.
        heartbeat_timeout_seconds: how long a silent process counts as alive; None reads
            ``RNNJAX_HEARTBEAT_TIMEOUT`` (set by the launcher's ``--heartbeat-timeout``), else JAX's default.

    Returns:
        Whether this process is one of several (`jax.distributed` is initialized).

    Raises:
        ValueError: a launcher variable that is not an integer, a process id outside
            ``[0, num_processes)``, or a heartbeat timeout below 1.

    Examples:
        Run alone (no launcher variables, no ``cluster=True``), the program stays one process:

        >>> from rnnjax.launch import initialize
        >>> initialize()
        False
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    timeout: dict[str, Any] = {}  # keyword arguments of jax.distributed.initialize
    if heartbeat_timeout_seconds is None and HEARTBEAT_TIMEOUT_ENV in os.environ:
        heartbeat_timeout_seconds = _env_int(os.environ, HEARTBEAT_TIMEOUT_ENV)
    if heartbeat_timeout_seconds is not None:
        if heartbeat_timeout_seconds < 1:
            raise ValueError(f"heartbeat_timeout_seconds: expected >= 1, got {heartbeat_timeout_seconds}")
        timeout["heartbeat_timeout_seconds"] = heartbeat_timeout_seconds
    if COORDINATOR_ENV in os.environ:
        num_processes = _env_int(os.environ, NUM_PROCESSES_ENV)
        process_id = _env_int(os.environ, PROCESS_ID_ENV)
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"environment variable {PROCESS_ID_ENV}: expected 0 <= id < {NUM_PROCESSES_ENV} "
                f"({num_processes}), got {process_id}"
            )
        jax.distributed.initialize(
            coordinator_address=os.environ[COORDINATOR_ENV],
            num_processes=num_processes,
            process_id=process_id,
            **timeout,
        )
    elif cluster:
        jax.distributed.initialize(**timeout)
    else:
        return False
    _exit_at_once_on_error()
    return True


def process_rows(sharding: Any, rows: int) -> slice:
    """The rows of a global ``[rows, ...]`` array that this process's devices hold under ``sharding`` (a
    split of the leading axis): what this process gives `jax.make_array_from_process_local_data`.

    Args:
        sharding: a `jax.sharding.Sharding` that splits (or replicates) the leading axis, e.g.
            ``NamedSharding(mesh, P("data"))``.
        rows: the global array's leading size.

    Returns:
        The ``slice`` of the global rows that this process's devices hold together.

    Raises:
        ValueError: if this process's rows are not one contiguous block.

    Examples:
        In a multi-process program each process passes its own block of the batch::

            batch = NamedSharding(mesh, P("data"))
            xs = jax.make_array_from_process_local_data(batch, global_xs[process_rows(batch, len(global_xs))])

        In one process, it holds every row:

        >>> import jax
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from rnnjax.launch import process_rows
        >>> mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
        >>> process_rows(NamedSharding(mesh, P("data")), 8)
        slice(0, 8, None)
    """
    bounds = [
        index[0].indices(rows)[:2] for index in sharding.addressable_devices_indices_map((rows,)).values()
    ]
    start, stop = min(b[0] for b in bounds), max(b[1] for b in bounds)
    if sum(b - a for a, b in set(bounds)) != stop - start:
        raise ValueError(f"sharding: this process's rows of {rows} are not one block: {sorted(set(bounds))}")
    return slice(start, stop)


def _exit_at_once_on_error() -> None:
    """Makes an uncaught exception end the process as soon as it is printed, skipping the exit handlers
    (JAX's shutdown barrier among them)."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        try:
            previous(kind, value, tb)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(130 if issubclass(kind, KeyboardInterrupt) else 1)

    sys.excepthook = hook


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that no one listens on at the time of the call (the system picks it).

    Args:
        host: the address to bind.

    Returns:
        The port number.

    Raises:
        OSError: if no socket can be bound on ``host``.

    Examples:
        >>> from rnnjax.launch import free_port
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def process_env(
    base: Mapping[str, str],
    *,
    port: int,
    num_processes: int,
    process_id: int,
    devices: int | None,
    heartbeat_timeout: int | None = None,
) -> dict[str, str]:
    """The environment of process ``process_id``: ``base``, the variables `initialize` reads, unbuffered
    Python output (lines arrive as they are printed), with ``devices`` an ``XLA_FLAGS`` asking for that
    many host devices (replacing a device count already there), and with ``heartbeat_timeout`` the
    seconds after which a silent process counts as dead.

    Args:
        base: the environment to start from (e.g. ``os.environ``); it is not changed.
        port: the coordinator's port on 127.0.0.1.
        num_processes: how many processes the program has.
        process_id: this process's index, in ``[0, num_processes)``.
        devices: host (CPU) devices for the process, or None to leave ``XLA_FLAGS`` as it is.
        heartbeat_timeout: seconds after which a silent process counts as dead, or None for JAX's default.

    Returns:
        A new environment dict.

    Examples:
        >>> from rnnjax.launch import process_env
        >>> env = process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, port=1234,
        ...                   num_processes=2, process_id=1, devices=4)
        >>> env["RNNJAX_COORDINATOR_ADDRESS"], env["RNNJAX_PROCESS_ID"], env["XLA_FLAGS"]
        ('127.0.0.1:1234', '1', '--xla_force_host_platform_device_count=4')
    """
    env = dict(base)
    env.update(
        {
            COORDINATOR_ENV: f"127.0.0.1:{port}",
            NUM_PROCESSES_ENV: str(num_processes),
            PROCESS_ID_ENV: str(process_id),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if heartbeat_timeout is not None:
        env[HEARTBEAT_TIMEOUT_ENV] = str(heartbeat_timeout)
    if devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
        env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_COUNT_FLAG}={devices}"])
    return env


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux kill the child when the launcher dies (``PR_SET_PDEATHSIG``), so that
    no process outlives a launcher killed with SIGKILL; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGKILL)


def _forward(stream: IO[bytes], prefix: str, out: Callable[[], TextIO], lock: threading.Lock) -> None:
    """Copies ``stream`` to ``out()`` line by line, each line after ``prefix``."""
    with stream:
        for line in iter(stream.readline, b""):
            text = line.decode(errors="replace")
            with lock:
                sink = out()
                sink.write(prefix + (text if text.endswith("\n") else text + "\n"))
                sink.flush()


@dataclasses.dataclass
class _Child:
    index: int
    popen: subprocess.Popen[bytes]
    readers: list[threading.Thread] = dataclasses.field(default_factory=list)


class _Terminated(Exception):
    """The launcher got SIGTERM."""


def _say(message: str) -> None:
    print(f"[launch] {message}", file=sys.stderr, flush=True)


def _exit_code(code: int) -> int:
    """A shell-style exit code for a child's return code (a signal ``s`` gives ``-s``, shown as 128 + s)."""
    return code if code >= 0 else 128 - code


def _describe(code: int) -> str:
    if code >= 0:
        return f"code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def _stop(children: Sequence[_Child], grace_period: float) -> None:
    """Sends SIGTERM to every child still running, SIGKILL to those still running ``grace_period`` seconds
    later, and waits for all."""
    running = [c for c in children if c.popen.poll() is None]
    for c in running:
        c.popen.terminate()
    deadline = time.monotonic() + grace_period
    for c in running:
        try:
            c.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for c in running:
        if c.popen.poll() is None:
            _say(f"p{c.index} still running {grace_period:g} s after SIGTERM; sending SIGKILL")
            c.popen.kill()
        c.popen.wait()


def run(
    command: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int | None = None,
    port: int | None = None,
    grace_period: float = 5.0,
    poll_interval: float = 0.05,
    heartbeat_timeout: int | None = None,
) -> int:
    """Runs ``command`` as ``num_processes`` processes of one JAX program on this machine.

    Args:
        command: the program and its arguments, e.g. ``["python", "-m", "examples.speech_ctc"]``.
        num_processes: how many processes.
        devices_per_process: host (CPU) devices per process, or None to leave ``XLA_FLAGS`` alone.
        port: the coordinator's port on 127.0.0.1, or None for a free one.
        grace_period: seconds between SIGTERM and SIGKILL when stopping the processes.
        poll_interval: seconds between looks at the processes' states.
        heartbeat_timeout: seconds after which JAX's coordination service counts a silent process as dead
            and fails the others (see `initialize`); None keeps JAX's default.

    Returns:
        0 when every process exits with 0; else the exit code of the first process seen failing (128 + the
        signal, when a signal ended it; the lowest index among several seen at once), or 130 on Ctrl-C,
        143 on SIGTERM.

    Raises:
        ValueError: if ``command`` is empty, or ``num_processes``, ``devices_per_process`` or
            ``grace_period`` is out of range.
        OSError: if the command cannot be started (the processes already started are stopped).

    The processes are forked: call it from a process that has not started JAX's runtime (JAX warns that a
    fork after its threads started may deadlock), as ``python -m rnnjax.launch`` does.

    Examples:
        From a launcher script, before JAX starts::

            sys.exit(run([sys.executable, "train.py"], 2, devices_per_process=2))

        The arguments are checked before anything starts:

        >>> from rnnjax.launch import run
        >>> run([], 2)
        Traceback (most recent call last):
          ...
        ValueError: command: expected a program to run, got an empty command
    """
    if not command:
        raise ValueError("command: expected a program to run, got an empty command")
    if num_processes < 1:
        raise ValueError(f"num_processes: expected >= 1, got {num_processes}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(f"devices_per_process: expected >= 1 or None, got {devices_per_process}")
    if grace_period < 0:
        raise ValueError(f"grace_period: expected >= 0 seconds, got {grace_period}")
    if heartbeat_timeout is not None and heartbeat_timeout < 1:
        raise ValueError(f"heartbeat_timeout: expected >= 1 second or None, got {heartbeat_timeout}")
    port = free_port() if port is None else port
    lock = threading.Lock()
    children: list[_Child] = []
    on_sigterm = None
    if threading.current_thread() is threading.main_thread():

        def raise_terminated(signum: int, frame: FrameType | None) -> None:
            raise _Terminated

        on_sigterm = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        preexec = _die_with_parent()
        for i in range(num_processes):
            env = process_env(
                os.environ,
                port=port,
                num_processes=num_processes,
                process_id=i,
                devices=devices_per_process,
                heartbeat_timeout=heartbeat_timeout,
            )
            popen = subprocess.Popen(
                list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec
            )
            children.append(_Child(i, popen))
        for c in children:  # reader threads only once every child is forked (preexec_fn and threads)
            for stream, out in ((c.popen.stdout, lambda: sys.stdout), (c.popen.stderr, lambda: sys.stderr)):
                reader = threading.Thread(target=_forward, args=(stream, f"[p{c.index}] ", out, lock))
                reader.daemon = True
                reader.start()
                c.readers.append(reader)
        while True:
            codes = [c.popen.poll() for c in children]
            failed = [(c.index, code) for c, code in zip(children, codes, strict=True) if code]
            if failed:
                # several seen at once (one's death ending another) are all named: which came first is
                # not known
                others = [c.index for c in children if c.popen.poll() is None]
                stopping = f"; stopping {', '.join(f'p{i}' for i in others)}" if others else ""
                _say(", ".join(f"p{i} exited with {_describe(code)}" for i, code in failed) + stopping)
                return _exit_code(failed[0][1])
            if all(code == 0 for code in codes):
                return 0
            time.sleep(poll_interval)
    except KeyboardInterrupt:
        _say("interrupted; stopping every process")
        return 130
    except _Terminated:
        _say("got SIGTERM; stopping every process")
        return 143
    finally:
        _stop(children, grace_period)
        for c in children:
            for reader in c.readers:
                reader.join(timeout=1.0)  # a grandchild may hold the pipe open: do not wait on it
        if on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)


def _at_least(lowest: int | float, kind: type) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} >= {lowest}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} >= {lowest}, got {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rnnjax.launch",
        usage=(
            "%(prog)s -n N [--devices-per-process K] [--port PORT] [--grace-period S] "
            "[--heartbeat-timeout S] -- COMMAND ..."
        ),
        description=__doc__.splitlines()[0] if __doc__ else None,  # None under python -OO
    )
    parser.add_argument("-n", "--num-processes", type=_at_least(1, int), required=True, help="processes")
    parser.add_argument(
        "--devices-per-process", type=_at_least(1, int), help="host (CPU) devices in each process"
    )
    parser.add_argument("--port", type=_at_least(1, int), help="the coordinator's port (default: a free one)")
    parser.add_argument(
        "--grace-period",
        type=_at_least(0, float),
        default=5.0,
        help="seconds from SIGTERM to SIGKILL when stopping the processes (default: 5)",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=_at_least(1, int),
        help="seconds after which a silent process counts as dead (default: JAX's)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``python -m rnnjax.launch -n N [options] -- COMMAND ...``; returns the exit code.

    Args:
        argv: the arguments after the program name; None reads ``sys.argv[1:]``.

    Returns:
        `run`'s exit code, or 127 when the command cannot be started. Bad arguments exit through
        argparse (code 2), with a message naming the argument.

    Examples:
        From a shell, two processes that print their index (lines come back prefixed, as they arrive)::

            $ python -m rnnjax.launch -n 2 -- python -c "import os; print(os.environ['RNNJAX_PROCESS_ID'])"
            [p0] 0
            [p1] 1

        A command line without a command stops with argparse's usage error (code 2):

        >>> from rnnjax.launch import main
        >>> main(["-n", "2"])
        Traceback (most recent call last):
          ...
        SystemExit: 2
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        parser.error("no command to run: give it after --, e.g. -n 2 -- python train.py")
    if args.port is not None and args.port > 65535:
        parser.error(f"argument --port: expected a port <= 65535, got {args.port}")
    try:
        return run(
            command,
            args.num_processes,
            devices_per_process=args.devices_per_process,
            port=args.port,
            grace_period=args.grace_period,
            heartbeat_timeout=args.heartbeat_timeout,
        )
    except OSError as error:  # the command could not start; the processes already started are stopped
        _say(f"cannot start {command[0]!r}: {error}")
        return 127


if __name__ == "__main__":
    sys.exit(main())
