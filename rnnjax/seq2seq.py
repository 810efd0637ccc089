"""Encoder-decoder glue (many-to-many, unsynced): teacher forcing for training, a step function for decoding.

Training (teacher forcing): the encoder's final carry initialises the decoder, which reads the target
sequence shifted right by one (``start, y_1, ..., y_{T-1}``) and predicts ``y_1, ..., y_T``::

    enc_carry, _ = rj.unroll(enc_cell, enc_params, xs, lengths=src_lengths)
    dec_in = rj.embed(embedding, rj.seq2seq.shift_right(targets, start_token))  # [B, T, E]
    _, hs = rj.unroll(dec_cell, dec_params, dec_in, enc_carry, lengths=tgt_lengths)
    loss = rj.losses.sequence_cross_entropy(head.apply(head_params, hs), targets, tgt_lengths)

Both recurrences use the hand-derived BPTT; the decoder's gradient reaches the encoder through its initial
carry. Inference: `decoder_step` turns the decoder into the ``step_fn`` of `rnnjax.decode`.
(Sutskever, Vinyals and Le, "Sequence to sequence learning with neural networks", NeurIPS 2014, §2.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cells.base import Cell
from rnnjax.checks import check_array
from rnnjax.layers import DenseParams, dense, embed

Array = jax.Array
PyTree = Any


def shift_right(targets: Array, start_token: int) -> Array:
    """The decoder inputs of teacher forcing: ``targets [B, T] -> [start, y_1, ..., y_{T-1}]``.

    Args:
      targets: ``[B, T]`` integer token ids.
      start_token: the id that opens every decoder input.

    Returns:
      ``[B, T]`` in the dtype of ``targets``: ``start_token``, then ``targets[:, :-1]``.

    Raises:
      ValueError: if ``targets`` is not an integer ``[B, T]`` array.

    Examples:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> rj.seq2seq.shift_right(jnp.array([[5, 6, 7]]), start_token=1)
      Array([[1, 5, 6]], dtype=int32)
    """
    targets = check_array(targets, "targets", "an integer array [B, T]", jnp.integer)
    if targets.ndim != 2 or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(
            f"targets must be an integer array [B, T], got shape {targets.shape} and dtype {targets.dtype}"
        )
    if targets.shape[1] == 0:  # no steps: no inputs either (not the start token alone)
        return targets
    start = jnp.full((targets.shape[0], 1), start_token, targets.dtype)
    return jnp.concatenate([start, targets[:, :-1]], axis=1)


def decoder_step(
    cell: Cell, params: PyTree, embedding: Array, head_params: DenseParams
) -> Callable[[PyTree, Array], tuple[PyTree, Array]]:
    """``step_fn(carry, tokens [B]) -> (carry, logits [B, V])`` for `rnnjax.decode`.

    Args:
      cell: the decoder's cell.
      params: its params.
      embedding: ``[V, E]`` the token embedding table (the decoder's inputs).
      head_params: the `rnnjax.dense` read-out from ``H`` to ``V`` logits.

    Returns:
      ``step_fn(carry, tokens [B]) -> (carry, logits [B, V])``: embeds the tokens, steps the cell once and
      reads out the logits, in the dtype of the params.

    Examples:
      An (untrained) GRU decoder started from zeros, greedy for 4 tokens:

      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> V, E, H = 5, 3, 8
      >>> k_cell, k_emb, k_head = jax.random.split(jax.random.key(0), 3)
      >>> cell, head = rj.gru(H), rj.dense(V)
      >>> params = cell.init(k_cell, input_size=E)
      >>> step_fn = rj.seq2seq.decoder_step(
      ...     cell, params, jax.random.normal(k_emb, (V, E)), head.init(k_head, H))
      >>> out = rj.decode.greedy(step_fn, cell.initial_carry(params, (2,)), jnp.array([0, 0]), 4)
      >>> out.tokens.shape, out.state.h.shape
      ((2, 4), (2, 8))
    """
    head = dense(head_params.w.shape[1])

    def step_fn(carry: PyTree, tokens: Array) -> tuple[PyTree, Array]:
        carry, h = cell.step(params, carry, embed(embedding, tokens))
        return carry, head.apply(head_params, h)

    return step_fn
