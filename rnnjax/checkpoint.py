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


def _check_path(path: str | os.PathLike[str]) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {path!r}")
    return os.fspath(path)


def save(path: str | os.PathLike[str], tree: PyTree) -> None:
    """Writes ``tree`` to ``path`` (atomically: a temporary file, then a rename).

    Args:
      path: the file to write; ``path + ".tmp"`` is written first, then renamed over it, so a reader sees
        either the old file or the whole new one.
      tree: any pytree of arrays and Python scalars (params, an optax optimizer state), of any dtypes.

    Raises:
      OSError: if the file cannot be written.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, rnnjax as rj
      >>> path = os.path.join(tempfile.mkdtemp(), "params.msgpack")
      >>> rj.save(path, {"w": jnp.ones((2, 3)), "step": 7})
      >>> rj.load(path, {"w": jnp.zeros((2, 3)), "step": 0})["step"]
      7
    """
    path = _check_path(path)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(serialization.to_bytes(tree))
    os.replace(tmp, path)


def load(path: str | os.PathLike[str], target: PyTree) -> PyTree:
    """Reads what `save` wrote into the structure of ``target``.

    Args:
      path: a file written by `save`.
      target: a pytree of the saved structure (e.g. freshly initialised params and
        ``optimizer.init(params)``); its leaves' values are not read.

    Returns:
      A pytree of ``target``'s structure holding the saved leaves, bit for bit, with their saved shapes and
      dtypes.

    Raises:
      OSError: if the file cannot be read.
      ValueError: if the saved structure does not match ``target`` (Flax's message names the keys).

    Examples:
      >>> import os, tempfile, jax, rnnjax as rj
      >>> cell = rj.gru(4)
      >>> params = cell.init(jax.random.key(0), input_size=3)
      >>> path = os.path.join(tempfile.mkdtemp(), "gru.msgpack")
      >>> rj.save(path, params)
      >>> restored = rj.load(path, cell.init(jax.random.key(1), input_size=3))
      >>> bool((restored.w_hh == params.w_hh).all()), restored.w_hh.dtype
      (True, dtype('float32'))
    """
    with open(_check_path(path), "rb") as f:
        return serialization.from_bytes(target, f.read())
