"""Training survives being killed: checkpoints of the whole training state, restored bit for bit.

`rj.save_training_state` / `rj.restore_training_state` round-trip any training pytree exactly, refuse a
truncated or corrupted checkpoint with an error naming it, and ignore what a run killed while saving left
behind; ``examples/char_lm.py`` killed with SIGKILL and resumed ends where an uninterrupted run ends.
"""

from __future__ import annotations

import gc
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnjax as rj
from examples import char_lm

ROOT = pathlib.Path(__file__).parents[1]


def _bits(x):
    """A leaf as a numpy array of its exact values (a typed PRNG key as its key data)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def assert_same_state(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        assert getattr(x, "dtype", type(x)) == getattr(y, "dtype", type(y)), jax.tree_util.keystr(path)
        np.testing.assert_array_equal(_bits(x), _bits(y), err_msg=jax.tree_util.keystr(path))


def training_state(key):
    """A training state of every kind of leaf: NamedTuple params, optax state, carry, PRNG key, scalars."""
    cell, head = rj.lstm(5), rj.dense(3)
    params = {"cell": cell.init(key, 4), "head": head.init(jax.random.fold_in(key, 1), 5)}
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    opt_state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam is not strict-promotion safe
        _, opt_state = optimizer.update(grads, opt_state, params)  # a count of 1 and non-zero moments
    return {
        "params": params,
        "opt_state": opt_state,
        "carry": cell.initial_carry(params["cell"], (2,)),
        "key": jax.random.key(7),
        "window": jnp.int32(11),
        "epoch": 3,
        "mask": np.array([True, False, True]),
        "offsets": np.arange(4, dtype=np.int64),
        "embed": jnp.sin(jnp.arange(3000.0)).reshape(100, 30),  # large enough for its own chunk of bytes
    }


# -- the helpers --------------------------------------------------------------------------------------------


def test_round_trip_is_exact(tmp_path, key):
    state = training_state(key)
    path = rj.save_training_state(tmp_path, 5, state)
    assert pathlib.Path(path) == tmp_path / "5" and pathlib.Path(path).is_dir()
    step, restored = rj.restore_training_state(tmp_path, like=state)
    assert step == 5
    assert_same_state(restored, state)
    assert isinstance(restored["params"]["cell"], rj.LSTMParams) and isinstance(
        restored["carry"], rj.LSTMCarry
    )
    assert type(restored["opt_state"][1][0]) is type(state["opt_state"][1][0])  # optax's ScaleByAdamState
    assert type(restored["epoch"]) is int and restored["epoch"] == 3
    # abstract leaves are enough to restore into
    step, again = rj.restore_training_state(tmp_path, like=jax.eval_shape(lambda: state))
    assert step == 5
    assert_same_state(again, restored)


def test_newest_step_and_keep(tmp_path, key):
    assert rj.restore_training_state(tmp_path / "missing", like={}) is None
    assert rj.latest_training_step(tmp_path) is None
    state = training_state(key)
    for step in (2, 4, 6):
        state["window"] = jnp.int32(step)
        rj.save_training_state(tmp_path, step, state, keep=2)
    assert rj.latest_training_step(tmp_path) == 6
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["4", "6"]
    assert rj.restore_training_state(tmp_path, like=state)[0] == 6
    step, older = rj.restore_training_state(tmp_path, like=state, step=4)
    assert step == 4 and int(older["window"]) == 4


def test_bad_arguments_raise(tmp_path, key):
    state = training_state(key)
    with pytest.raises(TypeError, match="step must be an int, got float"):
        rj.save_training_state(tmp_path, 1.0, state)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        rj.save_training_state(tmp_path, -1, state)
    rj.save_training_state(tmp_path, 3, state)
    with pytest.raises(ValueError, match="already holds a checkpoint of step 3"):
        rj.save_training_state(tmp_path, 3, state)
    with pytest.raises(ValueError, match=r"step 4 has no checkpoint in .*; it holds steps \[3\]"):
        rj.restore_training_state(tmp_path, like=state, step=4)
    wrong = {**state, "offsets": np.arange(5, dtype=np.int64)}
    with pytest.raises(ValueError, match=r"like\['offsets'\] has shape \[5\] and dtype int64, but the "):
        rj.restore_training_state(tmp_path, like=wrong)
    wrong = {**state, "offsets": np.arange(4, dtype=np.int32)}
    with pytest.raises(ValueError, match=r"saved shape \[4\] and dtype int64"):
        rj.restore_training_state(tmp_path, like=wrong)
    missing = {k: v for k, v in state.items() if k != "epoch"}
    with pytest.raises(ValueError, match=r"structure differs .* saved but not in like: \[\"\['epoch'\]\"\]"):
        rj.restore_training_state(tmp_path, like=missing)


def test_a_leftover_temporary_checkpoint_is_ignored(tmp_path, key):
    """A run killed while saving step 4 leaves orbax's temporary directory: restoring reads step 2, and the
    next save removes the leftover."""
    state = training_state(key)
    rj.save_training_state(tmp_path, 2, state)
    leftover = tmp_path / "4.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "2", leftover)
    for f in leftover.rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # half-written
    assert rj.latest_training_step(tmp_path) == 2
    step, restored = rj.restore_training_state(tmp_path, like=state)
    assert step == 2
    assert_same_state(restored, state)
    rj.save_training_state(tmp_path, 4, state)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("_")) == ["2", "4"]


# orbax's reads of a damaged file fail in several asyncio tasks at once; it raises the first and leaves
# the others' exceptions unretrieved, which Python reports when it collects them
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_checkpoint_is_never_restored_as_garbage(tmp_path, key, damage):
    """Every file of a checkpoint in turn cut in half or with one byte changed: restoring gives back the
    state saved (the file was not needed) or an error naming the checkpoint, never other values."""
    state = training_state(key)
    rj.save_training_state(tmp_path / "good", 1, state)
    files = sorted(f.relative_to(tmp_path / "good") for f in (tmp_path / "good").rglob("*") if f.is_file())
    caught: dict[str, str] = {}
    for i, name in enumerate(files):
        run = tmp_path / f"run{i}"
        shutil.copytree(tmp_path / "good", run)
        f = run / name
        data = bytearray(f.read_bytes())
        if damage == "truncate":
            del data[len(data) // 2 :]
        elif data:
            data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
        try:
            _, restored = rj.restore_training_state(run, like=state)
        except ValueError as e:  # CorruptCheckpointError among them
            assert str(run / "1") in str(e), str(e)
            caught[str(name)] = f"{type(e).__name__}: {e}"
        else:
            assert_same_state(restored, state)
    # the arrays' bytes live in OCDBT data files (the largest holds `embed`): damage there is caught
    data_files = [n for n in files if n.parent.name == "d" and "state" in n.parts]
    largest = str(max(data_files, key=lambda n: (tmp_path / "good" / n).stat().st_size))
    assert "CorruptCheckpointError" in caught.get(largest, ""), (largest, caught)
    if damage == "flip":  # orbax reads a changed byte of array data back without complaint: the fingerprints
        assert "the bytes of ['embed'] differ from those saved" in caught[largest], caught[largest]
    gc.collect()  # report orbax's unretrieved exceptions here, where they are expected


def test_restore_names_the_corrupt_record(tmp_path, key):
    state = training_state(key)
    rj.save_training_state(tmp_path, 1, state)
    rj.save_training_state(tmp_path, 2, state)
    record = next((tmp_path / "2" / "record").rglob("*.json"), None) or next(
        f for f in (tmp_path / "2" / "record").rglob("*") if f.is_file()
    )
    record.write_text('{"format": 1, "ste')
    with pytest.raises(rj.CorruptCheckpointError, match=r"checkpoint .*/2 is truncated or corrupted.*\[1\]"):
        rj.restore_training_state(tmp_path, like=state)


# -- the example, killed and resumed ------------------------------------------------------------------------


def _char_lm(cwd: pathlib.Path, cache: pathlib.Path, *args: str) -> subprocess.Popen:
    """``python -m examples.char_lm --quick`` in a fresh process, checkpointing every 2 steps."""
    cwd.mkdir(exist_ok=True)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), *sys.path]),
        # the runs share their compiled programs: a later run starts in seconds
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    cmd = [sys.executable, "-m", "examples.char_lm", "--quick", "--no-progress", "--dropout", "0.1"]
    cmd += ["--checkpoint-every", "2", "--checkpoint-dir", str(cwd / "checkpoints"), *args]
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finish(run: subprocess.Popen) -> str:
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_char_lm_killed_and_resumed_equals_uninterrupted(tmp_path):
    """SIGKILL after the checkpoint of step k >= 4 (maybe while saving the next), resume to 2k: the same
    parameters, optimizer state, carry, data position and key, bit for bit, as 2k steps in one go."""
    cache = tmp_path / "jax_cache"
    killed = _char_lm(tmp_path / "killed", cache, "--steps", "100000")
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 240
    while not any(p.name.isdigit() and int(p.name) >= 4 for p in checkpoints.glob("*")):
        assert killed.poll() is None, killed.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint of step 4 within 240 s"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    k = rj.latest_training_step(checkpoints)
    assert k is not None and k >= 4 and k % 2 == 0

    resumed = _char_lm(tmp_path / "killed", cache, "--steps", str(2 * k), "--resume")
    whole = _char_lm(tmp_path / "whole", cache, "--steps", str(2 * k))
    assert f"resumed from the checkpoint of step {k} in" in _finish(resumed)
    _finish(whole)

    with jax.enable_x64(False):  # the example trains in float32
        like = jax.eval_shape(lambda: char_lm.initial_state(char_lm.QUICK))
    step_a, a = rj.restore_training_state(checkpoints, like=like)
    step_b, b = rj.restore_training_state(tmp_path / "whole" / "checkpoints", like=like)
    assert step_a == step_b == 2 * k
    assert_same_state(a, b)
    assert int(a.window) == 2 * k  # the data position: the quick run has hundreds of windows per track
