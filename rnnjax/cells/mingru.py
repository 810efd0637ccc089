r"""minGRU: a GRU whose gate and candidate read the input only (no recurrent weights at all).

Equations (one step; B batch, I input, H hidden, G = 2H)::

    zx_t = x_t w_ih + b        [B, 2H]       = [a_t, h̃_t]
    z_t  = σ(a_t)                            the update gate
    h_t  = (1 − z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t    a linear recurrence in h, elementwise
    y_t  = h_t

Every step's gate and candidate are known before the loop (one GEMM over all T), and the recurrence is a
diagonal linear one, ``h_t = a_t ⊙ h_{t-1} + b_t`` with ``a_t = 1 − z_t`` and ``b_t = z_t ⊙ h̃_t``: the
whole sequence can also run as a parallel scan (``rj.unroll(..., method="associative")``).

Hand-derived backward, given ``dh_t``::

    dh̃_t  = dh_t ⊙ z_t
    da_t  = dh_t ⊙ (h̃_t − h_{t-1}) ⊙ z_t (1 − z_t)
    dzx_t = [da_t, dh̃_t] ;  dh_{t-1} = dh_t ⊙ (1 − z_t)     (no GEMM in the loop)

The forward keeps, per step, ``[z_t, h̃_t]`` ([B, 2H]) and the carry.

Reference: L. Feng, F. Tung, M. O. Ahmed, Y. Bengio and H. Hajimirsadeghi, "Were RNNs all we needed?"
(2024), §3.1 (minGRU, sequential mode).
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
    input_projection,
    uniform_init,
)
from rnnjax.cells.linear import LinearRecurrence

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]


class MinGRUParams(NamedTuple):
    """Parameters of the minGRU cell; blocks ordered z (gate), h̃ (candidate) along the last axis."""

    w_ih: Array  # [I, 2H]
    b: Array  # [2H]


def mingru(
    hidden_size: int, *, w_ih_init: Initializer | None = None, b_init: Initializer | None = None
) -> Cell:
    """A minGRU cell ``h_t = (1 − z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t`` with ``[z_t, h̃_t] = [σ, id](x_t w_ih + b)``.

    Equations (``x_t [B, I]``, ``h_t [B, H]``)::

        [a_t, h̃_t] = x_t w_ih + b                        w_ih [I, 2H], b [2H]
        z_t = σ(a_t) ;  h_t = (1 − z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t ;  y_t = h_t

    Args:
      hidden_size: H, the width of the hidden state (>= 1).
      w_ih_init, b_init: optional initializers ``(key, shape, dtype) -> array``; by default U(−1/√I, 1/√I),
        a dense layer's.

    Returns:
      A `Cell` whose params are `MinGRUParams` and whose carry is `HCarry(h)`.

    Raises:
      TypeError: if ``hidden_size`` is not an int.
      ValueError: if ``hidden_size`` is below 1.

    Examples:
      >>> import jax, rnnjax as rj
      >>> cell = rj.mingru(8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> carry, ys = rj.unroll(cell, params, jax.numpy.ones((2, 5, 3)))
      >>> ys.shape, params.w_ih.shape
      ((2, 5, 8), (3, 16))
    """
    config = cell_config("mingru", locals())
    H = check_hidden_size(hidden_size)

    def init(key: Array, input_size: int, dtype: Any = None) -> MinGRUParams:
        I = check_input_size(input_size)
        dtype = check_float_dtype(dtype)
        default = uniform_init(1.0 / I**0.5)
        k_ih, k_b = jax.random.split(key)
        return MinGRUParams(
            w_ih=(w_ih_init or default)(k_ih, (I, 2 * H), dtype),
            b=(b_init or default)(k_b, (2 * H,), dtype),
        )

    def initial_carry(params: MinGRUParams, batch_shape: tuple[int, ...] = ()) -> HCarry:
        return HCarry(h=jnp.zeros((*tuple(batch_shape), H), params.b.dtype))

    def gates(params: MinGRUParams, zx: Array, zh: None, carry: HCarry) -> tuple[HCarry, Array]:
        z, cand = jax.nn.sigmoid(zx[..., :H]), zx[..., H:]
        return HCarry(h=(1 - z) * carry.h + z * cand), jnp.concatenate([z, cand], axis=-1)

    def gates_bwd(
        params: MinGRUParams, res: Array, prev: HCarry, new: HCarry, d_new: HCarry
    ) -> tuple[Array, None, HCarry]:
        z, cand = res[..., :H], res[..., H:]
        dh = d_new.h
        da = dh * (cand - prev.h) * z * (1 - z)
        return jnp.concatenate([da, dh * z], axis=-1), None, HCarry(h=dh * (1 - z))

    def coefficients(params: MinGRUParams, xs: Array) -> tuple[Array, Array]:
        zx = input_projection(params, xs)
        z = jax.nn.sigmoid(zx[..., :H])
        return 1 - z, z * zx[..., H:]

    def check_params(params: Any, input_size: int, dtype: Any) -> None:
        check_projection_params(
            params,
            name="mingru",
            fields=MinGRUParams._fields,
            gate_count=2,
            hidden_size=H,
            input_size=input_size,
            dtype=dtype,
        )

    return Cell(
        init=init,
        initial_carry=initial_carry,
        hidden_size=H,
        name="mingru",
        backward=GatesBackward(
            gates=gates,
            gates_bwd=gates_bwd,
            gate_names=("z", "candidate"),
            diagonal=1,
        ),
        check_params=check_params,
        config=config,
        linear=LinearRecurrence(coefficients),
    )
