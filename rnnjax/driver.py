"""`unroll`: the public entry point that steps a cell over a sequence.

It validates its inputs at trace time (shapes and dtypes are static under `jax.jit`), flattens extra leading
batch dimensions into one, builds the length mask, and dispatches to the hand-derived BPTT
(`rnnjax.bptt`, ``grad="manual"``) or to the autodiff twin (`rnnjax.autodiff`, ``grad="autodiff"``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax.autodiff import autodiff_unroll, probed_autodiff_unroll
from rnnjax.binomial import BinomialPlan, binomial_plan, binomial_schedule, binomial_unroll
from rnnjax.bptt import bptt_unroll, probed_bptt_unroll, stepwise_bptt_unroll
from rnnjax.cells.base import Cell, check_float_dtype
from rnnjax.checks import NONFINITE_XS, check_array, debug_check_finite, debug_check_range
from rnnjax.parallel import DEER_METHODS, Method, check_method, resolve_method
from rnnjax.parallel.associative import AssociativeUnroll, check_chunk_size
from rnnjax.parallel.deer import deer_unroll
from rnnjax.parallel.sequence import SplitUnroll, check_time_split, over_time
from rnnjax.regularize import Regularizer, check_regularize, draw
from rnnjax.remat import (
    budget_schedule,
    checkpointed_unroll,
    nested_checkpointed_unroll,
    rows_per_device,
    segment_length,
    step_sizes,
)
from rnnjax.scan import mask_from_lengths
from rnnjax.sharding import batch_like, explicit_spec, reshard_like

Array = jax.Array
PyTree = Any

GradMode = Literal["manual", "autodiff"]
Schedule = Literal["binomial", "nested"]
GRAD_MODES: tuple[str, ...] = get_args(GradMode)
"""The values of `unroll`'s ``grad``: ``"manual"`` (the hand-derived BPTT) and ``"autodiff"``."""
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def unroll(
    cell: Cell,
    params: PyTree,
    xs: Array,
    carry: PyTree | None = None,
    *,
    lengths: Array | None = None,
    reverse: bool = False,
    grad: GradMode = "manual",
    unroll_steps: int | bool | None = None,
    checkpoint: int | Literal["sqrt", "none"] | None = None,
    budget: int | None = None,
    schedule: Schedule | None = None,
    compute_dtype: Any = None,
    probe: Array | None = None,
    method: Method = "sequential",
    chunk_size: int | None = None,
    regularize: Regularizer | None = None,
    key: Array | None = None,
) -> tuple[PyTree, PyTree]:
    r"""Steps ``cell`` over the time axis of ``xs``: ``(carry, [B, T, I]) -> (carry, [B, T, H])``.

    In Python, with masking by ``lengths`` and ``reverse`` left out, it computes::

        def unroll(cell, params, xs, carry):
            ys = []
            for t in range(T):
                carry, y = cell.step(params, carry, xs[:, t])
                ys.append(y)
            return carry, stack(ys, axis=1)

    but with the input projection of built-in cells hoisted out of the time loop (one GEMM over all T), a
    `jax.lax.scan` over time, and, for ``grad="manual"``, a hand-derived backward (`rnnjax.bptt`).

    Args:
      cell: a `Cell` (``rj.elman``, ``rj.lstm``, ``rj.gru`` or a user-written one).
      params: the cell's params, e.g. from ``cell.init(key, input_size=I)``.
      xs: ``[B, T, I]`` floating-point inputs, batch-major. More leading batch dimensions are allowed:
        ``[B1, B2, ..., T, I]``. The padding (steps ``t >= lengths[b]``) may hold anything; NaN or inf at a
        valid step is an error under ``checkify.checkify`` (`rnnjax.checks`).
      carry: the initial carry (leaves ``[B, H]``, e.g. ``LSTMCarry(h, c)``); None means zeros. The
        arguments after it are keyword-only.
      lengths: ``[B]`` integers in ``[0, T]``. Steps ``t >= lengths[b]`` leave row ``b``'s carry unchanged
        and output zeros, so the final carry is the carry after the last valid step (the initial carry when
        ``lengths[b] == 0``). None means every step is valid.
      reverse: run ``t = T-1 .. 0`` (with ``lengths``: from ``lengths[b] - 1`` down to 0, as PyTorch does for
        packed sequences). The outputs stay aligned with ``xs``.
      grad: ``"manual"`` (default): `jax.grad`, `jax.vjp` and `jax.value_and_grad` use the hand-derived BPTT;
        `jax.hessian` (forward-over-reverse) differentiates that backward in forward mode, but plain forward
        mode (`jax.jvp`, `jax.jacfwd`) raises a TypeError. ``"autodiff"``: JAX differentiates the same
        forward scan, in either mode.
      unroll_steps: `jax.lax.scan`'s unroll factor for the time loops (forward and backward). None
        (default): 1, which no other factor beat consistently on CPU. Pass an int tuned for your own shape
        and device (``python -m benchmarks.rnn_step`` sweeps it).
      checkpoint: None (default) or ``"none"`` keeps every step's residuals for the backward. An int K
        keeps only the carry every K steps and recomputes each segment in the backward (`rnnjax.remat`);
        ``"sqrt"`` uses K = ⌈√T⌉, for residual memory O(√T) at the cost of one more forward pass.
        Gradients are unchanged.
      budget: instead of ``checkpoint``: at most this many bytes of state kept for the backward (carries
        at checkpoints, one segment's residuals and output cotangents, the parameter-gradient accumulator,
        sized from the cell's own shapes). A budget that holds every step's residuals is plain BPTT.
        Otherwise the binomial schedule (Griewank's Revolve, `rnnjax.binomial`) recomputes the fewest
        steps that fit. Gradients are unchanged.
      schedule: with ``budget`` only: ``"binomial"`` (the default) or ``"nested"``, Chen et al.'s
        recursive segments, each level one more forward pass (`rnnjax.remat.budget_schedule`).
      compute_dtype: None (default): everything runs in the dtype of ``params`` and ``xs``, which must
        agree. A float dtype (e.g. ``jnp.bfloat16``): mixed precision. ``params``, ``xs`` and ``carry`` are
        cast to it, the forward and the hand-derived backward run in it, the weight-gradient GEMMs
        accumulate in float32 (`rnnjax.cells.base.time_gemm`), and the gradients come back in each input's
        own dtype (float32 params get float32 gradients). ``ys`` and the final carry are in
        ``compute_dtype``.
      probe: built-in cells only, without ``checkpoint``: an array ``[B, T, H]`` (pass zeros; its value is
        never read) whose gradient is ``∂L/∂h_t``, the whole gradient reaching the hidden state of step t
        (0 at padded steps). With ``grad="manual"`` it comes out of the same backward pass as the other
        gradients: ``jax.grad(loss, argnums=(0, 2))(params, xs, probe)``. See `rnnjax.diagnostics`.
      method: how the time loop runs (`rnnjax.parallel.METHODS`). ``"sequential"`` (default): the
        `jax.lax.scan` above. ``"associative"``: for a cell linear in its state (``cell.linear``:
        `rj.mingru`, `rj.minlstm`, `rj.lru`, ``rj.indrnn(activation="identity")`` or a `rj.LinearRecurrence`
        of your own), a parallel prefix scan over time with a hand-derived backward
        (`rnnjax.parallel.associative`); same outputs, carry and gradients up to round-off, O(log T) depth
        but more work and memory than the sequential scan, so it pays on accelerators, not on CPU. It takes
        neither ``checkpoint``, ``budget`` nor ``probe``. ``"auto"``: ``"associative"`` for a linear cell
        at lengths from `rnnjax.parallel.AUTO_CROSSOVER` on the running platform, else ``"sequential"``;
        that table holds no measured platform, so ``"auto"`` runs the sequential scan everywhere; it never
        picks DEER. ``"deer"`` / ``"quasi_deer"``: any cell, its trajectory solved by Newton iterations
        over all T steps at once (`rj.deer_unroll` with its defaults; full or diagonal Jacobians), its
        gradient by the implicit function theorem; when Newton does not converge the sequential scan's
        result is returned instead, never a wrong trajectory. For its options and its `rj.DeerInfo`
        (iterations, residual, converged) call `rj.deer_unroll`. It takes neither ``checkpoint``,
        ``budget``, ``probe``, ``regularize``, ``chunk_size``, ``unroll_steps`` nor ``grad="autodiff"``. With
        ``xs`` split by its time axis over an explicit mesh, ``"associative"`` and ``"auto"`` solve each
        device's part and exchange the parts' summaries, one all-gather each way
        (`rnnjax.parallel.sequence`); other cells and methods refuse that split.
      chunk_size: with ``method="associative"`` (or ``"auto"`` when it picks it): None (default) scans all
        T steps associatively; an int C runs the steps of each chunk of C sequentially, all chunks at
        once, and only the T/C chunk summaries associatively (O(T) work).
      regularize: an `rj.Regularizer`: input and state (variational) dropout, zoneout and weight drop inside
        the recurrence (`rnnjax.regularize`), or None. The hand-derived backward multiplies by the same
        masks. Not with ``probe``.
      key: with ``regularize``: a PRNG key from which the masks are drawn (training: the same key gives
        the same masks); None: inference, where dropout is the identity and zoneout its expectation.

    Returns:
      ``(carry, ys)``: the final carry (leaves ``[B, H]``) and the outputs ``ys [B, T, H]`` (for a
      user-written cell, whatever its ``step`` outputs, stacked on axis 1). Gradients flow to ``params``,
      ``xs`` and ``carry``.

    Raises:
      TypeError, ValueError: at trace time, naming the argument, the expected and the actual shape or
        dtype, for inputs that do not fit.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.lstm(hidden_size=16)
      >>> params = cell.init(jax.random.key(0), input_size=8)
      >>> xs = jnp.ones((4, 10, 8))
      >>> carry, ys = rj.unroll(cell, params, xs, lengths=jnp.array([10, 7, 3, 0]))
      >>> ys.shape, carry.h.shape
      ((4, 10, 16), (4, 16))
      >>> loss = lambda p: jnp.sum(rj.unroll(cell, p, xs)[1] ** 2)
      >>> grads = jax.grad(loss)(params)        # the hand-derived BPTT
    """
    _check_cell(cell)
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    check_method(method)
    if check_chunk_size(chunk_size) is not None and method not in ("associative", "auto"):
        raise ValueError(
            f"chunk_size={chunk_size!r} applies to method='associative' (or 'auto'), got method={method!r}"
        )
    if method in DEER_METHODS:
        _check_deer_options(method, grad, unroll_steps)
    _check_unroll_steps(unroll_steps)
    if isinstance(checkpoint, str) and checkpoint == "none":
        checkpoint = None
    if checkpoint is not None:
        segment_length(checkpoint, 1)  # validates
    if budget is not None:
        if checkpoint is not None:
            raise ValueError(
                f"pass checkpoint or budget, not both; got checkpoint={checkpoint!r}, budget={budget!r}"
            )
        budget_schedule(1, budget)  # validates the type; the size is checked against T below
        schedule = "binomial" if schedule is None else schedule
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    elif schedule is not None:
        raise ValueError(f"schedule={schedule!r} needs a budget: pass budget= (bytes) as well")
    if not isinstance(reverse, (bool, np.bool_)):
        raise TypeError(f"reverse must be a Python bool, got {reverse!r}")
    reverse = bool(reverse)
    xs = _check_xs(xs)
    if compute_dtype is not None:
        params, xs, carry = _cast_floats(
            (params, xs, carry), check_float_dtype(compute_dtype, "compute_dtype")
        )
    batch_shape, T, I = tuple(xs.shape[:-2]), xs.shape[-2], xs.shape[-1]
    if cell.check_params is not None:
        cell.check_params(params, I, xs.dtype)
    time_split = check_time_split(cell, method, params, xs, len(batch_shape))
    units_split = _check_explicit_split(params, xs, len(batch_shape))
    lengths = _check_lengths(lengths, batch_shape, T)
    carry0 = _check_carry(cell, params, carry, batch_shape, xs.dtype)
    # on an explicit mesh sharded like xs; inside shard_map varying like the values the steps read
    carry0 = batch_like(carry0, xs, len(batch_shape), params, lengths)
    if units_split:
        carry0 = _typed_by_step(cell, params, carry0, xs)
    if probe is not None:
        probe = _check_probe(cell, params, probe, checkpoint or budget, batch_shape, T, xs.dtype)
    regularize = check_regularize(regularize, key, cell, params)
    if regularize is not None and probe is not None:
        raise ValueError("probe cannot be combined with regularize: pass one of them")

    options = (("checkpoint", checkpoint), ("budget", budget), ("probe", probe), ("regularize", regularize))
    given = [n for n, v in options if v is not None]
    # a time split over devices runs the associative solve, the one method that splits it
    method = "associative" if time_split is not None else method
    method = resolve_method(method, cell, T, sequential_only=given[0] if given else None)  # pyright: ignore[reportAssignmentType]

    B = math.prod(batch_shape)
    nesting, plan = (), None
    if budget is not None:
        sizes = step_sizes(cell, params, _reshape_batch(carry0, len(batch_shape), (B,)), xs.reshape(B, T, I))
        if regularize is not None and regularize.zones:  # each step's zoneout masks and un-zoned carry
            sizes = sizes._replace(residual=sizes.residual + 2 * sizes.carry)
        if schedule == "nested":
            nesting = budget_schedule(T, budget, sizes)
        elif T and (K_c := binomial_schedule(T, budget, sizes)) is not None:
            plan = binomial_plan(T, *K_c)
    if T == 0:  # the final carry is the initial one
        ys = _empty_outputs(cell, params, _reshape_batch(carry0, len(batch_shape), (B,)), xs.reshape(B, 0, I))
        return carry0, _reshape_batch(ys, 1, batch_shape)
    if method in DEER_METHODS:
        try:
            final, ys, _ = deer_unroll(
                cell, params, xs, carry0, lengths=lengths, reverse=reverse, quasi=method == "quasi_deer"
            )
        except TypeError as e:
            if "forward-mode" in str(e):
                raise TypeError(
                    f"rj.unroll(..., method={method!r}) binds DEER's implicit gradient with jax.custom_vjp, "
                    "which has no forward mode: jax.grad, jax.vjp and jax.value_and_grad work, but for "
                    "jax.jvp, jax.jacfwd or jax.linearize call rj.unroll(..., method='sequential', "
                    "grad='autodiff')"
                ) from e
            raise
        return final, ys
    impl = autodiff_unroll
    if grad == "manual":
        impl = bptt_unroll if cell.is_builtin else stepwise_bptt_unroll
    if probe is not None:
        impl = probed_bptt_unroll if grad == "manual" else probed_autodiff_unroll
    if method == "associative":
        impl = AssociativeUnroll(grad, chunk_size)
    if time_split is not None:
        impl = SplitUnroll(grad, chunk_size, time_split[1])
    plain_bptt = impl in (bptt_unroll, probed_bptt_unroll) and checkpoint is None and budget is None
    if unroll_steps is None and not plain_bptt:
        unroll_steps = 1  # only the hand-derived BPTT's primal (inference) picks its own factor
    segment = None if checkpoint is None else segment_length(checkpoint, T)
    # the memory-saving schedules run uncompiled: jit's transpose makes the cotangent of an unused ys a
    # zero array [B, T, H], whose O(T) memory they exist to avoid
    run = _run if plan is None and not nesting and segment is None else _dispatch
    run = _run_split if time_split is not None else run
    try:
        return run(
            impl,
            cell,
            reverse,
            unroll_steps,
            plan,
            nesting,
            segment,
            params,
            xs,
            carry0,
            lengths,
            probe,
            regularize,
            key,
        )
    except TypeError as e:
        if plan is not None and "forward-mode" in str(e):
            raise TypeError(
                "rj.unroll(..., budget=...) runs the binomial schedule's backward under jax.custom_vjp, "
                "which has no forward mode: for jax.jvp, jax.jacfwd or jax.linearize pass "
                "schedule='nested' and grad='autodiff'"
            ) from e
        if grad == "manual" and "forward-mode" in str(e):
            raise TypeError(
                "rj.unroll(..., grad='manual') binds the hand-derived BPTT with jax.custom_vjp, which "
                "has no forward mode: jax.grad, jax.vjp and forward-over-reverse (jax.hessian) work, "
                "but for jax.jvp, jax.jacfwd or jax.linearize call rj.unroll(..., grad='autodiff')"
            ) from e
        raise


