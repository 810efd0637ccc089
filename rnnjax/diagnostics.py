r"""How gradients flow through time: per-step gradient norms, Jacobian spectra and Lyapunov exponents.

Three measurements of the vanishing and exploding gradient problem (Bengio et al. 1994; Pascanu et al., "On
the difficulty of training recurrent neural networks", ICML 2013):

- ``‖∂L/∂h_t‖`` for every t, from the same backward pass that computes the parameter gradients: pass a zero
  ``probe [B, T, H]`` to `rnnjax.unroll` and differentiate with respect to it too; `hidden_grad_norms` turns
  its gradient into one norm per step::

      def loss(params, xs, probe):
          _, hs = rj.unroll(cell, params, xs, probe=probe)
          return readout_loss(hs)

      probe = jnp.zeros((B, T, H), xs.dtype)
      grads, d_hs = jax.grad(loss, argnums=(0, 2))(params, xs, probe)   # one backward pass
      norms = rj.diagnostics.hidden_grad_norms(d_hs)                    # [T]

- `jacobian_spectrum`: the norms and singular values of ``∂s_T/∂s_{T−k}`` for every distance k, where ``s`` is
  the cell's whole state (``h``; for the LSTM ``(h, c)``). Backpropagated gradients are multiplied by the
  transposes of these products, so their largest singular value bounds how a gradient grows or shrinks over
  k steps.
- `lyapunov_exponent`: the largest Lyapunov exponent of the state dynamics driven by the given inputs,
  ``λ = lim (1/T) log ‖J_T ⋯ J_1 v‖`` with ``J_t = ∂s_t/∂s_{t−1}`` (estimated by pushing a tangent vector
  through the steps with `jax.jvp` and renormalising each step). ``λ < 0``: perturbations, and gradients,
  shrink geometrically, by about ``e^{λ k}`` over k steps; ``λ > 0``: they grow.

For a linear cell ``s_t = ρ Q s_{t−1} + W x_t`` with ``Q`` orthogonal every one of these is known in closed
form: ``‖∂s_T/∂s_{T−k}‖₂ = ρ^k`` (all singular values equal), ``λ = log ρ``, and for ``L = vᵀ h_{T−1}``,
``‖∂L/∂h_t‖ = ρ^{T−1−t} ‖v‖``. The tests check exactly these.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rnnjax.cells.base import Cell
from rnnjax.driver import _check_carry, _check_cell, _check_lengths, _check_xs
from rnnjax.losses import valid_mask
from rnnjax.sharding import batch_like

Array = jax.Array
PyTree = Any

__all__ = ["JacobianSpectrum", "hidden_grad_norms", "jacobian_spectrum", "lyapunov_exponent", "plot"]


def hidden_grad_norms(d_hs: Array, lengths: Array | None = None) -> Array:
    """``[T]``: the batch mean of ``‖∂L/∂h_t‖₂``, from the gradient of `rnnjax.unroll`'s ``probe``.

    Args:
      d_hs: ``[B, T, H]``, the gradient with respect to the probe.
      lengths: ``[B]`` valid steps per sequence; the mean at step t is over the sequences that reach t (NaN
        where none does). None means every step is valid.

    Returns:
      ``[T]`` norms in the dtype of ``d_hs``.

    Raises:
      ValueError: if ``d_hs`` is not ``[B, T, H]`` or ``lengths`` is not ``[B]``.
      TypeError: if ``lengths`` is not an integer array.

    Examples:
      With ``h_t = h_{t-1} (0.5 I) + ...``, the gradient of ``L = Σ h_{T-1}`` halves at every step back:

      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.elman(3, activation="identity")    # h_t = x_t w_ih + h_{t-1} w_hh + b
      >>> params = cell.init(jax.random.key(0), input_size=2)._replace(w_hh=0.5 * jnp.eye(3))
      >>> xs = jnp.ones((2, 4, 2))
      >>> def loss(params, probe):
      ...     return jnp.sum(rj.unroll(cell, params, xs, probe=probe)[1][:, -1])
      >>> d_hs = jax.grad(loss, argnums=1)(params, jnp.zeros((2, 4, 3)))
      >>> norms = rj.diagnostics.hidden_grad_norms(d_hs)
      >>> [round(float(n), 4) for n in norms / norms[-1]]
      [0.125, 0.25, 0.5, 1.0]
    """
    if jnp.ndim(d_hs) != 3:
        raise ValueError(f"d_hs must have shape [B, T, H], got shape {jnp.shape(d_hs)}")
    B, T, _ = d_hs.shape
    if lengths is not None:
        _check_lengths(lengths, (B,), T)
    return _grad_norms(d_hs, lengths)


# The diagnostics' computations, each one compiled program (inlined under an outer jit), so that an eager
# call compiles one program rather than one per operation.
@jax.jit
def _grad_norms(d_hs: Array, lengths: Array | None) -> Array:
    B, T, _ = d_hs.shape
    norms = jnp.linalg.norm(d_hs, axis=-1)  # [B, T]
    if lengths is None:
        return jnp.mean(norms, axis=0)
    valid = valid_mask(lengths, B, T, norms)
    count = jnp.sum(valid, axis=0)
    total = jnp.sum(jnp.where(valid, norms, jnp.zeros_like(norms)), axis=0)
    return jnp.where(count > 0, total / jnp.maximum(count, 1).astype(norms.dtype), jnp.nan)


class JacobianSpectrum(NamedTuple):
    """The Jacobians ``∂s_T/∂s_{T−k}`` of the final state with respect to earlier ones, k = 1 .. T.

    ``distance [T]`` (k = 1 .. T; k = T is with respect to the initial carry), ``spectral [B, T]`` (the
    largest singular value), ``frobenius [B, T]`` and ``singular_values [B, T, S]`` (largest first; S the
    state size), in the dtype of the states."""

    distance: Array  # [T]: k = 1 .. T (k = T: with respect to the initial carry)
    spectral: Array  # [B, T]: ‖∂s_T/∂s_{T−k}‖₂, the largest singular value
    frobenius: Array  # [B, T]: ‖∂s_T/∂s_{T−k}‖_F
    singular_values: Array  # [B, T, S]: all singular values, largest first (S: the state size)


def _checked(cell: Cell, params: PyTree, xs: Any, carry: PyTree | None) -> tuple[Array, PyTree]:
    """Validates; returns ``xs [B, T, I]`` and the initial carry (zeros for None)."""
    _check_cell(cell)
    xs = _check_xs(xs)
    if xs.ndim != 3:
        raise ValueError(f"xs must have shape [B, T, I], got shape {tuple(xs.shape)}")
    B, T, I = xs.shape
    if T == 0:
        raise ValueError("xs must have at least one time step (T >= 1)")
    if cell.check_params is not None:
        cell.check_params(params, I, xs.dtype)
    return xs, _check_carry(cell, params, carry, (B,), xs.dtype)


def _state_steps(cell: Cell, params: PyTree, xs: Array, carry0: PyTree) -> tuple[Array, Any]:
    """The flat states entering each step ``[T, B, S]``, and the step on one sequence's flat state."""
    carry0 = batch_like(carry0, xs, 1)  # on a device mesh, its rows split like xs's
    one = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), carry0)  # one sequence's carry
    _, unravel = ravel_pytree(one)

    def flat_step(s: Array, x: Array) -> Array:
        """One sequence's step on its flat state ``s [S]``, input ``x [I]``."""
        new, _ = cell.step(params, jax.tree.map(lambda a: a[None], unravel(s)), x[None])
        return ravel_pytree(jax.tree.map(lambda a: a[0], new))[0]

    s0 = jax.vmap(lambda c: ravel_pytree(c)[0])(carry0)  # [B, S]

    def body(s: Array, x_t: Array) -> tuple[Array, Array]:
        return jax.vmap(flat_step)(s, x_t), s

    _, entering = jax.lax.scan(body, s0, jnp.swapaxes(xs, 0, 1))  # [T, B, S]
    return entering, flat_step


