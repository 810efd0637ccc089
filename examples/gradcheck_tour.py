"""A tour of gradient checking with rj.gradcheck: every built-in cell, a cell of your own, a deep
bidirectional model, and a planted bug in a hand-written backward that the check catches and localises.

Each check compares, in float64, the hand-derived BPTT with `jax.grad` through the same forward and with
central finite differences along random directions, per input leaf.

    python -m examples.gradcheck_tour [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, NamedTuple

if not __package__:  # run as a file (python examples/x.py): import rnnjax and examples from this clone
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

import rnnjax as rj
from examples.gradcheck_table import cells as every_cell


@dataclasses.dataclass(frozen=True)
class Config:
    batch: int = 3
    time: int = 10
    input_size: int = 4
    hidden_size: int = 5
    seed: int = 0


QUICK = Config(time=5, hidden_size=3)


class MinGRUParams(NamedTuple):
    w_z: jax.Array  # [I, H]
    w_h: jax.Array  # [I, H]


def min_gru(H: int) -> rj.Cell:
    """A cell of your own, written as a step only: minGRU (Feng et al. 2024), h' = (1 − z) h + z h̃."""

    def init(key: jax.Array, input_size: int, dtype: Any = jnp.float32) -> MinGRUParams:
        k1, k2 = jax.random.split(key)
        scale = 1.0 / input_size**0.5
        return MinGRUParams(
            scale * jax.random.normal(k1, (input_size, H), dtype),
            scale * jax.random.normal(k2, (input_size, H), dtype),
        )

    def initial_carry(params: MinGRUParams, batch_shape: tuple[int, ...] = ()) -> rj.HCarry:
        return rj.HCarry(jnp.zeros((*batch_shape, H), params.w_z.dtype))

    def step(params: MinGRUParams, carry: rj.HCarry, x: jax.Array) -> tuple[rj.HCarry, jax.Array]:
        z = jax.nn.sigmoid(x @ params.w_z)
        h = (1 - z) * carry.h + z * (x @ params.w_h)
        return rj.HCarry(h), h

    return rj.Cell(
        init=init, initial_carry=initial_carry, step=step, hidden_size=H, name="minGRU (user cell)"
    )


def lstm_with_bug(H: int) -> rj.Cell:
    """The built-in LSTM whose hand-written backward forgets the forget gate on the cell-state path."""
    good = rj.lstm(H)

    def gates_bwd(params: Any, act: jax.Array, prev: Any, new: Any, d_new: Any) -> tuple:
        dz, dzh, d_prev = good.gates_bwd(params, act, prev, new, d_new)
        f = act[..., H : 2 * H]
        return dz, dzh, d_prev._replace(c=d_prev.c / f)  # dc_{t-1} = dc, where it should be dc ⊙ f

    return good.replace(gates_bwd=gates_bwd, name="lstm with a planted bug")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else Config()
    k_x, k_p = jax.random.split(jax.random.key(cfg.seed))
    xs = jax.random.normal(k_x, (cfg.batch, cfg.time, cfg.input_size))
    lengths = jnp.array([cfg.time, cfg.time // 2, 1])[: cfg.batch]
    H = cfg.hidden_size

    print("1. Every built-in cell, with variable lengths, run in reverse:\n")
    cells = every_cell(H)
    if args.quick:
        cells = [cells[4]]  # the LSTM (the table covers the others)
    ok = True
    for cell in cells:
        report = rj.gradcheck(cell, cell.init(k_p, cfg.input_size), xs, lengths=lengths, reverse=True)
        ok &= report.passed
        print(
            f"   {cell.name:<15} manual vs autodiff {report.max_autodiff_error:.1e}   "
            f"vs finite differences {report.max_fd_error:.1e}   {'ok' if report.passed else 'FAILED'}"
        )

    print(
        "\n2. A cell of your own (a step function only; 'manual' chains per-step VJPs backwards in time):\n"
    )
    cell = min_gru(H)
    report = rj.gradcheck(cell, cell.init(k_p, cfg.input_size), xs, lengths=lengths)
    ok &= report.passed
    print(report)

    print(
        "\n3. A deep bidirectional model: two bidirectional LSTM layers with a residual connection and a\n"
        "   per-frame read-out, through a loss function that passes grad= to the layers:\n"
    )
    model = rj.stack(rj.bidirectional(rj.lstm(H)), rj.bidirectional(rj.gru(H)), residual=True)
    head = rj.dense(2)
    params = {"rnn": model.init(k_p, cfg.input_size), "head": head.init(k_p, model.output_size)}

    def loss(params: Any, xs: jax.Array, grad: str = "manual") -> jax.Array:
        _, ys = model.apply(params["rnn"], xs, lengths=lengths, grad=grad)
        return jnp.sum(jnp.tanh(head.apply(params["head"], ys)))

    report = rj.gradcheck(loss, params, xs)
    ok &= report.passed
    print(report)

    print("\n4. The same kind of model with a planted bug in the LSTM's hand-written backward:\n")
    buggy = rj.stack(rj.bidirectional(lstm_with_bug(H)), rj.bidirectional(rj.gru(H)), residual=True)

    def buggy_loss(params: Any, xs: jax.Array, grad: str = "manual") -> jax.Array:
        _, ys = buggy.apply(params["rnn"], xs, lengths=lengths, grad=grad)
        return jnp.sum(jnp.tanh(head.apply(params["head"], ys)))

    report = rj.gradcheck(buggy_loss, params, xs)
    print(report)
    caught = not report.passed
    wrong = [r.leaf for r in report.rows if not r.passed]
    print(f"\n   caught: {caught}; the leaves whose gradients disagree: {', '.join(wrong)}")
    print("   (the second layer's GRU and the read-out are fine: the bug sits in the first layer's LSTM)")
    return 0 if ok and caught else 1


if __name__ == "__main__":
    raise SystemExit(main())
