"""Interop: PyTorch import/export (multi-layer, bidirectional, batch_first either way, packed), Flax NNX, checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rel_err

import rnnjax as rj

try:
    import torch
except ImportError:  # the NNX and checkpoint tests below run without it
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (the dev extra)")

B, T, I, H, L = 3, 5, 4, 3, 2
P = 2  # proj_size of the projected LSTM


def torch_module(kind, bidirectional, batch_first):
    torch.manual_seed(0)
    kw = dict(num_layers=L, bidirectional=bidirectional, batch_first=batch_first, dropout=0.25)
    if kind == "lstm":
        return torch.nn.LSTM(I, H, **kw).double().eval()
    if kind == "lstm-proj":
        return torch.nn.LSTM(I, H, proj_size=P, **kw).double().eval()
    if kind == "gru":
        return torch.nn.GRU(I, H, **kw).double().eval()
    return torch.nn.RNN(I, H, nonlinearity=kind.split("-")[1], **kw).double().eval()


CONFIGS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]


@needs_torch
@pytest.mark.parametrize(
    "bidirectional, batch_first, packed", CONFIGS, ids=["bi-bf-packed", "bi-tm", "uni-bf", "uni-tm-packed"]
)
@pytest.mark.parametrize("kind", ["lstm", "lstm-proj", "gru", "elman-tanh", "elman-relu"])
def test_from_torch_outputs_and_gradients(kind, bidirectional, batch_first, packed):
    module = torch_module(kind, bidirectional, batch_first)
    layer, params = rj.from_torch(module)
    inner = layer if batch_first else layer.children[0]
    assert (layer.kind, inner.kind) == ("stack" if batch_first else "time_major", "stack")
    assert inner.option("dropout") == 0.25 and len(inner.children) == L
    D = 2 if bidirectional else 1
    is_lstm, Hout = kind.startswith("lstm"), P if kind == "lstm-proj" else H
    assert layer.output_size == D * Hout
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(B, T, I) if batch_first else (T, B, I))
    lengths = np.array([5, 2, 3]) if packed else None
    h0, c0 = rng.normal(size=(L * D, B, Hout)), rng.normal(size=(L * D, B, H))
    w_y = rng.normal(size=(B, T, D * Hout) if batch_first else (T, B, D * Hout))
    w_h, w_c = rng.normal(size=(L * D, B, Hout)), rng.normal(size=(L * D, B, H))

    # PyTorch
    x = torch.tensor(xs, requires_grad=True)
    h = torch.tensor(h0, requires_grad=True)
    c = torch.tensor(c0, requires_grad=True)
    inp = x
    if packed:
        inp = torch.nn.utils.rnn.pack_padded_sequence(
            x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False
        )
    out, state = module(inp, (h, c) if is_lstm else h)
    if packed:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first, total_length=T)
    h_n, c_n = state if is_lstm else (state, None)
    loss = (out * torch.tensor(w_y)).sum() + (h_n * torch.tensor(w_h)).sum()
    if c_n is not None:
        loss = loss + (c_n * torch.tensor(w_c)).sum()
    loss.backward()

    # rnnjax
    def our_loss(params, xs, h0, c0):
        carry = rj.carry_from_torch(layer, h0, c0 if is_lstm else None)
        carries, ys = layer.apply(
            params, xs, carry=carry, lengths=None if lengths is None else jnp.asarray(lengths)
        )
        hn, cn = rj.carry_to_torch(carries)
        total = jnp.sum(ys * w_y) + jnp.sum(hn * w_h)
        if cn is not None:
            total = total + jnp.sum(cn * w_c)
        return total, (ys, hn, cn)

    (value, (ys, hn, cn)), grads = jax.jit(jax.value_and_grad(our_loss, (0, 1, 2, 3), has_aux=True))(
        params, jnp.asarray(xs), jnp.asarray(h0), jnp.asarray(c0)
    )
    assert rel_err(ys, out.detach().numpy()) <= 1e-10
    assert rel_err(hn, h_n.detach().numpy()) <= 1e-10
    if is_lstm:
        assert rel_err(cn, c_n.detach().numpy()) <= 1e-10
    np.testing.assert_allclose(float(value), float(loss.detach()), rtol=1e-10)
    d_params, d_xs, d_h0, d_c0 = grads
    assert rel_err(d_xs, x.grad.numpy()) <= 1e-10
    assert rel_err(d_h0, h.grad.numpy()) <= 1e-10
    if is_lstm:
        assert rel_err(d_c0, c.grad.numpy()) <= 1e-10
    # our weight gradients, written in PyTorch's layout, against PyTorch's
    ours = rj.to_torch(layer, d_params).state_dict()
    assert set(ours) == {name for name, _ in module.named_parameters()}
    for name, p in module.named_parameters():
        g = p.grad.numpy()
        if name.startswith("bias_hh") and kind != "gru":
            name = name.replace("bias_hh", "bias_ih")  # b = b_ih + b_hh: both get dL/db
        if name.startswith("bias_hh") and kind == "gru":
            g = g[2 * H :]
            assert rel_err(ours[name].numpy()[2 * H :], g) <= 1e-10, name
            continue
        assert rel_err(ours[name].numpy(), g) <= 1e-10, name


ROUND_TRIP_CELLS = {
    "lstm": lambda: rj.lstm(H),
    "lstm-proj": lambda: rj.projected_lstm(H, P),
    "gru": lambda: rj.gru(H),
    "elman-relu": lambda: rj.elman(H, "relu"),
}


@needs_torch
@pytest.mark.parametrize("kind", list(ROUND_TRIP_CELLS))
def test_to_torch_round_trip(kind):
    layer = rj.stack(*[rj.bidirectional(ROUND_TRIP_CELLS[kind]())] * 2, dropout=0.1)
    params = layer.init(jax.random.key(0), I, jnp.float64)
    module = rj.to_torch(layer, params)
    assert module.num_layers == 2 and module.bidirectional and module.batch_first and module.dropout == 0.1
    layer2, params2 = rj.from_torch(module)
    assert rel_err(params2, params) == 0.0
    xs = np.random.default_rng(0).normal(size=(B, T, I))
    out, _ = module.eval()(torch.tensor(xs))
    assert rel_err(layer2.apply(params2, jnp.asarray(xs))[1], out.detach().numpy()) <= 1e-12


@needs_torch
def test_torch_errors():
    with pytest.raises(TypeError, match=r"module must be a torch.nn.RNN, nn.LSTM or nn.GRU, got Linear"):
        rj.from_torch(torch.nn.Linear(2, 3))
    with pytest.raises(ValueError, match=r"to_torch needs one cell kind, hidden size and direction count"):
        layer = rj.stack(rj.lstm(3), rj.gru(3))
        rj.to_torch(layer, layer.init(jax.random.key(0), 2))
    with pytest.raises(
        ValueError, match=r"to_torch supports stacks of forward rj.rnn or rj.bidirectional layers"
    ):
        layer = rj.rnn(rj.lstm(3), reverse=True)
        rj.to_torch(layer, layer.init(jax.random.key(0), 2))


def test_nnx_modules_train_with_manual_bptt():
    from flax import nnx

    class Tagger(nnx.Module):
        def __init__(self, rngs):
            self.rnn = rj.nnx.Bidirectional(rj.gru(6), 3, rngs=rngs, dtype=jnp.float64)
            self.out = rj.nnx.RNN(rj.lstm(2), 12, rngs=rngs, dtype=jnp.float64)

        def __call__(self, xs, lengths, grad="manual"):
            _, ys = self.rnn(xs, lengths=lengths, grad=grad)
            return self.out(ys, lengths=lengths, grad=grad)[1]

    model = Tagger(nnx.Rngs(0))
    xs = jax.random.normal(jax.random.key(1), (4, 7, 3), jnp.float64)
    ys = jnp.tanh(jnp.cumsum(xs[..., :2], axis=1))
    lengths = jnp.array([7, 5, 3, 1])

    def loss(model, grad="manual"):
        return rj.losses.squared_error(model(xs, lengths, grad), ys, lengths)

    # nnx.grad of the module uses the hand-derived BPTT; it equals autodiff's
    g_manual = nnx.state(nnx.grad(loss)(model), nnx.Param)
    g_auto = nnx.state(nnx.grad(lambda m: loss(m, "autodiff"))(model), nnx.Param)
    assert rel_err(jax.tree.leaves(g_manual), jax.tree.leaves(g_auto)) <= 1e-10
    assert {"w_ih", "w_hh", "b", "b_hn"} <= {
        str(p[-1]) for p, _ in nnx.to_flat_state(nnx.state(model.rnn.fw, nnx.Param))
    }

    optimizer = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        value, grads = nnx.value_and_grad(loss)(model)
        optimizer.update(model, grads)
        return value

    with jax.numpy_dtype_promotion("standard"):  # optax's Adam is not strict-promotion safe; we are
        first = float(train_step(model, optimizer))
        for _ in range(60):
            last = float(train_step(model, optimizer))
    assert last < 0.5 * first


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    layer = rj.stack(rj.bidirectional(rj.lstm(4)), rj.gru(4))
    params = layer.init(jax.random.key(0), 3)
    optimizer = optax.adam(1e-3)
    grads = jax.tree.map(lambda a: jnp.full_like(a, 0.5), params)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam is not strict-promotion safe
        updates, opt_state = optimizer.update(grads, optimizer.init(params), params)
    params = optax.apply_updates(params, updates)
    tree = {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(1),
        "bf16": jnp.ones(3, jnp.bfloat16) / 3,
    }
    rj.save(tmp_path / "ckpt.msgpack", tree)
    fresh_params = layer.init(jax.random.key(9), 3)
    target = {
        "params": fresh_params,
        "opt_state": optimizer.init(fresh_params),
        "step": jnp.asarray(0),
        "bf16": jnp.zeros(3, jnp.bfloat16),
    }
    loaded = rj.load(tmp_path / "ckpt.msgpack", target)
    assert jax.tree.structure(loaded) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tree), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
