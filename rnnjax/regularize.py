r"""Regularisers inside the recurrence: variational dropout, zoneout and DropConnect on ``w_hh``.

`Regularizer` describes them; `rj.unroll(..., regularize=rj.Regularizer(...), key=k)` draws the masks
from ``k`` and runs them (with ``key=None``, inference: each regulariser's expectation). For a built-in cell
with ``zx_t = x_t w_ih + b`` and ``zh_t = h_{t-1} w_hh``:

- **input dropout** (Gal and Ghahramani, "A theoretically grounded application of dropout in recurrent
  neural networks", NeurIPS 2016): ``x_t ⊙ m_x`` with one mask ``m_x [B, I]`` per sequence, the same at
  every step. It acts before the hoisted input GEMM, outside the recursion, so JAX's derivative of the
  product around the hand-derived BPTT multiplies the input gradient by the same mask.
- **state dropout** (the same paper's recurrent dropout, Keras's ``recurrent_dropout``):
  ``zh_t = (h_{t-1} ⊙ m_h) w_hh`` with one mask ``m_h [B, H]`` per sequence. Only the ``h`` that enters
  ``w_hh`` is masked (the GRU's interpolation and the MGU's ``(f ⊙ h) u_h`` read it whole). Inside the
  recursion, so the hand-derived backward (`rnnjax.bptt`) multiplies by the same mask:
  ``dh_{t-1} += (dzh_t w_hhᵀ) ⊙ m_h`` and ``d w_hh = Σ_t (h_{t-1} ⊙ m_h)ᵀ dzh_t``.
- **zoneout** (Krueger et al., "Zoneout: regularizing RNNs by randomly preserving hidden activations",
  ICLR 2017): every unit of every carry leaf keeps its previous value with probability p at each step,
  ``c_t = z_t ⊙ c_{t-1} + (1 − z_t) ⊙ c̃_t`` with masks ``z [T, B, H]``; for the LSTMs on ``h`` and ``c``
  (``zoneout_c`` may differ), ``h̃_t = o ⊙ tanh(c̃_t)``. At inference ``z = p``, the expectation. The
  hand-derived backward gives the gates the un-zoned carry ``c̃_t`` (kept for it) and the gradient
  ``(1 − z_t) ⊙ dc_t``, and adds ``z_t ⊙ dc_t`` to ``dc_{t-1}``.
- **weight drop** (DropConnect on the recurrent weights, the "weight drop" of Merity et al., "Regularizing
  and optimizing LSTM language models", ICLR 2018): ``w_hh ⊙ M`` with one mask ``M [H, G]`` for the whole
  batch, before the unroll, so the recurrent GEMM keeps its shape and JAX's derivative of the product
  multiplies ``d w_hh`` by ``M``.

Dropout is inverted: kept entries are scaled by ``1/(1 − p)``, so that at inference (no key) dropout is the
identity. Masks are drawn over the whole batch as one device would draw them, and split like the batch on a
mesh (as `rj.stack`'s dropout is): the same key gives the same training on any mesh.

Which cells: input dropout, any cell; state dropout and weight drop, the cells whose recurrence is a GEMM
``h w_hh`` (`elman`, `lstm`, `gru`, `mgu`, `peephole_lstm`, `layer_norm_lstm`, `projected_lstm`); zoneout,
every built-in cell (on the LRU a unit's real and imaginary parts are kept together). The others are
refused with an error naming the cells that fit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import Cell
from rnnjax.sharding import batch_like

Array = jax.Array
PyTree = Any

GEMM_CELLS = "elman, lstm, gru, mgu, peephole_lstm, layer_norm_lstm, projected_lstm"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Regularizer:
    """Regularisers inside the recurrence of `rj.unroll` (see the module's docstring for each).

    Attributes:
      input_dropout: probability of dropping each input feature, one mask per sequence.
      state_dropout: probability of dropping each unit of ``h`` entering ``h w_hh``, one mask per sequence.
      zoneout: probability that a unit of the carry keeps its previous value, per step and unit.
      zoneout_c: the same for the cell state ``c`` of the LSTMs; None: ``zoneout``.
      weight_drop: probability of dropping each entry of ``w_hh``, one mask per batch.

    Every probability is in ``[0, 1)``; 0 turns a regulariser off.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.lstm(8)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> reg = rj.Regularizer(state_dropout=0.25, zoneout=0.1)
      >>> train = rj.unroll(cell, params, jnp.ones((2, 5, 3)), regularize=reg, key=jax.random.key(1))
      >>> infer = rj.unroll(cell, params, jnp.ones((2, 5, 3)), regularize=reg)  # the expectation
    """

    input_dropout: float = 0.0
    state_dropout: float = 0.0
    zoneout: float = 0.0
    zoneout_c: float | None = None
    weight_drop: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            p = getattr(self, f.name)
            if p is None and f.name == "zoneout_c":
                continue
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"Regularizer.{f.name} must be a probability in [0, 1), got {p!r}")

    @property
    def zoneout_of_c(self) -> float:
        """The zoneout probability of the cell state ``c``."""
        return self.zoneout if self.zoneout_c is None else self.zoneout_c

    @property
    def zones(self) -> bool:
        return self.zoneout > 0 or self.zoneout_of_c > 0


class Noise(NamedTuple):
    """The masks that act inside the recursion, as the drivers take them (flat batch B).

    Attributes:
      state: ``[B, H]`` scaled dropout mask on ``h`` entering ``h w_hh``, or None.
      zone: like the carry, leaves ``[T, B, H]`` (training: 1 where a unit keeps its previous value, else
        0) or ``[T, 1, 1]`` (inference: p), time-major; or None.
    """

    state: Array | None = None
    zone: PyTree | None = None


def check_regularize(regularize: Any, key: Any, cell: Cell, params: PyTree) -> Regularizer | None:
    """``regularize`` validated against ``cell`` and ``params``; None when nothing is regularised."""
    if regularize is None:
        if key is not None:
            raise ValueError(
                "key is given but regularize is None: pass regularize=rj.Regularizer(...), or no key"
            )
        return None
    if not isinstance(regularize, Regularizer):
        raise TypeError(f"regularize must be an rj.Regularizer or None, got {type(regularize).__name__}")
    if key is not None and not _is_key(key):
        raise TypeError(f"key must be a PRNG key (jax.random.key(seed)) or None, got {type(key).__name__}")
    gemm = cell.is_builtin and hasattr(params, "w_hh")
    for name in ("state_dropout", "weight_drop"):
        if getattr(regularize, name) and not gemm:
            raise ValueError(
                f"regularize={regularize!r}: {name} needs a cell whose recurrence is the GEMM h w_hh "
                f"({GEMM_CELLS}); got {cell.name!r}"
            )
    if regularize.zones and not cell.is_builtin:
        raise ValueError(
            f"regularize={regularize!r}: zoneout needs a built-in cell (with a hand-derived backward); "
            f"got the user-written cell {cell.name!r}"
        )
    return regularize


def _is_key(key: Any) -> bool:
    dtype = getattr(key, "dtype", None)
    if dtype is None:
        return False
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
        return getattr(key, "shape", None) == ()
    return dtype == jnp.uint32 and getattr(key, "shape", None) == (2,)  # a raw jax.random.PRNGKey


def _keep(key: Array, p: float, shape: tuple[int, ...], dtype: Any) -> Array:
    """An inverted-dropout mask: ``1/(1 − p)`` with probability ``1 − p``, else 0."""
    keep = jax.random.bernoulli(key, 1.0 - p, shape)
    return jnp.where(keep, jnp.asarray(1.0 / (1.0 - p), dtype), jnp.zeros((), dtype))


def draw(
    reg: Regularizer, key: Array | None, cell: Cell, params: PyTree, xs: Array, carry0: PyTree
) -> tuple[Array | None, Array | None, Noise | None]:
    """The masks of ``reg`` for ``xs [B, T, I]`` and ``carry0`` (leaves ``[B, H]``): ``(input_mask
    [B, 1, I], weight_mask [H, G], noise)``, each None where off, split like the rows of ``xs`` on a mesh.

    With ``key=None`` (inference) only zoneout acts, as its expectation (``z = p``, ``[T, 1, 1]``). One key
    per regulariser (``jax.random.split(key, 4)``), so that turning one on leaves the others' masks as
    they were.
    """
    B, T, I = xs.shape
    dtype = xs.dtype
    fields = getattr(carry0, "_fields", None)
    probs = jax.tree.map(lambda _: reg.zoneout, carry0)
    if fields is not None:  # the LSTMs' cell state may have its own probability
        probs = type(carry0)(**{f: reg.zoneout_of_c if f == "c" else reg.zoneout for f in fields})
    if key is None:
        if not reg.zones:
            return None, None, None
        return None, None, Noise(None, jax.tree.map(lambda p: jnp.full((T, 1, 1), p, dtype), probs))
    k_in, k_state, k_zone, k_w = jax.random.split(key, 4)
    rows = lambda a: batch_like(a, xs, 1)  # noqa: E731  # the rows of xs: split like them on a mesh
    input_mask = weight_mask = state = zone = None
    if reg.input_dropout:
        input_mask = rows(_keep(k_in, reg.input_dropout, (B, 1, I), dtype))
    if reg.weight_drop:
        weight_mask = _keep(k_w, reg.weight_drop, params.w_hh.shape, dtype)
    if reg.state_dropout:
        state = rows(_keep(k_state, reg.state_dropout, (B, params.w_hh.shape[0]), dtype))
    if reg.zones:
        leaves, treedef = jax.tree.flatten(carry0)
        keys = jax.random.split(k_zone, len(leaves))
        r = max(cell.diagonal, 1)  # the LRU's units are r entries N apart: kept together
        zone_leaves = []
        for k, leaf, p in zip(keys, leaves, jax.tree.leaves(probs), strict=True):
            H = leaf.shape[-1]
            units = H // r if H % r == 0 else H
            z = jax.random.bernoulli(k, p, (B, T, units)).astype(dtype)
            if units != H:
                z = jnp.tile(z, (1, 1, r))
            zone_leaves.append(jnp.swapaxes(rows(z), 0, 1))  # time-major [T, B, H]
        zone = jax.tree.unflatten(treedef, zone_leaves)
    noise = None if state is None and zone is None else Noise(state, zone)
    return input_mask, weight_mask, noise


def noise_steps(noise: Noise | None, start: Any, size: int) -> Noise | None:
    """``noise`` for the ``size`` steps from ``start`` (an int or a traced one): the zoneout masks sliced in
    time, the per-sequence state mask whole. For the memory schedules' segments."""
    if noise is None or noise.zone is None:
        return noise
    return noise._replace(
        zone=jax.tree.map(lambda z: jax.lax.dynamic_slice_in_dim(z, start, size, axis=0), noise.zone)
    )
