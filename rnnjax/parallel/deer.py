"""DEER and quasi-DEER: any cell's recurrence solved by Newton iterations over the whole trajectory.

The carries of all T steps are the unknowns of one nonlinear system, ``s_t = f(s_{t-1}, x_t)`` for
``t = 1 .. T`` with ``s_0`` the initial carry (``s_t`` is the carry flattened to one vector of S entries
per batch row: ``2H`` for the LSTM's ``(h, c)``). Given a guess ``ŝ``, each Newton iteration linearises
every step at once, in parallel over time and batch,

    s_t ≈ f(ŝ_{t-1}, x_t) + J_t (s_{t-1} − ŝ_{t-1}),     J_t = ∂f/∂s (ŝ_{t-1}, x_t)   [S, S]

and solves that linear recurrence ``s_t = J_t s_{t-1} + c_t`` with one `jax.lax.associative_scan` over the
pairs ``(J_t, c_t)``, composed as ``(J2 J1, J2 c1 + c2)``: ``O(log T)`` depth instead of T sequential steps
(Lim et al., "Parallelizing non-linear sequential models over the sequence length", ICLR 2024). DEER uses the
full ``S x S`` Jacobians (quadratic convergence, ``O(T S²)`` memory, ``O(T S³)`` work per iteration);
quasi-DEER their diagonal only (Gonzalez et al., NeurIPS 2024): linear convergence, ``O(T S)`` scan.

Both fix at least one more step exactly per iteration (step 1 is exact after the first: ``s_0`` is known),
so in exact arithmetic they reach the sequential trajectory in at most T iterations. In floating point a
cell near chaos can overflow first, so the loop stops on the *true* residual, never on the size of the
update (an update can be zero while the trajectory is wrong):

    residual = max_{t, b, i} |s_t − f(s_{t-1}, x_t)| / (1 + |f(s_{t-1}, x_t)|)

with any non-finite entry counted as infinite (``jnp.max`` over NaN is not to be trusted on every backend).
Converged means ``residual <= tol``; otherwise the loop stops after ``max_iter`` iterations or at the first
non-finite residual, and the outcome is ``on_failure``'s: the sequential scan (``"fallback"``, selected by
`jax.lax.cond`, so the whole stays one compiled program), or a `checkify.debug_check` error with NaN
outputs (``"raise"``). A wrong trajectory is never returned as if converged, and `DeerInfo` reports the
iterations, the final residual and whether Newton converged.

The Jacobians of a cell with a `GatesBackward` (every built-in cell) come from its hand-derived gates
derivative (`gates_jacobian`). The input projection ``zx = x w_ih + b`` of all T steps is one GEMM made once
per solve, not once per iteration (`step_inputs`). Each iteration runs the gates at ``(zx_t, ŝ_{t-1} w_hh,
ŝ_{t-1})``; ``gates_bwd``, chained with the recurrent path ``dzh w_hhᵀ`` into ``h`` as the BPTT driver chains
one step (`rnnjax.bptt`), is the linear map ``Jᵀ``, and its transpose (`jax.linear_transpose`, which
differentiates nothing) applied to a basis vector ``e_j`` gives column j of every ``J_t``. Its tangent of
``zh`` is ``e_j``'s entries of ``h`` times ``w_hh``, one row shared by all ``T·B`` rows, so that no product
with ``w_hh`` grows with the rows; quasi-DEER keeps each column's diagonal entry (the columns are formed
whole, ``O(T·B·S²)`` transiently, and the scan holds ``O(T·B·S)``). A cell without one (a
user-written ``step``) gets its Jacobians from `jax.linearize` of its ``step`` and one Jacobian-vector product
per state entry (`step_jacobian`), and quasi-DEER takes their diagonal. Either way the S columns are one vmap
over the basis, each over all ``T·B`` rows at once: a basis vector broadcast over all rows gives every row's
column, because rows of the batch are independent (the `Cell` contract). No built-in cell needs the autodiff
path: DEER takes no regulariser inside the recursion (`rj.unroll` refuses ``regularize=`` with it), so the
gates see no state dropout or zoneout, and the carries are flattened by `StateLayout` rather than read from
the BPTT's row buffers (`rnnjax.scan.read_row`), so those layouts do not arise.

Gradients are implicit (`jax.custom_vjp`): at the solution ``s*``, by the implicit function theorem, the
cotangent ``ḡ_t`` of the trajectory becomes the adjoint ``λ_t = ḡ_t + J_{t+1}ᵀ λ_{t+1}``, one reverse
associative scan over the *full* transposed Jacobians at ``s*`` (made as above; for quasi-DEER too: its
gradient is the exact one, not that of the diagonal approximation), and then one vector-Jacobian product of
the step map at every ``(s*_{t-1}, x_t)`` with cotangent ``λ_t``, vmapped over time and batch, gives the
gradients to the params, ``xs`` and the initial carry. The Newton loop itself (a `jax.lax.while_loop`) is
never differentiated. So the gradient is exact whenever the trajectory is, including after a fallback.

Steps past a row's length keep the carry: there ``f`` is replaced by the identity (``J = I``, ``c = 0``),
by a select whose other branch sees zeroed inputs, so that padding never reaches a value or a gradient.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from rnnjax.cells.base import Cell, input_projection
from rnnjax.checks import NONFINITE_XS, debug_check_finite
from rnnjax.scan import mask_from_lengths, scan_steps, zero_where_not

Array = jax.Array
PyTree = Any

OnFailure = Literal["fallback", "raise"]
ON_FAILURE: tuple[str, ...] = ("fallback", "raise")
DEFAULT_MAX_ITER = 100
_HIGHEST = jax.lax.Precision.HIGHEST


class DeerInfo(NamedTuple):
    """What the Newton iterations did.

    Attributes:
      iterations: int32 ``[]``, Newton updates made (0 when the initial guess already solved the system).
      residual: ``[]`` in the state's dtype, ``max |s_t − f(s_{t-1}, x_t)| / (1 + |f(s_{t-1}, x_t)|)`` of the
        last Newton iterate (inf where it held a non-finite value). After a fallback this is the residual
        Newton stopped at, not that of the sequential result.
      converged: bool ``[]``, whether Newton reached ``residual <= tol``. False means the outputs are the
        sequential scan's (``on_failure="fallback"``) or NaN (``"raise"``).
    """

    iterations: Array
    residual: Array
    converged: Array

    def __repr__(self) -> str:
        """Plain numbers where the fields hold concrete scalars (``DeerInfo(iterations=3, residual=1.4e-07,
        converged=True)``); JAX's own repr of each field otherwise (under a trace, or batched)."""
        try:
            it, res, ok = (np.asarray(v).item() for v in self)
        except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
            fields = ", ".join(f"{name}={value!r}" for name, value in zip(self._fields, self, strict=True))
            return f"DeerInfo({fields})"
        return f"DeerInfo(iterations={it}, residual={res:.3g}, converged={ok})"


