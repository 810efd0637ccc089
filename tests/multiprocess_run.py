"""Run by `tests/test_multiprocess.py`, alone or as every process of `python -m rnnjax.launch`: a few optax
steps of a small speech-recognition model, on one device and then with its batch split over the devices of
every process. Process 0 writes each run's final parameters and losses to ``OUT_DIR/<devices>.npz``.

    python tests/multiprocess_run.py OUT_DIR                        # one device: 1.npz
    python -m rnnjax.launch -n 2 --devices-per-process 2 -- python tests/multiprocess_run.py OUT_DIR

The launch above writes 1.npz (process 0's first device alone), 2.npz (2 processes x 1 device: each
process's first device) and 4.npz (2 processes x 2 devices).

Under the launcher, each process makes the same global batch from a shared seed and gives JAX its own rows
(`jax.make_array_from_process_local_data`); the parameters and the optimizer state are replicated
(`jax.device_put` to ``P()``), so the gradients are summed over the processes by gloo's all-reduce. The
loss is a sum of three models' losses, reaching at once what a multi-process step must get right:
- a stack of two bidirectional LSTMs with dropout between them, over sequences of different lengths,
  with a CTC loss (`rj.losses.ctc`) and the stack's backward recomputing from checkpoints (``checkpoint=``);
- a user-written cell (only ``init``, ``initial_carry`` and ``step``), whose backward chains per-step VJPs;
- an LSTM whose backward keeps at most a byte budget of state (``budget=``, the nested schedule).
Per-sequence losses are gathered from every process and printed by process 0.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rnnjax as rj
from rnnjax.launch import initialize, process_rows

B, T, I, H, C, N = 4, 6, 3, 3, 4, 2  # batch, frames, features, hidden, classes (0: CTC's blank), labels
STEPS = 3
BUDGET = 6000  # bytes kept by the budgeted LSTM's backward: well under all T steps' residuals (13 kB)


class TanhParams(NamedTuple):
    w_ih: jax.Array  # [I, H]
    w_hh: jax.Array  # [H, H]
    b: jax.Array  # [H]


class TanhCarry(NamedTuple):
    h: jax.Array  # [B, H]


def tanh_init(key: jax.Array, input_size: int, dtype: Any = None) -> TanhParams:
    k_ih, k_hh = jax.random.split(key)
    return TanhParams(
        jax.random.normal(k_ih, (input_size, H), dtype) / np.sqrt(input_size),
        jax.random.normal(k_hh, (H, H), dtype) / np.sqrt(H),
        jnp.zeros(H, dtype),
    )


def tanh_initial_carry(params: TanhParams, batch_shape: tuple[int, ...] = ()) -> TanhCarry:
    return TanhCarry(jnp.zeros((*batch_shape, H), params.w_hh.dtype))


def tanh_step(params: TanhParams, carry: TanhCarry, x: jax.Array) -> tuple[TanhCarry, jax.Array]:
    h = jnp.tanh(x @ params.w_ih + carry.h @ params.w_hh + params.b)
    return TanhCarry(h), h


USER = rj.Cell(init=tanh_init, initial_carry=tanh_initial_carry, step=tanh_step, hidden_size=H, name="user")
ENCODER = rj.stack(rj.bidirectional(rj.lstm(H)), rj.bidirectional(rj.lstm(H)), dropout=0.1)
HEAD = rj.dense(C)
BUDGETED = rj.lstm(H)


def batches() -> list[tuple[np.ndarray, ...]]:
    """Every step's global batch: features ``[B, T, I]``, lengths ``[B]``, labels ``[B, N]``, label
    lengths ``[B]`` (the same on every process: one seed)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        lengths = rng.integers(3, T + 1, B)
        label_lengths = rng.integers(1, N + 1, B)
        labels = rng.integers(1, C, (B, N)) * (np.arange(N)[None, :] < label_lengths[:, None])
        out.append((rng.standard_normal((B, T, I)), lengths, labels, label_lengths))
    return out


def init_params() -> dict[str, Any]:
    k_enc, k_head, k_user, k_lstm = jax.random.split(jax.random.key(0), 4)
    return {
        "encoder": ENCODER.init(k_enc, I, jnp.float64),
        "head": HEAD.init(k_head, ENCODER.output_size, jnp.float64),
        "user": USER.init(k_user, I, jnp.float64),
        "budgeted": BUDGETED.init(k_lstm, I, jnp.float64),
    }


