"""Sequence losses that respect variable lengths: cross-entropy, squared error, CTC.

Every loss takes ``lengths [B]`` (steps ``t >= lengths[b]`` are padding and contribute nothing) and
averages over the *valid* steps only, so padding never dilutes the loss or its gradient. A batch with no
valid step has loss 0. Padding may hold anything (NaN, inf, class ids out of range): it is replaced by safe
values before any arithmetic, so it reaches neither the loss nor a gradient (a select after the arithmetic
would keep the loss finite, but its backward multiplies a zero cotangent by the derivative at the padding,
and ``0 · nan`` is NaN).

Value-dependent conditions (lengths in ``[0, T]``, class ids in range) are `rnnjax.checks` debug checks:
free under `jax.jit`, errors under ``checkify.checkify``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from rnnjax.checks import check_array, debug_check_finite, debug_check_not, debug_check_range
from rnnjax.rows import per_row, rows_like
from rnnjax.scan import mask_from_lengths

Array = jax.Array


def valid_mask(
    lengths: Array | None, B: int, T: int, like: Array | None = None, name: str = "lengths"
) -> Array:
    """``mask [B, T]`` bool, True at steps ``t < lengths[b]`` (all True when ``lengths`` is None).

    Args:
      lengths: ``[B]`` integers in ``[0, T]``, or None. Lengths outside ``[0, T]`` (the mask clamps them)
        are an error under ``checkify.checkify``.
      B, T: the batch size and the number of steps.
      like: an array ``[B, ...]``, the values the mask selects, or None. With it the mask is typed as its
        rows: its batch axis split over devices as ``like``'s is, so that a ``where`` may join them on an
        explicit mesh whatever the sharding of ``lengths`` (or with none at all).
      name: how errors name ``lengths``.

    Returns:
      ``[B, T]`` bool.

    Raises:
      TypeError: if ``lengths`` is not an integer array.
      ValueError: if ``lengths`` is not ``[B]``.

    Examples:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> rj.losses.valid_mask(jnp.array([3, 1]), 2, 4)
      Array([[ True,  True,  True, False],
             [ True, False, False, False]], dtype=bool)
    """
    if lengths is None:
        mask = jnp.ones((B, T), bool)
    else:
        lengths = check_array(lengths, name, "an integer array [B]", jnp.integer)
        if lengths.shape != (B,):
            raise ValueError(f"{name} must have shape [B] = ({B},), got shape {lengths.shape}")
        debug_check_range(lengths, 0, T, f"{name} must lie in [0, {T}]")
        mask = mask_from_lengths(lengths, T).T
    return mask if like is None else rows_like(mask, like)


def _padding_to(values: Array, mask: Array, safe: int | float = 0) -> Array:
    """``values [B, T, ...]`` with ``safe`` at the padded steps (``mask [B, T]`` False), typed as rows of
    ``values``: applied before the arithmetic, the padding reaches neither the loss nor its gradient."""
    mask = mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim))
    return jnp.where(mask, values, jnp.full_like(values, safe))


def _finite(loss: Array, name: str) -> Array:
    """``loss``, with a `checkify.debug_check` that it is finite (under ``checkify.checkify``: an overflow
    in the loss itself, when its inputs were finite)."""
    debug_check_finite(loss, f"{name}'s value must be finite")
    return loss


def _masked_mean(values: Array, mask: Array) -> Array:
    total = jnp.sum(jnp.where(mask, values, jnp.zeros_like(values)))
    return total / jnp.maximum(jnp.sum(mask), 1).astype(values.dtype)


def sequence_cross_entropy(logits: Array, targets: Array, lengths: Array | None = None) -> Array:
    """Mean softmax cross-entropy over the valid steps, computed stably from logits.

    Args:
      logits: ``[B, T, V]`` unnormalised log-probabilities.
      targets: ``[B, T]`` integer class ids in ``[0, V)``.
      lengths: ``[B]`` integers; None means every step is valid.

    Returns:
      The scalar ``Σ_valid −log softmax(logits)[target] / (number of valid steps)``, in nats, in the dtype
      of ``logits``.

    Raises:
      ValueError: if ``logits`` is not ``[B, T, V]`` or ``targets`` is not ``[B, T]`` (or ``lengths`` not
        ``[B]``).
      TypeError: if ``targets`` (or ``lengths``) is not an integer array.

    Examples:
      Uniform logits over V = 4 classes cost ``log 4`` per valid step:

      >>> import jax.numpy as jnp, rnnjax as rj
      >>> logits, targets = jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32)
      >>> loss = rj.losses.sequence_cross_entropy(logits, targets, lengths=jnp.array([3, 1]))
      >>> round(float(loss), 4), loss.dtype
      (1.3863, dtype('float32'))
    """
    logits = check_array(logits, "logits", "a floating-point array [B, T, V]", jnp.floating)
    targets = check_array(targets, "targets", "integer class ids", jnp.integer)
    if jnp.ndim(logits) != 3:
        raise ValueError(f"logits must have shape [B, T, V], got shape {jnp.shape(logits)}")
    B, T, _ = logits.shape
    if jnp.shape(targets) != (B, T):
        raise ValueError(f"targets must have shape [B, T] = ({B}, {T}), got shape {jnp.shape(targets)}")
    return _cross_entropy(logits, targets, lengths)


# Each loss's computation is one compiled program (inlined under an outer jit), so that an eager call
# compiles one program rather than one per operation. The shape checks run first, in Python, and
# valid_mask's checks of lengths at trace time.
@jax.jit
def _cross_entropy(logits: Array, targets: Array, lengths: Array | None) -> Array:
    B, T, V = logits.shape
    targets = rows_like(targets, logits)  # each sequence's targets beside its logits
    mask = valid_mask(lengths, B, T, logits)
    debug_check_range(targets, 0, V - 1, f"targets must lie in [0, V) = [0, {V}) at valid steps", mask)
    debug_check_finite(logits, "logits must be finite at valid steps", mask)
    if lengths is not None:
        logits, targets = _padding_to(logits, mask), _padding_to(targets, mask)
    per_step = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return _finite(_masked_mean(per_step, mask), "sequence_cross_entropy")


def squared_error(predictions: Array, targets: Array, lengths: Array | None = None) -> Array:
    """Mean squared error over the valid steps and all features: ``Σ_valid ‖p − y‖² / (valid steps × F)``.

    Args:
      predictions: ``[B, T, F]`` floating-point.
      targets: ``[B, T, F]``, same shape.
      lengths: ``[B]`` integers; None means every step is valid.

    Returns:
      The scalar mean, in the dtype of ``predictions``.

    Raises:
      ValueError: if ``predictions`` is not ``[B, T, F]`` or ``targets`` has another shape (or ``lengths``
        is not ``[B]``).
      TypeError: if ``lengths`` is not an integer array.

    Examples:
      The padded step of the second sequence (length 1) does not count:

      >>> import jax.numpy as jnp, rnnjax as rj
      >>> predictions = jnp.array([[[1.0], [1.0]], [[2.0], [100.0]]])     # [B=2, T=2, F=1]
      >>> rj.losses.squared_error(predictions, jnp.zeros((2, 2, 1)), jnp.array([2, 1]))
      Array(2., dtype=float32)
    """
    predictions = check_array(predictions, "predictions", "a floating-point array [B, T, F]", jnp.floating)
    targets = check_array(targets, "targets", f"an array [B, T, F] of dtype {predictions.dtype}")
    if targets.dtype != predictions.dtype:
        raise TypeError(
            f"targets must have the dtype of predictions {predictions.dtype}, got {targets.dtype}"
        )
    if jnp.ndim(predictions) != 3:
        raise ValueError(f"predictions must have shape [B, T, F], got shape {jnp.shape(predictions)}")
    if jnp.shape(targets) != jnp.shape(predictions):
        raise ValueError(
            f"targets must have the shape of predictions {jnp.shape(predictions)}, got {jnp.shape(targets)}"
        )
    return _squared_error(predictions, targets, lengths)


@jax.jit
def _squared_error(predictions: Array, targets: Array, lengths: Array | None) -> Array:
    B, T, F = predictions.shape
    mask = valid_mask(lengths, B, T, predictions)
    debug_check_finite(predictions, "predictions must be finite at valid steps", mask)
    debug_check_finite(rows_like(targets, predictions), "targets must be finite at valid steps", mask)
    if lengths is not None:
        predictions, targets = (
            _padding_to(predictions, mask),
            _padding_to(rows_like(targets, predictions), mask),
        )
    per_step = jnp.sum((predictions - targets) ** 2, axis=-1) / F
    return _finite(_masked_mean(per_step, mask), "squared_error")


def ctc(
    logits: Array,
    lengths: Array | None,
    labels: Array,
    label_lengths: Array,
    *,
    blank_id: int = 0,
) -> Array:
    """Connectionist temporal classification loss per sequence, through `optax.ctc_loss`.

    ``−log p(labels | inputs)``, summed over all alignments of the label sequence to the valid frames
    (Graves et al., "Connectionist temporal classification", ICML 2006, §3).

    Args:
      logits: ``[B, T, K]``, K classes including the blank.
      lengths: ``[B]`` valid frames per sequence; None means all T.
      labels: ``[B, N]`` integer label ids (right-padded; never ``blank_id`` within the valid part).
      label_lengths: ``[B]`` valid labels per sequence.
      blank_id: the class id of the blank.

    On a mesh with the batch split over explicit axes, each device runs its own sequences. Per device under
    your own `jax.shard_map`, pass it ``check_vma=False``: optax's recursion starts from values that do not
    vary by device, which its type check refuses.

    Returns:
      ``[B]`` negative log-likelihoods in the dtype of ``logits`` (take ``.mean()`` for a batch loss).

    Raises:
      ValueError: if ``logits`` is not ``[B, T, K]`` or ``labels`` is not ``[B, N]`` (or a lengths array is
        not ``[B]``).
      TypeError: if ``lengths`` or ``label_lengths`` is not an integer array.

    Examples:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> logits = jnp.zeros((2, 6, 4))                    # [B, T, K], class 0 the blank
      >>> labels = jnp.array([[1, 2, 0], [3, 0, 0]])       # [B, N], right-padded
      >>> nll = rj.losses.ctc(logits, jnp.array([6, 4]), labels, label_lengths=jnp.array([2, 1]))
      >>> nll.shape, nll.dtype
      ((2,), dtype('float32'))
    """
    if jnp.ndim(logits) != 3:
        raise ValueError(f"logits must have shape [B, T, K], got shape {jnp.shape(logits)}")
    B = logits.shape[0]
    if jnp.ndim(labels) != 2 or jnp.shape(labels)[0] != B:
        raise ValueError(f"labels must have shape [B, N] with B={B}, got shape {jnp.shape(labels)}")
    return _ctc(logits, lengths, labels, label_lengths, blank_id)


@partial(jax.jit, static_argnums=4)
def _ctc(logits: Array, lengths: Array | None, labels: Array, label_lengths: Array, blank_id: int) -> Array:
    B, T, K = logits.shape
    N = labels.shape[1]
    labels = rows_like(labels, logits)  # each sequence's labels beside its logits
    frames = valid_mask(lengths, B, T, logits)
    valid_labels = valid_mask(label_lengths, B, N, logits, name="label_lengths")
    debug_check_range(
        labels, 0, K - 1, f"labels must lie in [0, K) = [0, {K}) within label_lengths", valid_labels
    )
    debug_check_not(
        labels, blank_id, f"labels must not hold blank_id={blank_id} within label_lengths", valid_labels
    )
    debug_check_finite(logits, "logits must be finite at valid steps", frames)
    # optax's recursion blends the padded frames away by multiplication (0 · nan is NaN): select first
    logits, labels = _padding_to(logits, frames), _padding_to(labels, valid_labels, blank_id)
    logit_paddings = 1.0 - frames.astype(logits.dtype)
    label_paddings = 1.0 - valid_labels.astype(logits.dtype)

    def per_sequence(logits: Array, logit_paddings: Array, labels: Array, label_paddings: Array) -> Array:
        # optax's CTC mixes float32 constants into its recursion: keep it working for callers who run with
        # jax_numpy_dtype_promotion="strict" (as our tests do) by promoting normally inside it
        with jax.numpy_dtype_promotion("standard"):
            return optax.ctc_loss(logits, logit_paddings, labels, label_paddings, blank_id=blank_id)

    # each sequence's loss is its own: run on the rows where they live, since optax starts its recursion
    # from values shared by every row, which a scan cannot join with a batch split over devices
    return _finite(per_row(per_sequence, logits, logit_paddings, labels, label_paddings), "ctc")
