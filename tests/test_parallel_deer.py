"""DEER and quasi-DEER (`rnnjax.parallel.deer`) against the sequential scan, and their safeguards.

Run to convergence in float64, both equal `rj.unroll` to <= 1e-10: outputs, final carry and the gradients to
the params, ``xs`` and the initial carry, with lengths (0 and T included), reverse and a given carry, for
built-in and user-written cells, called as `rj.deer_unroll` and as ``rj.unroll(method="deer")``. When Newton
does not converge, that is reported and the result is the sequential scan's (or a checkify error); it is
never a wrong trajectory marked converged: the residual that Newton reports and stops on is the true one of
the iterate it returns, recomputed here from the cell's step. The Jacobians of every built-in cell, from its
hand-derived gates derivative, equal autodiff's of its step.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CELLS, random_problem, rel_err, tiered
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import checkify
from test_gradcheck import my_cell

import rnnjax as rj
from rnnjax.parallel.deer import (
    DeerInfo,
    DeerOptions,
    _linearise,
    deer_unroll,
    linear_recurrence,
    newton,
    state_layout,
    step_inputs,
    step_jacobian,
)

B, T, I, H = 3, 7, 2, 3
TOL = 1e-10


def make_cell(name: str) -> rj.Cell:
    return my_cell(H) if name == "user" else CELLS[name](H)


def readout(ys: Any, final: Any) -> jax.Array:
    """A nonlinear scalar of every output and of the final carry."""
    return sum(jnp.sum(jnp.sin(y)) for y in jax.tree.leaves(ys)) + sum(
        jnp.sum(jnp.cos(c)) for c in jax.tree.leaves(final)
    )


def both(cell: rj.Cell, lengths: Any, reverse: bool, **deer: Any) -> tuple[Any, Any]:
    """Jitted ``(params, xs, carry) -> ((final, ys), grads)`` of the sequential scan and of DEER."""

    def seq(p: Any, xs: jax.Array, c: Any) -> Any:
        final, ys = rj.unroll(cell, p, xs, c, lengths=lengths, reverse=reverse)
        return readout(ys, final), (final, ys)

    def par(p: Any, xs: jax.Array, c: Any) -> Any:
        final, ys, info = deer_unroll(cell, p, xs, c, lengths=lengths, reverse=reverse, **deer)
        return readout(ys, final), (final, ys, info)

    grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))  # noqa: E731
    return grad(seq), grad(par)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("quasi", [False, True])
@pytest.mark.parametrize("name", ["gru", "lstm", "elman-tanh", "user", "lstm-projected"])
@pytest.mark.slow
def test_equals_sequential(name: str, quasi: bool, reverse: bool, key: jax.Array) -> None:
    cell = make_cell(name)
    params, xs, carry = random_problem(cell, key, B, T, I)
    lengths = jnp.array([T, 0, 4])
    seq, par = both(cell, lengths, reverse, quasi=quasi, tol=1e-13)
    g_seq, (final_seq, ys_seq) = seq(params, xs, carry)
    g_par, (final_par, ys_par, info) = par(params, xs, carry)
    assert bool(info.converged) and int(info.iterations) <= (6 if not quasi else T)
    assert float(info.residual) <= 1e-13
    assert rel_err(ys_par, ys_seq) <= TOL
    assert rel_err(final_par, final_seq) <= TOL
    assert rel_err(g_par, g_seq) <= TOL  # params, xs, carry


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(
    B_=st.integers(1, 3),
    T_=st.integers(1, 10),
    H_=st.integers(1, 4),
    quasi=st.booleans(),
    reverse=st.booleans(),
    name=st.sampled_from(["gru", "lstm", "user"]),
    data=st.data(),
)
def test_random_shapes(B_: int, T_: int, H_: int, quasi: bool, reverse: bool, name: str, data: Any) -> None:
    """Over random batch sizes, lengths (0 and T among the draws), hidden sizes and directions,
    ``rj.unroll(method="deer"|"quasi_deer")`` equals the sequential scan, gradients included."""
    cell = my_cell(H_) if name == "user" else CELLS[name](H_)
    lengths = jnp.array(data.draw(st.lists(st.integers(0, T_), min_size=B_, max_size=B_)))
    params, xs, carry = random_problem(cell, jax.random.key(data.draw(st.integers(0, 99))), B_, T_, I)

    def loss(p: Any, x: jax.Array, c: Any, method: str) -> Any:
        final, ys = rj.unroll(cell, p, x, c, lengths=lengths, reverse=reverse, method=method)
        return readout(ys, final), (final, ys)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    want = grad(params, xs, carry, "sequential")
    got = grad(params, xs, carry, "quasi_deer" if quasi else "deer")
    assert rel_err(got, want) <= TOL


@pytest.mark.slow
def test_extra_batch_axes_and_default_carry(key: jax.Array) -> None:
    cell = rj.lstm(H)
    params, xs, _ = random_problem(cell, key, 4, T, I)
    xs = xs.reshape(2, 2, T, I)
    final, ys, info = deer_unroll(cell, params, xs, lengths=jnp.array([[T, 3], [0, 5]]))
    final_seq, ys_seq = rj.unroll(cell, params, xs, lengths=jnp.array([[T, 3], [0, 5]]))
    assert ys.shape == (2, 2, T, H) and final.c.shape == (2, 2, H)
    assert rel_err((final, ys), (final_seq, ys_seq)) <= TOL and bool(info.converged)


def test_zero_length_sequence(key: jax.Array) -> None:
    cell = rj.gru(H)
    params, xs, carry = random_problem(cell, key, B, 0, I)
    final, ys, info = deer_unroll(cell, params, xs, carry)
    assert ys.shape == (B, 0, H) and bool(info.converged) and int(info.iterations) == 0
    np.testing.assert_array_equal(final.h, carry.h)


@pytest.mark.slow
def test_finite_differences(key: jax.Array) -> None:
    """The implicit gradient of quasi-DEER against central differences along a few random directions."""
    cell = rj.gru(H)
    params, xs, carry = random_problem(cell, key, B, T, I)

    def loss(p: Any, xs: jax.Array, c: Any) -> jax.Array:
        final, ys, _ = deer_unroll(cell, p, xs, c, lengths=jnp.array([T, 2, 5]), quasi=True, tol=1e-14)
        return readout(ys, final)

    f = jax.jit(loss)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, xs, carry)
    args = (params, xs, carry)
    eps = 1e-6
    for i in range(3):
        keys = jax.random.split(jax.random.fold_in(key, i), len(jax.tree.leaves(args)))
        leaves, tree = jax.tree.flatten(args)
        v = [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=True)]
        up = jax.tree.unflatten(tree, [a + eps * d for a, d in zip(leaves, v, strict=True)])
        down = jax.tree.unflatten(tree, [a - eps * d for a, d in zip(leaves, v, strict=True)])
        fd = (f(*up) - f(*down)) / (2 * eps)
        exact = sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads), v, strict=True))
        assert abs(float(fd - exact)) <= 1e-7 * max(1.0, abs(float(exact)))


def test_padding_unreachable(key: jax.Array) -> None:
    """NaN and inf in the padding change nothing, bit for bit, and reach no value or gradient."""
    cell = rj.gru(H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    lengths = jnp.array([T, 0, 3])
    pad = np.arange(T)[None, :, None] >= np.asarray(lengths)[:, None, None]
    junk = jnp.where(pad, jnp.nan, xs).at[2, 5, 0].set(jnp.inf)

    def loss(p: Any, xs: jax.Array, lengths: jax.Array) -> Any:
        final, ys, info = deer_unroll(cell, p, xs, carry, lengths=lengths, quasi=True)
        return readout(ys, final), (final, ys, info)

    run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))  # lengths traced
    clean, dirty = run(params, jnp.where(pad, 0.5, xs), lengths), run(params, junk, lengths)
    for c, d in zip(jax.tree.leaves(clean), jax.tree.leaves(dirty), strict=True):
        np.testing.assert_array_equal(d, c)
        assert np.all(np.isfinite(d))


def iterations(cell: rj.Cell, quasi: bool, seed: int) -> int:
    params = cell.init(jax.random.key(seed), input_size=8, dtype=jnp.float32)
    xs = jax.random.normal(jax.random.key(seed + 100), (4, 256, 8), jnp.float32)
    _, _, info = jax.jit(lambda p, x: deer_unroll(cell, p, x, quasi=quasi, tol=1e-6))(params, xs)
    assert bool(info.converged)
    return int(info.iterations)


@pytest.mark.slow
def test_iteration_counts() -> None:
    """A default-initialised GRU in float32 (B=4, T=256, H=32, tol 1e-6): DEER converges quadratically
    (3 iterations measured), quasi-DEER linearly (10-11)."""
    cell = rj.gru(32)
    for seed in range(2):
        assert iterations(cell, False, seed) <= 5
        assert iterations(cell, True, seed) <= 14


def chaotic(key: jax.Array, T: int = 48) -> tuple[rj.Cell, Any, jax.Array]:
    """An Elman cell whose recurrent weights are scaled up 6x: far from contracting, so that Newton needs
    close to T iterations."""
    cell = rj.elman(8)
    params = cell.init(key, input_size=2)
    return (
        cell,
        params._replace(w_hh=6.0 * params.w_hh),
        jax.random.normal(jax.random.fold_in(key, 1), (2, T, 2)),
    )


@pytest.mark.parametrize("quasi", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_non_convergence_falls_back(quasi: bool, key: jax.Array) -> None:
    cell, params, xs = chaotic(key)
    seq_grad, par_grad = both(cell, None, False, quasi=quasi, max_iter=8)
    g_seq, (final_seq, ys_seq) = seq_grad(params, xs, None)
    g_par, (final, ys, info) = par_grad(params, xs, None)
    assert not bool(info.converged) and int(info.iterations) == 8 and float(info.residual) > 1e-3
    assert rel_err((final, ys), (final_seq, ys_seq)) <= TOL
    assert rel_err(g_par[:2], g_seq[:2]) <= 1e-9  # the implicit gradient at the sequential trajectory


def test_non_convergence_raises_under_checkify(key: jax.Array) -> None:
    cell, params, xs = chaotic(key)
    f = jax.jit(lambda p, x: deer_unroll(cell, p, x, max_iter=8, on_failure="raise"))
    err, (_, ys, info) = checkify.checkify(f, errors=checkify.user_checks)(params, xs)
    with pytest.raises(
        checkify.JaxRuntimeError, match=r"DEER did not converge: residual .* after 8 iterations"
    ):
        err.throw()
    assert not bool(info.converged) and bool(jnp.all(jnp.isnan(ys)))  # never a silent wrong trajectory
    # converged: no error
    err, _ = checkify.checkify(f, errors=checkify.user_checks)(params, xs[:, :6])
    assert err.get() is None


@pytest.mark.slow
def test_chaotic_converges_within_T_with_or_without_damping(key: jax.Array) -> None:
    """Each iteration fixes at least one more step, so T iterations always suffice; damping keeps that."""
    cell, params, xs = chaotic(key, T=24)
    final_seq, ys_seq = rj.unroll(cell, params, xs)
    for damping in (None, 0.5):
        final, ys, info = deer_unroll(cell, params, xs, max_iter=24, damping=damping)
        assert bool(info.converged) and int(info.iterations) <= 24
        assert rel_err((final, ys), (final_seq, ys_seq)) <= 1e-9


@pytest.mark.parametrize("name", ["gru", pytest.param("elman-tanh", marks=pytest.mark.slow)])
def test_converged_means_small_residual(name: str, key: jax.Array) -> None:
    """``converged`` promises the returned trajectory solves the recurrence to ``tol``, checked here step by
    step at a loose tolerance, where quasi-DEER (linear convergence) stops with a trajectory exact only to
    about ``tol``."""
    cell = CELLS[name](6)
    params, xs, carry = random_problem(cell, key, B, 24, I, move=0.5)
    tol = 1e-4
    _, ys, info = deer_unroll(cell, params, xs, carry, quasi=True, tol=tol)
    assert bool(info.converged) and float(info.residual) <= tol
    prev = jnp.concatenate([carry.h[:, None], ys[:, :-1]], axis=1)  # h is the whole carry and the output
    f, _ = cell.step(params, rj.HCarry(prev.reshape(-1, 6)), xs.reshape(-1, I))
    f = f.h.reshape(ys.shape)
    assert float(jnp.max(jnp.abs(ys - f) / (1 + jnp.abs(f)))) <= tol


def test_non_finite_iterate_is_not_convergence(key: jax.Array) -> None:
    """An iterate that overflows stops the loop as not converged (a NaN-blind maximum would accept it)."""
    cell = rj.Cell(
        init=lambda k, i, dtype=None: {"w": jnp.ones((i, 1))},
        initial_carry=lambda p, batch_shape=(): rj.HCarry(jnp.ones((*batch_shape, 1))),
        step=lambda p, c, x: (rj.HCarry(jnp.exp(4 * c.h) + x @ p["w"]),) * 2,
        name="explosive",
    )
    params = cell.init(key, 1)
    xs = jnp.zeros((1, 5, 1))
    _, ys, info = deer_unroll(cell, params, xs, max_iter=5)
    assert not bool(info.converged) and float(info.residual) == np.inf
    _, ys_seq = rj.unroll(cell, params, xs)
    np.testing.assert_array_equal(ys.h, ys_seq.h)  # inf where the sequential scan overflows too


@pytest.mark.slow
def test_warm_start_and_max_iter_zero(key: jax.Array) -> None:
    cell = rj.gru(H)
    params, xs, carry = random_problem(cell, key, B, T, I)
    final_seq, ys_seq = rj.unroll(cell, params, xs, carry)
    final, ys, info = deer_unroll(cell, params, xs, carry, init_guess=rj.HCarry(ys_seq), max_iter=0)
    assert bool(info.converged) and int(info.iterations) == 0
    assert rel_err((final, ys), (final_seq, ys_seq)) <= TOL
    _, ys, info = deer_unroll(cell, params, xs, carry, max_iter=0)
    assert not bool(info.converged) and rel_err(ys, ys_seq) <= TOL


def test_linear_recurrence_matches_a_loop(key: jax.Array) -> None:
    k1, k2 = jax.random.split(key)
    A, b = jax.random.normal(k1, (9, 2, 3, 3)), jax.random.normal(k2, (9, 2, 3))
    A_np, b_np = np.asarray(A), np.asarray(b)  # the reference loop in NumPy: no compilation per step
    x, want = np.zeros((2, 3)), []
    for t in range(9):
        x = np.einsum("bij,bj->bi", A_np[t], x) + b_np[t]
        want.append(x)
    assert rel_err(linear_recurrence(A, b, diagonal=False), np.stack(want)) <= 1e-13
    d = jnp.diagonal(A, axis1=-2, axis2=-1)
    x, want = np.zeros((2, 3)), []
    for t in range(9):
        x = np.asarray(d[t]) * x + b_np[t]
        want.append(x)
    assert rel_err(linear_recurrence(d, b, diagonal=True), np.stack(want)) <= 1e-13


def test_info_is_a_named_tuple(key: jax.Array) -> None:
    cell = rj.elman(H)
    params, xs, _ = random_problem(cell, key, B, T, I)
    info = deer_unroll(cell, params, xs)[2]
    assert isinstance(info, DeerInfo) and info._fields == ("iterations", "residual", "converged")
    assert info.iterations.dtype == jnp.int32 and info.converged.dtype == jnp.bool_


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"tol": 0.0}, ValueError, r"tol must be a float > 0 or None, got 0.0"),
        ({"max_iter": -1}, ValueError, r"max_iter must be an int >= 0 or None, got -1"),
        ({"max_iter": 2.5}, ValueError, r"max_iter must be an int >= 0 or None, got 2.5"),
        ({"damping": 1.0}, ValueError, r"damping must be a float in \[0, 1\) or None, got 1.0"),
        (
            {"on_failure": "ignore"},
            ValueError,
            r"on_failure must be one of \('fallback', 'raise'\), got 'ignore'",
        ),
        ({"quasi": "yes"}, TypeError, r"quasi must be a Python bool, got 'yes'"),
        ({"reverse": 1}, TypeError, r"reverse must be a Python bool, got 1"),
        ({"lengths": jnp.array([1, 2])}, ValueError, r"lengths must have shape \[B\]"),
        (
            {"init_guess": rj.HCarry(jnp.zeros((B, T + 1, H)))},
            ValueError,
            r"init_guess\.h must have shape \[B, T, \.\.\.\] = \(3, 7, 3\) \(the carry after every step\), "
            r"got \(3, 8, 3\)",
        ),
        ({"init_guess": jnp.zeros((B, T, H))}, TypeError, r"init_guess must have the structure of the carry"),
    ],
)
def test_errors(kwargs: dict, error: type, match: str, key: jax.Array) -> None:
    cell = rj.gru(H)
    params, xs, _ = random_problem(cell, key, B, T, I)
    with pytest.raises(error, match=match):
        deer_unroll(cell, params, xs, **kwargs)


def test_errors_not_a_cell(key: jax.Array) -> None:
    with pytest.raises(TypeError, match="cell must be an rnnjax Cell"):
        deer_unroll("gru", None, jnp.zeros((1, 2, 3)))  # type: ignore[arg-type]


@pytest.mark.slow
def test_benchmark_quick(tmp_path: Any) -> None:
    from benchmarks import deer_time

    with jax.enable_x64(False):
        assert deer_time.main(["--quick", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "deer_time_quick.json").read_text())
    for r in record["results"]:
        assert set(r["methods"]) == {"sequential", "deer", "quasi_deer"}
        for m in ("deer", "quasi_deer"):
            assert r["methods"][m]["iterations"] > 0 and r["methods"][m]["train_ms"] > 0


# ---- rj.unroll(method="deer" | "quasi_deer") ----


@pytest.mark.parametrize(
    ("name", "method", "reverse"),
    [
        ("gru", "deer", False),
        ("gru", "quasi_deer", True),
        ("lstm", "deer", True),
        ("lstm", "quasi_deer", False),
        pytest.param("gru", "deer", True, marks=pytest.mark.slow),
        pytest.param("gru", "quasi_deer", False, marks=pytest.mark.slow),
        pytest.param("lstm", "deer", False, marks=pytest.mark.slow),
        pytest.param("lstm", "quasi_deer", True, marks=pytest.mark.slow),
    ],
)
def test_unroll_method_equals_sequential(name: str, method: str, reverse: bool, key: jax.Array) -> None:
    """``rj.unroll(method=...)`` with its defaults (tol, max_iter) against ``method="sequential"``: outputs,
    final carry and the gradients to params, ``xs`` and the given carry, lengths 0 and T included."""
    cell = make_cell(name)
    params, xs, carry = random_problem(cell, key, B, T, I)
    lengths = jnp.array([T, 0, 4])

    def loss(p: Any, xs: jax.Array, c: Any, method: str) -> Any:
        final, ys = rj.unroll(cell, p, xs, c, lengths=lengths, reverse=reverse, method=method)
        return readout(ys, final), (final, ys)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    g_seq, out_seq = grad(params, xs, carry, "sequential")
    g_par, out_par = grad(params, xs, carry, method)
    assert rel_err(out_par, out_seq) <= TOL  # final carry and ys
    assert rel_err(g_par, g_seq) <= TOL  # params, xs, carry
    assert jnp.all(out_par[1][1] == 0)  # the empty row outputs zeros


def test_gradcheck_oracles(key: jax.Array) -> None:
    """`rj.gradcheck` of a loss through a DEER unroll of a small GRU: its gradient (implicit, ``"manual"``)
    against JAX's autodiff of the sequential scan and against finite differences of the DEER forward."""
    cell = rj.gru(2)
    params, xs, carry = random_problem(cell, key, 2, 5, 2)

    def loss(p: Any, xs: jax.Array, c: Any, grad: str = "manual") -> jax.Array:
        method = "deer" if grad == "manual" else "sequential"
        final, ys = rj.unroll(cell, p, xs, c, lengths=jnp.array([5, 3]), grad=grad, method=method)
        return readout(ys, final)

    report = rj.gradcheck(loss, params, xs, carry, n_directions=1)
    assert report.passed, str(report)


