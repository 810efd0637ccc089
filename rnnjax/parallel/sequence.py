r"""A linear recurrence with its time axis split over devices (sequence parallelism), hand-derived backward.

When ``xs [B, T, I]`` is split by its time axis over an explicit mesh axis of D devices (e.g.
``jax.device_put(xs, NamedSharding(mesh, P(None, "time")))``), device d holds steps
``d·T/D … (d+1)·T/D − 1`` and, under `jax.shard_map`, computes its own ``(a_t, b_t)``. A cell linear in its
state (`rj.LinearRecurrence`) then needs one small exchange to solve the whole sequence::

    1. each device begins its part's solve from an entering state not known yet (`begin_linear`): the
       associative scan of its pairs from zero, or its chunks' summaries, and from these its part's summary,
       the one step the part composes to: (A_d, E_d) = (Π_t a_t, h at its last step from h = 0)
    2. one all-gather of the D summaries [D, 2, B, H]; every device folds them in order from the given
       carry: h_in(0) = h0, h_in(d+1) = A_d ⊙ h_in(d) + E_d; the last fold is the final carry
    3. each device finishes its part from its own h_in(d) (`finish_linear`): h_t = h⁰_t + (Π_{s<=t} a_s) ⊙
       h_in, or its chunks' entering states and one pass over their steps

so a part is swept as often as the whole sequence is on one device (twice with chunks), in 1/D of the time.

Backward, given the cotangents ``g_t`` of every state and ``g_final`` of the final carry, the adjoint
``λ_t = g_t + conj(a_{t+1}) ⊙ λ_{t+1}`` runs the same way from the last device to the first. Within a part it
is a linear recurrence run right to left whose entering state, ``ν_d`` (what the later parts contribute to
``λ`` at the part's last step), is not known yet; what the part passes to the one before it is
``conj(a_first) ⊙ λ_first``, affine in ``ν_d``::

    1. each device begins the adjoint recurrence of its part (decays conj(a_{t+1}), and 1 for ν_d) and
       summarises it, (Ā, Λ); what it passes on is conj(a_first) ⊙ (Ā ⊙ ν_d + Λ)
    2. one all-gather of those summaries; every device folds them from the last device, ν_(D−1) = g_final,
       ν_(d−1) = conj(a_first(d)) ⊙ (Ā_d ⊙ ν_d + Λ_d); the last fold, ν_(−1) = conj(a_0) ⊙ λ_0, is the
       carry's gradient
    3. each device finishes its adjoint from ν_d, then d a_t = λ_t ⊙ conj(h_{t-1}), d b_t = λ_t
       (`rnnjax.parallel.associative.adjoint_products`)

The gradients of ``params`` and ``xs`` come from the per-step map ``(params, x_t) -> (a_t, b_t)`` by JAX;
the parameters enter every device cast to vary (`rnnjax.sharding.vary_like`), so that their gradient is
summed over the devices once, by the transpose of that cast (an all-reduce of the parameters' size, as any
split of the data needs). ``reverse`` processes the devices from the last to the first. ``lengths`` become
each device's own count of valid steps, ``clip(lengths − d·T/D, 0, T/D)``, and padded steps the identity
step, as in the associative scan.

The summaries are gathered whole rather than scanned by ``ppermute`` steps: D·2·B·H numbers, and the fold
over D of them is D multiply-adds, which every device does redundantly instead of log D rounds of messages.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cells.base import Cell
from rnnjax.cells.linear import Parts, add, conj, join, mul, split
from rnnjax.parallel.associative import (
    AssociativeUnroll,
    adjoint_products,
    begin_linear,
    finish_linear,
    identity,
)
from rnnjax.sharding import _named, explicit_spec, reshard_to, vary_like

Array = jax.Array
PyTree = Any
AnyMesh = jax.sharding.Mesh | jax.sharding.AbstractMesh  # a traced array's type names the abstract one


def check_time_split(
    cell: Cell, method: str, params: PyTree, xs: Array, n_batch: int
) -> tuple[AnyMesh, tuple[str, ...]] | None:
    """The mesh and the axes that split the time axis of ``xs [*batch, T, I]`` explicitly, or None when it
    is whole; a ValueError for a time split that cannot run: DEER, a cell not linear in its state, an
    explicit ``method="sequential"``, or parameters split over the mesh. (JAX places an array only where the
    devices divide its axes, so each device holds T/D steps.)"""
    spec = explicit_spec(xs)
    if spec is None or spec[n_batch] is None:
        return None
    named = _named(xs)
    assert named is not None  # an explicit spec comes from a named sharding
    split = f"xs [B, T, I] is split by its time axis over an explicit mesh, as {jax.P(*spec)}"
    whole = jax.P(*spec[:n_batch], None, spec[n_batch + 1])
    if method in ("deer", "quasi_deer"):
        raise ValueError(
            f"{split}; method={method!r} solves each sequence's whole trajectory on one device, so T must "
            f"stay whole: split the batch instead, e.g. {whole}"
        )
    if cell.linear is None:
        raise ValueError(
            f"{split}; cell {cell.name!r} is not linear in its state, so its time loop reads one step after "
            f"another and T must stay whole: split the batch instead, e.g. {whole}"
        )
    if method == "sequential":
        raise ValueError(
            f"{split}; method='sequential' reads one step at a time, so T must stay whole: pass "
            f"method='associative' (cell {cell.name!r} is linear in its state) to solve the time axis split "
            f"over the devices, or split the batch instead, e.g. {whole}"
        )
    time = spec[n_batch]
    axes = (time,) if isinstance(time, str) else tuple(time)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if hasattr(leaf, "shape") and (leaf_spec := explicit_spec(leaf)) is not None:
            raise ValueError(
                f"{split}: the parameters must be replicated, got params{jax.tree_util.keystr(path)} split "
                f"as {jax.P(*leaf_spec)}"
            )
    return named.mesh, axes


@dataclasses.dataclass(frozen=True)
class SplitUnroll(AssociativeUnroll):
    """`AssociativeUnroll` run on one device's part of a time axis split over the mesh ``axes`` (called
    inside `jax.shard_map` by `over_time`): the solve exchanges the parts' summaries (module docstring).

    Attributes:
      axes: the mesh axes that split the time axis, in the order of the split.
    """

    axes: tuple[str, ...] = ()

    def solve(
        self, a: Array, b: Array, h0: Array, complex_: bool, unroll: int | bool, reverse: bool
    ) -> tuple[Array, Array]:
        """This device's states ``[T/D, B, H]`` and the final carry of the whole sequence ``[B, H]``."""
        solve = split_recurrence if self.grad == "manual" else _split_forward
        return solve(a, b, h0, complex_, self.chunk_size, unroll, self.axes, reverse)  # pyright: ignore[reportReturnType]


