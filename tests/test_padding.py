"""Padding may hold anything: NaN, inf or 1e30 at steps ``t >= lengths[b]`` changes no output, carry, loss or
gradient, bit for bit, and no NaN appears (a select after the arithmetic is not enough: its backward
multiplies a zero cotangent by the derivative at the padding, and ``0 · nan`` is NaN).

Each case runs one compiled program twice per drawn example, on clean padding (finite noise) and on junk, and
compares every leaf of ``(loss, outputs, final carry, gradients)`` with `np.testing.assert_array_equal`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CELLS, FAST_CELLS, random_problem, tiered
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gradcheck import my_cell

import rnnjax as rj
from rnnjax.binomial import peak_bytes
from rnnjax.remat import _best_nesting, step_sizes

B, T, I, H, V = 3, 6, 2, 3, 4
JUNK = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 1e300])
JUNK_IDS = np.array([-1, -(2**31), 2**31 - 1, V, 10**6])  # class ids out of range
EXAMPLES = settings(max_examples=3)


@st.composite
def paddings(draw: Any, n: int = T) -> tuple[np.ndarray, int]:
    """``(lengths [B] in [0, n], seed)``: at least one sequence padded, the seed picks the junk."""
    lengths = draw(st.lists(st.integers(0, n), min_size=B, max_size=B).filter(lambda L: min(L) < n))
    return np.array(lengths), draw(st.integers(0, 2**32 - 1))


def with_padding(a: Any, lengths: np.ndarray, rng: np.random.Generator | None) -> jax.Array:
    """``a [B, T, ...]`` with junk (NaN, inf, huge; class ids out of range) at the steps ``t >= lengths[b]``,
    or finite noise when ``rng`` is None: the clean padding."""
    a = np.asarray(a)
    pad = np.arange(a.shape[1])[None, :] >= lengths[:, None]
    pad = pad.reshape(pad.shape + (1,) * (a.ndim - 2))
    if rng is None:
        fill = np.arange(a.size).reshape(a.shape) % 3  # finite, and ids in range
    else:
        fill = rng.choice(JUNK_IDS if np.issubdtype(a.dtype, np.integer) else JUNK, size=a.shape)
    return jnp.asarray(np.where(pad, fill, a).astype(a.dtype))


def assert_padding_unreachable(run: Any, args: tuple, padded: dict[int, Any], pad: tuple) -> None:
    """``run(*args)`` equal bit for bit, and finite, whether the args at ``padded`` (index -> lengths they
    are padded by, or None for the drawn lengths) hold clean padding or junk."""
    lengths, seed = pad
    rng = np.random.default_rng(seed)

    def fill(rng: np.random.Generator | None) -> tuple:
        return tuple(
            with_padding(a, lengths if padded[i] is None else padded[i], rng) if i in padded else a
            for i, a in enumerate(args)
        )

    clean, junk = run(*fill(None)), run(*fill(rng))
    for c, j in zip(jax.tree.leaves(clean), jax.tree.leaves(junk), strict=True):
        np.testing.assert_array_equal(j, c)
        assert np.all(np.isfinite(j))


def readout(ys: Any, final: Any) -> jax.Array:
    """A nonlinear scalar of every output and of the final carry."""
    return sum(jnp.sum(jnp.sin(y)) for y in jax.tree.leaves(ys)) + sum(
        jnp.sum(jnp.cos(c)) for c in jax.tree.leaves(final)
    )


def make_cell(name: str) -> rj.Cell:
    return my_cell(H) if name == "user" else CELLS[name](H)


@functools.cache
def unroll_program(name: str, grad: str, options: tuple = ()) -> Any:
    """The jitted ``(loss, ys, final carry)`` and gradients to params, xs and the initial carry, of `rj.unroll`
    with ``options`` (compiled once per case, whatever the draws)."""
    cell = make_cell(name)

    def loss(params: Any, xs: jax.Array, carry: Any, lengths: jax.Array) -> tuple:
        final, ys = rj.unroll(cell, params, xs, carry, lengths=lengths, grad=grad, **dict(options))
        return readout(ys, final), (ys, final)

    return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))


def budget_for(name: str, schedule: str) -> int:
    """A budget under which ``schedule`` recomputes steps (T = 6, the LSTM's sizes)."""
    cell = make_cell(name)
    params, xs, carry = random_problem(cell, jax.random.key(0), B, T, I)
    sizes = step_sizes(cell, params, carry, xs)
    return peak_bytes(1, 2, sizes) if schedule == "binomial" else _best_nesting(T, 2, sizes)[0]


def check_unroll(name: str, grad: str, options: tuple, pad: tuple) -> None:
    cell = make_cell(name)
    params, xs, carry = random_problem(cell, jax.random.key(1), B, T, I)
    run = unroll_program(name, grad, options)
    assert_padding_unreachable(run, (params, xs, carry, jnp.asarray(pad[0])), {1: None}, pad)


@pytest.mark.parametrize("grad", rj.GRAD_MODES)
@pytest.mark.parametrize("name", tiered([*CELLS, "user"], fast=(*FAST_CELLS, "user")))
@EXAMPLES
@given(pad=paddings())
def test_every_cell(name, grad, pad):
    check_unroll(name, grad, (), pad)


@pytest.mark.parametrize(
    "name, options",
    [
        ("gru", (("reverse", True),)),
        ("user", (("reverse", True),)),
        ("lstm", (("checkpoint", 2),)),
        ("user", (("checkpoint", "sqrt"), ("reverse", True))),
        ("lstm", (("budget", "binomial"),)),
        ("lstm", (("budget", "nested"), ("reverse", True))),
    ],
    ids=lambda v: "-".join(f"{k}={x}" for k, x in v) if isinstance(v, tuple) else v,
)
@pytest.mark.parametrize("grad", rj.GRAD_MODES)
@EXAMPLES
@given(pad=paddings())
def test_schedules_and_directions(name, options, grad, pad):
    opts = dict(options)
    if "budget" in opts:
        schedule = opts.pop("budget")
        opts.update(budget=budget_for(name, schedule), schedule=schedule)
    check_unroll(name, grad, tuple(sorted(opts.items())), pad)


@functools.cache
def layer_program(kind: str, grad: str) -> tuple[rj.Layer, Any]:
    """A layer (bidirectional; a residual stack of a bidirectional layer and a reverse GRU, with dropout in
    training) and its jitted loss and gradients to params and xs."""
    training = {}
    if kind == "bidirectional":
        layer = rj.bidirectional(rj.lstm(H), rj.gru(H))
    else:
        fw_bw = rj.bidirectional(rj.gru(H), merge="sum")
        layer = rj.stack(fw_bw, rj.rnn(rj.gru(H), reverse=True), residual=True, dropout=0.3)
        training = {"train": True, "key": jax.random.key(5)}

    def loss(params: Any, xs: jax.Array, lengths: jax.Array) -> tuple:
        final, ys = layer.apply(params, xs, lengths=lengths, grad=grad, **training)
        return readout(ys, final), (ys, final)

    return layer, jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))


