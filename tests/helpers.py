"""Shared test helpers: the cells under test, random inputs, and the relative error used everywhere."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_cells import REFERENCES

import rnnjax as rj

# Every built-in cell, by name: a factory of hidden_size (the configurations of `reference_cells`).
CELLS: dict[str, Any] = {name: ref.make for name, ref in REFERENCES.items()}
# The cells whose cases run in `make test` where a test over every cell is too slow for it (`tiered`).
FAST_CELLS = ("elman-tanh", "lstm", "gru")


def host_devices_env(devices: int) -> dict[str, str]:
    """The environment of a fresh Python process that sees ``devices`` host devices, imports the tests'
    modules, and shares this pytest worker's compilation cache (`conftest.py`), if it has one."""
    here = os.path.dirname(os.path.abspath(__file__))
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=os.pathsep.join([here, *sys.path]))
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env.update(
            JAX_COMPILATION_CACHE_DIR=cache,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    return env


def tiered(values: Any, fast: Any = FAST_CELLS) -> list[Any]:
    """``values`` as `pytest.mark.parametrize` arguments, those not in ``fast`` marked slow: `make test`
    runs the ``fast`` cases, `make test-slow` (in CI) the rest, so a test over every case keeps its
    coverage while the default suite stays within its time."""
    missing = set(fast) - set(values)
    assert not missing, f"tiered: {sorted(missing)} are not among the values"
    return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


def rel_err(a: Any, b: Any) -> float:
    """Worst leaf of ``‖a − b‖_∞ / ‖b‖_∞`` over two pytrees (absolute where ``b`` is all zero)."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, (x.shape, y.shape)
        scale = np.max(np.abs(y), initial=0.0)
        err = np.max(np.abs(x - y), initial=0.0)
        worst = max(worst, err / scale if scale > 0 else err)
    return float(worst)


def jit_grad(fn: Any, argnums: int | tuple[int, ...] = 0) -> Any:
    """``jax.jit(jax.grad(fn, argnums))``, with every ``str``, ``int`` or None argument static (a grad mode
    such as "manual", a checkpoint interval).

    Eagerly, ``jax.grad`` dispatches each primitive as a program of its own, compiled anew for each drawn
    shape; jitted, a drawn problem compiles once: 3-4x faster per example in the property tests.
    """

    def call(*args: Any) -> Any:
        static = tuple(i for i, a in enumerate(args) if a is None or isinstance(a, (str, int)))
        return jax.jit(jax.grad(fn, argnums), static_argnums=static)(*args)

    return call


def compilations(caplog: Any, fn: Any, *args: Any, **kwargs: Any) -> list[str]:
    """The programs that JAX compiles while it runs ``fn(*args, **kwargs)`` (``caplog``: pytest's fixture)."""
    caplog.clear()
    with jax.log_compiles(), caplog.at_level(logging.DEBUG, logger="jax"):
        jax.block_until_ready(fn(*args, **kwargs))
    return [r.getMessage()[:60] for r in caplog.records if r.getMessage().startswith("Compiling ")]


def random_problem(
    cell: rj.Cell, key: jax.Array, B: int, T: int, I: int, dtype: Any = jnp.float64, move: float = 0.1
) -> tuple[Any, jax.Array, Any]:
    """Params, inputs ``xs [B, T, I]`` and a random (non-zero) initial carry.

    The params are the cell's init with every leaf moved by ``move · N(0, 1)``: biases and shifts that
    start at zero (the LRU's ``b``, the GRU's ``b_hn``, the peepholes, the layer-norm shifts) would hide
    every gradient term that they multiply.
    """
    k_p, k_x, k_c = jax.random.split(key, 3)
    params = cell.init(k_p, I, dtype)
    moves = jax.random.split(jax.random.fold_in(k_p, 1), len(jax.tree.leaves(params)))
    params = jax.tree.unflatten(
        jax.tree.structure(params),
        [
            a + move * jax.random.normal(k, a.shape, a.dtype)
            for k, a in zip(moves, jax.tree.leaves(params), strict=True)
        ],
    )
    xs = jax.random.normal(k_x, (B, T, I), dtype)
    zero = cell.initial_carry(params, (B,))
    keys = jax.random.split(k_c, len(jax.tree.leaves(zero)))
    carry = jax.tree.unflatten(
        jax.tree.structure(zero),
        [
            0.5 * jax.random.normal(k, a.shape, a.dtype)
            for k, a in zip(keys, jax.tree.leaves(zero), strict=True)
        ],
    )
    return params, xs, carry


def readout_loss(cell: rj.Cell, key: jax.Array, **unroll_kwargs: Any):
    """A loss ``(params, xs, carry, grad) -> scalar``: a nonlinear read-out of the outputs and final carry."""

    def loss(params: Any, xs: jax.Array, carry: Any, grad: str) -> jax.Array:
        final, ys = rj.unroll(cell, params, xs, carry, grad=grad, **unroll_kwargs)
        w = jax.random.normal(key, ys.shape, ys.dtype)
        return jnp.sum(jnp.sin(ys) * w) + sum(jnp.sum(jnp.cos(c)) for c in jax.tree.leaves(final))

    return loss
