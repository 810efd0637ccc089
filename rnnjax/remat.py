"""Memory-saving BPTT: checkpoint the carry every K steps and recompute each segment in the backward.

With ``rj.unroll(..., checkpoint=K)`` (or ``"sqrt"`` for K = ⌈√T⌉) the time axis is cut into ⌈T/K⌉ segments.
The forward keeps only the carry entering each segment; the backward walks the segments in reverse, re-runs
one segment's forward (keeping that segment's residuals) and applies the same hand-derived BPTT to it. The
residual memory falls from O(T) to O(T/K + K) steps — O(√T) for K = √T — for one extra forward pass
(Chen et al., "Training deep nets with sublinear memory cost", 2016; Gruslys et al., "Memory-efficient
backpropagation through time", NeurIPS 2016, §3). Inputs, outputs and their gradients are O(T) as always.

With ``rj.unroll(..., budget=M, schedule="nested")`` (bytes) the segments nest, L levels deep, for L extra
forward passes, and `budget_schedule` takes the fewest levels whose peak (carries, residuals and output
cotangents, sized from the cell's own shapes) fits in M. This is the recursive schedule of Chen et al.
(§4). ``budget=M`` alone runs the time-optimal binomial schedule instead (Griewank's Revolve,
`rnnjax.binomial`), which recomputes fewer steps at the same budget; both size their peak with
`step_sizes`.

Each segment is sliced out of ``xs`` inside the loop, so no copy of the inputs is made, and an input
gradient nobody asked for is never accumulated.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.bptt import sum_row_terms
from rnnjax.cells.base import Cell, input_projection
from rnnjax.regularize import Noise, noise_steps
from rnnjax.sharding import (
    batch_split,
    explicit_spec,
    merge_rows,
    reshard_like,
    reshard_to,
    row_groups,
    split_rows,
    vary_like,
)

Array = jax.Array
PyTree = Any


def segment_length(checkpoint: int | str, T: int) -> int:
    """K for ``checkpoint`` (an int >= 1, or ``"sqrt"`` for ⌈√T⌉) and a sequence of T steps."""
    if checkpoint == "sqrt":
        return max(1, math.isqrt(max(T - 1, 0)) + 1) if T > 1 else 1
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 1:
        raise ValueError(
            f"checkpoint must be None, 'none', 'sqrt' or an int >= 1 (steps per segment), got {checkpoint!r}"
        )
    return checkpoint


class StepSizes(NamedTuple):
    """Bytes: a carry, what the backward holds per step (carry, residuals, gate pre-activations, their
    gradients and temporaries, the input), an output, and each nesting level's own (the parameter-gradient
    accumulator of its scan)."""

    carry: int
    residual: int
    output: int
    level: int = 0

    def __str__(self) -> str:
        return (
            f"{self.carry} B per carry, {self.residual} B kept per step for the backward, "
            f"{self.output} B per output, {self.level} B per level of nested segments"
        )


def step_sizes(cell: Cell, params: PyTree, carry0: PyTree, xs: Array) -> StepSizes:
    """The `StepSizes` of ``cell`` on ``xs [B, T, I]`` from ``carry0`` (leaves ``[B, ...]``), from shapes.

    A built-in cell keeps the carry and its gates' residuals, and its segment's backward holds, per step,
    the hoisted ``zx`` and the stacked ``dzx``, two more ``[B, G]`` of slack, the columns of ``dzh`` that it
    stacks (`Cell.dzh_shared`), its ``aux`` and the input slice; a user-written cell keeps
    the carry, and its backward an output and an input per step (it recomputes each step's VJP).

    A model, not a measurement, calibrated on compiled memory to over-count. The plain backward's
    per-step memory is the carry, input, residuals and one ``[B, G]``, less than the model counts, and
    less again for the cells whose residuals share the projection's buffer (`rnnjax.scan.residual_slot`),
    which the model does not count. tests/test_remat.py and tests/test_binomial.py hold compiled memory
    within the budget this model sizes (within 2x for the nested schedule).
    """
    nbytes = lambda tree: sum(a.size * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))  # noqa: E731
    x_t = jax.ShapeDtypeStruct((xs.shape[0], xs.shape[-1]), xs.dtype)
    carry = nbytes(carry0)
    _, y = jax.eval_shape(cell.step, params, carry0, x_t)
    x_bytes = nbytes(x_t)
    residual = carry + x_bytes
    backward = cell.backward  # None: a user-written cell
    if backward is None:
        residual += nbytes(y)
    else:

        def gates(p: PyTree, c: PyTree, x: Array) -> PyTree:
            zx = input_projection(p, x)
            return backward.gates(p, zx, c.h @ p.w_hh if hasattr(p, "w_hh") else None, c)[1]

        zx = jax.eval_shape(input_projection, params, x_t)
        res = jax.eval_shape(gates, params, carry0, x_t)
        _, dzh, _, *aux = jax.eval_shape(
            lambda p, r, c: sum_row_terms(backward.gates_bwd(p, r, c, c, c)), params, res, carry0
        )
        # dzx beside the segment's zx, two more [B, G] of slack; dzh's own columns when they are stacked
        stacked_dzh = 0
        if dzh is not None:
            stacked_dzh = nbytes(dzh) * (dzh.shape[-1] - cell.dzh_shared) // dzh.shape[-1]
        residual += nbytes(res) + 4 * nbytes(zx) + stacked_dzh + nbytes(aux)
    return StepSizes(carry, residual, nbytes(y), 2 * nbytes(params))


STEPS = StepSizes(1, 1, 1, 0)  # count steps instead of bytes


def budget_schedule(T: int, budget: int, sizes: StepSizes = STEPS) -> tuple[int, ...]:
    """Nested segment lengths ``(K_1, ..., K_L)``, outermost first, that keep at most ``budget`` bytes.

    The peak of a schedule (`peak_bytes`): while the backward recomputes one segment at every level, it holds
    the ``⌈T/K_1⌉`` carries of the outer level, the ``⌈K_i/K_{i+1}⌉`` carries of each inner level, the
    innermost segment's ``K_L`` steps of residuals, every live segment's ``K_i`` output cotangents (JAX's
    scan materialises them even when they are zero) and each level's own, at the `StepSizes` (the default,
    `STEPS`, counts steps). Each level costs one more forward pass, so the schedule takes the fewest levels
    that fit, and among their segment lengths the lowest peak; ``()`` when plain BPTT fits.

    Raises:
      ValueError: if ``budget`` is not an int >= 1, or is below the lowest peak of any schedule for T.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1 (bytes kept for the backward), got {budget!r}")
    if T * sizes.residual <= budget:
        return ()
    best = T * sizes.residual
    for levels in range(1, _MAX_LEVELS + 1):
        peak, ks = _best_nesting(T, levels, sizes)
        best = min(best, peak)
        if peak <= budget:
            return ks
    raise ValueError(
        f"budget={budget} bytes is too small for T={T} steps ({sizes}): the leanest schedule keeps "
        f"{best} bytes; pass budget >= {best}"
    )