@dataclasses.dataclass(frozen=True)
class DeerOptions:
    """The static settings of one DEER solve (hashable, so that they may be a static argument).

    Attributes:
      quasi: diagonal Jacobians (quasi-DEER) in the Newton iterations.
      tol: the residual at which Newton stops, converged.
      max_iter: the most Newton updates.
      damping: 0 for plain Newton, or ``k`` in ``(0, 1)``: each linear solve uses ``(1−k) J_t``.
      on_failure: ``"fallback"`` or ``"raise"``.
    """

    quasi: bool
    tol: float
    max_iter: int
    damping: float
    on_failure: str


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """How a carry pytree with leaves ``[N, ...]`` flattens to one state matrix ``[N, S]`` and back.

    Attributes:
      treedef: the carry's tree structure.
      shapes: each leaf's shape after its leading (batch) axis.
    """

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        """S, the entries of one row's state."""
        return sum(math.prod(s) for s in self.shapes)

    def flatten(self, carry: PyTree) -> Array:
        """Leaves ``[N, ...]`` -> ``[N, S]``, leaves in tree order."""
        leaves = jax.tree.leaves(carry)
        return jnp.concatenate([a.reshape(a.shape[0], -1) for a in leaves], axis=-1)

    def unflatten(self, s: Array) -> PyTree:
        """``[N, S]`` -> the carry, leaves ``[N, ...]``."""
        leaves, start = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            leaves.append(s[:, start : start + n].reshape(s.shape[0], *shape))
            start += n
        return jax.tree.unflatten(self.treedef, leaves)


def state_layout(carry: PyTree) -> StateLayout:
    """The `StateLayout` of a carry with leaves ``[N, ...]``; its leaves must share one float dtype."""
    leaves, treedef = jax.tree.flatten(carry)
    dtypes = {jnp.dtype(a.dtype) for a in leaves}
    if len(dtypes) != 1:
        raise TypeError(
            f"DEER flattens the carry into one state vector, so its leaves must share one dtype; "
            f"got {sorted(str(d) for d in dtypes)}"
        )
    return StateLayout(treedef, tuple(tuple(a.shape[1:]) for a in leaves))


