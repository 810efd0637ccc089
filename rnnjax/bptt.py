r"""The hand-derived backpropagation through time, bound with `jax.custom_vjp`.

For a built-in cell the forward (see `rnnjax.scan`) is::

    zx = xs w_ih + b                                   one GEMM over all T        zx [T, B, G]
    for t:  zh_t = h_{t-1} w_hh ;  carry_t, res_t = gates(zx_t, zh_t, carry_{t-1})   (masked by lengths)

and the backward, a reverse-time `jax.lax.scan`, is::

    d_carry = ∂L/∂carry_T                              (the cotangent of the final carry)
    for t in reverse:
        g      = d_carry, with dy_t added to g.h         only where step t is valid; masked steps pass
                                                          d_carry straight through to step t-1
        dzx_t, dzh_t, d_prev[, aux_t] = gates_bwd(res_t, carry_{t-1}, carry_t, g)
        d_carry = d_prev + (dzh_t w_hhᵀ in the h slot)  the one GEMM inside the backward loop
    after the loop, once over all T (large GEMMs, fast):
        d w_ih = Σ_t x_tᵀ dzx_t      d b = Σ_t Σ_b dzx_t      d xs = dzx w_ihᵀ
        d w_hh = Σ_t h_{t-1}ᵀ dzh_t   (+ the cell's extra gradients, e.g. the GRU's d b_hn, from the
                                      stacked dzx, dzh, carries, residuals and aux)

What the training step holds, and why (less compiled memory than autodiff's training step holds):

- The forward keeps ``xs`` transposed time-major (the projection GEMM needs that copy anyway), every carry
  and each cell's minimal residuals (none for Elman, four gate activations for LSTM, ``[r, z, n]`` and
  ``hn`` for GRU). The carries live in one buffer of T + 1 rows per leaf (`rnnjax.scan.scan_gates_saving`):
  the carry entering step t and the one leaving it are adjacent rows, so the outputs ``ys`` and the
  ``h_{t-1}`` of the weight gradient share it, with no shifted copy. The residuals too have T + 1 rows,
  in the same order as the gate gradients, so that a cell's sums over them need no slice.
- The backward stacks ``dzx`` (and only the columns of ``dzh`` that differ from it and cannot be rebuilt
  from it, `Cell.dzh_shared`) in buffers created only when the cotangents arrive
  (`rnnjax.scan.scan_stacked_late`), in the same T + 1 rows with a zero row, so each weight gradient is one
  GEMM over all rows whose operands are flattened in the same (t, b) order (`time_gemm`):
  XLA transposes nothing large.
- For the LSTMs (plain, peephole, layer-norm, projected), the GRU, minGRU and minLSTM one
  ``[T+1, B, G]`` buffer does three jobs in turn
  (`rnnjax.scan.residual_slot`): the projection ``zx``, then each step's residuals written over the row
  it has read, then each step's ``dzx`` written over the residuals it came from. Every write lands one
  step late, after the row was read, so XLA updates the buffer in place.

Every row that a loop reads from a stacked buffer and a cell then slices by gates (the projection, the
residuals, a diagonal cell's carries and output gradients) is read block by block (`rnnjax.scan.read_row`):
XLA:CPU runs a kernel that reads a row and slices it several ways without vectorizing it, a large share of
the backward loop's time.

For a user-written cell that gives only ``step``, the "manual" gradient is the same reverse recursion built
from per-step VJPs: the forward keeps the carries, and the backward recomputes each step's VJP with
`jax.vjp` and chains them from ``t = T-1`` down to ``0``. With the batch split over an explicit mesh (and
the parameters replicated) that recursion runs per device under `jax.shard_map`, each device on its own
rows, so that the parameter gradient is summed over the devices once, after the loop, not at every step.
That relies on what every RNN cell does: its ``step`` treats the rows of the batch independently.

Plain forward mode (``jax.jvp``, ``jax.jacfwd``) does not exist for a `jax.custom_vjp` function;
`rnnjax.unroll` turns JAX's error into one that points to ``grad="autodiff"``. Forward-over-reverse
(``jax.hessian``, Hessian-vector products) does work: JAX differentiates the backward below, which is plain
JAX code, in forward mode.

Reference: P. J. Werbos, "Backpropagation through time: what it does and how to do it", Proc. IEEE 78 (1990);
the hoisted GEMMs follow J. Appleyard, T. Kočiský and P. Blunsom, "Optimizing performance of recurrent neural
networks on GPUs" (2016), §3.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from rnnjax.cells.base import Cell, RowSum, WeightGemm, accumulation_dtype
from rnnjax.regularize import Noise
from rnnjax.scan import (
    forward,
    outputs_from_hs,
    pad_time,
    read_row,
    residual_slot,
    scan_gates_saving,
    scan_stacked_late,
    scan_steps,
    select,
    shift_carries,
    zero_where_not,
)
from rnnjax.sharding import (
    batch_split,
    explicit_spec,
    merge_rows,
    replicated_if_explicit,
    reshard_like,
    reshard_to,
    row_groups,
    sharding_on,
    split_rows,
    sum_to_type,
    under_mesh,
    vary_like,
)

Array = jax.Array
PyTree = Any

# ``unroll=None`` runs every loop at an unroll factor of 1: with the gates' kernels vectorized (rows read
# block by block, `rnnjax.scan.read_row`), factors 1, 2 and 4 time the same for the LSTM, GRU and Elman on
# CPU over the shapes the benchmarks sweep, and 4 is slower for minGRU, minLSTM and IndRNN
# (``python -m benchmarks.rnn_step`` measures it). The gradient's loops run at 1 anyway: it is the only
# factor at which the projection's buffer is shared.


def _loops(unroll: int | bool | None) -> int | bool:
    """The unroll factor of every loop: the caller's, or 1 for None."""
    return 1 if unroll is None else unroll


