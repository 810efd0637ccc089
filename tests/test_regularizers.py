"""Regularisers inside the recurrence (`rnnjax.regularize`): the hand-derived backward multiplies by the
same masks as the forward.

For every built-in cell where a regulariser applies, the manual gradient equals `jax.grad` through the same
masked forward (``grad="autodiff"``) in float64 at ≤ 1e-10, and central differences (the masks fixed by the
key), with lengths and reverse and under the memory schedules; the manual path keeps less compiled memory
than autodiff's; inference is the expectation; the same key gives the same masks; bad combinations are
refused.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from helpers import CELLS, random_problem, rel_err

import rnnjax as rj
from rnnjax.regularize import GEMM_CELLS

B, T, I, H = 4, 7, 3, 5
LENGTHS = jnp.array([T, 0, 3, 1])
KEY = jax.random.key(11)

GEMM = [n for n in CELLS if n.split("-")[0] in ("elman", "lstm", "gru", "mgu")]
DIAGONAL = [n for n in CELLS if n not in GEMM]
ALL = rj.Regularizer(input_dropout=0.3, state_dropout=0.4, zoneout=0.3, zoneout_c=0.5, weight_drop=0.2)
ZONE_ONLY = rj.Regularizer(input_dropout=0.3, zoneout=0.4)
FAST = ("lstm", "mingru")  # the other cells run with the slow tests


def _reg(name: str) -> rj.Regularizer:
    return ALL if name in GEMM else ZONE_ONLY


def _loss(cell, reg, key=KEY, **kwargs):
    """A loss that reads every output and the final carry through fixed random weights."""
    r = jax.random.normal(jax.random.key(5), (B, T, cell.output_size), jnp.float64)

    def loss(params, xs, carry, grad):
        c, ys = rj.unroll(cell, params, xs, carry, grad=grad, regularize=reg, key=key, **kwargs)
        return jnp.sum(ys * r) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(c))

    return loss


def _grads(loss, params, xs, carry, grad):
    return jax.jit(jax.grad(loss, (0, 1, 2)), static_argnums=3)(params, xs, carry, grad)


@pytest.mark.parametrize(
    ("name", "lengths", "reverse"),
    [pytest.param(n, None, False, id=f"{n}-full", marks=() if n in FAST else pytest.mark.slow) for n in CELLS]
    + [
        pytest.param(
            n, LENGTHS, True, id=f"{n}-lengths-reverse", marks=() if n == "lstm" else pytest.mark.slow
        )
        for n in ("lstm", "gru", "elman-tanh", "lru")
    ]
    + [pytest.param("lstm-projected", LENGTHS, False, id="lstm-projected-lengths", marks=pytest.mark.slow)],
)
def test_manual_equals_autodiff(name, lengths, reverse):
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, jax.random.key(0), B, T, I)
    loss = _loss(cell, _reg(name), lengths=lengths, reverse=reverse)
    manual = _grads(loss, params, xs, carry, "manual")
    auto = _grads(loss, params, xs, carry, "autodiff")
    assert rel_err(manual, auto) <= 1e-10
    assert float(loss(params, xs, carry, "manual")) == float(loss(params, xs, carry, "autodiff"))


@pytest.mark.parametrize(
    "reg",
    [
        rj.Regularizer(state_dropout=0.5),
        rj.Regularizer(zoneout=0.5),
        rj.Regularizer(zoneout=0.0, zoneout_c=0.5),
        rj.Regularizer(weight_drop=0.5),
        rj.Regularizer(input_dropout=0.5),
    ],
    ids=["state", "zoneout", "zoneout-c", "weight", "input"],
)
def test_each_regularizer_alone_on_the_lstm(reg):
    """Each regulariser by itself, so that one mask's error cannot hide behind another's."""
    cell = rj.lstm(H)
    params, xs, carry = random_problem(cell, jax.random.key(1), B, T, I)
    loss = _loss(cell, reg, lengths=LENGTHS)
    assert (
        rel_err(_grads(loss, params, xs, carry, "manual"), _grads(loss, params, xs, carry, "autodiff"))
        <= 1e-10
    )


@pytest.mark.parametrize("name", ["lstm", "gru", "lru"])
def test_finite_differences(name):
    """Central differences of the masked loss (the masks fixed by the key) along a random direction."""
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, jax.random.key(2), B, T, I)
    loss = _loss(cell, _reg(name), lengths=LENGTHS, reverse=True)
    g = _grads(loss, params, xs, carry, "manual")
    d = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), (params, xs, carry))
    eps = 1e-6
    shift = lambda s: jax.tree.map(lambda a, v: a + s * eps * v, (params, xs, carry), d)  # noqa: E731
    fd = (loss(*shift(1), "manual") - loss(*shift(-1), "manual")) / (2 * eps)
    exact = sum(jnp.vdot(a, v) for a, v in zip(jax.tree.leaves(g), jax.tree.leaves(d), strict=True))
    assert abs(float(fd - exact)) <= 1e-7 * max(1.0, abs(float(exact)))


@pytest.mark.parametrize(
    "schedule",
    [
        pytest.param(dict(checkpoint=3), id="checkpoint-3", marks=pytest.mark.slow),
        pytest.param(dict(checkpoint="sqrt"), id="sqrt", marks=pytest.mark.slow),
        pytest.param(dict(budget=12000), id="binomial"),
        pytest.param(dict(budget=12000, schedule="nested"), id="nested", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("name", ["lstm", pytest.param("mingru", marks=pytest.mark.slow)])
def test_memory_schedules_take_the_same_masks(name, schedule):
    """Under checkpoint= and budget= the segments slice the zoneout masks in time: the same gradients."""
    cell = CELLS[name](H)
    params, xs, carry = random_problem(cell, jax.random.key(4), B, T, I)
    plain = _grads(_loss(cell, _reg(name), lengths=LENGTHS, reverse=True), params, xs, carry, "manual")
    loss = _loss(cell, _reg(name), lengths=LENGTHS, reverse=True, **schedule)
    for grad in rj.GRAD_MODES:
        assert rel_err(jax.grad(loss, (0, 1, 2))(params, xs, carry, grad), plain) <= 1e-10


def test_padding_never_leaks():
    """NaN in the padding reaches no output, carry or gradient with every regulariser on."""
    cell = rj.lstm(H)
    params, xs, carry = random_problem(cell, jax.random.key(5), B, T, I)
    mask = jnp.arange(T)[None, :, None] < LENGTHS[:, None, None]
    dirty = jnp.where(mask, xs, jnp.nan)
    loss = _loss(cell, ALL, lengths=LENGTHS)
    for grad in rj.GRAD_MODES:
        clean_g, dirty_g = _grads(loss, params, xs, carry, grad), _grads(loss, params, dirty, carry, grad)
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(dirty_g))
        assert rel_err(dirty_g[0], clean_g[0]) == 0.0


def test_inference_is_the_expectation():
    """No key: dropout and weight drop are the identity, and zoneout blends ``p c_{t-1} + (1 − p) c̃_t``."""
    cell = rj.lstm(H)
    params, xs, _ = random_problem(cell, jax.random.key(6), B, T, I)
    drops = rj.Regularizer(input_dropout=0.5, state_dropout=0.5, weight_drop=0.5)
    plain = rj.unroll(cell, params, xs)
    assert rel_err(rj.unroll(cell, params, xs, regularize=drops), plain) == 0.0
    p, q = 0.3, 0.6
    _, ys = rj.unroll(cell, params, xs, regularize=rj.Regularizer(zoneout=p, zoneout_c=q))
    carry, expected = cell.initial_carry(params, (B,)), []
    for t in range(T):
        new, _ = cell.step(params, carry, xs[:, t])
        carry = rj.LSTMCarry(h=p * carry.h + (1 - p) * new.h, c=q * carry.c + (1 - q) * new.c)
        expected.append(carry.h)
    assert rel_err(ys, jnp.stack(expected, axis=1)) <= 1e-14
    # and training averages to it where the step is linear: the inverted dropout's scale keeps E[x ⊙ m] = x
    lin = rj.elman(H, "identity")
    lp = lin.init(jax.random.key(0), I, jnp.float64)
    one = xs[:, :1]
    means = jax.vmap(
        lambda k: rj.unroll(lin, lp, one, regularize=rj.Regularizer(input_dropout=0.5), key=k)[1]
    )(jax.random.split(jax.random.key(0), 4000)).mean(0)
    assert float(jnp.max(jnp.abs(means - rj.unroll(lin, lp, one)[1]))) < 0.1


def test_masks_follow_the_key():
    cell = rj.gru(H)
    params, xs, _ = random_problem(cell, jax.random.key(7), B, T, I)
    run = lambda k, reg=ALL: rj.unroll(cell, params, xs, regularize=reg, key=k)[1]  # noqa: E731
    a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    assert bool(jnp.all(a == b)) and not bool(jnp.all(a == c))
    # one key per regulariser: turning one off leaves the others' masks (here: none left is plain)
    off = rj.Regularizer(input_dropout=0.3, state_dropout=0.0)
    on_state = rj.Regularizer(input_dropout=0.3, state_dropout=0.4)
    x_only = rj.unroll(cell, params, xs, regularize=off, key=jax.random.key(1))[1]
    both = rj.unroll(cell, params, xs, regularize=on_state, key=jax.random.key(1))[1]
    assert not bool(jnp.all(x_only == both))
    # zoneout's masks: about p of the units keep their previous value
    z = rj.unroll(
        rj.elman(64),
        rj.elman(64).init(KEY, I),
        jnp.ones((8, 50, I)),
        regularize=rj.Regularizer(zoneout=0.3),
        key=KEY,
    )[1]
    kept = float(jnp.mean(z[:, 1:] == z[:, :-1]))
    assert 0.25 < kept < 0.35


@pytest.mark.parametrize(
    "name",
    [
        "lstm",
        *(pytest.param(n, marks=pytest.mark.slow) for n in ("gru", "mgu", "lstm-projected", "mingru", "lru")),
    ],
)
def test_manual_is_leaner_than_autodiff(name):
    """With every regulariser that fits on, the hand-derived BPTT keeps less compiled temporary memory."""
    cell = CELLS[name](32)
    params, xs, _ = random_problem(cell, jax.random.key(0), 8, 64, 32, jnp.float32)
    reg = _reg(name)
    temp = {}
    for mode in rj.GRAD_MODES:

        def loss(p, x, k, m=mode):
            return jnp.sum(rj.unroll(cell, p, x, grad=m, regularize=reg, key=k)[1] ** 2)

        step = jax.jit(jax.grad(loss, (0, 1)))
        temp[mode] = step.lower(params, xs, KEY).compile().memory_analysis().temp_size_in_bytes
    assert temp["manual"] < temp["autodiff"], temp


@pytest.mark.slow
def test_layers_pass_it_through():
    """rj.rnn, rj.bidirectional (a key per direction) and rj.stack (a key per layer) take it, in training
    only; the gradient through a stack stays the autodiff twin's."""
    reg = rj.Regularizer(state_dropout=0.3, zoneout=0.2)
    xs = jax.random.normal(jax.random.key(8), (B, T, I), jnp.float64)
    bi = rj.bidirectional(rj.lstm(H), merge="sum")
    p = bi.init(KEY, I, jnp.float64)
    _, ys = bi.apply(p, xs, regularize=reg, key=KEY, train=True)
    fw = rj.unroll(rj.lstm(H), p.fw, xs, regularize=reg, key=jax.random.fold_in(KEY, 0))[1]
    bw = rj.unroll(rj.lstm(H), p.bw, xs, reverse=True, regularize=reg, key=jax.random.fold_in(KEY, 1))[1]
    assert rel_err(ys, fw + bw) <= 1e-14
    infer = bi.apply(p, xs, regularize=reg, key=KEY)[1]  # train=False: the expectation
    assert rel_err(infer, bi.apply(p, xs, regularize=reg)[1]) == 0.0
    deep = rj.stack(rj.gru(H), bi, dropout=0.1)
    dp = deep.init(KEY, I, jnp.float64)

    def loss(params, grad):
        ys = deep.apply(params, xs, lengths=LENGTHS, grad=grad, regularize=reg, key=KEY, train=True)[1]
        return jnp.sum(jnp.sin(ys))

    assert rel_err(jax.grad(loss)(dp, "manual"), jax.grad(loss)(dp, "autodiff")) <= 1e-10
    with pytest.raises(
        ValueError, match=r"rnn\.apply\(\.\.\., regularize=\.\.\., train=True\) needs a PRNG key"
    ):
        rj.rnn(rj.lstm(H)).apply(p.fw, xs, regularize=reg, train=True)


