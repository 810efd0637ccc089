r"""Real-time recurrent learning: the exact gradient forward in time, in memory that does not grow with T.

BPTT stores the sequence and runs backwards; RTRL (Williams and Zipser, "A learning algorithm for continually
running fully recurrent neural networks", Neural Computation 1989) carries the sensitivity of the state to
every parameter forward with the state, so the gradient of a loss summed over steps is ready at every step
(online learning) and nothing of the past is kept::

    s_t = f(s_{t−1}, x_t; θ)                             state s [S] (the carry, flattened), θ [P]
    M_t = ∂s_t/∂θ = (∂f/∂s) M_{t−1} + ∂f/∂θ              [S, P], M_0 = 0 (∂s_0/∂θ: the initial carry is given)
    y_t = out(s_{t−1}, x_t; θ),  ∂y_t/∂θ = (∂out/∂s) M_{t−1} + ∂out/∂θ
    ∂L/∂θ = Σ_t (∂ℓ_t/∂y_t) ∂y_t/∂θ

per sequence, with the two Jacobians of each step from `jax.jacfwd`. The cost is O(S²P) per step and
sequence (O(H⁴) for a dense cell), which is why RTRL is for small networks; the memory is O(B S P) whatever
T is. The gradient is the same number BPTT computes, to round-off, and the tests check it against the
hand-derived BPTT to 1e-10 in float64.

**Diagonal cells** (``cell.diagonal = r``: `indrnn`, `mingru`, `minlstm` with r = 1, the `lru` with r = 2,
whose N units of r state entries each read only their own past and their own parameter entries) need no
``[S, P]`` matrix: each parameter moves one unit, so its sensitivity is r numbers per sequence, and with
``zx = x w_ih + b``::

    D_t = ∂h_t/∂h_{t−1} (r x r per unit)           J_t = ∂h_t/∂zx_t (r entries per gate column)
    m_w[i, g] ← D_t[u(g)] m_w[i, g] + x_t[i] J_t[g]        m_b[g] ← D_t[u(g)] m_b[g] + J_t[g]
    m_u[j]    ← D_t[j] m_u[j] + ∂h_t[j]/∂u[j]             (every per-unit leaf u [N], e.g. IndRNN's)

with u(g) the unit of gate column g. ``D``, ``J`` and ``∂h/∂u`` come from `jax.jvp` of the cell's own
``gates`` (r + G/N + one per leaf). Memory per step is O(B r P) instead of O(B S P), time O(B r² P) instead
of O(B S² P): exact online learning for a few forward passes' cost (Zucchet et al., "Online learning of
long-range dependencies", NeurIPS 2023, for the LRU).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from rnnjax.cells.base import Cell, HCarry, input_projection
from rnnjax.driver import _check_carry, _check_cell, _check_lengths, _check_xs, _zero_padding
from rnnjax.scan import mask_from_lengths
from rnnjax.sharding import batch_like, replicated_if_explicit, sum_to_type, vary_like

Array = jax.Array
PyTree = Any
StepLoss = Callable[[PyTree, Array, PyTree], Array]


def rtrl_value_and_grad(
    cell: Cell,
    params: PyTree,
    readout_params: PyTree,
    xs: Array,
    targets: PyTree,
    step_loss: StepLoss,
    carry: PyTree | None = None,
    lengths: Array | None = None,
    structure: str = "auto",
) -> tuple[Array, tuple[PyTree, PyTree], PyTree]:
    """The loss ``L = Σ_t Σ_b ℓ_t[b]`` and its exact gradient by RTRL, forward in time.

    Args:
      cell: any cell (built-in or user-written).
      params: the cell's params θ.
      readout_params: the parameters of ``step_loss`` (a read-out layer, say); may be ``()``.
      xs: ``[B, T, I]`` floating-point inputs.
      targets: a pytree of ``[B, T, ...]`` arrays, cut per step for ``step_loss``.
      step_loss: ``step_loss(readout_params, y_t [B, H], targets_t) -> [B]``, each sequence's loss at step t.
      carry: the initial carry (a constant); None means zeros.
      lengths: ``[B]`` valid steps; steps ``t >= lengths[b]`` add no loss and keep the carry, as in
        `rnnjax.unroll`.
      structure: ``"auto"`` (default) carries one sensitivity per parameter for a diagonal cell
        (``cell.diagonal``) and the full ``[S, P]`` matrix otherwise; ``"dense"`` always the full matrix.

    Returns:
      ``(loss, (d_params, d_readout_params), final_carry)``. ``d_params`` equals
      ``jax.grad`` of the same loss through `rnnjax.unroll` (BPTT).

    With the batch split over a device mesh each device carries its own sequences' sensitivities, and the
    gradients come out replicated; per device under `jax.shard_map` the loss is the device's own (``psum``
    it) and the gradients are already summed over the devices, as ``jax.grad`` returns them there.

    Raises:
      TypeError, ValueError: at trace time, naming the argument, the expected and the actual, for a
        ``cell`` that is not a `Cell`, ``xs`` that is not a floating-point ``[B, T, I]`` array, ``params``,
        ``carry``, ``lengths`` or ``targets`` that do not fit it, or an unknown ``structure``.

    Examples:
      A GRU with a squared-error read-out of its hidden state; the gradient equals BPTT's:

      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> cell = rj.gru(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs, targets = jnp.ones((2, 5, 3)), jnp.zeros((2, 5, 4))
      >>> step_loss = lambda _, y, target: jnp.sum((y - target) ** 2, axis=-1)
      >>> loss, (d_params, _), carry = rj.rtrl_value_and_grad(cell, params, (), xs, targets, step_loss)
      >>> bptt = jax.grad(lambda p: jnp.sum((rj.unroll(cell, p, xs)[1] - targets) ** 2))(params)
      >>> bool(jnp.allclose(d_params.w_hh, bptt.w_hh, atol=1e-5)), loss.dtype
      (True, dtype('float32'))
    """
    _check_cell(cell)
    xs = _check_xs(xs)
    if xs.ndim != 3:
        raise ValueError(f"xs must have shape [B, T, I], got shape {tuple(xs.shape)}")
    B, T, I = xs.shape
    if cell.check_params is not None:
        cell.check_params(params, I, xs.dtype)
    for leaf in jax.tree.leaves(targets):
        if jnp.shape(leaf)[:2] != (B, T):
            raise ValueError(
                f"every leaf of targets must have shape [B, T, ...] = [{B}, {T}, ...], got {jnp.shape(leaf)}"
            )
    lengths = _check_lengths(lengths, (B,), T)
    carry0 = _check_carry(cell, params, carry, (B,), xs.dtype)
    if structure not in ("auto", "dense"):
        raise ValueError(f"structure must be 'auto' or 'dense', got {structure!r}")
    diagonal = structure == "auto" and bool(cell.diagonal) and cell.is_builtin  # see "Diagonal cells" above
    return _rtrl(cell, step_loss, diagonal, params, readout_params, xs, targets, carry0, lengths)


# One compiled program after the checks (inlined under an outer jit), so that an eager call compiles one
# program rather than one per operation.
@partial(jax.jit, static_argnums=(0, 1, 2))
def _rtrl(
    cell: Cell,
    step_loss: StepLoss,
    diagonal: bool,
    params: PyTree,
    readout_params: PyTree,
    xs: Array,
    targets: PyTree,
    carry0: PyTree,
    lengths: Array | None,
) -> tuple[Array, tuple[PyTree, PyTree], PyTree]:
    T = xs.shape[1]
    mask = None if lengths is None else mask_from_lengths(lengths, T)  # [T, B]
    if mask is not None:  # padding may hold anything: select it away before the step and the loss run on it
        padding = jnp.swapaxes(batch_like(mask.T, xs, 1), 0, 1)
        xs, targets = _zero_padding(xs, padding), jax.tree.map(lambda a: _zero_padding(a, padding), targets)
    # On a device mesh: the carry's rows split like xs's, and, under `jax.shard_map`, each device's
    # sums over its own rows (the loss, the gradients) varying until the one `sum_to_type` at the end.
    carry0 = batch_like(carry0, xs, 1, lengths)
    typed_ro, readout_params = readout_params, vary_like(readout_params, xs, lengths)
    run = _diagonal_rtrl if diagonal else _dense_rtrl
    total, (d_params, d_ro), final = run(cell, params, readout_params, xs, targets, step_loss, carry0, mask)
    return total, (sum_to_type(d_params, params), sum_to_type(d_ro, typed_ro)), final


def _dense_rtrl(
    cell: Cell,
    params: PyTree,
    readout_params: PyTree,
    xs: Array,
    targets: PyTree,
    step_loss: StepLoss,
    carry0: PyTree,
    mask: Array | None,
) -> tuple[Array, tuple[PyTree, PyTree], PyTree]:
    """`rtrl_value_and_grad` for any cell: the full sensitivity ``M [B, S, P]`` of each sequence's state."""
    B, T, _ = xs.shape
    theta, unravel_params = ravel_pytree(params)
    P = theta.shape[0]
    one = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), carry0)  # one sequence's carry
    s_flat, unravel_state = ravel_pytree(one)
    S = s_flat.shape[0]

    def step(s: Array, th: Array, x: Array) -> tuple[Array, Array]:
        """One sequence: flat state [S], flat params [P], input [I] -> (new flat state, output y)."""
        new, y = cell.step(unravel_params(th), jax.tree.map(lambda a: a[None], unravel_state(s)), x[None])
        return ravel_pytree(jax.tree.map(lambda a: a[0], new))[0], y[0]

    def step_and_jacobians(s: Array, th: Array, x: Array) -> tuple:
        """``((new_s, y), ((∂new_s/∂s, ∂new_s/∂θ), (∂y/∂s, ∂y/∂θ)))`` for one sequence, in forward mode."""

        def with_aux(s: Array, th: Array) -> tuple:
            out = step(s, th, x)
            return out, out

        jacobians, out = jax.jacfwd(with_aux, argnums=(0, 1), has_aux=True)(s, th)
        return out, jacobians

    batched = jax.vmap(step_and_jacobians, in_axes=(0, None, 0))

    loss_grads = _loss_grads(step_loss, B)

    def body(state: tuple, t: Array) -> tuple[tuple, None]:
        s, M, total, g_theta, g_ro = state  # s [B, S], M [B, S, P]
        x_t = jax.lax.dynamic_index_in_dim(xs, t, axis=1, keepdims=False)  # no [T, B, I] copy of xs
        tgt_t = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, t, axis=1, keepdims=False), targets)
        valid = None if mask is None else mask[t]
        (new_s, y), ((ds_ds, ds_dth), (dy_ds, dy_dth)) = batched(s, theta, x_t)
        # sensitivities of this step's output and of the new state to θ, through the whole past
        dy = jnp.einsum("bhs,bsp->bhp", dy_ds, M) + dy_dth  # [B, H, P]
        new_M = jnp.einsum("bks,bsp->bkp", ds_ds, M) + ds_dth  # [B, S, P]
        value, (d_ro, d_y) = loss_grads(readout_params, y, tgt_t, valid)
        g_theta = g_theta + jnp.einsum("bh,bhp->p", d_y, dy, out_sharding=replicated_if_explicit(d_y, dy))
        g_ro = jax.tree.map(jnp.add, g_ro, d_ro)
        s, M = (new_s, new_M) if valid is None else _keep(valid, (new_s, new_M), (s, M))
        return (s, M, total + value, g_theta, g_ro), None

    s0 = jax.vmap(lambda c: ravel_pytree(c)[0])(carry0)  # [B, S]
    init = (
        s0,
        batch_like(jnp.zeros((B, S, P), theta.dtype), s0, 1),
        *vary_like((jnp.zeros((), theta.dtype), jnp.zeros((P,), theta.dtype)), s0),
        jax.tree.map(jnp.zeros_like, readout_params),
    )
    (s, _, total, g_theta, g_ro), _ = jax.lax.scan(body, init, jnp.arange(T))
    final = jax.vmap(unravel_state)(s)
    return total, (unravel_params(g_theta), g_ro), final


