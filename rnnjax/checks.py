"""Value-dependent checks of arrays that may be traced: free under `jax.jit`, errors under `checkify`.

Shapes and dtypes are checked in Python at trace time. A value (a length, a class id) is known only when the
program runs, so its check is a `jax.experimental.checkify.debug_check`: under plain `jax.jit` (or `jax.grad`)
it is dropped and the program is unchanged; wrapped as ``checkify.checkify(f)`` (or
``checkify.checkify(jax.jit(f))``, ``errors=checkify.user_checks``), a value outside its range comes back as
an error naming the argument, the range expected and the extremes found.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import checkify

Array = jax.Array

# the message of the check that the recurrences' inputs are finite where they are read
NONFINITE_XS = "xs must be finite at valid steps (t < lengths[b])"


def check_array(value: Any, name: str, expected: str, kind: Any = None) -> Array:
    """``value`` as an array (a Python list or a numpy array converted as `jnp.asarray` would), or a
    `TypeError` naming ``name``, ``expected`` and what came: None, a string, a ragged list, or a dtype that
    is not a sub-dtype of ``kind`` (e.g. ``jnp.floating``, ``jnp.integer``; None accepts any).

    Args:
      value: the argument as the user passed it.
      name: its name in the error, e.g. ``"lengths"``.
      expected: what it must be, e.g. ``"an integer array [B]"``.
      kind: the dtype kind required, or None.
    """
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        try:
            value = jnp.asarray(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be {expected}, got {type(value).__name__} ({e})") from None
    if kind is not None and not jnp.issubdtype(value.dtype, kind):
        raise TypeError(f"{name} must be {expected}, got dtype {value.dtype}")
    return value


def debug_check_range(values: Array, lo: int, hi: int, what: str, valid: Array | None = None) -> None:
    """Under `checkify.checkify`, an error unless ``lo <= values <= hi`` wherever ``valid``; else nothing.

    Args:
      values: an integer array.
      lo, hi: the smallest and the largest value allowed (both included).
      what: the start of the message, e.g. ``"lengths must lie in [0, T] = [0, 5]"``; the check adds
        ``", got values from {min} to {max}"``, the extremes over the ``valid`` entries. No braces.
      valid: a bool array of ``values``' shape: the entries checked (the others may hold anything, such as
        padding); None checks all.
    """
    if values.size == 0:
        return
    info = jnp.iinfo(values.dtype)
    low = values if valid is None else jnp.where(valid, values, jnp.full_like(values, info.max))
    high = values if valid is None else jnp.where(valid, values, jnp.full_like(values, info.min))
    smallest, largest = jnp.min(low), jnp.max(high)
    checkify.debug_check(
        (smallest >= lo) & (largest <= hi),
        what + ", got values from {} to {}",
        smallest,
        largest,
    )


def debug_check_finite(values: Array, what: str, valid: Array | None = None) -> None:
    """Under `checkify.checkify`, an error unless every entry of ``values`` is finite wherever ``valid``;
    else nothing.

    Args:
      values: a floating-point array, e.g. ``xs [B, T, I]``.
      what: the start of the message, e.g. ``"xs must be finite at valid steps"``; the check adds
        ``", got {n} entries that are NaN or inf"``. No braces.
      valid: a bool array of the leading axes of ``values`` (``[B, T]``: the steps checked; the padding may
        hold anything); None checks all.
    """
    if values.size == 0:
        return
    bad = ~jnp.isfinite(values)
    if valid is not None:
        bad = bad & valid.reshape(valid.shape + (1,) * (values.ndim - valid.ndim))
    count = jnp.sum(bad, dtype=jnp.int32)
    checkify.debug_check(count == 0, what + ", got {} entries that are NaN or inf", count)


def debug_check_not(values: Array, value: int, what: str, valid: Array | None = None) -> None:
    """Under `checkify.checkify`, an error where ``values == value`` at a ``valid`` entry; else nothing.

    ``what`` is the whole message (no braces).
    """
    if values.size == 0:
        return
    hit = values == value
    checkify.debug_check(~jnp.any(hit if valid is None else hit & valid), what)