def _dispatch(
    impl: Any,
    cell: Cell,
    reverse: bool,
    unroll: int | bool | None,
    plan: BinomialPlan | None,
    nesting: tuple[int, ...],
    segment: int | None,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    lengths: Array | None,
    probe: Array | None,
    regularize: Regularizer | None = None,
    key: Array | None = None,
) -> tuple[PyTree, PyTree]:
    """`unroll` after validation: flattens the batch axes of ``xs [..., T, I]``, builds the mask, draws the
    regularisers' masks from ``key`` (`rnnjax.regularize.draw`), runs ``impl`` plainly, with the binomial
    ``plan``, the ``nesting`` segment lengths or checkpoints every ``segment`` steps, and restores the
    axes."""
    batch_shape, T, I = tuple(xs.shape[:-2]), xs.shape[-2], xs.shape[-1]
    B = math.prod(batch_shape)
    xs = xs.reshape(B, T, I)
    mask = None
    if lengths is not None:  # [T, B], its batch axis split as the rows of xs are (whatever split lengths)
        mask = jnp.swapaxes(batch_like(mask_from_lengths(lengths.reshape(B), T).T, xs, 1), 0, 1)
    debug_check_finite(xs, NONFINITE_XS, None if mask is None else jnp.swapaxes(mask, 0, 1))
    if mask is not None:
        xs = _zero_padding(xs, mask)
    carry0 = _reshape_batch(carry0, len(batch_shape), (B,))
    noise = None
    if regularize is not None:
        # input dropout and weight drop act outside the recursion: JAX differentiates their products
        x_mask, w_mask, noise = draw(regularize, key, cell, params, xs, carry0)
        xs = xs if x_mask is None else xs * x_mask
        params = params if w_mask is None else params._replace(w_hh=params.w_hh * w_mask)
    args: tuple[Any, ...] = (cell, reverse, unroll, params, xs, carry0, mask)
    args = (*args, noise) if probe is None else (*args, probe.reshape(B, T, -1))
    if plan is not None:
        final, ys = rows_per_device(partial(binomial_unroll, impl, plan), *args)
    elif nesting:
        final, ys = rows_per_device(partial(nested_checkpointed_unroll, impl, nesting), *args)
    elif segment is None:
        final, ys = impl(*args)
    else:
        final, ys = rows_per_device(partial(checkpointed_unroll, impl, segment), *args)
    return _reshape_batch(final, 1, batch_shape), _reshape_batch(ys, 1, batch_shape)


