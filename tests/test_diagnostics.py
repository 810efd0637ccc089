"""rj.diagnostics and rj.unroll(probe=...): ∂L/∂h_t from the same backward pass, Jacobian spectra, Lyapunov
exponents; proved against autodiff, an independent additive-probe oracle, finite differences and closed forms."""

from __future__ import annotations

import re
import sys

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CELLS, compilations, jit_grad, random_problem, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import rnnjax as rj


def _probe_loss(cell, key, lengths, reverse):
    """A nonlinear loss of the outputs and final carry, with the probe threaded through rj.unroll."""

    def loss(params, xs, carry, probe, grad):
        final, ys = rj.unroll(
            cell, params, xs, carry, lengths=lengths, reverse=reverse, grad=grad, probe=probe
        )
        w = jax.random.normal(key, ys.shape, ys.dtype)
        return jnp.sum(jnp.sin(ys) * w) + sum(jnp.sum(jnp.cos(c)) for c in jax.tree.leaves(final))

    return loss


def _additive_probe_loss(cell, key, lengths, reverse):
    """The same loss with the probe really added to h_t (a user cell, plain autodiff): an independent oracle."""
    I_of = {}

    def step(params, carry, x_and_p):
        I = I_of["I"]
        new, y = cell.step(params, carry, x_and_p[..., :I])
        p = x_and_p[..., I:]
        return new._replace(h=new.h + p), y + p

    additive = rj.Cell(init=cell.init, initial_carry=cell.initial_carry, step=step)

    def loss(params, xs, carry, probe):
        I_of["I"] = xs.shape[-1]
        final, ys = rj.unroll(
            additive, params, jnp.concatenate([xs, probe], -1), carry, lengths=lengths, reverse=reverse
        )
        w = jax.random.normal(key, ys.shape, ys.dtype)
        return jnp.sum(jnp.sin(ys) * w) + sum(jnp.sum(jnp.cos(c)) for c in jax.tree.leaves(final))

    return loss


@st.composite
def problems(draw):
    name = draw(st.sampled_from(sorted(CELLS)))
    B, T, I, H = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 8)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 4)),
    )
    lengths = draw(st.none() | st.lists(st.integers(0, T), min_size=B, max_size=B))
    return name, B, T, I, H, lengths, draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=3)  # four gradients compiled per example
@given(problems())
def test_probe_gradient_is_dl_dh_in_every_mode(problem):
    name, B, T, I, H, lengths, reverse, seed = problem
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, jax.random.key(seed), B, T, I)
    L = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    probe = jnp.zeros((B, T, cell.output_size), xs.dtype)
    loss = _probe_loss(cell, jax.random.key(seed + 1), L, reverse)
    manual = jit_grad(loss, (0, 1, 2, 3))(params, xs, carry, probe, "manual")
    autodiff = jit_grad(loss, (0, 1, 2, 3))(params, xs, carry, probe, "autodiff")
    assert rel_err(manual, autodiff) <= 1e-10
    # the probe changes nothing else: the other gradients are those of the loss without it
    plain = jit_grad(loss, (0, 1, 2))(params, xs, carry, None, "manual")
    assert rel_err(manual[:3], plain) <= 1e-12
    # independent oracle: the gradient of a loss in which the probe is really added to h_t
    additive = _additive_probe_loss(cell, jax.random.key(seed + 1), L, reverse)
    assert rel_err(manual[3], jit_grad(additive, 3)(params, xs, carry, probe)) <= 1e-10
    if L is not None:  # padded steps get no gradient
        assert np.all(np.asarray(manual[3])[np.arange(T)[None, :] >= np.asarray(L)[:, None]] == 0)


def test_probe_gradient_matches_finite_differences(key):
    cell = rj.lstm(3)
    params, xs, carry = random_problem(cell, key, 2, 5, 2)
    L = jnp.array([5, 3])
    loss = _probe_loss(cell, jax.random.key(7), L, False)
    additive = _additive_probe_loss(cell, jax.random.key(7), L, False)
    probe = jnp.zeros((2, 5, 3))
    d_hs = np.asarray(jax.grad(loss, 3)(params, xs, carry, probe, "manual"))
    eps = 1e-6
    for idx in [(0, 0, 0), (0, 4, 2), (1, 2, 1), (1, 1, 0)]:
        e = jnp.zeros_like(probe).at[idx].set(eps)
        fd = (additive(params, xs, carry, e) - additive(params, xs, carry, -e)) / (2 * eps)
        assert abs(fd - d_hs[idx]) <= 1e-8 * max(1.0, abs(d_hs[idx])), idx


