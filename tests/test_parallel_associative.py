"""``rj.unroll(..., method="associative")`` equals ``method="sequential"`` in float64 to round-off.

Outputs, the final carry and the gradients to params, ``xs`` and the initial carry, for every linear cell
(minGRU, minLSTM, the LRU's complex units, IndRNN with the identity, a user-declared `rj.LinearRecurrence`),
with lengths (0 and T among them), reverse, a given carry and ``chunk_size``; over random shapes
(hypothesis); against `rj.gradcheck`'s oracles; with junk in the padding; and the errors for what it refuses.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_problem, rel_err, tiered
from hypothesis import given, settings
from hypothesis import strategies as st
from test_padding import assert_padding_unreachable, paddings

import rnnjax as rj
from rnnjax.parallel import AUTO_CROSSOVER, METHODS

B, T, I, H = 3, 7, 2, 4
TOL = 1e-12


def ema_cell(H: int) -> rj.Cell:
    """A user-written linear cell, with no step of its own: a per-unit moving average of a projection of
    ``x``, with an input-dependent decay (written from its `rj.LinearRecurrence`)."""

    def init(key: jax.Array, input_size: int, dtype: Any = None) -> dict:
        k1, k2 = jax.random.split(key)
        return {
            "w": jax.random.normal(k1, (input_size, H), dtype) / input_size**0.5,
            "v": jax.random.normal(k2, (input_size, H), dtype) / input_size**0.5,
        }

    def coefficients(params: dict, xs: jax.Array) -> tuple[jax.Array, jax.Array]:
        a = jax.nn.sigmoid(xs @ params["v"])
        return a, (1 - a) * jnp.tanh(xs @ params["w"])

    def initial_carry(params: dict, batch_shape: tuple[int, ...] = ()) -> rj.HCarry:
        return rj.HCarry(jnp.zeros((*batch_shape, H), params["w"].dtype))

    return rj.Cell(
        init=init,
        initial_carry=initial_carry,
        hidden_size=H,
        name="ema",
        linear=rj.LinearRecurrence(coefficients),
    )


LINEAR_CELLS: dict[str, Any] = {
    "mingru": rj.mingru,
    "minlstm": rj.minlstm,
    "lru": lambda H: rj.lru(H // 2, r_min=0.4, r_max=0.95, max_phase=3.0),
    "indrnn-identity": lambda H: rj.indrnn(H, "identity"),
    "user": ema_cell,
}


@functools.cache
def make_cell(name: str) -> rj.Cell:
    return LINEAR_CELLS[name](H)


@functools.cache
def program(name: str, method: str, grad: str = "manual", options: tuple = ()) -> Any:
    """The jitted ``(loss, (ys, final))`` and gradients to params, xs and the initial carry of `rj.unroll`
    with ``method`` and ``options``: a nonlinear read-out of every output and of the final carry."""
    cell = make_cell(name)

    def loss(params: Any, xs: jax.Array, carry: Any, lengths: jax.Array | None) -> tuple:
        final, ys = rj.unroll(
            cell, params, xs, carry, lengths=lengths, grad=grad, method=method, **dict(options)
        )
        w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
        value = jnp.sum(jnp.sin(ys) * w) + sum(jnp.sum(jnp.cos(c) * c) for c in jax.tree.leaves(final))
        return value, (ys, final)

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))


def assert_equal_to_sequential(
    name: str,
    options: tuple,
    lengths: Any,
    *,
    grad: str = "manual",
    shape: tuple[int, int] = (B, T),
    seed: int = 1,
) -> None:
    """Outputs, final carry and the three gradients of the associative scan within `TOL` of the sequential
    scan's (relative to each leaf's largest entry)."""
    cell = make_cell(name)
    params, xs, carry = random_problem(cell, jax.random.key(seed), *shape, I)
    lengths = None if lengths is None else jnp.asarray(lengths)
    seq_opts = tuple((k, v) for k, v in options if k == "reverse")
    (v_s, (ys_s, c_s)), g_s = program(name, "sequential", "manual", seq_opts)(params, xs, carry, lengths)
    (v_a, (ys_a, c_a)), g_a = program(name, "associative", grad, options)(params, xs, carry, lengths)
    assert rel_err(ys_a, ys_s) <= TOL
    assert rel_err(c_a, c_s) <= TOL
    assert rel_err(g_a, g_s) <= TOL, [rel_err(a, s) for a, s in zip(g_a, g_s, strict=True)]
    assert abs(float(v_a - v_s)) <= TOL * max(1.0, abs(float(v_s)))


OPTIONS = {
    "plain": (),
    "reverse": (("reverse", True),),
    "chunk3": (("chunk_size", 3),),
    "chunk3-reverse": (("chunk_size", 3), ("reverse", True)),
    "chunk1": (("chunk_size", 1),),
    "chunkT": (("chunk_size", T),),
}


@pytest.mark.parametrize("options", tiered(list(OPTIONS), fast=("plain", "chunk3-reverse")), ids=str)
@pytest.mark.parametrize("name", list(LINEAR_CELLS))
def test_equals_sequential_with_lengths(name, options):
    # lengths 0, T and in between, so that padding, an empty sequence and a whole one meet in one batch
    assert_equal_to_sequential(name, OPTIONS[options], [0, T, 4])


@pytest.mark.parametrize("name", list(LINEAR_CELLS))
@pytest.mark.parametrize("reverse", [False, True])
def test_equals_sequential_without_lengths(name, reverse):
    assert_equal_to_sequential(name, (("reverse", reverse),), None)


@pytest.mark.parametrize("name", ["mingru", "lru"])
def test_autodiff_of_the_associative_scan_equals_sequential(name):
    # grad="autodiff": JAX differentiates the same forward scan; the hand-derived backward is not used
    assert_equal_to_sequential(name, (("chunk_size", 3), ("reverse", True)), [2, T, 0], grad="autodiff")


def test_zero_carry_and_extra_batch_axes():
    cell = rj.minlstm(H)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (2, 3, T, I))
    lengths = jnp.array([[0, 3, T], [1, 2, 5]])
    c_s, ys_s = rj.unroll(cell, params, xs, lengths=lengths)
    c_a, ys_a = rj.unroll(cell, params, xs, lengths=lengths, method="associative", chunk_size=2)
    assert ys_a.shape == (2, 3, T, H) and c_a.h.shape == (2, 3, H)
    assert rel_err((c_a, ys_a), (c_s, ys_s)) <= TOL


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(
    B_=st.integers(1, 3),
    T_=st.integers(1, 12),
    chunk=st.none() | st.integers(1, 5),
    reverse=st.booleans(),
    name=st.sampled_from(["mingru", "lru", "user"]),
    data=st.data(),
)
def test_random_shapes(B_, T_, chunk, reverse, name, data):
    lengths = data.draw(st.lists(st.integers(0, T_), min_size=B_, max_size=B_))
    options = (("chunk_size", chunk), ("reverse", reverse))
    assert_equal_to_sequential(name, options, lengths, shape=(B_, T_))


@pytest.mark.parametrize("name", ["minlstm", "lru"])
def test_gradcheck_oracles(name):
    # autodiff, RTRL (forward mode through grad="autodiff"'s associative scan) and finite differences
    cell = make_cell(name)
    params, xs, carry = random_problem(cell, jax.random.key(2), 2, 5, I)
    lengths = jnp.array([5, 3])

    def loss(params: Any, xs: jax.Array, carry: Any, *, grad: str) -> jax.Array:
        final, ys = rj.unroll(
            cell, params, xs, carry, lengths=lengths, grad=grad, method="associative", chunk_size=2
        )
        return jnp.sum(jnp.sin(ys)) + jnp.sum(jnp.cos(final.h))

    report = rj.gradcheck(loss, params, xs, carry)
    assert report.passed, str(report)
    assert report.max_autodiff_error <= TOL


def test_forward_mode_needs_autodiff():
    cell = rj.mingru(H)
    params = cell.init(jax.random.key(0), I)
    xs = jnp.ones((2, T, I))

    def f(xs: jax.Array, grad: str) -> jax.Array:
        return rj.unroll(cell, params, xs, grad=grad, method="associative")[1]

    with pytest.raises(TypeError, match="no forward mode"):
        jax.jvp(lambda x: f(x, "manual"), (xs,), (xs,))
    t_a = jax.jvp(lambda x: f(x, "autodiff"), (xs,), (xs,))[1]
    t_s = jax.jvp(lambda x: rj.unroll(cell, params, x, grad="autodiff")[1], (xs,), (xs,))[1]
    assert rel_err(t_a, t_s) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mingru", "lru"])
@pytest.mark.parametrize("chunk", [None, 2])
@settings(max_examples=2, deadline=None)
@given(pad=paddings(T))
def test_padding_is_unreachable(name, chunk, pad):
    # NaN, inf and 1e30 at padded steps change nothing, bit for bit, and reach no gradient
    cell = make_cell(name)
    params, xs, carry = random_problem(cell, jax.random.key(1), B, T, I)
    run = program(name, "associative", "manual", (("chunk_size", chunk),))
    assert_padding_unreachable(run, (params, xs, carry, jnp.asarray(pad[0])), {1: None}, pad)


def test_auto_is_sequential_where_nothing_is_measured():
    cell = rj.mingru(H)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (2, T, I))
    assert jax.default_backend() not in AUTO_CROSSOVER
    _, ys_s = rj.unroll(cell, params, xs)
    _, ys_a = rj.unroll(cell, params, xs, method="auto", chunk_size=3)
    np.testing.assert_array_equal(ys_a, ys_s)
    # a nonlinear cell and the sequential-only options are fine under "auto"
    rj.unroll(rj.gru(H), rj.gru(H).init(jax.random.key(0), I), xs, method="auto", checkpoint=2)


def test_auto_picks_associative_above_the_crossover(monkeypatch):
    cell = rj.mingru(H)
    params = cell.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (2, T, I))
    monkeypatch.setitem(AUTO_CROSSOVER, jax.default_backend(), T)
    from rnnjax.parallel import resolve_method

    assert resolve_method("auto", cell, T) == "associative"
    assert resolve_method("auto", cell, T - 1) == "sequential"
    assert resolve_method("auto", rj.gru(H), T) == "sequential"
    assert resolve_method("auto", cell, T, sequential_only="checkpoint") == "sequential"
    _, ys_a = rj.unroll(cell, params, xs, method="auto")
    _, ys_s = rj.unroll(cell, params, xs)
    assert rel_err(ys_a, ys_s) <= TOL


def test_steps_agree_with_the_declared_recurrence():
    # decoding uses cell.step: for a user cell it is written from the coefficients, and for the built-in
    # cells the gates and the coefficients give the same step
    for name in LINEAR_CELLS:
        cell = make_cell(name)
        params, xs, carry = random_problem(cell, jax.random.key(3), B, 1, I)
        new, y = cell.step(params, carry, xs[:, 0])
        final, ys = rj.unroll(cell, params, xs, carry, method="associative")
        assert rel_err(y, ys[:, 0]) <= TOL and rel_err(new, final) <= TOL


def test_cells_with_linear_compare_by_value():
    assert rj.mingru(4) == rj.mingru(4) and hash(rj.lru(3)) == hash(rj.lru(3))
    assert jax.tree.leaves(rj.minlstm(4)) == []
    assert rj.indrnn(4, "identity").linear is not None and rj.indrnn(4).linear is None
    assert rj.lstm(4).linear is None
    # a user cell whose step is written from its declaration equals another built from the same parts
    spec = rj.LinearRecurrence(lambda p, x: (x, x))
    init, carry = (lambda k, i, d=None: {}), (lambda p, s=(): 0)
    assert rj.Cell(init=init, initial_carry=carry, linear=spec) == rj.Cell(
        init=init, initial_carry=carry, linear=spec
    )


@pytest.mark.parametrize("layer_kind", ["rnn", "bidirectional", "stack"])
def test_layers_pass_method_and_chunk_size(layer_kind):
    cell = rj.mingru(H)
    layer = {
        "rnn": lambda: rj.rnn(cell, reverse=True),
        "bidirectional": lambda: rj.bidirectional(cell, rj.lru(H // 2)),
        "stack": lambda: rj.stack(cell, rj.bidirectional(rj.minlstm(H), merge="sum")),
    }[layer_kind]()
    params = layer.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (2, T, I))
    lengths = jnp.array([T, 3])

    def loss(params: Any, **options: Any) -> tuple:
        _, ys = layer.apply(params, xs, lengths=lengths, **options)
        return jnp.sum(jnp.sin(ys)), ys

    (_, ys_s), g_s = jax.value_and_grad(loss, has_aux=True)(params)
    (_, ys_a), g_a = jax.value_and_grad(loss, has_aux=True)(params, method="associative", chunk_size=2)
    assert rel_err(ys_a, ys_s) <= TOL and rel_err(g_a, g_s) <= TOL
    with pytest.raises(ValueError, match="cell 'gru' is not"):
        rj.stack(cell, rj.gru(H)).apply(
            rj.stack(cell, rj.gru(H)).init(jax.random.key(0), I), xs, method="associative"
        )


# ---- what it refuses ----


def small() -> tuple[rj.Cell, Any, jax.Array]:
    cell = rj.mingru(H)
    return cell, cell.init(jax.random.key(0), I), jnp.ones((2, T, I))


def test_unknown_method_names_the_accepted_ones():
    cell, params, xs = small()
    with pytest.raises(
        ValueError,
        match=r"method must be one of \('sequential', 'associative', 'deer', 'quasi_deer', 'auto'\), "
        r"got 'newton'",
    ):
        rj.unroll(cell, params, xs, method="newton")
    assert METHODS == ("sequential", "associative", "deer", "quasi_deer", "auto")


@pytest.mark.parametrize("name", ["lstm", "gru", "indrnn-relu"])
def test_nonlinear_cells_name_the_methods_they_support(name):
    cell = {"lstm": rj.lstm(H), "gru": rj.gru(H), "indrnn-relu": rj.indrnn(H)}[name]
    params = cell.init(jax.random.key(0), I)
    with pytest.raises(
        ValueError, match=r"is not: it supports method in \('sequential', 'deer', 'quasi_deer', 'auto'\)"
    ):
        rj.unroll(cell, params, jnp.ones((2, T, I)), method="associative")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"checkpoint": 2}, r"checkpoint= applies to method='sequential' only"),
        ({"checkpoint": "sqrt"}, r"checkpoint= applies to method='sequential' only"),
        ({"budget": 10**6}, r"budget= applies to method='sequential' only"),
        ({"probe": jnp.zeros((2, T, H))}, r"probe= applies to method='sequential' only"),
    ],
)
def test_sequential_only_options_are_refused(options, match):
    cell, params, xs = small()
    with pytest.raises(ValueError, match=match):
        rj.unroll(cell, params, xs, method="associative", **options)


@pytest.mark.parametrize("chunk", [0, -1, 2.0, True, "4"])
def test_bad_chunk_size(chunk):
    cell, params, xs = small()
    with pytest.raises(ValueError, match=rf"chunk_size must be an int >= 1 or None, got {chunk!r}"):
        rj.unroll(cell, params, xs, method="associative", chunk_size=chunk)


def test_chunk_size_needs_a_parallel_method():
    cell, params, xs = small()
    with pytest.raises(ValueError, match=r"chunk_size=4 applies to method='associative' \(or 'auto'\), got"):
        rj.unroll(cell, params, xs, chunk_size=4)


def test_bad_linear_declarations():
    with pytest.raises(TypeError, match=r"Cell\.linear must be an rj.LinearRecurrence or None, got function"):
        rj.Cell(
            init=lambda k, i, d=None: {},
            initial_carry=lambda p, s=(): 0,
            step=lambda p, c, x: (c, x),
            linear=lambda p, x: (x, x),
        )
    with pytest.raises(TypeError, match=r"LinearRecurrence\.coefficients must be a function"):
        rj.LinearRecurrence(3)
    with pytest.raises(TypeError, match=r"LinearRecurrence\.complex must be a bool, got 1"):
        rj.LinearRecurrence(lambda p, x: (x, x), complex=1)

    def init(key: jax.Array, input_size: int, dtype: Any = None) -> dict:
        return {"w": jnp.ones((input_size, 3))}

    def carry(params: dict, batch_shape: tuple[int, ...] = ()) -> rj.HCarry:
        return rj.HCarry(jnp.zeros((*batch_shape, 3)))

    wide = rj.Cell(
        init=init,
        initial_carry=carry,
        hidden_size=3,
        linear=rj.LinearRecurrence(lambda p, x: (x @ p["w"], x)),
    )
    xs = jnp.ones((2, T, I))
    with pytest.raises(
        ValueError,
        match=r"must return a and b of shape \[T, B, H\] = \(7, 2, 3\) .* got b of shape \(7, 2, 2\)",
    ):
        rj.unroll(wide, wide.init(None, I), xs, method="associative")
    odd = rj.Cell(
        init=init,
        initial_carry=carry,
        hidden_size=3,
        linear=rj.LinearRecurrence(lambda p, x: (x @ p["w"], x @ p["w"]), complex=True),
    )
    with pytest.raises(ValueError, match="H must be even, got H=3"):
        rj.unroll(odd, odd.init(None, I), xs, method="associative")


def test_a_carry_with_two_leaves_is_refused():
    lstm = rj.lstm(H)

    def coefficients(params: Any, xs: jax.Array) -> tuple[jax.Array, jax.Array]:
        z = xs @ params.w_ih[:, :H]
        return z, z

    cell = lstm.replace(linear=rj.LinearRecurrence(coefficients))
    params = cell.init(jax.random.key(0), I)
    with pytest.raises(
        TypeError, match="needs a carry with one leaf h \\[B, H\\]; cell 'lstm' has a carry with 2"
    ):
        rj.unroll(cell, params, jnp.ones((2, T, I)), method="associative")


@pytest.mark.parametrize("framework", ["nnx", "linen", "equinox"])
def test_framework_modules_take_method_and_chunk_size(framework):
    cell = rj.minlstm(H)
    xs = jax.random.normal(jax.random.key(1), (2, T, I))
    lengths = jnp.array([T, 2])
    outs = {}
    for method, chunk in (("sequential", None), ("associative", 3)):
        if framework == "nnx":
            from flax import nnx

            model = rj.nnx.Bidirectional(
                cell, I, rngs=nnx.Rngs(0), method=method, chunk_size=chunk, dtype=jnp.float64
            )
            outs[method] = model(xs, lengths=lengths)[1]
        elif framework == "linen":
            model = rj.linen.Stack((cell, cell), method=method, chunk_size=chunk, param_dtype=jnp.float64)
            variables = model.init(jax.random.key(0), xs)
            outs[method] = model.apply(variables, xs, lengths=lengths)[1]
        else:
            model = rj.equinox.RNN(
                cell, I, key=jax.random.key(0), method=method, chunk_size=chunk, dtype=jnp.float64
            )
            outs[method] = model(xs, lengths=lengths)[1]
        assert dict(model.layer().options)["unroll_options"].method == method
    assert rel_err(outs["associative"], outs["sequential"]) <= TOL
