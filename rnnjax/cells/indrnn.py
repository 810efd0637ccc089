r"""Independently recurrent neural network (IndRNN): each unit sees only its own past.

Equations (one step; B batch, I input, H hidden)::

    z_t = x_t w_ih + b + u ⊙ h_{t-1}          x_t [B, I], w_ih [I, H], b [H], u [H]: a diagonal recurrence
    h_t = f(z_t)                              f in {relu, tanh, sigmoid, identity}
    y_t = h_t

With the recurrence diagonal, ``∂h_t/∂h_{t−k} = Π f'(z) ⊙ u^k`` unit by unit, so a unit's gradient neither
vanishes nor explodes when ``|u|`` stays near 1 (Li et al. constrain ``|u| ≤ 2^{1/T}``); and there is no
recurrent GEMM at all: the loop is elementwise. With the identity, ``h_t = u ⊙ h_{t-1} + (x_t w_ih + b)`` is
linear in the state given the input, and can also run as a parallel scan over time
(``rj.unroll(..., method="associative")``).

Hand-derived backward, given ``dh_t``::

    dz_t = dh_t ⊙ f'(z_t)                     f' written from the output h_t, as for the Elman cell
    dzx_t = dz_t ;  dh_{t-1} = dz_t ⊙ u       (no GEMM in the loop)
    d u = Σ_t Σ_b dz_t ⊙ h_{t-1}              once over all T after the loop, like d w_ih = Σ_t x_tᵀ dz_t

Reference: S. Li, W. Li, C. Cook, C. Zhu and Y. Gao, "Independently recurrent neural network (IndRNN):
building a longer and deeper RNN", CVPR 2018, eqs. 2-3.
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
    RowSum,
    cell_config,
    check_float_dtype,
    check_hidden_size,
    check_input_size,
    check_projection_params,
    input_projection,
    steps_sum,
    uniform_init,
)
from rnnjax.cells.elman import ACTIVATION_FUNCTIONS, ACTIVATIONS
from rnnjax.cells.linear import LinearRecurrence

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]


class IndRNNParams(NamedTuple):
    """Parameters of the IndRNN cell."""

    w_ih: Array  # [I, H]
    u: Array  # [H], the diagonal recurrent weight
    b: Array  # [H]


def indrnn(
    hidden_size: int,
    activation: str = "relu",
    *,
    w_ih_init: Initializer | None = None,
    u_init: Initializer | None = None,
    b_init: Initializer | None = None,
) -> Cell:
    """An IndRNN cell ``h_t = f(x_t w_ih + b + u ⊙ h_{t-1})``.

    Equations (``x_t [B, I]``, ``h_t [B, H]``)::

        h_t = f(x_t w_ih + b + u ⊙ h_{t-1})          w_ih [I, H], b [H], u [H]: a diagonal recurrence
        y_t = h_t

    Args:
      hidden_size: H, the width of the hidden state (>= 1).
      activation: one of ``"relu"`` (the paper's), ``"tanh"``, ``"sigmoid"``, ``"identity"``.
      w_ih_init, u_init, b_init: optional initializers ``(key, shape, dtype) -> array``; by default
        U(−1/√H, 1/√H) for ``w_ih``, U(0, 1) for ``u`` (the paper's choice for long sequences) and zeros for
        ``b``.

    Returns:
      A `Cell` whose params are `IndRNNParams` and whose carry is `HCarry(h)`.

    Raises:
      TypeError: if ``hidden_size`` is not an int.
      ValueError: if ``hidden_size`` is below 1, or ``activation`` is not one of `ACTIVATIONS`.

    Examples:
      >>> import jax, rnnjax as rj
      >>> cell = rj.indrnn(8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> carry, ys = rj.unroll(cell, params, jax.numpy.ones((2, 5, 3)))
      >>> ys.shape, params.u.shape
      ((2, 5, 8), (8,))
    """
    config = cell_config("indrnn", locals())
    H = check_hidden_size(hidden_size)
    if activation not in ACTIVATION_FUNCTIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    act, act_grad = ACTIVATION_FUNCTIONS[activation]
    default = uniform_init(1.0 / H**0.5)

    def init(key: Array, input_size: int, dtype: Any = None) -> IndRNNParams:
        I = check_input_size(input_size)
        dtype = check_float_dtype(dtype)
        k_ih, k_u, k_b = jax.random.split(key, 3)
        u = u_init(k_u, (H,), dtype) if u_init else jax.random.uniform(k_u, (H,), dtype)
        b = b_init(k_b, (H,), dtype) if b_init else jnp.zeros((H,), dtype)
        return IndRNNParams(w_ih=(w_ih_init or default)(k_ih, (I, H), dtype), u=u, b=b)

    def initial_carry(params: IndRNNParams, batch_shape: tuple[int, ...] = ()) -> HCarry:
        return HCarry(h=jnp.zeros((*tuple(batch_shape), H), params.u.dtype))

    def gates(params: IndRNNParams, zx: Array, zh: None, carry: HCarry) -> tuple[HCarry, tuple]:
        # the recurrence is elementwise: no zh from the driver
        return HCarry(h=act(zx + params.u[None] * carry.h)), ()

    def gates_bwd(
        params: IndRNNParams, res: tuple, prev: HCarry, new: HCarry, d_new: HCarry
    ) -> tuple[Array, None, HCarry, RowSum]:
        dz = d_new.h * act_grad(new.h)
        # z_t ∋ u ⊙ h_{t-1}: this step's share of d u, summed over the batch by the driver (aux)
        return dz, None, HCarry(h=dz * params.u[None]), RowSum(dz * prev.h)

    def extra_grads(
        params: IndRNNParams, grads: dict, dzx: Array, dzh: Array, prevs: HCarry, res: tuple, d_u: Array
    ) -> dict[str, Array]:
        # d u = Σ_t Σ_b dz_t ⊙ h_{t-1}: the steps' batch sums, added once over all T
        return {"u": steps_sum(d_u)}

    def coefficients(params: IndRNNParams, xs: Array) -> tuple[Array, Array]:
        zx = input_projection(params, xs)
        return jnp.broadcast_to(params.u.reshape((1,) * (zx.ndim - 1) + params.u.shape), zx.shape), zx

    def check_params(params: Any, input_size: int, dtype: Any) -> None:
        check_projection_params(
            params,
            name=f"indrnn(activation={activation!r})",
            fields=IndRNNParams._fields,
            gate_count=1,
            hidden_size=H,
            input_size=input_size,
            dtype=dtype,
            extra_shapes={"u": (H,)},
        )

    return Cell(
        init=init,
        initial_carry=initial_carry,
        hidden_size=H,
        name=f"indrnn-{activation}",
        backward=GatesBackward(
            gates=gates,
            gates_bwd=gates_bwd,
            gate_names=("z",),
            extra_grads=extra_grads,
            extra_from_aux=True,
            diagonal=1,
        ),
        check_params=check_params,
        config=config,
        linear=LinearRecurrence(coefficients) if activation == "identity" else None,
    )
