"""rnnjax.nnx: the modules equal the functional API, train with nnx.Optimizer and refuse bad input."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from framework_cases import (
    CASE_PARAMS,
    MODULES,
    OPTION_SETS,
    REG,
    USER_CELL,
    Case,
    I,
    check_matches,
    check_options_reached,
    record_unroll,
    regression_data,
)

import rnnjax as rj
from rnnjax import nnx as rnx


def build(kind: str, args: dict, **kw: Any) -> nnx.Module:
    args = dict(args)
    first = args.pop({"rnn": "cell", "bidirectional": "cell_fw", "stack": "layers"}[kind])
    cls = {"rnn": rnx.RNN, "bidirectional": rnx.Bidirectional, "stack": rnx.Stack}[kind]
    return cls(first, I, rngs=nnx.Rngs(0), dtype=jnp.float64, **args, **kw)


def set_params(module: nnx.Module, params: Any) -> None:
    """Puts a functional-layout params pytree into the module, as new ``nnx.Param`` s."""
    if isinstance(module, rnx.RNN):
        module.weights = nnx.data(jax.tree.map(nnx.Param, params))
    elif isinstance(module, rnx.Bidirectional):
        set_params(module.fw, params.fw)
        set_params(module.bw, params.bw)
    else:
        for layer, p in zip(module.layers, params, strict=True):
            set_params(layer, p)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_matches_functional_api(case: Case):
    model = build(case.kind, case.kw)
    graphdef, state = nnx.split(model)

    def run(params, xs, carry, key):
        module = nnx.merge(graphdef, state)
        set_params(module, params)
        stochastic = case.kind == "stack" or case.regularized
        extra = {"deterministic": not case.train, "rngs": key} if stochastic else {}
        return module(xs, carry=carry, lengths=case.call_lengths(), grad=case.grad, **extra)

    check_matches(case, run, model.params(), key=jax.random.key(5) if case.train else None)


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("kind", MODULES)
def test_every_unroll_option_reaches_unroll(monkeypatch, kind, options):
    args, n = MODULES[kind]
    model = build(kind, {**dict(args), **options})
    calls = record_unroll(monkeypatch)
    model(jnp.ones((2, 5, I), jnp.float64))
    check_options_reached(calls, options, n)


def test_user_cell_params_of_any_pytree_are_params_by_name():
    model = rnx.RNN(USER_CELL, I, rngs=nnx.Rngs(0), dtype=jnp.float64)
    paths = {tuple(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert paths == {("weights", "w"), ("weights", "u", "rec")}
    assert jax.tree.structure(model.params()) == jax.tree.structure(USER_CELL.init(jax.random.key(0), I))


def test_stack_dropout_draws_from_its_rng_stream_and_eval_turns_it_off():
    xs = jax.random.normal(jax.random.key(1), (2, 5, I), jnp.float64)
    model = rnx.Stack(
        [rj.lstm(4), rj.lstm(4)], I, rngs=nnx.Rngs(0, dropout=3), dropout=0.5, dtype=jnp.float64
    )
    reference = rj.stack(rj.lstm(4), rj.lstm(4), dropout=0.5)
    key = nnx.Rngs(dropout=3).dropout.fork()()  # the first key of the stream forked as nnx.Dropout does
    _, ys = model(xs)
    _, want = reference.apply(model.params(), xs, key=key, train=True)
    assert jnp.array_equal(ys, want)
    assert not jnp.array_equal(model(xs)[1], ys)  # the stream moved on
    model.eval()
    assert jnp.array_equal(model(xs)[1], reference.apply(model.params(), xs)[1])


def test_regularize_draws_from_the_dropout_stream_and_eval_gives_the_expectation():
    """The masks come from the ``dropout`` stream forked as `nnx.Dropout` forks it (or the call's
    ``rngs``), each direction its own as `rj.bidirectional` draws them; ``model.eval()`` and
    ``nnx.view(model, deterministic=True)`` give the expectation, ``model.train()`` the masks again."""
    xs = jax.random.normal(jax.random.key(1), (2, 5, I), jnp.float64)
    model = rnx.Bidirectional(rj.lstm(4), I, rngs=nnx.Rngs(0, dropout=3), regularize=REG, dtype=jnp.float64)
    reference = rj.bidirectional(rj.lstm(4))
    key = nnx.Rngs(dropout=3).dropout.fork()()  # the first key of the stream forked as nnx.Dropout does
    _, ys = model(xs)
    assert jnp.array_equal(ys, reference.apply(model.params(), xs, key=key, train=True, regularize=REG)[1])
    assert not jnp.array_equal(model(xs)[1], ys)  # the stream moved on
    assert jnp.array_equal(model(xs, rngs=key)[1], ys)
    expectation = reference.apply(model.params(), xs, regularize=REG)[1]
    assert jnp.array_equal(nnx.view(model, deterministic=True)(xs)[1], expectation)
    model.eval()
    assert jnp.array_equal(model(xs)[1], expectation)
    model.train()
    assert not jnp.array_equal(model(xs)[1], expectation)


def test_trains_with_nnx_optimizer():
    xs, ys, lengths = regression_data()
    model = rnx.Stack(
        [rj.bidirectional(rj.gru(6)), rj.lstm(2)], 3, rngs=nnx.Rngs(0), dropout=0.1, dtype=jnp.float64
    )
    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    def loss(model):
        return rj.losses.squared_error(model(xs, lengths=lengths)[1], ys, lengths)

    @nnx.jit
    def step(model, optimizer):
        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    eval_loss = nnx.jit(lambda model: loss(nnx.view(model, deterministic=True)))
    first = float(eval_loss(model))
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam is not strict-promotion safe
        for _ in range(60):
            step(model, optimizer)
    assert float(eval_loss(model)) < 0.5 * first


def test_errors():
    rngs, xs = nnx.Rngs(0), jnp.ones((2, 5, I), jnp.float64)
    with pytest.raises(ValueError, match=r"method='associative' needs a cell whose recurrence is linear"):
        rnx.Bidirectional(rj.lstm(2), I, rngs=rngs, method="associative")
    with pytest.raises(TypeError, match=r"cell must be an rnnjax Cell .* got str"):
        rnx.RNN("lstm", I, rngs=rngs)
    with pytest.raises(ValueError, match=r"merge must be one of \('concat', 'sum'\), got 'max'"):
        rnx.Bidirectional(rj.lstm(2), I, merge="max", rngs=rngs)
    with pytest.raises(ValueError, match=r"merge='sum' needs equal hidden sizes .* H_fw=2 and H_bw=3"):
        rnx.Bidirectional(rj.lstm(2), I, rj.lstm(3), merge="sum", rngs=rngs)
    with pytest.raises(TypeError, match=r"layers of Stack must be a sequence .* got Cell"):
        rnx.Stack(rj.lstm(2), I, rngs=rngs)
    with pytest.raises(
        TypeError, match=r"layer 0 of Stack must be a Cell, an rj.rnn or an rj.bidirectional .* got a str"
    ):
        rnx.Stack(["lstm"], I, rngs=rngs)
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got -0.1"):
        rnx.Stack([rj.lstm(2)], I, rngs=rngs, dropout=-0.1)
    no_stream = rnx.RNN(rj.lstm(2), I, rngs=nnx.Rngs(params=0), regularize=REG, dtype=jnp.float64)
    with pytest.raises(
        ValueError,
        match=r"RNN in training \(deterministic=False\) draws its masks from a \"dropout\" rng stream",
    ):
        no_stream(xs)
    no_stream(xs, rngs=jax.random.key(1))
    no_stream(xs, deterministic=True)
    with pytest.raises(TypeError, match=r"regularize must be an rj.Regularizer or None, got dict"):
        rnx.Stack([rj.lstm(2)], I, rngs=rngs, regularize={"zoneout": 0.1})
    with pytest.raises(ValueError, match=r"state_dropout needs a cell whose recurrence is the GEMM h w_hh"):
        rnx.RNN(USER_CELL, I, rngs=rngs, regularize=REG, dtype=jnp.float64)(xs)
    with pytest.raises(ValueError, match=r"checkpoint must be None, 'none', 'sqrt' or an int >= 1 .* got 0"):
        rnx.Stack([rj.lstm(2)], I, rngs=rngs, checkpoint=0, dtype=jnp.float64)(xs)
    with pytest.raises(ValueError, match=r"schedule='binomial' needs a budget"):
        rnx.RNN(rj.lstm(2), I, rngs=rngs, schedule="binomial", dtype=jnp.float64)(xs)
    with pytest.raises(ValueError, match=r"grad must be one of \('manual', 'autodiff'\), got 'jvp'"):
        rnx.RNN(rj.lstm(2), I, rngs=rngs, dtype=jnp.float64)(xs, grad="jvp")
    with pytest.raises(ValueError, match=r"xs must have shape \[B, T, I\] \(rank >= 3\), got shape \(5, 3\)"):
        rnx.RNN(rj.lstm(2), I, rngs=rngs, dtype=jnp.float64)(xs[0])
    with pytest.raises(TypeError, match=r"carry of a bidirectional layer must be a BidirectionalCarry"):
        rnx.Bidirectional(rj.lstm(2), I, rngs=rngs, dtype=jnp.float64)(xs, carry=(None, None))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'probe'"):
        rnx.RNN(rj.lstm(2), I, rngs=rngs, probe=xs)
