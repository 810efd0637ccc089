r"""`LinearRecurrence`: the declaration that a cell's recurrence is linear in its state given the inputs.

A cell whose every step is

    h_t = a_t ⊙ h_{t-1} + b_t ,      (a_t, b_t) = coefficients(params, x_t)     y_t = h_t

can be run by ``rj.unroll(..., method="associative")``: the pairs ``(a_t, b_t)`` of all steps are computed
at once (they read ``x_t`` alone), and the recurrence is solved by a parallel prefix scan over them
(`rnnjax.parallel.associative`), since composing two steps is again such a step:
``(a_1, b_1) then (a_2, b_2) = (a_2 a_1, a_2 b_1 + b_2)``.

With ``complex=True`` the state holds N complex units as their real and imaginary halves,
``h = [Re s, Im s]`` ``[..., 2N]`` (the `rj.lru` layout), and ``a``, ``b`` are laid out the same way:
``⊙`` is then the complex product, i.e. each unit's 2×2 real block ``[[Re a, −Im a], [Im a, Re a]]``.

This module also holds the small algebra both the step and the scans use: products and conjugates of such
coefficients, over "numbers" held as tuples of arrays (one array for real units, two halves for complex).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any
Parts = tuple[Array, ...]  # a real number as (x,), a complex one as (re, im)


@dataclasses.dataclass(frozen=True)
class LinearRecurrence:
    """A cell's declaration that its step is ``h_t = a_t ⊙ h_{t-1} + b_t`` with ``a_t, b_t`` from ``x_t``.

    Attributes:
      coefficients: ``coefficients(params, xs [..., I]) -> (a, b)``, each ``[..., H]``: the decay and the
        input term of every step. It must treat every leading position (batch row, time step) alike and
        apart, as a per-step map does: the drivers call it on a whole sequence, time-major or batch-major,
        and on one step ``x [B, I]``. A decay that does not depend on ``x`` is broadcast to ``[..., H]``.
      complex: the state is ``N = H/2`` complex units held as ``[Re, Im]`` halves of ``h``, and ``a``,
        ``b`` are complex in the same layout (``rj.lru``). False: real, elementwise.

    The cell's carry must have one leaf, ``h [B, H]`` (e.g. ``HCarry(h)``), and its output at every step is
    that ``h``. A `Cell` given ``linear=`` and no ``step`` gets its step written from ``coefficients``
    (`linear_step`); a cell given both is responsible for their agreeing (the tests of the built-in cells
    compare them).

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> def coefficients(params, xs):          # an exponential moving average of a projection of x
      ...     a = jnp.broadcast_to(params["decay"], xs.shape[:-1] + params["decay"].shape)
      ...     return a, (xs @ params["w"]) * (1 - a)
      >>> def init(key, input_size, dtype=None):
      ...     return {"w": jnp.ones((input_size, 4)), "decay": jnp.full(4, 0.9)}
      >>> cell = rj.Cell(
      ...     init=init,
      ...     initial_carry=lambda params, batch_shape=(): rj.HCarry(jnp.zeros((*batch_shape, 4))),
      ...     hidden_size=4, linear=rj.LinearRecurrence(coefficients))
      >>> params = cell.init(None, 3)
      >>> carry, ys = rj.unroll(cell, params, jnp.ones((2, 50, 3)), method="associative")
      >>> ys.shape
      (2, 50, 4)
    """

    coefficients: Callable[[PyTree, Array], tuple[Array, Array]]
    complex: bool = False

    def __post_init__(self) -> None:
        if not callable(self.coefficients):
            raise TypeError(
                "LinearRecurrence.coefficients must be a function (params, xs) -> (a, b), "
                f"got {type(self.coefficients).__name__}"
            )
        if not isinstance(self.complex, bool):
            raise TypeError(f"LinearRecurrence.complex must be a bool, got {self.complex!r}")

    def parts(self, x: Array) -> Parts:
        """``x [..., H]`` as this recurrence's numbers (`split`)."""
        return split(x, self.complex)

    def one(self, like: Array) -> Array:
        """The identity decay, shaped like ``like [..., H]``: ones, or ``[1, 0]`` halves (1 + 0i)."""
        if not self.complex:
            return jnp.ones_like(like)
        n = like.shape[-1] // 2
        unit = jnp.concatenate([jnp.ones((n,), like.dtype), jnp.zeros((n,), like.dtype)])
        return jnp.broadcast_to(unit.reshape((1,) * (like.ndim - 1) + unit.shape), like.shape)


def split(x: Array, complex_: bool) -> Parts:
    """``x [..., H]`` as numbers: ``(x,)``, or, complex, its ``(re, im)`` halves ``[..., H/2]``."""
    if not complex_:
        return (x,)
    n = x.shape[-1] // 2
    return (x[..., :n], x[..., n:])


def join(x: Parts) -> Array:
    """The inverse of `split`: one array ``[..., H]``."""
    return x[0] if len(x) == 1 else jnp.concatenate(x, axis=-1)


def mul(x: Parts, y: Parts) -> Parts:
    """The elementwise product of two numbers: real, or complex ``(re, im)``."""
    if len(x) == 1:
        return (x[0] * y[0],)
    return (x[0] * y[0] - x[1] * y[1], x[0] * y[1] + x[1] * y[0])


def add(x: Parts, y: Parts) -> Parts:
    """The elementwise sum of two numbers."""
    return tuple(u + v for u, v in zip(x, y, strict=True))


def conj(x: Parts) -> Parts:
    """The complex conjugate (the transpose of a 2×2 block); a real number unchanged."""
    return x if len(x) == 1 else (x[0], -x[1])


def linear_step(spec: LinearRecurrence) -> Callable[[PyTree, PyTree, Array], tuple[PyTree, Array]]:
    """The one-step function of a cell declared by ``spec``: ``h = a ⊙ h_prev + b``, ``y = h``."""

    def step(params: PyTree, carry: PyTree, x: Array) -> tuple[PyTree, Array]:
        (h,), treedef = jax.tree.flatten(carry)
        a, b = spec.coefficients(params, x)
        new = join(add(mul(spec.parts(a), spec.parts(h)), spec.parts(b)))
        return jax.tree.unflatten(treedef, [new]), new

    step._rnnjax_linear = spec  # type: ignore[attr-defined]  # what `Cell` recognises as written from it
    return step
