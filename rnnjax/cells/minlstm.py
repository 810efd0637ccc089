r"""minLSTM: an LSTM whose gates and candidate read the input only, with normalised forget and input gates.

Equations (one step; B batch, I input, H hidden, G = 3H)::

    zx_t = x_t w_ih + b        [B, 3H]        = [a_f, a_i, h̃_t]
    f = σ(a_f),  i = σ(a_i),  s = f + i
    f' = f / s,  i' = i / s                      f' + i' = 1: the state stays on the scale of h̃
    h_t = f' ⊙ h_{t-1} + i' ⊙ h̃_t                 a diagonal linear recurrence, no recurrent weights
    y_t = h_t

As ``h_t = a_t ⊙ h_{t-1} + b_t`` with ``a_t = f'``, ``b_t = i' ⊙ h̃_t`` it can also run as a parallel
scan over time (``rj.unroll(..., method="associative")``).

Hand-derived backward, given ``dh_t``::

    dh̃  = dh ⊙ i' ;  df' = dh ⊙ h_{t-1} ;  di' = dh ⊙ h̃ ;  dh_{t-1} = dh ⊙ f'
    df  = (df' − di') ⊙ i / s²                   through f' = f/s and i' = i/s
    di  = (di' − df') ⊙ f / s²
    dzx_t = [df ⊙ f(1 − f), di ⊙ i(1 − i), dh̃]   (no GEMM in the loop)

The forward keeps, per step, ``[f, i, h̃]`` ([B, 3H]) and the carry.

Reference: L. Feng, F. Tung, M. O. Ahmed, Y. Bengio and H. Hajimirsadeghi, "Were RNNs all we needed?"
(2024), §3.2 (minLSTM, sequential mode).
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


class MinLSTMParams(NamedTuple):
    """Parameters of the minLSTM cell; blocks ordered f, i, h̃ (candidate) along the last axis."""

    w_ih: Array  # [I, 3H]
    b: Array  # [3H]


def minlstm(
    hidden_size: int, *, w_ih_init: Initializer | None = None, b_init: Initializer | None = None
) -> Cell:
    """A minLSTM cell ``h_t = f'_t ⊙ h_{t-1} + i'_t ⊙ h̃_t`` with normalised gates, all from ``x_t``.

    Equations (``x_t [B, I]``, ``h_t [B, H]``)::

        [a_f, a_i, h̃_t] = x_t w_ih + b                   w_ih [I, 3H], b [3H]
        f, i = σ(a_f), σ(a_i) ;  f' = f / (f + i) ;  i' = i / (f + i)
        h_t = f' ⊙ h_{t-1} + i' ⊙ h̃_t ;  y_t = h_t

    Args:
      hidden_size: H, the width of the hidden state (>= 1).
      w_ih_init, b_init: optional initializers ``(key, shape, dtype) -> array``; by default U(−1/√I, 1/√I),
        a dense layer's.

    Returns:
      A `Cell` whose params are `MinLSTMParams` and whose carry is `HCarry(h)`.

    Raises:
      TypeError: if ``hidden_size`` is not an int.
      ValueError: if ``hidden_size`` is below 1.

    Examples:
      >>> import jax, rnnjax as rj
      >>> cell = rj.minlstm(8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> carry, ys = rj.unroll(cell, params, jax.numpy.ones((2, 5, 3)))
      >>> ys.shape, params.w_ih.shape
      ((2, 5, 8), (3, 24))
    """
    config = cell_config("minlstm", locals())
    H = check_hidden_size(hidden_size)

    def init(key: Array, input_size: int, dtype: Any = None) -> MinLSTMParams:
        I = check_input_size(input_size)
        dtype = check_float_dtype(dtype)
        default = uniform_init(1.0 / I**0.5)
        k_ih, k_b = jax.random.split(key)
        return MinLSTMParams(
            w_ih=(w_ih_init or default)(k_ih, (I, 3 * H), dtype),
            b=(b_init or default)(k_b, (3 * H,), dtype),
        )

    def initial_carry(params: MinLSTMParams, batch_shape: tuple[int, ...] = ()) -> HCarry:
        return HCarry(h=jnp.zeros((*tuple(batch_shape), H), params.b.dtype))

    def gates(params: MinLSTMParams, zx: Array, zh: None, carry: HCarry) -> tuple[HCarry, Array]:
        f, i, cand = jax.nn.sigmoid(zx[..., :H]), jax.nn.sigmoid(zx[..., H : 2 * H]), zx[..., 2 * H :]
        s = f + i
        h = (f / s) * carry.h + (i / s) * cand
        return HCarry(h=h), jnp.concatenate([f, i, cand], axis=-1)

    def gates_bwd(
        params: MinLSTMParams, res: Array, prev: HCarry, new: HCarry, d_new: HCarry
    ) -> tuple[Array, None, HCarry]:
        f, i, cand = res[..., :H], res[..., H : 2 * H], res[..., 2 * H :]
        s = f + i
        dh = d_new.h
        d_fn, d_in = dh * prev.h, dh * cand  # through h = f' h_prev + i' h̃
        df = (d_fn - d_in) * i / (s * s)
        di = (d_in - d_fn) * f / (s * s)
        dzx = jnp.concatenate([df * f * (1 - f), di * i * (1 - i), dh * (i / s)], axis=-1)
        return dzx, None, HCarry(h=dh * (f / s))

    def coefficients(params: MinLSTMParams, xs: Array) -> tuple[Array, Array]:
        zx = input_projection(params, xs)
        f, i = jax.nn.sigmoid(zx[..., :H]), jax.nn.sigmoid(zx[..., H : 2 * H])
        s = f + i
        return f / s, (i / s) * zx[..., 2 * H :]

    def check_params(params: Any, input_size: int, dtype: Any) -> None:
        check_projection_params(
            params,
            name="minlstm",
            fields=MinLSTMParams._fields,
            gate_count=3,
            hidden_size=H,
            input_size=input_size,
            dtype=dtype,
        )

    return Cell(
        init=init,
        initial_carry=initial_carry,
        hidden_size=H,
        name="minlstm",
        backward=GatesBackward(
            gates=gates,
            gates_bwd=gates_bwd,
            gate_names=("f", "i", "candidate"),
            diagonal=1,
        ),
        check_params=check_params,
        config=config,
        linear=LinearRecurrence(coefficients),
    )
