"""Meshes at one boundary: the cells, the losses and the decoders know nothing of them.

What needs placing where the batch is split over devices is typed by the drivers (`rnnjax.sharding`); the
losses and the decoders ask for what they need of the rows through `rnnjax.rows`. Checked two ways: the
sources of the cells, the losses and the decoders name no mesh API, and the one-device path calls none.
And the cells' contract with the driver (`rj.RowSum`, `rj.WeightGemm`) leaves plain arrays allowed.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import rel_err

import rnnjax as rj

ROOT = pathlib.Path(rj.__file__).parent
MESH_FREE = [*sorted((ROOT / "cells").glob("*.py")), ROOT / "losses.py", ROOT / "decode.py"]
MESH_MODULES = {"rnnjax.sharding", "jax.sharding"}
MESH_NAMES = {"reshard", "shard_map", "pcast", "psum", "out_sharding", "NamedSharding", "PartitionSpec"}


def mesh_uses(source: str) -> list[str]:
    """What ``source`` imports of the mesh modules, and the mesh API it names (attributes, names, keyword
    arguments), each as ``"line: what"``; comments and docstrings do not count."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names if a.name in MESH_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = {a.name for a in node.names}
            if module in MESH_MODULES or (module in ("jax", "rnnjax") and names & {"sharding"}):
                found.append(f"{node.lineno}: from {module} import {sorted(names)}")
            found += [f"{node.lineno}: from {module} import {n}" for n in sorted(names & MESH_NAMES)]
        elif isinstance(node, ast.Attribute) and (node.attr in MESH_NAMES or node.attr == "sharding"):
            found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Name) and node.id in MESH_NAMES:
            found.append(f"{node.lineno}: {node.id}")
        elif isinstance(node, ast.keyword) and node.arg in MESH_NAMES:
            found.append(f"{node.lineno}: {node.arg}=")
    return found


@pytest.mark.parametrize("path", MESH_FREE, ids=lambda p: p.name)
def test_cells_losses_and_decoders_name_no_mesh_api(path):
    uses = mesh_uses(path.read_text())
    assert not uses, f"{path.name} reaches for meshes: {uses}"


def test_the_source_check_sees_what_it_looks_for():
    planted = (
        "from rnnjax.sharding import reshard_like\n"
        "import jax.sharding\n"
        "y = jax.sharding.reshard(x, s)\n"
        "z = jnp.einsum('a,a->', x, x, out_sharding=None)\n"
        "w = jax.lax.psum(x, 'data')\n"
    )
    assert len(mesh_uses(planted)) >= 5
    assert not mesh_uses('"""reshard, shard_map, out_sharding: words in a docstring"""\n# psum\n')


def _refuse(name: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"the one-device path called {name}")

    return refused


@pytest.fixture
def no_mesh_api(monkeypatch):
    """Every mesh API that rnnjax calls made to raise, and JAX's traces dropped so that the programs below
    are traced (and so run rnnjax's Python code) anew."""
    assert jax.device_count() == 1 or not jax.sharding.get_abstract_mesh().shape
    for module, name in [
        (jax.sharding, "reshard"),
        (jax, "shard_map"),
        (jax.lax, "pcast"),
        (jax.lax, "psum"),
    ]:
        monkeypatch.setattr(module, name, _refuse(f"{module.__name__}.{name}"))
    # every sharding rnnjax makes (an out_sharding, a reshard's target) comes from sharding_on
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("rnnjax") and hasattr(mod, "sharding_on"):
            monkeypatch.setattr(mod, "sharding_on", _refuse("rnnjax.sharding.sharding_on"))
    jax.clear_caches()
    yield
    jax.clear_caches()


CELLS = {
    "lstm": lambda: rj.lstm(3),
    "gru": lambda: rj.gru(3),
    "mgu": lambda: rj.mgu(3),
    "projected": lambda: rj.projected_lstm(3, 2),
    "peephole": lambda: rj.peephole_lstm(3),
    "layer-norm": lambda: rj.layer_norm_lstm(3),
    "lru": lambda: rj.lru(3),
    "indrnn": lambda: rj.indrnn(3),
}


def test_one_device_calls_no_mesh_api(no_mesh_api):
    xs = jnp.linspace(-1.0, 1.0, 2 * 4 * 2).reshape(2, 4, 2)
    lengths = jnp.array([4, 2])
    for make in CELLS.values():
        cell = make()
        params = cell.init(jax.random.key(0), 2)

        def loss(p, x, cell=cell):
            return jnp.sum(rj.unroll(cell, p, x, lengths=lengths, grad="manual")[1] ** 2)

        jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1)))(params, xs))

    logits = jnp.linspace(-2.0, 2.0, 2 * 4 * 5).reshape(2, 4, 5)
    targets = jnp.array([[1, 2, 3, 4], [0, 1, 2, 3]])
    labels, label_lengths = jnp.array([[1, 2], [3, 0]]), jnp.array([2, 1])

    def losses(z):
        return (
            rj.losses.sequence_cross_entropy(z, targets, lengths)
            + rj.losses.squared_error(z, jnp.zeros_like(z), lengths)
            + jnp.mean(rj.losses.ctc(z, lengths, labels, label_lengths))
        )

    jax.block_until_ready(jax.jit(jax.grad(losses))(logits))

    w = jnp.linspace(-1.0, 1.0, 3 * 5).reshape(3, 5)

    def step_fn(state, tokens):
        state = jnp.tanh(state + tokens[:, None].astype(state.dtype))
        return state, state @ w

    start, state = jnp.array([1, 2]), jnp.zeros((2, 3))
    jax.block_until_ready(rj.decode.greedy(step_fn, state, start, 3, end_token=0))
    jax.block_until_ready(rj.decode.sample(step_fn, state, start, 3, key=jax.random.key(1), top_k=2))
    jax.block_until_ready(rj.decode.beam_search(step_fn, state, start, 3, beam_size=2, end_token=0))


