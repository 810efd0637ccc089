"""The cases that every framework module (linen, equinox, nnx) must run exactly as the functional API does.

A `Case` describes one module (`RNN`, `Bidirectional` or `Stack`), its constructor options and a call. Each
framework's test builds the module, reads its params in the functional layout, and passes `check_matches`
a function ``run(params, xs, carry, key) -> (carry, ys)`` that calls the module with those params; the
outputs and the gradients with respect to params, xs and carry must equal those of `rj.unroll`,
`rj.bidirectional` and `rj.stack` with the same params (and, with ``regularize``, the same key in training
or none at inference, where the regularisers act as their expectation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from helpers import rel_err

import rnnjax as rj

B, T, I = 3, 6, 3
LENGTHS = (6, 4, 0)


def _user_init(key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> dict:
    k_w, k_u = jax.random.split(key)
    return {
        "w": 0.5 * jax.random.normal(k_w, (input_size, 4), dtype),
        "u": {"rec": 0.3 * jax.random.normal(k_u, (4, 4), dtype)},
    }


def _user_initial_carry(params: dict, batch_shape: tuple[int, ...] = ()) -> rj.HCarry:
    return rj.HCarry(jnp.zeros((*batch_shape, 4), params["w"].dtype))


def _user_step(params: dict, carry: rj.HCarry, x: jax.Array) -> tuple[rj.HCarry, jax.Array]:
    h = jnp.tanh(x @ params["w"] + carry.h @ params["u"]["rec"])
    return rj.HCarry(h), h


# A user-written cell whose params are a nested dict, not a NamedTuple.
USER_CELL = rj.Cell(
    init=_user_init, initial_carry=_user_initial_carry, step=_user_step, hidden_size=4, name="user"
)
LSTM, GRU, LSTM3, GRU2 = rj.lstm(4), rj.gru(4), rj.lstm(3), rj.gru(2)
# every regulariser at once, on cells whose recurrence is the GEMM h w_hh
REG = rj.Regularizer(input_dropout=0.2, state_dropout=0.3, zoneout=0.15, zoneout_c=0.05, weight_drop=0.25)


@dataclasses.dataclass(frozen=True)
class Case:
    """One module and one call.

    Attributes:
      id: the test id.
      kind: ``"rnn"``, ``"bidirectional"`` or ``"stack"``.
      args: the constructor's arguments besides the input size, key and dtype, by name (``cell``;
        ``cell_fw``, ``cell_bw``, ``merge``; ``layers``, ``residual``, ``dropout``; and the options).
      lengths: pass ``lengths=LENGTHS``.
      carry: pass a random initial carry.
      grad: the call's ``grad``.
      train: training: a stack's dropout and the ``regularize`` masks are drawn (from a fixed key); else
        inference, where ``regularize`` acts as its expectation.
      slow: run with the slow tests (``make test-slow``).
    """

    id: str
    kind: str
    args: tuple[tuple[str, Any], ...]
    lengths: bool = True
    carry: bool = False
    grad: str = "manual"
    train: bool = False
    slow: bool = False

    @property
    def kw(self) -> dict[str, Any]:
        return dict(self.args)

    @property
    def regularized(self) -> bool:
        return self.kw.get("regularize") is not None

    def functional(self) -> rj.Layer:
        """The functional layer with the case's layout (options of `rj.unroll` left out)."""
        kw = self.kw
        if self.kind == "rnn":
            return rj.rnn(kw["cell"], reverse=kw.get("reverse", False))
        if self.kind == "bidirectional":
            return rj.bidirectional(kw["cell_fw"], kw.get("cell_bw"), merge=kw.get("merge", "concat"))
        return rj.stack(*kw["layers"], residual=kw.get("residual", False), dropout=kw.get("dropout", 0.0))

    def reference(self, params: Any, xs: jax.Array, carry: Any, key: jax.Array | None) -> tuple[Any, Any]:
        """``(carry, ys)`` from `rj.unroll` (with the options), `rj.bidirectional` or `rj.stack`."""
        kw, lengths = self.kw, self.call_lengths()
        if self.kind == "rnn":
            options = {
                k: kw[k] for k in ("reverse", "checkpoint", "budget", "schedule", "regularize") if k in kw
            }
            key = key if self.train else None
            return rj.unroll(
                kw["cell"], params, xs, carry=carry, lengths=lengths, grad=self.grad, key=key, **options
            )
        return self.functional().apply(
            params,
            xs,
            carry=carry,
            lengths=lengths,
            grad=self.grad,
            key=key,
            train=self.train,
            regularize=kw.get("regularize"),
        )

    def call_lengths(self) -> jax.Array | None:
        return jnp.array(LENGTHS) if self.lengths else None


