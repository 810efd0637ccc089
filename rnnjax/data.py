"""Batches from sequences of different lengths: padding to one array, and batching by similar length.

A list of ``[T_i, ...]`` sequences becomes ``xs [B, T, ...]`` and ``lengths [B]`` with `pad_sequences`, in the
layout that `rnnjax.unroll`, the layers and `rnnjax.losses` read: row ``b`` holds its sequence in steps
``t < lengths[b]`` and padding after it, which never reaches an output, a carry, a loss or a gradient.

Padding costs compute (every row runs ``T`` steps), so a data set whose lengths vary widely is best cut into
batches of similar lengths (`bucket_by_length`), each padded to its own longest; `unbucket` puts the
batches' results back in the data set's order.

    >>> import numpy as np
    >>> import rnnjax as rj
    >>> seqs = [np.ones((t, 2), np.float32) for t in (5, 1, 4, 2)]
    >>> batches = rj.bucket_by_length([len(s) for s in seqs], batch_size=2)
    >>> [b.tolist() for b in batches]
    [[1, 3], [2, 0]]
    >>> xs, lengths = rj.pad_sequences([seqs[i] for i in batches[0]])
    >>> xs.shape, lengths.tolist()
    ((2, 2, 2), [1, 2])

Everything here runs on the host with NumPy, before the arrays go to a device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["bucket_by_length", "pad_sequences", "unbucket"]

PADDINGS = ("post",)
TRUNCATINGS = ("post", "pre")


def pad_sequences(
    seqs: Sequence[Any],
    *,
    max_length: int | None = None,
    padding: str = "post",
    truncating: str = "post",
    value: float = 0.0,
    dtype: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pads ``B`` sequences ``[T_i, ...]`` at their ends into one array ``[B, T, ...]``, with their lengths.

    Row ``b`` of ``xs`` holds ``seqs[b]`` in steps ``t < lengths[b]`` and ``value`` after them: the layout of
    rnnjax's ``lengths`` (`rnnjax.unroll`, the layers, `rnnjax.losses`), where the valid steps come first.
    Padding in front (Keras's ``padding="pre"``) is not offered: with it, ``lengths`` would point at the
    padding, and a model run with them would read padding as data and drop the sequence's end. To run a
    sequence backwards, pad it here and pass ``reverse=True`` to `rnnjax.unroll`, which steps from
    ``lengths[b] - 1`` down to 0.

    Args:
      seqs: a non-empty list or tuple of array-likes ``[T_i, ...]`` (NumPy or JAX arrays, or nested lists),
        each with at least one axis, all with the same feature shape ``...``; ``T_i`` may differ and may be 0.
      max_length: the ``T`` of the result. None: the longest ``T_i``. A longer sequence is cut to it (see
        ``truncating``), and its length is ``max_length``.
      padding: ``"post"``, the only layout: padding after each sequence.
      truncating: which steps a sequence longer than ``max_length`` keeps: ``"post"`` its first
        ``max_length`` (the end is cut), ``"pre"`` its last ``max_length`` (the start is cut).
      value: the padding value, representable in the result's dtype (an integer for an integer dtype).
      dtype: the result's dtype. None: the sequences' own, which must then be one dtype for all of them.

    Returns:
      ``(xs, lengths)``: ``xs`` a NumPy array ``[B, T, ...]``; ``lengths`` int32 ``[B]``, each
      ``min(T_i, T)``.

    Raises:
      TypeError: ``seqs`` is not a list or tuple, holds a non-numeric array, or mixes dtypes with
        ``dtype=None``; ``max_length`` is not an integer; ``value`` does not fit the dtype.
      ValueError: ``seqs`` is empty, a sequence has no axis, the feature shapes differ, ``max_length`` is
        negative, or ``padding``/``truncating`` is not one of the names above.

    Examples:
      >>> import numpy as np
      >>> import rnnjax as rj
      >>> xs, lengths = rj.pad_sequences([np.array([1, 2, 3]), np.array([4])], value=-1)
      >>> xs.tolist(), lengths.tolist()
      ([[1, 2, 3], [4, -1, -1]], [3, 1])
      >>> xs, lengths = rj.pad_sequences([[1, 2, 3], [4]], max_length=2, truncating="pre", dtype=np.float32)
      >>> xs.tolist(), lengths.tolist(), xs.dtype
      ([[2.0, 3.0], [4.0, 0.0]], [2, 1], dtype('float32'))
    """
    if padding not in PADDINGS:
        hint = (
            ": rnnjax's lengths mark the first lengths[b] steps as valid, so padding goes after them "
            "(for a backward pass over each sequence, pad 'post' and unroll with reverse=True)"
            if padding == "pre"
            else ""
        )
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}{hint}")
    if truncating not in TRUNCATINGS:
        raise ValueError(f"truncating must be one of {TRUNCATINGS}, got {truncating!r}")
    if not isinstance(seqs, (list, tuple)):
        raise TypeError(
            f"seqs must be a list or tuple of [T_i, ...] arrays, got {type(seqs).__name__}"
            + (f" of shape {np.shape(seqs)}" if hasattr(seqs, "shape") else "")
        )
    if not seqs:
        raise ValueError("seqs must hold at least one sequence, got an empty " + type(seqs).__name__)
    if max_length is not None:
        if not _is_int(max_length):
            raise TypeError(f"max_length must be an int or None, got {type(max_length).__name__}")
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")

    arrays = [np.asarray(s) for s in seqs]
    # the dtype of reference: the first non-empty sequence's (an empty list reads as float64)
    ref = next((i for i, a in enumerate(arrays) if a.size), 0)
    for i, a in enumerate(arrays):
        if a.ndim == 0:
            raise ValueError(f"seqs[{i}] must have a time axis, shape [T_i, ...], got a scalar")
        if not _numeric(a.dtype):
            raise TypeError(f"seqs[{i}] must be a numeric array, got dtype {a.dtype}")
        if a.shape[1:] != arrays[0].shape[1:]:
            raise ValueError(
                f"seqs must share one feature shape [T_i, ...]: seqs[0] has shape {arrays[0].shape} "
                f"and seqs[{i}] has shape {a.shape}"
            )
        if dtype is None and a.size and a.dtype != arrays[ref].dtype:
            raise TypeError(
                f"seqs must share one dtype when dtype=None: seqs[{ref}] is {arrays[ref].dtype} and "
                f"seqs[{i}] is {a.dtype}; pass dtype= to convert them"
            )
    out_dtype = np.dtype(dtype) if dtype is not None else arrays[ref].dtype
    if not _numeric(out_dtype):
        raise TypeError(f"dtype must be a numeric or bool dtype, got {out_dtype}")
    if not _fits(value, out_dtype):
        raise TypeError(f"value must be a scalar representable in dtype {out_dtype}, got {value!r}")

    T = max(a.shape[0] for a in arrays) if max_length is None else int(max_length)
    lengths = np.array([min(a.shape[0], T) for a in arrays], np.int32)
    xs = np.full((len(arrays), T, *arrays[0].shape[1:]), value, out_dtype)
    for b, (a, n) in enumerate(zip(arrays, lengths, strict=True)):
        xs[b, :n] = a[:n] if truncating == "post" else a[a.shape[0] - n :]
    return xs, lengths