def _dispatch_split(
    impl: SplitUnroll,
    cell: Cell,
    reverse: bool,
    unroll: int | bool | None,
    plan: None,
    nesting: tuple[()],
    segment: None,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    lengths: Array | None,
    probe: None,
    regularize: None = None,
    key: None = None,
) -> tuple[PyTree, PyTree]:
    """`_dispatch` on each device's part of a time axis split over devices (`rnnjax.parallel.sequence`),
    where ``impl`` exchanges the parts' summaries; the arguments as `_dispatch`'s, with no memory schedule,
    probe or regulariser."""
    mesh, axes = check_time_split(cell, "associative", params, xs, xs.ndim - 2) or (None, ())
    assert mesh is not None
    per_part = partial(_dispatch, impl, cell, reverse, unroll, None, (), None)
    run = lambda p, x, c, L: per_part(p, x, c, L, None)  # noqa: E731
    return over_time(run, mesh, axes, params, xs, carry0, lengths)


def _zero_padding(xs: Array, mask: Array) -> Array:
    """``xs [B, T, ...]`` with zeros at the padded steps (``mask [T, B]`` False), before any arithmetic.

    A masked step's carry and output are selected away, but its arithmetic still runs on its input, and in
    the backward a zero cotangent times the derivative at a NaN or inf input (``0 · tanh'(nan)``, the weight
    gradient's ``xs^T dzx``) is NaN. Selecting the input first (the "double where") leaves the valid steps
    bit for bit unchanged and makes whatever the padding holds unreachable: one select over ``xs`` serves
    both gradient modes and every memory schedule, and its transpose gives ``xs`` zero gradient there.
    """
    keep = jnp.swapaxes(mask, 0, 1)
    return jnp.where(keep.reshape(keep.shape + (1,) * (xs.ndim - 2)), xs, jnp.zeros_like(xs))