_MAX_LEVELS = 4  # past this, each level saves little memory for one more forward pass


def peak_bytes(T: int, ks: tuple[int, ...], sizes: StepSizes = STEPS) -> int:
    """The peak state a nested schedule ``ks`` keeps in the backward (see `budget_schedule`)."""
    if not ks:
        return T * sizes.residual
    spans = (T, *ks)
    carries = sum(-(-spans[i] // spans[i + 1]) for i in range(len(ks)))
    return carries * sizes.carry + ks[-1] * sizes.residual + sum(ks) * sizes.output + len(ks) * sizes.level


@functools.lru_cache(maxsize=4096)
def _best_nesting(span: int, levels: int, sizes: StepSizes) -> tuple[int, tuple[int, ...]]:
    """``(peak, ks)`` minimising `peak_bytes` over ``levels`` nested segment lengths for ``span`` steps.

    Segment lengths are searched on a geometric grid (ratio ~1.1, plus every length up to 16).
    """
    best: tuple[int, tuple[int, ...]] | None = None
    for K in _grid(span):
        inner_peak, inner = _best_nesting(K, levels - 1, sizes) if levels > 1 else (K * sizes.residual, ())
        # the outer carries, this segment's output cotangents, and what recomputing the segment holds
        peak = -(-span // K) * sizes.carry + K * sizes.output + sizes.level + inner_peak
        if best is None or peak < best[0]:
            best = (peak, (K, *inner))
    assert best is not None
    return best


def _grid(span: int) -> list[int]:
    """Candidate segment lengths in ``[1, span - 1]``: all up to 16, then ~10% apart."""
    ks, k = [], 1
    while k < span:
        ks.append(k)
        k = k + 1 if k < 16 else int(k * 1.1) + 1
    return ks or [1]


def checkpointed_unroll(
    impl: Callable[..., tuple[PyTree, PyTree]],
    K: int,
    cell: Cell,
    reverse: bool,
    unroll: int | bool,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    noise: Noise | None = None,
) -> tuple[PyTree, PyTree]:
    """``impl`` (the hand-derived or the autodiff unroll) over segments of K steps, each rematerialised.

    Same signature and result as ``impl``: ``xs [B, T, I]``, ``mask [T, B]`` or None, ``noise`` the
    regularisers' masks (`rnnjax.regularize.Noise`, zoneout's sliced like ``mask``) or None. The ⌊T/K⌋ full
    segments run in one `jax.lax.scan` that slices its segment out of ``xs`` (no copy of ``xs`` is made);
    the remaining ``T mod K`` steps run as one shorter segment, last in time order.
    """
    B, T = xs.shape[:2]
    n = T // K
    rest = T - n * K

    def run(carry: PyTree, x: Array, m: Array | None, nz: Noise | None) -> tuple[PyTree, PyTree]:
        return impl(cell, reverse, unroll, params, x, carry, m, nz)

    @jax.checkpoint
    def segment(carry: PyTree, s: Array) -> tuple[PyTree, PyTree]:
        x = jax.lax.dynamic_slice_in_dim(xs, s * K, K, axis=1)
        m = None if mask is None else jax.lax.dynamic_slice_in_dim(mask, s * K, K, axis=0)
        return run(carry, x, m, noise_steps(noise, s * K, K))

    def full_segments(carry: PyTree) -> tuple[PyTree, PyTree]:
        carry, ys = jax.lax.scan(segment, carry, jnp.arange(n), reverse=reverse)
        # leaves [n, B, K, ...] -> [B, n*K, ...]
        return carry, jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(B, n * K, *y.shape[3:]), ys)

    def tail(carry: PyTree) -> tuple[PyTree, PyTree]:
        m = None if mask is None else mask[n * K :]
        return jax.checkpoint(run)(carry, xs[:, n * K :], m, noise_steps(noise, n * K, rest))

    # time order: the full segments cover [0, nK), the tail [nK, T); reverse visits the tail first
    parts = [p for p, size in ((full_segments, n), (tail, rest)) if size]
    return run_in_time_order(parts, carry0, reverse)


def run_in_time_order(
    parts: list[Callable[[PyTree], tuple[PyTree, PyTree]]], carry0: PyTree, reverse: bool
) -> tuple[PyTree, PyTree]:
    """Chains ``parts`` (each ``carry -> (carry, ys [B, T_i, ...])``, listed in time order) from ``carry0``,
    last part first when ``reverse``; returns the final carry and the outputs concatenated in time order."""
    outs = []
    carry = carry0
    for part in reversed(parts) if reverse else parts:
        carry, ys = part(carry)
        outs.append(ys)
    if reverse:
        outs.reverse()
    ys = outs[0] if len(outs) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *outs)
    return carry, ys


def nested_checkpointed_unroll(
    impl: Callable[..., tuple[PyTree, PyTree]], ks: tuple[int, ...], *args: Any
) -> tuple[PyTree, PyTree]:
    """`checkpointed_unroll` nested: segments of ``ks[0]`` steps, recomputed in segments of ``ks[1]``, ..."""
    for K in reversed(ks[1:]):
        impl = partial(checkpointed_unroll, impl, K)
    return checkpointed_unroll(impl, ks[0], *args)


def rows_per_device(
    schedule: Callable[..., tuple[PyTree, PyTree]],
    cell: Cell,
    reverse: bool,
    unroll: int | bool,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    noise: Noise | None = None,
) -> tuple[PyTree, PyTree]:
    """``schedule`` (a memory-saving unroll: `checkpointed_unroll` and the like, after their leading
    arguments) run so that, with the batch split over devices, the parameters' gradient is summed over the
    devices once, after the loop over the segments, not in every segment's backward.

    Each segment's backward sums its parameter gradient over its rows. Here each device's gradient stays its
    own across the segments: on an explicit mesh each device runs the schedule on its own rows under
    `jax.shard_map`; on a mesh of `~jax.sharding.AxisType.Auto` axes the rows are cut into one group per
    device (`rnnjax.sharding.split_rows`), run side by side under `jax.vmap` with the parameters broadcast
    to every group. Inside `jax.shard_map` (and under the explicit mesh's) the parameters are cast to vary
    like the rows (`rnnjax.sharding.vary_like`), and the transpose of the cast, or of the broadcast, is the
    one sum. Rows are independent in every cell's step, and the regularisers' ``noise`` is drawn per row
    (its inference form, one value per step, goes to every device whole), so the result is the same.
    """
    run = partial(schedule, cell, reverse, unroll)

    def per_rows(
        params: PyTree, xs: Array, carry0: PyTree, mask: Array | None, noise: Noise | None
    ) -> tuple[PyTree, PyTree]:
        return run(vary_like(params, xs, carry0, mask), xs, carry0, mask, noise)

    split = batch_split(xs)
    if split is not None and not any(explicit_spec(leaf) is not None for leaf in jax.tree.leaves(params)):
        mesh, rows = split
        (axes,) = rows
        time_rows = jax.P(None, axes)
        noise_specs = None if noise is None else _noise_map(lambda _, spec: spec, noise, rows, time_rows)
        specs = (jax.P(), rows, rows, None if mask is None else time_rows, noise_specs)
        per_device = jax.shard_map(
            per_rows, mesh=mesh, in_specs=specs, out_specs=(rows, rows), axis_names=set(jax.tree.leaves(axes))
        )
        args = (params, xs, carry0, mask)
        # each argument placed as its spec says, as shard_map requires (a replicated initial carry is split)
        placed: list[Any] = [
            a if s is None else reshard_to(a, s, mesh) for a, s in zip(args, specs, strict=False)
        ]
        placed.append(None if noise is None else _noise_map(reshard_to, noise, rows, time_rows, mesh))
        final, ys = per_device(*placed)
        return reshard_like(final, carry0), ys
    groups = row_groups(xs)
    if groups == 1:  # no mesh of Auto axes, or rows that do not divide over its devices
        return per_rows(params, xs, carry0, mask, noise)
    every = jax.tree.map(lambda a: jnp.broadcast_to(a, (groups, *a.shape)), params)
    m_groups = None if mask is None else split_rows(mask, groups, axis=1)
    final, ys = jax.vmap(run)(
        every, split_rows(xs, groups), split_rows(carry0, groups), m_groups, _noise_groups(noise, groups)
    )
    return merge_rows(final), merge_rows(ys)


def _noise_map(f: Callable[..., Any], noise: Noise, rows: Any, time_rows: Any, *extra: Any) -> Noise:
    """``f(leaf, spec, *extra)`` for each leaf of ``noise`` and its partition spec with the batch split as
    ``rows``: the state mask ``[B, H]`` by rows, the zoneout masks ``[T, B, H]`` by their second axis
    (``time_rows``), their inference form ``[T, 1, 1]`` whole."""
    return Noise(
        state=None if noise.state is None else f(noise.state, rows, *extra),
        zone=jax.tree.map(lambda z: f(z, time_rows if z.shape[1] > 1 else jax.P(), *extra), noise.zone),
    )


def _noise_groups(noise: Noise | None, groups: int) -> Noise | None:
    """``noise`` cut into ``groups`` groups of rows as `rnnjax.sharding.split_rows` cuts the batch (the
    zoneout masks' inference form ``[T, 1, 1]`` repeated for every group)."""
    if noise is None:
        return None

    def zone(z: Array) -> Array:
        if z.shape[1] > 1:
            return split_rows(z, groups, axis=1)
        return jnp.broadcast_to(z, (groups, *z.shape))

    return Noise(
        state=None if noise.state is None else split_rows(noise.state, groups),
        zone=jax.tree.map(zone, noise.zone),
    )