# ---------------------------------------------------------------------------------------------------------
# Built-in cells: gates + hand-derived gates_bwd, the GEMMs hoisted out of both loops.
# ---------------------------------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def bptt_unroll(
    cell: Cell,
    reverse: bool,
    unroll: int | bool | None,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    noise: Noise | None = None,
) -> tuple[PyTree, Array]:
    """``(final_carry, ys [B, T, H])`` of a built-in cell; its VJP is the hand-derived BPTT below.

    ``xs [B, T, I]``, ``carry0`` leaves ``[B, H]``, ``mask [T, B]`` bool or None, ``noise`` the
    regularisers' masks inside the recursion (`rnnjax.regularize.Noise`) or None. T >= 1.
    """
    return forward(cell, params, xs, carry0, mask, reverse, _loops(unroll), noise)


def _bptt_fwd(
    cell: Cell,
    reverse: bool,
    unroll: int | bool | None,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    noise: Noise | None = None,
) -> tuple[tuple[PyTree, Array], tuple]:
    T, o = xs.shape[1], int(reverse)
    xs_rows = pad_time(jnp.swapaxes(xs, 0, 1), reverse)  # [T+1, B, I]: step t in row t + o
    final, carries, res, tildes, aside = scan_gates_saving(
        cell, params, xs_rows @ params.w_ih, carry0, mask, reverse, _loops(unroll), noise
    )
    ys = outputs_from_hs(carries.h[1 - o : T + 1 - o], mask)  # the carries leaving the steps
    return (final, ys), (params, xs_rows, mask, carries, res, aside, noise, tildes)


def _bptt_bwd(
    cell: Cell, reverse: bool, unroll: int | bool | None, saved: tuple, cotangents: tuple
) -> tuple[PyTree, Array, PyTree, None, None]:
    return (*_backward(cell, reverse, unroll, saved, cotangents, emit_dh=False)[:4], None)


