r"""Minimal gated unit (MGU): one gate that both forgets and resets.

Equations (one step; B batch, I input, H hidden)::

    zx_t = x_t w_ih + b            [B, 2H]   = [zx_f, zx_h]
    f    = σ(zx_f + h_{t-1} w_hh)                 w_hh [H, H]: the driver's recurrent GEMM feeds the gate only
    h̃    = tanh(zx_h + (f ⊙ h_{t-1}) u_h)          u_h [H, H]: a second GEMM, after the gate, inside the step
    h_t  = (1 − f) ⊙ h_{t-1} + f ⊙ h̃
    y_t  = h_t

Hand-derived backward, given ``dh_t``::

    dh̃  = dh ⊙ f ;  dah = dh̃ ⊙ (1 − h̃²)
    dfh = dah u_hᵀ                                  the gradient of f ⊙ h_{t-1} (the loop's second GEMM)
    df  = dh ⊙ (h̃ − h_{t-1}) + dfh ⊙ h_{t-1} ;  daf = df ⊙ f (1 − f)
    dzx_t = [daf, dah] ;  dzh_t = daf               (the driver adds dzh w_hhᵀ to dh_{t-1})
    dh_{t-1} ⊇ dh ⊙ (1 − f) + dfh ⊙ f
    d u_h = Σ_t (f ⊙ h_{t-1})ᵀ dah                  once over all T, after the loop

The forward keeps, per step, ``[f, h̃]`` ([B, 2H]) and the carry.

Reference: G.-B. Zhou, J. Wu, C.-L. Zhang and Z.-H. Zhou, "Minimal gated unit for recurrent neural
networks", International Journal of Automation and Computing 13 (2016), eq. 8.
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
    WeightGemm,
    cell_config,
    check_float_dtype,
    check_hidden_size,
    check_input_size,
    check_projection_params,
    uniform_init,
)

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]


class MGUParams(NamedTuple):
    """Parameters of the MGU; ``w_ih`` and ``b`` blocks ordered f (gate), h̃ (candidate)."""

    w_ih: Array  # [I, 2H]
    w_hh: Array  # [H, H], the gate's recurrent weight
    u_h: Array  # [H, H], the candidate's recurrent weight (applied to f ⊙ h)
    b: Array  # [2H]


def mgu(
    hidden_size: int,
    *,
    w_ih_init: Initializer | None = None,
    w_hh_init: Initializer | None = None,
    b_init: Initializer | None = None,
) -> Cell:
    """A minimal gated unit: ``h_t = (1 − f) ⊙ h_{t-1} + f ⊙ tanh(x w_h + (f ⊙ h_{t-1}) u_h + b_h)``.

    Equations (``x_t [B, I]``, ``h_t [B, H]``)::

        [zx_f, zx_h] = x_t w_ih + b                      w_ih [I, 2H], b [2H]
        f = σ(zx_f + h_{t-1} w_hh)                       w_hh [H, H]
        h̃ = tanh(zx_h + (f ⊙ h_{t-1}) u_h)               u_h [H, H]
        h_t = (1 − f) ⊙ h_{t-1} + f ⊙ h̃ ;  y_t = h_t

    Args:
      hidden_size: H, the width of the hidden state (>= 1).
      w_ih_init, w_hh_init, b_init: optional initializers ``(key, shape, dtype) -> array``; by default
        U(−1/√H, 1/√H) for every weight (``w_hh_init`` makes both ``w_hh`` and ``u_h``) and for ``b``.

    Returns:
      A `Cell` whose params are `MGUParams` and whose carry is `HCarry(h)`.

    Raises:
      TypeError: if ``hidden_size`` is not an int.
      ValueError: if ``hidden_size`` is below 1.

    Examples:
      >>> import jax, rnnjax as rj
      >>> cell = rj.mgu(8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> carry, ys = rj.unroll(cell, params, jax.numpy.ones((2, 5, 3)))
      >>> ys.shape, params.w_hh.shape, params.u_h.shape
      ((2, 5, 8), (8, 8), (8, 8))
    """
    config = cell_config("mgu", locals())
    H = check_hidden_size(hidden_size)
    default = uniform_init(1.0 / H**0.5)

    def init(key: Array, input_size: int, dtype: Any = None) -> MGUParams:
        I = check_input_size(input_size)
        dtype = check_float_dtype(dtype)
        k_ih, k_hh, k_uh, k_b = jax.random.split(key, 4)
        return MGUParams(
            w_ih=(w_ih_init or default)(k_ih, (I, 2 * H), dtype),
            w_hh=(w_hh_init or default)(k_hh, (H, H), dtype),
            u_h=(w_hh_init or default)(k_uh, (H, H), dtype),
            b=(b_init or default)(k_b, (2 * H,), dtype),
        )

    def initial_carry(params: MGUParams, batch_shape: tuple[int, ...] = ()) -> HCarry:
        return HCarry(h=jnp.zeros((*tuple(batch_shape), H), params.w_hh.dtype))

    def gates(params: MGUParams, zx: Array, zh: Array, carry: HCarry) -> tuple[HCarry, Array]:
        h = carry.h
        f = jax.nn.sigmoid(zx[..., :H] + zh)
        cand = jnp.tanh(zx[..., H:] + (f * h) @ params.u_h)
        return HCarry(h=(1 - f) * h + f * cand), jnp.concatenate([f, cand], axis=-1)

    def gates_bwd(
        params: MGUParams, res: Array, prev: HCarry, new: HCarry, d_new: HCarry
    ) -> tuple[Array, Array, HCarry]:
        f, cand = res[..., :H], res[..., H:]
        h, dh = prev.h, d_new.h
        dah = dh * f * (1 - cand * cand)
        # through (f ⊙ h) u_h: the transpose of the linear map v ↦ v u_h, which JAX types as the map's
        # input, rows like dah's (written dah u_hᵀ, the product would take its type from u_hᵀ's columns)
        (dfh,) = jax.linear_transpose(lambda v: v @ params.u_h, dah)(dah)
        daf = (dh * (cand - h) + dfh * h) * f * (1 - f)
        return jnp.concatenate([daf, dah], axis=-1), daf, HCarry(h=dh * (1 - f) + dfh * f)

    def extra_grads(
        params: MGUParams, grads: dict, dzx: Array, dzh: Array, prevs: HCarry, res: Array
    ) -> dict[str, WeightGemm]:
        # h̃ reads (f ⊙ h_{t-1}) u_h: d u_h = Σ_t (f ⊙ h_{t-1})ᵀ dah, one GEMM over all T and B
        fh, dah = res[..., :H] * prevs.h, dzx[..., H:]
        return {"u_h": WeightGemm(fh, dah)}

    def check_params(params: Any, input_size: int, dtype: Any) -> None:
        check_projection_params(
            params,
            name="mgu",
            fields=MGUParams._fields,
            gate_count=2,
            hidden_size=H,
            input_size=input_size,
            dtype=dtype,
            extra_shapes={"u_h": (H, H)},
            recurrent_gate_count=1,
        )

    return Cell(
        init=init,
        initial_carry=initial_carry,
        hidden_size=H,
        name="mgu",
        backward=GatesBackward(
            gates=gates,
            gates_bwd=gates_bwd,
            gate_names=("f", "candidate"),
            extra_grads=extra_grads,
            dzh_shared=H,
        ),
        check_params=check_params,
        config=config,
    )
