"""Training checkpoints: save the whole training state every N steps, and resume from the latest one.

A training run that is killed (preempted, out of time, a crash) should continue where it stopped and end
where an uninterrupted run ends, bit for bit. That needs everything the next step reads: the parameters,
the optimizer state, the step, the data position, the RNG key and, for truncated BPTT, the carry passed
from one window to the next. Keep them in one pytree and hand it to `save_training_state`:

    >>> import jax, jax.numpy as jnp, optax, tempfile
    >>> import rnnjax as rj
    >>> cell = rj.lstm(8)
    >>> params = cell.init(jax.random.key(0), 4)
    >>> optimizer = optax.adam(1e-3)
    >>> state = {"params": params, "opt_state": optimizer.init(params), "key": jax.random.key(1),
    ...          "carry": cell.initial_carry(params, (2,)), "window": jnp.int32(0)}
    >>> directory = tempfile.mkdtemp()
    >>> path = rj.save_training_state(directory, 100, state)
    >>> step, state = rj.restore_training_state(directory, like=state)
    >>> step
    100

The format is orbax-checkpoint's (`orbax.checkpoint.CheckpointManager`), the JAX ecosystem's format for
training state: one directory per step, written under a temporary name and renamed when complete, so a
run killed while saving leaves no half-written step behind (the leftover temporary directory is ignored
when restoring and removed by the next save).

Several processes (`jax.distributed`, `rnnjax.launch`): every process calls `save_training_state` with the
same state and step; each writes the shards its devices hold, and the step's directory appears once all
have written. Every process calls `restore_training_state` alike, with a ``like`` whose leaves carry the
shardings of the run that restores, which need not be the run that saved: a checkpoint of 2 processes
restores onto 1, of 1 onto 2, or onto any mesh, with the same values. The state that the new run would
start from is the natural ``like`` (its arrays placed as that run places them)::

    mesh = jax.make_mesh((jax.device_count(),), ("data",))  # this run's devices, of all its processes
    like = jax.eval_shape(init_state)  # shapes and dtypes only: nothing is computed
    like = like._replace(carry=jax.tree.map(
        lambda x: x.update(sharding=NamedSharding(mesh, P("data"))), like.carry))  # the rest replicated
    step, state = rj.restore_training_state(directory, like=like)

Orbax does not check that the bytes it reads back are the bytes it wrote: a flipped bit in a data file
restores silently wrong values. So beside the arrays each checkpoint holds a JSON record of every leaf's
path, shape, dtype and a 64-bit fingerprint of its bytes (computed on the devices, so sharded arrays need
no gathering); restoring compares all three and raises `CorruptCheckpointError`, naming the checkpoint's
directory, rather than return a state that differs from the one saved.

orbax is imported inside the functions: ``import rnnjax`` does not pay for it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

_STATE = "state"  # the orbax item holding the arrays
_RECORD = "record"  # the orbax item holding the JSON record of every leaf
_FORMAT = 1


class CorruptCheckpointError(ValueError):
    """A checkpoint that cannot be read back as it was written: truncated, overwritten or incomplete.

    A `ValueError`; `restore_training_state` raises it, naming the checkpoint's directory."""


