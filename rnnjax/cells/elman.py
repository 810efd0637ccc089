r"""Elman (simple, "vanilla") recurrent cell.

Equations (one step, shapes with B batch, I input, H hidden)::

    z_t = x_t w_ih + h_{t-1} w_hh + b        x_t [B, I], w_ih [I, H], w_hh [H, H], b [H]
    h_t = f(z_t)                              f in {tanh, relu, sigmoid, identity}
    y_t = h_t

In the common notation ``s_t = f(x_t U + s_{t-1} W)``, ``U = w_ih`` and ``W = w_hh``. PyTorch's
``nn.RNN(nonlinearity=...)`` computes the same with ``weight_ih_l0 = w_ihᵀ``, ``weight_hh_l0 = w_hhᵀ`` and
``b = bias_ih_l0 + bias_hh_l0``.

Hand-derived backward, given ``dh_t = ∂L/∂h_t`` (the carry's gradient plus the output's)::

    dz_t = dh_t ⊙ f'(z_t)                     f' written from the output h_t (no pre-activation kept):
                                              tanh: 1 − h²   sigmoid: h (1 − h)   relu: [h > 0]   identity: 1
    dzx_t = dzh_t = dz_t                      (the driver forms dh_{t-1} = dz_t w_hhᵀ, and the weight
                                              gradients once over all T: d w_hh = Σ_t h_{t-1}ᵀ dz_t, ...)

Reference: J. L. Elman, "Finding structure in time", Cognitive Science 14 (1990), §2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import (
    Cell,
    GatesBackward,
    HCarry,
    cell_config,
    check_float_dtype,
    check_hidden_size,
    check_input_size,
    check_projection_params,
    uniform_init,
)

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]


class ElmanParams(NamedTuple):
    """Parameters of the Elman cell."""

    w_ih: Array  # [I, H]
    w_hh: Array  # [H, H]
    b: Array  # [H]


# Each activation with its derivative written from its *output* h = f(z), so that the backward needs only
# the hidden states that the forward keeps anyway.
ACTIVATION_FUNCTIONS: dict[str, tuple[Callable[[Array], Array], Callable[[Array], Array]]] = {
    "tanh": (jnp.tanh, lambda h: 1 - h * h),
    "relu": (jax.nn.relu, lambda h: (h > 0).astype(h.dtype)),
    "sigmoid": (jax.nn.sigmoid, lambda h: h * (1 - h)),
    "identity": (lambda z: z, jnp.ones_like),
}

ACTIVATIONS: tuple[str, ...] = tuple(ACTIVATION_FUNCTIONS)
"""The activations `elman` and `indrnn` accept: ``"tanh"``, ``"relu"``, ``"sigmoid"``, ``"identity"``."""


def elman(
    hidden_size: int,
    activation: str = "tanh",
    *,
    w_ih_init: Initializer | None = None,
    w_hh_init: Initializer | None = None,
    b_init: Initializer | None = None,
) -> Cell:
    """An Elman cell ``h_t = f(x_t w_ih + h_{t-1} w_hh + b)``.

    Equations (``x_t [B, I]``, ``h_t [B, H]``)::

        h_t = f(x_t w_ih + h_{t-1} w_hh + b)         w_ih [I, H], w_hh [H, H], b [H]
        y_t = h_t

    Args:
      hidden_size: H, the width of the hidden state (>= 1).
      activation: one of ``"tanh"``, ``"relu"``, ``"sigmoid"``, ``"identity"``.
      w_ih_init, w_hh_init, b_init: optional initializers ``(key, shape, dtype) -> array``; by default
        PyTorch's U(−1/√H, 1/√H) for the weights and, for ``b`` (= PyTorch's ``b_ih + b_hh``), the sum of two
        such draws, so that the distribution matches a fresh ``nn.RNN``.

    Returns:
      A `Cell` whose params are `ElmanParams` and whose carry is `HCarry(h)`.

    Raises:
      TypeError: if ``hidden_size`` is not an int.
      ValueError: if ``hidden_size`` is below 1, or ``activation`` is not one of `ACTIVATIONS`.

    Examples:
      >>> import jax, rnnjax as rj
      >>> cell = rj.elman(8, activation="relu")
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> carry, ys = rj.unroll(cell, params, jax.numpy.ones((2, 5, 3)))
      >>> ys.shape
      (2, 5, 8)
    """
    config = cell_config("elman", locals())
    H = check_hidden_size(hidden_size)
    if activation not in ACTIVATION_FUNCTIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    act, act_grad = ACTIVATION_FUNCTIONS[activation]
    default = uniform_init(1.0 / H**0.5)

    def init(key: Array, input_size: int, dtype: Any = None) -> ElmanParams:
        I = check_input_size(input_size)
        dtype = check_float_dtype(dtype)
        k_ih, k_hh, k_b1, k_b2 = jax.random.split(key, 4)
        if b_init is None:
            b = default(k_b1, (H,), dtype) + default(k_b2, (H,), dtype)
        else:
            b = b_init(k_b1, (H,), dtype)
        return ElmanParams(
            w_ih=(w_ih_init or default)(k_ih, (I, H), dtype),
            w_hh=(w_hh_init or default)(k_hh, (H, H), dtype),
            b=b,
        )

    def initial_carry(params: ElmanParams, batch_shape: tuple[int, ...] = ()) -> HCarry:
        return HCarry(h=jnp.zeros((*tuple(batch_shape), H), params.w_hh.dtype))

    def gates(params: ElmanParams, zx: Array, zh: Array, carry: HCarry) -> tuple[HCarry, tuple]:
        # h_t = f(zx_t + zh_t); the backward needs only h_t, which the driver keeps as the carry.
        return HCarry(h=act(zx + zh)), ()

    def gates_bwd(
        params: ElmanParams, res: tuple, prev: HCarry, new: HCarry, d_new: HCarry
    ) -> tuple[Array, None, HCarry]:
        # backprop through the nonlinearity, its derivative read off the output h_t
        dz = d_new.h * act_grad(new.h)
        # h_{t-1} reaches h_t only through zh = h_{t-1} w_hh, which the driver differentiates
        return dz, None, HCarry(h=jnp.zeros_like(d_new.h))

    def check_params(params: Any, input_size: int, dtype: Any) -> None:
        check_projection_params(
            params,
            name=f"elman(activation={activation!r})",
            fields=ElmanParams._fields,
            gate_count=1,
            hidden_size=H,
            input_size=input_size,
            dtype=dtype,
        )

    return Cell(
        init=init,
        initial_carry=initial_carry,
        hidden_size=H,
        name=f"elman-{activation}",
        backward=GatesBackward(
            gates=gates,
            gates_bwd=gates_bwd,
            gate_names=("z",),
        ),
        check_params=check_params,
        config=config,
    )
