"""One training step per library, built the same way: forward + backward of ``Σ ys²`` over all outputs.

Each builder returns ``(step, args)`` where ``step(*args)`` runs one training step (value and gradients with
respect to the parameters) and blocks until it is done; JAX builders also return the jitted function, for
compile time and compiled memory. Inputs are ``xs [B, T, I]`` float32, batch-major, zero initial state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import rnnjax as rj


class Built(NamedTuple):
    step: Callable[[], Any]  # one blocking training step
    jitted: Any  # the jax.jit function (None for PyTorch)
    args: tuple  # its arguments


def on_all_devices(built: Built, batch: int) -> Built:
    """The same jitted step with its arguments placed on a mesh of every device (JAX's own data parallelism):
    the leaves that lead with the batch (``xs``, an initial carry) split over the devices, the rest (the
    parameters) replicated. The mesh's axis is `~jax.sharding.AxisType.Auto`, so XLA partitions any
    library's program from these placements alone, none of them written for it. On a CPU the devices are
    the host's, split by ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts.

    The benchmark's widths are never equal to the batch (checked), so no parameter is split by mistake.
    """
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(AxisType.Auto,))

    def place(a: Any) -> Any:
        if not isinstance(a, jax.Array):
            return a
        return jax.device_put(a, NamedSharding(mesh, P("data") if a.ndim and a.shape[0] == batch else P()))

    args = jax.tree.map(place, built.args)
    return Built(lambda: jax.block_until_ready(built.jitted(*args)), built.jitted, args)


def _jax(fn: Callable, *args: Any) -> Built:
    jitted = jax.jit(fn)
    return Built(lambda: jax.block_until_ready(jitted(*args)), jitted, args)


def _sum_sq(ys: Any) -> Any:
    return jnp.sum(ys**2)


def rnnjax_step(cell: str, B: int, T: int, I: int, H: int, grad: str = "manual", **unroll_kw: Any) -> Built:
    c = {"lstm": rj.lstm, "gru": rj.gru, "elman": rj.elman}[cell](H)
    params = c.init(jax.random.key(0), I)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    return _jax(
        jax.value_and_grad(lambda p, x: _sum_sq(rj.unroll(c, p, x, grad=grad, **unroll_kw)[1])), params, xs
    )


def flax_linen_step(cell: str, B: int, T: int, I: int, H: int) -> Built:
    import flax.linen as nn

    make = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "elman": nn.SimpleCell}[cell]
    model = nn.RNN(make(features=H))
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    params = model.init(jax.random.key(0), xs)
    return _jax(jax.value_and_grad(lambda p, x: _sum_sq(model.apply(p, x))), params, xs)


def flax_nnx_step(cell: str, B: int, T: int, I: int, H: int) -> Built:
    from flax import nnx

    make = {"lstm": nnx.OptimizedLSTMCell, "gru": nnx.GRUCell, "elman": nnx.SimpleCell}[cell]
    model = nnx.RNN(make(in_features=I, hidden_features=H, rngs=nnx.Rngs(0)))
    carry = model.cell.initialize_carry((B, I), nnx.Rngs(1))  # zeros, made once outside the trace
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)

    def loss(p: Any, x: Any) -> Any:
        return _sum_sq(nnx.merge(graphdef, p, rest)(x, initial_carry=carry))

    return _jax(jax.value_and_grad(loss), params, xs)


def equinox_step(cell: str, B: int, T: int, I: int, H: int) -> Built:
    import equinox as eqx

    make = {"lstm": eqx.nn.LSTMCell, "gru": eqx.nn.GRUCell}.get(cell)
    if make is None:
        raise NotImplementedError("equinox has no Elman cell")
    module = make(I, H, key=jax.random.key(0))
    params, static = eqx.partition(module, eqx.is_array)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)

    def loss(params: Any, xs: Any) -> Any:
        m = eqx.combine(params, static)
        h0 = jnp.zeros((B, H))
        carry0 = (h0, h0) if cell == "lstm" else h0

        def body(carry: Any, x: Any) -> Any:
            carry = jax.vmap(m)(x, carry)
            return carry, carry[0] if cell == "lstm" else carry

        _, hs = jax.lax.scan(body, carry0, jnp.swapaxes(xs, 0, 1))
        return _sum_sq(hs)

    return _jax(jax.value_and_grad(loss), params, xs)


def haiku_step(cell: str, B: int, T: int, I: int, H: int) -> Built:
    import haiku as hk

    make = {"lstm": hk.LSTM, "gru": hk.GRU, "elman": hk.VanillaRNN}[cell]

    def forward(xs: Any) -> Any:
        core = make(H)
        ys, _ = hk.dynamic_unroll(core, jnp.swapaxes(xs, 0, 1), core.initial_state(B))
        return ys

    f = hk.without_apply_rng(hk.transform(forward))
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    params = f.init(jax.random.key(0), xs)
    return _jax(jax.value_and_grad(lambda p, x: _sum_sq(f.apply(p, x))), params, xs)


def jax_cudnn_step(cell: str, B: int, T: int, I: int, H: int) -> Built:
    """``jax.experimental.rnn.lstm``: JAX's binding of cuDNN's fused LSTM (GPU only), the anchor on a GPU."""
    from jax.experimental import rnn

    if cell != "lstm" or jax.devices()[0].platform != "gpu":
        raise NotImplementedError("jax.experimental.rnn wraps cuDNN's LSTM: an LSTM on an NVIDIA GPU only")
    weights = rnn.init_lstm_weight(jax.random.key(0), I, H, 1, False)
    xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float32)
    h0 = jnp.zeros((1, B, H), jnp.float32)
    lengths = jnp.full((B,), T, jnp.int32)

    def loss(w: Any, x: Any) -> Any:
        ys, _, _ = rnn.lstm(x, h0, h0, w, lengths, I, H, 1, 0.0, False)
        return _sum_sq(ys)

    return _jax(jax.value_and_grad(loss), weights, xs)


def torch_step(cell: str, B: int, T: int, I: int, H: int) -> Built:
    """PyTorch's ``nn.LSTM/GRU/RNN``: oneDNN on a CPU, cuDNN on an NVIDIA GPU (when JAX runs on one too)."""
    import torch

    torch.manual_seed(0)
    on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "elman": torch.nn.RNN}[cell]
    module = module(I, H, batch_first=True).to(device)
    xs = torch.from_numpy(np.random.default_rng(1).standard_normal((B, T, I), dtype=np.float32)).to(device)

    def step() -> float:
        module.zero_grad(set_to_none=True)
        out, _ = module(xs)
        loss = (out**2).sum()
        loss.backward()
        return float(loss.detach())  # waits for the GPU, if any

    return Built(step, None, ())


LIBRARIES: dict[str, Callable[..., Built]] = {
    "rnnjax manual": rnnjax_step,
    "rnnjax autodiff": lambda *a: rnnjax_step(*a, grad="autodiff"),
    "flax linen": flax_linen_step,
    "flax nnx": flax_nnx_step,
    "equinox": equinox_step,
    "haiku": haiku_step,
    "pytorch": torch_step,
    "jax cudnn": jax_cudnn_step,
}
