"""Flax NNX modules around rnnjax: parameters are ``nnx.Param`` s, the recurrence is still `rj.unroll`.

    from rnnjax import nnx as rnx
    model = rnx.RNN(rj.lstm(64), input_size=8, rngs=nnx.Rngs(0))
    carry, ys = model(xs, lengths=lengths)      # the hand-derived BPTT under nnx.grad / nnx.value_and_grad

An `RNN` keeps its cell's params in ``weights``: the pytree ``cell.init`` returns, each array an
``nnx.Param`` (for the built-in cells ``weights.w_ih``, ``weights.w_hh``, ``weights.b``, ...), so
``nnx.Optimizer`` and optax train them and ``nnx.state`` shows them by name; ``model.params()`` is the
plain pytree that ``rj.unroll(cell, params, xs)`` takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
from flax import nnx

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

Array = jax.Array
PyTree = Any
RngSource: TypeAlias = "nnx.Rngs | nnx.RngStream | Array"

__all__ = ["RNN", "Bidirectional", "Stack"]


def _dropout_stream(rngs: nnx.Rngs, draws: bool) -> nnx.RngStream | None:
    """The stream a module that draws masks keeps, as `flax.nnx.Dropout` keeps it: a fork of ``rngs``'s
    ``dropout`` stream (or ``default``); None where it draws none or ``rngs`` has neither stream (then the
    call must pass ``rngs=`` in training)."""
    if not draws or not ("dropout" in rngs or "default" in rngs):
        return nnx.data(None)
    return rngs["dropout"].fork()


def _training_key(
    module: nnx.Module,
    draws: bool,
    stream: nnx.RngStream | None,
    deterministic: bool | None,
    rngs: RngSource | None,
) -> tuple[bool, Array | None]:
    """``(train, key)`` as `flax.nnx.Dropout` decides them: where the module draws masks, training unless
    ``deterministic`` (the call's, else the module's), and then a key from the call's ``rngs`` or the
    module's stream; else ``(False, None)``, and the regularisers act as their expectation."""
    if not draws or (module.deterministic if deterministic is None else deterministic):  # type: ignore[attr-defined]
        return False, None
    source = stream if rngs is None else rngs
    if source is None:
        raise ValueError(
            f'{type(module).__name__} in training (deterministic=False) draws its masks from a "dropout" '
            "rng stream: build it with rngs=nnx.Rngs(params=..., dropout=...), pass rngs= to the call, or "
            "use model.eval() for inference"
        )
    if isinstance(source, nnx.Rngs):
        source = source["dropout"]
    return True, source() if isinstance(source, nnx.RngStream) else source


