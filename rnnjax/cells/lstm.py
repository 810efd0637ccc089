r"""Long short-term memory cell, PyTorch's gate order ``i, f, g, o``.

Equations (one step; B batch, I input, H hidden, G = 4H)::

    z_t = x_t w_ih + h_{t-1} w_hh + b              w_ih [I, 4H], w_hh [H, 4H], b [4H], z_t [B, 4H]
    i, f, g, o = σ(z_i), σ(z_f), tanh(z_g), σ(z_o) each [B, H]; z_i = z_t[:, 0:H], z_f = z_t[:, H:2H], ...
    c_t = f ⊙ c_{t-1} + i ⊙ g
    h_t = o ⊙ tanh(c_t)
    y_t = h_t

PyTorch's ``nn.LSTM`` maps one to one: ``w_ih = weight_ih_l0ᵀ``, ``w_hh = weight_hh_l0ᵀ``,
``b = bias_ih_l0 + bias_hh_l0``.

Hand-derived backward, given ``dh_t`` and ``dc_t`` (the carry's gradients, the output's added to ``dh_t``)::

    do  = dh_t ⊙ tanh(c_t)                     # backprop through h_t = o tanh(c_t)
    dc  = dc_t + dh_t ⊙ o ⊙ (1 − tanh²(c_t))   # ... into the cell state
    di  = dc ⊙ g ;  df = dc ⊙ c_{t-1} ;  dg = dc ⊙ i
    dc_{t-1} = dc ⊙ f                           # the cell state's own path through time
    dz  = [di ⊙ i(1−i), df ⊙ f(1−f), dg ⊙ (1−g²), do ⊙ o(1−o)]      [B, 4H]
    dzx_t = dzh_t = dz                          (the driver forms dh_{t-1} = dz w_hhᵀ)

The forward keeps, per step, only the activations ``[i, f, g, o]`` ([B, 4H]) and the carries ``h_t, c_t``;
``tanh(c_t)`` is recomputed in the backward.

Reference: S. Hochreiter and J. Schmidhuber, "Long short-term memory", Neural Computation 9 (1997); the
forget gate of F. Gers et al. (2000); A. Graves, "Generating sequences with RNNs" (2013), §2 eqs. 7-11
without peepholes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import (
    Cell,
    GatesBackward,
    LSTMCarry,
    cell_config,
    check_float_dtype,
    check_hidden_size,
    check_input_size,
    check_projection_params,
    gate_blocks,
    uniform_init,
)

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]


class LSTMParams(NamedTuple):
    """Parameters of the LSTM cell; gate blocks ordered i, f, g, o along the last axis."""

    w_ih: Array  # [I, 4H]
    w_hh: Array  # [H, 4H]
    b: Array  # [4H]


def lstm_update(zx: Array, zh: Array | None, c_prev: Array) -> tuple[Array, Array]:
    """The LSTM's gates and cell update: ``(c_t [B, H], act = [i, f, g, o] [B, 4H])`` from
    ``z = zx + zh [B, 4H]`` (``zh`` may be None).

    ``i, f, g, o = σ(z_i), σ(z_f), tanh(z_g), σ(z_o)`` and ``c_t = f ⊙ c_{t-1} + i ⊙ g``; shared by the LSTM
    variants that read ``z`` or ``h_t`` differently (`projected_lstm`, `layer_norm_lstm`). ``z`` is summed
    gate by gate (`gate_blocks`).
    """
    z_i, z_f, z_g, z_o = gate_blocks(zx, zh, 4)
    i, f, g, o = jax.nn.sigmoid(z_i), jax.nn.sigmoid(z_f), jnp.tanh(z_g), jax.nn.sigmoid(z_o)
    return f * c_prev + i * g, jnp.concatenate([i, f, g, o], axis=-1)


def lstm_update_bwd(act: Array, c_prev: Array, do: Array, dc: Array) -> tuple[Array, Array]:
    """The derivative of `lstm_update`: ``(dz [B, 4H], dc_{t-1} [B, H])`` from ``do = ∂L/∂o`` and the whole
    ``dc = ∂L/∂c_t``::

        di = dc ⊙ g ;  df = dc ⊙ c_{t-1} ;  dg = dc ⊙ i ;  dc_{t-1} = dc ⊙ f
        dz = [di ⊙ i(1−i), df ⊙ f(1−f), dg ⊙ (1−g²), do ⊙ o(1−o)]
    """
    H = act.shape[-1] // 4
    i = act[..., 0 * H : 1 * H]
    f = act[..., 1 * H : 2 * H]
    g = act[..., 2 * H : 3 * H]
    o = act[..., 3 * H : 4 * H]
    di, df, dg = dc * g, dc * c_prev, dc * i
    dz = jnp.concatenate([di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), do * o * (1 - o)], axis=-1)
    return dz, dc * f


def lstm(
    hidden_size: int,
    *,
    forget_bias: float = 0.0,
    w_ih_init: Initializer | None = None,
    w_hh_init: Initializer | None = None,
    b_init: Initializer | None = None,
) -> Cell:
    """An LSTM cell with PyTorch's gate order (i, f, g, o) and weight layout.

    Equations (``x_t [B, I]``, ``h_t, c_t [B, H]``)::

        z_t = x_t w_ih + h_{t-1} w_hh + b                 w_ih [I, 4H], w_hh [H, 4H], b [4H]
        i, f, g, o = σ(z_i), σ(z_f), tanh(z_g), σ(z_o)    each [B, H]
        c_t = f ⊙ c_{t-1} + i ⊙ g ;  h_t = o ⊙ tanh(c_t) ;  y_t = h_t

    Args:
      hidden_size: H (>= 1).
      forget_bias: added to the forget-gate block ``b[H:2H]`` at init (Jozefowicz et al. 2015 suggest 1.0;
        PyTorch's default is 0.0).
      w_ih_init, w_hh_init, b_init: optional initializers ``(key, shape, dtype) -> array``; by default
        PyTorch's U(−1/√H, 1/√H), with ``b`` the sum of two such draws (PyTorch's ``b_ih + b_hh``).

    Returns:
      A `Cell` whose params are `LSTMParams` and whose carry is `LSTMCarry(h, c)`.

    Raises:
      TypeError: if ``hidden_size`` is not an int.
      ValueError: if ``hidden_size`` is below 1.

    Examples:
      >>> import jax, rnnjax as rj
      >>> cell = rj.lstm(16, forget_bias=1.0)
      >>> params = cell.init(jax.random.key(0), input_size=4)
      >>> carry, ys = rj.unroll(cell, params, jax.numpy.ones((3, 7, 4)))
      >>> carry.c.shape, ys.shape
      ((3, 16), (3, 7, 16))
    """
    config = cell_config("lstm", locals())
    H = check_hidden_size(hidden_size)
    default = uniform_init(1.0 / H**0.5)

    def init(key: Array, input_size: int, dtype: Any = None) -> LSTMParams:
        I = check_input_size(input_size)
        dtype = check_float_dtype(dtype)
        k_ih, k_hh, k_b1, k_b2 = jax.random.split(key, 4)
        if b_init is None:
            b = default(k_b1, (4 * H,), dtype) + default(k_b2, (4 * H,), dtype)
        else:
            b = b_init(k_b1, (4 * H,), dtype)
        if forget_bias:
            b = b.at[H : 2 * H].add(jnp.asarray(forget_bias, dtype))
        return LSTMParams(
            w_ih=(w_ih_init or default)(k_ih, (I, 4 * H), dtype),
            w_hh=(w_hh_init or default)(k_hh, (H, 4 * H), dtype),
            b=b,
        )

    def initial_carry(params: LSTMParams, batch_shape: tuple[int, ...] = ()) -> LSTMCarry:
        zeros = jnp.zeros((*tuple(batch_shape), H), params.w_hh.dtype)
        return LSTMCarry(h=zeros, c=zeros)

    def gates(params: LSTMParams, zx: Array, zh: Array, carry: LSTMCarry) -> tuple[LSTMCarry, Array]:
        c, act = lstm_update(zx, zh, carry.c)
        return LSTMCarry(h=act[..., 3 * H :] * jnp.tanh(c), c=c), act

    def gates_bwd(
        params: LSTMParams, act: Array, prev: LSTMCarry, new: LSTMCarry, d_new: LSTMCarry
    ) -> tuple[Array, None, LSTMCarry]:
        o = act[..., 3 * H :]
        tc = jnp.tanh(new.c)
        # backprop through h_t = o tanh(c_t), then the cell update and the gates
        dz, dc_prev = lstm_update_bwd(act, prev.c, d_new.h * tc, d_new.c + d_new.h * o * (1 - tc * tc))
        return dz, None, LSTMCarry(h=jnp.zeros_like(dc_prev), c=dc_prev)

    def check_params(params: Any, input_size: int, dtype: Any) -> None:
        check_projection_params(
            params,
            name="lstm",
            fields=LSTMParams._fields,
            gate_count=4,
            hidden_size=H,
            input_size=input_size,
            dtype=dtype,
        )

    return Cell(
        init=init,
        initial_carry=initial_carry,
        hidden_size=H,
        name="lstm",
        backward=GatesBackward(
            gates=gates,
            gates_bwd=gates_bwd,
            gate_names=("i", "f", "g", "o"),
        ),
        check_params=check_params,
        config=config,
    )
