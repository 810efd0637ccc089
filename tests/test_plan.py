"""`rj.unroll` in three stages: validation, a frozen `rj.UnrollPlan` of static values, then execution.

The plan names what runs for each combination of options (`rj.unroll_plan`), is frozen and hashable (it is
the compiled program's static argument), and validation raises the same errors whether or not anything runs.
Forward mode through a custom VJP raises JAX's own error unchanged, with a note naming the options to pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from helpers import random_problem, rel_err

import rnnjax as rj
from rnnjax.binomial import peak_bytes
from rnnjax.remat import step_sizes

B, T, I, H = 3, 100, 2, 4


@pytest.fixture
def lstm_problem(key):
    cell = rj.lstm(H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    return cell, params, xs, carry


def _budget(cell, params, xs, carry) -> int:
    """A budget that holds 6 snapshots and one leaf of 4 steps: the binomial schedule must recompute, and
    the nested one takes two levels."""
    return peak_bytes(4, 6, step_sizes(cell, params, carry, xs))


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {},
            {
                "method": "sequential",
                "grad": "manual",
                "memory": "all",
                "unroll_steps": None,
                "masked": False,
            },
        ),
        ({"lengths": jnp.array([100, 5, 0])}, {"masked": True, "memory": "all"}),
        ({"reverse": True, "unroll_steps": 2}, {"reverse": True, "unroll_steps": 2}),
        ({"grad": "autodiff"}, {"grad": "autodiff", "unroll_steps": 1}),
        ({"checkpoint": "sqrt"}, {"memory": "checkpoint", "segment": 10, "unroll_steps": 1}),
        ({"checkpoint": "none"}, {"memory": "all", "segment": None}),
        ({"checkpoint": T}, {"memory": "all", "segment": None}),  # one segment keeps what BPTT keeps
        ({"budget": 10**9}, {"memory": "all", "binomial": None}),  # holds every step: plain BPTT
        ({"budget": "small"}, {"memory": "binomial"}),
        ({"budget": "small", "schedule": "nested"}, {"memory": "nested"}),
        ({"probe": "zeros"}, {"probed": True, "memory": "all", "unroll_steps": None}),
        (
            {"regularize": rj.Regularizer(state_dropout=0.1)},
            {"regularize": rj.Regularizer(state_dropout=0.1), "training": False, "dtype": "float64"},
        ),
        ({"regularize": rj.Regularizer(zoneout=0.1), "key": "key"}, {"training": True}),
        ({"method": "deer"}, {"method": "deer", "unroll_steps": None}),
        ({"method": "auto"}, {"method": "sequential"}),  # a nonlinear cell: never DEER
        ({"compute_dtype": jnp.float32}, {"dtype": "float32", "T": T, "batch_shape": (B,)}),
    ],
    ids=lambda v: "-".join(map(str, v)) if isinstance(v, dict) else None,
)
def test_plan_names_what_runs(lstm_problem, options, expected):
    cell, params, xs, carry = lstm_problem
    if options.get("budget") == "small":
        options = {**options, "budget": _budget(cell, params, xs, carry)}
    if options.get("probe") == "zeros":
        options = {**options, "probe": jnp.zeros((B, T, H))}
    if options.get("key") == "key":
        options = {**options, "key": jax.random.key(3)}
    plan = rj.unroll_plan(cell, params, xs, carry, **options)
    got = {name: getattr(plan, name) for name in expected}
    assert got == expected
    if plan.memory == "binomial":
        assert plan.binomial is not None and plan.binomial.advances > 0
    if plan.memory == "nested":
        assert len(plan.nesting) == 2 and plan.binomial is None


def test_plan_of_shape_structs_alone():
    """A plan reads shapes, dtypes and shardings only: shape structs of inputs too large to make will do,
    and its repr stays short (the binomial schedule's tables are left out)."""
    cell = rj.lstm(256)
    params = jax.eval_shape(lambda: cell.init(jax.random.key(0), 256, jnp.float32))
    xs = jax.ShapeDtypeStruct((32, 10_000, 256), jnp.float32)
    lengths = jax.ShapeDtypeStruct((32,), jnp.int32)
    plan = rj.unroll_plan(cell, params, xs, budget=24 * 2**20, lengths=lengths)
    assert (plan.memory, plan.masked, plan.T, plan.dtype) == ("binomial", True, 10_000, "float32")
    assert plan.binomial is not None and plan.binomial.K * plan.binomial.n <= 10_000
    assert len(repr(plan)) < 600 and "fwd_slot" not in repr(plan)


def test_plan_of_a_linear_cell(key):
    cell = rj.mingru(H)
    params, xs, _ = random_problem(cell, key, B, T, I)
    plan = rj.unroll_plan(cell, params, xs, method="associative", chunk_size=8)
    assert (plan.method, plan.chunk_size, plan.unroll_steps) == ("associative", 8, 1)
    # "auto" is recorded as what it picked: on CPU the sequential scan, and the chunk size then drops out
    plan = rj.unroll_plan(cell, params, xs, method="auto", chunk_size=8)
    assert (plan.method, plan.chunk_size) == ("sequential", None)


def test_plan_is_frozen_and_equal_for_equal_inputs(lstm_problem, key):
    cell, params, xs, carry = lstm_problem
    plan = rj.unroll_plan(cell, params, xs, carry, checkpoint=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.segment = 3  # type: ignore[misc]
    # a rebuilt cell and other values of the same shapes give an equal plan: the same compiled program
    again = rj.unroll_plan(rj.lstm(H), jax.tree.map(lambda a: a + 1, params), xs * 2, carry, checkpoint=7)
    assert again == plan and hash(again) == hash(plan)
    assert rj.unroll_plan(cell, params, xs, carry, checkpoint=8) != plan


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"grad": "both"}, ValueError, r"grad must be one of \('manual', 'autodiff'\), got 'both'"),
        ({"checkpoint": 4, "budget": 10**6}, ValueError, "pass checkpoint or budget, not both"),
        ({"schedule": "nested"}, ValueError, "schedule='nested' needs a budget"),
        ({"reverse": 1}, TypeError, "reverse must be a Python bool, got 1"),
        ({"chunk_size": 4}, ValueError, r"chunk_size=4 applies to method='associative'"),
        ({"lengths": jnp.array([1, 2])}, ValueError, r"lengths must have shape \[B\] = \(3,\)"),
    ],
)
def test_plan_validates_as_unroll_does(lstm_problem, options, error, match):
    cell, params, xs, carry = lstm_problem
    with pytest.raises(error, match=match):
        rj.unroll_plan(cell, params, xs, carry, **options)
    with pytest.raises(error, match=match):
        rj.unroll(cell, params, xs, carry, **options)