def over_time(
    run: Callable[[PyTree, Array, PyTree, Array | None], tuple[PyTree, Array]],
    mesh: AnyMesh,
    axes: tuple[str, ...],
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    lengths: Array | None,
) -> tuple[PyTree, Array]:
    """``run(params, xs, carry0, lengths) -> (final carry, ys)`` on each device's part of the time axis of
    ``xs [*batch, T, I]`` (split over ``axes`` of ``mesh``) under `jax.shard_map`, with the lengths counted
    within the part; the batch axes stay split as they are, the features whole."""
    n_batch = xs.ndim - 2
    spec = explicit_spec(xs)
    assert spec is not None
    rows = jax.P(*spec[:n_batch])
    steps = jax.P(*spec[:n_batch], spec[n_batch])

    def per_device(params: PyTree, xs: Array, carry0: PyTree, lengths: Array | None) -> tuple[PyTree, Array]:
        if lengths is not None:  # this part's valid steps: those before lengths - its first step
            T_d = xs.shape[n_batch]
            first = (jax.lax.axis_index(axes) * T_d).astype(lengths.dtype)
            lengths = jnp.clip(lengths - first, 0, T_d)
        return run(vary_like(params, xs), xs, carry0, lengths)

    in_specs = (jax.P(), steps, rows, None if lengths is None else rows)
    manual = {a for s in spec[: n_batch + 1] if s is not None for a in ((s,) if isinstance(s, str) else s)}
    per_devices = jax.shard_map(
        per_device, mesh=mesh, in_specs=in_specs, out_specs=(rows, steps), axis_names=manual
    )
    # each argument placed as its spec says, as shard_map requires (the features of xs whole)
    placed = (params, reshard_to(xs, (*steps, None), mesh), reshard_to(carry0, rows, mesh))
    return per_devices(*placed, None if lengths is None else reshard_to(lengths, rows, mesh))