def jacobian_spectrum(cell: Cell, params: PyTree, xs: Array, carry: PyTree | None = None) -> JacobianSpectrum:
    """Norms and singular values of ``∂s_T/∂s_{T−k}`` for k = 1 .. T, each sequence of the batch apart.

    ``s`` is the cell's whole state, its carry flattened (``h``; ``(h, c)`` for the LSTM). Builds every
    step's Jacobian ``J_t [S, S]`` with `jax.jacfwd` and multiplies them from the end: O(T B S³) work, for
    the small and medium states that such studies use.

    Args:
      cell: any cell (built-in or user-written).
      params: its params.
      xs: ``[B, T, I]`` floating-point inputs, every step valid.
      carry: the initial carry; None means zeros.

    Returns:
      A `JacobianSpectrum`: ``spectral`` and ``frobenius`` ``[B, T]`` and ``singular_values [B, T, S]``,
      indexed by the distance k - 1, in the dtype of ``xs``.

    Raises:
      TypeError, ValueError: for a ``cell`` that is not a `Cell`, ``xs`` that is not a floating-point
        ``[B, T, I]`` array with T >= 1, or ``params`` or ``carry`` that do not fit.

    Examples:
      For ``h_t = h_{t-1} (0.5 I) + ...``, ``‖∂s_T/∂s_{T−k}‖₂ = 0.5^k``:

      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.elman(3, activation="identity")    # h_t = x_t w_ih + h_{t-1} w_hh + b
      >>> params = cell.init(jax.random.key(0), input_size=2)._replace(w_hh=0.5 * jnp.eye(3))
      >>> spectrum = rj.diagnostics.jacobian_spectrum(cell, params, jnp.ones((1, 4, 2)))
      >>> [round(float(s), 4) for s in spectrum.spectral[0]]
      [0.5, 0.25, 0.125, 0.0625]
    """
    return _spectrum(cell, params, *_checked(cell, params, xs, carry))