def _loss_grads(step_loss: StepLoss, B: int) -> Callable:
    """``(readout_params, y [B, H], targets_t, valid [B] or None) -> (Σ valid losses, (d readout, d y))``."""

    def per_example_loss(ro: PyTree, y: Array, tgt: PyTree, valid: Array | None) -> Array:
        losses = step_loss(ro, y, tgt)
        if jnp.shape(losses) != (B,):
            raise ValueError(
                f"step_loss must return per-sequence losses of shape [B] = ({B},), got {jnp.shape(losses)}"
            )
        return jnp.sum(losses if valid is None else jnp.where(valid, losses, jnp.zeros_like(losses)))

    return jax.value_and_grad(per_example_loss, argnums=(0, 1))


def _keep(valid: Array, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where the step is valid (``valid [B]``), ``old`` (the state entering it) elsewhere."""
    return jax.tree.map(lambda n, o: jnp.where(valid.reshape(-1, *(1,) * (n.ndim - 1)), n, o), new, old)


def _diagonal_rtrl(
    cell: Cell,
    params: PyTree,
    readout_params: PyTree,
    xs: Array,
    targets: PyTree,
    step_loss: StepLoss,
    carry0: HCarry,
    mask: Array | None,
) -> tuple[Array, tuple[PyTree, PyTree], HCarry]:
    """`rtrl_value_and_grad` for a (block-)diagonal cell: r sensitivities per parameter and sequence.

    The state ``h [B, S]`` is N = S / r units of r entries (``h[:, a·N + j]`` is unit j's entry a); gate
    column g and entry j of a per-unit leaf belong to unit ``g mod N`` and j. Sensitivities keep a leading
    axis of r: ``m_w [B, r, I, G]``, ``m_b [B, r, G]``, ``m_u [B, r, N]``.
    """
    B, T, I = xs.shape
    r = int(cell.diagonal)
    S = carry0.h.shape[-1]
    N = S // r
    G = params.w_ih.shape[-1]
    k = G // N  # gate blocks of N columns
    unit_leaves = [f for f in params._fields if f not in ("w_ih", "b")]  # each [N]: one entry per unit
    loss_grads = _loss_grads(step_loss, B)
    gates = cell.gates
    assert gates is not None, "the diagonal RTRL runs only for a built-in cell"

    def new_h(p: PyTree, zx: Array, h: Array) -> Array:
        return gates(p, zx, None, HCarry(h=h))[0].h

    def blocks(v: Array) -> Array:
        """``[B, S] -> [B, r, N]``: entry a of unit j at ``[:, a, j]``."""
        return v.reshape(B, r, N)

    def slot(like: Array, j: int) -> Array:
        """A tangent typed like ``like [B, n·N]``, 1 in block j (of N entries) and 0 elsewhere."""
        return jnp.zeros_like(like).at[:, j * N : (j + 1) * N].set(1)

    def local_derivatives(zx: Array, h: Array) -> tuple[Array, Array, Array, dict[str, Array]]:
        """``(h_t, D [B, r, r, N], J [B, r, G], {leaf: ∂h_t/∂leaf [B, r, N]})`` from jvps of the gates."""
        h_new = new_h(params, zx, h)
        # D[:, a, c, j] = ∂h_t[a·N + j] / ∂h_{t-1}[c·N + j]: one jvp per entry c of every unit
        D = jnp.stack(
            [blocks(jax.jvp(lambda v: new_h(params, zx, v), (h,), (slot(h, c),))[1]) for c in range(r)],
            axis=2,
        )
        # J[:, a, q·N + j] = ∂h_t[a·N + j] / ∂zx_t[q·N + j]: one jvp per gate block q
        J = jnp.concatenate(
            [blocks(jax.jvp(lambda z: new_h(params, z, h), (zx,), (slot(zx, q),))[1]) for q in range(k)],
            axis=-1,
        )
        by_leaf = {
            f: blocks(
                jax.jvp(
                    lambda v, f=f: new_h(params._replace(**{f: v}), zx, h),
                    (getattr(params, f),),
                    (jnp.ones_like(getattr(params, f)),),
                )[1]
            )
            for f in unit_leaves
        }
        return h_new, D, J, by_leaf

    def per_gate(a: Array) -> Array:
        """``[..., N] -> [..., G]``: unit j's value in every gate column of unit j."""
        return jnp.concatenate([a] * k, axis=-1)

    def body(state: tuple, t: Array) -> tuple[tuple, None]:
        h, m_w, m_b, m_u, total, g_w, g_b, g_u, g_ro = state
        x_t = jax.lax.dynamic_index_in_dim(xs, t, axis=1, keepdims=False)  # [B, I]
        tgt_t = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, t, axis=1, keepdims=False), targets)
        valid = None if mask is None else mask[t]
        h_new, D, J, dh_du = local_derivatives(input_projection(params, x_t), h)
        Dg = per_gate(D)  # [B, r, r, G]
        # each sensitivity goes through its own unit's recurrence and gains this step's direct effect
        new_m_w = jnp.einsum("bacg,bcig->baig", Dg, m_w) + x_t[:, None, :, None] * J[:, :, None, :]
        new_m_b = jnp.einsum("bacg,bcg->bag", Dg, m_b) + J
        new_m_u = {f: jnp.einsum("bacn,bcn->ban", D, m_u[f]) + dh_du[f] for f in unit_leaves}
        value, (d_ro, d_y) = loss_grads(readout_params, h_new, tgt_t, valid)  # y_t = h_t
        d_y = blocks(d_y)  # [B, r, N]
        dyg = per_gate(d_y)  # [B, r, G]
        over_batch = replicated_if_explicit(d_y)  # the weight gradients sum the batch's rows
        g_w = g_w + jnp.einsum("bag,baig->ig", dyg, new_m_w, out_sharding=over_batch)
        g_b = g_b + jnp.einsum("bag,bag->g", dyg, new_m_b, out_sharding=over_batch)
        g_u = {
            f: g_u[f] + jnp.einsum("ban,ban->n", d_y, new_m_u[f], out_sharding=over_batch)
            for f in unit_leaves
        }
        new = (h_new, new_m_w, new_m_b, new_m_u)
        h, m_w, m_b, m_u = new if valid is None else _keep(valid, new, (h, m_w, m_b, m_u))
        g_ro = jax.tree.map(jnp.add, g_ro, d_ro)
        return (h, m_w, m_b, m_u, total + value, g_w, g_b, g_u, g_ro), None

    dtype = xs.dtype
    init = (
        carry0.h,
        *batch_like(
            (
                jnp.zeros((B, r, I, G), dtype),
                jnp.zeros((B, r, G), dtype),
                {f: jnp.zeros((B, r, N), dtype) for f in unit_leaves},
            ),
            carry0.h,
            1,
        ),
        *vary_like(
            (
                jnp.zeros((), dtype),
                jnp.zeros((I, G), dtype),
                jnp.zeros((G,), dtype),
                {f: jnp.zeros((N,), dtype) for f in unit_leaves},
            ),
            carry0.h,
        ),
        jax.tree.map(jnp.zeros_like, readout_params),
    )
    (h, _, _, _, total, g_w, g_b, g_u, g_ro), _ = jax.lax.scan(body, init, jnp.arange(T))
    d_params = params._replace(w_ih=g_w, b=g_b, **g_u)
    return total, (d_params, g_ro), carry0._replace(h=h)
