r"""LSTM with a recurrent projection (LSTMP; PyTorch's ``nn.LSTM(..., proj_size=P)``), gates ``i, f, g, o``.

Equations (one step; B batch, I input, H cell width, P projection width < H, G = 4H)::

    z_t = x_t w_ih + h_{t-1} w_hh + b              w_ih [I, 4H], w_hh [P, 4H], b [4H], z_t [B, 4H]
    i, f, g, o = σ(z_i), σ(z_f), tanh(z_g), σ(z_o) each [B, H]
    c_t = f ⊙ c_{t-1} + i ⊙ g                       c_t [B, H]
    r_t = o ⊙ tanh(c_t)                              r_t [B, H]: the plain LSTM's hidden state
    h_t = r_t w_hr                                   w_hr [H, P], h_t [B, P]
    y_t = h_t

The recurrence and the outputs run through the P-wide ``h``: the recurrent GEMM shrinks from ``H x 4H`` to
``P x 4H`` (Sak, Senior and Beaufays 2014). PyTorch's module maps one to one: ``w_ih = weight_ih_l0ᵀ``,
``w_hh = weight_hh_l0ᵀ``, ``w_hr = weight_hr_l0ᵀ``, ``b = bias_ih_l0 + bias_hh_l0``
(`rnnjax.from_torch` does it). The carry is ``LSTMCarry(h [B, P], c [B, H])``.

Hand-derived backward, given ``dh_t`` [B, P] and ``dc_t`` [B, H]::

    dr  = dh_t w_hrᵀ                           # [B, H]: the one extra GEMM inside the backward loop
    do  = dr ⊙ tanh(c_t)
    dc  = dc_t + dr ⊙ o ⊙ (1 − tanh²(c_t))
    di  = dc ⊙ g ;  df = dc ⊙ c_{t-1} ;  dg = dc ⊙ i ;  dc_{t-1} = dc ⊙ f
    dzx_t = dzh_t = [di ⊙ i(1−i), df ⊙ f(1−f), dg ⊙ (1−g²), do ⊙ o(1−o)]       [B, 4H]
    d w_hr = Σ_t r_tᵀ dh_t                     # once over all T, after the loop: (r_t, dh_t) is the aux

The forward keeps, per step, ``[i, f, g, o]`` ([B, 4H], the shape of ``zx_t``: it goes over the row of the
projection its step has read, and ``dzx_t`` over it in turn, `rnnjax.scan.residual_slot`), ``tanh(c_t)``
([B, H]) and the carries. The backward stacks ``dzx_t`` and, for ``d w_hr``, ``r_t`` (rebuilt in the loop
from ``o`` and ``tanh(c_t)``) and ``dh_t``.

Reference: H. Sak, A. Senior and F. Beaufays, "Long short-term memory recurrent neural network
architectures for large scale acoustic modeling", Interspeech 2014 (the LSTMP of §2.2, without peepholes).
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
    WeightGemm,
    cell_config,
    check_float_dtype,
    check_hidden_size,
    check_input_size,
    check_projection_params,
    uniform_init,
)
from rnnjax.cells.lstm import lstm_update, lstm_update_bwd

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]


class ProjectedLSTMParams(NamedTuple):
    """Parameters of the projected LSTM: the LSTM's (``w_hh`` reads the P-wide ``h``) and the projection."""

    w_ih: Array  # [I, 4H]
    w_hh: Array  # [P, 4H]
    b: Array  # [4H]
    w_hr: Array  # [H, P]


