"""Property-based tests (hypothesis) over random shapes, lengths, directions and initial carries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from helpers import CELLS, jit_grad, random_problem, readout_loss, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import rnnjax as rj


@st.composite
def problems(draw):
    name = draw(st.sampled_from(sorted(CELLS)))
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 9))
    I = draw(st.integers(1, 4))
    # layer norm over one unit is constant, and its derivative there is round-off divided by sqrt(eps):
    # finite differences cannot resolve it, so the layer-normalised LSTM is drawn with two units or more
    H = draw(st.integers(2 if name == "lstm-layernorm" else 1, 5))
    lengths = draw(st.none() | st.lists(st.integers(0, T), min_size=B, max_size=B))
    reverse = draw(st.booleans())
    with_carry = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return name, B, T, I, H, lengths, reverse, with_carry, seed


@settings(max_examples=10)  # two gradients compiled per example
@given(problems())
def test_manual_equals_autodiff_everywhere(problem):
    name, B, T, I, H, lengths, reverse, with_carry, seed = problem
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, jax.random.key(seed), B, T, I)
    carry = carry if with_carry else None
    L = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    loss = readout_loss(cell, jax.random.key(seed + 1), lengths=L, reverse=reverse)
    argnums = (0, 1, 2) if with_carry else (0, 1)
    gm = jit_grad(loss, argnums)(params, xs, carry, "manual")
    ga = jit_grad(loss, argnums)(params, xs, carry, "autodiff")
    assert rel_err(gm, ga) <= 1e-10


@settings(max_examples=8)  # B + 1 unrolls compiled per example
@given(problems())
def test_each_row_is_its_own_sequence(problem):
    """Row b of a padded batch equals that sequence cut to its length and run alone (values and carry)."""
    name, B, T, I, H, lengths, reverse, _, seed = problem
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, jax.random.key(seed), B, T, I)
    lengths = [T] * B if lengths is None else lengths
    unroll = jax.jit(rj.unroll, static_argnums=0, static_argnames="reverse")
    final, ys = unroll(cell, params, xs, carry, lengths=jnp.asarray(lengths, jnp.int32), reverse=reverse)
    for b, n in enumerate(lengths):
        row = jax.tree.map(lambda a, b=b: a[b : b + 1], carry)
        f_b, ys_b = unroll(cell, params, xs[b : b + 1, :n], row, reverse=reverse)
        np.testing.assert_allclose(ys[b, :n], ys_b[0], rtol=1e-12, atol=1e-14)
        assert np.all(np.asarray(ys[b, n:]) == 0)
        for a, e in zip(jax.tree.leaves(final), jax.tree.leaves(f_b), strict=True):
            np.testing.assert_allclose(a[b], e[0], rtol=1e-12, atol=1e-14)


@settings(max_examples=6)  # a whole gradcheck per example
@given(problems())
def test_finite_differences_everywhere(problem):
    name, B, T, I, H, lengths, reverse, with_carry, seed = problem
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, jax.random.key(seed), B, T, I)
    report = rj.gradcheck(
        cell,
        params,
        xs,
        carry=carry if with_carry else None,
        lengths=None if lengths is None else jnp.asarray(lengths, jnp.int32),
        reverse=reverse,
        key=jax.random.key(seed),
        n_directions=2,
    )
    assert report.passed, str(report)