@partial(jax.jit, static_argnums=0)
def _spectrum(cell: Cell, params: PyTree, xs: Array, carry0: PyTree) -> JacobianSpectrum:
    entering, flat_step = _state_steps(cell, params, xs, carry0)
    J = jax.vmap(jax.vmap(jax.jacfwd(flat_step)))(entering, jnp.swapaxes(xs, 0, 1))  # [T, B, S, S]

    def body(P: Array, J_t: Array) -> tuple[Array, Array]:
        P = P @ J_t  # ∂s_T/∂s_{t−1} = ∂s_T/∂s_t · J_t
        return P, P

    S = J.shape[-1]
    eye = batch_like(jnp.broadcast_to(jnp.eye(S, dtype=J.dtype), J.shape[1:]), J[0], 1)
    _, products = jax.lax.scan(body, eye, J, reverse=True)  # products[t] = ∂s_T/∂s_{t−1}, k = T − t
    products = jnp.flip(products, axis=0)  # [k-1]: distance k
    sv = jnp.linalg.svd(products, compute_uv=False)  # [T, B, S]
    T = J.shape[0]
    return JacobianSpectrum(
        distance=jnp.arange(1, T + 1),
        spectral=jnp.swapaxes(sv[..., 0], 0, 1),
        frobenius=jnp.swapaxes(jnp.sqrt(jnp.sum(sv**2, axis=-1)), 0, 1),
        singular_values=jnp.swapaxes(sv, 0, 1),
    )


