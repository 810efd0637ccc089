"""rnnjax: recurrent neural networks for JAX as pure functions, with a hand-derived BPTT.

    >>> import rnnjax as rj
    >>> cell = rj.lstm(hidden_size=128)

Submodules: ``rj.decode`` (greedy, sampling, beam search), ``rj.diagnostics`` (gradient flow through
time), ``rj.losses``, ``rj.seq2seq``, and the framework modules ``rj.nnx`` (Flax NNX), ``rj.linen``
(Flax Linen) and ``rj.equinox`` (Equinox), imported on first use.
"""

import importlib
from typing import Any

from rnnjax import cells, decode, diagnostics, losses, seq2seq
from rnnjax.cells import *  # noqa: F403  (every cell and its types: the list is rnnjax.cells.__all__)
from rnnjax.checkpoint import load, save
from rnnjax.data import bucket_by_length, pad_sequences, unbucket
from rnnjax.driver import GRAD_MODES, UnrollPlan, unroll, unroll_plan
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
from rnnjax.parallel import METHODS
from rnnjax.parallel.deer import DeerInfo, deer_unroll
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
    "GRADCHECK_ORACLES",
    "GRAD_MODES",
    "MERGES",
    "METHODS",
    "BidirectionalCarry",
    "BidirectionalParams",
    "CorruptCheckpointError",
    "DeerInfo",
    "Dense",
    "DenseParams",
    "GradcheckReport",
    "GradcheckRow",
    "Layer",
    "Regularizer",
    "UnrollPlan",
    "bidirectional",
    "bucket_by_length",
    "carry_from_torch",
    "carry_to_torch",
    "decode",
    "deer_unroll",
    "dense",
    "diagnostics",
    "embed",
    "from_torch",
    "gradcheck",
    "last_valid",
    "latest_training_step",
    "load",
    "losses",
    "pad_sequences",
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
    "unroll_plan",
]
__all__ += cells.__all__


def __getattr__(name: str) -> Any:
    # the framework modules import their framework only when first used
    if name in ("nnx", "linen", "equinox"):
        return importlib.import_module(f"rnnjax.{name}")
    raise AttributeError(f"module 'rnnjax' has no attribute {name!r}")
