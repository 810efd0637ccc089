"""PyTorch interop: ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` to an rnnjax layer and back, weights mapped exactly.

Per layer k and direction (``suffix`` "" or "_reverse")::

    w_ih = weight_ih_l{k}{suffix}ᵀ            w_hh = weight_hh_l{k}{suffix}ᵀ
    b    = bias_ih + bias_hh                  (GRU: the r, z blocks; the n block is bias_ih's alone)
    b_hn = bias_hh[2H:]                       (GRU only)
    w_hr = weight_hr_l{k}{suffix}ᵀ            (LSTM with proj_size > 0: `rj.projected_lstm`)

`from_torch` returns a `rj.stack` of one `rj.rnn` or `rj.bidirectional` per PyTorch layer (wrapped in
`rj.time_major` when ``batch_first=False``), with PyTorch's inter-layer dropout. PyTorch's ``h_0``/``c_0``
of shape ``[num_layers * num_directions, B, H]`` convert with `carry_from_torch` and `carry_to_torch`.
torch is imported only when these functions run.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from rnnjax.cells import (
    ElmanParams,
    GRUParams,
    LSTMParams,
    ProjectedLSTMParams,
    elman,
    gru,
    lstm,
    projected_lstm,
)
from rnnjax.cells.base import Cell, HCarry, LSTMCarry
from rnnjax.layers import (
    BidirectionalCarry,
    BidirectionalParams,
    Layer,
    bidirectional,
    rnn,
    stack,
    time_major,
)

PyTree = Any


def _torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dev extra
        raise ImportError("rnnjax.from_torch / to_torch need PyTorch: pip install torch") from e
    return torch


def _kind(module: Any) -> str:
    torch = _torch()
    if isinstance(module, torch.nn.LSTM):
        return "lstm"
    if isinstance(module, torch.nn.GRU):
        return "gru"
    if isinstance(module, torch.nn.RNN):
        return f"elman-{module.nonlinearity}"
    raise TypeError(f"module must be a torch.nn.RNN, nn.LSTM or nn.GRU, got {type(module).__name__}")


def _cell(kind: str, H: int, P: int = 0) -> Cell:
    if kind == "lstm":
        return projected_lstm(H, P) if P else lstm(H)
    if kind == "gru":
        return gru(H)
    return elman(H, kind.split("-", 1)[1])


def _direction_params(module: Any, kind: str, k: int, suffix: str) -> PyTree:
    H = module.hidden_size

    def get(name: str) -> np.ndarray:  # read only where the module has it (its biases when bias=True)
        return getattr(module, f"{name}_l{k}{suffix}").detach().cpu().numpy()

    w_ih, w_hh = get("weight_ih"), get("weight_hh")
    G = w_ih.shape[0]
    b_ih = get("bias_ih") if module.bias else np.zeros(G, w_ih.dtype)
    b_hh = get("bias_hh") if module.bias else np.zeros(G, w_ih.dtype)
    w_ih, w_hh = jnp.asarray(w_ih.T), jnp.asarray(w_hh.T)
    if kind == "gru":
        b = np.concatenate([b_ih[: 2 * H] + b_hh[: 2 * H], b_ih[2 * H :]])
        return GRUParams(w_ih, w_hh, jnp.asarray(b), jnp.asarray(b_hh[2 * H :]))
    b = jnp.asarray(b_ih + b_hh)
    if kind == "lstm" and getattr(module, "proj_size", 0):
        return ProjectedLSTMParams(w_ih, w_hh, b, jnp.asarray(get("weight_hr").T))
    return (LSTMParams if kind == "lstm" else ElmanParams)(w_ih, w_hh, b)


def from_torch(module: Any) -> tuple[Layer, tuple[Any, ...]]:
    """A PyTorch ``nn.RNN``/``nn.LSTM``/``nn.GRU`` as ``(layer, params)`` computing the same function.

    ``layer.apply(params, xs, lengths=...)`` takes the module's own input layout (``[B, T, I]`` when
    ``batch_first=True``, ``[T, B, I]`` otherwise) and returns its ``output``; variable lengths replace
    ``PackedSequence``. Gradients through the layer use the hand-derived BPTT.

    Args:
      module: a ``torch.nn.RNN`` (tanh or relu), ``nn.LSTM`` (with or without ``proj_size``) or
        ``nn.GRU``, with any ``num_layers``, ``bidirectional``, ``bias``, ``dropout`` and ``batch_first``.

    Returns:
      ``(layer, params)``: a `rj.stack` with one `rj.rnn` or `rj.bidirectional` per PyTorch layer (inside
      `rj.time_major` when ``batch_first=False``), and a tuple of one params per layer, JAX arrays in the
      module's dtype (float32 or float64).

    Raises:
      TypeError: if ``module`` is not one of the three.
      ImportError: if torch is not installed.

    Examples:
      >>> import torch, rnnjax as rj
      >>> gru = torch.nn.GRU(3, 8, num_layers=2, bidirectional=True, batch_first=True)
      >>> layer, params = rj.from_torch(gru)
      >>> layer.output_size
      16
    """
    kind = _kind(module)
    H, P = module.hidden_size, getattr(module, "proj_size", 0)
    layers, params = [], []
    for k in range(module.num_layers):
        fw = _direction_params(module, kind, k, "")
        if module.bidirectional:
            layers.append(bidirectional(_cell(kind, H, P), _cell(kind, H, P)))
            params.append(BidirectionalParams(fw, _direction_params(module, kind, k, "_reverse")))
        else:
            layers.append(rnn(_cell(kind, H, P)))
            params.append(fw)
    layer = stack(*layers, dropout=float(module.dropout))
    if not module.batch_first:
        layer = time_major(layer)
    return layer, tuple(params)


def _describe(layer: Layer) -> tuple[list[Layer], bool, Layer]:
    """``(per-depth layers, batch_first, the layer inside any time_major)`` of a stack or a single layer."""
    batch_first = True
    if layer.kind == "time_major":
        (layer,) = layer.children
        batch_first = False
    layers = list(layer.children) if layer.kind == "stack" else [layer]
    for i, sub in enumerate(layers):
        if sub.kind not in ("rnn", "bidirectional") or (sub.kind == "rnn" and sub.option("reverse")):
            raise ValueError(
                f"to_torch supports stacks of forward rj.rnn or rj.bidirectional layers; "
                f"layer {i} is {sub.name}"
            )
    return layers, batch_first, layer


def to_torch(layer: Layer, params: PyTree) -> Any:
    """The PyTorch module (``nn.RNN``/``nn.LSTM``/``nn.GRU``) computing the same function as ``layer``.

    ``layer`` is a `rj.stack` of `rj.rnn` or `rj.bidirectional` layers (or one such layer, optionally
    wrapped in `rj.time_major`), all of one cell kind and hidden size, as `from_torch` makes them. The
    biases go to ``bias_ih`` (``bias_hh`` zero, but for the GRU's ``b_hn``).

    Args:
      layer: the layer, as above.
      params: its params (float32 or float64).

    Returns:
      A ``torch.nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` with ``num_layers``, ``bidirectional``,
      ``batch_first``, ``dropout`` and ``proj_size`` read from ``layer``, in the params' dtype.

    Raises:
      ValueError: if ``layer`` is not such a stack (a reverse-only `rj.rnn`, mixed cells or sizes, a
        ``merge="sum"`` bidirectional layer), naming the layer that does not fit.
      ImportError: if torch is not installed.

    Examples:
      >>> import jax, rnnjax as rj
      >>> layer = rj.stack(rj.lstm(4), rj.lstm(4))
      >>> module = rj.to_torch(layer, layer.init(jax.random.key(0), 3))
      >>> module
      LSTM(3, 4, num_layers=2, batch_first=True)
    """
    torch = _torch()
    layers, batch_first, inner = _describe(layer)
    if inner.kind != "stack":
        params = (params,)
    cells = [c for sub in layers for c in sub.children]
    names = {c.name for c in cells}
    sizes = {(c.hidden_size, c.proj_size) for c in cells}
    bidir = {sub.kind == "bidirectional" for sub in layers}
    if len(names) != 1 or len(sizes) != 1 or len(bidir) != 1:
        raise ValueError(
            f"to_torch needs one cell kind, hidden size and direction count throughout; got {sorted(names)}, "
            f"(hidden, proj) sizes {sorted(sizes, key=str)}"
        )
    if any(sub.kind == "bidirectional" and sub.option("merge") != "concat" for sub in layers):
        raise ValueError("to_torch needs merge='concat' in bidirectional layers (PyTorch concatenates)")
    (name,), ((H, P),), (is_bidir,) = names, sizes, bidir
    first = params[0].fw if is_bidir else params[0]
    I = first.w_ih.shape[0]
    dtype = {np.dtype("float32"): torch.float32, np.dtype("float64"): torch.float64}[
        np.dtype(first.w_ih.dtype)
    ]
    kwargs = dict(num_layers=len(layers), batch_first=batch_first, bidirectional=is_bidir, dtype=dtype)
    if len(layers) > 1:
        kwargs["dropout"] = inner.option("dropout")
    if name in ("lstm", "projected_lstm"):
        module = torch.nn.LSTM(I, H, proj_size=P or 0, **kwargs)
    elif name == "gru":
        module = torch.nn.GRU(I, H, **kwargs)
    else:
        module = torch.nn.RNN(I, H, nonlinearity=name.split("-", 1)[1], **kwargs)
    state = {}
    for k, p in enumerate(params):
        for suffix, q in [("", p.fw), ("_reverse", p.bw)] if is_bidir else [("", p)]:
            b = np.asarray(q.b)
            b_hh = np.zeros_like(b)
            if name == "gru":
                b_hh[2 * H :] = np.asarray(q.b_hn)
            state[f"weight_ih_l{k}{suffix}"] = np.asarray(q.w_ih).T
            state[f"weight_hh_l{k}{suffix}"] = np.asarray(q.w_hh).T
            state[f"bias_ih_l{k}{suffix}"] = b
            state[f"bias_hh_l{k}{suffix}"] = b_hh
            if P:
                state[f"weight_hr_l{k}{suffix}"] = np.asarray(q.w_hr).T
    module.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()})
    return module


def _as_jax(x: Any) -> Any:
    """A torch tensor as a JAX array; JAX arrays (traced ones too, so gradients flow) pass through."""
    if hasattr(x, "detach"):
        return jnp.asarray(x.detach().cpu().numpy())
    return jnp.asarray(x)


def carry_from_torch(layer: Layer, h: Any, c: Any = None) -> tuple[Any, ...]:
    """PyTorch's ``h_0`` (and LSTM ``c_0``), ``[num_layers * num_directions, B, H]``, as the layer's carry.

    ``h`` and ``c`` may be torch tensors or JAX arrays (differentiable: gradients reach them).

    Args:
      layer: a layer as `from_torch` makes it (a `rj.stack` of `rj.rnn` or `rj.bidirectional` layers).
      h: ``[num_layers * num_directions, B, H]`` (``[..., B, P]`` with ``proj_size``), PyTorch's order:
        layer by layer, forward direction first.
      c: the LSTM's ``c_0`` of the same leading shape, ``[..., B, H]``; None for the RNN and the GRU.

    Returns:
      A tuple of one carry per layer (`LSTMCarry`, `HCarry`, or a `BidirectionalCarry` of two), JAX
      arrays in the dtype of ``h``, to pass as ``layer.apply(params, xs, carry=...)``.

    Raises:
      ValueError: if ``h`` has more or fewer layer-directions than ``layer``.

    Examples:
      >>> import torch, rnnjax as rj
      >>> layer, params = rj.from_torch(torch.nn.GRU(3, 4, num_layers=2, batch_first=True))
      >>> carry = rj.carry_from_torch(layer, torch.zeros(2, 5, 4))
      >>> len(carry), carry[0].h.shape
      (2, (5, 4))
    """
    layers, _, _ = _describe(layer)
    h = _as_jax(h)
    c = None if c is None else _as_jax(c)
    carries, i = [], 0
    for sub in layers:
        per_dir = []
        for cell in sub.children:
            lstm_like = cell.name in ("lstm", "projected_lstm")
            per_dir.append(LSTMCarry(h[i], c[i]) if lstm_like else HCarry(h[i]))
            i += 1
        carries.append(BidirectionalCarry(*per_dir) if sub.kind == "bidirectional" else per_dir[0])
    if i != h.shape[0]:
        raise ValueError(f"h has {h.shape[0]} layer-directions but the layer has {i}")
    return tuple(carries)


def carry_to_torch(carry: tuple[Any, ...]) -> tuple[Any, Any]:
    """The layer's final carry as PyTorch's ``(h_n, c_n)``, each ``[num_layers * num_directions, B, H]``
    (``c_n`` None but for LSTMs).

    Args:
      carry: a tuple of one carry per layer, as a stack's ``apply`` returns it (`LSTMCarry`, `HCarry` or
        `BidirectionalCarry` entries).

    Returns:
      ``(h_n, c_n)``: JAX arrays ``[num_layers * num_directions, B, H]`` in the carry's dtype, layer by
      layer, forward direction first (PyTorch's order); ``c_n`` is None unless every carry has a ``c``.

    Examples:
      >>> import jax, jax.numpy as jnp, rnnjax as rj
      >>> layer = rj.stack(rj.bidirectional(rj.lstm(4)))
      >>> carry = layer.initial_carry(layer.init(jax.random.key(0), 3), (5,))
      >>> h_n, c_n = rj.carry_to_torch(carry)
      >>> h_n.shape, c_n.shape
      ((2, 5, 4), (2, 5, 4))
    """
    flat = []
    for c in carry:
        flat.extend([c.fw, c.bw] if isinstance(c, BidirectionalCarry) else [c])
    h = jnp.stack([c.h for c in flat])
    cs = jnp.stack([c.c for c in flat]) if all(isinstance(c, LSTMCarry) for c in flat) else None
    return h, cs
