"""rnnjax.equinox: the modules equal the functional API, train with Equinox's idiom and refuse bad input."""

from __future__ import annotations

import importlib
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
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
from rnnjax import equinox as req


def build(case_kind: str, args: dict, key: jax.Array) -> eqx.Module:
    args = dict(args)
    first = args.pop({"rnn": "cell", "bidirectional": "cell_fw", "stack": "layers"}[case_kind])
    cls = {"rnn": req.RNN, "bidirectional": req.Bidirectional, "stack": req.Stack}[case_kind]
    return cls(first, I, key=key, dtype=jnp.float64, **args)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_matches_functional_api(case: Case):
    model = build(case.kind, case.kw, jax.random.key(0))
    # the params are those the functional layer's init returns for the same key
    assert jax.tree.all(
        jax.tree.map(jnp.array_equal, model.params, case.functional().init(jax.random.key(0), I, jnp.float64))
    )

    def run(params, xs, carry, key):
        module = eqx.tree_at(lambda m: m.params, model, params)
        extra = {"key": key, "inference": not case.train} if case.kind == "stack" or case.regularized else {}
        return module(xs, carry=carry, lengths=case.call_lengths(), grad=case.grad, **extra)

    check_matches(case, run, model.params, key=jax.random.key(5) if case.train else None)


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("kind", MODULES)
def test_every_unroll_option_reaches_unroll(monkeypatch, kind, options):
    args, n = MODULES[kind]
    model = build(kind, {**dict(args), **options}, jax.random.key(0))
    calls = record_unroll(monkeypatch)
    model(jnp.ones((2, 5, I), jnp.float64))
    check_options_reached(calls, options, n)


def test_regularize_follows_eqx_dropout():
    """In training the masks come from the call's ``key`` (a stack hands its layers the keys `rj.stack`
    does); ``inference=True``, per call or by `eqx.nn.inference_mode`, is the expectation."""
    xs = jax.random.normal(jax.random.key(1), (2, 5, I), jnp.float64)
    layers = (rj.lstm(4), rj.bidirectional(rj.gru(2)))
    model = req.Stack(layers, I, key=jax.random.key(0), regularize=REG, dtype=jnp.float64)
    reference, key = rj.stack(*layers), jax.random.key(5)
    _, ys = eqx.filter_jit(lambda m, xs, k: m(xs, key=k))(model, xs, key)
    assert jnp.array_equal(ys, reference.apply(model.params, xs, key=key, train=True, regularize=REG)[1])
    assert not jnp.array_equal(model(xs, key=jax.random.key(6))[1], ys)
    expectation = reference.apply(model.params, xs, regularize=REG)[1]
    assert jnp.array_equal(eqx.nn.inference_mode(model)(xs)[1], expectation)
    assert jnp.array_equal(model(xs, inference=True, key=key)[1], expectation)


def test_trains_with_filter_value_and_grad_and_optax():
    xs, ys, lengths = regression_data()
    model = req.Stack(
        [rj.bidirectional(rj.gru(6)), rj.lstm(2)], 3, key=jax.random.key(0), dropout=0.1, dtype=jnp.float64
    )
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, key):
        def loss(model):
            return rj.losses.squared_error(model(xs, lengths=lengths, key=key)[1], ys, lengths)

        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, value

    def eval_loss(model):
        model = eqx.nn.inference_mode(model)
        return float(rj.losses.squared_error(model(xs, lengths=lengths)[1], ys, lengths))

    first = eval_loss(model)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam is not strict-promotion safe
        for key in jax.random.split(jax.random.key(1), 60):
            model, opt_state, _ = step(model, opt_state, key)
    assert eval_loss(model) < 0.5 * first