@pytest.mark.parametrize("module", ["layers", "linen"])
def test_layers_and_modules_pass_method(module: str, key: jax.Array) -> None:
    cell = rj.gru(H)
    xs = jax.random.normal(key, (2, T, I))
    lengths = jnp.array([T, 3])
    if module == "layers":
        layer = rj.bidirectional(cell, merge="sum")
        params = layer.init(jax.random.key(1), I)
        _, ys = layer.apply(params, xs, lengths=lengths, method="quasi_deer")
        _, ys_seq = layer.apply(params, xs, lengths=lengths)
    else:
        from rnnjax import linen as rln

        f64 = {"param_dtype": jnp.float64}
        model, model_seq = rln.RNN(cell, method="deer", **f64), rln.RNN(cell, **f64)
        variables = model.init(jax.random.key(1), xs)
        _, ys = model.apply(variables, xs, lengths=lengths)
        _, ys_seq = model_seq.apply(variables, xs, lengths=lengths)
    assert rel_err(ys, ys_seq) <= TOL


def test_auto_never_picks_deer(monkeypatch: pytest.MonkeyPatch) -> None:
    from rnnjax import parallel

    monkeypatch.setitem(parallel.AUTO_CROSSOVER, jax.default_backend(), 1)
    for cell in (rj.gru(H), rj.lstm(H), my_cell(H)):
        assert parallel.resolve_method("auto", cell, 10**6) == "sequential"
    assert parallel.resolve_method("auto", rj.mingru(H), 10**6) == "associative"


