"""The functional layers that the framework modules (`rnnjax.linen`, `rnnjax.equinox`, `rnnjax.nnx`) run.

Each framework module holds a cell's (or a layer's) params in its own way and calls one `Layer` built here.
These layers are `rj.rnn`, `rj.bidirectional` and `rj.stack` with `rj.unroll`'s memory and loop options
(``checkpoint``, ``budget``, ``schedule``, ``unroll_steps``) reaching every recurrence: `rj.bidirectional`
and `rj.stack` do not take them, so each direction here is its own `rj.unroll` call, and `rj.stack` composes
these layers (its residual connections and dropout stay in one place).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import Cell
from rnnjax.driver import GradMode, Schedule, unroll
from rnnjax.layers import BidirectionalCarry, Layer, bidirectional, rnn, stack

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
    """

    checkpoint: Checkpoint = None
    budget: int | None = None
    schedule: Schedule | None = None
    unroll_steps: int | bool | None = None


def run_unroll(
    cell: Cell,
    params: PyTree,
    xs: Array,
    *,
    carry: PyTree | None,
    lengths: Array | None,
    reverse: bool,
    grad: GradMode,
    options: UnrollOptions,
) -> tuple[PyTree, Array]:
    """`rj.unroll` with the module's fixed options: ``xs [B, T, I] -> (carry, ys [B, T, H])``."""
    return unroll(
        cell,
        params,
        xs,
        carry=carry,
        lengths=lengths,
        reverse=reverse,
        grad=grad,
        checkpoint=options.checkpoint,
        budget=options.budget,
        schedule=options.schedule,
        unroll_steps=options.unroll_steps,
    )


def _with_apply(layer: Layer, apply: Any, options: UnrollOptions) -> Layer:
    """``layer`` with ``apply``; ``options`` join its options, so that it is not equal to the plain layer (a
    layer is static structure, compared by kind, children and options)."""
    return dataclasses.replace(layer, apply=apply, options=(*layer.options, ("unroll_options", options)))


def rnn_layer(cell: Cell, *, reverse: bool = False, options: UnrollOptions) -> Layer:
    """`rj.rnn(cell, reverse=reverse)` whose `rj.unroll` call takes ``options``."""

    def apply(
        params: PyTree,
        xs: Array,
        *,
        carry: PyTree | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        key: Array | None = None,
        train: bool = False,
    ) -> tuple[PyTree, Array]:
        return run_unroll(
            cell, params, xs, carry=carry, lengths=lengths, reverse=reverse, grad=grad, options=options
        )

    return _with_apply(rnn(cell, reverse=reverse), apply, options)


def bidirectional_layer(
    cell_fw: Cell,
    cell_bw: Cell | None = None,
    *,
    merge: str = "concat",
    options: UnrollOptions,
) -> Layer:
    """`rj.bidirectional(cell_fw, cell_bw, merge=merge)` whose two `rj.unroll` calls take ``options``."""
    base = bidirectional(cell_fw, cell_bw, merge=merge)
    cells: tuple[Cell, Cell] = base.children  # cell_bw=None: a cell like cell_fw
    cell_fw, cell_bw = cells

    def apply(
        params: PyTree,
        xs: Array,
        *,
        carry: BidirectionalCarry | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        key: Array | None = None,
        train: bool = False,
    ) -> tuple[BidirectionalCarry, Array]:
        if carry is not None and not isinstance(carry, BidirectionalCarry):
            raise TypeError(
                "carry of a bidirectional layer must be a BidirectionalCarry(fw, bw), "
                f"got {type(carry).__name__}"
            )
        c_fw, c_bw = (None, None) if carry is None else carry
        kw = {"lengths": lengths, "grad": grad, "options": options}
        f_fw, ys_fw = run_unroll(cell_fw, params.fw, xs, carry=c_fw, reverse=False, **kw)
        f_bw, ys_bw = run_unroll(cell_bw, params.bw, xs, carry=c_bw, reverse=True, **kw)
        ys = jnp.concatenate([ys_fw, ys_bw], axis=-1) if merge == "concat" else ys_fw + ys_bw
        return BidirectionalCarry(f_fw, f_bw), ys

    return _with_apply(base, apply, options)


def _with_options(layer: Cell | Layer, i: int, options: UnrollOptions) -> Layer:
    """Layer ``i`` of a stack rebuilt so that its recurrences take ``options``."""
    if isinstance(layer, Cell):
        return rnn_layer(layer, options=options)
    if isinstance(layer, Layer) and layer.kind == "rnn":
        return rnn_layer(layer.children[0], reverse=layer.option("reverse"), options=options)
    if isinstance(layer, Layer) and layer.kind == "bidirectional":
        return bidirectional_layer(*layer.children, merge=layer.option("merge"), options=options)
    what = f"a {layer.kind!r} layer" if isinstance(layer, Layer) else f"a {type(layer).__name__}"
    raise TypeError(f"layer {i} of Stack must be a Cell, an rj.rnn or an rj.bidirectional layer, got {what}")


def stack_layer(
    layers: Sequence[Cell | Layer],
    *,
    residual: bool = False,
    dropout: float = 0.0,
    options: UnrollOptions,
) -> Layer:
    """`rj.stack(*layers, residual=residual, dropout=dropout)` whose every recurrence takes ``options``."""
    if isinstance(layers, (Cell, Layer)) or not isinstance(layers, Sequence):
        raise TypeError(
            "layers of Stack must be a sequence (list or tuple) of cells and layers, "
            f"got {type(layers).__name__}"
        )
    return stack(
        *(_with_options(layer, i, options) for i, layer in enumerate(layers)),
        residual=residual,
        dropout=dropout,
    )


def input_size_of(xs: Any) -> int:
    """The feature size ``I`` of ``xs [B, T, I]``, with a clear error where ``xs`` has no such axis."""
    shape = jnp.shape(xs)
    if len(shape) < 3:
        raise ValueError(f"xs must have shape [B, T, I] (rank >= 3), got shape {tuple(shape)}")
    return int(shape[-1])
