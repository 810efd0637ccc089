"""The Cell and Layer contract: static structure, equal by value, usable as jit/grad/vmap arguments and
Equinox fields; the layers pass every `rj.unroll` option on; `init`'s dtype follows JAX's default."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from helpers import CELLS, rel_err
from reference_cells import REFERENCES

import rnnjax as rj

# Every built-in configuration, made twice: each pair must be equal.
SAME_CONFIG = {name: (lambda ref=ref: ref.make(4)) for name, ref in REFERENCES.items()}


@pytest.mark.parametrize("name", list(SAME_CONFIG))
def test_builtin_cells_equal_by_configuration(name):
    a, b = SAME_CONFIG[name](), SAME_CONFIG[name]()
    assert a is not b and a == b and hash(a) == hash(b)
    assert jax.tree.leaves(a) == []
    assert a.replace(name="other") != a  # a changed cell is no longer the built-in configuration


def test_different_configurations_differ():
    cells = [rj.lstm(4), rj.lstm(5), rj.lstm(4, forget_bias=1.0), rj.gru(4), rj.elman(4, "relu")]
    assert len(set(cells)) == len(cells)
    assert all(x != y for i, x in enumerate(cells) for y in cells[i + 1 :])


def test_user_cells_compare_by_their_functions():
    base = rj.gru(3)

    def make():
        return rj.Cell(init=base.init, initial_carry=base.initial_carry, step=base.step, hidden_size=3)

    assert make() == make() and hash(make()) == hash(make())
    other = rj.Cell(init=base.init, initial_carry=base.initial_carry, step=rj.lstm(3).step, hidden_size=3)
    assert make() != other
    # a cell built from a hand-derived backward alone: its step is written from the gates
    derived = rj.Cell(init=base.init, initial_carry=base.initial_carry, backward=base.backward, hidden_size=3)
    again = rj.Cell(init=base.init, initial_carry=base.initial_carry, backward=base.backward, hidden_size=3)
    assert derived == again and derived.is_builtin


def _trace_counting_loss():
    traces = []

    @jax.jit
    def loss(cell, params, xs):
        traces.append(cell.name)
        return jnp.sum(rj.unroll(cell, params, xs)[1] ** 2)

    return loss, traces


def test_cell_as_jit_grad_and_vmap_argument():
    """A cell is an ordinary (non-static) argument of jit, grad and vmap; a rebuilt cell does not retrace."""
    loss, traces = _trace_counting_loss()
    params = rj.lstm(4).init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
    first = loss(rj.lstm(4), params, xs)
    second = loss(rj.lstm(4), params, xs)  # a new but equal cell: the cached program
    assert traces == ["lstm"] and first == second
    loss(rj.lstm(4, forget_bias=1.0), params, xs)  # another configuration: traced again
    assert len(traces) == 2
    g_cell, g_params = jax.grad(lambda c, p: loss(c, p, xs), argnums=(0, 1))(rj.lstm(4), params)
    assert g_cell == rj.lstm(4)  # no leaves, so nothing to differentiate
    assert rel_err(g_params, jax.grad(lambda p: loss(rj.lstm(4), p, xs))(params)) == 0
    ys = jax.vmap(lambda c, x: rj.unroll(c, params, x)[1], in_axes=(None, 0))(rj.lstm(4), xs[None])
    assert ys.shape == (1, 2, 5, 4)


def test_layers_are_static_and_equal_by_value():
    make = [
        lambda: rj.rnn(rj.gru(4), reverse=True),
        lambda: rj.bidirectional(rj.lstm(4), merge="sum"),
        lambda: rj.stack(rj.lstm(4), rj.bidirectional(rj.gru(4)), residual=False, dropout=0.1),
        lambda: rj.time_major(rj.rnn(rj.elman(4))),
        lambda: rj.dense(7),
    ]
    for m in make:
        a, b = m(), m()
        assert a == b and hash(a) == hash(b) and jax.tree.leaves(a) == []
    assert rj.rnn(rj.gru(4)) != rj.rnn(rj.gru(4), reverse=True)
    assert rj.stack(rj.lstm(4), dropout=0.1) != rj.stack(rj.lstm(4), dropout=0.2)
    assert rj.dense(7) != rj.dense(8)


def test_cell_and_layer_as_equinox_fields():
    """Cells and layers sit in an Equinox module as ordinary fields (no static marker needed): the arrays
    are the only leaves, so eqx.filter_jit and eqx.filter_grad see the params alone."""

    class Model(eqx.Module):
        cell: rj.Cell
        layer: rj.Layer
        params: rj.LSTMParams
        layer_params: tuple

        def __call__(self, xs):
            _, hs = rj.unroll(self.cell, self.params, xs)
            _, ys = self.layer.apply(self.layer_params, hs)
            return jnp.sum(ys**2)

    cell, layer = rj.lstm(4), rj.stack(rj.gru(3), rj.gru(2))
    model = Model(cell, layer, cell.init(jax.random.key(0), 3), layer.init(jax.random.key(1), 4))
    assert len(jax.tree.leaves(model)) == 3 + 2 * 4
    xs = jax.random.normal(jax.random.key(2), (2, 5, 3))
    grads = eqx.filter_jit(eqx.filter_grad(lambda m, x: m(x)))(model, xs)
    assert grads.cell == cell
    want = jax.grad(lambda p: jnp.sum(layer.apply(model.layer_params, rj.unroll(cell, p, xs)[1])[1] ** 2))
    assert rel_err(grads.params, want(model.params)) <= 1e-12


def test_init_dtype_follows_jax_default():
    """No dtype: JAX's default float dtype (float64 here, where the suite enables x64)."""
    for make in (*CELLS.values(),):
        params = make(3).init(jax.random.key(0), 2)
        assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float64)}
    layer = rj.stack(rj.lstm(3), rj.gru(3))
    assert {a.dtype for a in jax.tree.leaves(layer.init(jax.random.key(0), 2))} == {jnp.dtype(jnp.float64)}
    assert {a.dtype for a in jax.tree.leaves(rj.dense(3).init(jax.random.key(0), 2))} == {
        jnp.dtype(jnp.float64)
    }
    assert rj.lstm(3).init(jax.random.key(0), 2, jnp.float32).w_ih.dtype == jnp.float32


