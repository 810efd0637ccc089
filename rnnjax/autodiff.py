"""The reference twin: the very same forward as the hand-derived path, differentiated by JAX.

``rj.unroll(..., grad="autodiff")`` runs `autodiff_unroll`, which is `rnnjax.scan.forward` with no
`jax.custom_vjp` around it: the hand-derived BPTT (`rnnjax.bptt`) uses the same function as its primal, so a
disagreement between the two gradients can only come from the hand-derived backward. This path also supports
plain forward mode (``jax.jvp``, ``jax.jacfwd``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cells.base import Cell
from rnnjax.regularize import Noise
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
    noise: Noise | None = None,
) -> tuple[PyTree, PyTree]:
    """``(final_carry, ys)`` with JAX's own derivative; same signature as `rnnjax.bptt.bptt_unroll`."""
    return forward(cell, params, xs, carry0, mask, reverse, unroll, noise)


def probed_autodiff_unroll(
    cell: Cell,
    reverse: bool,
    unroll: int | bool,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    probe: Array,
) -> tuple[PyTree, PyTree]:
    """`autodiff_unroll` with a ``probe [B, T, H]`` whose gradient is ``∂L/∂h_t``; see `probed_bptt_unroll`.

    Each step adds ``probe_t − stop_gradient(probe_t)`` (zero in value, the identity in derivative) to the
    new hidden state, which is both the step's output and the next step's carry. The steps run through the
    cell's own ``step``, so this twin shares no code with the hand-derived path's backward.
    """
    I = xs.shape[-1]

    def step(params: PyTree, carry: PyTree, x_and_p: Array) -> tuple[PyTree, Array]:
        x, p = x_and_p[..., :I], x_and_p[..., I:]
        new, y = cell.step(params, carry, x)
        zero = p - jax.lax.stop_gradient(p)
        return new._replace(h=new.h + zero), y + zero

    probed = Cell(init=cell.init, initial_carry=cell.initial_carry, step=step, name=cell.name)
    return forward(probed, params, jnp.concatenate([xs, probe], axis=-1), carry0, mask, reverse, unroll)