def test_refusals():
    params = rj.indrnn(H).init(KEY, I)
    xs = jnp.ones((B, T, I))
    with pytest.raises(
        ValueError, match=r"state_dropout needs a cell whose recurrence is the GEMM h w_hh \(" + GEMM_CELLS
    ):
        rj.unroll(rj.indrnn(H), params, xs, regularize=rj.Regularizer(state_dropout=0.1), key=KEY)
    with pytest.raises(
        ValueError, match=r"weight_drop needs a cell whose recurrence is the GEMM h w_hh .*'minlstm'"
    ):
        rj.unroll(rj.minlstm(H), rj.minlstm(H).init(KEY, I), xs, regularize=rj.Regularizer(weight_drop=0.1))
    mine = rj.Cell(
        init=rj.elman(H).init, initial_carry=rj.elman(H).initial_carry, step=rj.elman(H).step, hidden_size=H
    )
    with pytest.raises(
        ValueError, match=r"zoneout needs a built-in cell .* got the user-written cell 'custom'"
    ):
        rj.unroll(mine, rj.elman(H).init(KEY, I), xs, regularize=rj.Regularizer(zoneout=0.1), key=KEY)
    for field in ("input_dropout", "state_dropout", "zoneout", "zoneout_c", "weight_drop"):
        with pytest.raises(
            ValueError, match=rf"Regularizer\.{field} must be a probability in \[0, 1\), got 1\.0"
        ):
            rj.Regularizer(**{field: 1.0})
    with pytest.raises(ValueError, match="key is given but regularize is None"):
        rj.unroll(rj.lstm(H), rj.lstm(H).init(KEY, I), xs, key=KEY)
    with pytest.raises(TypeError, match=r"regularize must be an rj\.Regularizer or None, got float"):
        rj.unroll(rj.lstm(H), rj.lstm(H).init(KEY, I), xs, regularize=0.5)
    with pytest.raises(
        TypeError, match=r"key must be a PRNG key \(jax.random.key\(seed\)\) or None, got int"
    ):
        rj.unroll(rj.lstm(H), rj.lstm(H).init(KEY, I), xs, regularize=ALL, key=3)
    with pytest.raises(ValueError, match="probe cannot be combined with regularize"):
        rj.unroll(rj.lstm(H), rj.lstm(H).init(KEY, I), xs, regularize=ALL, probe=jnp.zeros((B, T, H)))
    # user-written cells take input dropout, outside the recursion
    mine_p = rj.elman(H).init(KEY, I)
    rj.unroll(mine, mine_p, xs, regularize=rj.Regularizer(input_dropout=0.5), key=KEY)


