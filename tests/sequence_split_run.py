"""Run by `tests/test_parallel_sequence.py` in a fresh process with four CPU devices: `rj.unroll` with the time
axis of ``xs`` split over devices, against ``method="sequential"`` on one device. Prints one JSON object:

- ``errors``: case -> the worst relative error (`helpers.rel_err`) of the loss, the outputs, the final carry
  and the gradients to params, xs and the initial carry;
- ``collectives``: case -> {"forward": counts, "vjp": counts} of the collectives in the compiled HLO of the
  forward and of `jax.vjp` (forward and backward).

Pass case names (comma-separated) to run only those.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
from helpers import random_problem, rel_err
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import rnnjax as rj

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

B, T, I, H = 4, 12, 3, 4
# an empty sequence, a whole one, an end inside the second of 2 parts (at the start of the fourth of 4), and
# one inside the second of 4 parts
LENGTHS = [0, T, 9, 4]

CELLS = {
    "mingru": lambda: rj.mingru(H),
    "minlstm": lambda: rj.minlstm(H),
    "lru": lambda: rj.lru(H // 2, r_min=0.4, r_max=0.95, max_phase=3.0),
    "indrnn": lambda: rj.indrnn(H, "identity"),
}
COLLECTIVE = re.compile(
    r"\b(all-gather|all-reduce|collective-permute|reduce-scatter|all-to-all)(?:-start)?\("
)


def mesh_of(kind: str) -> tuple[jax.sharding.Mesh, P]:
    """The mesh of ``kind`` and the partition spec of xs on it."""
    devices = jax.devices()
    if kind == "time2":
        return jax.make_mesh((2,), ("time",), devices=devices[:2]), P(None, "time")
    if kind == "time4":
        return jax.make_mesh((4,), ("time",)), P(None, "time")
    if kind == "data2":  # the batch split alone (the associative scan with data parallelism)
        return jax.make_mesh((2,), ("data",), devices=devices[:2]), P("data")
    assert kind == "data-time"  # the batch split over "data" and the time over "time"
    return jax.make_mesh((2, 2), ("data", "time")), P("data", "time")


def loss_fn(cell: rj.Cell, options: dict[str, Any]) -> Any:
    """``(loss, (final, ys))`` of a nonlinear read-out of every output and of the final carry."""

    def loss(params: Any, xs: jax.Array, carry: Any, lengths: jax.Array | None) -> tuple:
        final, ys = rj.unroll(cell, params, xs, carry, lengths=lengths, **options)
        w = jnp.cos(jnp.arange(ys.size, dtype=ys.dtype)).reshape(ys.shape)
        value = jnp.sum(jnp.sin(ys) * w) + sum(jnp.sum(jnp.cos(c) * c) for c in jax.tree.leaves(final))
        return value, (final, ys)

    return loss


# case -> (cell, mesh kind, unroll options, with lengths, batch size, a given carry, under jax.set_mesh); each
# case combines several options, to keep the compilations few. Each device holds 6 steps of 2 parts or 3 of 4:
# chunks of 4 leave a padded chunk, of 2 or 1 an odd number of chunks (3), of 16 one chunk (associative)
R = {"reverse": True}
CASES: dict[str, tuple[str, str, dict[str, Any], bool, int, bool, bool]] = {
    "mingru-lengths": ("mingru", "time2", {}, True, B, True, False),
    "mingru-reverse-chunk4-lengths": ("mingru", "time2", {**R, "chunk_size": 4}, True, B, True, False),
    "minlstm-reverse-lengths": ("minlstm", "time2", R, True, B, True, False),
    "minlstm-chunk2-lengths-zero-carry": ("minlstm", "time2", {"chunk_size": 2}, True, B, False, False),
    "lru-lengths": ("lru", "time2", {}, True, B, True, False),
    "lru-reverse-chunk4-lengths": ("lru", "time2", {**R, "chunk_size": 4}, True, B, True, False),
    "indrnn-reverse-lengths": ("indrnn", "time2", R, True, B, True, False),
    "indrnn-B1-chunk16": ("indrnn", "time2", {"chunk_size": 16}, False, 1, True, False),
    "mingru-time4-reverse-chunk1-lengths": ("mingru", "time4", {**R, "chunk_size": 1}, True, B, True, False),
    "lru-time4-chunk1-lengths": ("lru", "time4", {"chunk_size": 1}, True, B, True, False),
    "mingru-data-time-reverse-lengths": ("mingru", "data-time", R, True, B, True, False),
    "lru-B1-reverse": ("lru", "time2", R, False, 1, True, False),
    "mingru-autodiff-reverse-lengths": ("mingru", "time2", {"grad": "autodiff", **R}, True, B, True, False),
    "mingru-auto-context-mesh": ("mingru", "time2", {"method": "auto"}, True, B, True, True),
    "mingru-data-lengths": ("mingru", "data2", {}, True, B, True, False),
    "lru-data-reverse-chunk4-lengths": ("lru", "data2", {**R, "chunk_size": 4}, True, B, True, False),
}


def run_case(case: str) -> float:
    name, kind, options, with_lengths, batch, given, context = CASES[case]
    cell = CELLS[name]()
    params, xs, carry = random_problem(cell, jax.random.key(1), batch, T, I)
    carry = carry if given else None
    lengths = jnp.array(LENGTHS[:batch]) if with_lengths else None
    reference = jax.jit(
        jax.value_and_grad(loss_fn(cell, {"reverse": options.get("reverse", False)}), (0, 1, 2), has_aux=True)
    )
    split_options = {"method": "associative", **options}
    split = jax.jit(jax.value_and_grad(loss_fn(cell, split_options), (0, 1, 2), has_aux=True))
    mesh, spec = mesh_of(kind)
    placed = jax.device_put(xs, NamedSharding(mesh, spec))
    if carry is None:
        reference_run = lambda p, x, L: reference(p, x, None, L)  # noqa: E731
        split_run = lambda p, x, L: split(p, x, None, L)  # noqa: E731
    else:
        reference_run = lambda p, x, L: reference(p, x, carry, L)  # noqa: E731
        split_run = lambda p, x, L: split(p, x, carry, L)  # noqa: E731
    want = reference_run(params, xs, lengths)
    with jax.set_mesh(mesh) if context else contextlib.nullcontext():
        got = split_run(params, placed, lengths)
    if carry is None:  # no carry was given: its gradient is None in both
        assert got[1][2] is None and want[1][2] is None
    assert jax.typeof(got[0][1][1]).sharding.spec == jax.typeof(placed).sharding.spec, "ys split as xs"
    return rel_err(got, want)


def count(program: Any, *args: Any) -> dict[str, int]:
    text = program.lower(*args).compile().as_text()
    return dict(collections.Counter(m.group(1) for m in COLLECTIVE.finditer(text)))


def collectives(name: str, kind: str, options: dict[str, Any]) -> dict[str, dict[str, int]]:
    """The collectives of the forward and of `jax.vjp` (the forward and the backward, to params, xs and the
    carry) of the time split on ``kind``'s mesh."""
    cell = CELLS[name]()
    params, xs, carry = random_problem(cell, jax.random.key(1), B, T, I)
    lengths = jnp.array(LENGTHS)
    mesh, spec = mesh_of(kind)
    placed = jax.device_put(xs, NamedSharding(mesh, spec))

    def forward(p: Any, x: jax.Array, c: Any) -> Any:
        return rj.unroll(cell, p, x, c, lengths=lengths, method="associative", **options)

    def vjp(p: Any, x: jax.Array, c: Any, cotangent: Any) -> Any:
        return jax.vjp(forward, p, x, c)[1](cotangent)

    out = jax.jit(forward)(params, placed, carry)
    return {
        "forward": count(jax.jit(forward), params, placed, carry),
        "vjp": count(jax.jit(vjp), params, placed, carry, out),
    }


if __name__ == "__main__":
    only = set(sys.argv[1].split(",")) if len(sys.argv) > 1 else None
    errors = {case: run_case(case) for case in CASES if only is None or case in only}
    counts = {}
    if only is None:
        counts = {
            "mingru": collectives("mingru", "time2", {}),
            "lru-data-time-reverse-chunk2": collectives(
                "lru", "data-time", {"reverse": True, "chunk_size": 2}
            ),
        }
    print(json.dumps({"errors": errors, "collectives": counts}))
