"""Mixed precision: ``rj.unroll(..., compute_dtype=)`` runs the forward and the hand-derived backward in a
narrow dtype, accumulates the weight gradients in float32, and returns gradients in the params' own dtype."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from helpers import CELLS, rel_err

import rnnjax as rj
from rnnjax.bptt import time_gemm

# the gated cells, whose state stays bounded; the linear diagonal recurrences (LRU, IndRNN) with eigenvalues
# near 1 lose the state itself to bfloat16's 8 bits over many steps, in either gradient mode
GATED = ["lstm", "gru", "elman-tanh", "mgu", "lstm-peephole"]
TOLERANCE = {jnp.bfloat16: 3e-2, jnp.float16: 4e-3, jnp.float32: 2e-6}


def _problem(name):
    cell = CELLS[name](16)
    params = cell.init(jax.random.key(0), 6, jnp.float32)
    xs = jax.random.normal(jax.random.key(1), (4, 40, 6), jnp.float32)
    return cell, params, xs, jnp.array([40, 25, 3, 0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", GATED)
def test_gradients_against_float64(name, dtype):
    cell, params, xs, lengths = _problem(name)

    def loss(p, x, c, compute_dtype, grad):
        final, ys = rj.unroll(cell, p, x, c, lengths=lengths, compute_dtype=compute_dtype, grad=grad)
        out = jnp.sum(jnp.sin(ys.astype(jnp.float64))) + jnp.sum(jnp.cos(final.h.astype(jnp.float64)))
        return out

    carry = jax.tree.map(lambda a: a + 0.3, cell.initial_carry(params, (4,)))
    to64 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float64), t)  # noqa: E731
    want = jax.grad(loss, (0, 1, 2))(to64(params), to64(xs), to64(carry), None, "manual")
    got = jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=(3, 4))(params, xs, carry, dtype, "manual")
    assert {a.dtype for a in jax.tree.leaves(got)} == {jnp.dtype(jnp.float32)}  # the inputs' own dtype
    assert rel_err(got, want) <= TOLERANCE[dtype]
    _, ys = rj.unroll(cell, params, xs, compute_dtype=dtype)
    assert ys.dtype == jnp.dtype(dtype)


def test_weight_gradient_gemms_accumulate_in_float32():
    """The hand-derived backward's weight-gradient GEMMs (`time_gemm`) ask for a float32 accumulator on
    bfloat16 operands (XLA:CPU accumulates in float32 regardless; GPUs and TPUs follow the request)."""
    cell, params, xs, _ = _problem("lstm")
    loss = lambda p: jnp.sum(rj.unroll(cell, p, xs, compute_dtype=jnp.bfloat16)[1].astype(jnp.float32))  # noqa: E731
    text = str(jax.make_jaxpr(jax.grad(loss))(params))
    assert len(re.findall(r":f32\[\d+,\d+\] = dot_general", text)) >= 2  # d w_ih and d w_hh, in float32
    a = jnp.ones((64, 64, 1), jnp.bfloat16)
    assert re.search(r":f32\[1,1\] = dot_general", str(jax.make_jaxpr(time_gemm)(a, a)))


def test_layers_pass_compute_dtype():
    layer = rj.stack(rj.bidirectional(rj.lstm(4)), rj.gru(3))
    params = layer.init(jax.random.key(0), 2, jnp.float32)
    xs = jnp.ones((2, 5, 2), jnp.float32)
    _, ys = layer.apply(params, xs, compute_dtype=jnp.bfloat16)
    assert ys.dtype == jnp.bfloat16
    grads = jax.grad(
        lambda p: jnp.sum(layer.apply(p, xs, compute_dtype=jnp.bfloat16)[1].astype(jnp.float32))
    )(params)
    assert {a.dtype for a in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_mixed_dtypes_without_compute_dtype_name_the_option():
    cell = rj.lstm(4)
    params = cell.init(jax.random.key(0), 2, jnp.float32)
    with pytest.raises(TypeError, match=r"xs has dtype bfloat16.*pass compute_dtype= for mixed precision"):
        rj.unroll(cell, params, jnp.ones((1, 3, 2), jnp.bfloat16))
    with pytest.raises(TypeError, match=r"compute_dtype must be a floating-point dtype, got int32"):
        rj.unroll(cell, params, jnp.ones((1, 3, 2), jnp.float32), compute_dtype=jnp.int32)