SEQUENTIAL_ONLY = r"applies to method='sequential' only, got method="


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        (
            "deer",
            {"regularize": rj.Regularizer(state_dropout=0.1), "key": jax.random.key(0)},
            rf"regularize= {SEQUENTIAL_ONLY}'deer'",
        ),
        ("deer", {"checkpoint": 2}, rf"checkpoint= {SEQUENTIAL_ONLY}'deer'"),
        ("quasi_deer", {"budget": 10**6}, rf"budget= {SEQUENTIAL_ONLY}'quasi_deer'"),
        ("deer", {"probe": jnp.zeros((B, T, H))}, rf"probe= {SEQUENTIAL_ONLY}'deer'"),
        (
            "deer",
            {"chunk_size": 4},
            r"chunk_size=4 applies to method='associative' \(or 'auto'\), got method='deer'",
        ),
        (
            "quasi_deer",
            {"grad": "autodiff"},
            r"grad='autodiff' does not apply to method='quasi_deer', whose gradient is always the implicit "
            r"one.*expected grad='manual'",
        ),
        (
            "deer",
            {"unroll_steps": 2},
            r"unroll_steps=2 applies to the sequential time loop, got method='deer'.*expected unroll_steps=None",
        ),
    ],
)
def test_unroll_refuses_what_deer_cannot_honour(
    method: str, options: dict, match: str, key: jax.Array
) -> None:
    cell = rj.gru(H)
    params, xs, _ = random_problem(cell, key, B, T, I)
    with pytest.raises(ValueError, match=match):
        rj.unroll(cell, params, xs, method=method, **options)


