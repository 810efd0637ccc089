"""The binomial (Revolve) schedule: optimal by brute force, plans that replay, gradients equal, memory kept."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from helpers import CELLS, jit_grad, random_problem, readout_loss, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gradcheck import my_cell

import rnnjax as rj
from rnnjax.autodiff import autodiff_unroll
from rnnjax.binomial import (
    BinomialPlan,
    _split,
    binomial_plan,
    binomial_schedule,
    binomial_unroll,
    peak_bytes,
    reversal_steps,
)
from rnnjax.bptt import bptt_unroll, stepwise_bptt_unroll
from rnnjax.remat import _best_nesting, step_sizes
from rnnjax.scan import mask_from_lengths

B, I, H = 3, 2, 4


@functools.cache
def _fewest(n: int, c: int) -> int:
    """Leaf advances to reverse n leaves from c snapshots, by exhaustive search over every first split."""
    if n == 1:
        return 0
    if c == 1:
        return n * (n - 1) // 2
    return min(m + _fewest(m, c) + _fewest(n - m, c - 1 if n - m >= 2 else c) for m in range(1, n))


def test_reversal_steps_is_the_optimum_and_the_split_reaches_it():
    for n in range(1, 70):
        for c in range(1, 7):
            assert reversal_steps(n, c) == _fewest(n, c), (n, c)
            if n >= 2:
                m = _split(n, c - 1)
                assert 1 <= m < n
                assert m + _fewest(m, c) + _fewest(n - m, c - 1 if n - m >= 2 else c) == _fewest(n, c)
    # by hand: 3 snapshots reverse up to β(3, 2) = 10 leaves with r = 2, for 2·10 − β(4, 1) = 15 advances;
    # an 11th leaf takes r = 3: 3·11 − β(4, 2) = 18
    assert reversal_steps(10, 3) == 15 and reversal_steps(11, 3) == 18


def _replay(plan: BinomialPlan) -> int:
    """Runs the plan's tables on positions instead of carries; returns the backward's leaf advances.

    Asserts that every turn restores the snapshot it expects, from a slot that still holds it, and reaches
    the leaf it must reverse; that the slots stay in range; and that snapshots are stored only ahead of the
    turn's target (never the state a later turn will overwrite first).
    """
    n, c = plan.n, plan.snapshots
    slots: list[int | None] = [None] * (c + 2)
    for pos in range(n):  # the forward pass
        assert 0 <= plan.fwd_slot[pos] < c + 2
        slots[plan.fwd_slot[pos]] = pos
    advances = 0
    for i in range(n):
        target = n - 1 - i
        pos = plan.load_pos[i]
        assert slots[plan.load_slot[i]] == pos <= target, (i, plan.load_slot[i], slots, pos)
        while pos < target:
            pos += 1
            advances += 1
            if plan.store_turn[pos] == i:
                assert plan.store_slot[pos] < c, "a turn stores into a snapshot slot"
                slots[plan.store_slot[pos]] = pos
        slots[plan.trash] = None
    return advances


@settings(max_examples=60)
@given(n=st.integers(1, 200), c=st.integers(1, 12), K=st.integers(1, 4), tail=st.integers(0, 3))
def test_plans_replay_with_the_fewest_advances(n, c, K, tail):
    tail = min(tail, K - 1)
    plan = binomial_plan(n * K + tail, K, c)
    assert plan.n == n and plan.snapshots == min(c, n)
    assert _replay(plan) == plan.advances == reversal_steps(n, plan.snapshots) - (n - 1)
    if c >= n:
        assert plan.advances == 0


def _plain_and_binomial(cell, impl, plan, reverse, lengths, key, which):
    """Two losses ``(params, xs, carry) -> scalar``: through ``impl`` directly and on the binomial ``plan``.

    ``which`` picks the cotangents the loss sends back: "both", "ys" (the final carry's is a symbolic zero)
    or "final" (the outputs' is).
    """
    params, xs, carry = random_problem(cell, key, B, plan.n * plan.K + 3 % plan.K, I)
    T = xs.shape[1]
    mask = None if lengths is None else mask_from_lengths(lengths, T)
    ws = jax.random.normal(jax.random.key(7), (B, T, 1), xs.dtype)

    def loss(binomial: bool):
        def f(p, x, c):
            args = (cell, reverse, 1, p, x, c, mask)
            final, ys = binomial_unroll(impl, plan, *args) if binomial else impl(*args)
            out = sum(jnp.sum(jnp.sin(y) * ws) for y in jax.tree.leaves(ys))
            fin = sum(jnp.sum(jnp.cos(a)) for a in jax.tree.leaves(final))
            return {"both": out + fin, "ys": out, "final": fin}[which]

        return f

    return loss(False), loss(True), (params, xs, carry)


@pytest.mark.parametrize(
    ("name", "K", "c", "reverse", "lengths", "which"),
    [
        ("lstm", 2, 2, False, None, "both"),
        ("lstm", 3, 3, True, jnp.array([18, 0, 11]), "both"),  # a tail of 3 % K = 0 steps: none
        ("gru", 2, 1, True, None, "ys"),
        ("elman-tanh", 4, 2, False, jnp.array([11, 7, 0]), "final"),
    ],
)
def test_binomial_gradients_equal_plain(name, K, c, reverse, lengths, which, key):
    """Leaves recomputed from 1-3 snapshots, both directions, lengths, and each cotangent left symbolic."""
    cell = CELLS[name](H)
    plan = binomial_plan(6 * K, K, c)
    assert plan.advances > 0
    plain, binomial, args = _plain_and_binomial(cell, bptt_unroll, plan, reverse, lengths, key, which)
    assert abs(float(plain(*args) - binomial(*args))) <= 1e-12
    assert rel_err(jit_grad(binomial, (0, 1, 2))(*args), jit_grad(plain, (0, 1, 2))(*args)) <= 1e-12


def test_binomial_user_cell_and_autodiff(key):
    """A user-written cell (pytree outputs, the per-step VJP chain) and the autodiff twin as leaves."""
    plan = binomial_plan(20, 4, 2)
    lengths = jnp.array([20, 9, 0])
    for cell, impl in ((my_cell(), stepwise_bptt_unroll), (CELLS["lstm"](H), autodiff_unroll)):
        plain, binomial, args = _plain_and_binomial(cell, impl, plan, True, lengths, key, "both")
        assert rel_err(jit_grad(binomial, (0, 1, 2))(*args), jit_grad(plain, (0, 1, 2))(*args)) <= 1e-12


def test_budget_runs_the_binomial_schedule(key):
    """``rj.unroll(..., budget=)`` picks a plan that recomputes, with a tail, and keeps the plain gradients;
    a budget that holds every step is plain BPTT; forward mode points to the nested schedule."""
    T = 47
    cell = CELLS["lstm"](H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    sizes = step_sizes(cell, params, carry, xs)
    budget = peak_bytes(3, 2, sizes)
    K, c = binomial_schedule(T, budget, sizes)
    assert T % K and binomial_plan(T, K, c).advances > 0 and peak_bytes(K, c, sizes) <= budget
    lengths = jnp.array([47, 30, 0])
    plain = readout_loss(cell, jax.random.key(2), lengths=lengths)
    saving = readout_loss(cell, jax.random.key(2), lengths=lengths, budget=budget)
    g_plain = jit_grad(plain, (0, 1, 2))(params, xs, carry, "manual")
    for grad in rj.GRAD_MODES:
        assert rel_err(jit_grad(saving, (0, 1, 2))(params, xs, carry, grad), g_plain) <= 1e-12
    assert binomial_schedule(T, T * sizes.residual, sizes) is None
    with pytest.raises(
        TypeError,
        match=r"budget=\) binds the binomial schedule's backward.* call rj.unroll\(\.\.\., schedule='nested', grad='autodiff'\)",
    ):
        jax.jvp(lambda p: saving(p, xs, carry, "autodiff"), (params,), (params,))


def _temp_memory(T: int, **kwargs) -> int:
    cell = rj.lstm(32)
    params = cell.init(jax.random.key(0), 16, jnp.float32)
    xs = jnp.ones((4, T, 16), jnp.float32)
    # many-to-one, xs an argument that is not differentiated: what grows with T is what BPTT keeps
    step = jax.jit(jax.grad(lambda p, x: jnp.sum(rj.unroll(cell, p, x, **kwargs)[0].h ** 2)))
    return step.lower(params, xs).compile().memory_analysis().temp_size_in_bytes


def test_binomial_keeps_its_budget_and_recomputes_less_than_nested():
    """At T=4096, on the budget of the leanest two-level nested schedule: compiled memory within the budget
    (the model is calibrated to over-count), and fewer recomputed steps than the nested schedule's two
    passes. Ten times the budget holds every snapshot: one recomputation of each leaf, no advances."""
    cell = rj.lstm(32)
    params = cell.init(jax.random.key(0), 16, jnp.float32)
    sizes = step_sizes(cell, params, cell.initial_carry(params, (4,)), jnp.ones((4, 1, 16), jnp.float32))
    T = 4096
    budget, ks = _best_nesting(T, 2, sizes)
    K, c = binomial_schedule(T, budget, sizes)
    plan = binomial_plan(T, K, c)
    assert plan.advances * K + T < len(ks) * T
    assert _temp_memory(T, budget=budget) <= budget
    K, c = binomial_schedule(T, 10 * budget, sizes)
    assert binomial_plan(T, K, c).advances == 0 and c >= T // K


def test_schedule_errors(key):
    cell = rj.lstm(2)
    params, xs, _ = random_problem(cell, key, B, 10, I)
    with pytest.raises(ValueError, match=r"schedule='nested' needs a budget"):
        rj.unroll(cell, params, xs, schedule="nested")
    with pytest.raises(ValueError, match=r"schedule must be one of \('binomial', 'nested'\), got 'revolve'"):
        rj.unroll(cell, params, xs, budget=10**6, schedule="revolve")
    with pytest.raises(
        ValueError,
        match=r"budget=500 bytes is too small for T=10 steps \(.* B per carry.*\): the leanest binomial schedule",
    ):
        rj.unroll(cell, params, xs, budget=500)
    with pytest.raises(ValueError, match=r"a binomial plan needs K <= T and snapshots >= 1"):
        binomial_plan(3, 4, 1)


def test_binomial_gradient_against_jax_grad_and_finite_differences(key):
    """The binomial path's gradient (grad="manual", a budget that recomputes) against jax.grad through the
    plain forward scan (grad="autodiff", no budget) and central finite differences, via rj.gradcheck."""
    T = 23
    cell = CELLS["gru"](H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    budget = peak_bytes(1, 4, step_sizes(cell, params, carry, xs))
    K, c = binomial_schedule(T, budget, step_sizes(cell, params, carry, xs))
    assert binomial_plan(T, K, c).advances > 0
    ws = jax.random.normal(jax.random.key(5), (B, T, H), xs.dtype)

    def loss(p, x, h0, grad="manual"):
        kw = {"budget": budget} if grad == "manual" else {}
        final, ys = rj.unroll(cell, p, x, h0, lengths=jnp.array([23, 9, 0]), reverse=True, grad=grad, **kw)
        return jnp.sum(jnp.sin(ys) * ws) + jnp.sum(jnp.cos(final.h))

    report = rj.gradcheck(loss, params, xs, carry)
    assert report.passed, str(report)