def default_tol(dtype: Any) -> float:
    """The default ``tol``: ``eps^(3/4)`` of ``dtype`` (6.3e-6 for float32, 1.8e-12 for float64), a few
    hundred rounding errors above where the residual of an exact trajectory lies."""
    return float(jnp.finfo(dtype).eps) ** 0.75


def deer_unroll(
    cell: Cell,
    params: PyTree,
    xs: Array,
    carry: PyTree | None = None,
    *,
    lengths: Array | None = None,
    reverse: bool = False,
    quasi: bool = False,
    tol: float | None = None,
    max_iter: int | None = None,
    damping: float | None = None,
    on_failure: OnFailure = "fallback",
    init_guess: PyTree | None = None,
) -> tuple[PyTree, PyTree, DeerInfo]:
    r"""`rj.unroll` solved by DEER (Newton over the whole trajectory) or quasi-DEER, for any cell.

    Same inputs and results as ``rj.unroll(cell, params, xs, carry, lengths=lengths, reverse=reverse)``,
    plus a `DeerInfo`; see the module docstring for the method, the stopping test and the gradient.

    Args:
      cell: a `Cell`, built-in or user-written (only ``step`` is used).
      params: the cell's params.
      xs: ``[B, T, I]`` floating-point inputs (more leading batch axes allowed).
      carry: the initial carry (leaves ``[B, ...]``); None means ``cell.initial_carry``.
      lengths: ``[B]`` ints in ``[0, T]``: steps ``t >= lengths[b]`` keep the carry and output zeros.
      reverse: run ``t = T-1 .. 0`` (from ``lengths[b] - 1`` with ``lengths``); outputs stay aligned.
      quasi: False: DEER (full Jacobians). True: quasi-DEER (their diagonal in the Newton iterations; the
        gradient stays exact).
      tol: stop when the residual (see `DeerInfo`) is at most this; None: `default_tol` of the dtype.
      max_iter: the most Newton updates, an int >= 0; None: ``min(T, 100)`` (in exact arithmetic T always
        suffices).
      damping: None (plain Newton) or a float ``k`` in ``[0, 1)``: each linear solve uses the Jacobians
        shrunk to ``(1−k) J_t`` (ELK's remedy for cells near chaos, Gonzalez et al. 2024, in its simplest,
        fixed form: ``k → 1`` is the Jacobi/Picard iteration). The products of Jacobians in the scan then
        grow at most as ``((1−k)‖J‖)^T``, which keeps them from overflowing where ``‖J‖ > 1``, at the price
        of linear convergence. The solution, and the bound of T iterations, are unchanged.
      on_failure: what happens when Newton does not converge: ``"fallback"`` (default) recomputes the
        trajectory with the sequential scan (a `jax.lax.cond`: only when needed, on one device);
        ``"raise"`` makes it a `checkify.debug_check` error (under ``checkify.checkify(..., errors=
        checkify.user_checks)``) and returns NaN outputs, so nothing downstream is silently wrong.
      init_guess: the first Newton iterate: the carry after every step, leaves ``[B, T, ...]`` (e.g. a
        previous solve's, for a warm start); None: the initial carry at every step.

    Returns:
      ``(carry, ys, info)``: the final carry and the outputs exactly as `rj.unroll` returns them (``ys``
      ``[B, T, H]``, or whatever a user-written step outputs, stacked on axis 1; zeros at padded steps),
      and a `DeerInfo`. Gradients (`jax.grad`, `jax.vjp`) flow to ``params``, ``xs`` and ``carry`` by the
      implicit function theorem; forward mode (`jax.jvp`) is not supported.

    Raises:
      TypeError, ValueError: at trace time, naming the argument, for inputs that do not fit.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.gru(8)
      >>> params = cell.init(jax.random.key(0), input_size=4)
      >>> carry, ys, info = rj.deer_unroll(cell, params, jnp.ones((2, 16, 4)))
      >>> ys.shape, bool(info.converged), int(info.iterations) <= 16
      ((2, 16, 8), True, True)
      >>> _, _, info = rj.deer_unroll(cell, params, jnp.ones((2, 16, 4)), quasi=True, max_iter=2)
      >>> bool(info.converged)     # too few iterations: ys are the sequential scan's (on_failure="fallback")
      False
    """
    # the validation of rj.unroll, imported here: the driver may import this module for method="deer"
    from rnnjax.driver import (
        _check_carry,
        _check_cell,
        _check_lengths,
        _check_xs,
        _empty_outputs,
        _reshape_batch,
        _zero_padding,
    )
    from rnnjax.parallel.sequence import check_time_split

    _check_cell(cell)
    if not isinstance(reverse, (bool, np.bool_)):
        raise TypeError(f"reverse must be a Python bool, got {reverse!r}")
    if not isinstance(quasi, (bool, np.bool_)):
        raise TypeError(f"quasi must be a Python bool, got {quasi!r}")
    xs = _check_xs(xs)
    batch_shape, T, I = tuple(xs.shape[:-2]), xs.shape[-2], xs.shape[-1]
    if cell.check_params is not None:
        cell.check_params(params, I, xs.dtype)
    check_time_split(cell, "quasi_deer" if quasi else "deer", params, xs, len(batch_shape))  # refuses one
    lengths = _check_lengths(lengths, batch_shape, T)
    carry0 = _check_carry(cell, params, carry, batch_shape, xs.dtype)
    n_batch = len(batch_shape)
    layout = state_layout(_reshape_batch(carry0, n_batch, (-1,)))
    options = deer_options(
        quasi=bool(quasi), tol=tol, max_iter=max_iter, damping=damping, on_failure=on_failure, T=T,
        dtype=jax.tree.leaves(carry0)[0].dtype,
    )  # fmt: skip
    B = math.prod(batch_shape)
    guess = None
    if init_guess is not None:
        guess = _check_init_guess(cell, params, init_guess, batch_shape, T, xs.dtype)
        guess = layout.flatten(_reshape_batch(guess, n_batch + 1, (B * T,))).reshape(B, T, -1)
    flat_carry0 = _reshape_batch(carry0, n_batch, (B,))
    if T == 0:
        ys = _empty_outputs(cell, params, flat_carry0, xs.reshape(B, 0, I))
        info = DeerInfo(jnp.zeros((), jnp.int32), jnp.zeros((), xs.dtype), jnp.ones((), bool))
        return carry0, _reshape_batch(ys, 1, batch_shape), info
    xs = xs.reshape(B, T, I)
    mask = None
    if lengths is not None:
        mask = mask_from_lengths(lengths.reshape(B), T).T  # [B, T]
        xs = _zero_padding(xs, mask.T)
    final, ys, info = _deer_run(cell, layout, options, bool(reverse), params, xs, flat_carry0, mask, guess)
    return _reshape_batch(final, 1, batch_shape), _reshape_batch(ys, 1, batch_shape), info