def test_unroll_forward_mode_names_the_alternative(key: jax.Array) -> None:
    cell = rj.gru(H)
    params, xs, _ = random_problem(cell, key, B, T, I)
    with pytest.raises(
        TypeError,
        match=r"method='deer'\) binds DEER's implicit gradient .* no forward mode.* method='sequential', grad='autodiff'",
    ):
        jax.jvp(lambda x: rj.unroll(cell, params, x, method="deer")[1], (xs,), (xs,))


# ---- the Jacobians, and the stopping test ----

# every built-in cell with a hand-derived derivative, read from the registry the suite tests
GATES_CELLS = [name for name, make in CELLS.items() if make(H).backward is not None]


def trajectory_problem(cell: rj.Cell, key: jax.Array, T_: int = 5) -> tuple[Any, ...]:
    """``(params, layout, xs [T, B, I], s0 [B, S], mask [T, B], prev [T, B, S])``: random params, inputs,
    a mask with a full, an empty and a partial row, and random carries entering the steps (away from the
    gates' saturation)."""
    params, xs, carry = random_problem(cell, key, B, T_, I)
    layout = state_layout(carry)
    xs_tm = jnp.swapaxes(xs, 0, 1)
    mask = jnp.arange(T_)[:, None] < jnp.array([T_, 0, 3])[None, :]
    prev = 0.5 * jax.random.normal(jax.random.fold_in(key, 7), (T_, B, layout.size))
    return params, layout, jnp.where(mask[..., None], xs_tm, 0), layout.flatten(carry), mask, prev


