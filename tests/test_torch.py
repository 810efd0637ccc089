"""Outputs and gradients equal PyTorch's nn.RNN / nn.LSTM / nn.GRU in float64, weights mapped one to one.

Variable lengths go through PyTorch's packed sequences; our ``reverse=True`` is checked against the backward
direction of a bidirectional PyTorch module, which starts each sequence at its last valid step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import rel_err

import rnnjax as rj

torch = pytest.importorskip("torch")

B, T, I, H = 4, 6, 3, 5


def params_from_torch(kind: str, module, suffix: str = ""):
    """Our params for one direction of a one-layer PyTorch module (``suffix="_reverse"``: the backward one)."""
    get = lambda name: jnp.asarray(getattr(module, f"{name}_l0{suffix}").detach().numpy())  # noqa: E731
    w_ih, w_hh, b_ih, b_hh = get("weight_ih").T, get("weight_hh").T, get("bias_ih"), get("bias_hh")
    if kind == "gru":
        b = jnp.concatenate([b_ih[: 2 * H] + b_hh[: 2 * H], b_ih[2 * H :]])
        return rj.GRUParams(w_ih=w_ih, w_hh=w_hh, b=b, b_hn=b_hh[2 * H :])
    b = b_ih + b_hh
    return (rj.LSTMParams if kind == "lstm" else rj.ElmanParams)(w_ih=w_ih, w_hh=w_hh, b=b)


def torch_grads_as_params(kind: str, module, suffix: str = ""):
    """PyTorch's parameter gradients in our layout (the chain rule of the mapping above)."""
    get = lambda name: np.asarray(getattr(module, f"{name}_l0{suffix}").grad.numpy())  # noqa: E731
    d_w_ih, d_w_hh, d_b_ih, d_b_hh = get("weight_ih").T, get("weight_hh").T, get("bias_ih"), get("bias_hh")
    # b = b_ih + b_hh feeds both biases, so both carry the same gradient: dL/db
    if kind == "gru":
        np.testing.assert_allclose(d_b_ih[: 2 * H], d_b_hh[: 2 * H], rtol=1e-12, atol=1e-14)
        return rj.GRUParams(w_ih=d_w_ih, w_hh=d_w_hh, b=d_b_ih, b_hn=d_b_hh[2 * H :])
    np.testing.assert_allclose(d_b_ih, d_b_hh, rtol=1e-12, atol=1e-14)
    return (rj.LSTMParams if kind == "lstm" else rj.ElmanParams)(w_ih=d_w_ih, w_hh=d_w_hh, b=d_b_ih)


def make(kind: str, bidirectional: bool):
    torch.manual_seed(0)
    if kind == "lstm":
        return torch.nn.LSTM(I, H, batch_first=True, bidirectional=bidirectional).double(), rj.lstm(H)
    if kind == "gru":
        return torch.nn.GRU(I, H, batch_first=True, bidirectional=bidirectional).double(), rj.gru(H)
    act = kind.split("-")[1]
    module = torch.nn.RNN(I, H, nonlinearity=act, batch_first=True, bidirectional=bidirectional)
    return module.double(), rj.elman(H, act)


def run_torch(module, kind, xs, h0, c0, lengths, w_y, w_h, w_c):
    """PyTorch forward + backward of the read-out loss; returns outputs, final states and gradients."""
    x = torch.tensor(np.asarray(xs), requires_grad=True)
    h = torch.tensor(np.asarray(h0), requires_grad=True)
    c = torch.tensor(np.asarray(c0), requires_grad=True)
    inp = x
    if lengths is not None:
        inp = torch.nn.utils.rnn.pack_padded_sequence(
            x, torch.tensor(np.asarray(lengths)), batch_first=True, enforce_sorted=False
        )
    out, state = module(inp, (h, c) if kind == "lstm" else h)
    if lengths is not None:
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
    h_n, c_n = state if kind == "lstm" else (state, None)
    loss = (out * torch.tensor(w_y)).sum() + (h_n * torch.tensor(w_h)).sum()
    if c_n is not None:
        loss = loss + (c_n * torch.tensor(w_c)).sum()
    module.zero_grad()
    loss.backward()
    d_c = c.grad.numpy() if c.grad is not None else None
    return out.detach().numpy(), h_n.detach().numpy(), c_n, x.grad.numpy(), h.grad.numpy(), d_c


