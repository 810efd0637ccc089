"""Truncated backpropagation through time: long streams in chunks of K steps.

The state is carried forward across chunks, but no gradient flows back through a chunk boundary: the
gradient is ``Σ_k ∂L_k/∂θ`` with each chunk's incoming carry held constant (Williams and Peng, "An efficient
gradient-based algorithm for on-line training of recurrent network trajectories", Neural Computation 1990;
the "BPTT(h; h)" scheme of Williams and Zipser 1995). Memory is that of one chunk, whatever the length.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.sharding import reshard_like, sum_to_type, vary_like

Array = jax.Array
PyTree = Any
ChunkLoss = Callable[[PyTree, PyTree, PyTree], tuple[Array, PyTree]]


def truncated_bptt(
    chunk_loss: ChunkLoss, params: PyTree, carry: PyTree, stream: PyTree, *, chunk_size: int
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

    Returns:
      ``(loss, grads, carry)``: the sum of the chunk losses, the truncated gradient ``Σ_k ∂L_k/∂params``
      (each chunk's incoming carry a constant), and the carry after the last chunk (pass it to the next
      call to continue a stream).

    Raises:
      ValueError: if ``chunk_size`` is not an int >= 1, or ``stream`` is empty or its arrays do not share
        one T on axis 1.

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
    return _truncated(chunk_loss, chunk_size, params, carry, stream)


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
    # groups (as `rnnjax.remat.rows_per_device` does for unroll's own, row-independent steps) would change
    # what a loss that is not a sum of per-row terms computes (a mean over the rows, batch statistics).
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
