"""`gradcheck`: the hand-derived BPTT against three independent oracles and finite differences, in float64.

For a cell, the checked function is a random linear read-out of everything `rj.unroll` returns,

    L(params, xs, carry) = Σ ys ⊙ R_y + Σ_leaves final_carry ⊙ R_c        (R_y, R_c fixed, standard normal)

so the gradient is the full vector-Jacobian product with a generic cotangent: every output and every carry
leaf reaches it. For a loss function, the function itself is checked. The hand-derived ("manual") gradient
is compared, per input leaf, with:

- **autodiff**: reverse mode through the forward scan (``grad="autodiff"``):
  ``‖g_manual − g_autodiff‖_∞ / ‖g_autodiff‖_∞`` (absolute when the gradient is zero); the two share one
  forward, so only the backward can disagree. Round-off in float64 is ~1e-16 to 1e-14.
- **RTRL**: forward mode (`jax.jacfwd`) through the scan, the real-time recurrent learning gradient: the
  sensitivities ``∂s_t/∂θ`` are carried forward in time with the state (Williams and Zipser, 1989), and no
  reverse pass is involved. Same error measure as autodiff.
- **complex step**: ``⟨∇L, v⟩ = Im L(θ + i h v) / h`` with ``h = 1e-20`` along random unit directions ``v``
  (Squire and Trapp, 1998): no subtraction, so no cancellation, and exact to round-off for cells analytic in
  their inputs (tanh, sigmoid, identity, LSTM, GRU; ReLU away from its kink). Cells only: it runs the cell's
  forward in complex128, which `rj.unroll` does not accept.
- **finite differences**: for ``n_directions`` random unit directions ``v`` per leaf, the fourth-order
  central difference ``D = (8 (L(θ + εv) − L(θ − εv)) − (L(θ + 2εv) − L(θ − 2εv))) / 12ε`` and
  ``|D − ⟨g_manual, v⟩| / ‖g_manual‖₂``. It errs by O(ε⁴) in truncation and O(δ_machine / ε) in round-off;
  at the default ε = δ_machine^(1/3) ≈ 6e-6, ~1e-10 whatever L's higher derivatives. (The two-point
  difference errs by O(ε²) times L's third derivative, which is large for a layer-norm LSTM from a zero
  carry, whose normalised ``h w_hh`` is 1/√ε_LN-steep there.)

Every error is normalised by the gradient's own norm, so the tolerances do not loosen with array size (unlike
`jax.test_util.check_grads`, whose tolerance scales with it).
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
from rnnjax.driver import GradMode, unroll
from rnnjax.scan import forward, mask_from_lengths
from rnnjax.sharding import batch_like

Array = jax.Array
PyTree = Any


ORACLES: tuple[str, ...] = ("autodiff", "rtrl", "complex_step", "finite_differences")
"""The references `gradcheck` compares the hand-derived gradient with (``rj.GRADCHECK_ORACLES``)."""
RTRL_MAX_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Localisation:
    """Where a cell's hand-derived backward first parts from autodiff.

    The backward visits the steps from ``T−1`` down to 0 (forward RNN; the other way for ``reverse``); up
    to the faulty step every per-step gradient agrees, so the first disagreeing step and, there, the gate
    blocks that disagree point at the bug. For built-in-style cells (``gates``/``gates_bwd``) the per-step
    gradient is each gate's ``Σ_batch ∂L/∂z_t`` (read off an extra one-hot input per step whose weights are
    zero); for other cells it is ``∂L/∂x_t``.
    """

    leaves: tuple[str, ...]  # the input leaves whose gradients disagree
    first_step: int | None  # the first disagreeing step, in the backward's order
    gates: tuple[str, ...]  # the gate blocks (cell.gate_names) that disagree at that step
    quantity: str  # the per-step gradient compared

    def __str__(self) -> str:
        where = "no single step" if self.first_step is None else f"first at step t={self.first_step}"
        gates = f", gate {', '.join(self.gates)}" if self.gates else ""
        return (
            f"localised: {', '.join(self.leaves)} disagree; per-step {self.quantity}: {where}{gates} "
            "(steps in the backward's order)"
        )


@dataclasses.dataclass(frozen=True)
class GradcheckRow:
    """The check of one input leaf: its relative errors against each oracle, and the verdict.

    Attributes:
      leaf: the leaf's path, e.g. ``"params.w_ih"``, ``"xs"``, ``"carry.h"``.
      shape: the leaf's shape.
      manual_vs_autodiff: ``‖g_manual − g_autodiff‖_∞ / ‖g_autodiff‖_∞``; None where not run.
      manual_vs_fd: the largest ``|fd − ⟨g_manual, v⟩| / ‖g_manual‖₂`` over the random directions ``v``;
        None where not run.
      passed: whether every error that was computed is within its tolerance.
      manual_vs_rtrl: ``‖g_manual − g_rtrl‖_∞ / ‖g_rtrl‖_∞``; None where not run.
      manual_vs_complex: as ``manual_vs_fd``, against the complex-step derivative; None where not run.

    Examples:
      >>> import rnnjax as rj
      >>> row = rj.GradcheckRow("params.w_ih", (3, 12), manual_vs_autodiff=1e-16, manual_vs_fd=2e-9,
      ...                       passed=True)
      >>> row.passed, row.manual_vs_rtrl
      (True, None)
    """

    leaf: str  # e.g. "params.w_ih", "xs", "carry.h"
    shape: tuple[int, ...]
    manual_vs_autodiff: float | None  # ‖g_manual − g_autodiff‖_∞ / ‖g_autodiff‖_∞; None: not run
    manual_vs_fd: float | None  # max over directions of |fd − ⟨g_manual, v⟩| / ‖g_manual‖₂; None: not run
    passed: bool
    manual_vs_rtrl: float | None = None  # ‖g_manual − g_rtrl‖_∞ / ‖g_rtrl‖_∞; None: not run
    manual_vs_complex: float | None = None  # max over directions of |cs − ⟨g_manual, v⟩| / ‖g_manual‖₂


@dataclasses.dataclass(frozen=True)
class GradcheckReport:
    """What `gradcheck` found; ``str(report)`` is a table, ``report.passed`` the verdict.

    Attributes:
      name: the title (the cell's name by default).
      rows: one `GradcheckRow` per input leaf.
      rtol_autodiff: the tolerance of the autodiff, RTRL and complex-step errors.
      rtol_fd: the tolerance of the finite-difference error.
      eps: the finite-difference step.
      n_directions: random directions per leaf.
      oracles: the oracles that were asked for (see `ORACLES`).
      notes: why an oracle that was asked for did not run.
      localisation: for a cell whose manual gradient parts from autodiff, the first step and gate blocks
        where they disagree; else None.

    Examples:
      `gradcheck` builds it; by hand, for the table's layout:

      >>> import rnnjax as rj
      >>> row = rj.GradcheckRow("params.w_ih", (3, 12), manual_vs_autodiff=1e-16, manual_vs_fd=2e-9,
      ...                       passed=True)
      >>> report = rj.GradcheckReport("mine", (row,), rtol_autodiff=1e-10, rtol_fd=1e-6, eps=6e-6,
      ...                             n_directions=3)
      >>> report.passed, report.max_fd_error
      (True, 2e-09)
      >>> print(report)  # doctest: +NORMALIZE_WHITESPACE
      gradcheck mine: the manual gradient in float64 against autodiff, finite_differences; fourth-order
      central differences eps=6e-06 and the complex step along 3 random directions per leaf
      leaf         shape    vs autodiff  vs RTRL  vs complex step  vs finite diff  ok
      -----------  -------  -----------  -------  ---------------  --------------  ---
      params.w_ih  (3, 12)  1.00e-16     n/a      n/a              2.00e-09        yes
      tolerances: autodiff, RTRL and complex step <= 1e-10, finite differences <= 1e-06: PASSED
    """

    name: str
    rows: tuple[GradcheckRow, ...]
    rtol_autodiff: float
    rtol_fd: float
    eps: float
    n_directions: int
    oracles: tuple[str, ...] = ("autodiff", "finite_differences")
    notes: tuple[str, ...] = ()  # why an oracle that was asked for did not run
    localisation: Localisation | None = None  # where manual and autodiff part, when they do (cells only)

    @property
    def passed(self) -> bool:
        """True when every leaf passed both comparisons."""
        return all(r.passed for r in self.rows)

    @property
    def max_autodiff_error(self) -> float:
        """The worst manual-vs-autodiff relative error over the leaves."""
        return max((r.manual_vs_autodiff or 0.0 for r in self.rows), default=0.0)

    @property
    def max_fd_error(self) -> float:
        """The worst manual-vs-finite-differences relative error over the leaves."""
        return max((r.manual_vs_fd or 0.0 for r in self.rows), default=0.0)

    @property
    def max_rtrl_error(self) -> float | None:
        """The worst manual-vs-RTRL (forward mode) relative error, or None where it was not run."""
        errors = [r.manual_vs_rtrl for r in self.rows if r.manual_vs_rtrl is not None]
        return max(errors) if errors else None

    @property
    def max_complex_error(self) -> float | None:
        """The worst manual-vs-complex-step relative error, or None where it was not run."""
        errors = [r.manual_vs_complex for r in self.rows if r.manual_vs_complex is not None]
        return max(errors) if errors else None

    def __str__(self) -> str:
        fmt = lambda e: "n/a" if e is None else f"{e:.2e}"  # noqa: E731
        head = ("leaf", "shape", "vs autodiff", "vs RTRL", "vs complex step", "vs finite diff", "ok")
        body = [
            (
                r.leaf,
                str(r.shape),
                fmt(r.manual_vs_autodiff),
                fmt(r.manual_vs_rtrl),
                fmt(r.manual_vs_complex),
                fmt(r.manual_vs_fd),
                "yes" if r.passed else "NO",
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()  # noqa: E731
        verdict = "PASSED" if self.passed else "FAILED"
        return "\n".join(
            [
                f"gradcheck {self.name}: the manual gradient in float64 against {', '.join(self.oracles)}; "
                f"fourth-order central differences eps={self.eps:g} and the complex step along "
                f"{self.n_directions} random directions per leaf",
                line(head),
                line(tuple("-" * w for w in widths)),
                *(line(row) for row in body),
                *self.notes,
                *([str(self.localisation)] if self.localisation else []),
                f"tolerances: autodiff, RTRL and complex step <= {self.rtol_autodiff:g}, "
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
    eps: float | None = None,
    n_directions: int = 3,
    rtol_autodiff: float = 1e-10,
    rtol_fd: float = 1e-6,
    name: str | None = None,
    oracles: tuple[str, ...] = ORACLES,
    complex_step: float = 1e-20,
    rtrl_max_bytes: int | None = RTRL_MAX_BYTES,
) -> GradcheckReport:
    """Compares the hand-derived BPTT with autodiff, RTRL, the complex step and finite differences (float64).

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
      eps: the finite-difference step along unit directions; None: ``ε_mach^(1/3) ≈ 6.1e-6``, where the
        fourth-order stencil's round-off O(ε_mach/ε) is ~1e-11 and its truncation O(ε⁴) negligible.
      n_directions: random directions per leaf for the finite-difference check.
      rtol_autodiff: tolerance of the manual-vs-autodiff, -RTRL and -complex-step relative errors.
      rtol_fd: tolerance of the finite-difference relative error.
      name: a title for the report (the cell's name by default).
      oracles: which of `ORACLES` to compare with: ``"autodiff"``, ``"rtrl"``, ``"complex_step"`` (cells
        only; skipped for a loss function) and ``"finite_differences"``.
      complex_step: the imaginary step h of the complex-step derivative.
      rtrl_max_bytes: the most memory the RTRL oracle may take. Its forward-mode sensitivities grow as
        (number of inputs) x (the forward's memory), O(S²P) for a cell: before it runs, its program is
        compiled and its memory read; over this cap it is skipped, with a line in the report saying so.
        None: no cap. The default, 1 GiB, keeps a laptop-sized check from running out of memory (the
        sensitivities of an LSTM with H=64 over a short sequence take gigabytes).

    Returns:
      A `GradcheckReport`: one row per input leaf; ``print(report)`` shows the table.

    Raises:
      TypeError: if ``target`` is neither a `Cell` nor a function, a cell gets other than two arguments
        after it, or an argument is of the wrong type.
      ValueError: if ``n_directions``, ``eps``, ``complex_step``, ``rtrl_max_bytes`` or ``oracles`` is out
        of range, or the loss function does not return a scalar.

    Examples:
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
    if eps is None:
        eps = float(np.finfo(np.float64).eps ** (1 / 3))
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not complex_step > 0:
        raise ValueError(f"complex_step must be > 0, got {complex_step!r}")
    if rtrl_max_bytes is not None and not (isinstance(rtrl_max_bytes, int) and rtrl_max_bytes > 0):
        raise ValueError(f"rtrl_max_bytes must be an int > 0 or None, got {rtrl_max_bytes!r}")
    if not isinstance(oracles, (tuple, list)):
        raise TypeError(f"oracles must be a non-empty tuple of {ORACLES}, got {oracles!r}")
    oracles = tuple(oracles)
    unknown = [o for o in oracles if o not in ORACLES]
    if unknown or not oracles:
        raise ValueError(f"oracles must be a non-empty tuple of {ORACLES}, got {oracles!r}")
    complex_fn = None
    with jax.enable_x64(True):
        if isinstance(target, Cell):
            loss_fn, complex_fn, args, names = _cell_readout(target, args, carry, lengths, reverse, key)
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
            oracles = tuple(o for o in oracles if o != "complex_step")
        else:
            raise TypeError(f"target must be a Cell or a loss function, got {type(target).__name__}")
        rows, notes, grads = _compare(
            loss_fn,
            complex_fn,
            args,
            names,
            key,
            eps,
            n_directions,
            rtol_autodiff,
            rtol_fd,
            oracles,
            complex_step,
            rtrl_max_bytes,
        )
        localisation = None
        if isinstance(target, Cell) and "autodiff" in oracles:
            failing = {
                r.leaf
                for r in rows
                if r.manual_vs_autodiff is not None and r.manual_vs_autodiff > rtol_autodiff
            }
            if failing:
                localisation = _localise(target, loss_fn, args, grads, failing, reverse, rtol_autodiff)
    return GradcheckReport(
        title, rows, rtol_autodiff, rtol_fd, eps, n_directions, oracles, notes, localisation
    )


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
) -> tuple[Callable[..., Array], Callable[..., Array] | None, tuple, list[str]]:
    """The random linear read-out of `rj.unroll` as a loss of ``(params, xs, carry)``; its complex twin."""
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

    def loss(
        params: PyTree, xs: Array, carry: PyTree, *, grad: GradMode, probe: Array | None = None
    ) -> Array:
        out = unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse, grad=grad, probe=probe)
        return jnp.asarray(sum(jnp.sum(a * w) for a, w in zip(jax.tree.leaves(out), weights, strict=True)))

    def complex_loss(params: PyTree, xs: Array, carry: PyTree) -> Array:
        """The same read-out in complex128, through the very forward `rj.unroll` runs (flat batch)."""
        T, I = xs.shape[-2:]
        B = int(np.prod(batch_shape))
        flat_xs = xs.reshape(B, T, I)
        flat_carry = jax.tree.map(lambda a: a.reshape((B, *a.shape[len(batch_shape) :])), carry)
        flat_carry = batch_like(flat_carry, flat_xs, 1)  # on a device mesh, split as `unroll` splits it
        mask = None if lengths is None else mask_from_lengths(jnp.asarray(lengths).reshape(B), T)
        out = forward(cell, params, flat_xs, flat_carry, mask, reverse, 1)
        out = jax.tree.map(lambda a: a.reshape(batch_shape + a.shape[1:]), out)
        terms = [jnp.sum(a * w.astype(a.dtype)) for a, w in zip(jax.tree.leaves(out), weights, strict=True)]
        return jnp.asarray(sum(terms))

    T = xs.shape[-2]
    return loss, complex_loss if T > 0 else None, (params, xs, carry), ["params", "xs", "carry"]


def _compare(
    loss_fn: Callable[..., Array],
    complex_fn: Callable[..., Array] | None,
    args: tuple,
    names: list[str],
    key: Array,
    eps: float,
    n_directions: int,
    rtol_autodiff: float,
    rtol_fd: float,
    oracles: tuple[str, ...],
    h: float,
    rtrl_max_bytes: int | None,
) -> tuple[tuple[GradcheckRow, ...], tuple[str, ...], dict[str, tuple[np.ndarray, np.ndarray | None]]]:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(list(args))
    leaves = [leaf for _, leaf in paths_leaves]
    diff_idx = [
        i for i, a in enumerate(leaves) if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
    ]

    def with_leaves(diff_leaves: list[Array]) -> list:
        full = list(leaves)
        for i, a in zip(diff_idx, diff_leaves, strict=True):
            full[i] = a
        return jax.tree.unflatten(treedef, full)

    def flat_loss(diff_leaves: list[Array], grad: GradMode) -> Array:
        value = loss_fn(*with_leaves(diff_leaves), grad=grad)
        if jnp.shape(value) != ():
            raise ValueError(f"the loss function must return a scalar, got shape {jnp.shape(value)}")
        return value

    x0 = [leaves[i] for i in diff_idx]
    g_manual = jax.jit(jax.grad(lambda xs: flat_loss(xs, "manual")))(x0)
    g_auto = jax.jit(jax.grad(lambda xs: flat_loss(xs, "autodiff")))(x0) if "autodiff" in oracles else None
    # RTRL: forward mode through the scan, the sensitivities carried forward in time with the state
    g_rtrl, notes = None, []
    if "rtrl" in oracles:
        g_rtrl, note = _rtrl(lambda xs: flat_loss(xs, "autodiff"), x0, rtrl_max_bytes)
        notes += [note] if note else []
    # the loss at x0 + deltas, one leaf's delta non-zero at a time: one compiled program for every leaf and
    # direction (the shifts are built on the host, so no small operation compiles per leaf shape)
    shifted_value = jax.jit(lambda xs, ds: flat_loss([x + d for x, d in zip(xs, ds, strict=True)], "manual"))
    zeros = [np.zeros(x.shape, x.dtype) for x in x0]
    use_complex = "complex_step" in oracles and complex_fn is not None
    if use_complex:
        assert complex_fn is not None  # (use_complex says so)
        # every input in complex128: the other leaves (e.g. the carry) must not mix real and complex
        x0_c = [x.astype(jnp.complex128) for x in x0]
        zeros_c = [np.zeros(x.shape, np.complex128) for x in x0]
        complex_value = jax.jit(
            lambda xs, ds: complex_fn(*with_leaves([x + d for x, d in zip(xs, ds, strict=True)]))
        )

    def along(n: int, delta: np.ndarray, complex_step: bool = False) -> Array:
        """The loss (or complex loss) with ``delta`` added to leaf n."""
        ds = list(zeros_c if complex_step else zeros)
        ds[n] = delta
        return complex_value(x0_c, ds) if complex_step else shifted_value(x0, ds)

    rows, grads = [], {}
    for n, i in enumerate(diff_idx):
        path, a = paths_leaves[i]
        leaf_name = names[path[0].idx] + jax.tree_util.keystr(path[1:])
        gm = np.asarray(g_manual[n])
        grads[leaf_name] = (gm, None if g_auto is None else np.asarray(g_auto[n]))
        g_norm = float(np.linalg.norm(gm))
        err_auto = _sup_error(gm, g_auto[n]) if g_auto is not None else None
        err_rtrl = _sup_error(gm, g_rtrl[n]) if g_rtrl is not None else None
        err_fd = 0.0 if "finite_differences" in oracles else None
        err_cs = 0.0 if use_complex else None
        for k in range(n_directions):
            v = np.asarray(jax.random.normal(jax.random.fold_in(key, 1000 * n + k + 2), a.shape, a.dtype))
            v = v / max(np.linalg.norm(v), np.finfo(v.dtype).tiny)
            exact = float(np.vdot(gm, v))
            if err_fd is not None:

                def at(s: int, n: int = n, v: np.ndarray = v) -> float:  # L(θ + s·ε·v), along leaf n
                    return float(along(n, (s * eps) * v))

                fd = (8 * (at(1) - at(-1)) - (at(2) - at(-2))) / (12 * eps)
                err_fd = max(err_fd, _relative(abs(fd - exact), g_norm))
            if err_cs is not None:
                cs = float(np.imag(along(n, v.astype(np.complex128) * (1j * h), complex_step=True))) / h
                err_cs = max(err_cs, _relative(abs(cs - exact), g_norm))
        checks = [
            (err_auto, rtol_autodiff),
            (err_rtrl, rtol_autodiff),
            (err_cs, rtol_autodiff),
            (err_fd, rtol_fd),
        ]
        rows.append(
            GradcheckRow(
                leaf=leaf_name,
                shape=tuple(a.shape),
                manual_vs_autodiff=err_auto,
                manual_vs_fd=err_fd,
                passed=all(err <= tol for err, tol in checks if err is not None),
                manual_vs_rtrl=err_rtrl,
                manual_vs_complex=err_cs,
            )
        )
    return tuple(rows), tuple(notes), grads


def _rtrl(
    loss: Callable[[list[Array]], Array], x0: list[Array], max_bytes: int | None
) -> tuple[list[Array] | None, str | None]:
    """The RTRL gradient (forward mode, `jax.jacfwd`) of ``loss`` at ``x0``, or None and why it was not run:
    no forward mode, or a compiled program over ``max_bytes`` (its memory is read before it runs)."""
    try:
        compiled = jax.jit(jax.jacfwd(loss)).lower(x0).compile()
    except TypeError as e:  # e.g. a jax.custom_vjp inside a loss function has no forward mode
        return None, f"RTRL not run: the function has no forward mode ({str(e).splitlines()[0][:120]})"
    need = _compiled_bytes(compiled)
    if max_bytes is not None and need is not None and need > max_bytes:
        n = sum(x.size for x in x0)
        return None, (
            f"RTRL not run: its sensitivities of {n} inputs need {need / 2**20:.1f} MiB, over "
            f"rtrl_max_bytes={max_bytes / 2**20:.1f} MiB; pass rtrl_max_bytes=None to run it anyway"
        )
    return compiled(x0), None


def _compiled_bytes(compiled: Any) -> int | None:
    """A compiled program's memory (temporaries, arguments and outputs), where the backend reports it."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes


def _localise(
    cell: Cell,
    loss_fn: Callable[..., Array],
    args: tuple,
    grads: dict[str, tuple[np.ndarray, np.ndarray | None]],
    failing: set[str],
    reverse: bool,
    rtol: float,
) -> Localisation:
    """The first time step (backward order) and the gate blocks where manual and autodiff part."""
    params, xs, carry = args
    T = xs.shape[-2]
    G = len(cell.gate_names)
    if cell.is_builtin and G and hasattr(params, "w_ih"):
        H = params.w_ih.shape[-1] // G  # the width of one gate block
        # one extra input per step, a one-hot of t, with zero weights: the forward is unchanged, and the
        # gradient of those weights' row t is Σ_batch ∂L/∂z_t, every gate block of step t apart
        onehot = jnp.broadcast_to(jnp.eye(T, dtype=xs.dtype), (*xs.shape[:-2], T, T))
        xs_aug = jnp.concatenate([xs, onehot], axis=-1)

        def per_step(grad: GradMode) -> np.ndarray:
            def f(w_t: Array) -> Array:
                p = params._replace(w_ih=jnp.concatenate([params.w_ih, w_t], axis=0))
                return loss_fn(p, xs_aug, carry, grad=grad)

            return np.asarray(jax.jit(jax.grad(f))(jnp.zeros((T, G * H), xs.dtype))).reshape(T, G, H)

        m, a = per_step("manual"), per_step("autodiff")
        quantity, names = "Σ_batch ∂L/∂z_t per gate", cell.gate_names
    else:
        gm, ga = grads["xs"]
        assert ga is not None  # a leaf fails only against autodiff's gradient
        m, a = np.moveaxis(gm, -2, 0).reshape(T, 1, -1), np.moveaxis(ga, -2, 0).reshape(T, 1, -1)
        quantity, names = "∂L/∂x_t", ()
    scale = max(float(np.max(np.abs(a), initial=0.0)), np.finfo(np.float64).tiny)
    err = np.max(np.abs(m - a), axis=-1, initial=0.0) / scale  # [T, G]
    for t in range(T) if reverse else range(T - 1, -1, -1):
        if np.any(err[t] > rtol):
            gates = tuple(names[g] for g in range(len(names)) if err[t, g] > rtol)
            return Localisation(tuple(sorted(failing)), t, gates, quantity)
    return Localisation(tuple(sorted(failing)), None, (), quantity)


def _sup_error(g: np.ndarray, reference: Array) -> float:
    """``‖g − reference‖_∞ / ‖reference‖_∞`` (absolute when the reference is all zero)."""
    ref = np.asarray(reference)
    return _relative(np.max(np.abs(g - ref), initial=0.0), np.max(np.abs(ref), initial=0.0))


def _relative(err: float, scale: float) -> float:
    """``err / scale``, or ``err`` itself when the scale is zero (an all-zero gradient)."""
    return float(err / scale) if scale > 0 else float(err)
