"""rnnjax.linen: the modules equal the functional API, train with a Flax TrainState and refuse bad input."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax.training import train_state
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
from rnnjax import linen as rln

CLASSES = {"rnn": rln.RNN, "bidirectional": rln.Bidirectional, "stack": rln.Stack}


def to_functional(kind: str, params: dict) -> Any:
    """The module's ``variables["params"]`` in the layout of the functional API."""
    if kind == "rnn":
        return params["cell"]
    if kind == "bidirectional":
        return rj.BidirectionalParams(**params)
    return params["layers"]


def from_functional(kind: str, params: Any) -> dict:
    if kind == "rnn":
        return {"cell": params}
    if kind == "bidirectional":
        return {"fw": params.fw, "bw": params.bw}
    return {"layers": params}


class DropoutKey(nn.Module):
    """The key a top-level module's first ``make_rng("dropout")`` draws."""

    def __call__(self) -> jax.Array:
        return self.make_rng("dropout")


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_matches_functional_api(case: Case):
    model = CLASSES[case.kind](**case.kw, param_dtype=jnp.float64)
    xs = jnp.zeros((2, 5, I), jnp.float64)
    init_kw = {"deterministic": True} if case.kind == "stack" or case.regularized else {}
    params = to_functional(case.kind, model.init(jax.random.key(0), xs, **init_kw)["params"])

    def run(params, xs, carry, key):
        extra = {}
        if case.kind == "stack" or case.regularized:
            extra = {"deterministic": not case.train, "rngs": None if key is None else {"dropout": key}}
        variables = {"params": from_functional(case.kind, params)}
        return model.apply(variables, xs, carry=carry, lengths=case.call_lengths(), grad=case.grad, **extra)

    key = jax.random.key(5) if case.train else None
    reference_key = DropoutKey().apply({}, rngs={"dropout": key}) if case.train else None
    check_matches(case, run, params, key=key, reference_key=reference_key)


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("kind", MODULES)
def test_every_unroll_option_reaches_unroll(monkeypatch, kind, options):
    args, n = MODULES[kind]
    model = CLASSES[kind](**dict(args), **options, param_dtype=jnp.float64)
    xs = jnp.ones((2, 5, I), jnp.float64)
    variables = model.init(jax.random.key(0), xs)
    calls = record_unroll(monkeypatch)
    model.apply(variables, xs)
    check_options_reached(calls, options, n)


def test_regularize_follows_flax_dropout():
    """``deterministic`` as an attribute or per call; in training the masks come from the ``"dropout"`` rng
    (a stack hands its layers the keys `rj.stack` does, and new keys draw new masks); ``deterministic=True``
    is the expectation."""
    xs = jax.random.normal(jax.random.key(1), (2, 5, I), jnp.float64)
    layers = (rj.lstm(4), rj.bidirectional(rj.gru(2)))
    model = rln.Stack(layers, regularize=REG, param_dtype=jnp.float64)
    variables = model.init(jax.random.key(0), xs, deterministic=True)
    params, reference = variables["params"]["layers"], rj.stack(*layers)
    key = jax.random.key(5)
    apply = jax.jit(model.apply, static_argnames="deterministic")  # eagerly, every primitive compiles alone
    _, ys = apply(variables, xs, deterministic=False, rngs={"dropout": key})
    drawn = DropoutKey().apply({}, rngs={"dropout": key})
    assert jnp.array_equal(ys, reference.apply(params, xs, key=drawn, train=True, regularize=REG)[1])
    training = rln.Stack(layers, regularize=REG, deterministic=False, param_dtype=jnp.float64)
    assert jnp.array_equal(jax.jit(training.apply)(variables, xs, rngs={"dropout": key})[1], ys)
    other = apply(variables, xs, deterministic=False, rngs={"dropout": jax.random.key(6)})[1]
    assert not jnp.array_equal(other, ys)
    _, expectation = apply(variables, xs, deterministic=True)
    assert jnp.array_equal(expectation, reference.apply(params, xs, regularize=REG)[1])


def test_rng_collection_names_the_stream_of_the_masks():
    """``rng_collection`` picks the rng stream training draws from, as `flax.linen.Dropout`'s does: the same
    key under another name gives the same masks, and a missing stream is named in the error."""
    xs = jax.random.normal(jax.random.key(1), (2, 5, I), jnp.float64)
    key = jax.random.key(5)
    for module in (rln.RNN, rln.Bidirectional):
        default = module(rj.lstm(3), regularize=REG, param_dtype=jnp.float64)
        named = module(rj.lstm(3), regularize=REG, rng_collection="recurrent", param_dtype=jnp.float64)
        variables = default.init(jax.random.key(0), xs, deterministic=True)
        ys = default.apply(variables, xs, deterministic=False, rngs={"dropout": key})[1]
        assert jnp.array_equal(
            named.apply(variables, xs, deterministic=False, rngs={"recurrent": key})[1], ys
        )
        with pytest.raises(
            ValueError, match=r"draws its masks from the 'recurrent' rng .* rngs=\{'recurrent'"
        ):
            named.apply(variables, xs, deterministic=False, rngs={"dropout": key})
    bad = rln.RNN(rj.lstm(3), regularize=REG, rng_collection="params", param_dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"RNN.rng_collection must name an rng stream other than 'params'"):
        bad.apply(bad.init(key, xs, deterministic=True), xs, deterministic=False, rngs={"params": key})
    stack = rln.Stack(
        (rj.lstm(3), rj.lstm(3)), dropout=0.5, rng_collection="recurrent", param_dtype=jnp.float64
    )
    variables = stack.init(jax.random.key(0), xs, deterministic=True)
    ys = stack.apply(variables, xs, deterministic=False, rngs={"recurrent": key})[1]
    plain = rln.Stack((rj.lstm(3), rj.lstm(3)), dropout=0.5, param_dtype=jnp.float64)
    assert jnp.array_equal(plain.apply(variables, xs, deterministic=False, rngs={"dropout": key})[1], ys)