def deer_options(
    *,
    quasi: bool,
    tol: float | None,
    max_iter: int | None,
    damping: float | None,
    on_failure: str,
    T: int,
    dtype: Any,
) -> DeerOptions:
    """Validates the settings of `deer_unroll` and fills in the defaults for ``T`` steps in ``dtype``."""
    if tol is None:
        tol = default_tol(dtype)
    elif isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not tol > 0:
        raise ValueError(f"tol must be a float > 0 or None, got {tol!r}")
    if max_iter is None:
        max_iter = min(T, DEFAULT_MAX_ITER)
    elif isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0 or None, got {max_iter!r}")
    if damping is None:
        damping = 0.0
    elif (
        isinstance(damping, bool)
        or not isinstance(damping, (int, float, np.floating))
        or not 0 <= damping < 1
    ):
        raise ValueError(f"damping must be a float in [0, 1) or None, got {damping!r}")
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {ON_FAILURE}, got {on_failure!r}")
    return DeerOptions(bool(quasi), float(tol), int(max_iter), float(damping), on_failure)


def _check_init_guess(
    cell: Cell, params: PyTree, guess: Any, batch_shape: tuple[int, ...], T: int, dtype: Any
) -> PyTree:
    """``init_guess`` checked against the carry's structure, with a time axis ``T`` after the batch axes."""
    expected = jax.eval_shape(lambda p: cell.initial_carry(p, batch_shape), params)
    want, got = jax.tree.structure(expected), jax.tree.structure(guess)
    if want != got:
        raise TypeError(f"init_guess must have the structure of the carry {want}, got {got}")
    n = len(batch_shape)
    for (path, e), a in zip(
        jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(guess), strict=True
    ):
        name = "init_guess" + jax.tree_util.keystr(path)
        shape, want_shape = tuple(getattr(a, "shape", ())), (*batch_shape, T, *e.shape[n:])
        if shape != want_shape:
            raise ValueError(
                f"{name} must have shape [B, T, ...] = {want_shape} (the carry after every step), got {shape}"
            )
        if jnp.dtype(getattr(a, "dtype", None)) != jnp.dtype(e.dtype):
            raise TypeError(f"{name} must have dtype {jnp.dtype(e.dtype)}, got {jnp.dtype(a.dtype)}")
    return guess


