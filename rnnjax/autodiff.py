"""The reference twin: the very same forward as the hand-derived path, differentiated by JAX.

``rj.unroll(..., grad="autodiff")`` runs `autodiff_unroll`, which is `rnnjax.scan.forward` with no
`jax.custom_vjp` around it: the hand-derived BPTT (`rnnjax.bptt`) uses the same function as its primal, so a
disagreement between the two gradients can only come from the hand-derived backward. This path also supports
plain forward mode (``jax.jvp``, ``jax.jacfwd``).
"""

from __future__ import annotations

from typing import Any

import jax

from rnnjax.cells.base import Cell
from rnnjax.scan import forward

Array = jax.Array
PyTree = Any


def autodiff_unroll(
    cell: Cell,
    reverse: bool,
    unroll: int | bool,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
) -> tuple[PyTree, PyTree]:
    """``(final_carry, ys)`` with JAX's own derivative; same signature as `rnnjax.bptt.bptt_unroll`."""
    return forward(cell, params, xs, carry0, mask, reverse, unroll)