def save_training_state(
    directory: str | os.PathLike[str], step: int, state: PyTree, *, keep: int | None = 3
) -> os.PathLike[str]:
    """Writes ``state`` as the checkpoint of ``step`` under ``directory``, atomically.

    The step's directory appears only once every file in it is written (orbax writes a temporary directory
    and renames it), so a reader sees either the whole checkpoint or none of it.

    Args:
      directory: the run's checkpoint directory (created if missing); each step gets a subdirectory.
      step: the number of training steps the state has taken (a non-negative int).
      state: any pytree of arrays (jax, numpy, typed PRNG keys) and Python scalars: params, optimizer
        state, carry, key, data position.
      keep: how many of the newest checkpoints to keep (older ones are deleted); None keeps all.

    Returns:
      The directory of the new checkpoint (an `etils.epath.Path`, orbax's path type).

    Raises:
      TypeError: ``step`` is not an int.
      ValueError: ``step`` is negative, or ``directory`` already holds a checkpoint of ``step``.

    Examples:
      >>> import tempfile, jax.numpy as jnp, rnnjax as rj
      >>> directory = tempfile.mkdtemp()
      >>> path = rj.save_training_state(directory, 10, {"w": jnp.ones(3), "window": 2})
      >>> path.name, rj.latest_training_step(directory)
      ('10', 10)
    """
    import orbax.checkpoint as ocp

    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"save_training_state: step must be an int, got {type(step).__name__}")
    step = int(step)
    if step < 0:
        raise ValueError(f"save_training_state: step must be >= 0, got {step}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=False
    )
    with ocp.CheckpointManager(_path(directory), options=options) as manager:
        if step in manager.all_steps():
            raise ValueError(
                f"save_training_state: {manager.directory} already holds a checkpoint of step {step}"
            )
        leaves = _describe(state)
        record = {"format": _FORMAT, "step": step, "leaves": leaves, "digest": _digest(leaves)}
        manager.save(
            step,
            args=ocp.args.Composite(
                **{_STATE: ocp.args.StandardSave(_savable(state)), _RECORD: ocp.args.JsonSave(record)}
            ),
        )
        manager.wait_until_finished()
        return _path(directory) / str(step)


def latest_training_step(directory: str | os.PathLike[str]) -> int | None:
    """The newest complete checkpoint's step in ``directory``, or None if it holds none (or is missing).

    Args:
      directory: a run's checkpoint directory, as given to `save_training_state`.

    Returns:
      The largest step whose checkpoint is complete (an int), or None.

    Examples:
      >>> import tempfile, jax.numpy as jnp, rnnjax as rj
      >>> directory = tempfile.mkdtemp()
      >>> print(rj.latest_training_step(directory))
      None
      >>> _ = rj.save_training_state(directory, 5, {"w": jnp.zeros(2)})
      >>> rj.latest_training_step(directory)
      5
    """
    steps = _steps(directory)
    return steps[-1] if steps else None


