"""A fuzz over malformed calls to the public API: one argument at a time is replaced by a malformed value
(wrong rank, wrong dtype, a Python list, None, an empty batch, T = 0, a bad size or mode string), and the call
either raises a ValueError/TypeError whose message names that argument, or is one of the cases that are
legitimately valid (listed in ``VALID``, each with the result it must give). Never a crash from inside JAX,
never a silent result.

Valid by design (``VALID``): a Python list where an array is expected is converted as `jnp.asarray` would;
an empty batch (B = 0) and empty sequences (T = 0) give empty outputs of the right shape (`rj.unroll` with
T = 0 and no lengths returns ``ys [B, 0, H]`` and the initial carry, tested in test_unroll; `shift_right`
gives ``[B, 0]``); `Dense.apply` takes any leading axes and `embed` any shape of ids. Errors by design:
`last_valid` of T = 0 steps (there is no last step), lengths outside ``[0, T]`` when concrete (under jit
they clamp, and `checkify` reports them), a zero-row embedding table.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rnnjax as rj

B, T, I, H, V = 2, 3, 3, 2, 5
CELL = rj.gru(H)
PARAMS = CELL.init(jax.random.key(0), I, jnp.float64)
XS = jnp.linspace(-1.0, 1.0, B * T * I, dtype=jnp.float64).reshape(B, T, I)
LENGTHS = jnp.array([3, 1], jnp.int32)
TOKENS = jnp.array([[1, 2, 0], [3, 4, 1]], jnp.int32)
TABLE = jnp.linspace(-1.0, 1.0, V * I, dtype=jnp.float64).reshape(V, I)
LOGITS = jnp.linspace(-1.0, 1.0, B * T * V, dtype=jnp.float64).reshape(B, T, V)


def _array_faults(a: Any) -> dict[str, Any]:
    """The malformed versions of an array argument."""
    a = jnp.asarray(a)
    out = {
        "rank-1": a[0],
        "rank+1": a[None],
        "list": np.asarray(a).tolist(),
        "none": None,
        "complex": a.astype(jnp.complex128),
        "bool": a.astype(bool),
        "string": "xs",
    }
    out["int" if jnp.issubdtype(a.dtype, jnp.floating) else "float"] = a.astype(
        jnp.int32 if jnp.issubdtype(a.dtype, jnp.floating) else jnp.float64
    )
    if a.ndim >= 1:
        out["batch0"] = a[:0]
    if a.ndim >= 2:
        out["time0"] = a[:, :0]
    if a.ndim >= 1:
        out["wrong-last"] = jnp.concatenate([a, a[..., :1]], axis=-1)
    return out


SIZE_FAULTS = {"zero": 0, "negative": -1, "float": 1.5, "string": "8", "none": None}
MODE_FAULTS = {"bogus": "bogus", "none": None, "int": 3}


@dataclasses.dataclass(frozen=True)
class Entry:
    """A public function, its valid arguments, and which of them the fuzz malforms."""

    call: Callable[..., Any]
    kwargs: dict[str, Any]
    faults: dict[str, dict[str, Any]]


def _unroll(**kw):
    return rj.unroll(CELL, kw.pop("params"), kw.pop("xs"), **kw)


def _layer_apply(make):
    def call(**kw):
        layer = make(CELL)
        return layer.apply(layer.init(jax.random.key(0), I, jnp.float64), kw.pop("xs"), **kw)

    return call


def _step_fn(state, tokens):
    return state, jax.nn.one_hot(tokens, V, dtype=jnp.float64)


def _step_loss(readout, h, y):
    return jnp.sum((h @ readout - y) ** 2)


STATE = jnp.zeros((B, V), jnp.float64)
START = jnp.array([0, 1], jnp.int32)

ENTRIES: dict[str, Entry] = {
    "unroll": Entry(
        _unroll,
        {"params": PARAMS, "xs": XS, "lengths": LENGTHS, "grad": "manual", "checkpoint": None},
        {
            "xs": _array_faults(XS),
            "lengths": _array_faults(LENGTHS),
            "grad": MODE_FAULTS,
            "checkpoint": {"bogus": "bogus", "zero": 0, "negative": -1, "float": 1.5},
        },
    ),
    "rnn": Entry(_layer_apply(rj.rnn), {"xs": XS, "lengths": LENGTHS}, {"xs": _array_faults(XS)}),
    "bidirectional": Entry(
        _layer_apply(rj.bidirectional), {"xs": XS, "lengths": LENGTHS}, {"xs": _array_faults(XS)}
    ),
    "bidirectional-merge": Entry(
        lambda merge: rj.bidirectional(CELL, merge=merge), {"merge": "concat"}, {"merge": MODE_FAULTS}
    ),
    "stack": Entry(
        _layer_apply(lambda c: rj.stack(c, rj.gru(H))),
        {"xs": XS, "lengths": LENGTHS},
        {"xs": _array_faults(XS)},
    ),
    "stack-dropout": Entry(
        lambda dropout: rj.stack(CELL, CELL, dropout=dropout),
        {"dropout": 0.0},
        {"dropout": {"negative": -0.5, "one": 1.0, "string": "x", "none": None}},
    ),
    "cell": Entry(lambda hidden_size: rj.lstm(hidden_size), {"hidden_size": H}, {"hidden_size": SIZE_FAULTS}),
    "dense": Entry(
        lambda output_size: rj.dense(output_size), {"output_size": H}, {"output_size": SIZE_FAULTS}
    ),
    "dense-apply": Entry(
        lambda x: rj.dense(V).apply(rj.dense(V).init(jax.random.key(0), I, jnp.float64), x),
        {"x": XS},
        {"x": _array_faults(XS)},
    ),
    "embed": Entry(
        rj.embed,
        {"table": TABLE, "tokens": TOKENS},
        {"table": _array_faults(TABLE), "tokens": _array_faults(TOKENS)},
    ),
    "last_valid": Entry(
        rj.last_valid,
        {"ys": XS, "lengths": LENGTHS},
        {"ys": _array_faults(XS), "lengths": _array_faults(LENGTHS)},
    ),
    "pad_sequences": Entry(
        rj.pad_sequences,
        {"seqs": [np.ones((3, I)), np.ones((1, I))], "max_length": None, "padding": "post"},
        {
            "seqs": {"none": None, "string": "xs", "mixed-features": [np.ones((3, I)), np.ones((1, I + 1))]},
            "max_length": {k: v for k, v in SIZE_FAULTS.items() if k != "none"},
            "padding": MODE_FAULTS,
        },
    ),
    "bucket_by_length": Entry(
        rj.bucket_by_length,
        {"lengths": np.array([3, 1, 2, 2]), "batch_size": 2},
        {"lengths": _array_faults(np.array([3, 1, 2, 2])), "batch_size": SIZE_FAULTS},
    ),
    "sequence_cross_entropy": Entry(
        rj.losses.sequence_cross_entropy,
        {"logits": LOGITS, "targets": TOKENS, "lengths": LENGTHS},
        {
            "logits": _array_faults(LOGITS),
            "targets": _array_faults(TOKENS),
            "lengths": _array_faults(LENGTHS),
        },
    ),
    "squared_error": Entry(
        rj.losses.squared_error,
        {"predictions": XS, "targets": XS, "lengths": LENGTHS},
        {"predictions": _array_faults(XS), "targets": _array_faults(XS), "lengths": _array_faults(LENGTHS)},
    ),
    "greedy": Entry(
        lambda start_tokens, max_length: rj.decode.greedy(_step_fn, STATE, start_tokens, max_length),
        {"start_tokens": START, "max_length": 3},
        {"start_tokens": _array_faults(START), "max_length": SIZE_FAULTS},
    ),
    "sample": Entry(
        lambda temperature, top_k: rj.decode.sample(
            _step_fn, STATE, START, 3, jax.random.key(0), temperature=temperature, top_k=top_k
        ),
        {"temperature": 1.0, "top_k": None},
        {"temperature": {"zero": 0.0, "negative": -1.0, "string": "1"}, "top_k": SIZE_FAULTS},
    ),
    "beam_search": Entry(
        lambda beam_size: rj.decode.beam_search(_step_fn, STATE, START, 3, beam_size=beam_size),
        {"beam_size": 2},
        {"beam_size": SIZE_FAULTS},
    ),
    "shift_right": Entry(
        rj.seq2seq.shift_right, {"targets": TOKENS, "start_token": 0}, {"targets": _array_faults(TOKENS)}
    ),
    "truncated_bptt": Entry(
        lambda chunk_size: rj.truncated_bptt(
            lambda p, c, x: (jnp.sum(rj.unroll(CELL, p, x, c)[1]), rj.unroll(CELL, p, x, c)[0]),
            PARAMS,
            CELL.initial_carry(PARAMS, (B,)),
            XS,
            chunk_size=chunk_size,
        ),
        {"chunk_size": 2},
        {"chunk_size": SIZE_FAULTS},
    ),
    "gradcheck": Entry(
        lambda n_directions, oracles: rj.gradcheck(
            CELL, PARAMS, XS[:1, :2], n_directions=n_directions, oracles=oracles
        ),
        {"n_directions": 1, "oracles": ("autodiff",)},
        {"n_directions": SIZE_FAULTS, "oracles": {**MODE_FAULTS, "string": "autodiff", "empty": ()}},
    ),
    "rtrl_value_and_grad": Entry(
        lambda structure: rj.rtrl_value_and_grad(
            CELL,
            PARAMS,
            jnp.ones((H,), jnp.float64),
            XS,
            jnp.zeros((B, T), jnp.float64),
            _step_loss,
            structure=structure,
        ),
        {"structure": "auto"},
        {"structure": MODE_FAULTS},
    ),
    "save": Entry(lambda path: rj.save(path, PARAMS), {"path": None}, {"path": {"none": None, "int": 3}}),
}

CASES = [(e, a, f) for e, entry in ENTRIES.items() for a, faults in entry.faults.items() for f in faults]


def _shape(*shape: int) -> Callable[[Any], bool]:
    return lambda out: jnp.shape(out) == shape


def _ys_shape(*shape: int) -> Callable[[Any], bool]:
    return lambda out: jnp.shape(out[1]) == shape


def _finite_scalar(out: Any) -> bool:
    return jnp.shape(out) == () and bool(jnp.isfinite(out))


# The malformed-looking calls that are valid, each with the result it must give: a list converts as
# jnp.asarray would; an empty batch or empty sequences give empty outputs; Dense applies to any leading
# axes; an embedding of width 0 or 4 is a table like any other; last_valid reads any dtype.
VALID: dict[tuple[str, str, str], Callable[[Any], bool]] = {
    **{
        (e, "xs", "list"): _ys_shape(B, T, 2 * H if e == "bidirectional" else H)
        for e in ENTRIES
        if "xs" in ENTRIES[e].faults
    },
    ("unroll", "lengths", "list"): _ys_shape(B, T, H),
    ("dense-apply", "x", "list"): _shape(B, T, V),
    ("dense-apply", "x", "rank-1"): _shape(T, V),
    ("dense-apply", "x", "rank+1"): _shape(1, B, T, V),
    ("dense-apply", "x", "batch0"): _shape(0, T, V),
    ("dense-apply", "x", "time0"): _shape(B, 0, V),
    ("embed", "table", "list"): _shape(B, T, I),
    ("embed", "table", "time0"): _shape(B, T, 0),
    ("embed", "table", "wrong-last"): _shape(B, T, I + 1),
    ("embed", "tokens", "rank-1"): _shape(T, I),
    ("embed", "tokens", "rank+1"): _shape(1, B, T, I),
    ("embed", "tokens", "list"): _shape(B, T, I),
    ("embed", "tokens", "batch0"): _shape(0, T, I),
    ("embed", "tokens", "time0"): _shape(B, 0, I),
    ("embed", "tokens", "wrong-last"): _shape(B, T + 1, I),
    **{("last_valid", "ys", f): _shape(B, I) for f in ("list", "complex", "bool", "int")},
    ("last_valid", "ys", "wrong-last"): _shape(B, I + 1),
    ("last_valid", "lengths", "list"): _shape(B, I),
    ("last_valid", "lengths", "none"): _shape(B, I),
    ("pad_sequences", "max_length", "zero"): lambda out: out[0].shape == (2, 0, I) and list(out[1]) == [0, 0],
    ("bucket_by_length", "lengths", "list"): lambda out: sorted(np.concatenate(out).tolist()) == [0, 1, 2, 3],
    ("bucket_by_length", "lengths", "batch0"): lambda out: out == [],
    ("bucket_by_length", "lengths", "wrong-last"): lambda out: (
        sorted(np.concatenate(out).tolist()) == [0, 1, 2, 3, 4]
    ),
    ("sequence_cross_entropy", "logits", "list"): _finite_scalar,
    ("sequence_cross_entropy", "logits", "wrong-last"): _finite_scalar,
    ("sequence_cross_entropy", "targets", "list"): _finite_scalar,
    ("squared_error", "predictions", "list"): _finite_scalar,
    ("squared_error", "targets", "list"): _finite_scalar,
    **{
        (e, "lengths", f): _finite_scalar
        for e in ("sequence_cross_entropy", "squared_error")
        for f in ("list", "none")
    },
    ("unroll", "lengths", "none"): _ys_shape(B, T, H),
    ("greedy", "start_tokens", "list"): lambda out: out.tokens.shape == (B, 3),
    ("greedy", "start_tokens", "batch0"): lambda out: out.tokens.shape == (0, 3),
    ("greedy", "start_tokens", "wrong-last"): lambda out: out.tokens.shape == (B + 1, 3),
    ("sample", "top_k", "none"): lambda out: out.tokens.shape == (B, 3),
    ("shift_right", "targets", "list"): _shape(B, T),
    ("shift_right", "targets", "batch0"): _shape(0, T),
    ("shift_right", "targets", "time0"): _shape(B, 0),
    ("shift_right", "targets", "wrong-last"): _shape(B, T + 1),
}

# Malformations whose error names the argument they conflict with: xs or ys with T = 0 or B = 0 against
# the valid lengths, logits with B = 0 or T = 0 against the valid targets.
RELATED: dict[tuple[str, str, str], str] = {
    **{(e, "xs", "time0"): "lengths" for e in ("unroll", "rnn", "bidirectional", "stack")},
    ("last_valid", "ys", "time0"): "lengths",
    ("last_valid", "ys", "batch0"): "lengths",
    ("sequence_cross_entropy", "logits", "batch0"): "targets",
    ("sequence_cross_entropy", "logits", "time0"): "targets",
}


def outcome(entry_name: str, arg: str, fault: str) -> tuple[str, Any]:
    """``("ok", result)``, ``("named", error)`` (a ValueError/TypeError naming the argument, or the one it
    conflicts with), ``("unnamed", error)`` or ``("crash", error)``."""
    entry = ENTRIES[entry_name]
    kwargs = {**entry.kwargs, arg: entry.faults[arg][fault]}
    try:
        result = jax.block_until_ready(entry.call(**kwargs))
    except (ValueError, TypeError) as e:
        names = (arg, RELATED.get((entry_name, arg, fault), arg))
        return ("named" if any(re.search(rf"\b{n}\b", str(e)) for n in names) else "unnamed", e)
    except Exception as e:
        return ("crash", e)
    return ("ok", result)


def test_the_tables_name_real_cases():
    assert set(VALID) <= set(CASES) and set(RELATED) <= set(CASES)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(CASES))
def test_malformed_calls_raise_named_errors_or_give_the_valid_result(case):
    kind, got = outcome(*case)
    if case in VALID:
        assert kind == "ok", f"{case}: valid, raised {got!r}"
        assert VALID[case](got), f"{case}: valid, but gave {jax.tree.map(jnp.shape, got)}"
    else:
        assert kind == "named", (
            f"{case}: expected a ValueError/TypeError naming {case[1]!r}, got {kind}: {got!r}"
        )


# The errors the fuzz found, with their messages: None, strings and dtypes named where arrays are expected.
@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: rj.unroll(CELL, PARAMS, None),
            TypeError,
            r"^xs must be a floating-point array \[B, T, I\], got None$",
        ),
        (
            lambda: rj.unroll(CELL, PARAMS, XS, lengths="3"),
            TypeError,
            r"^lengths must be an integer array \[B\], got '3'$",
        ),
        (lambda: rj.dense(0), ValueError, r"^output_size must be >= 1, got 0$"),
        (lambda: rj.embed(TABLE, None), TypeError, r"^tokens must be an integer array, got None$"),
        (
            lambda: rj.embed(TABLE[:0], TOKENS),
            ValueError,
            r"^table must have V >= 1 rows \[V, E\], got shape \(0, 3\)$",
        ),
        (
            lambda: rj.embed(TABLE.astype(jnp.int32), TOKENS),
            TypeError,
            r"^table must be a floating-point array \[V, E\], got dtype int32$",
        ),
        (
            lambda: rj.last_valid(XS, LENGTHS.astype(jnp.float64)),
            TypeError,
            r"^lengths must be an integer array \[B\], got dtype float64$",
        ),
        (
            lambda: rj.last_valid(XS[:, :0], LENGTHS),
            ValueError,
            r"^lengths must lie in \[0, T\] = \[0, 0\], got values from 1 to 3$",
        ),
        (
            lambda: rj.last_valid(XS[:, :0]),
            ValueError,
            r"^ys must have T >= 1 steps to read the last of, got shape \(2, 0, 3\)$",
        ),
        (
            lambda: rj.losses.sequence_cross_entropy(LOGITS.astype(jnp.int32), TOKENS),
            TypeError,
            r"^logits must be a floating-point array \[B, T, V\], got dtype int32$",
        ),
        (
            lambda: rj.losses.squared_error(XS, XS.astype(jnp.float32)),
            TypeError,
            r"^targets must have the dtype of predictions float64, got float32$",
        ),
        (
            lambda: rj.losses.squared_error(XS.astype(jnp.int32), XS),
            TypeError,
            r"^predictions must be a floating-point array \[B, T, F\], got dtype int32$",
        ),
        (
            lambda: rj.decode.greedy(_step_fn, STATE, "0", 3),
            TypeError,
            r"^start_tokens must be an integer array \[B\], got '0'$",
        ),
        (
            lambda: rj.decode.sample(_step_fn, STATE, START, 3, jax.random.key(0), temperature="1"),
            TypeError,
            r"^temperature must be a number > 0, got '1'$",
        ),
        (
            lambda: rj.seq2seq.shift_right(None, 0),
            TypeError,
            r"^targets must be an integer array \[B, T\], got None$",
        ),
    ],
)
def test_messages(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_every_malformed_call():
    """The whole table, each case once (the fuzz above draws from it)."""
    wrong = []
    for case in CASES:
        kind, got = outcome(*case)
        if case in VALID:
            if kind != "ok" or not VALID[case](got):
                wrong.append((case, kind, got))
        elif kind != "named":
            wrong.append((case, kind, got))
    assert not wrong, wrong
