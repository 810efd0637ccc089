r"""``method="associative"``: a linear recurrence solved by a parallel prefix scan, hand-derived backward.

For a cell with a `rj.LinearRecurrence`, every step is ``h_t = a_t ⊙ h_{t-1} + b_t`` with ``(a_t, b_t)``
computed from ``x_t`` alone. Two steps compose into one,
``(a_1, b_1) ∘ (a_2, b_2) = (a_2 a_1, a_2 b_1 + b_2)``, an associative operation, so all prefixes come
out of `jax.lax.associative_scan` in O(log T) parallel depth (Blelloch, 1990; used for linear RNNs by
Martin and Cundy, ICLR 2018). The initial state enters as ``b_0 ← b_0 + a_0 ⊙ h_init``.

Backward, given the cotangents ``g_t`` of every state (T-1 the last step)::

    λ_{T-1} = g_{T-1} ;  λ_t = g_t + conj(a_{t+1}) ⊙ λ_{t+1}     the adjoint: the same recurrence, reversed
    d a_t = λ_t ⊙ conj(h_{t-1}) ,  d b_t = λ_t ,  d h_init = conj(a_0) ⊙ λ_0     (h_{-1} = h_init)

one reverse associative scan and elementwise products (``conj`` is the identity for real units, the
transpose of each 2×2 block for complex ones). The gradients of ``params`` and ``xs`` then come from the
per-step map ``(params, x_t) -> (a_t, b_t)`` by `jax.vjp`: it has no recursion in time.

Padded steps (``t >= lengths[b]``) become identity steps ``a = 1, b = 0`` by a select (no arithmetic reads
their values), so the state after the last valid step carries through to the end of the scan, and their
outputs are selected to zero. ``reverse`` flips the time axis around the same scan.

With ``chunk_size=C`` the time axis is cut into chunks of C steps: a sequential `jax.lax.scan` over the C
steps of all chunks at once forms each chunk's summary ``(Π a, h from zero)``, one associative scan over the
T/C summaries gives each chunk its entering state, and a second sequential pass over the C steps writes
every state. Work O(T) as in the sequential scan (the plain associative scan does O(T log T)), with T/C
chunks in parallel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cells.base import Cell
from rnnjax.cells.linear import LinearRecurrence, Parts, add, conj, join, mul, split
from rnnjax.sharding import explicit_spec, reshard_to

Array = jax.Array
PyTree = Any


def check_chunk_size(chunk_size: Any) -> int | None:
    """``chunk_size`` if it is None or an int >= 1, else a clear error."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    return chunk_size


@dataclasses.dataclass(frozen=True)
class AssociativeUnroll:
    """The associative scan as an implementation of `rj.unroll`'s driver (`rnnjax.driver._dispatch`):
    ``impl(cell, reverse, unroll, params, xs [B, T, I], carry, mask [T, B] or None) -> (carry, ys)``.

    Attributes:
      grad: ``"manual"``: the hand-derived backward bound by `jax.custom_vjp`; ``"autodiff"``: JAX
        differentiates the same forward scan (in either mode).
      chunk_size: None: one associative scan over all T steps; C: sequential within chunks of C steps,
        associative across them.
    """

    grad: str = "manual"
    chunk_size: int | None = None

    def __call__(
        self,
        cell: Cell,
        reverse: bool,
        unroll: int | bool | None,
        params: PyTree,
        xs: Array,
        carry: PyTree,
        mask: Array | None,
        noise: object = None,
    ) -> tuple[PyTree, Array]:
        spec = cell.linear
        assert spec is not None  # `rnnjax.parallel.resolve_method` refused a cell without one
        assert noise is None  # `rnnjax.parallel.resolve_method` refused ``regularize=``
        leaves, treedef = jax.tree.flatten(carry)
        if len(leaves) != 1:
            raise TypeError(
                f"method='associative' needs a carry with one leaf h [B, H]; cell {cell.name!r} has a carry "
                f"with {len(leaves)} leaves: {treedef}"
            )
        h0 = leaves[0]
        B, T = xs.shape[0], xs.shape[1]
        if explicit_spec(xs) is not None:
            # params not split over the mesh, replicated on the mesh of xs: JAX's transpose of the per-step
            # map then knows the parameter gradient, a contraction over the split batch, is replicated
            params = jax.tree.map(lambda p: p if explicit_spec(p) else reshard_to(p, (), xs), params)
        a, b = spec.coefficients(params, jnp.swapaxes(xs, 0, 1))  # time-major [T, B, H]
        _check_coefficients(cell, a, b, (T, B, h0.shape[-1]), h0.dtype, spec)
        if mask is not None:  # padded steps: the identity step, selected before any arithmetic reads them
            keep = mask[..., None]
            a = jnp.where(keep, a, spec.one(a))
            b = jnp.where(keep, b, jnp.zeros_like(b))
        if reverse:
            a, b = jnp.flip(a, 0), jnp.flip(b, 0)
        hs, final = self.solve(a, b, h0, spec.complex, 1 if unroll is None else unroll, reverse)
        if reverse:
            hs = jnp.flip(hs, 0)
        if mask is not None:
            hs = jnp.where(mask[..., None], hs, jnp.zeros_like(hs))
        return jax.tree.unflatten(treedef, [final]), jnp.swapaxes(hs, 0, 1)

    def solve(
        self, a: Array, b: Array, h0: Array, complex_: bool, unroll: int | bool, reverse: bool
    ) -> tuple[Array, Array]:
        """Every state ``[T, B, H]`` of ``h_t = a_t ⊙ h_{t-1} + b_t`` from ``h_{-1} = h0 [B, H]``, in the
        order of ``a`` and ``b`` (already flipped for ``reverse``), and the last one."""
        solve = linear_recurrence if self.grad == "manual" else _forward
        hs: Array = solve(a, b, h0, complex_, self.chunk_size, unroll)  # pyright: ignore[reportAssignmentType]
        return hs, hs[-1]


