"""The `Cell` type: a recurrent cell as three pure functions, plus an optional hand-derived backward.

A cell is what `jax.lax.scan` steps over time::

    carry, y = cell.step(params, carry, x)        # x [B, I] -> y [B, H]

Any `step` works with `rj.unroll` and `rj.gradcheck`. The built-in cells also supply a `GatesBackward`, the
pieces that the hand-derived BPTT driver needs: every one of them is an affine input projection, an affine
recurrent projection and an elementwise "gates" function,

    zx_t = x_t w_ih + b          [B, G]   (hoisted: one GEMM over all T before the time loop)
    zh_t = h_{t-1} w_hh          [B, G]   (the only GEMM inside the loop)
    carry_t, res_t = gates(params, zx_t, zh_t, carry_{t-1})

and `GatesBackward.gates_bwd` is the hand-derived derivative of `gates` (see each cell's module). A cell
whose params have no ``w_hh`` (a diagonal recurrence like `indrnn`, or none at all like `mingru`) gets
``zh_t = None`` and does its recurrence inside ``gates``. A cell with a `GatesBackward` has its ``step``
written from its ``gates`` (`projection_step`), so that training and decoding cannot disagree.

Cells are static structure: frozen, hashable, with no pytree leaves (`jax.tree_util.register_static`), so a
cell may be an argument of `jax.jit`, `jax.grad` and `jax.vmap`, or a field of an Equinox module. Built-in
cells compare equal by their configuration (``rj.lstm(8) == rj.lstm(8)``), so a rebuilt cell hits the
compilation cache; a user-written cell compares by its functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from rnnjax.cells.linear import LinearRecurrence, linear_step

Array = jax.Array
PyTree = Any


class HCarry(NamedTuple):
    """Carry of the cells whose whole state is the hidden vector (`elman`, `gru`)."""

    h: Array  # [B, H]


class LSTMCarry(NamedTuple):
    """Carry of the LSTM: hidden state and cell state."""

    h: Array  # [B, H]
    c: Array  # [B, H]


@runtime_checkable
class HiddenCarry(Protocol):
    """What the hand-derived backward reads of a carry: a NamedTuple with the hidden state ``h [B, H]``
    (more fields, such as the LSTM's ``c``, may follow)."""

    h: Array

    def _replace(self, **kwargs: Any) -> Any: ...


@runtime_checkable
class ProjectionParams(Protocol):
    """What the hand-derived backward reads of a cell's params: a NamedTuple with the input weights
    ``w_ih [I, G]``; ``w_hh [H, G]`` and ``b [G]`` where the cell has them (the driver reads them with
    ``hasattr``), and any further per-cell fields (e.g. the GRU's ``b_hn``), whose gradients
    `GatesBackward.extra_grads` computes."""

    w_ih: Array


class RowSum(NamedTuple):
    """A per-row term ``v [B, n]`` in the ``aux`` of `GatesBackward.gates_bwd`, to be summed over the batch
    (over every axis but the last, with more batch axes).

    A step's share of a per-unit parameter's gradient (IndRNN's ``dz ⊙ h_{t-1}``, the GRU's ``dhn``) is a
    sum over the batch. The cell returns the rows and the driver reduces them inside its time loop, right
    after ``gates_bwd``: ``extra_grads`` then receives, in its place, the stacked shares, which it adds up
    with `steps_sum` (``rj.steps_sum``). Summed in the loop, they stack as ``[T+1, n]``, where ``[T+1, B,
    n]`` products formed after the loop would take a buffer each. The driver decides how to sum: where the
    batch is split over devices it keeps each device's rows (``[T+1, B, n]``), so that the loop runs no
    collective, and `steps_sum` then sums them once (``jnp.sum(d, axis=0)`` would leave the rows).

    Examples:
      A per-unit gain ``g`` (``[H]``) on an Elman cell's pre-activation, ``h = tanh(g ⊙ (zx + zh))``: its
      share of ``d g`` at a step is ``Σ_b dh ⊙ (1 − h²) ⊙ (zx + zh)``, returned as rows for the driver to
      sum, and ``extra_grads`` adds the steps up:

      >>> import jax.numpy as jnp, rnnjax as rj
      >>> def gates_bwd(params, res, prev, new, d_new):
      ...     a, h = res  # zx + zh, and h
      ...     da = d_new.h * (1 - h * h)
      ...     return da * params.g, None, rj.HCarry(jnp.zeros_like(da)), rj.RowSum(da * a)
      >>> def extra_grads(params, grads, dzx, dzh, prevs, res, d_g):
      ...     return {"g": rj.steps_sum(d_g)}
    """

    v: Array  # [B, n]


class WeightGemm(NamedTuple):
    """A weight gradient that `GatesBackward.extra_grads` asks the driver to compute: ``Σ aᵀ b`` over every
    leading axis of ``a [..., P]`` and ``b [..., G]`` (e.g. the steps and the batch of ``[T+1, B, P]`` and
    ``[T+1, B, G]``), ``[P, G]``.

    The driver runs it as one GEMM, in the form that suits where the rows live (flattened in the same
    ``(t, b)`` order on one device; each device's own rows and one all-reduce where the batch is split),
    accumulating narrower floats than float32 in float32, and rounds it to ``a``'s dtype.
    """

    a: Array  # [..., P]
    b: Array  # [..., G]


@dataclasses.dataclass(frozen=True)
class GatesBackward:
    """The optional hand-derived backward of a cell: its gate math and the derivative of that math.

    The hand-derived BPTT driver (`rnnjax.bptt`) runs every cell that has one; a cell without one is
    differentiated step by step through `jax.vjp` of its ``step``. The params must be `ProjectionParams`
    (``w_ih``, and ``w_hh``/``b`` where present) and the carry a `HiddenCarry` (a NamedTuple with ``h``).

    Attributes:
      gates: ``gates(params, zx [B, G], zh [B, G] or None, carry) -> (carry, res)``: one step from the
        projected input ``zx = x w_ih + b`` and the recurrent product ``zh = h w_hh``; ``res`` is whatever
        the backward needs of the step (e.g. the LSTM's activations ``[B, 4H]``).
      gates_bwd: ``gates_bwd(params, res, carry_prev, carry_new, d_carry_new)
        -> (dzx [B, G], dzh [B, G] or None, d_carry_prev)``; ``dzh=None`` means ``dzh == dzx``, and
        ``d_carry_prev`` holds only the elementwise paths (the driver adds ``dzh @ w_hhᵀ``). It may return
        a fourth element, ``aux``: any per-step pytree that ``extra_grads`` needs besides the gate gradients
        (e.g. ``dh_t`` for a projection's weight). A `RowSum` in it is a per-row term that the driver sums
        over the batch in the loop (the layer norm gains' gradients): ``extra_grads`` gets its stacked sums
        in its place. ``gates_bwd`` is elementwise math on its rows and needs no knowledge of devices.
      gate_names: the names of the G blocks of ``H`` columns along the last axis of ``w_ih``, ``w_hh`` and
        ``b`` (e.g. ``("i", "f", "g", "o")``); `rnnjax.gradcheck` names a faulty gate by them, and the time
        loops read each projected row (and each residual as wide) by these blocks
        (`rnnjax.scan.read_row`), so that ``gates`` and ``gates_bwd`` should slice them by the same blocks.
      extra_grads: ``extra_grads(params, grads, dzx, dzh, prevs, res[, aux]) -> dict`` of gradients of the
        parameter fields other than ``w_ih``, ``w_hh`` and ``b`` (e.g. the MGU's ``u_h``, IndRNN's ``u``),
        each an array, or a `WeightGemm` for the driver to compute,
        once over all T after the backward loop, from the driver's gradients of those (``grads``, a dict
        by field name) and every step's gate gradients ``dzx``/``dzh``, entering carry ``prevs``,
        residuals ``res`` and, when ``gates_bwd`` returns one, ``aux``; or None. Every stacked leaf has
        T + 1 rows, in the same order for all: one per step, and one spare row where ``dzx``, ``dzh``,
        ``res`` and ``aux`` are zero and ``prevs`` holds the final carry. So a sum over all rows is a sum
        over the steps, and nothing is sliced (a slice of the T steps' rows is a copy).
      extra_from_aux: True when ``extra_grads`` reads only ``params``, ``grads`` and ``aux`` (it is then
        given None for ``dzx``, ``dzh``, ``prevs`` and ``res``). Per-unit parameters do so with ``aux``
        summed over the batch in the loop (`RowSum`; the GRU's ``b_hn``, the peepholes, the layer-norm
        gains). The backward may then write each step's ``dzx`` over its residuals
        (`rnnjax.scan.residual_slot`). The LRU's ``d γ_log`` comes from ``grads``: γ scales ``zx``.
      dzh_shared: k, the number of leading columns in which ``gates_bwd``'s ``dzh`` equals its ``dzx``
        (0: none, or ``dzh`` is None). The backward then stores only ``dzh[:, k:]`` for every step (the
        GRU's ``dhn``: 2H of its 3H columns are shared; the MGU's ``dzh`` is ``dzx[:, :H]``).
      diagonal: 0, or r for a cell whose carry is `HCarry(h [B, r·N])` made of N independent units of r
        entries (``h[:, a·N + j]`` is unit j's entry a: ``∂h_t/∂h_{t-1}`` is block-diagonal), whose gate
        column g feeds only unit ``g mod N``, and whose parameters besides ``w_ih`` and ``b`` have one
        entry per unit ([N]). `rnnjax.rtrl_value_and_grad` then keeps r sensitivities per parameter. 1 for
        `indrnn`, `mingru` and `minlstm`; 2 for `lru` (real and imaginary parts). The backward reads the
        carries and the output gradients by these r blocks (`rnnjax.scan.read_row`).

    Raises:
      TypeError: if ``gates``, ``gates_bwd`` or ``extra_grads`` is not a function, ``gate_names`` is not a
        tuple of str, or a field does not hash.
      ValueError: if ``extra_from_aux`` is True without ``extra_grads``.

    Examples:
      A tanh Elman cell's gates and their derivative (``dh_t ⊙ (1 − h_t²)``), put in place of `elman`'s:

      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> def gates(params, zx, zh, carry):
      ...     h = jnp.tanh(zx + zh)
      ...     return rj.HCarry(h), h
      >>> def gates_bwd(params, h, prev, new, d_new):
      ...     dz = d_new.h * (1 - h * h)
      ...     return dz, None, rj.HCarry(jnp.zeros_like(dz))
      >>> backward = rj.GatesBackward(gates=gates, gates_bwd=gates_bwd, gate_names=("h",))
      >>> cell = rj.elman(4).replace(backward=backward)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> xs = jnp.ones((2, 5, 3))
      >>> bool(jnp.allclose(rj.unroll(cell, params, xs)[1], rj.unroll(rj.elman(4), params, xs)[1]))
      True
    """

    gates: Callable[..., tuple[PyTree, PyTree]]
    gates_bwd: Callable[..., tuple[Any, ...]]
    gate_names: tuple[str, ...] = ()
    extra_grads: Callable[..., dict[str, Any]] | None = None
    extra_from_aux: bool = False
    dzh_shared: int = 0
    diagonal: int = 0

    def __post_init__(self) -> None:
        for field in ("gates", "gates_bwd"):
            if not callable(getattr(self, field)):
                raise TypeError(
                    f"GatesBackward.{field} must be a function, got {type(getattr(self, field)).__name__}"
                )
        if not isinstance(self.gate_names, tuple) or not all(isinstance(n, str) for n in self.gate_names):
            raise TypeError(f"GatesBackward.gate_names must be a tuple of str, got {self.gate_names!r}")
        if self.extra_from_aux and self.extra_grads is None:
            raise ValueError(
                "GatesBackward.extra_from_aux=True says extra_grads reads only aux, but extra_grads is None: "
                "give extra_grads, or leave extra_from_aux False"
            )
        if self.extra_grads is not None and not callable(self.extra_grads):
            raise TypeError(
                f"GatesBackward.extra_grads must be a function or None, got {type(self.extra_grads).__name__}"
            )
        _check_hashable(self)


def _check_hashable(obj: Any) -> None:
    """A clear error naming the field of a `Cell` or `GatesBackward` that does not hash (a cell is a static
    argument of the compiled programs, compared and hashed by its fields)."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        try:
            hash(value)
        except TypeError as e:
            raise TypeError(
                f"{type(obj).__name__}.{field.name} must be hashable (a cell is static structure under "
                f"jax.jit), got a {type(value).__name__}: {e}. Use a tuple for a list, and a function or a "
                "frozen dataclass rather than an object with mutable state"
            ) from None


_BACKWARD_FIELDS = tuple(f.name for f in dataclasses.fields(GatesBackward))


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class Cell:
    """A recurrent cell: three pure functions over a parameter pytree, and optionally a hand-derived backward.

    Attributes:
      init: ``init(key, input_size, dtype=None) -> params``; ``dtype=None`` means JAX's default float
        dtype (float32, or float64 under ``jax_enable_x64``).
      initial_carry: ``initial_carry(params, batch_shape=()) -> carry``, zeros (S0 = 0).
      step: ``step(params, carry, x) -> (carry, y)``, one time step; ``x [B, I]``. With a ``backward``,
        leave it out: it is written from ``backward.gates`` (`projection_step`).
      hidden_size: H, where the cell has one (the layers need it to know their output size).
      name: a short human-readable name, used in reports.
      backward: a `GatesBackward` (built-in cells), or None: ``grad="manual"`` then runs a reverse-time
        recursion of per-step `jax.vjp` s of ``step``.
      check_params: ``check_params(params, input_size, dtype)`` raises a clear error when ``params`` do not
        fit the cell; or None.
      proj_size: P, for a cell whose output (and ``h``) is a projection of width P of its H-wide state
        (`projected_lstm`); None otherwise. See `output_size`.
      config: a hashable description of the cell's configuration (the built-in factories set it, e.g.
        ``("lstm", 8, 0.0, None, None, None)``). Cells with equal ``config`` are equal and hash equal; a
        cell with ``config=None`` is equal only to a cell with the same functions and settings.
      linear: a `LinearRecurrence` for a cell whose step is ``h_t = a_t ⊙ h_{t-1} + b_t`` with ``a_t``,
        ``b_t`` from ``x_t`` alone (`mingru`, `minlstm`, `lru`, `indrnn` with the identity), which
        ``rj.unroll(..., method="associative")`` solves as a parallel scan over time; or None. With
        ``linear`` and neither ``step`` nor ``backward``, the step is written from it (`linear_step`).

    A user-written cell needs only ``init``, ``initial_carry`` and ``step``::

        cell = rj.Cell(init=my_init, initial_carry=my_initial_carry, step=my_step, hidden_size=H)

    Its ``step`` must treat the rows of the batch independently, as every RNN cell does (lengths mask rows
    one by one; with the batch split over an explicit mesh, its backward runs on each device's own rows).

    Raises:
      TypeError: if ``init``, ``initial_carry``, ``step`` or ``backward`` is of the wrong type, neither
        ``step`` nor ``backward`` is given, ``hidden_size`` is not an int, or a field does not hash.
      ValueError: if both ``step`` and ``backward`` are given (the step is written from the backward's
        gates), or ``hidden_size`` is below 1.

    Examples:
      A user-written cell, ``h_t = tanh([x_t, h_{t-1}] w)``; `unroll` differentiates it with `jax.vjp`:

      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> def init(key, input_size, dtype=None):
      ...     return {"w": 0.1 * jax.random.normal(key, (input_size + 4, 4), dtype or jnp.float32)}
      >>> def initial_carry(params, batch_shape=()):
      ...     return jnp.zeros((*batch_shape, 4), params["w"].dtype)
      >>> def step(params, h, x):
      ...     h = jnp.tanh(jnp.concatenate([x, h], axis=-1) @ params["w"])
      ...     return h, h
      >>> cell = rj.Cell(init=init, initial_carry=initial_carry, step=step, hidden_size=4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> carry, ys = rj.unroll(cell, params, jnp.ones((2, 5, 3)))
      >>> carry.shape, ys.shape, ys.dtype
      ((2, 4), (2, 5, 4), dtype('float32'))
    """

    init: Callable[..., PyTree]
    initial_carry: Callable[..., PyTree]
    step: Callable[[PyTree, PyTree, Array], tuple[PyTree, PyTree]] = None  # type: ignore[assignment]
    hidden_size: int | None = None
    name: str = "custom"
    backward: GatesBackward | None = None
    check_params: Callable[..., None] | None = None
    proj_size: int | None = None
    config: Hashable | None = None
    linear: LinearRecurrence | None = None

    def __post_init__(self) -> None:
        for field in ("init", "initial_carry"):
            if not callable(getattr(self, field)):
                raise TypeError(f"Cell.{field} must be a function, got {type(getattr(self, field)).__name__}")
        if self.backward is not None and not isinstance(self.backward, GatesBackward):
            raise TypeError(
                f"Cell.backward must be an rj.GatesBackward or None, got {type(self.backward).__name__}"
            )
        if self.linear is not None and not isinstance(self.linear, LinearRecurrence):
            raise TypeError(
                f"Cell.linear must be an rj.LinearRecurrence or None, got {type(self.linear).__name__}"
            )
        if self.step is None:
            if self.backward is not None:
                object.__setattr__(self, "step", projection_step(self.backward.gates))
            elif self.linear is not None:
                object.__setattr__(self, "step", linear_step(self.linear))
            else:
                raise TypeError(
                    "Cell needs a step function (or a backward=rj.GatesBackward or a "
                    "linear=rj.LinearRecurrence to write it from)"
                )
        elif not callable(self.step):
            raise TypeError(f"Cell.step must be a function, got {type(self.step).__name__}")
        elif (
            self.backward is not None and getattr(self.step, "_rnnjax_gates", None) is not self.backward.gates
        ):
            raise ValueError(
                "a Cell with a hand-derived backward writes its step from backward.gates, so that training "
                "and decoding cannot disagree: pass step=None (leave it out), or backward=None to use "
                "your own step"
            )
        if self.hidden_size is not None:
            check_hidden_size(self.hidden_size)
        _check_hashable(self)

    def _key(self) -> tuple:
        if self.config is not None:
            return ("config", self.config)
        # a step written from the backward's gates is a function of them: left out, so that two cells
        # built from the same parts are equal
        derived = self.backward is not None or self._step_from_linear()
        return tuple(
            getattr(self, f.name) for f in dataclasses.fields(self) if not (derived and f.name == "step")
        )

    def _step_from_linear(self) -> bool:
        return self.linear is not None and getattr(self.step, "_rnnjax_linear", None) is self.linear

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def replace(self, **changes: Any) -> Cell:
        """A copy with ``changes``; the fields of the `backward` (``gates``, ``gates_bwd``, ...) may be given
        by name. The copy's ``config`` is None unless given (it is no longer the built-in configuration),
        and its ``step`` is written anew from the new gates unless given."""
        back = {k: changes.pop(k) for k in list(changes) if k in _BACKWARD_FIELDS}
        if back:
            if self.backward is None:
                raise ValueError(f"cell {self.name!r} has no backward to change {sorted(back)} in")
            changes["backward"] = dataclasses.replace(self.backward, **back)
        rewrite = "backward" in changes or ("linear" in changes and self._step_from_linear())
        if rewrite and "step" not in changes:
            changes["step"] = None
        changes.setdefault("config", None)
        return dataclasses.replace(self, **changes)

    @property
    def output_size(self) -> int | None:
        """The width of ``h`` and of every output ``y_t``: ``proj_size`` if set, else ``hidden_size``."""
        return self.hidden_size if self.proj_size is None else self.proj_size

    @property
    def is_builtin(self) -> bool:
        """Whether the cell supplies a hand-derived backward (and so uses the fast BPTT driver)."""
        return self.backward is not None

    # the backward's parts, read by the drivers (None or the defaults for a cell without one)
    @property
    def gates(self) -> Callable[..., tuple[PyTree, PyTree]] | None:
        return None if self.backward is None else self.backward.gates

    @property
    def gates_bwd(self) -> Callable[..., tuple[Any, ...]] | None:
        return None if self.backward is None else self.backward.gates_bwd

    @property
    def extra_grads(self) -> Callable[..., dict[str, Any]] | None:
        return None if self.backward is None else self.backward.extra_grads

    @property
    def gate_names(self) -> tuple[str, ...]:
        return () if self.backward is None else self.backward.gate_names

    @property
    def extra_from_aux(self) -> bool:
        return False if self.backward is None else self.backward.extra_from_aux

    @property
    def dzh_shared(self) -> int:
        return 0 if self.backward is None else self.backward.dzh_shared

    @property
    def diagonal(self) -> int:
        return 0 if self.backward is None else self.backward.diagonal


def cell_config(name: str, args: dict[str, Any]) -> Hashable | None:
    """A built-in factory's `Cell.config`: its name and arguments, ``("lstm", ("forget_bias", 0.0), ...)``;
    None when an argument does not hash (the cell is then equal only to itself)."""
    config = (name, *sorted(args.items()))
    try:
        hash(config)
    except TypeError:
        return None
    return config


def check_hidden_size(hidden_size: Any, what: str = "hidden_size") -> int:
    """Validates a cell's ``hidden_size`` (or another width named ``what``: an int >= 1) and returns it."""
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int):
        raise TypeError(
            f"{what} must be an int >= 1, got {hidden_size!r} of type {type(hidden_size).__name__}"
        )
    if hidden_size < 1:
        raise ValueError(f"{what} must be >= 1, got {hidden_size}")
    return hidden_size


def check_input_size(input_size: Any) -> int:
    """Validates ``input_size`` given to a cell's ``init`` (an int >= 1) and returns it."""
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be an int >= 1, got {input_size!r}")
    return input_size


def default_float_dtype() -> jnp.dtype:
    """JAX's default floating-point dtype: float64 under ``jax_enable_x64``, else float32."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def check_float_dtype(dtype: Any, what: str = "dtype") -> jnp.dtype:
    """Returns ``dtype`` as a numpy dtype (None: `default_float_dtype`), or raises TypeError unless it is a
    floating-point type."""
    if dtype is None:
        return default_float_dtype()
    dt = jnp.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"{what} must be a floating-point dtype, got {dt}")
    return dt


def uniform_init(bound: float) -> Callable[[Array, tuple[int, ...], Any], Array]:
    """PyTorch's RNN initializer: U(-bound, bound), with ``bound = 1/sqrt(H)``."""

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype in which sums of ``dtype`` values accumulate: float32 for narrower floats, else ``dtype``."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype


def steps_sum(a: Array) -> Array:
    """The per-step shares of a `RowSum`, stacked by the time loop, added up: once, after the loop.

    Args:
      a: ``[T+1, n]``, or ``[T+1, B, n]`` where the batch is split over devices and the loop keeps each
        device's rows.

    Returns:
      ``[n]``: the sum over every axis but the last.

    Examples:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> rj.steps_sum(jnp.ones((4, 3))), rj.steps_sum(jnp.ones((4, 2, 3)))
      (Array([4., 4., 4.], dtype=float32), Array([8., 8., 8.], dtype=float32))
    """
    return jnp.sum(a, axis=tuple(range(a.ndim - 1)))


def add_bias(z: Array, b: Array) -> Array:
    """``z [..., G] + b [G]`` with ``b`` broadcast explicitly (safe under rank_promotion="raise")."""
    return z + b.reshape((1,) * (z.ndim - b.ndim) + b.shape)


def gate_blocks(zx: Array, zh: Array | None, n: int) -> list[Array]:
    """The ``n`` equal column blocks of ``zx + zh`` (``[B, G]`` each, ``zh`` may be None), each block summed
    apart, ``[B, G/n]``.

    Summed by blocks, every slice of the projected row stays a slice of its own read, which XLA folds into
    that read (`rnnjax.scan.read_row`); a sum over the whole row first would be sliced again after it, and
    XLA would copy the row's blocks to assemble it.
    """
    W = zx.shape[-1] // n
    parts = [zx[..., k * W : (k + 1) * W] for k in range(n)]
    return parts if zh is None else [p + zh[..., k * W : (k + 1) * W] for k, p in enumerate(parts)]


def input_projection(params: PyTree, x: Array) -> Array:
    """``zx = x w_ih + b`` of a built-in cell, ``x [..., I] -> [..., G]``; ``x w_ih`` alone without ``b``.

    A cell whose params have no ``b`` (`layer_norm_lstm`, which normalises ``x w_ih`` before any shift)
    gets the bare product.
    """
    z = x @ params.w_ih
    return add_bias(z, params.b) if hasattr(params, "b") else z


def projection_step(gates: Callable[..., tuple[PyTree, PyTree]]) -> Callable:
    """The one-step function of a built-in cell, written from its ``gates``.

    ``step(params, carry, x)``: ``zx = x w_ih + b``, ``zh = h w_hh``, then the gates; ``y`` is the new ``h``.
    """

    def step(params: PyTree, carry: PyTree, x: Array) -> tuple[PyTree, Array]:
        zx = input_projection(params, x)
        zh = carry.h @ params.w_hh if hasattr(params, "w_hh") else None
        new, _ = gates(params, zx, zh, carry)
        return new, new.h

    step._rnnjax_gates = gates  # type: ignore[attr-defined]  # what `Cell` checks a given step against
    return step


def check_projection_params(
    params: PyTree,
    *,
    name: str,
    fields: tuple[str, ...],
    gate_count: int,
    hidden_size: int,
    input_size: int,
    dtype: Any,
    extra_shapes: dict[str, tuple[int, ...]] | None = None,
    recurrent_gate_count: int | None = None,
    size_label: str = "hidden_size",
) -> None:
    """Checks a built-in cell's params: fields, shapes ``w_ih [I, G]``, ``w_hh [H, G_h]``, ``b [G]``, dtype.

    ``G = gate_count · H``; ``G_h = recurrent_gate_count · H`` (default: ``G``) for a cell whose recurrent
    GEMM feeds only some of its gates. Errors name the field, the expected shape (in I, H, G letters and
    numbers) and the actual shape; ``size_label`` names H in them (e.g. ``"state_size"`` for the LRU).
    """
    missing = [f for f in fields if not hasattr(params, f)]
    if missing:
        raise TypeError(
            f"params for {name} must be a NamedTuple with fields {fields}; "
            f"got {type(params).__name__} without {missing}"
        )
    H, I = hidden_size, input_size
    G = gate_count * H
    gl = "" if gate_count == 1 else f"{gate_count}"
    rg = gate_count if recurrent_gate_count is None else recurrent_gate_count
    rgl = "" if rg == 1 else f"{rg}"
    expected = {
        "w_ih": ((I, G), f"[I, {gl}H] = [{I}, {G}]"),
        "w_hh": ((H, rg * H), f"[H, {rgl}H] = [{H}, {rg * H}]"),
        "b": ((G,), f"[{gl}H] = [{G}]"),
    }
    if "w_hh" not in fields:  # a cell with a diagonal recurrence, or none
        del expected["w_hh"]
    if "b" not in fields:  # a cell that shifts its gates after normalising them
        del expected["b"]
    for field, shape in (extra_shapes or {}).items():
        expected[field] = (shape, f"{list(shape)}")
    for field, (shape, text) in expected.items():
        leaf = getattr(params, field)
        actual = tuple(getattr(leaf, "shape", ()))
        if field == "w_ih" and len(actual) == 2 and actual[1] == G and actual[0] != I:
            raise ValueError(
                f"xs has feature size I={I} but params.w_ih has shape {actual}, which expects "
                f"I={actual[0]}: the last axis of xs must match the input_size the params were made with"
            )
        if actual != shape:
            raise ValueError(
                f"params.{field} of {name} ({size_label}={H}) must have shape {text}, got {actual}"
            )
        leaf_dtype = jnp.dtype(getattr(leaf, "dtype", None))
        if leaf_dtype != jnp.dtype(dtype):
            raise TypeError(
                f"params.{field} has dtype {leaf_dtype} but xs has dtype {jnp.dtype(dtype)}; "
                "cast one of them so that they match, or pass compute_dtype= for mixed precision"
            )
