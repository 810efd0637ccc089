"""Memory-saving BPTT: checkpoint the carry every K steps and recompute each segment in the backward.

With ``rj.unroll(..., checkpoint=K)`` (or ``"sqrt"`` for K = ⌈√T⌉) the time axis is cut into ⌈T/K⌉ segments.
The forward keeps only the carry entering each segment; the backward walks the segments in reverse, re-runs
one segment's forward (keeping that segment's residuals) and applies the same hand-derived BPTT to it. The
residual memory falls from O(T) to O(T/K + K) steps — O(√T) for K = √T — for one extra forward pass
(Chen et al., "Training deep nets with sublinear memory cost", 2016; Gruslys et al., "Memory-efficient
backpropagation through time", NeurIPS 2016, §3). Inputs, outputs and their gradients are O(T) as always.

Each segment is sliced out of ``xs`` inside the loop, so no copy of the inputs is made, and an input
gradient nobody asked for is never accumulated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cells.base import Cell

Array = jax.Array
PyTree = Any


def segment_length(checkpoint: int | str, T: int) -> int:
    """K for ``checkpoint`` (an int >= 1, or ``"sqrt"`` for ⌈√T⌉) and a sequence of T steps."""
    if checkpoint == "sqrt":
        return max(1, math.isqrt(max(T - 1, 0)) + 1) if T > 1 else 1
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 1:
        raise ValueError(
            f"checkpoint must be None, 'sqrt' or an int >= 1 (steps per segment), got {checkpoint!r}"
        )
    return checkpoint


def checkpointed_unroll(
    impl: Callable[..., tuple[PyTree, PyTree]],
    K: int,
    cell: Cell,
    reverse: bool,
    unroll: int | bool,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
) -> tuple[PyTree, PyTree]:
    """``impl`` (the hand-derived or the autodiff unroll) over segments of K steps, each rematerialised.

    Same signature and result as ``impl``: ``xs [B, T, I]``, ``mask [T, B]`` or None. The ⌊T/K⌋ full
    segments run in one `jax.lax.scan` that slices its segment out of ``xs`` (no copy of ``xs`` is made);
    the remaining ``T mod K`` steps run as one shorter segment, last in time order.
    """
    B, T = xs.shape[:2]
    n = T // K
    rest = T - n * K

    def run(carry: PyTree, x: Array, m: Array | None) -> tuple[PyTree, PyTree]:
        return impl(cell, reverse, unroll, params, x, carry, m)

    @jax.checkpoint
    def segment(carry: PyTree, s: Array) -> tuple[PyTree, PyTree]:
        x = jax.lax.dynamic_slice_in_dim(xs, s * K, K, axis=1)
        m = None if mask is None else jax.lax.dynamic_slice_in_dim(mask, s * K, K, axis=0)
        return run(carry, x, m)

    def full_segments(carry: PyTree) -> tuple[PyTree, PyTree]:
        carry, ys = jax.lax.scan(segment, carry, jnp.arange(n), reverse=reverse)
        # leaves [n, B, K, ...] -> [B, n*K, ...]
        return carry, jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(B, n * K, *y.shape[3:]), ys)

    def tail(carry: PyTree) -> tuple[PyTree, PyTree]:
        return jax.checkpoint(run)(carry, xs[:, n * K :], None if mask is None else mask[n * K :])

    # time order: the full segments cover [0, nK), the tail [nK, T); reverse visits the tail first
    parts = [p for p, size in ((full_segments, n), (tail, rest)) if size]
    outs = []
    carry = carry0
    for part in reversed(parts) if reverse else parts:
        carry, ys = part(carry)
        outs.append(ys)
    if reverse:
        outs.reverse()
    ys = outs[0] if len(outs) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *outs)
    return carry, ys
