"""Every built-in cell under test, in one list: its configuration, its numpy reference and its memory bound.

This is the one list that the tests and the gradient-check table read (`tests/helpers.py` builds ``CELLS``
from it; `tests/test_unroll.py` runs each ``step`` as the forward's oracle; `tests/test_bptt.py` holds the
manual BPTT's compiled temporaries under ``leaner`` times autodiff's; `examples/gradcheck_table.py` checks
each ``make``). `tests/test_registry.py` fails when a factory exported by `rnnjax.cells` has no entry here.
Adding a built-in cell: see docs/develop/add_a_cell.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import rnnjax as rj


@dataclasses.dataclass(frozen=True)
class Reference:
    """One built-in cell under test.

    Attributes:
      factory: the exported factory (``rj.lstm``); every exported factory has at least one entry.
      make: ``H -> Cell``, the configuration the tests use, with outputs of width ``H``.
      step: one step in plain numpy, ``(p, x [I], h [H], c [H] or None) -> (h, c)``, with ``p`` the params
        as a dict of numpy arrays; the paper's equations, written independently of the cell's file.
      leaner: the bound on the manual BPTT's compiled temporary memory as a fraction of autodiff's
        (float32, B=8, T=64, I=H=32), a few points above the measured ratio.
    """

    factory: Callable[..., rj.Cell]
    make: Callable[[int], rj.Cell]
    step: Callable[[dict[str, np.ndarray], np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]]
    leaner: float


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


LAYER_NORM_EPS = 1e-3


def _layer_norm(v, eps=LAYER_NORM_EPS):
    return (v - v.mean()) / np.sqrt(v.var() + eps)


NP_ACT = {"tanh": np.tanh, "relu": lambda z: np.maximum(z, 0), "sigmoid": _sigmoid, "identity": lambda z: z}


def _elman(act):
    return lambda p, x, h, c: (NP_ACT[act](x @ p["w_ih"] + h @ p["w_hh"] + p["b"]), None)


def _lstm_cell(z, c):
    n = z.shape[-1] // 4  # the cell state's width: H, or H + 1 for the projected LSTM
    i, f, g, o = _sigmoid(z[:n]), _sigmoid(z[n : 2 * n]), np.tanh(z[2 * n : 3 * n]), _sigmoid(z[3 * n :])
    c = f * c + i * g
    return o * np.tanh(c), c


def _lstm(p, x, h, c):
    return _lstm_cell(x @ p["w_ih"] + h @ p["w_hh"] + p["b"], c)


def _projected_lstm(p, x, h, c):  # Sak et al. 2014, §2.2: h_t = (o ⊙ tanh(c_t)) w_hr
    h, c = _lstm(p, x, h, c)
    return h @ p["w_hr"], c


def _layer_norm_lstm(p, x, h, c):  # Ba et al. 2016, §A eqs. 20-22
    z = p["gamma_ih"] * _layer_norm(x @ p["w_ih"]) + p["gamma_hh"] * _layer_norm(h @ p["w_hh"]) + p["beta"]
    H = h.shape[-1]
    i, f, g, o = _sigmoid(z[:H]), _sigmoid(z[H : 2 * H]), np.tanh(z[2 * H : 3 * H]), _sigmoid(z[3 * H :])
    c = f * c + i * g
    return o * np.tanh(p["gamma_c"] * _layer_norm(c) + p["beta_c"]), c


def _lru(p, x, h, c):  # Orvieto et al. 2023, eq. 1, in complex numbers
    N = p["nu_log"].shape[0]
    lam = np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))
    u = x @ p["w_ih"] + p["b"]
    s = (h[:N] + 1j * h[N:]) * lam + np.exp(p["gamma_log"]) * (u[:N] + 1j * u[N:])
    return np.concatenate([s.real, s.imag]), None


def _indrnn(act):  # Li et al. 2018, eq. 2
    return lambda p, x, h, c: (NP_ACT[act](x @ p["w_ih"] + p["u"] * h + p["b"]), None)


def _mingru(p, x, h, c):  # Feng et al. 2024, §3.1
    H = h.shape[-1]
    zx = x @ p["w_ih"] + p["b"]
    z = _sigmoid(zx[:H])
    return (1 - z) * h + z * zx[H:], None


def _minlstm(p, x, h, c):  # Feng et al. 2024, §3.2
    H = h.shape[-1]
    zx = x @ p["w_ih"] + p["b"]
    f, i = _sigmoid(zx[:H]), _sigmoid(zx[H : 2 * H])
    return f / (f + i) * h + i / (f + i) * zx[2 * H :], None


def _peephole_lstm(p, x, h, c):  # Graves 2013, eqs. 7-11
    H = h.shape[-1]
    z = x @ p["w_ih"] + h @ p["w_hh"] + p["b"]
    pi, pf, po = p["p"][:H], p["p"][H : 2 * H], p["p"][2 * H :]
    i, f = _sigmoid(z[:H] + pi * c), _sigmoid(z[H : 2 * H] + pf * c)
    c = f * c + i * np.tanh(z[2 * H : 3 * H])
    return _sigmoid(z[3 * H :] + po * c) * np.tanh(c), c


def _mgu(p, x, h, c):  # Zhou et al. 2016, eq. 8
    H = h.shape[-1]
    zx = x @ p["w_ih"] + p["b"]
    f = _sigmoid(zx[:H] + h @ p["w_hh"])
    return (1 - f) * h + f * np.tanh(zx[H:] + (f * h) @ p["u_h"]), None


def _gru(p, x, h, c):
    H = h.shape[-1]
    zx, zh = x @ p["w_ih"] + p["b"], h @ p["w_hh"]
    r = _sigmoid(zx[:H] + zh[:H])
    z = _sigmoid(zx[H : 2 * H] + zh[H : 2 * H])
    n = np.tanh(zx[2 * H :] + r * (zh[2 * H :] + p["b_hn"]))
    return (1 - z) * n + z * h, None


# The layer-norm LSTM's gains and shifts drawn away from 1 and 0, so that a backward that drops one of them is
# caught; ε raised from 1e-5 because at a zero carry LN(h w_hh) sits where its k-th derivative is ~ε^(-k/2):
# with these gains and shifts even fourth-order differences came out 2.6e-6 off at the default ε (test_bptt
# checks the default ε there, with the exact oracles and gains alone). Module-level functions, so that two
# cells made from this configuration compare equal.
def _gain_init(k, s, d):
    return 1 + 0.5 * jax.random.normal(k, s, d)


def _shift_init(k, s, d):
    return 0.5 * jax.random.normal(k, s, d)


# Memory bounds measured at float32, B=8, T=64, I=H=32 (Elman 0.51x, LSTM 0.34x, GRU 0.57x, MGU 0.59x,
# minGRU 0.41x, minLSTM 0.29x), a few points above each; the Elman cells with relu or identity, IndRNN with
# relu and the LRU sit at 0.71-0.76x, because autodiff needs no stored derivative there: both keep the
# carries and the gate gradients, and the manual BPTT also the time-major copy of xs its projection reads.
REFERENCES: dict[str, Reference] = {
    **{
        f"elman-{a}": Reference(rj.elman, lambda H, a=a: rj.elman(H, a), _elman(a), bound)
        for a, bound in zip(rj.ACTIVATIONS, (0.55, 0.75, 0.65, 0.80), strict=True)
    },
    "lstm": Reference(rj.lstm, rj.lstm, _lstm, 0.40),
    "gru": Reference(rj.gru, rj.gru, _gru, 0.50),
    "indrnn-relu": Reference(rj.indrnn, rj.indrnn, _indrnn("relu"), 0.79),
    "indrnn-tanh": Reference(rj.indrnn, lambda H: rj.indrnn(H, "tanh"), _indrnn("tanh"), 0.57),
    "mingru": Reference(rj.mingru, rj.mingru, _mingru, 0.45),
    "minlstm": Reference(rj.minlstm, rj.minlstm, _minlstm, 0.33),
    "mgu": Reference(rj.mgu, rj.mgu, _mgu, 0.63),
    "lstm-peephole": Reference(rj.peephole_lstm, rj.peephole_lstm, _peephole_lstm, 0.40),
    "lstm-layernorm": Reference(
        rj.layer_norm_lstm,
        lambda H: rj.layer_norm_lstm(H, eps=LAYER_NORM_EPS, gain_init=_gain_init, shift_init=_shift_init),
        _layer_norm_lstm,
        0.61,
    ),
    # N = H complex units (2H real features), eigenvalues in a ring away from 0 and the phase spread wide
    "lru": Reference(rj.lru, lambda H: rj.lru(H, r_min=0.4, r_max=0.95, max_phase=3.0), _lru, 0.75),
    # outputs of width H (like every cell here) from a state one wider: proj_size < hidden_size
    "lstm-projected": Reference(
        rj.projected_lstm, lambda H: rj.projected_lstm(H + 1, proj_size=H), _projected_lstm, 0.50
    ),
}
