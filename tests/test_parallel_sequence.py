"""The time axis of ``xs`` split over devices (`rnnjax.parallel.sequence`) equals one device's sequential scan.

On four host devices in a fresh process (`sequence_split_run.py`): outputs, the final carry and the gradients
to params, xs and the carry, float64, for minGRU, minLSTM, the LRU and IndRNN with the identity, with lengths
(0 and T among them), reverse, a given or zero carry, chunks, B = 1, 2 and 4 devices on the time axis and a
mesh splitting the batch and the time at once; and the collectives the compiled programs run, counted. In
this process, on a mesh of one device (whose types show the split as a mesh of several does): the same
equality, and what a time split refuses.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from helpers import host_devices_env, random_problem, rel_err
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rnnjax as rj

TOL = 1e-12


@pytest.mark.slow
def test_two_and_four_devices_equal_one_sequential_device():
    here = pathlib.Path(__file__).parent
    env = host_devices_env(4)
    run = subprocess.run(
        [sys.executable, str(here / "sequence_split_run.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(run.stdout.strip().splitlines()[-1])
    errors = record["errors"]
    assert len(errors) == 16
    assert max(errors.values()) <= TOL, errors
    for case, counts in record["collectives"].items():
        # the forward: one all-gather of the parts' summaries. jax.vjp: the forward's, the backward's, and
        # the one all-reduce that sums the parameters' gradient over the devices
        assert counts == {"forward": {"all-gather": 1}, "vjp": {"all-gather": 2, "all-reduce": 1}}, case


def one_device_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((1,), ("time",), devices=jax.devices()[:1])


def on_time(xs: jax.Array, mesh: jax.sharding.Mesh) -> jax.Array:
    return jax.device_put(xs, NamedSharding(mesh, P(None, "time")))


@pytest.mark.parametrize("name", ["mingru", "lru"])
def test_a_one_device_split_equals_sequential(name):
    cell = rj.mingru(4) if name == "mingru" else rj.lru(2, r_min=0.4, r_max=0.95, max_phase=3.0)
    params, xs, carry = random_problem(cell, jax.random.key(1), 3, 5, 2)
    lengths = jnp.array([0, 5, 3])

    def loss(params: Any, xs: jax.Array, carry: Any, method: str) -> tuple:
        final, ys = rj.unroll(cell, params, xs, carry, lengths=lengths, reverse=True, method=method)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(jnp.cos(final.h)), (final, ys)

    grad = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True), static_argnums=3)
    want = grad(params, xs, carry, "sequential")
    got = grad(params, on_time(xs, one_device_mesh()), carry, "auto")
    assert rel_err(got, want) <= TOL


def test_nonlinear_cells_are_refused_with_what_to_do():
    cell = rj.gru(4)
    xs = on_time(jnp.ones((2, 4, 3)), one_device_mesh())
    match = (
        r"split by its time axis over an explicit mesh, as P\(None, 'time', None\); cell 'gru' is not linear "
        r"in its state.*split the batch instead, e.g. P\(None, None, None\)"
    )
    with pytest.raises(ValueError, match=match):
        rj.unroll(cell, cell.init(jax.random.key(0), 3), xs, method="auto")


@pytest.mark.parametrize("cell", [rj.gru(4), rj.mingru(4)], ids=["gru", "mingru"])
@pytest.mark.parametrize("method", ["deer", "quasi_deer"])
def test_deer_refuses_a_time_split(cell, method):
    """DEER solves each sequence whole on one device: a time split is refused by name, whether through
    rj.unroll or rj.deer_unroll, and for a linear cell too (no silent switch to the associative scan)."""
    params = cell.init(jax.random.key(0), 3)
    xs = on_time(jnp.ones((2, 4, 3)), one_device_mesh())
    match = (
        rf"split by its time axis .*method='{method}' solves each sequence's whole trajectory on one device"
    )
    with pytest.raises(ValueError, match=match):
        rj.unroll(cell, params, xs, method=method)
    with pytest.raises(ValueError, match=match):
        rj.deer_unroll(cell, params, xs, quasi=method == "quasi_deer")


def test_the_sequential_method_is_refused_naming_the_associative_one():
    cell = rj.mingru(4)
    xs = on_time(jnp.ones((2, 4, 3)), one_device_mesh())
    with pytest.raises(
        ValueError, match=r"method='sequential' reads one step at a time.*method='associative'"
    ):
        rj.unroll(cell, cell.init(jax.random.key(0), 3), xs)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"method": "auto", "checkpoint": 2}, "checkpoint= applies to method='sequential' only"),
        ({"method": "associative", "budget": 10_000}, "budget= applies to method='sequential' only"),
    ],
)
def test_sequential_only_options_are_refused(options, match):
    cell = rj.mingru(4)
    xs = on_time(jnp.ones((2, 4, 3)), one_device_mesh())
    with pytest.raises(ValueError, match=match):
        rj.unroll(cell, cell.init(jax.random.key(0), 3), xs, **options)


def test_split_parameters_are_refused():
    cell = rj.mingru(4)
    mesh = one_device_mesh()
    params = cell.init(jax.random.key(0), 3)
    params = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P("time"))), params)
    with pytest.raises(
        ValueError, match=r"the parameters must be replicated, got params.* split as P\('time'"
    ):
        rj.unroll(cell, params, on_time(jnp.ones((2, 4, 3)), mesh), method="associative")
