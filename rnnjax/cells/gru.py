r"""Gated recurrent unit, PyTorch's variant: gate order ``r, z, n``, reset applied after the recurrent GEMM.

Equations (one step; B batch, I input, H hidden, G = 3H)::

    zx_t = x_t w_ih + b       [B, 3H]     b = [b_ir + b_hr, b_iz + b_hz, b_in]
    zh_t = h_{t-1} w_hh        [B, 3H]
    r   = σ(zx_r + zh_r)
    z   = σ(zx_z + zh_z)
    hn  = zh_n + b_hn                       the recurrent part of the candidate, [B, H]
    n   = tanh(zx_n + r ⊙ hn)
    h_t = (1 − z) ⊙ n + z ⊙ h_{t-1}
    y_t = h_t

PyTorch's ``nn.GRU`` maps one to one: ``w_ih = weight_ih_l0ᵀ``, ``w_hh = weight_hh_l0ᵀ``,
``b[:2H] = (bias_ih_l0 + bias_hh_l0)[:2H]``, ``b[2H:] = bias_ih_l0[2H:]``, ``b_hn = bias_hh_l0[2H:]``.

Hand-derived backward, given ``dh_t``::

    dn  = dh_t ⊙ (1 − z) ;  dz = dh_t ⊙ (h_{t-1} − n) ;  dh_{t-1} ⊇ dh_t ⊙ z      # through the blend
    dan = dn ⊙ (1 − n²)                                                         # through tanh
    dr  = dan ⊙ hn ;  dhn = dan ⊙ r                                               # through r ⊙ hn
    dar = dr ⊙ r(1 − r) ;  daz = dz ⊙ z(1 − z)                                    # through the sigmoids
    dzx_t = [dar, daz, dan]        dzh_t = [dar, daz, dhn]                        both [B, 3H]
    d b_hn = Σ_t Σ_b dhn            (summed over the batch in the loop, over T after it)

The forward keeps, per step, ``[r, z, n]`` ([B, 3H], the shape of ``zx_t``: it goes over the row of the
projection its step has read, and ``dzx_t`` over it in turn, `rnnjax.scan.residual_slot`), ``hn`` ([B, H])
and the carry ``h_t``; the backward stacks ``dzx_t`` and ``dhn`` (dzh's other 2H columns are dzx's).

Reference: K. Cho et al., "Learning phrase representations using RNN encoder-decoder" (2014), §2.3; the
reset-after form is cuDNN's and PyTorch's (see the ``torch.nn.GRU`` documentation).
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
    add_bias,
    cell_config,
    check_float_dtype,
    check_hidden_size,
    check_input_size,
    check_projection_params,
    steps_sum,
    uniform_init,
)

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]


class GRUParams(NamedTuple):
    """Parameters of the GRU cell; gate blocks ordered r, z, n along the last axis."""

    w_ih: Array  # [I, 3H]
    w_hh: Array  # [H, 3H]
    b: Array  # [3H]
    b_hn: Array  # [H]


def gru(
    hidden_size: int,
    *,
    w_ih_init: Initializer | None = None,
    w_hh_init: Initializer | None = None,
    b_init: Initializer | None = None,
) -> Cell:
    """A GRU cell with PyTorch's gate order (r, z, n) and its reset-after-product candidate.

    Equations (``x_t [B, I]``, ``h_t [B, H]``; ``w_ih [I, 3H]``, ``w_hh [H, 3H]``, ``b [3H]``, ``b_hn [H]``)::

        [zx_r, zx_z, zx_n] = x_t w_ih + b ;  [zh_r, zh_z, zh_n] = h_{t-1} w_hh
        r = σ(zx_r + zh_r) ;  z = σ(zx_z + zh_z) ;  n = tanh(zx_n + r ⊙ (zh_n + b_hn))
        h_t = (1 − z) ⊙ n + z ⊙ h_{t-1} ;  y_t = h_t

    Args:
      hidden_size: H (>= 1).
      w_ih_init, w_hh_init, b_init: optional initializers ``(key, shape, dtype) -> array``; by default
        PyTorch's U(−1/√H, 1/√H), with the r and z blocks of ``b`` the sum of two such draws (PyTorch's
        ``b_ih + b_hh``) and the n block and ``b_hn`` one draw each.

    Returns:
      A `Cell` whose params are `GRUParams` and whose carry is `HCarry(h)`.

    Raises:
      TypeError: if ``hidden_size`` is not an int.
      ValueError: if ``hidden_size`` is below 1.

    Examples:
      >>> import jax, rnnjax as rj
      >>> cell = rj.gru(8)
      >>> params = cell.init(jax.random.key(0), input_size=2)
      >>> carry, ys = rj.unroll(cell, params, jax.numpy.ones((4, 6, 2)), reverse=True)
      >>> ys.shape
      (4, 6, 8)
    """
    config = cell_config("gru", locals())
    H = check_hidden_size(hidden_size)
    default = uniform_init(1.0 / H**0.5)

    def init(key: Array, input_size: int, dtype: Any = None) -> GRUParams:
        I = check_input_size(input_size)
        dtype = check_float_dtype(dtype)
        k_ih, k_hh, k_b1, k_b2, k_bhn = jax.random.split(key, 5)
        if b_init is None:
            b = default(k_b1, (3 * H,), dtype)
            b = b.at[: 2 * H].add(default(k_b2, (2 * H,), dtype))
            b_hn = default(k_bhn, (H,), dtype)
        else:
            b = b_init(k_b1, (3 * H,), dtype)
            b_hn = b_init(k_bhn, (H,), dtype)
        return GRUParams(
            w_ih=(w_ih_init or default)(k_ih, (I, 3 * H), dtype),
            w_hh=(w_hh_init or default)(k_hh, (H, 3 * H), dtype),
            b=b,
            b_hn=b_hn,
        )

    def initial_carry(params: GRUParams, batch_shape: tuple[int, ...] = ()) -> HCarry:
        return HCarry(h=jnp.zeros((*tuple(batch_shape), H), params.w_hh.dtype))

    def gates(params: GRUParams, zx: Array, zh: Array, carry: HCarry) -> tuple[HCarry, tuple[Array, Array]]:
        r = jax.nn.sigmoid(zx[..., 0 * H : 1 * H] + zh[..., 0 * H : 1 * H])
        z = jax.nn.sigmoid(zx[..., 1 * H : 2 * H] + zh[..., 1 * H : 2 * H])
        hn = add_bias(zh[..., 2 * H : 3 * H], params.b_hn)
        n = jnp.tanh(zx[..., 2 * H : 3 * H] + r * hn)
        h = (1 - z) * n + z * carry.h
        return HCarry(h=h), (jnp.concatenate([r, z, n], axis=-1), hn)

    def gates_bwd(
        params: GRUParams, res: tuple[Array, Array], prev: HCarry, new: HCarry, d_new: HCarry
    ) -> tuple[Array, Array, HCarry, RowSum]:
        rzn, hn = res
        r, z, n = rzn[..., 0 * H : 1 * H], rzn[..., 1 * H : 2 * H], rzn[..., 2 * H : 3 * H]
        dh = d_new.h
        # backprop through h_t = (1 - z) n + z h_{t-1}
        dn = dh * (1 - z)
        dz = dh * (prev.h - n)
        dh_prev = dh * z
        # backprop through n = tanh(zx_n + r hn)
        dan = dn * (1 - n * n)
        dr = dan * hn
        dhn = dan * r
        # backprop through the sigmoids of r and z
        dar = dr * r * (1 - r)
        daz = dz * z * (1 - z)
        dzx = jnp.concatenate([dar, daz, dan], axis=-1)
        dzh = jnp.concatenate([dar, daz, dhn], axis=-1)
        # hn = zh_n + b_hn: this step's share of d b_hn, summed over the batch by the driver (aux)
        return dzx, dzh, HCarry(h=dh_prev), RowSum(dhn)

    def extra_grads(
        params: GRUParams, grads: dict, dzx: None, dzh: None, prevs: None, res: None, d_b_hn: Array
    ) -> dict[str, Array]:
        return {"b_hn": steps_sum(d_b_hn)}  # the steps' batch sums of dhn, added once over all T

    def check_params(params: Any, input_size: int, dtype: Any) -> None:
        check_projection_params(
            params,
            name="gru",
            fields=GRUParams._fields,
            gate_count=3,
            hidden_size=H,
            input_size=input_size,
            dtype=dtype,
            extra_shapes={"b_hn": (H,)},
        )

    return Cell(
        init=init,
        initial_carry=initial_carry,
        hidden_size=H,
        name="gru",
        backward=GatesBackward(
            gates=gates,
            gates_bwd=gates_bwd,
            gate_names=("r", "z", "n"),
            extra_grads=extra_grads,
            extra_from_aux=True,
            dzh_shared=2 * H,
        ),
        check_params=check_params,
        config=config,
    )