@pytest.mark.parametrize("name", tiered(GATES_CELLS))
def test_gates_jacobian_equals_autodiff(name: str, key: jax.Array) -> None:
    """The per-step Jacobians of the Newton iterations (`_linearise`) of every built-in cell, from its
    hand-derived derivative, and their diagonals (quasi-DEER's, formed alone) equal autodiff's of its step
    (`step_jacobian`) to round-off, with the identity at masked steps."""
    cell = CELLS[name](H)
    params, layout, xs, _, mask, prev = trajectory_problem(cell, key)

    @jax.jit
    def jacobians(params: Any, prev: jax.Array, xs: jax.Array, mask: jax.Array) -> tuple[Any, ...]:
        zx = step_inputs(cell, params, xs)
        return (
            _linearise(cell, layout, params, prev, zx, mask),
            _linearise(cell, layout, params, prev, zx, mask, diagonal=True)[1],
            step_jacobian(cell, layout, params, prev, xs, mask),
        )

    (F, J), diag, (F_auto, J_auto) = jacobians(params, prev, xs, mask)
    S = layout.size
    assert J.shape == (5, B, S, S)
    np.testing.assert_array_equal(J[~mask], np.broadcast_to(np.eye(S), J[~mask].shape))
    np.testing.assert_array_equal(F[~mask], prev[~mask])
    assert float(jnp.max(jnp.abs(J_auto[mask]))) > 0.1  # not saturated
    assert rel_err(J[mask], J_auto[mask]) <= 1e-12
    assert rel_err(diag, jnp.diagonal(J_auto, axis1=-2, axis2=-1)) <= 1e-12  # quasi-DEER's
    assert rel_err(F[mask], F_auto[mask]) <= 1e-12