CASES = [
    Case("rnn-gru-reverse", "rnn", (("cell", GRU), ("reverse", True))),
    Case("rnn-lstm-autodiff-carry", "rnn", (("cell", LSTM),), carry=True, grad="autodiff"),
    Case("rnn-lstm-checkpoint", "rnn", (("cell", LSTM), ("checkpoint", 2)), carry=True),
    Case(
        "rnn-lstm-budget-nested",
        "rnn",
        (("cell", LSTM), ("budget", 7000), ("schedule", "nested")),
        slow=True,
    ),
    Case("rnn-user-cell", "rnn", (("cell", USER_CELL), ("reverse", True)), carry=True),
    Case("bi-concat", "bidirectional", (("cell_fw", LSTM3), ("cell_bw", GRU2)), carry=True),
    Case(
        "bi-sum-checkpoint-autodiff",
        "bidirectional",
        (("cell_fw", GRU), ("merge", "sum"), ("checkpoint", "sqrt")),
        grad="autodiff",
        slow=True,
    ),
    Case("bi-user-cell", "bidirectional", (("cell_fw", USER_CELL), ("unroll_steps", 3)), lengths=False),
    Case(
        "stack-residual-dropout",
        "stack",
        (("layers", (LSTM, rj.rnn(GRU, reverse=True), LSTM)), ("residual", True), ("dropout", 0.25)),
        train=True,
    ),
    Case("stack-dropout-off", "stack", (("layers", (LSTM, GRU)), ("dropout", 0.25)), slow=True),
    Case("rnn-lstm-regularize-train", "rnn", (("cell", LSTM), ("regularize", REG)), carry=True, train=True),
    Case("rnn-gru-regularize-eval", "rnn", (("cell", GRU), ("reverse", True), ("regularize", REG))),
    Case(
        "bi-regularize-train",
        "bidirectional",
        (("cell_fw", LSTM3), ("cell_bw", GRU2), ("regularize", REG)),
        train=True,
        slow=True,
    ),
    Case(
        "stack-regularize-dropout-train",
        "stack",
        (("layers", (LSTM, rj.bidirectional(GRU2))), ("dropout", 0.25), ("regularize", REG)),
        train=True,
        slow=True,
    ),
    Case(
        "stack-bi-checkpoint-carry",
        "stack",
        (("layers", (rj.bidirectional(GRU2, merge="sum"), LSTM3)), ("checkpoint", 2)),
        carry=True,
        slow=True,
    ),
]
CASE_PARAMS = [pytest.param(c, id=c.id, marks=pytest.mark.slow if c.slow else ()) for c in CASES]


def inputs(case: Case, params: Any) -> tuple[jax.Array, Any]:
    """Random ``xs [B, T, I]`` and, where the case passes one, a random initial carry (float64)."""
    k_x, k_c = jax.random.split(jax.random.key(7))
    xs = jax.random.normal(k_x, (B, T, I), jnp.float64)
    if not case.carry:
        return xs, None
    carry = case.functional().initial_carry(params, (B,))
    leaves, tree = jax.tree.flatten(carry)
    keys = jax.random.split(k_c, len(leaves))
    return xs, jax.tree.unflatten(
        tree, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves, strict=True)]
    )