_MESH_SCRIPT = """
import jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
import rnnjax as rj
from jax.sharding import NamedSharding, PartitionSpec as P
cell = rj.lstm(5)
params = cell.init(jax.random.key(0), 3, jnp.float64)
xs = jax.random.normal(jax.random.key(1), (4, 7, 3), jnp.float64)
L = jnp.array([7, 0, 3, 1])
reg = rj.Regularizer(input_dropout=0.3, state_dropout=0.4, zoneout=0.3, zoneout_c=0.5, weight_drop=0.2)
def loss(p, x, l, mode, schedule, key):
    c, ys = rj.unroll(cell, p, x, lengths=l, grad=mode, regularize=reg, key=key, **dict(schedule))
    return jnp.sum(jnp.sin(ys)) + jnp.sum(c.c ** 2)
step = jax.jit(jax.value_and_grad(loss), static_argnums=(3, 4))
schedules = ((), (("checkpoint", 3),), (("budget", 12000),), (("budget", 12000), ("schedule", "nested")))
for kind in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
    mesh = jax.make_mesh((2,), ("data",), axis_types=(kind,))
    on = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
    for key in (jax.random.key(3), None):  # training masks, and the expectation at inference
        for mode in ("manual", "autodiff"):
            for schedule in schedules:
                ref = step(params, xs, L, mode, schedule, key)
                with jax.set_mesh(mesh):
                    got = step(params, on(xs), on(L), mode, schedule, key)
                pairs = zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)
                print(max(float(jnp.max(jnp.abs(a - b))) for a, b in pairs))
"""