def _entering(
    summary: tuple[Parts, Parts], start: Array, complex_: bool, axes: tuple[str, ...], backwards: bool
) -> tuple[Array, Array]:
    """What enters this device's part and what leaves the last part, ``[B, H]`` each: the exclusive fold of
    every device's ``summary`` (its step ``h -> A ⊙ h + E``) from ``start``, over the devices in order (or
    from the last, ``backwards``). One all-gather of the summaries, then D multiply-adds on every device."""
    A, E = summary
    every = jax.lax.all_gather(jnp.stack([join(A), join(E)]), axes, to="invarying")  # [D, 2, B, H]
    D = every.shape[0]
    h, entering = split(start, complex_), [start] * D
    for d in reversed(range(D)) if backwards else range(D):
        entering[d] = join(h)
        h = add(mul(split(every[d, 0], complex_), h), split(every[d, 1], complex_))
    mine = jax.lax.dynamic_index_in_dim(jnp.stack(entering), jax.lax.axis_index(axes), keepdims=False)
    return mine, join(h)


def _split_solve(
    a: Array,
    b: Array,
    h0: Array,
    complex_: bool,
    chunk_size: int | None,
    unroll: int | bool,
    axes: tuple[str, ...],
    backwards: bool,
) -> tuple[Array, Array, Array]:
    """This device's states ``[T/D, B, H]`` of ``h_t = a_t ⊙ h_{t-1} + b_t`` with the sequence's first
    state from ``h0 [B, H]``, the sequence's final state ``[B, H]``, and the state entering this device's
    part ``[B, H]``."""
    work, summary = begin_linear(split(a, complex_), split(b, complex_), chunk_size, unroll)
    h_in, final = _entering(summary, h0, complex_, axes, backwards)
    return join(finish_linear(work, split(h_in, complex_), a.shape[0], unroll)), final, h_in


def _split_forward(
    a: Array,
    b: Array,
    h0: Array,
    complex_: bool,
    chunk_size: int | None,
    unroll: int | bool,
    axes: tuple[str, ...],
    backwards: bool,
) -> tuple[Array, Array]:
    """`_split_solve`'s states and final state, which JAX differentiates (``grad="autodiff"``)."""
    return _split_solve(a, b, h0, complex_, chunk_size, unroll, axes, backwards)[:2]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def split_recurrence(
    a: Array,
    b: Array,
    h0: Array,
    complex_: bool,
    chunk_size: int | None,
    unroll: int | bool,
    axes: tuple[str, ...],
    backwards: bool,
) -> tuple[Array, Array]:
    """`_split_forward` with the hand-derived backward of the module docstring."""
    return _split_forward(a, b, h0, complex_, chunk_size, unroll, axes, backwards)


def _split_recurrence_fwd(
    a: Array,
    b: Array,
    h0: Array,
    complex_: bool,
    chunk_size: int | None,
    unroll: int | bool,
    axes: tuple[str, ...],
    backwards: bool,
) -> tuple[tuple[Array, Array], tuple[Array, Array, Array]]:
    hs, final, h_in = _split_solve(a, b, h0, complex_, chunk_size, unroll, axes, backwards)
    return (hs, final), (a, h_in, hs)


def _split_recurrence_bwd(
    complex_: bool,
    chunk_size: int | None,
    unroll: int | bool,
    axes: tuple[str, ...],
    backwards: bool,
    res: tuple[Array, Array, Array],
    cts: tuple[Array, Array],
) -> tuple[Array, Array, Array]:
    a, h_in, hs = res
    g, g_final = cts
    # λ_t = g_t + conj(a_{t+1}) λ_{t+1} right to left over this part, from λ_last = g_last + ν (what the
    # later parts send, not known yet): decays conj(a_{t+1}), and 1 for the one ν enters by
    ap = split(a, complex_)
    a_next = conj(tuple(jnp.concatenate([x[1:], one[:1]]) for x, one in zip(ap, identity(ap), strict=True)))
    flip = lambda x: tuple(jnp.flip(v, 0) for v in x)  # noqa: E731
    work, (A, E) = begin_linear(flip(a_next), flip(split(g, complex_)), chunk_size, unroll)
    # what this part sends to the one before it is conj(a_0) λ_0 = conj(a_0) (E + A ν)
    a0 = conj(tuple(x[0] for x in ap))
    nu, dh0 = _entering((mul(a0, A), mul(a0, E)), g_final, complex_, axes, not backwards)
    lam = flip(finish_linear(work, split(nu, complex_), a.shape[0], unroll))
    da, db, _ = adjoint_products(lam, a, h_in, hs, complex_)
    return da, db, dh0


split_recurrence.defvjp(_split_recurrence_fwd, _split_recurrence_bwd)