# `_dispatch` as one program: under an outer `jax.jit` it is inlined; called eagerly (or under an eager
# `jax.grad`) its forward and its backward compile once each, not once per operation (an eager LSTM gradient
# went from 57-73 compilations to 13-15, the rest being the loss's own operations)
_run = jax.jit(_dispatch, static_argnums=(0, 1, 2, 3, 4, 5, 6, 12))
_run_split = jax.jit(_dispatch_split, static_argnums=(0, 1, 2, 3, 4, 5, 6, 12))


def _check_cell(cell: Any, what: str = "cell") -> Cell:
    """``cell`` if it is a `Cell`, else a clear error. (A `Cell` hashes by construction, so that it can be a
    static argument of the compiled programs.)"""
    if not isinstance(cell, Cell):
        raise TypeError(
            f"{what} must be an rnnjax Cell (rj.elman, rj.lstm, rj.gru or rj.Cell(...)), "
            f"got {type(cell).__name__}"
        )
    return cell


def _check_deer_options(method: str, grad: str, unroll_steps: Any) -> None:
    """A ValueError for the options of `unroll` that have no meaning with DEER (the rest are refused by
    `rnnjax.parallel.resolve_method`)."""
    if grad != "manual":
        raise ValueError(
            f"grad={grad!r} does not apply to method={method!r}, whose gradient is always the implicit one "
            f"(one reverse linear recurrence at the solution); expected grad='manual' (the default), or "
            f"method='sequential' for JAX's autodiff of the scan"
        )
    if unroll_steps is not None:
        raise ValueError(
            f"unroll_steps={unroll_steps!r} applies to the sequential time loop, got method={method!r}, "
            f"which has none: expected unroll_steps=None"
        )