def deer_dispatch(
    cell: Cell,
    layout: StateLayout,
    options: DeerOptions,
    reverse: bool,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    guess: Array | None,
) -> tuple[PyTree, PyTree, DeerInfo]:
    """`deer_unroll` after validation, on one batch axis.

    Args:
      cell, layout, options, reverse: static.
      params: the cell's params.
      xs: ``[B, T, I]``, zero at padded steps.
      carry0: the initial carry, leaves ``[B, ...]``.
      mask: ``[B, T]`` bool (``t < lengths[b]``) or None.
      guess: ``[B, T, S]`` flattened carries after every step, in time order, or None.

    Returns:
      ``(final_carry, ys, info)`` as `deer_unroll`.
    """
    debug_check_finite(xs, NONFINITE_XS, mask)  # the padding is zero already
    flip = (lambda a: jnp.flip(a, axis=1)) if reverse else (lambda a: a)
    xs_tm = jnp.swapaxes(flip(xs), 0, 1)  # [T, B, I], in the order the steps run
    mask_tm = None if mask is None else jnp.swapaxes(flip(mask), 0, 1)  # [T, B]
    s0 = layout.flatten(carry0)  # [B, S]
    if guess is None:
        guess_tm = jnp.broadcast_to(s0[None], (xs.shape[1], *s0.shape))
    else:
        guess_tm = jnp.swapaxes(flip(guess), 0, 1)
    frozen = jax.lax.stop_gradient((params, xs_tm, s0))
    states, info = _solve(cell, layout, options, *frozen, mask_tm, jax.lax.stop_gradient(guess_tm))
    states = _implicit(cell, layout, params, xs_tm, s0, mask_tm, states)  # [T, B, S] with the IFT gradient
    prev = jnp.concatenate([s0[None], states[:-1]], axis=0)
    T, B = xs_tm.shape[:2]
    _, ys = cell.step(params, layout.unflatten(prev.reshape(T * B, -1)), xs_tm.reshape(T * B, -1))
    ys = jax.tree.map(lambda y: y.reshape(T, B, *y.shape[1:]), ys)
    if mask_tm is not None:
        ys = jax.vmap(zero_where_not)(mask_tm, ys)
    ys = jax.tree.map(lambda y: flip(jnp.swapaxes(y, 0, 1)), ys)
    if options.on_failure == "raise":  # the first step's output does not depend on the solve: NaN too
        ys = jax.tree.map(lambda y: jnp.where(info.converged, y, jnp.asarray(jnp.nan, y.dtype)), ys)
    return layout.unflatten(states[-1]), ys, info


# one program: called eagerly, the solve compiles once instead of once per operation (inlined under jit)
_deer_run = jax.jit(deer_dispatch, static_argnums=(0, 1, 2, 3))


def _step_map(
    cell: Cell, layout: StateLayout, params: PyTree, prev: Array, xs: Array, mask: Array | None
) -> Array:
    """The masked step over many rows at once: ``prev [..., S]``, ``xs [..., I]``, ``mask [...]`` ->
    ``f(prev, x)`` where the mask holds, else ``prev``, ``[..., S]``."""
    lead = prev.shape[:-1]
    N = math.prod(lead)
    new, _ = cell.step(params, layout.unflatten(prev.reshape(N, -1)), xs.reshape(N, -1))
    new = layout.flatten(new).reshape(prev.shape)
    return new if mask is None else jnp.where(mask[..., None], new, prev)


def step_inputs(cell: Cell, params: PyTree, xs: Array) -> Array:
    """What the step map reads of ``xs [..., I]`` at every Newton iteration: a cell with a `GatesBackward`
    gets its input projection ``zx = x w_ih + b [..., G]`` (one GEMM over all steps, once per solve), any
    other cell ``xs`` itself."""
    return xs if cell.backward is None else input_projection(params, xs)