@pytest.mark.slow
def test_a_mesh_draws_the_masks_one_device_draws():
    """On a mesh of two devices (explicit and Auto axes), the batch split: the same masks, values and
    gradients as one device (masks drawn over the whole batch and split like it), with every memory
    schedule, in training and at inference."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    errors = [float(line) for line in out.stdout.split()]
    assert len(errors) == 32 and max(errors) <= 1e-12, errors


def test_regularize_refused_with_the_associative_scan():
    cell = rj.mingru(4)
    params = cell.init(jax.random.key(0), 3)
    xs = jnp.ones((2, 5, 3))
    reg = rj.Regularizer(input_dropout=0.5)
    with pytest.raises(ValueError, match="regularize= applies to method='sequential' only"):
        rj.unroll(cell, params, xs, method="associative", regularize=reg, key=jax.random.key(1))


_SHARD_MAP_SCRIPT = """
import jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
import rnnjax as rj
from jax.sharding import NamedSharding, PartitionSpec as P
cell = rj.lstm(5)
params = cell.init(jax.random.key(0), 3, jnp.float64)
half = jax.random.normal(jax.random.key(1), (2, 7, 3), jnp.float64)
xs, L = jnp.concatenate([half, half]), jnp.array([7, 3, 7, 3])  # both devices get the same rows
reg = rj.Regularizer(input_dropout=0.3, state_dropout=0.4, zoneout=0.3, zoneout_c=0.5, weight_drop=0.2)
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
on = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
key = jax.random.key(3)
def per_device(p, x, l, key, mode):
    k = jax.random.fold_in(key, jax.lax.axis_index("data"))  # each device draws its own masks
    c, ys = rj.unroll(cell, p, x, lengths=l, grad=mode, regularize=reg, key=k)
    return ys, jax.lax.psum(jnp.sum(jnp.sin(ys)) + jnp.sum(c.c**2), "data")
