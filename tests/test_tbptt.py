"""Truncated BPTT: equal to the hand-computed truncated gradient, and to full BPTT when one chunk covers T."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compilations, rel_err

import rnnjax as rj

B, T, I, H = 2, 11, 3, 4


def setup(key):
    cell = rj.lstm(H)
    params = cell.init(key, I, jnp.float64)
    stream = {
        "x": jax.random.normal(jax.random.key(1), (B, T, I), jnp.float64),
        "y": jax.random.normal(jax.random.key(2), (B, T, H), jnp.float64),
    }

    def chunk_loss(params, carry, chunk, grad="manual"):
        carry, ys = rj.unroll(cell, params, chunk["x"], carry, grad=grad)
        return jnp.sum((ys - chunk["y"]) ** 2), carry

    return cell, params, stream, chunk_loss


@pytest.mark.parametrize("K", [1, 3, 4, 11])
def test_equals_hand_computed_truncation(K, key):
    cell, params, stream, chunk_loss = setup(key)
    carry0 = cell.initial_carry(params, (B,))
    loss, grads, final = jax.jit(lambda p: rj.truncated_bptt(chunk_loss, p, carry0, stream, chunk_size=K))(
        params
    )

    # by hand: a Python loop over the chunks, the carry cut from the graph at each boundary
    def truncated_objective(p):
        carry, total = carry0, 0.0
        for start in range(0, T, K):
            chunk = jax.tree.map(lambda a, s=start: a[:, s : s + K], stream)
            l, carry = chunk_loss(p, jax.lax.stop_gradient(carry), chunk, grad="autodiff")
            total = total + l
        return total, carry

    (loss_ref, final_ref), grads_ref = jax.value_and_grad(truncated_objective, has_aux=True)(params)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-13)
    assert rel_err(grads, grads_ref) <= 1e-12
    assert rel_err(final, final_ref) <= 1e-13


def test_one_chunk_is_full_bptt_and_short_chunks_are_not(key):
    cell, params, stream, chunk_loss = setup(key)
    carry0 = cell.initial_carry(params, (B,))
    full = jax.grad(lambda p: chunk_loss(p, carry0, stream)[0])(params)
    _, g_all, _ = rj.truncated_bptt(chunk_loss, params, carry0, stream, chunk_size=T)
    _, g_big, _ = rj.truncated_bptt(chunk_loss, params, carry0, stream, chunk_size=100)
    _, g_2, _ = rj.truncated_bptt(chunk_loss, params, carry0, stream, chunk_size=2)
    assert rel_err(g_all, full) <= 1e-13 and rel_err(g_big, full) <= 1e-13
    assert rel_err(g_2, full) > 1e-3


def test_outer_grad_of_the_loss_is_the_truncated_gradient(key):
    """Differentiating the returned loss from outside gives the same truncated gradient (no leak across chunks)."""
    cell, params, stream, chunk_loss = setup(key)
    carry0 = cell.initial_carry(params, (B,))
    _, grads, _ = rj.truncated_bptt(chunk_loss, params, carry0, stream, chunk_size=3)
    outer = jax.grad(lambda p: rj.truncated_bptt(chunk_loss, p, carry0, stream, chunk_size=3)[0])(params)
    assert rel_err(outer, grads) <= 1e-12


def test_streaming_in_calls_equals_one_call(key):
    """A stream fed in two calls (carrying the final carry over) equals one call over the whole stream."""
    cell, params, stream, chunk_loss = setup(key)
    carry0 = cell.initial_carry(params, (B,))
    first = jax.tree.map(lambda a: a[:, :6], stream)
    second = jax.tree.map(lambda a: a[:, 6:], stream)
    l1, g1, c1 = rj.truncated_bptt(chunk_loss, params, carry0, first, chunk_size=3)
    l2, g2, c2 = rj.truncated_bptt(chunk_loss, params, c1, second, chunk_size=3)
    l, g, c = rj.truncated_bptt(chunk_loss, params, carry0, stream, chunk_size=3)
    np.testing.assert_allclose(l1 + l2, l, rtol=1e-13)
    assert rel_err(jax.tree.map(jnp.add, g1, g2), g) <= 1e-13
    assert rel_err(c2, c) <= 1e-14


def test_errors(key):
    cell, params, stream, chunk_loss = setup(key)
    carry0 = cell.initial_carry(params, (B,))
    with pytest.raises(ValueError, match=r"chunk_size must be an int >= 1, got 0"):
        rj.truncated_bptt(chunk_loss, params, carry0, stream, chunk_size=0)
    with pytest.raises(ValueError, match=r"per_row must be None or one of \('sum', 'mean'\), got 'max'"):
        rj.truncated_bptt(chunk_loss, params, carry0, stream, chunk_size=2, per_row="max")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"with per_row='sum' every array of stream and carry must lead with one"
    ):
        rj.truncated_bptt(
            chunk_loss, params, cell.initial_carry(params, (B + 1,)), stream, chunk_size=2, per_row="sum"
        )
    bad = {"x": stream["x"], "y": stream["y"][:, :5]}
    with pytest.raises(ValueError, match=r"every array of stream must have shape \[B, T, ...\] with one T"):
        rj.truncated_bptt(chunk_loss, params, carry0, bad, chunk_size=2)


@pytest.mark.parametrize("per_row", ["sum", "mean"])
def test_per_row_on_one_device_changes_nothing(per_row, key):
    """``per_row`` only moves where a split batch's gradient is summed (tests/test_sharding.py runs it on
    meshes, counting collectives): on one device the result is bit for bit that of the default."""
    cell, params, stream, chunk_loss = setup(key)
    carry0 = cell.initial_carry(params, (B,))
    plain = rj.truncated_bptt(chunk_loss, params, carry0, stream, chunk_size=4)
    rows = rj.truncated_bptt(chunk_loss, params, carry0, stream, chunk_size=4, per_row=per_row)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), rows, plain))


def test_eager_call_compiles_one_program(key, caplog):
    """Dispatched operation by operation, these chunks took 19 compilations."""
    cell, params, stream, chunk_loss = setup(key)
    carry0 = cell.initial_carry(params, (B,))
    run = compilations(caplog, rj.truncated_bptt, chunk_loss, params, carry0, stream, chunk_size=5)
    assert len(run) <= 1, run


_PER_ROW_CHECK = """
import sys
import jax, jax.numpy as jnp
from jax.experimental import checkify
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import rnnjax as rj
jax.config.update("jax_enable_x64", True)
cell = rj.lstm(3)
params = cell.init(jax.random.key(0), 2)
def mean_loss(p, c, s):
    c, ys = rj.unroll(cell, p, s, c)
    return jnp.mean(ys**2), c
