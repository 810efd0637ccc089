"""Built-in cells, one file per family: forward step and hand-derived backward side by side."""

from rnnjax.cells.base import Cell, HCarry, LSTMCarry
from rnnjax.cells.elman import ACTIVATIONS, ElmanParams, elman
from rnnjax.cells.gru import GRUParams, gru
from rnnjax.cells.lstm import LSTMParams, lstm

__all__ = [
    "ACTIVATIONS",
    "Cell",
    "ElmanParams",
    "GRUParams",
    "HCarry",
    "LSTMCarry",
    "LSTMParams",
    "elman",
    "gru",
    "lstm",
]
