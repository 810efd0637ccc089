"""The forward drivers: hoisted input projection, masked time loop, reverse direction.

Shapes: B batch, T time, I input features, H hidden, G gate width (G = gates × H). Public arrays are
batch-major ``[B, T, F]``; inside, the time loop runs time-major ``[T, B, F]`` because `jax.lax.scan`
walks the leading axis.

Variable lengths are a mask ``m [T, B]`` with ``m[t, b] = t < lengths[b]``. A masked step keeps the carry
(``carry_t = carry_{t-1}``) and outputs zeros, so the final carry is the carry at the last valid step. Running
the same masked loop with ``reverse=True`` visits ``t = T-1 .. 0``: the carry stays at its initial value
through the padding and the recurrence starts at ``lengths[b] - 1``, as PyTorch's packed sequences do for the
backward direction of a bidirectional RNN. Outputs stay aligned with the inputs either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cells.base import Cell, add_bias
from rnnjax.regularize import Noise
from rnnjax.sharding import fill_rows, first_element, zeros_rows

Array = jax.Array
PyTree = Any


def mask_from_lengths(lengths: Array, T: int) -> Array:
    """``m [T, B]`` bool with ``m[t, b] = t < lengths[b]``; ``lengths [B]`` int."""
    return jnp.arange(T, dtype=lengths.dtype)[:, None] < lengths[None, :]


def _expand(m: Array, leaf: Array) -> Array:
    """``m [B]`` reshaped to broadcast against a leaf ``[B, ...]`` (same rank, no implicit rank promotion)."""
    return m.reshape(m.shape + (1,) * (leaf.ndim - m.ndim))


def select(m: Array | None, on: PyTree, off: PyTree) -> PyTree:
    """Per batch row: ``on`` where ``m [B]`` is True, else ``off`` (pytrees of ``[B, ...]`` leaves)."""
    if m is None:
        return on
    return jax.tree.map(lambda a, b: jnp.where(_expand(m, a), a, b), on, off)


def zero_where_not(m: Array | None, tree: PyTree) -> PyTree:
    """Zeroes the batch rows of ``tree`` where ``m [B]`` is False (``tree`` unchanged when ``m`` is None)."""
    if m is None:
        return tree
    return jax.tree.map(lambda a: jnp.where(_expand(m, a), a, jnp.zeros_like(a)), tree)


def project(params: PyTree, xs: Array) -> Array:
    """The hoisted input projection of a built-in cell: one GEMM over all steps.

    Args:
      params: a built-in cell's params, with ``w_ih [I, G]`` and (usually) ``b [G]``.
      xs: ``[B, T, I]`` batch-major inputs.

    Returns:
      ``xs w_ih [T, B, G]``, time-major for the loop. ``xs`` is transposed first and then multiplied as
      one plain ``[T·B, I] x [I, G]`` GEMM: on XLA:CPU this is faster than a dot that writes a
      transposed output (``einsum("bti,ig->tbg")``). The bias ``b`` is added per step in `scan_gates`,
      where it fuses with the gates: a separate ``+ b`` over all T would hold a second ``[T, B, G]`` buffer
      and add a pass over it.
    """
    return jnp.swapaxes(xs, 0, 1) @ params.w_ih


def _gate_step(cell: Cell, params: PyTree, biased: bool = False, noise: Noise | None = None) -> Any:
    """One step of a built-in cell from its projected input: ``step(carry, zx_t, m_t, z_t) -> (carry, res,
    tilde)``.

    Adds the bias to ``zx_t`` (unless ``biased``: it holds it already), runs the recurrent GEMM
    ``(h_{t-1} ⊙ m_h) w_hh`` (``m_h``: ``noise.state``, the state dropout mask, if any) and the gates, zones
    out with ``z_t`` (like the carry, or None; `zone`) and keeps the carry where ``m_t`` (``[B]`` bool or
    None) is False. ``tilde`` is the carry the gates made, before zoneout.
    """
    w_hh = getattr(params, "w_hh", None)  # None: the cell's recurrence is inside its gates
    gates = cell.gates
    assert gates is not None, "only a cell with a hand-derived backward has gates"
    state_mask = None if noise is None else noise.state

    def step(carry: PyTree, zx_t: Array, m_t: Array | None, z_t: PyTree = None) -> tuple[PyTree, Any, PyTree]:
        if hasattr(params, "b") and not biased:
            zx_t = add_bias(zx_t, params.b)
        h_in = carry.h if state_mask is None else carry.h * state_mask
        tilde, res = gates(params, zx_t, None if w_hh is None else h_in @ w_hh, carry)
        new = tilde if z_t is None else zone(z_t, carry, tilde)
        return select(m_t, new, carry), res, tilde

    return step


def zone(z: PyTree, prev: PyTree, new: PyTree) -> PyTree:
    """Zoneout: ``z ⊙ prev + (1 − z) ⊙ new`` leaf by leaf (``z``: 1 keeps a unit's previous value, 0 takes
    the new one; p at inference, the expectation)."""
    return jax.tree.map(lambda z_, a, b: z_ * a + (1 - z_) * b, z, prev, new)


def _zones(noise: Noise | None) -> PyTree:
    """The zoneout masks ``[T, ...]`` to scan over, or None."""
    return None if noise is None else noise.zone


def scan_gates(
    cell: Cell,
    params: PyTree,
    zx: Array,
    carry0: PyTree,
    mask: Array | None,
    reverse: bool,
    unroll: int | bool,
    noise: Noise | None = None,
) -> tuple[PyTree, Array]:
    """The time loop of a built-in cell: one ``[B, H] x [H, G]`` GEMM and the gates per step.

    Args:
      cell: a built-in `Cell` (with ``gates``).
      params: its params.
      zx: ``[T, B, G]`` projected inputs from `project` (``xs w_ih``; the bias ``b`` is added here).
      carry0: the initial carry, leaves ``[B, H]``.
      mask: ``[T, B]`` bool or None.
      reverse: run ``t = T-1 .. 0``.
      unroll: `jax.lax.scan`'s unroll factor.
      noise: the regularisers' masks inside the recursion (`rnnjax.regularize.Noise`), or None.

    Returns:
      ``(final_carry, hs)``: ``hs [T, B, H]`` is the hidden state after every step.
    """
    step = _gate_step(cell, params, biased=True, noise=noise)
    b = getattr(params, "b", None)
    with_b = None if b is None else lambda cols, r: add_bias(r, b[cols])

    def body(carry: PyTree, inp: tuple) -> tuple[PyTree, Array]:
        m_t, z_t, t = inp
        new, _, _ = step(carry, read_row(zx, t, len(cell.gate_names), with_b), m_t, z_t)
        return new, new.h

    xs = (mask, _zones(noise), jnp.arange(zx.shape[0]))
    return jax.lax.scan(body, carry0, xs, reverse=reverse, unroll=unroll)


def read_row(buf: Array, t: Array, blocks: int, f: Callable[[slice, Array], Array] | None = None) -> Array:
    """Row t of ``buf [T, B, G]``, read as ``blocks`` column blocks of equal width (one per gate) put side by
    side, each first mapped by ``f(columns, block)`` if given (``columns``: the block's `slice` of G); read
    whole if G does not split so.

    The gates slice the row by those same blocks, and XLA folds each slice of the concatenation into its
    own block's read. Read whole, the row's read fuses into the gates' kernels together with several
    column slices of it, and XLA:CPU runs such a kernel without vectorizing it, several times slower.
    """
    G = buf.shape[-1]
    n = blocks if blocks > 1 and G % blocks == 0 else 1
    W = G // n
    cols = [slice(j * W, (j + 1) * W) for j in range(n)]
    t = jnp.asarray(t)
    zero = jnp.zeros((), t.dtype)  # every index in t's dtype (int32 and int64 do not mix under x64)
    size, mid = (1, *buf.shape[1:-1], W), (zero,) * (buf.ndim - 2)
    reads = [jax.lax.dynamic_slice(buf, (t, *mid, c.start + zero), size)[0] for c in cols]
    if f is not None:
        reads = [f(c, r) for c, r in zip(cols, reads, strict=True)]
    return reads[0] if n == 1 else jnp.concatenate(reads, axis=-1)


def pad_time(a: Array, reverse: bool) -> Array:
    """``a [T, ...]`` with a row of zeros added: ``[T+1, ...]``, the zeros last (forward) or first (reverse).

    The row layout of the hand-derived BPTT (see `scan_gates_saving`): step t's rows are ``t + reverse``,
    and the zero row is the one where the carries' buffer holds the final carry.
    """
    zeros = zeros_rows(a[0], (1,))
    return jnp.concatenate([zeros, a] if reverse else [a, zeros], axis=0)


def residual_slot(cell: Cell, res: PyTree, zx_row: Any) -> int | None:
    """Which leaf of a step's residuals the hand-derived BPTT keeps in the projection's buffer, or None.

    A leaf shaped like ``zx_t`` (``zx_row``: an array or shape struct ``[B, G]``) can be written over the
    row of ``zx_rows`` its step has just read, and in the backward the gate gradients ``dzx_t`` (also
    ``[B, G]``) can be written over it in turn: one ``[T+1, B, G]`` buffer then serves the projection, the
    residuals and the gate gradients. That needs a backward that reads no residual after its loop: a cell
    whose ``extra_grads`` (if any) reads only ``aux`` (`Cell.extra_from_aux`). (The activations of the
    LSTMs, plain, peephole, layer-norm and projected, minGRU's and minLSTM's; the GRU's ``[r, z, n]``.)
    And loops of one step per iteration, over enough rows (`scan_gates_saving` checks both).
    """
    if cell.extra_grads and not cell.extra_from_aux:
        return None
    fits = [leaf.shape == zx_row.shape and leaf.dtype == zx_row.dtype for leaf in jax.tree.leaves(res)]
    return fits.index(True) if any(fits) else None


def scan_gates_saving(
    cell: Cell,
    params: PyTree,
    zx_rows: Array,
    carry0: PyTree,
    mask: Array | None,
    reverse: bool,
    unroll: int | bool,
    noise: Noise | None = None,
) -> tuple[PyTree, PyTree, PyTree, PyTree, tuple[Array, Array] | None]:
    """`scan_gates` that also keeps what the hand-derived backward needs: every carry, and the residuals.

    Rows: with ``o = 1`` when ``reverse`` (else 0), step t reads its projected input from row ``t + o`` of
    ``zx_rows [T+1, B, G]`` (`pad_time` of ``xs``, times ``w_ih``), and the carries are kept in one buffer of
    ``T + 1`` rows per leaf, ``carries [T+1, B, H]``: row ``t + o`` holds the carry *entering* step t and row
    ``t + 1 - o`` the carry *leaving* it (``carry0`` sits in row 0, forward, or row T, reverse). So the
    hidden states ``h_{t-1}`` of every step and the outputs ``h_t`` share one buffer, and the backward's
    weight gradients are single GEMMs over all T + 1 rows, against gate gradients with a zero row where
    ``carries`` holds the final carry.

    The residuals are stacked in the same rows, ``[T+1, ...]`` with step t's in row ``t + o`` and zeros in the
    spare one, so the backward's sums over them and the gate gradients slice nothing. The leaf named by
    `residual_slot` goes into ``zx_rows`` itself, over the row its step has read. That write is one step late:
    a step first writes the residual of the step visited before it, then reads its own row, so the buffer has
    one reader at a time and XLA updates it in place whatever it fuses (written in the same step, any reader
    of the row fused apart from the write makes XLA copy the whole buffer every step). And the step reads its
    row once, behind `jax.lax.optimization_barrier`, so that every reader shares that one ``[B, G]`` value:
    readers that each fuse the row's slice (the layer-norm LSTM's) may read the buffer from before the
    write, and XLA then copies the buffer every step. (Without a leaf in the
    buffer, the row is read by gate blocks instead, `read_row`.) The first step writes exact zeros into the
    spare row ``T·(1 − o)``. Two residuals stay out of the buffer: the last step's (not yet
    written) and the first step's, whose row gets exact zeros instead. The backward visits that step last and
    cannot write its ``dzx`` there either; a zero row then adds exactly nothing to the GEMMs over all rows, to
    which that ``dzx`` is added apart. (Leaving the residual in the row and subtracting it back out cancels
    catastrophically: with a small loss scale, float32 ``d w_ih`` loses its leading digits.)

    With zoneout (``noise.zone``) the carries are the zoned ones, and ``tildes`` keeps, in the same rows as
    the carries leaving the steps, the carries the gates made before zoneout: their derivatives read them.

    Returns:
      ``(final_carry, carries, res, tildes, aside)``: ``tildes`` is None without zoneout; ``aside`` is
      ``(last, first)``, the residuals of the last and the first step visited for the leaf in ``zx_rows``
      (``[B, G]`` each), or None when no leaf is.
    """
    T = zx_rows.shape[0] - 1
    o = int(reverse)
    step = _gate_step(cell, params, noise=noise)
    zones = _zones(noise)
    rows0 = jax.tree.map(lambda c: zeros_rows(c, (T + 1,)).at[T * o].set(c), carry0)
    tildes0 = None if zones is None else jax.tree.map(lambda c: zeros_rows(c, (T + 1,)), carry0)
    z0 = None if zones is None else jax.tree.map(lambda z: z[0], zones)
    _, res_spec, _ = jax.eval_shape(step, carry0, zx_rows[0], None if mask is None else mask[0], z0)
    res_leaves, treedef = jax.tree.flatten(res_spec)
    # One step per loop iteration only: unrolled, a step's late write and a later step's read share an
    # iteration, and XLA copies the buffer every iteration. And only for a buffer of at least as many rows
    # as the weights: the backward corrects each weight gradient by one row (`rnnjax.bptt._backward`), an
    # [I, G] and an [H, G] temporary that cost more memory than the shared buffer saves on a segment with
    # fewer rows than the weights.
    one_step = unroll is False or (not isinstance(unroll, bool) and unroll == 1)
    weight_rows = sum(getattr(params, w).shape[0] for w in ("w_ih", "w_hh") if hasattr(params, w))
    long_enough = zx_rows.shape[0] * zx_rows.shape[1] >= weight_rows
    slot = residual_slot(cell, res_spec, zx_rows[0]) if one_step and long_enough else None
    zero_row = zeros_rows(zx_rows[0])
    pending0 = None if slot is None else (zero_row, jnp.asarray(T * (1 - o), jnp.int32), zero_row)
    t_first = (T - 1) * o  # the step visited first

    # the other residual leaves: zeros but in their step's row
    res0 = [None if i == slot else zeros_rows(r, (T + 1,)) for i, r in enumerate(res_leaves)]

    def body(state: tuple, inp: tuple) -> tuple[tuple, None]:
        carry, rows, tildes, zx_buf, res_bufs, pending = state
        m_t, z_t, t = inp
        if slot is not None:  # the previous step's residual, over the row it read
            zx_buf = jax.lax.dynamic_update_index_in_dim(zx_buf, pending[0], pending[1], 0)
        if slot is not None:  # one read of the row, which all its readers share (see the docstring)
            zx_t = jax.lax.dynamic_index_in_dim(zx_buf, t + o, 0, keepdims=False)
            zx_t = jax.lax.optimization_barrier(zx_t)
        else:
            zx_t = read_row(zx_buf, t + o, len(cell.gate_names))
        new, res, tilde = step(carry, zx_t, m_t, z_t)
        put = lambda buf, v, at: jax.lax.dynamic_update_index_in_dim(buf, v, at, 0)  # noqa: E731
        rows = jax.tree.map(lambda r, v: put(r, v, t + 1 - o), rows, new)
        if tildes is not None:
            tildes = jax.tree.map(lambda r, v: put(r, v, t + 1 - o), tildes, tilde)
        res = jax.tree.leaves(res)
        res_bufs = [
            None if i == slot else put(b, v, t + o)
            for i, (b, v) in enumerate(zip(res_bufs, res, strict=True))
        ]
        if slot is not None:  # the first step's residual is kept aside, and its row zeroed
            first = t == t_first
            kept = jnp.where(first, res[slot], pending[2])
            pending = (jnp.where(first, zero_row, res[slot]), t + o, kept)
        return (new, rows, tildes, zx_buf, res_bufs, pending), None

    (final, carries, tildes, zx_buf, res, pending), _ = jax.lax.scan(
        body,
        (carry0, rows0, tildes0, zx_rows, res0, pending0),
        (mask, zones, jnp.arange(T, dtype=jnp.int32)),
        reverse=reverse,
        unroll=unroll,
    )
    if slot is None:
        return final, carries, jax.tree.unflatten(treedef, res), tildes, None
    res[slot] = zx_buf
    assert pending is not None  # carried whenever a slot is
    return final, carries, jax.tree.unflatten(treedef, res), tildes, (pending[0], pending[2])


def outputs_from_hs(hs: Array, mask: Array | None) -> Array:
    """Outputs ``ys [B, T, H]`` from the stacked hidden states ``hs [T, B, H]``: zero at masked steps."""
    if mask is not None:
        hs = jnp.where(mask[..., None], hs, jnp.zeros_like(hs))
    return jnp.swapaxes(hs, 0, 1)


def forward(
    cell: Cell,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    reverse: bool,
    unroll: int | bool,
    noise: Noise | None = None,
) -> tuple[PyTree, PyTree]:
    """The forward of `rnnjax.unroll` on flat inputs: ``(final_carry, ys)``, no residuals kept.

    One function for both gradient modes: the hand-derived BPTT's primal and the autodiff twin run it, so
    the two can differ only in their backward. Built-in cells take the hoisted-projection path
    (`project` + `scan_gates`); other cells step with `scan_steps`. ``noise``: the regularisers' masks
    inside the recursion (`rnnjax.regularize.Noise`; built-in cells only), or None.
    """
    if cell.is_builtin:
        final, hs = scan_gates(cell, params, project(params, xs), carry0, mask, reverse, unroll, noise)
        return final, outputs_from_hs(hs, mask)
    final, _, ys = scan_steps(cell.step, params, xs, carry0, mask, reverse, unroll)
    return final, ys


def scan_steps(
    step: Any,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    reverse: bool,
    unroll: int | bool,
) -> tuple[PyTree, PyTree, PyTree]:
    """The time loop of any cell, from its ``step`` alone.

    Args:
      step: ``step(params, carry, x [B, I]) -> (carry, y)``.
      params: its params.
      xs: ``[B, T, I]`` batch-major inputs.
      carry0: the initial carry, leaves ``[B, ...]``.
      mask: ``[T, B]`` bool or None.
      reverse: run ``t = T-1 .. 0``.
      unroll: `jax.lax.scan`'s unroll factor.

    Returns:
      ``(final_carry, carries, ys)``: ``carries`` stacks the carry after every step (leaves ``[T, B, ...]``)
      and ``ys`` the outputs batch-major (leaves ``[B, T, ...]``), zero at masked steps.
    """

    def body(carry: PyTree, inp: tuple[Array, Array | None]) -> tuple[PyTree, Any]:
        x_t, m_t = inp
        new, y = step(params, carry, x_t)
        new = select(m_t, new, carry)
        return new, (new, zero_where_not(m_t, y))

    final, (carries, ys) = jax.lax.scan(
        body, carry0, (jnp.swapaxes(xs, 0, 1), mask), reverse=reverse, unroll=unroll
    )
    return final, carries, jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1), ys)


def scan_stacked_late(
    body: Any,
    init: PyTree,
    xs: PyTree,
    length: int,
    reverse: bool,
    unroll: int | bool,
    trigger: PyTree,
    zero_row: int,
) -> tuple[PyTree, PyTree]:
    """`jax.lax.scan` whose stacked outputs are allocated late, in ``length + 1`` rows with one zero row.

    ``jax.lax.scan`` fills its stacked outputs into zero-initialised ``[T, ...]`` buffers; the zeros do not
    depend on anything, so XLA's scheduler may create them at the start of the whole program. For the
    backward of a BPTT that means the gate gradients' buffer (the size of the forward's residuals) is held
    through the entire forward pass, beside the projection ``zx`` and the residuals. Here each buffer is
    filled from ``0 · trigger`` instead (the first element of every leaf of ``trigger``, the incoming
    cotangents), so it cannot exist before the backward begins. Every step writes its row in place, and row
    ``zero_row`` is set to exact zeros, so the fill value never shows (even if ``trigger`` holds inf or NaN).

    Args:
      body: ``body(carry, x) -> (carry, y)``, as for `jax.lax.scan`.
      init: the initial carry.
      xs: the scanned inputs, leaves ``[length, ...]`` (None leaves allowed).
      length: the number of steps T.
      reverse, unroll: as for `jax.lax.scan`.
      trigger: a pytree of arrays that the outputs' allocation waits for (its empty leaves are ignored).
      zero_row: 0 or T. Step t's output goes to row ``t + 1`` if it is 0, else to row t (the row layout of
        `scan_gates_saving`).

    Returns:
      ``(final_carry, stacked)``, the leaves of ``stacked`` ``[T+1, ...]``.
    """
    _, y_spec = jax.eval_shape(body, init, jax.tree.map(lambda a: a[0], xs))
    firsts = [first_element(leaf) for leaf in jax.tree.leaves(trigger) if leaf.size]
    # all empty (a batch of 0): nothing to wait for
    seed = jnp.asarray(sum(firsts)) if firsts else jnp.zeros(())
    shift = int(zero_row == 0)

    def alloc(s: Any) -> Array:
        return fill_rows(seed * 0, s, (length + 1,)).at[zero_row].set(zeros_rows(s))

    def step(state: tuple[PyTree, PyTree], inp: tuple[PyTree, Array]) -> tuple[tuple[PyTree, PyTree], None]:
        carry, bufs = state
        x, t = inp
        carry, y = body(carry, x)
        bufs = jax.tree.map(lambda b, v: jax.lax.dynamic_update_index_in_dim(b, v, t + shift, 0), bufs, y)
        return (carry, bufs), None

    (carry, bufs), _ = jax.lax.scan(
        step,
        (init, jax.tree.map(alloc, y_spec)),
        (xs, jnp.arange(length, dtype=jnp.int32)),
        reverse=reverse,
        unroll=unroll,
    )
    return carry, bufs


def shift_carries(carry0: PyTree, carries: PyTree, reverse: bool) -> PyTree:
    """The carry *entering* each step, ``[T, ...]`` leaves, from the carries leaving them.

    Forward: ``prev[t] = carries[t-1]`` with ``prev[0] = carry0``; reverse: ``prev[t] = carries[t+1]`` with
    ``prev[T-1] = carry0``.
    """

    def shift(c0: Array, cs: Array) -> Array:
        if reverse:
            return jnp.concatenate([cs[1:], c0[None]], axis=0)
        return jnp.concatenate([c0[None], cs[:-1]], axis=0)

    return jax.tree.map(shift, carry0, carries)