def _count_loops(fn, *args):
    text = str(jax.make_jaxpr(fn)(*args))
    return len(re.findall(r"\bscan\[", text)) + len(re.findall(r"\bwhile\[", text))


@pytest.mark.parametrize("name", ["lstm", "gru", "elman-tanh"])
def test_probe_adds_no_backward_pass(name, key):
    """∂L/∂h_t comes out of the backward loop that computes the parameter gradients: no extra loop."""
    cell = CELLS[name](4)
    params, xs, carry = random_problem(cell, key, 2, 6, 3)
    probe = jnp.zeros((2, 6, 4))
    loss = _probe_loss(cell, key, None, False)
    without = _count_loops(jax.grad(lambda p: loss(p, xs, carry, None, "manual")), params)
    with_probe = _count_loops(jax.grad(lambda p, pr: loss(p, xs, carry, pr, "manual"), (0, 1)), params, probe)
    assert with_probe == without == 2  # one forward scan, one backward scan


def _scaled_orthogonal(H, rho, I=3, seed=0):
    cell = rj.elman(H, "identity")
    params = cell.init(jax.random.key(seed), I, jnp.float64)
    Q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((H, H)))
    return cell, params._replace(w_hh=jnp.asarray(rho * Q))


@pytest.mark.parametrize("rho", [0.7, 1.0, 1.3])
def test_closed_form_scaled_orthogonal(rho):
    """s_t = ρ Q s_{t−1} + W x_t: ‖∂s_T/∂s_{T−k}‖ = ρ^k in every singular value, λ = log ρ,
    ‖∂L/∂h_t‖ = ρ^{T−1−t} ‖v‖ for L = v·h_{T−1}."""
    H, T = 5, 15
    cell, params = _scaled_orthogonal(H, rho)
    xs = jax.random.normal(jax.random.key(1), (3, T, 3), jnp.float64)
    spec = rj.diagnostics.jacobian_spectrum(cell, params, xs)
    expected = rho ** np.arange(1, T + 1, dtype=np.float64)
    assert np.array_equal(spec.distance, np.arange(1, T + 1))
    assert spec.singular_values.shape == (3, T, H)
    np.testing.assert_allclose(
        spec.singular_values, np.broadcast_to(expected[None, :, None], (3, T, H)), rtol=1e-12
    )
    np.testing.assert_allclose(spec.spectral, np.broadcast_to(expected, (3, T)), rtol=1e-12)
    np.testing.assert_allclose(spec.frobenius, np.broadcast_to(expected * np.sqrt(H), (3, T)), rtol=1e-12)
    lam = rj.diagnostics.lyapunov_exponent(cell, params, xs, key=jax.random.key(3))
    np.testing.assert_allclose(lam, np.log(rho), atol=1e-13)
    v = jax.random.normal(jax.random.key(2), (H,), jnp.float64)
    for grad in rj.GRAD_MODES:

        def loss(p, probe, grad=grad):
            return jnp.sum(rj.unroll(cell, p, xs, probe=probe, grad=grad)[1][:, -1] @ v)

        d_hs = jax.grad(loss, 1)(params, jnp.zeros((3, T, H)))
        norms = rj.diagnostics.hidden_grad_norms(d_hs)
        np.testing.assert_allclose(norms, rho ** (T - 1 - np.arange(T)) * np.linalg.norm(v), rtol=1e-12)


