"""Bad input gets a clear ValueError/TypeError at trace time, naming the argument, the expected and the actual."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import rnnjax as rj

B, T, I, H = 2, 5, 3, 4


@pytest.fixture
def lstm_setup():
    cell = rj.lstm(H)
    params = cell.init(jax.random.key(0), I, jnp.float64)
    return cell, params, jnp.ones((B, T, I), jnp.float64)


def test_xs_rank(lstm_setup):
    cell, params, xs = lstm_setup
    with pytest.raises(
        ValueError,
        match=r"xs must have shape \[B, T, I\] \(rank >= 3\), got shape \(5, 3\) of rank 2 \(for a single sequence use xs\[None\]\)",
    ):
        rj.unroll(cell, params, xs[0])


def test_xs_feature_size(lstm_setup):
    cell, params, _ = lstm_setup
    with pytest.raises(
        ValueError, match=r"xs has feature size I=7 but params.w_ih has shape \(3, 16\), which expects I=3"
    ):
        rj.unroll(cell, params, jnp.ones((B, T, 7), jnp.float64))


def test_xs_integer(lstm_setup):
    """Integer inputs point to the fix: an embedding for token ids, a cast for integer features."""
    cell, params, _ = lstm_setup
    with pytest.raises(
        TypeError,
        match=r"xs must be a floating-point array \[B, T, I\], got dtype int32: for token ids \[B, T\] use "
        r"xs = rj.embed\(table, tokens\) with a float table \[V, E\], which gives \[B, T, E\]; for integer "
        r"features cast them first, e.g. xs.astype\(jnp.float32\)",
    ):
        rj.unroll(cell, params, jnp.ones((B, T, I), jnp.int32))
    with pytest.raises(TypeError, match=r"got dtype bool; cast it first, e.g. xs.astype\(jnp.float32\)$"):
        rj.unroll(cell, params, jnp.ones((B, T, I), bool))


def test_xs_token_ids(lstm_setup):
    """Rank-2 integer xs are token ids [B, T]: the hint is the embedding, not xs[None] (which would run
    silently on a [1, B, T] input once cast)."""
    cell, params, _ = lstm_setup
    tokens = jnp.zeros((B, T), jnp.int32)
    message = (
        r"^xs must be a floating-point array \[B, T, I\], got dtype int32 and shape \(2, 5\), which looks like "
        r"token ids \[B, T\]: xs = rj.embed\(table, tokens\) with a float table \[V, E\], which gives "
        r"\[B, T, E\]$"
    )
    with pytest.raises(TypeError, match=message):
        rj.unroll(cell, params, tokens)
    with pytest.raises(TypeError, match=message):
        rj.bidirectional(cell).apply(rj.bidirectional(cell).init(jax.random.key(0), I), tokens)
    # the hint's fix runs
    table = jnp.ones((7, I), jnp.float64)
    assert rj.unroll(cell, params, rj.embed(table, tokens))[1].shape == (B, T, H)


def test_xs_dtype_differs_from_params(lstm_setup):
    cell, params, xs = lstm_setup
    with pytest.raises(TypeError, match=r"params.w_ih has dtype float64 but xs has dtype float32"):
        rj.unroll(cell, params, xs.astype(jnp.float32))


def test_params_of_another_cell(lstm_setup):
    cell, params, xs = lstm_setup
    with pytest.raises(
        ValueError,
        match=r"params.w_ih of gru \(hidden_size=4\) must have shape \[I, 3H\] = \[3, 12\], got \(3, 16\)",
    ):
        rj.unroll(rj.gru(H), rj.GRUParams(params.w_ih, params.w_hh, params.b, params.b[:H]), xs)
    with pytest.raises(
        TypeError,
        match=r"params for gru must be a NamedTuple with fields .* got LSTMParams without \['b_hn'\]",
    ):
        rj.unroll(rj.gru(H), params, xs)
    with pytest.raises(
        ValueError,
        match=r"params.w_ih of lstm \(hidden_size=8\) must have shape \[I, 4H\] = \[3, 32\], got \(3, 16\)",
    ):
        rj.unroll(rj.lstm(8), params, xs)
    with pytest.raises(
        ValueError,
        match=r"params.w_hh of lstm \(hidden_size=4\) must have shape \[H, 4H\] = \[4, 16\], got \(4, 12\)",
    ):
        rj.unroll(cell, params._replace(w_hh=params.w_hh[:, :12]), xs)
    with pytest.raises(
        ValueError, match=r"params.b of lstm \(hidden_size=4\) must have shape \[4H\] = \[16\], got \(16, 1\)"
    ):
        rj.unroll(cell, params._replace(b=params.b[:, None]), xs)


@pytest.mark.parametrize(
    "lengths, error, message",
    [
        (jnp.array([5.0, 2.0]), TypeError, r"lengths must be an integer array \[B\], got dtype float64"),
        (
            jnp.array([5, 2, 1]),
            ValueError,
            r"lengths must have shape \[B\] = \(2,\) \(xs.shape\[:-2\]\), got shape \(3,\)",
        ),
        (
            jnp.array([[5, 2]]),
            ValueError,
            r"lengths must have shape \[B\] = \(2,\) \(xs.shape\[:-2\]\), got shape \(1, 2\)",
        ),
        (jnp.array([5, -1]), ValueError, r"lengths must lie in \[0, T\] = \[0, 5\], got values from -1 to 5"),
        (jnp.array([6, 2]), ValueError, r"lengths must lie in \[0, T\] = \[0, 5\], got values from 2 to 6"),
        (np.array([True, False]), TypeError, r"lengths must be an integer array \[B\], got dtype bool"),
    ],
)
def test_bad_lengths(lstm_setup, lengths, error, message):
    cell, params, xs = lstm_setup
    with pytest.raises(error, match=message):
        rj.unroll(cell, params, xs, lengths=lengths)


def test_traced_lengths_are_checked_for_shape_and_dtype(lstm_setup):
    cell, params, xs = lstm_setup
    f = jax.jit(lambda L: rj.unroll(cell, params, xs, lengths=L)[1])
    with pytest.raises(ValueError, match=r"lengths must have shape \[B\] = \(2,\)"):
        f(jnp.array([1, 2, 3]))
    assert f(jnp.array([5, 2])).shape == (B, T, H)


def _checked(f, *args):
    """``f(*args)`` under `checkify` (user checks only): the error message or None, and the result."""
    err, out = checkify.checkify(f, errors=checkify.user_checks)(*args)
    return err.get(), out


@pytest.mark.parametrize("bad", [[7, 2], [5, -1], [-3, 9]])
def test_traced_lengths_out_of_range_clamp_under_jit_and_fail_under_checkify(lstm_setup, bad):
    """Traced lengths cannot be checked at trace time: under plain jit they clamp to [0, T] as the mask
    does; under checkify.checkify the error names lengths, the range and the extremes found."""
    cell, params, xs = lstm_setup
    f = jax.jit(lambda L: rj.unroll(cell, params, xs, lengths=L))
    bad = jnp.array(bad)
    clamped = jax.tree.leaves(f(jnp.clip(bad, 0, T)))
    for got, want in zip(jax.tree.leaves(f(bad)), clamped, strict=True):
        np.testing.assert_array_equal(got, want)
    lo, hi = int(bad.min()), int(bad.max())
    for wrapped in (f, jax.jit(jax.grad(lambda L, p: jnp.sum(rj.unroll(cell, p, xs, lengths=L)[1]), 1))):
        args = (bad,) if wrapped is f else (bad, params)
        message, _ = _checked(wrapped, *args)
        assert message is not None and re.match(
            rf"lengths must lie in \[0, T\] = \[0, 5\], got values from {lo} to {hi}", message
        ), message
    assert _checked(f, jnp.array([5, 0]))[0] is None


def test_traced_targets_and_labels_out_of_range_fail_under_checkify():
    """The losses check their lengths, class ids and label lengths the same way: free under jit (the
    value as without the check), an error naming the argument under checkify."""
    Bq, Tq, V = 3, 4, 5
    logits = jax.random.normal(jax.random.key(0), (Bq, Tq, V), jnp.float64)
    lengths = jnp.array([4, 2, 0])
    ok = jnp.array([[0, 1, 2, 4], [3, 4, 99, -5], [7, 7, 7, 7]])  # out of range only at padded steps
    xent = jax.jit(rj.losses.sequence_cross_entropy)
    assert _checked(xent, logits, ok, lengths)[0] is None
    bad = ok.at[1, 1].set(5).at[0, 0].set(-1)
    message, value = _checked(xent, logits, bad, lengths)
    assert message.startswith("targets must lie in [0, V) = [0, 5) at valid steps, got values from -1 to 5")
    np.testing.assert_array_equal(value, xent(logits, bad, lengths))  # unchecked: the same value (NaN)
    message, _ = _checked(xent, logits, ok, jnp.array([4, 2, 6]))
    assert message.startswith("lengths must lie in [0, 4], got values from 2 to 6"), message
    message, _ = _checked(jax.jit(rj.losses.squared_error), logits, logits, jnp.array([-1, 2, 0]))
    assert message.startswith("lengths must lie in [0, 4], got values from -1 to 2"), message

    ctc = jax.jit(rj.losses.ctc)
    labels = jnp.array([[1, 2, 9], [3, -1, 0], [4, 4, 4]])  # out of range only past label_lengths
    label_lengths = jnp.array([2, 1, 3])
    assert _checked(ctc, logits, lengths, labels, label_lengths)[0] is None
    message, _ = _checked(ctc, logits, lengths, labels, jnp.array([3, 1, 3]))
    assert message.startswith(
        "labels must lie in [0, K) = [0, 5) within label_lengths, got values from 1 to 9"
    )
    message, _ = _checked(ctc, logits, lengths, labels, jnp.array([2, 4, 3]))
    assert message.startswith("label_lengths must lie in [0, 3], got values from 2 to 4"), message
    message, _ = _checked(ctc, logits, lengths, labels.at[2, 1].set(0), label_lengths)
    assert message.startswith("labels must not hold blank_id=0 within label_lengths"), message


@pytest.mark.parametrize("method", ["sequential", "associative", "deer"])
def test_non_finite_inputs_at_valid_steps_fail_under_checkify(method):
    """NaN or inf in ``xs`` at a valid step is an error under checkify, counted and named, in every method
    and through the gradient; at padded steps it is not (the padding may hold anything); under plain jit
    nothing changes."""
    cell = rj.mingru(H) if method == "associative" else rj.lstm(H)
    params = cell.init(jax.random.key(0), I, jnp.float64)
    xs = jnp.ones((B, T, I), jnp.float64)
    lengths = jnp.array([5, 2])
    f = jax.jit(lambda x: rj.unroll(cell, params, x, lengths=lengths, method=method)[1])
    g = jax.jit(jax.grad(lambda x: jnp.sum(rj.unroll(cell, params, x, lengths=lengths, method=method)[1])))
    padded = xs.at[1, 2:].set(jnp.nan).at[1, 4, 0].set(jnp.inf)
    for fn in (f, g):
        assert _checked(fn, padded)[0] is None
    bad = padded.at[1, 1, 0].set(jnp.inf).at[0, 4].set(jnp.nan)  # 1 + I entries at valid steps
    for fn in (f, g):
        message, _ = _checked(fn, bad)
        assert message.startswith(
            f"xs must be finite at valid steps (t < lengths[b]), got {1 + I} entries that are NaN or inf"
        ), message
    no_lengths = jax.jit(lambda x: rj.unroll(cell, params, x, method=method)[1])
    message, _ = _checked(no_lengths, padded)
    assert f"got {(T - 2) * I} entries that are NaN or inf" in message, message  # all of row 1's padding
    np.testing.assert_array_equal(f(padded), f(xs.at[1, 2:].set(0.0)))  # unchecked: unchanged


def test_non_finite_loss_inputs_fail_under_checkify():
    """The losses check their inputs at valid steps the same way, and their value."""
    Bq, Tq, V = 2, 4, 5
    logits = jax.random.normal(jax.random.key(0), (Bq, Tq, V), jnp.float64)
    lengths = jnp.array([4, 2])
    padded = logits.at[1, 3].set(jnp.nan)
    targets = jnp.zeros((Bq, Tq), jnp.int32)
    xent = jax.jit(rj.losses.sequence_cross_entropy)
    assert _checked(xent, padded, targets, lengths)[0] is None
    message, _ = _checked(xent, padded.at[0, 0, 1].set(-jnp.inf), targets, lengths)
    assert message.startswith("logits must be finite at valid steps, got 1 entries that are NaN or inf"), (
        message
    )
    message, _ = _checked(jax.jit(rj.losses.squared_error), padded, logits.at[0, 1, 2].set(jnp.nan), lengths)
    assert message.startswith("targets must be finite at valid steps, got 1 entries that are NaN or inf"), (
        message
    )
    message, _ = _checked(jax.jit(rj.losses.squared_error), logits * 1e200, -logits * 1e200, None)
    assert message.startswith("squared_error's value must be finite, got 1 entries that are NaN or inf"), (
        message
    )
    ctc = jax.jit(rj.losses.ctc)
    labels, label_lengths = jnp.array([[1, 2], [3, 0]]), jnp.array([2, 1])
    assert _checked(ctc, padded, lengths, labels, label_lengths)[0] is None
    message, _ = _checked(ctc, padded.at[1, 0].set(jnp.nan), lengths, labels, label_lengths)
    assert message.startswith(f"logits must be finite at valid steps, got {V} entries that are NaN or inf"), (
        message
    )


def test_bad_carry(lstm_setup):
    cell, params, xs = lstm_setup
    zeros = jnp.zeros((B, H), jnp.float64)
    with pytest.raises(TypeError, match=r"carry must have the structure of cell.initial_carry"):
        rj.unroll(cell, params, xs, carry=(zeros, zeros))
    with pytest.raises(TypeError, match=r"carry must have the structure of cell.initial_carry"):
        rj.unroll(cell, params, xs, carry=rj.HCarry(zeros))
    with pytest.raises(
        ValueError, match=r"carry.c must have shape \(2, 4\) \(batch shape \(2,\) \+ state\), got \(3, 4\)"
    ):
        rj.unroll(cell, params, xs, carry=rj.LSTMCarry(zeros, jnp.zeros((3, H), jnp.float64)))
    with pytest.raises(
        ValueError, match=r"carry.h must have shape \(2, 4\) \(batch shape \(2,\) \+ state\), got \(4,\)"
    ):
        rj.unroll(cell, params, xs, carry=rj.LSTMCarry(zeros[0], zeros))
    with pytest.raises(
        TypeError, match=r"carry.h must have dtype float64 \(that of the params and xs\), got float32"
    ):
        rj.unroll(cell, params, xs, carry=rj.LSTMCarry(zeros.astype(jnp.float32), zeros))


def test_bad_modes_and_flags(lstm_setup):
    cell, params, xs = lstm_setup
    with pytest.raises(ValueError, match=r"grad must be one of \('manual', 'autodiff'\), got 'auto'"):
        rj.unroll(cell, params, xs, grad="auto")
    with pytest.raises(ValueError, match=r"unroll_steps must be an int >= 1 or a bool, got 0"):
        rj.unroll(cell, params, xs, unroll_steps=0)
    with pytest.raises(TypeError, match=r"reverse must be a Python bool, got 'yes'"):
        rj.unroll(cell, params, xs, reverse="yes")
    with pytest.raises(TypeError, match=r"cell must be an rnnjax Cell .* got function"):
        rj.unroll(lambda p, c, x: (c, x), params, xs)


def test_unhashable_user_cell():
    """A cell is static structure, compared and hashed by its fields: a field that does not hash is named when
    the cell is made, not by JAX from inside jit."""

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, params, carry, x):
            return carry, x

    base = rj.elman(4)
    with pytest.raises(TypeError, match=r"Cell.step must be hashable .* got a Unhashable"):
        rj.Cell(init=base.init, initial_carry=base.initial_carry, step=Unhashable())
    with pytest.raises(TypeError, match=r"GatesBackward.gate_names must be a tuple of str, got \['h'\]"):
        base.replace(gate_names=["h"])
    with pytest.raises(TypeError, match=r"Cell.step must be a function, got int"):
        rj.Cell(init=base.init, initial_carry=base.initial_carry, step=3)
    with pytest.raises(TypeError, match=r"Cell needs a step function"):
        rj.Cell(init=base.init, initial_carry=base.initial_carry)


def test_step_and_backward_cannot_disagree():
    """A cell with a hand-derived backward has its step written from its gates; a separate step is refused."""
    base = rj.lstm(4)
    with pytest.raises(ValueError, match=r"writes its step from backward.gates"):
        rj.Cell(
            init=base.init, initial_carry=base.initial_carry, step=rj.elman(4).step, backward=base.backward
        )
    with pytest.raises(ValueError, match=r"writes its step from backward.gates"):
        base.replace(step=rj.elman(4).step)
    # the step written anew from changed gates follows them
    cell = base.replace(gates=rj.gru(4).gates)
    assert cell.step is not base.step and cell.step._rnnjax_gates is cell.gates


def test_cell_constructors():
    with pytest.raises(
        ValueError, match=r"activation must be one of \('tanh', 'relu', 'sigmoid', 'identity'\), got 'gelu'"
    ):
        rj.elman(4, activation="gelu")
    with pytest.raises(ValueError, match=r"activation must be one of \('tanh', 'relu', .*\), got 'gelu'"):
        rj.indrnn(4, activation="gelu")
    with pytest.raises(ValueError, match=r"eps must be > 0, got 0.0"):
        rj.layer_norm_lstm(4, eps=0.0)
    cells = (rj.elman, rj.lstm, rj.gru, rj.indrnn, rj.mingru, rj.minlstm, rj.mgu, rj.peephole_lstm)
    for make in (*cells, rj.layer_norm_lstm):
        with pytest.raises(ValueError, match=r"hidden_size must be >= 1, got 0"):
            make(0)
        with pytest.raises(TypeError, match=r"hidden_size must be an int >= 1, got 4.0 of type float"):
            make(4.0)
    with pytest.raises(ValueError, match=r"input_size must be an int >= 1, got 0"):
        rj.lstm(4).init(jax.random.key(0), 0)
    with pytest.raises(TypeError, match=r"dtype must be a floating-point dtype, got int32"):
        rj.gru(4).init(jax.random.key(0), 3, jnp.int32)


def test_projected_and_layer_norm_lstms_check_their_params():
    with pytest.raises(
        ValueError, match=r"proj_size must be smaller than hidden_size \(P < H\), got P=4 and H=4"
    ):
        rj.projected_lstm(4, 4)
    with pytest.raises(ValueError, match=r"proj_size must be >= 1, got 0"):
        rj.projected_lstm(4, proj_size=0)
    cell = rj.projected_lstm(4, 2)
    params = cell.init(jax.random.key(0), 5, jnp.float32)
    xs = jnp.ones((2, 3, 5), jnp.float32)
    with pytest.raises(
        ValueError,
        match=r"params.w_hr of projected_lstm \(hidden_size=4\) must have shape \[4, 2\], got \(2, 4\)",
    ):
        rj.unroll(cell, params._replace(w_hr=params.w_hr.T), xs)
    with pytest.raises(
        ValueError,
        match=r"params.w_hh of projected_lstm \(hidden_size=4\) must have shape \[2, 16\], got \(4, 16\)",
    ):
        rj.unroll(cell, params._replace(w_hh=rj.lstm(4).init(jax.random.key(0), 5, jnp.float32).w_hh), xs)
    ln = rj.layer_norm_lstm(4)
    with pytest.raises(
        TypeError, match=r"params for layer_norm_lstm must be a NamedTuple with fields .* without"
    ):
        rj.unroll(ln, rj.lstm(4).init(jax.random.key(0), 5, jnp.float32), xs)
    ln_params = ln.init(jax.random.key(0), 5, jnp.float32)
    with pytest.raises(
        ValueError, match=r"params.gamma_c of layer_norm_lstm \(hidden_size=4\) must have shape \[4\]"
    ):
        rj.unroll(ln, ln_params._replace(gamma_c=jnp.ones(16)), xs)
    with pytest.raises(ValueError, match=r"carry\.h must have shape \(2, 2\)"):
        rj.unroll(cell, params, xs, carry=rj.LSTMCarry(jnp.zeros((2, 4)), jnp.zeros((2, 4))))


def test_lru_checks_its_arguments_and_params():
    with pytest.raises(ValueError, match=r"state_size must be >= 1, got 0"):
        rj.lru(0)
    with pytest.raises(
        ValueError, match=r"r_min and r_max must satisfy 0 <= r_min < r_max <= 1, got 0.9 and 0.5"
    ):
        rj.lru(4, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match=r"max_phase must be > 0, got 0"):
        rj.lru(4, max_phase=0)
    cell = rj.lru(4)
    params = cell.init(jax.random.key(0), 5, jnp.float32)
    xs = jnp.ones((2, 3, 5), jnp.float32)
    with pytest.raises(
        ValueError, match=r"params.theta_log of lru \(state_size=4\) must have shape \[4\], got \(8,\)"
    ):
        rj.unroll(cell, params._replace(theta_log=jnp.ones(8)), xs)
    with pytest.raises(ValueError, match=r"carry\.h must have shape \(2, 8\)"):
        rj.unroll(cell, params, xs, carry=rj.HCarry(jnp.zeros((2, 4))))


def test_diagonal_and_gateless_cells_check_their_params():
    xs = jnp.ones((2, 3, 5), jnp.float32)
    cell = rj.indrnn(4)
    params = cell.init(jax.random.key(0), 5, jnp.float32)
    with pytest.raises(
        ValueError,
        match=r"params.u of indrnn\(activation='relu'\) \(hidden_size=4\) must have shape \[4\], got \(3,\)",
    ):
        rj.unroll(cell, params._replace(u=jnp.ones(3)), xs)
    with pytest.raises(ValueError, match=r"xs has feature size I=2 but params.w_ih has shape \(5, 4\)"):
        rj.unroll(cell, params, xs[..., :2])
    mingru = rj.mingru(4)
    mp = mingru.init(jax.random.key(0), 5, jnp.float32)
    with pytest.raises(
        ValueError, match=r"params.b of mingru \(hidden_size=4\) must have shape \[2H\] = \[8\], got \(4,\)"
    ):
        rj.unroll(mingru, mp._replace(b=jnp.ones(4)), xs)
    with pytest.raises(
        ValueError,
        match=r"params.w_ih of mingru \(hidden_size=4\) must have shape \[I, 2H\] = \[5, 8\], got \(5, 4\)",
    ):
        rj.unroll(mingru, params, xs)  # IndRNN's params given to a minGRU


def test_forward_mode_through_manual_points_to_autodiff(lstm_setup):
    cell, params, xs = lstm_setup
    f = lambda x: jnp.sum(rj.unroll(cell, params, x)[1])  # noqa: E731
    # JAX's own error, unchanged, with a note naming what to pass instead
    message = r"(?s)custom_vjp.*grad='manual'\) binds the hand-derived backward .* no forward mode.* call rj.unroll\(\.\.\., grad='autodiff'\) instead"
    with pytest.raises(TypeError, match=message):
        jax.jvp(f, (xs,), (xs,))
    with pytest.raises(TypeError, match=message):
        jax.jacfwd(f)(xs)