def restore_training_state(
    directory: str | os.PathLike[str], like: PyTree, *, step: int | None = None
) -> tuple[int, PyTree] | None:
    """Reads a checkpoint written by `save_training_state` into the structure of ``like``.

    Args:
      directory: the run's checkpoint directory.
      like: a pytree of the saved state's structure, shapes and dtypes (a freshly initialised state, or
        `jax.ShapeDtypeStruct` leaves, as `jax.eval_shape` gives). It also says where each leaf goes: a jax
        array or a `jax.ShapeDtypeStruct` with a sharding is restored with that sharding, whatever the
        mesh, the number of devices or of processes that saved it (each process reads only the shards its
        devices hold); a `jax.ShapeDtypeStruct` without one goes to this process's first device, or, in a
        run of several processes, is replicated over every device; numpy and Python leaves come back as
        numpy arrays and Python scalars.
      step: which checkpoint to read; None reads the newest complete one.

    Returns:
      ``(step, state)``, with ``state`` of ``like``'s structure (Python scalar leaves come back as Python
      scalars), or None when ``directory`` holds no complete checkpoint (a leftover temporary directory
      from a run killed while saving does not count).

    Raises:
      ValueError: ``step`` has no checkpoint, or ``like`` differs from the saved state in a leaf's path,
        shape or dtype (the message names the leaf, the saved and the given).
      CorruptCheckpointError: the checkpoint's files are truncated, overwritten or missing (the message
        names the checkpoint's directory).

    Examples:
      >>> import tempfile, jax.numpy as jnp, rnnjax as rj
      >>> directory = tempfile.mkdtemp()
      >>> state = {"w": jnp.arange(3.0), "window": 4}
      >>> _ = rj.save_training_state(directory, 20, state)
      >>> step, restored = rj.restore_training_state(directory, like={"w": jnp.zeros(3), "window": 0})
      >>> step, restored["w"], restored["window"]
      (20, Array([0., 1., 2.], dtype=float32), 4)
    """
    import orbax.checkpoint as ocp

    steps = _steps(directory)
    if not steps:
        return None
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(
            f"restore_training_state: step {step} has no checkpoint in {directory}; it holds steps {steps}"
        )
    path = _path(directory) / str(step)
    others = [s for s in steps if s != step]
    advice = f"delete it to resume from an earlier checkpoint ({others})" if others else "delete it"
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    with ocp.CheckpointManager(_path(directory), options=options) as manager:
        try:
            record = manager.restore(step, args=ocp.args.Composite(**{_RECORD: ocp.args.JsonRestore()}))[
                _RECORD
            ]
            saved = record["leaves"]
            if record["digest"] != _digest(saved) or record["step"] != step:
                raise ValueError("its digest or step differs from its contents")
        except Exception as e:
            raise CorruptCheckpointError(
                f"the checkpoint {path} is truncated or corrupted: its record of the saved leaves cannot be "
                f"read ({type(e).__name__}: {e}); {advice}"
            ) from e
        _check_like(saved, like, path)
        try:
            restored = manager.restore(
                step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(_abstract(like))})
            )[_STATE]
        except Exception as e:
            raise CorruptCheckpointError(
                f"the checkpoint {path} is truncated or corrupted ({type(e).__name__}: {e}); {advice}"
            ) from e
    for name, f in zip(saved, _fingerprints(jax.tree.leaves(restored)), strict=True):
        if f != saved[name]["fingerprint"]:
            raise CorruptCheckpointError(
                f"the checkpoint {path} is corrupted: the bytes of {name} differ from those saved; {advice}"
            )
    state = jax.tree.map(
        lambda x, r: type(x)(np.asarray(r).item()) if isinstance(x, (bool, int, float)) else r, like, restored
    )
    return step, state


def _steps(directory: str | os.PathLike[str]) -> list[int]:
    """The steps of the complete checkpoints in ``directory``, ascending (orbax skips temporary ones)."""
    import orbax.checkpoint as ocp

    if not _path(directory).is_dir():
        return []
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    with ocp.CheckpointManager(_path(directory), options=options) as manager:
        return sorted(manager.all_steps())


def _path(directory: str | os.PathLike[str]) -> Any:
    """``directory`` as orbax's path type (`etils.epath.Path`): a local path made absolute, or a URL
    (``gs://...``) as it is."""
    from etils import epath

    directory = os.fspath(directory)
    return epath.Path(directory if "://" in directory else os.path.abspath(directory))


def _savable(state: PyTree) -> PyTree:
    """Python scalars as numpy scalars of their dtype (orbax saves arrays and numpy values)."""
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, (bool, int, float)) else x, state)


def _dtype_name(x: Any) -> str:
    return str(x.dtype) if hasattr(x, "dtype") else str(np.asarray(x).dtype)


def _describe(state: PyTree) -> dict[str, dict[str, Any]]:
    """Every leaf's path, shape, dtype and fingerprint, in leaf order: what a restore must reproduce."""
    leaves = jax.tree_util.tree_leaves_with_path(_savable(state))
    fingerprints = _fingerprints([leaf for _, leaf in leaves])
    return {
        jax.tree_util.keystr(path): {
            "shape": list(np.shape(leaf)),
            "dtype": _dtype_name(leaf),
            "fingerprint": f,
        }
        for (path, leaf), f in zip(leaves, fingerprints, strict=True)
    }


def _digest(leaves: dict[str, dict[str, Any]]) -> str:
    """A SHA-256 of the record of the leaves, so that a damaged record is told from a mismatched ``like``."""
    return hashlib.sha256(json.dumps(leaves).encode()).hexdigest()