def test_tanh_elman_vanishes_lstm_does_not(key):
    """The seeds' story, measured on a constructed case: the same read-out of h at the last step; tanh Elman's
    ‖∂L/∂h_t‖ decays geometrically with distance, an LSTM with its forget gate open (b_f = 5) keeps it."""
    B, T, I, H = 4, 60, 3, 8
    xs = jax.random.normal(key, (B, T, I), jnp.float64)
    v = jax.random.normal(jax.random.key(5), (H,), jnp.float64)
    elman = rj.elman(H, "tanh")
    p_elman = elman.init(jax.random.key(1), I, jnp.float64)
    lstm = rj.lstm(H, forget_bias=5.0)
    p_lstm = lstm.init(jax.random.key(1), I, jnp.float64)
    norms = {}
    for name, cell, params in (("elman", elman, p_elman), ("lstm", lstm, p_lstm)):

        def loss(probe, cell=cell, params=params):
            return jnp.sum(rj.unroll(cell, params, xs, probe=probe)[1][:, -1] @ v)

        norms[name] = np.asarray(rj.diagnostics.hidden_grad_norms(jax.grad(loss)(jnp.zeros((B, T, H)))))
    # over the 50 steps from distance 10 to distance 59 (the LSTM's direct h -> h path fades in the first
    # few steps; from then on the cell state carries the gradient)
    decay = {name: n[0] / n[T - 11] for name, n in norms.items()}
    assert decay["elman"] < 1e-6
    assert decay["lstm"] > 0.1
    # Elman's decay is geometric: log-norms fall along a line (a fit explains nearly all their variance)
    logs = np.log(norms["elman"][:-1])
    fit = np.polyval(np.polyfit(np.arange(T - 1), logs, 1), np.arange(T - 1))
    assert 1 - np.var(logs - fit) / np.var(logs) > 0.95
    # the same story in the state dynamics: Elman contracts, the open-forget-gate LSTM barely
    lam_elman = rj.diagnostics.lyapunov_exponent(elman, p_elman, xs, discard=5)
    lam_lstm = rj.diagnostics.lyapunov_exponent(lstm, p_lstm, xs, discard=5)
    assert np.all(lam_elman < -0.2) and np.all(lam_lstm > -0.05)
    spec = rj.diagnostics.jacobian_spectrum(lstm, p_lstm, xs)
    assert np.all(spec.spectral[:, -1] > 0.5)  # the cell state's path survives 60 steps


def test_hidden_grad_norms_with_lengths():
    d_hs = jnp.ones((3, 4, 2)).at[1].set(3.0)
    norms = rj.diagnostics.hidden_grad_norms(d_hs, jnp.array([4, 2, 0]))
    np.testing.assert_allclose(norms[:2], (np.sqrt(2) + 3 * np.sqrt(2)) / 2)
    np.testing.assert_allclose(norms[2:], np.sqrt(2))
    assert np.all(np.isnan(rj.diagnostics.hidden_grad_norms(d_hs, jnp.array([1, 0, 0]))[1:]))


def test_diagnostics_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    ax = rj.diagnostics.plot({"a": jnp.array([1.0, 0.1, 0.0]), "b": np.ones(3)})
    assert ax.get_yscale() == "log" and len(ax.lines) == 2
    ax.figure.savefig(tmp_path / "p.png")


