"""rnnjax: recurrent neural networks for JAX as pure functions, with a hand-derived BPTT.

    >>> import rnnjax as rj
    >>> cell = rj.lstm(hidden_size=128)

Submodules: ``rj.decode`` (greedy, sampling, beam search), ``rj.diagnostics`` (gradient flow through
time), ``rj.losses``, ``rj.seq2seq``, and the framework modules ``rj.nnx`` (Flax NNX), ``rj.linen``
(Flax Linen) and ``rj.equinox`` (Equinox), imported on first use.
"""

import importlib
from typing import Any

from rnnjax import decode, diagnostics, losses, seq2seq
from rnnjax.cells import (
    ACTIVATIONS,
    Cell,
    ElmanParams,
    GatesBackward,
    GRUParams,
    HCarry,
    HiddenCarry,
    IndRNNParams,
    LayerNormLSTMParams,
    LRUParams,
    LSTMCarry,
    LSTMParams,
    MGUParams,
    MinGRUParams,
    MinLSTMParams,
    PeepholeLSTMParams,
    ProjectedLSTMParams,
    ProjectionParams,
    elman,
    gru,
    indrnn,
    layer_norm_lstm,
    lru,
    lstm,
    mgu,
    mingru,
    minlstm,
    peephole_lstm,
    projected_lstm,
)
from rnnjax.checkpoint import load, save
from rnnjax.data import bucket_by_length, pad_sequences, unbucket
from rnnjax.driver import GRAD_MODES, unroll
from rnnjax.gradcheck import ORACLES as GRADCHECK_ORACLES
from rnnjax.gradcheck import GradcheckReport, GradcheckRow, gradcheck
from rnnjax.interop.torch import carry_from_torch, carry_to_torch, from_torch, to_torch
from rnnjax.layers import (
    MERGES,
    BidirectionalCarry,
    BidirectionalParams,
    Dense,
    DenseParams,
    Layer,
    bidirectional,
    dense,
    embed,
    last_valid,
    rnn,
    stack,
    time_major,
)
from rnnjax.regularize import Regularizer
from rnnjax.rtrl import rtrl_value_and_grad
from rnnjax.tbptt import truncated_bptt
from rnnjax.train_state import (
    CorruptCheckpointError,
    latest_training_step,
    restore_training_state,
    save_training_state,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "GRADCHECK_ORACLES",
    "GRAD_MODES",
    "MERGES",
    "BidirectionalCarry",
    "BidirectionalParams",
    "Cell",
    "CorruptCheckpointError",
    "Dense",
    "DenseParams",
    "ElmanParams",
    "GRUParams",
    "GatesBackward",
    "GradcheckReport",
    "GradcheckRow",
    "HCarry",
    "HiddenCarry",
    "IndRNNParams",
    "LRUParams",
    "LSTMCarry",
    "LSTMParams",
    "Layer",
    "LayerNormLSTMParams",
    "MGUParams",
    "MinGRUParams",
    "MinLSTMParams",
    "PeepholeLSTMParams",
    "ProjectedLSTMParams",
    "ProjectionParams",
    "Regularizer",
    "bidirectional",
    "bucket_by_length",
    "carry_from_torch",
    "carry_to_torch",
    "decode",
    "dense",
    "diagnostics",
    "elman",
    "embed",
    "from_torch",
    "gradcheck",
    "gru",
    "indrnn",
    "last_valid",
    "latest_training_step",
    "layer_norm_lstm",
    "load",
    "losses",
    "lru",
    "lstm",
    "mgu",
    "mingru",
    "minlstm",
    "pad_sequences",
    "peephole_lstm",
    "projected_lstm",
    "restore_training_state",
    "rnn",
    "rtrl_value_and_grad",
    "save",
    "save_training_state",
    "seq2seq",
    "stack",
    "time_major",
    "to_torch",
    "truncated_bptt",
    "unbucket",
    "unroll",
]


def __getattr__(name: str) -> Any:
    # the framework modules import their framework only when first used
    if name in ("nnx", "linen", "equinox"):
        return importlib.import_module(f"rnnjax.{name}")
    raise AttributeError(f"module 'rnnjax' has no attribute {name!r}")