def _linearise(
    cell: Cell,
    layout: StateLayout,
    params: PyTree,
    prev: Array,
    inputs: Array,
    mask: Array | None,
    diagonal: bool = False,
) -> tuple[Array, Array]:
    """``(F [T, B, S], J [T, B, S, S])``: the masked step map at ``prev`` and its Jacobian ``∂F/∂prev``
    (``J[..., i, j] = ∂F_i/∂prev_j``), or only its diagonal ``[T, B, S]`` when ``diagonal``, by the cell's
    hand-derived gates derivative where it has one (`gates_jacobian`), else by autodiff of its step
    (`step_jacobian`). ``inputs``: `step_inputs`."""
    if cell.backward is None:
        F, J = step_jacobian(cell, layout, params, prev, inputs, mask)
        return F, jnp.diagonal(J, axis1=-2, axis2=-1) if diagonal else J
    F, J = gates_jacobian(cell, layout, params, prev, inputs, diagonal)
    if mask is None:
        return F, J
    identity = jnp.ones((), J.dtype) if diagonal else jnp.eye(J.shape[-1], dtype=J.dtype)
    m = mask[..., None] if diagonal else mask[..., None, None]
    return jnp.where(mask[..., None], F, prev), jnp.where(m, J, identity)


def step_jacobian(
    cell: Cell, layout: StateLayout, params: PyTree, prev: Array, xs: Array, mask: Array | None
) -> tuple[Array, Array]:
    """``(F, J)`` of `_linearise` for any cell, from `jax.linearize` of its masked ``step`` and S
    Jacobian-vector products, one per basis vector, each over all rows at once (rows are independent)."""
    S = prev.shape[-1]
    F, jvp = jax.linearize(lambda p: _step_map(cell, layout, params, p, xs, mask), prev)
    basis = jnp.eye(S, dtype=prev.dtype).reshape(S, *(1,) * (prev.ndim - 1), S)
    cols = jax.vmap(jvp)(jnp.broadcast_to(basis, (S, *prev.shape)))  # [S_in, T, B, S_out]
    return F, jnp.moveaxis(cols, 0, -1)


def gates_jacobian(
    cell: Cell, layout: StateLayout, params: PyTree, prev: Array, zx: Array, diagonal: bool = False
) -> tuple[Array, Array]:
    """``(F [..., S], J [..., S, S])`` of a cell with a `GatesBackward`, unmasked, from its hand-derived
    derivative, or only the diagonal of ``J``, ``[..., S]``, when ``diagonal`` (quasi-DEER).

    ``F`` is ``gates(zx, prev.h w_hh, prev)``. The derivative is ``gates_bwd``, linear in its cotangent:
    chained with the recurrent path ``dzh w_hhᵀ`` into ``h`` as the BPTT driver does (`rnnjax.bptt`), it is
    ``Jᵀ``. Its transpose (`jax.linear_transpose`: JAX transposes the linear operations of ``gates_bwd``,
    differentiating nothing) applied to a basis vector ``e_j`` gives column j of every row's ``J``: the
    tangent ``e_j`` of the carry, and ``e_j``'s entries of ``h`` times ``w_hh`` as the tangent of ``zh``,
    one ``[G]`` row shared by all rows. So no product with ``w_hh`` grows with the rows (as the rows
    ``e_iᵀ J``, with ``dzh w_hhᵀ`` for every row and basis vector, would). For the diagonal each column is
    formed whole and its entry ``J_jj`` kept. The S columns are one vmap over the basis, each over all rows
    at once.
    ``gates_bwd`` must be linear in its cotangent, as a derivative is (`jax.linear_transpose` refuses
    an operation that is not).

    Args:
      cell: a cell with a `GatesBackward`.
      layout: the carry's `StateLayout`.
      params: the cell's params.
      prev: ``[..., S]`` the carries entering the steps, flattened.
      zx: ``[..., G]`` the steps' input projections (`step_inputs`).
      diagonal: whether to return only the diagonal of ``J``.
    """
    gates, gates_bwd = cell.gates, cell.gates_bwd
    assert gates is not None and gates_bwd is not None, "only a cell with a GatesBackward has gates"
    lead, S = prev.shape[:-1], prev.shape[-1]
    N = math.prod(lead)
    carry = layout.unflatten(prev.reshape(N, S))
    w_hh = getattr(params, "w_hh", None)  # None: the cell's recurrence is inside its gates
    new, res = gates(params, zx.reshape(N, -1), None if w_hh is None else carry.h @ w_hh, carry)

    def derivative(d_new: PyTree) -> tuple[PyTree, ...]:
        """``d_new`` -> ``(d_prev,)``, or ``(dzh, d_prev)`` with a recurrent product (``dzh=None`` in
        ``gates_bwd`` means ``dzx``): the paths of ``gates_bwd`` that reach the carry entering the step."""
        dzx, dzh, d_prev, *_ = gates_bwd(params, res, carry, new, d_new)
        return (d_prev,) if w_hh is None else (dzx if dzh is None else dzh, d_prev)

    transposed = jax.linear_transpose(derivative, new)

    def column(e: Array) -> Array:  # e_j [S] -> J e_j of every row [N, S], or its entry j [N]
        tangent = layout.unflatten(jnp.broadcast_to(e, (N, S)))
        if w_hh is not None:
            zh = layout.unflatten(e[None]).h @ w_hh  # [1, G]: the tangent of zh, the same on every row
            tangent = (jnp.broadcast_to(zh, (N, zh.shape[-1])), tangent)
        else:
            tangent = (tangent,)
        (out,) = transposed(tangent)
        out = layout.flatten(out)
        return out @ e if diagonal else out

    cols = jax.vmap(column)(jnp.eye(S, dtype=prev.dtype))  # [S_in, N, S_out] or [S, N]
    F = layout.flatten(new).reshape(prev.shape)
    if diagonal:
        return F, jnp.moveaxis(cols, 0, 1).reshape(*lead, S)
    return F, jnp.moveaxis(cols, 0, -1).reshape(*lead, S, S)


