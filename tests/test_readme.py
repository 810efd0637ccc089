"""Every Python block of README.md runs, in a fresh process with JAX's default settings, as a user's would.

A block that is a whole program runs as it is. A fragment (the API listing, the data-parallel step, the
PyTorch round trip) runs after a small prelude of its own, below, that defines the names the README leaves
to the reader with tiny shapes. The prelude goes after the block's leading imports and environment settings,
so that a block which sets ``XLA_FLAGS`` before JAX starts still does so first. A line whose comment reads
``# SomeError: message`` is the README saying that line raises: the block must raise there, with that message.

The blocks run in one process, each in a namespace of its own (a block that sets the environment runs in a
process of its own), outside this suite's conftest: float32, standard dtype promotion. Tracebacks point at
the README's own line numbers.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

import rnnjax as rj

ROOT = pathlib.Path(__file__).parents[1]
README = ROOT / "README.md"

_COMMON = """\
import jax, jax.numpy as jnp
import rnnjax as rj
key = jax.random.key(0)
"""

# The free names of each fragment, keyed by a short substring found in exactly one block.
PRELUDES = {
    "cell = rj.lstm(hidden_size, forget_bias": _COMMON
    + """\
hidden_size, input_size, B, T = 4, 3, 2, 5
x = jax.random.normal(key, (B, input_size))
xs = jax.random.normal(key, (B, T, input_size))
lengths = jnp.array([T, 3])
""",
    "checkify.checkify(f": _COMMON
    + """\
cell = rj.lstm(4)
params = cell.init(key, input_size=3)
xs = jax.random.normal(key, (2, 10, 3))
""",
    "probe=probe": _COMMON
    + """\
B, T, I, H = 2, 6, 3, 4
cell = rj.elman(H)
params = cell.init(key, input_size=I)
xs = jax.random.normal(key, (B, T, I))
lengths = jnp.array([T, 4])
readout = lambda hs: jnp.sum(hs[:, -1] ** 2)
norms_elman = norms_lstm = jnp.logspace(-3.0, 0.0, T)
""",
    "rj.stack(rj.bidirectional(rj.lstm(128))": _COMMON
    + """\
import torch
dropout_key = jax.random.key(1)
xs = jax.random.normal(key, (2, 7, 40))
lengths = jnp.array([7, 5])
head_params = rj.dense(29).init(key, 256)
labels = jnp.array([[3, 5, 0], [7, 0, 0]])
label_lengths = jnp.array([2, 1])
""",
    "# every device; Explicit axes": _COMMON
    + """\
from jax.sharding import PartitionSpec as P
cell = rj.gru(4)
params = cell.init(key, input_size=3)
xs = jax.random.normal(key, (2 * jax.device_count(), 5, 3))
loss_fn = lambda params, xs: jnp.mean(rj.unroll(cell, params, xs)[1] ** 2)
""",
    "process_rows(split": _COMMON
    + """\
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
params = rj.lstm(4).init(key, input_size=3)
global_xs = np.ones((2 * jax.device_count(), 5, 3), np.float32)
""",
    "xla_force_host_platform_device_count=2": _COMMON
    + """\
cell = rj.lstm(4)
params = cell.init(key, input_size=3)
xs = jax.random.normal(key, (4, 5, 3))
loss_fn = lambda params, xs: jnp.mean(rj.unroll(cell, params, xs)[1] ** 2)
""",
}

_HEAD = re.compile(r"(import |from \S+ import |os\.environ\[)")
_RAISES = re.compile(r"#\s*(\w+(?:Error|Exception)): (.*)$")


@dataclasses.dataclass(frozen=True)
class Block:
    """A ```python block of the README: ``line`` is the README line of its first line of code."""

    line: int
    source: str

    @property
    def title(self) -> str:
        return f"README.md:{self.line}: {self.source.splitlines()[0][:60]}"

    @property
    def prelude(self) -> str:
        keys = [k for k in PRELUDES if k in self.source]
        assert len(keys) <= 1, f"{self.title}: several preludes match: {keys}"
        return PRELUDES[keys[0]] if keys else ""

    @property
    def alone(self) -> bool:
        """Sets the environment, which JAX reads once per process: it needs a process of its own."""
        return "os.environ" in self.source

    @property
    def raises(self) -> tuple[int, str, str] | None:
        """The README line said to raise, the error's name and its message, or None."""
        for i, text in enumerate(self.source.splitlines()):
            if m := _RAISES.search(text):
                return self.line + i, m.group(1), m.group(2).strip()
        return None

    def parts(self) -> list[tuple[int, str]]:
        """``(first README line, code)`` pieces to run in order: the leading imports and environment
        settings, the prelude (line 0: not README code), the rest."""
        lines = self.source.splitlines(keepends=True)
        n = 0
        while n < len(lines) and _HEAD.match(lines[n]):
            n += 1
        return [(self.line, "".join(lines[:n])), (0, self.prelude), (self.line + n, "".join(lines[n:]))]


def python_blocks() -> list[Block]:
    blocks, start, lines = [], None, README.read_text().splitlines(keepends=True)
    for i, text in enumerate(lines, start=1):
        if start is None and text.rstrip() == "```python":
            start = i + 1
        elif start is not None and text.rstrip() == "```":
            blocks.append(Block(start, "".join(lines[start - 1 : i - 1])))
            start = None
    return blocks