def test_errors():
    key, xs = jax.random.key(0), jnp.ones((2, 5, I), jnp.float64)
    with pytest.raises(TypeError, match=r"cell must be an rnnjax Cell .* got str"):
        req.RNN("lstm", I, key=key)
    with pytest.raises(ValueError, match=r"merge must be one of \('concat', 'sum'\), got 'max'"):
        req.Bidirectional(rj.lstm(2), I, key=key, merge="max")
    with pytest.raises(TypeError, match=r"layers of Stack must be a sequence .* got Cell"):
        req.Stack(rj.lstm(2), I, key=key)
    with pytest.raises(
        TypeError, match=r"layer 1 of Stack must be a Cell, an rj.rnn or an rj.bidirectional .* 'stack'"
    ):
        req.Stack([rj.lstm(2), rj.stack(rj.lstm(2))], I, key=key)
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got 1.5"):
        req.Stack([rj.lstm(2), rj.lstm(2)], I, key=key, dropout=1.5)
    with pytest.raises(
        ValueError, match=r"residual=True needs layer 1's input size \(2\) to equal its output size \(3\)"
    ):
        req.Stack([rj.lstm(2), rj.lstm(3)], I, key=key, residual=True)
    model = req.Stack([rj.lstm(2), rj.lstm(2)], I, key=key, dropout=0.5, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"Stack in training draws its masks from a PRNG key: pass key="):
        model(xs)
    model(xs, inference=True)  # no key needed without dropout
    with pytest.raises(ValueError, match=r"RNN in training draws its masks from a PRNG key: pass key="):
        req.RNN(rj.lstm(2), I, key=key, regularize=REG, dtype=jnp.float64)(xs)
    with pytest.raises(ValueError, match=r"Bidirectional in training draws its masks from a PRNG key"):
        req.Bidirectional(rj.lstm(2), I, key=key, regularize=REG, dtype=jnp.float64)(xs)
    req.RNN(rj.lstm(2), I, key=key, regularize=REG, inference=True, dtype=jnp.float64)(xs)  # no key needed
    # the options are checked where the module is built, not at its first call
    with pytest.raises(TypeError, match=r"regularize must be an rj.Regularizer or None, got str"):
        req.RNN(rj.lstm(2), I, key=key, regularize="zoneout", dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"method must be one of .* got 'parallel'"):
        req.Stack([rj.lstm(2)], I, key=key, method="parallel")
    with pytest.raises(ValueError, match=r"method='associative' needs a cell whose recurrence is linear"):
        req.Stack([rj.mingru(2), rj.bidirectional(rj.lstm(2))], I, key=key, method="associative")
    with pytest.raises(ValueError, match=r"checkpoint= applies to method='sequential' only"):
        req.RNN(rj.mingru(2), I, key=key, method="associative", checkpoint=2)
    with pytest.raises(ValueError, match=r"weight_drop needs a cell whose recurrence is the GEMM h w_hh"):
        req.RNN(USER_CELL, I, key=key, regularize=rj.Regularizer(weight_drop=0.5))(xs, key=key)
    with pytest.raises(ValueError, match=r"checkpoint must be None, 'none', 'sqrt' or an int >= 1 .* got 0"):
        req.RNN(rj.lstm(2), I, key=key, checkpoint=0, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"schedule='nested' needs a budget"):
        req.RNN(rj.lstm(2), I, key=key, schedule="nested", dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"unroll_steps must be an int >= 1 or a bool, got 0"):
        req.Bidirectional(rj.lstm(2), I, key=key, unroll_steps=0, dtype=jnp.float64)
    with pytest.raises(ValueError, match=r"xs must have shape \[B, T, I\] \(rank >= 3\), got shape \(5, 3\)"):
        req.RNN(rj.lstm(2), I, key=key, dtype=jnp.float64)(xs[0])
    with pytest.raises(TypeError, match=r"carry of a bidirectional layer must be a BidirectionalCarry"):
        req.Bidirectional(rj.lstm(2), I, key=key, dtype=jnp.float64)(xs, carry=(None, None))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'probe'"):
        req.RNN(rj.lstm(2), I, key=key, probe=xs)


def test_missing_equinox_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "equinox", None)
    monkeypatch.delitem(sys.modules, "rnnjax.equinox")
    with pytest.raises(ImportError, match=r"pip install rnnjax\[equinox\]"):
        importlib.import_module("rnnjax.equinox")
