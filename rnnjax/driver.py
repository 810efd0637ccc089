"""`unroll`: the public entry point that steps a cell over a sequence, in three stages.

1. Validation (`_prepare`), at trace time: every option and array is checked (shapes and dtypes are static
   under `jax.jit`), the carry made or checked and typed like the rows of ``xs``.
2. The plan: a frozen `UnrollPlan` of static values only, which time loop runs (sequential, associative,
   DEER), which backward (the hand-derived one of `rnnjax.bptt`, a user cell's per-step VJP, JAX's autodiff
   of `rnnjax.autodiff`), what the backward keeps (every step, checkpoints, a binomial or nested schedule),
   the mask, the regulariser and a time split over devices. `unroll_plan` returns it.
3. Execution (`_execute`, `_dispatch`): flattens extra leading batch dimensions into one, builds the length
   mask and runs the plan, compiled as one program per plan.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from functools import partial
from typing import Any, Literal, NamedTuple, get_args

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

    The options are validated at trace time, then settled into an `UnrollPlan` (which time loop, which
    backward, what the backward keeps), which then runs; `rj.unroll_plan` returns that plan without running
    it.

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
        accumulate in float32 (`rnnjax.bptt.time_gemm`), and the gradients come back in each input's
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
        dtype, for inputs that do not fit. Under forward mode (`jax.jvp`, `jax.jacfwd`) a plan with a
        custom VJP (``grad="manual"``, a binomial ``budget``, DEER) raises JAX's own TypeError, with a note
        naming the options that run in forward mode.

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
    plan, arrays = _prepare(
        cell,
        params,
        xs,
        carry,
        lengths=lengths,
        reverse=reverse,
        grad=grad,
        unroll_steps=unroll_steps,
        checkpoint=checkpoint,
        budget=budget,
        schedule=schedule,
        compute_dtype=compute_dtype,
        probe=probe,
        method=method,
        chunk_size=chunk_size,
        regularize=regularize,
        key=key,
    )
    try:
        return _execute(cell, plan, arrays)
    except TypeError as e:
        if (note := _forward_mode_note(plan)) is not None:
            e.add_note(note)
        raise


Memory = Literal["all", "checkpoint", "binomial", "nested"]


@dataclasses.dataclass(frozen=True)
class UnrollPlan:
    """What `unroll` runs for one set of options and shapes: decided at trace time from static values only,
    after validation and before anything runs. `unroll_plan` returns it.

    Attributes:
      method: the time loop: ``"sequential"`` (`jax.lax.scan`), ``"associative"`` (a parallel prefix scan;
        what ``"auto"`` resolved to is recorded here), ``"deer"`` or ``"quasi_deer"``.
      grad: ``"manual"``: the hand-derived backward (`rnnjax.bptt` for a cell with a `GatesBackward`, one
        `jax.vjp` of ``step`` per step for a user cell without one, the adjoint scan for
        ``"associative"``, the implicit gradient for DEER); ``"autodiff"``: JAX differentiates the forward.
      memory: what the backward keeps: ``"all"`` (every step's residuals), ``"checkpoint"`` (the carry
        every ``segment`` steps), ``"binomial"`` (the ``binomial`` schedule) or ``"nested"`` (segment
        lengths ``nesting``, outermost first).
      segment: with ``memory="checkpoint"``: the steps between kept carries.
      binomial: with ``memory="binomial"``: the `rnnjax.binomial.BinomialPlan`.
      nesting: with ``memory="nested"``: the segment length at each level.
      unroll_steps: `jax.lax.scan`'s unroll factor; None lets the hand-derived BPTT's forward pick its own.
      reverse: whether time runs from the last step to the first.
      masked: whether ``lengths`` mask steps.
      probed: whether a ``probe`` takes ``∂L/∂h_t``.
      regularize: the `rj.Regularizer` inside the recurrence, or None.
      chunk_size: with ``method="associative"``: steps run sequentially per chunk, or None.
      time_split: ``(mesh, axes)`` where ``xs``'s time axis is split over an explicit mesh, else None.
      batch_shape: the leading (batch) axes of ``xs``, flattened into one while running.
      T: the sequence length.
      dtype: the dtype the recurrence computes in (``compute_dtype``, else that of ``xs``).
      training: with ``regularize``: whether masks are drawn (a ``key`` was given) or, False, each
        regulariser acts as its expectation.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.gru(8)
      >>> params = cell.init(jax.random.key(0), input_size=4)
      >>> plan = rj.unroll_plan(cell, params, jnp.ones((2, 50, 4)), lengths=jnp.array([50, 20]))
      >>> plan.method, plan.grad, plan.memory, plan.masked, plan.T
      ('sequential', 'manual', 'all', True, 50)
    """

    method: Literal["sequential", "associative", "deer", "quasi_deer"]
    grad: GradMode
    batch_shape: tuple[int, ...]
    T: int
    dtype: str
    memory: Memory = "all"
    segment: int | None = None
    binomial: BinomialPlan | None = None
    nesting: tuple[int, ...] = ()
    unroll_steps: int | bool | None = None
    reverse: bool = False
    masked: bool = False
    probed: bool = False
    regularize: Regularizer | None = None
    chunk_size: int | None = None
    time_split: tuple[Any, tuple[str, ...]] | None = None
    training: bool = False


class _Arrays(NamedTuple):
    """The validated arrays of one `unroll` call, as the plan runs them."""

    params: PyTree
    xs: Array  # [*batch, T, I], cast to the compute dtype
    carry0: PyTree  # [*batch, ...], typed like the rows of xs
    lengths: Array | None  # [*batch]
    probe: Array | None  # [*batch, T, H]
    key: Array | None


def unroll_plan(
    cell: Cell,
    params: PyTree,
    xs: Array,
    carry: PyTree | None = None,
    **options: Any,
) -> UnrollPlan:
    """The `UnrollPlan` that ``rj.unroll(cell, params, xs, carry, **options)`` would run, without running it:
    which time loop, which backward, what the backward keeps in memory (e.g. the binomial schedule a
    ``budget=`` picks), after the same validation (the same errors for the same inputs, but for the values
    of concrete ``lengths``, which no plan depends on). The arrays may be `jax.ShapeDtypeStruct` s: only
    shapes, dtypes and shardings decide a plan, so a plan for inputs too large to make can be read.

    Args:
      cell: the cell, as `unroll` takes it.
      params: its params.
      xs: ``[B, T, I]`` inputs, or a `jax.ShapeDtypeStruct` (only their shape, dtype and sharding decide).
      carry: the initial carry, or None.
      **options: `unroll`'s keyword options (``lengths``, ``reverse``, ``grad``, ``checkpoint``, ``budget``,
        ``method``, ...).

    Returns:
      The frozen, hashable `UnrollPlan`.

    Raises:
      TypeError, ValueError: as `unroll` raises them, at trace time.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.lstm(16)
      >>> params = cell.init(jax.random.key(0), input_size=8)
      >>> plan = rj.unroll_plan(cell, params, jnp.ones((4, 100, 8)), checkpoint="sqrt")
      >>> plan.method, plan.grad, plan.memory, plan.segment
      ('sequential', 'manual', 'checkpoint', 10)
    """
    names = [n for n, p in inspect.signature(_prepare).parameters.items() if p.kind is p.KEYWORD_ONLY]
    if unknown := sorted(set(options) - set(names)):
        raise TypeError(
            f"unroll_plan got unexpected keyword argument(s) {unknown}; it takes rj.unroll's {names}"
        )
    arrays = {k: v for k, v in options.items() if k in ("lengths", "probe", "key") and v is not None}
    static = {k: v for k, v in options.items() if k not in arrays}
    plans: list[UnrollPlan] = []

    def trace(params: PyTree, xs: Array, carry: PyTree, arrays: dict[str, Any]) -> None:
        plans.append(_prepare(cell, params, xs, carry, **static, **arrays)[0])

    jax.eval_shape(trace, params, xs, carry, arrays)  # abstract: shape structs do, no array is made
    return plans[0]


def _prepare(
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
) -> tuple[UnrollPlan, _Arrays]:
    """`unroll`'s validation and its plan: every check at trace time, then the `UnrollPlan` and the arrays
    it runs on."""
    _check_cell(cell)
    checkpoint, schedule = check_options(grad, method, chunk_size, unroll_steps, checkpoint, budget, schedule)
    if not isinstance(reverse, (bool, np.bool_)):
        raise TypeError(f"reverse must be a Python bool, got {reverse!r}")
    arrays, time_split, regularize = _check_arrays(
        cell, params, xs, carry, lengths, probe, compute_dtype, method, regularize, key, checkpoint or budget
    )
    given = {"checkpoint": checkpoint, "budget": budget, "probe": arrays.probe, "regularize": regularize}
    # a time split over devices runs the associative solve, the one method that splits it
    method = "associative" if time_split is not None else method
    resolved = resolve_method(method, cell, arrays.xs.shape[-2], sequential_only=sequential_only(given))
    memory, segment, binomial, nesting = _memory_plan(
        cell, arrays.params, arrays.carry0, arrays.xs, checkpoint, budget, schedule, regularize
    )
    manual_bptt = grad == "manual" and cell.is_builtin and resolved == "sequential"
    if unroll_steps is None and not (manual_bptt and memory == "all") and resolved not in DEER_METHODS:
        unroll_steps = 1  # only the hand-derived BPTT's primal (inference) picks its own factor
    plan = UnrollPlan(
        method=resolved,  # pyright: ignore[reportArgumentType]
        grad=grad,
        memory=memory,
        segment=segment,
        binomial=binomial,
        nesting=nesting,
        unroll_steps=unroll_steps,
        reverse=bool(reverse),
        masked=arrays.lengths is not None,
        probed=arrays.probe is not None,
        regularize=regularize,
        chunk_size=chunk_size if resolved == "associative" else None,
        time_split=time_split,
        batch_shape=tuple(arrays.xs.shape[:-2]),
        T=arrays.xs.shape[-2],
        dtype=jnp.dtype(arrays.xs.dtype).name,
        training=regularize is not None and key is not None,
    )
    return plan, arrays


def _check_arrays(
    cell: Cell,
    params: PyTree,
    xs: Any,
    carry: PyTree | None,
    lengths: Any,
    probe: Any,
    compute_dtype: Any,
    method: Method,
    regularize: Any,
    key: Any,
    saving: Any,
) -> tuple[_Arrays, tuple[Any, tuple[str, ...]] | None, Regularizer | None]:
    """`unroll`'s arrays checked against each other and the cell (``saving``: a ``checkpoint`` or
    ``budget`` given): the `_Arrays` to run (cast to ``compute_dtype``; the carry made or checked, and typed
    like the rows of ``xs``), the time split over devices if any, and the checked regulariser."""
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
        probe = _check_probe(cell, params, probe, saving, batch_shape, T, xs.dtype)
    regularize = check_regularize(regularize, key, cell, params)
    if regularize is not None and probe is not None:
        raise ValueError("probe cannot be combined with regularize: pass one of them")
    return _Arrays(params, xs, carry0, lengths, probe, key), time_split, regularize


SEQUENTIAL_ONLY = ("checkpoint", "budget", "probe", "regularize")
"""The options of `unroll` that only the sequential scan takes."""


def sequential_only(options: dict[str, Any]) -> str | None:
    """The first of `SEQUENTIAL_ONLY` that ``options`` gives (not None; a checkpoint not ``"none"``), or
    None: what `rnnjax.parallel.resolve_method` checks a parallel method against."""
    given = (n for n in SEQUENTIAL_ONLY if options.get(n) is not None)
    return next((n for n in given if not (isinstance(options[n], str) and options[n] == "none")), None)


def check_options(
    grad: GradMode,
    method: Method,
    chunk_size: int | None,
    unroll_steps: int | bool | None,
    checkpoint: int | Literal["sqrt", "none"] | None,
    budget: int | None,
    schedule: Schedule | None,
) -> tuple[int | Literal["sqrt", "none"] | None, Schedule | None]:
    """Checks the options of `unroll` that need no array (the framework modules check theirs with it where
    they are built).

    Args:
      grad, method, chunk_size, unroll_steps, checkpoint, budget, schedule: as `unroll` takes them.

    Returns:
      ``(checkpoint, schedule)`` normalised: a ``"none"`` checkpoint is None, and a budget's schedule
      defaults to ``"binomial"``.

    Raises:
      TypeError, ValueError: naming the option, the expected and the actual.
    """
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
    return checkpoint, schedule


def _memory_plan(
    cell: Cell,
    params: PyTree,
    carry0: PyTree,
    xs: Array,
    checkpoint: Any,
    budget: int | None,
    schedule: Schedule | None,
    regularize: Regularizer | None,
) -> tuple[Memory, int | None, BinomialPlan | None, tuple[int, ...]]:
    """``(memory, segment, binomial, nesting)`` of the `UnrollPlan`: what the backward keeps, from
    ``checkpoint`` or from ``budget`` and the cell's own sizes (`rnnjax.remat.step_sizes`)."""
    batch_shape, T, I = tuple(xs.shape[:-2]), xs.shape[-2], xs.shape[-1]
    if checkpoint is not None and segment_length(checkpoint, T) < T:
        return "checkpoint", segment_length(checkpoint, T), None, ()
    if budget is None:  # (a segment of T steps or more keeps what plain BPTT keeps)
        return "all", None, None, ()
    B = math.prod(batch_shape)
    sizes = step_sizes(cell, params, _reshape_batch(carry0, len(batch_shape), (B,)), xs.reshape(B, T, I))
    if regularize is not None and regularize.zones:  # each step's zoneout masks and un-zoned carry
        sizes = sizes._replace(residual=sizes.residual + 2 * sizes.carry)
    if schedule == "nested":
        nesting = budget_schedule(T, budget, sizes)
        return ("nested", None, None, nesting) if nesting else ("all", None, None, ())
    if T and (K_c := binomial_schedule(T, budget, sizes)) is not None:
        return "binomial", None, binomial_plan(T, *K_c), ()
    return "all", None, None, ()


