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
except ImportError as e:  # pragma: no cover - exercised only without equinox installed
    raise ImportError(
        "rnnjax.equinox needs Equinox, which rnnjax does not install by default: pip install rnnjax[equinox]"
    ) from e
import jax
import jax.numpy as jnp

from rnnjax._modules import Checkpoint, UnrollOptions, bidirectional_layer, rnn_layer, stack_layer
from rnnjax.cells.base import Cell
from rnnjax.driver import GradMode, Schedule
from rnnjax.layers import BidirectionalCarry, BidirectionalParams, Layer
from rnnjax.parallel import Method

Array = jax.Array
PyTree = Any


class RNN(eqx.Module):
    """One cell over a sequence: ``xs [B, T, I] -> (carry, ys [B, T, H])``, as `rj.unroll`.

    Attributes:
      params: the cell's params (``cell.init``'s output): the module's only array leaves.
      cell: the cell (static).
      reverse: run from the last valid step to the first (static).
      options: `rj.unroll`'s ``checkpoint``, ``budget``, ``schedule``, ``unroll_steps``, ``method`` and
        ``chunk_size`` (static).
    """

    params: PyTree
    cell: Cell = eqx.field(static=True)
    reverse: bool = eqx.field(static=True)
    options: UnrollOptions = eqx.field(static=True)

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
          dtype: the dtype of the params.

        Examples:
          >>> import jax, jax.numpy as jnp, rnnjax as rj
          >>> from rnnjax import equinox as req
          >>> model = req.RNN(rj.gru(8), 3, key=jax.random.key(0), checkpoint="sqrt")
          >>> carry, ys = model(jnp.ones((2, 5, 3)), lengths=jnp.array([5, 2]))
          >>> ys.shape
          (2, 5, 8)
        """
        self.options = UnrollOptions(checkpoint, budget, schedule, unroll_steps, method, chunk_size)
        layer = rnn_layer(cell, reverse=reverse, options=self.options)
        self.cell, self.reverse = cell, reverse
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
    ) -> tuple[PyTree, Array]:
        """Runs the cell over ``xs``.

        Args:
          xs: ``[B, T, I]`` floating-point inputs (more leading batch axes are allowed).
          carry: the initial carry (leaves ``[B, H]``); None means zeros.
          lengths: ``[B]`` integers in ``[0, T]``: the valid steps of each sequence.
          grad: ``"manual"`` (the hand-derived BPTT) or ``"autodiff"``.

        Returns:
          ``(carry, ys)``: the final carry (leaves ``[B, H]``) and ``ys [B, T, H]``.
        """
        return self.layer().apply(self.params, xs, carry=carry, lengths=lengths, grad=grad)


class Bidirectional(eqx.Module):
    """A forward and a reverse pass over ``xs [B, T, I]``, merged per step, as `rj.bidirectional`.

    Attributes:
      params: `rj.BidirectionalParams` ``(fw, bw)``, each its cell's params.
      cells: the forward and the backward cell (static).
      merge: ``"concat"`` or ``"sum"`` (static).
      options: `rj.unroll`'s ``checkpoint``, ``budget``, ``schedule``, ``unroll_steps``, ``method`` and
        ``chunk_size`` (static).
    """

    params: BidirectionalParams
    cells: tuple[Cell, Cell] = eqx.field(static=True)
    merge: str = eqx.field(static=True)
    options: UnrollOptions = eqx.field(static=True)

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
          dtype: the dtype of the params.

        Examples:
          >>> import jax, jax.numpy as jnp, rnnjax as rj
          >>> from rnnjax import equinox as req
          >>> model = req.Bidirectional(rj.lstm(4), 3, key=jax.random.key(0))
          >>> carry, ys = model(jnp.ones((2, 5, 3)))
          >>> ys.shape, carry.bw.h.shape
          ((2, 5, 8), (2, 4))
        """
        self.options = UnrollOptions(checkpoint, budget, schedule, unroll_steps, method, chunk_size)
        layer = bidirectional_layer(cell_fw, cell_bw, merge=merge, options=self.options)
        self.cells, self.merge = layer.children, merge
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
    ) -> tuple[BidirectionalCarry, Array]:
        """Runs both directions over ``xs``.

        Args:
          xs: ``[B, T, I]`` floating-point inputs.
          carry: a `BidirectionalCarry` ``(fw, bw)`` of initial carries; None means zeros.
          lengths: ``[B]`` integers in ``[0, T]``; the reverse pass starts at step ``lengths[b] - 1``.
          grad: ``"manual"`` (the hand-derived BPTT) or ``"autodiff"``.

        Returns:
          ``(carry, ys)``: a `BidirectionalCarry` and ``ys [B, T, H_fw + H_bw]`` (``[B, T, H]`` for sum).
        """
        return self.layer().apply(self.params, xs, carry=carry, lengths=lengths, grad=grad)


