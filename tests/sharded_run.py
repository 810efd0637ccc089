"""Run by `tests/test_sharding.py` in a fresh process with two CPU devices: rnnjax's programs on a batch
sharded over a mesh, against the same programs on one device. Prints one JSON object, a record per case.

The kinds of mesh (`KINDS`):
- ``auto``: `AxisType.Auto` axes and no context mesh; the arrays are placed with `jax.device_put` and XLA's
  partitioner propagates their shardings.
- ``explicit``: `jax.make_mesh`'s default `AxisType.Explicit` axes under `jax.set_mesh`, where every array's
  type carries its sharding and JAX checks them at trace time.
- ``shard_map``: the program written per device under `jax.shard_map` (each device its own rows; a value
  computed from them varies by device, and JAX checks that a scan's carry keeps that type). The loss is
  summed over the devices with ``psum``; ``jax.grad`` sums a replicated parameter's gradient itself.
- ``explicit-no-context``: explicit axes with no context mesh, as in JAX's multi-process guide: the arrays
  are placed with a `NamedSharding`, and their types alone name the mesh (built with `jax.sharding.Mesh`).
- ``explicit-1``, ``explicit-1-no-context``, ``auto-1``: meshes of one device (code written for N devices
  run with N = 1), whose types still show the batch split on explicit axes (``float64[6@data, 7, 5]``).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from helpers import CELLS, rel_err
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rnnjax as rj

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

B, T, I, H = 6, 7, 5, 8
xs = jax.random.normal(jax.random.key(1), (B, T, I), jnp.float64)
lengths = jnp.array([7, 3, 0, 5, 7, 1])
tokens = jnp.array([0, 3, 1, 2, 0, 4])


def unroll_loss(cell: rj.Cell, **kwargs: Any):
    def loss(p, x, L):
        return jnp.sum(jnp.sin(rj.unroll(cell, p, x, lengths=L, **kwargs)[1]))

    return jax.value_and_grad(loss, (0, 1))


def layer_loss(layer: rj.Layer):
    def loss(p, x, L):
        return jnp.sum(jnp.sin(layer.apply(p, x, lengths=L)[1]))

    return jax.value_and_grad(loss, (0, 1))


class Case(NamedTuple):
    fn: Any
    args: tuple
    sharded: tuple[bool, ...]  # which arguments are batch-sharded; the others are replicated
    # what fn returns, for shard_map: "grad", (loss summed over the batch, (d params, d xs)); "batch", leaves
    # that all lead with the batch; "loss-grads-carry", (loss, d params, carry); "loss-grads", (loss,
    # gradients of replicated arguments); "report", a `rj.gradcheck` report (run eagerly, on a mesh only);
    # None, anything else (not run under shard_map)
    output: str | None = None
    # the one-device reference, when not fn itself: jax.grad through the plain scan (grad="autodiff"), so
    # that a sharded hand-derived gradient is checked against autodiff directly, not only through test_bptt
    reference: Any = None


def user_cell(hidden_size: int) -> rj.Cell:
    """A user-written cell (only init, initial_carry and step): its "manual" backward chains per-step VJPs."""
    base = rj.elman(hidden_size)
    return rj.Cell(init=base.init, initial_carry=base.initial_carry, step=base.step, name="user")


def cases() -> dict[str, Case]:
    lstm = rj.lstm(H)
    lstm_p = lstm.init(jax.random.key(0), I, jnp.float64)
    out: dict[str, Case] = {}
    for name, make in {**CELLS, "user-cell": user_cell}.items():
        cell = make(H)
        params = cell.init(jax.random.key(0), I, jnp.float64)
        for grad in ("manual", "autodiff"):
            out[f"{name}-{grad}"] = Case(
                unroll_loss(cell, grad=grad),
                (params, xs, lengths),
                (False, True, True),
                "grad",
                unroll_loss(cell, grad="autodiff"),
            )
    for label, kwargs in {
        "reverse": dict(reverse=True),
        "checkpoint": dict(checkpoint=3),
        "budget-binomial": dict(budget=21000),
        "budget-nested": dict(budget=25000, schedule="nested"),
    }.items():
        out[f"lstm-{label}"] = Case(
            unroll_loss(lstm, **kwargs),
            (lstm_p, xs, lengths),
            (False, True, True),
            "grad",
            unroll_loss(lstm, **{k: v for k, v in kwargs.items() if k == "reverse"}, grad="autodiff"),
        )

    def given_carry(p, x, L, c):
        return jnp.sum(jnp.sin(rj.unroll(lstm, p, x, c, lengths=L)[1]))

    carry = lstm.initial_carry(lstm_p, (B,))._replace(h=jnp.ones((B, H), jnp.float64))
    # a replicated carry is resharded like xs; its gradient comes back as the carry was
    out["lstm-replicated-carry"] = Case(
        jax.value_and_grad(given_carry, (0, 1, 3)),
        (lstm_p, xs, lengths, carry),
        (False, True, True, False),
    )
    user = user_cell(H)
    user_p = user.init(jax.random.key(0), I, jnp.float64)

    def user_given_carry(p, x, L, c):
        masked = rj.unroll(user, p, x, c, lengths=L, reverse=True)[1]
        return jnp.sum(jnp.sin(masked)) + jnp.sum(jnp.cos(rj.unroll(user, p, x, c)[1]))

    # a user-written cell's backward runs per device on an explicit mesh: a replicated carry and lengths
    # beside split rows, in reverse, and with no lengths
    out["user-cell-replicated-carry"] = Case(
        jax.value_and_grad(user_given_carry, (0, 1, 3)),
        (user_p, xs, lengths, user.initial_carry(user_p, (B,))._replace(h=jnp.ones((B, H), jnp.float64))),
        (False, True, False, False),
    )
    for label, layer in {
        "bidirectional": rj.bidirectional(rj.lstm(H), rj.gru(H)),
        "stack": rj.stack(rj.gru(H), rj.lstm(H), residual=True),
    }.items():
        params = layer.init(jax.random.key(2), I, jnp.float64)
        out[label] = Case(layer_loss(layer), (params, xs, lengths), (False, True, True), "grad")

    def norms(probe, x, L):
        d_hs = jax.grad(lambda pr: jnp.sum(jnp.sin(rj.unroll(lstm, lstm_p, x, lengths=L, probe=pr)[1])))(
            probe
        )
        return rj.diagnostics.hidden_grad_norms(d_hs, L)

    out["hidden-grad-norms"] = Case(
        norms, (jnp.zeros((B, T, H), jnp.float64), xs, lengths), (True, True, True)
    )

    def xent(p, x, L):
        logits = rj.unroll(lstm, p, x, lengths=L)[1]
        return rj.losses.sequence_cross_entropy(logits, jnp.broadcast_to(tokens[:, None], (B, T)), L)

    out["cross-entropy"] = Case(jax.value_and_grad(xent, (0, 1)), (lstm_p, xs, lengths), (False, True, True))

    # every loss with lengths of every kind: none (all steps valid), replicated while the batch is split
    labels = jnp.array([[1, 2, 1], [3, 0, 0], [2, 2, 0], [4, 5, 6], [1, 0, 0], [7, 0, 0]])
    label_lengths = jnp.array([3, 1, 2, 3, 1, 1])

    def losses(p, x, L):
        ys = rj.unroll(lstm, p, x, lengths=L)[1]
        targets = jnp.broadcast_to(tokens[:, None], (B, T))
        return (
            rj.losses.sequence_cross_entropy(ys, targets)
            + rj.losses.squared_error(ys, jnp.full_like(ys, 0.5), L)
            + jnp.mean(rj.losses.ctc(ys, L, labels, jnp.minimum(label_lengths, L)))
        )

    out["losses-replicated-lengths"] = Case(
        jax.value_and_grad(losses, (0, 1)), (lstm_p, xs, lengths), (False, True, False)
    )

    def chunk_loss(p, c, x):
        c, ys = rj.unroll(lstm, p, x, c)
        return jnp.sum(ys**2), c

    def tbptt(p, c, x):
        return rj.truncated_bptt(chunk_loss, p, c, x, chunk_size=3)

    out["truncated-bptt"] = Case(
        tbptt, (lstm_p, lstm.initial_carry(lstm_p, (B,)), xs), (False, True, True), "loss-grads-carry"
    )
    # a replicated initial carry beside a split stream: the chunks' loop takes the carry as one chunk
    # gives it back (not under shard_map, where a replicated carry is every device's whole batch)
    out["truncated-bptt-replicated-carry"] = Case(
        tbptt, (lstm_p, lstm.initial_carry(lstm_p, (B,)), xs), (False, False, True), "loss-grads-carry"
    )

    # a loss that is a sum (or a mean) of per-row terms: each device runs the chunks on its own rows, and the
    # gradient is summed over the devices once, after the last chunk
    def mean_chunk_loss(p, c, x):
        c, ys = rj.unroll(lstm, p, x, c)
        return jnp.mean(ys**2), c

    for per_row, loss_fn in (("sum", chunk_loss), ("mean", mean_chunk_loss)):
        out[f"truncated-bptt-per-row-{per_row}"] = Case(
            lambda p, c, x, f=loss_fn, r=per_row: rj.truncated_bptt(f, p, c, x, chunk_size=3, per_row=r),
            (lstm_p, lstm.initial_carry(lstm_p, (B,)), xs),
            (False, True, True),
            reference=lambda p, c, x, f=loss_fn: rj.truncated_bptt(f, p, c, x, chunk_size=3),
        )
    # dropout between layers: the mask one device draws, split like the rows (not under shard_map, where
    # each device draws a mask of its own rows from the key it is given)
    deep = rj.stack(rj.lstm(H), rj.gru(H), dropout=0.5)

    def dropout_loss(p, x, L):
        return jnp.sum(jnp.sin(deep.apply(p, x, lengths=L, train=True, key=jax.random.key(9))[1]))

    out["stack-dropout"] = Case(
        jax.value_and_grad(dropout_loss, (0, 1)),
        (deep.init(jax.random.key(2), I, jnp.float64), xs, lengths),
        (False, True, True),
    )

    # online learning (RTRL) of a loss on every step through a read-out parameter, against BPTT by autodiff
    targets = jax.random.normal(jax.random.key(6), (B, T), jnp.float64)

    def step_loss(scale, y, target):
        return jnp.sum(jnp.sin(scale * y), axis=-1) * target

    for name in ("lstm", "indrnn-tanh", "lru"):  # the dense sensitivities, and the diagonal ones (r = 1, 2)
        cell = CELLS[name](H)
        params = cell.init(jax.random.key(0), I, jnp.float64)

        def rtrl(p, x, L, tg, scale, cell=cell):
            return rj.rtrl_value_and_grad(cell, p, scale, x, tg, step_loss, lengths=L)[:2]

        def bptt(p, x, L, tg, scale, cell=cell):
            def loss(p, scale):
                ys = rj.unroll(cell, p, x, lengths=L, grad="autodiff")[1]
                per_step = jax.vmap(step_loss, in_axes=(None, 1, 1), out_axes=1)(scale, ys, tg)  # [B, T]
                return jnp.sum(jnp.where(jnp.arange(T)[None, :] < L[:, None], per_step, 0.0))

            return jax.value_and_grad(loss, (0, 1))(p, scale)

        out[f"rtrl-{name}"] = Case(
            rtrl,
            (params, xs, lengths, targets, jnp.asarray(0.7, jnp.float64)),
            (False, True, True, True, False),
            "loss-grads",
            bptt,
        )
    out["jacobian-spectrum"] = Case(
        lambda p, x: rj.diagnostics.jacobian_spectrum(lstm, p, x)[1:],  # the [B, ...] fields
        (lstm_p, xs),
        (False, True),
        "batch",
    )
    out["lyapunov-exponent"] = Case(
        lambda p, x: rj.diagnostics.lyapunov_exponent(lstm, p, x, discard=2), (lstm_p, xs), (False, True)
    )

    # the gradient check itself (manual against autodiff, RTRL, the complex step, finite differences) of a
    # cell whose xs, lengths and carry are placed on the mesh
    # (and of a user-written cell, whose manual backward runs per device on an explicit mesh)
    for name, make in {"gru": CELLS["gru"], "lru": CELLS["lru"], "user-cell": user_cell}.items():
        cell = make(H)
        params = cell.init(jax.random.key(0), I, jnp.float64)
        carry = jax.tree.map(lambda a: a + 0.3, cell.initial_carry(params, (B,)))
        out[f"gradcheck-{name}"] = Case(
            lambda p, x, L, c, cell=cell: rj.gradcheck(cell, p, x, carry=c, lengths=L),
            (params, xs, lengths, carry),
            (False, True, True, True),
            "report",
        )

    embed = jax.random.normal(jax.random.key(3), (H, I), jnp.float64)
    head = rj.dense(H)
    head_p = head.init(jax.random.key(4), H, jnp.float64)

    # token ids [B, T] split over the devices, looked up in a replicated table that the gradient reaches
    token_seqs = jax.random.randint(jax.random.key(6), (B, T), 0, H)

    def embed_loss(p, table, ids):
        return jnp.sum(jnp.sin(rj.unroll(lstm, p, rj.embed(table, ids))[1]))

    out["embed"] = Case(
        jax.value_and_grad(embed_loss, (0, 1)),
        (lstm_p, embed, token_seqs),
        (False, False, True),
        "loss-grads",
    )

    def step_fn(p):
        def step(c, tok):
            c, ys = rj.unroll(lstm, p, (jax.nn.one_hot(tok, H, dtype=jnp.float64) @ embed)[:, None, :], c)
            return c, head.apply(head_p, ys[:, 0])

        return step

    carry0 = lstm.initial_carry(lstm_p, (B,))
    out["greedy"] = Case(
        lambda p, c, t: rj.decode.greedy(step_fn(p), c, t, 5, end_token=3),
        (lstm_p, carry0, tokens),
        (False, True, True),
        "batch",
    )
    out["sample-top-k"] = Case(
        lambda p, c, t: rj.decode.sample(step_fn(p), c, t, 5, jax.random.key(5), top_k=3),
        (lstm_p, carry0, tokens),
        (False, True, True),
    )
    out["decoder-step"] = Case(  # the encoder-decoder glue: its step looks tokens up with rj.embed
        lambda p, c, t: rj.decode.greedy(
            rj.seq2seq.decoder_step(lstm, p, embed, head_p), c, t, 5, end_token=3
        ),
        (lstm_p, carry0, tokens),
        (False, True, True),
        "batch",
    )
    out["beam-search"] = Case(
        lambda p, c, t: rj.decode.beam_search(step_fn(p), c, t, 5, beam_size=3, end_token=3),
        (lstm_p, carry0, tokens),
        (False, True, True),
        "batch",
    )
    return out


def per_device(case: Case) -> Any:
    """``case.fn`` under `jax.shard_map`: each device runs it on its own rows."""
    in_specs = tuple(P("data") if s else P() for s in case.sharded)
    if case.output == "batch":
        return jax.shard_map(case.fn, in_specs=in_specs, out_specs=P("data"))

    def local(*args: Any) -> Any:
        loss, *rest = case.fn(*args)
        return jax.lax.psum(loss, "data"), *rest

    rest = {"loss-grads-carry": (P(), P("data")), "loss-grads": (P(),)}.get(case.output, ((P(), P("data")),))
    return jax.shard_map(local, in_specs=in_specs, out_specs=(P(), *rest))


def collectives_in_loops(hlo: str) -> int:
    """How many cross-device collectives the compiled program runs inside a while loop's body (once per
    step). Autodiff through `jax.lax.scan` accumulates the weight gradients in the loop, and a batch split
    over devices then costs an all-reduce per step; the hand-derived BPTT sums them after its loop."""
    count = 0
    for body in set(re.findall(r"body=(%[\w.\-]+)", hlo)):
        start = hlo.index(f"\n{body} ")
        text = hlo[start : hlo.index("\n}\n", start)]
        count += sum(
            text.count(f"{op}(") for op in ("all-reduce", "all-gather", "all-to-all", "reduce-scatter")
        )
        count += text.count("all-reduce-start(") + text.count("collective-permute(")
    return count


class MeshKind(NamedTuple):
    axis_type: AxisType
    devices: int = 2
    context: bool = True  # the program runs under `jax.set_mesh`
    per_device: bool = False  # the program written per device, under `jax.shard_map`
    constructor: str = "make_mesh"  # or "Mesh", `jax.sharding.Mesh` over a list of devices

    def mesh(self) -> jax.sharding.Mesh:
        devices = jax.devices()[: self.devices]
        if self.constructor == "Mesh":
            return jax.sharding.Mesh(np.array(devices), ("data",), axis_types=(self.axis_type,))
        return jax.make_mesh((self.devices,), ("data",), axis_types=(self.axis_type,), devices=devices)


KINDS = {
    "explicit": MeshKind(AxisType.Explicit),
    "auto": MeshKind(AxisType.Auto, context=False),
    "shard_map": MeshKind(AxisType.Explicit, per_device=True),
    "explicit-no-context": MeshKind(AxisType.Explicit, context=False, constructor="Mesh"),
    "explicit-1": MeshKind(AxisType.Explicit, devices=1),
    "explicit-1-no-context": MeshKind(AxisType.Explicit, devices=1, context=False),
    "auto-1": MeshKind(AxisType.Auto, devices=1, context=False, constructor="Mesh"),
}


def run(kind: str, only: set[str] | None) -> dict[str, dict]:
    spec = KINDS[kind]
    mesh = spec.mesh()
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    on_mesh = lambda: jax.set_mesh(mesh) if spec.context else contextlib.nullcontext()  # noqa: E731

    def place(case: Case) -> list:
        return [
            jax.device_put(a, batch if s else replicated)
            for a, s in zip(case.args, case.sharded, strict=True)
        ]

    records = {}
    for name, case in cases().items():
        if only and name not in only:
            continue
        if case.output == "report":
            with on_mesh():
                report = case.fn(*place(case))
            measures = ("manual_vs_autodiff", "manual_vs_rtrl", "manual_vs_complex", "manual_vs_fd")
            errors = [getattr(r, m) for r in report.rows for m in measures if getattr(r, m) is not None]
            # every oracle ran on every leaf (a failing one would leave a note and a None), and all agree
            complete = len(errors) == len(measures) * len(report.rows)
            records[name] = {"passed": report.passed and complete, "worst_relative_error": max(errors)}
            continue
        one = jax.jit(case.reference or case.fn)(*case.args)
        placed = place(case)
        with on_mesh():
            step = jax.jit(per_device(case) if spec.per_device else case.fn)
            compiled = step.lower(*placed).compile()
            two, hlo = compiled(*placed), compiled.as_text()
        record = {
            "devices": spec.devices,
            "error": rel_err(two, one),
            "all_gathers": hlo.count("all-gather("),
            "collectives_in_loops": collectives_in_loops(hlo),
        }
        if (
            case.output != "loss-grads"
            and isinstance(two, tuple)
            and len(two) == 2
            and isinstance(two[1], tuple)
        ):
            # value_and_grad with respect to (params, xs)
            d_params, d_xs = two[1][0], two[1][1]
            record["d_xs_batch_sharded"] = d_xs.sharding.is_equivalent_to(batch, d_xs.ndim)
            record["d_params_replicated"] = all(
                g.sharding.is_fully_replicated for g in jax.tree.leaves(d_params)
            )
            record["all_reduces"] = hlo.count("all-reduce(")
        if case.output == "loss-grads":
            record["grads_replicated"] = all(g.sharding.is_fully_replicated for g in jax.tree.leaves(two[1]))
        records[name] = record
    return records


def run_model_split(only: set[str] | None) -> dict[str, dict]:
    """Weights split by their contracted (leading) axis over a ``model`` axis, on both kinds of mesh: every
    cell's training step, hand-derived and autodiff, against one device; each gradient typed as its primal.
    And the clear error of an explicit mesh for what it cannot split: xs's time axis."""
    records: dict[str, dict] = {}
    for name, make in {**CELLS, "user-cell": user_cell}.items():
        cell = make(H)
        params = cell.init(jax.random.key(0), I, jnp.float64)
        for grad in ("manual", "autodiff"):
            case = f"{name}-{grad}"
            if only and case not in only:
                continue
            fn = unroll_loss(cell, grad=grad)
            one = jax.jit(unroll_loss(cell, grad="autodiff"))(params, xs, lengths)  # jax.grad on one device
            errors, typed = [], True
            for axis_type in (AxisType.Explicit, AxisType.Auto):
                mesh = jax.make_mesh((2,), ("model",), axis_types=(axis_type,))

                def place(a: Any, mesh: Any = mesh) -> Any:
                    split = a.ndim >= 2 and a.shape[0] % 2 == 0  # a weight: split by its rows
                    return jax.device_put(a, NamedSharding(mesh, P("model") if split else P()))

                placed = (jax.tree.map(place, params), jax.device_put(xs, NamedSharding(mesh, P())), lengths)
                explicit = axis_type == AxisType.Explicit
                with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
                    two = jax.jit(fn)(*placed)
                errors.append(rel_err(two, one))
                if explicit:  # the types say how each gradient is split: as its parameter
                    typed = typed and all(
                        g.sharding.is_equivalent_to(p.sharding, p.ndim)
                        for g, p in zip(jax.tree.leaves(two[1][0]), jax.tree.leaves(placed[0]), strict=True)
                    )
            records[case] = {"error": max(errors), "grads_typed_as_params": typed}
    # hidden units split (every parameter by its last axis) on both kinds of mesh, the hand-derived backward
    # and a user-written cell's; on an explicit mesh the carry is typed as a step splits it, by unit
    for name, axis_type in [(n, t) for n in ("lstm", "gru", "mgu", "user") for t in ("auto", "explicit")]:
        case = f"{name}-units-{axis_type}"
        if only and case not in only:
            continue
        cell = user_cell(H) if name == "user" else CELLS[name](H)
        params = cell.init(jax.random.key(0), I, jnp.float64)
        fn = unroll_loss(cell)
        kind = AxisType.Auto if axis_type == "auto" else AxisType.Explicit
        mesh = jax.make_mesh((2,), ("model",), axis_types=(kind,))
        specs = {1: P("model"), 2: P(None, "model")}  # every parameter by its last axis, the units'
        split = [jax.device_put(a, NamedSharding(mesh, specs[a.ndim])) for a in jax.tree.leaves(params)]
        split = jax.tree.unflatten(jax.tree.structure(params), split)
        with jax.set_mesh(mesh) if kind == AxisType.Explicit else contextlib.nullcontext():
            two = jax.jit(fn)(split, xs, lengths)
        records[case] = {"error": rel_err(two, jax.jit(fn)(params, xs, lengths))}
    # what an explicit mesh refuses, with the message the user sees
    lstm = rj.lstm(H)
    lstm_p = lstm.init(jax.random.key(0), I, jnp.float64)
    mesh = jax.make_mesh((2,), ("model",))
    refused = {
        "split-time": (lstm_p, jax.device_put(xs[:, :6], NamedSharding(mesh, P(None, "model")))),
    }
    for case, (p, x) in refused.items():
        if only and case not in only:
            continue
        try:
            with jax.set_mesh(mesh):
                rj.unroll(lstm, p, x)
            records[case] = {"error_message": None}
        except ValueError as e:
            records[case] = {"error_message": str(e)}
    return records


if __name__ == "__main__":
    kinds = sys.argv[1].split(",")
    only = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else None
    print(
        json.dumps(
            {kind: run_model_split(only) if kind == "model" else run(kind, only) for kind in kinds},
            default=lambda v: bool(v) if isinstance(v, np.bool_) else v,
        )
    )