class _Switchable(nnx.Module):
    """A module with a ``deterministic`` flag that ``nnx.view``, ``.eval()`` and ``.train()`` set."""

    deterministic: bool

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view``: ``nnx.view(model, deterministic=True)`` gives the inference view (no masks
        drawn: dropout off, zoneout its expectation).

        Args:
          deterministic: True for inference, False for training; None leaves it.
        """
        if deterministic is not None:
            self.deterministic = deterministic


class RNN(_Switchable):
    """One cell over a sequence, as an NNX module: ``(xs [B, T, I]) -> (carry, ys [B, T, H])``."""

    options: UnrollOptions
    cell: Cell
    reverse: bool
    deterministic: bool
    weights: PyTree
    rngs: nnx.RngStream | None

    def __init__(
        self,
        cell: Cell,
        input_size: int,
        *,
        rngs: nnx.Rngs,
        reverse: bool = False,
        checkpoint: Checkpoint = None,
        budget: int | None = None,
        schedule: Schedule | None = None,
        unroll_steps: int | bool | None = None,
        method: Method = "sequential",
        chunk_size: int | None = None,
        regularize: Regularizer | None = None,
        deterministic: bool = False,
        dtype: Any = jnp.float32,
    ) -> None:
        """Initialises the cell's params with ``cell.init(rngs.params(), input_size, dtype)``.

        Args:
          cell: the cell, e.g. ``rj.lstm(64)``, or a user-written `rj.Cell` with params of any pytree.
          input_size: I, the feature size of the inputs.
          rngs: the module's ``nnx.Rngs``: ``params`` initialises the cell, and where ``regularize`` is
            given the ``dropout`` stream (or ``default``) draws its masks, as ``nnx.Dropout`` does.
          reverse: run from the last valid step to the first; ``ys`` stays aligned with ``xs``.
          checkpoint: `rj.unroll`'s ``checkpoint`` (None, ``"none"``, an int K or ``"sqrt"``).
          budget: `rj.unroll`'s ``budget`` (bytes kept for the backward).
          schedule: `rj.unroll`'s ``schedule`` (with ``budget``: ``"binomial"`` or ``"nested"``).
          unroll_steps: `jax.lax.scan`'s unroll factor for the time loops (None: `rj.unroll`'s default).
          method: `rj.unroll`'s ``method`` (one of `rnnjax.METHODS`; ``"associative"`` for linear cells only).
          chunk_size: `rj.unroll`'s ``chunk_size`` (with ``method="associative"``).
          regularize: an `rj.Regularizer` inside the recurrence (dropout, zoneout, weight drop), or None.
            In training (``deterministic=False``, ``model.train()``) its masks come from the ``dropout``
            stream; in inference (``model.eval()``) it acts as its expectation.
          deterministic: True for inference, False for training (where ``regularize`` is given).
          dtype: the dtype of the params.

        Examples:
          >>> import jax.numpy as jnp, rnnjax as rj
          >>> from flax import nnx
          >>> from rnnjax import nnx as rnx
          >>> model = rnx.RNN(rj.gru(8), 3, rngs=nnx.Rngs(0))
          >>> carry, ys = model(jnp.ones((2, 5, 3)), lengths=jnp.array([5, 2]))
          >>> ys.shape
          (2, 5, 8)

          With the regularisers inside the recurrence: masks from the ``dropout`` stream in training,
          their expectation after ``model.eval()``:

          >>> reg = rj.Regularizer(state_dropout=0.25, zoneout=0.1)
          >>> model = rnx.RNN(rj.lstm(8), 3, rngs=nnx.Rngs(params=0, dropout=1), regularize=reg)
          >>> carry, ys = model(jnp.ones((2, 5, 3)))
          >>> model.eval()
          >>> carry, ys = model(jnp.ones((2, 5, 3)))
        """
        self.options = checked_options(
            checkpoint, budget, schedule, unroll_steps, method, chunk_size, regularize
        )
        layer = rnn_layer(cell, reverse=reverse, options=self.options)
        self.cell, self.reverse, self.deterministic = cell, reverse, deterministic
        self.weights = nnx.data(jax.tree.map(nnx.Param, layer.init(rngs.params(), input_size, dtype)))
        self.rngs = _dropout_stream(rngs, draws_masks(regularize))

    def params(self) -> PyTree:
        """The cell's params pytree, read from the module's ``nnx.Param`` s."""
        return jax.tree.map(lambda v: v[...], self.weights, is_leaf=lambda v: isinstance(v, nnx.Variable))

    def layer(self) -> Layer:
        """The functional layer this module runs: ``layer.apply(model.params(), xs)``."""
        return rnn_layer(self.cell, reverse=self.reverse, options=self.options)

    def __call__(
        self,
        xs: Array,
        *,
        carry: PyTree | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        deterministic: bool | None = None,
        rngs: RngSource | None = None,
    ) -> tuple[PyTree, Array]:
        """Runs the cell over ``xs``.

        Args:
          xs: ``[B, T, I]`` floating-point inputs (more leading batch axes are allowed).
          carry: the initial carry (leaves ``[B, H]``); None means zeros.
          lengths: ``[B]`` integers in ``[0, T]``: the valid steps of each sequence.
          grad: ``"manual"`` (the hand-derived BPTT) or ``"autodiff"``.
          deterministic: overrides the module's ``deterministic``.
          rngs: overrides the module's ``dropout`` stream: an ``nnx.Rngs``, an ``nnx.RngStream`` or a key.

        Returns:
          ``(carry, ys)``: the final carry (leaves ``[B, H]``) and ``ys [B, T, H]``.

        Raises:
          ValueError: where ``regularize`` runs in training with no ``dropout`` stream and no ``rngs``.
        """
        draws = draws_masks(self.options.regularize)
        train, key = _training_key(self, draws, self.rngs, deterministic, rngs)
        return self.layer().apply(
            self.params(), xs, carry=carry, lengths=lengths, grad=grad, key=key, train=train
        )


class Bidirectional(_Switchable):
    """A forward and a reverse `RNN` merged per step (``"concat"`` or ``"sum"``), as `rj.bidirectional`."""

    options: UnrollOptions
    merge: str
    deterministic: bool
    rngs: nnx.RngStream | None
    fw: RNN
    bw: RNN

    def __init__(
        self,
        cell_fw: Cell,
        input_size: int,
        cell_bw: Cell | None = None,
        *,
        merge: str = "concat",
        rngs: nnx.Rngs,
        checkpoint: Checkpoint = None,
        budget: int | None = None,
        schedule: Schedule | None = None,
        unroll_steps: int | bool | None = None,
        method: Method = "sequential",
        chunk_size: int | None = None,
        regularize: Regularizer | None = None,
        deterministic: bool = False,
        dtype: Any = jnp.float32,
    ) -> None:
        """Builds the two directions, ``fw`` and ``bw``, each an `RNN` with its own params.

        Args:
          cell_fw: the forward direction's cell.
          input_size: I, the feature size of the inputs.
          cell_bw: the backward direction's cell; None means another cell like ``cell_fw`` (own params).
          merge: ``"concat"`` (``ys [B, T, H_fw + H_bw]``, forward first) or ``"sum"`` (``ys [B, T, H]``).
          rngs: the module's ``nnx.Rngs``: ``params`` initialises the cells, ``dropout`` (or ``default``)
            draws ``regularize``'s masks.
          checkpoint, budget, schedule, unroll_steps, method, chunk_size: `rj.unroll`'s options, for both
            directions (see `RNN`).
          regularize: an `rj.Regularizer` inside both recurrences, or None (see `RNN`); each direction
            draws its own masks from one key of the module's stream, as `rj.bidirectional` does.
          deterministic: True for inference, False for training (where ``regularize`` is given).
          dtype: the dtype of the params.

        Examples:
          >>> import jax.numpy as jnp, rnnjax as rj
          >>> from flax import nnx
          >>> from rnnjax import nnx as rnx
          >>> model = rnx.Bidirectional(rj.lstm(4), 3, rngs=nnx.Rngs(0))
          >>> carry, ys = model(jnp.ones((2, 5, 3)))
          >>> ys.shape, carry.bw.h.shape
          ((2, 5, 8), (2, 4))
          >>> model = rnx.Bidirectional(
          ...     rj.gru(4), 3, rngs=nnx.Rngs(0), regularize=rj.Regularizer(zoneout=0.1)
          ... )
          >>> carry, ys = model(jnp.ones((2, 5, 3)))
        """
        self.options = checked_options(
            checkpoint, budget, schedule, unroll_steps, method, chunk_size, regularize
        )
        cells: tuple[Cell, Cell] = bidirectional_layer(
            cell_fw, cell_bw, merge=merge, options=self.options
        ).children
        cell_fw, cell_bw = cells
        self.merge, self.deterministic = merge, deterministic
        self.rngs = _dropout_stream(rngs, draws_masks(regularize))
        # the directions hold the params; the masks are drawn here, as rj.bidirectional draws them
        kw = {"rngs": rngs, "dtype": dtype, **self.options._replace(regularize=None)._asdict()}
        self.fw = RNN(cell_fw, input_size, **kw)
        self.bw = RNN(cell_bw, input_size, reverse=True, **kw)

    def params(self) -> BidirectionalParams:
        """Both directions' params, as ``rj.bidirectional(...).apply`` takes them."""
        return BidirectionalParams(self.fw.params(), self.bw.params())

    def layer(self) -> Layer:
        """The functional layer this module runs: ``layer.apply(model.params(), xs)``."""
        return bidirectional_layer(self.fw.cell, self.bw.cell, merge=self.merge, options=self.options)

    def __call__(
        self,
        xs: Array,
        *,
        carry: BidirectionalCarry | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        deterministic: bool | None = None,
        rngs: RngSource | None = None,
    ) -> tuple[BidirectionalCarry, Array]:
        """Runs both directions over ``xs``.

        Args:
          xs: ``[B, T, I]`` floating-point inputs.
          carry: a `BidirectionalCarry` ``(fw, bw)`` of initial carries; None means zeros.
          lengths: ``[B]`` integers in ``[0, T]``; the reverse pass starts at step ``lengths[b] - 1``.
          grad: ``"manual"`` (the hand-derived BPTT) or ``"autodiff"``.
          deterministic: overrides the module's ``deterministic``.
          rngs: overrides the module's ``dropout`` stream: an ``nnx.Rngs``, an ``nnx.RngStream`` or a key.

        Returns:
          ``(carry, ys)``: a `BidirectionalCarry` and ``ys [B, T, H_fw + H_bw]`` (``[B, T, H]`` for sum).

        Raises:
          ValueError: where ``regularize`` runs in training with no ``dropout`` stream and no ``rngs``.
        """
        draws = draws_masks(self.options.regularize)
        train, key = _training_key(self, draws, self.rngs, deterministic, rngs)
        return self.layer().apply(
            self.params(), xs, carry=carry, lengths=lengths, grad=grad, key=key, train=train
        )