def _backward(
    cell: Cell, reverse: bool, unroll: int | bool | None, saved: tuple, cotangents: tuple, emit_dh: bool
) -> tuple[PyTree, Array, PyTree, None, Array | None]:
    """The reverse-time recursion; with ``emit_dh`` also ``∂L/∂h_t [T, B, H]`` (0 at masked steps).

    Rows (see `rnnjax.scan.scan_gates_saving`): ``xs_rows``, ``carries`` and the stacked gate gradients
    have T + 1 rows; step t's are row ``t + o`` (``o = 1`` when reverse), where ``carries`` holds the carry
    entering the step, and the gate gradients' spare row is zero. (So the final carry meets a zero in the
    ``d w_hh`` GEMM: were it ±inf, an overflowed forward, ``d w_hh`` would be NaN where autodiff's could
    stay finite for a loss that ignores the last step.)
    """
    params, xs_rows, mask, carries, res, aside, noise, tildes = saved
    d_final, d_ys = cotangents  # d_final: like the carry, leaves [B, H]; d_ys [B, T, H]
    T, o = d_ys.shape[1], int(reverse)
    w_hh_t = params.w_hh.T if hasattr(params, "w_hh") else None  # [G, H]; None: no recurrent GEMM
    gates_bwd, extra_grads = cell.gates_bwd, cell.extra_grads
    assert gates_bwd is not None, "only a cell with a hand-derived backward reaches its BPTT"
    k = cell.dzh_shared  # dzh[:, :k] == dzx[:, :k]: only dzh's other columns are stored
    G = params.w_ih.shape[-1]  # the width of a projected row

    # a diagonal cell's state is `Cell.diagonal` blocks of units, which its gates slice: read by blocks
    # (`rnnjax.scan.read_row`), like the residuals below
    state_blocks = cell.diagonal

    def row(t: Array, shift: int, buf: PyTree = carries) -> PyTree:
        return jax.tree.map(lambda c: read_row(c, t + shift, state_blocks), buf)

    # the regularisers inside the recursion (`rnnjax.regularize`): the state dropout mask m_h [B, H] on the
    # h entering w_hh, and zoneout, z_t ⊙ c_{t-1} + (1 − z_t) ⊙ c̃_t, whose gates made c̃_t (kept in tildes)
    state_mask = None if noise is None else noise.state
    zones = None if noise is None else noise.zone

    # When the forward kept a residual leaf in the projection's buffer (`rnnjax.scan.residual_slot`: the
    # LSTM's activations), the gate gradients overwrite it in turn, and the backward holds no [T+1, B, G]
    # buffer of its own. As in the forward, each write is one step late: a step first writes the pending
    # row (for the first step visited, the forward's last residual; then the previous step's dzx, over the
    # residuals it came from) and then reads its own row. The step visited last takes its residual from
    # `aside` (its row holds zeros) and its dzx stays out of the buffer.
    res_leaves, res_def = jax.tree.flatten(res)
    row_spec = jax.tree.map(lambda r: jax.ShapeDtypeStruct(r.shape[1:], r.dtype), res)
    reuse = None if aside is None else residual_slot(cell, row_spec, aside[0])
    spare = T * (1 - o)  # the row that holds no step

    d_ys_rows = jnp.swapaxes(d_ys, 0, 1)  # [T, B, H]

    def body(state: tuple, inp: tuple) -> tuple[tuple, tuple]:
        d_carry, pending = state
        m_t, z_t, t = inp
        leaves = list(res_leaves)
        if reuse is not None:
            buf, value, at = pending
            leaves[reuse] = buf = jax.lax.dynamic_update_index_in_dim(buf, value, at, 0)
        prev_t, new_t = row(t, o), row(t, 1 - o)  # the carries entering and leaving step t
        first = t == (T - 1) * o

        def first_aside(cols: slice, blk: Array) -> Array:
            assert aside is not None  # kept whenever a leaf is in the projection's buffer (`reuse`)
            return jnp.where(first, aside[1][..., cols], blk)

        res_t = []
        for i, r in enumerate(leaves):
            blocks = len(cell.gate_names) if r.shape[-1] == G else 1
            res_t.append(read_row(r, t + o, blocks, None if i != reuse else first_aside))
        res_t = res_def.unflatten(res_t)

        # the output y_t = h_t adds its gradient to the hidden state's (only where the step is valid), block
        # by block of a diagonal cell's state
        def plus_dy(cols: slice, dy: Array) -> Array:
            return zero_where_not(m_t, d_carry.h[..., cols] + dy)

        g_valid = zero_where_not(m_t, d_carry)._replace(h=read_row(d_ys_rows, t, state_blocks, plus_dy))
        g_gates = g_valid
        if z_t is not None:  # zoneout: the gates made c̃_t, which reaches c_t as (1 − z_t) ⊙ c̃_t
            new_t = row(t, 1 - o, tildes)
            g_gates = jax.tree.map(lambda z, g: (1 - z) * g, z_t, g_valid)
        # through the gates, by the cell's hand-derived derivative
        dzx, dzh, d_prev, *aux = gates_bwd(params, res_t, prev_t, new_t, g_gates)
        aux = sum_row_terms(aux)  # the cell's per-row terms, summed over the batch here, inside the loop
        # through the recurrent projection zh_t = (h_{t-1} ⊙ m_h) w_hh
        if w_hh_t is not None:  # (typed as the carry: a w_hh split by rows would split it by unit)
            dh = reshard_like(_gates_to_units(dzx if dzh is None else dzh, w_hh_t), d_prev.h)
            if state_mask is not None:
                dh = dh * state_mask
            d_prev = d_prev._replace(h=d_prev.h + dh)
        if z_t is not None:  # and c_{t-1} reaches c_t as z_t ⊙ c_{t-1}
            d_prev = jax.tree.map(lambda d, z, g: d + z * g, d_prev, z_t, g_valid)
        # a masked step copied the carry: its gradient passes through unchanged
        d_prev = select(m_t, d_prev, d_carry)
        dzh_own = None if dzh is None else dzh[..., k:]  # the columns of dzh that dzx does not hold
        if reuse is not None:  # dzx waits in the carry, to overwrite its residuals' row in the next step
            pending, dzx = (buf, dzx, t + o), None
        # g_valid.h is ∂L/∂h_t, the whole gradient reaching the hidden state of step t (for diagnostics)
        return (d_prev, pending), (dzx, dzh_own, g_valid.h if emit_dh else None, aux)

    first_row = (T - 1) * (1 - o) + o  # the row of the last step the forward visited, the first one here
    pending = None
    if reuse is not None:
        assert aside is not None  # kept whenever a leaf is in the projection's buffer
        pending = (res_leaves[reuse], aside[0], jnp.asarray(first_row, jnp.int32))
    (d_carry0, pending), (dzx, dzh_own, d_hs, aux) = scan_stacked_late(
        body,
        (d_final, pending),
        (mask, zones, jnp.arange(T, dtype=jnp.int32)),
        T,
        not reverse,
        _loops(unroll),
        cotangents,
        spare,
    )
    # dzx's products after the loop, linear in its rows. When dzx overwrote the residuals, its row T·o (the
    # last step the loop visits) holds zeros and its gradient is in `pending`: writing it into the buffer
    # here would copy the buffer for each reader, so each product adds that one row apart.
    dzx_last = None
    if reuse is not None:
        dzx, dzx_last, _ = pending

    def rows_gemm(a: Array) -> Array:  # Σ_t a_tᵀ dzx_t
        out = time_gemm(a, dzx)
        return out if dzx_last is None else out + time_gemm(a[T * o], dzx_last)

    def rows_sum() -> Array:  # Σ_t Σ_b dzx_t
        out = jnp.sum(dzx, axis=(0, 1))
        return out if dzx_last is None else out + jnp.sum(dzx_last, axis=0)

    def rows_project(w: Array) -> Array:  # dzx_t w for every row t
        out = _gates_to_units(dzx, w)
        return out if dzx_last is None else out.at[T * o].set(_gates_to_units(dzx_last, w))

    # the weight and input gradients, once over all T + 1 rows and B (plain GEMMs): the spare row of the
    # gate gradients is zero, so it adds nothing. So do the cell's own sums (`Cell.extra_grads`), over
    # all rows too: the stacked residuals, dzx, dzh and aux share the row layout, and slicing the T rows
    # of the steps out would copy each operand.
    def dzh_of(on_dzx: Array, on_own: Any) -> Array:
        """``dzh``, or a column-wise map of it (its columns in a GEMM's output), from the map of dzx and of
        dzh's own columns: dzh's first k columns are dzx's."""
        if dzh_own is None:
            return on_dzx
        if not k:
            return on_own()
        if dzh_own.shape[-1] == 0:
            return on_dzx[..., :k]
        return jnp.concatenate([on_dzx[..., :k], on_own()], axis=-1)

    # by column blocks: the shared ones from a GEMM over all of dzx (slicing dzx first copies it)
    grads = {"w_ih": rows_gemm(xs_rows), **({"b": rows_sum()} if hasattr(params, "b") else {})}
    if w_hh_t is not None:  # Σ_t (h_{t-1} ⊙ m_h)ᵀ dzh_t
        h_in = carries.h if state_mask is None else carries.h * state_mask[None]
        grads["w_hh"] = dzh_of(rows_gemm(h_in), lambda: time_gemm(h_in, dzh_own))
    if cell.extra_from_aux:  # and from nothing stacked (so dzx may have overwritten the residuals)
        assert extra_grads is not None, "GatesBackward.extra_from_aux describes its extra_grads"
        grads.update(weight_gemms(cell, extra_grads(params, grads, None, None, None, None, *aux)))
    elif extra_grads:
        dzh = dzh_of(dzx, lambda: dzh_own)
        grads.update(weight_gemms(cell, extra_grads(params, grads, dzx, dzh, carries, res, *aux)))
    _check_every_field(cell, params, grads)
    # typed as the primals are: e.g. a weight split by its contracted axis gets a gradient split so
    d_params = reshard_like(sum_to_type(params._replace(**grads), params), params)
    d_xs = sum_to_type(jnp.swapaxes(rows_project(params.w_ih.T)[o : T + o], 0, 1), xs_rows)
    rows_spec = explicit_spec(xs_rows)  # [T+1, B, I]: xs's, time-major
    want = None if rows_spec is None else (rows_spec[1], rows_spec[0], rows_spec[2])
    if explicit_spec(d_xs) != want:
        d_xs = reshard_to(d_xs, want or (), xs_rows)
    d_hs = None if d_hs is None else d_hs[o : T + o]
    return d_params, d_xs, sum_to_type(d_carry0, carries), None, d_hs


