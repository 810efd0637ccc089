"""Layers: rnn, bidirectional, stack (residual, dropout), time_major, dense read-outs, embed, last_valid."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnjax as rj

B, T, I, H = 3, 6, 4, 5
LENGTHS = jnp.array([6, 0, 2])


def data(key, dtype=jnp.float64):
    return jax.random.normal(key, (B, T, I), dtype)


def test_rnn_is_unroll(key):
    cell = rj.gru(H)
    layer = rj.rnn(cell, reverse=True)
    params = layer.init(key, I, jnp.float64)
    xs = data(key)
    c, ys = layer.apply(params, xs, lengths=LENGTHS)
    c2, ys2 = rj.unroll(cell, params, xs, lengths=LENGTHS, reverse=True)
    np.testing.assert_array_equal(ys, ys2)
    np.testing.assert_array_equal(c.h, c2.h)
    assert layer.output_size == H and layer.kind == "rnn"


@pytest.mark.parametrize("merge", rj.MERGES)
def test_bidirectional_is_two_unrolls(merge, key):
    fw, bw = rj.lstm(H), rj.lstm(H)
    layer = rj.bidirectional(fw, bw, merge=merge)
    params = layer.init(key, I, jnp.float64)
    xs = data(key)
    carry, ys = layer.apply(params, xs, lengths=LENGTHS)
    _c_fw, ys_fw = rj.unroll(fw, params.fw, xs, lengths=LENGTHS)
    c_bw, ys_bw = rj.unroll(bw, params.bw, xs, lengths=LENGTHS, reverse=True)
    expected = jnp.concatenate([ys_fw, ys_bw], -1) if merge == "concat" else ys_fw + ys_bw
    np.testing.assert_array_equal(ys, expected)
    np.testing.assert_array_equal(carry.bw.c, c_bw.c)
    assert layer.output_size == (2 * H if merge == "concat" else H)
    # the backward direction's first output is its last step: with lengths it must start at lengths-1,
    # so row 2 (length 2) equals that row cut to 2 steps and reversed alone
    _, alone = rj.unroll(bw, params.bw, xs[2:3, :2], reverse=True)
    np.testing.assert_allclose(ys_bw[2, :2], alone[0], rtol=1e-14)


def test_stack_residual_and_carries(key):
    deep = rj.stack(
        rj.bidirectional(rj.gru(H)), rj.bidirectional(rj.gru(H)), rj.rnn(rj.gru(2 * H)), residual=True
    )
    params = deep.init(key, I, jnp.float64)
    xs = data(key)
    carries, ys = deep.apply(params, xs, lengths=LENGTHS)
    assert len(carries) == 3 and ys.shape == (B, T, 2 * H)
    # by hand: layer 0 plain, layers 1 and 2 add their input
    l0, l1, l2 = deep.children
    _, y0 = l0.apply(params[0], xs, lengths=LENGTHS)
    _, y1 = l1.apply(params[1], y0, lengths=LENGTHS)
    _, y2 = l2.apply(params[2], y1 + y0, lengths=LENGTHS)
    np.testing.assert_allclose(ys, y2 + y1 + y0, rtol=1e-14)
    assert np.all(np.asarray(ys[1]) == 0)  # an empty sequence stays zero through the residuals


def test_stack_dropout(key):
    deep = rj.stack(rj.lstm(H), rj.lstm(H), dropout=0.5)
    params = deep.init(key, I, jnp.float64)
    xs = data(key)
    _, eval_ys = deep.apply(params, xs)
    _, eval_ys2 = deep.apply(params, xs, key=jax.random.key(1))  # a key alone does not switch dropout on
    np.testing.assert_array_equal(eval_ys, eval_ys2)
    _, a = deep.apply(params, xs, train=True, key=jax.random.key(1))
    _, b = deep.apply(params, xs, train=True, key=jax.random.key(1))
    _, c = deep.apply(params, xs, train=True, key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.max(jnp.abs(a - c))) > 0 and float(jnp.max(jnp.abs(a - eval_ys))) > 0
    # dropout sits between the layers: layer 1 reads a masked, rescaled copy of layer 0's output
    l0, l1 = deep.children
    k0, _k1 = jax.random.split(jax.random.key(1))
    _, y0 = l0.apply(params[0], xs)
    keep = jax.random.bernoulli(jax.random.split(k0)[1], 0.5, y0.shape)
    _, y1 = l1.apply(params[1], jnp.where(keep, 2 * y0, 0.0))
    np.testing.assert_allclose(a, y1, rtol=1e-14)
    with pytest.raises(ValueError, match=r"needs a PRNG key: pass key="):
        deep.apply(params, xs, train=True)


def test_time_major(key):
    layer = rj.bidirectional(rj.elman(H))
    tm = rj.time_major(layer)
    params = layer.init(key, I, jnp.float64)
    xs = data(key)
    _, ys = layer.apply(params, xs, lengths=LENGTHS)
    _, ys_tm = tm.apply(params, jnp.swapaxes(xs, 0, 1), lengths=LENGTHS)
    np.testing.assert_array_equal(jnp.swapaxes(ys_tm, 0, 1), ys)


def test_dense_and_last_valid(key):
    head = rj.dense(7)
    p = head.init(key, H, jnp.float64)
    x = jax.random.normal(key, (B, T, H), jnp.float64)
    np.testing.assert_allclose(
        head.apply(p, x), np.asarray(x) @ np.asarray(p.w) + np.asarray(p.b), rtol=1e-14, atol=1e-15
    )
    cell = rj.lstm(H)
    params = cell.init(key, I, jnp.float64)
    carry, ys = rj.unroll(cell, params, data(key), lengths=LENGTHS)
    last = rj.last_valid(ys, LENGTHS)
    np.testing.assert_array_equal(last[np.array([0, 2])], carry.h[np.array([0, 2])])  # = the final carry
    np.testing.assert_array_equal(last[1], np.zeros(H))
    np.testing.assert_array_equal(rj.last_valid(ys), ys[:, -1])


def test_embed(key):
    table = jax.random.normal(key, (7, H), jnp.float64)
    ids = jnp.array([[6, 0, 3], [1, 1, 5]])
    np.testing.assert_array_equal(rj.embed(table, ids), np.asarray(table)[np.asarray(ids)])
    assert rj.embed(table, np.int32(2)).shape == (H,) and rj.embed(table, [4, 2]).shape == (2, H)
    # the gradient reaches the table: each row gets the sum of the cotangents of its lookups
    cot = jax.random.normal(jax.random.key(1), (2, 3, H), jnp.float64)
    d_table = jax.grad(lambda t: jnp.sum(rj.embed(t, ids) * cot))(table)
    np.testing.assert_allclose(d_table, jnp.einsum("btv,bte->ve", jax.nn.one_hot(ids, 7), cot), rtol=1e-14)
    # and through a recurrence, against autodiff and finite differences (the oracles of rj.gradcheck)
    cell = rj.gru(H)
    params = cell.init(key, H, jnp.float64)

    def loss(table, params, grad="manual"):
        return jnp.sum(jnp.sin(rj.unroll(cell, params, rj.embed(table, ids), grad=grad)[1]))

    report = rj.gradcheck(loss, table, params)
    assert report.passed, report
    with pytest.raises(ValueError, match=r"table must have shape \[V, E\], got shape \(7,\)"):
        rj.embed(table[:, 0], ids)
    with pytest.raises(TypeError, match="tokens must be an integer array, got dtype float"):
        rj.embed(table, ids.astype(jnp.float64))


COMPOSITIONS = {
    "bidirectional-lengths": lambda: rj.bidirectional(rj.lstm(H), rj.gru(H)),
    "bidirectional-sum": lambda: rj.bidirectional(rj.gru(H), merge="sum"),
    "stack3-residual": lambda: rj.stack(
        rj.bidirectional(rj.lstm(H)),
        rj.bidirectional(rj.lstm(H)),
        rj.bidirectional(rj.lstm(H)),
        residual=True,
    ),
    "stack-dropout-train": lambda: rj.stack(rj.elman(H), rj.gru(H), dropout=0.3),
}


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_compositions_gradcheck(name, key):
    """Every composition: manual BPTT vs jax.grad of the autodiff twin (≤ 1e-10) and finite differences."""
    layer = COMPOSITIONS[name]()
    params = layer.init(key, I, jnp.float64)
    head = rj.dense(2)
    head_params = head.init(jax.random.key(3), layer.output_size, jnp.float64)

    def loss(params, head_params, xs, grad="manual"):
        carry, ys = layer.apply(params, xs, lengths=LENGTHS, grad=grad, train=True, key=jax.random.key(5))
        per_step = head.apply(head_params, ys)  # synced many-to-many read-out
        pooled = head.apply(head_params, rj.last_valid(ys, LENGTHS))  # many-to-one read-out
        return (
            jnp.sum(jnp.tanh(per_step)) + jnp.sum(pooled**2) + sum(jnp.sum(c) for c in jax.tree.leaves(carry))
        )

    report = rj.gradcheck(loss, params, head_params, data(key))
    assert report.passed, str(report)
    # and gradients reach every parameter leaf
    g = jax.grad(loss)(params, head_params, data(key))
    assert all(float(jnp.max(jnp.abs(leaf))) > 0 for leaf in jax.tree.leaves(g))


def test_layer_errors():
    with pytest.raises(ValueError, match=r"merge must be one of \('concat', 'sum'\), got 'mean'"):
        rj.bidirectional(rj.lstm(3), merge="mean")
    with pytest.raises(
        ValueError, match=r"merge='sum' needs equal hidden sizes in both directions, got H_fw=3 and H_bw=4"
    ):
        rj.bidirectional(rj.lstm(3), rj.lstm(4), merge="sum")
    with pytest.raises(
        ValueError, match=r"residual=True needs layer 1's input size \(3\) to equal its output size \(4\)"
    ):
        rj.stack(rj.lstm(3), rj.lstm(4), residual=True)
    with pytest.raises(ValueError, match=r"dropout must be a probability in \[0, 1\), got 1.0"):
        rj.stack(rj.lstm(3), dropout=1.0)
    with pytest.raises(ValueError, match=r"stack needs at least one layer"):
        rj.stack()
    with pytest.raises(TypeError, match=r"cell_fw must be an rnnjax Cell .* got int"):
        rj.bidirectional(3)
    layer = rj.bidirectional(rj.lstm(3))
    params = layer.init(jax.random.key(0), 2, jnp.float64)
    with pytest.raises(
        TypeError, match=r"carry of a bidirectional layer must be a BidirectionalCarry\(fw, bw\), got tuple"
    ):
        layer.apply(params, jnp.ones((2, 4, 2), jnp.float64), carry=(1, 2, 3))
    with pytest.raises(ValueError, match=r"lengths must have shape \[B\] = \(2,\)"):
        layer.apply(params, jnp.ones((2, 4, 2), jnp.float64), lengths=jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"x has feature size \(3,\) but the dense params expect 5"):
        rj.dense(2).apply(rj.dense(2).init(jax.random.key(0), 5), jnp.ones((2, 3)))