def _check_like(saved: dict[str, dict[str, Any]], like: PyTree, path: os.PathLike[str]) -> None:
    """Raises ValueError naming the first leaf where ``like`` and the saved state disagree."""
    given = jax.tree_util.tree_leaves_with_path(like)
    names = [jax.tree_util.keystr(p) for p, _ in given]
    if names != list(saved):
        missing = [n for n in saved if n not in names]
        extra = [n for n in names if n not in saved]
        raise ValueError(
            f"restore_training_state: like's structure differs from the checkpoint {path}: leaves saved but "
            f"not in like: {missing or 'none'}; in like but not saved: {extra or 'none'}"
            + ("" if missing or extra else "; the leaves are in a different order")
        )
    for name, (_, leaf) in zip(names, given, strict=True):
        want = (saved[name]["shape"], saved[name]["dtype"])
        got = (list(np.shape(leaf)), _dtype_name(leaf))
        if want != got:
            raise ValueError(
                f"restore_training_state: like{name} has shape {got[0]} and dtype {got[1]}, but the "
                f"checkpoint {path} saved shape {want[0]} and dtype {want[1]}"
            )


def _abstract(like: PyTree) -> PyTree:
    """``like`` as `jax.ShapeDtypeStruct` leaves for orbax: a jax array's with its sharding, a
    `jax.ShapeDtypeStruct`'s with its own or else `_default_sharding`'s, and numpy's and Python's without
    one (orbax restores them as numpy arrays)."""
    default = _default_sharding()

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return x if x.sharding is not None else x.update(sharding=default)
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    return jax.tree.map(leaf, like)


def _default_sharding() -> jax.sharding.Sharding:
    """Where a `jax.ShapeDtypeStruct` leaf without a sharding is restored: this process's first device when
    it runs alone; every device, replicated, when it is one of several (each process then holds the whole
    leaf, as after computing it itself)."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _fingerprints(leaves: list[Any]) -> list[str]:
    """A 64-bit hex fingerprint of the bytes of each leaf (an array, a typed PRNG key or a scalar).

    Each element is cut into 32-bit words in memory order (elements narrower than 32 bits are one word
    each), the same for a numpy and a jax array of the same values. numpy leaves are cut on the host (so
    that a float64 numpy array keeps its bytes when JAX runs in float32); jax arrays on their devices, all
    in one compiled program.
    """
    words = [x if isinstance(x, jax.Array) else _words(np, np.asarray(x)) for x in leaves]
    sums = np.asarray(_weighted_sums(words))  # [n, 2] uint32
    return [f"{int(a):08x}{int(b):08x}" for a, b in sums]


def _words(xp: Any, x: Any) -> Any:
    """The array ``x`` as uint32 words, flat; ``xp`` is numpy or jax.numpy."""
    if xp is jnp and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if xp.iscomplexobj(x):
        x = xp.stack([x.real, x.imag], axis=-1)
    if x.dtype == bool:
        x = x.astype(np.uint8)
    word = np.dtype(f"uint{8 * min(x.dtype.itemsize, 4)}")
    if xp is np:
        return np.ascontiguousarray(x).view(word).astype(np.uint32).reshape(-1)
    return jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32).reshape(-1)


@jax.jit
def _weighted_sums(leaves: list[jax.Array]) -> jax.Array:
    """``[n, 2]`` uint32: two weighted sums of each leaf's words modulo 2**32, every weight odd, so that a
    change to any one word changes both sums; random changes collide with probability about 2**-64."""
    sums = []
    for x in leaves:
        words = _words(jnp, x)
        i = jnp.arange(words.size, dtype=jnp.uint32)
        w1 = (i * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)
        w2 = ((i ^ jnp.uint32(0x5BD1E995)) * jnp.uint32(0x85EBCA6B)) | jnp.uint32(1)
        sums.append(jnp.stack([jnp.sum(words * w1, dtype=jnp.uint32), jnp.sum(words * w2, dtype=jnp.uint32)]))
    return jnp.stack(sums) if sums else jnp.zeros((0, 2), jnp.uint32)