def test_probe_and_diagnostics_errors(key):
    cell = rj.gru(4)
    params, xs, _ = random_problem(cell, key, 2, 5, 3)
    with pytest.raises(ValueError, match=r"probe must have shape \[B, T, H\] = \(2, 5, 4\), got \(2, 5, 3\)"):
        rj.unroll(cell, params, xs, probe=jnp.zeros((2, 5, 3)))
    with pytest.raises(TypeError, match=r"probe must have dtype float64 .* got float32"):
        rj.unroll(cell, params, xs, probe=jnp.zeros((2, 5, 4), jnp.float32))
    with pytest.raises(ValueError, match="probe cannot be combined with checkpoint"):
        rj.unroll(cell, params, xs, probe=jnp.zeros((2, 5, 4)), checkpoint=2)
    user = rj.Cell(init=cell.init, initial_carry=cell.initial_carry, step=cell.step, name="mine")
    with pytest.raises(ValueError, match=r"probe needs a built-in cell .* 'mine'"):
        rj.unroll(user, params, xs, probe=jnp.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match=r"d_hs must have shape \[B, T, H\], got shape \(5, 4\)"):
        rj.diagnostics.hidden_grad_norms(jnp.zeros((5, 4)))
    with pytest.raises(ValueError, match="lengths must lie in"):
        rj.diagnostics.hidden_grad_norms(jnp.zeros((2, 5, 4)), jnp.array([6, 1]))
    with pytest.raises(ValueError, match=r"discard must be an int in \[0, T\) = \[0, 5\), got 5"):
        rj.diagnostics.lyapunov_exponent(cell, params, xs, discard=5)
    with pytest.raises(ValueError, match=r"xs must have shape \[B, T, I\], got shape \(1, 2, 5, 3\)"):
        rj.diagnostics.jacobian_spectrum(cell, params, xs[None])
    with pytest.raises(ValueError, match="at least one time step"):
        rj.diagnostics.jacobian_spectrum(cell, params, xs[:, :0])
    with pytest.raises(TypeError, match="xs must be a floating-point array"):
        rj.diagnostics.lyapunov_exponent(cell, params, xs.astype(jnp.int32))


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_jacobian_spectrum_equals_jacfwd_of_the_unroll(name, key):
    """Each ∂s_T/∂s_{T−k} against jax.jacfwd of rj.unroll from step T−k on (grad='autodiff')."""
    cell = CELLS[name](3)
    params, xs, carry = random_problem(cell, key, 2, 7, 2)
    spec = rj.diagnostics.jacobian_spectrum(cell, params, xs, carry)
    T = xs.shape[1]
    for k in (1, 4, T):
        # the carry entering step T-k, from the first T-k steps
        start = rj.unroll(cell, params, xs[:, : T - k], carry)[0] if k < T else carry
        flat0, unravel = jax.flatten_util.ravel_pytree(jax.tree.map(lambda a: a[0], start))

        def final_state(s, k=k, unravel=unravel):
            c = jax.tree.map(lambda a: a[None], unravel(s))
            final, _ = rj.unroll(cell, params, xs[:1, T - k :], c, grad="autodiff")
            return jax.flatten_util.ravel_pytree(jax.tree.map(lambda a: a[0], final))[0]

        sv = np.linalg.svd(np.asarray(jax.jacfwd(final_state)(flat0)), compute_uv=False)
        np.testing.assert_allclose(spec.singular_values[0, k - 1], sv, rtol=1e-10, atol=1e-14)


def test_indrnn_closed_form():
    """IndRNN, identity activation: ∂h_T/∂h_{T−k} = diag(u^k), so its singular values are |u_j|^k and the
    Lyapunov exponent is log max |u_j|."""
    H, T = 4, 12
    cell = rj.indrnn(H, "identity")
    params = cell.init(jax.random.key(0), 2, jnp.float64)._replace(u=jnp.array([0.5, -0.9, 1.1, 0.2]))
    xs = jax.random.normal(jax.random.key(1), (2, T, 2), jnp.float64)
    spec = rj.diagnostics.jacobian_spectrum(cell, params, xs)
    k = np.arange(1, T + 1)[:, None]
    expected = -np.sort(-(np.abs(np.array([0.5, 0.9, 1.1, 0.2]))[None] ** k), axis=-1)  # largest first
    np.testing.assert_allclose(spec.singular_values[0], expected, rtol=1e-12)
    lam = rj.diagnostics.lyapunov_exponent(cell, params, xs, discard=T // 2)
    assert abs(float(lam[0]) - np.log(1.1)) < 1e-2  # the tangent vector aligns with the largest |u_j|


def test_eager_diagnostics_compile_one_program_each(caplog):
    """Called eagerly, each diagnostic compiles one program (and the zero initial carry): dispatched
    operation by operation, jacobian_spectrum took 71 compilations for this LSTM, hidden_grad_norms 16."""
    cell = rj.lstm(6)  # shapes that no other test uses, so that nothing is cached from them
    params = cell.init(jax.random.key(0), 5, jnp.float64)
    xs = jax.random.normal(jax.random.key(1), (2, 11, 5), jnp.float64)
    d_hs = jax.random.normal(jax.random.key(2), (2, 11, 6), jnp.float64)
    assert len(compilations(caplog, rj.diagnostics.jacobian_spectrum, cell, params, xs)) <= 2
    assert len(compilations(caplog, rj.diagnostics.lyapunov_exponent, cell, params, xs)) <= 2
    assert len(compilations(caplog, rj.diagnostics.hidden_grad_norms, d_hs, jnp.array([11, 4]))) <= 1


def test_diagnostics_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # as if it were not installed
    with pytest.raises(
        ImportError, match=r'rj.diagnostics.plot needs matplotlib.*pip install "rnnjax\[plot\]"'
    ):
        rj.diagnostics.plot({"a": jnp.ones(3)})