class Stack(eqx.Module):
    """A deep RNN, layers applied one after the other, as `rj.stack`.

    Attributes:
      params: the tuple of the layers' params, as ``rj.stack(*layers).init`` returns it.
      layers: the cells and layers (static).
      residual: residual connections around every layer after the first (static).
      dropout: the dropout probability between layers (static).
      inference: True turns dropout off (`eqx.nn.inference_mode` sets it).
      options: `rj.unroll`'s ``checkpoint``, ``budget``, ``schedule``, ``unroll_steps``, ``method`` and
        ``chunk_size`` (static).
    """

    params: tuple
    layers: tuple = eqx.field(static=True)
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
          inference: True turns dropout off.
          checkpoint, budget, schedule, unroll_steps, method, chunk_size: `rj.unroll`'s options, for every
            recurrence in the stack (see `RNN`); they replace the ``unroll_steps`` an ``rj.rnn`` layer was
            made with.
          dtype: the dtype of the params.

        Raises:
          TypeError: if ``layers`` is not a sequence of cells, `rj.rnn` and `rj.bidirectional` layers.
          ValueError: as `rj.stack` (no layers, ``dropout`` outside ``[0, 1)``, ``residual=True`` with a
            layer whose input and output sizes differ); from ``__call__``, dropout in training without a
            ``key``.

        Examples:
          >>> import jax, jax.numpy as jnp, rnnjax as rj
          >>> from rnnjax import equinox as req
          >>> model = req.Stack([rj.lstm(4), rj.lstm(4)], 3, key=jax.random.key(0), dropout=0.1)
          >>> carries, ys = model(jnp.ones((2, 5, 3)), key=jax.random.key(1))
          >>> ys.shape, len(carries)
          ((2, 5, 4), 2)
        """
        self.options = UnrollOptions(checkpoint, budget, schedule, unroll_steps, method, chunk_size)
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
        carry: tuple | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        key: Array | None = None,
        inference: bool | None = None,
    ) -> tuple[tuple, Array]:
        """Runs the layers over ``xs``.

        Args:
          xs: ``[B, T, I]`` floating-point inputs.
          carry: a tuple of the layers' initial carries; None means zeros.
          lengths: ``[B]`` integers in ``[0, T]``, for every layer.
          grad: ``"manual"`` (the hand-derived BPTT) or ``"autodiff"``.
          key: the PRNG key of the dropout masks; needed in training where dropout > 0.
          inference: overrides the module's ``inference``.

        Returns:
          ``(carries, ys)``: a tuple of the layers' final carries and ``ys [B, T, output_size]``.
        """
        train = not (self.inference if inference is None else inference) and self.dropout > 0
        if train and key is None:
            raise ValueError(
                f"Stack(dropout={self.dropout}) in training needs a PRNG key: pass key=, "
                "or inference=True (eqx.nn.inference_mode) to turn dropout off"
            )
        return self.layer().apply(
            self.params, xs, carry=carry, lengths=lengths, grad=grad, key=key, train=train
        )
