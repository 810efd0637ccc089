"""The functional layers that the framework modules (`rnnjax.linen`, `rnnjax.equinox`, `rnnjax.nnx`) run.

Each framework module holds a cell's (or a layer's) params in its own way and calls one `Layer` built here.
These layers are `rj.rnn`, `rj.bidirectional` and `rj.stack` whose ``apply`` passes the module's fixed
`rj.unroll` options (``checkpoint``, ``budget``, ``schedule``, ``unroll_steps``, ``method``,
``chunk_size``, ``regularize``) to every recurrence inside. Each framework supplies the key and the
training flag in its own idiom (Linen's ``"dropout"`` rng and ``deterministic``, Equinox's ``key=`` and
``inference``, NNX's stored ``rngs`` and ``deterministic``); the layer draws every mask from that key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import Cell
from rnnjax.driver import Schedule, check_options, sequential_only
from rnnjax.layers import Layer, bidirectional, rnn, stack
from rnnjax.parallel import Method, resolve_method
from rnnjax.regularize import Regularizer

Array = jax.Array
PyTree = Any
Checkpoint = int | Literal["sqrt", "none"] | None  # `rj.unroll`'s ``checkpoint``


class UnrollOptions(NamedTuple):
    """`rj.unroll`'s options that a module fixes at construction (see `rj.unroll` for each).

    Attributes:
      checkpoint: None, ``"none"``, an int K or ``"sqrt"``: keep the carry every K steps and recompute.
      budget: at most this many bytes of state kept for the backward.
      schedule: with ``budget``: ``"binomial"`` or ``"nested"``.
      unroll_steps: `jax.lax.scan`'s unroll factor for the time loops.
      method: ``"sequential"``, ``"associative"`` (linear cells), ``"deer"``, ``"quasi_deer"`` or ``"auto"``
        (`rnnjax.parallel.METHODS`).
      chunk_size: with ``method="associative"``: steps per sequential chunk (None: one associative scan).
      regularize: an `rj.Regularizer` acting inside every recurrence (masks drawn in training from the
        module's key, the expectation at inference), or None.
    """

    checkpoint: Checkpoint = None
    budget: int | None = None
    schedule: Schedule | None = None
    unroll_steps: int | bool | None = None
    method: Method = "sequential"
    chunk_size: int | None = None
    regularize: Regularizer | None = None


def checked_options(
    checkpoint: Checkpoint = None,
    budget: int | None = None,
    schedule: Schedule | None = None,
    unroll_steps: int | bool | None = None,
    method: Method = "sequential",
    chunk_size: int | None = None,
    regularize: Regularizer | None = None,
) -> UnrollOptions:
    """The `UnrollOptions` of a module, checked as `rj.unroll` checks them, so that a wrong option raises
    where the module is built (naming the option, the expected and the actual), not at its first call."""
    check_options("manual", method, chunk_size, unroll_steps, checkpoint, budget, schedule)
    draws_masks(regularize)
    return UnrollOptions(checkpoint, budget, schedule, unroll_steps, method, chunk_size, regularize)


def draws_masks(regularize: Regularizer | None, dropout: float = 0.0) -> bool:
    """Whether a module with ``regularize`` (and, for a `Stack`, ``dropout``) needs a PRNG key in training:
    the modules ask their framework for one only then, so a module without either runs as before."""
    if regularize is not None and not isinstance(regularize, Regularizer):
        raise TypeError(f"regularize must be an rj.Regularizer or None, got {type(regularize).__name__}")
    return regularize is not None or dropout > 0


def _cells_of(layer: Cell | Layer) -> list[Cell]:
    """The cells inside ``layer`` (a cell, or a layer and its ``children``, recursively)."""
    if isinstance(layer, Cell):
        return [layer]
    return [cell for child in layer.children for cell in _cells_of(child)]


def with_options(layer: Layer, options: UnrollOptions) -> Layer:
    """``layer`` whose ``apply`` passes ``options`` on to every recurrence inside it (as `Layer.apply`'s
    keywords). They join the layer's options, so that it is not equal to the plain layer (a layer is static
    structure, compared by kind, children and options)."""
    # the method each cell supports, and the options only the sequential scan takes, checked where the
    # module is built
    given = sequential_only(options._asdict())
    for cell in _cells_of(layer):
        resolve_method(options.method, cell, 1, sequential_only=given)
    fixed = options._asdict()

    def apply(params: PyTree, xs: Array, **kwargs: Any) -> tuple[PyTree, Array]:
        return layer.apply(params, xs, **kwargs, **fixed)

    return dataclasses.replace(layer, apply=apply, options=(*layer.options, ("unroll_options", options)))


def rnn_layer(cell: Cell, *, reverse: bool = False, options: UnrollOptions) -> Layer:
    """`rj.rnn(cell, reverse=reverse)` whose `rj.unroll` call takes ``options``."""
    return with_options(rnn(cell, reverse=reverse), options)


def bidirectional_layer(
    cell_fw: Cell,
    cell_bw: Cell | None = None,
    *,
    merge: str = "concat",
    options: UnrollOptions,
) -> Layer:
    """`rj.bidirectional(cell_fw, cell_bw, merge=merge)` whose two `rj.unroll` calls take ``options``."""
    return with_options(bidirectional(cell_fw, cell_bw, merge=merge), options)


def _check_stack_layer(layer: Cell | Layer, i: int) -> Cell | Layer:
    """Layer ``i`` of a module's stack: a cell, an `rj.rnn` or an `rj.bidirectional` layer (whose params
    the modules know how to hold), else a clear error."""
    if isinstance(layer, Cell) or (isinstance(layer, Layer) and layer.kind in ("rnn", "bidirectional")):
        return layer
    what = f"a {layer.kind!r} layer" if isinstance(layer, Layer) else f"a {type(layer).__name__}"
    raise TypeError(f"layer {i} of Stack must be a Cell, an rj.rnn or an rj.bidirectional layer, got {what}")


def stack_layer(
    layers: Sequence[Cell | Layer],
    *,
    residual: bool = False,
    dropout: float = 0.0,
    options: UnrollOptions,
) -> Layer:
    """`rj.stack(*layers, residual=residual, dropout=dropout)` whose every recurrence takes ``options``
    (``options.unroll_steps`` replaces the ``unroll_steps`` an `rj.rnn` layer among ``layers`` was made
    with)."""
    if isinstance(layers, (Cell, Layer)) or not isinstance(layers, Sequence):
        raise TypeError(
            "layers of Stack must be a sequence (list or tuple) of cells and layers, "
            f"got {type(layers).__name__}"
        )
    checked = [_check_stack_layer(layer, i) for i, layer in enumerate(layers)]
    return with_options(stack(*checked, residual=residual, dropout=dropout), options)


def input_size_of(xs: Any) -> int:
    """The feature size ``I`` of ``xs [B, T, I]``, with a clear error where ``xs`` has no such axis."""
    shape = jnp.shape(xs)
    if len(shape) < 3:
        raise ValueError(f"xs must have shape [B, T, I] (rank >= 3), got shape {tuple(shape)}")
    return int(shape[-1])
