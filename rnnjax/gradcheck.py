"""`gradcheck`: the hand-derived BPTT against `jax.grad` and against central finite differences, in float64.

For a cell, the checked function is a random linear read-out of everything `rj.unroll` returns,

    L(params, xs, carry) = Σ ys ⊙ R_y + Σ_leaves final_carry ⊙ R_c        (R_y, R_c fixed, standard normal)

so the gradient is the full vector-Jacobian product with a generic cotangent: every output and every carry
leaf reaches it. For a loss function, the function itself is checked. Three gradients are compared per input
leaf:

- **manual vs autodiff**: ``‖g_manual − g_autodiff‖_∞ / ‖g_autodiff‖_∞`` (absolute when the gradient is zero);
  the two share one forward, so only the backward can disagree. Round-off in float64 is ~1e-16 to 1e-14.
- **manual vs finite differences**: for ``n_directions`` random unit directions ``v`` per leaf,
  ``|(L(θ + εv) − L(θ − εv)) / 2ε − ⟨g_manual, v⟩| / ‖g_manual‖₂``. Central differences err by O(ε²) in
  truncation and O(δ_machine / ε) in round-off, ~1e-10 at ε = 1e-6.

Both errors are normalised by the gradient's own norm, so the tolerances do not loosen with array size.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.cells.base import Cell
from rnnjax.driver import unroll

Array = jax.Array
PyTree = Any


@dataclasses.dataclass(frozen=True)
class GradcheckRow:
    """The check of one input leaf."""

    leaf: str  # e.g. "params.w_ih", "xs", "carry.h"
    shape: tuple[int, ...]
    manual_vs_autodiff: float  # ‖g_manual − g_autodiff‖_∞ / ‖g_autodiff‖_∞
    manual_vs_fd: float  # max over directions of |fd − ⟨g_manual, v⟩| / ‖g_manual‖₂
    passed: bool


@dataclasses.dataclass(frozen=True)
class GradcheckReport:
    """What `gradcheck` found; ``str(report)`` is a table, ``report.passed`` the verdict."""

    name: str
    rows: tuple[GradcheckRow, ...]
    rtol_autodiff: float
    rtol_fd: float
    eps: float
    n_directions: int

    @property
    def passed(self) -> bool:
        """True when every leaf passed both comparisons."""
        return all(r.passed for r in self.rows)

    @property
    def max_autodiff_error(self) -> float:
        """The worst manual-vs-autodiff relative error over the leaves."""
        return max((r.manual_vs_autodiff for r in self.rows), default=0.0)

    @property
    def max_fd_error(self) -> float:
        """The worst manual-vs-finite-differences relative error over the leaves."""
        return max((r.manual_vs_fd for r in self.rows), default=0.0)

    def __str__(self) -> str:
        head = ("leaf", "shape", "manual vs autodiff", "manual vs finite diff", "ok")
        body = [
            (
                r.leaf,
                str(r.shape),
                f"{r.manual_vs_autodiff:.2e}",
                f"{r.manual_vs_fd:.2e}",
                "yes" if r.passed else "NO",
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()  # noqa: E731
        verdict = "PASSED" if self.passed else "FAILED"
        return "\n".join(
            [
                f"gradcheck {self.name}: float64, central differences eps={self.eps:g}, "
                f"{self.n_directions} random directions per leaf",
                line(head),
                line(tuple("-" * w for w in widths)),
                *(line(row) for row in body),
                f"tolerances: manual vs autodiff <= {self.rtol_autodiff:g}, "
                f"finite differences <= {self.rtol_fd:g}: {verdict}",
            ]
        )


def gradcheck(
    target: Cell | Callable[..., Array],
    *args: PyTree,
    carry: PyTree | None = None,
    lengths: Array | None = None,
    reverse: bool = False,
    key: Array | None = None,
    eps: float = 1e-6,
    n_directions: int = 3,
    rtol_autodiff: float = 1e-10,
    rtol_fd: float = 1e-6,
    name: str | None = None,
) -> GradcheckReport:
    """Compares the hand-derived BPTT with `jax.grad` and with central finite differences, in float64.

    Two forms:

    - ``gradcheck(cell, params, xs, carry=None, lengths=None, reverse=False)``: checks `rj.unroll` of a
      built-in or user-written `Cell` through a random linear read-out of ``ys`` and the final carry,
      with respect to ``params``, ``xs`` and the initial carry (zeros when ``carry`` is None).
    - ``gradcheck(loss_fn, *args)``: checks a scalar function ``loss_fn(*args, grad=mode)`` that passes
      ``grad`` on to `rj.unroll` (``mode`` is ``"manual"`` or ``"autodiff"``), with respect to every
      floating-point leaf of ``args``.

    Floating-point inputs are cast to float64, and the check runs with ``jax_enable_x64`` on.

    Args:
      target: a `Cell`, or a loss function taking ``grad=`` as a keyword.
      *args: ``(params, xs [B, T, I])`` for a cell; the loss function's positional arguments otherwise.
      carry, lengths, reverse: passed to `rj.unroll` (cells only).
      key: PRNG key for the read-out weights and the directions; ``jax.random.key(0)`` by default.
      eps: the finite-difference step (along unit directions).
      n_directions: random directions per leaf for the finite-difference check.
      rtol_autodiff: tolerance of the manual-vs-autodiff relative error.
      rtol_fd: tolerance of the finite-difference relative error.
      name: a title for the report (the cell's name by default).

    Returns:
      A `GradcheckReport`: one row per input leaf; ``print(report)`` shows the table.

    Example:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.gru(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> report = rj.gradcheck(cell, params, jnp.ones((2, 5, 3)), lengths=jnp.array([5, 2]))
      >>> report.passed
      True
    """
    if key is None:
        key = jax.random.key(0)
    if not (isinstance(n_directions, int) and n_directions >= 1):
        raise ValueError(f"n_directions must be an int >= 1, got {n_directions!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    with jax.enable_x64(True):
        if isinstance(target, Cell):
            loss_fn, args, names = _cell_readout(target, args, carry, lengths, reverse, key)
            title = name or target.name
        elif callable(target):
            if carry is not None or lengths is not None or reverse:
                raise TypeError(
                    "carry, lengths and reverse apply to gradcheck(cell, params, xs); for a loss function "
                    "pass them to rj.unroll inside it"
                )
            loss_fn, names = target, _argument_names(target, len(args))
            args = _to_float64(args)
            title = name or getattr(target, "__name__", "function")
        else:
            raise TypeError(f"target must be a Cell or a loss function, got {type(target).__name__}")
        rows = _compare(loss_fn, args, names, key, eps, n_directions, rtol_autodiff, rtol_fd)
    return GradcheckReport(title, rows, rtol_autodiff, rtol_fd, eps, n_directions)


def _to_float64(tree: PyTree) -> PyTree:
    def cast(a: Any) -> Any:
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating):
            return jnp.asarray(a, jnp.float64)
        return a

    return jax.tree.map(cast, tree)


def _argument_names(fn: Callable[..., Any], n: int) -> list[str]:
    """Names for the positional arguments of ``fn`` (``args[i]`` where the signature does not tell)."""
    try:
        params = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"args[{i}]" for i in range(n)]


def _cell_readout(
    cell: Cell,
    args: tuple,
    carry: PyTree | None,
    lengths: Array | None,
    reverse: bool,
    key: Array,
) -> tuple[Callable[..., Array], tuple, list[str]]:
    """The random linear read-out of `rj.unroll`, as a loss of ``(params, xs, carry)``."""
    if len(args) != 2:
        raise TypeError(f"gradcheck(cell, params, xs) takes 2 arguments after the cell, got {len(args)}")
    params, xs = _to_float64(args)
    xs = jnp.asarray(xs)
    batch_shape = tuple(xs.shape[:-2])
    carry = cell.initial_carry(params, batch_shape) if carry is None else _to_float64(carry)
    carry_out, ys = jax.eval_shape(
        lambda p, x, c: unroll(cell, p, x, c, lengths=lengths, reverse=reverse), params, xs, carry
    )
    leaves = jax.tree.leaves((carry_out, ys))
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    weights = [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves, strict=True)]

    def loss(params: PyTree, xs: Array, carry: PyTree, *, grad: str) -> Array:
        out = unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse, grad=grad)
        return sum(jnp.sum(a * w) for a, w in zip(jax.tree.leaves(out), weights, strict=True))

    return loss, (params, xs, carry), ["params", "xs", "carry"]


def _compare(
    loss_fn: Callable[..., Array],
    args: tuple,
    names: list[str],
    key: Array,
    eps: float,
    n_directions: int,
    rtol_autodiff: float,
    rtol_fd: float,
) -> tuple[GradcheckRow, ...]:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(list(args))
    leaves = [leaf for _, leaf in paths_leaves]
    diff_idx = [
        i for i, a in enumerate(leaves) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
    ]

    def flat_loss(diff_leaves: list[Array], grad: str) -> Array:
        full = list(leaves)
        for i, a in zip(diff_idx, diff_leaves, strict=True):
            full[i] = a
        value = loss_fn(*jax.tree.unflatten(treedef, full), grad=grad)
        if jnp.shape(value) != ():
            raise ValueError(f"the loss function must return a scalar, got shape {jnp.shape(value)}")
        return value

    x0 = [leaves[i] for i in diff_idx]
    g_manual = jax.jit(jax.grad(lambda xs: flat_loss(xs, "manual")))(x0)
    g_auto = jax.jit(jax.grad(lambda xs: flat_loss(xs, "autodiff")))(x0)
    value = jax.jit(lambda xs: flat_loss(xs, "manual"))

    rows = []
    for n, i in enumerate(diff_idx):
        path, a = paths_leaves[i]
        leaf_name = names[path[0].idx] + jax.tree_util.keystr(path[1:])
        gm, ga = np.asarray(g_manual[n]), np.asarray(g_auto[n])
        err_auto = _relative(np.max(np.abs(gm - ga), initial=0.0), np.max(np.abs(ga), initial=0.0))
        g_norm = float(np.linalg.norm(gm))
        err_fd = 0.0
        for k in range(n_directions):
            v = jax.random.normal(jax.random.fold_in(key, 1000 * n + k + 2), a.shape, a.dtype)
            v = v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(a.dtype).tiny)
            plus = [x if j != n else x + eps * v for j, x in enumerate(x0)]
            minus = [x if j != n else x - eps * v for j, x in enumerate(x0)]
            fd = (float(value(plus)) - float(value(minus))) / (2 * eps)
            err_fd = max(err_fd, _relative(abs(fd - float(np.vdot(gm, np.asarray(v)))), g_norm))
        rows.append(
            GradcheckRow(
                leaf=leaf_name,
                shape=tuple(a.shape),
                manual_vs_autodiff=err_auto,
                manual_vs_fd=err_fd,
                passed=bool(err_auto <= rtol_autodiff and err_fd <= rtol_fd),
            )
        )
    return tuple(rows)


def _relative(err: float, scale: float) -> float:
    """``err / scale``, or ``err`` itself when the scale is zero (an all-zero gradient)."""
    return float(err / scale) if scale > 0 else float(err)
