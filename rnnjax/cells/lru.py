r"""Linear recurrent unit (LRU, Orvieto et al. 2023): a diagonal complex recurrence in real arithmetic.

Equations (one step; B batch, I input, N complex state units; the state ``s_t ∈ ℂ^N`` is carried as its
real and imaginary parts, ``h_t = [Re s_t, Im s_t]`` [B, 2N], so every array is real)::

    λ = exp(−exp(ν) + i exp(θ)) = a + i b          ν, θ [N] (``nu_log``, ``theta_log``): |λ| < 1 always
    γ = exp(γ_log)                                  γ_log [N]: input normalisation, √(1 − |λ|²) at init
    zx_t = x_t w_ih + b = [zr, zi]                  w_ih [I, 2N] = [Re B | Im B] (the paper's B, transposed)
    s_t = λ ⊙ s_{t-1} + γ ⊙ (zr + i zi), i.e.
    h_t = [a ⊙ s_re − b ⊙ s_im + γ ⊙ zr ,  b ⊙ s_re + a ⊙ s_im + γ ⊙ zi]
    y_t = h_t

The recurrence is ``s_t = λ ⊙ s_{t-1} + γ ⊙ zx_t``, linear in the state given the input: declared as a
complex `LinearRecurrence` (``a = [a, b]`` halves, ``b_t = γ ⊙ zx_t``), it also runs as a parallel scan over
time (``rj.unroll(..., method="associative")``).

The paper's read-out ``y_t = Re(C s_t) + D ⊙ x_t`` is linear in ``h_t``: ``Re(C s) = [Re s, Im s]
[Re Cᵀ; −Im Cᵀ]``, an `rj.dense` over the outputs (no bias), plus the skip ``D ⊙ x_t``; the tests compose
them and compare with the paper's complex equations. ``b`` (zero at init; the paper has none) shifts the
input before the normalisation.

Hand-derived backward, given ``dh_t = [dr, di]`` (there is no recurrent GEMM: the loop is elementwise)::

    dzx_t = [γ ⊙ dr, γ ⊙ di]
    dh_{t-1} = [a ⊙ dr + b ⊙ di ,  −b ⊙ dr + a ⊙ di]               (λ̄ times the complex gradient)
    aux_t = [Σ_b dr ⊙ s_re + di ⊙ s_im ,  Σ_b di ⊙ s_re − dr ⊙ s_im]   [2, N], from s_{t-1}
    once over all T:
    d a + i d b = Σ_t aux_t   (= Σ dh_t conj(s_{t-1}))
    d γ_log = γ ⊙ Σ (dr ⊙ zr + di ⊙ zi) = Σ_i (w_ih ⊙ d w_ih)[i] + b ⊙ d b   (re and im halves added)
    with m = |λ| = exp(−exp(ν)), φ = exp(θ) (a = m cos φ, b = m sin φ):
    d ν = −exp(ν) m (d a cos φ + d b sin φ) ;  d θ = φ m (d b cos φ − d a sin φ)

The second form of ``d γ_log`` holds because ``zx`` reaches the state only through ``γ ⊙ zx``, and
``zx = x w_ih + b`` is linear in ``w_ih`` and ``b``: scaling ``γ_j`` by ``1 + ε`` scales column j of both,
so it reads the driver's ``d w_ih`` and ``d b``. So the forward keeps no residual but the carries, and the
backward stacks ``dzx`` and the ``[2, N]`` sums ``aux_t`` (reduced over the batch inside the loop, where
``dh_t`` and ``s_{t-1}`` are at hand: after the loop, each half of ``[T, B, 2N]`` would be a copy).

Reference: A. Orvieto, S. L. Smith, A. Gu, A. Fernando, C. Gulcehre, R. Pascanu and S. De, "Resurrecting
recurrent neural networks for long sequences", ICML 2023, §3 and Appendix A (init: ring
``r_min ≤ |λ| ≤ r_max``, phase ``[0, max_phase]``, ``B ~ N(0, 1/(2I))``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import (
    Cell,
    GatesBackward,
    HCarry,
    RowSum,
    cell_config,
    check_float_dtype,
    check_hidden_size,
    check_input_size,
    check_projection_params,
    input_projection,
    steps_sum,
)
from rnnjax.cells.linear import LinearRecurrence

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]


class LRUParams(NamedTuple):
    """Parameters of the LRU; ``w_ih`` and ``b`` in two blocks of N: real part, imaginary part."""

    w_ih: Array  # [I, 2N]
    b: Array  # [2N]
    nu_log: Array  # [N]: |λ| = exp(−exp(nu_log))
    theta_log: Array  # [N]: arg λ = exp(theta_log)
    gamma_log: Array  # [N]: the input normalisation γ = exp(gamma_log)


def _eigenvalues(params: LRUParams, like: Array) -> tuple[Array, Array, Array]:
    """``(a, b, γ)`` [N] each, reshaped to broadcast against ``like [..., N]``: λ = a + i b."""
    m = jnp.exp(-jnp.exp(params.nu_log))
    phi = jnp.exp(params.theta_log)
    lift = lambda v: v.reshape((1,) * (like.ndim - 1) + v.shape)  # noqa: E731
    return lift(m * jnp.cos(phi)), lift(m * jnp.sin(phi)), lift(jnp.exp(params.gamma_log))


def lru(
    state_size: int,
    *,
    r_min: float = 0.0,
    r_max: float = 1.0,
    max_phase: float = 2 * math.pi,
    w_ih_init: Initializer | None = None,
) -> Cell:
    """A linear recurrent unit with ``state_size`` complex units, carried as ``h = [Re s, Im s]``.

    Equations (``x_t [B, I]``; the complex state ``s_t [B, N]`` is carried as ``h_t = [Re s_t, Im s_t]``
    ``[B, 2N]``)::

        λ = exp(−exp(ν) + i exp(θ)) ;  γ = exp(γ_log)          ν, θ, γ_log [N]: |λ| < 1 always
        [zr, zi] = x_t w_ih + b                                  w_ih [I, 2N], b [2N]
        s_t = λ ⊙ s_{t-1} + γ ⊙ (zr + i zi) ;  y_t = h_t

    Args:
      state_size: N (>= 1), the number of complex state units; ``h`` and the outputs have 2N features.
      r_min, r_max: the ring ``r_min ≤ |λ| < r_max`` the eigenvalues are drawn from (uniformly in area);
        the paper uses r_min = 0.9 or more for long-range tasks.
      max_phase: eigenvalue phases are drawn from ``[0, max_phase]``.
      w_ih_init: optional initializer ``(key, shape, dtype) -> array`` of ``w_ih [I, 2N]``; by default
        N(0, 1/(2I)), the paper's B.

    Returns:
      A `Cell` whose params are `LRUParams` and whose carry is ``HCarry(h [B, 2N])``; ``cell.hidden_size``
      is 2N.

    Raises:
      TypeError: if ``state_size`` is not an int.
      ValueError: if ``state_size`` is below 1, ``r_min`` and ``r_max`` break ``0 <= r_min < r_max <= 1``,
        or ``max_phase`` is not > 0.

    Examples:
      >>> import jax, rnnjax as rj
      >>> cell = rj.lru(8, r_min=0.9, r_max=0.999)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> carry, ys = rj.unroll(cell, params, jax.numpy.ones((2, 100, 3)))
      >>> ys.shape                     # [B, T, 2N]: real parts, then imaginary parts
      (2, 100, 16)
    """
    config = cell_config("lru", locals())
    N = check_hidden_size(state_size, "state_size")
    if not 0.0 <= r_min < r_max <= 1.0:
        raise ValueError(f"r_min and r_max must satisfy 0 <= r_min < r_max <= 1, got {r_min} and {r_max}")
    if not max_phase > 0:
        raise ValueError(f"max_phase must be > 0, got {max_phase}")

    def init(key: Array, input_size: int, dtype: Any = None) -> LRUParams:
        I = check_input_size(input_size)
        dtype = check_float_dtype(dtype)
        k_w, k_r, k_p = jax.random.split(key, 3)
        # |λ|² uniform on [r_min², r_max²] (uniform in the ring's area), written as ν = log(−log|λ|)
        u1 = jax.random.uniform(k_r, (N,), dtype, minval=1e-6)
        nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = jnp.log(max_phase * jax.random.uniform(k_p, (N,), dtype, minval=1e-6))
        modulus_sq = jnp.exp(-2 * jnp.exp(nu_log))
        if w_ih_init is None:
            w_ih = jax.random.normal(k_w, (I, 2 * N), dtype) / jnp.sqrt(jnp.asarray(2 * I, dtype))
        else:
            w_ih = w_ih_init(k_w, (I, 2 * N), dtype)
        return LRUParams(
            w_ih=w_ih,
            b=jnp.zeros((2 * N,), dtype),
            nu_log=nu_log,
            theta_log=theta_log,
            gamma_log=0.5 * jnp.log(1 - modulus_sq),
        )

    def initial_carry(params: LRUParams, batch_shape: tuple[int, ...] = ()) -> HCarry:
        return HCarry(h=jnp.zeros((*tuple(batch_shape), 2 * N), params.w_ih.dtype))

    def gates(params: LRUParams, zx: Array, zh: None, carry: HCarry) -> tuple[HCarry, tuple]:
        del zh  # no w_hh: the recurrence is the elementwise complex product below
        a, b, gamma = _eigenvalues(params, zx[..., :N])
        s_re, s_im = carry.h[..., :N], carry.h[..., N:]
        h = jnp.concatenate(
            [a * s_re - b * s_im + gamma * zx[..., :N], b * s_re + a * s_im + gamma * zx[..., N:]], axis=-1
        )
        return HCarry(h=h), ()  # the backward needs only the carries

    def gates_bwd(
        params: LRUParams, res: tuple, prev: HCarry, new: HCarry, d_new: HCarry
    ) -> tuple[Array, None, HCarry, RowSum]:
        dr, di = d_new.h[..., :N], d_new.h[..., N:]
        s_re, s_im = prev.h[..., :N], prev.h[..., N:]
        a, b, gamma = _eigenvalues(params, dr)
        dzx = jnp.concatenate([gamma * dr, gamma * di], axis=-1)
        dh_prev = jnp.concatenate([a * dr + b * di, a * di - b * dr], axis=-1)
        d_ab = RowSum(jnp.concatenate([dr * s_re + di * s_im, di * s_re - dr * s_im], axis=-1))
        return dzx, None, HCarry(h=dh_prev), d_ab

    def extra_grads(
        params: LRUParams,
        grads: dict[str, Array],
        dzx: Array,
        dzh: Array,
        prevs: HCarry,
        res: tuple,
        d_ab: Array,
    ) -> dict[str, Array]:
        d_ab = steps_sum(d_ab)  # over the steps: [2N], zero at masked steps
        d_a, d_b = d_ab[:N], d_ab[N:]
        # γ scales zx = x w_ih + b, linear in w_ih and b: d γ_log = Σ_i w_ih ⊙ d w_ih + b ⊙ d b, per column
        d_cols = jnp.sum(params.w_ih * grads["w_ih"], axis=0) + params.b * grads["b"]  # [2N]
        # through a = m cos φ, b = m sin φ with m = exp(−exp(ν)), φ = exp(θ)
        m, phi = jnp.exp(-jnp.exp(params.nu_log)), jnp.exp(params.theta_log)
        cos, sin = jnp.cos(phi), jnp.sin(phi)
        return {
            "nu_log": -jnp.exp(params.nu_log) * m * (d_a * cos + d_b * sin),
            "theta_log": phi * m * (d_b * cos - d_a * sin),
            "gamma_log": d_cols[:N] + d_cols[N:],
        }

    def coefficients(params: LRUParams, xs: Array) -> tuple[Array, Array]:
        zx = input_projection(params, xs)
        a, b, gamma = _eigenvalues(params, zx[..., :N])
        decay = jnp.broadcast_to(jnp.concatenate([a, b], axis=-1), zx.shape)
        return decay, jnp.concatenate([gamma, gamma], axis=-1) * zx

    def check_params(params: Any, input_size: int, dtype: Any) -> None:
        check_projection_params(
            params,
            name="lru",
            fields=LRUParams._fields,
            gate_count=2,
            hidden_size=N,
            input_size=input_size,
            dtype=dtype,
            extra_shapes={"nu_log": (N,), "theta_log": (N,), "gamma_log": (N,)},
            size_label="state_size",
        )

    return Cell(
        init=init,
        initial_carry=initial_carry,
        hidden_size=2 * N,
        name="lru",
        backward=GatesBackward(
            gates=gates,
            gates_bwd=gates_bwd,
            gate_names=("re", "im"),
            extra_grads=extra_grads,
            extra_from_aux=True,
            diagonal=2,
        ),
        check_params=check_params,
        config=config,
        linear=LinearRecurrence(coefficients, complex=True),
    )
