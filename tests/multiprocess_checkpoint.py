"""Run by `tests/test_multiprocess.py`, alone or as every process of `python -m rnnjax.launch`: restores a
training state that a run of another size saved, checks it bit for bit, and saves it again.

    python tests/multiprocess_checkpoint.py DIR --save 1                      # one process, one device
    python -m rnnjax.launch -n 2 --devices-per-process 2 -- \\
        python tests/multiprocess_checkpoint.py DIR --restore 1 --save 2       # 2 processes, 4 devices
    python tests/multiprocess_checkpoint.py DIR --restore 2                   # one process again

The state holds every kind of leaf a training run saves: replicated parameters and optimizer state, a carry
and an embedding table split over the devices by rows (each process writes its own rows), a PRNG key, a
data position, a Python int and a numpy array. Its values are a function of a fixed seed alone, so any run
knows what it should restore. The restore target is abstract (`jax.ShapeDtypeStruct` leaves carrying this
run's shardings), so nothing of the values can come from it.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rnnjax as rj
from rnnjax.launch import initialize

B, I, H, V = 4, 3, 5, 8  # tracks (split over up to 4 devices), inputs, hidden units, table rows


def expected_state(mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """The state every run saves and expects, made on ``mesh`` by one program (every process the same)."""
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def arrays() -> dict[str, Any]:
        cell = rj.lstm(H)
        params = cell.init(jax.random.key(0), I)
        optimizer = optax.adam(1e-2)
        opt_state = optimizer.init(params)
        _, opt_state = optimizer.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
        k_h, k_c, k_table = jax.random.split(jax.random.key(1), 3)
        carry = rj.LSTMCarry(jax.random.normal(k_h, (B, H)), jax.random.normal(k_c, (B, H)))
        table = jax.random.normal(k_table, (V, 16))
        return {
            "params": params,
            "opt_state": opt_state,
            "carry": carry,
            "table": table,
            "key": jax.random.key(7),
            "window": jnp.int32(11),
        }

    shardings = {
        "params": replicated,
        "opt_state": replicated,
        "carry": rows,
        "table": rows,
        "key": replicated,
        "window": replicated,
    }
    return {**jax.jit(arrays, out_shardings=shardings)(), "epoch": 3, "offsets": np.arange(4, dtype=np.int64)}


def abstract(state: dict[str, Any]) -> dict[str, Any]:
    """A restore target: the shapes, dtypes and shardings of ``state``, none of its values."""

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return type(x)(0) if isinstance(x, int) else np.zeros_like(x)

    return jax.tree.map(leaf, state)


def gathered(x: Any) -> np.ndarray:
    """Every process's part of a leaf, as one numpy array of its exact values (a key as its key data)."""
    if isinstance(x, jax.Array):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--restore", type=int, help="the step to restore and check")
    parser.add_argument("--save", type=int, help="the step to save the state as")
    args = parser.parse_args()
    initialize()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    where = f"{jax.process_count()} processes, {jax.device_count()} devices"
    state = expected_state(mesh)
    if args.restore is not None:
        like = abstract(state)
        step, restored = rj.restore_training_state(args.directory, like=like, step=args.restore)
        assert step == args.restore, step
        paths = jax.tree_util.tree_leaves_with_path(state)
        for (path, want), got, target in zip(
            paths, jax.tree.leaves(restored), jax.tree.leaves(like), strict=True
        ):
            name = jax.tree_util.keystr(path)
            assert type(got) is type(want) or isinstance(got, jax.Array), (name, type(got))
            if isinstance(target, jax.ShapeDtypeStruct):
                assert got.sharding.is_equivalent_to(target.sharding, got.ndim), (name, got.sharding)
            np.testing.assert_array_equal(gathered(got), gathered(want), err_msg=name)
        if jax.process_index() == 0:
            print(f"{where}: restored step {step}, equal")
    if args.save is not None:
        rj.save_training_state(args.directory, args.save, state)
        if jax.process_index() == 0:
            print(f"{where}: saved step {args.save}")


if __name__ == "__main__":
    main()
