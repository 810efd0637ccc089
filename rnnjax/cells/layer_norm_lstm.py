r"""Layer-normalised LSTM (Ba, Kiros and Hinton 2016), gate order ``i, f, g, o``.

Equations (one step; B batch, I input, H hidden, G = 4H; ``LN(v) = (v − mean(v)) / sqrt(var(v) + ε)`` over
the last axis of each row, no gain or shift of its own)::

    a_x = LN(x_t w_ih) ;  a_h = LN(h_{t-1} w_hh)         w_ih [I, 4H], w_hh [H, 4H]; a_x, a_h [B, 4H]
    z_t = γ_ih ⊙ a_x + γ_hh ⊙ a_h + β                    γ_ih, γ_hh, β [4H]   (blocks i, f, g, o)
    i, f, g, o = σ(z_i), σ(z_f), tanh(z_g), σ(z_o)       each [B, H]
    c_t = f ⊙ c_{t-1} + i ⊙ g                            c_t [B, H] (the carry is not normalised)
    ĉ = LN(c_t) ;  n_t = γ_c ⊙ ĉ + β_c                   γ_c, β_c [H]
    h_t = o ⊙ tanh(n_t) ;  y_t = h_t

The paper's two gate shifts and its bias add up, so one ``β`` stands for the three. The params have no
``b``: the hoisted projection is the bare ``x w_ih`` (one GEMM over all T), normalised inside the loop.

Hand-derived backward, given ``dh_t`` and ``dc_t``; ``LN'(dv̂; v̂, r) = r ⊙ (dv̂ − mean(dv̂) − v̂ ⊙ mean(dv̂ ⊙ v̂))``
is the derivative of ``v̂ = LN(v)`` with ``r = 1/sqrt(var(v) + ε)`` [B, 1]::

    do = dh_t ⊙ tanh(n_t) ;  dn = dh_t ⊙ o ⊙ (1 − tanh²(n_t))
    dc = dc_t + LN'(dn ⊙ γ_c; ĉ, r_c)
    di = dc ⊙ g ;  df = dc ⊙ c_{t-1} ;  dg = dc ⊙ i ;  dc_{t-1} = dc ⊙ f
    dz = [di ⊙ i(1−i), df ⊙ f(1−f), dg ⊙ (1−g²), do ⊙ o(1−o)]         [B, 4H]
    dzx_t = LN'(dz ⊙ γ_ih; a_x, r_x) ;  dzh_t = LN'(dz ⊙ γ_hh; a_h, r_h)   (the driver does the GEMMs)
    once over all T, from each step's aux (dz, dn):
    d γ_ih = Σ dz ⊙ a_x ;  d γ_hh = Σ dz ⊙ a_h ;  d β = Σ dz ;  d γ_c = Σ dn ⊙ ĉ ;  d β_c = Σ dn

The forward keeps, per step, the gates ``[i, f, g, o]``, ``a_x``, ``a_h`` ([B, 4H] each), ``ĉ`` ([B, H]),
the three ``r`` ([B, 3]) and the carries.

Reference: J. L. Ba, J. R. Kiros and G. E. Hinton, "Layer normalization" (2016), §A, eqs. 20-22.
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
    steps_sum,
    uniform_init,
)
from rnnjax.cells.lstm import lstm_update, lstm_update_bwd

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]


class LayerNormLSTMParams(NamedTuple):
    """Parameters of the layer-normalised LSTM; gate blocks ordered i, f, g, o along the last axis."""

    w_ih: Array  # [I, 4H]
    w_hh: Array  # [H, 4H]
    gamma_ih: Array  # [4H]: gain of LN(x w_ih)
    gamma_hh: Array  # [4H]: gain of LN(h w_hh)
    beta: Array  # [4H]: the gates' shift
    gamma_c: Array  # [H]: gain of LN(c_t)
    beta_c: Array  # [H]: shift of LN(c_t)


def _lift(v: Array, like: Array) -> Array:
    """A parameter vector ``v [N]`` reshaped to broadcast against ``like [..., N]`` (no rank promotion)."""
    return v.reshape((1,) * (like.ndim - 1) + v.shape)


def _normalise(v: Array, eps: float) -> tuple[Array, Array]:
    """``(v̂ [B, N], r [B, 1])``: ``v̂ = (v − mean) · r`` with ``r = 1/sqrt(var + ε)`` over the last axis."""
    mu = jnp.mean(v, axis=-1, keepdims=True)
    d = v - mu
    r = jax.lax.rsqrt(jnp.mean(d * d, axis=-1, keepdims=True) + eps)
    return d * r, r


def _normalise_bwd(dv_hat: Array, v_hat: Array, r: Array) -> Array:
    """``dv`` from ``dv̂`` through ``v̂ = LN(v)``: ``r ⊙ (dv̂ − mean(dv̂) − v̂ ⊙ mean(dv̂ ⊙ v̂))``."""
    mean = jnp.mean(dv_hat, axis=-1, keepdims=True)
    proj = jnp.mean(dv_hat * v_hat, axis=-1, keepdims=True)
    return r * (dv_hat - mean - v_hat * proj)


def layer_norm_lstm(
    hidden_size: int,
    *,
    eps: float = 1e-5,
    forget_bias: float = 0.0,
    w_ih_init: Initializer | None = None,
    w_hh_init: Initializer | None = None,
    gain_init: Initializer | None = None,
    shift_init: Initializer | None = None,
) -> Cell:
    """An LSTM whose input and recurrent pre-activations and cell state are layer-normalised.

    Equations (``x_t [B, I]``, ``h_t, c_t [B, H]``; ``LN`` normalises each row, without gain or shift)::

        z_t = γ_ih ⊙ LN(x_t w_ih) + γ_hh ⊙ LN(h_{t-1} w_hh) + β      w_ih [I, 4H], w_hh [H, 4H]; γ, β [4H]
        i, f, g, o = σ(z_i), σ(z_f), tanh(z_g), σ(z_o)
        c_t = f ⊙ c_{t-1} + i ⊙ g ;  h_t = o ⊙ tanh(γ_c ⊙ LN(c_t) + β_c) ;  y_t = h_t

    Args:
      hidden_size: H (>= 1).
      eps: ε inside the square root of every LN (PyTorch's ``nn.LayerNorm`` default, 1e-5).
      forget_bias: added to the forget-gate block ``β[H:2H]`` at init.
      w_ih_init, w_hh_init: optional initializers ``(key, shape, dtype) -> array``; by default PyTorch's
        U(−1/√H, 1/√H).
      gain_init, shift_init: optional initializers of the gains ``γ_ih, γ_hh, γ_c`` and the shifts
        ``β, β_c``; by default ones and zeros, as in Ba et al.

    Returns:
      A `Cell` whose params are `LayerNormLSTMParams` and whose carry is `LSTMCarry(h, c)`.

    Raises:
      TypeError: if ``hidden_size`` is not an int.
      ValueError: if ``hidden_size`` is below 1, or ``eps`` is not > 0.

    Examples:
      >>> import jax, rnnjax as rj
      >>> cell = rj.layer_norm_lstm(16, forget_bias=1.0)
      >>> params = cell.init(jax.random.key(0), input_size=4)
      >>> carry, ys = rj.unroll(cell, params, jax.numpy.ones((3, 7, 4)))
      >>> ys.shape
      (3, 7, 16)
    """
    config = cell_config("layer_norm_lstm", locals())
    H = check_hidden_size(hidden_size)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    default = uniform_init(1.0 / H**0.5)

    def init(key: Array, input_size: int, dtype: Any = None) -> LayerNormLSTMParams:
        I = check_input_size(input_size)
        dtype = check_float_dtype(dtype)
        k_ih, k_hh, k_gx, k_gh, k_gc, k_b, k_bc = jax.random.split(key, 7)
        gain = gain_init or (lambda k, shape, dt: jnp.ones(shape, dt))
        shift = shift_init or (lambda k, shape, dt: jnp.zeros(shape, dt))
        beta = shift(k_b, (4 * H,), dtype)
        if forget_bias:
            beta = beta.at[H : 2 * H].add(jnp.asarray(forget_bias, dtype))
        return LayerNormLSTMParams(
            w_ih=(w_ih_init or default)(k_ih, (I, 4 * H), dtype),
            w_hh=(w_hh_init or default)(k_hh, (H, 4 * H), dtype),
            gamma_ih=gain(k_gx, (4 * H,), dtype),
            gamma_hh=gain(k_gh, (4 * H,), dtype),
            beta=beta,
            gamma_c=gain(k_gc, (H,), dtype),
            beta_c=shift(k_bc, (H,), dtype),
        )

    def initial_carry(params: LayerNormLSTMParams, batch_shape: tuple[int, ...] = ()) -> LSTMCarry:
        zeros = jnp.zeros((*tuple(batch_shape), H), params.w_hh.dtype)
        return LSTMCarry(h=zeros, c=zeros)

    def gates(params: LayerNormLSTMParams, zx: Array, zh: Array, carry: LSTMCarry) -> tuple[LSTMCarry, tuple]:
        ax, rx = _normalise(zx, eps)
        ah, rh = _normalise(zh, eps)
        z = _lift(params.gamma_ih, ax) * ax + _lift(params.gamma_hh, ah) * ah + _lift(params.beta, ax)
        c, act = lstm_update(z, None, carry.c)
        c_hat, rc = _normalise(c, eps)
        h = act[..., 3 * H :] * jnp.tanh(_lift(params.gamma_c, c) * c_hat + _lift(params.beta_c, c))
        return LSTMCarry(h=h, c=c), (act, ax, ah, c_hat, jnp.concatenate([rx, rh, rc], axis=-1))

    def gates_bwd(
        params: LayerNormLSTMParams, res: tuple, prev: LSTMCarry, new: LSTMCarry, d_new: LSTMCarry
    ) -> tuple[Array, Array, LSTMCarry, tuple[RowSum, ...]]:
        act, ax, ah, c_hat, r = res
        o = act[..., 3 * H :]
        tn = jnp.tanh(_lift(params.gamma_c, c_hat) * c_hat + _lift(params.beta_c, c_hat))
        # backprop through h_t = o tanh(γ_c ĉ + β_c), then ĉ = LN(c_t), then the cell update and gates
        dn = d_new.h * o * (1 - tn * tn)
        dc = d_new.c + _normalise_bwd(dn * _lift(params.gamma_c, dn), c_hat, r[..., 2:3])
        dz, dc_prev = lstm_update_bwd(act, prev.c, d_new.h * tn, dc)
        # backprop through z = γ_ih LN(zx) + γ_hh LN(zh) + β
        dzx = _normalise_bwd(dz * _lift(params.gamma_ih, dz), ax, r[..., 0:1])
        dzh = _normalise_bwd(dz * _lift(params.gamma_hh, dz), ah, r[..., 1:2])
        # this step's share of the gains' and shifts' gradients, summed over the batch
        sums = tuple(map(RowSum, (dz * ax, dz * ah, dz, dn * c_hat, dn)))
        return dzx, dzh, LSTMCarry(h=jnp.zeros_like(dc_prev), c=dc_prev), sums

    def extra_grads(
        params: LayerNormLSTMParams,
        grads: dict[str, Array],
        dzx: Array,
        dzh: Array,
        prevs: LSTMCarry,
        res: tuple,
        sums: tuple[Array, ...],
    ) -> dict[str, Array]:
        # the steps' batch sums ([T+1, 4H] or [T+1, H], zero at masked steps), added once over all T
        names = ("gamma_ih", "gamma_hh", "beta", "gamma_c", "beta_c")
        return {name: steps_sum(s) for name, s in zip(names, sums, strict=True)}

    def check_params(params: Any, input_size: int, dtype: Any) -> None:
        check_projection_params(
            params,
            name="layer_norm_lstm",
            fields=LayerNormLSTMParams._fields,
            gate_count=4,
            hidden_size=H,
            input_size=input_size,
            dtype=dtype,
            extra_shapes={
                "gamma_ih": (4 * H,),
                "gamma_hh": (4 * H,),
                "beta": (4 * H,),
                "gamma_c": (H,),
                "beta_c": (H,),
            },
        )

    return Cell(
        init=init,
        initial_carry=initial_carry,
        hidden_size=H,
        name="layer_norm_lstm",
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
