"""Layers: compositions of cells into the RNN shapes people use.

A `Layer` is the second abstraction beside `Cell`, a NamedTuple of pure functions::

    params = layer.init(key, input_size, dtype=jnp.float32)
    carry, ys = layer.apply(params, xs, carry=None, lengths=None, grad="manual", key=None, train=False)

``xs [B, T, I] -> ys [B, T, layer.output_size]``. Every recurrence inside runs `rj.unroll`, so with
``grad="manual"`` every gradient through time is the hand-derived BPTT; the glue between layers
(concatenation, sums, residual adds, dropout) is differentiated by JAX.

- `rnn(cell)`: one cell, one direction.
- `bidirectional(cell_fw, cell_bw)`: a forward and a reverse pass, merged by concatenation or sum. With
  ``lengths`` the reverse pass starts at each sequence's last valid step, as PyTorch's packed sequences do
  (Schuster and Paliwal, "Bidirectional recurrent neural networks", IEEE Trans. Signal Processing 1997).
- `stack(*layers, residual=False, dropout=0.0)`: a deep RNN; dropout between layers in training, residual
  connections around every layer after the first (Graves et al., "Speech recognition with deep recurrent
  neural networks", ICASSP 2013; Wu et al., "Google's neural machine translation system", 2016, §3.1).
- `time_major(layer)`: the same layer on ``[T, B, I]`` inputs.
- `dense(output_size)`: the read-out ``o_t = s_t V + c`` over every step (or over a final state);
  `last_valid` picks each sequence's last valid output for many-to-one models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from rnnjax.cells.base import Cell, add_bias, check_float_dtype, check_hidden_size, check_input_size
from rnnjax.checks import check_array
from rnnjax.driver import GradMode, _check_cell, _check_lengths, unroll
from rnnjax.sharding import batch_like, explicit_spec, sharding_on

Array = jax.Array
PyTree = Any

MERGES: tuple[str, ...] = ("concat", "sum")
"""How `bidirectional` merges its two directions per step: ``"concat"`` or ``"sum"``."""


LAYER_KINDS: tuple[str, ...] = ("rnn", "bidirectional", "stack", "time_major")

# the options of `rj.unroll` that a layer's ``apply`` passes on to every recurrence inside it
UNROLL_OPTIONS: tuple[str, ...] = (
    "checkpoint",
    "budget",
    "schedule",
    "unroll_steps",
    "compute_dtype",
    "method",
    "chunk_size",
    "regularize",
)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class Layer:
    """A sequence layer: ``apply(params, xs [B, T, I], ...) -> (carry, ys [B, T, output_size])``.

    Layers are static structure like `Cell` s: frozen, hashable, with no pytree leaves; the built-in layers
    compare equal by ``kind``, ``children`` and ``options`` (``rj.rnn(rj.lstm(8)) == rj.rnn(rj.lstm(8))``).

    Attributes:
      init: ``init(key, input_size, dtype=None) -> params`` (``None``: JAX's default float dtype).
      apply: ``apply(params, xs, *, carry=None, lengths=None, grad="manual", key=None, train=False,
        checkpoint=None, budget=None, schedule=None, unroll_steps=None, compute_dtype=None,
        method="sequential", chunk_size=None, regularize=None) -> (carry, ys)``; ``key`` and ``train`` drive
        dropout and the regularisers (layers without either ignore them); the last nine are `rj.unroll` 's,
        passed to every recurrence inside (``regularize`` draws its masks from ``key`` in training,
        `regularize_key`).
      initial_carry: ``initial_carry(params, batch_shape) -> carry`` (zeros).
      output_size: the feature size of ``ys``.
      name: a short description.
      kind: ``"rnn"``, ``"bidirectional"``, ``"stack"`` or ``"time_major"`` (`LAYER_KINDS`); with
        ``children`` and ``options`` it describes the layer to tools such as `rnnjax.to_torch`.
      children: the cells (``rnn``: one; ``bidirectional``: forward, backward) or layers it is made of.
      options: ``(name, value)`` pairs of the layer's settings.

    Examples:
      The built-in constructors make layers; a layer describes itself and compares by its structure:

      >>> import rnnjax as rj
      >>> layer = rj.bidirectional(rj.lstm(8))
      >>> layer.kind, layer.output_size, layer == rj.bidirectional(rj.lstm(8))
      ('bidirectional', 16, True)
    """

    init: Callable[..., PyTree]
    apply: Callable[..., tuple[PyTree, Array]]
    initial_carry: Callable[..., PyTree]
    output_size: int
    name: str
    kind: str
    children: tuple
    options: tuple = ()

    def _key(self) -> tuple:
        if self.kind in LAYER_KINDS:  # its functions are written from these
            return (self.kind, self.children, self.options, self.output_size)
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def option(self, name: str) -> Any:
        """The value of one of the layer's ``options``."""
        return dict(self.options)[name]


def _unroll_options(options: dict[str, Any], what: str) -> dict[str, Any]:
    """The `UNROLL_OPTIONS` given to a layer's ``apply``, or a TypeError naming the ones it accepts."""
    unknown = sorted(set(options) - set(UNROLL_OPTIONS))
    if unknown:
        raise TypeError(
            f"{what}.apply got unexpected keyword argument(s) {unknown}; it accepts carry, lengths, grad, "
            f"key, train and rj.unroll's {UNROLL_OPTIONS}"
        )
    return options


def regularize_key(options: dict[str, Any], key: Array | None, train: bool, what: str) -> Array | None:
    """The ``key`` that a layer's recurrence draws its regularisers' masks from: ``key`` in training with
    ``regularize`` among the ``options``, else None (inference: their expectation)."""
    if options.get("regularize") is None or not train:
        return None
    if key is None:
        raise ValueError(f"{what}.apply(..., regularize=..., train=True) needs a PRNG key: pass key=")
    return key


class BidirectionalParams(NamedTuple):
    """Parameters of a bidirectional layer: one set per direction."""

    fw: PyTree
    bw: PyTree


class BidirectionalCarry(NamedTuple):
    """Carry of a bidirectional layer: the forward direction's and the backward direction's."""

    fw: PyTree
    bw: PyTree


def _output_size(cell: Cell) -> int:
    if cell.hidden_size is None:
        raise ValueError(
            f"cell {cell.name!r} has no hidden_size; give rj.Cell(..., hidden_size=H) so the layer knows "
            "its output size"
        )
    size = cell.output_size
    assert size is not None  # hidden_size, or proj_size
    return size


def rnn(cell: Cell, *, reverse: bool = False, unroll_steps: int | bool | None = None) -> Layer:
    """Lifts a cell to a layer: `rj.unroll` over the whole sequence.

    Args:
      cell: the cell.
      reverse: run from the last step to the first (from ``lengths[b] - 1`` with lengths).
      unroll_steps: `rj.unroll` 's ``unroll_steps`` (None: its default); ``apply(..., unroll_steps=)``
        overrides it.

    Returns:
      A `Layer` whose ``apply(params, xs [B, T, I])`` returns the cell's final carry and
      ``ys [B, T, H]`` (``[B, T, P]`` for a projected cell), in the dtype of the params; its params are
      the cell's.

    Raises:
      TypeError: if ``cell`` is not a `Cell`.
      ValueError: if the cell has no ``hidden_size`` (the layer could not know its output size).

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> layer = rj.rnn(rj.gru(8))
      >>> params = layer.init(jax.random.key(0), 3)
      >>> carry, ys = layer.apply(params, jnp.ones((2, 5, 3)))
      >>> ys.shape
      (2, 5, 8)
    """
    cell = _check_cell(cell, "cell")

    def apply(
        params: PyTree,
        xs: Array,
        *,
        carry: PyTree | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        key: Array | None = None,
        train: bool = False,
        **options: Any,
    ) -> tuple[PyTree, Array]:
        options = {"unroll_steps": unroll_steps, **_unroll_options(options, "rnn")}
        key = regularize_key(options, key, train, "rnn")
        return unroll(
            cell, params, xs, carry, lengths=lengths, reverse=reverse, grad=grad, key=key, **options
        )

    return Layer(
        init=cell.init,
        apply=apply,
        initial_carry=cell.initial_carry,
        output_size=_output_size(cell),
        name=f"rnn({cell.name}{', reverse' if reverse else ''})",
        kind="rnn",
        children=(cell,),
        options=(("reverse", reverse), ("unroll_steps", unroll_steps)),
    )


def bidirectional(cell_fw: Cell, cell_bw: Cell | None = None, *, merge: str = "concat") -> Layer:
    """A bidirectional layer: a forward pass and a reverse pass over the same inputs, merged per step.

    Args:
      cell_fw: the forward direction's cell.
      cell_bw: the backward direction's cell; None means another cell like ``cell_fw`` (own params).
      merge: ``"concat"`` (``ys [B, T, H_fw + H_bw]``, forward features first, as PyTorch) or ``"sum"``
        (``ys [B, T, H]``, needs equal hidden sizes).

    The carry is `BidirectionalCarry(fw, bw)`: the forward direction's carry after each sequence's last
    valid step and the backward direction's after step 0, as PyTorch's ``h_n`` for the two directions.

    Returns:
      A `Layer` whose params are `BidirectionalParams(fw, bw)`, whose carry is `BidirectionalCarry`, and
      whose ``apply(params, xs [B, T, I])`` returns ``ys [B, T, H_fw + H_bw]`` (``"concat"``) or
      ``[B, T, H]`` (``"sum"``).

    Raises:
      TypeError: if a cell is not a `Cell` (and, from ``apply``, if ``carry`` is not a
        `BidirectionalCarry`).
      ValueError: if ``merge`` is not one of `MERGES`, ``"sum"`` meets unequal hidden sizes, or a cell has
        no ``hidden_size``.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> layer = rj.bidirectional(rj.lstm(4))
      >>> params = layer.init(jax.random.key(0), 3)
      >>> carry, ys = layer.apply(params, jnp.ones((2, 5, 3)), lengths=jnp.array([5, 2]))
      >>> ys.shape, carry.bw.h.shape
      ((2, 5, 8), (2, 4))
    """
    cell_fw = _check_cell(cell_fw, "cell_fw")
    cell_bw = cell_fw if cell_bw is None else _check_cell(cell_bw, "cell_bw")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    h_fw, h_bw = _output_size(cell_fw), _output_size(cell_bw)
    if merge == "sum" and h_fw != h_bw:
        raise ValueError(
            f"merge='sum' needs equal hidden sizes in both directions, got H_fw={h_fw} and H_bw={h_bw}"
        )

    def init(key: Array, input_size: int, dtype: Any = None) -> BidirectionalParams:
        k_fw, k_bw = jax.random.split(key)
        return BidirectionalParams(
            cell_fw.init(k_fw, input_size, dtype), cell_bw.init(k_bw, input_size, dtype)
        )

    def initial_carry(params: BidirectionalParams, batch_shape: tuple[int, ...] = ()) -> BidirectionalCarry:
        return BidirectionalCarry(
            cell_fw.initial_carry(params.fw, batch_shape), cell_bw.initial_carry(params.bw, batch_shape)
        )

    def apply(
        params: BidirectionalParams,
        xs: Array,
        *,
        carry: BidirectionalCarry | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        key: Array | None = None,
        train: bool = False,
        **options: Any,
    ) -> tuple[BidirectionalCarry, Array]:
        options = _unroll_options(options, "bidirectional")
        if carry is not None and not isinstance(carry, BidirectionalCarry):
            raise TypeError(
                "carry of a bidirectional layer must be a BidirectionalCarry(fw, bw), "
                f"got {type(carry).__name__}"
            )
        c_fw, c_bw = (None, None) if carry is None else carry
        key = regularize_key(options, key, train, "bidirectional")
        # the two directions draw their masks from keys of their own
        k_fw, k_bw = (None, None) if key is None else (jax.random.fold_in(key, 0), jax.random.fold_in(key, 1))
        f_fw, ys_fw = unroll(cell_fw, params.fw, xs, c_fw, lengths=lengths, grad=grad, key=k_fw, **options)
        f_bw, ys_bw = unroll(
            cell_bw, params.bw, xs, c_bw, lengths=lengths, reverse=True, grad=grad, key=k_bw, **options
        )
        ys = jnp.concatenate([ys_fw, ys_bw], axis=-1) if merge == "concat" else ys_fw + ys_bw
        return BidirectionalCarry(f_fw, f_bw), ys

    return Layer(
        init=init,
        apply=apply,
        initial_carry=initial_carry,
        output_size=h_fw + h_bw if merge == "concat" else h_fw,
        name=f"bidirectional({cell_fw.name}, {cell_bw.name}, merge={merge!r})",
        kind="bidirectional",
        children=(cell_fw, cell_bw),
        options=(("merge", merge),),
    )


def stack(*layers: Layer | Cell, residual: bool = False, dropout: float = 0.0) -> Layer:
    """A deep RNN: layers applied one after the other, ``ys`` of one the ``xs`` of the next.

    Args:
      *layers: `Layer` s (a `Cell` is lifted with `rnn`).
      residual: add each layer's input to its output, for every layer after the first (their input and
        output sizes must then be equal).
      dropout: the probability of dropping each feature between layers (not after the last), in training
        only: ``apply(..., train=True, key=key)``. Inverted dropout: kept features are scaled by 1/(1 − p).

    The carry is a tuple of the layers' carries, first layer first.

    Returns:
      A `Layer` whose params and carry are tuples with one entry per layer, and whose
      ``apply(params, xs [B, T, I])`` returns the last layer's ``ys [B, T, output_size]``.

    Raises:
      TypeError: if an entry of ``layers`` is neither a `Layer` nor a `Cell`.
      ValueError: if ``layers`` is empty, ``dropout`` is not in ``[0, 1)``, or ``residual=True`` meets a
        layer whose input and output sizes differ (and, from ``apply``, if dropout in training has no
        ``key``).

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> deep = rj.stack(rj.bidirectional(rj.lstm(4)), rj.bidirectional(rj.lstm(4)), residual=True)
      >>> params = deep.init(jax.random.key(0), 3)
      >>> carries, ys = deep.apply(params, jnp.ones((2, 5, 3)))
      >>> ys.shape, len(carries)
      ((2, 5, 8), 2)
    """
    if not layers:
        raise ValueError("stack needs at least one layer")
    layers = tuple(rnn(x) if isinstance(x, Cell) else x for x in layers)
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"layer {i} of stack must be a Layer or a Cell, got {type(layer).__name__}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if residual:
        for i in range(1, len(layers)):
            if layers[i - 1].output_size != layers[i].output_size:
                raise ValueError(
                    f"residual=True needs layer {i}'s input size ({layers[i - 1].output_size}) to equal its "
                    f"output size ({layers[i].output_size})"
                )

    def init(key: Array, input_size: int, dtype: Any = None) -> tuple:
        keys = jax.random.split(key, len(layers))
        sizes = [input_size] + [layer.output_size for layer in layers[:-1]]
        return tuple(layer.init(k, n, dtype) for layer, k, n in zip(layers, keys, sizes, strict=True))

    def initial_carry(params: tuple, batch_shape: tuple[int, ...] = ()) -> tuple:
        return tuple(layer.initial_carry(p, batch_shape) for layer, p in zip(layers, params, strict=True))

    def apply(
        params: tuple,
        xs: Array,
        *,
        carry: tuple | None = None,
        lengths: Array | None = None,
        grad: GradMode = "manual",
        key: Array | None = None,
        train: bool = False,
        **options: Any,
    ) -> tuple[tuple, Array]:
        options = _unroll_options(options, "stack")
        if not isinstance(params, (tuple, list)) or len(params) != len(layers):
            raise ValueError(
                f"params of a stack of {len(layers)} layers must be a tuple of {len(layers)} params"
            )
        if carry is not None and (not isinstance(carry, (tuple, list)) or len(carry) != len(layers)):
            raise ValueError(
                f"carry of a stack of {len(layers)} layers must be a tuple of {len(layers)} carries"
            )
        drop = train and dropout > 0
        regularize_key(options, key, train, "stack")  # a clear error where training has no key
        if drop and key is None:
            raise ValueError("stack(..., dropout>0).apply(..., train=True) needs a PRNG key: pass key=")
        keys = jax.random.split(key, len(layers)) if key is not None else [None] * len(layers)
        carries = []
        for i, layer in enumerate(layers):
            k_i = keys[i]
            k_layer, k_drop = jax.random.split(k_i) if k_i is not None else (None, None)
            c, ys = layer.apply(
                params[i],
                xs,
                carry=None if carry is None else carry[i],
                lengths=lengths,
                grad=grad,
                key=k_layer,
                train=train,
                **options,
            )
            if residual and i > 0:
                ys = ys + xs
            if drop and i < len(layers) - 1:
                assert k_drop is not None  # dropout in training needs the key (checked above)
                # the mask one device would draw, its rows split like ys's on a mesh (the same training)
                keep = batch_like(jax.random.bernoulli(k_drop, 1.0 - dropout, ys.shape), ys, ys.ndim - 2)
                ys = jnp.where(keep, ys / (1.0 - dropout), jnp.zeros_like(ys))
            carries.append(c)
            xs = ys
        return tuple(carries), xs

    return Layer(
        init=init,
        apply=apply,
        initial_carry=initial_carry,
        output_size=layers[-1].output_size,
        name=f"stack({', '.join(layer.name for layer in layers)})",
        kind="stack",
        children=layers,
        options=(("residual", residual), ("dropout", dropout)),
    )


def time_major(layer: Layer) -> Layer:
    """The same layer on time-major inputs: ``xs [T, B, I] -> ys [T, B, output_size]``.

    The batch-major layers run inside; the time-major layout is a transpose on the way in and out.

    Args:
      layer: a `Layer`, e.g. from `rnn`, `bidirectional` or `stack`.

    Returns:
      A `Layer` with the same params, carry and options whose ``apply`` takes ``xs [T, B, I]`` and returns
      ``ys [T, B, output_size]``; it raises a ValueError for ``xs`` that is not 3-D.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> layer = rj.time_major(rj.rnn(rj.gru(4)))
      >>> params = layer.init(jax.random.key(0), 3)
      >>> carry, ys = layer.apply(params, jnp.ones((5, 2, 3)))    # [T, B, I]
      >>> ys.shape, carry.h.shape
      ((5, 2, 4), (2, 4))
    """

    def apply(params: PyTree, xs: Array, **kwargs: Any) -> tuple[PyTree, Array]:
        if jnp.ndim(xs) != 3:
            raise ValueError(f"xs of a time-major layer must have shape [T, B, I], got shape {jnp.shape(xs)}")
        carry, ys = layer.apply(params, jnp.swapaxes(xs, 0, 1), **kwargs)
        return carry, jnp.swapaxes(ys, 0, 1)

    return dataclasses.replace(
        layer, apply=apply, name=f"time_major({layer.name})", kind="time_major", children=(layer,)
    )


class DenseParams(NamedTuple):
    """Parameters of a dense read-out."""

    w: Array  # [I, O]
    b: Array  # [O]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class Dense:
    """A dense read-out ``y = x w + b`` over the last axis (any leading axes, e.g. ``[B, T, I]``).

    Static structure, equal by ``output_size`` (``rj.dense(10) == rj.dense(10)``). Made by `dense`.

    Attributes:
      init: ``init(key, input_size, dtype=None) -> DenseParams`` (``w [I, O]``, ``b [O]``).
      apply: ``apply(params, x [..., I]) -> [..., O]``.
      output_size: O.

    Examples:
      >>> import rnnjax as rj
      >>> head = rj.dense(10)
      >>> head.output_size, head == rj.dense(10)
      (10, True)
    """

    init: Callable[..., DenseParams]
    apply: Callable[[DenseParams, Array], Array]
    output_size: int

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.output_size == other.output_size  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(("dense", self.output_size))


def dense(output_size: int) -> Dense:
    """The read-out ``o_t = s_t V + c`` (logits; apply a softmax in the loss), PyTorch's Linear init.

    Args:
      output_size: O, the number of output features (>= 1).

    Returns:
      A `Dense` whose ``init(key, input_size=I, dtype=None)`` draws ``w [I, O]`` and ``b [O]`` from
      U(−1/√I, 1/√I) (PyTorch's ``nn.Linear``), and whose ``apply(params, x [..., I])`` returns
      ``x w + b [..., O]`` in the params' dtype; ``apply`` raises a ValueError when ``x``'s last axis is
      not I.

    Raises:
      TypeError: if ``output_size`` is not an int.
      ValueError: if ``output_size`` is below 1.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> head = rj.dense(10)
      >>> params = head.init(jax.random.key(0), 8)
      >>> head.apply(params, jnp.ones((2, 5, 8))).shape
      (2, 5, 10)
    """
    O = check_hidden_size(output_size, "output_size")

    def init(key: Array, input_size: int, dtype: Any = None) -> DenseParams:
        I = check_input_size(input_size)
        dtype = check_float_dtype(dtype)
        bound = 1.0 / I**0.5
        k_w, k_b = jax.random.split(key)
        return DenseParams(
            w=jax.random.uniform(k_w, (I, O), dtype, -bound, bound),
            b=jax.random.uniform(k_b, (O,), dtype, -bound, bound),
        )

    def apply(params: DenseParams, x: Array) -> Array:
        x = check_array(x, "x", "a floating-point array [..., I]", jnp.floating)
        if jnp.shape(x)[-1:] != params.w.shape[:1]:
            raise ValueError(
                f"x has feature size {jnp.shape(x)[-1:]} but the dense params expect {params.w.shape[0]} "
                f"(w has shape {params.w.shape})"
            )
        return add_bias(x @ params.w, params.b)

    return Dense(init=init, apply=apply, output_size=O)


def embed(table: Array, tokens: Array) -> Array:
    """The rows of an embedding table at ``tokens``: ``table [V, E]``, integer ``tokens [...] -> [..., E]``.

    ``table[tokens]``, and its gradient reaches ``table``. Where ``tokens`` are split over the devices of a
    mesh with explicit axes (`jax.set_mesh`), the rows come out split as the tokens are: JAX refuses a plain
    ``table[tokens]`` there, whose output sharding it cannot infer. Token ids are not range-checked (they
    may be traced); ids outside ``[0, V)`` follow JAX's indexing rules.

    Args:
      table: ``[V, E]`` floating-point embedding table.
      tokens: integer ids of any shape ``[...]`` (e.g. ``[B, T]``).

    Returns:
      ``[..., E]`` rows of ``table``, in its dtype.

    Raises:
      ValueError: if ``table`` is not 2-D.
      TypeError: if ``tokens`` is not an integer array.

    Examples:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> rj.embed(jnp.arange(6.0).reshape(3, 2), jnp.array([[2, 0]]))
      Array([[[4., 5.],
              [0., 1.]]], dtype=float32)
    """
    table = check_array(table, "table", "a floating-point array [V, E]", jnp.floating)
    tokens = check_array(tokens, "tokens", "an integer array", jnp.integer)
    if table.ndim != 2:
        raise ValueError(f"table must have shape [V, E], got shape {table.shape}")
    if table.shape[0] == 0:
        raise ValueError(f"table must have V >= 1 rows [V, E], got shape {table.shape}")
    spec = explicit_spec(tokens)
    if spec is None:
        return table[tokens]
    e_spec = (explicit_spec(table) or (None, None))[1]  # the table's own split of E, if any
    return table.at[tokens].get(out_sharding=sharding_on((*spec, e_spec), tokens))


def last_valid(ys: Array, lengths: Array | None = None) -> Array:
    """Each sequence's output at its last valid step: ``ys [B, T, F] -> [B, F]`` (zeros where length is 0).

    For a forward `rnn` this equals the final carry's ``h``; it is the read-out point of many-to-one models.

    Args:
      ys: ``[B, T, F]`` outputs of any dtype, batch-major.
      lengths: ``[B]`` integers in ``[0, T]``; None means every sequence has all T steps.

    Returns:
      ``[B, F]`` in the dtype of ``ys``: ``ys[b, lengths[b] - 1]``, or zeros where ``lengths[b] == 0``.

    Raises:
      ValueError: if ``ys`` is not 3-D or ``lengths`` is not ``[B]``.

    Examples:
      >>> import jax.numpy as jnp, rnnjax as rj
      >>> ys = jnp.arange(12.0).reshape(2, 3, 2)    # [B=2, T=3, F=2]
      >>> rj.last_valid(ys, jnp.array([2, 0]))
      Array([[2., 3.],
             [0., 0.]], dtype=float32)
    """
    ys = check_array(ys, "ys", "an array [B, T, F]")
    if jnp.ndim(ys) != 3:
        raise ValueError(f"ys must have shape [B, T, F], got shape {jnp.shape(ys)}")
    B, T, _ = ys.shape
    if lengths is None:
        if T == 0:
            raise ValueError(f"ys must have T >= 1 steps to read the last of, got shape {ys.shape}")
        return ys[:, -1]
    lengths = check_array(lengths, "lengths", "an integer array [B]", jnp.integer)
    if jnp.shape(lengths) != (B,):
        raise ValueError(f"lengths must have shape [B] = ({B},), got shape {jnp.shape(lengths)}")
    # values in [0, T]: checked when concrete, under checkify when traced
    lengths = _check_lengths(lengths, (B,), T)
    assert lengths is not None
    idx = jnp.clip(lengths - 1, 0, max(T - 1, 0))
    picked = jnp.take_along_axis(ys, idx[:, None, None], axis=1)[:, 0]
    return jnp.where((lengths > 0)[:, None], picked, jnp.zeros_like(picked))
