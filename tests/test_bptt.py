"""The hand-derived BPTT equals jax.grad through the forward scan (float64, ≤ 1e-10) and finite differences.

The matrix: every cell × activation × {no lengths, lengths with 0 and T} × {forward, reverse}, with zero
and given initial carries alternating, gradients to params, xs and the carry, through `rj.gradcheck`
(which compares `jax.grad` of ``grad="manual"`` and ``grad="autodiff"`` and central differences). Then every
cell once more against all four oracles (with RTRL and the complex step) on the hardest corner of the
matrix: lengths with 0 and T, reverse, a given initial carry.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CELLS, jit_grad, random_problem, readout_loss, rel_err, tiered
from reference_cells import REFERENCES

import rnnjax as rj

B, T, I, H = 4, 7, 3, 5
LENGTHS = jnp.array([T, 0, 3, 1])  # a full sequence, an empty one, and two in between


# zero and given initial carries alternate over the four corners: each appears with and without lengths
# and in both directions (the hypothesis properties draw every combination at random on top)
CORNERS = {
    "full-forward-zero": (None, False, False),
    "full-reverse-given": (None, True, True),
    "lengths-forward-given": (LENGTHS, False, True),
    "lengths-reverse-zero": (LENGTHS, True, False),
}
# the core's three cells get all four corners; the others the opposite corner of the one where
# test_four_oracles_agree_on_every_cell checks every cell (lengths, reverse, a given carry)
CORE_CELLS = {"elman-tanh", "lstm", "gru"}
MATRIX = [
    pytest.param(name, *corner, id=f"{name}-{corner_id}")
    for name in CELLS
    for corner_id, corner in CORNERS.items()
    if name in CORE_CELLS or corner_id == "full-forward-zero"
]


@pytest.mark.parametrize(("name", "lengths", "reverse", "with_carry"), MATRIX)
def test_manual_equals_autodiff_and_finite_differences(name, with_carry, lengths, reverse, key):
    """Gradients to params, xs and the initial carry: manual vs jax.grad ≤ 1e-10, vs central differences ≤ 1e-6."""
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    report = rj.gradcheck(
        cell,
        params,
        xs,
        carry=carry if with_carry else None,
        lengths=lengths,
        reverse=reverse,
        oracles=("autodiff", "finite_differences"),
    )
    assert report.passed, str(report)
    assert [r.leaf for r in report.rows][:1] == ["params.w_ih"]
    fields = {f"params.{f}" for f in params._fields}  # every parameter leaf is checked, w_hh or u or none
    assert {r.leaf for r in report.rows} == fields | {"xs"} | {f"carry.{f}" for f in carry._fields}
    assert report.max_autodiff_error <= 1e-10
    assert report.max_fd_error <= 1e-6
    # and not trivially: with this linear read-out the gradient to every input leaf is non-zero
    loss = readout_loss(cell, jax.random.key(7), lengths=lengths, reverse=reverse)
    g = jit_grad(loss, (0, 1, 2))(params, xs, carry, "manual")
    assert all(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(g))


@pytest.mark.parametrize("name", list(CELLS))
def test_four_oracles_agree_on_every_cell(name, key):
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    report = rj.gradcheck(cell, params, xs, carry=carry, lengths=LENGTHS, reverse=True)
    assert report.oracles == rj.GRADCHECK_ORACLES
    assert report.passed, str(report)
    assert max(report.max_autodiff_error, report.max_rtrl_error, report.max_complex_error) <= 1e-12
    assert report.max_fd_error <= 1e-8


def test_layer_norm_at_a_zero_carry_with_the_default_eps(key):
    """LN(0 · w_hh) is LN's most curved point: the exact oracles agree to round-off, and gradcheck's
    fourth-order central differences at their usual step to ~1e-9 (seen 2e-10 to 2e-9 over four keys).
    The two-point difference they replaced was 3e-6 to 8e-6 off here: its truncation error is O(ε²) times
    a third derivative ~ε_LN^(-3/2)."""
    cell = rj.layer_norm_lstm(H, gain_init=lambda k, s, d: 1 + 0.5 * jax.random.normal(k, s, d))
    params, xs, _ = random_problem(cell, key, B, T, I)
    exact = rj.gradcheck(cell, params, xs, oracles=("autodiff", "rtrl", "complex_step"))
    assert exact.passed, str(exact)
    assert max(exact.max_autodiff_error, exact.max_rtrl_error, exact.max_complex_error) <= 1e-12
    fd = rj.gradcheck(cell, params, xs, oracles=("finite_differences",))
    assert fd.max_fd_error <= 1e-7, str(fd)


def test_gradients_respect_lengths(key):
    """Inputs past a sequence's length get exactly zero gradient; an empty sequence passes dcarry through."""
    cell = rj.lstm(H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    loss = readout_loss(cell, jax.random.key(3), lengths=LENGTHS)
    _, d_xs, d_carry = jit_grad(loss, (0, 1, 2))(params, xs, carry, "manual")
    d_xs = np.asarray(d_xs)
    for b, n in enumerate(np.asarray(LENGTHS)):
        assert np.all(d_xs[b, n:] == 0)
        if n:
            assert np.all(np.abs(d_xs[b, :n]).sum(-1) > 0)
    # row 1 is empty: the final carry *is* the initial carry, so d carry0 = d final = -sin(carry0)
    np.testing.assert_allclose(d_carry.h[1], -np.sin(carry.h[1]), rtol=1e-14)
    np.testing.assert_allclose(d_carry.c[1], -np.sin(carry.c[1]), rtol=1e-14)


@pytest.mark.parametrize("name", ["elman-tanh", "lstm", "gru"])
def test_vjp_and_value_and_grad_use_manual(name, key):
    """jax.vjp and jax.value_and_grad of user code go through the same hand-derived backward."""
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    loss = readout_loss(cell, jax.random.key(1))
    v, g = jax.value_and_grad(loss)(params, xs, carry, "manual")
    out, vjp = jax.vjp(lambda p: loss(p, xs, carry, "manual"), params)
    (g2,) = vjp(jnp.ones_like(out))
    assert rel_err(g2, g) <= 1e-14
    assert float(v) == float(loss(params, xs, carry, "autodiff"))


def test_manual_under_jit_vmap_and_traced_lengths(key):
    cell = rj.gru(H)
    params, xs, _ = random_problem(cell, key, B, T, I)

    def loss(p, xs, lengths, grad):
        return jnp.sum(rj.unroll(cell, p, xs, lengths=lengths, grad=grad)[1] ** 2)

    gm = jax.jit(jax.grad(loss), static_argnums=3)(params, xs, LENGTHS, "manual")
    ga = jax.jit(jax.grad(loss), static_argnums=3)(params, xs, LENGTHS, "autodiff")
    assert rel_err(gm, ga) <= 1e-10
    # vmap over an extra leading axis of xs (per-example gradients)
    xs2 = jnp.stack([xs, 2 * xs])
    per = jax.vmap(jax.grad(loss), in_axes=(None, 0, None, None))(params, xs2, LENGTHS, "manual")
    assert (
        rel_err(jax.tree.map(lambda a: a[1], per), jax.grad(loss)(params, 2 * xs, LENGTHS, "autodiff"))
        <= 1e-10
    )


def test_higher_batch_dims(key):
    """Extra leading batch dims ``[B1, B2, T, I]`` equal the flattened ``[B1*B2, T, I]`` run."""
    cell = rj.lstm(H)
    params, xs, carry = random_problem(cell, key, 6, T, I)
    lengths = jnp.array([7, 0, 3, 1, 2, 5])
    c_flat, ys_flat = rj.unroll(cell, params, xs, carry, lengths=lengths)
    c, ys = rj.unroll(
        cell,
        params,
        xs.reshape(2, 3, T, I),
        jax.tree.map(lambda a: a.reshape(2, 3, H), carry),
        lengths=lengths.reshape(2, 3),
    )
    assert ys.shape == (2, 3, T, H) and c.h.shape == (2, 3, H)
    np.testing.assert_array_equal(ys.reshape(6, T, H), ys_flat)
    np.testing.assert_array_equal(c.c.reshape(6, H), c_flat.c)

    def loss(xs4):
        return jnp.sum(jnp.sin(rj.unroll(cell, params, xs4, lengths=lengths.reshape(2, 3))[1]))

    g = jax.grad(loss)(xs.reshape(2, 3, T, I))
    g_flat = jax.grad(lambda x: jnp.sum(jnp.sin(rj.unroll(cell, params, x, lengths=lengths)[1])))(xs)
    np.testing.assert_allclose(g.reshape(6, T, I), g_flat, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", list(REFERENCES))
def test_manual_is_leaner_than_autodiff(name):
    """The hand-derived BPTT of every built-in cell keeps less compiled temporary memory than autodiff.

    What it takes: the carries in one buffer of T + 1 rows that the outputs share, weight-gradient GEMMs
    over operands flattened in the same (t, b) order (no transposed copy of the gate gradients), the
    backward's buffers allocated only once its cotangents exist, the GRU and MGU storing no column of dzh
    that dzx gives, per-unit parameters' gradients summed over the batch inside the loop (`rj.RowSum`),
    every stacked array in the same T + 1 rows so that no sum slices one, and, for the LSTMs, the GRU,
    minGRU and minLSTM, one buffer that holds in turn the projection, the residuals and the gate gradients
    (`rnnjax.scan.residual_slot`).
    """
    cell = CELLS[name](32)
    params, xs, _ = random_problem(cell, jax.random.key(0), 8, 64, 32, jnp.float32)
    temp = {}
    for mode in rj.GRAD_MODES:
        step = jax.jit(jax.grad(lambda p, x, m=mode: jnp.sum(rj.unroll(cell, p, x, grad=m)[1] ** 2), (0, 1)))
        temp[mode] = step.lower(params, xs).compile().memory_analysis().temp_size_in_bytes
    assert temp["manual"] <= REFERENCES[name].leaner * temp["autodiff"], temp


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize(
    "name",
    tiered(
        ["lstm", "minlstm", "gru", "lstm-peephole", "lstm-layernorm", "lstm-projected"], fast=("lstm", "gru")
    ),
)
def test_shared_buffer_keeps_float32_gradients_of_a_small_loss(name, reverse):
    """With the projection's buffer shared (`rnnjax.scan.residual_slot`), a float32 loss scaled by 1e-6
    gets gradients as accurate as autodiff's. The step the backward visits last keeps its residual out of
    the buffer, so its row adds an exact zero; leaving the residual there and subtracting it back out
    cancelled catastrophically (``d w_ih`` 26% wrong, ``d b`` 2%, at this scale)."""
    cell = CELLS[name](16)
    params = cell.init(jax.random.key(0), 16, jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (8, 24, 16), jnp.float64)
    lengths = jnp.array([24, 0, 5, 24, 1, 17, 24, 9])

    def grads(p, x, mode):
        def loss(p, x):
            ys = rj.unroll(cell, p, x, lengths=lengths, reverse=reverse, grad=mode)[1]
            return 1e-6 * jnp.sum(jnp.sin(ys)).astype(jnp.float64)

        return jit_grad(loss, (0, 1))(p, x)

    exact = grads(params, xs, "autodiff")
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, xs))
    for mode in rj.GRAD_MODES:
        got = grads(*f32, mode)
        for leaf, ref in zip(jax.tree.leaves(got), jax.tree.leaves(exact), strict=True):
            assert rel_err(leaf.astype(jnp.float64), ref) < 1e-5, (
                mode,
                rel_err(leaf.astype(jnp.float64), ref),
            )