def _residual(states: Array, F: Array) -> Array:
    """``max |s − F| / (1 + |F|)`` over all entries, inf if any entry of either is not finite (a NaN-safe
    reduction: on XLA:CPU ``jnp.max`` of an array holding NaN has returned -inf)."""
    r = jnp.abs(states - F) / (1 + jnp.abs(F))
    bad = ~(jnp.isfinite(states) & jnp.isfinite(F))
    r = jnp.where(bad, jnp.asarray(jnp.inf, r.dtype), r)
    return jnp.max(r, initial=jnp.asarray(0, r.dtype))


def linear_recurrence(A: Array, b: Array, diagonal: bool) -> Array:
    """``x_t = A_t x_{t-1} + b_t`` for ``t = 0 .. T-1`` from ``x_{-1} = 0``, as one associative scan.

    Args:
      A: ``[T, ..., S, S]`` matrices, or ``[T, ..., S]`` diagonals when ``diagonal``.
      b: ``[T, ..., S]``.
      diagonal: whether ``A`` holds diagonals.

    Returns:
      ``x [T, ..., S]``. Pairs compose as ``(A2 A1, A2 b1 + b2)`` (the later one on the left).
    """

    def combine(early: tuple[Array, Array], late: tuple[Array, Array]) -> tuple[Array, Array]:
        A1, b1 = early
        A2, b2 = late
        if diagonal:
            return A2 * A1, A2 * b1 + b2
        A = jnp.einsum("...ij,...jk->...ik", A2, A1, precision=_HIGHEST)
        return A, jnp.einsum("...ij,...j->...i", A2, b1, precision=_HIGHEST) + b2

    return jax.lax.associative_scan(combine, (A, b))[1]


def _apply(A: Array, v: Array, diagonal: bool) -> Array:
    """``A v`` for matrices ``A [..., S, S]`` or diagonals ``A [..., S]``, ``v [..., S]``."""
    return A * v if diagonal else jnp.einsum("...ij,...j->...i", A, v, precision=_HIGHEST)


def _solve(
    cell: Cell,
    layout: StateLayout,
    options: DeerOptions,
    params: PyTree,
    xs: Array,
    s0: Array,
    mask: Array | None,
    guess: Array,
) -> tuple[Array, DeerInfo]:
    """The solve (not differentiated): ``xs [T, B, I]``, ``s0 [B, S]``, ``mask [T, B]``, ``guess
    [T, B, S]`` -> the carries after every step ``[T, B, S]`` and the `DeerInfo`: `newton`'s, or what
    ``options.on_failure`` makes of a Newton that did not converge."""
    states, info = newton(cell, layout, options, params, xs, s0, mask, guess)
    converged = info.converged
    if options.on_failure == "raise":
        checkify.debug_check(
            converged,
            "DEER did not converge: residual {} > tol after {} iterations (max_iter=" + str(options.max_iter)
            + "); pass on_failure='fallback', damping=, a larger max_iter or a looser tol",
            info.residual,
            info.iterations,
        )  # fmt: skip
        return jnp.where(converged, states, jnp.asarray(jnp.nan, states.dtype)), info

    def sequential() -> Array:
        carry0 = layout.unflatten(s0)
        _, carries, _ = scan_steps(
            cell.step, params, jnp.swapaxes(xs, 0, 1), carry0, mask, reverse=False, unroll=1
        )
        T, B = xs.shape[:2]
        flat = layout.flatten(jax.tree.map(lambda a: a.reshape(T * B, *a.shape[2:]), carries))
        return flat.reshape(T, B, -1)

    return jax.lax.cond(converged, lambda: states, sequential), info


