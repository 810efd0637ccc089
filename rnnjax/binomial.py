r"""Memory-budgeted BPTT with the time-optimal binomial schedule (Griewank's Revolve).

The time axis is cut into ``n = ⌊T/K⌋`` leaves of K steps (plus a shorter tail, rematerialised on its own).
With ``c`` snapshots of the carry, one of them the initial carry, the backward must reverse the n leaves in
the order ``n-1, ..., 0``, and may only re-run the forward from a snapshot. The fewest leaf advances this
takes (A. Griewank, "Achieving logarithmic growth of temporal and spatial complexity in reverse automatic
differentiation", Optim. Methods Softw. 1 (1992); A. Griewank and A. Walther, "Algorithm 799: revolve",
ACM TOMS 26 (2000)) is::

    t(n, c) = r n − β(c + 1, r − 1),    β(c, r) = (c + r)! / (c! r!),    r: β(c, r − 1) < n <= β(c, r)

reached by the recursion ``t(n, c) = min_m  m + t(n − m, c − 1) + t(m, c)``: advance m leaves, take a
snapshot, reverse the last ``n − m`` leaves with one snapshot fewer, then restore the first snapshot and
reverse the first m with all c (`reversal_steps`, `_split`). The forward pass already advances through
every leaf, so it takes the snapshots of the first descent for free; the backward repeats
``t(n, c) − (n − 1)`` leaf advances, and every leaf's own forward once more, to keep its residuals.

How it runs: `binomial_plan` simulates that recursion once, in Python, and writes it down as five integer
tables of length n (where the forward pass stores its snapshots; where each backward *turn* restores from;
which snapshots a turn takes on its way). `binomial_unroll` is a `jax.custom_vjp` whose forward is one
`jax.lax.scan` over the leaves and whose backward is one `jax.lax.scan` over the n turns: restore a
snapshot, advance in a `jax.lax.while_loop` to the leaf being reversed (storing the snapshots the table
says), then pull the cotangents back through that one leaf with ``impl`` (the hand-derived BPTT, so its
hoisted GEMMs run once per leaf). The program has the same size for any T; the snapshots live in one
``[c + 2, B, ...]`` buffer (plus the carry the forward pass ends its descent with, and a slot that takes
the writes a turn does not keep).

``budget=`` in `rnnjax.unroll` picks K and c (`binomial_schedule`) to keep the modelled peak (`peak_bytes`)
within the budget with the fewest recomputed steps; the recursive schedule of Chen et al. stays available
as ``schedule="nested"`` (`rnnjax.remat`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from rnnjax.cells.base import Cell
from rnnjax.regularize import Noise, noise_steps
from rnnjax.remat import StepSizes, _grid, run_in_time_order
from rnnjax.sharding import zeros_rows

Array = jax.Array
PyTree = Any

TURN_STEPS = 2  # the modelled cost of one backward turn (restore, slicing, accumulating d params), in steps


def _beta(c: int, r: int) -> int:
    return math.comb(c + r, c) if r >= 0 else 0


def _repetitions(n: int, c: int) -> int:
    """The least r with ``β(c, r) >= n``: how often the costliest leaf is advanced over."""
    r = 0
    while _beta(c, r) < n:
        r += 1
    return r


def reversal_steps(n: int, c: int) -> int:
    """``t(n, c)``: the fewest leaf advances that reverse n leaves from c snapshots (the first one included).

    Counts the advances of the first descent too, which the forward pass makes anyway: the backward
    recomputes ``t(n, c) − (n − 1)`` of them. ``c >= 1``; with ``c >= n`` nothing is recomputed.
    """
    if n <= 1:
        return 0
    r = _repetitions(n, c)
    return r * n - _beta(c + 1, r - 1)


def _split(n: int, free: int) -> int:
    """An m that reaches ``t(n, free + 1)``: advance m leaves before the next snapshot (``n >= 2``)."""
    if free == 0:
        return n - 1  # no snapshot left: reverse the last leaf from the start, then the rest
    c = free + 1
    r = _repetitions(n, c)
    return max(1, n - _beta(c - 1, r), _beta(c, r - 2))


@dataclasses.dataclass(frozen=True)
class BinomialPlan:
    """A binomial schedule for ``n`` leaves of ``K`` steps with ``snapshots`` carries kept (see module doc).

    Processing positions run ``0 .. n`` in the direction of the unroll (for ``reverse=True`` position j is
    the time leaf ``n − 1 − j``); the state at position j is the carry entering leaf j. Slots ``0 ..
    snapshots − 1`` hold snapshots, slot ``snapshots`` (`cur`) the carry the forward descent ends with, and
    slot ``snapshots + 1`` (`trash`) takes every write a step does not keep.

    Fields (tuples of n ints): ``fwd_slot[j]``, where the forward pass stores position j; for turn i, which
    reverses position ``n − 1 − i``: ``load_slot[i]`` and ``load_pos[i]``, the snapshot it restores;
    ``store_turn[j]`` and ``store_slot[j]``, the turn that stores position j on its way, and where.
    ``advances``: the leaf advances the backward makes, ``reversal_steps(n, snapshots) − (n − 1)``.
    """

    K: int
    n: int
    snapshots: int
    # the tables: n entries each, left out of the repr
    fwd_slot: tuple[int, ...] = dataclasses.field(repr=False)
    load_slot: tuple[int, ...] = dataclasses.field(repr=False)
    load_pos: tuple[int, ...] = dataclasses.field(repr=False)
    store_turn: tuple[int, ...] = dataclasses.field(repr=False)
    store_slot: tuple[int, ...] = dataclasses.field(repr=False)
    advances: int = 0

    @property
    def cur(self) -> int:
        return self.snapshots

    @property
    def trash(self) -> int:
        return self.snapshots + 1


@functools.lru_cache(maxsize=64)
def binomial_plan(T: int, K: int, snapshots: int) -> BinomialPlan:
    """Simulates the recursion for ``⌊T/K⌋`` leaves and ``snapshots`` carries (>= 1) into a `BinomialPlan`."""
    n = T // K
    if n < 1 or snapshots < 1:
        raise ValueError(f"a binomial plan needs K <= T and snapshots >= 1, got T={T}, K={K}, {snapshots=}")
    c = min(snapshots, n)  # more than one per leaf is never used
    cur, trash = c, c + 1
    fwd_slot, store_slot = [trash] * n, [trash] * n
    store_turn, load_slot, load_pos = [-1] * n, [cur] * n, [n - 1] * n
    free_slots = list(range(c - 1, -1, -1))
    turns = 0  # leaves reversed so far: 0 while the forward pass descends
    advances = 0

    def store(pos: int, slot: int) -> None:
        if turns == 0:
            fwd_slot[pos] = slot
        else:
            store_turn[pos], store_slot[pos] = turns, slot

    def reverse(pos: int) -> None:
        nonlocal turns
        assert pos == n - 1 - turns, (pos, turns)
        turns += 1

    def load(slot: int, pos: int) -> None:
        if turns < n:
            load_slot[turns], load_pos[turns] = slot, pos

    start = free_slots.pop()
    store(0, start)
    fwd_slot[n - 1] = cur if n > 1 else start
    if n == 1:
        load_slot[0] = start
    stack: list[tuple[int, ...]] = []
    a, length, free, a_slot = 0, n, c - 1, start  # reverse [a, a + length) from the snapshot of a
    while True:
        while length >= 2:
            m = _split(length, free)
            if turns:
                advances += m
            if length - m >= 2:  # the right part gets a snapshot of its own, and one fewer to use
                slot = free_slots.pop()
                store(a + m, slot)
                stack.append((a, m, free, a_slot))
                stack.append((slot,))  # freed once the right part is reversed
                a, length, free, a_slot = a + m, length - m, free - 1, slot
            else:  # one leaf: reverse it at once, then restore a for the left part
                reverse(a + m)
                load(a_slot, a)
                length = m
        reverse(a)
        while stack and len(stack[-1]) == 1:
            free_slots.append(stack.pop()[0])
        if not stack:
            break
        a, length, free, a_slot = stack.pop()
        load(a_slot, a)
    assert turns == n and advances == reversal_steps(n, c) - (n - 1), (turns, advances)
    return BinomialPlan(
        K,
        n,
        c,
        tuple(fwd_slot),
        tuple(load_slot),
        tuple(load_pos),
        tuple(store_turn),
        tuple(store_slot),
        advances,
    )


def peak_bytes(K: int, snapshots: int, sizes: StepSizes) -> int:
    """The modelled peak of a binomial schedule: the slots and a few working carries, one leaf's residuals
    and output cotangents, and the parameter-gradient accumulator."""
    return (snapshots + 4) * sizes.carry + K * (sizes.residual + sizes.output) + sizes.level


def binomial_schedule(T: int, budget: int, sizes: StepSizes) -> tuple[int, int] | None:
    """``(K, snapshots)`` whose `peak_bytes` fit ``budget`` with the fewest recomputed steps (modelled as the
    leaf advances times K, plus `TURN_STEPS` per leaf); None when plain BPTT's ``T`` residuals fit.

    Raises:
      ValueError: if ``budget`` is below the leanest binomial schedule's peak.
    """
    if T * sizes.residual <= budget:
        return None
    best: tuple[int, int, int] | None = None
    leanest = None
    for K in _grid(T):
        n = T // K
        low = peak_bytes(K, 1, sizes)
        leanest = low if leanest is None else min(leanest, low)
        c = min(n, (budget - low) // sizes.carry + 1)
        if c < 1:
            continue
        cost = (reversal_steps(n, c) - (n - 1)) * K + TURN_STEPS * n
        if best is None or cost < best[0] or (cost == best[0] and K > best[1]):
            best = (cost, K, c)
    if best is None:
        raise ValueError(
            f"budget={budget} bytes is too small for T={T} steps ({sizes}): the leanest binomial schedule "
            f"keeps {leanest} bytes; pass budget >= {leanest}"
        )
    return best[1], best[2]


# ---------------------------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------------------------


def binomial_unroll(
    impl: Callable[..., tuple[PyTree, PyTree]],
    plan: BinomialPlan,
    cell: Cell,
    reverse: bool,
    unroll: int | bool,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    noise: Noise | None = None,
) -> tuple[PyTree, PyTree]:
    """``impl`` (same signature and result) over ``plan.n`` leaves of ``plan.K`` steps on the binomial
    schedule; the ``T mod K`` steps left over run as one rematerialised segment, last in time order."""
    T = xs.shape[1]
    split = plan.n * plan.K

    def leaves(carry: PyTree) -> tuple[PyTree, PyTree]:
        return _leaves(impl, plan, cell, reverse, unroll, params, xs, carry, mask, noise)

    def tail(carry: PyTree) -> tuple[PyTree, PyTree]:
        run = partial(impl, cell, reverse, unroll)
        m, nz = None if mask is None else mask[split:], noise_steps(noise, split, T - split)
        return jax.checkpoint(run)(params, xs[:, split:], carry, m, nz)

    parts = [leaves] + ([tail] if split < T else [])
    return run_in_time_order(parts, carry0, reverse)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _leaves(
    impl: Callable[..., tuple[PyTree, PyTree]],
    plan: BinomialPlan,
    cell: Cell,
    reverse: bool,
    unroll: int | bool,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    noise: Noise | None = None,
) -> tuple[PyTree, PyTree]:
    """The first ``n K`` steps of ``xs [B, T, I]`` (``mask [T, B]`` or None), in leaves of K steps."""
    final, ys, _ = _forward(impl, plan, cell, reverse, unroll, params, xs, carry0, mask, noise)
    return final, ys


def _leaf(
    impl: Callable,
    plan: BinomialPlan,
    cell: Cell,
    reverse: bool,
    unroll: int | bool,
    xs: Array,
    mask: Array | None,
    noise: Noise | None,
    leaf: Array,
    params: PyTree,
    carry: PyTree,
    x: Array | None = None,
):
    """Time leaf ``leaf`` (traced int) from ``carry``; ``x`` replaces its slice of ``xs`` when given."""
    if x is None:
        x = jax.lax.dynamic_slice_in_dim(xs, leaf * plan.K, plan.K, axis=1)
    m = None if mask is None else jax.lax.dynamic_slice_in_dim(mask, leaf * plan.K, plan.K, axis=0)
    return impl(cell, reverse, unroll, params, x, carry, m, noise_steps(noise, leaf * plan.K, plan.K))


def _time_leaf(plan: BinomialPlan, reverse: bool, pos: Array) -> Array:
    return plan.n - 1 - pos if reverse else pos


def _put(slots: PyTree, slot: Array, carry: PyTree) -> PyTree:
    return jax.tree.map(lambda s, c: jax.lax.dynamic_update_index_in_dim(s, c, slot, 0), slots, carry)


def _get(slots: PyTree, slot: Array) -> PyTree:
    return jax.tree.map(lambda s: jax.lax.dynamic_index_in_dim(s, slot, 0, keepdims=False), slots)


def _forward(impl, plan, cell, reverse, unroll, params, xs, carry0, mask, noise=None):
    """One scan over the leaves in time order (backwards for ``reverse``), storing the snapshots."""
    B = xs.shape[0]
    fwd_slot = jnp.asarray(plan.fwd_slot, jnp.int32)
    slots = jax.tree.map(lambda c: zeros_rows(c, (plan.snapshots + 2,)), carry0)

    def body(state: tuple[PyTree, PyTree], leaf: Array) -> tuple[tuple[PyTree, PyTree], PyTree]:
        carry, slots = state
        slots = _put(slots, fwd_slot[_time_leaf(plan, reverse, leaf)], carry)
        carry, ys = _leaf(impl, plan, cell, reverse, unroll, xs, mask, noise, leaf, params, carry)
        return (carry, slots), ys

    (final, slots), ys = jax.lax.scan(
        body, (carry0, slots), jnp.arange(plan.n, dtype=jnp.int32), reverse=reverse
    )
    # leaves [n, B, K, ...] -> [B, n K, ...]
    ys = jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(B, plan.n * plan.K, *y.shape[3:]), ys)
    return final, ys, slots


def _leaves_fwd(impl, plan, cell, reverse, unroll, params, xs, carry0, mask, noise=None):
    value = lambda tree: jax.tree.map(lambda p: p.value, tree)  # noqa: E731
    wants_dxs = ((),) if xs.perturbed else ()  # static, as pytree structure
    params, xs, carry0, noise = value(params), xs.value, value(carry0), value(noise)
    mask = None if mask is None else mask.value
    final, ys, slots = _forward(impl, plan, cell, reverse, unroll, params, xs, carry0, mask, noise)
    return (final, ys), (params, xs, mask, noise, slots, wants_dxs)


def _leaves_bwd(impl, plan, cell, reverse, unroll, saved, cotangents):
    params, xs, mask, noise, slots, wants_dxs = saved
    d_final, d_ys = cotangents
    K = plan.K
    leaf = partial(_leaf, impl, plan, cell, reverse, unroll, xs, mask, noise)
    tables = {
        name: jnp.asarray(getattr(plan, name), jnp.int32)
        for name in ("load_slot", "load_pos", "store_turn", "store_slot")
    }
    d_final = jax.tree.map(
        lambda d, s: zeros_rows(s[0]) if isinstance(d, SymbolicZero) else d, d_final, slots
    )

    def d_ys_of(time_leaf: Array) -> PyTree:
        def one(d: Any) -> Array:
            if isinstance(d, SymbolicZero):
                # (JAX types SymbolicZero.aval as AbstractValue; a cotangent's is a ShapedArray)
                shape = d.aval.shape  # pyright: ignore[reportAttributeAccessIssue]
                return zeros_rows(d.aval.update(shape=(shape[0], K, *shape[2:])))
            return jax.lax.dynamic_slice_in_dim(d, time_leaf * K, K, axis=1)

        return jax.tree.map(one, d_ys, is_leaf=lambda d: isinstance(d, SymbolicZero))

    def turn(state: tuple, i: Array) -> tuple[tuple, None]:
        d_carry, d_params, slots, d_xs = state
        target = plan.n - 1 - i

        def advancing(s: tuple) -> Array:
            return s[0] < target

        def advance(s: tuple) -> tuple:
            pos, carry, slots = s
            carry, _ = leaf(_time_leaf(plan, reverse, pos), params, carry)
            pos = pos + 1
            keep = tables["store_turn"][pos] == i
            slots = _put(slots, jnp.where(keep, tables["store_slot"][pos], plan.trash), carry)
            return pos, carry, slots

        start = (tables["load_pos"][i], _get(slots, tables["load_slot"][i]), slots)
        _, carry, slots = jax.lax.while_loop(advancing, advance, start)
        # pull the cotangents back through the leaf being reversed, by impl's own VJP
        t_leaf = _time_leaf(plan, reverse, target)
        x = jax.lax.dynamic_slice_in_dim(xs, t_leaf * K, K, axis=1)
        _, leaf_vjp = jax.vjp(lambda p, c, x_: leaf(t_leaf, p, c, x_), params, carry, x)
        d_p, d_carry, d_x = leaf_vjp((d_carry, d_ys_of(t_leaf)))
        d_params = jax.tree.map(jnp.add, d_params, d_p)
        if wants_dxs:
            d_xs = jax.lax.dynamic_update_slice_in_dim(d_xs, d_x, t_leaf * K, axis=1)
        return (d_carry, d_params, slots, d_xs), None

    d_xs = jnp.zeros_like(xs) if wants_dxs else None
    zeros = jax.tree.map(jnp.zeros_like, params)
    (d_carry0, d_params, _, d_xs), _ = jax.lax.scan(
        turn, (d_final, zeros, slots, d_xs), jnp.arange(plan.n, dtype=jnp.int32)
    )
    return d_params, d_xs, d_carry0, None, None


_leaves.defvjp(_leaves_fwd, _leaves_bwd, symbolic_zeros=True)