def _check_coefficients(
    cell: Cell, a: Any, b: Any, shape: tuple[int, ...], dtype: Any, spec: LinearRecurrence
) -> None:
    for name, v in (("a", a), ("b", b)):
        got = tuple(getattr(v, "shape", ()))
        if got != shape:
            raise ValueError(
                f"cell {cell.name!r}: linear.coefficients must return a and b of shape [T, B, H] = "
                f"{shape} for time-major xs [T, B, I] (the carry's h per step), got {name} of shape {got}"
            )
        if jnp.dtype(v.dtype) != jnp.dtype(dtype):
            raise TypeError(
                f"cell {cell.name!r}: linear.coefficients must return {name} in the dtype of the carry, "
                f"{jnp.dtype(dtype)}, got {v.dtype}"
            )
    if spec.complex and shape[-1] % 2:
        raise ValueError(
            f"cell {cell.name!r}: a complex LinearRecurrence holds [Re, Im] halves, so H must be even, got "
            f"H={shape[-1]}"
        )


def _combine(first: tuple[Parts, Parts], second: tuple[Parts, Parts]) -> tuple[Parts, Parts]:
    """``(a_1, b_1)`` followed by ``(a_2, b_2)``: the step ``h -> a_2 (a_1 h + b_1) + b_2``."""
    (a1, b1), (a2, b2) = first, second
    return mul(a2, a1), add(mul(a2, b1), b2)


def identity(like: Parts) -> Parts:
    """The identity decay (1, or 1 + 0i) shaped like the number ``like``."""
    return tuple(jnp.ones_like(x) if i == 0 else jnp.zeros_like(x) for i, x in enumerate(like))