@pytest.mark.parametrize("name", tiered(list(CELLS)))
def test_float32_is_as_accurate_as_the_problem_allows(name):
    """Float32 outputs and gradients against float64 ones from the same (float32) params and inputs: within
    16x of how far a relative 2^-24 perturbation of those moves the float64 answer (0.9-5.3x seen), and the
    hand-derived backward within 5x of autodiff's (1.0-2.4x seen). The layer-norm LSTM's and the LRU's float32
    errors, ~1e-6 to 1e-5 where the other cells' are ~1e-7, are their conditioning: a one-ulp perturbation
    moves them as far (LN renormalises h w_hh to unit variance however small h is; the LRU's |λ| is near 1)."""
    cell = CELLS[name](16)
    params, xs, _ = random_problem(cell, jax.random.key(0), 4, 32, 8)
    params, xs = jax.tree.map(lambda a: a.astype(jnp.float32).astype(jnp.float64), (params, xs))
    lengths = jnp.array([32, 20, 0, 27])

    @partial(jax.jit, static_argnums=2)
    def outputs_and_grads(p, x, mode):
        def loss(p, x):
            ys = rj.unroll(cell, p, x, lengths=lengths, grad=mode)[1]
            w = jax.random.normal(jax.random.key(5), ys.shape, jnp.float64).astype(ys.dtype)
            return jnp.sum(jnp.sin(ys) * w), ys

        (_, ys), g = jax.value_and_grad(loss, (0, 1), has_aux=True)(p, x)
        return [ys, *jax.tree.leaves(g)]

    exact = outputs_and_grads(params, xs, "manual")
    leaves, tree = jax.tree.flatten((params, xs))
    sensitivity = np.zeros(len(exact))
    for k in range(2):
        keys = jax.random.split(jax.random.key(10 + k), len(leaves))
        moved = [
            a * (1 + 2.0**-24 * jax.random.rademacher(kk, a.shape, a.dtype))
            for a, kk in zip(leaves, keys, strict=True)
        ]
        got = outputs_and_grads(*jax.tree.unflatten(tree, moved), "manual")
        sensitivity = np.maximum(sensitivity, [rel_err(a, b) for a, b in zip(got, exact, strict=True)])
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, xs))
    error = {
        m: np.array([rel_err(a, b) for a, b in zip(outputs_and_grads(*f32, m), exact, strict=True)])
        for m in rj.GRAD_MODES
    }
    assert np.all(error["manual"] <= 16 * sensitivity), (error["manual"], sensitivity)
    assert np.all(error["manual"] <= 5 * error["autodiff"]), error