def _forward_mode_note(plan: UnrollPlan) -> str | None:
    """What to do where a plan's backward is bound with `jax.custom_vjp`, which JAX refuses to differentiate
    in forward mode (`jax.jvp`, `jax.jacfwd`, `jax.linearize`): added to a TypeError as a note, the error
    itself unchanged. None where the plan runs no custom VJP."""
    if plan.method in DEER_METHODS:
        what, fix = (
            f"method={plan.method!r}) binds DEER's implicit gradient",
            "method='sequential', grad='autodiff'",
        )
    elif plan.memory == "binomial":
        what, fix = "budget=) binds the binomial schedule's backward", "schedule='nested', grad='autodiff'"
    elif plan.grad == "manual":
        what, fix = "grad='manual') binds the hand-derived backward", "grad='autodiff'"
    else:
        return None
    return (
        f"rnnjax: if JAX refused forward mode here (jax.jvp, jax.jacfwd, jax.linearize): rj.unroll(..., "
        f"{what} with jax.custom_vjp, which has no forward mode (jax.grad, jax.vjp and forward-over-reverse "
        f"jax.hessian work); call rj.unroll(..., {fix}) instead"
    )


def _impl(plan: UnrollPlan, cell: Cell) -> Any:
    """The implementation of the time loop and its backward that ``plan`` runs (for the sequential and
    associative methods): ``impl(cell, reverse, unroll, params, xs, carry0, mask, noise_or_probe)``."""
    if plan.time_split is not None:
        return SplitUnroll(plan.grad, plan.chunk_size, plan.time_split[1])
    if plan.method == "associative":
        return AssociativeUnroll(plan.grad, plan.chunk_size)
    if plan.probed:
        return probed_bptt_unroll if plan.grad == "manual" else probed_autodiff_unroll
    if plan.grad == "autodiff":
        return autodiff_unroll
    return bptt_unroll if cell.is_builtin else stepwise_bptt_unroll


