"""Truncated backpropagation through time: long streams in chunks of K steps.

The state is carried forward across chunks, but no gradient flows back through a chunk boundary: the
gradient is ``Σ_k ∂L_k/∂θ`` with each chunk's incoming carry held constant (Williams and Peng, "An efficient
gradient-based algorithm for on-line training of recurrent network trajectories", Neural Computation 1990;
the "BPTT(h; h)" scheme of Williams and Zipser 1995). Memory is that of one chunk, whatever the length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from rnnjax.sharding import (
    batch_split,
    explicit_spec,
    merge_rows,
    reshard_like,
    reshard_to,
    row_groups,
    split_rows,
    sum_to_type,
    vary_like,
)

Array = jax.Array
PyTree = Any
ChunkLoss = Callable[[PyTree, PyTree, PyTree], tuple[Array, PyTree]]
PerRow = Literal["sum", "mean"]
PER_ROW: tuple[str, ...] = get_args(PerRow)


def truncated_bptt(
    chunk_loss: ChunkLoss,
    params: PyTree,
    carry: PyTree,
    stream: PyTree,
    *,
    chunk_size: int,
    per_row: PerRow | None = None,
) -> tuple[Array, PyTree, PyTree]:
    """Loss, truncated gradient and final carry of a whole sequence processed in chunks.

    Args:
      chunk_loss: ``chunk_loss(params, carry, chunk) -> (loss, carry)``, the loss of one chunk and the carry
        after it; ``chunk`` is ``stream`` cut to ``[B, K, ...]`` along axis 1. It typically calls
        ``rj.unroll(cell, params, chunk_inputs, carry)`` and scores the outputs.
      params: the parameters to differentiate.
      carry: the carry entering the first chunk.
      stream: a pytree of ``[B, T, ...]`` arrays (inputs, targets, ...) sharing T.
      chunk_size: K >= 1. A last, shorter chunk takes the remaining ``T mod K`` steps.
      per_row: what the loss is over the rows, where the batch is split over devices. None (default): any
        function of the whole batch; each chunk's gradient is then `jax.grad` of it, which sums the
        parameters' gradient over the devices inside the loop, once per chunk. ``"sum"`` or ``"mean"``:
        the chunk loss is the sum (or the mean) over the rows of terms that each read one row only (no
        batch statistics): each device then runs every chunk on its own rows and the gradients are summed
        over the devices once, after the last chunk (`jax.shard_map` on an explicit mesh, one group of rows
        per device on `~jax.sharding.AxisType.Auto` axes). The results are those of ``None``; on one
        device it changes nothing. A ``per_row`` that does not describe the loss scales the loss and the
        gradient by the number of devices: under `jax.experimental.checkify` (on
        `~jax.sharding.AxisType.Auto` axes) the first chunk is also scored whole, and a disagreement is
        an error.

    Returns:
      ``(loss, grads, carry)``: the sum of the chunk losses, the truncated gradient ``Σ_k ∂L_k/∂params``
      (each chunk's incoming carry a constant), and the carry after the last chunk (pass it to the next
      call to continue a stream).

    Raises:
      ValueError: if ``chunk_size`` is not an int >= 1, ``per_row`` is not None, "sum" or "mean", or
        ``stream`` is empty or its arrays do not share one T on axis 1.

    Examples:
      An LSTM over a stream of T = 12 steps in chunks of K = 4, the carry passed on from chunk to chunk:

      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.lstm(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> def chunk_loss(params, carry, chunk):
      ...     carry, ys = rj.unroll(cell, params, chunk["x"], carry)
      ...     return jnp.mean((ys - chunk["y"]) ** 2), carry
      >>> stream = {"x": jnp.ones((2, 12, 3)), "y": jnp.zeros((2, 12, 4))}
      >>> loss, grads, carry = rj.truncated_bptt(
      ...     chunk_loss, params, cell.initial_carry(params, (2,)), stream, chunk_size=4)
      >>> loss.shape, grads.w_hh.shape, carry.h.shape
      ((), (4, 16), (2, 4))
    """
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    leaves = jax.tree.leaves(stream)
    if not leaves:
        raise ValueError("stream must hold at least one [B, T, ...] array")
    lengths = {jnp.shape(a)[1] if jnp.ndim(a) >= 2 else None for a in leaves}
    if len(lengths) != 1 or None in lengths:
        raise ValueError(
            f"every array of stream must have shape [B, T, ...] with one T, got T values {lengths}"
        )
    if per_row is not None and per_row not in PER_ROW:
        raise ValueError(f"per_row must be None or one of {PER_ROW}, got {per_row!r}")
    rows = {jnp.shape(a)[0] for a in leaves} | {
        jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(carry)
    }
    if per_row is not None and len(rows) != 1:
        raise ValueError(
            f"with per_row={per_row!r} every array of stream and carry must lead with one batch axis B "
            f"(the rows the devices split), got B values {rows}"
        )
    if per_row is None:
        return _truncated(chunk_loss, chunk_size, params, carry, stream)
    return _per_device(chunk_loss, chunk_size, per_row, params, carry, stream)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _per_device(
    chunk_loss: ChunkLoss, chunk_size: int, per_row: PerRow, params: PyTree, carry: PyTree, stream: PyTree
) -> tuple[Array, PyTree, PyTree]:
    """`_truncated` run on each device's own rows, where the batch of ``stream`` is split over devices: the
    parameters' gradient stays per device across the chunks and is summed once, after the last. A loss
    that is a mean over the rows is the mean of the devices' means (each holds as many rows).

    A ``per_row`` that does not describe the loss would scale it, and the gradient, by the device count,
    with nothing else to show: under `jax.experimental.checkify` the first chunk's loss is also computed
    whole and must agree (a `checkify.debug_check`; without checkify its operands are compiled away)."""
    run = partial(_truncated, chunk_loss, chunk_size)
    loss, grads, final, devices = _rows_run(run, params, carry, stream)
    if devices == 1:  # no split batch: per_row changes nothing
        return loss, grads, final
    if per_row == "mean":
        loss, grads = loss / devices, jax.tree.map(lambda g: g / devices, grads)
    T = jax.tree.leaves(stream)[0].shape[1]
    first = jax.tree.map(lambda a: a[:, : min(chunk_size, T)], stream)
    whole = chunk_loss(params, jax.lax.stop_gradient(carry), first)[0]
    split = _rows_run(run, params, carry, first)[0]
    split = split / devices if per_row == "mean" else split
    # a wrong per_row is off by a factor of the device count (>= 2); rounding is far below a quarter, and a
    # loss that is not finite is for the other checks to name
    tol = min(0.25, 64 * float(jnp.finfo(jnp.result_type(whole)).eps))
    agree = jnp.abs(split - whole) <= tol * jnp.abs(whole) + jnp.finfo(jnp.result_type(whole)).tiny
    checkify.debug_check(
        agree | ~jnp.isfinite(whole) | ~jnp.isfinite(split),
        f"truncated_bptt(..., per_row={per_row!r}): on the first chunk the devices' losses combine to {{}} "
        f"but chunk_loss of the whole batch is {{}}: per_row must say whether the loss is the sum or the "
        f"mean over the rows of terms that read one row each",
        split,
        whole,
    )
    return loss, grads, final


def _rows_run(
    run: Callable[[PyTree, PyTree, PyTree], tuple[Array, PyTree, PyTree]],
    params: PyTree,
    carry: PyTree,
    stream: PyTree,
) -> tuple[Array, PyTree, PyTree, int]:
    """``run(params, carry, stream) -> (loss, grads, carry)`` on each device's own rows, the losses and the
    gradients summed over the devices once, at the end, and the number of devices (1: run as given, where
    the batch is not split)."""
    leaves = jax.tree.leaves(stream)
    first = next((a for a in leaves if batch_split(a) is not None or row_groups(a) > 1), leaves[0])
    split = batch_split(first)
    if split is not None and not any(explicit_spec(leaf) is not None for leaf in jax.tree.leaves(params)):
        mesh, rows = split
        (axes,) = rows
        names = tuple(jax.tree.leaves(axes))

        def per_rows(p: PyTree, c: PyTree, s: PyTree) -> tuple[Array, PyTree, PyTree]:
            loss, grads, c = run(p, c, s)  # the gradient summed over the devices once, at its end
            return jax.lax.psum(loss, names), grads, c

        per = jax.shard_map(
            per_rows,
            mesh=mesh,
            in_specs=(jax.P(), rows, rows),
            out_specs=(jax.P(), jax.P(), rows),
            axis_names=set(names),
        )
        placed = (params, reshard_to(carry, rows, mesh), reshard_to(stream, rows, mesh))
        loss, grads, final = per(*placed)
        return loss, grads, reshard_like(final, carry), math.prod(mesh.shape[a] for a in names)
    groups = row_groups(first)
    if groups == 1:  # no mesh of Auto axes, or rows that do not divide over its devices
        return (*run(params, carry, stream), 1)
    losses, grads, final = jax.vmap(run, in_axes=(None, 0, 0))(
        params, split_rows(carry, groups), split_rows(stream, groups)
    )
    grads = jax.tree.map(lambda g: jnp.sum(g, axis=0), grads)  # the one sum over the devices
    return jnp.sum(losses), grads, merge_rows(final), groups


# One compiled program after the checks (inlined under an outer jit), so that an eager call compiles one
# program rather than one per operation.
@partial(jax.jit, static_argnums=(0, 1))
def _truncated(
    chunk_loss: ChunkLoss, chunk_size: int, params: PyTree, carry: PyTree, stream: PyTree
) -> tuple[Array, PyTree, PyTree]:
    T = jax.tree.leaves(stream)[0].shape[1]
    n_full, rest = divmod(T, chunk_size)
    grad_fn = jax.value_and_grad(chunk_loss, has_aux=True)

    def one_chunk(params: PyTree, carry: PyTree, chunk: PyTree) -> tuple[Array, PyTree, PyTree]:
        (loss, carry), grads = grad_fn(params, jax.lax.stop_gradient(carry), chunk)
        return loss, grads, carry

    # Inside jax.shard_map, the params cast to vary by device like the stream: each chunk's gradient stays
    # per device and is summed over the devices once, at the end (a replicated parameter's gradient through
    # jax.grad is that sum), not once per chunk. The loop's accumulators take the types one chunk gives.
    # Over a mesh (Auto or Explicit axes) each chunk's gradient is summed over the devices in the loop, once
    # per chunk: it is jax.grad of the user's loss of the whole batch, and cutting the rows into per-device
    # groups would change what a loss that is not a sum of per-row terms computes (batch statistics); the
    # user who knows theirs is one says so with per_row= (`_per_device`).
    # Explicit axes offer an unsummed accumulator: parameters typed ``P(reduced=...)`` get cotangents typed
    # ``P(unreduced=...)``; but JAX refuses an elementwise operation between a reduced value and one split
    # over the same axes (a cell's bias added to its batch-split rows), so it would need every use inside
    # the loss resharded by hand. A per-device loss under jax.shard_map sums once.
    typed, params = params, vary_like(params, stream, carry)
    first = jax.tree.map(lambda a: a[:, : min(chunk_size, T)], stream)
    loss_t, grads_t, carry_t = jax.eval_shape(one_chunk, params, carry, first)
    total = vary_like(jnp.zeros((), jnp.result_type(*jax.tree.leaves(params))), loss_t)
    grads = vary_like(jax.tree.map(jnp.zeros_like, params), grads_t)
    carry = vary_like(reshard_like(carry, carry_t), carry_t)  # e.g. a replicated carry, a split stream
    if n_full:
        # [B, n_full*K, ...] -> [n_full, B, K, ...]: one scan over the chunks
        chunks = jax.tree.map(
            lambda a: jnp.moveaxis(
                a[:, : n_full * chunk_size].reshape(a.shape[0], n_full, chunk_size, *a.shape[2:]), 1, 0
            ),
            stream,
        )

        def body(loop: tuple, chunk: PyTree) -> tuple[tuple, None]:
            total, grads, carry = loop
            loss, g, carry = one_chunk(params, carry, chunk)
            return (total + loss.astype(total.dtype), jax.tree.map(jnp.add, grads, g), carry), None

        (total, grads, carry), _ = jax.lax.scan(body, (total, grads, carry), chunks)
    if rest:
        loss, g, carry = one_chunk(params, carry, jax.tree.map(lambda a: a[:, n_full * chunk_size :], stream))
        total, grads = total + loss.astype(total.dtype), jax.tree.map(jnp.add, grads, g)
    return total, sum_to_type(grads, typed), carry
