"""rj.gradcheck: its report, both of its forms, user-written cells, and that it catches a wrong backward."""

from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest
from helpers import CELLS, jit_grad, random_problem, rel_err

import rnnjax as rj


class MyParams(NamedTuple):
    w: jax.Array  # [I, H]
    u: jax.Array  # [H, H]


def my_cell(H: int = 3) -> rj.Cell:
    """A user-written cell with only a step: h' = tanh(x w + sin(h) u), and two outputs."""

    def init(key, input_size, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        return MyParams(
            jax.random.normal(k1, (input_size, H), dtype), 0.5 * jax.random.normal(k2, (H, H), dtype)
        )

    def initial_carry(params, batch_shape=()):
        return rj.HCarry(jnp.zeros((*batch_shape, H), params.w.dtype))

    def step(params, carry, x):
        h = jnp.tanh(x @ params.w + jnp.sin(carry.h) @ params.u)
        return rj.HCarry(h), {"h": h, "first": h[..., :1] ** 2}

    return rj.Cell(init=init, initial_carry=initial_carry, step=step, name="mine")


def test_report_table(key):
    cell = rj.lstm(3)
    params, xs, carry = random_problem(cell, key, 2, 4, 2)
    report = rj.gradcheck(cell, params, xs, carry=carry, lengths=jnp.array([4, 1]), reverse=True)
    text = str(report)
    assert report.passed
    assert text.splitlines()[0].startswith(
        "gradcheck lstm: the manual gradient in float64 against autodiff, rtrl, complex_step, finite_differences"
    )
    assert "vs RTRL" in text and "vs complex step" in text
    for leaf in ("params.w_ih", "params.w_hh", "params.b", "xs", "carry.h", "carry.c"):
        assert leaf in text
    assert text.endswith("PASSED")
    assert [r.shape for r in report.rows] == [(2, 12), (3, 12), (12,), (2, 4, 2), (2, 3), (2, 3)]


def test_casts_to_float64_and_leaves_x64_as_it_was(key):
    cell = rj.gru(3)
    params, xs, _ = random_problem(cell, key, 2, 4, 2, jnp.float32)
    report = rj.gradcheck(cell, params, xs)
    assert report.passed and report.max_autodiff_error <= 1e-10


@pytest.mark.parametrize("lengths", [None, jnp.array([5, 0, 2])])
@pytest.mark.parametrize("reverse", [False, True])
def test_user_written_cell(lengths, reverse, key):
    """A step-only cell: "manual" is the per-step-VJP reverse recursion, equal to autodiff."""
    cell = my_cell()
    params, xs, carry = random_problem(cell, key, 3, 5, 2)
    report = rj.gradcheck(cell, params, xs, carry=carry, lengths=lengths, reverse=reverse)
    assert report.passed, str(report)

    def loss(p, x, c, grad):
        final, ys = rj.unroll(cell, p, x, c, lengths=lengths, reverse=reverse, grad=grad)
        return jnp.sum(jnp.sin(ys["h"])) + jnp.sum(ys["first"]) + jnp.sum(final.h**3)

    gm = jit_grad(loss, (0, 1, 2))(params, xs, carry, "manual")
    ga = jit_grad(loss, (0, 1, 2))(params, xs, carry, "autodiff")
    assert rel_err(gm, ga) <= 1e-10


def test_loss_function_form(key):
    cell = rj.elman(4)
    params, xs, _ = random_problem(cell, key, 3, 6, 2)
    lengths = jnp.array([6, 2, 0])

    def loss(params, xs, lengths, grad="manual"):
        _, ys = rj.unroll(cell, params, xs, lengths=lengths, grad=grad)
        return jnp.sum(ys**2) / jnp.maximum(jnp.sum(lengths), 1).astype(ys.dtype)

    report = rj.gradcheck(loss, params, xs, lengths)
    assert report.passed
    assert [r.leaf for r in report.rows] == ["params.w_ih", "params.w_hh", "params.b", "xs"]  # lengths: int


def _planted_bug_cell(H: int) -> rj.Cell:
    """The GRU with a sign error in one gate of its hand-written backward."""
    good = rj.gru(H)

    def gates_bwd(params, res, prev, new, d_new):
        dzx, dzh, d_prev, *aux = good.gates_bwd(params, res, prev, new, d_new)
        flip = jnp.concatenate([jnp.ones(H), -jnp.ones(H), jnp.ones(H)]).astype(dzx.dtype)  # the z gate
        return dzx * flip[None], dzh * flip[None], d_prev, *aux

    return good.replace(gates_bwd=gates_bwd, name="gru-with-bug")


def test_catches_a_planted_bug(key):
    cell = _planted_bug_cell(3)
    params, xs, _ = random_problem(cell, key, 2, 5, 2)
    report = rj.gradcheck(cell, params, xs)
    assert not report.passed
    assert str(report).endswith("FAILED")
    bad = {r.leaf for r in report.rows if not r.passed}
    assert "params.w_ih" in bad and "xs" in bad
    assert all(r.manual_vs_autodiff > 1e-3 for r in report.rows if r.leaf in bad)


def test_catches_a_wrong_forward_via_finite_differences(key):
    """If manual and autodiff agree but the function is not what they differentiate, FD catches it."""

    def loss(x, grad="manual"):
        # a function whose custom derivative lies: d/dx of x**3 claimed to be 2x
        @jax.custom_vjp
        def cube(x):
            return x**3

        cube.defvjp(lambda x: (x**3, x), lambda x, g: (2 * x * g,))
        return jnp.sum(cube(x))

    report = rj.gradcheck(loss, jnp.linspace(0.5, 1.5, 4))
    assert not report.passed
    assert report.rows[0].manual_vs_autodiff == 0.0 and report.rows[0].manual_vs_fd > 1e-2
    # a jax.custom_vjp has no forward mode: RTRL says it did not run, and why; no complex step for functions
    assert report.rows[0].manual_vs_rtrl is None and report.rows[0].manual_vs_complex is None
    assert "complex_step" not in report.oracles
    assert "RTRL not run: the function has no forward mode" in str(report)


@pytest.mark.parametrize("name", ["elman-tanh", "gru", "lstm"])
def test_four_oracles_acceptance(name):
    """Issue 6's acceptance, float64, H=8, T=50: autodiff and RTRL <= 1e-12, complex step <= 1e-13, finite
    differences <= 1e-8, relative; with lengths so that padding is covered too."""
    cell = CELLS[name](8)
    params, xs, carry = random_problem(cell, jax.random.key(3), 3, 50, 4)
    report = rj.gradcheck(cell, params, xs, carry=carry, lengths=jnp.array([50, 29, 1]))
    assert report.oracles == rj.GRADCHECK_ORACLES
    assert report.passed, report
    assert report.max_autodiff_error <= 1e-12
    assert report.max_rtrl_error <= 1e-12
    assert report.max_complex_error <= 1e-13
    assert report.max_fd_error <= 1e-8


@pytest.mark.parametrize("oracle", ["autodiff", "rtrl", "complex_step", "finite_differences"])
def test_every_oracle_alone_catches_the_planted_bug(oracle, key):
    cell = _planted_bug_cell(3)
    params, xs, _ = random_problem(cell, key, 2, 5, 2)
    report = rj.gradcheck(cell, params, xs, oracles=(oracle,))
    assert report.oracles == (oracle,)
    assert not report.passed
    bad = {r.leaf for r in report.rows if not r.passed}
    assert {"params.w_ih", "xs"} <= bad
    row = report.rows[0]
    ran = {
        "autodiff": row.manual_vs_autodiff,
        "rtrl": row.manual_vs_rtrl,
        "complex_step": row.manual_vs_complex,
        "finite_differences": row.manual_vs_fd,
    }
    assert [k for k, v in ran.items() if v is not None] == [oracle]


def test_argument_errors(key):
    cell = rj.lstm(2)
    params, xs, _ = random_problem(cell, key, 2, 3, 2)
    with pytest.raises(
        TypeError, match=r"gradcheck\(cell, params, xs\) takes 2 arguments after the cell, got 1"
    ):
        rj.gradcheck(cell, params)
    with pytest.raises(TypeError, match=r"carry, lengths and reverse apply to gradcheck\(cell, params, xs\)"):
        rj.gradcheck(lambda x, grad: jnp.sum(x), xs, reverse=True)
    with pytest.raises(ValueError, match=r"the loss function must return a scalar, got shape \(2, 3, 2\)"):
        rj.gradcheck(lambda x, grad: x, xs)
    with pytest.raises(ValueError, match=r"n_directions must be an int >= 1, got 0"):
        rj.gradcheck(cell, params, xs, n_directions=0)
    with pytest.raises(ValueError, match=r"oracles must be a non-empty tuple of \('autodiff', 'rtrl'"):
        rj.gradcheck(cell, params, xs, oracles=("jax",))
    with pytest.raises(ValueError, match="complex_step must be > 0, got 0"):
        rj.gradcheck(cell, params, xs, complex_step=0)
    with pytest.raises(TypeError, match=r"target must be a Cell or a loss function, got int"):
        rj.gradcheck(3, params, xs)


def _lstm_with_bug(H, where):
    """An LSTM whose hand-written backward flips the sign of the f gate, or of the cell-state path."""
    good = rj.lstm(H)

    def gates_bwd(params, res, prev, new, d_new):
        dzx, dzh, d_prev = good.gates_bwd(params, res, prev, new, d_new)
        if where == "f":
            flip = jnp.concatenate([jnp.ones(H), -jnp.ones(H), jnp.ones(2 * H)]).astype(dzx.dtype)
            return dzx * flip[None], None if dzh is None else dzh * flip[None], d_prev
        return dzx, dzh, d_prev._replace(c=-d_prev.c)

    return good.replace(gates_bwd=gates_bwd, name=f"lstm-bug-{where}")


@pytest.mark.parametrize("reverse", [False, True])
def test_localises_the_gate_and_the_first_step(reverse):
    """A sign error in one gate shows first at the step the backward visits first, in that gate only; an
    error in the cell-state path shows one step later, in the gates that the cell-state gradient feeds."""
    H, T = 8, 50
    first, second = (0, 1) if reverse else (T - 1, T - 2)
    for where, step, gates in (("f", first, ("f",)), ("c", second, ("i", "f", "g"))):
        cell = _lstm_with_bug(H, where)
        params, xs, _ = random_problem(cell, jax.random.key(0), 3, T, 4)
        report = rj.gradcheck(cell, params, xs, reverse=reverse, oracles=("autodiff",))
        assert not report.passed
        loc = report.localisation
        assert (loc.first_step, loc.gates) == (step, gates), (where, loc)
        assert "params.w_ih" in loc.leaves and "xs" in loc.leaves
        assert f"first at step t={step}, gate {', '.join(gates)}" in str(report)
    gru = _planted_bug_cell(3)  # the GRU with the z gate's sign flipped
    params, xs, _ = random_problem(gru, jax.random.key(1), 2, 6, 2)
    loc = rj.gradcheck(gru, params, xs, lengths=jnp.array([6, 4])).localisation
    assert (loc.first_step, loc.gates) == (5, ("z",))
    assert rj.gradcheck(rj.gru(3), params, xs).localisation is None  # nothing to localise when it passes


def test_rtrl_is_skipped_over_its_memory_cap():
    """RTRL's sensitivities grow as inputs x forward memory: over ``rtrl_max_bytes`` (read from its compiled
    program before it runs) it is skipped with a line saying so, and the other oracles still decide."""
    cell = rj.lstm(4)
    params = cell.init(jax.random.key(0), 3)
    xs = jax.random.normal(jax.random.key(1), (2, 5, 3))
    capped = rj.gradcheck(cell, params, xs, rtrl_max_bytes=1024)
    assert capped.passed and capped.max_rtrl_error is None
    assert any(
        re.match(r"RTRL not run: its sensitivities of 174 inputs need [\d.]+ MiB, over", n)
        for n in capped.notes
    )
    assert "pass rtrl_max_bytes=None" in str(capped)
    uncapped = rj.gradcheck(cell, params, xs, rtrl_max_bytes=None)
    assert uncapped.max_rtrl_error is not None and uncapped.max_rtrl_error <= 1e-12
    assert rj.gradcheck(cell, params, xs).max_rtrl_error is not None  # small problems fit the default cap
    with pytest.raises(ValueError, match=r"rtrl_max_bytes must be an int > 0 or None, got 0"):
        rj.gradcheck(cell, params, xs, rtrl_max_bytes=0)