def test_unroll_options_are_keyword_only():
    cell = rj.gru(3)
    params = cell.init(jax.random.key(0), 2)
    xs = jnp.ones((2, 4, 2))
    with pytest.raises(TypeError, match="positional"):
        rj.unroll(cell, params, xs, None, jnp.array([4, 2]))
    with pytest.raises(TypeError, match="unroll"):
        rj.unroll(cell, params, xs, unroll=2)


OPTIONS = [
    pytest.param({"checkpoint": 2}, marks=pytest.mark.slow),  # the slowest two: budget= runs the same paths
    pytest.param({"checkpoint": "sqrt", "grad": "autodiff"}, marks=pytest.mark.slow),
    {"budget": 20_000},
    {"budget": 20_000, "schedule": "nested"},
    {"unroll_steps": 3},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_layers_pass_every_unroll_option(options):
    """`rj.rnn`, `rj.bidirectional` and `rj.stack` give their recurrences rj.unroll's options: outputs and
    gradients equal the same unrolls called directly, and the options reach them (a spy counts them)."""
    options = dict(options)
    grad = options.pop("grad", "manual")
    cell_a, cell_b = rj.lstm(3), rj.gru(3)
    k = jax.random.split(jax.random.key(0), 4)
    xs = jax.random.normal(k[0], (2, 7, 2))
    lengths = jnp.array([7, 4])
    pa, pb = cell_a.init(k[1], 2), cell_b.init(k[2], 6)

    def direct(pa, pb, xs):
        kw = {"lengths": lengths, "grad": grad, **options}
        _, fw = rj.unroll(cell_a, pa.fw, xs, **kw)
        _, bw = rj.unroll(cell_a, pa.bw, xs, reverse=True, **kw)
        _, ys = rj.unroll(cell_b, pb, jnp.concatenate([fw, bw], -1), **kw)
        return jnp.sum(jnp.sin(ys))

    layer = rj.stack(rj.bidirectional(cell_a), rj.rnn(cell_b))
    params = (rj.BidirectionalParams(pa, cell_a.init(k[3], 2)), pb)

    def via_layer(params, xs):
        return jnp.sum(jnp.sin(layer.apply(params, xs, lengths=lengths, grad=grad, **options)[1]))

    want = jax.value_and_grad(direct, argnums=(0, 1, 2))(*params, xs)
    got = jax.value_and_grad(via_layer, argnums=(0, 1))(params, xs)
    assert rel_err(got[0], want[0]) <= 1e-12
    assert rel_err(got[1], ((want[1][0], want[1][1]), want[1][2])) <= 1e-12

    seen = []
    original = rj.layers.unroll

    def spy(*args, **kwargs):
        seen.append({k: kwargs.get(k) for k in options})
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rj.layers, "unroll", spy)
        via_layer(params, xs)
    assert seen == [options] * 3


def test_layers_refuse_unknown_options():
    layer = rj.bidirectional(rj.lstm(3))
    params = layer.init(jax.random.key(0), 2)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['probe'\]; it accepts carry"):
        layer.apply(params, jnp.ones((1, 3, 2)), probe=jnp.zeros((1, 3, 3)))
    with pytest.raises(TypeError, match=r"\['unroll'\]"):
        rj.rnn(rj.lstm(3)).apply(layer.init(jax.random.key(0), 2).fw, jnp.ones((1, 3, 2)), unroll=2)


def test_gates_backward_is_typed():
    with pytest.raises(TypeError, match=r"GatesBackward.gates_bwd must be a function, got NoneType"):
        rj.GatesBackward(gates=rj.lstm(3).gates, gates_bwd=None)
    with pytest.raises(
        ValueError, match=r"extra_from_aux=True says extra_grads reads only aux, but extra_grads is None"
    ):
        rj.GatesBackward(gates=rj.lstm(3).gates, gates_bwd=rj.lstm(3).gates_bwd, extra_from_aux=True)
    with pytest.raises(TypeError, match=r"GatesBackward.extra_grads must be a function or None, got int"):
        rj.GatesBackward(gates=rj.lstm(3).gates, gates_bwd=rj.lstm(3).gates_bwd, extra_grads=3)
    with pytest.raises(TypeError, match=r"Cell.backward must be an rj.GatesBackward or None, got dict"):
        rj.Cell(init=rj.lstm(3).init, initial_carry=rj.lstm(3).initial_carry, backward={})
    cell = rj.lstm(3)
    assert isinstance(cell.initial_carry(cell.init(jax.random.key(0), 2), (1,)), rj.HiddenCarry)
    assert isinstance(cell.init(jax.random.key(0), 2), rj.ProjectionParams)
    assert dataclasses.is_dataclass(cell.backward)