@pytest.mark.parametrize("lengths", [None, np.array([6, 1, 4, 2])], ids=["full", "packed"])
@pytest.mark.parametrize("kind", ["elman-tanh", "elman-relu", "lstm", "gru"])
def test_matches_torch_bidirectional(kind, lengths):
    module, cell = make(kind, bidirectional=True)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(B, T, I))
    h0, c0 = rng.normal(size=(2, B, H)), rng.normal(size=(2, B, H))
    w_y, w_h, w_c = rng.normal(size=(B, T, 2 * H)), rng.normal(size=(2, B, H)), rng.normal(size=(2, B, H))
    out, h_n, c_n, d_xs, d_h0, d_c0 = run_torch(module, kind, xs, h0, c0, lengths, w_y, w_h, w_c)

    # ours: the forward direction and the reverse one, each its own unroll
    def loss(p_fw, p_bw, xs, h0, c0):
        total, outs, finals = 0.0, [], []
        for d, (p, rev) in enumerate([(p_fw, False), (p_bw, True)]):
            carry = rj.LSTMCarry(h0[d], c0[d]) if kind == "lstm" else rj.HCarry(h0[d])
            L = None if lengths is None else jnp.asarray(lengths)
            final, ys = rj.unroll(cell, p, xs, carry, lengths=L, reverse=rev)
            total = total + jnp.sum(ys * w_y[..., d * H : (d + 1) * H]) + jnp.sum(final.h * w_h[d])
            if kind == "lstm":
                total = total + jnp.sum(final.c * w_c[d])
            outs.append(ys)
            finals.append(final)
        return total, (outs, finals)

    p_fw, p_bw = params_from_torch(kind, module), params_from_torch(kind, module, "_reverse")
    args = (p_fw, p_bw, jnp.asarray(xs), jnp.asarray(h0), jnp.asarray(c0))
    (_, (outs, finals)), grads = jax.value_and_grad(loss, (0, 1, 2, 3, 4), has_aux=True)(*args)

    assert rel_err(jnp.concatenate(outs, -1), out) <= 1e-10
    assert rel_err(jnp.stack([f.h for f in finals]), h_n) <= 1e-10
    if kind == "lstm":
        assert rel_err(jnp.stack([f.c for f in finals]), c_n.detach().numpy()) <= 1e-10
    g_fw, g_bw, g_xs, g_h0, g_c0 = grads
    assert rel_err(g_fw, torch_grads_as_params(kind, module)) <= 1e-10
    assert rel_err(g_bw, torch_grads_as_params(kind, module, "_reverse")) <= 1e-10
    assert rel_err(g_xs, d_xs) <= 1e-10
    assert rel_err(g_h0, d_h0) <= 1e-10
    if kind == "lstm":
        assert rel_err(g_c0, d_c0) <= 1e-10


@pytest.mark.parametrize("kind", ["elman-tanh", "lstm", "gru"])
def test_init_matches_torch_distribution(kind):
    """Default init is PyTorch's: weights in ±1/√H; the summed bias b = b_ih + b_hh lies in ±2/√H."""
    _, cell = make(kind, bidirectional=False)
    params = cell.init(jax.random.key(0), I)
    bound = 1 / np.sqrt(H)
    for name in ("w_ih", "w_hh"):
        w = np.asarray(getattr(params, name))
        assert np.all(np.abs(w) <= bound) and np.abs(w).max() > 0.5 * bound
    b = np.asarray(params.b)
    assert np.all(np.abs(b) <= 2 * bound)
    if kind == "gru":  # the n block of b is b_in alone, and b_hn is one draw
        assert np.all(np.abs(b[2 * H :]) <= bound) and np.all(np.abs(np.asarray(params.b_hn)) <= bound)