def lyapunov_exponent(
    cell: Cell,
    params: PyTree,
    xs: Array,
    carry: PyTree | None = None,
    *,
    key: Array | None = None,
    discard: int = 0,
) -> Array:
    """``[B]``: the largest Lyapunov exponent of each sequence's state dynamics, per step (natural log).

    A random unit tangent vector ``v`` is pushed through every step with `jax.jvp` (``v ← J_t v``) and
    renormalised; the exponent is the mean of ``log ‖J_t v‖`` over the steps after the first ``discard``
    (the transient while ``v`` aligns with the most expanding direction). Memory does not grow with T.

    Args:
      cell, params, xs, carry: as for `jacobian_spectrum`.
      key: PRNG key for the initial tangent vector (default: ``jax.random.key(0)``).
      discard: steps to leave out of the mean, ``0 <= discard < T``.

    Returns:
      ``[B]`` exponents in the dtype of ``xs``: below 0, perturbations and gradients shrink by about
      ``e^{λ k}`` over k steps; above 0 they grow.

    Raises:
      TypeError, ValueError: as `jacobian_spectrum`, and a ValueError for ``discard`` outside ``[0, T)``.

    Examples:
      For ``h_t = h_{t-1} (0.5 I) + ...``, ``λ = log 0.5``:

      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.elman(3, activation="identity")    # h_t = x_t w_ih + h_{t-1} w_hh + b
      >>> params = cell.init(jax.random.key(0), input_size=2)._replace(w_hh=0.5 * jnp.eye(3))
      >>> lam = rj.diagnostics.lyapunov_exponent(cell, params, jnp.ones((1, 4, 2)))
      >>> round(float(lam[0]), 4)
      -0.6931
    """
    xs, carry0 = _checked(cell, params, xs, carry)
    T = xs.shape[1]
    if not (isinstance(discard, int) and 0 <= discard < T):
        raise ValueError(f"discard must be an int in [0, T) = [0, {T}), got {discard!r}")
    return _lyapunov(cell, discard, params, xs, carry0, jax.random.key(0) if key is None else key)


@partial(jax.jit, static_argnums=(0, 1))
def _lyapunov(cell: Cell, discard: int, params: PyTree, xs: Array, carry0: PyTree, key: Array) -> Array:
    entering, flat_step = _state_steps(cell, params, xs, carry0)
    _, B, S = entering.shape
    v = batch_like(jax.random.normal(key, (B, S), entering.dtype), entering[0], 1)
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)

    def body(v: Array, inp: tuple[Array, Array]) -> tuple[Array, Array]:
        s, x = inp
        _, Jv = jax.vmap(lambda s, x, v: jax.jvp(lambda s: flat_step(s, x), (s,), (v,)))(s, x, v)
        growth = jnp.linalg.norm(Jv, axis=-1)
        return Jv / growth[:, None], jnp.log(growth)

    _, logs = jax.lax.scan(body, v, (entering, jnp.swapaxes(xs, 0, 1)))  # [T, B]
    return jnp.mean(logs[discard:], axis=0)


def plot(norms: dict[str, Any], ax: Any = None, *, ylabel: str = "‖∂L/∂h_t‖") -> Any:
    """Plots per-step curves (e.g. `hidden_grad_norms` of several cells) on a log scale; returns the axes.

    Args:
      norms: ``{label: [T] values}``.
      ax: a matplotlib axes; None makes a new figure.
      ylabel: the y-axis label.

    Returns:
      The matplotlib axes drawn on.

    Raises:
      ImportError: matplotlib is not installed (``pip install "rnnjax[plot]"`` brings it).

    Examples:
      >>> import matplotlib
      >>> matplotlib.use("Agg")
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> norms = {"lstm": jnp.array([1e-3, 1e-2, 1.0]), "elman": jnp.array([1e-6, 1e-3, 1.0])}
      >>> ax = rj.diagnostics.plot(norms)
      >>> ax.get_yscale(), len(ax.get_lines())
      ('log', 2)
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # matplotlib is optional: only this function draws
        raise ImportError(
            'rj.diagnostics.plot needs matplotlib, which rnnjax does not require: pip install "rnnjax[plot]" '
            f"(or pip install matplotlib); importing it failed with: {e}"
        ) from e

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    for label, values in norms.items():
        values = jnp.asarray(values)
        tiny = jnp.finfo(values.dtype).tiny if jnp.issubdtype(values.dtype, jnp.floating) else 1e-300
        ax.plot(jnp.arange(values.shape[0]), jnp.maximum(values, tiny), label=label)
    ax.set(yscale="log", xlabel="t", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
