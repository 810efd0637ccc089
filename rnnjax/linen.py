"""Flax Linen modules around rnnjax: the params live in ``"params"``, the recurrence is `rj.unroll`.

    import flax.errors
import flax.linen as nn
    from rnnjax import linen as rln
    model = rln.RNN(rj.lstm(64))
    variables = model.init(key, xs)                    # xs [B, T, I]: I is read from xs
    carry, ys = model.apply(variables, xs, lengths=lengths)

Each module stores the functional API's params as one entry of its ``"params"`` collection, in the layout
the cell's (or layer's) ``init`` returns: ``variables["params"]["cell"]`` of an `RNN` is the NamedTuple
that ``rj.unroll(cell, params, xs)`` takes. ``grad="manual"`` (the default) makes `jax.grad` of
``model.apply`` run the hand-derived BPTT.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp

from rnnjax._modules import (
    Checkpoint,
    UnrollOptions,
    bidirectional_layer,
    checked_options,
    draws_masks,
    input_size_of,
    rnn_layer,
    stack_layer,
)
from rnnjax.cells.base import Cell
from rnnjax.driver import GradMode, Schedule
from rnnjax.layers import BidirectionalCarry, BidirectionalParams, Layer
from rnnjax.parallel import Method
from rnnjax.regularize import Regularizer

Array = jax.Array
PyTree = Any

__all__ = ["RNN", "Bidirectional", "Stack"]


def _training_key(
    module: nn.Module, draws: bool, deterministic: bool | None, call_deterministic: bool | None
) -> tuple[bool, Array | None]:
    """``(train, key)`` as `flax.linen.Dropout` decides them: where the module draws masks (``draws``),
    training unless ``deterministic`` (the attribute merged with the call's, given in one place), and then
    a key from the module's ``rng_collection`` (``"dropout"`` by default); else ``(False, None)``, and the
    regularisers act as their expectation."""
    if not draws or nn.merge_param("deterministic", deterministic, call_deterministic):
        return False, None
    name = module.rng_collection
    if not isinstance(name, str) or name == "params":
        raise ValueError(
            f"{type(module).__name__}.rng_collection must name an rng stream other than 'params' (a str, "
            f"'dropout' by default), got {name!r}"
        )
    try:
        return True, module.make_rng(name)
    except flax.errors.InvalidRngError as e:
        raise ValueError(
            f"{type(module).__name__} in training (deterministic=False) draws its masks from the {name!r} "
            f"rng (rng_collection): pass model.apply(..., rngs={{{name!r}: key}}), or deterministic=True for "
            "inference"
        ) from e


def _options(module: Any) -> UnrollOptions:
    """The `rj.unroll` options a module's attributes name (every module here has them all)."""
    return checked_options(
        module.checkpoint,
        module.budget,
        module.schedule,
        module.unroll_steps,
        module.method,
        module.chunk_size,
        module.regularize,
    )


class RNN(nn.Module):
    """One cell over a sequence: ``xs [B, T, I] -> (carry, ys [B, T, H])``, as `rj.unroll`.

    Attributes:
      cell: the cell, e.g. ``rj.lstm(64)``.
      reverse: run from the last valid step to the first; ``ys`` stays aligned with ``xs``.
      checkpoint: `rj.unroll`'s ``checkpoint`` (None, ``"none"``, an int K or ``"sqrt"``).
      budget: `rj.unroll`'s ``budget`` (bytes kept for the backward).
      schedule: `rj.unroll`'s ``schedule`` (with ``budget``: ``"binomial"`` or ``"nested"``).
      unroll_steps: `jax.lax.scan`'s unroll factor for the time loops (None: `rj.unroll`'s default).
      method: `rj.unroll`'s ``method`` (one of `rnnjax.METHODS`; ``"associative"`` for linear cells only).
      chunk_size: `rj.unroll`'s ``chunk_size`` (with ``method="associative"``).
      regularize: an `rj.Regularizer` inside the recurrence (dropout, zoneout, weight drop), or None. In
        training (``deterministic=False``) its masks come from the ``rng_collection`` rng, as
        `flax.linen.Dropout`'s do (``model.apply(..., rngs={"dropout": key})``); with
        ``deterministic=True`` it acts as its expectation.
      deterministic: True for inference, False for training; None leaves it to ``__call__`` (needed, in
        one of the two places, where ``regularize`` is given).
      rng_collection: the rng stream that training draws the masks from, ``"dropout"`` by default (as
        `flax.linen.Dropout`'s): ``model.apply(..., rngs={rng_collection: key})``.
      param_dtype: the dtype of the params.

    Params: ``"cell"``, the output of ``cell.init(key, I, param_dtype)``.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> from rnnjax import linen as rln
      >>> model = rln.RNN(rj.gru(8))
      >>> xs = jnp.ones((2, 5, 3))
      >>> variables = model.init(jax.random.key(0), xs)
      >>> carry, ys = model.apply(variables, xs, lengths=jnp.array([5, 2]))
      >>> ys.shape
      (2, 5, 8)

      With the regularisers inside the recurrence, training draws the masks from the ``"dropout"`` rng
      and ``deterministic=True`` gives their expectation:

      >>> model = rln.RNN(rj.lstm(8), regularize=rj.Regularizer(state_dropout=0.25, zoneout=0.1))
      >>> variables = model.init(jax.random.key(0), xs, deterministic=True)
      >>> carry, ys = model.apply(
      ...     variables, xs, deterministic=False, rngs={"dropout": jax.random.key(1)}
      ... )
      >>> carry, ys = model.apply(variables, xs, deterministic=True)
    """

    cell: Cell
    reverse: bool = False
    checkpoint: Checkpoint = None
    budget: int | None = None
    schedule: Schedule | None = None
    unroll_steps: int | bool | None = None
    method: Method = "sequential"
    chunk_size: int | None = None
    regularize: Regularizer | None = None
    deterministic: bool | None = None
    rng_collection: str = "dropout"
    param_dtype: Any = jnp.float32

    def layer(self) -> Layer:
        """The functional layer this module runs: ``layer.apply(variables["params"]["cell"], xs)``."""
        options = _options(self)
        return rnn_layer(self.cell, reverse=self.reverse, options=options)

    @nn.compact
    def __call__(
        self,
        xs: Array,
        *,
        carry: PyTree | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        deterministic: bool | None = None,
    ) -> tuple[PyTree, Array]:
        """Runs the cell over ``xs``.

        Args:
          xs: ``[B, T, I]`` floating-point inputs (more leading batch axes are allowed).
          carry: the initial carry (leaves ``[B, H]``); None means zeros.
          lengths: ``[B]`` integers in ``[0, T]``: the valid steps of each sequence.
          grad: ``"manual"`` (the hand-derived BPTT) or ``"autodiff"``.
          deterministic: False draws ``regularize``'s masks (from the ``rng_collection`` rng), True gives
            their expectation. Where ``regularize`` is given, give it here or as the attribute, not both.

        Returns:
          ``(carry, ys)``: the final carry (leaves ``[B, H]``) and ``ys [B, T, H]``.

        Raises:
          ValueError: where ``regularize`` is given and training has no ``rng_collection`` rng, or
            ``deterministic`` is given in neither place or in both.
        """
        layer = self.layer()
        I = input_size_of(xs)
        params = self.param("cell", lambda key: layer.init(key, I, self.param_dtype))
        train, key = _training_key(self, draws_masks(self.regularize), self.deterministic, deterministic)
        return layer.apply(params, xs, carry=carry, lengths=lengths, grad=grad, key=key, train=train)


class Bidirectional(nn.Module):
    """A forward and a reverse pass over ``xs [B, T, I]``, merged per step, as `rj.bidirectional`.

    Attributes:
      cell_fw: the forward direction's cell.
      cell_bw: the backward direction's cell; None means another cell like ``cell_fw`` (own params).
      merge: ``"concat"`` (``ys [B, T, H_fw + H_bw]``, forward first) or ``"sum"`` (``ys [B, T, H]``).
      checkpoint, budget, schedule, unroll_steps, method, chunk_size: `rj.unroll`'s options, for both
        directions (see `RNN`).
      regularize: an `rj.Regularizer` inside both recurrences, or None (see `RNN`); each direction draws
        its own masks from the one ``rng_collection`` key, as `rj.bidirectional` does.
      deterministic: True for inference, False for training; None leaves it to ``__call__``.
      rng_collection: the rng stream that training draws the masks from, ``"dropout"`` by default (as
        `flax.linen.Dropout`'s): ``model.apply(..., rngs={rng_collection: key})``.
      param_dtype: the dtype of the params.

    Params: ``"fw"`` and ``"bw"``, each the output of its cell's ``init``;
    ``rj.BidirectionalParams(**variables["params"])`` is what ``rj.bidirectional(...).apply`` takes.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> from rnnjax import linen as rln
      >>> model = rln.Bidirectional(rj.lstm(4), merge="sum")
      >>> xs = jnp.ones((2, 5, 3))
      >>> variables = model.init(jax.random.key(0), xs)
      >>> carry, ys = model.apply(variables, xs)
      >>> ys.shape, carry.bw.h.shape
      ((2, 5, 4), (2, 4))
      >>> model = rln.Bidirectional(rj.gru(4), regularize=rj.Regularizer(zoneout=0.1), deterministic=False)
      >>> variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, xs)
      >>> carry, ys = model.apply(variables, xs, rngs={"dropout": jax.random.key(2)})
      >>> ys.shape
      (2, 5, 8)
    """

    cell_fw: Cell
    cell_bw: Cell | None = None
    merge: str = "concat"
    checkpoint: Checkpoint = None
    budget: int | None = None
    schedule: Schedule | None = None
    unroll_steps: int | bool | None = None
    method: Method = "sequential"
    chunk_size: int | None = None
    regularize: Regularizer | None = None
    deterministic: bool | None = None
    rng_collection: str = "dropout"
    param_dtype: Any = jnp.float32

    def layer(self) -> Layer:
        """The functional layer this module runs, on ``rj.BidirectionalParams(**variables["params"])``."""
        options = _options(self)
        return bidirectional_layer(self.cell_fw, self.cell_bw, merge=self.merge, options=options)

    @nn.compact
    def __call__(
        self,
        xs: Array,
        *,
        carry: BidirectionalCarry | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        deterministic: bool | None = None,
    ) -> tuple[BidirectionalCarry, Array]:
        """Runs both directions over ``xs``.

        Args:
          xs: ``[B, T, I]`` floating-point inputs.
          carry: a `BidirectionalCarry` ``(fw, bw)`` of initial carries; None means zeros.
          lengths: ``[B]`` integers in ``[0, T]``; the reverse pass starts at step ``lengths[b] - 1``.
          grad: ``"manual"`` (the hand-derived BPTT) or ``"autodiff"``.
          deterministic: as `RNN`'s: False draws ``regularize``'s masks, True gives their expectation.

        Returns:
          ``(carry, ys)``: a `BidirectionalCarry` and ``ys [B, T, H_fw + H_bw]`` (``[B, T, H]`` for sum).

        Raises:
          ValueError: where ``regularize`` is given and training has no ``rng_collection`` rng, or
            ``deterministic`` is given in neither place or in both.
        """
        layer = self.layer()
        cell_fw, cell_bw = layer.children
        I = input_size_of(xs)
        params = BidirectionalParams(
            self.param("fw", lambda key: cell_fw.init(key, I, self.param_dtype)),
            self.param("bw", lambda key: cell_bw.init(key, I, self.param_dtype)),
        )
        train, key = _training_key(self, draws_masks(self.regularize), self.deterministic, deterministic)
        return layer.apply(params, xs, carry=carry, lengths=lengths, grad=grad, key=key, train=train)


class Stack(nn.Module):
    """A deep RNN, layers applied one after the other, as `rj.stack`.

    Attributes:
      layers: a sequence of cells (each a forward `rj.rnn`), ``rj.rnn(cell, reverse=...)`` and
        ``rj.bidirectional(..., merge=...)`` layers, first layer first.
      residual: add each layer's input to its output, for every layer after the first.
      dropout: the probability of dropping each feature between layers (not after the last), in training:
        with ``deterministic=False`` and a ``rng_collection`` rng
        (``model.apply(..., rngs={"dropout": key})``).
      regularize: an `rj.Regularizer` inside every recurrence, or None (see `RNN`); in training each
        layer draws its own masks from the one ``rng_collection`` key, as `rj.stack` does.
      deterministic: True turns dropout off (and gives ``regularize``'s expectation); None leaves it to
        ``__call__`` (needed where dropout > 0 or ``regularize`` is given).
      rng_collection: the rng stream that training draws the masks from, ``"dropout"`` by default (as
        `flax.linen.Dropout`'s): ``model.apply(..., rngs={rng_collection: key})``.
      checkpoint, budget, schedule, unroll_steps, method, chunk_size: `rj.unroll`'s options, for every
        recurrence in the stack (see `RNN`); they replace the ``unroll_steps`` an ``rj.rnn`` layer among
        ``layers`` was made with.
      param_dtype: the dtype of the params.

    Params: ``"layers"``, the tuple ``rj.stack(*layers).init`` returns (one entry per layer).

    Raises:
      TypeError: if ``layers`` is not a sequence of cells, `rj.rnn` and `rj.bidirectional` layers.
      ValueError: as `rj.stack` (no layers, ``dropout`` outside ``[0, 1)``, ``residual=True`` with a
        layer whose input and output sizes differ).
        From ``__call__``: dropout or ``regularize`` in training without a ``rng_collection`` rng.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> from rnnjax import linen as rln
      >>> model = rln.Stack((rj.lstm(4), rj.bidirectional(rj.gru(2))), dropout=0.1)
      >>> xs = jnp.ones((2, 5, 3))
      >>> variables = model.init(jax.random.key(0), xs, deterministic=True)
      >>> carries, ys = model.apply(
      ...     variables, xs, deterministic=False, rngs={"dropout": jax.random.key(1)}
      ... )
      >>> ys.shape, len(carries)
      ((2, 5, 4), 2)
    """

    layers: Sequence[Cell | Layer]
    residual: bool = False
    dropout: float = 0.0
    deterministic: bool | None = None
    rng_collection: str = "dropout"
    checkpoint: Checkpoint = None
    budget: int | None = None
    schedule: Schedule | None = None
    unroll_steps: int | bool | None = None
    method: Method = "sequential"
    chunk_size: int | None = None
    regularize: Regularizer | None = None
    param_dtype: Any = jnp.float32

    def layer(self) -> Layer:
        """The functional layer this module runs: ``layer.apply(variables["params"]["layers"], xs)``."""
        options = _options(self)
        return stack_layer(self.layers, residual=self.residual, dropout=self.dropout, options=options)

    @nn.compact
    def __call__(
        self,
        xs: Array,
        *,
        carry: tuple[Any, ...] | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        deterministic: bool | None = None,
    ) -> tuple[tuple[Any, ...], Array]:
        """Runs the layers over ``xs``.

        Args:
          xs: ``[B, T, I]`` floating-point inputs.
          carry: a tuple of the layers' initial carries; None means zeros.
          lengths: ``[B]`` integers in ``[0, T]``, for every layer.
          grad: ``"manual"`` (the hand-derived BPTT) or ``"autodiff"``.
          deterministic: False applies dropout and ``regularize``'s masks (with a ``rng_collection`` rng),
            True turns them off. Where dropout > 0 or ``regularize`` is given, give it here or as the
            attribute, not both.

        Returns:
          ``(carries, ys)``: a tuple of the layers' final carries and ``ys [B, T, output_size]``.

        Raises:
          ValueError: where dropout or ``regularize`` runs in training without a ``rng_collection`` rng, or
            ``deterministic`` is given in neither place or in both.
        """
        layer = self.layer()
        I = input_size_of(xs)
        params = self.param("layers", lambda key: layer.init(key, I, self.param_dtype))
        draws = draws_masks(self.regularize, self.dropout)
        train, key = _training_key(self, draws, self.deterministic, deterministic)
        return layer.apply(params, xs, carry=carry, lengths=lengths, grad=grad, key=key, train=train)
