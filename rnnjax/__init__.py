"""rnnjax: recurrent neural networks for JAX as pure functions, with a hand-derived BPTT.

>>> import rnnjax as rj
>>> cell = rj.lstm(hidden_size=128)
"""

from rnnjax.cells import (
    ACTIVATIONS,
    Cell,
    ElmanParams,
    GRUParams,
    HCarry,
    LSTMCarry,
    LSTMParams,
    elman,
    gru,
    lstm,
)
from rnnjax.driver import GRAD_MODES, unroll
from rnnjax.gradcheck import GradcheckReport, GradcheckRow, gradcheck

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "GRAD_MODES",
    "Cell",
    "ElmanParams",
    "GRUParams",
    "GradcheckReport",
    "GradcheckRow",
    "HCarry",
    "LSTMCarry",
    "LSTMParams",
    "elman",
    "gradcheck",
    "gru",
    "lstm",
    "unroll",
]