def per_sequence_loss(params: Any, batch: tuple, key: jax.Array) -> jax.Array:
    """``[B]``: each sequence's CTC loss plus two read-outs of the other models' outputs."""
    xs, lengths, labels, label_lengths = batch
    _, hs = ENCODER.apply(params["encoder"], xs, lengths=lengths, train=True, key=key, checkpoint=2)
    ctc = rj.losses.ctc(HEAD.apply(params["head"], hs), lengths, labels, label_lengths)
    _, ys_user = rj.unroll(USER, params["user"], xs, lengths=lengths, checkpoint=3)
    _, ys_lstm = rj.unroll(
        BUDGETED, params["budgeted"], xs, lengths=lengths, budget=BUDGET, schedule="nested"
    )
    return ctc + jnp.sum(jnp.sin(ys_user), axis=(1, 2)) + jnp.sum(jnp.cos(ys_lstm), axis=(1, 2))


def _one_per_process(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
    """A mesh of each process's first device out of ``mesh``'s: a process of several devices runs as one of
    one device."""
    first: dict[int, Any] = {}
    for device in mesh.devices.flat:
        first.setdefault(device.process_index, device)
    return jax.sharding.Mesh(np.array(list(first.values())), mesh.axis_names, axis_types=mesh.axis_types)


def train(mesh: jax.sharding.Mesh | None) -> tuple[Any, list[float]]:
    """The final parameters and every step's loss, the batch split over ``mesh`` (None: one device)."""
    split = mesh is not None
    rows = NamedSharding(mesh, P("data")) if split else None
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))

    def place_rows(a: np.ndarray) -> jax.Array:
        """This process's rows of a global ``[B, ...]`` array, as one array over every process's devices."""
        if not split:
            return jnp.asarray(a)
        return jax.make_array_from_process_local_data(rows, a[process_rows(rows, B)])

    @jax.jit
    def train_step(params: Any, opt_state: Any, batch: tuple, key: jax.Array) -> tuple:
        key, dropout = jax.random.split(key)

        def loss_fn(p: Any) -> tuple[jax.Array, jax.Array]:
            per_sequence = per_sequence_loss(p, batch, dropout)
            return jnp.mean(per_sequence), per_sequence

        (loss, per_sequence), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, key, loss, per_sequence

    where = f"{jax.process_count()} processes, {mesh.size if split else 1} devices"
    # a context mesh (explicit axes): every array's type carries its split
    with jax.set_mesh(mesh) if split else contextlib.nullcontext():
        params, key = init_params(), jax.random.key(1)
        if split:
            params, key = jax.device_put((params, key), NamedSharding(mesh, P()))  # replicated
        opt_state = optimizer.init(params)
        losses = []
        for step, batch in enumerate(batches()):
            placed = tuple(place_rows(a) for a in batch)
            assert placed[0].addressable_shards[0].data.shape[0] == B // (mesh.size if split else 1)
            params, opt_state, key, loss, per_sequence = train_step(params, opt_state, placed, key)
            if split:  # every process's rows, gathered (a collective: every process takes part)
                per_sequence = multihost_utils.process_allgather(per_sequence, tiled=True)
            losses.append(float(loss))
            if jax.process_index() == 0:
                print(
                    f"{where}, step {step}: loss {losses[-1]:.6f}, per sequence {np.round(per_sequence, 4)}"
                )
    return params, losses


def main(out_dir: str) -> None:
    """Trains on one device and, where there are several, on a mesh of one device per process and on one
    of every device; process 0 writes each run's ``<devices>.npz`` into ``out_dir``. One launch runs every
    topology its processes hold, so their start-up and JAX's is paid once."""
    jax.config.update("jax_enable_x64", True)
    initialize()
    meshes: list[jax.sharding.Mesh | None] = [None]  # one device: each process's first, alone
    if jax.device_count() > 1:
        every = jax.make_mesh((jax.device_count(),), ("data",))
        if jax.process_count() > 1 and jax.local_device_count() > 1:
            meshes.append(_one_per_process(every))
        meshes.append(every)
    for mesh in meshes:
        params, losses = train(mesh)
        devices = 1 if mesh is None else mesh.size
        if jax.process_index() == 0:
            path = pathlib.Path(out_dir, f"{devices}.npz")
            leaves = {f"param_{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(params))}
            np.savez(path, losses=np.asarray(losses), **leaves)
            print(f"{jax.process_count()} processes, {devices} devices: wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1])