def bucket_by_length(
    lengths: Any,
    batch_size: int,
    *,
    boundaries: Sequence[int] | None = None,
    shuffle_key: jax.Array | None = None,
) -> list[np.ndarray]:
    """Splits ``N`` sequences into batches of at most ``batch_size`` whose lengths are close.

    Each batch, padded to its own longest sequence, wastes less compute than one padded to the data set's
    longest. Two ways to group:

    - ``boundaries=None``: the sequences sorted by length (equal lengths by index, or at random with
      ``shuffle_key``), cut into consecutive batches: the least padding.
    - ``boundaries=(b_1, ..., b_K)``: ``K + 1`` buckets, lengths ``< b_1``, ``[b_1, b_2)``, ...,
      ``>= b_K``; each bucket in the sequences' order (at random with ``shuffle_key``), cut into batches:
      more padding, but with ``shuffle_key`` the batches' members change from key to key.

    Every sequence is in exactly one batch; a bucket's last batch may be smaller. With ``shuffle_key`` the
    batches' order is shuffled too; without it they come in bucket order, shortest first.

    Args:
      lengths: ``[N]`` non-negative integers, e.g. ``[len(s) for s in seqs]``.
      batch_size: the most sequences in a batch, >= 1.
      boundaries: None, or strictly increasing positive integers: the lengths where buckets start.
      shuffle_key: None, or a `jax.random` key that shuffles as described above (new key, new batches).

    Returns:
      A list of int64 index arrays into ``lengths``, one per batch. `unbucket` inverts the order.

    Raises:
      TypeError: ``lengths`` is not an integer array, or ``batch_size`` is not an int.
      ValueError: ``lengths`` is not 1-D or holds a negative number, ``batch_size < 1``, or ``boundaries``
        is not strictly increasing positive integers.

    Examples:
      >>> import rnnjax as rj
      >>> [b.tolist() for b in rj.bucket_by_length([3, 9, 4, 8, 1], 2)]
      [[4, 0], [2, 3], [1]]
      >>> [b.tolist() for b in rj.bucket_by_length([3, 9, 4, 8, 1], 2, boundaries=[5])]
      [[0, 2], [4], [1, 3]]
    """
    lengths = np.asarray(lengths)
    if not (np.issubdtype(lengths.dtype, np.integer) or lengths.size == 0):
        raise TypeError(f"lengths must be an integer array [N], got dtype {lengths.dtype}")
    if lengths.ndim != 1:
        raise ValueError(f"lengths must have shape [N], got shape {lengths.shape}")
    if lengths.size and lengths.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {lengths.min()} at index {int(lengths.argmin())}")
    if not _is_int(batch_size):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cuts = None if boundaries is None else np.asarray(boundaries)
    if cuts is not None and (
        cuts.ndim != 1
        or not np.issubdtype(cuts.dtype, np.integer)
        or (cuts.size and cuts[0] < 1)
        or np.any(np.diff(cuts) <= 0)
    ):
        raise ValueError(f"boundaries must be strictly increasing positive integers, got {boundaries!r}")

    n = lengths.shape[0]
    keys = None if shuffle_key is None else jax.random.split(shuffle_key)
    order = np.arange(n, dtype=np.int64) if keys is None else np.asarray(jax.random.permutation(keys[0], n))
    if cuts is None:  # sorted by length; equal lengths keep their (shuffled) order
        buckets = [order[np.argsort(lengths[order], kind="stable")]]
    else:
        which = np.searchsorted(cuts, lengths[order], side="right")
        buckets = [order[which == k] for k in range(len(cuts) + 1)]
    batches = [
        bucket[i : i + batch_size].astype(np.int64)
        for bucket in buckets
        for i in range(0, len(bucket), batch_size)
    ]
    if keys is not None:
        batches = [batches[i] for i in np.asarray(jax.random.permutation(keys[1], len(batches)))]
    return batches


