"""Built-in cells, one file per family: forward step and hand-derived backward side by side."""

from rnnjax.cells.base import (
    Cell,
    GatesBackward,
    HCarry,
    HiddenCarry,
    LSTMCarry,
    ProjectionParams,
    RowSum,
    WeightGemm,
    steps_sum,
)
from rnnjax.cells.elman import ACTIVATIONS, ElmanParams, elman
from rnnjax.cells.gru import GRUParams, gru
from rnnjax.cells.indrnn import IndRNNParams, indrnn
from rnnjax.cells.layer_norm_lstm import LayerNormLSTMParams, layer_norm_lstm
from rnnjax.cells.linear import LinearRecurrence
from rnnjax.cells.lru import LRUParams, lru
from rnnjax.cells.lstm import LSTMParams, lstm
from rnnjax.cells.mgu import MGUParams, mgu
from rnnjax.cells.mingru import MinGRUParams, mingru
from rnnjax.cells.minlstm import MinLSTMParams, minlstm
from rnnjax.cells.peephole_lstm import PeepholeLSTMParams, peephole_lstm
from rnnjax.cells.projected_lstm import ProjectedLSTMParams, projected_lstm

__all__ = [
    "ACTIVATIONS",
    "Cell",
    "ElmanParams",
    "GRUParams",
    "GatesBackward",
    "HCarry",
    "HiddenCarry",
    "IndRNNParams",
    "LRUParams",
    "LSTMCarry",
    "LSTMParams",
    "LayerNormLSTMParams",
    "LinearRecurrence",
    "MGUParams",
    "MinGRUParams",
    "MinLSTMParams",
    "PeepholeLSTMParams",
    "ProjectedLSTMParams",
    "ProjectionParams",
    "RowSum",
    "WeightGemm",
    "elman",
    "gru",
    "indrnn",
    "layer_norm_lstm",
    "lru",
    "lstm",
    "mgu",
    "mingru",
    "minlstm",
    "peephole_lstm",
    "projected_lstm",
    "steps_sum",
]