def _to_chunks(a: Parts, b: Parts, C: int) -> tuple[Parts, Parts, int]:
    """``a``, ``b`` ``[T, ...]`` cut into ``K = ⌈T/C⌉`` chunks of ``C`` steps, laid out ``[C, K, ...]`` (step
    c of every chunk k, so that a scan over C runs the K chunks at once), the last chunk completed by
    identity steps (``a = 1, b = 0``: the states before them are unchanged); and K."""
    T = a[0].shape[0]
    K = -(-T // C)
    pad = K * C - T
    if pad:

        def extend(x: Array, value: float) -> Array:
            return jnp.concatenate([x, jnp.full((pad, *x.shape[1:]), value, x.dtype)])

        a = tuple(extend(x, 1.0 if i == 0 else 0.0) for i, x in enumerate(a))
        b = tuple(extend(x, 0.0) for x in b)
    to_chunks = lambda x: jnp.swapaxes(x.reshape(K, C, *x.shape[1:]), 0, 1)  # noqa: E731
    return tuple(map(to_chunks, a)), tuple(map(to_chunks, b)), K


def _chunk_summaries(a: Parts, b: Parts, unroll: int | bool) -> tuple[Parts, Parts]:
    """Each chunk's ``(Π a, h from zero)`` ``[K, ...]``, from chunks laid out ``[C, K, ...]``: a sequential
    scan over the C steps of all chunks at once."""

    def summarise(acc: tuple[Parts, Parts], step: tuple[Parts, Parts]) -> tuple[tuple[Parts, Parts], None]:
        return _combine(acc, step), None

    zeros = tuple(jnp.zeros_like(x[0]) for x in b)
    (A, Bk), _ = jax.lax.scan(summarise, (identity(tuple(x[0] for x in a)), zeros), (a, b), unroll=unroll)
    return A, Bk


def scan_linear(a: Parts, b: Parts, chunk_size: int | None, unroll: int | bool) -> Parts:
    """Every state of ``h_t = a_t ⊙ h_{t-1} + b_t`` from ``h_{-1} = 0``: ``a``, ``b`` numbers of
    time-major ``[T, B, N]`` arrays; the result likewise."""
    T = a[0].shape[0]
    if chunk_size is None or chunk_size >= T:
        return jax.lax.associative_scan(_combine, (a, b), axis=0)[1]
    return finish_linear(begin_linear(a, b, chunk_size, unroll)[0], None, T, unroll)


# what `begin_linear` leaves for `finish_linear`: the prefix products and the states from zero (one
# associative scan), or the chunked coefficients [C, K, ...] and the chunks' summaries [K, ...]
Work = tuple[Parts, ...]


def begin_linear(
    a: Parts, b: Parts, chunk_size: int | None, unroll: int | bool
) -> tuple[Work, tuple[Parts, Parts]]:
    """The first half of `scan_linear` where the state entering the sequence is known only later (it comes
    from other devices: `rnnjax.parallel.sequence`): the work `finish_linear` continues from, and the
    summary of the whole sequence, ``(Π_t a_t, h_{T-1} from h_{-1} = 0)`` ``[B, N]``, the one step it
    composes to.

    Without chunks, one associative scan of the pairs gives every prefix product and every state from
    zero (the summary is the last of each). With ``chunk_size``, a sequential scan over the C steps of all
    chunks at once gives each chunk's summary, and a pairwise tree of them (O(K) work, O(log K) depth) the
    sequence's.
    """
    T = a[0].shape[0]
    if chunk_size is None or chunk_size >= T:
        P, hs = jax.lax.associative_scan(_combine, (a, b), axis=0)
        return (P, hs), (tuple(x[-1] for x in P), tuple(x[-1] for x in hs))
    a, b, _ = _to_chunks(a, b, chunk_size)
    A, E = _chunk_summaries(a, b, unroll)
    summary_a, summary_e = A, E
    while summary_a[0].shape[0] > 1:
        if summary_a[0].shape[0] % 2:  # an identity step at the end pairs the last one
            one = identity(tuple(x[:1] for x in summary_a))
            summary_a = tuple(jnp.concatenate([x, y]) for x, y in zip(summary_a, one, strict=True))
            summary_e = tuple(jnp.concatenate([x, jnp.zeros_like(x[:1])]) for x in summary_e)
        pairs = lambda x: x.reshape(x.shape[0] // 2, 2, *x.shape[1:])  # noqa: E731
        sa, se = tuple(map(pairs, summary_a)), tuple(map(pairs, summary_e))
        summary_a, summary_e = _combine(
            (tuple(x[:, 0] for x in sa), tuple(x[:, 0] for x in se)),
            (tuple(x[:, 1] for x in sa), tuple(x[:, 1] for x in se)),
        )
    return (a, b, A, E), (tuple(x[0] for x in summary_a), tuple(x[0] for x in summary_e))


def finish_linear(work: Work, h_in: Parts | None, T: int, unroll: int | bool) -> Parts:
    """Every state ``[T, B, N]`` of the recurrence `begin_linear` began, from the entering state ``h_in
    [B, N]`` (None: zero). Without chunks ``h_t = h⁰_t + (Π_{s<=t} a_s) ⊙ h_in``, elementwise; with them,
    one associative scan over the chunks' summaries gives each chunk its entering state, and a sequential
    pass over the C steps of all chunks writes every state."""
    if len(work) == 2:
        P, hs = work
        return hs if h_in is None else add(hs, mul(P, tuple(h[None] for h in h_in)))
    a, b, A, E = work
    if h_in is not None:
        E = tuple(
            e.at[0].set(f) for e, f in zip(E, add(tuple(e[0] for e in E), mul(_first(A), h_in)), strict=True)
        )
    # the state at the end of every chunk, then the one entering it
    ends = jax.lax.associative_scan(_combine, (A, E), axis=0)[1]
    start = tuple(jnp.zeros_like(e[:1]) for e in ends) if h_in is None else tuple(h[None] for h in h_in)
    entering = tuple(jnp.concatenate([s, e[:-1]]) for s, e in zip(start, ends, strict=True))

    def run(h: Parts, step: tuple[Parts, Parts]) -> tuple[Parts, Parts]:
        a_t, b_t = step
        h = add(mul(a_t, h), b_t)
        return h, h

    _, hs = jax.lax.scan(run, entering, (a, b), unroll=unroll)
    C, K = a[0].shape[0], a[0].shape[1]
    from_chunks = lambda x: jnp.swapaxes(x, 0, 1).reshape(K * C, *x.shape[2:])[:T]  # noqa: E731
    return tuple(map(from_chunks, hs))


def _first(x: Parts) -> Parts:
    return tuple(v[0] for v in x)


def _forward(
    a: Array, b: Array, h0: Array, complex_: bool, chunk_size: int | None, unroll: int | bool
) -> Array:
    """Every state ``[T, B, H]`` of ``h_t = a_t ⊙ h_{t-1} + b_t`` from ``h_{-1} = h0 [B, H]``."""
    ap, bp = split(a, complex_), split(b, complex_)
    first = add(tuple(x[0] for x in bp), mul(tuple(x[0] for x in ap), split(h0, complex_)))
    bp = tuple(x.at[0].set(f) for x, f in zip(bp, first, strict=True))
    return join(scan_linear(ap, bp, chunk_size, unroll))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def linear_recurrence(
    a: Array, b: Array, h0: Array, complex_: bool, chunk_size: int | None, unroll: int | bool
) -> Array:
    """`_forward` with the hand-derived backward of the module docstring: ``a``, ``b`` ``[T, B, H]``,
    ``h0 [B, H]`` -> every state ``[T, B, H]``."""
    return _forward(a, b, h0, complex_, chunk_size, unroll)


def _linear_recurrence_fwd(
    a: Array, b: Array, h0: Array, complex_: bool, chunk_size: int | None, unroll: int | bool
) -> tuple[Array, tuple[Array, Array, Array]]:
    hs = _forward(a, b, h0, complex_, chunk_size, unroll)
    return hs, (a, h0, hs)


def _linear_recurrence_bwd(
    complex_: bool,
    chunk_size: int | None,
    unroll: int | bool,
    res: tuple[Array, Array, Array],
    g: Array,
) -> tuple[Array, Array, Array]:
    a, h0, hs = res
    # λ_t = g_t + conj(a_{t+1}) λ_{t+1}: a linear recurrence run from the last step, whose first decay
    # (at t = T-1, multiplying λ_T = 0) is never read
    a_next = conj(split(jnp.concatenate([a[1:], jnp.zeros_like(a[:1])]), complex_))
    flip = lambda x: tuple(jnp.flip(v, 0) for v in x)  # noqa: E731
    lam = flip(scan_linear(flip(a_next), flip(split(g, complex_)), chunk_size, unroll))
    return adjoint_products(lam, a, h0, hs, complex_)


def adjoint_products(
    lam: Parts, a: Array, h0: Array, hs: Array, complex_: bool
) -> tuple[Array, Array, Array]:
    """The gradients ``(d a [T, B, H], d b [T, B, H], d h0 [B, H])`` from the adjoint ``λ`` of every step:
    ``d a_t = λ_t ⊙ conj(h_{t-1})`` (``h_{-1} = h0``), ``d b_t = λ_t``, ``d h0 = conj(a_0) ⊙ λ_0``."""
    h_prev = split(jnp.concatenate([h0[None], hs[:-1]]), complex_)
    da = join(mul(lam, conj(h_prev)))
    dh0 = join(mul(conj(_first(split(a, complex_))), _first(lam)))
    return da, join(lam), dh0


linear_recurrence.defvjp(_linear_recurrence_fwd, _linear_recurrence_bwd)
