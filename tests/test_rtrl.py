"""rj.rtrl_value_and_grad: exact online gradients forward in time, equal to BPTT, in memory that does not grow
with T."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CELLS, compilations, random_problem, rel_err

import rnnjax as rj


def _problem(name, key, B=3, T=9, I=2, H=4, K=3, move=0.1):
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, key, B, T, I, move=move)
    head = rj.dense(K)
    ro = head.init(jax.random.fold_in(key, 1), cell.output_size, jnp.float64)
    targets = jax.random.randint(jax.random.fold_in(key, 2), (B, T), 0, K)

    def step_loss(ro, y, target):  # cross-entropy of a dense read-out, per sequence
        logp = jax.nn.log_softmax(head.apply(ro, y), axis=-1)
        return -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]

    return cell, params, xs, carry, ro, targets, step_loss


def _bptt(cell, params, ro, xs, targets, step_loss, carry, lengths):
    """The same loss through rj.unroll, differentiated by the hand-derived BPTT."""

    def loss(params, ro):
        final, ys = rj.unroll(cell, params, xs, carry, lengths=lengths)
        per_step = jax.vmap(lambda y, t: step_loss(ro, y, t), in_axes=1, out_axes=1)(ys, targets)  # [B, T]
        valid = rj.losses.valid_mask(lengths, *xs.shape[:2])
        return jnp.sum(jnp.where(valid, per_step, jnp.zeros_like(per_step))), final

    (value, final), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, ro)
    return value, grads, final


@pytest.mark.parametrize(
    "name, with_lengths",
    [(n, w) for n in ("elman-tanh", "elman-relu", "lstm", "gru") for w in (False, True)],
)
def test_rtrl_equals_bptt(name, with_lengths, key):
    cell, params, xs, carry, ro, targets, step_loss = _problem(name, key)
    lengths = jnp.array([9, 4, 0]) if with_lengths else None
    value, grads, final = jax.jit(
        lambda p, r: rj.rtrl_value_and_grad(cell, p, r, xs, targets, step_loss, carry, lengths)
    )(params, ro)
    v_ref, g_ref, f_ref = _bptt(cell, params, ro, xs, targets, step_loss, carry, lengths)
    assert abs(float(value) - float(v_ref)) <= 1e-12 * abs(float(v_ref))
    assert rel_err(grads, g_ref) <= 1e-10
    assert rel_err(final, f_ref) <= 1e-14


@pytest.mark.parametrize("name", ["indrnn-tanh", "mingru", "minlstm", "lru"])
def test_diagonal_rtrl_equals_bptt_and_the_dense_path(name, key):
    """A diagonal cell keeps r sensitivities per parameter (r = 2 for the LRU's real and imaginary parts,
    the online-learning case of Zucchet et al. 2023); the gradient is BPTT's and the dense RTRL's."""
    cell, params, xs, carry, ro, targets, step_loss = _problem(name, key)
    assert cell.diagonal
    lengths = jnp.array([9, 4, 0])
    run = lambda structure: rj.rtrl_value_and_grad(  # noqa: E731
        cell, params, ro, xs, targets, step_loss, carry, lengths, structure=structure
    )
    value, grads, final = run("auto")
    v_ref, g_ref, f_ref = _bptt(cell, params, ro, xs, targets, step_loss, carry, lengths)
    assert abs(float(value) - float(v_ref)) <= 1e-12 * abs(float(v_ref))
    assert rel_err(grads, g_ref) <= 1e-10 and rel_err(final, f_ref) <= 1e-14
    assert rel_err(grads, run("dense")[1]) <= 1e-10


def test_diagonal_rtrl_keeps_one_sensitivity_per_parameter(key):
    """Compiled memory: the diagonal path holds [B, P] sensitivities, the dense one [B, H, P] (H = 32)."""
    cell, params, xs, carry, ro, targets, step_loss = _problem("mingru", key, H=32)

    def temp(structure):
        def fn(p, r):
            return rj.rtrl_value_and_grad(cell, p, r, xs, targets, step_loss, carry, structure=structure)[:2]

        return jax.jit(fn).lower(params, ro).compile().memory_analysis().temp_size_in_bytes

    B, (I, G) = xs.shape[0], params.w_ih.shape
    dense_m = B * 32 * (I * G + G) * 8  # bytes of the dense path's [B, S, P] float64 sensitivity matrix
    assert temp("dense") >= dense_m > 8 * temp("auto")


def test_rtrl_memory_does_not_grow_with_t(key):
    """Compiled temporary memory at T = 1000 is that at T = 100 (BPTT's grows tenfold)."""
    cell, params, _, carry, ro, _, step_loss = _problem("lstm", key)

    def temp(T, fn):
        xs = jnp.zeros((3, T, 2))
        targets = jnp.zeros((3, T), jnp.int32)
        lowered = jax.jit(fn).lower(params, ro, xs, targets)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    rtrl = lambda p, r, x, t: rj.rtrl_value_and_grad(cell, p, r, x, t, step_loss, carry)[:2]  # noqa: E731
    bptt = lambda p, r, x, t: _bptt(cell, p, r, x, t, step_loss, carry, None)[:2]  # noqa: E731
    small, large = temp(100, rtrl), temp(1000, rtrl)
    assert large <= 1.05 * small + 1024, (small, large)
    assert temp(1000, bptt) > 5 * temp(100, bptt)


def test_rtrl_trains_online(key):
    """A few steps of gradient descent on RTRL gradients lower the loss (a training mode, not just a check)."""
    cell, params, xs, carry, ro, targets, step_loss = _problem("gru", key, B=4, T=12, move=0.0)  # init
    grad_fn = jax.jit(lambda p, r: rj.rtrl_value_and_grad(cell, p, r, xs, targets, step_loss, carry)[:2])
    first, _ = grad_fn(params, ro)
    for _ in range(30):
        _, (gp, gr) = grad_fn(params, ro)
        params = jax.tree.map(lambda a, g: a - 0.05 * g, params, gp)
        ro = jax.tree.map(lambda a, g: a - 0.05 * g, ro, gr)
    assert float(grad_fn(params, ro)[0]) < 0.8 * float(first)


def test_rtrl_user_cell_and_errors(key):
    cell, params, xs, carry, ro, targets, step_loss = _problem("gru", key)
    user = rj.Cell(init=cell.init, initial_carry=cell.initial_carry, step=cell.step, name="mine")
    got = rj.rtrl_value_and_grad(user, params, ro, xs, targets, step_loss, carry)[1]
    assert rel_err(got, _bptt(cell, params, ro, xs, targets, step_loss, carry, None)[1]) <= 1e-10
    with pytest.raises(
        ValueError, match=r"every leaf of targets must have shape \[B, T, \.\.\.\] = \[3, 9, \.\.\.\]"
    ):
        rj.rtrl_value_and_grad(cell, params, ro, xs, targets[:, :4], step_loss, carry)
    with pytest.raises(
        ValueError, match=r"step_loss must return per-sequence losses of shape \[B\] = \(3,\)"
    ):
        rj.rtrl_value_and_grad(cell, params, ro, xs, targets, lambda r, y, t: jnp.sum(y), carry)
    with pytest.raises(ValueError, match=r"xs must have shape \[B, T, I\], got shape \(1, 3, 9, 2\)"):
        rj.rtrl_value_and_grad(cell, params, ro, xs[None], targets, step_loss)
    with pytest.raises(ValueError, match="lengths must lie in"):
        rj.rtrl_value_and_grad(cell, params, ro, xs, targets, step_loss, carry, jnp.array([1, 2, 10]))
    assert np.isfinite(float(rj.rtrl_value_and_grad(cell, params, ro, xs, targets, step_loss)[0]))
    with pytest.raises(ValueError, match=r"structure must be 'auto' or 'dense', got 'sparse'"):
        rj.rtrl_value_and_grad(cell, params, ro, xs, targets, step_loss, structure="sparse")


@pytest.mark.parametrize("name", ["lstm", "indrnn-relu"])  # the dense and the diagonal path
def test_eager_rtrl_compiles_one_program(name, key, caplog):
    """Dispatched operation by operation, the LSTM's RTRL took 29 compilations."""
    cell, params, xs, carry, ro, targets, step_loss = _problem(name, key, B=2, T=13, I=5)  # unused shapes
    run = compilations(caplog, rj.rtrl_value_and_grad, cell, params, ro, xs, targets, step_loss, carry)
    assert len(run) <= 1, run