def test_the_mesh_api_check_goes_red_on_a_planted_call(no_mesh_api):
    with pytest.raises(AssertionError, match=r"one-device path called jax\.sharding\.reshard"):
        jax.sharding.reshard(jnp.ones(2), None)
    with pytest.raises(AssertionError, match=r"called rnnjax\.sharding\.sharding_on"):
        rj.bptt.sharding_on((), jnp.ones(2))


# ----- the cells' contract with the driver: plain arrays stay allowed ----------------------------------------


def _plain_aux(cell: rj.Cell) -> rj.Cell:
    """``cell`` with its per-row terms summed by its own ``gates_bwd`` and its weight GEMMs computed by its
    own ``extra_grads``, as a user-written backward may do."""

    def gates_bwd(*args):
        out = cell.gates_bwd(*args)
        plain = lambda a: jnp.sum(a.v, axis=0) if isinstance(a, rj.RowSum) else a  # noqa: E731
        return jax.tree.map(plain, out, is_leaf=lambda a: isinstance(a, rj.RowSum))

    def extra_grads(*args):
        grads = cell.extra_grads(*args)
        gemm = lambda g: jnp.einsum("tbp,tbg->pg", g.a, g.b) if isinstance(g, rj.WeightGemm) else g  # noqa: E731
        return {k: gemm(g) for k, g in grads.items()}

    return cell.replace(gates_bwd=gates_bwd, extra_grads=extra_grads)


@pytest.mark.parametrize("name", ["gru", "projected", "mgu", "peephole"])
def test_a_backward_with_plain_arrays_in_aux_and_extra_grads(name, key):
    cell = CELLS[name]()
    params = cell.init(key, 2)
    xs = jax.random.normal(jax.random.key(1), (3, 5, 2))
    lengths = jnp.array([5, 3, 1])

    def loss(p, c, grad):
        return jnp.sum(jnp.sin(rj.unroll(c, p, xs, lengths=lengths, grad=grad)[1]))

    want = jax.grad(loss)(params, cell, "autodiff")
    assert rel_err(jax.grad(loss)(params, cell, "manual"), want) <= 1e-10
    assert rel_err(jax.grad(loss)(params, _plain_aux(cell), "manual"), want) <= 1e-10


def test_a_backward_must_give_every_field_its_gradient(key):
    """A field of the params that neither the driver (``w_ih``, ``w_hh``, ``b``) nor ``extra_grads`` gives a
    gradient would keep its value in place of one: a ValueError at trace time instead, naming it."""
    cell = CELLS["gru"]()  # b_hn's gradient comes from extra_grads
    params = cell.init(key, 2)
    xs = jax.random.normal(jax.random.key(1), (3, 5, 2))

    def loss(p, c):
        return jnp.sum(rj.unroll(c, p, xs)[1])

    forgetful = cell.replace(extra_grads=None, extra_from_aux=False)
    with pytest.raises(ValueError, match=r"cell 'gru'.* no gradient for \['b_hn'\] \(give extra_grads"):
        jax.grad(loss)(params, forgetful)
    rj.unroll(forgetful, params, xs)  # the forward needs no gradient
    extra = cell.extra_grads
    assert extra is not None
    bogus = cell.replace(extra_grads=lambda *a: {**extra(*a), "gain": jnp.zeros(3)})
    with pytest.raises(
        ValueError, match=r"extra_grads returned \['gain'\], which are not fields of the params"
    ):
        jax.grad(loss)(params, bogus)


def test_a_backward_with_misshapen_gradients_is_named(key):
    """A WeightGemm whose operands are not the same rows, a gradient of the wrong shape and a RowSum of one
    entry per row: each a ValueError at trace time naming what is wrong, never a silently wrong gradient."""
    xs = jax.random.normal(jax.random.key(1), (3, 5, 2))

    def loss(p, c):
        return jnp.sum(rj.unroll(c, p, xs)[1])

    projected = CELLS["projected"]()
    extra = projected.extra_grads
    assert extra is not None

    def swapped(*args):  # b's steps and rows swapped: [T+1, B, G] -> [B, T+1, G]
        g = extra(*args)["w_hr"]
        return {"w_hr": rj.WeightGemm(g.a, jnp.swapaxes(g.b, 0, 1))}

    with pytest.raises(
        ValueError, match=r"WeightGemm\(a, b\) for 'w_hr' must have a and b with the same lead"
    ):
        jax.grad(loss)(projected.init(key, 2), projected.replace(extra_grads=swapped))
    gru = CELLS["gru"]()
    gru_extra, gru_bwd = gru.extra_grads, gru.gates_bwd
    assert gru_extra is not None and gru_bwd is not None
    wrong_shape = gru.replace(extra_grads=lambda *a: {"b_hn": gru_extra(*a)["b_hn"][:1]})
    with pytest.raises(
        ValueError, match=r"the gradient of params.b_hn must have its shape \(3,\), got \(1,\)"
    ):
        jax.grad(loss)(gru.init(key, 2), wrong_shape)

    def one_per_row(*args):
        *out, d_b_hn = gru_bwd(*args)
        return (*out, rj.RowSum(d_b_hn.v[:, 0]))

    with pytest.raises(ValueError, match=r"a RowSum in gates_bwd's aux must hold rows \[B, n\]"):
        jax.grad(loss)(gru.init(key, 2), gru.replace(gates_bwd=one_per_row))