def newton(
    cell: Cell,
    layout: StateLayout,
    options: DeerOptions,
    params: PyTree,
    xs: Array,
    s0: Array,
    mask: Array | None,
    guess: Array,
) -> tuple[Array, DeerInfo]:
    """The Newton loop alone, whatever its outcome: ``xs [T, B, I]``, ``s0 [B, S]``, ``mask [T, B]``,
    ``guess [T, B, S]`` -> the last iterate ``[T, B, S]`` and the `DeerInfo` of its residual (`_solve`
    applies ``options.on_failure``). ``options.on_failure`` is not read."""
    quasi, k = options.quasi, options.damping
    tol = jnp.asarray(options.tol, guess.dtype)
    inputs = step_inputs(cell, params, xs)  # the input projection, once for all iterations

    def linearise(states: Array) -> tuple[Array, Array, Array, Array]:
        prev = jnp.concatenate([s0[None], states[:-1]], axis=0)
        F, J = _linearise(cell, layout, params, prev, inputs, mask, quasi)
        return prev, F, J, _residual(states, F)

    def update(states: Array, prev: Array, F: Array, J: Array) -> Array:
        # s_1 = F_1 exactly (s_0 is known): A_1 = 0, then c_t = F_t − A_t ŝ_{t-1}
        A = J.at[0].set(0)
        if k:
            A = (1 - k) * A
        return linear_recurrence(A, F - _apply(A, prev, quasi), quasi)

    def cond(state: tuple) -> Array:
        *_, res, it = state
        return (it < options.max_iter) & (res > tol) & jnp.isfinite(res)

    def body(state: tuple) -> tuple:
        states, prev, F, J, _, it = state
        states = update(states, prev, F, J)
        return (states, *linearise(states), it + 1)

    init = (guess, *linearise(guess), jnp.zeros((), jnp.int32))
    states, *_, res, it = jax.lax.while_loop(cond, body, init)
    return states, DeerInfo(it, res, res <= tol)


def _implicit(
    cell: Cell, layout: StateLayout, params: PyTree, xs: Array, s0: Array, mask: Array | None, states: Array
) -> Array:
    """``states`` unchanged, with the gradient of the solution of ``s_t = F(s_{t-1}, x_t)`` to ``params``,
    ``xs [T, B, I]`` and ``s0 [B, S]`` by the implicit function theorem (see the module docstring)."""
    return _implicit_vjp(cell, layout, params, xs, s0, mask, states)


def _implicit_fwd(
    cell: Cell, layout: StateLayout, params: PyTree, xs: Array, s0: Array, mask: Array | None, states: Array
) -> tuple[Array, tuple]:
    return states, (params, xs, s0, mask, states)


def _implicit_bwd(cell: Cell, layout: StateLayout, res: tuple, g: Array) -> tuple:
    params, xs, s0, mask, states = res
    prev = jnp.concatenate([s0[None], states[:-1]], axis=0)
    inputs = step_inputs(cell, params, xs)
    _, J = _linearise(cell, layout, params, prev, inputs, mask)  # [T, B, S, S] at the solution, full
    # λ_t = g_t + J_{t+1}ᵀ λ_{t+1}: reversed in time, A_u = J_{t+1}ᵀ (none after the last step)
    Jt = jnp.swapaxes(J, -1, -2)
    A = jnp.concatenate([Jt[1:], jnp.zeros_like(Jt[:1])], axis=0)
    lam = jnp.flip(linear_recurrence(jnp.flip(A, 0), jnp.flip(g, 0), diagonal=False), 0)
    _, vjp = jax.vjp(lambda p, x, s: _step_map(cell, layout, p, s, x, mask), params, xs, prev)
    d_params, d_xs, d_prev = vjp(lam)
    return d_params, d_xs, d_prev[0], None, jnp.zeros_like(states)


_implicit_vjp = jax.custom_vjp(
    lambda cell, layout, params, xs, s0, mask, states: states, nondiff_argnums=(0, 1)
)
_implicit_vjp.defvjp(_implicit_fwd, _implicit_bwd)