def projected_lstm(
    hidden_size: int,
    proj_size: int,
    *,
    forget_bias: float = 0.0,
    w_ih_init: Initializer | None = None,
    w_hh_init: Initializer | None = None,
    w_hr_init: Initializer | None = None,
    b_init: Initializer | None = None,
) -> Cell:
    """An LSTM whose hidden state is projected to ``proj_size`` features (PyTorch's ``proj_size``).

    Equations (``x_t [B, I]``, ``h_t [B, P]``, ``c_t [B, H]``)::

        z_t = x_t w_ih + h_{t-1} w_hh + b                 w_ih [I, 4H], w_hh [P, 4H], b [4H]
        i, f, g, o = σ(z_i), σ(z_f), tanh(z_g), σ(z_o)    each [B, H]
        c_t = f ⊙ c_{t-1} + i ⊙ g ;  h_t = (o ⊙ tanh(c_t)) w_hr ;  y_t = h_t      w_hr [H, P]

    Args:
      hidden_size: H, the width of the cell state and of each gate (>= 1).
      proj_size: P, the width of ``h`` and of the outputs (1 <= P < H, as PyTorch requires).
      forget_bias: added to the forget-gate block ``b[H:2H]`` at init.
      w_ih_init, w_hh_init, w_hr_init, b_init: optional initializers ``(key, shape, dtype) -> array``; by
        default PyTorch's U(−1/√H, 1/√H) for every weight, ``b`` the sum of two such draws.

    Returns:
      A `Cell` with ``hidden_size=H`` and ``proj_size=P`` (so ``cell.output_size == P``), params
      `ProjectedLSTMParams` and carry ``LSTMCarry(h [B, P], c [B, H])``.

    Raises:
      TypeError: if ``hidden_size`` or ``proj_size`` is not an int.
      ValueError: if ``hidden_size`` is below 1, or ``proj_size`` is not in ``[1, hidden_size)``.

    Examples:
      >>> import jax, rnnjax as rj
      >>> cell = rj.projected_lstm(16, proj_size=4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> carry, ys = rj.unroll(cell, params, jax.numpy.ones((2, 5, 3)))
      >>> ys.shape, carry.h.shape, carry.c.shape
      ((2, 5, 4), (2, 4), (2, 16))
    """
    config = cell_config("projected_lstm", locals())
    H = check_hidden_size(hidden_size)
    P = check_hidden_size(proj_size, "proj_size")
    if P >= H:
        raise ValueError(f"proj_size must be smaller than hidden_size (P < H), got P={P} and H={H}")
    default = uniform_init(1.0 / H**0.5)

    def init(key: Array, input_size: int, dtype: Any = None) -> ProjectedLSTMParams:
        I = check_input_size(input_size)
        dtype = check_float_dtype(dtype)
        k_ih, k_hh, k_hr, k_b1, k_b2 = jax.random.split(key, 5)
        if b_init is None:
            b = default(k_b1, (4 * H,), dtype) + default(k_b2, (4 * H,), dtype)
        else:
            b = b_init(k_b1, (4 * H,), dtype)
        if forget_bias:
            b = b.at[H : 2 * H].add(jnp.asarray(forget_bias, dtype))
        return ProjectedLSTMParams(
            w_ih=(w_ih_init or default)(k_ih, (I, 4 * H), dtype),
            w_hh=(w_hh_init or default)(k_hh, (P, 4 * H), dtype),
            b=b,
            w_hr=(w_hr_init or default)(k_hr, (H, P), dtype),
        )

    def initial_carry(params: ProjectedLSTMParams, batch_shape: tuple[int, ...] = ()) -> LSTMCarry:
        batch_shape = tuple(batch_shape)
        dtype = params.w_hh.dtype
        return LSTMCarry(h=jnp.zeros((*batch_shape, P), dtype), c=jnp.zeros((*batch_shape, H), dtype))

    def gates(
        params: ProjectedLSTMParams, zx: Array, zh: Array, carry: LSTMCarry
    ) -> tuple[LSTMCarry, tuple[Array, Array]]:
        c, act = lstm_update(zx, zh, carry.c)
        tc = jnp.tanh(c)
        return LSTMCarry(h=(act[..., 3 * H :] * tc) @ params.w_hr, c=c), (act, tc)

    def gates_bwd(
        params: ProjectedLSTMParams,
        res: tuple[Array, Array],
        prev: LSTMCarry,
        new: LSTMCarry,
        d_new: LSTMCarry,
    ) -> tuple[Array, None, LSTMCarry, tuple[Array, Array]]:
        act, tc = res
        o = act[..., 3 * H :]
        # backprop through h_t = r_t w_hr, then r_t = o tanh(c_t), then the LSTM's cell update and gates
        dr = d_new.h @ params.w_hr.T
        dz, dc_prev = lstm_update_bwd(act, prev.c, dr * tc, d_new.c + dr * o * (1 - tc * tc))
        # r_t and dh_t leave as aux: d w_hr = Σ_t r_tᵀ dh_t is one GEMM after the loop
        return dz, None, LSTMCarry(h=jnp.zeros_like(d_new.h), c=dc_prev), (o * tc, d_new.h)

    def extra_grads(
        params: ProjectedLSTMParams,
        grads: dict[str, Array],
        dzx: None,
        dzh: None,
        prevs: None,
        res: None,
        aux: tuple[Array, Array],
    ) -> dict[str, WeightGemm]:
        rs, dhs = aux  # [T+1, B, H] and [T+1, B, P], zero at masked steps and in the spare row
        return {"w_hr": WeightGemm(rs, dhs)}  # Σ_t r_tᵀ dh_t, one GEMM by the driver

    def check_params(params: Any, input_size: int, dtype: Any) -> None:
        check_projection_params(
            params,
            name="projected_lstm",
            fields=ProjectedLSTMParams._fields,
            gate_count=4,
            hidden_size=H,
            input_size=input_size,
            dtype=dtype,
            extra_shapes={"w_hh": (P, 4 * H), "w_hr": (H, P)},
        )

    return Cell(
        init=init,
        initial_carry=initial_carry,
        hidden_size=H,
        name="projected_lstm",
        backward=GatesBackward(
            gates=gates,
            gates_bwd=gates_bwd,
            gate_names=("i", "f", "g", "o"),
            extra_grads=extra_grads,
            extra_from_aux=True,
        ),
        check_params=check_params,
        proj_size=P,
        config=config,
    )