def test_newton_takes_the_hand_derived_jacobians(key: jax.Array) -> None:
    """The Jacobians of a cell with a `GatesBackward` come from its ``gates_bwd``: doubled there, they are
    doubled in the Newton iterations (the gates, and so the step map, unchanged)."""
    cell = rj.gru(H)
    params, layout, xs, _, mask, prev = trajectory_problem(cell, key)
    gates_bwd = cell.gates_bwd
    assert gates_bwd is not None

    def doubled(*args: Any) -> Any:
        dzx, dzh, d_prev, *aux = gates_bwd(*args)
        return 2 * dzx, 2 * dzh, jax.tree.map(lambda a: 2 * a, d_prev), *aux

    wrong = cell.replace(gates_bwd=doubled)
    _, J = _linearise(wrong, layout, params, prev, step_inputs(wrong, params, xs), mask)
    _, J_auto = step_jacobian(cell, layout, params, prev, xs, mask)
    assert rel_err(J[mask], 2 * J_auto[mask]) <= 1e-12


def _dots(jaxpr: Any) -> list[Any]:
    """Every dot_general in ``jaxpr``, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dots(sub)
    return found


def test_input_projection_is_made_once_per_solve(key: jax.Array) -> None:
    """No product with ``w_ih`` inside the Newton loop of a built-in cell: the input projection is hoisted."""
    cell = rj.gru(H)
    params, layout, xs, s0, mask, prev = trajectory_problem(cell, key)
    options = DeerOptions(quasi=False, tol=1e-12, max_iter=5, damping=0.0, on_failure="fallback")
    jaxpr = jax.make_jaxpr(lambda p, x: newton(cell, layout, options, p, x, s0, mask, prev))(params, xs)
    (loop,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"]
    w_ih_shape = params.w_ih.shape
    outside = [e for e in _dots(jaxpr.jaxpr) if any(v.aval.shape == w_ih_shape for v in e.invars)]
    inside = [
        e for e in _dots(loop.params["body_jaxpr"].jaxpr) if any(v.aval.shape == w_ih_shape for v in e.invars)
    ]
    assert len(outside) == 1 and not inside


def true_residual(cell: rj.Cell, layout: Any, params: Any, xs: Any, s0: Any, mask: Any, states: Any) -> float:
    """``max |s_t − f(s_{t-1}, x_t)| / (1 + |f|)`` of a trajectory ``states [T, B, S]``, recomputed step by step
    with the cell's ``step`` (``f`` is the identity at masked steps), in NumPy."""
    states, s = np.asarray(states), np.asarray(s0)
    worst = 0.0
    for t in range(states.shape[0]):
        new, _ = cell.step(params, layout.unflatten(jnp.asarray(s)), xs[t])
        f = np.asarray(layout.flatten(new))
        if mask is not None:
            f = np.where(np.asarray(mask[t])[:, None], f, s)
        worst = max(worst, float(np.max(np.abs(states[t] - f) / (1 + np.abs(f)))))
        s = states[t]
    return worst