def test_options_after_carry_are_keyword_only(lstm_problem):
    cell, params, xs, carry = lstm_problem
    with pytest.raises(TypeError, match="positional argument"):
        rj.unroll(cell, params, xs, carry, jnp.array([1, 2, 3]))  # type: ignore[misc]


def test_the_plan_runs_as_planned(lstm_problem):
    """Each memory schedule of a plan gives the plain plan's outputs and gradients."""
    cell, params, xs, carry = lstm_problem
    lengths = jnp.array([100, 37, 0])

    def loss(p, options):
        final, ys = rj.unroll(cell, p, xs, carry, lengths=lengths, **options)
        return jnp.sum(ys**2) + jnp.sum(final.c)

    plain = jax.value_and_grad(loss)(params, {})
    small = _budget(cell, params, xs, carry)
    for options in ({"checkpoint": 9}, {"budget": small}, {"budget": small, "schedule": "nested"}):
        assert rj.unroll_plan(cell, params, xs, carry, lengths=lengths, **options).memory != "all"
        assert rel_err(jax.value_and_grad(loss)(params, options), plain) <= 1e-12


@pytest.mark.parametrize(
    ("options", "fix"),
    [
        ({}, "grad='autodiff'"),
        ({"budget": "small", "grad": "autodiff"}, "schedule='nested', grad='autodiff'"),
        ({"method": "deer"}, "method='sequential', grad='autodiff'"),
    ],
)
def test_forward_mode_keeps_jaxs_error_and_adds_a_note(lstm_problem, options, fix):
    cell, params, xs, carry = lstm_problem
    if options.get("budget") == "small":
        options = {**options, "budget": _budget(cell, params, xs, carry)}
    f = lambda x: rj.unroll(cell, params, x, carry, **options)[1]  # noqa: E731
    with pytest.raises(TypeError) as info:
        jax.jvp(f, (xs,), (xs,))
    assert "custom_vjp" in str(info.value).splitlines()[0]  # JAX's own message, first and unchanged
    notes = [n for n in getattr(info.value, "__notes__", []) if n.startswith("rnnjax:")]
    assert len(notes) == 1 and notes[0].endswith(f"call rj.unroll(..., {fix}) instead")


def test_forward_mode_runs_where_no_custom_vjp_is_planned(lstm_problem):
    cell, params, xs, carry = lstm_problem
    f = lambda x: rj.unroll(cell, params, x, carry, grad="autodiff", checkpoint=9)[1]  # noqa: E731
    _, tangent = jax.jvp(f, (xs,), (xs,))
    g = lambda x: rj.unroll(cell, params, x, carry, grad="autodiff")[1]  # noqa: E731
    assert rel_err(tangent, jax.jvp(g, (xs,), (xs,))[1]) <= 1e-12


def test_plan_names_an_unknown_option(lstm_problem):
    cell, params, xs, carry = lstm_problem
    with pytest.raises(
        TypeError, match=r"unroll_plan got unexpected keyword argument\(s\) \['segments'\]; it"
    ):
        rj.unroll_plan(cell, params, xs, carry, segments=4)
