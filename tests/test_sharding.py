"""Data parallelism through JAX's own sharding: rnnjax's programs with the batch sharded over two devices.

`tests/sharded_run.py` runs them in a fresh process (the two CPU devices must be requested before JAX
starts) on two kinds of mesh, against the same programs on one device:
- ``auto``: `AxisType.Auto` axes, no context mesh, arrays placed with `jax.device_put`;
- ``explicit``: `jax.make_mesh`'s default `AxisType.Explicit` axes under `jax.set_mesh`, where JAX checks
  every array's sharding at trace time (a replicated initial carry or zero row beside a batch-sharded step
  is a type error there);
- ``shard_map``: the program written per device under `jax.shard_map`, where JAX checks which values vary
  by device (zeros entering a scan beside each device's own rows must be cast to vary, and a custom VJP's
  parameter gradient must be summed over the devices to have its replicated parameter's type);
- explicit axes with no context mesh (the arrays' types alone name it), and meshes of one device.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from helpers import CELLS, host_devices_env

# each test runs a program on two host devices in a fresh process: minutes in all (make test-slow)
pytestmark = pytest.mark.slow

# every cell's hand-derived backward, autodiff (whose forward is the same code, and whose transpose is JAX's)
# for two, and the rest of the API that a data-parallel user meets
EXPLICIT = [f"{name}-manual" for name in CELLS] + [
    "user-cell-manual",
    "user-cell-replicated-carry",
    "lstm-autodiff",
    "gru-autodiff",
    "lstm-reverse",
    "lstm-checkpoint",
    "lstm-budget-binomial",
    "lstm-budget-nested",
    "lstm-replicated-carry",
    "bidirectional",
    "stack",
    "hidden-grad-norms",
    "cross-entropy",
    "losses-replicated-lengths",
    "truncated-bptt",
    "truncated-bptt-replicated-carry",
    "truncated-bptt-per-row-sum",
    "truncated-bptt-per-row-mean",
    "stack-dropout",
    "rtrl-lstm",
    "rtrl-indrnn-tanh",
    "rtrl-lru",
    "jacobian-spectrum",
    "lyapunov-exponent",
    "gradcheck-gru",
    "gradcheck-lru",
    "gradcheck-user-cell",
    "greedy",
    "sample-top-k",
    "decoder-step",
    "embed",
    "beam-search",
]
# the code paths that differ by cell in the hand-derived backward, on a mesh that nothing at trace time
# names except the arrays' own types
AUTO = [
    "lstm-manual",
    "lstm-autodiff",
    "gru-manual",
    "gru-autodiff",
    "mgu-manual",
    "lstm-projected-manual",
    "indrnn-tanh-manual",
    "user-cell-manual",
    "user-cell-replicated-carry",
    "lstm-checkpoint",
    "lstm-budget-binomial",
    "rtrl-lstm",
    "rtrl-lru",
    "gradcheck-gru",
    "losses-replicated-lengths",
    "truncated-bptt-replicated-carry",
    "truncated-bptt-per-row-sum",
    "truncated-bptt-per-row-mean",
    "stack-dropout",
    "decoder-step",
    "embed",
    "beam-search",
]
# per device under shard_map: the cells whose backward differs, a user-written cell (per-step VJPs), the
# schedules, the layers and the decoders
SHARD_MAP = [
    "lstm-manual",
    "lstm-autodiff",
    "gru-manual",
    "gru-autodiff",
    "mgu-manual",
    "lstm-layernorm-manual",
    "lru-manual",
    "lstm-projected-manual",
    "user-cell-manual",
    "user-cell-autodiff",
    "lstm-reverse",
    "lstm-checkpoint",
    "lstm-budget-binomial",
    "lstm-budget-nested",
    "bidirectional",
    "stack",
    "truncated-bptt",
    "rtrl-lstm",
    "rtrl-indrnn-tanh",
    "rtrl-lru",
    "jacobian-spectrum",
    "greedy",
    "decoder-step",
    "embed",
    "beam-search",
]
# the gradient with respect to a replicated input is replicated: gathering it is the right answer
# (at most one all-gather per leaf of the carry and per unroll that takes it: the LSTM's h and c; the user
# cell's h, in two unrolls)
GATHERS_EXPECTED = {"lstm-replicated-carry": 2, "user-cell-replicated-carry": 2}
# The programs that may run a collective inside a loop. Every other one sums over the batch only after its
# loops: the hand-derived BPTT's weight gradients and its per-unit sums (`rj.RowSum`) included, where a
# collective per step would make a split batch pay a cross-device latency T times.
COLLECTIVES_IN_LOOPS = {
    # autodiff through scan accumulates the weight gradients in the loop: one all-reduce per step
    "lstm-autodiff",
    "gru-autodiff",
    "user-cell-autodiff",
    # once per chunk: each chunk's gradient is jax.grad of the user's loss of the whole batch (with
    # per_row="sum" or "mean" it is summed once, after the last chunk)
    "truncated-bptt",
    "truncated-bptt-replicated-carry",
    # RTRL's gradient is a sum over the batch at every step, by design
    "rtrl-lstm",
    "rtrl-indrnn-tanh",
    "rtrl-lru",
}
# On an auto mesh only: none. The memory-saving schedules and a user-written cell's manual backward run each
# device's rows as a group of their own there (`rnnjax.sharding.row_groups`), as they run per device under
# shard_map on an explicit mesh, and sum the parameter gradient over the devices once, after the loop.
AUTO_COLLECTIVES_IN_LOOPS: set[str] = set()


def _run(kind: str, cases: list[str]) -> dict:
    """The records of ``cases`` run on each kind of mesh of ``kind`` (`sharded_run.KINDS`, comma-separated):
    of that kind, or by kind where there are several."""
    here = pathlib.Path(__file__).parent
    env = host_devices_env(2)
    run = subprocess.run(
        [sys.executable, str(here / "sharded_run.py"), kind, ",".join(cases)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    records = json.loads(run.stdout.strip().splitlines()[-1])
    return records[kind] if "," not in kind else records


def _failures(records: dict, loops_allowed: frozenset = frozenset()) -> dict:
    """The cases that break data parallelism, with what they broke: not the same values as on one device;
    an all-gather of a batch-sharded buffer (each device must run its own rows, the weight-gradient GEMMs
    included); a collective inside a loop (outside `COLLECTIVES_IN_LOOPS` and ``loops_allowed``); for a
    training step, d xs not sharded like xs, or parameter gradients not replicated (summed over the
    devices by an all-reduce); for RTRL, gradients not replicated; for `rj.gradcheck` on
    sharded inputs, an oracle that did not run or did not agree."""
    bad = {}
    for case, r in records.items():
        if "passed" in r:  # a gradcheck report, with its own tolerances
            if not r["passed"]:
                bad[case] = r
            continue
        ok = r["error"] <= 1e-12 and r["all_gathers"] <= GATHERS_EXPECTED.get(case, 0)
        allowed = case in COLLECTIVES_IN_LOOPS or case in loops_allowed
        ok = ok and (allowed or r["collectives_in_loops"] == 0)
        if "d_xs_batch_sharded" in r:
            ok = ok and r["d_xs_batch_sharded"] and r["d_params_replicated"]
            ok = ok and (r["all_reduces"] >= 1 or r["devices"] == 1)
        if "grads_replicated" in r:
            ok = ok and r["grads_replicated"]
        if not ok:
            bad[case] = r
    return bad


# One test per mesh, each one process: compiling a case costs 0.5-2 s, and a fixture shared by
# parametrized tests ran once on each xdist worker.
def test_explicit_mesh():
    records = _run("explicit", EXPLICIT)
    assert sorted(records) == sorted(EXPLICIT)
    assert not _failures(records), _failures(records)


def test_auto_mesh():
    records = _run("auto", AUTO)
    assert sorted(records) == sorted(AUTO)
    failures = _failures(records, frozenset(AUTO_COLLECTIVES_IN_LOOPS))
    assert not failures, failures


def test_shard_map():
    records = _run("shard_map", SHARD_MAP)
    assert sorted(records) == sorted(SHARD_MAP)
    assert not _failures(records), _failures(records)


# The same training steps where nothing names the mesh but the arrays' types (no `jax.set_mesh`: arrays placed
# with a NamedSharding, as in JAX's multi-process guide), and on a mesh of one device, with and without a
# context mesh (code written for N devices, run with N = 1): the hand-derived backward's weight GEMMs and
# per-unit sums (the GRU's), a user-written cell's backward per device, the losses (CTC per device), dropout
# between layers and an embedding lookup.
ANY_MESH_KINDS = ["explicit-no-context", "auto-1", "explicit-1", "explicit-1-no-context"]
ANY_MESH = [
    "gru-manual",
    "user-cell-replicated-carry",
    "losses-replicated-lengths",
    "stack-dropout",
    "embed",
    "truncated-bptt-per-row-mean",
]


def test_mesh_from_the_arrays_of_any_size():
    records = _run(",".join(ANY_MESH_KINDS), ANY_MESH)
    assert sorted(records) == sorted(ANY_MESH_KINDS)
    for kind, by_case in records.items():
        assert sorted(by_case) == sorted(ANY_MESH), kind
        failures = _failures(by_case, frozenset(AUTO_COLLECTIVES_IN_LOOPS) if "auto" in kind else frozenset())
        assert not failures, (kind, failures)


# weights split by their contracted axis and hidden units split (both meshes), and the explicit mesh's
# clear error for what it cannot split
MODEL_SPLIT = [f"{name}-{grad}" for name in [*CELLS, "user-cell"] for grad in ("manual", "autodiff")] + [
    *[f"{name}-units-{kind}" for name in ("lstm", "gru", "mgu", "user") for kind in ("auto", "explicit")],
    "split-time",
]


def test_model_split():
    records = _run("model", MODEL_SPLIT)
    assert sorted(records) == sorted(MODEL_SPLIT)
    for case, r in records.items():
        if "error_message" in r:
            continue
        assert r["error"] <= 1e-12, (case, r)
        assert r.get("grads_typed_as_params", True), (case, r)
    time = records["split-time"]["error_message"]
    assert time and "time axis" in time and "P(None, None, None)" in time
