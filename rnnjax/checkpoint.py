"""Checkpoints: save and load any pytree of arrays (params, optax optimizer state) bit-exactly.

The bytes are Flax's msgpack serialization (`flax.serialization.to_bytes`); loading needs a ``target`` of
the same structure (e.g. freshly initialised params and ``optimizer.init(params)``), whose leaves are
replaced by the saved ones, dtypes and all.
"""

from __future__ import annotations

import os
from typing import Any

from flax import serialization

PyTree = Any


def _check_path(path: str | os.PathLike) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {path!r}")
    return os.fspath(path)


def save(path: str | os.PathLike, tree: PyTree) -> None:
    """Writes ``tree`` to ``path`` (atomically: a temporary file, then a rename)."""
    path = _check_path(path)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(serialization.to_bytes(tree))
    os.replace(tmp, path)


def load(path: str | os.PathLike, target: PyTree) -> PyTree:
    """Reads what `save` wrote into the structure of ``target``."""
    with open(_check_path(path), "rb") as f:
        return serialization.from_bytes(target, f.read())