def unbucket(batches: Sequence[Any], outputs: Sequence[Any]) -> Any:
    """Joins per-batch results into one, in the order of the data set the batches index.

    The inverse of batching with `bucket_by_length`: ``outputs[k]`` holds the results for the sequences
    ``batches[k]`` along its leading axis, and row ``i`` of the result is sequence ``i``'s. Results with a
    time axis must agree on it across batches (pad each batch to one ``max_length``, or reduce over time
    first, e.g. to a loss per sequence or the final carry).

    Args:
      batches: index arrays that together hold ``0 .. N-1`` exactly once, e.g. from `bucket_by_length`.
      outputs: one result per batch, each an array or a pytree of arrays ``[len(batches[k]), ...]`` of one
        structure and one trailing shape per leaf.

    Returns:
      The results joined, each leaf ``[N, ...]``: NumPy where every piece is NumPy, else JAX.

    Raises:
      ValueError: the batches do not hold ``0 .. N-1`` exactly once, ``len(outputs) != len(batches)``, an
        output's leading axis differs from its batch's size, or the outputs' structures or trailing shapes
        differ.

    Examples:
      >>> import numpy as np
      >>> import rnnjax as rj
      >>> batches = rj.bucket_by_length([3, 9, 4, 8, 1], 2)
      >>> per_batch = [np.array([10 * i for i in b]) for b in batches]  # any function of each batch
      >>> rj.unbucket(batches, per_batch).tolist()
      [0, 10, 20, 30, 40]
    """
    if len(outputs) != len(batches):
        raise ValueError(f"outputs must have one entry per batch, {len(batches)}, got {len(outputs)}")
    if not batches:
        raise ValueError("batches must hold at least one batch, got none")
    index = np.concatenate([np.asarray(b, np.int64).reshape(-1) for b in batches])
    if not np.array_equal(np.sort(index), np.arange(index.size)):
        raise ValueError(
            f"batches must hold each index 0 .. N-1 exactly once (N = {index.size}), got "
            f"{np.setdiff1d(np.arange(index.size), index).tolist()[:5]} missing"
        )
    structure = jax.tree.structure(outputs[0])
    for k, (batch, out) in enumerate(zip(batches, outputs, strict=True)):
        if jax.tree.structure(out) != structure:
            raise ValueError(
                f"outputs must share one pytree structure: outputs[0] is {structure} and outputs[{k}] is "
                f"{jax.tree.structure(out)}"
            )
        for leaf, first in zip(jax.tree.leaves(out), jax.tree.leaves(outputs[0]), strict=True):
            if np.ndim(leaf) == 0 or np.shape(leaf)[0] != len(batch):
                raise ValueError(
                    f"outputs[{k}] must have a leading axis of batches[{k}]'s size {len(batch)}, "
                    f"got shape {np.shape(leaf)}"
                )
            if np.shape(leaf)[1:] != np.shape(first)[1:]:
                raise ValueError(
                    f"outputs must agree on their trailing shapes: outputs[0] has {np.shape(first)} and "
                    f"outputs[{k}] has {np.shape(leaf)}; pad every batch to one max_length, or reduce over "
                    "time first"
                )
    inverse = np.argsort(index)

    def join(*pieces: Any) -> Any:
        xp = np if all(isinstance(p, np.ndarray) for p in pieces) else jnp
        return xp.concatenate(pieces, axis=0)[inverse]

    return jax.tree.map(join, *outputs)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _fits(value: Any, dtype: np.dtype) -> bool:
    """Whether the scalar ``value`` converts to ``dtype`` without changing (NaN to a float dtype does)."""
    if np.ndim(value) != 0 or not isinstance(value, (bool, int, float, complex, np.generic)):
        return False
    try:
        with np.errstate(invalid="ignore", over="ignore"):
            cast = np.asarray(value, dtype)
    except (ValueError, TypeError, OverflowError):
        return False
    return bool(cast == value) or (bool(np.isnan(value)) and jnp.issubdtype(dtype, jnp.inexact))


def _numeric(dtype: np.dtype) -> bool:
    """Numbers and bools, bfloat16 and the other ml_dtypes included (NumPy files those as void)."""
    return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))
