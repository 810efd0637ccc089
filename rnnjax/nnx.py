"""Flax NNX modules around rnnjax: parameters are ``nnx.Param`` s, the recurrence is still `rj.unroll`.

    from rnnjax import nnx as rnx
    model = rnx.RNN(rj.lstm(64), input_size=8, rngs=nnx.Rngs(0))
    carry, ys = model(xs, lengths=lengths)      # the hand-derived BPTT under nnx.grad / nnx.value_and_grad

Each field of the cell's params NamedTuple (``w_ih``, ``w_hh``, ``b``, ...) becomes an ``nnx.Param``
attribute of the same name, so ``nnx.Optimizer`` and optax train them and ``nnx.state`` shows them by name.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rnnjax.cells.base import Cell
from rnnjax.driver import unroll
from rnnjax.layers import MERGES, BidirectionalCarry

Array = jax.Array
PyTree = Any


class RNN(nnx.Module):
    """One cell over a sequence, as an NNX module: ``(xs [B, T, I]) -> (carry, ys [B, T, H])``."""

    def __init__(
        self,
        cell: Cell,
        input_size: int,
        *,
        rngs: nnx.Rngs,
        reverse: bool = False,
        dtype: Any = jnp.float32,
    ) -> None:
        if not isinstance(cell, Cell):
            raise TypeError(f"cell must be an rnnjax Cell, got {type(cell).__name__}")
        params = cell.init(rngs.params(), input_size, dtype)
        if not (isinstance(params, tuple) and hasattr(params, "_fields")):
            raise TypeError(
                f"rnnjax.nnx.RNN needs a cell whose params are a NamedTuple, got {type(params).__name__}"
            )
        self.cell = cell
        self.reverse = reverse
        self.params_type = type(params)
        for field, value in zip(params._fields, params, strict=True):
            setattr(self, field, nnx.Param(value))

    def params(self) -> PyTree:
        """The cell's params NamedTuple, read from the module's ``nnx.Param`` s."""
        return self.params_type(*(getattr(self, f)[...] for f in self.params_type._fields))

    def __call__(
        self, xs: Array, *, carry: PyTree | None = None, lengths: Array | None = None, grad: str = "manual"
    ) -> tuple[PyTree, Array]:
        return unroll(self.cell, self.params(), xs, carry, lengths=lengths, reverse=self.reverse, grad=grad)


class Bidirectional(nnx.Module):
    """A forward and a reverse `RNN` merged per step (``"concat"`` or ``"sum"``), as `rj.bidirectional`."""

    def __init__(
        self,
        cell_fw: Cell,
        input_size: int,
        cell_bw: Cell | None = None,
        *,
        merge: str = "concat",
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ) -> None:
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        cell_bw = cell_fw if cell_bw is None else cell_bw
        if merge == "sum" and cell_fw.output_size != cell_bw.output_size:
            raise ValueError(
                "merge='sum' needs equal hidden sizes in both directions, "
                f"got H_fw={cell_fw.output_size} and H_bw={cell_bw.output_size}"
            )
        self.merge = merge
        self.fw = RNN(cell_fw, input_size, rngs=rngs, dtype=dtype)
        self.bw = RNN(cell_bw, input_size, rngs=rngs, reverse=True, dtype=dtype)

    def __call__(
        self,
        xs: Array,
        *,
        carry: BidirectionalCarry | None = None,
        lengths: Array | None = None,
        grad: str = "manual",
    ) -> tuple[BidirectionalCarry, Array]:
        c_fw, c_bw = (None, None) if carry is None else carry
        f_fw, ys_fw = self.fw(xs, carry=c_fw, lengths=lengths, grad=grad)
        f_bw, ys_bw = self.bw(xs, carry=c_bw, lengths=lengths, grad=grad)
        ys = jnp.concatenate([ys_fw, ys_bw], axis=-1) if self.merge == "concat" else ys_fw + ys_bw
        return BidirectionalCarry(f_fw, f_bw), ys