@pytest.mark.parametrize(
    ("name", "quasi"),
    [("gru", False), ("lstm", True), ("user", False), pytest.param("user", True, marks=pytest.mark.slow)],
)
def test_stops_on_the_true_residual(name: str, quasi: bool, key: jax.Array) -> None:
    """`DeerInfo.residual` is the true residual of the trajectory Newton returns, recomputed here from the
    cell's step, for a converged run and for runs stopped after 1 and 2 iterations; and ``converged`` is
    ``residual <= tol``. A stopping test on the size of the update reports something else."""
    cell = make_cell(name)
    params, layout, xs, s0, mask, _ = trajectory_problem(cell, key, T_=12)
    guess = jnp.broadcast_to(s0[None], (12, *s0.shape))
    for max_iter, tol in ((1, 1e-13), (2, 1e-13), (100, 1e-4)):
        options = DeerOptions(quasi=quasi, tol=tol, max_iter=max_iter, damping=0.0, on_failure="fallback")
        solve = jax.jit(lambda p, x, o=options: newton(cell, layout, o, p, x, s0, mask, guess))
        states, info = solve(params, xs)
        want = true_residual(cell, layout, params, xs, s0, mask, states)
        got = float(info.residual)
        assert abs(got - want) <= 1e-12 * want + 1e-15, (max_iter, got, want)
        assert bool(info.converged) == (want <= tol) == (max_iter == 100)
        assert int(info.iterations) == max_iter or max_iter == 100
    # the public function reports the same (its outputs are f(s_{t-1}), not the iterate s_t itself)
    xs_b, carry = jnp.swapaxes(xs, 0, 1), layout.unflatten(s0)
    public = deer_unroll(cell, params, xs_b, carry, lengths=jnp.array([12, 0, 3]), quasi=quasi, tol=1e-4)[2]
    assert int(public.iterations) == int(info.iterations) and bool(public.converged)
    assert abs(float(public.residual) - float(info.residual)) <= 1e-12 * float(info.residual)


def test_deer_info_reads_as_numbers(key: jax.Array) -> None:
    """Concrete scalars print as plain numbers; batched or traced fields as JAX prints them."""
    cell = rj.gru(H)
    params, xs, _ = random_problem(cell, key, B, T, I)
    info = rj.deer_unroll(cell, params, xs)[2]
    assert re.fullmatch(r"DeerInfo\(iterations=\d+, residual=[0-9.e+-]+, converged=True\)", repr(info))
    batched = jax.vmap(lambda x: rj.deer_unroll(cell, params, x)[2])(jnp.stack([xs, xs]))
    assert repr(batched).startswith("DeerInfo(iterations=Array([")