for axis_type in (AxisType.Auto,):
    mesh = jax.make_mesh((2,), ("data",), axis_types=(axis_type,))
    rows = NamedSharding(mesh, P("data"))
    x = jax.device_put(jax.random.normal(jax.random.key(1), (4, 6, 2)), rows)
    carry = jax.device_put(cell.initial_carry(params, (4,)), rows)
    for per_row in ("mean", "sum"):
        run = lambda p, c, s: rj.truncated_bptt(mean_loss, p, c, s, chunk_size=4, per_row=per_row)
        err, _ = jax.jit(checkify.checkify(run))(params, carry, x)
        print(axis_type.name, per_row, err.get() is None, (err.get() or "").split(":")[0])
"""


@pytest.mark.slow
def test_per_row_that_does_not_describe_the_loss_is_a_checkify_error():
    """On two host devices (a fresh process), a mean loss declared ``per_row="sum"`` would double the loss
    and the gradient: under checkify the first chunk's whole-batch loss disagrees, and says so. (On
    explicit axes checkify cannot carry its error state through `jax.shard_map`'s loops, which run the
    devices' rows there.)"""
    import subprocess
    import sys

    from helpers import host_devices_env

    out = subprocess.run(
        [sys.executable, "-c", _PER_ROW_CHECK],
        env=host_devices_env(2),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    assert "Auto mean True " in lines
    assert "Auto sum False truncated_bptt(..., per_row='sum')" in lines