def _check_unroll_steps(unroll_steps: Any) -> None:
    if unroll_steps is None:
        return
    if isinstance(unroll_steps, (bool, np.bool_)):
        return
    if not isinstance(unroll_steps, (int, np.integer)) or unroll_steps < 1:
        raise ValueError(f"unroll_steps must be an int >= 1 or a bool, got {unroll_steps!r}")


def _cast_floats(tree: PyTree, dtype: Any) -> PyTree:
    """Every floating-point leaf of ``tree`` cast to ``dtype`` (a differentiable cast: its gradient comes
    back in the leaf's own dtype)."""

    def cast(a: Any) -> Any:
        if hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype:
            return a.astype(dtype)
        return a

    return jax.tree.map(cast, tree)


def _check_xs(xs: Any) -> Array:
    xs = check_array(xs, "xs", "a floating-point array [B, T, I]")
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        got = f"xs must be a floating-point array [B, T, I], got dtype {xs.dtype}"
        embed = "xs = rj.embed(table, tokens) with a float table [V, E], which gives [B, T, E]"
        if jnp.issubdtype(xs.dtype, jnp.integer) and xs.ndim == 2:
            # ids [B, T]: xs[None] (the hint for other rank-2 inputs) would run silently as [1, B, T]
            raise TypeError(f"{got} and shape {tuple(xs.shape)}, which looks like token ids [B, T]: {embed}")
        if jnp.issubdtype(xs.dtype, jnp.integer):
            raise TypeError(
                f"{got}: for token ids [B, T] use {embed}; for integer features cast them first, "
                "e.g. xs.astype(jnp.float32)"
            )
        raise TypeError(f"{got}; cast it first, e.g. xs.astype(jnp.float32)")
    if xs.ndim < 3:
        hint = " (for a single sequence use xs[None])" if xs.ndim == 2 else ""
        raise ValueError(
            f"xs must have shape [B, T, I] (rank >= 3), got shape {tuple(xs.shape)} of rank {xs.ndim}{hint}"
        )
    return xs


