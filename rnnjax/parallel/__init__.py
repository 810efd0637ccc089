"""Parallel-in-time methods of `rj.unroll`: which ``method=`` values exist, and how ``"auto"`` picks one.

``method="sequential"`` is the `jax.lax.scan` of `rnnjax.driver`; ``"associative"`` solves a cell declared
linear in its state (`rj.LinearRecurrence`) with a parallel prefix scan (`rnnjax.parallel.associative`),
also with the time axis of ``xs`` split over devices (`rnnjax.parallel.sequence`); ``"deer"`` and
``"quasi_deer"`` solve any cell's recurrence by Newton iterations over the whole trajectory
(`rnnjax.parallel.deer`).
"""

from __future__ import annotations

from typing import Literal, get_args

import jax

from rnnjax.cells.base import Cell

# every value `rj.unroll` accepts for ``method=``, in one place: a new method is one more name here
Method = Literal["sequential", "associative", "deer", "quasi_deer", "auto"]
METHODS: tuple[str, ...] = get_args(Method)
"""The values of `rj.unroll`'s ``method=``: ``"sequential"`` (the default), ``"associative"`` (cells with a
`LinearRecurrence`), ``"deer"`` and ``"quasi_deer"`` (any cell, `rj.deer_unroll`) and ``"auto"`` (never
DEER)."""
DEER_METHODS: tuple[str, ...] = ("deer", "quasi_deer")
"""The methods `rj.unroll` runs with `rj.deer_unroll` (``"quasi_deer"``: ``quasi=True``)."""

# The sequence length T from which ``method="auto"`` picks the associative scan for a linear cell, per
# platform (`jax.default_backend()`). A platform missing here runs the sequential scan at every T. An entry
# must come from ``python -m benchmarks.parallel_time`` on that platform (the length at which the
# associative training step first beats the sequential one); on CPU the sequential scan stays faster at
# every length measured, and no GPU or TPU measurement is recorded, so the table is empty.
AUTO_CROSSOVER: dict[str, int] = {}


def check_method(method: object) -> str:
    """``method`` if it is one of `METHODS`, else a ValueError naming them."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def supported_methods(cell: Cell) -> tuple[str, ...]:
    """The values of ``method`` that ``cell`` can run: all of them for a cell with a `rj.LinearRecurrence`,
    all but ``"associative"`` otherwise."""
    return METHODS if cell.linear is not None else tuple(m for m in METHODS if m != "associative")


def resolve_method(method: str, cell: Cell, T: int, *, sequential_only: str | None = None) -> str:
    """The method `rj.unroll` runs: ``method`` itself, or what ``"auto"`` picks.

    ``"auto"`` picks ``"associative"`` for a linear cell when the default backend has an entry in
    `AUTO_CROSSOVER` and ``T`` reaches it, and ``"sequential"`` otherwise (always on CPU). It never picks
    DEER: Newton may need many iterations, or fail to converge and fall back, on cells near chaos, a cost
    no sequence length predicts.

    Args:
      method: one of `METHODS` (checked).
      cell: the cell; ``"associative"`` on a cell without ``linear`` raises a ValueError naming the methods
        it supports.
      T: the sequence length.
      sequential_only: the name of an option given that only the sequential scan takes (e.g.
        ``"checkpoint"``): ``"auto"`` then picks it, and any other method raises a ValueError naming it.

    Examples:
      >>> import rnnjax as rj
      >>> from rnnjax.parallel import resolve_method
      >>> resolve_method("auto", rj.gru(4), T=4096)
      'sequential'
      >>> resolve_method("deer", rj.gru(4), T=4096)
      'deer'
    """
    method = check_method(method)
    if method == "auto":
        crossover = AUTO_CROSSOVER.get(jax.default_backend())
        linear = cell.linear is not None and sequential_only is None
        return "associative" if linear and crossover is not None and T >= crossover else "sequential"
    if method == "associative":
        if cell.linear is None:
            raise ValueError(
                f"method='associative' needs a cell whose recurrence is linear in its state, "
                f"h_t = a_t ⊙ h_(t-1) + b_t (rj.mingru, rj.minlstm, rj.lru, "
                f"rj.indrnn(activation='identity'), or a Cell with linear=rj.LinearRecurrence(...)); "
                f"cell {cell.name!r} is not: it supports "
                f"method in {supported_methods(cell)}"
            )
        if sequential_only is not None:
            raise ValueError(
                f"{sequential_only}= applies to method='sequential' only; method='associative' keeps the "
                f"O(T) states its backward reads, with no recomputation schedule: pass one or the other"
            )
    if method in DEER_METHODS and sequential_only is not None:
        raise ValueError(
            f"{sequential_only}= applies to method='sequential' only, got method={method!r}: DEER solves "
            f"the recurrence by Newton iterations and differentiates the solution implicitly, with no "
            f"recomputation schedule, probe or regulariser masks: pass one or the other"
        )
    return method
