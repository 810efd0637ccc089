r"""LSTM with peephole connections: the gates also read the cell state.

Equations (one step; B batch, I input, H hidden, G = 4H; the LSTM's, plus three diagonal peepholes)::

    z_t = x_t w_ih + h_{t-1} w_hh + b              w_ih [I, 4H], w_hh [H, 4H], b [4H]; blocks i, f, g, o
    i = σ(z_i + p_i ⊙ c_{t-1}) ;  f = σ(z_f + p_f ⊙ c_{t-1}) ;  g = tanh(z_g)      p = [p_i, p_f, p_o] [3H]
    c_t = f ⊙ c_{t-1} + i ⊙ g
    o = σ(z_o + p_o ⊙ c_t)                          the output gate peeks at the *new* cell state
    h_t = o ⊙ tanh(c_t)
    y_t = h_t

Hand-derived backward, given ``dh_t`` and ``dc_t``::

    do  = dh_t ⊙ tanh(c_t) ;  da_o = do ⊙ o(1−o)
    dc  = dc_t + dh_t ⊙ o ⊙ (1 − tanh²(c_t)) + da_o ⊙ p_o        the output gate's peephole adds a path
    da_i = dc ⊙ g ⊙ i(1−i) ;  da_f = dc ⊙ c_{t-1} ⊙ f(1−f) ;  da_g = dc ⊙ i ⊙ (1−g²)
    dc_{t-1} = dc ⊙ f + da_i ⊙ p_i + da_f ⊙ p_f
    dzx_t = dzh_t = [da_i, da_f, da_g, da_o]         (the driver forms dh_{t-1} = dz w_hhᵀ)
    d p = Σ_t Σ_b [da_i ⊙ c_{t-1}, da_f ⊙ c_{t-1}, da_o ⊙ c_t]    once over all T, after the loop

The forward keeps, per step, ``[i, f, g, o]`` ([B, 4H]) and the carries; ``c_t`` is rebuilt from them.

Reference: F. A. Gers and J. Schmidhuber, "Recurrent nets that time and count", IJCNN 2000; A. Graves,
"Generating sequences with recurrent neural networks" (2013), §2 eqs. 7-11.
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
    RowSum,
    cell_config,
    check_float_dtype,
    check_hidden_size,
    check_input_size,
    check_projection_params,
    gate_blocks,
    steps_sum,
    uniform_init,
)

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]


class PeepholeLSTMParams(NamedTuple):
    """Parameters of the peephole LSTM: the LSTM's, gate blocks i, f, g, o, and the peepholes."""

    w_ih: Array  # [I, 4H]
    w_hh: Array  # [H, 4H]
    b: Array  # [4H]
    p: Array  # [3H]: p_i, p_f, p_o