BLOCKS = python_blocks()

# Runs the blocks given as JSON on stdin, each in a fresh namespace. Writes {line: None} for a block that
# ran, else {line: [traceback, the exception's type name, its message, the last README line it passed]}.
_RUNNER = """\
import json, sys, traceback
results = {}
for block in json.load(sys.stdin):
    namespace = {"__name__": "__main__"}
    print(f"=== {block['title']}", flush=True)
    try:
        for line, code in block["parts"]:
            name = "README.md" if line else "<prelude of " + block["title"] + ">"
            exec(compile("\\n" * max(line - 1, 0) + code, name, "exec"), namespace)
        results[block["line"]] = None
    except BaseException as e:
        frames = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == "README.md"]
        results[block["line"]] = [traceback.format_exc(), type(e).__name__, str(e), (frames or [0])[-1]]
with open(sys.argv[1], "w") as f:
    json.dump(results, f)
"""


def run_blocks(blocks: list[Block], tmp: pathlib.Path) -> tuple[dict[int, list | None], str]:
    """Runs ``blocks`` in one fresh Python process from ``tmp``: their results and the process's output."""
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]))
    out = tmp / "results.json"
    payload = [{"line": b.line, "title": b.title, "parts": b.parts()} for b in blocks]
    run = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(out)],
        input=json.dumps(payload),
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    return {int(k): v for k, v in json.loads(out.read_text()).items()}, run.stdout + run.stderr


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory) -> tuple[dict[int, list | None], str]:
    return run_blocks([b for b in BLOCKS if not b.alone], tmp_path_factory.mktemp("readme"))


def check(block: Block, error: list | None) -> None:
    raises = block.raises
    if raises is None:
        assert error is None, f"{block.title} failed:\n{error[0]}"
        return
    line, name, message = raises
    assert error is not None, f"{block.title}: README line {line} says it raises {name}, but it ran"
    trace, raised, said, at = error
    assert (raised, at) == (name, line), f"{block.title}: not {name} at README line {line}:\n{trace}"
    assert said.startswith(message), f"{block.title}: the README says {message!r}, the error {said!r}"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"line{b.line}")
def test_readme_block_runs(block, shared_run, tmp_path):
    if block.alone:
        results, _ = run_blocks([block], tmp_path)
    else:
        results, _ = shared_run
    check(block, results[block.line])


def test_readme_has_blocks_and_every_prelude_is_used():
    assert len(BLOCKS) >= 8, [b.title for b in BLOCKS]
    for key in PRELUDES:
        users = [b.title for b in BLOCKS if key in b.source]
        assert len(users) == 1, f"prelude {key!r} matches {users}, not one block"


def test_readme_api_listing_gives_the_defaults():
    """The API listing's ``name=constant`` arguments of ``rj.*`` and ``cell.*`` calls are their defaults."""
    (api,) = [b for b in BLOCKS if "cell = rj.lstm(hidden_size, forget_bias" in b.source]
    calls = [n for n in ast.walk(ast.parse(api.source)) if isinstance(n, ast.Call)]
    owners = {"rj": rj, "cell": rj.lstm(4)}  # the listing's cell is an LSTM
    checked = 0
    for call in calls:
        func = call.func
        if not (isinstance(func, ast.Attribute) and getattr(func.value, "id", None) in owners):
            continue
        params = inspect.signature(getattr(owners[func.value.id], func.attr)).parameters
        for kw in call.keywords:
            if isinstance(kw.value, ast.Constant) and kw.arg in params:
                assert params[kw.arg].default == kw.value.value, (
                    f"README.md:{api.line + call.lineno - 1}: {func.value.id}.{func.attr}'s {kw.arg} defaults to "
                    f"{params[kw.arg].default!r}, the README says {kw.value.value!r}"
                )
                checked += 1
    assert checked >= 10, checked