@pytest.mark.parametrize("kind", ["bidirectional", "stack"])
@pytest.mark.parametrize("grad", rj.GRAD_MODES)
@EXAMPLES
@given(pad=paddings())
def test_layers(kind, grad, pad):
    layer, run = layer_program(kind, grad)
    params = layer.init(jax.random.key(0), I, jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float64)
    assert_padding_unreachable(run, (params, xs, jnp.asarray(pad[0])), {1: None}, pad)


@functools.cache
def tbptt_program(grad: str) -> Any:
    """Truncated BPTT over chunks of 4 steps (the last one shorter): each chunk's lengths from a ``valid``
    stream, a squared error against targets that are padded too."""
    cell = rj.lstm(H)

    def chunk_loss(params: Any, carry: Any, chunk: dict) -> tuple[jax.Array, Any]:
        lengths = jnp.sum(chunk["valid"], axis=1)
        carry, ys = rj.unroll(cell, params, chunk["x"], carry, lengths=lengths, grad=grad)
        return rj.losses.squared_error(ys, chunk["y"], lengths), carry

    return jax.jit(lambda p, c, s: rj.truncated_bptt(chunk_loss, p, c, s, chunk_size=4))


@pytest.mark.parametrize("grad", rj.GRAD_MODES)
@EXAMPLES
@given(pad=paddings())
def test_truncated_bptt(grad, pad):
    cell = rj.lstm(H)
    params, xs, carry = random_problem(cell, jax.random.key(1), B, T, I)
    ys = jax.random.normal(jax.random.key(2), (B, T, H), jnp.float64)
    valid = jnp.asarray(np.arange(T)[None, :] < pad[0][:, None], jnp.int32)

    def run(params: Any, carry: Any, xs: jax.Array, ys: jax.Array) -> Any:
        return tbptt_program(grad)(params, carry, {"x": xs, "y": ys, "valid": valid})

    assert_padding_unreachable(run, (params, carry, xs, ys), {2: None, 3: None}, pad)