class Stack(_Switchable):
    """A deep RNN, layers applied one after the other, as `rj.stack`: ``xs [B, T, I] -> (carries, ys)``."""

    options: UnrollOptions
    specs: tuple[Any, ...]
    residual: bool
    dropout: float
    deterministic: bool
    rngs: nnx.RngStream | None
    layers: nnx.List[RNN | Bidirectional]

    def __init__(
        self,
        layers: Sequence[Cell | Layer],
        input_size: int,
        *,
        rngs: nnx.Rngs,
        residual: bool = False,
        dropout: float = 0.0,
        deterministic: bool = False,
        checkpoint: Checkpoint = None,
        budget: int | None = None,
        schedule: Schedule | None = None,
        unroll_steps: int | bool | None = None,
        method: Method = "sequential",
        chunk_size: int | None = None,
        regularize: Regularizer | None = None,
        dtype: Any = jnp.float32,
    ) -> None:
        """Builds one `RNN` or `Bidirectional` per layer, in ``self.layers``.

        Args:
          layers: cells (each a forward `rj.rnn`), ``rj.rnn(cell, reverse=...)`` and
            ``rj.bidirectional(..., merge=...)`` layers, first layer first.
          input_size: I, the feature size of the first layer's inputs.
          rngs: the module's ``nnx.Rngs``: ``params`` initialises the layers, and where dropout > 0 or
            ``regularize`` is given the ``dropout`` stream (or ``default``) draws the masks, as
            ``nnx.Dropout`` does.
          residual: add each layer's input to its output, for every layer after the first.
          dropout: the probability of dropping each feature between layers (not after the last), in
            training (``deterministic=False``; ``model.eval()`` turns it off).
          deterministic: True turns dropout off (and gives ``regularize``'s expectation).
          checkpoint, budget, schedule, unroll_steps, method, chunk_size: `rj.unroll`'s options, for every
            recurrence in the stack (see `RNN`); they replace the ``unroll_steps`` an ``rj.rnn`` layer was
            made with.
          regularize: an `rj.Regularizer` inside every recurrence, or None (see `RNN`); in training each
            layer draws its own masks from one key of the module's stream, as `rj.stack` does.
          dtype: the dtype of the params.

        Raises:
          TypeError: if ``layers`` is not a sequence of cells, `rj.rnn` and `rj.bidirectional` layers.
          ValueError: as `rj.stack` (no layers, ``dropout`` outside ``[0, 1)``, ``residual=True`` with a
            layer whose input and output sizes differ); from ``__call__``, dropout or ``regularize`` in
            training with no ``dropout`` stream and no ``rngs``.

        Examples:
          >>> import jax.numpy as jnp, rnnjax as rj
          >>> from flax import nnx
          >>> from rnnjax import nnx as rnx
          >>> model = rnx.Stack([rj.lstm(4), rj.bidirectional(rj.gru(2))], 3, rngs=nnx.Rngs(0), dropout=0.1)
          >>> carries, ys = model(jnp.ones((2, 5, 3)))
          >>> ys.shape, len(carries)
          ((2, 5, 4), 2)
        """
        self.options = checked_options(
            checkpoint, budget, schedule, unroll_steps, method, chunk_size, regularize
        )
        built = stack_layer(layers, residual=residual, dropout=dropout, options=self.options)
        self.specs, self.residual, self.dropout = tuple(layers), residual, dropout
        self.deterministic = deterministic
        self.rngs = _dropout_stream(rngs, draws_masks(regularize, dropout))
        # the layers hold the params; the masks are drawn here, as rj.stack draws them
        kw = {"rngs": rngs, "dtype": dtype, **self.options._replace(regularize=None)._asdict()}
        children = []
        for layer in built.children:
            if layer.kind == "rnn":
                child = RNN(layer.children[0], input_size, reverse=layer.option("reverse"), **kw)
            else:
                cell_fw, cell_bw = layer.children
                child = Bidirectional(cell_fw, input_size, cell_bw, merge=layer.option("merge"), **kw)
            children.append(child)
            input_size = layer.output_size
        self.layers = nnx.List(children)

    def params(self) -> tuple[Any, ...]:
        """The layers' params, as ``rj.stack(...).apply`` takes them."""
        return tuple(layer.params() for layer in self.layers)

    def layer(self) -> Layer:
        """The functional layer this module runs: ``layer.apply(model.params(), xs, ...)``."""
        return stack_layer(self.specs, residual=self.residual, dropout=self.dropout, options=self.options)

    def __call__(
        self,
        xs: Array,
        *,
        carry: tuple[Any, ...] | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        deterministic: bool | None = None,
        rngs: RngSource | None = None,
    ) -> tuple[tuple[Any, ...], Array]:
        """Runs the layers over ``xs``.

        Args:
          xs: ``[B, T, I]`` floating-point inputs.
          carry: a tuple of the layers' initial carries; None means zeros.
          lengths: ``[B]`` integers in ``[0, T]``, for every layer.
          grad: ``"manual"`` (the hand-derived BPTT) or ``"autodiff"``.
          deterministic: overrides the module's ``deterministic``.
          rngs: overrides the module's dropout stream: an ``nnx.Rngs``, an ``nnx.RngStream`` or a key.

        Returns:
          ``(carries, ys)``: a tuple of the layers' final carries and ``ys [B, T, output_size]``.

        Raises:
          ValueError: where dropout or ``regularize`` runs in training with no ``dropout`` stream and no
            ``rngs``.
        """
        draws = draws_masks(self.options.regularize, self.dropout)
        train, key = _training_key(self, draws, self.rngs, deterministic, rngs)
        return self.layer().apply(
            self.params(), xs, carry=carry, lengths=lengths, grad=grad, key=key, train=train
        )