def test_trains_with_train_state_and_optax():
    xs, ys, lengths = regression_data()
    model = rln.Stack(
        (rj.bidirectional(rj.gru(6)), rj.lstm(2)), dropout=0.1, checkpoint=3, param_dtype=jnp.float64
    )
    variables = model.init(jax.random.key(0), xs, deterministic=True)
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=optax.adam(3e-2)
    )

    def loss(params, deterministic=True, key=None):
        rngs = None if key is None else {"dropout": key}
        _, out = state.apply_fn(
            {"params": params}, xs, lengths=lengths, deterministic=deterministic, rngs=rngs
        )
        return rj.losses.squared_error(out, ys, lengths)

    @jax.jit
    def step(state, key):
        value, grads = jax.value_and_grad(loss)(state.params, False, key)
        return state.apply_gradients(grads=grads), value

    first = float(jax.jit(loss)(state.params))
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam is not strict-promotion safe
        for key in jax.random.split(jax.random.key(1), 60):
            state, _ = step(state, key)
    assert float(jax.jit(loss)(state.params)) < 0.5 * first


def test_errors():
    key, xs = jax.random.key(0), jnp.ones((2, 5, I), jnp.float64)
    with pytest.raises(TypeError, match=r"cell must be an rnnjax Cell .* got str"):
        rln.RNN("lstm").init(key, xs)
    with pytest.raises(ValueError, match=r"merge must be one of \('concat', 'sum'\), got 'max'"):
        rln.Bidirectional(rj.lstm(2), merge="max").init(key, xs)
    with pytest.raises(TypeError, match=r"layers of Stack must be a sequence .* got Cell"):
        rln.Stack(rj.lstm(2)).init(key, xs)
    with pytest.raises(
        TypeError, match=r"layer 0 of Stack must be a Cell, an rj.rnn or an rj.bidirectional .* 'time_major'"
    ):
        rln.Stack((rj.time_major(rj.rnn(rj.lstm(2))),)).init(key, xs)
    with pytest.raises(
        ValueError, match=r"residual=True needs layer 1's input size \(2\) to equal its output size \(3\)"
    ):
        rln.Stack((rj.lstm(2), rj.lstm(3)), residual=True).init(key, xs)
    model = rln.Stack((rj.lstm(2), rj.lstm(2)), dropout=0.5, param_dtype=jnp.float64)
    with pytest.raises(
        ValueError, match=r'Parameter "deterministic" must be passed to the constructor or at call time'
    ):
        model.init(key, xs)
    variables = model.init(key, xs, deterministic=True)
    with pytest.raises(ValueError, match=r"Stack in training \(deterministic=False\) draws its masks from"):
        model.apply(variables, xs, deterministic=False)
    regularized = rln.RNN(rj.lstm(2), regularize=REG, param_dtype=jnp.float64)
    with pytest.raises(
        ValueError, match=r'Parameter "deterministic" must be passed to the constructor or at call time'
    ):
        regularized.init(key, xs)
    variables = regularized.init(key, xs, deterministic=True)
    with pytest.raises(ValueError, match=r"RNN in training \(deterministic=False\) draws its masks from the"):
        regularized.apply(variables, xs, deterministic=False)
    with pytest.raises(TypeError, match=r"regularize must be an rj.Regularizer or None, got float"):
        rln.Bidirectional(rj.lstm(2), regularize=0.5, param_dtype=jnp.float64).init(key, xs)
    with pytest.raises(ValueError, match=r"state_dropout needs a cell whose recurrence is the GEMM h w_hh"):
        rln.RNN(USER_CELL, regularize=REG, param_dtype=jnp.float64).init(key, xs, deterministic=True)
    with pytest.raises(ValueError, match=r"checkpoint must be None, 'none', 'sqrt' or an int >= 1 .* got 0"):
        rln.RNN(rj.lstm(2), checkpoint=0, param_dtype=jnp.float64).init(key, xs)
    with pytest.raises(ValueError, match=r"pass checkpoint or budget, not both"):
        rln.Bidirectional(rj.lstm(2), checkpoint=2, budget=10**6, param_dtype=jnp.float64).init(key, xs)
    with pytest.raises(ValueError, match=r"xs must have shape \[B, T, I\] \(rank >= 3\), got shape \(5, 3\)"):
        rln.RNN(rj.lstm(2)).init(key, xs[0])
    with pytest.raises(TypeError, match=r"params.w_ih has dtype float32 but xs has dtype float64"):
        rln.RNN(rj.lstm(2)).init(key, xs)
    with pytest.raises(TypeError, match=r"carry of a bidirectional layer must be a BidirectionalCarry"):
        rln.Bidirectional(rj.lstm(2), param_dtype=jnp.float64).init(key, xs, carry=(None, None))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'probe'"):
        rln.RNN(rj.lstm(2), param_dtype=jnp.float64).init(key, xs, probe=xs)