def _check_explicit_split(params: PyTree, xs: Array, n_batch: int) -> bool:
    """Whether a parameter is split by its last axis (gates or hidden units: model parallelism) over a mesh
    of `jax.sharding.AxisType.Explicit` axes, whose steps then return a carry split by unit
    (`_typed_by_step`). (The time axis of ``xs`` split there is `rnnjax.parallel.sequence`'s.) On
    `~jax.sharding.AxisType.Auto` axes XLA's partitioner splits any of them."""
    specs = [explicit_spec(leaf) if hasattr(leaf, "shape") else None for leaf in jax.tree.leaves(params)]
    return any(s is not None and s[-1] is not None for s in specs)


def _typed_by_step(cell: Cell, params: PyTree, carry0: PyTree, xs: Array) -> PyTree:
    """``carry0`` resharded to the type a step gives the carry back, where weights split by unit over an
    explicit mesh split the carry by unit: the time loop needs its carry to keep its type. Twice, to reach
    the type that a step keeps (a carry split by unit gives one split the same way)."""
    for _ in range(2):
        new, _ = jax.eval_shape(lambda p, c, x: cell.step(p, c, x[..., 0, :]), params, carry0, xs)
        carry0 = reshard_like(carry0, new)
    return carry0


def _check_lengths(lengths: Any, batch_shape: tuple[int, ...], T: int) -> Array | None:
    if lengths is None:
        return None
    lengths = check_array(lengths, "lengths", "an integer array [B]", jnp.integer)
    if tuple(lengths.shape) != batch_shape:
        raise ValueError(
            f"lengths must have shape [B] = {batch_shape} (xs.shape[:-2]), got shape {tuple(lengths.shape)}"
        )
    try:
        concrete = np.asarray(lengths)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None  # traced under jit: the values cannot be checked at trace time
    what = f"lengths must lie in [0, T] = [0, {T}]"
    if concrete is None:  # free under jit; an error under checkify (out of range, the mask clamps to [0, T])
        debug_check_range(lengths, 0, T, what)
    elif concrete.size:
        lo, hi = int(concrete.min()), int(concrete.max())
        if lo < 0 or hi > T:
            raise ValueError(f"{what}, got values from {lo} to {hi}")
    return jnp.asarray(lengths)