def check_matches(
    case: Case,
    run: Callable[[Any, jax.Array, Any, jax.Array | None], tuple[Any, Any]],
    params: Any,
    key: jax.Array | None = None,
    reference_key: jax.Array | None = None,
) -> None:
    """The module (``run``) and the functional API agree on outputs and on gradients w.r.t. params, xs
    and carry, to 1e-12 in float64. ``reference_key`` is the dropout key the module draws from ``key``.
    With ``regularize``: the module's gradient also equals autodiff through the same masked forward
    (``grad="autodiff"``, 1e-10), and in training the masks act (the output is not the expectation's)."""
    xs, carry = inputs(case, params)
    reference_key = key if reference_key is None else reference_key
    out = case.reference(params, xs, carry, reference_key)
    w = jax.tree.map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), out)

    def loss(fn: Callable, params: Any, xs: jax.Array, carry: Any, key: jax.Array | None) -> jax.Array:
        terms = jax.tree.map(lambda a, b: jnp.sum(a * b), fn(params, xs, carry, key), w)
        return sum(jax.tree.leaves(terms))

    argnums = (0, 1, 2) if case.carry else (0, 1)
    # jitted: eagerly every primitive of the backward would compile as a program of its own
    got_out = jax.jit(run)(params, xs, carry, key)
    got = jax.jit(jax.grad(lambda *a: loss(run, *a), argnums))(params, xs, carry, key)
    want = jax.jit(jax.grad(lambda *a: loss(case.reference, *a), argnums))(params, xs, carry, reference_key)
    assert jax.tree.structure(got_out) == jax.tree.structure(out)
    assert rel_err(got_out, out) <= 1e-12
    assert rel_err(got, want) <= 1e-12
    if case.regularized:
        twin = dataclasses.replace(case, grad="autodiff").reference
        autodiff = jax.jit(jax.grad(lambda *a: loss(twin, *a), argnums))(params, xs, carry, reference_key)
        assert rel_err(got, autodiff) <= 1e-10
        if case.train:
            expectation = dataclasses.replace(case, train=False).reference(params, xs, carry, None)
            assert rel_err(got_out, expectation) > 1e-2


# Options that must reach every rj.unroll call of a module, and one module of each kind with its number of
# recurrences (a bidirectional layer runs two).
OPTION_SETS = ({"checkpoint": 3, "unroll_steps": 2}, {"budget": 10**6, "schedule": "nested"})
MODULES = {
    "rnn": ((("cell", LSTM), ("reverse", True)), 1),
    "bidirectional": ((("cell_fw", GRU2), ("merge", "sum")), 2),
    "stack": ((("layers", (LSTM3, rj.bidirectional(GRU2))), ("residual", False)), 3),
}


def record_unroll(monkeypatch: Any) -> list[dict[str, Any]]:
    """Records the keyword arguments of every `rj.unroll` call that the framework modules make (through the
    functional layers)."""
    import rnnjax.layers

    calls: list[dict[str, Any]] = []
    real = rnnjax.layers.unroll

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(rnnjax.layers, "unroll", spy)
    return calls


def check_options_reached(calls: list[dict[str, Any]], options: dict[str, Any], n: int) -> None:
    """Each of the ``n`` recorded `rj.unroll` calls got ``options`` and no other non-default option."""
    assert len(calls) == n
    for kwargs in calls:
        got = {k: kwargs.get(k) for k in ("checkpoint", "budget", "schedule")}
        got["unroll_steps"] = kwargs.get("unroll_steps", kwargs.get("unroll"))
        assert got == {"checkpoint": None, "budget": None, "schedule": None, "unroll_steps": None, **options}


def regression_data() -> tuple[jax.Array, jax.Array, jax.Array]:
    """A small sequence task for the training tests: ``xs [4, 7, 3]``, targets ``[4, 7, 2]``, lengths."""
    xs = jax.random.normal(jax.random.key(1), (4, 7, 3), jnp.float64)
    return xs, jnp.tanh(jnp.cumsum(xs[..., :2], axis=1)), jnp.array([7, 5, 3, 1])