@jax.jit
def losses_and_grads(
    logits: jax.Array, targets: jax.Array, predictions: jax.Array, lengths: jax.Array
) -> Any:
    """Cross-entropy and squared error, their values and gradients to logits and predictions."""

    def loss(logits: jax.Array, predictions: jax.Array) -> jax.Array:
        xent = rj.losses.sequence_cross_entropy(logits, targets, lengths)
        return xent + rj.losses.squared_error(predictions, logits, lengths)

    return jax.value_and_grad(loss, (0, 1))(logits, predictions)


@EXAMPLES
@given(pad=paddings())
def test_cross_entropy_and_squared_error(pad):
    """Junk logits, predictions and targets (ids out of range) at the padded steps."""
    logits = jax.random.normal(jax.random.key(0), (B, T, V), jnp.float64)
    targets = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    predictions = jax.random.normal(jax.random.key(2), (B, T, V), jnp.float64)
    padded = {0: None, 1: None, 2: None}
    assert_padding_unreachable(
        losses_and_grads, (logits, targets, predictions, jnp.asarray(pad[0])), padded, pad
    )


@jax.jit
def ctc_and_grad(logits: jax.Array, labels: jax.Array, lengths: jax.Array, label_lengths: jax.Array) -> Any:
    return jax.value_and_grad(lambda lg: jnp.sum(rj.losses.ctc(lg, lengths, labels, label_lengths)))(logits)


@EXAMPLES
@given(pad=paddings(), label_lengths=st.lists(st.integers(0, 3), min_size=B, max_size=B))
def test_ctc(pad, label_lengths):
    """Junk logits at the padded frames, junk label ids past each label length."""
    label_lengths = np.minimum(label_lengths, pad[0])
    logits = jax.random.normal(jax.random.key(0), (B, T, V), jnp.float64)
    labels = jax.random.randint(jax.random.key(1), (B, 3), 1, V)  # never the blank, 0
    args = (logits, labels, jnp.asarray(pad[0]), jnp.asarray(label_lengths))
    assert_padding_unreachable(ctc_and_grad, args, {0: None, 1: label_lengths}, pad)


@functools.cache
def rtrl_program(name: str) -> Any:
    """RTRL's loss and gradients (dense for the LSTM, diagonal for minGRU and the LRU) under a squared error."""
    cell = make_cell(name)

    def step_loss(ro: jax.Array, y: jax.Array, target: jax.Array) -> jax.Array:
        return jnp.sum((y @ ro - target) ** 2, axis=-1)

    return jax.jit(lambda p, ro, xs, ys, L: rj.rtrl_value_and_grad(cell, p, ro, xs, ys, step_loss, lengths=L))


@pytest.mark.parametrize("name", ["lstm", "mingru", "lru"])
@EXAMPLES
@given(pad=paddings())
def test_rtrl(name, pad):
    cell = make_cell(name)
    params, xs, _ = random_problem(cell, jax.random.key(1), B, T, I)
    S = cell.initial_carry(params, (1,)).h.shape[-1]
    ro = jax.random.normal(jax.random.key(2), (S, 2), jnp.float64)
    ys = jax.random.normal(jax.random.key(3), (B, T, 2), jnp.float64)
    args = (params, ro, xs, ys, jnp.asarray(pad[0]))
    assert_padding_unreachable(rtrl_program(name), args, {2: None, 3: None}, pad)