def run(p, x, l, key, mode):
    specs = dict(in_specs=(P(), P("data"), P("data"), P()), out_specs=(P("data"), P()))
    return jax.shard_map(lambda *a: per_device(*a, mode), mesh=mesh, **specs)(p, x, l, key)
grad = jax.jit(jax.grad(lambda *a: run(*a)[1]), static_argnums=4)
ys = jnp.asarray(jax.device_get(jax.jit(run, static_argnums=4)(params, on(xs), on(L), key, "manual")[0]))
g_manual, g_autodiff = (grad(params, on(xs), on(L), key, mode) for mode in ("manual", "autodiff"))
def one_device(p, i):  # device i's rows and folded key, on one device
    rows = slice(2 * i, 2 * i + 2)
    c, y = rj.unroll(cell, p, xs[rows], lengths=L[rows], regularize=reg, key=jax.random.fold_in(key, i))
    return y, jnp.sum(jnp.sin(y)) + jnp.sum(c.c**2)
g_one = jax.tree.map(jnp.add, *(jax.grad(lambda p, i=i: one_device(p, i)[1])(params) for i in (0, 1)))
rel = lambda a, b: max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))) for x, y in zip(a, b))
print(float(jnp.max(jnp.abs(ys[:2] - ys[2:]))))
print(float(jnp.max(jnp.abs(ys - jnp.concatenate([one_device(params, i)[0] for i in (0, 1)])))))
print(rel(jax.tree.leaves(g_manual), jax.tree.leaves(g_autodiff)))
print(rel(jax.tree.leaves(g_manual), jax.tree.leaves(g_one)))
"""


@pytest.mark.slow
def test_shard_map_folds_the_key_by_axis_index():
    """Under `jax.shard_map` on two devices, ``jax.random.fold_in(key, jax.lax.axis_index("data"))`` gives
    each device its own masks (the same rows on both devices give different outputs), each device runs as
    `rj.unroll` on its rows with its folded key, and the hand-derived gradient through the shard_map equals
    autodiff through the same masked forward (1e-10) and the sum of the devices' gradients."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", _SHARD_MAP_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    differ, one_device, autodiff, summed = (float(line) for line in out.stdout.split())
    assert differ > 1e-2, "both devices drew the same masks"
    assert one_device <= 1e-12
    assert autodiff <= 1e-10
    assert summed <= 1e-12