def _check_carry(cell: Cell, params: PyTree, carry: Any, batch_shape: tuple[int, ...], dtype: Any) -> PyTree:
    if carry is None:
        return cell.initial_carry(params, batch_shape)
    expected = jax.eval_shape(lambda p: cell.initial_carry(p, batch_shape), params)
    want, got = jax.tree.structure(expected), jax.tree.structure(carry)
    if want != got:
        raise TypeError(
            f"carry must have the structure of cell.initial_carry(params, batch_shape) = {want}, got {got}"
        )
    for (path, e), a in zip(
        jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(carry), strict=True
    ):
        name = "carry" + jax.tree_util.keystr(path)
        shape = tuple(getattr(a, "shape", ()))
        if shape != tuple(e.shape):
            raise ValueError(
                f"{name} must have shape {tuple(e.shape)} (batch shape {batch_shape} + state), got {shape}"
            )
        a_dtype = jnp.dtype(getattr(a, "dtype", type(a)))
        if a_dtype != jnp.dtype(e.dtype):
            raise TypeError(
                f"{name} must have dtype {jnp.dtype(e.dtype)} (that of the params and xs), got {a_dtype}"
            )
    return carry


def _check_probe(
    cell: Cell,
    params: PyTree,
    probe: Any,
    checkpoint: Any,
    batch_shape: tuple[int, ...],
    T: int,
    dtype: Any,
) -> Array:
    if not cell.is_builtin:
        raise ValueError(
            f"probe needs a built-in cell (rj.elman, rj.lstm, rj.gru), whose outputs are its hidden states; "
            f"got the user-written cell {cell.name!r}"
        )
    if checkpoint is not None:
        raise ValueError("probe cannot be combined with checkpoint or budget: pass neither")
    H = cell.output_size
    shape = tuple(getattr(probe, "shape", ()))
    if shape != (*batch_shape, T, H):
        raise ValueError(f"probe must have shape [B, T, H] = {(*batch_shape, T, H)}, got {shape}")
    if jnp.dtype(probe.dtype) != jnp.dtype(dtype):
        raise TypeError(f"probe must have dtype {jnp.dtype(dtype)} (that of xs), got {probe.dtype}")
    return probe


def _reshape_batch(tree: PyTree, n_old: int, new: tuple[int, ...]) -> PyTree:
    """Replaces the leading ``n_old`` (batch) axes of every leaf by the axes ``new``."""
    return jax.tree.map(lambda a: a.reshape(new + a.shape[n_old:]), tree)


def _empty_outputs(cell: Cell, params: PyTree, carry0: PyTree, xs: Array) -> PyTree:
    """The ``ys`` of a zero-length sequence: leaves ``[B, 0, ...]`` shaped like one step's output."""
    B, _, I = xs.shape
    x_spec = jax.ShapeDtypeStruct((B, I), xs.dtype)
    _, y_spec = jax.eval_shape(cell.step, params, carry0, x_spec)
    return jax.tree.map(lambda s: jnp.zeros((B, 0, *s.shape[1:]), s.dtype), y_spec)
