"""Sequence losses that respect variable lengths: cross-entropy, squared error, CTC.

Every loss takes ``lengths [B]`` (steps ``t >= lengths[b]`` are padding and contribute nothing) and
averages over the *valid* steps only, so padding never dilutes the loss or its gradient. A batch with no
valid step has loss 0.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import optax

from rnnjax.scan import mask_from_lengths

Array = jax.Array


def valid_mask(lengths: Array | None, B: int, T: int) -> Array:
    """``mask [B, T]`` bool, True at steps ``t < lengths[b]`` (all True when ``lengths`` is None)."""
    if lengths is None:
        return jnp.ones((B, T), bool)
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"lengths must be an integer array [B], got dtype {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape [B] = ({B},), got shape {lengths.shape}")
    return mask_from_lengths(lengths, T).T


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
      The scalar ``Σ_valid −log softmax(logits)[target] / (number of valid steps)``, in nats.
    """
    if jnp.ndim(logits) != 3:
        raise ValueError(f"logits must have shape [B, T, V], got shape {jnp.shape(logits)}")
    B, T, _ = logits.shape
    if jnp.shape(targets) != (B, T):
        raise ValueError(f"targets must have shape [B, T] = ({B}, {T}), got shape {jnp.shape(targets)}")
    if not jnp.issubdtype(jnp.asarray(targets).dtype, jnp.integer):
        raise TypeError(f"targets must be integer class ids, got dtype {jnp.asarray(targets).dtype}")
    return _cross_entropy(logits, targets, lengths)


# Each loss's computation is one compiled program (inlined under an outer jit); called eagerly,
# sequence_cross_entropy compiled 28 small programs and ctc 46. The shape checks run first, in Python, and
# valid_mask's checks of lengths at trace time.
@jax.jit
def _cross_entropy(logits: Array, targets: Array, lengths: Array | None) -> Array:
    B, T, _ = logits.shape
    per_step = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return _masked_mean(per_step, valid_mask(lengths, B, T))


def squared_error(predictions: Array, targets: Array, lengths: Array | None = None) -> Array:
    """Mean squared error over the valid steps and all features: ``Σ_valid ‖p − y‖² / (valid steps × F)``.

    Args:
      predictions: ``[B, T, F]``.
      targets: ``[B, T, F]``, same shape.
      lengths: ``[B]`` integers; None means every step is valid.
    """
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
    per_step = jnp.sum((predictions - targets) ** 2, axis=-1) / F
    return _masked_mean(per_step, valid_mask(lengths, B, T))


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

    Returns:
      ``[B]`` negative log-likelihoods (take ``.mean()`` for a batch loss).
    """
    if jnp.ndim(logits) != 3:
        raise ValueError(f"logits must have shape [B, T, K], got shape {jnp.shape(logits)}")
    B = logits.shape[0]
    if jnp.ndim(labels) != 2 or jnp.shape(labels)[0] != B:
        raise ValueError(f"labels must have shape [B, N] with B={B}, got shape {jnp.shape(labels)}")
    return _ctc(logits, lengths, labels, label_lengths, blank_id)


@partial(jax.jit, static_argnums=4)
def _ctc(logits: Array, lengths: Array | None, labels: Array, label_lengths: Array, blank_id: int) -> Array:
    B, T, _ = logits.shape
    N = labels.shape[1]
    logit_paddings = 1.0 - valid_mask(lengths, B, T).astype(logits.dtype)
    label_paddings = 1.0 - valid_mask(label_lengths, B, N).astype(logits.dtype)
    # optax's CTC mixes float32 constants into its recursion: keep it working for callers who run with
    # jax_numpy_dtype_promotion="strict" (as our tests do) by promoting normally inside it
    with jax.numpy_dtype_promotion("standard"):
        return optax.ctc_loss(logits, logit_paddings, labels, label_paddings, blank_id=blank_id)