def peephole_lstm(
    hidden_size: int,
    *,
    forget_bias: float = 0.0,
    w_ih_init: Initializer | None = None,
    w_hh_init: Initializer | None = None,
    b_init: Initializer | None = None,
    p_init: Initializer | None = None,
) -> Cell:
    """An LSTM whose input and forget gates read ``c_{t-1}`` and whose output gate reads ``c_t``.

    Equations (``x_t [B, I]``, ``h_t, c_t [B, H]``; peepholes ``p = [p_i, p_f, p_o] [3H]``)::

        z_t = x_t w_ih + h_{t-1} w_hh + b                 w_ih [I, 4H], w_hh [H, 4H], b [4H]
        i = σ(z_i + p_i ⊙ c_{t-1}) ;  f = σ(z_f + p_f ⊙ c_{t-1}) ;  g = tanh(z_g)
        c_t = f ⊙ c_{t-1} + i ⊙ g ;  o = σ(z_o + p_o ⊙ c_t) ;  h_t = o ⊙ tanh(c_t) ;  y_t = h_t

    Args:
      hidden_size: H, the width of the hidden and cell states (>= 1).
      forget_bias: added to the forget-gate block ``b[H:2H]`` at init.
      w_ih_init, w_hh_init, b_init, p_init: optional initializers ``(key, shape, dtype) -> array``; by
        default U(−1/√H, 1/√H) for every weight and the peepholes, and ``b`` the sum of two such draws (as
        `rnnjax.lstm`).

    Returns:
      A `Cell` whose params are `PeepholeLSTMParams` and whose carry is `LSTMCarry(h, c)`.

    Raises:
      TypeError: if ``hidden_size`` is not an int.
      ValueError: if ``hidden_size`` is below 1.

    Examples:
      >>> import jax, rnnjax as rj
      >>> cell = rj.peephole_lstm(8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> carry, ys = rj.unroll(cell, params, jax.numpy.ones((2, 5, 3)))
      >>> ys.shape, params.p.shape
      ((2, 5, 8), (24,))
    """
    config = cell_config("peephole_lstm", locals())
    H = check_hidden_size(hidden_size)
    default = uniform_init(1.0 / H**0.5)

    def init(key: Array, input_size: int, dtype: Any = None) -> PeepholeLSTMParams:
        I = check_input_size(input_size)
        dtype = check_float_dtype(dtype)
        k_ih, k_hh, k_b1, k_b2, k_p = jax.random.split(key, 5)
        if b_init is None:
            b = default(k_b1, (4 * H,), dtype) + default(k_b2, (4 * H,), dtype)
        else:
            b = b_init(k_b1, (4 * H,), dtype)
        if forget_bias:
            b = b.at[H : 2 * H].add(jnp.asarray(forget_bias, dtype))
        return PeepholeLSTMParams(
            w_ih=(w_ih_init or default)(k_ih, (I, 4 * H), dtype),
            w_hh=(w_hh_init or default)(k_hh, (H, 4 * H), dtype),
            b=b,
            p=(p_init or default)(k_p, (3 * H,), dtype),
        )

    def initial_carry(params: PeepholeLSTMParams, batch_shape: tuple[int, ...] = ()) -> LSTMCarry:
        zeros = jnp.zeros((*tuple(batch_shape), H), params.w_hh.dtype)
        return LSTMCarry(h=zeros, c=zeros)

    def gates(params: PeepholeLSTMParams, zx: Array, zh: Array, carry: LSTMCarry) -> tuple[LSTMCarry, Array]:
        z_i, z_f, z_g, z_o = gate_blocks(zx, zh, 4)
        p_i, p_f, p_o = params.p[None, :H], params.p[None, H : 2 * H], params.p[None, 2 * H :]
        i = jax.nn.sigmoid(z_i + p_i * carry.c)
        f = jax.nn.sigmoid(z_f + p_f * carry.c)
        g = jnp.tanh(z_g)
        c = f * carry.c + i * g
        o = jax.nn.sigmoid(z_o + p_o * c)
        return LSTMCarry(h=o * jnp.tanh(c), c=c), jnp.concatenate([i, f, g, o], axis=-1)

    def gates_bwd(
        params: PeepholeLSTMParams, act: Array, prev: LSTMCarry, new: LSTMCarry, d_new: LSTMCarry
    ) -> tuple[Array, None, LSTMCarry, RowSum]:
        i, f, g, o = act[..., :H], act[..., H : 2 * H], act[..., 2 * H : 3 * H], act[..., 3 * H :]
        p_i, p_f, p_o = params.p[None, :H], params.p[None, H : 2 * H], params.p[None, 2 * H :]
        tc = jnp.tanh(new.c)
        da_o = d_new.h * tc * o * (1 - o)
        dc = d_new.c + d_new.h * o * (1 - tc * tc) + da_o * p_o
        da_i = dc * g * i * (1 - i)
        da_f = dc * prev.c * f * (1 - f)
        da_g = dc * i * (1 - g * g)
        dc_prev = dc * f + da_i * p_i + da_f * p_f
        dz = jnp.concatenate([da_i, da_f, da_g, da_o], axis=-1)
        # this step's share of d p (the peepholes read c_{t-1}, c_{t-1} and c_t), summed over the batch
        d_p = RowSum(jnp.concatenate([da_i * prev.c, da_f * prev.c, da_o * new.c], axis=-1))
        return dz, None, LSTMCarry(h=jnp.zeros_like(dc_prev), c=dc_prev), d_p

    def extra_grads(
        params: PeepholeLSTMParams,
        grads: dict,
        dzx: Array,
        dzh: Array,
        prevs: LSTMCarry,
        act: Array,
        d_p: Array,
    ) -> dict[str, Array]:
        return {"p": steps_sum(d_p)}  # the steps' batch sums [T+1, 3H], added once over all T

    def check_params(params: Any, input_size: int, dtype: Any) -> None:
        check_projection_params(
            params,
            name="peephole_lstm",
            fields=PeepholeLSTMParams._fields,
            gate_count=4,
            hidden_size=H,
            input_size=input_size,
            dtype=dtype,
            extra_shapes={"p": (3 * H,)},
        )

    return Cell(
        init=init,
        initial_carry=initial_carry,
        hidden_size=H,
        name="peephole-lstm",
        backward=GatesBackward(
            gates=gates,
            gates_bwd=gates_bwd,
            gate_names=("i", "f", "g", "o"),
            extra_grads=extra_grads,
            extra_from_aux=True,
        ),
        check_params=check_params,
        config=config,
    )
