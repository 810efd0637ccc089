"""Equinox modules around rnnjax: the params are the module's array leaves, the recurrence is `rj.unroll`.

    import equinox as eqx
    from rnnjax import equinox as req
    model = req.RNN(rj.lstm(64), input_size=8, key=jax.random.key(0))
    carry, ys = model(xs, lengths=lengths)       # xs [B, T, 8]
    grads = eqx.filter_grad(loss)(model)          # the hand-derived BPTT

Each module keeps the functional API's params in its ``params`` field, in the layout the cell's (or layer's)
``init`` returns (``rj.unroll(model.cell, model.params, xs)`` is ``model(xs)``); cells, layer descriptions
and options are static fields, so `eqx.filter_jit` compiles one program per configuration and
`eqx.filter_grad` differentiates the params alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    import equinox as eqx
except ImportError as _missing:  # pragma: no cover - exercised only without equinox installed
    raise ImportError(
        "rnnjax.equinox needs Equinox, which rnnjax does not install by default: pip install rnnjax[equinox]"
    ) from _missing
import jax
import jax.numpy as jnp

from rnnjax._modules import (
    Checkpoint,
    UnrollOptions,
    bidirectional_layer,
    checked_options,
    draws_masks,
    rnn_layer,
    stack_layer,
)
from rnnjax.cells.base import Cell
from rnnjax.driver import GradMode, Schedule
from rnnjax.layers import BidirectionalCarry, BidirectionalParams, Layer
from rnnjax.parallel import Method
from rnnjax.regularize import Regularizer

__all__ = ["RNN", "Bidirectional", "Stack"]

Array = jax.Array
PyTree = Any


def _training(module: eqx.Module, draws: bool, key: Array | None, inference: bool | None) -> bool:
    """Whether ``module`` runs in training, as `equinox.nn.Dropout` decides it: where it draws masks
    (``draws``) and neither the call's ``inference`` nor, without one, the module's is True; training
    then needs the ``key``."""
    train = draws and not (module.inference if inference is None else inference)  # type: ignore[attr-defined]
    if train and key is None:
        raise ValueError(
            f"{type(module).__name__} in training draws its masks from a PRNG key: pass key=, "
            "or inference=True (eqx.nn.inference_mode) for inference"
        )
    return train


class RNN(eqx.Module):
    """One cell over a sequence: ``xs [B, T, I] -> (carry, ys [B, T, H])``, as `rj.unroll`.

    Attributes:
      params: the cell's params (``cell.init``'s output): the module's only array leaves.
      cell: the cell (static).
      reverse: run from the last valid step to the first (static).
      options: `rj.unroll`'s ``checkpoint``, ``budget``, ``schedule``, ``unroll_steps``, ``method``,
        ``chunk_size`` and ``regularize`` (static).
      inference: True gives ``regularize``'s expectation, False draws its masks from the call's ``key``
        (`eqx.nn.inference_mode` sets it).
    """

    params: PyTree
    cell: Cell = eqx.field(static=True)
    reverse: bool = eqx.field(static=True)
    options: UnrollOptions = eqx.field(static=True)
    inference: bool

    def __init__(
        self,
        cell: Cell,
        input_size: int,
        *,
        key: Array,
        reverse: bool = False,
        checkpoint: Checkpoint = None,
        budget: int | None = None,
        schedule: Schedule | None = None,
        unroll_steps: int | bool | None = None,
        method: Method = "sequential",
        chunk_size: int | None = None,
        regularize: Regularizer | None = None,
        inference: bool = False,
        dtype: Any = jnp.float32,
    ) -> None:
        """Initialises the cell's params.

        Args:
          cell: the cell, e.g. ``rj.lstm(64)``.
          input_size: I, the feature size of the inputs.
          key: a PRNG key for ``cell.init``.
          reverse: run from the last valid step to the first; ``ys`` stays aligned with ``xs``.
          checkpoint: `rj.unroll`'s ``checkpoint`` (None, ``"none"``, an int K or ``"sqrt"``).
          budget: `rj.unroll`'s ``budget`` (bytes kept for the backward).
          schedule: `rj.unroll`'s ``schedule`` (with ``budget``: ``"binomial"`` or ``"nested"``).
          unroll_steps: `jax.lax.scan`'s unroll factor for the time loops (None: `rj.unroll`'s default).
          method: `rj.unroll`'s ``method`` (one of `rnnjax.METHODS`; ``"associative"`` for linear cells only).
          chunk_size: `rj.unroll`'s ``chunk_size`` (with ``method="associative"``).
          regularize: an `rj.Regularizer` inside the recurrence (dropout, zoneout, weight drop), or None.
            In training (``inference=False``) its masks come from the ``key`` given to ``__call__``, as
            `eqx.nn.Dropout`'s do; in inference it acts as its expectation.
          inference: True for inference, False for training (where ``regularize`` is given).
          dtype: the dtype of the params.

        Examples:
          >>> import jax, jax.numpy as jnp, rnnjax as rj
          >>> from rnnjax import equinox as req
          >>> model = req.RNN(rj.gru(8), 3, key=jax.random.key(0), checkpoint="sqrt")
          >>> carry, ys = model(jnp.ones((2, 5, 3)), lengths=jnp.array([5, 2]))
          >>> ys.shape
          (2, 5, 8)

          With the regularisers inside the recurrence, a key per call in training, and
          `eqx.nn.inference_mode` for their expectation:

          >>> import equinox as eqx
          >>> reg = rj.Regularizer(state_dropout=0.25, zoneout=0.1)
          >>> model = req.RNN(rj.lstm(8), 3, key=jax.random.key(0), regularize=reg)
          >>> carry, ys = model(jnp.ones((2, 5, 3)), key=jax.random.key(1))
          >>> carry, ys = eqx.nn.inference_mode(model)(jnp.ones((2, 5, 3)))
        """
        self.options = checked_options(
            checkpoint, budget, schedule, unroll_steps, method, chunk_size, regularize
        )
        layer = rnn_layer(cell, reverse=reverse, options=self.options)
        self.cell, self.reverse, self.inference = cell, reverse, inference
        self.params = layer.init(key, input_size, dtype)

    def layer(self) -> Layer:
        """The functional layer this module runs: ``layer.apply(model.params, xs)``."""
        return rnn_layer(self.cell, reverse=self.reverse, options=self.options)

    def __call__(
        self,
        xs: Array,
        *,
        carry: PyTree | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        key: Array | None = None,
        inference: bool | None = None,
    ) -> tuple[PyTree, Array]:
        """Runs the cell over ``xs``.

        Args:
          xs: ``[B, T, I]`` floating-point inputs (more leading batch axes are allowed).
          carry: the initial carry (leaves ``[B, H]``); None means zeros.
          lengths: ``[B]`` integers in ``[0, T]``: the valid steps of each sequence.
          grad: ``"manual"`` (the hand-derived BPTT) or ``"autodiff"``.
          key: the PRNG key of ``regularize``'s masks; needed in training where ``regularize`` is given.
          inference: overrides the module's ``inference``.

        Returns:
          ``(carry, ys)``: the final carry (leaves ``[B, H]``) and ``ys [B, T, H]``.

        Raises:
          ValueError: where ``regularize`` runs in training without a ``key``.
        """
        train = _training(self, draws_masks(self.options.regularize), key, inference)
        return self.layer().apply(
            self.params, xs, carry=carry, lengths=lengths, grad=grad, key=key if train else None, train=train
        )


class Bidirectional(eqx.Module):
    """A forward and a reverse pass over ``xs [B, T, I]``, merged per step, as `rj.bidirectional`.

    Attributes:
      params: `rj.BidirectionalParams` ``(fw, bw)``, each its cell's params.
      cells: the forward and the backward cell (static).
      merge: ``"concat"`` or ``"sum"`` (static).
      options: `rj.unroll`'s ``checkpoint``, ``budget``, ``schedule``, ``unroll_steps``, ``method``,
        ``chunk_size`` and ``regularize`` (static).
      inference: True gives ``regularize``'s expectation, False draws its masks from the call's ``key``.
    """

    params: BidirectionalParams
    cells: tuple[Cell, Cell] = eqx.field(static=True)
    merge: str = eqx.field(static=True)
    options: UnrollOptions = eqx.field(static=True)
    inference: bool

    def __init__(
        self,
        cell_fw: Cell,
        input_size: int,
        cell_bw: Cell | None = None,
        *,
        key: Array,
        merge: str = "concat",
        checkpoint: Checkpoint = None,
        budget: int | None = None,
        schedule: Schedule | None = None,
        unroll_steps: int | bool | None = None,
        method: Method = "sequential",
        chunk_size: int | None = None,
        regularize: Regularizer | None = None,
        inference: bool = False,
        dtype: Any = jnp.float32,
    ) -> None:
        """Initialises both directions' params as ``rj.bidirectional(cell_fw, cell_bw).init`` does.

        Args:
          cell_fw: the forward direction's cell.
          input_size: I, the feature size of the inputs.
          cell_bw: the backward direction's cell; None means another cell like ``cell_fw`` (own params).
          key: a PRNG key.
          merge: ``"concat"`` (``ys [B, T, H_fw + H_bw]``, forward first) or ``"sum"`` (``ys [B, T, H]``).
          checkpoint, budget, schedule, unroll_steps, method, chunk_size: `rj.unroll`'s options, for both
            directions (see `RNN`).
          regularize: an `rj.Regularizer` inside both recurrences, or None (see `RNN`); each direction
            draws its own masks from the one ``key``, as `rj.bidirectional` does.
          inference: True for inference, False for training (where ``regularize`` is given).
          dtype: the dtype of the params.

        Examples:
          >>> import jax, jax.numpy as jnp, rnnjax as rj
          >>> from rnnjax import equinox as req
          >>> model = req.Bidirectional(rj.lstm(4), 3, key=jax.random.key(0))
          >>> carry, ys = model(jnp.ones((2, 5, 3)))
          >>> ys.shape, carry.bw.h.shape
          ((2, 5, 8), (2, 4))
          >>> model = req.Bidirectional(
          ...     rj.gru(4), 3, key=jax.random.key(0), regularize=rj.Regularizer(zoneout=0.1)
          ... )
          >>> carry, ys = model(jnp.ones((2, 5, 3)), key=jax.random.key(1))
        """
        self.options = checked_options(
            checkpoint, budget, schedule, unroll_steps, method, chunk_size, regularize
        )
        layer = bidirectional_layer(cell_fw, cell_bw, merge=merge, options=self.options)
        self.cells, self.merge, self.inference = layer.children, merge, inference
        self.params = layer.init(key, input_size, dtype)

    def layer(self) -> Layer:
        """The functional layer this module runs: ``layer.apply(model.params, xs)``."""
        return bidirectional_layer(*self.cells, merge=self.merge, options=self.options)

    def __call__(
        self,
        xs: Array,
        *,
        carry: BidirectionalCarry | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        key: Array | None = None,
        inference: bool | None = None,
    ) -> tuple[BidirectionalCarry, Array]:
        """Runs both directions over ``xs``.

        Args:
          xs: ``[B, T, I]`` floating-point inputs.
          carry: a `BidirectionalCarry` ``(fw, bw)`` of initial carries; None means zeros.
          lengths: ``[B]`` integers in ``[0, T]``; the reverse pass starts at step ``lengths[b] - 1``.
          grad: ``"manual"`` (the hand-derived BPTT) or ``"autodiff"``.
          key: the PRNG key of ``regularize``'s masks; needed in training where ``regularize`` is given.
          inference: overrides the module's ``inference``.

        Returns:
          ``(carry, ys)``: a `BidirectionalCarry` and ``ys [B, T, H_fw + H_bw]`` (``[B, T, H]`` for sum).

        Raises:
          ValueError: where ``regularize`` runs in training without a ``key``.
        """
        train = _training(self, draws_masks(self.options.regularize), key, inference)
        return self.layer().apply(
            self.params, xs, carry=carry, lengths=lengths, grad=grad, key=key if train else None, train=train
        )


class Stack(eqx.Module):
    """A deep RNN, layers applied one after the other, as `rj.stack`.

    Attributes:
      params: the tuple of the layers' params, as ``rj.stack(*layers).init`` returns it.
      layers: the cells and layers (static).
      residual: residual connections around every layer after the first (static).
      dropout: the dropout probability between layers (static).
      inference: True turns dropout off and gives ``regularize``'s expectation (`eqx.nn.inference_mode`
        sets it).
      options: `rj.unroll`'s ``checkpoint``, ``budget``, ``schedule``, ``unroll_steps``, ``method``,
        ``chunk_size`` and ``regularize`` (static).
    """

    params: tuple[Any, ...]
    layers: tuple[Any, ...] = eqx.field(static=True)
    residual: bool = eqx.field(static=True)
    dropout: float = eqx.field(static=True)
    inference: bool
    options: UnrollOptions = eqx.field(static=True)

    def __init__(
        self,
        layers: Sequence[Cell | Layer],
        input_size: int,
        *,
        key: Array,
        residual: bool = False,
        dropout: float = 0.0,
        inference: bool = False,
        checkpoint: Checkpoint = None,
        budget: int | None = None,
        schedule: Schedule | None = None,
        unroll_steps: int | bool | None = None,
        method: Method = "sequential",
        chunk_size: int | None = None,
        regularize: Regularizer | None = None,
        dtype: Any = jnp.float32,
    ) -> None:
        """Initialises every layer's params as ``rj.stack(*layers).init(key, input_size)`` does.

        Args:
          layers: cells (each a forward `rj.rnn`), ``rj.rnn(cell, reverse=...)`` and
            ``rj.bidirectional(..., merge=...)`` layers, first layer first.
          input_size: I, the feature size of the first layer's inputs.
          key: a PRNG key.
          residual: add each layer's input to its output, for every layer after the first.
          dropout: the probability of dropping each feature between layers (not after the last), in
            training (``inference=False``), with the ``key`` given to ``__call__``.
          inference: True turns dropout off (and gives ``regularize``'s expectation).
          checkpoint, budget, schedule, unroll_steps, method, chunk_size: `rj.unroll`'s options, for every
            recurrence in the stack (see `RNN`); they replace the ``unroll_steps`` an ``rj.rnn`` layer was
            made with.
          regularize: an `rj.Regularizer` inside every recurrence, or None (see `RNN`); in training each
            layer draws its own masks from the one ``key``, as `rj.stack` does.
          dtype: the dtype of the params.

        Raises:
          TypeError: if ``layers`` is not a sequence of cells, `rj.rnn` and `rj.bidirectional` layers.
          ValueError: as `rj.stack` (no layers, ``dropout`` outside ``[0, 1)``, ``residual=True`` with a
            layer whose input and output sizes differ); from ``__call__``, dropout or ``regularize`` in
            training without a ``key``.

        Examples:
          >>> import jax, jax.numpy as jnp, rnnjax as rj
          >>> from rnnjax import equinox as req
          >>> model = req.Stack([rj.lstm(4), rj.lstm(4)], 3, key=jax.random.key(0), dropout=0.1)
          >>> carries, ys = model(jnp.ones((2, 5, 3)), key=jax.random.key(1))
          >>> ys.shape, len(carries)
          ((2, 5, 4), 2)
        """
        self.options = checked_options(
            checkpoint, budget, schedule, unroll_steps, method, chunk_size, regularize
        )
        layer = stack_layer(layers, residual=residual, dropout=dropout, options=self.options)
        self.layers, self.residual, self.dropout, self.inference = tuple(layers), residual, dropout, inference
        self.params = layer.init(key, input_size, dtype)

    def layer(self) -> Layer:
        """The functional layer this module runs: ``layer.apply(model.params, xs, ...)``."""
        return stack_layer(self.layers, residual=self.residual, dropout=self.dropout, options=self.options)

    def __call__(
        self,
        xs: Array,
        *,
        carry: tuple[Any, ...] | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        key: Array | None = None,
        inference: bool | None = None,
    ) -> tuple[tuple[Any, ...], Array]:
        """Runs the layers over ``xs``.

        Args:
          xs: ``[B, T, I]`` floating-point inputs.
          carry: a tuple of the layers' initial carries; None means zeros.
          lengths: ``[B]`` integers in ``[0, T]``, for every layer.
          grad: ``"manual"`` (the hand-derived BPTT) or ``"autodiff"``.
          key: the PRNG key of the dropout and ``regularize`` masks; needed in training where dropout > 0
            or ``regularize`` is given.
          inference: overrides the module's ``inference``.

        Returns:
          ``(carries, ys)``: a tuple of the layers' final carries and ``ys [B, T, output_size]``.

        Raises:
          ValueError: where dropout or ``regularize`` runs in training without a ``key``.
        """
        train = _training(self, draws_masks(self.options.regularize, self.dropout), key, inference)
        return self.layer().apply(
            self.params, xs, carry=carry, lengths=lengths, grad=grad, key=key if train else None, train=train
        )