def _execute(cell: Cell, plan: UnrollPlan, arrays: _Arrays) -> tuple[PyTree, PyTree]:
    """Runs ``plan`` on the validated ``arrays``."""
    params, xs, carry0, lengths, probe, key = arrays
    if plan.T == 0:  # the final carry is the initial one
        n, B, I = len(plan.batch_shape), math.prod(plan.batch_shape), xs.shape[-1]
        ys = _empty_outputs(cell, params, _reshape_batch(carry0, n, (B,)), xs.reshape(B, 0, I))
        return carry0, _reshape_batch(ys, 1, plan.batch_shape)
    if plan.method in DEER_METHODS:
        final, ys, _ = deer_unroll(
            cell, params, xs, carry0, lengths=lengths, reverse=plan.reverse, quasi=plan.method == "quasi_deer"
        )
        return final, ys
    # the memory-saving schedules run uncompiled: jit's transpose makes the cotangent of an unused ys a
    # zero array [B, T, H], whose O(T) memory they exist to avoid
    run = _run if plan.memory == "all" else _dispatch
    run = _run_split if plan.time_split is not None else run
    return run(plan, cell, params, xs, carry0, lengths, probe, key)


def _dispatch(
    plan: UnrollPlan,
    cell: Cell,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    lengths: Array | None,
    probe: Array | None,
    key: Array | None = None,
) -> tuple[PyTree, PyTree]:
    """`unroll`'s execution of a sequential or associative ``plan``: flattens the batch axes of
    ``xs [..., T, I]``, builds the mask, draws the regularisers' masks from ``key``
    (`rnnjax.regularize.draw`), runs the plan's implementation (`_impl`) with what its backward keeps
    (plainly, checkpointed, binomial or nested), and restores the axes. Shapes are read from ``xs`` (on a
    time split, each device's part)."""
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
    if plan.regularize is not None:
        # input dropout and weight drop act outside the recursion: JAX differentiates their products
        x_mask, w_mask, noise = draw(plan.regularize, key, cell, params, xs, carry0)
        xs = xs if x_mask is None else xs * x_mask
        params = params if w_mask is None else params._replace(w_hh=params.w_hh * w_mask)
    impl = _impl(plan, cell)
    args: tuple[Any, ...] = (cell, plan.reverse, plan.unroll_steps, params, xs, carry0, mask)
    args = (*args, noise) if probe is None else (*args, probe.reshape(B, T, -1))
    if plan.binomial is not None:
        final, ys = rows_per_device(partial(binomial_unroll, impl, plan.binomial), *args)
    elif plan.nesting:
        final, ys = rows_per_device(partial(nested_checkpointed_unroll, impl, plan.nesting), *args)
    elif plan.segment is not None:
        final, ys = rows_per_device(partial(checkpointed_unroll, impl, plan.segment), *args)
    else:
        final, ys = impl(*args)
    return _reshape_batch(final, 1, batch_shape), _reshape_batch(ys, 1, batch_shape)


def _dispatch_split(
    plan: UnrollPlan,
    cell: Cell,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    lengths: Array | None,
    probe: None = None,
    key: None = None,
) -> tuple[PyTree, PyTree]:
    """`_dispatch` on each device's part of a time axis split over devices (`rnnjax.parallel.sequence`),
    where the plan's `SplitUnroll` exchanges the parts' summaries; no memory schedule, probe or
    regulariser."""
    assert plan.time_split is not None
    mesh, axes = plan.time_split
    run = lambda p, x, c, L: _dispatch(plan, cell, p, x, c, L, None)  # noqa: E731
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
# `jax.grad`) its forward and its backward compile once each, not once per operation
_run = jax.jit(_dispatch, static_argnums=(0, 1))
_run_split = jax.jit(_dispatch_split, static_argnums=(0, 1))


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
