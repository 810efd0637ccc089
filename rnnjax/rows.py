"""What the losses and the decoders ask of a batch's rows, wherever those rows live.

A loss or a decoder treats each row of its batch (a sequence) on its own, and says so through these three
functions, by what it needs rather than by how a device mesh provides it:
- `rows_like`: arrays made beside the batch (targets, labels, masks) typed as its rows;
- `per_row`: a per-sequence computation run on each device's own rows;
- `top_k_rows`: the k largest entries of every row, ranked where the row lives.

Each returns at once, calling no mesh API, where no argument's type names a mesh (one device, no
`jax.set_mesh`). Where the batch is split over devices they do what `rnnjax.sharding` describes. This module
is the only door to `rnnjax.sharding` for `rnnjax.losses` and `rnnjax.decode`; the cells go through none (the
drivers place what they need, see `rnnjax.sharding`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.sharding import batch_like, batch_split, under_mesh

Array = jax.Array
PyTree = Any


def rows_like(tree: PyTree, like: Any) -> PyTree:
    """``tree``'s leaves ``[B, ...]`` typed as rows of ``like [B, ...]``: where the batch of ``like`` is
    split over devices, their batch axes are split as its is (so that an elementwise operation may join
    them, whatever the sharding they came with), and inside `jax.shard_map` they vary by device as it does.
    ``tree`` itself where ``like``'s type names no mesh."""
    return batch_like(tree, like, 1)


def per_row(fn: Callable[..., Array], *args: Array) -> Array:
    """``fn(*args)`` for a ``fn`` that treats each row of its arguments (each ``[B, ...]``, however placed:
    they are typed as rows of ``args[0]``, `rows_like`) on its own and returns ``[B, ...]``.

    Where the batch of ``args[0]`` is split over explicit mesh axes, ``fn`` runs on each device's own rows
    under `jax.shard_map`: no collective is needed, as each row's result is its own. Its varying-axes check
    is off, so that ``fn`` may start a recursion from values that do not vary by device (as `optax.ctc_loss`
    does). Elsewhere ``fn(*args)``, as given.
    """
    split = batch_split(args[0])
    if split is None:
        return fn(*args)
    args = (args[0], *rows_like(args[1:], args[0]))  # each device's rows of every argument
    mesh, spec = split
    per_device = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=spec,
        out_specs=spec,
        axis_names=set(jax.tree.leaves(spec[0])),
        check_vma=False,
    )
    return per_device(*args)


def top_k_rows(x: Array, k: int) -> tuple[Array, Array]:
    """`jax.lax.top_k` over the last axis of ``x [..., V]``: the ``k`` largest values and their indices,
    ties to the lower index.

    Where the computation may be split over devices (`rnnjax.sharding.under_mesh`), as a stable sort,
    which XLA partitions by rows: its TopK kernel all-gathers a batch-split ``x`` and ranks every row on
    every device.
    """
    if not under_mesh(x):
        return jax.lax.top_k(x, k)
    iota = jnp.arange(x.shape[-1], dtype=jnp.int32).reshape((1,) * (x.ndim - 1) + (-1,))
    order = jnp.zeros_like(x, jnp.int32) + iota  # split as x is
    neg, idx = jax.lax.sort((-x, order), dimension=x.ndim - 1, is_stable=True, num_keys=1)
    return -neg[..., :k], idx[..., :k]