bptt_unroll.defvjp(_bptt_fwd, _bptt_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def probed_bptt_unroll(
    cell: Cell,
    reverse: bool,
    unroll: int | bool | None,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    probe: Array,
) -> tuple[PyTree, Array]:
    """`bptt_unroll` with a ``probe [B, T, H]`` whose cotangent is ``∂L/∂h_t``, from the same backward pass.

    The forward does not read the probe's value: it acts as ``h_t + (probe_t − stop_gradient(probe_t))``,
    so the cotangent the backward gives it is the gradient reaching ``h_t`` (0 at masked steps).
    """
    del probe
    return forward(cell, params, xs, carry0, mask, reverse, _loops(unroll))


def _probed_fwd(
    cell: Cell,
    reverse: bool,
    unroll: int | bool | None,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    probe: Array,
) -> tuple[tuple[PyTree, Array], tuple]:
    del probe
    return _bptt_fwd(cell, reverse, unroll, params, xs, carry0, mask)


def _probed_bwd(
    cell: Cell, reverse: bool, unroll: int | bool | None, saved: tuple, cotangents: tuple
) -> tuple[PyTree, Array, PyTree, None, Array]:
    d_params, d_xs, d_carry0, _, d_hs = _backward(cell, reverse, unroll, saved, cotangents, emit_dh=True)
    assert d_hs is not None  # emitted with emit_dh
    return d_params, d_xs, d_carry0, None, jnp.swapaxes(d_hs, 0, 1)


probed_bptt_unroll.defvjp(_probed_fwd, _probed_bwd)


def time_gemm(a: Array, b: Array) -> Array:
    """``Σ_t a_tᵀ b_t`` of time-major ``a [T, B, P]`` and ``b [T, B, G]``: one ``[P, T·B] x [T·B, G]`` GEMM.

    Any leading axes are summed over, as ``T`` and ``B`` are (``a [B, P]``, ``b [B, G]``: ``aᵀ b``). The
    weight gradients of the hand-derived BPTT, a cell's own included (`rnnjax.cells.base.WeightGemm`).
    Flattening both operands in the same ``(t, b)`` order keeps XLA from transposing ``b`` (the large
    ``[T, B, G]`` gate gradients) to match an operand in another order: ``einsum("tbi,tbg->ig",
    swapaxes(xs, 0, 1), dz)`` of batch-major ``xs`` copies ``dz`` whole.

    Under a device mesh (`rnnjax.sharding.under_mesh`: a context mesh of several devices, or a batch
    sharded explicitly) the contracted axes stay apart instead: a batch sharding does not survive the merge
    of ``(t, b)`` into one axis, and XLA would all-gather ``a`` and ``b`` first and run the whole GEMM on
    every device. As ``einsum("tbp,tbg->pg")`` each device contracts its own rows and one all-reduce sums them
    (into a replicated result). On one device that form costs a transposed copy of both operands on XLA:CPU.

    Operands narrower than float32 (bfloat16, float16: ``rj.unroll(..., compute_dtype=)``) are accumulated
    in float32, and the sum of T·B products is rounded once, to the operands' dtype.
    """
    acc = accumulation_dtype(a.dtype)
    if under_mesh(a, b):
        lead = "abcdefhijklmnoqrs"[: a.ndim - 1]  # neither p nor g, the output's
        out = jnp.einsum(
            f"{lead}p,{lead}g->pg",
            a,
            b,
            out_sharding=replicated_if_explicit(a, b),
            preferred_element_type=acc,
        )
    else:
        out = jnp.matmul(a.reshape(-1, a.shape[-1]).T, b.reshape(-1, b.shape[-1]), preferred_element_type=acc)
    return out.astype(a.dtype)


def _check_every_field(cell: Cell, params: PyTree, grads: dict[str, Any]) -> None:
    """A ValueError, at trace time, where the gradients of a cell's `GatesBackward` (the driver's ``w_ih``,
    ``w_hh``, ``b`` and its ``extra_grads``) do not match the fields of its params one for one, by name and
    shape: a field left out would otherwise keep its value in place of its gradient."""
    fields = tuple(params._fields)
    missing = [f for f in fields if f not in grads]
    unknown = sorted(set(grads) - set(fields))
    if missing or unknown:
        raise ValueError(
            f"cell {cell.name!r}: its GatesBackward must give a gradient for every field of its params "
            f"{fields}: the driver computes w_ih, w_hh and b, and extra_grads the rest; "
            + (f"no gradient for {missing} (give extra_grads returning them)" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"extra_grads returned {unknown}, which are not fields of the params" if unknown else "")
        )
    for f in fields:
        want, got = jnp.shape(getattr(params, f)), jnp.shape(grads[f])
        if want != got:
            raise ValueError(
                f"cell {cell.name!r}: the gradient of params.{f} must have its shape {want}, got {got} "
                "(from extra_grads)"
            )


def weight_gemms(cell: Cell, grads: dict[str, Any]) -> dict[str, Array]:
    """A cell's extra gradients (`rnnjax.cells.base.GatesBackward.extra_grads`) with each
    `rnnjax.cells.base.WeightGemm` computed by `time_gemm`; a ValueError where its operands' leading axes
    differ (each must be the same rows, in the same order)."""

    def gemm(name: str, g: Any) -> Any:
        if not isinstance(g, WeightGemm):
            return g
        if jnp.shape(g.a)[:-1] != jnp.shape(g.b)[:-1]:
            raise ValueError(
                f"cell {cell.name!r}: extra_grads' WeightGemm(a, b) for {name!r} must have a and b with the "
                f"same leading axes (the same rows), got a {jnp.shape(g.a)} and b {jnp.shape(g.b)}"
            )
        return time_gemm(g.a, g.b)

    return {k: gemm(k, g) for k, g in grads.items()}


def _batch_sum(v: Array) -> Array:
    """``v [..., n]`` summed over every axis but the last: a step's share of a per-unit parameter's gradient.

    Under a device mesh (`rnnjax.sharding.under_mesh`) the rows are kept, ``[B, n]``: a sum over a batch
    split across devices is an all-reduce, and inside the loop it is one all-reduce per step. Each device
    then stacks its own ``[T+1, B/devices, n]``, and `rnnjax.cells.base.steps_sum` sums them with one
    all-reduce after the loop.
    """
    return v if under_mesh(v) else jnp.sum(v, axis=tuple(range(v.ndim - 1)))


def sum_row_terms(aux: PyTree) -> PyTree:
    """The ``aux`` of a cell's ``gates_bwd`` with each `rnnjax.cells.base.RowSum` replaced by its rows'
    sum over the batch (`_batch_sum`): what one step stacks for ``extra_grads``. A ValueError for a
    `RowSum` of rank below 2 (``[B, n]``: one entry per row would be left as rows)."""
    is_term = lambda a: isinstance(a, RowSum)  # noqa: E731

    def total(a: Any) -> Any:
        if not is_term(a):
            return a
        if jnp.ndim(a.v) < 2:
            raise ValueError(
                f"a RowSum in gates_bwd's aux must hold rows [B, n] (n >= 1 entries per row), got shape "
                f"{jnp.shape(a.v)}: for one entry per row use v[:, None]"
            )
        return _batch_sum(a.v)

    return jax.tree.map(total, aux, is_leaf=is_term)


def _gates_to_units(dz: Array, w: Array) -> Array:
    """``dz [..., G] @ w [G, N]``. Where the gates' axis of ``dz`` is split over an explicit mesh (hidden
    units split, model parallelism), the contraction sums over the devices, and JAX asks for the result's
    sharding: ``dz``'s on its other axes, ``w``'s on the last."""
    spec = explicit_spec(dz)
    if spec is None or spec[-1] is None:
        return dz @ w
    out = (*spec[:-1], (explicit_spec(w) or (None, None))[-1])
    return jnp.matmul(dz, w, out_sharding=sharding_on(out, dz))


# ---------------------------------------------------------------------------------------------------------
# User-written cells: the reverse recursion chained from per-step VJPs.
# ---------------------------------------------------------------------------------------------------------


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def stepwise_bptt_unroll(
    cell: Cell,
    reverse: bool,
    unroll: int | bool,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    noise: Noise | None = None,
) -> tuple[PyTree, PyTree]:
    """``(final_carry, ys)`` of any cell's ``step``; its VJP chains per-step `jax.vjp` s backwards in time.

    ``noise`` is None: only the built-in cells take the regularisers inside the recursion."""
    assert noise is None, "rnnjax.regularize.check_regularize refuses them for user-written cells"
    return forward(cell, params, xs, carry0, mask, reverse, unroll)


def _stepwise_fwd(
    cell: Cell,
    reverse: bool,
    unroll: int | bool,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    noise: None = None,
) -> tuple[tuple[PyTree, PyTree], tuple]:
    final, carries, ys = scan_steps(cell.step, params, xs, carry0, mask, reverse, unroll)
    return (final, ys), (params, xs, carry0, mask, carries)


def _stepwise_bwd(
    cell: Cell, reverse: bool, unroll: int | bool, saved: tuple, cotangents: tuple
) -> tuple[PyTree, Array, PyTree, None, None]:
    params, xs, carry0, mask, carries = saved
    d_final, d_ys = cotangents
    backward = partial(_stepwise_backward, cell, reverse, unroll)
    split = _rows_split(params, xs)
    if split is None and (groups := row_groups(xs)) > 1:
        # A mesh of Auto axes, whose types do not say how the batch is split: the rows cut into one group
        # per device, each group's recursion run side by side, and the groups' parameter gradients summed
        # once, after the loop, as on an explicit mesh below.
        rows = (xs, carry0, d_final, d_ys)
        by_time = (mask, carries)  # [T, B, ...] leaves
        d_params, d_xs, d_carry0 = jax.vmap(backward, in_axes=(None, 0, 0, 0, 0, 0, 0))(
            params,
            *split_rows(rows[:2], groups),
            *split_rows(by_time, groups, axis=1),
            *split_rows(rows[2:], groups),
        )
        return jax.tree.map(lambda g: jnp.sum(g, axis=0), d_params), *merge_rows((d_xs, d_carry0)), None, None
    if split is None:
        return (*backward(params, xs, carry0, mask, carries, d_final, d_ys), None, None)
    # The batch split over an explicit mesh: each device runs the recursion on its own rows, and the
    # parameter gradient is summed over the devices once, after the loop (`sum_to_type`). Run globally,
    # each step's VJP summed its parameter gradient over the batch, and so over the devices: one all-reduce
    # per step. Rows are independent in every RNN cell's step (masks and lengths are per row too).
    mesh, rows = split
    (axes,) = rows
    time_rows = jax.P(None, axes)  # [T, B, ...] leaves: the carries, the mask
    specs = (jax.P(), rows, rows, None if mask is None else time_rows, time_rows, rows, rows)
    per_device = jax.shard_map(
        backward,
        mesh=mesh,
        in_specs=specs,
        out_specs=(jax.P(), rows, rows),
        axis_names=set(jax.tree.leaves(axes)),
    )
    args = (params, xs, carry0, mask, carries, d_final, d_ys)
    # each argument placed as its spec says, as shard_map requires (a replicated initial carry is split)
    placed: list[PyTree] = [
        tree if spec is None else reshard_to(tree, spec, mesh) for tree, spec in zip(args, specs, strict=True)
    ]
    d_params, d_xs, d_carry0 = per_device(*placed)
    # typed as the primals are (a replicated initial carry gets a replicated gradient)
    return d_params, reshard_like(d_xs, xs), reshard_like(d_carry0, carry0), None, None


def _rows_split(params: PyTree, xs: Array) -> tuple[Any, Any] | None:
    """``(mesh, P(batch axes))`` when ``xs [B, T, I]`` is split over an explicit mesh by its batch axis alone
    and every parameter is replicated: then each device can run the stepwise backward on its own rows."""
    split, spec = batch_split(xs), explicit_spec(xs)
    if split is None or spec is None or any(a is not None for a in spec[1:]):
        return None
    if any(explicit_spec(leaf) is not None for leaf in jax.tree.leaves(params)):
        return None
    return split


def _stepwise_backward(
    cell: Cell,
    reverse: bool,
    unroll: int | bool,
    params: PyTree,
    xs: Array,
    carry0: PyTree,
    mask: Array | None,
    carries: PyTree,
    d_final: PyTree,
    d_ys: PyTree,
) -> tuple[PyTree, Array, PyTree]:
    """``(d params, d xs, d carry0)``: the reverse recursion of `stepwise_bptt_unroll`, per-step VJPs chained
    from ``t = T-1`` down to ``0``."""
    prevs = shift_carries(carry0, carries, reverse)

    def body(acc: tuple[PyTree, PyTree], inp: tuple) -> tuple[tuple[PyTree, PyTree], Array]:
        d_carry, d_params = acc
        x_t, m_t, prev_t, dy_t = inp
        # re-run step t and pull the gradients of its outputs back through it
        _, step_vjp = jax.vjp(cell.step, params, prev_t, x_t)
        d_p, d_prev, d_x = step_vjp((zero_where_not(m_t, d_carry), zero_where_not(m_t, dy_t)))
        # a masked step copied the carry: its gradient passes through unchanged
        d_prev = select(m_t, d_prev, d_carry)
        return (d_prev, jax.tree.map(jnp.add, d_params, d_p)), d_x

    # inside shard_map: the params cast to vary like the steps' other inputs, so that each step's VJP keeps
    # its parameter gradient per device (summed over the devices once, below, not once per step)
    typed, params = params, vary_like(params, xs, carries, d_ys)
    zeros_params = jax.tree.map(jnp.zeros_like, params)
    (d_carry0, d_params), d_xs = jax.lax.scan(
        body,
        (d_final, zeros_params),
        (
            jnp.swapaxes(xs, 0, 1),
            mask,
            prevs,
            jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1), d_ys),
        ),
        reverse=not reverse,
        unroll=unroll,
    )
    d_xs, d_carry0 = sum_to_type((jnp.swapaxes(d_xs, 0, 1), d_carry0), (xs, carry0))
    return sum_to_type(d_params, typed), d_xs, d_carry0


stepwise_bptt_unroll.defvjp(_stepwise_fwd, _stepwise_bwd)
