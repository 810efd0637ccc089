"""Memory-saving BPTT (``checkpoint=``): gradients unchanged, residual memory O(√T)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from helpers import CELLS, random_problem, readout_loss, rel_err
from test_gradcheck import my_cell

import rnnjax as rj

B, T, I, H = 3, 10, 2, 4


def _check_equal(name, lengths, reverse, checkpoint, grads, key):
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    plain = readout_loss(cell, jax.random.key(2), lengths=lengths, reverse=reverse)
    saving = readout_loss(cell, jax.random.key(2), lengths=lengths, reverse=reverse, checkpoint=checkpoint)
    assert abs(float(saving(params, xs, carry, "manual") - plain(params, xs, carry, "manual"))) <= 1e-12
    g_plain = jax.grad(plain, (0, 1, 2))(params, xs, carry, "manual")
    for grad in grads:
        assert rel_err(jax.grad(saving, (0, 1, 2))(params, xs, carry, grad), g_plain) <= 1e-12


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("lengths", [None, jnp.array([10, 0, 7])], ids=["full", "lengths"])
@pytest.mark.parametrize("name", ["elman-tanh", "lstm", "gru"])
def test_checkpointed_gradients_equal_plain(name, lengths, reverse, key):
    """K=3 on T=10: three full segments and a one-step tail, in both directions."""
    _check_equal(name, lengths, reverse, 3, ["manual"], key)


@pytest.mark.parametrize("checkpoint", ["sqrt", 1, 10, 25])
def test_segment_lengths_and_autodiff(checkpoint, key):
    """K = ⌈√T⌉, 1 (every step), T (one segment) and > T; the autodiff twin checkpoints the same way."""
    _check_equal("lstm", jnp.array([10, 0, 7]), True, checkpoint, rj.GRAD_MODES, key)


def test_checkpointed_user_cell(key):
    cell = my_cell()
    params, xs, carry = random_problem(cell, key, B, T, I)

    def loss(p, x, c, ck):
        final, ys = rj.unroll(cell, p, x, c, lengths=jnp.array([10, 4, 0]), checkpoint=ck)
        return jnp.sum(jnp.sin(ys["h"])) + jnp.sum(final.h**2)

    assert (
        rel_err(
            jax.grad(loss, (0, 1, 2))(params, xs, carry, 4),
            jax.grad(loss, (0, 1, 2))(params, xs, carry, None),
        )
        <= 1e-12
    )


def _temp_memory(T: int, checkpoint) -> int:
    cell = rj.lstm(32)
    params = cell.init(jax.random.key(0), 16)
    xs = jnp.ones((4, T, 16), jnp.float32)
    # many-to-one: the loss needs no O(T) outputs, so what grows with T is what BPTT keeps
    step = jax.jit(jax.grad(lambda p: jnp.sum(rj.unroll(cell, p, xs, checkpoint=checkpoint)[0].h ** 2)))
    return step.lower(params).compile().memory_analysis().temp_size_in_bytes


def test_residual_memory_grows_as_sqrt_t():
    plain = [_temp_memory(T, None) for T in (1024, 4096)]
    saving = [_temp_memory(T, "sqrt") for T in (1024, 4096)]
    assert plain[1] / plain[0] > 3.5  # linear in T
    assert saving[1] / saving[0] < 2.5  # ~2 = √4
    assert saving[1] < 0.1 * plain[1]


def test_checkpoint_errors(key):
    cell = rj.lstm(2)
    params, xs, _ = random_problem(cell, key, B, T, I)
    with pytest.raises(
        ValueError, match=r"checkpoint must be None, 'sqrt' or an int >= 1 \(steps per segment\), got 0"
    ):
        rj.unroll(cell, params, xs, checkpoint=0)
    with pytest.raises(
        ValueError, match=r"checkpoint must be None, 'sqrt' or an int >= 1 \(steps per segment\), got 'log'"
    ):
        rj.unroll(cell, params, xs, checkpoint="log")
